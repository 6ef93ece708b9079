#pragma once
// How the engine scores a model on a task's eval split and on the reference text, in every view
// (one model, or each example served where the router sends it). Every failure is an error: a task
// whose evaluation fails does not publish (the ledger never holds a score that was not measured).
//
// Scores are in [0, 1] for choice / exact_match; for nll the NEGATIVE mean NLL (nats/token), so
// that higher is better for every scorer and BWT/forgetting keep their meaning.
//
// Thread safety: const methods only; safe from any thread (the models must not be mutated).

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/adapt/router.h"
#include "core/data/example.h"

namespace strata {

class CausalLM;
class Tokenizer;

// The scorer of a task that names none: choice for choice examples, nll for text, exact_match
// otherwise.
std::string AutoScorer(const std::vector<Example>& examples);

class Evaluator {
 public:
  // `base` and `tokenizer` must outlive the evaluator; `reference_texts` may be empty (no
  // reference NLL: ReferenceNll returns NaN).
  Evaluator(const CausalLM* base, const Tokenizer* tokenizer, int64_t max_seq_len,
            std::vector<std::string> reference_texts)
      : base_(base),
        tokenizer_(tokenizer),
        max_seq_len_(max_seq_len),
        reference_texts_(std::move(reference_texts)) {}

  bool has_reference() const { return !reference_texts_.empty(); }

  // `model`'s score on `examples` with `scorer`; NaN for no examples (nothing to measure).
  absl::StatusOr<double> Score(const CausalLM& model, const std::vector<Example>& examples,
                               const std::string& scorer) const;
  // The reference text's mean NLL on `model` (nats/token); NaN without a reference text.
  absl::StatusOr<double> ReferenceNll(const CausalLM& model) const;
  // The score when example i is served by models[choice[i]]: each group scored on its model,
  // combined weighted by examples (exact for accuracy scorers; for nll the per-group means).
  absl::StatusOr<double> ScoreGrouped(const std::vector<std::shared_ptr<const CausalLM>>& models,
                                      const std::vector<size_t>& choice, const std::vector<Example>& examples,
                                      const std::string& scorer) const;
  // The reference NLL with each text served where `router` sends it (RouteModels order), token
  // weighted; NaN without a reference text.
  absl::StatusOr<double> ReferenceNllRouted(const std::vector<std::shared_ptr<const CausalLM>>& models,
                                            const TaskRouter& router) const;

 private:
  const CausalLM* base_;
  const Tokenizer* tokenizer_;
  int64_t max_seq_len_;
  std::vector<std::string> reference_texts_;
};

}  // namespace strata
