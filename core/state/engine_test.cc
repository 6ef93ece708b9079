// The adaptation engine on the real stories260K model with small cl-small tasks.

#include "core/state/engine.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <atomic>
#include <filesystem>
#include <fstream>

#include "core/adapt/method.h"
#include "core/data/dataset.h"
#include "core/model/model.h"
#include "core/model/runtime.h"
#include "core/model/tokenizer.h"
#include "core/state/checkpoint.h"

namespace strata {
namespace {
namespace fs = std::filesystem;

const std::string kModel = std::string(STRATA_SHARED_DIR) + "/models/stories260K";

struct Dir {
  Dir() {
    path = (fs::temp_directory_path() /
            ("strata-engine-" + std::to_string(::getpid()) + "-" + std::to_string(n++)))
               .string();
    fs::remove_all(path);
  }
  ~Dir() { fs::remove_all(path); }
  std::string path;
  static inline int n = 0;
};

EngineOptions Options(const std::string& dir, const std::string& method = "share_ella") {
  EngineOptions o;
  o.state_dir = dir;
  o.base_model_id = kModel;
  o.recipe.method = method;
  o.recipe.max_steps = 8;
  o.recipe.batch_size = 8;
  o.recipe.learning_rate = 3e-3;
  o.recipe.method_config.target_modules = {"q_proj", "v_proj"};
  o.reference_text_path = std::string(STRATA_SHARED_DIR) + "/data/lm/tinystories_val.txt";
  o.reference_max_texts = 4;
  o.training_threads = 2;
  return o;
}

absl::StatusOr<std::unique_ptr<Engine>> MakeEngine(const EngineOptions& o) {
  auto model = CausalLM::Load(kModel);
  if (!model.ok()) return model.status();
  auto tok = Tokenizer::FromDirectory(kModel);
  if (!tok.ok()) return tok.status();
  ModelSummary summary;
  summary.name = "stories260K";
  return Engine::Create(std::move(*model), std::shared_ptr<const Tokenizer>(std::move(*tok)), summary, o);
}

TaskData Task(const std::string& name) {
  TaskLoadOptions lo;
  lo.max_train = 32;
  lo.max_test = 16;
  auto t = LoadTaskDir(std::string(STRATA_SHARED_DIR) + "/data/cl-small/" + name, lo);
  EXPECT_TRUE(t.ok()) << t.status();
  return *t;
}

JobRecord Job(const std::string& name, const std::string& id) {
  JobRecord j;
  j.id = id;
  j.spec.name = name;
  return j;
}

at::Tensor Logits(const CausalLM& model) {
  c10::InferenceMode guard;
  auto ids = torch::tensor({1, 403, 407, 261, 378}, torch::kLong).unsqueeze(0);
  return model.Forward(ids, at::Tensor());
}

TEST(Engine, LearnsTasksPublishesVersionsAndRestoresFromCheckpoint) {
  SetTorchThreads(2);
  Dir dir;
  auto engine = MakeEngine(Options(dir.path));
  ASSERT_TRUE(engine.ok()) << engine.status();
  auto v1 = (*engine)->Current();
  EXPECT_EQ(v1->version, 1);
  at::Tensor base_logits = Logits(*v1->model);

  int published = 0;
  (*engine)->SetOnPublish([&] { ++published; });
  std::atomic<bool> cancel{false};
  int progress_calls = 0;
  JobContext ctx;
  ctx.cancel = &cancel;
  ctx.progress = [&](const JobProgress& p) {
    ++progress_calls;
    EXPECT_EQ(p.total_steps, 8);
  };
  auto capitals = Task("capitals");
  auto r1 = (*engine)->RunJob(Job("capitals", "job-000001"), capitals.train, capitals.test, ctx);
  ASSERT_TRUE(r1.ok()) << r1.status();
  EXPECT_EQ(r1->weights_version, 2);
  EXPECT_EQ(progress_calls, 8);
  EXPECT_EQ(published, 1);
  // The version handed out before is untouched (in-flight requests finish on it).
  EXPECT_TRUE(torch::allclose(Logits(*v1->model), base_logits));
  auto v2 = (*engine)->Current();
  EXPECT_EQ(v2->version, 2);
  EXPECT_FALSE(torch::allclose(Logits(*v2->model), base_logits));

  auto langid = Task("langid");
  auto r2 = (*engine)->RunJob(Job("langid", "job-000002"), langid.train, langid.test, ctx);
  ASSERT_TRUE(r2.ok()) << r2.status();
  ASSERT_EQ(r2->eval_results.size(), 2u);
  EXPECT_EQ(r2->eval_results[0].first, "capitals");
  EXPECT_TRUE((*engine)->TaskIsLearned("langid"));

  auto report = (*engine)->Report();
  ASSERT_EQ(report.tasks, (std::vector<std::string>{"capitals", "langid"}));
  ASSERT_EQ(report.matrix.size(), 2u);
  ASSERT_EQ(report.matrix[0].size(), 2u);
  EXPECT_FALSE(std::isnan(report.matrix[0][1]));  // langid scored before it was learned (FWT)
  EXPECT_TRUE(report.average_score.has_value());
  EXPECT_TRUE(report.backward_transfer.has_value());
  EXPECT_EQ(report.reference_nll.size(), 3u);
  EXPECT_GT(report.adaptation_state_bytes, 0);
  auto tasks = (*engine)->Tasks();
  ASSERT_EQ(tasks.size(), 2u);
  EXPECT_EQ(tasks[1].index, 2);
  EXPECT_EQ(tasks[1].scorer, "choice");
  EXPECT_EQ(tasks[0].scorer, "exact_match");
  EXPECT_GE(tasks[0].history.size(), 3u);  // base, after capitals, after langid

  auto routed = (*engine)->Routed(*(*engine)->Current(), "capitals");
  ASSERT_TRUE(routed.ok()) << routed.status();
  EXPECT_EQ((*engine)->Routed(*(*engine)->Current(), "nope").status().code(), absl::StatusCode::kNotFound);
  // Cached for this version: the same model again.
  auto routed_again = (*engine)->Routed(*(*engine)->Current(), "capitals");
  ASSERT_TRUE(routed_again.ok()) << routed_again.status();
  EXPECT_EQ(routed_again->get(), routed->get());
  {
    // A method without per-task weights: FAILED_PRECONDITION naming the methods that route.
    Dir other_dir;
    auto seq = MakeEngine(Options(other_dir.path, "seq_lora"));
    ASSERT_TRUE(seq.ok()) << seq.status();
    auto refused = (*seq)->Routed(*(*seq)->Current(), "capitals");
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_NE(std::string(refused.status().message()).find("inc_lora"), std::string::npos)
        << refused.status();
  }

  auto scores = (*engine)->ScoreCompletions(*v2->model, "Word: maison\nLanguage:", {" english", " french"});
  ASSERT_TRUE(scores.ok()) << scores.status();
  EXPECT_EQ(scores->log_likelihood.size(), 2u);

  at::Tensor served_logits = Logits(*(*engine)->Current()->model);
  auto report_before = (*engine)->Report();
  engine->reset();

  // Restart: same tasks, scores, version and served weights.
  auto restarted = MakeEngine(Options(dir.path));
  ASSERT_TRUE(restarted.ok()) << restarted.status();
  EXPECT_EQ((*restarted)->Current()->version, 3);
  EXPECT_TRUE(torch::allclose(Logits(*(*restarted)->Current()->model), served_logits, 1e-5, 1e-5));
  auto report_after = (*restarted)->Report();
  EXPECT_EQ(report_after.tasks, report_before.tasks);
  EXPECT_EQ(report_after.matrix, report_before.matrix);
  EXPECT_EQ(report_after.reference_nll, report_before.reference_nll);

  // Another base model is refused.
  auto other = Options(dir.path);
  other.base_model_id = "some-other-model";
  auto refused = MakeEngine(other);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
}

// Automatic routing: after two tasks, each task's prompts go to it and stories to the base model;
// a batch whose rows take different routes generates what each row generates alone; the router,
// the three evaluation views and the router accuracy survive a restart.
TEST(Engine, RoutesAutomaticallyPerRowAndKeepsTheRouterAcrossRestarts) {
  SetTorchThreads(2);
  Dir dir;
  auto engine = MakeEngine(Options(dir.path));
  ASSERT_TRUE(engine.ok()) << engine.status();
  JobContext ctx;
  TaskLoadOptions lo;
  lo.max_train = 120;
  lo.max_test = 24;
  for (const std::string name : {"capitals", "langid"}) {
    auto t = LoadTaskDir(std::string(STRATA_SHARED_DIR) + "/data/cl-small/" + name, lo);
    ASSERT_TRUE(t.ok()) << t.status();
    auto r = (*engine)->RunJob(Job(name, "job-" + name), t->train, t->test, ctx);
    ASSERT_TRUE(r.ok()) << r.status();
  }
  auto report = (*engine)->Report();
  ASSERT_EQ(report.auto_matrix.size(), 2u);
  ASSERT_EQ(report.routed_matrix.size(), 2u);
  ASSERT_EQ(report.router_accuracy.size(), 2u);
  EXPECT_EQ(report.router_accuracy[1], (std::vector<double>{1.0, 1.0}));
  EXPECT_TRUE(std::isnan(report.router_accuracy[0][1]));  // langid was not known after stage 1
  // Every prompt routed to its own task: the auto view equals the named view.
  EXPECT_EQ(report.auto_matrix[1], report.routed_matrix[1]);
  EXPECT_TRUE(report.auto_average_score.has_value());
  ASSERT_EQ(report.reference_nll_auto.size(), 3u);
  // Stories go (nearly all) to the base model: its reference NLL is kept within 5 %.
  EXPECT_LT(report.reference_nll_auto[2], 1.05 * report.reference_nll_auto[0]);
  EXPECT_GT(report.router_bytes, 0);
  auto tasks = (*engine)->Tasks();
  EXPECT_EQ(tasks[0].router_accuracy, 1.0);

  const std::vector<std::string> prompts = {"The capital of France is", "Word: maison\nLanguage:",
                                            "Once upon a time, there was a little girl named Lily.",
                                            "The capital of Italy is"};
  auto version = (*engine)->Current();
  auto choices = (*engine)->ResolveBatch(*version, "auto", prompts);
  ASSERT_TRUE(choices.ok()) << choices.status();
  std::vector<std::string> routes;
  for (const auto& c : *choices) {
    routes.push_back(c.route);
    EXPECT_TRUE(c.automatic);
    EXPECT_GT(c.confidence, 0.5);
  }
  EXPECT_EQ(routes, (std::vector<std::string>{"capitals", "langid", "base", "capitals"}));
  // Named routes and their errors.
  EXPECT_EQ((*engine)->Resolve(*version, "langid", prompts[0])->route, "langid");
  // A task route (Share's basis with the task's core on every target) decodes one stream as one
  // team over the threads (2 here; 1 in ThreadSanitizer builds), like the base model (decode_step.cc).
  EXPECT_EQ((*engine)->Resolve(*version, "langid", prompts[0])->model->DecodeStepTeamSize(1),
            GetTorchThreads());
  EXPECT_EQ((*engine)->Resolve(*version, "merged", prompts[0])->model.get(), version->model.get());
  EXPECT_EQ((*engine)->Resolve(*version, "base", prompts[0])->route, "base");
  EXPECT_EQ((*engine)->Resolve(*version, "nope", prompts[0]).status().code(), absl::StatusCode::kNotFound);

  // One batch over three routes = each row alone.
  SamplingOptions greedy;
  greedy.max_new_tokens = 12;
  auto batch = (*engine)->GenerateRouted(*version, "auto", prompts, greedy);
  ASSERT_TRUE(batch.ok()) << batch.status();
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto alone = (*engine)->GenerateRouted(*version, "auto", {prompts[i]}, greedy);
    ASSERT_TRUE(alone.ok()) << alone.status();
    EXPECT_EQ((*batch)[i].first.route, (*alone)[0].first.route) << i;
    EXPECT_EQ((*batch)[i].second.ids, (*alone)[0].second.ids) << i << " " << prompts[i];
  }

