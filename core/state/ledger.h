#pragma once
// The results ledger: the learned tasks (with the eval splits kept for them: the only data kept
// after a task is learned) and every score measured after every stage, in the views users get
// (merged weights, each task by its name, automatic routing), the reference NLL per stage, and the
// CL summary computed from them (core/eval/metrics.h). A value type: the engine builds the next
// ledger for a new stage (WithStage) and swaps it in when the version is published, so a failed
// task leaves the ledger exactly as it was.
//
// Thread safety: thread-compatible (the engine guards its ledger with its mutex).

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "core/data/example.h"
#include "core/state/checkpoint.h"

namespace strata {

struct ScoreHistoryPoint {
  int32_t stage = 0;  // 0 = base model
  std::string after_task;
  double score = 0;
  int64_t weights_version = 0;
};

struct TaskInfo {
  std::string name;
  int32_t index = 0;  // 1-based learning order
  std::string scorer;
  std::string method;
  std::string job_id;
  std::string description;
  int64_t eval_examples = 0;
  double base_score = 0;
  double learned_score = 0;
  double current_score = 0;
  double forgetting = 0;
  std::vector<ScoreHistoryPoint> history;
  // The latest stage in the other views (NaN when not measured): served by the task's name, routed
  // automatically, and the fraction of the task's eval prompts the router sends to it.
  double current_routed_score = 0;
  double current_auto_score = 0;
  double router_accuracy = 0;
};

// A version the publish gate held (kept, not served; `strata promote` publishes it).
struct HeldCandidate {
  int64_t version = 0;
  std::string task;
  std::string job_id;
  std::vector<std::string> reasons;
};

struct EngineReport {
  std::vector<std::string> tasks;
  std::vector<std::vector<double>> matrix;  // matrix[i][j]: after stage i+1, on task j
  std::vector<double> base;
  std::optional<double> average_score, backward_transfer, forward_transfer, forgetting;
  std::vector<double> reference_nll;  // per stage, [0] = base
  std::string method;
  int64_t weights_version = 0;
  int64_t adaptation_state_bytes = 0;
  // The other evaluation views, same shape as `matrix` (empty rows for stages before they were
  // measured): each task served by its name (methods with per-task weights) and routed
  // automatically; router_accuracy[i][j] = fraction of task j's eval prompts routed to task j.
  std::vector<std::vector<double>> routed_matrix, auto_matrix, router_accuracy;
  std::vector<double> reference_nll_auto;  // per stage through auto routing, [0] = base
  // CL summary of the auto view (what a request that names no task gets).
  std::optional<double> auto_average_score, auto_backward_transfer, auto_forgetting;
  int64_t router_bytes = 0;
  int64_t router_bytes_per_task = 0;
  // Candidate versions the publish gate held (filled by the engine).
  std::vector<HeldCandidate> candidates;
};

// What one stage (a learned task) measured.
struct StageResult {
  CheckpointTask task;
  std::vector<Example> eval;  // the task's eval split (kept in the state directory)
  int64_t weights_version = 0;
  double base_score = 0;  // b_t: the base model on the new task
  double pre_score = 0;   // a[t-1][t]: the previous weights on the new task (FWT)
  // Every task, old and new, in learning order (NaN = not measured).
  std::vector<double> scores, routed_scores, auto_scores, router_accuracy;
  double reference_nll = 0;       // NaN when no reference text is configured
  double reference_nll_auto = 0;  // through automatic routing
};

class ResultsLedger {
 public:
  // The ledger stored in a checkpoint; the eval splits are read from `state_dir` (DATA_LOSS naming
  // the file when one is unreadable). Without `read_eval_sets` (a replica's state, which never holds
  // them) every task's eval set is empty: tasks, scores and matrices only.
  static absl::StatusOr<ResultsLedger> FromCheckpoint(const CheckpointData& data,
                                                      const std::string& state_dir,
                                                      bool read_eval_sets = true);
  // Writes the ledger's fields (tasks, matrix, views, reference NLL, stage versions) into `data`.
  void WriteTo(CheckpointData* data) const;

  // The ledger after `stage` (this one unchanged).
  ResultsLedger WithStage(const StageResult& stage) const;

  const std::vector<CheckpointTask>& tasks() const { return tasks_; }
  bool HasTask(const std::string& name) const;
  // The kept eval split of each task, in learning order.
  const std::vector<Example>& EvalSet(const std::string& task) const;
  // The reference NLL of the base model (stage 0), measured once when a reference text is
  // configured: SetBaseReferenceNll sets stage 0 of the merged and the auto view (the base model
  // in both) where it is missing. (FromCheckpoint fills the auto view's stage 0 of older states.)
  bool HasBaseReferenceNll() const { return !reference_nll_.empty(); }
  void SetBaseReferenceNll(double nll);

  // Per task, with the method's name.
  std::vector<TaskInfo> Tasks(const std::string& method) const;
  // The matrices, views and CL summaries (the caller fills method, version, bytes and router sizes).
  EngineReport Report() const;

 private:
  std::vector<CheckpointTask> tasks_;
  std::map<std::string, std::vector<Example>> eval_sets_;
  std::vector<std::vector<double>> matrix_;  // [stage-1][task]
  std::vector<double> base_scores_;
  std::vector<double> reference_nll_;    // [stage]
  std::vector<int64_t> stage_versions_;  // weights version of each stage
  std::vector<std::vector<double>> routed_matrix_, auto_matrix_, router_accuracy_;
  std::vector<double> reference_nll_auto_;
};

}  // namespace strata
