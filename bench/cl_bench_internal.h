#pragma once
// `strata bench cl` internals shared by its two files: cl_bench.cc runs the benchmark (options,
// tasks, routers, one run per method), cl_bench_report.cc reports it (tables, JSON, plots).

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "bench/cl_bench.h"
#include "core/adapt/trainer.h"
#include "core/data/dataset.h"
#include "core/eval/metrics.h"
#include "nlohmann/json.hpp"

namespace strata::bench {

using json = nlohmann::json;

inline constexpr char kMtlLora[] = "mtl_lora";  // bench alias: mtl with the LoRA adapter shape

struct BenchTask {
  std::string dir;
  TaskData data;
  TrainTask train;
};

struct MethodRun {
  std::string name;    // as requested (mtl_lora included)
  std::string method;  // the core method name
  bool joint = false;
  std::vector<std::string> row_labels;      // one per matrix row
  std::vector<std::vector<double>> matrix;  // rows: stages (joint: one final row)
  std::optional<ClReport> report;           // continual methods
  // Task-routed evaluation (methods that keep per-task adapters: share, share_ella, inc_lora,
  // o_lora): a[i][j] for a learned task j (j <= i) scored on the task-routed weights, the model as
  // of task j (W0 + Σ_{l ≤ j} ΔW_l) rebuilt from the state after stage i; tasks not learned yet
  // keep the merged score.
  std::vector<std::vector<double>> routed_matrix;
  std::optional<ClReport> routed_report;
  // Automatic routing (same methods): a[i][j] = task j's test examples, each routed by the router
  // of stage i (tasks 1..i) to the model as of its task or, fitting none, to the base model W0;
  // router_accuracy[i][j] = share of task j's test prompts routed to task j; the reference NLL with
  // each text routed the same way after the last stage.
  std::vector<std::vector<double>> auto_matrix;
  std::vector<std::vector<double>> router_accuracy;
  std::optional<ClReport> auto_report;
  double auto_reference_nll = std::numeric_limits<double>::quiet_NaN();
  double aa = std::numeric_limits<double>::quiet_NaN();
  double nll_before = 0, nll_after = 0;
  int64_t state_bytes = 0;
  int64_t trainable = 0;  // max over stages
  std::vector<int64_t> trainable_per_stage;
  std::vector<double> stage_train_seconds;  // Train() incl. merge
  std::vector<double> stage_eval_seconds;
  std::vector<double> stage_final_loss;
  std::vector<int64_t> stage_steps;
  std::vector<double> stage_merge_seconds;  // the end-of-task merge inside Train()
  std::vector<int64_t> stage_state_bytes;   // method state after each stage
  // share, share_ella: mean subspace rank per side over the target modules after each stage.
  std::vector<double> stage_share_k_beta, stage_share_k_alpha;
  std::vector<double> pm_alphas;  // pm: the merge coefficient α_t of each task
  json pm_merge_terms;            // pm: what decided each α_t (own, past, cross, ...)
  double seconds = 0;             // total wall time (train + eval + export)
  std::string method_config_json;
};

// Everything a finished benchmark reports.
struct ClBenchResults {
  ClBenchArgs args;  // with the effective recipe
  std::vector<std::string> methods;
  std::vector<BenchTask> tasks;
  std::vector<std::string> task_names;
  std::string reference;
  std::vector<double> base;
  double nll_base = 0;
  std::vector<MethodRun> runs;
  std::vector<std::pair<std::string, std::string>> failures;  // method, why
  double seconds = 0;
};

// Prints the summary tables, writes the JSON (--json) and the plots (--plots); the exit code
// (kExitOk, or kExitFailed when a method failed or an output could not be written).
int ReportClBench(const ClBenchResults& results);

// Formatting shared by the per-stage progress lines and the report.
std::string FormatBytes(int64_t bytes);
std::string FormatOpt(const std::optional<double>& v, bool sign = false);
// The matrix of one method as an aligned table (base row first).
void PrintMatrix(const MethodRun& run, const std::vector<std::vector<double>>& matrix,
                 const std::vector<BenchTask>& tasks, const std::vector<double>& base);

}  // namespace strata::bench
