#include "core/state/engine.h"

#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <functional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/adapt/method.h"
#include "core/adapt/peft_import.h"
#include "core/adapt/trainer.h"
#include "core/data/encode.h"
#include "core/data/jsonl.h"
#include "core/eval/metrics.h"
#include "core/eval/scorers.h"
#include "core/model/model.h"
#include "core/model/runtime.h"
#include "core/model/tokenizer.h"
#include "core/state/checkpoint.h"
#include "core/util/file_util.h"
#include "core/util/status_macros.h"

namespace strata {
namespace fs = std::filesystem;

namespace {

// The method configuration of a new (empty) state: the server defaults, with a task's overrides of
// the state-shaping fields (rank, alpha) and of λ.
MethodConfig NewMethodConfig(const TrainDefaults& d, const TrainOverrides& o) {
  MethodConfig mc;
  mc.rank = o.rank.value_or(d.rank);
  mc.p = mc.rank;
  mc.alpha = o.alpha.value_or(d.alpha);
  mc.ella_lambda = o.ella_lambda.value_or(d.ella_lambda);
  mc.k_max = d.k_max;
  mc.phi = d.phi;
  mc.share_training = d.share_training;
  mc.seed = static_cast<uint64_t>(d.seed);
  mc.target_modules = absl::StrSplit(d.targets, ',', absl::SkipEmpty());
  mc.osft_urr = d.osft_urr;
  mc.osft_rank = d.osft_rank;
  mc.pm_epsilon = d.pm_epsilon;
  return mc;
}

double Nan() { return std::nan(""); }

// What the router sees of an example: its prompt (a text example: the text itself).
std::string RouterPrompt(const Example& e) { return e.kind == ExampleKind::kText ? e.text : e.prompt; }

// At most this many training prompts feed a task's router statistics (an evenly spaced subset).
constexpr size_t kRouterMaxPrompts = 2000;

std::string AutoScorer(const std::vector<Example>& examples) {
  if (examples.empty()) return "exact_match";
  switch (examples.front().kind) {
    case ExampleKind::kChoice: return "choice";
    case ExampleKind::kText: return "nll";
    case ExampleKind::kCompletion: return "exact_match";
  }
  return "exact_match";
}

}  // namespace

struct Engine::Impl {
  std::unique_ptr<CausalLM> base;  // W0, never modified
  std::shared_ptr<const Tokenizer> tokenizer;
  EngineOptions options;
  std::vector<std::string> reference_texts;  // the first reference_max_texts of the reference text

  // The live method state: mutated only under train_mu (RunJob, ImportAdapters). Lock order:
  // train_mu before mu.
  absl::Mutex train_mu;
  std::unique_ptr<Method> method;

  mutable absl::Mutex mu;
  std::shared_ptr<const ServedVersion> current ABSL_GUARDED_BY(mu);
  std::vector<CheckpointTask> tasks ABSL_GUARDED_BY(mu);
  std::map<std::string, std::vector<Example>> eval_sets ABSL_GUARDED_BY(mu);
  std::vector<std::vector<double>> matrix ABSL_GUARDED_BY(mu);  // [stage-1][task]
  std::vector<double> base_scores ABSL_GUARDED_BY(mu);
  std::vector<double> reference_nll ABSL_GUARDED_BY(mu);  // [stage]
  std::vector<int64_t> stage_versions ABSL_GUARDED_BY(mu);  // weights version of each stage
  // The other evaluation views (see EngineReport).
  std::vector<std::vector<double>> routed_matrix ABSL_GUARDED_BY(mu);
  std::vector<std::vector<double>> auto_matrix ABSL_GUARDED_BY(mu);
  std::vector<std::vector<double>> router_accuracy ABSL_GUARDED_BY(mu);
  std::vector<double> reference_nll_auto ABSL_GUARDED_BY(mu);
  // The live router (mutated only under train_mu, like `method`); versions hold frozen copies.
  TaskRouter router;
  int64_t state_bytes ABSL_GUARDED_BY(mu) = 0;
  // Task-routed models by task, with the weights version they were built from.
  std::map<std::string, std::pair<int64_t, std::shared_ptr<const CausalLM>>> routed_cache ABSL_GUARDED_BY(mu);

