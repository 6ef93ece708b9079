// Data-parallel adaptation on c10d/Gloo, in one process: the ranks are threads, each with its own
// model and method, joined through a c10d FileStore (nothing listens on the network) and a real
// ProcessGroupGloo on 127.0.0.1.

#include "core/adapt/data_parallel.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <thread>

#include "absl/strings/str_cat.h"
#include "core/adapt/method.h"
#include "core/adapt/test_fixtures.h"
#include "core/adapt/trainer.h"

namespace strata {
namespace {

using ::testing::HasSubstr;

// A fresh FileStore path: the ranks meet through a file, so nothing listens on the network (Gloo's
// own connections bind to 127.0.0.1).
std::string StoreFile() {
  static std::atomic<int> n{0};
  const std::string path = absl::StrCat(::testing::TempDir(), "/strata-dp-", getpid(), "-", n++);
  std::remove(path.c_str());
  return path;
}

DataParallelOptions Options(int rank, const std::string& store_file, int world_size = 2) {
  DataParallelOptions o;
  o.world_size = world_size;
  o.rank = rank;
  o.store_file = store_file;
  o.join_timeout_seconds = 20;
  o.timeout_seconds = 30;
  return o;
}

TrainOptions TrainOpts() {
  TrainOptions o;
  o.learning_rate = 1e-2;
  o.batch_size = 8;
  o.max_steps = 12;
  o.seed = 7;
  return o;
}

MethodConfig Config() {
  MethodConfig mc = testing::QvTestConfig();
  mc.target_modules = {"all-linear"};
  mc.rank = 4;
  mc.p = 4;
  return mc;
}

std::unique_ptr<Method> MakeMethod(const std::string& name) {
  auto m = CreateMethod(name, Config());
  EXPECT_TRUE(m.ok()) << m.status();
  return std::move(m).value();
}

struct RankRun {
  absl::Status status;
  std::vector<float> losses;
  int64_t dp_steps = 0;
  int members = 0;
  MethodState state;
  std::map<std::string, at::Tensor> served;  // the merged model's linear weights
  std::vector<std::string> lost;             // on_group_lost lines
};

RankRun TrainOnce(const std::string& method_name, TrainOptions o) {
  auto base = testing::TinyModel();
  auto method = MakeMethod(method_name);
  RankRun run;
  o.on_group_lost = [&run](const std::string& why) { run.lost.push_back(why); };
  auto result = Trainer(o).Train(*base, *method, "t", {testing::SyntheticTask("t", 0, 48)});
  run.status = result.status();
  if (result.ok()) {
    run.losses = result->losses;
    run.dp_steps = result->data_parallel_steps;
    run.members = result->data_parallel_members;
    if (result->model != nullptr) {
      for (const auto& name : result->model->LinearNames())
        run.served[name] = result->model->FindLinear(name)->weight;
    }
  }
  auto state = method->ExportState();
  EXPECT_TRUE(state.ok());
  run.state = *state;
  return run;
}

// The same task on ranks 0 and 1 of a fresh 2-rank group; `adjust(rank, options, sync)` may change
// a rank's options (cancel, leave) or wrap its sync before training.
using Adjust = std::function<void(int, TrainOptions*, std::unique_ptr<GradientSync>*)>;

std::pair<RankRun, RankRun> TrainOnTwoRanks(const std::string& method_name, const Adjust& adjust = nullptr) {
  const std::string store = StoreFile();
  RankRun runs[2];
  auto rank_main = [&](int rank) {
    auto group = DataParallelGroup::Connect(Options(rank, store));
    ASSERT_TRUE(group.ok()) << group.status();
    std::unique_ptr<GradientSync> sync;
    if (rank == 0) {
      DataParallelTask task;
      task.name = "t";
      task.recipe_json = "{}";
      task.examples = testing::SyntheticTask("t", 0, 48).examples;
      sync = (*group)->StartTask(&task, [](const std::string& line) { ADD_FAILURE() << line; });
      ASSERT_NE(sync, nullptr);
    } else {
      auto task = (*group)->NextTask(0, std::chrono::seconds(20));
      ASSERT_TRUE(task.ok()) << task.status();
      ASSERT_TRUE(task->has_value());
      EXPECT_EQ((*task)->name, "t");
      EXPECT_EQ((*task)->examples.size(), 48u);
      auto joined = (*group)->JoinTask((*task)->seq, "");
      ASSERT_TRUE(joined.ok()) << joined.status();
      sync = std::move(*joined);
      ASSERT_NE(sync, nullptr);
    }
    EXPECT_EQ(sync->size(), 2);
    EXPECT_EQ(sync->rank(), rank);
    TrainOptions o = TrainOpts();
    if (adjust) adjust(rank, &o, &sync);
    o.sync = sync.get();
    runs[rank] = TrainOnce(method_name, o);
  };
  std::thread r1(rank_main, 1);
  rank_main(0);
  r1.join();
  return {runs[0], runs[1]};
}

void ExpectServedClose(const RankRun& a, const RankRun& b, const std::string& what) {
  ASSERT_EQ(a.served.size(), b.served.size()) << what;
  ASSERT_FALSE(a.served.empty()) << what;
  for (const auto& [name, w] : a.served) {
    EXPECT_TRUE(at::allclose(w, b.served.at(name), 1e-4, 1e-5))
        << what << ": " << name << " max diff " << (w - b.served.at(name)).abs().max().item<double>();
  }
}

void ExpectSameState(const MethodState& a, const MethodState& b, const std::string& what) {
  ASSERT_EQ(a.tensors.size(), b.tensors.size()) << what;
  for (const auto& [name, t] : a.tensors)
    EXPECT_TRUE(at::equal(t, b.tensors.at(name))) << what << ": " << name;
}

struct OneThread {
  OneThread() : saved(at::get_num_threads()) { at::set_num_threads(1); }
  ~OneThread() { at::set_num_threads(saved); }
  int saved;
};

TEST(DataParallelTest, ExamplesTravelInBinaryAndBadBytesAreNamed) {
  std::vector<EncodedExample> in = testing::SyntheticTask("t", 0, 5).examples;
  auto out = DecodeExamplesBinary(EncodeExamplesBinary(in));
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->size(), in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    EXPECT_EQ((*out)[i].ids, in[i].ids);
    EXPECT_EQ((*out)[i].target_start, in[i].target_start);
  }
  std::string cut = EncodeExamplesBinary(in);
  cut.resize(cut.size() - 3);
  EXPECT_THAT(std::string(DecodeExamplesBinary(cut).status().message()), HasSubstr("example 4 at offset"));
  EXPECT_THAT(std::string(DecodeExamplesBinary(EncodeExamplesBinary(in) + "x").status().message()),
              HasSubstr("1 bytes after the last example"));
}

TEST(DataParallelTest, OptionsComeFromFlagsOrTheEnvironment) {
  auto o = ResolveDataParallelOptions(2, 1, "tcp://10.0.0.5:29500");
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->host, "10.0.0.5");
  EXPECT_EQ(o->port, 29500);
  EXPECT_THAT(std::string(ResolveDataParallelOptions(2, 2, "tcp://h:1").status().message()),
              HasSubstr("--dist_rank: must be in [0, 2)"));
  EXPECT_THAT(std::string(ResolveDataParallelOptions(2, 0, "h:1").status().message()),
              HasSubstr("--dist_init: expected tcp://HOST:PORT"));
  EXPECT_EQ(ResolveDataParallelOptions(2, 1, "file:///tmp/s")->store_file, "/tmp/s");
  EXPECT_THAT(std::string(ResolveDataParallelOptions(2, 0, "file://rel").status().message()),
              HasSubstr("file:// needs an absolute path"));
  EXPECT_THAT(std::string(ResolveDataParallelOptions(2, 0, "tcp://h:99999").status().message()),
              HasSubstr("the port must be in 1..65535"));
  EXPECT_EQ(ResolveDataParallelOptions(1, 0, "")->world_size, 1);  // alone: nothing else needed
  setenv("WORLD_SIZE", "4", 1);
  setenv("RANK", "3", 1);
  setenv("MASTER_ADDR", "trainer-0", 1);
  setenv("MASTER_PORT", "29501", 1);
  auto env = ResolveDataParallelOptions(-1, -1, "");
  unsetenv("WORLD_SIZE");
  unsetenv("RANK");
  unsetenv("MASTER_ADDR");
  unsetenv("MASTER_PORT");
  ASSERT_TRUE(env.ok()) << env.status();
  EXPECT_EQ(env->world_size, 4);
  EXPECT_EQ(env->rank, 3);
  EXPECT_EQ(env->host, "trainer-0");
  EXPECT_EQ(env->port, 29501);
  EXPECT_THAT(std::string(ResolveDataParallelOptions(2, 0, "").status().message()),
              HasSubstr("MASTER_ADDR and MASTER_PORT"));
}

