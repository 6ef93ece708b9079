#include "core/model/small_gemm.h"

#include <ATen/Parallel.h>

// GCC 12's AVX-512 intrinsics make their "undefined" vectors as `__m512 __Y = __Y;`, which
// -Wmaybe-uninitialized reports at every inlined use; the pragma must precede the header.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <string>

namespace strata {
namespace {

// Weight rows per block: each is loaded once per vector of k and used against every row of x in
// the block's row group.
constexpr int kWeightRows = 4;

// Horizontal sums, each in one fixed order.
__attribute__((target("avx2,fma"))) inline float Sum256(__m256 v) {
  const __m128 lo = _mm256_castps256_ps128(v);
  const __m128 hi = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(lo, hi);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx512f,avx2,fma"))) inline float Sum512(__m512 v) {
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2)));  // 256-bit halves
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));  // 128-bit quarters
  v = _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));        // pairs
  v = _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1)));        // neighbours
  return _mm512_cvtss_f32(v);
}

// --- AVX-512: 32 registers, 16 lanes; 4 weight rows × 6 input rows = 24 accumulators -----------

template <int kRows>
__attribute__((target("avx512f,avx2,fma"))) inline void Block512(const float* w, int wrows, const float* x,
                                                                 int64_t d, int64_t ldy, float* y) {
  __m512 acc[kWeightRows][kRows];
  for (int a = 0; a < kWeightRows; ++a) {
    for (int b = 0; b < kRows; ++b) acc[a][b] = _mm512_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 16 <= d; k += 16) {
    __m512 wv[kWeightRows];
    for (int a = 0; a < kWeightRows; ++a)
      wv[a] = a < wrows ? _mm512_loadu_ps(w + a * d + k) : _mm512_setzero_ps();
    for (int b = 0; b < kRows; ++b) {
      const __m512 xv = _mm512_loadu_ps(x + b * d + k);
      for (int a = 0; a < kWeightRows; ++a) acc[a][b] = _mm512_fmadd_ps(wv[a], xv, acc[a][b]);
    }
  }
  for (int a = 0; a < wrows; ++a) {
    for (int b = 0; b < kRows; ++b) {
      float s = Sum512(acc[a][b]);
      for (int64_t t = k; t < d; ++t) s += w[a * d + t] * x[b * d + t];
      y[b * ldy + a] = s;
    }
  }
}

__attribute__((target("avx512f,avx2,fma"))) void Rows512(const float* x, int64_t rows, const float* w,
                                                         int wrows, int64_t d, int64_t ldy, float* y) {
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6) Block512<6>(w, wrows, x + r * d, d, ldy, y + r * ldy);
  for (; r + 2 <= rows; r += 2) Block512<2>(w, wrows, x + r * d, d, ldy, y + r * ldy);
  for (; r < rows; ++r) Block512<1>(w, wrows, x + r * d, d, ldy, y + r * ldy);
}

// --- AVX2 + FMA: 16 registers, 8 lanes; 4 weight rows × 3 input rows = 12 accumulators ---------
// (3 input rows: 16 rows 1.2-1.4x faster than 2-row blocks on the AVX2 host; 4 rows spill)

template <int kRows>
__attribute__((target("avx2,fma"))) inline void Block256(const float* w, int wrows, const float* x, int64_t d,
                                                         int64_t ldy, float* y) {
  __m256 acc[kWeightRows][kRows];
  for (int a = 0; a < kWeightRows; ++a) {
    for (int b = 0; b < kRows; ++b) acc[a][b] = _mm256_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 8 <= d; k += 8) {
    __m256 wv[kWeightRows];
    for (int a = 0; a < kWeightRows; ++a)
      wv[a] = a < wrows ? _mm256_loadu_ps(w + a * d + k) : _mm256_setzero_ps();
    for (int b = 0; b < kRows; ++b) {
      const __m256 xv = _mm256_loadu_ps(x + b * d + k);
      for (int a = 0; a < kWeightRows; ++a) acc[a][b] = _mm256_fmadd_ps(wv[a], xv, acc[a][b]);
    }
  }
  for (int a = 0; a < wrows; ++a) {
    for (int b = 0; b < kRows; ++b) {
      float s = Sum256(acc[a][b]);
      for (int64_t t = k; t < d; ++t) s += w[a * d + t] * x[b * d + t];
      y[b * ldy + a] = s;
    }
  }
}

__attribute__((target("avx2,fma"))) void Rows256(const float* x, int64_t rows, const float* w, int wrows,
                                                 int64_t d, int64_t ldy, float* y) {
  int64_t r = 0;
  for (; r + 3 <= rows; r += 3) Block256<3>(w, wrows, x + r * d, d, ldy, y + r * ldy);
  for (; r + 2 <= rows; r += 2) Block256<2>(w, wrows, x + r * d, d, ldy, y + r * ldy);
  for (; r < rows; ++r) Block256<1>(w, wrows, x + r * d, d, ldy, y + r * ldy);
}

using RowsFn = void (*)(const float*, int64_t, const float*, int, int64_t, int64_t, float*);

struct Isa {
  const char* name;
  RowsFn rows;
};

Isa Detect() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return {"avx512", &Rows512};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return {"avx2", &Rows256};
  return {"", nullptr};
}

const Isa& CpuIsa() {
  static const Isa isa = Detect();
  return isa;
}

bool Run(RowsFn fn, const float* x, int64_t rows, const float* w, int64_t n, int64_t d, const float* bias,
         float* y) {
  if (fn == nullptr) return false;
  const int64_t blocks = (n + kWeightRows - 1) / kWeightRows;
  // At least 256 KiB of weights per task: a parallel region costs ~40 µs when its threads sleep
  // between regions (OMP_WAIT_POLICY=PASSIVE), more than a low-rank factor's whole product.
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, kWeightRows * d));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t j = blk * kWeightRows;
      const int wrows = static_cast<int>(std::min<int64_t>(kWeightRows, n - j));
      fn(x, rows, w + j * d, wrows, d, n, y + j);
      if (bias != nullptr) {
        for (int64_t r = 0; r < rows; ++r) {
          for (int a = 0; a < wrows; ++a) y[r * n + j + a] += bias[j + a];
        }
      }
    }
  });
  return true;
}

}  // namespace

const char* SmallRowsLinearIsa() { return CpuIsa().name; }

bool SmallRowsLinear(const float* x, int64_t rows, const float* w, int64_t n, int64_t d, const float* bias,
                     float* y) {
  return Run(CpuIsa().rows, x, rows, w, n, d, bias, y);
}

namespace internal {

bool SmallRowsLinearWithIsa(const std::string& isa, const float* x, int64_t rows, const float* w, int64_t n,
                            int64_t d, const float* bias, float* y) {
  __builtin_cpu_init();
  if (isa == "avx512" && __builtin_cpu_supports("avx512f")) return Run(&Rows512, x, rows, w, n, d, bias, y);
  if (isa == "avx2" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return Run(&Rows256, x, rows, w, n, d, bias, y);
  }
  return false;
}

}  // namespace internal
}  // namespace strata
