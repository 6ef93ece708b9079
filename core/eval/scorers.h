#pragma once
// Task scorers on a CausalLM: choice accuracy (log-likelihood ranking), exact match of the greedy
// completion, and mean per-token NLL of plain text. All run batched under c10::InferenceMode and
// tokenise with core/data/encode.h (EncodePrompt / EncodePromptCompletion / EncodeExample), so they
// see the same ids as the trainer.
//
// Thread safety: the functions only read the model (Forward / Generate with their own caches), so
// they may run concurrently with each other and with serving, not with a mutation of the model.
// Failures: INVALID_ARGUMENT for bad options or examples (naming the example index), INTERNAL
// for torch errors (c10::Error is caught).

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/data/example.h"
#include "core/model/model.h"
#include "core/model/tokenizer.h"

namespace strata {

struct ScorerOptions {
  int64_t batch_size = 16;  // sequences per forward pass (choice: (example, choice) pairs)
  // Token limit per sequence (0 = the model's max_position_embeddings). Longer prompts keep their
  // end (EncodeExample's truncation: BOS + last prompt tokens + the whole completion).
  int64_t max_seq_len = 0;
};

// ---- choice ------------------------------------------------------------------------------------
// For every kChoice example, the total log-likelihood Σ_t log p(choice_t | prompt, choice_<t) of
// each choice's completion tokens; the prediction is the first choice with the highest total.
struct ChoiceScore {
  int64_t correct = 0;
  int64_t total = 0;
  double accuracy = 0;                               // correct / total
  std::vector<int> predicted;                        // per example: index into choices
  std::vector<std::vector<double>> log_likelihoods;  // per example, per choice
};
// INVALID_ARGUMENT for an example that is not kChoice or has fewer than 2 choices.
absl::StatusOr<ChoiceScore> ScoreChoice(const CausalLM& model, const Tokenizer& tokenizer,
                                        const std::vector<Example>& examples,
                                        const ScorerOptions& options = {});

// ---- exact match ----------------------------------------------------------------------------------
struct ExactMatchOptions {
  int64_t batch_size = 16;  // prompts generated together
  // Greedy tokens generated per example: the reference completion's token count (as
  // EncodePromptCompletion splits it) + extra_new_tokens; max_new_tokens > 0 replaces that budget.
  int64_t extra_new_tokens = 0;
  int64_t max_new_tokens = 0;
  // The prediction ends at the first '\n' (the model may go on with unrelated text).
  bool stop_at_newline = true;
  // Generation also stops at BOS (a model like stories260K starts a new text with BOS, never EOS)
  // and at the tokenizer's EOS ids.
  bool stop_at_bos = true;
};
// Per kCompletion / kChoice example: greedy completion of the prompt, compared with
// ExactMatch(prediction, example.completion) (metrics.h NormalizeAnswer: lower-case, ASCII
// punctuation removed, whitespace collapsed and trimmed).
struct ExactMatchScore {
  int64_t correct = 0;
  int64_t total = 0;
  double accuracy = 0;
  std::vector<std::string> predictions;  // decoded, cut at the budget / newline
  std::vector<bool> matches;
};
absl::StatusOr<ExactMatchScore> ScoreExactMatch(const CausalLM& model, const Tokenizer& tokenizer,
                                                const std::vector<Example>& examples,
                                                const ExactMatchOptions& options = {});

// ---- NLL -------------------------------------------------------------------------------------------
struct NllOptions {
  int64_t batch_size = 8;
  int64_t max_seq_len = 256;  // window length in tokens (BOS included in the first window)
  // false: each text is truncated to its first window. true: the whole text in windows of
  // max_seq_len tokens overlapping by one token, so every token after BOS is predicted once (with
  // at most max_seq_len − 1 tokens of context).
  bool all_windows = false;
};
struct NllScore {
  double mean_nll = 0;           // Σ NLL / Σ tokens over all texts (nats per token)
  double perplexity = 0;         // exp(mean_nll)
  int64_t tokens = 0;            // predicted tokens
  std::vector<double> per_text;  // mean NLL of each text
};
// Texts are encoded as [BOS] + Encode(text) (encode.h EncodePrompt); every token after the first
// is a target. INVALID_ARGUMENT for an empty list or a text with no predicted token.
absl::StatusOr<NllScore> ScoreNll(const CausalLM& model, const Tokenizer& tokenizer,
                                  const std::vector<std::string>& texts, const NllOptions& options = {});
// Mean NLL per token over `texts` with text i scored on models[model_of_text[i]] (the texts of one
// model in one ScoreNll call; token-weighted over all texts, e.g. a reference text served through
// automatic routing). INVALID_ARGUMENT as ScoreNll, or for an index out of range.
absl::StatusOr<double> MeanNllOnModels(const std::vector<std::shared_ptr<const CausalLM>>& models,
                                       const std::vector<size_t>& model_of_text, const Tokenizer& tokenizer,
                                       const std::vector<std::string>& texts, const NllOptions& options = {});

// Splits a document into paragraphs separated by blank lines (lines of only whitespace); each
// paragraph is trimmed of surrounding whitespace; empty ones are dropped.
std::vector<std::string> SplitOnBlankLines(std::string_view text);

}  // namespace strata