// The check: 2 ranks with gloo give the loss curve of 1 rank with the doubled batch (each
// rank runs half of the batch of 8) and the same merged state; both ranks end bit-identical.
// share_ella is the default method, osft rewrites gradients before the step (after the sum), pm
// draws random numbers every step (same seed on every rank).
TEST(DataParallelTest, TwoRanksMatchOneRankWithTheWholeBatch) {
  OneThread one_thread;
  ASSERT_TRUE(DataParallelAvailable());
  for (const std::string method : {"share_ella", "osft", "pm"}) {
    const RankRun alone = TrainOnce(method, TrainOpts());
    ASSERT_TRUE(alone.status.ok()) << method << ": " << alone.status;
    auto [r0, r1] = TrainOnTwoRanks(method);
    ASSERT_TRUE(r0.status.ok()) << method << ": " << r0.status;
    ASSERT_TRUE(r1.status.ok()) << method << ": " << r1.status;
    EXPECT_EQ(r0.dp_steps, 12) << method;
    EXPECT_EQ(r0.members, 2) << method;
    EXPECT_EQ(r0.losses, r1.losses) << method;
    ASSERT_EQ(r0.losses.size(), alone.losses.size());
    for (size_t i = 0; i < alone.losses.size(); ++i) {
      EXPECT_NEAR(r0.losses[i], alone.losses[i], 1e-5 * std::max(1.0f, alone.losses[i]))
          << method << " step " << i;
    }
    ExpectSameState(r0.state, r1.state, method + ": rank 0 vs rank 1");
    for (const auto& [name, w] : r0.served)
      EXPECT_TRUE(at::equal(w, r1.served.at(name))) << method << " " << name;
    // The merged weights agree; the state's own tensors may not (Share's bases come out of an SVD,
    // whose singular vectors are defined up to sign: a float summation order can flip one).
    ExpectServedClose(r0, alone, method + ": 2 ranks vs 1");
    EXPECT_TRUE(r0.lost.empty()) << method;
  }
}

