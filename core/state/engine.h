#pragma once
// The adaptation engine: owns the base model, the method's adaptation state (Share subspace, ELLA
// aggregate, ...), the learned tasks with their eval splits and score history, and the served
// weights versions. It is the TaskRunner the single training worker drives.
//
// Served weights are immutable versions behind a refcounted handle (std::shared_ptr<const
// ServedVersion>): Current() hands out the latest; publishing a new version is an atomic pointer
// swap, and a request holding version N keeps it alive until it finishes.
//
// Durable state lives in <state_dir>/checkpoint (written to a temp dir, fsynced, renamed; a
// manifest lists every file with its SHA-256, verified on load) and <state_dir>/tasks/<name>/
// eval.jsonl (the only data kept after a task is learned: no replay).
//
// Files: engine.cc (served versions and routing), engine_train.cc (a task's training run and its
// evaluation), engine_transfer.cc (export and adapter import); the results ledger is
// core/state/ledger.h and the scoring core/state/evaluator.h.
//
// Thread safety: Current(), tokenizer(), Tasks(), Report(), Routed(), CheckTask(), Versions() and
// the exports are safe from any thread and never wait for training; Promote() and Rollback() refuse
// (FAILED_PRECONDITION) instead of waiting while a job trains. RunJob() (tasks and adapter imports alike)
// is called by the worker thread only and holds the training lock for the whole job; the lock
// order is in engine_impl.h.

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/adapt/recipe.h"
#include "core/adapt/router.h"
#include "core/jobs/worker.h"
#include "core/model/generate.h"
#include "core/model/model_summary.h"
#include "core/state/gate.h"
#include "core/state/ledger.h"
#include "core/state/versions.h"

