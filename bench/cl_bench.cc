// `strata bench cl`: see cl_bench.h.

#include "bench/cl_bench.h"

#include <torch/torch.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <optional>
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
#include "bench/gnuplot.h"
#include "core/adapt/method.h"
#include "core/adapt/router.h"
#include "core/adapt/trainer.h"
#include "core/data/dataset.h"
#include "core/eval/metrics.h"
#include "core/eval/scorers.h"
#include "core/model/model.h"
#include "core/model/runtime.h"
#include "core/model/tokenizer.h"
#include "bench/bench_util.h"
#include "core/util/file_util.h"
#include "core/util/status_macros.h"
#include "nlohmann/json.hpp"

namespace strata::bench {
namespace {

using json = nlohmann::json;

constexpr char kMtlLora[] = "mtl_lora";  // bench alias: mtl with the LoRA adapter shape

int Usage(const std::string& message) {
  std::fprintf(stderr, "strata bench cl: %s\n", message.c_str());
  return kExitUsage;
}

struct BenchTask {
  std::string dir;
  TaskData data;
  TrainTask train;
};

struct MethodRun {
  std::string name;        // as requested (mtl_lora included)
  std::string method;      // the core method name
  bool joint = false;
  std::vector<std::string> row_labels;         // one per matrix row
  std::vector<std::vector<double>> matrix;     // rows: stages (joint: one final row)
  std::optional<ClReport> report;              // continual methods
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
  int64_t trainable = 0;                       // max over stages
  std::vector<int64_t> trainable_per_stage;
  std::vector<double> stage_train_seconds;     // Train() incl. merge
  std::vector<double> stage_eval_seconds;
  std::vector<double> stage_final_loss;
  std::vector<int64_t> stage_steps;
  std::vector<double> stage_merge_seconds;     // the end-of-task merge inside Train()
  std::vector<int64_t> stage_state_bytes;      // method state after each stage
  // share, share_ella: mean subspace rank per side over the target modules after each stage.
  std::vector<double> stage_share_k_beta, stage_share_k_alpha;
  std::vector<double> pm_alphas;               // pm: the merge coefficient α_t of each task
  json pm_merge_terms;                         // pm: what decided each α_t (own, past, cross, ...)
  double seconds = 0;                          // total wall time (train + eval + export)
  std::string method_config_json;
};

// Accuracy of `task`'s test split with example i served by models[RouteSlot(decisions[i])].
absl::StatusOr<double> EvaluateRouted(const std::vector<std::shared_ptr<const CausalLM>>& models,
                                      const std::vector<RouteDecision>& decisions, const Tokenizer& tokenizer,
                                      const BenchTask& task, int64_t max_seq_len);

std::vector<size_t> Slots(const std::vector<RouteDecision>& decisions) {
  std::vector<size_t> out;
  for (const auto& d : decisions) out.push_back(RouteSlot(d));
  return out;
}

// Facts read from an exported state after a stage: the Share subspace ranks (mean over modules of
// k_β and k_α; NaN without a subspace) and P&M's merge coefficients.
struct StateFacts {
  double k_beta = std::numeric_limits<double>::quiet_NaN();
  double k_alpha = std::numeric_limits<double>::quiet_NaN();
  std::vector<double> pm_alphas;
  json pm_merge_terms;
};

StateFacts ReadStateFacts(const MethodState& state) {
  StateFacts f;
  json j = json::parse(state.config_json, nullptr, false);
  if (j.is_discarded() || !j.contains("extra") || !j["extra"].is_object()) return f;
  const json& extra = j["extra"];
  if (extra.contains("share") && extra["share"].is_object() && !extra["share"].empty()) {
    double kb = 0, ka = 0;
    int64_t n = 0;
    for (const auto& [module, config] : extra["share"].items()) {
      if (!config.is_string()) continue;
      json c = json::parse(config.get<std::string>(), nullptr, false);
      if (c.is_discarded() || !c.contains("k_beta") || !c.contains("k_alpha")) continue;
      kb += c["k_beta"].get<double>();
      ka += c["k_alpha"].get<double>();
      ++n;
    }
    if (n > 0) {
      f.k_beta = kb / static_cast<double>(n);
      f.k_alpha = ka / static_cast<double>(n);
    }
  }
  if (extra.contains("merge_terms")) f.pm_merge_terms = extra["merge_terms"];
  if (extra.contains("alphas") && extra["alphas"].is_array()) {
    for (const json& a : extra["alphas"]) {
      if (a.is_number()) f.pm_alphas.push_back(a.get<double>());
    }
  }
  return f;
}

// Accuracy of `model` on `task`'s test split with its scorer.
absl::StatusOr<double> Evaluate(const CausalLM& model, const Tokenizer& tokenizer, const BenchTask& task,
                                int64_t max_seq_len) {
  if (task.data.scorer == Scorer::kChoice) {
    ScorerOptions o;
    o.batch_size = 32;
    o.max_seq_len = max_seq_len;
    ASSIGN_OR_RETURN(ChoiceScore s, ScoreChoice(model, tokenizer, task.data.test, o));
    return s.accuracy;
  }
  ExactMatchOptions o;
  o.batch_size = 32;
  ASSIGN_OR_RETURN(ExactMatchScore s, ScoreExactMatch(model, tokenizer, task.data.test, o));
  return s.accuracy;
}

absl::StatusOr<double> EvaluateRouted(const std::vector<std::shared_ptr<const CausalLM>>& models,
                                      const std::vector<RouteDecision>& decisions, const Tokenizer& tokenizer,
                                      const BenchTask& task, int64_t max_seq_len) {
  std::map<size_t, BenchTask> groups;
  for (size_t i = 0; i < task.data.test.size(); ++i) {
    BenchTask& g = groups[RouteSlot(decisions[i])];
    if (g.data.test.empty()) {
      g.data.name = task.data.name;
      g.data.scorer = task.data.scorer;
    }
    g.data.test.push_back(task.data.test[i]);
  }
  double correct = 0;
  for (const auto& [index, group] : groups) {
    ASSIGN_OR_RETURN(double acc, Evaluate(*models[index], tokenizer, group, max_seq_len));
    correct += acc * static_cast<double>(group.data.test.size());
  }
  return task.data.test.empty() ? 0.0 : correct / static_cast<double>(task.data.test.size());
}

absl::StatusOr<std::vector<double>> EvaluateAll(const CausalLM& model, const Tokenizer& tokenizer,
                                                const std::vector<BenchTask>& tasks, int64_t max_seq_len) {
  std::vector<double> row;
  for (const BenchTask& t : tasks) {
    absl::StatusOr<double> acc = Evaluate(model, tokenizer, t, max_seq_len);
    if (!acc.ok()) {
      return absl::Status(acc.status().code(),
                          absl::StrCat("scoring task \"", t.data.name, "\": ", acc.status().message()));
    }
    row.push_back(*acc);
  }
  return row;
}

absl::StatusOr<double> ReferenceNll(const CausalLM& model, const Tokenizer& tokenizer,
                                    const std::vector<std::string>& texts, int64_t max_seq_len) {
  NllOptions o;
  o.batch_size = 8;
  o.max_seq_len = max_seq_len;
  ASSIGN_OR_RETURN(NllScore s, ScoreNll(model, tokenizer, texts, o));
  return s.mean_nll;
}

int64_t StateBytes(const MethodState& state) {
  int64_t bytes = 0;
  for (const auto& [name, t] : state.tensors) {
    if (t.defined()) bytes += t.numel() * static_cast<int64_t>(t.element_size());
  }
  return bytes;
}

int64_t CountTrainable(const Method& method) {
  std::vector<at::Tensor> seen;
  int64_t n = 0;
  for (const auto& [name, t] : method.TrainableParameters()) {
    if (!t.defined()) continue;
    bool dup = false;
    for (const at::Tensor& s : seen) dup = dup || s.is_same(t);
    if (dup) continue;
    seen.push_back(t);
    n += t.numel();
  }
  return n;
}

std::string FormatBytes(int64_t bytes) {
  if (bytes >= (int64_t{1} << 20)) return absl::StrFormat("%.2f MiB", static_cast<double>(bytes) / (1 << 20));
  if (bytes >= (int64_t{1} << 10)) return absl::StrFormat("%.1f KiB", static_cast<double>(bytes) / (1 << 10));
  return absl::StrCat(bytes, " B");
}

std::string FormatOpt(const std::optional<double>& v, bool sign = false) {
  if (!v.has_value() || std::isnan(*v)) return "-";
  return absl::StrFormat(sign ? "%+.3f" : "%.3f", *v);
}

std::string Pad(const std::string& s, size_t width, bool right = false) {
  if (s.size() >= width) return s;
  return right ? std::string(width - s.size(), ' ') + s : s + std::string(width - s.size(), ' ');
}

// The matrix of one method as an aligned table (base row first).
void PrintMatrix(const MethodRun& run, const std::vector<std::vector<double>>& matrix,
                 const std::vector<BenchTask>& tasks, const std::vector<double>& base) {
  size_t label_width = 4;
  for (const auto& l : run.row_labels) label_width = std::max(label_width, l.size());
  label_width += 2;
  std::vector<size_t> widths;
  std::string header = Pad("stage", label_width);
  for (const BenchTask& t : tasks) {
    widths.push_back(std::max<size_t>(7, t.data.name.size()) + 2);
    header += Pad(t.data.name, widths.back(), true);
  }
  std::printf("%s\n", header.c_str());
  auto print_row = [&](const std::string& label, const std::vector<double>& row) {
    std::string line = Pad(label, label_width);
    for (size_t j = 0; j < row.size(); ++j) {
      line += Pad(std::isnan(row[j]) ? "-" : absl::StrFormat("%.3f", row[j]), widths[j], true);
    }
    std::printf("%s\n", line.c_str());
  };
  print_row("base", base);
  for (size_t i = 0; i < matrix.size(); ++i) print_row(run.row_labels[i], matrix[i]);
}

json OptJson(const std::optional<double>& v) {
  if (!v.has_value() || std::isnan(*v)) return nullptr;
  return *v;
}

json ArgsToJson(const ClBenchArgs& a, const std::vector<std::string>& methods,
                const std::vector<BenchTask>& tasks, const std::string& reference) {
  json j;
  j["model"] = a.model_dir;
  j["tasks_dir"] = a.tasks_dir;
  j["order"] = a.order;
  json dirs = json::array();
  for (const BenchTask& t : tasks) dirs.push_back(t.dir);
  j["task_dirs"] = dirs;
  j["methods"] = methods;
  j["max_train"] = a.max_train;
  j["max_test"] = a.max_test;
  j["epochs"] = a.epochs;
  j["steps"] = a.steps;
  j["lr"] = a.lr;
  j["batch_size"] = a.batch_size;
  j["rank"] = a.rank;
  j["alpha"] = a.alpha;
  j["lambda"] = a.lambda;
  j["olora_lambda"] = a.olora_lambda;
  j["phi"] = a.phi;
  j["k_max"] = a.k_max;
  j["share_training"] = a.share_training;
  j["energy_threshold"] = a.energy_threshold;
  j["pm_epsilon"] = a.pm_epsilon;
  j["router_layer"] = a.router_layer;
  j["targets"] = a.targets;
  j["warmup_steps"] = a.warmup_steps;
  j["warmup_ratio"] = a.warmup_steps < 0 ? kDefaultWarmupRatio : 0.0;
  j["lr_schedule"] = a.lr_schedule;
  j["max_seq_len"] = a.max_seq_len;
  j["seed"] = a.seed;
  j["threads"] = a.threads;
  j["device"] = a.device;
  j["dtype"] = a.dtype;
  j["reference"] = reference;
  j["reference_texts"] = a.reference_texts;
  j["blas"] = LoadedBlasLibrary();
  j["allocator"] = LoadedAllocator();
  j["runtime"] = TorchRuntimeSummary();
  return j;
}

absl::Status WritePlots(const std::string& dir, const std::vector<MethodRun>& runs,
                        const std::vector<BenchTask>& tasks, const std::vector<double>& base) {
  std::vector<std::string> task_names;
  for (const BenchTask& t : tasks) task_names.push_back(t.data.name);
  for (const MethodRun& run : runs) {
    std::vector<std::string> rows = {"base"};
    std::vector<std::vector<double>> values = {base};
    for (size_t i = 0; i < run.matrix.size(); ++i) {
      rows.push_back(run.row_labels[i]);
      values.push_back(run.matrix[i]);
    }
    RETURN_IF_ERROR(PlotHeatmap(absl::StrCat(dir, "/", run.name, "_matrix.png"),
                                absl::StrCat(run.name, ": accuracy after each stage (rows) on each task (columns)"),
                                rows, task_names, values));
    RETURN_IF_ERROR(PlotLines(absl::StrCat(dir, "/", run.name, "_stages.png"),
                              absl::StrCat(run.name, ": score of each task across stages"), "after stage",
                              "score", rows, task_names, values, 0.0, 1.0));
  }
  // One summary plot: AA and BWT per method.
  std::vector<std::string> names;
  std::vector<std::vector<double>> bars;  // per method: {AA, BWT}
  for (const MethodRun& run : runs) {
    names.push_back(run.name);
    const double bwt = run.report.has_value() && run.report->bwt.has_value()
                           ? *run.report->bwt
                           : std::numeric_limits<double>::quiet_NaN();
    bars.push_back({run.aa, bwt});
  }
  if (!runs.empty()) {
    RETURN_IF_ERROR(PlotBars(absl::StrCat(dir, "/summary_aa_bwt.png"),
                             absl::StrCat("AA and BWT per method (", absl::StrJoin(task_names, " -> "), ")"),
                             names, {"AA", "BWT"}, bars, -1.0, 1.0));
  }
  return absl::OkStatus();
}

}  // namespace

std::string DefaultReferenceText() { return std::string(STRATA_SHARED_DIR) + "/data/lm/tinystories_val.txt"; }

void AddClBenchOptions(CLI::App* sub, ClBenchArgs* a) {
  sub->add_option("--model", a->model_dir, "Model directory (HF layout with tokenizer.json)")->required();
  sub->add_option("--tasks", a->tasks_dir, "Directory holding the task directories named in --order");
  sub->add_option("--order", a->order, "Task order, comma-separated (names under --tasks, or paths)")
      ->required()
      ->delimiter(',');
  sub->add_option("--methods", a->methods,
                  "Methods, comma-separated (default: all; mtl_lora = mtl with the LoRA shape)")
      ->delimiter(',');
  sub->add_option("--max-train", a->max_train, "Training examples per task (0 = all; seeded sample)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  sub->add_option("--max-test", a->max_test, "Test examples per task (0 = all; seeded sample)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  sub->add_option("--epochs", a->epochs, "Epochs per stage (used when --steps is 0)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--steps", a->steps, "Optimizer steps per stage (0 = --epochs; mtl: steps x tasks)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  sub->add_option("--lr", a->lr, "Peak learning rate")->capture_default_str()->check(CLI::PositiveNumber);
  sub->add_option("--batch-size", a->batch_size, "Batch size")->capture_default_str()->check(CLI::PositiveNumber);
  sub->add_option("--rank", a->rank, "LoRA rank r (and Share pseudo-rank p)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--alpha", a->alpha, "LoRA alpha (scale alpha / r)")->capture_default_str()->check(CLI::PositiveNumber);
  sub->add_option("--lambda", a->lambda, "ELLA penalty weight")->capture_default_str()->check(CLI::NonNegativeNumber);
  sub->add_option("--olora-lambda", a->olora_lambda, "O-LoRA orthogonality weight")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  sub->add_option("--phi", a->phi, "Share: temporary basis vectors per side")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--k-max", a->k_max, "Share: subspace rank cap per side")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--share-training", a->share_training,
                  "Share: lora (a LoRA folded into the subspace) or subspace (published training)")
      ->capture_default_str()
      ->check(CLI::IsMember({"lora", "subspace"}));
  sub->add_option("--energy-threshold", a->energy_threshold, "Share: explained-energy fraction kept by a merge")
      ->capture_default_str()
      ->check(CLI::Range(1e-6, 1.0));
  sub->add_option("--router-layer", a->router_layer,
                  "Automatic routing: base-model decoder layers run for a prompt's feature (-1 = half)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{-1}, int64_t{1} << 20));
  sub->add_option("--pm-epsilon", a->pm_epsilon, "Perturb-and-Merge: perturbation size")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1.0));
  sub->add_option("--targets", a->targets, "Target modules: comma-separated short names or all-linear")
      ->capture_default_str();
  sub->add_option("--warmup-steps", a->warmup_steps, "Warmup steps per stage (-1 = 5 % of the steps, as the server)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{-1}, int64_t{1} << 30));
  sub->add_option("--lr-schedule", a->lr_schedule, "linear, cosine or constant")
      ->capture_default_str()
      ->check(CLI::IsMember({"linear", "cosine", "constant"}));
  sub->add_option("--max-seq-len", a->max_seq_len, "Tokens per training / scoring sequence")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{2}, int64_t{1} << 20));
  sub->add_option("--seed", a->seed, "Seed (data sampling, batch order, adapter init)")->capture_default_str();
  sub->add_option("--threads", a->threads, "Torch CPU threads")->capture_default_str()->check(CLI::PositiveNumber);
  sub->add_option("--device", a->device, "Device: cpu, cuda or cuda:N")->capture_default_str();
  sub->add_option("--dtype", a->dtype, "Weight dtype: float32, bfloat16 (float16: CUDA only)")->capture_default_str();
  sub->add_option("--reference", a->reference, "Reference text for NLL before/after (default: TinyStories val)");
  sub->add_option("--reference-texts", a->reference_texts, "Stories of the reference text to score")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--json", a->json_out, "Write the results as JSON to this file")->required();
  sub->add_option("--plots", a->plots_dir, "Write PNG plots (gnuplot) into this directory");
  sub->add_flag("--quiet", a->quiet, "No per-stage progress on stderr");
}

