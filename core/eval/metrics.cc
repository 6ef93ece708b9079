#include "core/eval/metrics.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace strata {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Mean of values, absent if any is NaN or there are none.
std::optional<double> MeanIfMeasured(const std::vector<double>& values) {
  if (values.empty()) return std::nullopt;
  double sum = 0.0;
  for (double v : values) {
    if (std::isnan(v)) return std::nullopt;
    sum += v;
  }
  return sum / static_cast<double>(values.size());
}

nlohmann::json NumberOrNull(double v) { return std::isnan(v) ? nlohmann::json(nullptr) : nlohmann::json(v); }
nlohmann::json OptionalToJson(const std::optional<double>& v) {
  return v ? NumberOrNull(*v) : nlohmann::json(nullptr);
}

absl::StatusOr<double> NumberFromJson(const nlohmann::json& v, const std::string& where) {
  if (v.is_null()) return kNaN;
  if (!v.is_number()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": expected a number or null, got ", v.type_name()));
  }
  return v.get<double>();
}

bool IsAsciiSpace(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}

bool IsAsciiPunct(char c) {
  return (c >= '!' && c <= '/') || (c >= ':' && c <= '@') || (c >= '[' && c <= '`') || (c >= '{' && c <= '~');
}

}  // namespace

absl::StatusOr<ClReport> ComputeClReport(std::vector<std::vector<double>> matrix, std::vector<double> base) {
  const size_t t = matrix.size();
  if (t == 0) return absl::InvalidArgumentError("accuracy matrix: no tasks");
  for (size_t i = 0; i < t; ++i) {
    if (matrix[i].size() != t) {
      return absl::InvalidArgumentError(
          absl::StrCat("accuracy matrix: row ", i, " has ", matrix[i].size(), " entries, expected ", t));
    }
    for (size_t j = 0; j < t; ++j) {
      if (std::isinf(matrix[i][j])) {
        return absl::InvalidArgumentError(
            absl::StrCat("accuracy matrix: entry [", i, "][", j, "] is infinite"));
      }
    }
  }
  if (!base.empty() && base.size() != t) {
    return absl::InvalidArgumentError(
        absl::StrCat("base scores: ", base.size(), " entries, expected ", t, " (or none)"));
  }
  for (size_t j = 0; j < base.size(); ++j) {
    if (std::isinf(base[j]))
      return absl::InvalidArgumentError(absl::StrCat("base scores: entry [", j, "] is infinite"));
  }

  ClReport r;
  const auto& last = matrix[t - 1];
  r.aa = MeanIfMeasured(last);
  r.task_forgetting.assign(t, std::nullopt);
  if (t >= 2) {
    std::vector<double> bwt_terms, fwt_terms, forgetting_terms;
    for (size_t j = 0; j + 1 < t; ++j) {
      bwt_terms.push_back(last[j] - matrix[j][j]);  // NaN propagates
      // F_j: best score on task j at any stage from its own (j) to the one before last (T−2).
      double best = -std::numeric_limits<double>::infinity();
      bool measured = !std::isnan(last[j]);
      for (size_t l = j; l + 1 < t; ++l) {
        if (std::isnan(matrix[l][j])) measured = false;
        best = std::max(best, matrix[l][j]);
      }
      const double f = measured ? best - last[j] : kNaN;
      if (measured) r.task_forgetting[j] = f;
      forgetting_terms.push_back(f);
    }
    r.bwt = MeanIfMeasured(bwt_terms);
    r.forgetting = MeanIfMeasured(forgetting_terms);
    if (!base.empty()) {
      for (size_t j = 1; j < t; ++j) fwt_terms.push_back(matrix[j - 1][j] - base[j]);
      r.fwt = MeanIfMeasured(fwt_terms);
    }
  }
  r.matrix = std::move(matrix);
  r.base = std::move(base);
  return r;
}

nlohmann::json ClReportToJson(const ClReport& report) {
  nlohmann::json matrix = nlohmann::json::array();
  for (const auto& row : report.matrix) {
    nlohmann::json jr = nlohmann::json::array();
    for (double v : row) jr.push_back(NumberOrNull(v));
    matrix.push_back(std::move(jr));
  }
  nlohmann::json base = nlohmann::json::array();
  for (double v : report.base) base.push_back(NumberOrNull(v));
  nlohmann::json j;
  j["matrix"] = std::move(matrix);
  j["base"] = std::move(base);
  j["aa"] = OptionalToJson(report.aa);
  j["bwt"] = OptionalToJson(report.bwt);
  j["fwt"] = OptionalToJson(report.fwt);
  j["forgetting"] = OptionalToJson(report.forgetting);
  return j;
}

absl::StatusOr<ClReport> ClReportFromJson(const nlohmann::json& j) {
  if (!j.is_object() || !j.contains("matrix") || !j["matrix"].is_array()) {
    return absl::InvalidArgumentError("CL report: expected an object with a \"matrix\" array");
  }
  std::vector<std::vector<double>> matrix;
  for (size_t i = 0; i < j["matrix"].size(); ++i) {
    const auto& row = j["matrix"][i];
    if (!row.is_array())
      return absl::InvalidArgumentError(absl::StrCat("CL report: \"matrix\"[", i, "] is not an array"));
    std::vector<double> r;
    for (size_t k = 0; k < row.size(); ++k) {
      auto v = NumberFromJson(row[k], absl::StrCat("CL report: \"matrix\"[", i, "][", k, "]"));
      if (!v.ok()) return v.status();
      r.push_back(*v);
    }
    matrix.push_back(std::move(r));
  }
  std::vector<double> base;
  if (auto it = j.find("base"); it != j.end() && !it->is_null()) {
    if (!it->is_array()) return absl::InvalidArgumentError("CL report: \"base\" is not an array");
    for (size_t k = 0; k < it->size(); ++k) {
      auto v = NumberFromJson((*it)[k], absl::StrCat("CL report: \"base\"[", k, "]"));
      if (!v.ok()) return v.status();
      base.push_back(*v);
    }
  }
  return ComputeClReport(std::move(matrix), std::move(base));
}

std::string NormalizeAnswer(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  bool pending_space = false;
  for (char c : text) {
    if (IsAsciiSpace(c)) {
      pending_space = !out.empty();
      continue;
    }
    if (IsAsciiPunct(c)) continue;
    if (pending_space) {
      out.push_back(' ');
      pending_space = false;
    }
    out.push_back(c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c);
  }
  return out;
}

bool ExactMatch(std::string_view prediction, std::string_view reference) {
  return NormalizeAnswer(prediction) == NormalizeAnswer(reference);
}

}  // namespace strata
