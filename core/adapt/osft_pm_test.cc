// Tests of OSFT (methods_osft.cc) and Perturb-and-Merge (methods_pm.cc).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <nlohmann/json.hpp>
#include <random>

#include "core/adapt/lora.h"
#include "core/adapt/method.h"
#include "core/adapt/methods.h"
#include "core/adapt/test_fixtures.h"
#include "core/adapt/trainer.h"

namespace strata {
namespace {

using testing::TinyConfig;
using testing::TinyModel;
// 32 examples per synthetic task here.
TrainTask SyntheticTask(const std::string& name, int offset = 0) {
  return testing::SyntheticTask(name, offset, 32);
}

std::unique_ptr<Method> MakeMethod(const std::string& name, const MethodConfig& config) {
  auto m = CreateMethod(name, config);
  EXPECT_TRUE(m.ok()) << m.status();
  return std::move(m).value();
}

TrainOptions Options(int64_t steps = 6) {
  TrainOptions o;
  o.learning_rate = 1e-2;
  o.max_steps = steps;
  o.batch_size = 8;
  o.seed = 11;
  return o;
}

MethodConfig OsftConfig(double urr) {
  MethodConfig c = testing::QvTestConfig();
  c.target_modules = {"all-linear"};
  c.osft_urr = urr;
  return c;
}

// ---- OSFT ---------------------------------------------------------------------------------------------

TEST(OsftTest, ProjectionRemovesFrozenDirections) {
  at::manual_seed(1);
  at::Tensor w = at::randn({12, 8});
  auto [u, s, vh] = torch::linalg::svd(w, false, c10::nullopt);
  at::Tensor uh = u.narrow(1, 0, 5), vh5 = vh.narrow(0, 0, 5).t();
  at::Tensor g = at::randn({12, 8});
  at::Tensor p = OsftProject(g, uh, vh5);
  EXPECT_LT(at::matmul(uh.t(), p).norm().item<double>(), 1e-5 * p.norm().item<double>());
  EXPECT_LT(at::matmul(p, vh5).norm().item<double>(), 1e-5 * p.norm().item<double>());
  // The explicit four-term formula.
  at::Tensor q = g - uh.mm(uh.t()).mm(g) - g.mm(vh5).mm(vh5.t()) + uh.mm(uh.t()).mm(g).mm(vh5).mm(vh5.t());
  EXPECT_LT((p - q).abs().max().item<double>(), 1e-5);
  // Idempotent.
  EXPECT_LT((OsftProject(p, uh, vh5) - p).abs().max().item<double>(), 1e-5);
}

TEST(OsftTest, TrainedUpdateIsOrthogonalToFrozenSubspace) {
  at::set_num_threads(1);
  auto model = TinyModel();
  MethodConfig config = OsftConfig(0.25);
  auto method = MakeMethod("osft", config);
  Trainer trainer(Options(5));
  auto result = trainer.Train(*model, *method, "t1", {SyntheticTask("t1")});
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_FALSE(method->modules().empty());
  for (const auto& m : method->modules()) {
    at::Tensor w0 = model->FindLinear(m)->weight.detach().to(at::kFloat);
    at::Tensor w1 = result->model->FindLinear(m)->weight.detach().to(at::kFloat);
    at::Tensor dw = w1 - w0;
    ASSERT_GT(dw.norm().item<double>(), 0.0) << m;
    const int64_t k = static_cast<int64_t>(std::floor(std::min(w0.size(0), w0.size(1)) * 0.75));
    auto [u, s, vh] = torch::linalg::svd(w0, false, c10::nullopt);
    at::Tensor uh = u.narrow(1, 0, k), v = vh.narrow(0, 0, k).t();
    EXPECT_LE(at::matmul(uh.t(), dw).norm().item<double>(), 1e-5 * dw.norm().item<double>()) << m;
    EXPECT_LE(at::matmul(dw, v).norm().item<double>(), 1e-5 * dw.norm().item<double>()) << m;
    EXPECT_EQ(result->model->FindLinear(m)->adapter, nullptr);
  }
  // Served weights rebuild from the state on the base model.
  auto state = method->ExportState();
  ASSERT_TRUE(state.ok()) << state.status();
  auto restored = CreateMethodFromState(*state);
  ASSERT_TRUE(restored.ok()) << restored.status();
  auto base = model->ShallowCopy();
  ASSERT_TRUE((*restored)->ApplyServedWeights(base.get()).ok());
  for (const auto& m : method->modules()) {
    EXPECT_TRUE(at::allclose(base->FindLinear(m)->weight, result->model->FindLinear(m)->weight));
  }
}

TEST(OsftTest, UrrOneEqualsSeqFtOnTargets) {
  at::set_num_threads(1);
  auto model = TinyModel();
  MethodConfig osft_config = OsftConfig(1.0);
  MethodConfig ft_config = osft_config;
  ft_config.ft_scope = "target";
  auto osft = MakeMethod("osft", osft_config);
  auto ft = MakeMethod("seq_ft", ft_config);
  Trainer trainer(Options(6));
  auto a = trainer.Train(*model, *osft, "t1", {SyntheticTask("t1")});
  auto b = trainer.Train(*model, *ft, "t1", {SyntheticTask("t1")});
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_EQ(a->losses.size(), b->losses.size());
  for (size_t i = 0; i < a->losses.size(); ++i) EXPECT_NEAR(a->losses[i], b->losses[i], 1e-5) << i;
  for (const auto& [name, t] : a->model->NamedParameters()) {
    const at::Tensor* other = b->model->FindParameter(name);
    ASSERT_NE(other, nullptr) << name;
    EXPECT_LT((t - *other).abs().max().item<double>(), 1e-5) << name;
  }
}

TEST(OsftTest, AdaptiveRatiosClampedAndOrdered) {
  const std::vector<double> imp = {0.05, 0.4, 0.2, 0.9, -0.3, 0.25};
  const auto r = OsftAdaptiveRatios(imp);
  ASSERT_EQ(r.size(), imp.size());
  for (size_t i = 0; i < r.size(); ++i) {
    EXPECT_GE(r[i], 0.1);
    EXPECT_LE(r[i], 0.8);
    for (size_t j = 0; j < r.size(); ++j) {
      if (imp[i] < imp[j]) {
        EXPECT_LE(r[i], r[j]) << i << " " << j;
      }
    }
  }
  // Î = I / mean: mean 0.25 -> the 0.05 layer gets 0.1 + 0.2·0.7 = 0.24.
  EXPECT_NEAR(r[0], 0.1 + 0.2 * 0.7, 1e-12);
  EXPECT_NEAR(r[5], 0.8, 1e-12);
}

TEST(OsftTest, AdaptiveRanksFromActivations) {
  at::set_num_threads(1);
  auto model = TinyModel();
  MethodConfig config = OsftConfig(0.25);
  config.osft_rank = "adaptive";
  auto method = MakeMethod("osft", config);
  Trainer trainer(Options(4));
  auto r1 = trainer.Train(*model, *method, "t1", {SyntheticTask("t1")});
  ASSERT_TRUE(r1.ok()) << r1.status();
  auto state = method->ExportState();
  ASSERT_TRUE(state.ok());
  auto j = nlohmann::json::parse(state->config_json);
  ASSERT_TRUE(j.contains("extra")) << state->config_json;
  auto extra = j["extra"].is_string() ? nlohmann::json::parse(j["extra"].get<std::string>()) : j["extra"];
  std::vector<double> ratios = extra["ratios"].get<std::vector<double>>();
  std::vector<double> imp = extra["importance"].get<std::vector<double>>();
  ASSERT_EQ(ratios.size(), method->modules().size());
  ASSERT_EQ(imp.size(), ratios.size());
  for (size_t i = 0; i < ratios.size(); ++i) {
    EXPECT_GE(ratios[i], 0.1);
    EXPECT_LE(ratios[i], 0.8);
    for (size_t k = 0; k < ratios.size(); ++k) {
      if (imp[i] < imp[k]) {
        EXPECT_LE(ratios[i], ratios[k]);
      }
    }
  }
  // The second task uses them and stays orthogonal to its frozen subspaces.
  auto r2 = trainer.Train(*r1->model, *method, "t2", {SyntheticTask("t2", 3)});
  ASSERT_TRUE(r2.ok()) << r2.status();
  for (size_t i = 0; i < method->modules().size(); ++i) {
    const auto& m = method->modules()[i];
    at::Tensor w0 = r1->model->FindLinear(m)->weight.detach();
    at::Tensor dw = r2->model->FindLinear(m)->weight.detach() - w0;
    const int64_t k = static_cast<int64_t>(std::floor(std::min(w0.size(0), w0.size(1)) * ratios[i] + 1e-9));
    if (k == 0 || dw.norm().item<double>() == 0) continue;
    auto [u, s, vh] = torch::linalg::svd(w0, false, c10::nullopt);
    EXPECT_LE(at::matmul(u.narrow(1, 0, k).t(), dw).norm().item<double>(), 1e-5 * dw.norm().item<double>())
        << m;
  }
}

// ---- P&M ------------------------------------------------------------------------------------------------

TEST(PmTest, MergeCoefficientIsQuadraticOptimum) {
  at::manual_seed(3);
  // Two modules, three tasks (two past + current), Fishers and θ* by hand.
  const int T = 3;
  std::vector<std::vector<at::Tensor>> F(T), theta(T);
  std::vector<at::Tensor> prev, delta;
  for (int m = 0; m < 2; ++m) {
    prev.push_back(at::randn({3, 4}, at::kDouble));
    delta.push_back(at::randn({3, 4}, at::kDouble) * 0.3);
  }
  for (int i = 0; i < T; ++i) {
    for (int m = 0; m < 2; ++m) {
      F[i].push_back(at::rand({3, 4}, at::kDouble) + 0.1);
      // The current task's θ* = θ̂ + Δ; past θ* near θ̂.
      theta[i].push_back(i == T - 1 ? prev[m] + delta[m] : prev[m] + at::randn({3, 4}, at::kDouble) * 0.1);
    }
  }
  std::vector<at::Tensor> fs, fts;
  for (int m = 0; m < 2; ++m) {
    at::Tensor a = at::zeros({3, 4}, at::kDouble), b = at::zeros({3, 4}, at::kDouble);
    for (int i = 0; i < T; ++i) {
      a += F[i][m];
      b += F[i][m] * theta[i][m];
    }
    fs.push_back(a);
    fts.push_back(b);
  }
  // Analytic optimum of Q(α) = Σ_i Σ_k F_ik (θ̂_k + α Δ_k − θ*_ik)².
  double num = 0, den = 0;
  for (int i = 0; i < T; ++i) {
    for (int m = 0; m < 2; ++m) {
      num += (F[i][m] * (theta[i][m] - prev[m]) * delta[m]).sum().item<double>();
      den += (F[i][m] * delta[m] * delta[m]).sum().item<double>();
    }
  }
  const double expected = std::clamp(num / den, 0.0, 1.0);
  const double alpha = PmMergeCoefficient(fs, fts, prev, delta);
  EXPECT_NEAR(alpha, expected, 1e-9);
  ASSERT_GT(expected, 0.0);
  ASSERT_LT(expected, 1.0);
  // And it minimises Q on a grid.
  auto Q = [&](double a) {
    double q = 0;
    for (int i = 0; i < T; ++i)
      for (int m = 0; m < 2; ++m)
        q += (F[i][m] * (prev[m] + delta[m] * a - theta[i][m]).square()).sum().item<double>();
    return q;
  };
  for (double a = 0; a <= 1.0; a += 0.01) EXPECT_GE(Q(a) + 1e-12, Q(alpha));
  // Clamping: with only the current task α = 1; pulled away -> 0.
  std::vector<at::Tensor> f1 = {F[2][0]}, t1 = {F[2][0] * theta[2][0]}, p1 = {prev[0]}, d1 = {delta[0]};
  EXPECT_NEAR(PmMergeCoefficient(f1, t1, p1, d1), 1.0, 1e-9);
  std::vector<at::Tensor> t2 = {F[2][0] * (prev[0] - delta[0])};
  EXPECT_EQ(PmMergeCoefficient(f1, t2, p1, d1), 0.0);
}

double BatchLoss(const CausalLM& model, const TrainTask& task) {
  at::NoGradGuard g;
  std::vector<int64_t> ids, labels;
  const int64_t len = 5;
  int64_t rows = 0;
  for (const auto& e : task.examples) {
    if (static_cast<int64_t>(e.ids.size()) != len) continue;
    for (int64_t t = 0; t < len; ++t) {
      ids.push_back(e.ids[t]);
      labels.push_back(t + 1 < len && t + 1 >= e.target_start ? e.ids[t + 1] : -100);
    }
    ++rows;
  }
  at::Tensor in = at::tensor(ids).view({rows, len});
  at::Tensor lab = at::tensor(labels).view({rows, len});
  return Trainer::CausalLmLoss(model.Forward(in, at::Tensor()), lab).item<double>();
}

TEST(PmTest, PerturbationMatchesHessianTerm) {
  at::set_num_threads(1);
  auto model = TinyModel();
  MethodConfig config = testing::QvTestConfig();
  config.rank = 2;
  config.alpha = 4.0;
  config.pm_epsilon = 0.5;  // the paper's value (the default is 0.1); the draw below counts 1 ± 0.5
  auto method = MakeMethod("pm", config);
  auto work = model->ShallowCopy();
  ASSERT_TRUE(method->BeginTask("t1", work.get()).ok());
  {
    at::NoGradGuard g;
    at::Generator gen = at::detail::createCPUGenerator(5);
    for (auto& [name, p] : method->TrainableParameters()) p.add_(at::randn(p.sizes(), gen).mul(0.5));
  }
  std::vector<LowRankAdapter*> adapters;
  for (const auto& m : method->modules()) {
    adapters.push_back(dynamic_cast<LowRankAdapter*>(work->FindLinear(m)->adapter.get()));
    ASSERT_NE(adapters.back(), nullptr);
  }
  // θ here is the LoRA point (branch scale 1) with Δ its task vector: L(b) = loss at θ̂ + bΔ.
  const TrainTask task = SyntheticTask("t1");
  auto L = [&](double b) {
    for (auto* a : adapters) a->set_branch_scale(b);
    return BatchLoss(*work, task);
  };
  // BeforeForward draws 1, 1 ± ε with probability 1/3 each.
  std::mt19937_64 rng(9);
  StepContext ctx;
  ctx.rng = &rng;
  std::map<double, int> counts;
  for (int i = 0; i < 3000; ++i) {
    method->BeforeForward(ctx);
    counts[adapters[0]->branch_scale()]++;
    for (auto* a : adapters) EXPECT_EQ(a->branch_scale(), adapters[0]->branch_scale());
  }
  ASSERT_EQ(counts.size(), 3u);
  EXPECT_NEAR(counts[1.0] / 3000.0, 1.0 / 3, 0.04);
  EXPECT_NEAR(counts[1.5] / 3000.0, 1.0 / 3, 0.04);
  EXPECT_NEAR(counts[0.5] / 3000.0, 1.0 / 3, 0.04);

  // h well above float32 round-off (losses are computed in fp32), well below ε.
  const double eps = 0.5, h = 0.1;
  // Around θ = θ̂ + Δ (b = 1), the perturbation direction is Δ (b ± ε).
  const double l0 = L(1.0);
  const double expected_perturbed = (L(1.0) + L(1.0 + eps) + L(1.0 - eps)) / 3.0;
  const double dhd = (L(1.0 + h) - 2 * l0 + L(1.0 - h)) / (h * h);
  const double predicted = l0 + eps * eps / 3.0 * dhd;
  ASSERT_GT(std::abs(expected_perturbed - l0), 1e-3);  // a perturbation that matters
  EXPECT_NEAR(expected_perturbed, predicted, 0.1 * std::abs(expected_perturbed - l0) + 1e-5)
      << "l0 " << l0 << " dHd " << dhd;
  method->AbortTask(work.get());
}

TEST(PmTest, TrainsMergesAndRestores) {
  at::set_num_threads(1);
  auto model = TinyModel();
  MethodConfig config = testing::QvTestConfig();
  config.rank = 2;
  config.alpha = 4.0;
  auto method = MakeMethod("pm", config);
  Trainer trainer(Options(6));
  auto r1 = trainer.Train(*model, *method, "t1", {SyntheticTask("t1")});
  ASSERT_TRUE(r1.ok()) << r1.status();
  auto r2 = trainer.Train(*r1->model, *method, "t2", {SyntheticTask("t2", 3)});
  ASSERT_TRUE(r2.ok()) << r2.status();
  auto state = method->ExportState();
  ASSERT_TRUE(state.ok()) << state.status();
  auto j = nlohmann::json::parse(state->config_json);
  auto extra = j["extra"].is_string() ? nlohmann::json::parse(j["extra"].get<std::string>()) : j["extra"];
  auto alphas = extra["alphas"].get<std::vector<double>>();
  ASSERT_EQ(alphas.size(), 2u);
  // One task alone: its own Fisher only -> α = 1.
  EXPECT_NEAR(alphas[0], 1.0, 1e-6);
  EXPECT_GE(alphas[1], 0.0);
  EXPECT_LE(alphas[1], 1.0);
  for (const auto& m : method->modules()) EXPECT_EQ(r2->model->FindLinear(m)->adapter, nullptr);
  auto restored = CreateMethodFromState(*state);
  ASSERT_TRUE(restored.ok()) << restored.status();
  auto base = model->ShallowCopy();
  ASSERT_TRUE((*restored)->ApplyServedWeights(base.get()).ok());
  for (const auto& m : method->modules()) {
    EXPECT_LT((base->FindLinear(m)->weight - r2->model->FindLinear(m)->weight).abs().max().item<double>(),
              1e-5)
        << m;
  }
}

}  // namespace
}  // namespace strata