int RunClBenchCommand(const ClBenchArgs& args_in) {
  ClBenchArgs args = args_in;
  args.order = FlattenList(args.order);
  args.methods = FlattenList(args.methods);

  // ---- validate the input --------------------------------------------------------------------
  if (args.order.empty()) return Usage("--order is empty: name at least one task");
  if (args.model_dir.empty()) return Usage("--model is required");
  if (args.batch_size < 1) return Usage("--batch-size must be >= 1");
  if (args.steps < 0) return Usage("--steps must be >= 0");
  if (args.steps == 0 && args.epochs < 1) return Usage("--epochs must be >= 1 when --steps is 0");
  if (args.threads < 1) return Usage("--threads must be >= 1");
  if (!(args.lr > 0) || !std::isfinite(args.lr)) return Usage("--lr must be a positive number");
  if (args.reference_texts < 1) return Usage("--reference-texts must be >= 1");
  const std::vector<std::string> known = MethodNames();
  std::vector<std::string> methods = args.methods.empty() ? known : args.methods;
  {
    std::set<std::string> seen;
    for (const std::string& m : methods) {
      if (m != kMtlLora && std::find(known.begin(), known.end(), m) == known.end()) {
        return Usage(absl::StrCat("unknown method \"", m, "\" (valid: ", absl::StrJoin(known, ", "), ", ",
                                  kMtlLora, ")"));
      }
      if (!seen.insert(m).second) return Usage(absl::StrCat("method \"", m, "\" is listed twice"));
    }
  }
  MethodConfig base_config;
  base_config.target_modules = SplitList(args.targets);
  base_config.rank = args.rank;
  base_config.p = args.rank;
  base_config.alpha = args.alpha;
  base_config.ella_lambda = args.lambda;
  base_config.olora_lambda = args.olora_lambda;
  base_config.phi = args.phi;
  base_config.k_max = args.k_max;
  base_config.share_training = args.share_training;
  base_config.energy_threshold = args.energy_threshold;
  base_config.pm_epsilon = args.pm_epsilon;
  base_config.seed = args.seed;
  if (absl::Status s = ValidateMethodConfig(base_config); !s.ok()) {
    return Usage(absl::StrCat("method settings: ", s.message()));
  }
  TrainOptions train_options;
  train_options.learning_rate = args.lr;
  train_options.batch_size = args.batch_size;
  train_options.max_steps = args.steps;
  train_options.epochs = args.epochs;
  if (args.warmup_steps < 0) {
    train_options.warmup_ratio = kDefaultWarmupRatio;
  } else {
    train_options.warmup_steps = args.warmup_steps;
  }
  train_options.lr_schedule = args.lr_schedule;
  train_options.seed = args.seed;
  if (absl::Status s = ValidateTrainOptions(train_options); !s.ok()) {
    return Usage(absl::StrCat("training settings: ", s.message()));
  }

  SetTorchThreads(args.threads);
  const Clock::time_point bench_start = Clock::now();

  // ---- model, tokenizer, tasks, reference text ------------------------------------------------
  if (!PathExists(args.model_dir)) return Usage(absl::StrCat("--model ", args.model_dir, ": no such directory"));
  absl::StatusOr<std::string> device = ResolveDevice(args.device);
  if (!device.ok()) return Usage(absl::StrCat("--device: ", device.status().message()));
  ModelLoadOptions load_options;
  load_options.device = *device;
  load_options.dtype = args.dtype;
  absl::StatusOr<std::unique_ptr<CausalLM>> loaded = CausalLM::Load(args.model_dir, load_options);
  if (!loaded.ok()) return Usage(absl::StrCat("--model: ", loaded.status().message()));
  std::unique_ptr<CausalLM> base_model = std::move(*loaded);
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok = Tokenizer::FromDirectory(args.model_dir);
  if (!tok.ok()) return Usage(absl::StrCat("--model tokenizer: ", tok.status().message()));
  const Tokenizer& tokenizer = **tok;
  if (base_model->config().pad_token_id.has_value()) train_options.pad_id = *base_model->config().pad_token_id;
  const int64_t max_seq_len = std::min(args.max_seq_len, base_model->config().max_position_embeddings);

  std::vector<BenchTask> tasks;
  RouterOptions router_options;
  router_options.layer = args.router_layer;
  if (absl::Status s = router_options.Validate(); !s.ok()) return Usage(absl::StrCat("--router-layer: ", s.message()));
  {
    std::set<std::string> names;
    for (const std::string& entry : args.order) {
      BenchTask t;
      if (entry.find('/') != std::string::npos) {
        t.dir = entry;
      } else {
        if (args.tasks_dir.empty()) {
          return Usage(absl::StrCat("task \"", entry, "\": give --tasks DIR (or a path containing '/')"));
        }
        t.dir = absl::StrCat(args.tasks_dir, "/", entry);
      }
      if (!PathExists(t.dir)) return Usage(absl::StrCat("task \"", entry, "\": no such directory ", t.dir));
      TaskLoadOptions lo;
      lo.max_train = args.max_train;
      lo.max_test = args.max_test;
      lo.seed = args.seed;
      absl::StatusOr<TaskData> data = LoadTaskDir(t.dir, lo);
      if (!data.ok()) return Usage(absl::StrCat("task \"", entry, "\": ", data.status().message()));
      t.data = std::move(*data);
      if (t.data.scorer == Scorer::kNll) {
        return Usage(absl::StrCat("task \"", t.data.name, "\" (", t.dir,
                                  "): scorer nll has no accuracy; the CL benchmark needs exact_match or choice"));
      }
      if (t.data.train.empty() || t.data.test.empty()) {
        return Usage(absl::StrCat("task \"", t.data.name, "\" (", t.dir, "): empty train or test split"));
      }
      if (!names.insert(t.data.name).second) {
        return Usage(absl::StrCat("task \"", t.data.name, "\" appears twice in --order"));
      }
      EncodeOptions eo;
      eo.max_seq_len = max_seq_len;
      t.train = MakeTrainTask(t.data.name, tokenizer, t.data.train, eo);
      tasks.push_back(std::move(t));
    }
  }
  const std::string reference = args.reference.empty() ? DefaultReferenceText() : args.reference;
  std::vector<std::string> ref_texts;
  {
    absl::StatusOr<std::string> text = ReadFile(reference);
    if (!text.ok()) return Usage(absl::StrCat("--reference: ", text.status().message()));
    ref_texts = SplitOnBlankLines(*text);
    if (ref_texts.empty()) return Usage(absl::StrCat("--reference ", reference, ": no text"));
    if (static_cast<int64_t>(ref_texts.size()) > args.reference_texts) ref_texts.resize(args.reference_texts);
  }
  if (!args.plots_dir.empty()) {
    if (absl::Status s = MakeDirs(args.plots_dir); !s.ok()) return Usage(absl::StrCat("--plots: ", s.message()));
  }

  const size_t T = tasks.size();
  std::vector<std::string> task_names;
  for (const BenchTask& t : tasks) task_names.push_back(t.data.name);
  std::printf("strata bench cl: model %s, order %s, methods %s\n", args.model_dir.c_str(),
              absl::StrJoin(task_names, " -> ").c_str(), absl::StrJoin(methods, ",").c_str());
  for (const BenchTask& t : tasks) {
    std::printf("  task %-10s %-12s %-11s scorer %-11s train %zu test %zu  (%s)\n", t.data.name.c_str(),
                std::string(TaskKindName(t.data.kind)).c_str(), std::string(TaskFormatName(t.data.format)).c_str(),
                std::string(ScorerName(t.data.scorer)).c_str(), t.data.train.size(), t.data.test.size(),
                t.dir.c_str());
  }
  std::printf("  steps/stage %s, batch %lld, lr %g, rank %lld, alpha %g, lambda %g, targets %s, seed %llu, "
              "threads %d, device %s\n  %s\n",
              args.steps > 0 ? std::to_string(args.steps).c_str() : absl::StrCat(args.epochs, " epoch(s)").c_str(),
              static_cast<long long>(args.batch_size), args.lr, static_cast<long long>(args.rank), args.alpha,
              args.lambda, args.targets.c_str(), static_cast<unsigned long long>(args.seed), args.threads,
              device->c_str(), TorchRuntimeSummary().c_str());
  std::fflush(stdout);

  // ---- base scores ----------------------------------------------------------------------------
  const Clock::time_point base_start = Clock::now();
  absl::StatusOr<std::vector<double>> base_or = EvaluateAll(*base_model, tokenizer, tasks, max_seq_len);
  if (!base_or.ok()) return Usage(std::string(base_or.status().message()));
  const std::vector<double> base = *base_or;
  absl::StatusOr<double> nll_base = ReferenceNll(*base_model, tokenizer, ref_texts, max_seq_len);
  if (!nll_base.ok()) return Usage(absl::StrCat("reference NLL: ", nll_base.status().message()));
  if (!args.quiet) {
    std::fprintf(stderr, "[base] %s  reference NLL %.4f  (%.1f s)\n",
                 absl::StrJoin(base, " ", [](std::string* o, double v) { absl::StrAppendFormat(o, "%.3f", v); }).c_str(),
                 *nll_base, SecondsSince(base_start));
  }

  // ---- automatic routing: one router per stage (method-independent: it sees the base model) ------
  // routers[i] knows tasks 1..i+1; decisions[i][j] routes task j's test prompts with it.
  std::vector<TaskRouter> routers;
  std::vector<std::vector<std::vector<RouteDecision>>> decisions;
  std::vector<RouteDecision> ref_decisions;  // the reference texts, with the last router
  {
    const Clock::time_point r0 = Clock::now();
    TaskRouter router(router_options);
    const int64_t layer = router.FeatureLayer(*base_model);
    std::vector<at::Tensor> test_features;
    for (const BenchTask& t : tasks) {
      std::vector<std::string> prompts;
      for (const Example& e : t.data.test) prompts.push_back(e.kind == ExampleKind::kText ? e.text : e.prompt);
      absl::StatusOr<at::Tensor> f = router.Features(*base_model, tokenizer, prompts);
      if (!f.ok()) return Usage(absl::StrCat("router features: ", f.status().message()));
      test_features.push_back(*f);
    }
    for (const BenchTask& t : tasks) {
      std::vector<std::string> prompts;
      for (const Example& e : t.data.train) prompts.push_back(e.kind == ExampleKind::kText ? e.text : e.prompt);
      absl::StatusOr<at::Tensor> f = router.Features(*base_model, tokenizer, prompts);
      if (!f.ok()) return Usage(absl::StrCat("router features: ", f.status().message()));
      if (absl::Status st = router.AddTask(t.data.name, *f, layer); !st.ok()) {
        return Usage(absl::StrCat("router: ", st.message()));
      }
      routers.push_back(router);
      std::vector<std::vector<RouteDecision>> stage;
      for (const at::Tensor& tf : test_features) stage.push_back(router.Route(tf));
      decisions.push_back(std::move(stage));
    }
    absl::StatusOr<at::Tensor> rf = router.Features(*base_model, tokenizer, ref_texts);
    if (!rf.ok()) return Usage(absl::StrCat("router features (reference): ", rf.status().message()));
    ref_decisions = router.Route(*rf);
    int64_t ref_base = 0;
    for (const auto& d : ref_decisions) ref_base += d.task.empty();
    std::vector<std::string> accuracy;
    for (size_t j = 0; j < tasks.size(); ++j) {
      int64_t right = 0;
      for (const auto& d : decisions.back()[j]) right += d.task == tasks[j].data.name;
      accuracy.push_back(absl::StrFormat("%s %.3f", tasks[j].data.name,
                                         static_cast<double>(right) / std::max<size_t>(1, decisions.back()[j].size())));
    }
    std::printf("router: layer %lld of %lld, %lld bytes (%lld per task); accuracy after the last task: %s; "
                "reference texts routed to the base model: %lld of %zu (%.1f s)\n",
                static_cast<long long>(layer), static_cast<long long>(base_model->num_layers()),
                static_cast<long long>(router.StateBytes()), static_cast<long long>(router.StateBytesPerTask()),
                absl::StrJoin(accuracy, ", ").c_str(), static_cast<long long>(ref_base), ref_decisions.size(),
                SecondsSince(r0));
  }

  // ---- methods ----------------------------------------------------------------------------------
  std::vector<MethodRun> runs;
  std::vector<std::pair<std::string, std::string>> failures;
  for (const std::string& requested : methods) {
    MethodRun run;
    run.name = requested;
    run.method = requested == kMtlLora ? "mtl" : requested;
    MethodConfig config = base_config;
    if (requested == kMtlLora) config.mtl_shape = "lora";
    const Clock::time_point method_start = Clock::now();
    auto fail = [&](const std::string& why) {
      std::fprintf(stderr, "[%s] FAILED: %s\n", requested.c_str(), why.c_str());
      failures.emplace_back(requested, why);
    };
    absl::StatusOr<std::unique_ptr<Method>> created = CreateMethod(run.method, config);
    if (!created.ok()) {
      fail(std::string(created.status().message()));
      continue;
    }
    Method& method = **created;
    run.joint = method.joint();
    run.method_config_json = MethodConfigToJson(config);

    TrainOptions to = train_options;
    int64_t stage_trainable = 0;
    const std::string* current_task = nullptr;
    to.progress_every = 1;
    to.on_progress = [&](const TrainProgress& p) {
      if (p.step == 1) stage_trainable = CountTrainable(method);
      if (!args.quiet && (p.step % 100 == 0) && p.step != p.total_steps) {
        std::fprintf(stderr, "[%s] %s step %lld/%lld loss %.4f extra %.4g (%.1f s)\n", requested.c_str(),
                     current_task != nullptr ? current_task->c_str() : "", static_cast<long long>(p.step),
                     static_cast<long long>(p.total_steps), p.loss, p.extra_loss, p.elapsed_seconds);
      }
    };

    std::unique_ptr<CausalLM> current = base_model->ShallowCopy();
    bool ok = true;
    auto run_stage = [&](const std::string& stage_name, const std::vector<TrainTask>& data,
                         const std::string& label) -> bool {
      current_task = &stage_name;
      stage_trainable = 0;
      Trainer trainer(to);
      const Clock::time_point t0 = Clock::now();
      absl::StatusOr<TrainResult> result = trainer.Train(*current, method, stage_name, data);
      const double train_s = SecondsSince(t0);
      if (!result.ok()) {
        fail(absl::StrCat("stage \"", stage_name, "\": ", result.status().ToString()));
        return false;
      }
      current = std::move(result->model);
      const Clock::time_point e0 = Clock::now();
      absl::StatusOr<std::vector<double>> row = EvaluateAll(*current, tokenizer, tasks, max_seq_len);
      if (!row.ok()) {
        fail(absl::StrCat("after stage \"", stage_name, "\": ", row.status().message()));
        return false;
      }
      run.matrix.push_back(*row);
      run.row_labels.push_back(label);
      if (!run.joint && method.SupportsTaskRouting()) {
        // Each learned task on its routed weights (the model as of that task, from this stage's state).
        std::vector<double> routed = *row;
        for (size_t j = 0; j < tasks.size(); ++j) {
          const auto& learned = method.tasks();
          if (std::find(learned.begin(), learned.end(), tasks[j].data.name) == learned.end()) continue;
          std::unique_ptr<CausalLM> model = base_model->ShallowCopy();
          absl::Status st = method.ApplyTaskRouting(tasks[j].data.name, model.get());
          absl::StatusOr<double> acc =
              st.ok() ? Evaluate(*model, tokenizer, tasks[j], max_seq_len) : absl::StatusOr<double>(st);
          if (!acc.ok()) {
            fail(absl::StrCat("routed to \"", tasks[j].data.name, "\" after stage \"", stage_name,
                              "\": ", acc.status().message()));
            return false;
          }
          routed[j] = *acc;
        }
        run.routed_matrix.push_back(std::move(routed));
        // Automatic routing with this stage's router.
        const size_t stage = run.matrix.size() - 1;
        // A prompt that fits no task gets the base model (the server's default).
        std::shared_ptr<const CausalLM> base_copy(base_model->ShallowCopy());
        absl::StatusOr<std::vector<std::shared_ptr<const CausalLM>>> models =
            RouteModels(*base_model, method, routers[stage], base_copy, std::shared_ptr<const CausalLM>(current->ShallowCopy()));
        if (!models.ok()) {
          fail(absl::StrCat("auto routing after stage \"", stage_name, "\": ", models.status().message()));
          return false;
        }
        std::vector<double> auto_row, accuracy_row;
        for (size_t j = 0; j < tasks.size(); ++j) {
          absl::StatusOr<double> acc = EvaluateRouted(*models, decisions[stage][j], tokenizer, tasks[j], max_seq_len);
          if (!acc.ok()) {
            fail(absl::StrCat("auto-routed \"", tasks[j].data.name, "\" after stage \"", stage_name, "\": ",
                              acc.status().message()));
            return false;
          }
          auto_row.push_back(*acc);
          int64_t right = 0;
          for (const auto& d : decisions[stage][j]) right += d.task == tasks[j].data.name;
          accuracy_row.push_back(static_cast<double>(right) / std::max<size_t>(1, decisions[stage][j].size()));
        }
        run.auto_matrix.push_back(std::move(auto_row));
        run.router_accuracy.push_back(std::move(accuracy_row));
        if (stage + 1 == tasks.size()) {
          NllOptions no;
          no.max_seq_len = max_seq_len;
          absl::StatusOr<double> nll = MeanNllOnModels(*models, Slots(ref_decisions), tokenizer, ref_texts, no);
          if (!nll.ok()) {
            fail(absl::StrCat("auto-routed reference NLL: ", nll.status().message()));
            return false;
          }
          run.auto_reference_nll = *nll;
        }
      }
      const double eval_s = SecondsSince(e0);
      run.stage_train_seconds.push_back(train_s);
      run.stage_eval_seconds.push_back(eval_s);
      run.stage_final_loss.push_back(result->final_loss);
      run.stage_steps.push_back(result->steps);
      run.stage_merge_seconds.push_back(result->merge_seconds);
      if (absl::StatusOr<MethodState> state = method.ExportState(); state.ok()) {
        run.stage_state_bytes.push_back(StateBytes(*state));
        const StateFacts facts = ReadStateFacts(*state);
        run.stage_share_k_beta.push_back(facts.k_beta);
        run.stage_share_k_alpha.push_back(facts.k_alpha);
        run.pm_alphas = facts.pm_alphas;
        run.pm_merge_terms = facts.pm_merge_terms;
      }
      run.trainable_per_stage.push_back(stage_trainable);
      run.trainable = std::max(run.trainable, stage_trainable);
      if (!args.quiet) {
        std::fprintf(stderr, "[%s] %s: %lld steps, loss %.3f -> %.3f, train %.1f s (merge %.2f s), eval %.1f s: %s\n",
                     requested.c_str(), label.c_str(), static_cast<long long>(result->steps), result->first_loss,
                     result->final_loss, train_s, result->merge_seconds, eval_s,
                     absl::StrJoin(*row, " ", [](std::string* o, double v) { absl::StrAppendFormat(o, "%.3f", v); })
                         .c_str());
        if (run.routed_matrix.size() == run.matrix.size()) {
          std::fprintf(stderr, "[%s] %s routed: %s\n", requested.c_str(), label.c_str(),
                       absl::StrJoin(run.routed_matrix.back(), " ", [](std::string* o, double v) {
                         absl::StrAppendFormat(o, "%.3f", v);
                       }).c_str());
        }
        if (run.auto_matrix.size() == run.matrix.size()) {
          std::fprintf(stderr, "[%s] %s auto: %s (router %s)\n", requested.c_str(), label.c_str(),
                       absl::StrJoin(run.auto_matrix.back(), " ", [](std::string* o, double v) {
                         absl::StrAppendFormat(o, "%.3f", v);
                       }).c_str(),
                       absl::StrJoin(run.router_accuracy.back(), " ", [](std::string* o, double v) {
                         absl::StrAppendFormat(o, "%.3f", v);
                       }).c_str());
        }
      }
      return true;
    };

    if (run.joint) {
      std::vector<TrainTask> all;
      for (const BenchTask& t : tasks) all.push_back(t.train);
      // The same total steps as the sequence: steps × T (with --epochs, the trainer's joint epoch is
      // the sum of the tasks' epochs already).
      if (to.max_steps > 0) to.max_steps = args.steps * static_cast<int64_t>(T);
      ok = run_stage("mtl", all, absl::StrCat("joint (", absl::StrJoin(task_names, "+"), ")"));
    } else {
      for (size_t i = 0; i < T && ok; ++i) {
        ok = run_stage(tasks[i].data.name, {tasks[i].train}, absl::StrCat(i + 1, " ", tasks[i].data.name));
      }
    }
    if (!ok) continue;

    absl::StatusOr<double> nll_after = ReferenceNll(*current, tokenizer, ref_texts, max_seq_len);
    if (!nll_after.ok()) {
      fail(absl::StrCat("reference NLL: ", nll_after.status().message()));
      continue;
    }
    run.nll_before = *nll_base;
    run.nll_after = *nll_after;
    absl::StatusOr<MethodState> state = method.ExportState();
    if (!state.ok()) {
      fail(absl::StrCat("ExportState: ", state.status().message()));
      continue;
    }
    run.state_bytes = StateBytes(*state);
    if (run.joint) {
      double sum = 0;
      for (double v : run.matrix.back()) sum += v;
      run.aa = sum / static_cast<double>(T);
    } else {
      absl::StatusOr<ClReport> report = ComputeClReport(run.matrix, base);
      if (!report.ok()) {
        fail(absl::StrCat("metrics: ", report.status().message()));
        continue;
      }
      run.report = *report;
      run.aa = report->aa.value_or(std::numeric_limits<double>::quiet_NaN());
      if (!run.routed_matrix.empty()) {
        absl::StatusOr<ClReport> routed = ComputeClReport(run.routed_matrix, base);
        if (!routed.ok()) {
          fail(absl::StrCat("routed metrics: ", routed.status().message()));
          continue;
        }
        run.routed_report = *routed;
      }
      if (!run.auto_matrix.empty()) {
        absl::StatusOr<ClReport> automatic = ComputeClReport(run.auto_matrix, base);
        if (!automatic.ok()) {
          fail(absl::StrCat("auto metrics: ", automatic.status().message()));
          continue;
        }
        run.auto_report = *automatic;
      }
    }
    run.seconds = SecondsSince(method_start);

    std::printf("\n== %s (%s%.1f s) ==\n", run.name.c_str(),
                run.joint ? "joint training on all tasks, evaluated once at the end; " : "", run.seconds);
    PrintMatrix(run, run.matrix, tasks, base);
    if (run.joint) {
      std::printf("AA %.3f (BWT/FWT/forgetting: not defined for joint training)\n", run.aa);
    } else {
      std::printf("AA %s  BWT %s  FWT %s  forgetting %s\n", FormatOpt(run.report->aa).c_str(),
                  FormatOpt(run.report->bwt, true).c_str(), FormatOpt(run.report->fwt, true).c_str(),
                  FormatOpt(run.report->forgetting).c_str());
    }
    if (run.routed_report.has_value()) {
      std::printf("task-routed (each learned task on the model as of that task, rebuilt from the state):\n");
      PrintMatrix(run, run.routed_matrix, tasks, base);
      std::printf("routed: AA %s  BWT %s  FWT %s  forgetting %s\n", FormatOpt(run.routed_report->aa).c_str(),
                  FormatOpt(run.routed_report->bwt, true).c_str(), FormatOpt(run.routed_report->fwt, true).c_str(),
                  FormatOpt(run.routed_report->forgetting).c_str());
      if (run.auto_report.has_value()) {
        std::printf("auto-routed (each test example routed by the stage's router; no task name):\n");
        PrintMatrix(run, run.auto_matrix, tasks, base);
        std::printf("auto: AA %s  BWT %s  forgetting %s  reference NLL %.4f\n", FormatOpt(run.auto_report->aa).c_str(),
                    FormatOpt(run.auto_report->bwt, true).c_str(), FormatOpt(run.auto_report->forgetting).c_str(),
                    run.auto_reference_nll);
      }
    }
    std::printf("reference NLL %.4f -> %.4f  trainable parameters %lld  state %s (%lld bytes)\n", run.nll_before,
                run.nll_after, static_cast<long long>(run.trainable), FormatBytes(run.state_bytes).c_str(),
                static_cast<long long>(run.state_bytes));
    std::fflush(stdout);
    runs.push_back(std::move(run));
  }

  // ---- summary ----------------------------------------------------------------------------------
  std::printf("\nSummary (%s; %zu tasks)\n", absl::StrJoin(task_names, " -> ").c_str(), T);
  std::printf("%-12s %7s %8s %8s %10s %9s %9s %12s %10s %8s\n", "method", "AA", "BWT", "FWT", "forgetting",
              "NLL_bef", "NLL_aft", "state_bytes", "trainable", "seconds");
  for (const MethodRun& run : runs) {
    const std::optional<double> bwt = run.report ? run.report->bwt : std::nullopt;
    const std::optional<double> fwt = run.report ? run.report->fwt : std::nullopt;
    const std::optional<double> fgt = run.report ? run.report->forgetting : std::nullopt;
    std::printf("%-12s %7.3f %8s %8s %10s %9.4f %9.4f %12lld %10lld %8.1f\n", run.name.c_str(), run.aa,
                FormatOpt(bwt, true).c_str(), FormatOpt(fwt, true).c_str(), FormatOpt(fgt).c_str(), run.nll_before,
                run.nll_after, static_cast<long long>(run.state_bytes), static_cast<long long>(run.trainable),
                run.seconds);
  }
  bool any_routed = false;
  for (const MethodRun& run : runs) any_routed = any_routed || run.routed_report.has_value();
  if (any_routed) {
    std::printf("\nTask-routed (the model as of each task, W0 + Σ_{l<=j} ΔW_l; needs the task name at inference)\n");
    std::printf("%-12s %7s %8s %8s %10s\n", "method", "AA", "BWT", "FWT", "forgetting");
    for (const MethodRun& run : runs) {
      if (!run.routed_report.has_value()) continue;
      const ClReport& r = *run.routed_report;
      std::printf("%-12s %7s %8s %8s %10s\n", run.name.c_str(), FormatOpt(r.aa).c_str(),
                  FormatOpt(r.bwt, true).c_str(), FormatOpt(r.fwt, true).c_str(), FormatOpt(r.forgetting).c_str());
    }
  }
  bool any_auto = false;
  for (const MethodRun& run : runs) any_auto = any_auto || run.auto_report.has_value();
  if (any_auto) {
    std::printf("\nAuto-routed (no task name: the router picks the task, or the base model when none fits)\n");
    std::printf("%-12s %7s %8s %10s %10s  %s\n", "method", "AA", "BWT", "forgetting", "ref NLL", "router accuracy");
    for (const MethodRun& run : runs) {
      if (!run.auto_report.has_value()) continue;
      const ClReport& r = *run.auto_report;
      std::printf("%-12s %7s %8s %10s %10.4f  %s\n", run.name.c_str(), FormatOpt(r.aa).c_str(),
                  FormatOpt(r.bwt, true).c_str(), FormatOpt(r.forgetting).c_str(), run.auto_reference_nll,
                  absl::StrJoin(run.router_accuracy.back(), " ", [](std::string* o, double v) {
                    absl::StrAppendFormat(o, "%.3f", v);
                  }).c_str());
    }
  }
  for (const auto& [name, why] : failures) std::printf("%-12s FAILED: %s\n", name.c_str(), why.c_str());
  if (std::find(methods.begin(), methods.end(), "mtl") != methods.end() ||
      std::find(methods.begin(), methods.end(), kMtlLora) != methods.end()) {
    std::printf("(mtl: joint training, not a continual method; evaluated once at the end, AA only)\n");
  }
  std::fflush(stdout);

  int exit_code = failures.empty() ? kExitOk : kExitFailed;

  // ---- JSON -------------------------------------------------------------------------------------
  json out;
  out["config"] = ArgsToJson(args, methods, tasks, reference);
  out["tasks"] = task_names;
  json task_info = json::array();
  for (const BenchTask& t : tasks) {
    task_info.push_back({{"name", t.data.name},
                         {"dir", t.dir},
                         {"kind", std::string(TaskKindName(t.data.kind))},
                         {"format", std::string(TaskFormatName(t.data.format))},
                         {"scorer", std::string(ScorerName(t.data.scorer))},
                         {"train", t.data.train.size()},
                         {"test", t.data.test.size()}});
  }
  out["task_info"] = task_info;
  out["base"] = base;
  out["reference_nll_base"] = *nll_base;
  json jm = json::object();
  for (const MethodRun& run : runs) {
    json j;
    if (run.report.has_value()) {
      j = ClReportToJson(*run.report);
      json tf = json::array();
      for (const auto& f : run.report->task_forgetting) tf.push_back(OptJson(f));
      j["task_forgetting"] = tf;
    } else {
      json matrix = json::array();
      for (const auto& row : run.matrix) matrix.push_back(row);
      j["matrix"] = matrix;
      j["base"] = base;
      j["aa"] = OptJson(run.aa);
      j["bwt"] = nullptr;
      j["fwt"] = nullptr;
      j["forgetting"] = nullptr;
      j["note"] = "joint training on all tasks; evaluated once at the end (single final row): AA only";
    }
    if (run.routed_report.has_value()) {
      j["routed"] = ClReportToJson(*run.routed_report);
    } else {
      j["routed"] = nullptr;
    }
    // Automatic routing (methods with per-task state); these key names are read by other tools.
    if (run.auto_report.has_value()) {
      json a;
      a["aa"] = OptJson(run.auto_report->aa);
      a["bwt"] = OptJson(run.auto_report->bwt);
      a["fwt"] = OptJson(run.auto_report->fwt);
      a["forgetting"] = OptJson(run.auto_report->forgetting);
      a["matrix"] = run.auto_matrix;
      a["router_accuracy"] = run.router_accuracy.empty() ? json(nullptr) : json(run.router_accuracy.back());
      a["router_accuracy_matrix"] = run.router_accuracy;
      a["reference_nll_after"] = OptJson(run.auto_reference_nll);
      j["auto"] = a;
    } else {
      j["auto"] = nullptr;
    }
    j["joint"] = run.joint;
    j["method"] = run.method;
    j["rows"] = run.row_labels;
    j["reference_nll"] = {run.nll_before, run.nll_after};
    j["state_bytes"] = run.state_bytes;
    j["trainable_parameters"] = run.trainable;
    j["trainable_parameters_per_stage"] = run.trainable_per_stage;
    j["seconds"] = run.seconds;
    j["stage_train_seconds"] = run.stage_train_seconds;
    j["stage_eval_seconds"] = run.stage_eval_seconds;
    j["stage_steps"] = run.stage_steps;
    j["stage_final_loss"] = run.stage_final_loss;
    j["stage_merge_seconds"] = run.stage_merge_seconds;
    j["stage_state_bytes"] = run.stage_state_bytes;
    auto nan_to_null = [](const std::vector<double>& v) {
      json a = json::array();
      for (double x : v) a.push_back(std::isnan(x) ? json(nullptr) : json(x));
      return a;
    };
    j["stage_share_k_beta"] = nan_to_null(run.stage_share_k_beta);
    j["stage_share_k_alpha"] = nan_to_null(run.stage_share_k_alpha);
    if (run.method == "pm") {
      j["pm_alphas"] = run.pm_alphas;
      j["pm_merge_terms"] = run.pm_merge_terms;
    }
    j["method_config"] = json::parse(run.method_config_json, nullptr, false);
    jm[run.name] = j;
  }
  out["methods"] = jm;
  json jf = json::object();
  for (const auto& [name, why] : failures) jf[name] = why;
  out["failed"] = jf;
  out["total_seconds"] = SecondsSince(bench_start);
  if (!args.json_out.empty()) {
    absl::Status s = WriteFileAtomic(args.json_out, out.dump(1, ' ', false, json::error_handler_t::replace) + "\n");
    if (!s.ok()) {
      std::fprintf(stderr, "strata bench cl: writing %s: %s\n", args.json_out.c_str(), std::string(s.message()).c_str());
      exit_code = kExitFailed;
    } else {
      std::printf("wrote %s\n", args.json_out.c_str());
    }
  }

  // ---- plots ------------------------------------------------------------------------------------
  if (!args.plots_dir.empty()) {
    const std::string gnuplot = FindGnuplot();
    if (gnuplot.empty()) {
      std::printf("plots skipped: gnuplot not found on PATH (Debian: apt-get install gnuplot-nox)\n");
    } else if (absl::Status s = WritePlots(args.plots_dir, runs, tasks, base); !s.ok()) {
      std::fprintf(stderr, "strata bench cl: plots: %s\n", std::string(s.message()).c_str());
      exit_code = kExitFailed;
    } else {
      std::printf("wrote plots to %s\n", args.plots_dir.c_str());
    }
  }
  return exit_code;
}

}  // namespace strata::bench
