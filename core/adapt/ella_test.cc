#include "core/adapt/ella.h"

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "core/adapt/share.h"
#include "core/model/safetensors.h"
#include "core/util/file_util.h"

namespace strata {
namespace {

double RelErr(const at::Tensor& got, const at::Tensor& want) {
  return (got.to(at::kDouble) - want.to(at::kDouble)).norm().item<double>() /
         want.to(at::kDouble).norm().item<double>();
}

at::Tensor Randn(std::vector<int64_t> shape, at::Generator& gen, at::ScalarType dtype = at::kFloat) {
  return at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat)).to(dtype);
}

EllaModule MakeModule(int64_t n, int64_t d, double lambda) {
  EllaOptions opt;
  opt.lambda = lambda;
  auto m = EllaModule::Create(n, d, opt);
  EXPECT_TRUE(m.ok()) << m.status();
  return *std::move(m);
}

// A past with exact zeros in some coordinates (a sparse row/column pattern) and ~1e-3 entries.
at::Tensor SparsePast(int64_t n, int64_t d, at::Generator& gen) {
  at::Tensor w = Randn({n, d}, gen) * 1e-3;
  w.index_put_({at::indexing::Slice(0, 2)}, 0.0);                             // rows 0-1
  w.index_put_({at::indexing::Slice(), at::indexing::Slice(d - 3, d)}, 0.0);  // last 3 columns
  return w;
}

TEST(EllaTest, PenaltyIsZeroAtFirstTask) {
  EllaModule m = MakeModule(12, 10, 5.0);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1);
  at::Tensor delta = Randn({12, 10}, gen).requires_grad_(true);
  at::Tensor p = m.Penalty(delta);
  EXPECT_EQ(p.dim(), 0);
  EXPECT_EQ(p.item<float>(), 0.0f);
  p.backward();
  ASSERT_TRUE(delta.grad().defined());
  EXPECT_EQ(delta.grad().abs().max().item<float>(), 0.0f);
  EXPECT_EQ(m.past_rms(), 0.0);
  EXPECT_EQ(m.NormalizedPast().abs().max().item<float>(), 0.0f);
}

TEST(EllaTest, PenaltyValueAndGradientMatchClosedForm) {
  const int64_t n = 16, d = 14;
  const double lambda = 0.7;
  EllaModule m = MakeModule(n, d, lambda);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(2);
  at::Tensor past = SparsePast(n, d, gen);
  ASSERT_TRUE(m.Merge(past).ok());
  // Ŵ = W_past / rms(W_past): unit rms.
  at::Tensor w_hat = past.to(at::kDouble) / std::sqrt(past.to(at::kDouble).square().mean().item<double>());
  EXPECT_NEAR(m.NormalizedPast().to(at::kDouble).square().mean().item<double>(), 1.0, 1e-5);
  EXPECT_LT(RelErr(m.NormalizedPast(), w_hat), 1e-6);

  at::Tensor delta = Randn({n, d}, gen, at::kDouble).requires_grad_(true);
  at::Tensor p = m.Penalty(delta);
  const double want = lambda * (delta.detach() * w_hat).square().sum().item<double>();
  EXPECT_NEAR(p.item<double>(), want, 1e-6 * want);
  p.backward();
  at::Tensor grad_want = 2 * lambda * delta.detach() * w_hat.square();
  EXPECT_LT(RelErr(delta.grad(), grad_want), 1e-6);
  // Coordinates where the past is zero get no gradient at all.
  EXPECT_EQ(delta.grad().index({at::indexing::Slice(0, 2)}).abs().max().item<double>(), 0.0);
}

