#pragma once
// Process-wide LibTorch runtime settings and facts: intra-op threads, BLAS library, device.
// Torch-free header.

#include <string>

#include "absl/status/statusor.h"

namespace strata {

// Sets LibTorch's intra-op (OpenMP) thread count for the calling thread's pool and the process
// default. LibTorch 1.13 starts with hardware_concurrency()/2 threads; Strata always sets it.
void SetTorchThreads(int threads);
int GetTorchThreads();

// The BLAS shared library the process has loaded (resolved path of libblas.so.3 / libopenblas*),
// or "unknown".
std::string LoadedBlasLibrary();
// The malloc implementation in use: "jemalloc", "tcmalloc" or "glibc".
std::string LoadedAllocator();

// Parses and checks a device string ("cpu", "cuda", "cuda:N"): INVALID_ARGUMENT for anything
// else, FAILED_PRECONDITION for cuda when LibTorch has no CUDA or no device.
absl::StatusOr<std::string> ResolveDevice(const std::string& device);

// A one-line summary for logs: torch version, BLAS, threads, OpenMP, CPU capability.
std::string TorchRuntimeSummary();

}  // namespace strata
