// The method registry (method_config.h, MethodRegistrar) and the training recipe (recipe.h).

#include "core/adapt/recipe.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <set>

#include "core/adapt/method.h"

namespace strata {
namespace {

using ::testing::HasSubstr;

TEST(MethodRegistryTest, EveryMethodRegistersWithItsCapabilities) {
  const std::vector<std::string> names = MethodNames();
  ASSERT_EQ(names.size(), 10u);
  EXPECT_EQ(names.front(), kDefaultMethod);
  std::set<std::string> options;
  for (const MethodOption& o : AllMethodOptions()) options.insert(o.name);
  for (const MethodDescriptor& d : MethodDescriptors()) {
    auto m = CreateMethod(d.name, MethodConfig{});
    ASSERT_TRUE(m.ok()) << d.name << ": " << m.status();
    EXPECT_EQ((*m)->name(), d.name);
    // The descriptor's capabilities are the method's.
    EXPECT_EQ((*m)->SupportsTaskRouting(), d.task_routing) << d.name;
    EXPECT_EQ((*m)->joint(), d.joint) << d.name;
    for (const std::string& o : d.options)
      EXPECT_TRUE(options.count(o)) << d.name << " reads unregistered " << o;
  }
  EXPECT_TRUE(FindMethodDescriptor("share")->adapter_import);
  EXPECT_FALSE(FindMethodDescriptor("seq_lora")->adapter_import);
  absl::Status unknown = CheckMethodName("lora_magic");
  EXPECT_EQ(unknown.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(unknown.message()), HasSubstr("share_ella, share, ella"));
}

TEST(MethodRegistryTest, ConfigJsonCoversEveryOptionAndRefusesUnknownFields) {
  MethodConfig c;
  c.k_max = 5;
  c.share_training = "subspace";
  c.pm_epsilon = 0.3;
  c.target_modules = {"q_proj", "v_proj"};
  c.seed = 7;
  auto back = MethodConfigFromJson(MethodConfigToJson(c));
  ASSERT_TRUE(back.ok()) << back.status();
  for (const MethodOption& o : AllMethodOptions()) {
    EXPECT_EQ(MethodOptionText(*back, o), MethodOptionText(c, o)) << o.name;
  }
  auto bad = MethodConfigFromJson(R"({"k_max": 4, "kmax": 3})", "cfg.json");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("cfg.json: unknown field \"kmax\""));
  auto wrong_type = MethodConfigFromJson(R"({"k_max": "4"})", "cfg.json");
  EXPECT_THAT(std::string(wrong_type.status().message()), HasSubstr("\"k_max\" must be an integer"));
}

TEST(MethodRegistryTest, ValidationNamesTheField) {
  MethodConfig c;
  c.energy_threshold = 1.5;
  EXPECT_THAT(std::string(ValidateMethodConfig(c).message()),
              HasSubstr("energy_threshold must be in (0, 1]"));
  c = MethodConfig{};
  c.alpha = std::numeric_limits<double>::infinity();
  EXPECT_THAT(std::string(ValidateMethodConfig(c).message()), HasSubstr("alpha must be finite and > 0"));
  c = MethodConfig{};
  c.osft_rank = "random";
  EXPECT_THAT(std::string(ValidateMethodConfig(c).message()),
              HasSubstr("osft_rank must be \"uniform\" or \"adaptive\""));
}

TEST(MethodRegistryTest, FlagsFromTheCommandLineAndEnvironment) {
  setenv("STRATA_TEST_K_MAX", "12", 1);
  setenv("STRATA_TEST_PHI", "3", 1);
  std::vector<std::string> args = {"prog",
                                   "--phi=4",
                                   "--lambda",
                                   "0.25",
                                   "--grpc_port=1",
                                   "--targets=q_proj,v_proj",
                                   "--share_training",
                                   "subspace"};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  int argc = static_cast<int>(args.size());
  MethodConfig c;
  ASSERT_TRUE(ParseMethodOptionFlags(&argc, argv.data(), &c, "STRATA_TEST_").ok());
  unsetenv("STRATA_TEST_K_MAX");
  unsetenv("STRATA_TEST_PHI");
  EXPECT_EQ(c.k_max, 12);  // environment
  EXPECT_EQ(c.phi, 4);     // the command line wins
  EXPECT_EQ(c.ella_lambda, 0.25);
  EXPECT_EQ(c.share_training, "subspace");
  EXPECT_EQ(c.target_modules, (std::vector<std::string>{"q_proj", "v_proj"}));
  ASSERT_EQ(argc, 2);  // the rest is left for absl
  EXPECT_STREQ(argv[1], "--grpc_port=1");

  std::vector<std::string> bad = {"prog", "--k_max=0"};
  std::vector<char*> bad_argv = {bad[0].data(), bad[1].data(), nullptr};
  int bad_argc = 2;
  absl::Status st = ParseMethodOptionFlags(&bad_argc, bad_argv.data(), &c, "STRATA_TEST_");
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()), HasSubstr("--k_max: must be finite and >= 1, got 0"));
  EXPECT_THAT(MethodOptionsHelp(), HasSubstr("--pm_epsilon=0.1"));
}