  // Task score in [0, 1] for choice / exact_match; for nll the NEGATIVE mean NLL (nats/token), so
  // that higher is better for every scorer and BWT/forgetting keep their meaning. NaN on failure.
  double Score(const CausalLM& model, const std::vector<Example>& examples, const std::string& scorer) const {
    if (examples.empty()) return Nan();
    const int64_t max_len = options.defaults.max_seq_len;
    if (scorer == "choice") {
      ScorerOptions so;
      so.max_seq_len = max_len;
      auto r = ScoreChoice(model, *tokenizer, examples, so);
      if (r.ok()) return r->accuracy;
      spdlog::warn("choice scoring failed: {}", r.status().ToString());
      return Nan();
    }
    if (scorer == "nll") {
      std::vector<std::string> texts;
      for (const auto& e : examples) texts.push_back(e.kind == ExampleKind::kText ? e.text : e.prompt + e.completion);
      NllOptions no;
      no.max_seq_len = max_len;
      auto r = ScoreNll(model, *tokenizer, texts, no);
      if (r.ok()) return -r->mean_nll;
      spdlog::warn("nll scoring failed: {}", r.status().ToString());
      return Nan();
    }
    auto r = ScoreExactMatch(model, *tokenizer, examples, ExactMatchOptions{});
    if (r.ok()) return r->accuracy;
    spdlog::warn("exact-match scoring failed: {}", r.status().ToString());
    return Nan();
  }

  double RefNll(const CausalLM& model) const {
    if (reference_texts.empty()) return Nan();
    NllOptions no;
    no.max_seq_len = options.defaults.max_seq_len;
    auto r = ScoreNll(model, *tokenizer, reference_texts, no);
    if (!r.ok()) {
      spdlog::warn("reference NLL failed: {}", r.status().ToString());
      return Nan();
    }
    return r->mean_nll;
  }

  // The models a router decision selects from (RouteModels in router.h) for method state `m`: a
  // prompt that fits no task gets the base model or, with --unmatched_route=merged, `merged`.
  absl::StatusOr<std::vector<std::shared_ptr<const CausalLM>>> BuildRouteModels(
      const Method& m, const TaskRouter& r, std::shared_ptr<const CausalLM> merged) const {
    std::shared_ptr<const CausalLM> unmatched =
        options.unmatched_route == "merged" ? merged : std::shared_ptr<const CausalLM>(base->ShallowCopy());
    return RouteModels(*base, m, r, std::move(unmatched), std::move(merged));
  }

  static std::vector<size_t> Slots(const std::vector<RouteDecision>& decisions) {
    std::vector<size_t> out;
    for (const auto& d : decisions) out.push_back(RouteSlot(d));
    return out;
  }

  // Score of `examples` when example i is served by models[choice[i]]: each group of examples on
  // one model is scored in batches, and the scores are combined weighted by examples (exact for
  // accuracy scorers; for nll, the per-group means weighted by examples). NaN on failure.
  double ScoreGrouped(const std::vector<std::shared_ptr<const CausalLM>>& models, const std::vector<size_t>& choice,
                      const std::vector<Example>& examples, const std::string& scorer) const {
    if (examples.empty()) return Nan();
    std::map<size_t, std::vector<Example>> groups;
    for (size_t i = 0; i < examples.size(); ++i) groups[choice[i]].push_back(examples[i]);
    double total = 0;
    for (const auto& [index, group] : groups) {
      const double score = Score(*models[index], group, scorer);
      if (std::isnan(score)) return Nan();
      total += score * static_cast<double>(group.size());
    }
    return total / static_cast<double>(examples.size());
  }

  // Reference NLL with each text served where the router sends it (token-weighted). NaN when
  // there is no reference text or on failure.
  double RefNllGrouped(const std::vector<std::shared_ptr<const CausalLM>>& models, const TaskRouter& r) const {
    if (reference_texts.empty()) return Nan();
    auto features = r.Features(*base, *tokenizer, reference_texts);
    if (!features.ok()) {
      spdlog::warn("reference NLL (auto): {}", features.status().ToString());
      return Nan();
    }
    NllOptions no;
    no.max_seq_len = options.defaults.max_seq_len;
    auto nll = MeanNllOnModels(models, Slots(r.Route(*features)), *tokenizer, reference_texts, no);
    if (!nll.ok()) {
      spdlog::warn("reference NLL (auto) failed: {}", nll.status().ToString());
      return Nan();
    }
    return *nll;
  }

  // Restores the method's committed state after a failure past the merge; returns `st`.
  absl::Status Rollback(const MethodState& previous, absl::Status st) {
    if (auto r = method->ImportState(previous); !r.ok()) {
      spdlog::critical("cannot roll back the adaptation state: {}", r.ToString());
    }
    return st;
  }