namespace strata {

class CausalLM;
class Tokenizer;
class Method;
class DataParallelGroup;
struct DataParallelTask;
class GradientSync;

struct EngineOptions {
  std::string state_dir;
  // The server's training recipe (flags): a new state's method and options, and every task's
  // defaults (a task's overrides apply on top: ResolveTaskRecipe).
  TrainingRecipe recipe;
  // Reference text for general-ability retention (NLL before/after each task); empty = none.
  std::string reference_text_path;
  // Texts (separated by blank lines) of the reference used for the NLL, from the start.
  int64_t reference_max_texts = 64;
  // Intra-op threads for the training worker and for each inference request.
  int training_threads = 1;
  int serving_threads = 1;
  // Row shards per training step (TrainOptions::shards; 0 = automatic).
  int training_shards = 0;
  // Identifies the base model in the checkpoint (a checkpoint made on another base is refused).
  std::string base_model_id;
  // Automatic task routing (a new state directory; a checkpoint keeps its own router's settings).
  RouterOptions router;
  // What a request routed "auto" gets when its prompt fits no learned task: "base" (W0, general
  // ability intact) or "merged" (the served merged weights).
  std::string unmatched_route = "base";
  // The publish gate (core/state/gate.h; every check off by default here; the server's flags
  // default to --max_forgetting=0.02).
  GateOptions gate;
  // Published versions whose states are kept for rollback (the served one included; >= 1), plus at
  // most one candidate.
  int keep_versions = 3;
  // A read-only replica (strata-server --role=replica): its state is a copy of a trainer's served
  // version (AdoptState) without the eval splits (the ledger keeps task metadata and scores only);
  // it keeps no versions (Versions() is empty) and never trains (RunJob, Promote and Rollback
  // answer FAILED_PRECONDITION).
  bool replica = false;
  // Data-parallel adaptation (core/adapt/data_parallel.h). On rank 0 (a trainer) every task's
  // training is announced to the other ranks and runs over the members that join; on another rank
  // (a replica) FollowDataParallel joins them. nullptr: no data parallelism.
  std::shared_ptr<DataParallelGroup> data_parallel;
};

// A published, kept version's state files: what a replica downloads to serve it.
struct PublishedState {
  int64_t version = 0;
  std::string base_model_id;
  std::string method;
  std::vector<std::string> tasks;
  double created = 0;  // Unix seconds
  // The directory holding the files (the kept version's; its files are never modified in place).
  std::string dir;
  // The checkpoint files without the eval splits, with their sizes and SHA-256 (the manifest's).
  std::vector<CheckpointFile> files;
};

// What a promote or a rollback changed.
struct VersionChange {
  int64_t from_version = 0;
  int64_t to_version = 0;
  // Tasks the served state no longer has (rollback), or gained (promote).
  std::vector<std::string> tasks_removed, tasks_added;
  double seconds = 0;  // wall time of the whole change
};

struct ServedVersion {
  int64_t version = 0;
  std::shared_ptr<const CausalLM> model;  // merged weights: W0 + W_past
  int64_t tasks_learned = 0;
  // A frozen copy of the method's committed state at this version (task routing reads it while the
  // worker trains the live one).
  std::shared_ptr<const Method> method;
  // The automatic task router of this version (empty before the first task).
  std::shared_ptr<const TaskRouter> router;
};

// Where a request is served (Engine::Resolve).
struct RouteChoice {
  // The model that serves the route: `weights`, plus for a task route the task's side paths (the
  // adapters on its linear layers).
  std::shared_ptr<const CausalLM> model;
  // The weights under the route: the base model W0 for "base" and every task route (one object per
  // engine), a version's merged weights for "merged". Rows of a decode batch share these.
  std::shared_ptr<const CausalLM> weights;
  // "base", "merged" or a learned task's name.
  std::string route;
  // Whether the route was chosen by the router ("auto").
  bool automatic = false;
  // For an automatic route: the router's confidence (RouteDecision::confidence); 1 when named.
  double confidence = 1.0;
};

// How an export treats its directory: it is written into a temporary directory beside it and
// renamed into place (readers never see a partial export).
struct ExportOptions {
  // Replace a non-empty directory; without it such a directory is refused (ALREADY_EXISTS).
  bool overwrite = false;
};

// A task's route as a PEFT LoRA adapter (Engine::ExportAdapter).
struct AdapterExportOptions {
  bool overwrite = false;
  // 0: exact (methods with per-task low-rank weights); > 0: at most this rank, each module's best
  // approximation of it (truncated SVD). Methods whose update is dense need it.
  int64_t rank = 0;
};

struct AdapterExport {
  std::string task;
  std::string method;
  int64_t weights_version = 0;
  // r of adapter_config.json (every module has it; lora_alpha = r), the rank an exact export needs,
  // and the modules written.
  int64_t rank = 0;
  int64_t exact_rank = 0;
  int64_t modules = 0;
  // ‖ΔW − B A‖_F / ‖ΔW‖_F over every module (0: exact), and the worst module's.
  double relative_error = 0;
  double max_module_error = 0;
  std::string max_error_module;
  // Whether the update was dense (a method without per-task low-rank weights: its served weights
  // minus W0, truncated to `rank`).
  bool dense = false;
};

// Scores of completions for InferenceService.Score.
struct CompletionScores {
  std::vector<double> log_likelihood;
  std::vector<int32_t> tokens;
  int32_t best = 0;
};

class Engine : public TaskRunner {
 public:
  // Takes the base model; loads <state_dir>/checkpoint when present (refusing a corrupted one with
  // DATA_LOSS naming the file, or one from another base model / method with FAILED_PRECONDITION).
  static absl::StatusOr<std::unique_ptr<Engine>> Create(std::unique_ptr<CausalLM> base,
                                                        std::shared_ptr<const Tokenizer> tokenizer,
                                                        ModelSummary summary, EngineOptions options);
  ~Engine() override;

  std::shared_ptr<const ServedVersion> Current() const;
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  const ModelSummary& summary() const { return summary_; }
  const EngineOptions& options() const { return options_; }

  // Task-routed weights of `version` (the one the request serves, from Current()): the model as of
  // `task` (W0 + the updates of it and every earlier task; Method::ApplyTaskRouting), for methods
  // that keep per-task updates (share, share_ella, inc_lora, o_lora). Cached per task and version.
  // NOT_FOUND for an unknown task, FAILED_PRECONDITION when the method has no per-task weights.
  absl::StatusOr<std::shared_ptr<const CausalLM>> Routed(const ServedVersion& version,
                                                         const std::string& task) const;

  // Where a request on `version` is served. `route`: "" or "auto" (the router picks a learned task
  // from the prompt, or --unmatched_route when none fits), "merged", "base", or a task name (as
  // Routed()). With auto and a method without per-task weights, a prompt that fits a task gets the
  // merged weights. NOT_FOUND / FAILED_PRECONDITION as Routed().
  absl::StatusOr<RouteChoice> Resolve(const ServedVersion& version, const std::string& route,
                                      const std::string& prompt) const;
  // Resolve for several prompts (one decision per row; the feature pass is batched).
  absl::StatusOr<std::vector<RouteChoice>> ResolveBatch(const ServedVersion& version,
                                                        const std::string& route,
                                                        const std::vector<std::string>& prompts) const;