TEST(EllaTest, PenaltyGradientChainsToLoraFactors) {
  const int64_t n = 18, d = 15, r = 3;
  const double lambda = 0.4, s = 2.5;
  EllaModule m = MakeModule(n, d, lambda);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  ASSERT_TRUE(m.Merge(SparsePast(n, d, gen)).ok());
  at::Tensor w_hat = m.NormalizedPast().to(at::kDouble);

  at::Tensor b = Randn({n, r}, gen, at::kDouble).requires_grad_(true);
  at::Tensor a = Randn({r, d}, gen, at::kDouble).requires_grad_(true);
  at::Tensor delta = b.mm(a) * s;
  m.Penalty(delta).backward();
  // Hand-written chain rule: dL/dΔW = 2λ ΔW ⊙ Ŵ², dL/dB = s·(dL/dΔW) Aᵀ, dL/dA = s·Bᵀ (dL/dΔW).
  at::Tensor g = 2 * lambda * delta.detach() * w_hat.square();
  EXPECT_LT(RelErr(b.grad(), s * g.mm(a.detach().t())), 1e-6);
  EXPECT_LT(RelErr(a.grad(), s * b.detach().t().mm(g)), 1e-6);
}

// Share + ELLA: the penalty on ΔW_t = s·B_t A_t reaches Share's trainable tensors through
// B_t = β Eβ + Rβ1 Rβ2 and A_tᵀ = α Eα + Rα1 Rα2.
TEST(EllaTest, PenaltyGradientChainsToShareFactors) {
  const int64_t n = 20, d = 17;
  const double lambda = 1.3;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(4);
  ShareOptions sopt;
  sopt.p = 4;
  auto share = ShareModule::Create(n, d, sopt);
  ASSERT_TRUE(share.ok());
  ASSERT_TRUE(share->MergeFactors("t1", Randn({n, 4}, gen), Randn({4, d}, gen)).ok());
  EllaModule ella = MakeModule(n, d, lambda);
  ASSERT_TRUE(ella.Merge(*share->TaskDelta("t1")).ok());

  ShareTaskFactors f = share->BeginTask(5);
  {
    at::NoGradGuard ng;
    for (at::Tensor& p : f.Parameters()) p.add_(Randn(p.sizes().vec(), gen) * 0.2);
  }
  ASSERT_EQ(f.Parameters().size(), 6u);
  at::Tensor delta = f.Delta();
  ella.Penalty(delta).backward();

  at::Tensor w_hat = ella.NormalizedPast();
  at::Tensor g = 2 * lambda * delta.detach() * w_hat.square();  // dL/dΔW
  at::Tensor bt = f.B().detach(), at_ = f.At().detach();
  at::Tensor d_b = f.scale * g.mm(at_);      // dL/dB_t   [n, p]
  at::Tensor d_at = f.scale * g.t().mm(bt);  // dL/dA_tᵀ  [d, p]
  EXPECT_LT(RelErr(f.e_beta.grad(), f.beta.t().mm(d_b)), 1e-4);
  EXPECT_LT(RelErr(f.r_beta2.grad(), f.r_beta1.detach().t().mm(d_b)), 1e-4);
  EXPECT_LT(RelErr(f.r_beta1.grad(), d_b.mm(f.r_beta2.detach().t())), 1e-4);
  EXPECT_LT(RelErr(f.e_alpha.grad(), f.alpha.t().mm(d_at)), 1e-4);
  EXPECT_LT(RelErr(f.r_alpha2.grad(), f.r_alpha1.detach().t().mm(d_at)), 1e-4);
  EXPECT_LT(RelErr(f.r_alpha1.grad(), d_at.mm(f.r_alpha2.detach().t())), 1e-4);
}

