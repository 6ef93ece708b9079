// The decode scheduler on the real stories260K model with two learned cl-small tasks.

#include "core/serve/scheduler.h"

#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <map>
#include <thread>

#include "absl/synchronization/notification.h"
#include "core/data/dataset.h"
#include "core/model/model.h"
#include "core/model/runtime.h"
#include "core/model/tokenizer.h"

namespace strata {
namespace {
namespace fs = std::filesystem;

const std::string kModel = std::string(STRATA_SHARED_DIR) + "/models/stories260K";

struct Dir {
  Dir() {
    path = (fs::temp_directory_path() / ("strata-scheduler-" + std::to_string(::getpid()))).string();
    fs::remove_all(path);
  }
  ~Dir() { fs::remove_all(path); }
  std::string path;
};

std::unique_ptr<Engine> MakeEngine(const std::string& dir) {
  EngineOptions o;
  o.state_dir = dir;
  o.base_model_id = kModel;
  o.recipe.method = "share_ella";
  o.recipe.max_steps = 8;
  o.recipe.batch_size = 8;
  o.recipe.learning_rate = 3e-3;
  o.recipe.method_config.target_modules = {"q_proj", "v_proj"};
  o.training_threads = 1;
  auto model = CausalLM::Load(kModel);
  EXPECT_TRUE(model.ok()) << model.status();
  auto tok = Tokenizer::FromDirectory(kModel);
  EXPECT_TRUE(tok.ok()) << tok.status();
  auto engine = Engine::Create(std::move(*model), std::shared_ptr<const Tokenizer>(std::move(*tok)), {}, o);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? std::move(engine).value() : nullptr;
}

void Learn(Engine& engine, const std::string& task) {
  TaskLoadOptions lo;
  lo.max_train = 32;
  lo.max_test = 8;
  auto t = LoadTaskDir(std::string(STRATA_SHARED_DIR) + "/data/cl-small/" + task, lo);
  ASSERT_TRUE(t.ok()) << t.status();
  JobRecord job;
  job.id = "job-" + task;
  job.spec.name = task;
  JobContext ctx;
  auto r = engine.RunJob(job, t->train, t->test, ctx);
  ASSERT_TRUE(r.ok()) << r.status();
}

// A stream read to its end.
struct Collected {
  absl::Status status;
  std::string route;
  int64_t version = 0;
  std::string text;
  GenerationResult result;
  int started = 0;
};

Collected Drain(GenerationStream& stream) {
  Collected c;
  for (;;) {
    for (StreamEvent& e : stream.Next(absl::Seconds(1))) {
      switch (e.kind) {
        case StreamEvent::Kind::kStarted:
          ++c.started;
          c.route = e.route.route;
          c.version = e.version;
          break;
        case StreamEvent::Kind::kToken:
          c.text += e.text;
          break;
        case StreamEvent::Kind::kDone:
          c.status = e.status;
          c.result = std::move(e.result);
          return c;
      }
    }
  }
}

class SchedulerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    SetTorchThreads(1);
    dir_ = new Dir();
    engine_ = MakeEngine(dir_->path).release();
    ASSERT_NE(engine_, nullptr);
    Learn(*engine_, "capitals");
    Learn(*engine_, "langid");
  }
  static void TearDownTestSuite() {
    delete engine_;
    delete dir_;
  }
  // The request alone through the engine (one prompt, its route, the given version).
  static GenerationResult Alone(const ServedVersion& version, const std::string& route,
                                const std::string& prompt, const SamplingOptions& o) {
    auto r = engine_->GenerateRouted(version, route, {prompt}, o);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? (*r)[0].second : GenerationResult{};
  }
  static inline Dir* dir_ = nullptr;
  static inline Engine* engine_ = nullptr;
};

