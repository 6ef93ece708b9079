#include "core/jobs/worker.h"

#include <spdlog/spdlog.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace strata {

Worker::Worker(JobStore* store, TaskRunner* runner, int max_attempts)
    : store_(store), runner_(runner), max_attempts_(std::max(1, max_attempts)) {}

Worker::~Worker() { Stop(); }

absl::Status Worker::Start() {
  if (auto changed = ReconcileVersions(); !changed.ok()) return changed.status();
  for (JobRecord job : store_->List()) {
    if (job.state != JobState::kTraining && job.state != JobState::kEvaluating) continue;
    if (runner_->TaskIsLearned(job.spec.name)) {
      job.state = JobState::kSucceeded;
      if (job.finished == 0) job.finished = NowUnixSeconds();
      spdlog::info("job {} ({}): already in the checkpoint, marking succeeded", job.id, job.spec.name);
      (void)store_->DeleteTrainingData(job.id);
    } else if (job.attempts >= max_attempts_) {
      job.state = JobState::kFailed;
      job.finished = NowUnixSeconds();
      job.error =
          absl::StrCat("the server stopped abnormally (crash or kill) during each of the ", job.attempts,
                       " attempts to train this task; not retried (--max_job_attempts=", max_attempts_, ")");
      spdlog::error("job {} ({}): {}", job.id, job.spec.name, job.error);
      (void)store_->DeleteTrainingData(job.id);
    } else {
      job.state = JobState::kQueued;
      job.progress = JobProgress{};
      spdlog::warn("job {} ({}): interrupted during attempt {} of {}, re-queued", job.id, job.spec.name,
                   job.attempts, max_attempts_);
    }
    if (auto st = store_->Update(job); !st.ok()) return st;
  }
  thread_ = std::thread([this] { Loop(); });
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> Worker::ReconcileVersions() {
  std::vector<std::string> changed;
  for (JobRecord job : store_->List()) {
    if (job.state == JobState::kHeld && runner_->JobIsLearned(job)) {
      job.state = JobState::kSucceeded;
      job.error.clear();
      spdlog::info("job {} ({}): its candidate version {} is served, marking succeeded", job.id,
                   job.spec.name, job.weights_version);
    } else if (job.state == JobState::kSucceeded && !runner_->JobIsLearned(job)) {
      job.state = JobState::kRolledBack;
      job.error = absl::StrCat("rolled back: weights version ", job.weights_version,
                               " is no longer served; the task may be submitted again");
      spdlog::info("job {} ({}): not in the served state, marking rolled back", job.id, job.spec.name);
    } else {
      continue;
    }
    if (auto st = store_->Update(job); !st.ok()) return st;
    changed.push_back(job.id);
  }
  return changed;
}

void Worker::Stop() {
  if (!thread_.joinable()) return;
  stopping_ = true;
  cancel_current_ = true;
  store_->Interrupt();
  thread_.join();
}

std::string Worker::RunningJob() const {
  absl::MutexLock lock(&mu_);
  return running_;
}

absl::StatusOr<JobRecord> Worker::Cancel(const std::string& id) {
  auto job = store_->Get(id);
  if (!job.ok()) return job.status();
  if (IsTerminal(job->state)) {
    return absl::FailedPreconditionError(
        absl::StrCat("job ", id, " already ", JobStateName(job->state), "; nothing to cancel"));
  }
  // Under mu_ so the worker cannot pick this job up between the check and the update.
  absl::MutexLock lock(&mu_);
  job = store_->Get(id);
  if (!job.ok()) return job.status();
  if (running_ == id) {
    cancel_current_ = true;
    return *job;  // the worker marks it cancelled when training stops
  }
  if (IsTerminal(job->state)) {
    return absl::FailedPreconditionError(
        absl::StrCat("job ", id, " already ", JobStateName(job->state), "; nothing to cancel"));
  }
  job->state = JobState::kCancelled;
  job->finished = NowUnixSeconds();
  job->error = "cancelled before it started";
  if (auto st = store_->Update(*job); !st.ok()) return st;
  (void)store_->DeleteTrainingData(id);
  return *job;
}

void Worker::Loop() {
  while (!stopping_) {
    if (!store_->WaitForQueued(absl::Seconds(1))) continue;
    std::optional<JobRecord> next;
    {
      // Claim the job under mu_ (Cancel takes it too), so a cancelled job is never started.
      absl::MutexLock lock(&mu_);
      next = store_->NextQueued();
      if (!next || stopping_) continue;
      cancel_current_ = false;
      running_ = next->id;
    }
    RunOne(std::move(*next));
  }
}

void Worker::RunOne(JobRecord job) {
  job.state = JobState::kTraining;
  job.started = NowUnixSeconds();
  job.attempts += 1;
  job.error.clear();
  (void)store_->Update(job);
  spdlog::info("job {}: training task '{}' (attempt {})", job.id, job.spec.name, job.attempts);

  absl::StatusOr<JobOutcome> outcome;
  // An adapter import job has no data.
  const bool has_data = job.spec.import_dirs.empty();
  auto train = has_data ? store_->LoadExamples(job.id, "train") : std::vector<Example>{};
  auto eval = has_data ? store_->LoadExamples(job.id, "eval") : std::vector<Example>{};
  if (!train.ok()) {
    outcome = train.status();
  } else if (!eval.ok()) {
    outcome = eval.status();
  } else {
    JobContext ctx;
    ctx.cancel = &cancel_current_;
    ctx.progress = [this, id = job.id](const JobProgress& p) { store_->SetProgress(id, p); };
    ctx.set_state = [this, id = job.id](JobState s) {
      auto cur = store_->Get(id);
      if (!cur.ok()) return;
      cur->state = s;
      (void)store_->Update(*cur);
    };
    outcome = runner_->RunJob(job, std::move(*train), std::move(*eval), ctx);
  }

  auto latest = store_->Get(job.id);
  if (latest.ok()) job = *latest;
  if (outcome.ok() && outcome->held) {
    job.state = JobState::kHeld;
    job.eval_results = outcome->eval_results;
    job.weights_version = outcome->weights_version;
    job.reference_nll = outcome->reference_nll;
    job.hold_reasons = outcome->hold_reasons;
    job.error = absl::StrCat("candidate version ", outcome->weights_version,
                             " is not served: ", absl::StrJoin(outcome->hold_reasons, "; "));
    job.finished = NowUnixSeconds();
    spdlog::warn("job {}: task '{}' {}", job.id, job.spec.name, job.error);
  } else if (outcome.ok()) {
    job.state = JobState::kSucceeded;
    job.eval_results = outcome->eval_results;
    job.weights_version = outcome->weights_version;
    job.reference_nll = outcome->reference_nll;
    job.finished = NowUnixSeconds();
    spdlog::info("job {}: task '{}' learned; weights version {}", job.id, job.spec.name, job.weights_version);
  } else if (absl::IsCancelled(outcome.status()) && stopping_) {
    // Shutdown, not a user cancel: run it again after restart (a graceful stop is no failed attempt).
    job.state = JobState::kQueued;
    job.progress = JobProgress{};
    job.attempts = std::max(0, job.attempts - 1);
    spdlog::info("job {}: interrupted by shutdown, stays queued", job.id);
  } else if (absl::IsCancelled(outcome.status())) {
    job.state = JobState::kCancelled;
    job.error = "cancelled while training; the model is unchanged";
    job.finished = NowUnixSeconds();
    spdlog::info("job {}: cancelled", job.id);
  } else {
    job.state = JobState::kFailed;
    job.error = std::string(outcome.status().message());
    job.finished = NowUnixSeconds();
    spdlog::error("job {}: failed: {}", job.id, job.error);
  }
  if (auto st = store_->Update(job); !st.ok())
    spdlog::error("job {}: cannot persist: {}", job.id, st.ToString());
  if (IsTerminal(job.state)) (void)store_->DeleteTrainingData(job.id);
  absl::MutexLock lock(&mu_);
  running_.clear();
}

}  // namespace strata