  engine->reset();
  auto restarted = MakeEngine(Options(dir.path));
  ASSERT_TRUE(restarted.ok()) << restarted.status();
  auto after = (*restarted)->Report();
  auto same = [](const std::vector<std::vector<double>>& a, const std::vector<std::vector<double>>& b) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i) {
      if (a[i].size() != b[i].size()) return false;
      for (size_t j = 0; j < a[i].size(); ++j) {
        if (!(a[i][j] == b[i][j] || (std::isnan(a[i][j]) && std::isnan(b[i][j])))) return false;
      }
    }
    return true;
  };
  EXPECT_TRUE(same(after.router_accuracy, report.router_accuracy));
  EXPECT_TRUE(same(after.auto_matrix, report.auto_matrix));
  EXPECT_TRUE(same({after.reference_nll_auto}, {report.reference_nll_auto}));
  EXPECT_EQ(after.router_bytes, report.router_bytes);
  auto again = (*restarted)->ResolveBatch(*(*restarted)->Current(), "auto", prompts);
  ASSERT_TRUE(again.ok()) << again.status();
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_EQ((*again)[i].route, routes[i]) << i;
    EXPECT_DOUBLE_EQ((*again)[i].confidence, (*choices)[i].confidence) << i;
  }
}

TEST(Engine, CancelledAndFailedTasksLeaveTheStateUntouched) {
  SetTorchThreads(2);
  Dir dir;
  auto engine = MakeEngine(Options(dir.path));
  ASSERT_TRUE(engine.ok()) << engine.status();
  at::Tensor base_logits = Logits(*(*engine)->Current()->model);
  auto capitals = Task("capitals");

  std::atomic<bool> cancel{true};
  JobContext ctx;
  ctx.cancel = &cancel;
  auto r = (*engine)->RunJob(Job("capitals", "job-000001"), capitals.train, capitals.test, ctx);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled) << r.status();
  EXPECT_EQ((*engine)->Current()->version, 1);
  EXPECT_FALSE((*engine)->TaskIsLearned("capitals"));

  cancel = false;
  auto job = Job("capitals", "job-000002");
  job.spec.overrides.learning_rate = 3e38;  // overflows fp32 in ΔW = s·B·A
  auto failed = (*engine)->RunJob(job, capitals.train, capitals.test, ctx);
  EXPECT_FALSE(failed.ok());
  EXPECT_EQ((*engine)->Current()->version, 1);
  EXPECT_TRUE(torch::allclose(Logits(*(*engine)->Current()->model), base_logits));
  EXPECT_FALSE(fs::exists(dir.path + "/checkpoint"));

  auto other_method = Job("capitals", "job-000003");
  other_method.spec.method = "seq_lora";
  EXPECT_EQ((*engine)->RunJob(other_method, capitals.train, capitals.test, ctx).status().code(),
            absl::StatusCode::kFailedPrecondition);

  // It still learns the task afterwards.
  auto ok = (*engine)->RunJob(Job("capitals", "job-000004"), capitals.train, capitals.test, ctx);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ((*engine)->Current()->version, 2);
}

