// Tests of the Trainer: schedule, loss decrease, cancellation, non-finite detection, hooks, joint
// training, determinism, and end-to-end runs on stories260K with the cl-small tasks.
#include "core/adapt/trainer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "core/adapt/method.h"
#include "core/adapt/test_fixtures.h"
#include "core/data/dataset.h"
#include "core/eval/scorers.h"
#include "core/model/tokenizer.h"

namespace strata {
namespace {

using ::testing::HasSubstr;

const std::string kShared = STRATA_SHARED_DIR;

using testing::TinyConfig;
using testing::TinyModel;

// The models here (tiny, stories260K) are far too small to gain from intra-op threads; one thread avoids
// OpenMP barrier stalls when the test machine's cores are shared (measured: 2 threads on 2 busy cores made
// the forgetting test 4x slower).
struct OneThread {
  OneThread() : saved(at::get_num_threads()) { at::set_num_threads(1); }
  ~OneThread() { at::set_num_threads(saved); }
  int saved;
};

TrainTask SyntheticTask(const std::string& name, int offset = 0, int n = 48) {
  return testing::SyntheticTask(name, offset, n);
}

at::Tensor Logits(const CausalLM& m) {
  at::NoGradGuard g;
  return m.Forward(at::tensor(std::vector<int64_t>{1, 4, 12, 17, 25, 5, 11, 20}).view({2, 4}), at::Tensor());
}

double MaxDiff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

std::unique_ptr<Method> MakeMethod(const std::string& name, MethodConfig config = testing::QvTestConfig()) {
  auto m = CreateMethod(name, config);
  EXPECT_TRUE(m.ok()) << m.status();
  return std::move(m).value();
}

void ExpectSameState(const Method& method, const MethodState& before) {
  auto after = method.ExportState();
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->config_json, before.config_json);
  ASSERT_EQ(after->tensors.size(), before.tensors.size());
  for (auto& [k, t] : before.tensors) EXPECT_TRUE(at::equal(after->tensors.at(k), t)) << k;
}

// Wraps a method to observe/alter the trainer's calls (and inject a non-finite extra loss).
class ProbeMethod : public Method {
 public:
  explicit ProbeMethod(std::unique_ptr<Method> inner) : Method(inner->config()), inner_(std::move(inner)) {}
  std::string name() const override { return "probe"; }
  bool joint() const override { return inner_->joint(); }
  std::vector<std::pair<std::string, at::Tensor>> TrainableParameters() const override {
    return inner_->TrainableParameters();
  }
  at::Tensor ExtraLoss() override {
    ++extra_calls;
    if (inf_at_step >= 0 && step_ == inf_at_step) return at::full({}, INFINITY);
    return inner_->ExtraLoss();
  }
  void BeforeForward(StepContext& ctx) override {
    step_ = ctx.step;
    ++before_forward;
    EXPECT_NE(ctx.rng, nullptr);
    EXPECT_NE(ctx.model, nullptr);
    inner_->BeforeForward(ctx);
  }
  void BeforeOptimizerStep(StepContext& ctx) override {
    ++before_step;
    // Gradients exist before the optimizer step.
    bool any = false;
    for (auto& [n, p] : TrainableParameters()) any = any || p.grad().defined();
    EXPECT_TRUE(any);
    EXPECT_TRUE(ctx.loss.defined());
    inner_->BeforeOptimizerStep(ctx);
  }
  void AfterOptimizerStep(StepContext& ctx) override {
    ++after_step;
    inner_->AfterOptimizerStep(ctx);
  }
  absl::Status AfterTraining(TaskContext& ctx) override {
    after_training_steps = ctx.steps;
    return ctx.for_each_batch(fisher_batch_size, 0, [this](const at::Tensor& loss, int64_t tokens) {
      ++fisher_batches;
      fisher_tokens += tokens;
      EXPECT_TRUE(loss.requires_grad());
      EXPECT_TRUE(std::isfinite(loss.item<double>()));
      return absl::OkStatus();
    });
  }
  absl::Status ApplyServedWeights(CausalLM* base) const override { return inner_->ApplyServedWeights(base); }
  Method& inner() { return *inner_; }