  // Generates for several prompts routed per row (ResolveBatch): rows over the same weights run as
  // one decode batch, each with its route's side paths (DecodeBatch). Result i belongs to prompt i.
  absl::StatusOr<std::vector<std::pair<RouteChoice, GenerationResult>>> GenerateRouted(
      const ServedVersion& version, const std::string& route, const std::vector<std::string>& prompts,
      const SamplingOptions& sampling) const;

  // Log-likelihood of each completion after `prompt` on `model`: the prompt is tokenised and run
  // once, the completions are scored together in one batched forward on its KV cache
  // (ContinuationLogLikelihoods). INVALID_ARGUMENT when there is no completion, or when the prompt
  // and a completion do not fit the model's positions (naming the completion).
  // `prompt_ids`: the prompt already tokenised (EncodePrompt), or null.
  absl::StatusOr<CompletionScores> ScoreCompletions(const CausalLM& model, const std::string& prompt,
                                                    const std::vector<std::string>& completions,
                                                    const std::vector<int32_t>* prompt_ids = nullptr) const;

  // The recipe task `spec` would train with against the current state, checked as RunJob will
  // check it (INVALID_ARGUMENT for bad values or an unknown method, FAILED_PRECONDITION for a
  // method other than the state's or a fixed option that differs, ALREADY_EXISTS for a learned
  // task). The server calls it before it accepts a task; RunJob checks again.
  absl::StatusOr<TrainingRecipe> CheckTask(const TaskSpecification& spec) const;

  std::vector<TaskInfo> Tasks() const;
  absl::StatusOr<TaskInfo> Task(const std::string& name) const;
  EngineReport Report() const;
  std::string method() const;
  int64_t AdaptationStateBytes() const;

  // Merged model as HF safetensors + config.json + tokenizer files into `dir`. Every export writes a
  // temporary directory beside `dir` and renames it into place; ALREADY_EXISTS naming `dir` when it
  // is a non-empty directory (unless options.overwrite) or not a directory.
  absl::Status ExportWeights(const std::string& dir, const ExportOptions& options = {}) const;
  // The adaptation state (a copy of the checkpoint) into `dir` (as ExportWeights).
  absl::Status ExportState(const std::string& dir, const ExportOptions& options = {}) const;
  // Task `task`'s route on the served version, the model as of the task minus W0 (what a request
  // with route `task` gets on top of the base weights), as a Hugging Face PEFT LoRA directory
  // (adapter_config.json + adapter_model.safetensors; peft_export.h), which ImportAdapters reads
  // back. Methods with per-task weights (share, share_ella: rank <= k; inc_lora, o_lora: rank r per
  // task up to it) export exact factors, or the best rank-`options.rank` approximation. Methods that
  // keep only merged weights (ella, seq_lora, seq_ft, osft, pm, mtl) have the model as of their
  // latest task only: its update, W_served − W0, is dense and is exported as a truncated SVD when
  // options.rank > 0. INVALID_ARGUMENT for "base"/"auto" or a negative rank, NOT_FOUND for an
  // unknown task, FAILED_PRECONDITION for a dense update without a rank or an earlier task of such a
  // method (naming the method), UNIMPLEMENTED when the update touches weights other than linear
  // layers (seq_ft on embeddings and norms), ALREADY_EXISTS as ExportWeights.
  absl::StatusOr<AdapterExport> ExportAdapter(const std::string& task, const std::string& dir,
                                              const AdapterExportOptions& options = {}) const;
  // The adapter directories of an import job (TaskSpecification::import_dirs), checked as the job
  // will read them (INVALID_ARGUMENT / NOT_FOUND naming the directory and file, ALREADY_EXISTS for
  // a learned task, UNIMPLEMENTED for a method without a subspace). The server calls it before it
  // queues the import; nothing is read into the state here.
  // Returns the tasks the adapters become (each directory's name), in order.
  absl::StatusOr<std::vector<std::string>> CheckImport(const std::vector<std::string>& dirs) const;

