#include "core/jobs/job_store.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <set>
#include <thread>
#include <tuple>

#include "core/jobs/worker.h"
#include "core/util/file_util.h"

namespace strata {
namespace {
namespace fs = std::filesystem;

class TempDir {
 public:
  TempDir() {
    path_ = (fs::temp_directory_path() /
             ("strata-jobs-" + std::to_string(::getpid()) + "-" + std::to_string(counter_++)))
                .string();
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  const std::string& path() const { return path_; }

 private:
  static inline int counter_ = 0;
  std::string path_;
};

TaskSpecification Spec(const std::string& name) {
  TaskSpecification s;
  s.name = name;
  return s;
}

std::vector<Example> Examples(int n) {
  std::vector<Example> out;
  for (int i = 0; i < n; ++i) out.push_back(MakeCompletionExample("Q" + std::to_string(i) + ":", " a"));
  return out;
}

TEST(JobStore, CreateIsDurableAndReopens) {
  TempDir dir;
  std::string id;
  {
    auto store = JobStore::Open(dir.path());
    ASSERT_TRUE(store.ok()) << store.status();
    auto job = (*store)->Create(Spec("capitals"), Examples(5), Examples(2));
    ASSERT_TRUE(job.ok()) << job.status();
    id = job->id;
    EXPECT_EQ(job->state, JobState::kQueued);
    EXPECT_EQ(job->train_examples, 5);
    EXPECT_TRUE(fs::exists(dir.path() + "/" + id + "/train.jsonl"));
    EXPECT_TRUE(fs::exists(dir.path() + "/" + id + "/eval.jsonl"));
    auto second = (*store)->Create(Spec("iso3"), Examples(1), Examples(1));
    ASSERT_TRUE(second.ok());
    EXPECT_GT(second->sequence, job->sequence);
    EXPECT_EQ((*store)->QueuePosition(second->id), 2);
  }
  auto reopened = JobStore::Open(dir.path());
  ASSERT_TRUE(reopened.ok()) << reopened.status();
  auto job = (*reopened)->Get(id);
  ASSERT_TRUE(job.ok());
  EXPECT_EQ(job->spec.name, "capitals");
  auto train = (*reopened)->LoadExamples(id, "train");
  ASSERT_TRUE(train.ok()) << train.status();
  EXPECT_EQ(train->size(), 5u);
  EXPECT_EQ((*train)[3].prompt, "Q3:");
  EXPECT_EQ((*reopened)->NextQueued()->id, id);
  auto next = (*reopened)->Create(Spec("langid"), Examples(1), Examples(1));
  ASSERT_TRUE(next.ok());
  EXPECT_EQ(next->sequence, 3);
}

TEST(JobStore, InterruptedSpoolIsDiscardedAndCorruptJournalQuarantined) {
  TempDir dir;
  fs::create_directories(dir.path() + "/.incoming-job-000009-123");
  std::string good_id;
  {
    auto store = JobStore::Open(dir.path());
    ASSERT_TRUE(store.ok());
    EXPECT_TRUE((*store)->List().empty());
    good_id = (*store)->Create(Spec("kept"), Examples(2), Examples(1))->id;  // job-000001
  }
  EXPECT_FALSE(fs::exists(dir.path() + "/.incoming-job-000009-123"));
  // A truncated journal entry, one that is not even there, and one whose id disagrees.
  fs::create_directories(dir.path() + "/job-000007");
  std::ofstream(dir.path() + "/job-000007/job.json") << "{not json";
  std::ofstream(dir.path() + "/job-000007/train.jsonl") << "{\"text\": \"x\"}\n";
  fs::create_directories(dir.path() + "/job-000008");
  fs::create_directories(dir.path() + "/job-000009");
  {
    std::ifstream in(dir.path() + "/" + good_id + "/job.json");
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    text.replace(text.find(good_id), good_id.size(), "job-000005");
    std::ofstream(dir.path() + "/job-000009/job.json") << text;
  }
  auto store = JobStore::Open(dir.path());
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_EQ((*store)->QuarantinedCount(), 2);  // job-000008 had no file to move
  auto bad = (*store)->Get("job-000007");
  ASSERT_TRUE(bad.ok()) << bad.status();
  EXPECT_EQ(bad->state, JobState::kFailed);
  EXPECT_NE(bad->error.find("job-000007/job.json"), std::string::npos) << bad->error;
  EXPECT_NE(bad->error.find(".quarantine/job-000007-job.json."), std::string::npos) << bad->error;
  EXPECT_FALSE(fs::exists(dir.path() + "/job-000007/train.jsonl"));
  EXPECT_EQ((*store)->Get("job-000008")->state, JobState::kFailed);
  EXPECT_NE((*store)->Get("job-000009")->error.find("\"id\""), std::string::npos);
  EXPECT_EQ((*store)->Get(good_id)->state, JobState::kQueued);
  EXPECT_EQ((*store)->NextQueued()->id, good_id);
  // New ids continue after the quarantined ones.
  auto next = (*store)->Create(Spec("next"), Examples(2), Examples(1));
  ASSERT_TRUE(next.ok());
  EXPECT_EQ(next->id, "job-000010");
  // The failed records were written back: a second start sees the same jobs and the same count.
  store->reset();
  auto again = JobStore::Open(dir.path());
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ((*again)->QuarantinedCount(), 2);
  EXPECT_EQ((*again)->Get("job-000007")->state, JobState::kFailed);
  EXPECT_EQ((*again)->List().size(), 5u);
}

TEST(JobSpec, ValidationNamesTheField) {
  auto bad = Spec("bad name!");
  EXPECT_NE(ValidateTaskSpecification(bad).message().find("spec.name"), std::string::npos);
  for (const char* reserved : {"auto", "merged", "base"}) {  // route names of Generate/Score
    TaskSpecification r = bad;
    r.name = reserved;
    EXPECT_NE(ValidateTaskSpecification(r).message().find("reserved"), std::string::npos) << reserved;
  }
  auto frac = Spec("ok");
  frac.eval_fraction = 1.5;
  EXPECT_NE(ValidateTaskSpecification(frac).message().find("eval_fraction"), std::string::npos);
  auto lr = Spec("ok");
  lr.overrides.learning_rate = -1;
  EXPECT_NE(ValidateTaskSpecification(lr).message().find("learning_rate"), std::string::npos);
  auto scorer = Spec("ok");
  scorer.scorer = "bleu";
  EXPECT_NE(ValidateTaskSpecification(scorer).message().find("bleu"), std::string::npos);
  EXPECT_TRUE(ValidateTaskSpecification(Spec("capitals-v2.1_x")).ok());
}

TEST(JobJson, RoundTrip) {
  JobRecord j;
  j.id = "job-000004";
  j.sequence = 4;
  j.spec = Spec("t");
  j.spec.overrides.learning_rate = 0.003;
  j.spec.overrides.max_steps = 300;
  j.state = JobState::kSucceeded;
  j.eval_results = {{"a", 0.5}, {"t", 0.75}};
  j.weights_version = 7;
  auto back = JobFromJson(JobToJson(j), "x");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->id, j.id);
  EXPECT_EQ(*back->spec.overrides.learning_rate, 0.003);
  EXPECT_EQ(*back->spec.overrides.max_steps, 300);
  EXPECT_FALSE(back->spec.overrides.rank.has_value());
  EXPECT_EQ(back->state, JobState::kSucceeded);
  EXPECT_EQ(back->eval_results, j.eval_results);
  EXPECT_EQ(back->weights_version, 7);
  EXPECT_FALSE(back->spec.min_score.has_value());
  EXPECT_TRUE(back->hold_reasons.empty());

