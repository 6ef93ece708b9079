#pragma once
// Tokenization of examples for training and scoring: prompt / completion boundary, BOS / EOS,
// truncation. Torch-free; the ids are plain int32 vectors.
//
// Prompt ids:     [BOS if tokenizer.adds_bos()] + Encode(prompt, /*add_special_tokens=*/false).
//                 BOS is added explicitly (never EOS), so a tokenizer configured with
//                 add_eos_token cannot put EOS between prompt and completion.
// Completion ids: the tokens that follow the prompt ids in the encoding of prompt + completion,
//                 when that encoding starts with the prompt ids (the normal case: the boundary is a
//                 token boundary). This is the token sequence the model sees for the whole text
//                 and what greedy generation after the prompt should produce. With SentencePiece
//                 style tokenizers (normalizer Prepend("▁"), e.g. stories260K / Llama 2) encoding the
//                 completion on its own would add a spurious leading "▁" token; this avoids it.
//                 When a merge spans the boundary (rare), it falls back to
//                 Encode(completion, false). Never contains special tokens unless `add_eos`.
// Text ids:       [BOS if adds_bos()] + Encode(text, false); every token after position 0 is a target.
//
// Scorers (choice log-likelihood, exact-match generation) must use EncodePrompt /
// EncodePromptCompletion so that they see the same ids the trainer used.
//
// Thread safety: pure functions; safe to call concurrently (Tokenizer is immutable).

#include <cstdint>
#include <string_view>
#include <vector>

#include "core/data/example.h"
#include "core/model/tokenizer.h"

namespace strata {

struct PromptCompletionIds {
  std::vector<int32_t> prompt;      // includes BOS when the tokenizer adds it
  std::vector<int32_t> completion;  // no special tokens
};

// [BOS] + Encode(prompt, false) (see above).
std::vector<int32_t> EncodePrompt(const Tokenizer& tokenizer, std::string_view prompt);

// Prompt and completion ids with the boundary rule above.
PromptCompletionIds EncodePromptCompletion(const Tokenizer& tokenizer, std::string_view prompt,
                                           std::string_view completion);

// The completion ids of EncodePromptCompletion(prompt, completion) without encoding the whole
// prompt again: the boundary rule is applied to the prompt's tail (from a word boundary at least
// kCompletionContextBytes before its end) + completion, which tokenises the same way wherever
// merges stay within words (every tokenizer Strata loads). Scoring many completions after one
// long prompt then costs the prompt's tokenisation once. A prompt without such a boundary is
// encoded whole.
inline constexpr size_t kCompletionContextBytes = 64;
std::vector<int32_t> EncodeCompletionAfter(const Tokenizer& tokenizer, std::string_view prompt,
                                           std::string_view completion);

struct EncodeOptions {
  // Maximum number of tokens per example (0 = no limit; otherwise at least 2 is used).
  // Supervised examples keep the WHOLE completion and the END of the prompt (the part next to
  // "Answer:"), plus BOS when present: [BOS] + last prompt tokens + completion. A completion
  // longer than max_seq_len - 1 keeps its first max_seq_len - 1 tokens after one context token
  // (BOS when present). Text examples keep their first max_seq_len tokens.
  int64_t max_seq_len = 0;
  // Appends the tokenizer's first EOS id as a training target after the completion / text (lets
  // generation learn where an answer ends). Off by default; ignored if the tokenizer has no EOS.
  bool add_eos = false;
};

struct EncodedExample {
  std::vector<int32_t> ids;  // the model input, unpadded
  // Positions >= target_start are training targets (predicted from the previous position); the
  // prompt part [0, target_start) is context only. Always >= 1: position 0 is never a target.
  int32_t target_start = 1;
  bool truncated = false;
  int64_t untruncated_length = 0;  // ids.size() before truncation

  int64_t length() const { return static_cast<int64_t>(ids.size()); }
  int64_t num_targets() const { return length() > target_start ? length() - target_start : 0; }
};

EncodedExample EncodeExample(const Tokenizer& tokenizer, const Example& example,
                             const EncodeOptions& options = {});

std::vector<EncodedExample> EncodeExamples(const Tokenizer& tokenizer, const std::vector<Example>& examples,
                                           const EncodeOptions& options = {});

// Untruncated length used by the validator's token limit: BOS + prompt + completion for
// kCompletion, BOS + prompt + the LONGEST choice for kChoice (every choice must fit when it is
// scored), BOS + text for kText. No EOS.
int64_t CountExampleTokens(const Tokenizer& tokenizer, const Example& example);

}  // namespace strata