// The spec's closed form: minimising ‖X − G‖²_F + λ‖X ⊙ Ŵ‖²_F shrinks each coordinate of the step G
// to G_ij / (1 + λ Ŵ_ij²); coordinates where the past is zero are untouched.
TEST(EllaTest, ClosedFormShrinkageOnQuadraticToyProblem) {
  const int64_t n = 10, d = 9;
  const double lambda = 0.5;
  EllaModule m = MakeModule(n, d, lambda);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(6);
  ASSERT_TRUE(m.Merge(SparsePast(n, d, gen)).ok());
  at::Tensor e2 = (m.w_past().to(at::kDouble) / m.past_rms()).square();  // E = |Ŵ_past|
  at::Tensor g = Randn({n, d}, gen, at::kDouble);

  at::Tensor x = at::zeros({n, d}, at::kDouble).requires_grad_(true);
  const double lr = 0.5 / (1.0 + lambda * e2.max().item<double>());  // stable for every coordinate
  for (int it = 0; it < 3000; ++it) {
    at::Tensor loss = (x - g).square().sum() + m.Penalty(x);
    x.mutable_grad() = at::Tensor();
    loss.backward();
    at::NoGradGuard ng;
    x.sub_(lr * x.grad());
  }
  at::Tensor want = g / (1.0 + lambda * e2);
  EXPECT_LT((x.detach() - want).abs().max().item<double>(), 1e-9);
  // Zero past: untouched step.
  at::Tensor zero_rows = x.detach().index({at::indexing::Slice(0, 2)});
  EXPECT_LT((zero_rows - g.index({at::indexing::Slice(0, 2)})).abs().max().item<double>(), 1e-12);
  at::Tensor zero_cols = x.detach().index({at::indexing::Slice(), at::indexing::Slice(d - 3, d)});
  EXPECT_LT((zero_cols - g.index({at::indexing::Slice(), at::indexing::Slice(d - 3, d)}))
                .abs()
                .max()
                .item<double>(),
            1e-12);
  // And high-energy coordinates really are shrunk.
  EXPECT_LT(x.detach().abs().sum().item<double>(), g.abs().sum().item<double>());
}