  int64_t inf_at_step = -1;
  int64_t fisher_batch_size = 0;
  int before_forward = 0, before_step = 0, after_step = 0, extra_calls = 0;
  int64_t after_training_steps = -1, fisher_batches = 0, fisher_tokens = 0;

 protected:
  bool uses_modules() const override { return false; }
  absl::Status DoBeginTask(const std::string& task, CausalLM* model) override {
    return inner_->BeginTask(task, model);
  }
  absl::Status DoEndTask(const std::string& task, CausalLM* model) override { return inner_->EndTask(model); }
  void DoAbortTask() override { inner_->AbortTask(nullptr); }
  void ExportTensors(std::map<std::string, at::Tensor>*, std::string*) const override {}
  absl::Status ImportTensors(const std::map<std::string, at::Tensor>&, const std::string&) override {
    return absl::OkStatus();
  }

 private:
  std::unique_ptr<Method> inner_;
  int64_t step_ = -1;
};

// ---- schedule ------------------------------------------------------------------------------------

TEST(TrainerTest, LearningRateSchedules) {
  TrainOptions o;
  o.learning_rate = 1.0;
  o.warmup_steps = 4;
  EXPECT_DOUBLE_EQ(Trainer::LearningRate(o, 0, 14), 0.25);
  EXPECT_DOUBLE_EQ(Trainer::LearningRate(o, 3, 14), 1.0);
  EXPECT_DOUBLE_EQ(Trainer::LearningRate(o, 4, 14), 1.0);
  EXPECT_DOUBLE_EQ(Trainer::LearningRate(o, 9, 14), 0.5);
  EXPECT_NEAR(Trainer::LearningRate(o, 13, 14), 0.1, 1e-12);
  o.lr_schedule = "cosine";
  EXPECT_DOUBLE_EQ(Trainer::LearningRate(o, 4, 14), 1.0);
  EXPECT_NEAR(Trainer::LearningRate(o, 9, 14), 0.5, 1e-12);
  o.min_lr_ratio = 0.2;
  EXPECT_NEAR(Trainer::LearningRate(o, 9, 14), 0.6, 1e-12);
  o.lr_schedule = "constant";
  EXPECT_DOUBLE_EQ(Trainer::LearningRate(o, 12, 14), 1.0);
  o = TrainOptions{};
  o.learning_rate = 2.0;
  o.warmup_ratio = 0.1;  // ceil(0.1 * 20) = 2 warmup steps
  EXPECT_DOUBLE_EQ(Trainer::LearningRate(o, 0, 20), 1.0);
  EXPECT_DOUBLE_EQ(Trainer::LearningRate(o, 2, 20), 2.0);

  TrainOptions bad;
  bad.lr_schedule = "step";
  EXPECT_THAT(std::string(ValidateTrainOptions(bad).message()), HasSubstr("lr_schedule"));
  bad = TrainOptions{};
  bad.batch_size = 0;
  EXPECT_THAT(std::string(ValidateTrainOptions(bad).message()), HasSubstr("batch_size"));
}

TEST(TrainerTest, CausalLmLossIsMeanOverTargets) {
  at::Tensor logits = at::randn({2, 3, 5});
  at::Tensor labels = at::tensor(std::vector<int64_t>{-100, 2, -100, 4, -100, 1}).view({2, 3});
  const at::Tensor lp = at::log_softmax(logits, -1);
  const double expected = -(lp[0][1][2] + lp[1][0][4] + lp[1][2][1]).item<double>() / 3.0;
  EXPECT_NEAR(Trainer::CausalLmLoss(logits, labels).item<double>(), expected, 1e-6);
}

// ---- training ------------------------------------------------------------------------------------------

TEST(TrainerTest, TrainsReportsProgressAndMerges) {
  OneThread one_thread;
  auto base = TinyModel();
  const at::Tensor base_logits = Logits(*base);
  MethodConfig mc = testing::QvTestConfig();
  mc.target_modules = {"all-linear"};
  auto method = MakeMethod("seq_lora", mc);
  TrainOptions o;
  o.learning_rate = 2e-2;
  o.batch_size = 8;
  o.epochs = 8;  // 6 steps per epoch
  o.warmup_steps = 2;
  std::vector<TrainProgress> progress;
  o.on_progress = [&](const TrainProgress& p) { progress.push_back(p); };
  Trainer trainer(o);
  auto result = trainer.Train(*base, *method, "sum", {SyntheticTask("sum")});
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->steps, 48);
  EXPECT_EQ(result->epochs, 8);
  EXPECT_EQ(result->losses.size(), 48u);
  EXPECT_LT(result->final_loss, 0.7 * result->first_loss);
  EXPECT_GT(result->tokens, 0);
  EXPECT_EQ(result->target_tokens, 8 * 48);
  ASSERT_EQ(progress.size(), 48u);
  for (size_t i = 0; i < progress.size(); ++i) {
    EXPECT_EQ(progress[i].step, static_cast<int64_t>(i) + 1);
    EXPECT_EQ(progress[i].total_steps, 48);
    EXPECT_EQ(progress[i].epoch, static_cast<int64_t>(i) / 6);
    EXPECT_EQ(progress[i].task, "sum");
    EXPECT_GT(progress[i].tokens_per_second, 0);
    EXPECT_GE(progress[i].eta_seconds, 0);
    EXPECT_GT(progress[i].grad_norm, 0);
    EXPECT_DOUBLE_EQ(progress[i].learning_rate, Trainer::LearningRate(o, static_cast<int64_t>(i), 48));
  }
  EXPECT_EQ(progress.back().eta_seconds, 0);
  // The served model changed; the input model did not; no adapters are left.
  EXPECT_GT(MaxDiff(Logits(*result->model), base_logits), 1e-3);
  EXPECT_EQ(MaxDiff(Logits(*base), base_logits), 0.0);
  for (const auto& name : result->model->LinearNames())
    EXPECT_EQ(result->model->FindLinear(name)->adapter, nullptr);
  EXPECT_EQ(method->tasks(), std::vector<std::string>{"sum"});

