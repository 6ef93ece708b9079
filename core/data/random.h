#pragma once
// Deterministic, platform-independent randomness for data sampling and batch order.
// std::shuffle and std::uniform_int_distribution are implementation-defined, so the same seed
// could give different orders with another standard library; these helpers only use the exact
// output sequence of std::mt19937_64, which the standard specifies.
//
// Thread-compatible: one Rng per thread.

#include <cstdint>
#include <random>
#include <utility>
#include <vector>

namespace strata {

class Rng {
 public:
  explicit Rng(uint64_t seed) : engine_(seed) {}

  // Uniform in [0, n) without modulo bias; n > 0.
  uint64_t Below(uint64_t n) {
    const uint64_t limit = UINT64_MAX - (UINT64_MAX % n);  // values >= limit are rejected
    uint64_t x;
    do {
      x = engine_();
    } while (x >= limit);
    return x % n;
  }

  // Fisher-Yates.
  template <typename T>
  void Shuffle(std::vector<T>& v) {
    for (size_t i = v.size(); i > 1; --i) {
      const size_t j = static_cast<size_t>(Below(i));
      std::swap(v[i - 1], v[j]);
    }
  }

 private:
  std::mt19937_64 engine_;
};

}  // namespace strata
