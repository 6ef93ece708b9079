#include "core/state/gate.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace strata {
namespace {

bool Finite(double v) { return std::isfinite(v); }

double At(const std::vector<double>& v, size_t j) { return j < v.size() ? v[j] : std::nan(""); }

}  // namespace

absl::Status ValidateGateOptions(const GateOptions& o) {
  auto check = [](const std::optional<double>& v, const char* flag, double most) -> absl::Status {
    if (v.has_value() && !(std::isfinite(*v) && *v >= 0 && *v <= most)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", flag, ": must be a number in [0, ", most, "] (or off), got ", *v));
    }
    return absl::OkStatus();
  };
  if (auto st = check(o.max_forgetting, "max_forgetting", 1e9); !st.ok()) return st;
  if (auto st = check(o.min_task_score, "min_task_score", 1); !st.ok()) return st;
  return check(o.max_reference_rise, "max_reference_rise", 1e9);
}

GateDecision EvaluateGate(const GateOptions& options, const std::optional<double>& task_min_score,
                          const ResultsLedger& served, const StageResult& stage) {
  GateDecision d;
  const std::vector<TaskInfo> before = served.Tasks("");
  if (options.max_forgetting.has_value()) {
    for (size_t j = 0; j < before.size(); ++j) {
      const TaskInfo& t = before[j];
      // The users' view: auto routing when both versions measured it, else the merged weights.
      double old_score = t.current_auto_score, new_score = At(stage.auto_scores, j);
      const char* view = "auto";
      if (!Finite(old_score) || !Finite(new_score)) {
        old_score = t.current_score;
        new_score = At(stage.scores, j);
        view = "merged";
      }
      if (!Finite(old_score) || !Finite(new_score)) continue;
      const bool nll = t.scorer == "nll";
      const double loss = nll ? new_score - old_score : old_score - new_score;
      if (loss > *options.max_forgetting + 1e-12) {
        d.reasons.push_back(
            absl::StrFormat("forgetting: %s %s %.4f -> %.4f (%s%.4f; --max_forgetting allows %.4g, %s view)",
                            t.name, nll ? "NLL" : "score", old_score, new_score, nll ? "+" : "-", loss,
                            *options.max_forgetting, view));
      }
    }
  }
  const std::optional<double> min_score =
      task_min_score.has_value() ? task_min_score : options.min_task_score;
  if (min_score.has_value() && stage.task.scorer != "nll" && !stage.scores.empty()) {
    const size_t j = stage.scores.size() - 1;
    double score = At(stage.auto_scores, j);
    const char* view = "auto";
    if (!Finite(score)) {
      score = stage.scores[j];
      view = "merged";
    }
    if (!Finite(score) || score < *min_score) {
      d.reasons.push_back(absl::StrFormat(
          "min_task_score: %s reached %.4f, below the %.4g required (%s, %s view)", stage.task.name, score,
          *min_score, task_min_score.has_value() ? "its --min-score" : "--min_task_score", view));
    }
  }
  if (options.max_reference_rise.has_value()) {
    const EngineReport r = served.Report();
    double old_nll = r.reference_nll_auto.empty() ? std::nan("") : r.reference_nll_auto.back();
    double new_nll = stage.reference_nll_auto;
    const char* view = "auto";
    if (!Finite(old_nll) || !Finite(new_nll)) {
      old_nll = r.reference_nll.empty() ? std::nan("") : r.reference_nll.back();
      new_nll = stage.reference_nll;
      view = "merged";
    }
    if (Finite(old_nll) && Finite(new_nll) && old_nll > 0) {
      const double rise = (new_nll - old_nll) / old_nll;
      if (rise > *options.max_reference_rise + 1e-12) {
        d.reasons.push_back(
            absl::StrFormat("reference_rise: reference NLL %.4f -> %.4f (+%.2f%%; --max_reference_rise "
                            "allows %.4g%%, %s view)",
                            old_nll, new_nll, 100 * rise, 100 * *options.max_reference_rise, view));
      }
    }
  }
  d.publish = d.reasons.empty();
  return d;
}

}  // namespace strata