  // Kept versions, newest first (core/state/versions.h); the served one is Current()->version.
  std::vector<VersionMeta> Versions() const;
  // Publishes candidate `version` (made by a held job, trained on the served version): its state
  // becomes the checkpoint (atomic, durable) and is served. NOT_FOUND for a version not kept,
  // FAILED_PRECONDITION for a published version, a candidate trained on another version, or while
  // a job trains (the worker owns the state then: cancel it or wait).
  absl::StatusOr<VersionChange> Promote(int64_t version);
  // Makes an earlier published version the served one again (default: the newest kept one before
  // the served version), atomically and durably, with no training data; newer versions and the
  // candidate are discarded (their tasks may be submitted again). NOT_FOUND / FAILED_PRECONDITION
  // as Promote (a candidate is promoted, not rolled back to).
  absl::StatusOr<VersionChange> Rollback(std::optional<int64_t> version);
  // Candidate versions kept now.
  int64_t CandidateCount() const;

  // Replication (trainer side): the state files of kept published version `version` (0 = the
  // served one). NOT_FOUND when it is not kept (pruned, or a publish is still keeping it),
  // FAILED_PRECONDITION for a candidate or on a replica.
  absl::StatusOr<PublishedState> PublishedStateOf(int64_t version) const;
  // Replication (replica side): serves the checkpoint in `dir` (a direct child of the state
  // directory holding the files and a manifest, e.g. written by WriteCheckpointManifest): reads
  // and verifies it (DATA_LOSS naming a damaged file), refuses another base model
  // (FAILED_PRECONDITION naming both), builds the version, then renames `dir` to
  // <state_dir>/checkpoint atomically (a restart serves it at once) and swaps it in as Current():
  // requests finish on the version they started on. Calls the publish callback. `dir` is removed
  // on failure. Replica engines only (FAILED_PRECONDITION otherwise).
  absl::StatusOr<std::shared_ptr<const ServedVersion>> AdoptState(const std::string& dir);

  // TaskRunner: a task's training run, or an import job (PEFT LoRA adapters folded into the state
  // without gradient steps; publishes a new version).
  absl::StatusOr<JobOutcome> RunJob(const JobRecord& job, std::vector<Example> train,
                                    std::vector<Example> eval, const JobContext& ctx) override;
  bool TaskIsLearned(const std::string& task_name) const override;
  // Whether `job`'s own version of its task is served (the task learned by that job id).
  bool JobIsLearned(const JobRecord& job) const override;

  // Data parallelism, a rank other than 0 (a replica): joins each task rank 0 announces once this
  // engine serves the version the task starts from (waiting up to half the join timeout for the
  // replica to download it), trains its shard of every step, and discards its result: rank 0
  // merges, evaluates and publishes, and this replica serves the published version like any other.
  // Returns when `stop` is set (leaving a running task at its next step: rank 0 goes on alone).
  void FollowDataParallel(const std::atomic<bool>* stop);
  // One announced task as a follower (FollowDataParallel's step; tests call it directly):
  // FAILED_PRECONDITION unless this engine serves `task.version`; the trainer's errors otherwise.
  absl::Status TrainDataParallelShard(const DataParallelTask& task, GradientSync* sync,
                                      const std::atomic<bool>* leave);
  // Data parallelism, for metrics (all zero / world size 1 without it).
  struct DataParallelFigures {
    int world_size = 1;
    int rank = 0;
    int last_task_ranks = 0;  // rank 0: ranks in the latest task's group (1: trained alone; 0: no task yet)
    int64_t tasks = 0;        // tasks this rank trained in a group of >= 2
    int64_t steps = 0;        // steps whose gradients this rank summed with the group
    int64_t groups_lost = 0;  // rank 0: tasks finished alone after a member left or died
  };
  DataParallelFigures DataParallelStats() const;

  // Called after each published version (metrics export). Set before the worker starts.
  void SetOnPublish(std::function<void()> fn) { on_publish_ = std::move(fn); }

 private:
  struct Impl;
  // RunJob for an import job (engine_transfer.cc).
  absl::StatusOr<JobOutcome> RunImport(const JobRecord& job);
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  std::shared_ptr<const Tokenizer> tokenizer_;
  ModelSummary summary_;
  EngineOptions options_;
  std::function<void()> on_publish_;
  std::atomic<int> dp_last_task_ranks_{0};
  std::atomic<int64_t> dp_tasks_{0}, dp_steps_{0}, dp_groups_lost_{0};
};

}  // namespace strata
