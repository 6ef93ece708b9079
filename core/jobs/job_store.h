#pragma once
// The durable job journal and the queue: state_dir/jobs/<id>/{job.json, train.jsonl, eval.jsonl}.
//
// Create() makes a job durable before returning (files written into a temp directory, fsynced,
// renamed into place, parent fsynced), so an accepted task survives kill -9 at any moment.
// Update() rewrites job.json atomically. Progress updates stay in memory (they are re-derived when a
// job re-runs) and wake watchers.
//
// Thread safety: all methods are thread-safe (one absl::Mutex; no other lock is taken under it).

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/data/example.h"
#include "core/jobs/job.h"

namespace strata {

class JobStore {
 public:
  // Opens (creating) `jobs_dir` and loads every job.json. Leftover temp directories from an
  // interrupted Create() are removed (that submission never returned a job id). A job directory
  // whose job.json is missing or cannot be parsed is quarantined, not refused: the file is moved to
  // `jobs_dir`/.quarantine/, the error is logged, and the job is kept in the journal as failed with
  // a message naming the file and the parse error (so an accepted job never disappears silently).
  // Errors: only when the directory itself cannot be created or listed.
  static absl::StatusOr<std::unique_ptr<JobStore>> Open(const std::string& jobs_dir);

  // Durably creates a queued job with its training and eval examples.
  absl::StatusOr<JobRecord> Create(const TaskSpecification& spec, const std::vector<Example>& train,
                                   const std::vector<Example>& eval);

  // Persists `job` (atomic job.json rewrite) and wakes watchers. NOT_FOUND for an unknown id.
  absl::Status Update(const JobRecord& job);
  // In-memory progress update; wakes watchers.
  void SetProgress(const std::string& id, const JobProgress& progress);

  absl::StatusOr<JobRecord> Get(const std::string& id) const;
  // Newest first.
  std::vector<JobRecord> List() const;
  // The queued job with the lowest sequence number.
  std::optional<JobRecord> NextQueued() const;
  int QueuedCount() const;
  // 1-based position among queued jobs (0 when not queued).
  int QueuePosition(const std::string& id) const;
  // A job with this task name that is queued or running, if any.
  std::optional<JobRecord> ActiveJobForTask(const std::string& task) const;

  absl::StatusOr<std::vector<Example>> LoadExamples(const std::string& id, const std::string& split) const;
  // Removes train.jsonl (no replay: only eval data is kept after a task is learned).
  absl::Status DeleteTrainingData(const std::string& id);

  // Blocks until the job's change counter differs from `*seen` (or `timeout`); then stores the job
  // and the new counter. False on timeout or unknown job.
  bool WaitForChange(const std::string& id, int64_t* seen, absl::Duration timeout, JobRecord* out) const;
  // Blocks until a job is queued or `timeout`; true if one is queued.
  bool WaitForQueued(absl::Duration timeout) const;
  // Wakes every waiter (shutdown); afterwards WaitForChange/WaitForQueued return at once, so callers
  // must check their own shutdown flag.
  void Interrupt();

  const std::string& dir() const { return dir_; }
  // Journal entries quarantined so far (files in .quarantine/; survives restarts).
  int64_t QuarantinedCount() const;

 private:
  explicit JobStore(std::string dir) : dir_(std::move(dir)) {}
  std::string JobDir(const std::string& id) const { return dir_ + "/" + id; }
  // Moves the unreadable job.json of directory `name` aside and returns the failed record that
  // replaces it (also written as the new job.json when possible). `reason` names the file and error.
  JobRecord Quarantine(const std::string& name, const std::string& reason) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string dir_;
  absl::Mutex io_mu_;  // taken before mu_ (lock order: io_mu_, then mu_)
  mutable absl::Mutex mu_;
  std::map<std::string, JobRecord> jobs_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int64_t> change_ ABSL_GUARDED_BY(mu_);
  int64_t next_sequence_ ABSL_GUARDED_BY(mu_) = 1;
  bool interrupted_ ABSL_GUARDED_BY(mu_) = false;
  int64_t quarantined_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace strata