TEST(DataParallelTest, RankZeroFinishesAloneWhenTheOtherLeaves) {
  OneThread one_thread;
  const RankRun alone = TrainOnce("share_ella", TrainOpts());
  std::atomic<bool> leave{false};
  auto [r0, r1] =
      TrainOnTwoRanks("share_ella", [&](int rank, TrainOptions* o, std::unique_ptr<GradientSync>*) {
        if (rank != 1) return;
        o->leave = &leave;
        o->on_progress = [&](const TrainProgress& p) {
          if (p.step == 4) leave = true;
        };
      });
  ASSERT_TRUE(r0.status.ok()) << r0.status;
  EXPECT_EQ(r1.status.code(), absl::StatusCode::kCancelled) << r1.status;
  EXPECT_EQ(r0.dp_steps, 5);  // the leave flag rides on step 5's sum
  ASSERT_EQ(r0.lost.size(), 1u);
  EXPECT_THAT(r0.lost[0], HasSubstr("a member left after step 5 of 12"));
  ASSERT_EQ(r0.losses.size(), alone.losses.size());
  for (size_t i = 0; i < alone.losses.size(); ++i) EXPECT_NEAR(r0.losses[i], alone.losses[i], 1e-5) << i;
  ExpectServedClose(r0, alone, "left vs alone");
}

// A member that dies mid-task (its group torn down) costs rank 0 nothing but speed: the failed
// step is recomputed on the whole batch and training goes on alone.
class DyingSync : public GradientSync {
 public:
  DyingSync(std::unique_ptr<GradientSync> inner, int die_at) : inner_(std::move(inner)), die_at_(die_at) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  absl::Status AllReduceSum(std::vector<at::Tensor>& tensors) override {
    if (++calls_ == die_at_) {
      inner_.reset();  // closes this rank's connections, as a killed process would
      return absl::UnavailableError("died");
    }
    return inner_->AllReduceSum(tensors);
  }

