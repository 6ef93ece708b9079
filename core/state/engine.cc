#include "core/state/engine.h"

#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "core/adapt/method.h"
#include "core/data/encode.h"
#include "core/data/jsonl.h"
#include "core/eval/scorers.h"
#include "core/model/decode_batch.h"
#include "core/model/model.h"
#include "core/model/runtime.h"
#include "core/model/tokenizer.h"
#include "core/state/checkpoint.h"
#include "core/state/engine_impl.h"
#include "core/util/file_util.h"
#include "core/util/status_macros.h"

// Served versions and routing: creating the engine from a checkpoint, the current version, the
// task-routed models and where a request is served. Training runs are in engine_train.cc, export
// and import in engine_transfer.cc.

namespace strata {

// ---- Impl ------------------------------------------------------------------------------------------

absl::StatusOr<std::vector<std::shared_ptr<const CausalLM>>> Engine::Impl::BuildRouteModels(
    const Method& m, const TaskRouter& r, std::shared_ptr<const CausalLM> merged) const {
  std::shared_ptr<const CausalLM> unmatched = options.unmatched_route == "merged" ? merged : base_view;
  return RouteModels(*base, m, r, std::move(unmatched), std::move(merged));
}

absl::Status Engine::Impl::Rollback(const MethodState& previous, absl::Status st) {
  if (auto r = method->ImportState(previous); !r.ok()) {
    spdlog::critical("cannot roll back the adaptation state: {}", r.ToString());
  }
  return st;
}

CheckpointData Engine::Impl::Snapshot(const MethodState& state, const ResultsLedger& l, const TaskRouter& r,
                                      int64_t version) const {
  CheckpointData d;
  d.base_model_id = options.base_model_id;
  d.method = state.method;
  d.method_config_json = state.config_json;
  d.method_tensors = state.tensors;
  d.weights_version = version;
  l.WriteTo(&d);
  r.ExportState("", &d.router_tensors, &d.router_json);
  return d;
}

absl::StatusOr<std::shared_ptr<const ServedVersion>> Engine::Impl::CheckpointAndPublish(
    const CheckpointData& snapshot, const MethodState& state, std::shared_ptr<const CausalLM> model,
    int64_t tasks_learned, const TaskRouter& new_router, ResultsLedger new_ledger) {
  auto version = std::make_shared<ServedVersion>();
  version->version = snapshot.weights_version;
  version->model = std::move(model);
  version->tasks_learned = tasks_learned;
  version->router = std::make_shared<const TaskRouter>(new_router);
  ASSIGN_OR_RETURN(auto frozen, CreateMethodFromState(state));
  version->method = std::shared_ptr<const Method>(std::move(frozen));
  RETURN_IF_ERROR(SaveCheckpoint(options.state_dir, snapshot));
  const int64_t bytes = CheckpointBytes(options.state_dir);
  absl::MutexLock lock(&mu);
  ledger = std::move(new_ledger);
  state_bytes = bytes;
  routed_cache.clear();
  current = version;  // the atomic swap: new requests see the new version
  return std::shared_ptr<const ServedVersion>(version);
}

// ---- Engine ----------------------------------------------------------------------------------------

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Engine::~Engine() = default;

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(std::unique_ptr<CausalLM> base,
                                                       std::shared_ptr<const Tokenizer> tokenizer,
                                                       ModelSummary summary, EngineOptions options) {
  auto impl = std::make_unique<Impl>();
  impl->base = std::move(base);
  impl->base_view = std::shared_ptr<const CausalLM>(impl->base->ShallowCopy());
  impl->tokenizer = tokenizer;
  impl->options = options;
  RETURN_IF_ERROR(ValidateGateOptions(options.gate));
  if (options.keep_versions < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--keep_versions: must be >= 1 (the served version is always kept), got ", options.keep_versions));
  }
  RETURN_IF_ERROR(MakeDirs(options.state_dir + "/tasks"));
  std::vector<std::string> reference_texts;
  if (!options.reference_text_path.empty()) {
    ASSIGN_OR_RETURN(std::string text, ReadFile(options.reference_text_path));
    reference_texts = SplitOnBlankLines(text);
    if (static_cast<int64_t>(reference_texts.size()) > options.reference_max_texts) {
      reference_texts.resize(options.reference_max_texts);
    }
    if (reference_texts.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(options.reference_text_path, ": no text"));
    }
  }
  impl->evaluator = std::make_unique<Evaluator>(impl->base.get(), impl->tokenizer.get(),
                                                options.recipe.max_seq_len, std::move(reference_texts));

