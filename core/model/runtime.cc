#include "core/model/runtime.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/torch.h>
#include <torch/version.h>

#include <climits>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace strata {
namespace {

// Paths of the shared objects mapped into this process (/proc/self/maps), in map order, unique.
std::vector<std::string> MappedLibraries() {
  std::vector<std::string> paths;
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    const size_t slash = line.find('/');
    if (slash == std::string::npos) continue;
    std::string path = line.substr(slash);
    if (path.find(".so") == std::string::npos) continue;
    if (paths.empty() || paths.back() != path) {
      bool seen = false;
      for (const std::string& p : paths) seen = seen || p == path;
      if (!seen) paths.push_back(std::move(path));
    }
  }
  return paths;
}

std::string Basename(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

std::string ResolvedPath(const std::string& path) {
  char buf[PATH_MAX];
  if (realpath(path.c_str(), buf) != nullptr) return std::string(buf);
  return path;
}

}  // namespace

void SetTorchThreads(int threads) {
  if (threads < 1) threads = 1;
#ifdef STRATA_ONE_TORCH_THREAD
  // ThreadSanitizer builds (scripts/sanitize.sh tsan): libgomp is not instrumented, so TSan cannot
  // see the barriers of an OpenMP team and reports every hand-off of data to its worker threads.
  // With one thread ATen and OpenBLAS run their loops inline on the calling thread.
  threads = 1;
#endif
  at::set_num_threads(threads);
}

int GetTorchThreads() { return at::get_num_threads(); }

std::string LoadedBlasLibrary() {
  // A specific implementation (OpenBLAS, BLIS, MKL) wins over the generic libblas.so.3 alternative,
  // which is itself usually a symlink to one of them.
  std::string generic;
  for (const std::string& path : MappedLibraries()) {
    const std::string base = Basename(path);
    if (absl::StartsWith(base, "libopenblas") || absl::StartsWith(base, "libblis") ||
        absl::StartsWith(base, "libmkl_rt") || absl::StartsWith(base, "libmkl_core")) {
      return ResolvedPath(path);
    }
    if (generic.empty() && absl::StartsWith(base, "libblas")) generic = path;
  }
  return generic.empty() ? "unknown" : ResolvedPath(generic);
}

std::string LoadedAllocator() {
  for (const std::string& path : MappedLibraries()) {
    const std::string base = Basename(path);
    if (absl::StartsWith(base, "libjemalloc")) return "jemalloc";
    if (absl::StartsWith(base, "libtcmalloc")) return "tcmalloc";
  }
  return "glibc";
}

absl::StatusOr<std::string> ResolveDevice(const std::string& device) {
  const std::string d = absl::AsciiStrToLower(device);
  if (d == "cpu") return std::string("cpu");
  int64_t index = 0;
  if (d == "cuda") {
    index = 0;
  } else if (absl::StartsWith(d, "cuda:")) {
    if (!absl::SimpleAtoi(d.substr(5), &index) || index < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("device \"", device, "\": expected cpu, cuda or cuda:N"));
    }
  } else {
    return absl::InvalidArgumentError(absl::StrCat("device \"", device, "\": expected cpu, cuda or cuda:N"));
  }
  if (!torch::cuda::is_available()) {
    return absl::FailedPreconditionError(
        absl::StrCat("device \"", device, "\": this LibTorch build has no CUDA support or no CUDA device"));
  }
  const int64_t count = static_cast<int64_t>(torch::cuda::device_count());
  if (index >= count) {
    return absl::FailedPreconditionError(
        absl::StrCat("device \"", device, "\": only ", count, " CUDA device(s) visible"));
  }
  return absl::StrCat("cuda:", index);
}

std::string TorchRuntimeSummary() {
  std::string capability = "unknown";
  std::istringstream config(at::show_config());
  std::string line;
  while (std::getline(config, line)) {
    const size_t pos = line.find("CPU capability usage:");
    if (pos != std::string::npos) {
      capability = std::string(absl::StripAsciiWhitespace(line.substr(pos + 21)));
    }
  }
  std::string openmp = at::get_openmp_version();
  // "OpenMP 201511 (a.k.a. OpenMP 4.5)" -> keep as is; empty when torch was built without it.
  if (openmp.empty()) openmp = "no OpenMP";
  // Spinning OpenMP workers (the default policy) slow two torch workloads sharing cores by up to
  // 55x (docs/benchmarks.md): say which policy is in force.
  const char* wait_policy = std::getenv("OMP_WAIT_POLICY");
  openmp = absl::StrCat(openmp, ", OMP_WAIT_POLICY ", wait_policy != nullptr ? wait_policy : "unset");
  return absl::StrCat("torch ", TORCH_VERSION_MAJOR, ".", TORCH_VERSION_MINOR, ".", TORCH_VERSION_PATCH,
                      "; BLAS ", LoadedBlasLibrary(), "; threads ", at::get_num_threads(), " (interop ",
                      at::get_num_interop_threads(), "); ", openmp, "; CPU capability ", capability,
                      "; allocator ", LoadedAllocator(), "; cuda ",
                      torch::cuda::is_available() ? "available" : "unavailable");
}

}  // namespace strata