// rank and alpha come from the first task's overrides (then they are fixed); λ is per task.
TEST(Engine, OverridesShapeTheFirstTaskAndLambdaIsPerTask) {
  SetTorchThreads(2);
  Dir dir;
  EngineOptions o = Options(dir.path);
  o.recipe.method_config.ella_lambda = 0.1;
  auto engine = MakeEngine(o);
  ASSERT_TRUE(engine.ok()) << engine.status();
  std::atomic<bool> cancel{false};
  JobContext ctx;
  ctx.cancel = &cancel;
  auto capitals = Task("capitals");
  auto iso3 = Task("iso3");

  auto first = Job("capitals", "job-000001");
  first.spec.overrides.rank = 4;
  first.spec.overrides.alpha = 8;
  first.spec.overrides.ella_lambda = 0.5;
  auto r1 = (*engine)->RunJob(first, capitals.train, capitals.test, ctx);
  ASSERT_TRUE(r1.ok()) << r1.status();
  EXPECT_EQ((*engine)->Current()->method->config().rank, 4);
  EXPECT_EQ((*engine)->Current()->method->config().p, 4);
  EXPECT_EQ((*engine)->Current()->method->config().alpha, 8);
  EXPECT_EQ((*engine)->Current()->method->config().ella_lambda, 0.5);

  auto bad_rank = Job("iso3", "job-000002");
  bad_rank.spec.overrides.rank = 8;
  auto r2 = (*engine)->RunJob(bad_rank, iso3.train, iso3.test, ctx);
  EXPECT_EQ(r2.status().code(), absl::StatusCode::kFailedPrecondition) << r2.status();
  EXPECT_NE(std::string(r2.status().message()).find("overrides.rank"), std::string::npos) << r2.status();
  auto bad_alpha = Job("iso3", "job-000003");
  bad_alpha.spec.overrides.alpha = 16;
  auto r3 = (*engine)->RunJob(bad_alpha, iso3.train, iso3.test, ctx);
  EXPECT_EQ(r3.status().code(), absl::StatusCode::kFailedPrecondition) << r3.status();
  EXPECT_NE(std::string(r3.status().message()).find("overrides.alpha"), std::string::npos) << r3.status();
  auto bad_lambda = Job("iso3", "job-000004");
  bad_lambda.spec.overrides.ella_lambda = -1;
  auto r4 = (*engine)->RunJob(bad_lambda, iso3.train, iso3.test, ctx);
  EXPECT_EQ(r4.status().code(), absl::StatusCode::kInvalidArgument) << r4.status();
  EXPECT_NE(std::string(r4.status().message()).find("ella_lambda"), std::string::npos) << r4.status();
  EXPECT_EQ((*engine)->Current()->version, 2);
  // CheckTask (what the server asks before it accepts a task) refuses the same, with the same codes.
  EXPECT_EQ((*engine)->CheckTask(bad_rank.spec).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*engine)->CheckTask(bad_alpha.spec).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*engine)->CheckTask(bad_lambda.spec).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*engine)->CheckTask(first.spec).status().code(), absl::StatusCode::kAlreadyExists);
  auto other_method = Job("iso3", "job-000006");
  other_method.spec.method = "osft";
  EXPECT_EQ((*engine)->CheckTask(other_method.spec).status().code(), absl::StatusCode::kFailedPrecondition);
  other_method.spec.method = "lora_magic";
  EXPECT_EQ((*engine)->CheckTask(other_method.spec).status().code(), absl::StatusCode::kInvalidArgument);
  auto fine = (*engine)->CheckTask(Job("iso3", "job-000007").spec);
  ASSERT_TRUE(fine.ok()) << fine.status();
  EXPECT_EQ(fine->method_config.rank, 4);
  EXPECT_EQ(fine->method_config.ella_lambda, 0.1);

  // Without overrides the second task trains with the server's λ; rank and alpha stay.
  auto r5 = (*engine)->RunJob(Job("iso3", "job-000005"), iso3.train, iso3.test, ctx);
  ASSERT_TRUE(r5.ok()) << r5.status();
  EXPECT_EQ((*engine)->Current()->method->config().ella_lambda, 0.1);
  EXPECT_EQ((*engine)->Current()->method->config().rank, 4);
  EXPECT_EQ((*engine)->Current()->method->config().alpha, 8);
}