  // Same seed, same run.
  auto method2 = MakeMethod("seq_lora", mc);
  o.on_progress = nullptr;
  auto again = Trainer(o).Train(*base, *method2, "sum", {SyntheticTask("sum")});
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->losses, result->losses);
  EXPECT_EQ(MaxDiff(Logits(*again->model), Logits(*result->model)), 0.0);
}

// The two-task runs below: every linear adapted, rank 4, 8-row batches at lr 1e-2.
MethodConfig AllLinearRank4Config() {
  MethodConfig mc = testing::QvTestConfig();
  mc.target_modules = {"all-linear"};
  mc.rank = 4;
  mc.p = 4;
  return mc;
}

TrainOptions TwoTaskOptions(int64_t max_steps) {
  TrainOptions o;
  o.learning_rate = 1e-2;
  o.batch_size = 8;
  o.max_steps = max_steps;
  return o;
}

TEST(TrainerTest, EveryMethodTrainsTwoTasks) {
  OneThread one_thread;
  auto base = TinyModel();
  for (const std::string& name : MethodNames()) {
    auto method = MakeMethod(name, AllLinearRank4Config());
    TrainOptions o = TwoTaskOptions(12);
    std::unique_ptr<CausalLM> served = base->ShallowCopy();
    for (int t = 0; t < 2; ++t) {
      auto result = Trainer(o).Train(*served, *method, "t" + std::to_string(t), {SyntheticTask("t", t)});
      ASSERT_TRUE(result.ok()) << name << ": " << result.status();
      EXPECT_EQ(result->steps, 12);
      EXPECT_LT(result->final_loss, result->first_loss) << name;
      served = std::move(result->model);
    }
    EXPECT_EQ(method->num_tasks(), 2) << name;
    auto rebuilt = base->ShallowCopy();
    ASSERT_TRUE(method->ApplyServedWeights(rebuilt.get()).ok());
    EXPECT_LT(MaxDiff(Logits(*rebuilt), Logits(*served)), 1e-4) << name;
  }
}

