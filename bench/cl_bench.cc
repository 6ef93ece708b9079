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
#include "bench/bench_util.h"
#include "bench/cl_bench_internal.h"
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
#include "core/util/file_util.h"
#include "core/util/status_macros.h"
#include "nlohmann/json.hpp"

namespace strata::bench {
namespace {

int Usage(const std::string& message) {
  std::fprintf(stderr, "strata bench cl: %s\n", message.c_str());
  return kExitUsage;
}

// BenchTask, MethodRun: cl_bench_internal.h.

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

// What one method's run reads: the benchmark's settings, the base model, the tasks and the routers.
struct BenchContext {
  const ClBenchArgs& args;
  const TrainingRecipe& recipe;
  const MethodConfig& base_config;
  const TrainOptions& train_options;
  const CausalLM* base_model;
  const Tokenizer& tokenizer;
  const std::vector<BenchTask>& tasks;
  const std::vector<std::string>& task_names;
  const std::vector<std::string>& ref_texts;
  int64_t max_seq_len;
  const std::vector<double>& base;
  double nll_base;
  // routers[i] knows tasks 1..i+1; decisions[i][j] routes task j's test prompts with it;
  // ref_decisions routes the reference texts with the last router.
  const std::vector<TaskRouter>& routers;
  const std::vector<std::vector<std::vector<RouteDecision>>>& decisions;
  const std::vector<RouteDecision>& ref_decisions;
};

// One method through every stage: train, evaluate every task in every view, report the stage.
absl::StatusOr<MethodRun> RunMethod(const std::string& requested, const BenchContext& ctx) {
  const ClBenchArgs& args = ctx.args;
  const TrainingRecipe& recipe = ctx.recipe;
  const MethodConfig& base_config = ctx.base_config;
  const TrainOptions& train_options = ctx.train_options;
  const CausalLM* base_model = ctx.base_model;
  const Tokenizer& tokenizer = ctx.tokenizer;
  const std::vector<BenchTask>& tasks = ctx.tasks;
  const std::vector<std::string>& task_names = ctx.task_names;
  const std::vector<std::string>& ref_texts = ctx.ref_texts;
  const int64_t max_seq_len = ctx.max_seq_len;
  const std::vector<double>& base = ctx.base;
  const auto& routers = ctx.routers;
  const auto& decisions = ctx.decisions;
  const auto& ref_decisions = ctx.ref_decisions;
  const size_t T = tasks.size();
  MethodRun run;
  run.name = requested;
  run.method = requested == kMtlLora ? "mtl" : requested;
  MethodConfig config = base_config;
  if (requested == kMtlLora) config.mtl_shape = "lora";
  const Clock::time_point method_start = Clock::now();
  auto fail = [](const std::string& why) { return absl::UnknownError(why); };
  absl::StatusOr<std::unique_ptr<Method>> created = CreateMethod(run.method, config);
  if (!created.ok()) {
    return fail(std::string(created.status().message()));
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
  auto run_stage = [&](const std::string& stage_name, const std::vector<TrainTask>& data,
                       const std::string& label) -> absl::Status {
    current_task = &stage_name;
    stage_trainable = 0;
    Trainer trainer(to);
    const Clock::time_point t0 = Clock::now();
    absl::StatusOr<TrainResult> result = trainer.Train(*current, method, stage_name, data);
    const double train_s = SecondsSince(t0);
    if (!result.ok()) {
      return fail(absl::StrCat("stage \"", stage_name, "\": ", result.status().ToString()));
    }
    current = std::move(result->model);
    const Clock::time_point e0 = Clock::now();
    absl::StatusOr<std::vector<double>> row = EvaluateAll(*current, tokenizer, tasks, max_seq_len);
    if (!row.ok()) {
      return fail(absl::StrCat("after stage \"", stage_name, "\": ", row.status().message()));
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
          return fail(absl::StrCat("routed to \"", tasks[j].data.name, "\" after stage \"", stage_name,
                                   "\": ", acc.status().message()));
        }
        routed[j] = *acc;
      }
      run.routed_matrix.push_back(std::move(routed));
      // Automatic routing with this stage's router.
      const size_t stage = run.matrix.size() - 1;
      // A prompt that fits no task gets the base model (the server's default).
      std::shared_ptr<const CausalLM> base_copy(base_model->ShallowCopy());
      absl::StatusOr<std::vector<std::shared_ptr<const CausalLM>>> models =
          RouteModels(*base_model, method, routers[stage], base_copy,
                      std::shared_ptr<const CausalLM>(current->ShallowCopy()));
      if (!models.ok()) {
        return fail(
            absl::StrCat("auto routing after stage \"", stage_name, "\": ", models.status().message()));
      }
      std::vector<double> auto_row, accuracy_row;
      for (size_t j = 0; j < tasks.size(); ++j) {
        absl::StatusOr<double> acc =
            EvaluateRouted(*models, decisions[stage][j], tokenizer, tasks[j], max_seq_len);
        if (!acc.ok()) {
          return fail(absl::StrCat("auto-routed \"", tasks[j].data.name, "\" after stage \"", stage_name,
                                   "\": ", acc.status().message()));
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
          return fail(absl::StrCat("auto-routed reference NLL: ", nll.status().message()));
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
      std::fprintf(stderr,
                   "[%s] %s: %lld steps, loss %.3f -> %.3f, train %.1f s (merge %.2f s), eval %.1f s: %s\n",
                   requested.c_str(), label.c_str(), static_cast<long long>(result->steps),
                   result->first_loss, result->final_loss, train_s, result->merge_seconds, eval_s,
                   absl::StrJoin(*row, " ", [](std::string* o, double v) {
                     absl::StrAppendFormat(o, "%.3f", v);
                   }).c_str());
      if (run.routed_matrix.size() == run.matrix.size()) {
        std::fprintf(stderr, "[%s] %s routed: %s\n", requested.c_str(), label.c_str(),
                     absl::StrJoin(run.routed_matrix.back(), " ", [](std::string* o, double v) {
                       absl::StrAppendFormat(o, "%.3f", v);
                     }).c_str());
      }
      if (run.auto_matrix.size() == run.matrix.size()) {
        std::fprintf(stderr, "[%s] %s auto: %s (router %s)\n", requested.c_str(), label.c_str(),
                     absl::StrJoin(run.auto_matrix.back(), " ",
                                   [](std::string* o, double v) { absl::StrAppendFormat(o, "%.3f", v); })
                         .c_str(),
                     absl::StrJoin(run.router_accuracy.back(), " ", [](std::string* o, double v) {
                       absl::StrAppendFormat(o, "%.3f", v);
                     }).c_str());
      }
    }
    return absl::OkStatus();
  };

  if (run.joint) {
    std::vector<TrainTask> all;
    for (const BenchTask& t : tasks) all.push_back(t.train);
    // The same total steps as the sequence: steps × T (with --epochs, the trainer's joint epoch is
    // the sum of the tasks' epochs already).
    if (to.max_steps > 0) to.max_steps = recipe.max_steps * static_cast<int64_t>(T);
    RETURN_IF_ERROR(run_stage("mtl", all, absl::StrCat("joint (", absl::StrJoin(task_names, "+"), ")")));
  } else {
    for (size_t i = 0; i < T; ++i) {
      RETURN_IF_ERROR(
          run_stage(tasks[i].data.name, {tasks[i].train}, absl::StrCat(i + 1, " ", tasks[i].data.name)));
    }
  }

  absl::StatusOr<double> nll_after = ReferenceNll(*current, tokenizer, ref_texts, max_seq_len);
  if (!nll_after.ok()) {
    return fail(absl::StrCat("reference NLL: ", nll_after.status().message()));
  }
  run.nll_before = ctx.nll_base;
  run.nll_after = *nll_after;
  absl::StatusOr<MethodState> state = method.ExportState();
  if (!state.ok()) {
    return fail(absl::StrCat("ExportState: ", state.status().message()));
  }
  run.state_bytes = StateBytes(*state);
  if (run.joint) {
    double sum = 0;
    for (double v : run.matrix.back()) sum += v;
    run.aa = sum / static_cast<double>(T);
  } else {
    absl::StatusOr<ClReport> report = ComputeClReport(run.matrix, base);
    if (!report.ok()) {
      return fail(absl::StrCat("metrics: ", report.status().message()));
    }
    run.report = *report;
    run.aa = report->aa.value_or(std::numeric_limits<double>::quiet_NaN());
    if (!run.routed_matrix.empty()) {
      absl::StatusOr<ClReport> routed = ComputeClReport(run.routed_matrix, base);
      if (!routed.ok()) {
        return fail(absl::StrCat("routed metrics: ", routed.status().message()));
      }
      run.routed_report = *routed;
    }
    if (!run.auto_matrix.empty()) {
      absl::StatusOr<ClReport> automatic = ComputeClReport(run.auto_matrix, base);
      if (!automatic.ok()) {
        return fail(absl::StrCat("auto metrics: ", automatic.status().message()));
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
                FormatOpt(run.routed_report->bwt, true).c_str(),
                FormatOpt(run.routed_report->fwt, true).c_str(),
                FormatOpt(run.routed_report->forgetting).c_str());
    if (run.auto_report.has_value()) {
      std::printf("auto-routed (each test example routed by the stage's router; no task name):\n");
      PrintMatrix(run, run.auto_matrix, tasks, base);
      std::printf("auto: AA %s  BWT %s  forgetting %s  reference NLL %.4f\n",
                  FormatOpt(run.auto_report->aa).c_str(), FormatOpt(run.auto_report->bwt, true).c_str(),
                  FormatOpt(run.auto_report->forgetting).c_str(), run.auto_reference_nll);
    }
  }
  std::printf("reference NLL %.4f -> %.4f  trainable parameters %lld  state %s (%lld bytes)\n",
              run.nll_before, run.nll_after, static_cast<long long>(run.trainable),
              FormatBytes(run.state_bytes).c_str(), static_cast<long long>(run.state_bytes));
  std::fflush(stdout);
  return run;
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
  TrainingRecipe& r = a->recipe;
  sub->add_option("--epochs", r.epochs, "Epochs per stage (used when --steps is 0)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--steps", r.max_steps, "Optimizer steps per stage (0 = --epochs; mtl: steps x tasks)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  sub->add_option("--lr", r.learning_rate, "Peak learning rate")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--batch-size", r.batch_size, "Batch size")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--router-layer", a->router_layer,
                  "Automatic routing: base-model decoder layers run for a prompt's feature (-1 = half)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{-1}, int64_t{1} << 20));
  sub->add_option("--warmup-steps", a->warmup_steps,
                  "Warmup steps per stage (-1 = --warmup-ratio of the steps, as the server)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{-1}, int64_t{1} << 30));
  sub->add_option("--warmup-ratio", r.warmup_ratio, "Warmup as a fraction of each stage's steps")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1.0));
  sub->add_option("--lr-schedule", r.lr_schedule, "linear, cosine or constant")
      ->capture_default_str()
      ->check(CLI::IsMember({"linear", "cosine", "constant"}));
  sub->add_option("--max-seq-len", r.max_seq_len, "Tokens per training / scoring sequence")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{2}, int64_t{1} << 20));
  sub->add_option("--seed", r.seed, "Seed (data sampling, batch order, adapter init)")->capture_default_str();
  // The method options, from the method registry (same names as the server's flags, with dashes).
  for (const MethodOption& o : AllMethodOptions()) {
    if (o.FlagName().empty()) continue;
    std::vector<std::string> names = {o.FlagName()};
    for (const std::string& alias : o.aliases) names.push_back(alias);
    std::string spec;
    for (std::string n : names) {
      std::replace(n.begin(), n.end(), '_', '-');
      absl::StrAppend(&spec, spec.empty() ? "" : ",", "--", n);
    }
    const std::string name = o.name;
    sub->add_option_function<std::string>(
           spec, [a, name](const std::string& v) { a->method_options.emplace_back(name, v); },
           absl::StrCat(o.help, " [", MethodOptionText(r.method_config, o), "]"))
        ->type_name(std::holds_alternative<std::string MethodConfig::*>(o.field) ? "TEXT" : "VALUE");
  }
  sub->add_option("--threads", a->threads, "Torch CPU threads")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--device", a->device, "Device: cpu, cuda or cuda:N")->capture_default_str();
  sub->add_option("--dtype", a->dtype, "Weight dtype: float32, bfloat16 (float16: CUDA only)")
      ->capture_default_str();
  sub->add_option("--reference", a->reference,
                  "Reference text for NLL before/after (default: TinyStories val)");
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
  if (args.threads < 1) return Usage("--threads must be >= 1");
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
  // The recipe: the server's defaults with this command line's settings.
  TrainingRecipe recipe = args.recipe;
  for (const auto& [name, text] : args.method_options) {
    const MethodOption* o = FindMethodOption(name);
    std::string flag = o->FlagName();
    std::replace(flag.begin(), flag.end(), '_', '-');
    if (absl::Status s = SetMethodOption(&recipe.method_config, *o, text, absl::StrCat("--", flag));
        !s.ok()) {
      return Usage(std::string(s.message()));
    }
  }
  recipe.SetRank(recipe.method_config.rank);
  if (args.warmup_steps >= 0) {
    recipe.warmup_steps = args.warmup_steps;
    recipe.warmup_ratio = 0;
  }
  if (absl::Status s = ValidateRecipe(recipe); !s.ok()) return Usage(std::string(s.message()));
  args.recipe = recipe;
  const MethodConfig base_config = recipe.method_config;
  TrainOptions train_options = TrainOptionsFromRecipe(recipe);
  if (absl::Status s = ValidateTrainOptions(train_options); !s.ok()) {
    return Usage(absl::StrCat("training settings: ", s.message()));
  }