TEST(EllaTest, ServedWeightsAreW0PlusSumOfMergedUpdates) {
  const int64_t n = 8, d = 6;
  EllaModule m = MakeModule(n, d, 1.0);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  at::Tensor w0 = Randn({n, d}, gen);
  at::Tensor sum = at::zeros({n, d});
  EXPECT_TRUE(at::equal(*m.ServedWeight(w0), w0));
  for (int t = 0; t < 3; ++t) {
    LoraFactors f = LoraFactors::Init(n, d, 2, 4.0, 10 + t);
    EXPECT_EQ(f.b.abs().max().item<float>(), 0.0f);  // step 0 changes nothing
    EXPECT_LE(f.a.abs().max().item<double>(), 1.0 / std::sqrt(static_cast<double>(d)));
    EXPECT_EQ(f.Forward(Randn({2, d}, gen)).abs().max().item<float>(), 0.0f);
    {
      at::NoGradGuard ng;
      f.b.copy_(Randn({n, 2}, gen));
    }
    at::Tensor delta = f.Delta();
    EXPECT_TRUE(delta.requires_grad());
    ASSERT_TRUE(m.Merge(delta).ok());
    sum += delta.detach();
  }
  EXPECT_EQ(m.num_merged(), 3);
  EXPECT_LT(RelErr(m.w_past(), sum), 1e-6);
  EXPECT_LT(RelErr(*m.ServedWeight(w0), w0 + sum), 1e-6);
  at::Tensor served_bf16 = *m.ServedWeight(w0.to(at::kBFloat16));
  EXPECT_EQ(served_bf16.scalar_type(), at::kBFloat16);
  EXPECT_LT(RelErr(served_bf16, w0.to(at::kBFloat16).to(at::kFloat) + sum), 1e-2);
  EXPECT_EQ(m.ServedWeight(at::zeros({d, n})).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(EllaTest, StateRoundTrip) {
  const int64_t n = 11, d = 7;
  EllaModule m = MakeModule(n, d, 0.25);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(8);
  ASSERT_TRUE(m.Merge(Randn({n, d}, gen)).ok());
  ASSERT_TRUE(m.Merge(Randn({n, d}, gen)).ok());
  std::map<std::string, at::Tensor> tensors;
  m.ExportState("model.layers.1.mlp.up_proj.ella.", &tensors);
  ASSERT_EQ(tensors.size(), 1u);

  std::string dir = std::string(::testing::TempDir()) + "/strata_ella_state_" + std::to_string(::getpid());
  ASSERT_TRUE(MakeDirs(dir).ok());
  std::vector<std::pair<std::string, at::Tensor>> list(tensors.begin(), tensors.end());
  ASSERT_TRUE(WriteSafetensors(dir + "/s.safetensors", list, {{"ella", m.ConfigJson()}}).ok());
  auto file = SafetensorsFile::Open(dir + "/s.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  std::map<std::string, at::Tensor> loaded;
  loaded["model.layers.1.mlp.up_proj.ella.w_past"] =
      *(*file)->Get("model.layers.1.mlp.up_proj.ella.w_past", at::kFloat);
  auto back =
      EllaModule::ImportState((*file)->metadata().at("ella"), "model.layers.1.mlp.up_proj.ella.", loaded);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->num_merged(), 2);
  EXPECT_DOUBLE_EQ(back->options().lambda, 0.25);
  EXPECT_TRUE(at::equal(back->w_past(), m.w_past()));
  EXPECT_DOUBLE_EQ(back->past_rms(), m.past_rms());
  at::Tensor delta = Randn({n, d}, gen);
  EXPECT_EQ(back->Penalty(delta).item<float>(), m.Penalty(delta).item<float>());

  loaded["model.layers.1.mlp.up_proj.ella.w_past"] = at::zeros({n, d + 1});
  auto bad = EllaModule::ImportState(m.ConfigJson(), "model.layers.1.mlp.up_proj.ella.", loaded);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("up_proj.ella.w_past"), std::string::npos) << bad.status();
  EXPECT_FALSE(EllaModule::ImportState("[]", "x.", loaded).ok());
  EXPECT_TRUE(RemoveAll(dir).ok());
}

TEST(EllaTest, MergeRejectsBadInput) {
  EllaModule m = MakeModule(4, 3, 1.0);
  EXPECT_EQ(m.Merge(at::zeros({3, 4})).code(), absl::StatusCode::kInvalidArgument);
  at::Tensor nan = at::zeros({4, 3});
  nan[1][1] = std::nan("");
  EXPECT_EQ(m.Merge(nan).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(m.num_merged(), 0);
  EXPECT_EQ(m.w_past().abs().max().item<float>(), 0.0f);
  EllaOptions bad;
  bad.lambda = -1.0;
  EXPECT_FALSE(EllaModule::Create(4, 3, bad).ok());
}

// share_ella: the served weights keep every task exactly (W0 + Σ ΔW_t) while Share keeps compact
// per-task adapters.
TEST(EllaTest, ShareEllaMergeKeepsServedWeightsExact) {
  const int64_t n = 24, d = 20;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(9);
  ShareOptions sopt;
  sopt.p = 4;
  sopt.k_max = 6;  // deliberately small: Share truncates, ELLA must not
  auto share = ShareModule::Create(n, d, sopt);
  ASSERT_TRUE(share.ok());
  EllaModule ella = MakeModule(n, d, 1.0);
  at::Tensor w0 = Randn({n, d}, gen);
  at::Tensor sum = at::zeros({n, d});
  for (int t = 0; t < 4; ++t) {
    ShareTaskFactors f = share->BeginTask(t);
    {
      at::NoGradGuard ng;
      for (at::Tensor& p : f.Parameters()) p.add_(Randn(p.sizes().vec(), gen) * 0.1);
    }
    at::Tensor delta = f.Delta().detach();
    ASSERT_TRUE(ella.Merge(delta).ok());
    ASSERT_TRUE(share->Merge("t" + std::to_string(t), f).ok());
    sum += delta;
  }
  EXPECT_LE(share->k_beta(), 6);
  EXPECT_LT(RelErr(*ella.ServedWeight(w0), w0 + sum), 1e-6);
}

}  // namespace
}  // namespace strata