  ASSIGN_OR_RETURN(auto checkpoint, LoadCheckpoint(options.state_dir));
  int64_t version = 1;
  if (checkpoint.has_value()) {
    if (checkpoint->base_model_id != options.base_model_id) {
      return absl::FailedPreconditionError(
          absl::StrCat("the checkpoint in ", options.state_dir, "/checkpoint was made on base model '",
                       checkpoint->base_model_id, "', but the server runs '", options.base_model_id,
                       "'; start with the same --model or another --state_dir"));
    }
    MethodState state;
    state.method = checkpoint->method;
    state.config_json = checkpoint->method_config_json;
    state.tensors = checkpoint->method_tensors;
    auto method = CreateMethodFromState(state);
    if (!method.ok()) {
      return absl::DataLossError(absl::StrCat("cannot restore the adaptation state from ", options.state_dir,
                                              "/checkpoint: ", method.status().message()));
    }
    auto ledger = ResultsLedger::FromCheckpoint(*checkpoint, options.state_dir, !options.replica);
    if (!ledger.ok()) return ledger.status();
    auto router = TaskRouter::ImportState(checkpoint->router_json, "", checkpoint->router_tensors);
    if (!router.ok()) {
      return absl::DataLossError(absl::StrCat("cannot restore the task router from ", options.state_dir,
                                              "/checkpoint: ", router.status().message()));
    }
    absl::MutexLock train_lock(&impl->train_mu);
    absl::MutexLock lock(&impl->mu);
    impl->method = std::move(*method);
    impl->router = router->empty() ? TaskRouter(options.router) : std::move(*router);
    version = checkpoint->weights_version;
    impl->ledger = std::move(*ledger);
    impl->state_bytes = CheckpointBytes(options.state_dir);
    spdlog::info("restored checkpoint: method {}, {} tasks, weights version {}", checkpoint->method,
                 impl->ledger.tasks().size(), version);
  } else {
    RETURN_IF_ERROR(options.router.Validate());
    RETURN_IF_ERROR(ValidateRecipe(options.recipe));
    ASSIGN_OR_RETURN(auto method, CreateMethod(options.recipe.method, options.recipe.method_config));
    absl::MutexLock train_lock(&impl->train_mu);
    impl->router = TaskRouter(options.router);
    impl->method = std::move(method);
    spdlog::info("new adaptation state: method {}", options.recipe.method);
  }

  absl::MutexLock train_lock(&impl->train_mu);
  auto served = impl->base->ShallowCopy();
  RETURN_IF_ERROR(impl->method->ApplyServedWeights(served.get()));
  {
    absl::MutexLock lock(&impl->mu);
    if (!impl->ledger.HasBaseReferenceNll() && impl->evaluator->has_reference()) {
      SetTorchThreads(options.training_threads);
      c10::InferenceMode guard;
      ASSIGN_OR_RETURN(const double nll, impl->evaluator->ReferenceNll(*impl->base));
      impl->ledger.SetBaseReferenceNll(nll);
    }
  }
  auto version_ptr = std::make_shared<ServedVersion>();
  version_ptr->router = std::make_shared<const TaskRouter>(impl->router);
  version_ptr->version = version;
  version_ptr->model = std::shared_ptr<const CausalLM>(std::move(served));
  {
    ASSIGN_OR_RETURN(MethodState frozen, impl->method->ExportState());
    ASSIGN_OR_RETURN(auto copy, CreateMethodFromState(frozen));
    version_ptr->method = std::shared_ptr<const Method>(std::move(copy));
  }
  ResultsLedger served_ledger;
  {
    absl::MutexLock lock(&impl->mu);
    version_ptr->tasks_learned = static_cast<int64_t>(impl->ledger.tasks().size());
    impl->current = version_ptr;
    served_ledger = impl->ledger;
  }
  // A replica keeps no versions: the trainer it follows keeps them.
  if (!options.replica) RETURN_IF_ERROR(impl->ReconcileVersions(served_ledger));
  std::unique_ptr<Engine> engine(new Engine(std::move(impl)));
  engine->tokenizer_ = std::move(tokenizer);
  engine->summary_ = std::move(summary);
  engine->options_ = std::move(options);
  return engine;
}

std::shared_ptr<const ServedVersion> Engine::Current() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->current;
}