  // Checkpoints `snapshot`, then publishes `model` as version snapshot.weights_version with a frozen
  // copy of `state` (a restart reports exactly what was published). `commit` runs under mu right
  // before the pointer swap, to install the report data that goes with the version.
  absl::StatusOr<std::shared_ptr<const ServedVersion>> CheckpointAndPublish(
      const CheckpointData& snapshot, const MethodState& state, std::shared_ptr<const CausalLM> model,
      int64_t tasks_learned, const TaskRouter& new_router, const std::function<void()>& commit) {
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
    if (commit) commit();
    state_bytes = bytes;
    routed_cache.clear();
    current = version;  // the atomic swap: new requests see the new version
    return std::shared_ptr<const ServedVersion>(version);
  }

  CheckpointData Snapshot(const MethodState& state, const TaskRouter& r, int64_t version) const
      ABSL_SHARED_LOCKS_REQUIRED(mu) {
    CheckpointData d;
    d.base_model_id = options.base_model_id;
    d.method = state.method;
    d.method_config_json = state.config_json;
    d.method_tensors = state.tensors;
    d.weights_version = version;
    d.tasks = tasks;
    d.matrix = matrix;
    d.base = base_scores;
    d.reference_nll = reference_nll;
    d.stage_versions = stage_versions;
    d.routed_matrix = routed_matrix;
    d.auto_matrix = auto_matrix;
    d.router_accuracy = router_accuracy;
    d.reference_nll_auto = reference_nll_auto;
    r.ExportState("", &d.router_tensors, &d.router_json);
    return d;
  }
};

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Engine::~Engine() = default;

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(std::unique_ptr<CausalLM> base,
                                                       std::shared_ptr<const Tokenizer> tokenizer,
                                                       ModelSummary summary, EngineOptions options) {
  auto impl = std::make_unique<Impl>();
  impl->base = std::move(base);
  impl->tokenizer = tokenizer;
  impl->options = options;
  RETURN_IF_ERROR(MakeDirs(options.state_dir + "/tasks"));
  if (!options.reference_text_path.empty()) {
    ASSIGN_OR_RETURN(std::string text, ReadFile(options.reference_text_path));
    impl->reference_texts = SplitOnBlankLines(text);
    if (static_cast<int64_t>(impl->reference_texts.size()) > options.reference_max_texts) {
      impl->reference_texts.resize(options.reference_max_texts);
    }
    if (impl->reference_texts.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(options.reference_text_path, ": no text"));
    }
  }

  ASSIGN_OR_RETURN(auto checkpoint, LoadCheckpoint(options.state_dir));
  int64_t version = 1;
  if (checkpoint.has_value()) {
    if (checkpoint->base_model_id != options.base_model_id) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the checkpoint in ", options.state_dir, "/checkpoint was made on base model '",
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
    impl->method = std::move(*method);
    version = checkpoint->weights_version;
    absl::MutexLock lock(&impl->mu);
    impl->tasks = checkpoint->tasks;
    impl->matrix = checkpoint->matrix;
    impl->base_scores = checkpoint->base;
    impl->reference_nll = checkpoint->reference_nll;
    impl->stage_versions = checkpoint->stage_versions;
    impl->routed_matrix = checkpoint->routed_matrix;
    impl->auto_matrix = checkpoint->auto_matrix;
    impl->router_accuracy = checkpoint->router_accuracy;
    impl->reference_nll_auto = checkpoint->reference_nll_auto;
    auto router = TaskRouter::ImportState(checkpoint->router_json, "", checkpoint->router_tensors);
    if (!router.ok()) {
      return absl::DataLossError(absl::StrCat("cannot restore the task router from ", options.state_dir,
                                              "/checkpoint: ", router.status().message()));
    }
    impl->router = router->empty() ? TaskRouter(options.router) : std::move(*router);
    for (const auto& t : impl->tasks) {
      ValidationOptions vo;
      auto parsed = ParseJsonlFile(options.state_dir + "/" + t.eval_file, vo);
      if (!parsed.ok()) return absl::DataLossError(parsed.status().message());
      impl->eval_sets[t.name] = std::move(parsed->examples);
    }
    impl->state_bytes = CheckpointBytes(options.state_dir);
    spdlog::info("restored checkpoint: method {}, {} tasks, weights version {}", checkpoint->method,
                 impl->tasks.size(), version);
  } else {
    RETURN_IF_ERROR(options.router.Validate());
    impl->router = TaskRouter(options.router);
    ASSIGN_OR_RETURN(impl->method, CreateMethod(options.defaults.method, NewMethodConfig(options.defaults, {})));
    spdlog::info("new adaptation state: method {}", options.defaults.method);
  }

