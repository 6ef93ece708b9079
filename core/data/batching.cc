#include "core/data/batching.h"

#include <algorithm>
#include <numeric>

#include "core/data/random.h"

namespace strata {

int32_t DefaultPadId(const Tokenizer& tokenizer) { return tokenizer.pad_id().value_or(0); }

Batch MakeBatch(const std::vector<EncodedExample>& examples, const std::vector<int64_t>& indices,
                const BatchOptions& options) {
  Batch b;
  b.rows = static_cast<int64_t>(indices.size());
  int64_t longest = 0;
  for (int64_t i : indices) longest = std::max(longest, examples[static_cast<size_t>(i)].length());
  const int64_t multiple = std::max<int64_t>(options.pad_to_multiple_of, 1);
  b.seq_len = (longest + multiple - 1) / multiple * multiple;
  const size_t n = static_cast<size_t>(b.rows * b.seq_len);
  b.input_ids.assign(n, options.pad_id);
  b.attention_mask.assign(n, 0);
  b.loss_mask.assign(n, 0.0f);
  b.labels.assign(n, options.ignore_index);
  b.example_indices = indices;
  for (int64_t r = 0; r < b.rows; ++r) {
    const EncodedExample& e = examples[static_cast<size_t>(indices[static_cast<size_t>(r)])];
    const int64_t start = std::max<int64_t>(e.target_start, 1);
    for (int64_t t = 0; t < e.length(); ++t) {
      const size_t k = static_cast<size_t>(b.index(r, t));
      b.input_ids[k] = e.ids[static_cast<size_t>(t)];
      b.attention_mask[k] = 1;
      if (t >= start) {
        b.loss_mask[k] = 1.0f;
        b.labels[k] = e.ids[static_cast<size_t>(t)];
        ++b.target_tokens;
      }
    }
    b.real_tokens += e.length();
  }
  return b;
}

std::vector<std::vector<int64_t>> PlanBatches(const std::vector<int64_t>& lengths,
                                              const BatchPlanOptions& options) {
  const int64_t bs = std::max<int64_t>(options.batch_size, 1);
  int64_t bucket = options.bucket_size > 0 ? options.bucket_size : 32 * bs;
  bucket = (bucket + bs - 1) / bs * bs;

  std::vector<int64_t> order(lengths.size());
  std::iota(order.begin(), order.end(), int64_t{0});
  Rng rng(options.seed);
  if (options.shuffle) rng.Shuffle(order);

  std::vector<std::vector<int64_t>> batches;
  const auto n = static_cast<int64_t>(order.size());
  for (int64_t begin = 0; begin < n; begin += bucket) {
    const int64_t end = std::min(n, begin + bucket);
    std::stable_sort(order.begin() + begin, order.begin() + end, [&](int64_t a, int64_t b) {
      return lengths[static_cast<size_t>(a)] > lengths[static_cast<size_t>(b)];
    });
    for (int64_t s = begin; s < end; s += bs) {
      batches.emplace_back(order.begin() + s, order.begin() + std::min(end, s + bs));
    }
  }
  if (options.drop_last && !batches.empty() && static_cast<int64_t>(batches.back().size()) < bs) {
    batches.pop_back();
  }
  if (options.shuffle) rng.Shuffle(batches);
  return batches;
}

std::vector<std::vector<int64_t>> PlanBatches(const std::vector<EncodedExample>& examples,
                                              const BatchPlanOptions& options) {
  std::vector<int64_t> lengths;
  lengths.reserve(examples.size());
  for (const auto& e : examples) lengths.push_back(e.length());
  return PlanBatches(lengths, options);
}

}  // namespace strata
