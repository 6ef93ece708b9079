#pragma once
// Text generation on a CausalLM: greedy or sampled, with stops, streaming and batching.
//
// Thread safety: Generate() only reads the model and the tokenizer, so several calls may run
// concurrently (each has its own KV cache); the model must not be modified meanwhile.
// Failures: INVALID_ARGUMENT for bad options or prompts (naming the field / prompt index),
// INTERNAL if LibTorch throws during the forward pass.

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/model.h"
#include "core/model/tokenizer.h"

namespace strata {

struct SamplingOptions {
  int32_t max_new_tokens = 128;  // >= 0; generation also stops at max_position_embeddings in all
  float temperature = 0.0f;      // 0 = greedy (argmax); > 0 samples from softmax(logits / T)
  int32_t top_k = 0;             // 0 = off; with temperature > 0 keep the k most likely tokens
  float top_p = 1.0f;            // 1 = off; (0, 1]: keep the smallest set with mass >= top_p
  // Sampling is deterministic per (seed, prompt index): each sequence has its own RNG stream, so
  // a prompt gives the same tokens alone or in a batch at the same index.
  uint64_t seed = 0;
  // Stop tokens in addition to EOS (finish_reason "stop"). stories260K-style models that start a
  // new story with BOS instead of emitting EOS need the BOS id here.
  std::vector<int32_t> stop_ids;
  // Stop strings: the text is cut before the first occurrence (finish_reason "stop").
  std::vector<std::string> stop_strings;
  // Stop on the tokenizer's EOS ids and the model config's eos_token_ids (finish_reason "eos").
  bool stop_on_eos = true;
  // Per-token log-probabilities (TokenLogprob) of each generated token, and of the top_logprobs
  // most likely tokens at that step (0..kMaxTopLogprobs). They are the model's distribution,
  // log_softmax(logits), before temperature, top-k and top-p (as OpenAI and vLLM report them).
  bool logprobs = false;
  int32_t top_logprobs = 0;
};

inline constexpr int32_t kMaxTopLogprobs = 20;

// The log-probability (natural log) of one generated token and the most likely alternatives at
// its step, most likely first (ties: lower id first).
struct TokenLogprob {
  int32_t id = -1;
  float logprob = 0;
  std::vector<std::pair<int32_t, float>> top;
};

struct GenerationResult {
  // Generated ids, prompt excluded. A stop/EOS token is excluded; with a stop string the ids run
  // up to and including the token that completed it.
  std::vector<int32_t> ids;
  // The generated text as it continues the prompt (decoded in context, so a leading space is
  // kept), truncated before a stop string; always valid UTF-8 (invalid bytes and a character left
  // incomplete at the end become U+FFFD).
  std::string text;
  std::string finish_reason;  // "length", "eos", "stop", "cancelled"
  // With SamplingOptions::logprobs: one entry per id in `ids`, in order.
  std::vector<TokenLogprob> logprobs;
  int64_t prompt_tokens = 0;
  double seconds = 0;  // from the call until this sequence finished
};

// Called for each generated token of sequence `index` (kept in ids; not for a stop/EOS token) with
// the newly decoded text: empty while a UTF-8 character is incomplete or while the text could be
// the start of a stop string; every delta is valid UTF-8 on its own. Text still held back when a
// sequence ends on a stop/EOS token is delivered by one more call with id == -1. The deltas of a
// sequence add up to its GenerationResult::text (unless cancelled). Return false to cancel that
// sequence (finish_reason "cancelled"; the others go on). Called on the calling thread.
using TokenCallback = std::function<bool(size_t index, int32_t id, const std::string& text_delta)>;

// INVALID_ARGUMENT naming the field for options Generate() refuses.
absl::Status ValidateSamplingOptions(const SamplingOptions& options);
// INVALID_ARGUMENT (messages start with `label`) for an empty prompt, one longer than the model's
// max_position_embeddings, or ids outside its vocabulary.
absl::Status CheckPromptIds(const std::vector<int32_t>& prompt, const ModelConfig& config,
                            const std::string& label);

// Generates for a batch of tokenised prompts at once: one left-padded prefill, then KV-cached
// decode steps; each sequence finishes independently (finished rows leave the batch). A
// DecodeBatch (decode_batch.h) run to completion. Runs under
// c10::InferenceMode. Prompts must be non-empty, with ids in [0, vocab_size) and no longer than
// max_position_embeddings.
absl::StatusOr<std::vector<GenerationResult>> Generate(const CausalLM& model, const Tokenizer& tokenizer,
                                                       const std::vector<std::vector<int32_t>>& prompts,
                                                       const SamplingOptions& options,
                                                       const TokenCallback& on_token = nullptr);

// Log-likelihood (sum of log-probabilities, natural log) of each continuation after `prompt`: the
// prompt runs once (one prefill into a KV cache), its cache is shared by every continuation, and
// the continuations run together, right-padded, in batches of up to `batch_size` rows. Runs under
// c10::InferenceMode. INVALID_ARGUMENT for an empty prompt or continuation, ids outside the
// vocabulary, or a prompt + continuation longer than max_position_embeddings (naming the
// continuation's index); INTERNAL if LibTorch throws.
absl::StatusOr<std::vector<double>> ContinuationLogLikelihoods(
    const CausalLM& model, const std::vector<int32_t>& prompt,
    const std::vector<std::vector<int32_t>>& continuations, int64_t batch_size = 16);

}  // namespace strata
