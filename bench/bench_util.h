#pragma once
// Small helpers shared by the benchmark drivers (bench cl, bench train, the decode benchmark).

#include <chrono>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_split.h"
#include "core/model/config.h"
#include "core/model/llama_configs.h"

namespace strata::bench {

using Clock = std::chrono::steady_clock;

// Bench exit codes: 0 ok, 1 a method or measurement failed, 2 bad command line or input.
inline constexpr int kExitOk = 0;
inline constexpr int kExitFailed = 1;
inline constexpr int kExitUsage = 2;

inline double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// "a, b,c" -> {"a", "b", "c"} (empty items dropped).
inline std::vector<std::string> SplitList(const std::string& s) {
  std::vector<std::string> out;
  for (absl::string_view part : absl::StrSplit(s, ',', absl::SkipWhitespace())) {
    out.emplace_back(absl::StripAsciiWhitespace(part));
  }
  return out;
}

// Flattens CLI11's vector options given either as "a,b" or "a b" or repeated.
inline std::vector<std::string> FlattenList(const std::vector<std::string>& in) {
  std::vector<std::string> out;
  for (const std::string& s : in) {
    for (std::string& p : SplitList(s)) out.push_back(std::move(p));
  }
  return out;
}

// The random-init ~110M Llama of the training and decode benchmarks: hidden 768, 12 layers,
// 12 heads, intermediate 2048, vocab 32000, tied embeddings.
inline ModelConfig Llama110mConfig() {
  return TiedLlamaConfig(/*hidden=*/768, /*intermediate=*/2048, /*layers=*/12, /*heads=*/12, /*kv_heads=*/12,
                         /*vocab=*/32000, /*max_positions=*/2048);
}

}  // namespace strata::bench
