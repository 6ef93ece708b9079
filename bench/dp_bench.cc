#include "bench/dp_bench.h"

#include <stdlib.h>
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench/bench_util.h"
#include "bench/train_bench.h"
#include "core/adapt/data_parallel.h"
#include "core/adapt/method.h"
#include "core/adapt/trainer.h"
#include "core/model/model.h"
#include "core/util/file_util.h"
#include "nlohmann/json.hpp"

namespace strata::bench {
namespace {

using json = nlohmann::json;

struct Timing {
  absl::Status status;
  double steps_per_second = 0;
  double tokens_per_second = 0;
  std::vector<float> losses;
  int64_t dp_steps = 0;
};

// One rank's training run: warmup + steps steps (no merge), timed after the warmup.
Timing TrainRank(const std::string& model_name, const DpBenchArgs& a, int threads, GradientSync* sync) {
  Timing t;
  at::set_num_threads(threads);
  auto model = LoadBenchModel(model_name, a.model_dir);
  if (!model.ok()) {
    t.status = model.status();
    return t;
  }
  MethodConfig mc;
  mc.target_modules = absl::StrSplit(a.targets, ',');
  mc.rank = a.rank;
  mc.p = a.rank;
  auto method = CreateMethod(a.method, mc);
  if (!method.ok()) {
    t.status = method.status();
    return t;
  }
  TrainOptions o;
  o.learning_rate = 1e-3;
  o.batch_size = a.batch_size;
  o.bucket_size = a.batch_size;
  o.max_steps = a.warmup + a.steps;
  o.train_only = true;
  o.sync = sync;
  Clock::time_point t0 = Clock::now();
  o.on_progress = [&](const TrainProgress& p) {
    if (p.step == a.warmup) t0 = Clock::now();
  };
  const TrainTask task =
      RandomTrainTask("dp", a.batch_size * (a.warmup + a.steps), a.seq_len, (*model)->config().vocab_size, 5);
  auto result = Trainer(o).Train(**model, **method, "dp", {task});
  if (!result.ok()) {
    t.status = result.status();
    return t;
  }
  const double seconds = SecondsSince(t0);
  t.steps_per_second = static_cast<double>(a.steps) / seconds;
  t.tokens_per_second = t.steps_per_second * static_cast<double>(a.batch_size * a.seq_len);
  t.losses = result->losses;
  t.dp_steps = result->data_parallel_steps;
  return t;
}

// `ranks` ranks as threads of this process, joined through a FileStore in a temporary directory.
Timing TrainRanks(const std::string& model_name, const DpBenchArgs& a, int ranks, int threads_per_rank) {
  char tmpl[] = "/tmp/strata-dp-bench-XXXXXX";
  if (mkdtemp(tmpl) == nullptr) return Timing{absl::InternalError("mkdtemp failed")};
  const std::string dir = tmpl;
  std::vector<Timing> timings(static_cast<size_t>(ranks));
  auto rank_main = [&](int rank) {
    DataParallelOptions o;
    o.world_size = ranks;
    o.rank = rank;
    o.store_file = dir + "/store";
    o.join_timeout_seconds = 120;
    auto group = DataParallelGroup::Connect(o);
    if (!group.ok()) {
      timings[static_cast<size_t>(rank)].status = group.status();
      return;
    }
    std::unique_ptr<GradientSync> sync;
    if (rank == 0) {
      DataParallelTask task;
      task.name = "dp";
      sync = (*group)->StartTask(&task,
                                 [](const std::string& line) { std::fprintf(stderr, "%s\n", line.c_str()); });
    } else {
      auto task = (*group)->NextTask(0, std::chrono::seconds(120));
      if (task.ok() && task->has_value()) {
        auto joined = (*group)->JoinTask((*task)->seq, "");
        if (joined.ok()) sync = std::move(*joined);
      }
    }
    if (sync == nullptr) {
      timings[static_cast<size_t>(rank)].status = absl::UnavailableError("the ranks did not form a group");
      return;
    }
    timings[static_cast<size_t>(rank)] = TrainRank(model_name, a, threads_per_rank, sync.get());
  };
  std::vector<std::thread> others;
  for (int r = 1; r < ranks; ++r) others.emplace_back(rank_main, r);
  rank_main(0);
  for (auto& th : others) th.join();
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  for (const Timing& t : timings) {
    if (!t.status.ok()) return t;
  }
  return timings[0];
}

}  // namespace

void AddDpBenchOptions(CLI::App* sub, DpBenchArgs* a) {
  sub->add_option("--model", a->model_dir,
                  "stories260K model directory (default: shared/models/stories260K)");
  sub->add_option("--models", a->models, "Models: stories260K,110m")->delimiter(',')->capture_default_str();
  sub->add_option("--method", a->method, "Method")->capture_default_str();
  sub->add_option("--batch-size", a->batch_size, "Sequences per step (the global batch)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--seq-len", a->seq_len, "Tokens per sequence")
      ->capture_default_str()
      ->check(CLI::Range(2, 1 << 20));
  sub->add_option("--warmup", a->warmup, "Untimed steps")->capture_default_str()->check(CLI::PositiveNumber);
  sub->add_option("--steps", a->steps, "Timed steps")->capture_default_str()->check(CLI::PositiveNumber);
  sub->add_option("--targets", a->targets, "Target modules (comma-separated or all-linear)")
      ->capture_default_str();
  sub->add_option("--rank", a->rank, "Adapter rank")->capture_default_str()->check(CLI::PositiveNumber);
  sub->add_option("--ranks", a->ranks, "Data-parallel ranks")
      ->capture_default_str()
      ->check(CLI::Range(2, 64));
  sub->add_option("--threads", a->threads, "Cores to use in all (split among the ranks)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--json", a->json_out, "Write the results as JSON to this file");
}

int RunDpBenchCommand(const DpBenchArgs& args) {
  DpBenchArgs a = args;
  if (a.model_dir.empty()) a.model_dir = std::string(STRATA_SHARED_DIR) + "/models/stories260K";
  if (!DataParallelAvailable()) {
    std::fprintf(stderr,
                 "strata bench dp: this build has no c10d with Gloo (install libgloo-dev and rebuild)\n");
    return kExitUsage;
  }
  const int per_rank = std::max(1, a.threads / a.ranks);
  json results = json::array();
  bool failed = false;
  std::printf("%-12s %5s %8s %10s %12s %10s  %s\n", "model", "ranks", "threads", "steps/s", "tokens/s",
              "speedup", "final loss");
  for (const std::string& model : a.models) {
    struct Config {
      int ranks, threads;
    };
    const std::vector<Config> configs = {{1, 1}, {1, a.threads}, {a.ranks, per_rank}};
    double base = 0;
    for (const Config& c : configs) {
      const Timing t =
          c.ranks == 1 ? TrainRank(model, a, c.threads, nullptr) : TrainRanks(model, a, c.ranks, c.threads);
      if (!t.status.ok()) {
        std::fprintf(stderr, "strata bench dp: %s, %d rank(s) x %d thread(s): %s\n", model.c_str(), c.ranks,
                     c.threads, t.status.ToString().c_str());
        failed = true;
        continue;
      }
      if (base == 0) base = t.steps_per_second;
      const double final_loss = t.losses.empty() ? 0.0 : t.losses.back();
      std::printf("%-12s %5d %8d %10.3f %12.1f %9.2fx  %.5f\n", model.c_str(), c.ranks, c.threads,
                  t.steps_per_second, t.tokens_per_second, t.steps_per_second / base, final_loss);
      std::fflush(stdout);
      double load[1] = {0};
      results.push_back({{"model", model},
                         {"ranks", c.ranks},
                         {"threads_per_rank", c.threads},
                         {"batch_size", a.batch_size},
                         {"seq_len", a.seq_len},
                         {"steps", a.steps},
                         {"steps_per_second", t.steps_per_second},
                         {"tokens_per_second", t.tokens_per_second},
                         {"data_parallel_steps", t.dp_steps},
                         {"final_loss", final_loss},
                         {"load_average", getloadavg(load, 1) == 1 ? load[0] : -1.0}});
    }
  }
  if (!a.json_out.empty()) {
    json out;
    out["results"] = results;
    out["method"] = a.method;
    if (absl::Status s = WriteFileAtomic(a.json_out, out.dump(1) + "\n"); !s.ok()) {
      std::fprintf(stderr, "strata bench dp: writing %s: %s\n", a.json_out.c_str(), s.ToString().c_str());
      return kExitFailed;
    }
    std::printf("wrote %s\n", a.json_out.c_str());
  }
  return failed ? kExitFailed : kExitOk;
}

}  // namespace strata::bench
