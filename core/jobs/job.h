#pragma once
// Jobs: one submitted task on its way through the queue. Plain value types (torch-free), with a
// JSON form used by the job journal (job.json).

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/adapt/recipe.h"  // TrainOverrides

namespace strata {

// kHeld: trained and evaluated, but the publish gate refused the new version (it is kept as a
// candidate version; promoting it makes the job succeeded). kRolledBack: the job's version was
// published and later rolled back (its task is no longer learned and may be submitted again).
// Both are terminal: they never block the queue.
enum class JobState { kQueued, kTraining, kEvaluating, kSucceeded, kFailed, kCancelled, kHeld, kRolledBack };

// "queued", "training", ...
const char* JobStateName(JobState state);
std::optional<JobState> ParseJobState(const std::string& name);
bool IsTerminal(JobState state);

struct TaskSpecification {
  std::string name;
  std::string method;        // empty = server default
  TrainOverrides overrides;  // unset = the server's recipe
  double eval_fraction = 0.1;
  int32_t eval_cap = 200;
  std::string scorer;  // "choice", "exact_match", "nll", or "" (auto)
  std::string description;
  // The publish gate: the least score (in the view users get) the new task must reach for its
  // version to be published; unset = the server's --min_task_score (off by default).
  std::optional<double> min_score;
  // Non-empty: an adapter import job (PEFT LoRA directories folded into the state, in order; no
  // data). `name` is the first adapter's task name (its directory's name).
  std::vector<std::string> import_dirs;
};

// INVALID_ARGUMENT "<field>: ..." unless `name` can name a task: 1-64 letters, digits, '.', '_'
// or '-', not "." / "..", and not a route name (auto, merged, base).
absl::Status ValidateTaskName(const std::string& name, const std::string& field = "name");

// INVALID_ARGUMENT naming the field when the name or numbers are unusable.
absl::Status ValidateTaskSpecification(const TaskSpecification& spec);

struct JobProgress {
  int64_t step = 0;
  int64_t total_steps = 0;
  int32_t epoch = 0;
  double loss = 0;
  double learning_rate = 0;
  double tokens_per_second = 0;
  double eta_seconds = 0;
};

struct JobRecord {
  std::string id;
  int64_t sequence = 0;  // submission order, strictly increasing
  TaskSpecification spec;
  JobState state = JobState::kQueued;
  double created = 0, started = 0, finished = 0;  // Unix seconds; 0 = not yet
  int64_t train_examples = 0;
  int64_t eval_examples = 0;
  JobProgress progress;
  std::string error;
  std::vector<std::pair<std::string, double>> eval_results;
  int64_t weights_version = 0;
  double reference_nll = 0;
  int32_t attempts = 0;  // how many times training started (re-queued after a crash: > 1)
  // Why the publish gate held the job's version, one line each, each starting with its kind
  // ("forgetting: ...", "min_task_score: ...", "reference_rise: ..."). Kept after a promote or a
  // rollback (the journal says what the gate decided).
  std::vector<std::string> hold_reasons;
};

// The kind of a hold reason: its text before the first ':'.
std::string HoldReasonKind(const std::string& reason);

std::string JobToJson(const JobRecord& job);
absl::StatusOr<JobRecord> JobFromJson(const std::string& text, const std::string& source);

double NowUnixSeconds();

}  // namespace strata
