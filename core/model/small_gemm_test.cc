#include "core/model/small_gemm.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <vector>

#include "core/model/model.h"

namespace strata {
namespace {

// Shapes that exercise every remainder: weight rows not a multiple of the 4-row block, inputs not a
// multiple of the vector width (16 or 8 floats), row counts around the 6- and 2-row groups.
struct Shape {
  int64_t n, d;
};
const Shape kShapes[] = {{1, 1}, {3, 7}, {4, 16}, {13, 40}, {64, 768}, {130, 259}};

std::vector<std::string> Isas() {
  std::vector<std::string> isas;
  for (const char* isa : {"avx512", "avx2"}) {
    float x = 1, w = 1, y = 0;
    if (internal::SmallRowsLinearWithIsa(isa, &x, 1, &w, 1, 1, nullptr, &y)) isas.push_back(isa);
  }
  return isas;
}

at::Tensor Kernel(const std::string& isa, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  at::Tensor y = at::empty({x.size(0), w.size(0)});
  EXPECT_TRUE(internal::SmallRowsLinearWithIsa(
      isa, x.data_ptr<float>(), x.size(0), w.data_ptr<float>(), w.size(0), w.size(1),
      b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>()));
  return y;
}

TEST(SmallRowsLinearTest, MatchesLinearForEveryRemainder) {
  const std::vector<std::string> isas = Isas();
  if (isas.empty()) GTEST_SKIP() << "this CPU has neither AVX-512F nor AVX2+FMA";
  at::manual_seed(7);
  for (const std::string& isa : isas) {
    for (const Shape& s : kShapes) {
      const at::Tensor w = at::randn({s.n, s.d});
      const at::Tensor b = at::randn({s.n});
      for (int64_t rows : {1, 2, 3, 5, 6, 7, 8, 13, 16, 33}) {
        const at::Tensor x = at::randn({rows, s.d});
        const at::Tensor want = at::linear(x.to(at::kDouble), w.to(at::kDouble), b.to(at::kDouble));
        const at::Tensor got = Kernel(isa, x, w, b);
        const double tol = 1e-5 * (1.0 + std::sqrt(static_cast<double>(s.d)));
        EXPECT_TRUE(at::allclose(got.to(at::kDouble), want, tol, tol))
            << isa << " n=" << s.n << " d=" << s.d << " rows=" << rows
            << " max diff=" << (got.to(at::kDouble) - want).abs().max().item<double>();
        const at::Tensor no_bias = Kernel(isa, x, w, at::Tensor());
        EXPECT_TRUE(at::allclose(no_bias.to(at::kDouble), want - b.to(at::kDouble), tol, tol)) << isa;
      }
    }
  }
}

TEST(SmallRowsLinearTest, ARowsResultDoesNotDependOnItsBatch) {
  const std::vector<std::string> isas = Isas();
  if (isas.empty()) GTEST_SKIP() << "this CPU has neither AVX-512F nor AVX2+FMA";
  at::manual_seed(8);
  const at::Tensor w = at::randn({130, 259});
  const at::Tensor x = at::randn({32, 259});
  for (const std::string& isa : isas) {
    const at::Tensor all = Kernel(isa, x, w, at::Tensor());
    for (int64_t rows : {1, 2, 5, 6, 7, 17}) {
      for (int64_t start = 0; start + rows <= 32; start += 9) {
        const at::Tensor part = Kernel(isa, x.narrow(0, start, rows).contiguous(), w, at::Tensor());
        EXPECT_TRUE(at::equal(part, all.narrow(0, start, rows))) << isa << " rows " << start << "+" << rows;
      }
    }
  }
}

// The kernel splits the weight's row blocks over torch's threads (small_gemm.cc is compiled with
// OpenMP for that); each output is still summed by one thread in one order, so the result does not
// depend on the thread count.
TEST(SmallRowsLinearTest, SameResultOnOneAndTwoThreads) {
  const std::vector<std::string> isas = Isas();
  if (isas.empty()) GTEST_SKIP() << "this CPU has neither AVX-512F nor AVX2+FMA";
  at::manual_seed(11);
  const at::Tensor w = at::randn({517, 768});  // 130 row blocks: more than one grain
  const at::Tensor b = at::randn({517});
  const int before = at::get_num_threads();
  for (const std::string& isa : isas) {
    for (int64_t rows : {2, 16, 24}) {
      const at::Tensor x = at::randn({rows, 768});
      at::set_num_threads(1);
      const at::Tensor one = Kernel(isa, x, w, b);
      at::set_num_threads(2);
      const at::Tensor two = Kernel(isa, x, w, b);
      EXPECT_TRUE(at::equal(one, two)) << isa << " rows " << rows;
      EXPECT_TRUE(at::allclose(two, at::linear(x, w, b), 1e-4, 1e-4)) << isa << " rows " << rows;
    }
  }
  at::set_num_threads(before);
}

TEST(SmallRowsLinearTest, LinearLayerUsesItOnlyWithoutAutograd) {
  if (*SmallRowsLinearIsa() == '\0') GTEST_SKIP() << "this CPU has neither AVX-512F nor AVX2+FMA";
  at::manual_seed(9);
  LinearLayer layer;
  layer.weight = at::randn({24, 40});
  const at::Tensor x = at::randn({2, 4, 40});  // 8 rows: the small-rows range
  at::Tensor want = at::empty({8, 24});
  ASSERT_TRUE(SmallRowsLinear(x.contiguous().data_ptr<float>(), 8, layer.weight.data_ptr<float>(), 24, 40,
                              nullptr, want.data_ptr<float>()));
  {
    at::NoGradGuard no_grad;
    const at::Tensor y = layer.Forward(x);
    EXPECT_EQ(y.sizes(), (std::vector<int64_t>{2, 4, 24}));
    EXPECT_TRUE(at::equal(y.reshape({8, 24}), want));
  }
  // With a gradient wanted the layer keeps at::linear, so backward works.
  const at::Tensor xg = x.clone().requires_grad_(true);
  const at::Tensor y = layer.Forward(xg);
  ASSERT_TRUE(y.requires_grad());
  y.sum().backward();
  EXPECT_TRUE(at::allclose(xg.grad(), layer.weight.sum(0).expand({2, 4, 40}), 1e-5, 1e-5));
}

}  // namespace
}  // namespace strata
