#pragma once
// The publish gate: whether a newly trained version keeps its promises, decided from the
// evaluation that runs after every task. A version is published only when
//   - no earlier task's score drops by more than max_forgetting (for a task scored by NLL, its NLL
//     rises by at most that much), compared with the served version in the view users get: auto
//     routing when both versions measured it, else the merged weights;
//   - the new task reaches min_task_score, when one is set (the task's own, else the server's);
//   - the reference-text NLL rises by at most max_reference_rise (relative), when set and measured.
// Otherwise the version becomes a candidate (kept, not served) and its job is held with the reasons.
// Pure functions; thread-compatible.

#include <optional>
#include <string>
#include <vector>

#include "core/state/ledger.h"

namespace strata {

struct GateOptions {
  // Each check is off when unset.
  std::optional<double> max_forgetting;
  std::optional<double> min_task_score;  // the server's default; a task's own wins
  std::optional<double> max_reference_rise;
};

struct GateDecision {
  bool publish = true;
  // One line per failed check, each starting with its kind: "forgetting: ...",
  // "min_task_score: ...", "reference_rise: ..." (the label of strata_gate_rejections_total).
  std::vector<std::string> reasons;
};

// The kinds of hold reasons (bounded: the metric's label values).
inline constexpr const char* kGateReasonKinds[] = {"forgetting", "min_task_score", "reference_rise"};

// `served`: the ledger of the served version; `stage`: what the new version measured (its task is
// the last one); `task_min_score`: the task's own threshold (strata submit --min-score).
GateDecision EvaluateGate(const GateOptions& options, const std::optional<double>& task_min_score,
                          const ResultsLedger& served, const StageResult& stage);

// INVALID_ARGUMENT naming the flag when a threshold is unusable (negative, non-finite,
// min_task_score above 1).
absl::Status ValidateGateOptions(const GateOptions& options);

}  // namespace strata
