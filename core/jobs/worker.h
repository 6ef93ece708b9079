#pragma once
// The single training worker: takes queued jobs in submission order and runs them one at a time
// through a TaskRunner (the engine that owns the model and the adaptation state).
//
// Thread safety: Start/Stop from one thread; Cancel from any thread. The worker thread is the only
// caller of TaskRunner::RunJob.

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/data/example.h"
#include "core/jobs/job.h"
#include "core/jobs/job_store.h"

namespace strata {

struct JobContext {
  // Reports training progress (step, loss, ...).
  std::function<void(const JobProgress&)> progress;
  // Moves the job to another non-terminal state (e.g. kEvaluating).
  std::function<void(JobState)> set_state;
  // Set when the job is cancelled or the server shuts down; checked every training step.
  const std::atomic<bool>* cancel = nullptr;
};

struct JobOutcome {
  std::vector<std::pair<std::string, double>> eval_results;
  int64_t weights_version = 0;
  double reference_nll = 0;
  // The publish gate refused the new version: it was kept as candidate `weights_version`, nothing
  // was published, and the job ends held with these reasons (JobRecord::hold_reasons).
  bool held = false;
  std::vector<std::string> hold_reasons;
};

class TaskRunner {
 public:
  virtual ~TaskRunner() = default;
  // Trains, merges, evaluates, publishes and checkpoints one task. On error the adaptation state
  // must be left as it was. CANCELLED when ctx.cancel was set.
  virtual absl::StatusOr<JobOutcome> RunJob(const JobRecord& job, std::vector<Example> train,
                                            std::vector<Example> eval, const JobContext& ctx) = 0;
  // Whether the task is already part of the durable adaptation state (a job that finished its
  // checkpoint but not its journal update before a crash).
  virtual bool TaskIsLearned(const std::string& task_name) const = 0;
  // Whether this job's own version of its task is in the served state (not the same task name
  // learned later by another job). Reconciles the journal after a promote or a rollback that a
  // crash interrupted between the state change and the journal update.
  virtual bool JobIsLearned(const JobRecord& job) const { return TaskIsLearned(job.spec.name); }
};

class Worker {
 public:
  static constexpr int kDefaultMaxAttempts = 3;

  // `max_attempts` (>= 1): how many times a job may start training. A job interrupted by a crash
  // (kill -9, OOM, power loss) is re-queued until it has started `max_attempts` times; then it
  // fails with a message saying so. A graceful Stop() does not use up an attempt.
  Worker(JobStore* store, TaskRunner* runner, int max_attempts = kDefaultMaxAttempts);
  ~Worker();

  // Reconciles the journal with the runner's state (jobs interrupted by a crash are re-queued, or
  // failed when they used up their attempts, or marked succeeded when their task is already
  // learned; a held job whose candidate is served is marked succeeded, a succeeded job whose
  // version is no longer served is marked rolled back), then starts the thread.
  absl::Status Start();
  // Brings the journal in line with the served state after a promote or a rollback (also run by
  // Start): a held job whose version is served becomes succeeded, a succeeded job whose version is
  // no longer served becomes rolled back. Returns the ids of the jobs changed.
  absl::StatusOr<std::vector<std::string>> ReconcileVersions();
  // Stops after the current step of the current job (which is re-queued, not failed).
  void Stop();

  // Cancels a queued or running job. NOT_FOUND / FAILED_PRECONDITION (already finished).
  absl::StatusOr<JobRecord> Cancel(const std::string& id);

  // Id of the running job, or empty.
  std::string RunningJob() const;

 private:
  void Loop();
  void RunOne(JobRecord job);

  JobStore* store_;
  TaskRunner* runner_;
  const int max_attempts_;
  std::thread thread_;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> cancel_current_{false};
  mutable absl::Mutex mu_;
  std::string running_ ABSL_GUARDED_BY(mu_);
};

}  // namespace strata
