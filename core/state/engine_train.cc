#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/adapt/data_parallel.h"
#include "core/adapt/method.h"
#include "core/adapt/trainer.h"
#include "core/data/encode.h"
#include "core/data/jsonl.h"
#include "core/model/model.h"
#include "core/model/runtime.h"
#include "core/model/tokenizer.h"
#include "core/state/engine.h"
#include "core/state/engine_impl.h"
#include "core/util/file_util.h"
#include "core/util/status_macros.h"

// A task's training run: its recipe, the router's statistics, training, the evaluation of every
// task in every view, the checkpoint and the publish.

namespace strata {
namespace {

double Nan() { return std::nan(""); }

// At most this many training prompts feed a task's router statistics (an evenly spaced subset).
constexpr size_t kRouterMaxPrompts = 2000;

}  // namespace

absl::StatusOr<JobOutcome> Engine::RunJob(const JobRecord& job, std::vector<Example> train,
                                          std::vector<Example> eval, const JobContext& ctx) {
  if (options_.replica) {
    return absl::FailedPreconditionError("this server is a read-only replica: jobs run on the trainer");
  }
  if (!job.spec.import_dirs.empty()) return RunImport(job);
  Impl& s = *impl_;
  absl::MutexLock train_lock(&s.train_mu);
  SetTorchThreads(s.options.training_threads);
  CommittedState committed;
  committed.method = s.method->name();
  committed.tasks = s.method->num_tasks();
  committed.config = s.method->config();
  ASSIGN_OR_RETURN(const TrainingRecipe recipe,
                   ResolveTaskRecipe(s.options.recipe, job.spec.method, job.spec.overrides, committed));
  if (TaskIsLearned(job.spec.name)) {
    return absl::AlreadyExistsError(absl::StrCat("task '", job.spec.name, "' is already learned"));
  }
  // The options that shape the state are set by the first task (the method is rebuilt from the
  // task's recipe while the state is empty); later tasks change only the per-task options.
  if (s.method->num_tasks() == 0) {
    ASSIGN_OR_RETURN(s.method, CreateMethod(recipe.method, recipe.method_config));
  } else if (auto st = s.method->SetTaskConfig(recipe.method_config); !st.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("overrides: ", st.message()));
  }
  const std::string scorer = job.spec.scorer.empty() ? AutoScorer(eval) : job.spec.scorer;
  std::shared_ptr<const ServedVersion> before = Current();
  const Evaluator& ev = *s.evaluator;

  // Scores before training: the base model (b_t) and the current weights (a[t-1][t], for FWT).
  double base_score, pre_score;
  {
    c10::InferenceMode guard;
    ASSIGN_OR_RETURN(base_score, ev.Score(*s.base, eval, scorer));
    if (before->tasks_learned == 0) {
      pre_score = base_score;
    } else {
      ASSIGN_OR_RETURN(pre_score, ev.Score(*before->model, eval, scorer));
    }
  }
  spdlog::info(
      "task '{}': {} train / {} eval examples, scorer {}, base score {:.4f}, before training {:.4f}; "
      "recipe {}",
      job.spec.name, train.size(), eval.size(), scorer, base_score, pre_score, RecipeToJson(recipe));

  TrainOptions to = TrainOptionsFromRecipe(recipe);
  to.cancel = ctx.cancel;
  to.pad_id = s.tokenizer->pad_id().value_or(0);
  to.shards = s.options.training_shards;
  to.progress_every = 1;
  to.on_progress = [&ctx](const TrainProgress& p) {
    if (!ctx.progress) return;
    JobProgress jp;
    jp.step = p.step;
    jp.total_steps = p.total_steps;
    jp.epoch = static_cast<int32_t>(p.epoch);
    jp.loss = p.loss;
    jp.learning_rate = p.learning_rate;
    jp.tokens_per_second = p.tokens_per_second;
    jp.eta_seconds = p.eta_seconds;
    ctx.progress(jp);
  };
  // The router's view of the training prompts (base model W0), taken now: the training examples
  // are dropped below and never kept.
  at::Tensor router_features;
  const int64_t router_layer = s.router.FeatureLayer(*s.base);
  {
    std::vector<std::string> prompts;
    const size_t stride = std::max<size_t>(1, (train.size() + kRouterMaxPrompts - 1) / kRouterMaxPrompts);
    for (size_t i = 0; i < train.size(); i += stride) prompts.push_back(RouterPrompt(train[i]));
    auto features = s.router.Features(*s.base, *s.tokenizer, prompts);
    if (features.ok()) {
      router_features = *features;
    } else {
      spdlog::warn("task '{}': no router statistics ({})", job.spec.name, features.status().ToString());
    }
  }
  EncodeOptions eo;
  eo.max_seq_len = recipe.max_seq_len;
  std::vector<TrainTask> data;
  data.push_back(MakeTrainTask(job.spec.name, *s.tokenizer, train, eo));
  train.clear();
  train.shrink_to_fit();

