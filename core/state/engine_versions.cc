#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <random>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/adapt/method.h"
#include "core/jobs/job.h"
#include "core/model/model.h"
#include "core/state/engine.h"
#include "core/state/engine_impl.h"
#include "core/util/failpoint.h"
#include "core/util/file_util.h"
#include "core/util/status_macros.h"

// Kept versions: the publish gate's candidates, promote and rollback, and keeping the last
// --keep_versions published states (core/state/versions.h holds the files).

namespace strata {
namespace {

// Releases a mutex taken with TryLock.
class TryLockGuard {
 public:
  explicit TryLockGuard(absl::Mutex* mu) : mu_(mu), locked_(mu->TryLock()) {}
  ~TryLockGuard() {
    if (locked_) mu_->Unlock();
  }
  bool locked() const { return locked_; }

 private:
  absl::Mutex* mu_;
  bool locked_;
};

absl::Status TrainingBusy(const char* what) {
  return absl::FailedPreconditionError(
      absl::StrCat("a job is training (the training worker owns the state); ", what,
                   " when it has finished, or cancel it first (strata cancel JOB)"));
}

absl::Status ReplicaRefuses(const char* what) {
  return absl::FailedPreconditionError(
      absl::StrCat("this server is a read-only replica: ", what, " on the trainer it follows"));
}

// Task names of a state: its ledger's tasks and the method's (imported adapters have no ledger entry).
std::set<std::string> StateTasks(const ResultsLedger& ledger, const Method& method) {
  std::set<std::string> out(method.tasks().begin(), method.tasks().end());
  for (const auto& t : ledger.tasks()) out.insert(t.name);
  return out;
}

}  // namespace

VersionMeta Engine::Impl::DescribeVersion(int64_t version, const std::string& status, int64_t based_on,
                                          const std::string& job_id, const std::string& task,
                                          const ResultsLedger& l) const {
  VersionMeta m;
  m.version = version;
  m.status = status;
  m.based_on = based_on;
  m.created = NowUnixSeconds();
  m.job_id = job_id;
  m.task = task;
  for (const TaskInfo& t : l.Tasks("")) {
    m.tasks.push_back(t.name);
    m.scores.emplace_back(t.name,
                          std::isfinite(t.current_auto_score) ? t.current_auto_score : t.current_score);
  }
  const EngineReport r = l.Report();
  m.reference_nll = !r.reference_nll_auto.empty() && std::isfinite(r.reference_nll_auto.back())
                        ? r.reference_nll_auto.back()
                    : !r.reference_nll.empty() ? r.reference_nll.back()
                                               : std::nan("");
  return m;
}

int64_t Engine::Impl::NextVersion(int64_t after) {
  absl::MutexLock lock(&versions_mu);
  return std::max(after + 1, versions->next_version());
}

void Engine::Impl::RefreshCandidates() {
  std::vector<HeldCandidate> held;
  {
    absl::MutexLock lock(&versions_mu);
    for (const VersionMeta& m : versions->List()) {
      if (m.status == kVersionCandidate) held.push_back({m.version, m.task, m.job_id, m.hold_reasons});
    }
  }
  absl::MutexLock lock(&mu);
  candidates = std::move(held);
}

void Engine::Impl::Prune(int64_t served) {
  int kept = 0;
  for (const VersionMeta& m : versions->List()) {  // newest first
    if (m.status != kVersionPublished || m.version > served) continue;
    if (m.version == served || kept < options.keep_versions - 1) {
      if (m.version != served) ++kept;
      continue;
    }
    if (auto st = versions->Remove(m.version); !st.ok()) {
      spdlog::warn("cannot prune kept version {}: {}", m.version, st.ToString());
    } else {
      spdlog::info("pruned kept version {} (--keep_versions={})", m.version, options.keep_versions);
    }
  }
}

void Engine::Impl::KeepPublished(const VersionMeta& meta) {
  {
    absl::MutexLock lock(&versions_mu);
    auto st = versions->Add(options.state_dir + "/checkpoint", meta);
    if (!st.ok() && !absl::IsAlreadyExists(st)) {
      // Nothing is pruned: the older versions stay the rollback targets.
      spdlog::error("version {} is served but could not be kept for rollback: {}", meta.version,
                    st.ToString());
    } else {
      MaybeCrashAt("versions.before_prune");
      for (const VersionMeta& m : versions->List()) {
        if (m.status != kVersionCandidate) continue;
        spdlog::info(
            "candidate version {} (task '{}') discarded: version {} was published on top of its base",
            m.version, m.task, meta.version);
        (void)versions->Remove(m.version);
      }
      Prune(meta.version);
    }
  }
  RefreshCandidates();
}

absl::Status Engine::Impl::KeepCandidate(const CheckpointData& snapshot, const VersionMeta& meta) {
  std::random_device rd;
  const std::string tmp = absl::StrCat(options.state_dir, "/.checkpoint-tmp-", rd(), rd());
  RETURN_IF_ERROR(MakeDirs(tmp));
  absl::Status st = WriteCheckpointFiles(options.state_dir, snapshot, tmp);
  if (st.ok()) {
    absl::MutexLock lock(&versions_mu);
    st = versions->Add(tmp, meta);
    if (st.ok()) {
      for (const VersionMeta& m : versions->List()) {
        if (m.status != kVersionCandidate || m.version == meta.version) continue;
        spdlog::info("candidate version {} (task '{}') replaced by candidate version {}", m.version, m.task,
                     meta.version);
        (void)versions->Remove(m.version);
      }
    }
  }
  (void)RemoveAll(tmp);
  RefreshCandidates();
  return st;
}

absl::Status Engine::Impl::ReconcileVersions(const ResultsLedger& served_ledger) {
  const int64_t served = current->version;
  {
    absl::MutexLock lock(&versions_mu);
    ASSIGN_OR_RETURN(VersionStore store, VersionStore::Open(options.state_dir));
    versions = std::move(store);
    for (const VersionMeta& m : versions->List()) {
      if (m.status == kVersionCandidate && m.version == served) {
        spdlog::info("version {}: a promote was interrupted after the state changed; completing it",
                     m.version);
        RETURN_IF_ERROR(versions->SetStatus(m.version, kVersionPublished));
      } else if (m.status == kVersionPublished && m.version > served) {
        spdlog::info("version {}: a rollback to {} was interrupted after the state changed; completing it",
                     m.version, served);
        RETURN_IF_ERROR(versions->Remove(m.version));
      } else if (m.status == kVersionCandidate && m.based_on != served) {
        spdlog::info("candidate version {} was trained on version {}, no longer served: discarded", m.version,
                     m.based_on);
        RETURN_IF_ERROR(versions->Remove(m.version));
      }
    }
    if (!versions->Get(served).ok()) {
      // The served state of a directory from before kept versions, or a publish interrupted before
      // its state was kept; a fresh state directory keeps its empty state (rollback target of the
      // first task).
      std::string job_id, task;
      if (!served_ledger.tasks().empty()) {
        job_id = served_ledger.tasks().back().job_id;
        task = served_ledger.tasks().back().name;
      }
      const VersionMeta meta = DescribeVersion(served, kVersionPublished, 0, job_id, task, served_ledger);
      if (PathExists(options.state_dir + "/checkpoint")) {
        RETURN_IF_ERROR(versions->Add(options.state_dir + "/checkpoint", meta));
      } else {
        ASSIGN_OR_RETURN(MethodState state, method->ExportState());
        const CheckpointData snapshot = Snapshot(state, served_ledger, router, served);
        std::random_device rd;
        const std::string tmp = absl::StrCat(options.state_dir, "/.checkpoint-tmp-", rd(), rd());
        RETURN_IF_ERROR(MakeDirs(tmp));
        absl::Status st = WriteCheckpointFiles(options.state_dir, snapshot, tmp);
        if (st.ok()) st = versions->Add(tmp, meta);
        (void)RemoveAll(tmp);
        RETURN_IF_ERROR(st);
      }
    }
    RETURN_IF_ERROR(versions->ReserveThrough(served));
    Prune(served);
  }
  RefreshCandidates();
  return absl::OkStatus();
}

absl::StatusOr<Engine::Impl::BuiltState> Engine::Impl::BuildState(const CheckpointData& data,
                                                                  const std::string& what) const {
  if (data.base_model_id != options.base_model_id) {
    return absl::FailedPreconditionError(absl::StrCat(what, " was made on base model '", data.base_model_id,
                                                      "', the server runs '", options.base_model_id, "'"));
  }
  MethodState state;
  state.method = data.method;
  state.config_json = data.method_config_json;
  state.tensors = data.method_tensors;
  BuiltState out;
  ASSIGN_OR_RETURN(out.method, CreateMethodFromState(state));
  ASSIGN_OR_RETURN(std::unique_ptr<Method> frozen, CreateMethodFromState(state));
  ASSIGN_OR_RETURN(out.ledger, ResultsLedger::FromCheckpoint(data, options.state_dir, !options.replica));
  ASSIGN_OR_RETURN(TaskRouter imported, TaskRouter::ImportState(data.router_json, "", data.router_tensors));
  out.router = imported.empty() ? TaskRouter(options.router) : std::move(imported);
  auto served = base->ShallowCopy();
  RETURN_IF_ERROR(out.method->ApplyServedWeights(served.get()));
  if (!out.ledger.HasBaseReferenceNll()) {
    // The empty state kept before the first task was measured: the base model's NLL is the same.
    absl::MutexLock l(&mu);
    if (ledger.HasBaseReferenceNll()) out.ledger.SetBaseReferenceNll(ledger.Report().reference_nll.front());
  }
  auto next = std::make_shared<ServedVersion>();
  next->version = data.weights_version;
  next->model = std::shared_ptr<const CausalLM>(std::move(served));
  next->tasks_learned = static_cast<int64_t>(out.ledger.tasks().size());
  next->method = std::shared_ptr<const Method>(std::move(frozen));
  next->router = std::make_shared<const TaskRouter>(out.router);
  out.version = std::move(next);
  return out;
}

void Engine::Impl::InstallState(BuiltState built) {
  method = std::move(built.method);
  router = std::move(built.router);
  const int64_t bytes = CheckpointBytes(options.state_dir);
  absl::MutexLock l(&mu);
  ledger = std::move(built.ledger);
  state_bytes = bytes;
  routed_cache.clear();
  current = std::move(built.version);  // the atomic swap: new requests see the new version
}

absl::StatusOr<std::shared_ptr<const ServedVersion>> Engine::Impl::Restore(int64_t version) {
  absl::MutexLock lock(&versions_mu);
  ASSIGN_OR_RETURN(VersionStore::PreparedRestore prepared, versions->PrepareRestore(version));
  // Everything the new version needs is built before the state changes.
  auto built = BuildState(prepared.data, absl::StrCat("version ", version));
  if (!built.ok()) {
    versions->AbandonRestore(prepared);
    return built.status();
  }
  MaybeCrashAt("restore.before_commit");
  if (auto st = versions->CommitRestore(prepared); !st.ok()) {
    versions->AbandonRestore(prepared);
    return st;
  }
  MaybeCrashAt("restore.after_commit");
  std::shared_ptr<const ServedVersion> served = built->version;
  InstallState(std::move(*built));
  return served;
}

// ---- Engine ----------------------------------------------------------------------------------------

std::vector<VersionMeta> Engine::Versions() const {
  absl::MutexLock lock(&impl_->versions_mu);
  return impl_->versions.has_value() ? impl_->versions->List() : std::vector<VersionMeta>{};
}

int64_t Engine::CandidateCount() const {
  absl::MutexLock lock(&impl_->mu);
  return static_cast<int64_t>(impl_->candidates.size());
}

bool Engine::JobIsLearned(const JobRecord& job) const {
  if (!job.spec.import_dirs.empty()) return TaskIsLearned(job.spec.name);
  absl::MutexLock lock(&impl_->mu);
  for (const auto& t : impl_->ledger.tasks()) {
    if (t.name == job.spec.name) return t.job_id.empty() || t.job_id == job.id;
  }
  return false;
}

absl::StatusOr<VersionChange> Engine::Promote(int64_t version) {
  const auto start = std::chrono::steady_clock::now();
  Impl& s = *impl_;
  if (s.options.replica) return ReplicaRefuses("promote");
  TryLockGuard train_lock(&s.train_mu);
  if (!train_lock.locked()) return TrainingBusy("promote");
  const std::shared_ptr<const ServedVersion> before = Current();
  VersionMeta meta;
  {
    absl::MutexLock lock(&s.versions_mu);
    auto m = s.versions->Get(version);
    if (!m.ok()) {
      return absl::NotFoundError(
          absl::StrCat("version ", version, " is not kept (strata versions lists the kept versions)"));
    }
    meta = *m;
  }
  if (meta.status != kVersionCandidate) {
    return absl::FailedPreconditionError(absl::StrCat(
        "version ", version, " is a published version, not a candidate",
        version == before->version ? " (it is served now)" : "; strata rollback makes it current again"));
  }
  if (meta.based_on != before->version) {
    return absl::FailedPreconditionError(
        absl::StrCat("candidate version ", version, " was trained on version ", meta.based_on,
                     ", but version ", before->version, " is served; submit its task again"));
  }
  ResultsLedger old_ledger;
  {
    absl::MutexLock lock(&s.mu);
    old_ledger = s.ledger;
  }
  const std::set<std::string> old_tasks = StateTasks(old_ledger, *before->method);
  ASSIGN_OR_RETURN(auto served, s.Restore(version));
  {
    absl::MutexLock lock(&s.versions_mu);
    if (auto st = s.versions->SetStatus(version, kVersionPublished); !st.ok()) {
      spdlog::error("version {} is served but its record says candidate: {}", version, st.ToString());
    }
    s.Prune(version);
  }
  s.RefreshCandidates();
  VersionChange change;
  change.from_version = before->version;
  change.to_version = served->version;
  ResultsLedger new_ledger;
  {
    absl::MutexLock lock(&s.mu);
    new_ledger = s.ledger;
  }
  for (const auto& t : StateTasks(new_ledger, *served->method)) {
    if (!old_tasks.count(t)) change.tasks_added.push_back(t);
  }
  change.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  spdlog::info("promoted candidate version {} (task '{}', job {}): served version {} -> {} in {:.3f} s",
               version, meta.task, meta.job_id, change.from_version, change.to_version, change.seconds);
  if (on_publish_) on_publish_();
  return change;
}

absl::StatusOr<VersionChange> Engine::Rollback(std::optional<int64_t> version) {
  const auto start = std::chrono::steady_clock::now();
  Impl& s = *impl_;
  if (s.options.replica) return ReplicaRefuses("roll back");
  TryLockGuard train_lock(&s.train_mu);
  if (!train_lock.locked()) return TrainingBusy("roll back");
  const std::shared_ptr<const ServedVersion> before = Current();
  int64_t target = 0;
  {
    absl::MutexLock lock(&s.versions_mu);
    const std::vector<VersionMeta> kept = s.versions->List();
    if (version.has_value()) {
      auto m = s.versions->Get(*version);
      if (!m.ok()) {
        return absl::NotFoundError(
            absl::StrCat("version ", *version, " is not kept (strata versions lists the kept versions)"));
      }
      if (m->status == kVersionCandidate) {
        return absl::FailedPreconditionError(absl::StrCat("version ", *version,
                                                          " is a candidate, never served; strata promote ",
                                                          *version, " publishes it"));
      }
      if (*version == before->version) {
        return absl::FailedPreconditionError(absl::StrCat("version ", *version, " is served already"));
      }
      if (*version > before->version) {
        return absl::FailedPreconditionError(absl::StrCat("version ", *version,
                                                          " is newer than the served version ",
                                                          before->version, "; rollback goes back only"));
      }
      target = *version;
    } else {
      for (const VersionMeta& m : kept) {  // newest first
        if (m.status == kVersionPublished && m.version < before->version) {
          target = m.version;
          break;
        }
      }
      if (target == 0) {
        return absl::FailedPreconditionError(
            absl::StrCat("no version before the served version ", before->version,
                         " is kept (--keep_versions=", s.options.keep_versions, ")"));
      }
    }
  }
  ResultsLedger old_ledger;
  {
    absl::MutexLock lock(&s.mu);
    old_ledger = s.ledger;
  }
  const std::set<std::string> old_tasks = StateTasks(old_ledger, *before->method);
  ASSIGN_OR_RETURN(auto served, s.Restore(target));
  {
    // Newer versions and the candidate can no longer be served on top of the restored state.
    absl::MutexLock lock(&s.versions_mu);
    for (const VersionMeta& m : s.versions->List()) {
      if (m.version > target || m.status == kVersionCandidate) {
        if (auto st = s.versions->Remove(m.version); !st.ok()) {
          spdlog::warn("cannot discard version {} after the rollback: {}", m.version, st.ToString());
        }
      }
    }
  }
  s.RefreshCandidates();
  VersionChange change;
  change.from_version = before->version;
  change.to_version = served->version;
  ResultsLedger new_ledger;
  {
    absl::MutexLock lock(&s.mu);
    new_ledger = s.ledger;
  }
  const std::set<std::string> now = StateTasks(new_ledger, *served->method);
  for (const auto& t : old_tasks) {
    if (!now.count(t)) change.tasks_removed.push_back(t);
  }
  change.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  spdlog::info("rolled back from version {} to version {} in {:.3f} s; tasks rolled back: [{}]",
               change.from_version, change.to_version, change.seconds,
               absl::StrJoin(change.tasks_removed, ", "));
  if (on_publish_) on_publish_();
  return change;
}

}  // namespace strata
