#pragma once
// Text generation on a CausalLM: greedy or sampled, with stops, streaming and batching.

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/model.h"
#include "core/model/tokenizer.h"

namespace strata {

struct SamplingOptions {
  int32_t max_new_tokens = 128;
  float temperature = 0.0f;  // 0 = greedy
  int32_t top_k = 0;         // 0 = off
  float top_p = 1.0f;        // 1 = off
  uint64_t seed = 0;
  std::vector<int32_t> stop_ids;        // in addition to the tokenizer's EOS ids
  std::vector<std::string> stop_strings;
  bool stop_on_eos = true;
};

struct GenerationResult {
  std::vector<int32_t> ids;   // generated ids (prompt excluded, stop token excluded)
  std::string text;           // decoded generated text, truncated before a stop string
  std::string finish_reason;  // "length", "eos", "stop", "cancelled"
  int64_t prompt_tokens = 0;
  double seconds = 0;
};

// Called for each generated token of sequence `index` with the newly decoded text (may be empty
// while a UTF-8 sequence is incomplete). Return false to cancel that sequence.
using TokenCallback = std::function<bool(size_t index, int32_t id, const std::string& text_delta)>;

// Generates for a batch of tokenised prompts at once (left-padded prefill, then KV-cached decode).
absl::StatusOr<std::vector<GenerationResult>> Generate(const CausalLM& model, const Tokenizer& tokenizer,
                                                       const std::vector<std::vector<int32_t>>& prompts,
                                                       const SamplingOptions& options,
                                                       const TokenCallback& on_token = nullptr);

}  // namespace strata