// Row shards (TrainOptions::shards) run parts of each step concurrently in one process and add
// their share of the mean loss's gradient into the same buffers: every method's two-task run (the
// second task with the extra terms active: ELLA's penalty, O-LoRA's orthogonality) gives the losses
// and merged weights of one pass, with uneven parts (3 of 8 rows) and with parts that have no rows
// (16 shards of 8 rows, part 0 then carries only the extra term); and it is deterministic.
TEST(TrainerTest, RowShardsInOneProcessMatchOnePass) {
  OneThread one_thread;
  auto base = TinyModel();
  struct Run {
    std::vector<float> losses;
    std::unique_ptr<CausalLM> served;
  };
  auto run = [&](const std::string& name, int shards) {
    auto method = MakeMethod(name, AllLinearRank4Config());
    TrainOptions o = TwoTaskOptions(10);
    o.shards = shards;
    Run r;
    r.served = base->ShallowCopy();
    for (int t = 0; t < 2; ++t) {
      auto result = Trainer(o).Train(*r.served, *method, "t" + std::to_string(t), {SyntheticTask("t", t)});
      EXPECT_TRUE(result.ok()) << name << " shards " << shards << ": " << result.status();
      if (!result.ok()) return r;
      r.losses.insert(r.losses.end(), result->losses.begin(), result->losses.end());
      r.served = std::move(result->model);
    }
    return r;
  };
  for (const std::string name : {"share_ella", "seq_ft", "osft", "pm", "o_lora", "ella"}) {
    const Run one = run(name, 1);
    for (int shards : {3, 16}) {
      const Run sharded = run(name, shards);
      ASSERT_EQ(sharded.losses.size(), one.losses.size()) << name;
      for (size_t i = 0; i < one.losses.size(); ++i) {
        EXPECT_NEAR(sharded.losses[i], one.losses[i], 1e-5 * (1 + std::abs(one.losses[i])))
            << name << " shards " << shards << " step " << i;
      }
      EXPECT_LT(MaxDiff(Logits(*sharded.served), Logits(*one.served)), 1e-4) << name << " shards " << shards;
    }
  }
  // The parts' gradients are summed in part order: a sharded run repeats bit for bit.
  const Run a = run("seq_ft", 3), b = run("seq_ft", 3);
  EXPECT_EQ(a.losses, b.losses);
  EXPECT_TRUE(at::equal(Logits(*a.served), Logits(*b.served)));
  TrainOptions bad;
  bad.shards = -1;
  EXPECT_THAT(std::string(ValidateTrainOptions(bad).message()),
              HasSubstr("shards must be >= 0 (0 = automatic), got -1"));
  // Automatic: one per intra-op thread on the CPU, at most one per row, at most 1 GiB of extra
  // gradient copies; 1 elsewhere; an explicit count as given.
  EXPECT_EQ(ResolveTrainShards(0, at::Device("cpu"), 4, 16, 1 << 20), 4);
  EXPECT_EQ(ResolveTrainShards(0, at::Device("cpu"), 4, 2, 1 << 20), 2);
  EXPECT_EQ(ResolveTrainShards(0, at::Device("cpu"), 8, 16, int64_t{438} << 20), 3);  // 110M full FT
  EXPECT_EQ(ResolveTrainShards(0, at::Device("cpu"), 8, 16, int64_t{28} << 30), 1);   // 7B full FT
  EXPECT_EQ(ResolveTrainShards(0, at::Device("cuda"), 8, 16, 1 << 20), 1);
  EXPECT_EQ(ResolveTrainShards(3, at::Device("cpu"), 1, 1, 1 << 20), 3);
}