  SetTorchThreads(args.threads);
  const Clock::time_point bench_start = Clock::now();

  // ---- model, tokenizer, tasks, reference text ------------------------------------------------
  if (!PathExists(args.model_dir))
    return Usage(absl::StrCat("--model ", args.model_dir, ": no such directory"));
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
  if (base_model->config().pad_token_id.has_value())
    train_options.pad_id = *base_model->config().pad_token_id;
  const int64_t max_seq_len = std::min(recipe.max_seq_len, base_model->config().max_position_embeddings);

  std::vector<BenchTask> tasks;
  RouterOptions router_options;
  router_options.layer = args.router_layer;
  if (absl::Status s = router_options.Validate(); !s.ok())
    return Usage(absl::StrCat("--router-layer: ", s.message()));
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
      lo.seed = recipe.seed;
      absl::StatusOr<TaskData> data = LoadTaskDir(t.dir, lo);
      if (!data.ok()) return Usage(absl::StrCat("task \"", entry, "\": ", data.status().message()));
      t.data = std::move(*data);
      if (t.data.scorer == Scorer::kNll) {
        return Usage(
            absl::StrCat("task \"", t.data.name, "\" (", t.dir,
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
    if (absl::Status s = MakeDirs(args.plots_dir); !s.ok())
      return Usage(absl::StrCat("--plots: ", s.message()));
  }

  std::vector<std::string> task_names;
  for (const BenchTask& t : tasks) task_names.push_back(t.data.name);
  std::printf("strata bench cl: model %s, order %s, methods %s\n", args.model_dir.c_str(),
              absl::StrJoin(task_names, " -> ").c_str(), absl::StrJoin(methods, ",").c_str());
  for (const BenchTask& t : tasks) {
    std::printf("  task %-10s %-12s %-11s scorer %-11s train %zu test %zu  (%s)\n", t.data.name.c_str(),
                std::string(TaskKindName(t.data.kind)).c_str(),
                std::string(TaskFormatName(t.data.format)).c_str(),
                std::string(ScorerName(t.data.scorer)).c_str(), t.data.train.size(), t.data.test.size(),
                t.dir.c_str());
  }
  std::printf(
      "  steps/stage %s, batch %lld, lr %g, rank %lld, alpha %g, lambda %g, targets %s, seed %llu, "
      "threads %d, device %s\n  %s\n",
      recipe.max_steps > 0 ? std::to_string(recipe.max_steps).c_str()
                           : absl::StrCat(recipe.epochs, " epoch(s)").c_str(),
      static_cast<long long>(recipe.batch_size), recipe.learning_rate,
      static_cast<long long>(base_config.rank), base_config.alpha, base_config.ella_lambda,
      absl::StrJoin(base_config.target_modules, ",").c_str(), static_cast<unsigned long long>(recipe.seed),
      args.threads, device->c_str(), TorchRuntimeSummary().c_str());
  std::fflush(stdout);

  // ---- base scores ----------------------------------------------------------------------------
  const Clock::time_point base_start = Clock::now();
  absl::StatusOr<std::vector<double>> base_or = EvaluateAll(*base_model, tokenizer, tasks, max_seq_len);
  if (!base_or.ok()) return Usage(std::string(base_or.status().message()));
  const std::vector<double> base = *base_or;
  absl::StatusOr<double> nll_base = ReferenceNll(*base_model, tokenizer, ref_texts, max_seq_len);
  if (!nll_base.ok()) return Usage(absl::StrCat("reference NLL: ", nll_base.status().message()));
  if (!args.quiet) {
    std::fprintf(
        stderr, "[base] %s  reference NLL %.4f  (%.1f s)\n",
        absl::StrJoin(base, " ", [](std::string* o, double v) { absl::StrAppendFormat(o, "%.3f", v); })
            .c_str(),
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
      for (const Example& e : t.data.test) prompts.push_back(RouterPrompt(e));
      absl::StatusOr<at::Tensor> f = router.Features(*base_model, tokenizer, prompts);
      if (!f.ok()) return Usage(absl::StrCat("router features: ", f.status().message()));
      test_features.push_back(*f);
    }
    for (const BenchTask& t : tasks) {
      std::vector<std::string> prompts;
      for (const Example& e : t.data.train) prompts.push_back(RouterPrompt(e));
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
      accuracy.push_back(
          absl::StrFormat("%s %.3f", tasks[j].data.name,
                          static_cast<double>(right) / std::max<size_t>(1, decisions.back()[j].size())));
    }
    std::printf(
        "router: layer %lld of %lld, %lld bytes (%lld per task); accuracy after the last task: %s; "
        "reference texts routed to the base model: %lld of %zu (%.1f s)\n",
        static_cast<long long>(layer), static_cast<long long>(base_model->num_layers()),
        static_cast<long long>(router.StateBytes()), static_cast<long long>(router.StateBytesPerTask()),
        absl::StrJoin(accuracy, ", ").c_str(), static_cast<long long>(ref_base), ref_decisions.size(),
        SecondsSince(r0));
  }

  // ---- methods ----------------------------------------------------------------------------------
  std::vector<MethodRun> runs;
  std::vector<std::pair<std::string, std::string>> failures;
  const BenchContext context{args,      recipe,    base_config, train_options, base_model.get(),
                             tokenizer, tasks,     task_names,  ref_texts,     max_seq_len,
                             base,      *nll_base, routers,     decisions,     ref_decisions};
  for (const std::string& requested : methods) {
    absl::StatusOr<MethodRun> run = RunMethod(requested, context);
    if (run.ok()) {
      runs.push_back(std::move(*run));
    } else {
      const std::string why(run.status().message());
      std::fprintf(stderr, "[%s] FAILED: %s\n", requested.c_str(), why.c_str());
      failures.emplace_back(requested, why);
    }
  }

  // ---- report: summary, JSON, plots (cl_bench_report.cc) ----------------------------------------
  ClBenchResults results{args, methods,   tasks,           task_names,          reference,
                         base, *nll_base, std::move(runs), std::move(failures), SecondsSince(bench_start)};
  return ReportClBench(results);
}

}  // namespace strata::bench
