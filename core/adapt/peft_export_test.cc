// FactorizeForPeft: exact factors of low-rank updates, optimal truncation of dense ones, one rank
// for every module, and the round trip through WritePeftLoraAdapter / ReadPeftLoraAdapter.

#include "core/adapt/peft_export.h"

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/util/file_util.h"

namespace strata {
namespace {

at::Tensor Randn(std::vector<int64_t> shape, at::Generator& gen) {
  return at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat));
}

double RelErr(const at::Tensor& got, const at::Tensor& want) {
  return (got.to(at::kDouble) - want.to(at::kDouble)).norm().item<double>() /
         want.to(at::kDouble).norm().item<double>();
}

std::string TempDir(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          ("strata-peft-export-" + std::to_string(::getpid()) + "-" + name))
      .string();
}

TEST(PeftExport, LowRankUpdatesAreExactAndShareOneRank) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  // A LoRA (scale 2, rank 4) and a shared-basis route (left [24, 3], core [3, 5], right [16, 5]: rank 3).
  ModuleUpdate lora{"model.layers.0.self_attn.q_proj",
                    Randn({24, 4}, gen),
                    at::Tensor(),
                    Randn({16, 4}, gen),
                    2.0,
                    at::Tensor()};
  ModuleUpdate shared{"model.layers.0.self_attn.v_proj",
                      Randn({24, 3}, gen),
                      Randn({3, 5}, gen),
                      Randn({16, 5}, gen),
                      0.5,
                      at::Tensor()};
  auto f = FactorizeForPeft({lora, shared}, 0);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->exact_rank, 4);
  EXPECT_EQ(f->rank, 4);
  EXPECT_EQ(f->adapter.r, 4);
  EXPECT_DOUBLE_EQ(f->adapter.lora_alpha, 4.0);
  EXPECT_EQ(f->relative_error, 0.0);
  const at::Tensor want_q = lora.left.mm(lora.right.t()).mul(2.0);
  const at::Tensor want_v = shared.left.mm(shared.core).mm(shared.right.t()).mul(0.5);
  const PeftLoraModule& q = f->adapter.modules.at(lora.module);
  const PeftLoraModule& v = f->adapter.modules.at(shared.module);
  EXPECT_EQ(q.a.sizes(), (std::vector<int64_t>{4, 16}));
  EXPECT_EQ(q.b.sizes(), (std::vector<int64_t>{24, 4}));
  EXPECT_EQ(q.a.scalar_type(), at::kFloat);
  EXPECT_DOUBLE_EQ(q.scale, 1.0);
  EXPECT_LT(RelErr(q.Delta(), want_q), 1e-6);
  EXPECT_LT(RelErr(v.Delta(), want_v), 1e-6);
  // The rank-3 module is padded to rank 4 with zeros.
  EXPECT_EQ(v.a.sizes(), (std::vector<int64_t>{4, 16}));
  EXPECT_EQ(v.a[3].abs().max().item<float>(), 0.0f);
  EXPECT_EQ(v.b.select(1, 3).abs().max().item<float>(), 0.0f);

  // Write and read back: the same update, no rank_pattern / alpha_pattern.
  const std::string dir = TempDir("rt");
  f->adapter.target_modules = {"q_proj", "v_proj"};
  f->adapter.base_model_name_or_path = "stories260K";
  ASSERT_TRUE(WritePeftLoraAdapter(dir, f->adapter).ok());
  auto back = ReadPeftLoraAdapter(dir);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_LT(RelErr(back->modules.at(lora.module).Delta(), want_q), 1e-6);
  EXPECT_LT(RelErr(back->modules.at(shared.module).Delta(), want_v), 1e-6);
  auto text = ReadFile(dir + "/adapter_config.json");
  ASSERT_TRUE(text.ok());
  const nlohmann::json config = nlohmann::json::parse(*text);
  EXPECT_EQ(config["rank_pattern"], nlohmann::json::object());
  EXPECT_EQ(config["alpha_pattern"], nlohmann::json::object());
  EXPECT_EQ(config["lora_alpha"], 4);
  EXPECT_TRUE(config["lora_alpha"].is_number_integer());
  EXPECT_EQ(config["base_model_name_or_path"], "stories260K");
  std::filesystem::remove_all(dir);
}