// The published copy's name (the live method belongs to the training worker, which may rebuild it).
std::string Engine::method() const { return Current()->method->name(); }

bool Engine::TaskIsLearned(const std::string& task_name) const {
  absl::MutexLock lock(&impl_->mu);
  if (impl_->ledger.HasTask(task_name)) return true;
  // Imported adapters are tasks of the method without eval data.
  const auto& imported = impl_->current->method->tasks();
  return std::find(imported.begin(), imported.end(), task_name) != imported.end();
}

int64_t Engine::AdaptationStateBytes() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->state_bytes;
}

absl::StatusOr<std::shared_ptr<const CausalLM>> Engine::Routed(const ServedVersion& version,
                                                               const std::string& task) const {
  const Method& method = *version.method;
  if (!method.SupportsTaskRouting()) {
    // The method's own UNIMPLEMENTED message names the methods that route.
    return absl::FailedPreconditionError(method.ApplyTaskRouting(task, nullptr).message());
  }
  const auto& known = method.tasks();
  if (std::find(known.begin(), known.end(), task) == known.end()) {
    return absl::NotFoundError(absl::StrCat("no learned task '", task, "'"));
  }
  {
    absl::MutexLock lock(&impl_->mu);
    auto it = impl_->routed_cache.find(task);
    if (it != impl_->routed_cache.end() && it->second.first == version.version) return it->second.second;
  }
  auto model = impl_->base->ShallowCopy();
  RETURN_IF_ERROR(method.ApplyTaskRouting(task, model.get()));
  std::shared_ptr<const CausalLM> shared(std::move(model));
  absl::MutexLock lock(&impl_->mu);
  if (impl_->routed_cache.size() > 8) impl_->routed_cache.clear();
  impl_->routed_cache[task] = {version.version, shared};
  return shared;
}

absl::StatusOr<std::vector<RouteChoice>> Engine::ResolveBatch(const ServedVersion& version,
                                                              const std::string& route,
                                                              const std::vector<std::string>& prompts) const {
  std::vector<RouteChoice> out(prompts.size());
  if (route == "merged" || route == "base") {
    RouteChoice c;
    c.route = route;
    c.model = route == "merged" ? version.model : impl_->base_view;
    c.weights = c.model;
    std::fill(out.begin(), out.end(), c);
    return out;
  }
  if (!route.empty() && route != "auto") {
    ASSIGN_OR_RETURN(auto model, Routed(version, route));
    RouteChoice c;
    c.route = route;
    c.model = model;
    c.weights = impl_->base_view;
    std::fill(out.begin(), out.end(), c);
    return out;
  }
  // auto
  const std::string unmatched = impl_->options.unmatched_route;
  const TaskRouter* router = version.router.get();
  std::vector<RouteDecision> decisions(prompts.size());
  if (router != nullptr && !router->empty() && !prompts.empty()) {
    ASSIGN_OR_RETURN(at::Tensor features, router->Features(*impl_->base, *tokenizer_, prompts));
    decisions = router->Route(features);
  }
  const bool per_task = version.method->SupportsTaskRouting();
  for (size_t i = 0; i < prompts.size(); ++i) {
    RouteChoice& c = out[i];
    c.automatic = true;
    c.confidence = decisions[i].confidence;
    const auto& known = version.method->tasks();
    if (!decisions[i].task.empty() && per_task &&
        std::find(known.begin(), known.end(), decisions[i].task) != known.end()) {
      ASSIGN_OR_RETURN(c.model, Routed(version, decisions[i].task));
      c.weights = impl_->base_view;
      c.route = decisions[i].task;
    } else if (!decisions[i].task.empty()) {
      c.model = version.model;  // the method keeps no per-task weights: the merged ones hold the task
      c.weights = c.model;
      c.route = "merged";
    } else if (unmatched == "merged") {
      c.model = version.model;
      c.weights = c.model;
      c.route = "merged";
    } else {
      c.model = impl_->base_view;
      c.weights = c.model;
      c.route = "base";
    }
  }
  return out;
}

