#include "core/adapt/router.h"

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <map>
#include <string>
#include <vector>

#include "core/data/dataset.h"
#include "core/eval/scorers.h"
#include "core/model/model.h"
#include "core/model/tokenizer.h"
#include "core/util/file_util.h"

namespace strata {
namespace {

// Gaussian clusters in 8 dimensions: cluster c has mean 4·e_c and unit noise.
at::Tensor Cluster(int c, int64_t n, at::Generator& gen, double spread = 1.0) {
  at::Tensor x = at::randn({n, 8}, gen, at::TensorOptions().dtype(at::kFloat)) * spread;
  x.select(1, c).add_(4.0);
  return x;
}

TEST(RouterTest, SeparatesTasksAndRefusesOutliers) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  TaskRouter router;
  EXPECT_TRUE(router.Route(Cluster(0, 3, gen))[0].task.empty());  // empty router: no task
  for (int c = 0; c < 3; ++c) {
    ASSERT_TRUE(router.AddTask("t" + std::to_string(c), Cluster(c, 200, gen), 2).ok());
  }
  EXPECT_EQ(router.TaskNames(), (std::vector<std::string>{"t0", "t1", "t2"}));
  for (int c = 0; c < 3; ++c) {
    auto decisions = router.Route(Cluster(c, 100, gen));
    int right = 0;
    for (const auto& d : decisions) {
      right += d.task == "t" + std::to_string(c);
      if (!d.task.empty()) {
        EXPECT_LE(d.distance, d.threshold);
        EXPECT_GT(d.confidence, 0.0);
        EXPECT_LE(d.confidence, 1.0);
      }
    }
    EXPECT_GE(right, 95) << "cluster " << c;
  }
  // Far from every task (another direction, far out): no task, with the nearest one named.
  at::Tensor far = Cluster(5, 50, gen) * 1.0;
  far.select(1, 5).add_(20.0);
  int none = 0;
  for (const auto& d : router.Route(far)) {
    none += d.task.empty() && d.task_index == -1;
    EXPECT_FALSE(d.nearest.empty());
    EXPECT_GT(d.distance, d.threshold * (d.task.empty() ? 1.0 : 0.0));
  }
  EXPECT_EQ(none, 50);
  EXPECT_EQ(router.StateBytesPerTask(), 8 * 4 + 24);
}

TEST(RouterTest, StateRoundTripAndBadInput) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(6);
  TaskRouter router;
  ASSERT_TRUE(router.AddTask("a", Cluster(0, 40, gen), 1).ok());
  ASSERT_TRUE(router.AddTask("b", Cluster(1, 40, gen), 1).ok());
  EXPECT_EQ(router.AddTask("a", Cluster(2, 40, gen), 1).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(router.AddTask("c", at::randn({40, 5}), 1).code(), absl::StatusCode::kInvalidArgument);  // width
  EXPECT_EQ(router.AddTask("c", Cluster(2, 1, gen), 1).code(),
            absl::StatusCode::kInvalidArgument);  // one prompt
  EXPECT_EQ(router.AddTask("c", Cluster(2, 40, gen), 2).code(), absl::StatusCode::kInvalidArgument);  // layer
  EXPECT_EQ(router.num_tasks(), 2);

  std::map<std::string, at::Tensor> tensors;
  std::string json;
  router.ExportState("router/", &tensors, &json);
  auto restored = TaskRouter::ImportState(json, "router/", tensors);
  ASSERT_TRUE(restored.ok()) << restored.status();
  EXPECT_EQ(restored->TaskNames(), router.TaskNames());
  EXPECT_EQ(restored->StateBytes(), router.StateBytes());
  at::Tensor probe = at::cat({Cluster(0, 10, gen), Cluster(1, 10, gen), Cluster(4, 10, gen) * 6.0}, 0);
  auto a = router.Route(probe);
  auto b = restored->Route(probe);
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].task, b[i].task) << i;
    EXPECT_DOUBLE_EQ(a[i].distance, b[i].distance) << i;
  }
  // A broken state is refused with the tensor named.
  tensors.erase("router/scatter");
  auto broken = TaskRouter::ImportState(json, "router/", tensors);
  ASSERT_FALSE(broken.ok());
  EXPECT_NE(broken.status().message().find("router/scatter"), std::string::npos);
  // The empty router round-trips as "{}".
  TaskRouter empty;
  std::map<std::string, at::Tensor> none;
  std::string empty_json;
  empty.ExportState("router/", &none, &empty_json);
  EXPECT_EQ(empty_json, "{}");
  EXPECT_TRUE(none.empty());
  EXPECT_TRUE(TaskRouter::ImportState(empty_json, "router/", none)->empty());
}

// On the real model: cl-small prompts route to their task (router built from the training
// prompts, measured on the test prompts), TinyStories text routes to no task.
TEST(RouterTest, RoutesClSmallPromptsAndSendsStoriesToTheBase) {
  const std::string shared = STRATA_SHARED_DIR;
  auto model = CausalLM::Load(shared + "/models/stories260K");
  ASSERT_TRUE(model.ok()) << model.status();
  auto tokenizer = Tokenizer::FromDirectory(shared + "/models/stories260K");
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  TaskRouter router;
  const int64_t layer = router.FeatureLayer(**model);
  std::map<std::string, std::vector<std::string>> test_prompts;
  for (const std::string task : {"capitals", "iso3", "domains", "langid"}) {
    TaskLoadOptions lo;
    lo.max_train = 200;
    lo.max_test = 100;
    auto data = LoadTaskDir(shared + "/data/cl-small/" + task, lo);
    ASSERT_TRUE(data.ok()) << data.status();
    std::vector<std::string> train;
    for (const auto& e : data->train) train.push_back(e.prompt);
    for (const auto& e : data->test) test_prompts[task].push_back(e.prompt);
    auto features = router.Features(**model, **tokenizer, train);
    ASSERT_TRUE(features.ok()) << features.status();
    ASSERT_TRUE(router.AddTask(task, *features, layer).ok());
  }
  for (const auto& [task, prompts] : test_prompts) {
    auto decisions = router.Route(*router.Features(**model, **tokenizer, prompts));
    int right = 0;
    for (const auto& d : decisions) right += d.task == task;
    EXPECT_GE(right, static_cast<int>(0.98 * prompts.size())) << task;
  }
  auto text = ReadFile(shared + "/data/lm/tinystories_val.txt");
  ASSERT_TRUE(text.ok());
  std::vector<std::string> stories = SplitOnBlankLines(*text);
  stories.resize(std::min<size_t>(stories.size(), 64));
  // Whole stories and their openings ("Once upon a time, ...").
  std::vector<std::string> openings;
  for (const auto& s : stories) openings.push_back(s.substr(0, std::min<size_t>(s.size(), 40)));
  for (const auto* set : {&stories, &openings}) {
    auto decisions = router.Route(*router.Features(**model, **tokenizer, *set));
    int base = 0;
    for (const auto& d : decisions) base += d.task.empty();
    EXPECT_GE(base, static_cast<int>(0.95 * set->size()));
  }
}

}  // namespace
}  // namespace strata
