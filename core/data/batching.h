#pragma once
// Padded batches and length-bucketed batch order, as plain row-major buffers the trainer wraps
// into tensors (torch::from_blob(ptr, {rows, seq_len}, torch::kLong / kFloat)). Torch-free.
//
// Layout of a Batch with R rows and T = seq_len columns (row r, column t at [r * T + t]):
//  * input_ids:      token ids, right-padded with pad_id;
//  * attention_mask: 1 on real tokens, 0 on padding;
//  * loss_mask:      1.0 where input token t is a training target (predicted from the logits at
//                    t - 1): completion tokens for supervised examples, every token after the first
//                    for text; 0.0 on prompt tokens, position 0 and padding;
//  * labels:         input_ids where loss_mask is 1, else ignore_index (-100), NOT shifted
//                    (Hugging Face convention: loss = CE(logits[:, :-1], labels[:, 1:])).
//
// Bucketing (PlanBatches): a seeded shuffle of all examples, then chunks of `bucket_size`
// examples (a multiple of batch_size), each sorted by length (stable; longest first), cut into
// batches of batch_size, then a seeded shuffle of the batches. Similar lengths share a batch (little
// padding) while the order stays random. Deterministic for a seed on every platform; pass
// seed + epoch for a new order each epoch. Only the very last batch can be short (drop_last drops
// it). With shuffle = false: no shuffling, examples in order, batches in order (for evaluation).
//
// Thread safety: pure functions.

#include <cstdint>
#include <vector>

#include "core/data/encode.h"
#include "core/model/tokenizer.h"

namespace strata {

struct Batch {
  int64_t rows = 0;
  int64_t seq_len = 0;
  std::vector<int64_t> input_ids;
  std::vector<int64_t> attention_mask;
  std::vector<float> loss_mask;
  std::vector<int64_t> labels;
  std::vector<int64_t> example_indices;  // row r holds examples[example_indices[r]]
  int64_t target_tokens = 0;             // sum of loss_mask
  int64_t real_tokens = 0;               // sum of attention_mask

  int64_t index(int64_t row, int64_t col) const { return row * seq_len + col; }
};

struct BatchOptions {
  int64_t pad_id = 0;  // see DefaultPadId
  // Round seq_len up to a multiple of this (1 = the longest row).
  int64_t pad_to_multiple_of = 1;
  int64_t ignore_index = -100;
};

// The tokenizer's pad id, else 0 (the value is irrelevant under the masks, but must be a valid id).
int32_t DefaultPadId(const Tokenizer& tokenizer);

// Pads examples[indices...] into one batch. Indices must be valid and non-empty.
Batch MakeBatch(const std::vector<EncodedExample>& examples, const std::vector<int64_t>& indices,
                const BatchOptions& options = {});

struct BatchPlanOptions {
  int64_t batch_size = 16;
  // Examples per length-sorting chunk; 0 = 32 * batch_size. Rounded up to a multiple of batch_size.
  // 1 chunk of everything = maximal length grouping; batch_size = no grouping.
  int64_t bucket_size = 0;
  bool shuffle = true;
  bool drop_last = false;
  uint64_t seed = 0;
};

// Batches of example indices (into `lengths`, the example lengths), see above.
std::vector<std::vector<int64_t>> PlanBatches(const std::vector<int64_t>& lengths,
                                              const BatchPlanOptions& options);
std::vector<std::vector<int64_t>> PlanBatches(const std::vector<EncodedExample>& examples,
                                              const BatchPlanOptions& options);

}  // namespace strata