absl::StatusOr<std::vector<std::pair<RouteChoice, GenerationResult>>> Engine::GenerateRouted(
    const ServedVersion& version, const std::string& route, const std::vector<std::string>& prompts,
    const SamplingOptions& sampling) const {
  ASSIGN_OR_RETURN(std::vector<RouteChoice> choices, ResolveBatch(version, route, prompts));
  std::map<const CausalLM*, std::vector<size_t>> rows;  // by the weights under the route
  for (size_t i = 0; i < prompts.size(); ++i) rows[choices[i].weights.get()].push_back(i);
  std::vector<std::pair<RouteChoice, GenerationResult>> out(prompts.size());
  for (const auto& [weights, idx] : rows) {
    DecodeBatch batch(choices[idx.front()].weights, tokenizer_);
    absl::Status failed;
    for (size_t i : idx) {
      DecodeRow row;
      row.prompt = EncodePrompt(*tokenizer_, prompts[i]);
      row.sampling = sampling;
      row.stream = i;
      if (choices[i].model != choices[i].weights) row.route_model = choices[i].model;
      out[i].first = choices[i];
      row.on_done = [&out, &failed, i](absl::StatusOr<GenerationResult> r) {
        if (r.ok()) {
          out[i].second = std::move(r).value();
        } else {
          failed = r.status();
        }
      };
      RETURN_IF_ERROR(batch.Add(std::move(row)).status());
    }
    while (!batch.empty()) RETURN_IF_ERROR(batch.Step());
    RETURN_IF_ERROR(failed);
  }
  return out;
}

absl::StatusOr<RouteChoice> Engine::Resolve(const ServedVersion& version, const std::string& route,
                                            const std::string& prompt) const {
  ASSIGN_OR_RETURN(auto choices, ResolveBatch(version, route, {prompt}));
  return choices.front();
}

absl::StatusOr<CompletionScores> Engine::ScoreCompletions(const CausalLM& model, const std::string& prompt,
                                                          const std::vector<std::string>& completions,
                                                          const std::vector<int32_t>* given_ids) const {
  if (completions.empty()) return absl::InvalidArgumentError("completions: at least one is required");
  const std::vector<int32_t> prompt_ids =
      given_ids != nullptr ? *given_ids : EncodePrompt(*tokenizer_, prompt);
  if (prompt_ids.empty()) return absl::InvalidArgumentError("prompt: no tokens to score after");
  std::vector<std::vector<int32_t>> continuations;
  for (size_t i = 0; i < completions.size(); ++i) {
    continuations.push_back(EncodeCompletionAfter(*tokenizer_, prompt, completions[i]));
    if (continuations.back().empty()) {
      return absl::InvalidArgumentError(absl::StrCat("completions[", i, "]: no tokens to score"));
    }
  }
  ASSIGN_OR_RETURN(std::vector<double> ll, ContinuationLogLikelihoods(model, prompt_ids, continuations));
  CompletionScores out;
  out.log_likelihood = std::move(ll);
  for (const auto& c : continuations) out.tokens.push_back(static_cast<int32_t>(c.size()));
  out.best = static_cast<int32_t>(std::max_element(out.log_likelihood.begin(), out.log_likelihood.end()) -
                                  out.log_likelihood.begin());
  return out;
}

std::vector<TaskInfo> Engine::Tasks() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->ledger.Tasks(impl_->current->method->name());
}

absl::StatusOr<TaskInfo> Engine::Task(const std::string& name) const {
  for (auto& t : Tasks()) {
    if (t.name == name) return t;
  }
  return absl::NotFoundError(absl::StrCat("no learned task '", name, "'"));
}

EngineReport Engine::Report() const {
  absl::MutexLock lock(&impl_->mu);
  EngineReport r = impl_->ledger.Report();
  r.weights_version = impl_->current->version;
  r.adaptation_state_bytes = impl_->state_bytes;
  r.method = impl_->current->method->name();
  r.candidates = impl_->candidates;
  if (impl_->current->router) {
    r.router_bytes = impl_->current->router->StateBytes();
    r.router_bytes_per_task = impl_->current->router->StateBytesPerTask();
  }
  return r;
}

absl::StatusOr<TrainingRecipe> Engine::CheckTask(const TaskSpecification& spec) const {
  std::shared_ptr<const ServedVersion> current = Current();
  CommittedState state;
  state.method = current->method->name();
  state.tasks = current->method->num_tasks();
  state.config = current->method->config();
  ASSIGN_OR_RETURN(TrainingRecipe recipe,
                   ResolveTaskRecipe(options_.recipe, spec.method, spec.overrides, state));
  if (TaskIsLearned(spec.name)) {
    return absl::AlreadyExistsError(absl::StrCat("task '", spec.name, "' is already learned"));
  }
  return recipe;
}

}  // namespace strata