// Concurrent requests over named tasks, auto routing, base and merged decode together (batches of
// more than one row) and each gets exactly the greedy tokens it gets alone on its route.
TEST_F(SchedulerTest, ConcurrentRequestsOnManyRoutesEqualEachAlone) {
  std::atomic<int64_t> widest{0};
  DecodeScheduler scheduler(engine_, SchedulerOptions{}, [&](int64_t rows) {
    if (rows > widest.load()) widest.store(rows);
  });
  const std::vector<std::pair<std::string, std::string>> requests = {
      {"capitals", "The capital of France is"}, {"langid", "Word: maison\nLanguage:"},
      {"auto", "The capital of Italy is"},      {"base", "Once upon a time, there was a little girl"},
      {"merged", "Word: casa\nLanguage:"},      {"auto", "Once upon a time"},
      {"capitals", "The capital of Spain is"},
  };
  SamplingOptions o;
  o.max_new_tokens = 16;
  std::vector<std::shared_ptr<GenerationStream>> streams;
  for (const auto& [route, prompt] : requests) {
    GenerationRequest r;
    r.prompt = prompt;
    r.route = route;
    r.sampling = o;
    auto s = scheduler.Submit(r);
    ASSERT_TRUE(s.ok()) << s.status();
    streams.push_back(*s);
  }
  const auto version = engine_->Current();
  for (size_t i = 0; i < requests.size(); ++i) {
    Collected c = Drain(*streams[i]);
    ASSERT_TRUE(c.status.ok()) << c.status;
    EXPECT_EQ(c.started, 1);
    EXPECT_EQ(c.version, version->version);
    const GenerationResult alone = Alone(*version, requests[i].first, requests[i].second, o);
    EXPECT_EQ(c.result.ids, alone.ids) << i << " " << requests[i].first;
    EXPECT_EQ(c.text, alone.text) << i;
    EXPECT_EQ(c.result.text, alone.text) << i;
    if (requests[i].first != "auto") {
      EXPECT_EQ(c.route, requests[i].first);
    }
  }
  EXPECT_GT(widest.load(), 1);  // requests were batched
  EXPECT_EQ(scheduler.stats().running, 0);
}