// Directions that are float32 rounding noise (a column that is the sum of two others) are not
// exported: the exact rank is the numerical one.
TEST(PeftExport, ExactRankIsTheNumericalRank) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(8);
  at::Tensor left = Randn({24, 4}, gen);
  left.select(1, 3).copy_(left.select(1, 0) + left.select(1, 1));
  ModuleUpdate m{"m", left, at::Tensor(), Randn({16, 4}, gen), 1.5, at::Tensor()};
  auto f = FactorizeForPeft({m}, 0);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->exact_rank, 3);
  EXPECT_EQ(f->rank, 3);
  EXPECT_LT(f->relative_error, 1e-6);
  EXPECT_LT(RelErr(f->adapter.modules.at("m").Delta(), left.mm(m.right.t()).mul(1.5)), 1e-6);
  // A zero update exports rank 1 of zeros.
  ModuleUpdate zero{"z", at::zeros({5, 2}), at::Tensor(), at::zeros({3, 2}), 1.0, at::Tensor()};
  auto z = FactorizeForPeft({zero}, 0);
  ASSERT_TRUE(z.ok()) << z.status();
  EXPECT_EQ(z->rank, 1);
  EXPECT_EQ(z->relative_error, 0.0);
  EXPECT_EQ(z->adapter.modules.at("z").Delta().abs().max().item<float>(), 0.0f);
}

TEST(PeftExport, TruncationIsTheBestApproximationAndReportsItsError) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(6);
  const at::Tensor dense = Randn({20, 12}, gen);
  ModuleUpdate m{"model.layers.0.mlp.up_proj", at::Tensor(), at::Tensor(), at::Tensor(), 1.0, dense};
  auto f = FactorizeForPeft({m}, 3);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->exact_rank, 12);
  EXPECT_EQ(f->rank, 3);
  const at::Tensor got = f->adapter.modules.at(m.module).Delta();
  const double measured = RelErr(got, dense);
  // Eckart–Young: the error of the best rank-3 approximation is the dropped singular values' norm.
  const at::Tensor s = at::linalg_svdvals(dense.to(at::kDouble));
  const double optimal =
      std::sqrt(s.slice(0, 3).square().sum().item<double>() / s.square().sum().item<double>());
  EXPECT_NEAR(measured, optimal, 1e-6);
  EXPECT_NEAR(f->relative_error, optimal, 1e-9);
  EXPECT_NEAR(f->max_module_error, optimal, 1e-9);
  EXPECT_EQ(f->max_error_module, m.module);
  // A rank at or above the full rank is exact.
  auto full = FactorizeForPeft({m}, 100);
  ASSERT_TRUE(full.ok());
  EXPECT_EQ(full->rank, 12);
  EXPECT_LT(RelErr(full->adapter.modules.at(m.module).Delta(), dense), 1e-6);
  EXPECT_LT(full->relative_error, 1e-6);
}

TEST(PeftExport, RefusesBadUpdates) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  EXPECT_EQ(FactorizeForPeft({}, 0).status().code(), absl::StatusCode::kInvalidArgument);
  ModuleUpdate ok{"m", Randn({4, 2}, gen), at::Tensor(), Randn({3, 2}, gen), 1.0, at::Tensor()};
  EXPECT_EQ(FactorizeForPeft({ok}, -1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(FactorizeForPeft({ok, ok}, 0).status().code(), absl::StatusCode::kInvalidArgument);
  ModuleUpdate misfit{"m", Randn({4, 2}, gen), at::Tensor(), Randn({3, 3}, gen), 1.0, at::Tensor()};
  auto st = FactorizeForPeft({misfit}, 0).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("'m'"), std::string::npos) << st;
  ModuleUpdate nan{"m", at::Tensor(), at::Tensor(), at::Tensor(), 1.0, at::full({3, 3}, NAN)};
  EXPECT_FALSE(FactorizeForPeft({nan}, 1).ok());
}

TEST(PeftExport, TargetModules) {
  const std::vector<std::string> all = {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"};
  EXPECT_EQ(PeftTargetModules(all, all), (std::vector<std::string>{"q_proj", "v_proj"}));
  EXPECT_EQ(PeftTargetModules({all[0], all[2]}, all), (std::vector<std::string>{"q_proj"}));
  // Only some layers' q_proj: full names, so PEFT adds no adapter to the others.
  EXPECT_EQ(PeftTargetModules({all[0]}, all), (std::vector<std::string>{all[0]}));
}

}  // namespace
}  // namespace strata