  auto served = impl->base->ShallowCopy();
  RETURN_IF_ERROR(impl->method->ApplyServedWeights(served.get()));
  if (impl->reference_nll.empty() && !impl->reference_texts.empty()) {
    SetTorchThreads(options.training_threads);
    c10::InferenceMode guard;
    impl->reference_nll.push_back(impl->RefNll(*impl->base));
  }
  if (impl->reference_nll_auto.empty() && !impl->reference_nll.empty()) {
    // Stage 0 of the auto view is the base model too.
    impl->reference_nll_auto.push_back(impl->reference_nll.front());
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
  {
    absl::MutexLock lock(&impl->mu);
    version_ptr->tasks_learned = static_cast<int64_t>(impl->tasks.size());
    impl->current = version_ptr;
  }
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
  for (const auto& t : impl_->tasks) {
    if (t.name == task_name) return true;
  }
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
    c.model = route == "merged" ? version.model : std::shared_ptr<const CausalLM>(impl_->base->ShallowCopy());
    std::fill(out.begin(), out.end(), c);
    return out;
  }
  if (!route.empty() && route != "auto") {
    ASSIGN_OR_RETURN(auto model, Routed(version, route));
    RouteChoice c;
    c.route = route;
    c.model = model;
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
      c.route = decisions[i].task;
    } else if (!decisions[i].task.empty()) {
      c.model = version.model;  // the method keeps no per-task weights: the merged ones hold the task
      c.route = "merged";
    } else if (unmatched == "merged") {
      c.model = version.model;
      c.route = "merged";
    } else {
      c.model = std::shared_ptr<const CausalLM>(impl_->base->ShallowCopy());
      c.route = "base";
    }
  }
  return out;
}

absl::StatusOr<std::vector<std::pair<RouteChoice, GenerationResult>>> Engine::GenerateRouted(
    const ServedVersion& version, const std::string& route, const std::vector<std::string>& prompts,
    const SamplingOptions& sampling) const {
  ASSIGN_OR_RETURN(std::vector<RouteChoice> choices, ResolveBatch(version, route, prompts));
  std::map<std::string, std::vector<size_t>> rows;  // by route
  for (size_t i = 0; i < prompts.size(); ++i) rows[choices[i].route].push_back(i);
  std::vector<std::pair<RouteChoice, GenerationResult>> out(prompts.size());
  for (const auto& [name, idx] : rows) {
    std::vector<std::vector<int32_t>> encoded;
    for (size_t i : idx) encoded.push_back(EncodePrompt(*tokenizer_, prompts[i]));
    ASSIGN_OR_RETURN(auto results, Generate(*choices[idx.front()].model, *tokenizer_, encoded, sampling));
    for (size_t k = 0; k < idx.size(); ++k) out[idx[k]] = {choices[idx[k]], std::move(results[k])};
  }
  return out;
}

absl::StatusOr<RouteChoice> Engine::Resolve(const ServedVersion& version, const std::string& route,
                                            const std::string& prompt) const {
  ASSIGN_OR_RETURN(auto choices, ResolveBatch(version, route, {prompt}));
  return choices.front();
}

absl::StatusOr<CompletionScores> Engine::ScoreCompletions(const CausalLM& model, const std::string& prompt,
                                                          const std::vector<std::string>& completions) const {
  if (completions.empty()) return absl::InvalidArgumentError("completions: at least one is required");
  Example ex = MakeChoiceExample(prompt, completions[0], completions);
  ScorerOptions so;
  so.max_seq_len = impl_->options.defaults.max_seq_len;
  ASSIGN_OR_RETURN(ChoiceScore cs, ScoreChoice(model, *tokenizer_, {ex}, so));
  CompletionScores out;
  out.log_likelihood = cs.log_likelihoods.at(0);
  for (const auto& c : completions) {
    out.tokens.push_back(static_cast<int32_t>(EncodePromptCompletion(*tokenizer_, prompt, c).completion.size()));
  }
  out.best = static_cast<int32_t>(std::max_element(out.log_likelihood.begin(), out.log_likelihood.end()) -
                                  out.log_likelihood.begin());
  return out;
}

