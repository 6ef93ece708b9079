#include "core/state/evaluator.h"

#include <torch/torch.h>

#include <cmath>
#include <map>

#include "absl/strings/str_cat.h"
#include "core/data/dataset.h"
#include "core/eval/scorers.h"
#include "core/model/model.h"
#include "core/model/tokenizer.h"
#include "core/util/status_macros.h"

namespace strata {
namespace {

double Nan() { return std::nan(""); }

}  // namespace

std::string AutoScorer(const std::vector<Example>& examples) {
  Scorer s = Scorer::kExactMatch;
  if (!examples.empty() && examples.front().kind == ExampleKind::kChoice) s = Scorer::kChoice;
  if (!examples.empty() && examples.front().kind == ExampleKind::kText) s = Scorer::kNll;
  return std::string(ScorerName(s));
}

absl::StatusOr<double> Evaluator::Score(const CausalLM& model, const std::vector<Example>& examples,
                                        const std::string& scorer) const {
  if (examples.empty()) return Nan();
  const std::optional<Scorer> parsed = ParseScorer(scorer);
  if (!parsed.has_value()) return absl::InvalidArgumentError(absl::StrCat("unknown scorer \"", scorer, "\""));
  switch (*parsed) {
    case Scorer::kChoice: {
      ScorerOptions so;
      so.max_seq_len = max_seq_len_;
      ASSIGN_OR_RETURN(ChoiceScore r, ScoreChoice(model, *tokenizer_, examples, so));
      return r.accuracy;
    }
    case Scorer::kNll: {
      std::vector<std::string> texts;
      for (const auto& e : examples)
        texts.push_back(e.kind == ExampleKind::kText ? e.text : e.prompt + e.completion);
      NllOptions no;
      no.max_seq_len = max_seq_len_;
      ASSIGN_OR_RETURN(NllScore r, ScoreNll(model, *tokenizer_, texts, no));
      return -r.mean_nll;
    }
    case Scorer::kExactMatch: {
      ASSIGN_OR_RETURN(ExactMatchScore r, ScoreExactMatch(model, *tokenizer_, examples, ExactMatchOptions{}));
      return r.accuracy;
    }
  }
  return absl::InternalError("unreachable scorer");
}

absl::StatusOr<double> Evaluator::ReferenceNll(const CausalLM& model) const {
  if (reference_texts_.empty()) return Nan();
  NllOptions no;
  no.max_seq_len = max_seq_len_;
  auto r = ScoreNll(model, *tokenizer_, reference_texts_, no);
  if (!r.ok()) return absl::Status(r.status().code(), absl::StrCat("reference NLL: ", r.status().message()));
  return r->mean_nll;
}

absl::StatusOr<double> Evaluator::ScoreGrouped(const std::vector<std::shared_ptr<const CausalLM>>& models,
                                               const std::vector<size_t>& choice,
                                               const std::vector<Example>& examples,
                                               const std::string& scorer) const {
  if (examples.empty()) return Nan();
  std::map<size_t, std::vector<Example>> groups;
  for (size_t i = 0; i < examples.size(); ++i) groups[choice[i]].push_back(examples[i]);
  double total = 0;
  for (const auto& [index, group] : groups) {
    ASSIGN_OR_RETURN(const double score, Score(*models[index], group, scorer));
    total += score * static_cast<double>(group.size());
  }
  return total / static_cast<double>(examples.size());
}

absl::StatusOr<double> Evaluator::ReferenceNllRouted(
    const std::vector<std::shared_ptr<const CausalLM>>& models, const TaskRouter& router) const {
  if (reference_texts_.empty()) return Nan();
  ASSIGN_OR_RETURN(at::Tensor features, router.Features(*base_, *tokenizer_, reference_texts_));
  std::vector<size_t> slots;
  for (const RouteDecision& d : router.Route(features)) slots.push_back(RouteSlot(d));
  NllOptions no;
  no.max_seq_len = max_seq_len_;
  auto nll = MeanNllOnModels(models, slots, *tokenizer_, reference_texts_, no);
  if (!nll.ok())
    return absl::Status(nll.status().code(), absl::StrCat("reference NLL (auto): ", nll.status().message()));
  return *nll;
}

}  // namespace strata
