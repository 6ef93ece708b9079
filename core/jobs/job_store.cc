#include "core/jobs/job_store.h"

#include <spdlog/spdlog.h>

#include <cstdlib>
#include <filesystem>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/data/jsonl.h"
#include "core/util/file_util.h"
#include "core/util/status_macros.h"

namespace strata {
namespace fs = std::filesystem;

namespace {
std::string SerializeExamples(const std::vector<Example>& examples) {
  std::string out;
  for (const auto& e : examples) {
    out += ExampleToJsonLine(e);
    out.push_back('\n');
  }
  return out;
}
}  // namespace

absl::StatusOr<std::unique_ptr<JobStore>> JobStore::Open(const std::string& jobs_dir) {
  RETURN_IF_ERROR(MakeDirs(jobs_dir));
  std::unique_ptr<JobStore> store(new JobStore(jobs_dir));
  absl::MutexLock lock(&store->mu_);
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(jobs_dir, ec)) {
    std::string name = entry.path().filename().string();
    if (name.rfind(".incoming-", 0) == 0) {
      // An interrupted Create(): the client never got a job id for it.
      fs::remove_all(entry.path(), ec);
      continue;
    }
    if (!entry.is_directory() || name.empty() || name[0] == '.') continue;
    std::string path = entry.path().string() + "/job.json";
    absl::StatusOr<JobRecord> parsed = [&]() -> absl::StatusOr<JobRecord> {
      ASSIGN_OR_RETURN(std::string text, ReadFile(path));
      ASSIGN_OR_RETURN(JobRecord job, JobFromJson(text, path));
      if (job.id != name) {
        return absl::DataLossError(
            absl::StrCat(path, ": field \"id\" is '", job.id, "' but the directory is '", name, "'"));
      }
      return job;
    }();
    JobRecord job =
        parsed.ok() ? std::move(*parsed) : store->Quarantine(name, std::string(parsed.status().message()));
    store->next_sequence_ = std::max(store->next_sequence_, job.sequence + 1);
    store->change_[job.id] = 1;
    store->jobs_[job.id] = std::move(job);
  }
  if (ec) return absl::InternalError(absl::StrCat("cannot list ", jobs_dir, ": ", ec.message()));
  // Counted from the directory (this start's quarantined files included), so the count survives restarts.
  for (const auto& entry : fs::directory_iterator(jobs_dir + "/.quarantine", ec)) {
    store->quarantined_ += entry.is_regular_file() ? 1 : 0;
  }
  return store;
}

JobRecord JobStore::Quarantine(const std::string& name, const std::string& reason) {
  JobRecord job;
  job.id = name;
  // Ids are job-NNNNNN: keep the number, so the sequence (and the next id) stays unique.
  if (name.rfind("job-", 0) == 0) job.sequence = std::strtoll(name.c_str() + 4, nullptr, 10);
  job.state = JobState::kFailed;
  job.created = job.finished = NowUnixSeconds();
  const std::string quarantine_dir = dir_ + "/.quarantine";
  const std::string src = JobDir(name) + "/job.json";
  std::string moved_to;
  if (PathExists(src)) {
    const std::string dst =
        absl::StrCat(quarantine_dir, "/", name, "-job.json.", static_cast<int64_t>(job.created));
    if (MakeDirs(quarantine_dir).ok() && std::rename(src.c_str(), dst.c_str()) == 0 &&
        FsyncPath(quarantine_dir).ok()) {
      moved_to = dst;
    }
  }
  job.error = absl::StrCat("the job journal entry is unreadable (", reason, ")",
                           moved_to.empty() ? std::string() : absl::StrCat("; moved to ", moved_to),
                           "; the job cannot run: submit the task again");
  spdlog::error("job journal: quarantined {}: {}", name, job.error);
  // The replacement record makes the failure permanent and visible after the next start too.
  if (auto st = WriteFileAtomic(src, JobToJson(job)); !st.ok()) {
    spdlog::error("job journal: cannot write the failed record of {}: {}", name, st.ToString());
  }
  (void)RemoveAll(JobDir(name) + "/train.jsonl");
  return job;
}

int64_t JobStore::QuarantinedCount() const {
  absl::ReaderMutexLock lock(&mu_);
  return quarantined_;
}

absl::StatusOr<JobRecord> JobStore::Create(const TaskSpecification& spec, const std::vector<Example>& train,
                                           const std::vector<Example>& eval) {
  JobRecord job;
  {
    absl::MutexLock lock(&mu_);
    job.sequence = next_sequence_++;
  }
  job.id = absl::StrFormat("job-%06d", job.sequence);
  job.spec = spec;
  job.state = JobState::kQueued;
  job.created = NowUnixSeconds();
  job.train_examples = static_cast<int64_t>(train.size());
  job.eval_examples = static_cast<int64_t>(eval.size());

  std::random_device rd;
  std::string tmp = absl::StrCat(dir_, "/.incoming-", job.id, "-", rd());
  RETURN_IF_ERROR(MakeDirs(tmp));
  auto cleanup = [&](absl::Status st) {
    (void)RemoveAll(tmp);
    return st;
  };
  if (auto st = WriteFileAtomic(tmp + "/train.jsonl", SerializeExamples(train)); !st.ok()) return cleanup(st);
  if (auto st = WriteFileAtomic(tmp + "/eval.jsonl", SerializeExamples(eval)); !st.ok()) return cleanup(st);
  if (auto st = WriteFileAtomic(tmp + "/job.json", JobToJson(job)); !st.ok()) return cleanup(st);
  if (auto st = FsyncPath(tmp); !st.ok()) return cleanup(st);
  if (std::rename(tmp.c_str(), JobDir(job.id).c_str()) != 0) {
    return cleanup(absl::InternalError(absl::StrCat("cannot move the spooled job into ", JobDir(job.id))));
  }
  RETURN_IF_ERROR(FsyncPath(dir_));
  absl::MutexLock lock(&mu_);
  jobs_[job.id] = job;
  change_[job.id] = 1;
  return job;
}