std::vector<TaskInfo> Engine::Tasks() const {
  absl::MutexLock lock(&impl_->mu);
  std::vector<TaskInfo> out;
  const auto& m = impl_->matrix;
  const int T = static_cast<int>(impl_->tasks.size());
  std::vector<std::optional<double>> forgetting;
  if (!m.empty()) {
    auto cl = ComputeClReport(m, impl_->base_scores);
    if (cl.ok()) forgetting = cl->task_forgetting;
  }
  for (int j = 0; j < T; ++j) {
    const auto& t = impl_->tasks[j];
    TaskInfo info;
    info.name = t.name;
    info.index = j + 1;
    info.scorer = t.scorer;
    info.method = impl_->current->method->name();
    info.job_id = t.job_id;
    info.description = t.description;
    info.eval_examples = t.eval_examples;
    info.base_score = j < static_cast<int>(impl_->base_scores.size()) ? impl_->base_scores[j] : Nan();
    info.history.push_back({0, "", info.base_score, 0});
    for (int i = 0; i < static_cast<int>(m.size()); ++i) {
      if (j >= static_cast<int>(m[i].size()) || std::isnan(m[i][j])) continue;
      info.history.push_back({i + 1, impl_->tasks[i].name, m[i][j],
                              i < static_cast<int>(impl_->stage_versions.size()) ? impl_->stage_versions[i] : 0});
      if (i == j) info.learned_score = m[i][j];
    }
    info.current_score = m.empty() || j >= static_cast<int>(m.back().size()) ? Nan() : m.back()[j];
    auto latest = [&](const std::vector<std::vector<double>>& view) {
      return view.empty() || j >= static_cast<int>(view.back().size()) ? Nan() : view.back()[j];
    };
    info.current_routed_score = latest(impl_->routed_matrix);
    info.current_auto_score = latest(impl_->auto_matrix);
    info.router_accuracy = latest(impl_->router_accuracy);
    // F_j as ALGORITHMS.md section 7 defines it (metrics.h); 0 for the newest task.
    info.forgetting = j < static_cast<int>(forgetting.size()) && forgetting[j].has_value() ? *forgetting[j] : 0.0;
    out.push_back(std::move(info));
  }
  return out;
}

absl::StatusOr<TaskInfo> Engine::Task(const std::string& name) const {
  for (auto& t : Tasks()) {
    if (t.name == name) return t;
  }
  return absl::NotFoundError(absl::StrCat("no learned task '", name, "'"));
}

EngineReport Engine::Report() const {
  EngineReport r;
  {
    absl::MutexLock lock(&impl_->mu);
    for (const auto& t : impl_->tasks) r.tasks.push_back(t.name);
    r.matrix = impl_->matrix;
    r.base = impl_->base_scores;
    r.reference_nll = impl_->reference_nll;
    r.weights_version = impl_->current->version;
    r.adaptation_state_bytes = impl_->state_bytes;
    r.method = impl_->current->method->name();
    r.routed_matrix = impl_->routed_matrix;
    r.auto_matrix = impl_->auto_matrix;
    r.router_accuracy = impl_->router_accuracy;
    r.reference_nll_auto = impl_->reference_nll_auto;
    if (impl_->current->router) {
      r.router_bytes = impl_->current->router->StateBytes();
      r.router_bytes_per_task = impl_->current->router->StateBytesPerTask();
    }
  }
  // The auto view's summary once every stage of it was measured.
  const bool auto_complete = !r.auto_matrix.empty() && r.auto_matrix.size() == r.matrix.size() &&
                             std::all_of(r.auto_matrix.begin(), r.auto_matrix.end(),
                                         [](const std::vector<double>& row) { return !row.empty(); });
  if (auto_complete) {
    auto cl = ComputeClReport(r.auto_matrix, r.base);
    if (cl.ok()) {
      r.auto_average_score = cl->aa;
      r.auto_backward_transfer = cl->bwt;
      r.auto_forgetting = cl->forgetting;
    }
  }
  if (!r.matrix.empty()) {
    auto cl = ComputeClReport(r.matrix, r.base);
    if (cl.ok()) {
      r.average_score = cl->aa;
      r.backward_transfer = cl->bwt;
      r.forward_transfer = cl->fwt;
      r.forgetting = cl->forgetting;
    }
  }
  return r;
}