 private:
  std::unique_ptr<GradientSync> inner_;
  int die_at_, calls_ = 0;
  int rank_ = inner_->rank(), size_ = inner_->size();
};

TEST(DataParallelTest, RankZeroRecomputesAndGoesOnWhenAMemberDies) {
  OneThread one_thread;
  const RankRun alone = TrainOnce("share_ella", TrainOpts());
  auto [r0, r1] =
      TrainOnTwoRanks("share_ella", [](int rank, TrainOptions*, std::unique_ptr<GradientSync>* sync) {
        if (rank == 1) *sync = std::make_unique<DyingSync>(std::move(*sync), 7);  // step 4's control sum
      });
  ASSERT_TRUE(r0.status.ok()) << r0.status;
  EXPECT_EQ(r1.status.code(), absl::StatusCode::kUnavailable) << r1.status;
  EXPECT_EQ(r0.dp_steps, 3);
  ASSERT_EQ(r0.lost.size(), 1u) << r0.lost.size();
  EXPECT_THAT(r0.lost[0], HasSubstr("step 4 of 12 and the rest run on this rank alone"));
  ASSERT_EQ(r0.losses.size(), alone.losses.size());
  for (size_t i = 0; i < alone.losses.size(); ++i) EXPECT_NEAR(r0.losses[i], alone.losses[i], 1e-5) << i;
  ExpectServedClose(r0, alone, "died vs alone");
}

TEST(DataParallelTest, CancelOnRankZeroStopsEveryRank) {
  OneThread one_thread;
  std::atomic<bool> cancel{false};
  auto [r0, r1] =
      TrainOnTwoRanks("share_ella", [&](int rank, TrainOptions* o, std::unique_ptr<GradientSync>*) {
        o->cancel = &cancel;  // only rank 0's counts
        if (rank == 0) {
          o->on_progress = [&](const TrainProgress& p) {
            if (p.step == 3) cancel = true;
          };
        }
      });
  EXPECT_EQ(r0.status.code(), absl::StatusCode::kCancelled) << r0.status;
  EXPECT_EQ(r1.status.code(), absl::StatusCode::kCancelled) << r1.status;
  EXPECT_THAT(std::string(r1.status.message()), HasSubstr("cancelled at step 3 of 12"));
}

TEST(DataParallelTest, RankZeroTrainsAloneWhenNobodyAnswers) {
  DataParallelOptions o = Options(0, StoreFile(), 3);
  o.join_timeout_seconds = 0.3;
  auto group = DataParallelGroup::Connect(o);
  ASSERT_TRUE(group.ok()) << group.status();
  DataParallelTask task;
  task.name = "t";
  std::vector<std::string> log;
  EXPECT_EQ((*group)->StartTask(&task, [&](const std::string& line) { log.push_back(line); }), nullptr);
  EXPECT_EQ(task.seq, 1);
  ASSERT_EQ(log.size(), 2u);
  EXPECT_THAT(log[0], HasSubstr("rank 1 did not answer task 't' within 0.3 s"));
  EXPECT_THAT(log[1], HasSubstr("rank 2 did not answer"));
  // A late rank finds the task started; answering anyway, it is told it is not a member.
  DataParallelOptions late = o;
  late.rank = 1;
  auto group1 = DataParallelGroup::Connect(late);
  ASSERT_TRUE(group1.ok()) << group1.status();
  EXPECT_EQ(*(*group1)->LatestSeq(), 1);
  auto next = (*group1)->NextTask(0, std::chrono::seconds(5));
  ASSERT_TRUE(next.ok() && next->has_value()) << next.status();
  auto joined = (*group1)->JoinTask((*next)->seq, "");
  ASSERT_TRUE(joined.ok()) << joined.status();
  EXPECT_EQ(*joined, nullptr);
  EXPECT_TRUE((*next)->started);  // rank 0 named the members already: nothing left to join
  auto none = (*group1)->NextTask(1, std::chrono::milliseconds(100));
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
}

}  // namespace
}  // namespace strata