absl::Status JobStore::Update(const JobRecord& job) {
  // io_mu_ serialises writers so the file and the in-memory record always agree.
  absl::MutexLock io_lock(&io_mu_);
  {
    absl::ReaderMutexLock lock(&mu_);
    if (jobs_.count(job.id) == 0) return absl::NotFoundError(absl::StrCat("no job ", job.id));
  }
  RETURN_IF_ERROR(WriteFileAtomic(JobDir(job.id) + "/job.json", JobToJson(job)));
  absl::MutexLock lock(&mu_);
  jobs_[job.id] = job;
  ++change_[job.id];
  return absl::OkStatus();
}

void JobStore::SetProgress(const std::string& id, const JobProgress& progress) {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(id);
  if (it == jobs_.end()) return;
  it->second.progress = progress;
  ++change_[id];
}

absl::StatusOr<JobRecord> JobStore::Get(const std::string& id) const {
  absl::ReaderMutexLock lock(&mu_);
  auto it = jobs_.find(id);
  if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("no job '", id, "'"));
  return it->second;
}

std::vector<JobRecord> JobStore::List() const {
  absl::ReaderMutexLock lock(&mu_);
  std::vector<JobRecord> out;
  for (const auto& [id, job] : jobs_) out.push_back(job);
  std::sort(out.begin(), out.end(),
            [](const JobRecord& a, const JobRecord& b) { return a.sequence > b.sequence; });
  return out;
}

std::optional<JobRecord> JobStore::NextQueued() const {
  absl::ReaderMutexLock lock(&mu_);
  const JobRecord* best = nullptr;
  for (const auto& [id, job] : jobs_) {
    if (job.state == JobState::kQueued && (best == nullptr || job.sequence < best->sequence)) best = &job;
  }
  if (best == nullptr) return std::nullopt;
  return *best;
}

int JobStore::QueuedCount() const {
  absl::ReaderMutexLock lock(&mu_);
  int n = 0;
  for (const auto& [id, job] : jobs_) n += job.state == JobState::kQueued;
  return n;
}

int JobStore::QueuePosition(const std::string& id) const {
  absl::ReaderMutexLock lock(&mu_);
  auto it = jobs_.find(id);
  if (it == jobs_.end() || it->second.state != JobState::kQueued) return 0;
  int pos = 1;
  for (const auto& [other_id, job] : jobs_) {
    pos += job.state == JobState::kQueued && job.sequence < it->second.sequence;
  }
  return pos;
}

std::optional<JobRecord> JobStore::ActiveJobForTask(const std::string& task) const {
  absl::ReaderMutexLock lock(&mu_);
  for (const auto& [id, job] : jobs_) {
    if (job.spec.name == task && !IsTerminal(job.state)) return job;
  }
  return std::nullopt;
}

absl::StatusOr<std::vector<Example>> JobStore::LoadExamples(const std::string& id,
                                                            const std::string& split) const {
  std::string path = JobDir(id) + "/" + split + ".jsonl";
  if (!PathExists(path))
    return absl::NotFoundError(absl::StrCat("job ", id, " has no ", split, " data (", path, ")"));
  ValidationOptions opts;
  ASSIGN_OR_RETURN(auto parsed, ParseJsonlFile(path, opts));
  return std::move(parsed.examples);
}

absl::Status JobStore::DeleteTrainingData(const std::string& id) {
  std::string path = JobDir(id) + "/train.jsonl";
  RETURN_IF_ERROR(RemoveAll(path));
  return FsyncPath(JobDir(id));
}

bool JobStore::WaitForChange(const std::string& id, int64_t* seen, absl::Duration timeout,
                             JobRecord* out) const {
  absl::MutexLock lock(&mu_);
  auto changed = [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    auto it = change_.find(id);
    return interrupted_ || it == change_.end() || it->second != *seen;
  };
  mu_.AwaitWithTimeout(absl::Condition(&changed), timeout);
  auto it = change_.find(id);
  if (it == change_.end() || it->second == *seen) return false;
  *seen = it->second;
  *out = jobs_.at(id);
  return true;
}

bool JobStore::WaitForQueued(absl::Duration timeout) const {
  absl::MutexLock lock(&mu_);
  auto queued = [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    if (interrupted_) return true;
    for (const auto& [id, job] : jobs_) {
      if (job.state == JobState::kQueued) return true;
    }
    return false;
  };
  mu_.AwaitWithTimeout(absl::Condition(&queued), timeout);
  if (interrupted_) return false;
  for (const auto& [id, job] : jobs_) {
    if (job.state == JobState::kQueued) return true;
  }
  return false;
}

void JobStore::Interrupt() {
  absl::MutexLock lock(&mu_);
  interrupted_ = true;
}

}  // namespace strata