absl::StatusOr<JobOutcome> Engine::RunJob(const JobRecord& job, std::vector<Example> train,
                                          std::vector<Example> eval, const JobContext& ctx) {
  Impl& s = *impl_;
  absl::MutexLock train_lock(&s.train_mu);
  const TrainDefaults& d = s.options.defaults;
  const auto& o = job.spec.overrides;
  SetTorchThreads(s.options.training_threads);
  if (!job.spec.method.empty() && job.spec.method != s.method->name()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "task '", job.spec.name, "' asks for method ", job.spec.method, ", but this server's adaptation state uses ",
        s.method->name(), " (one method per state directory; start another server with --method=",
        job.spec.method, " and its own --state_dir)"));
  }
  // rank and alpha shape the state: a task's overrides may set them only while the state is empty
  // (the method is then rebuilt from the server defaults plus the overrides). The per-task
  // hyper-parameters (ELLA λ, P&M ε) come from the overrides or the server defaults every task.
  if (s.method->num_tasks() == 0) {
    ASSIGN_OR_RETURN(s.method, CreateMethod(s.method->name(), NewMethodConfig(d, o)));
  } else {
    if (o.rank.has_value() && *o.rank != s.method->config().rank) {
      return absl::FailedPreconditionError(absl::StrCat("overrides.rank: the rank is fixed once the first task is learned (",
                                                        s.method->config().rank, ")"));
    }
    if (o.alpha.has_value() && *o.alpha != s.method->config().alpha) {
      return absl::FailedPreconditionError(absl::StrCat(
          "overrides.alpha: alpha is fixed once the first task is learned (", s.method->config().alpha, ")"));
    }
  }
  if (auto st = s.method->SetTaskHyperparameters(o.ella_lambda.value_or(d.ella_lambda), d.pm_epsilon); !st.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("overrides: ", st.message()));
  }
  if (TaskIsLearned(job.spec.name)) {
    return absl::AlreadyExistsError(absl::StrCat("task '", job.spec.name, "' is already learned"));
  }
  const std::string scorer = job.spec.scorer.empty() ? AutoScorer(eval) : job.spec.scorer;
  std::shared_ptr<const ServedVersion> before = Current();

  // Scores before training: the base model (b_t) and the current weights (a[t-1][t], for FWT).
  double base_score, pre_score;
  {
    c10::InferenceMode guard;
    base_score = s.Score(*s.base, eval, scorer);
    pre_score = before->tasks_learned == 0 ? base_score : s.Score(*before->model, eval, scorer);
  }
  spdlog::info("task '{}': {} train / {} eval examples, scorer {}, base score {:.4f}, before training {:.4f}",
               job.spec.name, train.size(), eval.size(), scorer, base_score, pre_score);

  TrainOptions to;
  to.learning_rate = o.learning_rate.value_or(d.learning_rate);
  to.max_steps = o.max_steps.value_or(d.max_steps);
  to.epochs = o.epochs.value_or(d.epochs);
  to.batch_size = o.batch_size.value_or(d.batch_size);
  to.seed = static_cast<uint64_t>(o.seed.value_or(d.seed));
  to.cancel = ctx.cancel;
  to.pad_id = s.tokenizer->pad_id().value_or(0);
  to.warmup_ratio = kDefaultWarmupRatio;
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
  eo.max_seq_len = o.max_seq_len.value_or(d.max_seq_len);
  std::vector<TrainTask> data;
  data.push_back(MakeTrainTask(job.spec.name, *s.tokenizer, train, eo));
  train.clear();
  train.shrink_to_fit();

  // The committed state before this task: restored if anything after the merge fails.
  ASSIGN_OR_RETURN(MethodState previous_state, s.method->ExportState());
  Trainer trainer(to);
  auto result = trainer.Train(*before->model, *s.method, job.spec.name, data);
  if (!result.ok()) return result.status();
  spdlog::info("task '{}': {} steps in {:.1f} s, loss {:.4f} -> {:.4f}, merge {:.2f} s", job.spec.name,
               result->steps, result->seconds, result->first_loss, result->final_loss, result->merge_seconds);
  auto rollback = [&](absl::Status st) { return s.Rollback(previous_state, std::move(st)); };
  if (ctx.set_state) ctx.set_state(JobState::kEvaluating);

  // Keep the eval split (the only data kept after the task) before the checkpoint names it.
  const std::string eval_rel = absl::StrCat("tasks/", job.spec.name, "/eval.jsonl");
  {
    std::string text;
    for (const auto& e : eval) text += ExampleToJsonLine(e) + "\n";
    if (auto st = MakeDirs(s.options.state_dir + "/tasks/" + job.spec.name); !st.ok()) return rollback(st);
    if (auto st = WriteFileAtomic(s.options.state_dir + "/" + eval_rel, text); !st.ok()) return rollback(st);
  }

  // Evaluate every known task on the new weights.
  std::shared_ptr<const CausalLM> new_model(std::move(result->model));
  std::vector<CheckpointTask> tasks;
  std::map<std::string, std::vector<Example>> eval_sets;
  {
    absl::MutexLock lock(&s.mu);
    tasks = s.tasks;
    eval_sets = s.eval_sets;
  }
  CheckpointTask new_task{job.spec.name, scorer, job.id, job.spec.description, eval_rel,
                          static_cast<int64_t>(eval.size())};
  tasks.push_back(new_task);
  eval_sets[job.spec.name] = eval;
  std::vector<double> row;
  JobOutcome outcome;
  double ref_nll;
  {
    c10::InferenceMode guard;
    for (const auto& t : tasks) {
      if (ctx.cancel && ctx.cancel->load()) return rollback(absl::CancelledError("cancelled during evaluation"));
      double score = s.Score(*new_model, eval_sets[t.name], t.scorer);
      row.push_back(score);
      outcome.eval_results.emplace_back(t.name, score);
    }
    ref_nll = s.RefNll(*new_model);
  }
  outcome.reference_nll = ref_nll;

  // The router with this task, and the other views: each task served by its name (methods with
  // per-task weights), each example routed automatically, router accuracy, reference NLL (auto).
  TaskRouter new_router = s.router;
  if (router_features.defined()) {
    if (auto st = new_router.AddTask(job.spec.name, router_features, router_layer); !st.ok()) {
      spdlog::warn("task '{}' is not routed automatically: {}", job.spec.name, st.ToString());
    }
  }
  std::vector<double> routed_row(tasks.size(), Nan()), auto_row(tasks.size(), Nan()),
      accuracy_row(tasks.size(), Nan());
  double ref_nll_auto = Nan();
  {
    c10::InferenceMode guard;
    auto rm = s.BuildRouteModels(*s.method, new_router, new_model);
    if (!rm.ok()) return rollback(rm.status());
    const std::vector<std::string> routes = new_router.TaskNames();
    for (size_t j = 0; j < tasks.size(); ++j) {
      if (ctx.cancel && ctx.cancel->load()) return rollback(absl::CancelledError("cancelled during evaluation"));
      const auto& eval_j = eval_sets[tasks[j].name];
      const auto it = std::find(routes.begin(), routes.end(), tasks[j].name);
      if (s.method->SupportsTaskRouting() && it != routes.end()) {
        routed_row[j] = s.Score(*(*rm)[1 + (it - routes.begin())], eval_j, tasks[j].scorer);
      }
      if (new_router.empty() || eval_j.empty()) continue;
      std::vector<std::string> prompts;
      for (const auto& e : eval_j) prompts.push_back(RouterPrompt(e));
      auto features = new_router.Features(*s.base, *s.tokenizer, prompts);
      if (!features.ok()) return rollback(features.status());
      const std::vector<RouteDecision> decisions = new_router.Route(*features);
      int64_t right = 0;
      for (const auto& dec : decisions) right += dec.task == tasks[j].name;
      accuracy_row[j] = static_cast<double>(right) / static_cast<double>(decisions.size());
      auto_row[j] = s.ScoreGrouped(*rm, Impl::Slots(decisions), eval_j, tasks[j].scorer);
    }
    ref_nll_auto = new_router.empty() ? ref_nll : s.RefNllGrouped(*rm, new_router);
  }

  // Checkpoint, then publish (a restart reports exactly what was published).
  auto new_state = s.method->ExportState();
  if (!new_state.ok()) return rollback(new_state.status());
  CheckpointData snapshot;
  {
    absl::MutexLock lock(&s.mu);
    snapshot = s.Snapshot(*new_state, new_router, before->version + 1);
  }
  // The views: one row per stage, each as wide as the task list (NaN = not measured).
  auto add_view_row = [&](std::vector<std::vector<double>>* view, const std::vector<double>& row_in) {
    view->resize(tasks.size() - 1);
    for (auto& r : *view) r.resize(tasks.size(), Nan());
    view->push_back(row_in);
  };
  add_view_row(&snapshot.routed_matrix, routed_row);
  add_view_row(&snapshot.auto_matrix, auto_row);
  add_view_row(&snapshot.router_accuracy, accuracy_row);
  snapshot.reference_nll_auto.resize(tasks.size(), Nan());  // [0] = base, then one per earlier stage
  if (!snapshot.reference_nll.empty() && std::isnan(snapshot.reference_nll_auto[0])) {
    snapshot.reference_nll_auto[0] = snapshot.reference_nll[0];
  }
  snapshot.reference_nll_auto.push_back(ref_nll_auto);
  // a[t-1][t] goes into the previous row (FWT); the new row holds every task after stage t.
  if (!snapshot.matrix.empty()) snapshot.matrix.back().push_back(pre_score);
  for (auto& r : snapshot.matrix) r.resize(tasks.size(), Nan());
  snapshot.matrix.push_back(row);
  snapshot.base.push_back(base_score);
  snapshot.tasks = tasks;
  if (snapshot.reference_nll.empty()) snapshot.reference_nll.push_back(Nan());
  snapshot.reference_nll.push_back(ref_nll);
  snapshot.stage_versions.resize(tasks.size() - 1, 0);
  snapshot.stage_versions.push_back(before->version + 1);
  auto version = s.CheckpointAndPublish(snapshot, *new_state, new_model, static_cast<int64_t>(tasks.size()),
                                        new_router, [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
                                          s.tasks = tasks;
                                          s.eval_sets = std::move(eval_sets);
                                          s.matrix = snapshot.matrix;
                                          s.base_scores = snapshot.base;
                                          s.reference_nll = snapshot.reference_nll;
                                          s.stage_versions = snapshot.stage_versions;
                                          s.routed_matrix = snapshot.routed_matrix;
                                          s.auto_matrix = snapshot.auto_matrix;
                                          s.router_accuracy = snapshot.router_accuracy;
                                          s.reference_nll_auto = snapshot.reference_nll_auto;
                                        });
  if (!version.ok()) return rollback(version.status());
  s.router = std::move(new_router);
  outcome.weights_version = (*version)->version;
  spdlog::info("task '{}' learned: weights version {}, scores [{}], auto-routed [{}], router accuracy [{}]",
               job.spec.name, (*version)->version, absl::StrJoin(row, ", "), absl::StrJoin(auto_row, ", "),
               absl::StrJoin(accuracy_row, ", "));
  if (on_publish_) on_publish_();
  return outcome;
}