TEST(RecipeTest, DefaultsAreValidAndOneWarmup) {
  TrainingRecipe r;
  EXPECT_TRUE(ValidateRecipe(r).ok());
  EXPECT_EQ(r.method, kDefaultMethod);
  EXPECT_EQ(r.warmup_ratio, kDefaultWarmupRatio);
  EXPECT_EQ(r.method_config.target_modules, std::vector<std::string>{"all-linear"});
  EXPECT_EQ(r.method_config.ella_lambda, 0.0);
  r.learning_rate = std::numeric_limits<double>::quiet_NaN();
  EXPECT_THAT(std::string(ValidateRecipe(r).message()), HasSubstr("learning_rate"));
  r = TrainingRecipe{};
  r.method = "nope";
  EXPECT_THAT(std::string(ValidateRecipe(r).message()),
              HasSubstr("unknown method 'nope' (valid: share_ella, share"));
  EXPECT_THAT(RecipeToJson(TrainingRecipe{}), HasSubstr("\"k_max\":32"));
}

TEST(RecipeTest, JsonRoundTripsAndNamesBadFields) {
  TrainingRecipe r;
  r.method = "osft";
  r.SetRank(4);
  r.method_config.target_modules = {"q_proj", "o_proj"};
  r.learning_rate = 3e-4;
  r.max_steps = 0;
  r.epochs = 3;
  r.batch_size = 5;
  r.max_seq_len = 99;
  r.warmup_steps = 7;
  r.lr_schedule = "cosine";
  r.seed = 12345678901ULL;
  auto back = RecipeFromJson(RecipeToJson(r));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(RecipeToJson(*back), RecipeToJson(r));
  EXPECT_EQ(back->seed, r.seed);
  EXPECT_EQ(back->method_config.target_modules, r.method_config.target_modules);
  EXPECT_THAT(std::string(RecipeFromJson(R"({"nope": 1})").status().message()),
              HasSubstr("unknown field 'nope'"));
  EXPECT_THAT(std::string(RecipeFromJson(R"({"batch_size": "x"})").status().message()),
              HasSubstr("recipe: "));
  EXPECT_THAT(std::string(RecipeFromJson(R"({"learning_rate": -1})").status().message()),
              HasSubstr("learning_rate"));
}

TEST(RecipeTest, TaskRecipeAgainstTheState) {
  TrainingRecipe defaults;
  defaults.method_config.ella_lambda = 0.1;
  defaults.method_config.pm_epsilon = 0.2;
  CommittedState empty{"share_ella", 0, MethodConfig{}};
  TrainOverrides o;
  o.rank = 4;
  o.alpha = 8;
  o.learning_rate = 1e-3;
  auto first = ResolveTaskRecipe(defaults, "", o, empty);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->method_config.rank, 4);
  EXPECT_EQ(first->method_config.p, 4);
  EXPECT_EQ(first->method_config.alpha, 8);
  EXPECT_EQ(first->learning_rate, 1e-3);

  // Later tasks: the state's config; per-task options from the defaults and overrides.
  MethodConfig state_config = first->method_config;
  state_config.ella_lambda = 0.9;
  state_config.k_max = 16;  // shapes the state: kept
  CommittedState learned{"share_ella", 1, state_config};
  TrainOverrides later;
  later.ella_lambda = 0.5;
  auto second = ResolveTaskRecipe(defaults, "share_ella", later, learned);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(second->method_config.k_max, 16);
  EXPECT_EQ(second->method_config.ella_lambda, 0.5);
  EXPECT_EQ(second->method_config.pm_epsilon, 0.2);
  EXPECT_EQ(second->method_config.rank, 4);

  TrainOverrides rank8;
  rank8.rank = 8;
  auto fixed = ResolveTaskRecipe(defaults, "", rank8, learned);
  EXPECT_EQ(fixed.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(fixed.status().message()), HasSubstr("overrides.rank: the rank is fixed"));
  auto other = ResolveTaskRecipe(defaults, "osft", TrainOverrides{}, learned);
  EXPECT_EQ(other.status().code(), absl::StatusCode::kFailedPrecondition);
  auto unknown = ResolveTaskRecipe(defaults, "lora_magic", TrainOverrides{}, learned);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  TrainOverrides inf_alpha;
  inf_alpha.alpha = std::numeric_limits<double>::infinity();
  auto inf = ResolveTaskRecipe(defaults, "", inf_alpha, empty);
  EXPECT_EQ(inf.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(inf.status().message()), HasSubstr("overrides.alpha"));
  TrainOverrides inf_lambda;
  inf_lambda.ella_lambda = std::numeric_limits<double>::infinity();
  EXPECT_EQ(ResolveTaskRecipe(defaults, "", inf_lambda, empty).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(RecipeTest, SetTaskConfigChangesOnlyPerTaskOptions) {
  auto m = CreateMethod("share_ella", MethodConfig{});
  ASSERT_TRUE(m.ok());
  MethodConfig next = (*m)->config();
  next.ella_lambda = 2.0;
  EXPECT_TRUE((*m)->SetTaskConfig(next).ok());
  EXPECT_EQ((*m)->config().ella_lambda, 2.0);
  next.k_max = 3;
  absl::Status st = (*m)->SetTaskConfig(next);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()), HasSubstr("k_max is fixed by the state (32), got 3"));
}

}  // namespace
}  // namespace strata