// ella / share_ella checkpoints hold the served weights of the target modules (in the model's dtype),
// not a dense float32 W_past; a restarted engine continues with the ELLA penalty (λ > 0), which
// derives W_past = W_served − W0 (W0 bound when the engine rebuilds the served model).
TEST(Engine, CheckpointHoldsServedWeightsAndRestartContinuesWithThePenalty) {
  SetTorchThreads(2);
  Dir dir;
  EngineOptions o = Options(dir.path);
  o.recipe.method_config.ella_lambda = 0.5;
  o.reference_text_path.clear();
  {
    auto engine = MakeEngine(o);
    ASSERT_TRUE(engine.ok()) << engine.status();
    auto capitals = Task("capitals");
    auto r = (*engine)->RunJob(Job("capitals", "job-000001"), capitals.train, capitals.test, JobContext{});
    ASSERT_TRUE(r.ok()) << r.status();
  }
  auto checkpoint = LoadCheckpoint(dir.path);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  ASSERT_TRUE(checkpoint->has_value());
  int served = 0;
  for (const auto& [k, t] : (*checkpoint)->method_tensors) {
    EXPECT_NE(k.rfind("ella/", 0), 0u) << "dense W_past in the checkpoint: " << k;
    if (k.rfind("served/", 0) == 0) {
      ++served;
      EXPECT_EQ(t.scalar_type(), at::kFloat) << k;  // the model's dtype
    }
  }
  EXPECT_EQ(served, 10);  // q_proj and v_proj of 5 layers
  auto restarted = MakeEngine(o);
  ASSERT_TRUE(restarted.ok()) << restarted.status();
  auto langid = Task("langid");
  auto r2 = (*restarted)->RunJob(Job("langid", "job-000002"), langid.train, langid.test, JobContext{});
  ASSERT_TRUE(r2.ok()) << r2.status();
  EXPECT_EQ(r2->weights_version, 3);
}