absl::Status Engine::ExportWeights(const std::string& dir) const {
  auto current = Current();
  RETURN_IF_ERROR(current->model->SaveHf(dir));
  if (!impl_->options.base_model_id.empty() && impl_->options.base_model_id != "embedded-default") {
    for (const char* f : {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}) {
      std::string src = impl_->options.base_model_id + "/" + f;
      if (!PathExists(src)) continue;
      ASSIGN_OR_RETURN(std::string text, ReadFile(src));
      RETURN_IF_ERROR(WriteFileAtomic(dir + "/" + f, text));
    }
  }
  return absl::OkStatus();
}

absl::Status Engine::ExportState(const std::string& dir) const {
  RETURN_IF_ERROR(MakeDirs(dir));
  std::error_code ec;
  const std::string src = impl_->options.state_dir + "/checkpoint";
  if (!PathExists(src)) return absl::FailedPreconditionError("no task learned yet: there is no state to export");
  for (const auto& e : fs::directory_iterator(src, ec)) {
    ASSIGN_OR_RETURN(std::string text, ReadFile(e.path().string()));
    RETURN_IF_ERROR(WriteFileAtomic(dir + "/" + e.path().filename().string(), text));
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> Engine::ImportAdapters(const std::vector<std::string>& dirs) {
  Impl& s = *impl_;
  absl::MutexLock train_lock(&s.train_mu);
  if (dirs.empty()) return absl::InvalidArgumentError("dirs: at least one adapter directory is required");
  SetTorchThreads(s.options.training_threads);
  ASSIGN_OR_RETURN(MethodState previous_state, s.method->ExportState());
  auto rollback = [&](absl::Status st) { return s.Rollback(previous_state, std::move(st)); };
  std::vector<std::string> names;
  for (const auto& dir : dirs) {
    std::string task = fs::path(AbsolutePath(dir)).filename().string();
    if (TaskIsLearned(task)) return rollback(absl::AlreadyExistsError(absl::StrCat("task '", task, "' already exists")));
    auto adapter = ReadPeftLoraAdapter(dir);
    if (!adapter.ok()) return rollback(adapter.status());
    if (auto st = s.method->ImportPeftAdapter(task, *adapter, *s.base); !st.ok()) return rollback(st);
    names.push_back(task);
  }
  auto served = s.base->ShallowCopy();
  if (auto st = s.method->ApplyServedWeights(served.get()); !st.ok()) return rollback(st);
  auto new_state = s.method->ExportState();
  if (!new_state.ok()) return rollback(new_state.status());
  std::shared_ptr<const ServedVersion> before = Current();
  CheckpointData snapshot;
  {
    absl::MutexLock lock(&s.mu);
    snapshot = s.Snapshot(*new_state, s.router, before->version + 1);
  }
  // Imported adapters come without data: they get no router statistics (served by name only).
  auto version = s.CheckpointAndPublish(snapshot, *new_state, std::shared_ptr<const CausalLM>(std::move(served)),
                                        before->tasks_learned, s.router, nullptr);
  if (!version.ok()) return rollback(version.status());
  spdlog::info("imported {} adapter(s) [{}] into the {} state: weights version {}", names.size(),
               absl::StrJoin(names, ", "), s.method->name(), (*version)->version);
  if (on_publish_) on_publish_();
  return (*version)->version;
}

}  // namespace strata
