// `strata bench dp` end to end on stories260K with a small batch: three configurations, the same
// losses, a JSON other tools can read.

#include "bench/dp_bench.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "nlohmann/json.hpp"

namespace strata::bench {
namespace {

TEST(DpBenchTest, ReportsEveryConfigurationWithTheSameLoss) {
  DpBenchArgs a;
  a.model_dir = std::string(STRATA_SHARED_DIR) + "/models/stories260K";
  a.batch_size = 4;
  a.seq_len = 32;
  a.warmup = 1;
  a.steps = 3;
  a.json_out = ::testing::TempDir() + "/dp_bench_" + std::to_string(getpid()) + ".json";
  ASSERT_EQ(RunDpBenchCommand(a), 0);
  std::ifstream in(a.json_out);
  std::stringstream text;
  text << in.rdbuf();
  const nlohmann::json j = nlohmann::json::parse(text.str());
  const auto& results = j.at("results");
  ASSERT_EQ(results.size(), 3u) << j.dump();
  EXPECT_EQ(results[0]["ranks"], 1);
  EXPECT_EQ(results[2]["ranks"], 2);
  EXPECT_EQ(results[2]["data_parallel_steps"], 4);  // warmup + timed steps, all summed over 2 ranks
  for (const auto& r : results) {
    EXPECT_GT(r["steps_per_second"].get<double>(), 0) << r.dump();
    EXPECT_NEAR(r["final_loss"].get<double>(), results[0]["final_loss"].get<double>(), 1e-4) << r.dump();
  }
  std::remove(a.json_out.c_str());
}

}  // namespace
}  // namespace strata::bench
