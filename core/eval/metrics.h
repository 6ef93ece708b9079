#pragma once
// Continual-learning metrics over the accuracy matrix (docs ALGORITHMS.md §7) and the text
// normalisation used by exact-match scoring. Torch-free.
//
// Indexing: matrix[i][j] = score on task j after training stage i, both 0-based here
// (the document's a[i+1][j+1]); base[j] = score of the base model on task j. T = matrix.size().
// Every row holds all T tasks: entries j > i (tasks not trained yet) are what FWT uses.
//
//   AA            = (1/T) Σ_j a[T][j]
//   BWT           = (1/(T−1)) Σ_{j<T} (a[T][j] − a[j][j])              (negative = forgetting)
//   FWT           = (1/(T−1)) Σ_{j=2..T} (a[j−1][j] − b_j)
//   F_j           = max_{l∈[j, T−1]} a[l][j] − a[T][j]  for j < T;     forgetting = mean_{j<T} F_j
//
// Undefined values are absent (std::nullopt, JSON null), never a made-up 0:
//  * T = 1: BWT, FWT, forgetting and every F_j (there is no earlier task / later stage);
//  * base empty: FWT;
//  * the last task's F_T is always absent (it has no later stage).
//  * An entry may be NaN = "not measured" (e.g. a future task that was not evaluated). A metric
//    that needs a NaN entry is absent; the others are still computed.
// For a run still in progress after stage k, pass the leading k×k block (and base[0..k)).
//
// Thread safety: pure functions.

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace strata {

struct ClReport {
  std::vector<std::vector<double>> matrix;  // T×T, matrix[stage][task]
  std::vector<double> base;                 // T entries, or empty
  std::optional<double> aa;
  std::optional<double> bwt;
  std::optional<double> fwt;
  std::optional<double> forgetting;
  std::vector<std::optional<double>> task_forgetting;  // F_j, T entries (the last always absent)

  int num_tasks() const { return static_cast<int>(matrix.size()); }
};

// INVALID_ARGUMENT when the matrix is empty or not square, base is neither empty nor T long, or an
// entry is infinite.
absl::StatusOr<ClReport> ComputeClReport(std::vector<std::vector<double>> matrix,
                                         std::vector<double> base = {});

// {"matrix": [[...]], "base": [...], "aa": x, "bwt": x, "fwt": x, "forgetting": x}; absent values
// and NaN entries are null.
nlohmann::json ClReportToJson(const ClReport& report);
// Reads "matrix" and "base" (null entries = NaN) and recomputes the metrics.
absl::StatusOr<ClReport> ClReportFromJson(const nlohmann::json& j);

// Exact-match normalisation (SQuAD-style minus article removal):
//  1. ASCII letters A-Z are lower-cased; other bytes, including all non-ASCII UTF-8, are kept
//     as they are (so "Åland" and "ÅLAND" differ in their first letter);
//  2. ASCII punctuation is deleted: the 32 characters !"#$%&'()*+,-./:;<=>?@[\]^_`{|}~
//     (non-ASCII punctuation such as "«", "—" or "。" is kept);
//  3. runs of ASCII whitespace (space, \t, \n, \v, \f, \r) become one space; leading and trailing
//     whitespace is removed. Non-ASCII spaces (e.g. U+00A0) are kept.
// E.g. "  The Valley!\n" -> "the valley"; "Saint-Denis" -> "saintdenis"; "U.S.A." -> "usa".
std::string NormalizeAnswer(std::string_view text);

// NormalizeAnswer(prediction) == NormalizeAnswer(reference).
bool ExactMatch(std::string_view prediction, std::string_view reference);

}  // namespace strata