// Replication in core: the trainer lists a published version's serving files (no eval splits), a
// replica engine adopts a copy of them (verified; another base model refused) and serves exactly
// the trainer's weights; the adopted state is its checkpoint after a restart.
TEST(Engine, ReplicaAdoptsThePublishedStateFiles) {
  SetTorchThreads(2);
  Dir trainer_dir, replica_dir;
  auto trainer = MakeEngine(Options(trainer_dir.path));
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  std::atomic<bool> cancel{false};
  JobContext ctx;
  ctx.cancel = &cancel;
  auto capitals = Task("capitals");
  ASSERT_TRUE((*trainer)->RunJob(Job("capitals", "job-000001"), capitals.train, capitals.test, ctx).ok());
  auto published = (*trainer)->PublishedStateOf(0);
  ASSERT_TRUE(published.ok()) << published.status();
  EXPECT_EQ(published->version, 2);
  EXPECT_EQ(published->base_model_id, kModel);
  EXPECT_EQ(published->tasks, (std::vector<std::string>{"capitals"}));
  std::vector<std::string> names;
  for (const auto& f : published->files) {
    names.push_back(f.name);
    EXPECT_GT(f.bytes, 0);
    EXPECT_EQ(f.sha256.size(), 64u);
  }
  EXPECT_EQ(names, (std::vector<std::string>{"method.safetensors", "state.json"}));
  EXPECT_EQ((*trainer)->PublishedStateOf(99).status().code(), absl::StatusCode::kNotFound);

  EngineOptions ro = Options(replica_dir.path);
  ro.replica = true;
  ro.reference_text_path.clear();
  auto replica = MakeEngine(ro);
  ASSERT_TRUE(replica.ok()) << replica.status();
  EXPECT_TRUE((*replica)->Versions().empty());
  EXPECT_EQ((*replica)->Rollback(std::nullopt).status().code(), absl::StatusCode::kFailedPrecondition);
  auto copy = [&](const std::string& name) {
    const std::string dir = replica_dir.path + "/" + name;
    fs::create_directories(dir);
    for (const auto& f : published->files) fs::copy_file(published->dir + "/" + f.name, dir + "/" + f.name);
    EXPECT_TRUE(WriteCheckpointManifest(dir, published->version, published->files).ok());
    return dir;
  };
  int swaps = 0;
  (*replica)->SetOnPublish([&] { ++swaps; });
  // A damaged file is refused (DATA_LOSS naming it) and nothing changes.
  const std::string damaged = copy(".checkpoint-tmp-damaged");
  { std::ofstream(damaged + "/state.json", std::ios::app) << " "; }
  auto refused = (*replica)->AdoptState(damaged);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kDataLoss) << refused.status();
  EXPECT_NE(refused.status().message().find("state.json"), std::string::npos);
  EXPECT_FALSE(fs::exists(damaged));
  EXPECT_EQ((*replica)->Current()->version, 1);

  auto before = (*replica)->Current();
  auto adopted = (*replica)->AdoptState(copy(".checkpoint-tmp-good"));
  ASSERT_TRUE(adopted.ok()) << adopted.status();
  EXPECT_EQ(swaps, 1);
  EXPECT_EQ((*replica)->Current()->version, 2);
  EXPECT_EQ(before->version, 1);  // a request holding the old version keeps it
  EXPECT_TRUE(torch::equal(Logits(*(*replica)->Current()->model), Logits(*(*trainer)->Current()->model)));
  auto t_routed = (*trainer)->Routed(*(*trainer)->Current(), "capitals");
  auto r_routed = (*replica)->Routed(*(*replica)->Current(), "capitals");
  ASSERT_TRUE(t_routed.ok() && r_routed.ok());
  EXPECT_TRUE(torch::equal(Logits(**t_routed), Logits(**r_routed)));
  ASSERT_EQ((*replica)->Tasks().size(), 1u);
  EXPECT_EQ((*replica)->Tasks()[0].name, "capitals");
  EXPECT_TRUE(fs::exists(replica_dir.path + "/checkpoint/manifest.json"));
  EXPECT_FALSE(fs::exists(replica_dir.path + "/tasks/capitals/eval.jsonl")) << "no eval data on a replica";

  // Restarted, the replica serves the adopted state at once.
  replica->reset();
  auto again = MakeEngine(ro);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ((*again)->Current()->version, 2);
  EXPECT_TRUE(torch::equal(Logits(*(*again)->Current()->model), Logits(*(*trainer)->Current()->model)));

  // Another base model is refused, naming both.
  EngineOptions other = ro;
  other.base_model_id = "/elsewhere/other-model";
  other.state_dir = replica_dir.path + "/other";
  auto wrong = MakeEngine(other);
  ASSERT_TRUE(wrong.ok()) << wrong.status();
  fs::create_directories(other.state_dir);
  std::string dir = other.state_dir + "/.checkpoint-tmp-x";
  fs::create_directories(dir);
  for (const auto& f : published->files) fs::copy_file(published->dir + "/" + f.name, dir + "/" + f.name);
  ASSERT_TRUE(WriteCheckpointManifest(dir, published->version, published->files).ok());
  auto mismatch = (*wrong)->AdoptState(dir);
  EXPECT_EQ(mismatch.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(mismatch.status().message().find("/elsewhere/other-model"), std::string::npos)
      << mismatch.status();
  EXPECT_NE(mismatch.status().message().find(kModel), std::string::npos) << mismatch.status();
  // A trainer engine adopts nothing.
  EXPECT_EQ((*trainer)->AdoptState(dir).status().code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace strata
