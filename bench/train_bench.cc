// `strata bench train`: see train_bench.h.

#include "bench/train_bench.h"

#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "bench/bench_util.h"
#include "core/adapt/method.h"
#include "core/adapt/trainer.h"
#include "core/model/model.h"
#include "core/model/runtime.h"
#include "core/util/file_util.h"
#include "core/util/process_info.h"
#include "core/util/status_macros.h"
#include "nlohmann/json.hpp"

namespace strata::bench {
namespace {

using json = nlohmann::json;

int Usage(const std::string& message) {
  std::fprintf(stderr, "strata bench train: %s\n", message.c_str());
  return kExitUsage;
}

// Parameters in matmuls: every adaptable linear weight + lm_head (tied or not).
int64_t MatmulParameters(const CausalLM& model) {
  int64_t n = 0;
  for (const std::string& name : model.LinearNames()) n += model.FindLinear(name)->weight.numel();
  n += model.config().vocab_size * model.config().hidden_size;
  return n;
}

}  // namespace

absl::StatusOr<std::unique_ptr<CausalLM>> LoadBenchModel(const std::string& name,
                                                         const std::string& model_dir) {
  if (name == "stories260K") return CausalLM::Load(model_dir);
  if (name == "110m") return CausalLM::RandomInit(Llama110mConfig(), 1234);
  return absl::InvalidArgumentError(
      absl::StrCat("unknown model \"", name, "\" (expected stories260K or 110m)"));
}

TrainTask RandomTrainTask(const std::string& name, int64_t rows, int64_t seq, int64_t vocab, uint64_t seed) {
  TrainTask t;
  t.name = name;
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> dist(3, static_cast<int32_t>(vocab - 1));
  for (int64_t r = 0; r < rows; ++r) {
    EncodedExample e;
    e.ids.resize(static_cast<size_t>(seq));
    for (auto& id : e.ids) id = dist(rng);
    e.target_start = 1;
    e.untruncated_length = seq;
    t.examples.push_back(std::move(e));
  }
  return t;
}

namespace {

// Model FLOPs per token of one training step: forward 2N + input gradients 2N + weight gradients
// 2 per trainable parameter (capped at N; embeddings and norms are counted like matmul weights).
double FlopsPerToken(int64_t n_matmul, int64_t trainable) {
  return 4.0 * static_cast<double>(n_matmul) + 2.0 * static_cast<double>(std::min(trainable, n_matmul));
}

double LoadAverage() {
  double load[1] = {0};
  return getloadavg(load, 1) == 1 ? load[0] : -1.0;
}

struct StepTiming {
  double step_seconds = 0;  // mean over the timed steps
  double tokens_per_second = 0;
  int64_t trainable = 0;
  double first_step_seconds = 0;
};

// Trains `method` on random data for warmup + steps steps from `model` and cancels before the
// merge (the method's committed state is unchanged).
absl::StatusOr<StepTiming> TimeSteps(const CausalLM& model, Method& method, const std::string& task_name,
                                     const TrainBenchArgs& a, int64_t warmup, int64_t steps, uint64_t seed) {
  TrainOptions o;
  o.learning_rate = a.lr;
  o.batch_size = a.batch_size;
  o.shards = a.shards;
  o.max_steps = warmup + steps + 1;  // cancelled after warmup + steps
  o.seed = seed;
  o.bucket_size = a.batch_size;
  std::atomic<bool> cancel{false};
  o.cancel = &cancel;
  std::vector<double> elapsed;
  int64_t trainable = 0;
  o.progress_every = 1;
  o.on_progress = [&](const TrainProgress& p) {
    if (p.step == 1) {
      std::vector<at::Tensor> seen;
      for (const auto& [n, t] : method.TrainableParameters()) {
        bool dup = false;
        for (const auto& s : seen) dup = dup || s.is_same(t);
        if (!dup) {
          seen.push_back(t);
          trainable += t.numel();
        }
      }
    }
    elapsed.push_back(p.elapsed_seconds);
    if (p.step >= warmup + steps) cancel.store(true);
  };
  const TrainTask task =
      RandomTrainTask(task_name, a.batch_size * 4, a.seq_len, model.config().vocab_size, seed + 17);
  Trainer trainer(o);
  absl::StatusOr<TrainResult> r = trainer.Train(model, method, task_name, {task});
  if (r.ok()) return absl::InternalError("the timed run was not cancelled");
  if (r.status().code() != absl::StatusCode::kCancelled) return r.status();
  if (static_cast<int64_t>(elapsed.size()) < warmup + steps)
    return absl::InternalError("too few steps recorded");
  StepTiming t;
  const double start = warmup > 0 ? elapsed[static_cast<size_t>(warmup - 1)] : 0.0;
  t.step_seconds = (elapsed[static_cast<size_t>(warmup + steps - 1)] - start) / static_cast<double>(steps);
  t.tokens_per_second = static_cast<double>(a.batch_size * a.seq_len) / t.step_seconds;
  t.trainable = trainable;
  t.first_step_seconds = elapsed.front();
  return t;
}

double MeasureGemmGflops() {
  at::NoGradGuard no_grad;
  const at::Tensor x = torch::randn({1024, 1024});
  const at::Tensor y = torch::randn({1024, 1024});
  at::Tensor z;
  for (int i = 0; i < 3; ++i) z = torch::mm(x, y);
  std::vector<double> times;
  for (int i = 0; i < 10; ++i) {
    const Clock::time_point t0 = Clock::now();
    z = torch::mm(x, y);
    times.push_back(SecondsSince(t0));
  }
  std::sort(times.begin(), times.end());
  return 2.0 * 1024.0 * 1024.0 * 1024.0 / times[times.size() / 2] / 1e9;
}

int64_t StateBytes(const MethodState& state, const std::string& prefix = "") {
  int64_t bytes = 0;
  for (const auto& [name, t] : state.tensors) {
    if (!t.defined() || name.compare(0, prefix.size(), prefix) != 0) continue;
    bytes += t.numel() * static_cast<int64_t>(t.element_size());
  }
  return bytes;
}

// The kind of a state tensor: its name without the module path, e.g. "share/<module>/e_beta" ->
// "share/e_beta", "served/<module>" -> "served".
std::string StateTensorKind(const std::string& name) {
  const size_t first = name.find('/');
  if (first == std::string::npos) return name;
  const size_t last = name.rfind('/');
  if (last == first) return name.substr(0, first);
  return name.substr(0, first) + name.substr(last);
}

// Bytes of the storages behind `state`'s tensors that `served` does not hold as parameters (each
// storage counted once): what the state costs in memory beyond the served model. `by_kind` (may be
// null) receives the same bytes per StateTensorKind (a storage counted under its first tensor).
int64_t UnsharedStateBytes(const MethodState& state, const CausalLM& served,
                           std::map<std::string, int64_t>* by_kind = nullptr) {
  std::set<const void*> model;
  for (const auto& [name, t] : served.NamedParameters()) model.insert(t.storage().data());
  for (const std::string& name : served.LinearNames())
    model.insert(served.FindLinear(name)->weight.storage().data());
  std::set<const void*> seen;
  int64_t bytes = 0;
  for (const auto& [name, t] : state.tensors) {
    if (!t.defined()) continue;
    const void* p = t.storage().data();
    if (model.count(p) || !seen.insert(p).second) continue;
    bytes += static_cast<int64_t>(t.storage().nbytes());
    if (by_kind != nullptr) (*by_kind)[StateTensorKind(name)] += static_cast<int64_t>(t.storage().nbytes());
  }
  return bytes;
}

std::string Mib(int64_t bytes) { return absl::StrFormat("%.2f", static_cast<double>(bytes) / (1 << 20)); }

// BeginTask on a copy of `served`, random N(0, std²) values in every trainable tensor, EndTask:
// returns the new served model and the EndTask seconds.
absl::StatusOr<std::pair<std::unique_ptr<CausalLM>, double>> RandomMerge(const CausalLM& served,
                                                                         Method& method,
                                                                         const std::string& task,
                                                                         uint64_t seed) {
  std::unique_ptr<CausalLM> work = served.ShallowCopy();
  work->ClearAdapters();
  RETURN_IF_ERROR(method.BeginTask(task, work.get()));
  {
    at::NoGradGuard no_grad;
    torch::manual_seed(seed);
    for (auto& [name, t] : method.TrainableParameters()) {
      at::Tensor p = t;
      p.normal_(0.0, 0.01);
    }
  }
  const Clock::time_point t0 = Clock::now();
  absl::Status s = method.EndTask(work.get());
  const double seconds = SecondsSince(t0);
  if (!s.ok()) return s;
  return std::make_pair(std::move(work), seconds);
}

}  // namespace

void AddTrainBenchOptions(CLI::App* sub, TrainBenchArgs* a) {
  sub->add_option("--model", a->model_dir,
                  "stories260K model directory (default: shared/models/stories260K)");
  sub->add_option("--models", a->models, "Models: stories260K,110m")->delimiter(',')->capture_default_str();
  sub->add_option("--methods", a->methods, "Methods, comma-separated (default: all)")->delimiter(',');
  sub->add_option("--batch-size", a->batch_size, "Sequences per step")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--seq-len", a->seq_len, "Tokens per sequence")
      ->capture_default_str()
      ->check(CLI::Range(2, 1 << 20));
  sub->add_option("--warmup", a->warmup, "Untimed steps (stories260K: at least 3)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  sub->add_option("--steps", a->steps, "Timed steps (stories260K: at least 20)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--targets", a->targets, "Target modules (comma-separated or all-linear)")
      ->capture_default_str();
  sub->add_option("--rank", a->rank, "LoRA rank / Share p")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--lr", a->lr, "Learning rate")->capture_default_str()->check(CLI::PositiveNumber);
  sub->add_option("--threads", a->threads, "Torch CPU threads")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--shards", a->shards,
                  "Row shards per step run concurrently (0 = automatic: one per thread on the CPU)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  sub->add_option("--scaling-method", a->scaling_method,
                  "Method for the task-count scaling part (\"\" = skip)")
      ->capture_default_str();
  sub->add_option("--scaling-model", a->scaling_model, "Model for the scaling part (stories260K or 110m)")
      ->capture_default_str();
  sub->add_option("--scaling-tasks", a->scaling_tasks, "Task counts, comma-separated")
      ->delimiter(',')
      ->capture_default_str();
  sub->add_option("--seed", a->seed, "Seed")->capture_default_str();
  sub->add_option("--json", a->json_out, "Write the results as JSON to this file");
}

int RunTrainBenchCommand(const TrainBenchArgs& args_in) {
  TrainBenchArgs a = args_in;
  a.models = FlattenList(a.models);
  a.methods = FlattenList(a.methods);
  if (a.model_dir.empty()) a.model_dir = std::string(STRATA_SHARED_DIR) + "/models/stories260K";
  const std::vector<std::string> known = MethodNames();
  const std::vector<std::string> methods = a.methods.empty() ? known : a.methods;
  for (const std::string& m : methods) {
    if (std::find(known.begin(), known.end(), m) == known.end()) {
      return Usage(absl::StrCat("unknown method \"", m, "\" (valid: ", absl::StrJoin(known, ", "), ")"));
    }
  }
  if (!a.scaling_method.empty() && std::find(known.begin(), known.end(), a.scaling_method) == known.end()) {
    return Usage(absl::StrCat("unknown --scaling-method \"", a.scaling_method, "\""));
  }
  for (const std::string& m : a.models) {
    if (m != "stories260K" && m != "110m")
      return Usage(absl::StrCat("unknown model \"", m, "\" (stories260K, 110m)"));
  }
  if (a.scaling_model != "stories260K" && a.scaling_model != "110m") {
    return Usage(absl::StrCat("unknown --scaling-model \"", a.scaling_model, "\""));
  }
  for (int64_t t : a.scaling_tasks) {
    if (t < 1) return Usage("--scaling-tasks must be >= 1");
  }
  std::sort(a.scaling_tasks.begin(), a.scaling_tasks.end());
  if (a.batch_size < 1 || a.seq_len < 2 || a.steps < 1 || a.warmup < 0 || a.threads < 1) {
    return Usage("--batch-size, --seq-len, --steps, --warmup and --threads must be positive");
  }
  MethodConfig config;
  config.target_modules = SplitList(a.targets);
  config.rank = a.rank;
  config.p = a.rank;
  config.seed = a.seed;
  if (absl::Status s = ValidateMethodConfig(config); !s.ok()) return Usage(std::string(s.message()));

  SetTorchThreads(a.threads);
  int exit_code = kExitOk;
  json out;
  out["config"] = {{"models", a.models},
                   {"methods", methods},
                   {"batch_size", a.batch_size},
                   {"seq_len", a.seq_len},
                   {"warmup", a.warmup},
                   {"steps", a.steps},
                   {"targets", a.targets},
                   {"rank", a.rank},
                   {"lr", a.lr},
                   {"threads", a.threads},
                   {"shards", a.shards},
                   {"dtype", "float32"},
                   {"blas", LoadedBlasLibrary()},
                   {"allocator", LoadedAllocator()},
                   {"runtime", TorchRuntimeSummary()}};
  out["flops_formula"] =
      "model GFLOP/s = (4 * N + 2 * min(P, N)) * tokens / step_seconds / 1e9, N = matmul parameters (q,k,v,o,"
      "gate,up,down weights + lm_head), P = trainable parameters: forward 2N + input gradients 2N + weight "
      "gradients 2 per trainable parameter (= 6N for full fine-tuning, ~4N for adapters); attention scores "
      "and "
      "the adapters' own forward FLOPs are not counted";

  const double gemm = MeasureGemmGflops();
  out["gemm_gflops"] = gemm;
  // Every GEMM measurement of the run (start, before each method, end): their median is the stable
  // reference for "% of GEMM" on a machine whose rate swings (one measurement can land in a dip).
  std::vector<double> gemm_all = {gemm};
  std::vector<std::pair<std::string, double>> method_gflops;  // "model/method", model GFLOP/s
  std::printf(
      "strata bench train: batch %lld x %lld tokens, fp32, %d threads, %s row shards, targets %s, rank "
      "%lld\n  %s\n",
      static_cast<long long>(a.batch_size), static_cast<long long>(a.seq_len), a.threads,
      a.shards > 0 ? std::to_string(a.shards).c_str()
                   : "automatic (one per thread, <= 1 GiB of gradient copies)",
      a.targets.c_str(), static_cast<long long>(a.rank), TorchRuntimeSummary().c_str());
  std::printf("measured fp32 GEMM (1024^3 torch::mm, median of 10): %.1f GFLOP/s\n", gemm);
  std::printf(
      "model FLOPs per step = k*N*tokens, k = 4 + 2*min(P, N)/N (6 = full fine-tuning, ~4 = adapters); "
      "N = matmul parameters (linears + lm_head), P = trainable parameters; attention scores not counted\n");
  std::fflush(stdout);

  // ---- part 1: throughput ---------------------------------------------------------------------
  json jmodels = json::object();
  for (const std::string& model_name : a.models) {
    absl::StatusOr<std::unique_ptr<CausalLM>> model = LoadBenchModel(model_name, a.model_dir);
    if (!model.ok()) {
      std::fprintf(stderr, "strata bench train: %s: %s\n", model_name.c_str(),
                   std::string(model.status().message()).c_str());
      exit_code = model_name == "stories260K" ? kExitUsage : kExitFailed;
      continue;
    }
    const bool small = model_name == "stories260K";
    const int64_t warmup = small ? std::max<int64_t>(a.warmup, 3) : a.warmup;
    const int64_t steps = small ? std::max<int64_t>(a.steps, 20) : a.steps;
    const int64_t n_matmul = MatmulParameters(**model);
    const int64_t tokens = a.batch_size * a.seq_len;
    std::printf("\n%s: %lld parameters, %lld in matmuls; %lld warmup + %lld timed steps\n",
                model_name.c_str(), static_cast<long long>((*model)->ParameterCount()),
                static_cast<long long>(n_matmul), static_cast<long long>(warmup),
                static_cast<long long>(steps));
    std::printf("%-12s %12s %9s %10s %6s %8s %9s %7s %6s\n", "method", "trainable", "step_s", "tokens/s", "k",
                "GFLOP/s", "GEMM_now", "%GEMM", "load");
    std::fflush(stdout);
    json jm = json::object();
    for (const std::string& name : methods) {
      absl::StatusOr<std::unique_ptr<Method>> method = CreateMethod(name, config);
      if (!method.ok()) {
        std::printf("%-12s FAILED: %s\n", name.c_str(), std::string(method.status().message()).c_str());
        jm[name] = {{"error", std::string(method.status().message())}};
        exit_code = kExitFailed;
        continue;
      }
      // The GEMM rate just before this method, and the 1-minute load: a shared machine's other jobs
      // show up in both.
      const double gemm_now = MeasureGemmGflops();
      gemm_all.push_back(gemm_now);
      const double load = LoadAverage();
      absl::StatusOr<StepTiming> t = TimeSteps(**model, **method, "bench", a, warmup, steps, a.seed);
      if (!t.ok()) {
        std::printf("%-12s FAILED: %s\n", name.c_str(), t.status().ToString().c_str());
        jm[name] = {{"error", t.status().ToString()}};
        exit_code = kExitFailed;
        continue;
      }
      // k = FLOPs per token per matmul parameter: 6 for full fine-tuning, ~4 for adapters.
      const double k = FlopsPerToken(n_matmul, t->trainable) / static_cast<double>(n_matmul);
      const double gflops =
          k * static_cast<double>(n_matmul) * static_cast<double>(tokens) / t->step_seconds / 1e9;
      std::printf("%-12s %12lld %9.4f %10.0f %6.2f %8.1f %9.1f %6.0f%% %6.2f\n", name.c_str(),
                  static_cast<long long>(t->trainable), t->step_seconds, t->tokens_per_second, k, gflops,
                  gemm_now, 100.0 * gflops / gemm_now, load);
      std::fflush(stdout);
      method_gflops.emplace_back(model_name + "/" + name, gflops);
      jm[name] = {{"trainable_parameters", t->trainable},
                  {"step_seconds", t->step_seconds},
                  {"tokens_per_second", t->tokens_per_second},
                  {"flops_factor", k},
                  {"gflops", gflops},
                  {"gemm_gflops_before", gemm_now},
                  {"load_average_1min", load},
                  {"first_step_seconds", t->first_step_seconds}};
    }
    jmodels[model_name] = {{"parameters", (*model)->ParameterCount()},
                           {"matmul_parameters", n_matmul},
                           {"warmup", warmup},
                           {"steps", steps},
                           {"methods", jm}};
  }
  out["models"] = jmodels;
  const double gemm_end = MeasureGemmGflops();
  out["gemm_gflops_end"] = gemm_end;
  gemm_all.push_back(gemm_end);
  std::printf("\nfp32 GEMM at the end: %.1f GFLOP/s (start %.1f)\n", gemm_end, gemm);
  std::vector<double> sorted = gemm_all;
  std::sort(sorted.begin(), sorted.end());
  const size_t n_gemm = sorted.size();
  const double gemm_ref =
      n_gemm % 2 == 1 ? sorted[n_gemm / 2] : 0.5 * (sorted[n_gemm / 2 - 1] + sorted[n_gemm / 2]);
  out["gemm_gflops_all"] = gemm_all;
  out["gemm_gflops_reference"] = gemm_ref;
  std::printf("GEMM reference (median of this run's %zu GEMM measurements, %.1f-%.1f): %.1f GFLOP/s\n",
              n_gemm, sorted.front(), sorted.back(), gemm_ref);
  for (const auto& [label, gflops] : method_gflops) {
    std::printf("  %-24s %8.1f GFLOP/s = %5.1f%% of the reference\n", label.c_str(), gflops,
                100.0 * gflops / gemm_ref);
    const size_t slash = label.find('/');
    out["models"][label.substr(0, slash)]["methods"][label.substr(slash + 1)]["pct_of_gemm_reference"] =
        100.0 * gflops / gemm_ref;
  }

  // ---- part 2: cost against the number of learned tasks ----------------------------------------
  if (!a.scaling_method.empty() && !a.scaling_tasks.empty()) {
    json js;
    js["method"] = a.scaling_method;
    js["model"] = a.scaling_model;
    absl::StatusOr<std::unique_ptr<CausalLM>> model = LoadBenchModel(a.scaling_model, a.model_dir);
    absl::StatusOr<std::unique_ptr<Method>> method =
        model.ok() ? CreateMethod(a.scaling_method, config)
                   : absl::StatusOr<std::unique_ptr<Method>>(model.status());
    if (!model.ok() || !method.ok()) {
      std::fprintf(stderr, "strata bench train: scaling: %s\n",
                   std::string((model.ok() ? method.status() : model.status()).message()).c_str());
      exit_code = kExitFailed;
    } else {
      const bool small = a.scaling_model == "stories260K";
      const int64_t warmup = small ? std::max<int64_t>(a.warmup, 3) : a.warmup;
      const int64_t steps = small ? std::max<int64_t>(a.steps, 20) : std::max<int64_t>(a.steps - 1, 1);
      // One rank-r LoRA per task on the same modules: r·(n + d) float32 numbers per module.
      absl::StatusOr<std::vector<std::string>> modules = ResolveTargetModules(**model, config.target_modules);
      int64_t lora_bytes = 0;
      if (modules.ok()) {
        for (const std::string& m : *modules) {
          const at::Tensor& w = (*model)->FindLinear(m)->weight;
          lora_bytes += a.rank * (w.size(0) + w.size(1)) * 4;
        }
      }
      js["lora_bytes_per_task"] = lora_bytes;
      std::printf(
          "\nscaling: %s on %s (%zu target modules), tasks grown by random merges; step time = next task's "
          "training step (%lld timed)\n",
          a.scaling_method.c_str(), a.scaling_model.c_str(), modules.ok() ? modules->size() : 0,
          static_cast<long long>(steps));
      std::printf("%6s %10s %12s %12s %12s %12s %12s %14s %10s %10s\n", "tasks", "step_s", "tokens/s",
                  "merge_s", "state_MiB", "share_MiB", "unshared_MiB", "LoRA/task_MiB", "RSS_MiB",
                  "peak_MiB");
      std::fflush(stdout);
      std::unique_ptr<CausalLM> served = (*model)->ShallowCopy();
      const int64_t rss_model = ReadProcessStats().resident_bytes;
      const bool peak_reset = ResetPeakResident();
      js["rss_after_model_bytes"] = rss_model;
      json rows = json::array();
      int64_t t = 0;
      std::vector<double> merge_times;
      for (int64_t target : a.scaling_tasks) {
        bool ok = true;
        while (t < target) {
          auto merged =
              RandomMerge(*served, **method, absl::StrCat("task", t + 1), a.seed + static_cast<uint64_t>(t));
          if (!merged.ok()) {
            std::fprintf(stderr, "strata bench train: scaling: merge %lld: %s\n",
                         static_cast<long long>(t + 1), std::string(merged.status().message()).c_str());
            ok = false;
            break;
          }
          served = std::move(merged->first);
          merge_times.push_back(merged->second);
          ++t;
        }
        if (!ok) {
          exit_code = kExitFailed;
          break;
        }
        // Merge time at t: mean of the last min(5, t) merges (the t-th and the ones just before).
        double merge = 0;
        const size_t n = std::min<size_t>(5, merge_times.size());
        for (size_t i = merge_times.size() - n; i < merge_times.size(); ++i) merge += merge_times[i];
        merge /= static_cast<double>(n);
        absl::StatusOr<StepTiming> timing =
            TimeSteps(*served, **method, absl::StrCat("probe", t), a, warmup, steps, a.seed + 1000);
        absl::StatusOr<MethodState> state = (*method)->ExportState();
        if (!timing.ok() || !state.ok()) {
          std::fprintf(stderr, "strata bench train: scaling at %lld tasks: %s\n", static_cast<long long>(t),
                       (timing.ok() ? state.status() : timing.status()).ToString().c_str());
          exit_code = kExitFailed;
          break;
        }
        const int64_t bytes = StateBytes(*state);
        const int64_t share_bytes = StateBytes(*state, "share/");
        std::map<std::string, int64_t> unshared_by_kind;
        const int64_t unshared = UnsharedStateBytes(*state, *served, &unshared_by_kind);
        const int64_t rss = ReadProcessStats().resident_bytes;
        const int64_t peak = PeakResidentBytes();
        std::printf("%6lld %10.4f %12.0f %12.4f %12s %12s %12s %14s %10s %10s\n", static_cast<long long>(t),
                    timing->step_seconds, timing->tokens_per_second, merge, Mib(bytes).c_str(),
                    Mib(share_bytes).c_str(), Mib(unshared).c_str(), Mib(lora_bytes * t).c_str(),
                    Mib(rss).c_str(), Mib(peak).c_str());
        std::string kinds;
        json jkinds = json::object();
        for (const auto& [kind, kind_bytes] : unshared_by_kind) {
          absl::StrAppend(&kinds, " ", kind, " ", Mib(kind_bytes));
          jkinds[kind] = kind_bytes;
        }
        std::printf("%6s unshared_MiB by kind:%s\n", "", kinds.empty() ? " none" : kinds.c_str());
        std::fflush(stdout);
        rows.push_back({{"tasks", t},
                        {"step_seconds", timing->step_seconds},
                        {"tokens_per_second", timing->tokens_per_second},
                        {"merge_seconds", merge},
                        {"last_merge_seconds", merge_times.back()},
                        {"state_bytes", bytes},
                        {"share_state_bytes", share_bytes},
                        {"unshared_state_bytes", unshared},
                        {"unshared_state_bytes_by_kind", jkinds},
                        {"rss_bytes", rss},
                        {"peak_rss_bytes", peak},
                        {"lora_per_task_bytes", lora_bytes * t}});
      }
      js["rows"] = rows;
      js["peak_reset"] = peak_reset;
      std::printf(
          "(state = ExportState tensors (what a checkpoint stores); share = its share/ part (bases and "
          "per-task coefficients); unshared = the state's storages that the served model does not "
          "hold, i.e. its memory beyond the served weights; LoRA/task = t x one rank-%lld LoRA per task; RSS "
          "= process resident set after the row; peak = VmHWM since the model was built (%s); RSS after "
          "building the model: %s MiB)\n",
          static_cast<long long>(a.rank), peak_reset ? "reset there" : "reset refused: since process start",
          Mib(rss_model).c_str());
    }
    out["scaling"] = js;
  }

  if (!a.json_out.empty()) {
    absl::Status s = WriteFileAtomic(a.json_out, out.dump(1) + "\n");
    if (!s.ok()) {
      std::fprintf(stderr, "strata bench train: writing %s: %s\n", a.json_out.c_str(),
                   std::string(s.message()).c_str());
      return kExitFailed;
    }
    std::printf("wrote %s\n", a.json_out.c_str());
  }
  return exit_code;
}

}  // namespace strata::bench
