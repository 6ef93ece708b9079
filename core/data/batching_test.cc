#include "core/data/batching.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "core/data/dataset.h"
#include "core/data/fake_tokenizer.h"

namespace strata {
namespace {

using ::testing::ElementsAre;
using ::testing::SizeIs;

EncodedExample Enc(std::vector<int32_t> ids, int32_t target_start) {
  EncodedExample e;
  e.ids = std::move(ids);
  e.target_start = target_start;
  e.untruncated_length = e.length();
  return e;
}

TEST(BatchingTest, PadsRightAndMasks) {
  // Row 0: prompt [1 10 11], completion [12 13]. Row 1: text [1 20 21].
  std::vector<EncodedExample> ex = {Enc({1, 10, 11, 12, 13}, 3), Enc({1, 20, 21}, 1)};
  BatchOptions options;
  options.pad_id = 0;
  Batch b = MakeBatch(ex, {1, 0}, options);
  EXPECT_EQ(b.rows, 2);
  EXPECT_EQ(b.seq_len, 5);
  EXPECT_THAT(b.example_indices, ElementsAre(1, 0));
  EXPECT_THAT(b.input_ids, ElementsAre(1, 20, 21, 0, 0,  //
                                       1, 10, 11, 12, 13));
  EXPECT_THAT(b.attention_mask, ElementsAre(1, 1, 1, 0, 0,  //
                                            1, 1, 1, 1, 1));
  EXPECT_THAT(b.loss_mask, ElementsAre(0, 1, 1, 0, 0,  //
                                       0, 0, 0, 1, 1));
  EXPECT_THAT(b.labels, ElementsAre(-100, 20, 21, -100, -100,  //
                                    -100, -100, -100, 12, 13));
  EXPECT_EQ(b.target_tokens, 4);
  EXPECT_EQ(b.real_tokens, 8);
}

TEST(BatchingTest, PadToMultipleAndPadId) {
  std::vector<EncodedExample> ex = {Enc({1, 5, 6}, 1)};
  BatchOptions options;
  options.pad_id = 7;
  options.pad_to_multiple_of = 4;
  Batch b = MakeBatch(ex, {0}, options);
  EXPECT_EQ(b.seq_len, 4);
  EXPECT_THAT(b.input_ids, ElementsAre(1, 5, 6, 7));
  EXPECT_THAT(b.attention_mask, ElementsAre(1, 1, 1, 0));
  testing::FakeTokenizer tok;
  EXPECT_EQ(DefaultPadId(tok), 0);  // no pad token -> 0
}

TEST(BatchingTest, PlanCoversEveryExampleOnceAndIsDeterministic) {
  std::vector<int64_t> lengths;
  for (int i = 0; i < 103; ++i) lengths.push_back(1 + (i * 37) % 50);
  BatchPlanOptions options;
  options.batch_size = 8;
  options.bucket_size = 32;
  options.seed = 11;
  auto plan = PlanBatches(lengths, options);
  ASSERT_THAT(plan, SizeIs(13));  // ceil(103 / 8)
  std::multiset<int64_t> seen;
  int short_batches = 0;
  for (const auto& batch : plan) {
    seen.insert(batch.begin(), batch.end());
    if (batch.size() < 8) ++short_batches;
  }
  EXPECT_EQ(seen.size(), 103u);
  EXPECT_EQ(std::set<int64_t>(seen.begin(), seen.end()).size(), 103u);
  EXPECT_EQ(short_batches, 1);
  EXPECT_EQ(plan, PlanBatches(lengths, options));
  options.seed = 12;
  EXPECT_NE(plan, PlanBatches(lengths, options));

  options.drop_last = true;
  auto dropped = PlanBatches(lengths, options);
  EXPECT_THAT(dropped, SizeIs(12));
  for (const auto& batch : dropped) EXPECT_THAT(batch, SizeIs(8));
}

TEST(BatchingTest, BucketsGroupSimilarLengths) {
  // 256 examples, lengths 1..256 in random-ish order.
  std::vector<int64_t> lengths;
  for (int i = 0; i < 256; ++i) lengths.push_back(1 + (i * 97) % 256);
  auto spread = [&](const std::vector<std::vector<int64_t>>& plan) {
    int64_t total = 0;
    for (const auto& batch : plan) {
      int64_t lo = 1 << 30, hi = 0;
      for (int64_t i : batch) {
        lo = std::min(lo, lengths[static_cast<size_t>(i)]);
        hi = std::max(hi, lengths[static_cast<size_t>(i)]);
      }
      total += hi - lo;
    }
    return total;
  };
  BatchPlanOptions bucketed;
  bucketed.batch_size = 8;
  bucketed.bucket_size = 256;  // one chunk: batches are runs of 8 consecutive lengths
  BatchPlanOptions unbucketed = bucketed;
  unbucketed.bucket_size = 8;  // a chunk per batch: no grouping
  EXPECT_EQ(spread(PlanBatches(lengths, bucketed)), 32 * 7);
  EXPECT_GT(spread(PlanBatches(lengths, unbucketed)), 32 * 100);
}

TEST(BatchingTest, NoShuffleKeepsOrderSortedWithinBuckets) {
  std::vector<int64_t> lengths = {3, 9, 1, 7, 5, 2};
  BatchPlanOptions options;
  options.batch_size = 2;
  options.bucket_size = 4;
  options.shuffle = false;
  auto plan = PlanBatches(lengths, options);
  // Bucket {0,1,2,3} sorted longest first: 1(9) 3(7) 0(3) 2(1); bucket {4,5}: 4(5) 5(2).
  EXPECT_THAT(plan, ElementsAre(ElementsAre(1, 3), ElementsAre(0, 2), ElementsAre(4, 5)));
}

TEST(BatchingTest, LossMaskCoversExactlyTheCompletionOnRealData) {
  auto langid = LoadTaskDir(std::string(STRATA_SHARED_DIR) + "/data/cl-small/langid");
  ASSERT_TRUE(langid.ok()) << langid.status();
  auto tok = Tokenizer::ByteLevelDefault();
  std::vector<Example> examples(langid->train.begin(), langid->train.begin() + 64);
  auto encoded = EncodeExamples(*tok, examples);
  BatchPlanOptions plan_options;
  plan_options.batch_size = 16;
  for (const auto& indices : PlanBatches(encoded, plan_options)) {
    Batch b = MakeBatch(encoded, indices, {DefaultPadId(*tok)});
    for (int64_t r = 0; r < b.rows; ++r) {
      const Example& e = examples[static_cast<size_t>(b.example_indices[static_cast<size_t>(r)])];
      std::vector<int32_t> targets, inputs;
      for (int64_t t = 0; t < b.seq_len; ++t) {
        if (b.attention_mask[b.index(r, t)])
          inputs.push_back(static_cast<int32_t>(b.input_ids[b.index(r, t)]));
        if (b.loss_mask[b.index(r, t)] != 0.0f) {
          targets.push_back(static_cast<int32_t>(b.input_ids[b.index(r, t)]));
          EXPECT_EQ(b.labels[b.index(r, t)], b.input_ids[b.index(r, t)]);
        } else {
          EXPECT_EQ(b.labels[b.index(r, t)], -100);
        }
      }
      EXPECT_EQ(tok->Decode(targets, true), e.completion);
      EXPECT_EQ(tok->Decode(inputs, true), e.prompt + e.completion);
    }
  }
}

TEST(BatchingTest, TruncatedBenchmarkExampleKeepsAnswerAndLabel) {
  TaskLoadOptions load;
  load.max_train = 8;
  load.max_test = 1;
  auto agnews = LoadTaskDir(std::string(STRATA_SHARED_DIR) + "/data/cl/agnews", load);
  ASSERT_TRUE(agnews.ok()) << agnews.status();
  auto tok = Tokenizer::ByteLevelDefault();
  EncodeOptions options;
  options.max_seq_len = 64;  // far shorter than the prompts (instruction + options + article)
  for (const auto& e : agnews->train) {
    EncodedExample enc = EncodeExample(*tok, e, options);
    ASSERT_TRUE(enc.truncated);
    ASSERT_EQ(enc.length(), 64);
    EXPECT_EQ(enc.ids[0], 1);  // BOS kept
    std::vector<int32_t> prompt(enc.ids.begin() + 1, enc.ids.begin() + enc.target_start);
    std::vector<int32_t> completion(enc.ids.begin() + enc.target_start, enc.ids.end());
    const std::string prompt_tail = tok->Decode(prompt, true);
    EXPECT_EQ(prompt_tail, e.prompt.substr(e.prompt.size() - prompt_tail.size()));
    EXPECT_EQ(prompt_tail.substr(prompt_tail.size() - 8), "\nAnswer:");
    EXPECT_EQ(tok->Decode(completion, true), e.completion);
  }
}

}  // namespace
}  // namespace strata