  // Data parallelism: the other ranks that join get the task (recipe, starting version, encoded
  // examples) and train their shard of every step; a rank that is missing or dies costs speed only.
  std::unique_ptr<GradientSync> dp_sync;
  if (s.options.data_parallel != nullptr) {
    DataParallelTask announced;
    announced.name = job.spec.name;
    announced.version = before->version;
    announced.recipe_json = RecipeToJson(recipe);
    announced.examples = data[0].examples;
    const std::string& name = job.spec.name;
    dp_sync = s.options.data_parallel->StartTask(
        &announced, [&name](const std::string& line) { spdlog::warn("task '{}': {}", name, line); });
    if (dp_sync != nullptr) {
      spdlog::info("task '{}': data-parallel over {} of {} ranks (announcement {})", name, dp_sync->size(),
                   s.options.data_parallel->world_size(), announced.seq);
      to.sync = dp_sync.get();
      to.on_group_lost = [&name](const std::string& why) {
        spdlog::warn("task '{}': data-parallel group lost ({})", name, why);
      };
    } else {
      spdlog::info("task '{}': training on rank 0 alone (no other rank joined)", name);
    }
  }

  // The committed state before this task: restored if anything after the merge fails.
  ASSIGN_OR_RETURN(MethodState previous_state, s.method->ExportState());
  Trainer trainer(to);
  auto result = trainer.Train(*before->model, *s.method, job.spec.name, data);
  if (s.options.data_parallel != nullptr) {
    dp_last_task_ranks_ = dp_sync != nullptr ? dp_sync->size() : 1;
    if (result.ok() && dp_sync != nullptr) {
      ++dp_tasks_;
      dp_steps_ += result->data_parallel_steps;
      if (result->data_parallel_steps < result->steps) ++dp_groups_lost_;
    }
  }
  dp_sync.reset();
  if (!result.ok()) return result.status();
  spdlog::info(
      "task '{}': {} steps in {:.1f} s ({} over {} data-parallel ranks), loss {:.4f} -> {:.4f}, merge {:.2f} "
      "s",
      job.spec.name, result->steps, result->seconds, result->data_parallel_steps,
      result->data_parallel_members, result->first_loss, result->final_loss, result->merge_seconds);
  auto rollback = [&](absl::Status st) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.train_mu) {
    return s.Rollback(previous_state, std::move(st));
  };
  if (ctx.set_state) ctx.set_state(JobState::kEvaluating);

  // Keep the eval split (the only data kept after the task) before the checkpoint names it.
  const std::string eval_rel = absl::StrCat("tasks/", job.spec.name, "/eval.jsonl");
  {
    std::string text;
    for (const auto& e : eval) text += ExampleToJsonLine(e) + "\n";
    if (auto st = MakeDirs(s.options.state_dir + "/tasks/" + job.spec.name); !st.ok()) return rollback(st);
    if (auto st = WriteFileAtomic(s.options.state_dir + "/" + eval_rel, text); !st.ok()) return rollback(st);
  }

  // Evaluate every known task on the new weights. A failed evaluation fails the task (nothing
  // unmeasured is published).
  std::shared_ptr<const CausalLM> new_model(std::move(result->model));
  ResultsLedger ledger;
  {
    absl::MutexLock lock(&s.mu);
    ledger = s.ledger;
  }
  StageResult stage;
  stage.task = CheckpointTask{job.spec.name,        scorer,   job.id,
                              job.spec.description, eval_rel, static_cast<int64_t>(eval.size())};
  stage.eval = eval;
  stage.base_score = base_score;
  stage.pre_score = pre_score;
  stage.weights_version = s.NextVersion(before->version);
  std::vector<CheckpointTask> tasks = ledger.tasks();
  tasks.push_back(stage.task);
  auto eval_of = [&](const CheckpointTask& t) -> const std::vector<Example>& {
    return t.name == job.spec.name ? eval : ledger.EvalSet(t.name);
  };
  auto failed = [&](const absl::Status& st) {
    return rollback(absl::Status(st.code(), absl::StrCat("evaluation failed: ", st.message())));
  };
  JobOutcome outcome;
  {
    c10::InferenceMode guard;
    for (const auto& t : tasks) {
      if (ctx.cancel && ctx.cancel->load())
        return rollback(absl::CancelledError("cancelled during evaluation"));
      auto score = ev.Score(*new_model, eval_of(t), t.scorer);
      if (!score.ok()) return failed(score.status());
      stage.scores.push_back(*score);
      outcome.eval_results.emplace_back(t.name, *score);
    }
    auto ref = ev.ReferenceNll(*new_model);
    if (!ref.ok()) return failed(ref.status());
    stage.reference_nll = *ref;
  }
  outcome.reference_nll = stage.reference_nll;

  // The router with this task, and the other views: each task served by its name (methods with
  // per-task weights), each example routed automatically, router accuracy, reference NLL (auto).
  TaskRouter new_router = s.router;
  if (router_features.defined()) {
    if (auto st = new_router.AddTask(job.spec.name, router_features, router_layer); !st.ok()) {
      spdlog::warn("task '{}' is not routed automatically: {}", job.spec.name, st.ToString());
    }
  }
  stage.routed_scores.assign(tasks.size(), Nan());
  stage.auto_scores.assign(tasks.size(), Nan());
  stage.router_accuracy.assign(tasks.size(), Nan());
  stage.reference_nll_auto = Nan();
  {
    c10::InferenceMode guard;
    auto rm = s.BuildRouteModels(*s.method, new_router, new_model);
    if (!rm.ok()) return rollback(rm.status());
    const std::vector<std::string> routes = new_router.TaskNames();
    for (size_t j = 0; j < tasks.size(); ++j) {
      if (ctx.cancel && ctx.cancel->load())
        return rollback(absl::CancelledError("cancelled during evaluation"));
      const auto& eval_j = eval_of(tasks[j]);
      const auto it = std::find(routes.begin(), routes.end(), tasks[j].name);
      if (s.method->SupportsTaskRouting() && it != routes.end()) {
        auto score = ev.Score(*(*rm)[1 + (it - routes.begin())], eval_j, tasks[j].scorer);
        if (!score.ok()) return failed(score.status());
        stage.routed_scores[j] = *score;
      }
      if (new_router.empty() || eval_j.empty()) continue;
      std::vector<std::string> prompts;
      for (const auto& e : eval_j) prompts.push_back(RouterPrompt(e));
      auto features = new_router.Features(*s.base, *s.tokenizer, prompts);
      if (!features.ok()) return failed(features.status());
      const std::vector<RouteDecision> decisions = new_router.Route(*features);
      int64_t right = 0;
      std::vector<size_t> slots;
      for (const auto& dec : decisions) {
        right += dec.task == tasks[j].name;
        slots.push_back(RouteSlot(dec));
      }
      stage.router_accuracy[j] = static_cast<double>(right) / static_cast<double>(decisions.size());
      auto score = ev.ScoreGrouped(*rm, slots, eval_j, tasks[j].scorer);
      if (!score.ok()) return failed(score.status());
      stage.auto_scores[j] = *score;
    }
    if (new_router.empty()) {
      stage.reference_nll_auto = stage.reference_nll;
    } else {
      auto ref = ev.ReferenceNllRouted(*rm, new_router);
      if (!ref.ok()) return failed(ref.status());
      stage.reference_nll_auto = *ref;
    }
  }

  // The publish gate: a version that breaks its promises is kept as a candidate, not served.
  auto new_state = s.method->ExportState();
  if (!new_state.ok()) return rollback(new_state.status());
  ResultsLedger next = ledger.WithStage(stage);
  const CheckpointData snapshot = s.Snapshot(*new_state, next, new_router, stage.weights_version);
  const GateDecision gate = EvaluateGate(s.options.gate, job.spec.min_score, ledger, stage);
  if (!gate.publish) {
    VersionMeta meta = s.DescribeVersion(stage.weights_version, kVersionCandidate, before->version, job.id,
                                         job.spec.name, next);
    meta.hold_reasons = gate.reasons;
    if (auto st = s.KeepCandidate(snapshot, meta); !st.ok()) {
      return rollback(
          absl::Status(st.code(), absl::StrCat("cannot keep the candidate version: ", st.message())));
    }
    // The served state stays as it was: the live method goes back to it.
    (void)s.Rollback(previous_state, absl::OkStatus());
    outcome.held = true;
    outcome.hold_reasons = gate.reasons;
    outcome.weights_version = stage.weights_version;
    spdlog::warn("task '{}' held by the publish gate as candidate version {} (served: version {}): {}",
                 job.spec.name, stage.weights_version, before->version, absl::StrJoin(gate.reasons, "; "));
    if (on_publish_) on_publish_();
    return outcome;
  }
  // Checkpoint, then publish (a restart reports exactly what was published).
  const ResultsLedger next_for_versions = next;
  auto version = s.CheckpointAndPublish(snapshot, *new_state, new_model, static_cast<int64_t>(tasks.size()),
                                        new_router, std::move(next));
  if (!version.ok()) return rollback(version.status());
  s.router = std::move(new_router);
  s.KeepPublished(s.DescribeVersion(stage.weights_version, kVersionPublished, before->version, job.id,
                                    job.spec.name, next_for_versions));
  outcome.weights_version = (*version)->version;
  spdlog::info("task '{}' learned: weights version {}, scores [{}], auto-routed [{}], router accuracy [{}]",
               job.spec.name, (*version)->version, absl::StrJoin(stage.scores, ", "),
               absl::StrJoin(stage.auto_scores, ", "), absl::StrJoin(stage.router_accuracy, ", "));
  if (on_publish_) on_publish_();
  return outcome;
}

}  // namespace strata
