#pragma once
// A continuous decode batch: many generations on one set of weights, advanced together one token
// per step, with rows joining and leaving between steps (the unit a serving scheduler drives;
// Generate() runs one to completion).
//
// Rows that join are prefilled together (one left-padded forward) and their keys/values are added
// to the running KV cache left-padded to a common length, so every row's real positions stay
// right-aligned and the attention mask hides the padding; positions come from the mask, so a row's
// tokens do not depend on who shares the batch. Rows that finish or are cancelled leave at once
// (their cache rows are dropped, and left padding no remaining row needs is trimmed).
//
// Each row brings its own sampling options, stops, seed and token limit, its own callbacks, and
// optionally its own side paths: a route model (a copy of the batch's weights with adapters on its
// linear layers, as Engine::Routed() makes for a learned task) whose adapters apply to that row
// only. Rows of different routes therefore share every base GEMM; each route's low-rank side path
// runs on its own rows.
//
// Thread safety: none; one thread drives a batch (Add, Cancel, Step). Callbacks run on that thread
// inside Step(). The weights and route models must not be modified while the batch uses them.

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/model/generate.h"

namespace strata {

class CausalLM;
class Tokenizer;

struct DecodeRow {
  std::vector<int32_t> prompt;  // non-empty, ids in the vocabulary, <= max_position_embeddings
  SamplingOptions sampling;
  // Index of the row's RNG stream: sampling is deterministic per (sampling.seed, stream), as in
  // Generate() where the stream is the prompt's index.
  uint64_t stream = 0;
  // The row's side paths: the adapters on this model's linear layers (null = the weights alone).
  std::shared_ptr<const CausalLM> route_model;
  // Each generated token, as Generate()'s TokenCallback for this row (index is always 0), with its
  // log-probabilities when sampling.logprobs is set (null otherwise, and for id -1). Return false
  // to cancel the row.
  std::function<bool(int32_t id, const std::string& text_delta, const TokenLogprob* logprob)> on_token;
  // Called exactly once when the row leaves the batch: its result, or the error that ended it
  // (INTERNAL when the forward pass failed; every running row gets it).
  std::function<void(absl::StatusOr<GenerationResult>)> on_done;
};

class DecodeBatch {
 public:
  DecodeBatch(std::shared_ptr<const CausalLM> weights, std::shared_ptr<const Tokenizer> tokenizer);
  ~DecodeBatch();
  DecodeBatch(const DecodeBatch&) = delete;
  DecodeBatch& operator=(const DecodeBatch&) = delete;

  // Checks the row as Generate() checks a prompt and its options (INVALID_ARGUMENT naming the
  // field; on_done is not called then) and queues it to join at the next Step(). Returns the row's
  // id. A row with nothing to generate (max_new_tokens 0) finishes at the next Step().
  absl::StatusOr<int64_t> Add(DecodeRow row);
  // Ends row `id` at the next Step() with finish_reason "cancelled" (no-op for an unknown id).
  void Cancel(int64_t id);

  // Rows running or waiting to join.
  size_t size() const;
  bool empty() const { return size() == 0; }
  // Rows in the last forward pass (the batch size of the last step).
  int64_t last_step_rows() const;
  const std::shared_ptr<const CausalLM>& weights() const;

  // Joins the queued rows (their prefill yields each one's first token), then decodes one token
  // for every running row. Returns the forward pass's error after ending every row with it.
  absl::Status Step();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace strata
