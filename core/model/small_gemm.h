#pragma once
// y = x Wᵀ (+ b) in float32 for a few rows of x, the shape of decoding a batch of a few sequences.
//
// OpenBLAS (the BLAS under Debian's LibTorch) runs such a product as a GEMM that packs the whole
// weight matrix into its panel layout on every call; at m = 16 rows that copy costs as much as the
// arithmetic (docs/benchmarks.md, issue 14's profile: sgemm_incopy 34 % against sgemm_kernel 39 %).
// This kernel reads W in place instead: each block of 4 weight rows is loaded once per 16 (AVX-512)
// or 8 (AVX2) inputs and multiplied against a few rows of x held in registers, the threads of
// LibTorch's pool splitting the output features.
//
// Numerics: every output element is the same sum in the same order (lane-wise partial sums over k,
// one fixed horizontal reduction, then the k tail), whatever the number of rows, the blocking or the
// threads, so a row's result does not depend on which other rows share its batch. It differs from
// OpenBLAS's GEMM only by float32 round-off.
//
// Torch-free header: raw pointers, row-major, contiguous.

#include <cstdint>
#include <string>

namespace strata {

// The most rows the callers hand to SmallRowsLinear: on the 110M config's matrices (AVX2 host, 1 and
// 2 threads) the kernel is 1.2-3x faster than LibTorch's `linear` at 2-32 rows and 1.3-1.6x faster
// than a GEMV per row at 2 rows (strata-bench-decode --kernels 1, docs/benchmarks.md). Decode batches
// are at most this big in most deployments; prefill's hundreds of rows stay on OpenBLAS's GEMM.
inline constexpr int64_t kSmallRowsLinearMaxRows = 32;

// Which instruction set SmallRowsLinear uses on this CPU: "avx512", "avx2" or "" (none: the caller
// falls back to its GEMM).
const char* SmallRowsLinearIsa();

// y[r][j] = Σ_k x[r][k]·w[j][k] (+ bias[j]) for r < rows, j < n; x is rows×d, w is n×d, y is rows×n,
// all row-major and contiguous; bias may be null. Runs on LibTorch's intra-op threads when w is big
// enough to be worth a thread hand-off (at least 256 KiB per thread), else on the caller's. Returns false
// (and writes nothing) when the CPU has neither AVX-512F nor AVX2+FMA.
bool SmallRowsLinear(const float* x, int64_t rows, const float* w, int64_t n, int64_t d, const float* bias,
                     float* y);

namespace internal {
// Tests: the same with a named instruction set ("avx512" or "avx2"); false when this CPU lacks it.
bool SmallRowsLinearWithIsa(const std::string& isa, const float* x, int64_t rows, const float* w, int64_t n,
                            int64_t d, const float* bias, float* y);
}  // namespace internal

}  // namespace strata