  // A held job with its threshold and the gate's reasons.
  j.state = JobState::kHeld;
  j.spec.min_score = 0.6;
  j.hold_reasons = {"forgetting: a score 0.9 -> 0.1", "min_task_score: t reached 0.4"};
  back = JobFromJson(JobToJson(j), "x");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->state, JobState::kHeld);
  EXPECT_EQ(*back->spec.min_score, 0.6);
  EXPECT_EQ(back->hold_reasons, j.hold_reasons);
  EXPECT_EQ(HoldReasonKind(back->hold_reasons[1]), "min_task_score");
  j.state = JobState::kRolledBack;
  EXPECT_EQ(JobFromJson(JobToJson(j), "x")->state, JobState::kRolledBack);
  EXPECT_EQ(std::string(JobStateName(JobState::kRolledBack)), "rolled_back");
}

TEST(JobJson, MinScoreIsCheckedNamingTheField) {
  auto spec = Spec("t");
  spec.min_score = 1.5;
  EXPECT_NE(ValidateTaskSpecification(spec).message().find("spec.min_score"), std::string::npos);
  spec.min_score = 0.5;
  spec.scorer = "nll";
  EXPECT_NE(ValidateTaskSpecification(spec).message().find("nll"), std::string::npos);
  spec.scorer = "exact_match";
  EXPECT_TRUE(ValidateTaskSpecification(spec).ok());
}

// Found by fuzz_job_json: "sequence": 5e88 went through nlohmann's get<int64_t>(), a float-to-integer
// conversion out of range (undefined behaviour). Non-integers and out-of-range integers are DATA_LOSS
// naming the field (and the start-up quarantines the file).
TEST(JobJson, NonIntegerNumbersAreRefusedNamingTheField) {
  JobRecord j;
  j.id = "job-000004";
  j.sequence = 4;
  j.spec = Spec("t");
  const std::string good = JobToJson(j);
  ASSERT_TRUE(JobFromJson(good, "x").ok());
  auto with = [&](const std::string& from, const std::string& to) {
    std::string text = good;
    const size_t pos = text.find(from);
    EXPECT_NE(pos, std::string::npos) << from;
    return text.replace(pos, from.size(), to);
  };
  for (const auto& [from, to, field] : std::vector<std::tuple<std::string, std::string, std::string>>{
           {"\"sequence\": 4", "\"sequence\": 5e88", "sequence"},
           {"\"attempts\": 0", "\"attempts\": 1.5", "attempts"},
           {"\"attempts\": 0", "\"attempts\": 9999999999", "attempts"},
           {"\"eval_cap\": 200", "\"eval_cap\": -1e300", "eval_cap"},
           {"\"step\": 0", "\"step\": \"3\"", "step"}}) {
    auto r = JobFromJson(with(from, to), "job.json");
    ASSERT_FALSE(r.ok()) << to;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_NE(r.status().message().find("job.json: field \"" + field + "\""), std::string::npos)
        << r.status();
  }
}

// A runner that records the order of tasks and can block until cancelled.
class FakeRunner : public TaskRunner {
 public:
  absl::StatusOr<JobOutcome> RunJob(const JobRecord& job, std::vector<Example> train, std::vector<Example>,
                                    const JobContext& ctx) override {
    order.push_back(job.spec.name);
    if (job.spec.name.rfind("block", 0) == 0) {
      started = true;
      while (!ctx.cancel->load()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
      return absl::CancelledError("cancelled");
    }
    if (job.spec.name == "fail") return absl::InternalError("loss became NaN at step 3");
    ctx.progress(JobProgress{1, 1, 0, 0.5, 0.001, 10, 0});
    learned.insert(job.spec.name);
    JobOutcome out;
    out.weights_version = static_cast<int64_t>(learned.size());
    out.eval_results = {{job.spec.name, 1.0}};
    (void)train;
    return out;
  }
  bool TaskIsLearned(const std::string& name) const override { return learned.count(name) > 0; }

  std::vector<std::string> order;
  std::set<std::string> learned;
  std::atomic<bool> started{false};
};

JobRecord WaitTerminal(JobStore& store, const std::string& id) {
  for (int i = 0; i < 1000; ++i) {
    auto j = store.Get(id);
    if (j.ok() && IsTerminal(j->state)) return *j;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return *store.Get(id);
}

TEST(Worker, RunsInOrderDeletesTrainingDataAndReportsFailures) {
  TempDir dir;
  auto store = JobStore::Open(dir.path());
  ASSERT_TRUE(store.ok());
  auto a = (*store)->Create(Spec("a"), Examples(2), Examples(1));
  auto f = (*store)->Create(Spec("fail"), Examples(2), Examples(1));
  auto b = (*store)->Create(Spec("b"), Examples(2), Examples(1));
  FakeRunner runner;
  Worker worker(store->get(), &runner);
  ASSERT_TRUE(worker.Start().ok());
  auto jb = WaitTerminal(**store, b->id);
  auto ja = WaitTerminal(**store, a->id);
  auto jf = WaitTerminal(**store, f->id);
  worker.Stop();
  EXPECT_EQ(runner.order, (std::vector<std::string>{"a", "fail", "b"}));
  EXPECT_EQ(ja.state, JobState::kSucceeded);
  EXPECT_EQ(jb.state, JobState::kSucceeded);
  EXPECT_EQ(jb.weights_version, 2);
  EXPECT_EQ(jf.state, JobState::kFailed);
  EXPECT_NE(jf.error.find("NaN"), std::string::npos);
  EXPECT_FALSE(fs::exists(dir.path() + "/" + a->id + "/train.jsonl"));
  EXPECT_TRUE(fs::exists(dir.path() + "/" + a->id + "/eval.jsonl"));
}

TEST(Worker, CancelQueuedAndRunning) {
  TempDir dir;
  auto store = JobStore::Open(dir.path());
  ASSERT_TRUE(store.ok());
  auto blocker = (*store)->Create(Spec("block"), Examples(2), Examples(1));
  auto queued = (*store)->Create(Spec("later"), Examples(2), Examples(1));
  FakeRunner runner;
  Worker worker(store->get(), &runner);
  ASSERT_TRUE(worker.Start().ok());
  while (!runner.started) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EXPECT_EQ(worker.RunningJob(), blocker->id);
  auto cq = worker.Cancel(queued->id);
  ASSERT_TRUE(cq.ok()) << cq.status();
  EXPECT_EQ(cq->state, JobState::kCancelled);
  ASSERT_TRUE(worker.Cancel(blocker->id).ok());
  auto jb = WaitTerminal(**store, blocker->id);
  EXPECT_EQ(jb.state, JobState::kCancelled);
  auto again = worker.Cancel(blocker->id);
  EXPECT_EQ(again.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(worker.Cancel("job-999999").status().code(), absl::StatusCode::kNotFound);
  worker.Stop();
  EXPECT_EQ(runner.order, std::vector<std::string>{"block"});
}

TEST(Worker, RestartRequeuesInterruptedJobsAndKeepsLearnedOnes) {
  TempDir dir;
  std::string interrupted_id, checkpointed_id;
  {
    auto store = JobStore::Open(dir.path());
    auto j1 = (*store)->Create(Spec("done-before-crash"), Examples(2), Examples(1));
    auto j2 = (*store)->Create(Spec("mid-training"), Examples(2), Examples(1));
    j1->state = JobState::kEvaluating;
    j2->state = JobState::kTraining;
    ASSERT_TRUE((*store)->Update(*j1).ok());
    ASSERT_TRUE((*store)->Update(*j2).ok());
    checkpointed_id = j1->id;
    interrupted_id = j2->id;
  }
  auto store = JobStore::Open(dir.path());
  ASSERT_TRUE(store.ok());
  FakeRunner runner;
  runner.learned.insert("done-before-crash");
  Worker worker(store->get(), &runner);
  ASSERT_TRUE(worker.Start().ok());
  auto j2 = WaitTerminal(**store, interrupted_id);
  worker.Stop();
  EXPECT_EQ(j2.state, JobState::kSucceeded);
  EXPECT_EQ(j2.attempts, 1);
  EXPECT_EQ((*store)->Get(checkpointed_id)->state, JobState::kSucceeded);
  EXPECT_EQ(runner.order, std::vector<std::string>{"mid-training"});
}

TEST(Worker, JournalFollowsPromoteAndRollbackOfVersions) {
  TempDir dir;
  std::string promoted, rolled_back, still_held;
  {
    auto store = JobStore::Open(dir.path());
    auto a = (*store)->Create(Spec("promoted"), Examples(2), Examples(1));
    auto b = (*store)->Create(Spec("rolled-back"), Examples(2), Examples(1));
    auto c = (*store)->Create(Spec("held"), Examples(2), Examples(1));
    a->state = JobState::kHeld;
    a->hold_reasons = {"forgetting: x score 0.9 -> 0.1"};
    b->state = JobState::kSucceeded;
    b->weights_version = 3;
    c->state = JobState::kHeld;
    for (auto* j : {&*a, &*b, &*c}) ASSERT_TRUE((*store)->Update(*j).ok());
    promoted = a->id;
    rolled_back = b->id;
    still_held = c->id;
  }
  auto store = JobStore::Open(dir.path());
  ASSERT_TRUE(store.ok());
  FakeRunner runner;
  runner.learned.insert("promoted");  // its candidate is served; "rolled-back" no longer is
  Worker worker(store->get(), &runner);
  ASSERT_TRUE(worker.Start().ok());
  worker.Stop();
  auto a = (*store)->Get(promoted);
  EXPECT_EQ(a->state, JobState::kSucceeded);
  EXPECT_EQ(a->hold_reasons.size(), 1u);  // the gate's decision stays in the journal
  auto b = (*store)->Get(rolled_back);
  EXPECT_EQ(b->state, JobState::kRolledBack);
  EXPECT_NE(b->error.find("weights version 3"), std::string::npos) << b->error;
  EXPECT_EQ((*store)->Get(still_held)->state, JobState::kHeld);
  EXPECT_TRUE(IsTerminal(JobState::kHeld));
  EXPECT_TRUE(IsTerminal(JobState::kRolledBack));
  // Nothing ran: held and rolled-back jobs never block or re-enter the queue.
  EXPECT_TRUE(runner.order.empty());
  // A second reconciliation changes nothing.
  auto again = worker.ReconcileVersions();
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->empty());
}

TEST(Worker, CrashedJobIsRetriedUpToMaxAttemptsThenFails) {
  TempDir dir;
  std::string id;
  {
    auto store = JobStore::Open(dir.path());
    auto job = (*store)->Create(Spec("crashy"), Examples(2), Examples(1));
    id = job->id;
  }
  // Each "crash": the worker started the job (state training, attempts + 1), then the process died.
  for (int crash = 1; crash <= 3; ++crash) {
    auto store = JobStore::Open(dir.path());
    ASSERT_TRUE(store.ok());
    auto job = (*store)->Get(id);
    ASSERT_TRUE(job.ok());
    if (crash > 1) {
      EXPECT_EQ(job->state, JobState::kQueued) << "after crash " << crash - 1;
    }
    job->state = JobState::kTraining;
    job->attempts += 1;
    ASSERT_TRUE((*store)->Update(*job).ok());
    if (crash < 3) {
      FakeRunner runner;
      runner.learned.insert("unrelated");
      Worker worker(store->get(), &runner, /*max_attempts=*/3);
      // Start() re-queues; stop before the thread can take it (Stop() joins right away).
      (*store)->Interrupt();
      ASSERT_TRUE(worker.Start().ok());
      worker.Stop();
      auto requeued = JobStore::Open(dir.path());
      EXPECT_EQ((*requeued)->Get(id)->state, JobState::kQueued);
      EXPECT_EQ((*requeued)->Get(id)->attempts, crash);
    }
  }
  auto store = JobStore::Open(dir.path());
  FakeRunner runner;
  Worker worker(store->get(), &runner, /*max_attempts=*/3);
  ASSERT_TRUE(worker.Start().ok());
  worker.Stop();
  auto job = (*store)->Get(id);
  EXPECT_EQ(job->state, JobState::kFailed);
  EXPECT_EQ(job->attempts, 3);
  EXPECT_NE(job->error.find("--max_job_attempts=3"), std::string::npos) << job->error;
  EXPECT_TRUE(runner.order.empty());
  EXPECT_FALSE(fs::exists(dir.path() + "/" + id + "/train.jsonl"));
}

TEST(Worker, GracefulStopDoesNotUseAnAttempt) {
  TempDir dir;
  auto store = JobStore::Open(dir.path());
  auto job = (*store)->Create(Spec("block"), Examples(2), Examples(1));
  FakeRunner runner;
  {
    Worker worker(store->get(), &runner, /*max_attempts=*/1);
    ASSERT_TRUE(worker.Start().ok());
    while (!runner.started) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    worker.Stop();
  }
  auto after = (*store)->Get(job->id);
  EXPECT_EQ(after->state, JobState::kQueued);
  EXPECT_EQ(after->attempts, 0);
}

TEST(Worker, WatchSeesProgressAndStateChanges) {
  TempDir dir;
  auto store = JobStore::Open(dir.path());
  auto job = (*store)->Create(Spec("w"), Examples(1), Examples(1));
  int64_t seen = 0;
  JobRecord out;
  ASSERT_TRUE((*store)->WaitForChange(job->id, &seen, absl::Milliseconds(10), &out));
  EXPECT_FALSE((*store)->WaitForChange(job->id, &seen, absl::Milliseconds(10), &out));
  std::thread t([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    (*store)->SetProgress(job->id, JobProgress{3, 10, 0, 1.5, 0.01, 100, 2});
  });
  ASSERT_TRUE((*store)->WaitForChange(job->id, &seen, absl::Seconds(5), &out));
  t.join();
  EXPECT_EQ(out.progress.step, 3);
}

}  // namespace
}  // namespace strata