// A cancelled request leaves the batch at once and its slot goes to a waiting one; a full queue
// refuses with RESOURCE_EXHAUSTED; an unknown task ends the stream with NOT_FOUND.
TEST_F(SchedulerTest, CancellationFreesTheSlotAndTheQueueIsBounded) {
  SchedulerOptions options;
  options.max_batch_size = 1;
  options.max_waiting_requests = 1;
  DecodeScheduler scheduler(engine_, options);
  GenerationRequest long_one;
  long_one.prompt = "Once upon a time";
  long_one.route = "base";
  long_one.sampling.max_new_tokens = 400;
  long_one.sampling.stop_on_eos = false;
  auto a = scheduler.Submit(long_one);
  ASSERT_TRUE(a.ok()) << a.status();
  // Wait until it runs (the batch is full), then queue one and refuse the next.
  bool started = false;
  while (!started) {
    for (const auto& e : (*a)->Next(absl::Seconds(1))) started |= e.kind == StreamEvent::Kind::kStarted;
  }
  GenerationRequest short_one = long_one;
  short_one.sampling.max_new_tokens = 4;
  auto b = scheduler.Submit(short_one);
  ASSERT_TRUE(b.ok()) << b.status();
  auto c = scheduler.Submit(short_one);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted) << c.status();
  EXPECT_NE(c.status().message().find("--max_waiting_requests"), std::string::npos);
  (*a)->Cancel();
  Collected ca = Drain(**a);
  EXPECT_EQ(ca.result.finish_reason, "cancelled");
  EXPECT_LT(ca.result.ids.size(), 400u);
  Collected cb = Drain(**b);
  ASSERT_TRUE(cb.status.ok()) << cb.status;
  EXPECT_EQ(cb.result.ids.size(), 4u);

  GenerationRequest unknown = short_one;
  unknown.route = "no-such-task";
  auto d = scheduler.Submit(unknown);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(Drain(**d).status.code(), absl::StatusCode::kNotFound);
  // Refused before queueing: bad options, a prompt over the limit.
  GenerationRequest bad = short_one;
  bad.sampling.top_p = 0;
  EXPECT_EQ(scheduler.Submit(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = short_one;
  bad.prompt = std::string(3000, 'a');
  bad.prompt_field = "prompt[2]";
  const absl::Status too_long = scheduler.Submit(bad).status();
  EXPECT_EQ(too_long.code(), absl::StatusCode::kInvalidArgument);
  // The refusal names the request's field and carries its reason for metrics.
  EXPECT_EQ(too_long.message().substr(0, 11), "prompt[2]: ") << too_long;
  ASSERT_TRUE(too_long.GetPayload(kRefusalReasonPayload).has_value()) << too_long;
  EXPECT_EQ(*too_long.GetPayload(kRefusalReasonPayload), "prompt_too_long");
}

// Score runs on the scheduler thread: one batched forward over the completions, equal to the
// engine's scoring on the route's model.
TEST_F(SchedulerTest, ScoreMatchesTheEngine) {
  SchedulerOptions options;
  options.max_score_completions = 3;
  DecodeScheduler scheduler(engine_, options);
  const std::vector<std::string> completions = {" Paris", " Rome", " London"};
  auto scored = scheduler.Score("capitals", "The capital of France is", completions);
  ASSERT_TRUE(scored.ok()) << scored.status();
  EXPECT_EQ(scored->route.route, "capitals");
  auto version = engine_->Current();
  auto model = engine_->Routed(*version, "capitals");
  ASSERT_TRUE(model.ok());
  auto direct = engine_->ScoreCompletions(**model, "The capital of France is", completions);
  ASSERT_TRUE(direct.ok());
  EXPECT_EQ(scored->scores.log_likelihood, direct->log_likelihood);
  EXPECT_EQ(scored->scores.best, direct->best);
  EXPECT_EQ(scheduler.Score("capitals", "x", {"a", "b", "c", "d"}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// A publish while rows are running: each row finishes on the version it started on (its tokens
// are those of that version alone), rows that join afterwards run on the new version, and both
// kinds share the batch.
TEST_F(SchedulerTest, PublishDuringABatchServesEachRowOneVersion) {
  Dir dir;
  dir.path += "-publish";
  fs::remove_all(dir.path);
  auto engine = MakeEngine(dir.path);
  ASSERT_NE(engine, nullptr);
  Learn(*engine, "capitals");
  const auto before = engine->Current();

  absl::Notification paused, publish_done;
  std::atomic<int> steps{0};
  std::atomic<int64_t> widest{0};
  // The observer pauses the scheduler after a few steps of the first rows until the publish is done.
  DecodeScheduler scheduler(engine.get(), SchedulerOptions{}, [&](int64_t rows) {
    if (rows > widest.load()) widest.store(rows);
    if (++steps == 3) {
      paused.Notify();
      publish_done.WaitForNotification();
    }
  });
  SamplingOptions o;
  o.max_new_tokens = 24;
  o.stop_on_eos = false;
  const std::vector<std::pair<std::string, std::string>> first = {{"capitals", "The capital of Peru is"},
                                                                  {"merged", "The capital of Chile is"}};
  std::vector<std::shared_ptr<GenerationStream>> old_rows;
  for (const auto& [route, prompt] : first) {
    auto s = scheduler.Submit({prompt, route, o});
    ASSERT_TRUE(s.ok()) << s.status();
    old_rows.push_back(*s);
  }
  paused.WaitForNotification();
  Learn(*engine, "langid");  // publishes the next version while the rows are mid-generation
  const auto after = engine->Current();
  ASSERT_EQ(after->version, before->version + 1);
  auto late = scheduler.Submit({"The capital of Peru is", "capitals", o});
  ASSERT_TRUE(late.ok());
  publish_done.Notify();

  for (size_t i = 0; i < first.size(); ++i) {
    Collected c = Drain(*old_rows[i]);
    ASSERT_TRUE(c.status.ok()) << c.status;
    EXPECT_EQ(c.version, before->version) << i;
    EXPECT_EQ(c.result.ids, Alone(*before, first[i].first, first[i].second, o).ids) << i;
    EXPECT_EQ(c.result.ids.size(), 24u);
  }
  Collected c = Drain(**late);
  ASSERT_TRUE(c.status.ok()) << c.status;
  EXPECT_EQ(c.version, after->version);
  EXPECT_EQ(c.result.ids, Alone(*after, "capitals", "The capital of Peru is", o).ids);
  // The late row joined the old version's capitals row in one batch (same base weights).
  EXPECT_GE(widest.load(), 2);
}

}  // namespace
}  // namespace strata