TEST(TrainerTest, JointTrainingIsOnlyForMtl) {
  OneThread one_thread;
  auto base = TinyModel();
  TrainOptions o;
  o.batch_size = 8;
  o.max_steps = 10;
  o.learning_rate = 1e-2;
  auto seq = MakeMethod("seq_lora");
  auto refused = Trainer(o).Train(*base, *seq, "both", {SyntheticTask("a", 0), SyntheticTask("b", 1)});
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("mtl"));
  EXPECT_EQ(seq->num_tasks(), 0);

  for (const std::string shape : {"full", "lora"}) {
    MethodConfig mc = testing::QvTestConfig();
    mc.mtl_shape = shape;
    auto mtl = MakeMethod("mtl", mc);
    auto result = Trainer(o).Train(*base, *mtl, "joint", {SyntheticTask("a", 0), SyntheticTask("b", 1, 12)});
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_EQ(result->steps, 10);
    EXPECT_EQ(result->target_tokens, 80);
    EXPECT_EQ(mtl->tasks(), std::vector<std::string>{"joint"});
  }
  // Empty data is refused.
  TrainTask empty;
  empty.name = "empty";
  EXPECT_EQ(Trainer(o).Train(*base, *seq, "e", {empty}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(TrainerTest, HooksAndAfterTrainingPass) {
  OneThread one_thread;
  auto base = TinyModel();
  ProbeMethod probe(MakeMethod("inc_lora"));
  probe.fisher_batch_size = 5;
  TrainOptions o;
  o.batch_size = 8;
  o.max_steps = 7;
  auto result = Trainer(o).Train(*base, probe, "t", {SyntheticTask("t", 0, 23)});
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(probe.before_forward, 7);
  EXPECT_EQ(probe.before_step, 7);
  EXPECT_EQ(probe.after_step, 7);
  EXPECT_EQ(probe.extra_calls, 7);
  EXPECT_EQ(probe.after_training_steps, 7);
  EXPECT_EQ(probe.fisher_batches, 5);  // ceil(23 / 5)
  EXPECT_EQ(probe.fisher_tokens, 23);
  EXPECT_EQ(probe.inner().num_tasks(), 1);
}

// ---- cancellation and non-finite losses ------------------------------------------------------------------

TEST(TrainerTest, CancellationLeavesWeightsAndStateUntouched) {
  OneThread one_thread;
  auto base = TinyModel();
  for (const std::string name : {"seq_ft", "share_ella", "seq_lora", "o_lora"}) {
    auto method = MakeMethod(name);
    TrainOptions o;
    o.batch_size = 8;
    o.max_steps = 5;
    o.learning_rate = 1e-2;
    auto first = Trainer(o).Train(*base, *method, "first", {SyntheticTask("first")});
    ASSERT_TRUE(first.ok()) << first.status();
    std::unique_ptr<CausalLM> served = std::move(first->model);
    const at::Tensor served_logits = Logits(*served);
    auto before = method->ExportState();
    ASSERT_TRUE(before.ok());

    std::atomic<bool> cancel{false};
    o.max_steps = 50;
    o.cancel = &cancel;
    int64_t last_step = 0;
    o.on_progress = [&](const TrainProgress& p) {
      last_step = p.step;
      if (p.step == 3) cancel = true;
    };
    auto cancelled = Trainer(o).Train(*served, *method, "second", {SyntheticTask("second", 1)});
    ASSERT_FALSE(cancelled.ok()) << name;
    EXPECT_EQ(cancelled.status().code(), absl::StatusCode::kCancelled) << name;
    EXPECT_THAT(std::string(cancelled.status().message()), HasSubstr("second"));
    EXPECT_EQ(last_step, 3);
    EXPECT_FALSE(method->task_active());
    EXPECT_EQ(MaxDiff(Logits(*served), served_logits), 0.0) << name;
    ExpectSameState(*method, *before);

    // Already cancelled before the first step.
    auto immediately = Trainer(o).Train(*served, *method, "second", {SyntheticTask("second", 1)});
    EXPECT_EQ(immediately.status().code(), absl::StatusCode::kCancelled);
    // The task can run again afterwards.
    cancel = false;
    o.on_progress = nullptr;
    o.max_steps = 4;
    auto rerun = Trainer(o).Train(*served, *method, "second", {SyntheticTask("second", 1)});
    ASSERT_TRUE(rerun.ok()) << rerun.status();
    EXPECT_EQ(method->num_tasks(), 2);
  }
}

TEST(TrainerTest, NonFiniteLossAbortsAndLeavesWeightsUntouched) {
  OneThread one_thread;
  auto base = TinyModel();
  for (const std::string name : {"seq_ft", "share_ella", "seq_lora", "ella"}) {
    auto method = MakeMethod(name);
    TrainOptions o;
    o.batch_size = 8;
    o.max_steps = 4;
    o.learning_rate = 1e-2;
    auto first = Trainer(o).Train(*base, *method, "first", {SyntheticTask("first")});
    ASSERT_TRUE(first.ok()) << first.status();
    std::unique_ptr<CausalLM> served = std::move(first->model);
    const at::Tensor served_logits = Logits(*served);
    auto before = method->ExportState();
    ASSERT_TRUE(before.ok());

    o.learning_rate = 1e30;
    o.max_grad_norm = 0;  // no clipping
    o.max_steps = 30;
    auto exploded = Trainer(o).Train(*served, *method, "second", {SyntheticTask("second", 1)});
    ASSERT_FALSE(exploded.ok()) << name;
    EXPECT_EQ(exploded.status().code(), absl::StatusCode::kAborted) << name;
    EXPECT_THAT(std::string(exploded.status().message()), HasSubstr("non-finite"));
    EXPECT_THAT(std::string(exploded.status().message()), HasSubstr("second"));
    EXPECT_FALSE(method->task_active());
    EXPECT_EQ(MaxDiff(Logits(*served), served_logits), 0.0) << name;
    ExpectSameState(*method, *before);
  }
}

TEST(TrainerTest, InjectedInfiniteExtraLossAborts) {
  OneThread one_thread;
  auto base = TinyModel();
  ProbeMethod probe(MakeMethod("seq_ft"));
  probe.inf_at_step = 2;
  TrainOptions o;
  o.batch_size = 8;
  o.max_steps = 6;
  const at::Tensor before = Logits(*base);
  auto result = Trainer(o).Train(*base, probe, "t", {SyntheticTask("t")});
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kAborted);
  EXPECT_THAT(std::string(result.status().message()), HasSubstr("extra loss"));
  EXPECT_THAT(std::string(result.status().message()), HasSubstr("step 3"));
  EXPECT_EQ(probe.after_step, 2);  // steps 0 and 1 ran, on the working copy only
  EXPECT_EQ(probe.inner().num_tasks(), 0);
  EXPECT_FALSE(probe.inner().task_active());
  EXPECT_EQ(MaxDiff(Logits(*base), before), 0.0);
}

// ---- stories260K + cl-small
// ----------------------------------------------------------------------------------

struct Stories {
  std::unique_ptr<CausalLM> model;
  std::unique_ptr<Tokenizer> tokenizer;
};

Stories LoadStories() {
  Stories s;
  auto model = CausalLM::Load(kShared + "/models/stories260K");
  EXPECT_TRUE(model.ok()) << model.status();
  auto tok = Tokenizer::FromDirectory(kShared + "/models/stories260K");
  EXPECT_TRUE(tok.ok()) << tok.status();
  s.model = std::move(model).value();
  s.tokenizer = std::move(tok).value();
  return s;
}

TaskData LoadTask(const std::string& name) {
  auto task = LoadTaskDir(kShared + "/data/cl-small/" + name);
  EXPECT_TRUE(task.ok()) << task.status();
  return std::move(task).value();
}

// Mean loss of the trained model on the completions of `examples` (no grad).
double CompletionLoss(const CausalLM& model, const std::vector<EncodedExample>& examples) {
  c10::InferenceMode guard;
  double total = 0;
  int64_t tokens = 0;
  for (const auto& e : examples) {
    at::Tensor ids = at::tensor(std::vector<int64_t>(e.ids.begin(), e.ids.end())).view({1, -1});
    at::Tensor lp = at::log_softmax(model.Forward(ids, at::Tensor()), -1)[0];
    for (int64_t t = e.target_start; t < e.length(); ++t) {
      total -= lp[t - 1][e.ids[static_cast<size_t>(t)]].item<double>();
      ++tokens;
    }
  }
  return total / static_cast<double>(tokens);
}

TEST(TrainerStoriesTest, DefaultMethodLearnsCapitals) {
  OneThread one_thread;
  Stories s = LoadStories();
  TaskData capitals = LoadTask("capitals");
  TrainTask task = MakeTrainTask("capitals", *s.tokenizer, capitals.train);
  MethodConfig mc = testing::QvTestConfig();
  mc.target_modules = {"all-linear"};
  auto method = MakeMethod(kDefaultMethod, mc);
  TrainOptions o;
  o.learning_rate = 3e-3;
  o.batch_size = 16;
  o.max_steps = 40;
  o.warmup_steps = 4;
  const double before = CompletionLoss(*s.model, task.examples);
  const auto start = std::chrono::steady_clock::now();
  auto result = Trainer(o).Train(*s.model, *method, "capitals", {task});
  ASSERT_TRUE(result.ok()) << result.status();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double after = CompletionLoss(*result->model, task.examples);
  std::printf(
      "stories260K share_ella capitals: %lld steps in %.2fs (%.0f tok/s), loss %.3f -> %.3f "
      "(completion loss %.3f -> %.3f)\n",
      static_cast<long long>(result->steps), seconds, result->tokens / result->seconds, result->first_loss,
      result->final_loss, before, after);
  EXPECT_LT(result->final_loss, result->first_loss - 0.5);
  EXPECT_LT(after, before - 0.5);
}

double EnvDouble(const char* name, double fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atof(v) : fallback;
}

struct SequenceResult {
  std::vector<double> capitals_em;    // after each stage
  std::vector<double> capitals_loss;  // completion loss on capitals after each stage
  std::vector<double> own_loss;       // each task's completion loss right after it trained
  double seconds = 0;
};

// Trains capitals -> iso3 -> langid with `method_name` and tracks capitals recall.
SequenceResult RunSequence(const Stories& s, const std::string& method_name, const MethodConfig& mc,
                           const TrainOptions& first_options, const TrainOptions& later_options) {
  SequenceResult r;
  const auto start = std::chrono::steady_clock::now();
  auto method = MakeMethod(method_name, mc);
  std::unique_ptr<CausalLM> served = s.model->ShallowCopy();
  const TaskData capitals = LoadTask("capitals");
  const std::vector<EncodedExample> capitals_enc = EncodeExamples(*s.tokenizer, capitals.train);
  for (const std::string name : {"capitals", "iso3", "langid"}) {
    const TaskData task = LoadTask(name);
    TrainTask train = MakeTrainTask(name, *s.tokenizer, task.train);
    const TrainOptions& o = r.capitals_em.empty() ? first_options : later_options;
    auto result = Trainer(o).Train(*served, *method, name, {train});
    EXPECT_TRUE(result.ok()) << method_name << " " << name << ": " << result.status();
    if (!result.ok()) return r;
    served = std::move(result->model);
    auto em = ScoreExactMatch(*served, *s.tokenizer, capitals.test, ExactMatchOptions{64});
    EXPECT_TRUE(em.ok()) << em.status();
    r.capitals_em.push_back(em->accuracy);
    r.capitals_loss.push_back(CompletionLoss(*served, capitals_enc));
    r.own_loss.push_back(result->final_loss);
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf(
      "%-10s capitals EM %.3f -> %.3f -> %.3f, capitals loss %.3f -> %.3f -> %.3f, task losses %.3f %.3f "
      "%.3f "
      "(%.1fs)\n",
      method_name.c_str(), r.capitals_em[0], r.capitals_em[1], r.capitals_em[2], r.capitals_loss[0],
      r.capitals_loss[1], r.capitals_loss[2], r.own_loss[0], r.own_loss[1], r.own_loss[2], r.seconds);
  return r;
}

// The forgetting check: on stories260K, seq_lora measurably forgets capitals after
// iso3 and langid; share_ella forgets less. λ = 10 (on the rms-normalised past) is a middle
// setting measured with this test: λ = 1 keeps little recall, λ ≥ 30 slows the later tasks
// (iso3's loss stays high). STRATA_FORGET_{LAMBDA,LR,STEPS,LATER_STEPS} override the settings.
// It runs the published Share training (share_training "subspace"): with the default LoRA fold the
// merged weights forget capitals after iso3 as seq_lora does at λ = 10 (measured: recall 0 after
// iso3), since a full-rank-p LoRA is not held to the subspace; retention then comes from routing
// (task-routed and auto-routed views, docs/benchmarks.md).
TEST(TrainerStoriesTest, SeqLoraForgetsAndShareEllaForgetsLess) {
  OneThread one_thread;
  Stories s = LoadStories();
  MethodConfig mc = testing::QvTestConfig();
  mc.share_training = "subspace";
  mc.target_modules = {"all-linear"};
  mc.rank = 8;
  mc.p = 8;
  mc.ella_lambda = EnvDouble("STRATA_FORGET_LAMBDA", 10.0);
  TrainOptions o;
  o.learning_rate = EnvDouble("STRATA_FORGET_LR", 3e-3);
  o.batch_size = 16;
  o.max_steps = static_cast<int64_t>(EnvDouble("STRATA_FORGET_STEPS", 300));
  o.warmup_steps = 10;
  TrainOptions later = o;
  later.max_steps = static_cast<int64_t>(EnvDouble("STRATA_FORGET_LATER_STEPS", 100));
  const SequenceResult seq = RunSequence(s, "seq_lora", mc, o, later);
  const SequenceResult se = RunSequence(s, "share_ella", mc, o, later);
  ASSERT_EQ(seq.capitals_em.size(), 3u);
  ASSERT_EQ(se.capitals_em.size(), 3u);
  // Both learn capitals (300 steps of batch 16: ~85% recall).
  EXPECT_GT(seq.capitals_em[0], 0.5);
  EXPECT_GT(se.capitals_em[0], 0.5);
  // seq_lora forgets: (nearly) all recall is gone and the loss on capitals rises sharply.
  EXPECT_LT(seq.capitals_em[2], 0.25 * seq.capitals_em[0]);
  const double seq_rise = seq.capitals_loss[2] - seq.capitals_loss[0];
  EXPECT_GT(seq_rise, 2.0);
  // share_ella forgets less: recall survives longer, the loss rises far less.
  EXPECT_GT(se.capitals_em[1], seq.capitals_em[1] + 0.05);
  EXPECT_GE(se.capitals_em[2], seq.capitals_em[2]);
  EXPECT_LT(se.capitals_loss[2] - se.capitals_loss[0], 0.5 * seq_rise);
}

}  // namespace
}  // namespace strata
