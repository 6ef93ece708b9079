// End-to-end tests of `strata bench cl` (RunClBenchCommand) on stories260K with a mixed order: a
// native cl-small task and a converted cl benchmark task, tiny step counts.

#include "bench/cl_bench.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <fstream>
#include <sstream>
#include <string>

#include "bench/gnuplot.h"
#include "nlohmann/json.hpp"

namespace strata::bench {
namespace {

const std::string kShared = STRATA_SHARED_DIR;

std::string TempDir(const std::string& name) {
  const std::string dir = ::testing::TempDir() + "/strata_cl_bench_" + name + "_" + std::to_string(getpid());
  std::string cmd = "rm -rf '" + dir + "' && mkdir -p '" + dir + "'";
  EXPECT_EQ(std::system(cmd.c_str()), 0);
  return dir;
}

ClBenchArgs SmallArgs(const std::string& out_dir) {
  ClBenchArgs a;
  a.model_dir = kShared + "/models/stories260K";
  a.tasks_dir = kShared + "/data/cl-small";
  // A name under --tasks (native cl-small) and a path (cl benchmark format, converted).
  a.order = {"capitals", kShared + "/data/cl/sst-2"};
  a.methods = {"share_ella", "seq_lora", "mtl"};
  a.max_train = 32;
  a.max_test = 16;
  a.recipe.max_steps = 4;
  a.recipe.batch_size = 4;
  a.recipe.learning_rate = 3e-3;
  a.reference_texts = 4;
  a.threads = 2;
  a.quiet = true;
  a.json_out = out_dir + "/cl.json";
  return a;
}

nlohmann::json ReadJson(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return nlohmann::json::parse(ss.str(), nullptr, false);
}

TEST(ClBenchTest, MixedOrderRunsEndToEndAndWritesDocumentedJson) {
  const std::string dir = TempDir("mixed");
  ClBenchArgs a = SmallArgs(dir);
  if (!FindGnuplot().empty()) a.plots_dir = dir + "/plots";
  ASSERT_EQ(RunClBenchCommand(a), 0);

  const nlohmann::json j = ReadJson(a.json_out);
  ASSERT_FALSE(j.is_discarded());
  ASSERT_TRUE(j.contains("config"));
  EXPECT_EQ(j["config"]["steps"], 4);
  EXPECT_EQ(j["config"]["max_train"], 32);
  ASSERT_EQ(j["tasks"].size(), 2u);
  EXPECT_EQ(j["tasks"][0], "capitals");
  EXPECT_EQ(j["tasks"][1], "sst-2");
  EXPECT_EQ(j["task_info"][0]["format"], "native");
  EXPECT_EQ(j["task_info"][1]["format"], "cl_benchmark");
  EXPECT_EQ(j["task_info"][1]["scorer"], "choice");
  EXPECT_LE(j["task_info"][1]["test"].get<int>(), 16);
  EXPECT_TRUE(j["failed"].empty()) << j["failed"].dump();

  ASSERT_TRUE(j.contains("methods"));
  for (const char* m : {"share_ella", "seq_lora", "mtl"}) {
    SCOPED_TRACE(m);
    ASSERT_TRUE(j["methods"].contains(m));
    const nlohmann::json& r = j["methods"][m];
    for (const char* key : {"matrix", "base", "aa", "bwt", "fwt", "forgetting", "reference_nll",
                            "state_bytes", "trainable_parameters", "seconds"}) {
      EXPECT_TRUE(r.contains(key)) << key;
    }
    ASSERT_EQ(r["base"].size(), 2u);
    ASSERT_EQ(r["reference_nll"].size(), 2u);
    EXPECT_TRUE(std::isfinite(r["reference_nll"][0].get<double>()));
    EXPECT_TRUE(std::isfinite(r["reference_nll"][1].get<double>()));
    EXPECT_GT(r["state_bytes"].get<int64_t>(), 0);
    EXPECT_GT(r["trainable_parameters"].get<int64_t>(), 0);
    EXPECT_GT(r["seconds"].get<double>(), 0.0);
    const double aa = r["aa"].get<double>();
    EXPECT_GE(aa, 0.0);
    EXPECT_LE(aa, 1.0);
  }
  // Continual methods: a full T×T matrix (including j > i) and every metric defined for T = 2.
  const nlohmann::json& se = j["methods"]["share_ella"];
  ASSERT_EQ(se["matrix"].size(), 2u);
  for (const auto& row : se["matrix"]) {
    ASSERT_EQ(row.size(), 2u);
    for (const auto& v : row) {
      ASSERT_TRUE(v.is_number());
      EXPECT_GE(v.get<double>(), 0.0);
      EXPECT_LE(v.get<double>(), 1.0);
    }
  }
  EXPECT_TRUE(se["bwt"].is_number());
  EXPECT_TRUE(se["fwt"].is_number());
  EXPECT_TRUE(se["forgetting"].is_number());
  EXPECT_FALSE(se["joint"].get<bool>());
  // AA is the mean of the last row.
  EXPECT_NEAR(se["aa"].get<double>(),
              (se["matrix"][1][0].get<double>() + se["matrix"][1][1].get<double>()) / 2.0, 1e-9);
  // Task-routed evaluation for methods that keep per-task adapters: the same shape; a task not
  // learned yet has no route and keeps the merged score.
  ASSERT_TRUE(se["routed"].is_object()) << se.dump();
  ASSERT_EQ(se["routed"]["matrix"].size(), 2u);
  EXPECT_EQ(se["routed"]["matrix"][0][1], se["matrix"][0][1]);
  EXPECT_TRUE(se["routed"]["bwt"].is_number());
  EXPECT_TRUE(j["methods"]["seq_lora"]["routed"].is_null());
  EXPECT_TRUE(j["methods"]["mtl"]["routed"].is_null());
  // The base scores are the same for every method.
  EXPECT_EQ(se["base"], j["methods"]["seq_lora"]["base"]);
  // mtl: one final row, AA only.
  const nlohmann::json& mtl = j["methods"]["mtl"];
  EXPECT_TRUE(mtl["joint"].get<bool>());
  ASSERT_EQ(mtl["matrix"].size(), 1u);
  EXPECT_EQ(mtl["matrix"][0].size(), 2u);
  EXPECT_TRUE(mtl["bwt"].is_null());
  EXPECT_TRUE(mtl["fwt"].is_null());
  EXPECT_EQ(mtl["stage_steps"][0].get<int>(), 8);  // steps × tasks

  if (!a.plots_dir.empty()) {
    for (const char* f :
         {"/share_ella_matrix.png", "/share_ella_stages.png", "/mtl_matrix.png", "/summary_aa_bwt.png"}) {
      std::ifstream png(a.plots_dir + f, std::ios::binary);
      ASSERT_TRUE(png.good()) << f;
      char magic[4] = {};
      png.read(magic, 4);
      EXPECT_EQ(std::string(magic + 1, 3), "PNG") << f;
    }
  }
}

TEST(ClBenchTest, BadInputExitsWithUsageError) {
  const std::string dir = TempDir("bad");
  {
    ClBenchArgs a = SmallArgs(dir);
    a.methods = {"no_such_method"};
    EXPECT_EQ(RunClBenchCommand(a), 2);
  }
  {
    ClBenchArgs a = SmallArgs(dir);
    a.order = {};
    EXPECT_EQ(RunClBenchCommand(a), 2);
  }
  {
    ClBenchArgs a = SmallArgs(dir);
    a.order = {"capitals", "no_such_task"};
    EXPECT_EQ(RunClBenchCommand(a), 2);
  }
  {
    ClBenchArgs a = SmallArgs(dir);
    a.order = {"capitals", "capitals"};
    EXPECT_EQ(RunClBenchCommand(a), 2);
  }
  {
    ClBenchArgs a = SmallArgs(dir);
    a.model_dir = dir + "/no_model";
    EXPECT_EQ(RunClBenchCommand(a), 2);
  }
  {
    ClBenchArgs a = SmallArgs(dir);
    a.device = "tpu";
    EXPECT_EQ(RunClBenchCommand(a), 2);
  }
  std::ifstream json(dir + "/cl.json");
  EXPECT_FALSE(json.good());  // nothing is written on a usage error
}

}  // namespace
}  // namespace strata::bench
