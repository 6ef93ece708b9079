#include "core/data/cl_benchmark.h"

#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/util/file_util.h"
#include "core/util/status_macros.h"
#include "nlohmann/json.hpp"

namespace strata {
namespace {

// Debian's Abseil has its own string_view (see docs/DEVELOPING.md); absl::StrCat needs it.
absl::string_view Av(std::string_view s) { return absl::string_view(s.data(), s.size()); }

bool IsAsciiSpace(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

std::string_view RStripAscii(std::string_view s) {
  while (!s.empty() && IsAsciiSpace(s.back())) s.remove_suffix(1);
  return s;
}

}  // namespace

int ClTaskSpec::LabelIndex(std::string_view label) const {
  for (size_t i = 0; i < labels.size(); ++i) {
    if (labels[i] == label) return static_cast<int>(i);
  }
  return -1;
}

absl::StatusOr<ClTaskSpec> ParseClTaskSpec(std::string_view json_text, std::string_view source) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(json_text.begin(), json_text.end());
  } catch (const nlohmann::json::exception& e) {  // parse_error, or out_of_range for 1e999
    return absl::InvalidArgumentError(absl::StrCat(Av(source), ": not valid JSON: ", e.what()));
  }
  if (!j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(Av(source), ": expected a JSON object"));
  }
  ClTaskSpec spec;
  if (auto it = j.find("name"); it != j.end()) {
    if (!it->is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(Av(source), ": field \"name\": expected a string, got ", it->type_name()));
    }
    spec.name = it->get<std::string>();
  }
  auto ins = j.find("instruction");
  if (ins == j.end()) {
    return absl::InvalidArgumentError(absl::StrCat(Av(source), ": missing field \"instruction\""));
  }
  if (!ins->is_string() || ins->get_ref<const std::string&>().empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(Av(source), ": field \"instruction\": expected a non-empty string"));
  }
  spec.instruction = ins->get<std::string>();
  auto labels = j.find("labels");
  if (labels == j.end()) {
    return absl::InvalidArgumentError(absl::StrCat(Av(source), ": missing field \"labels\""));
  }
  if (!labels->is_array() || labels->size() < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat(Av(source), ": field \"labels\": expected an array of at least 2 strings"));
  }
  std::set<std::string> seen;
  for (size_t i = 0; i < labels->size(); ++i) {
    const auto& l = (*labels)[i];
    if (!l.is_string() || l.get_ref<const std::string&>().empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(Av(source), ": field \"labels\"[", i, "]: expected a non-empty string"));
    }
    if (!seen.insert(l.get<std::string>()).second) {
      return absl::InvalidArgumentError(absl::StrCat(Av(source), ": field \"labels\"[", i,
                                                     "]: duplicate label \"", l.get<std::string>(), "\""));
    }
    spec.labels.push_back(l.get<std::string>());
  }
  return spec;
}

absl::StatusOr<ClTaskSpec> LoadClTaskSpec(const std::string& path) {
  ASSIGN_OR_RETURN(std::string contents, ReadFile(path));
  return ParseClTaskSpec(contents, path);
}

std::string BuildClPrompt(const ClTaskSpec& spec, std::string_view text) {
  return absl::StrCat(spec.instruction, "\n", "Option: ", absl::StrJoin(spec.labels, ", "), "\n",
                      Av(RStripAscii(text)), "\n", "Answer:");
}

absl::StatusOr<Example> ConvertClExample(const ClTaskSpec& spec, std::string_view text,
                                         std::string_view label) {
  if (RStripAscii(text).empty()) {
    return absl::InvalidArgumentError("field \"text\": must not be empty");
  }
  if (spec.LabelIndex(label) < 0) {
    return absl::InvalidArgumentError(absl::StrCat("field \"label\": \"", Av(label),
                                                   "\" is not one of the labels (",
                                                   absl::StrJoin(spec.labels, ", "), ")"));
  }
  std::vector<std::string> choices;
  choices.reserve(spec.labels.size());
  for (const auto& l : spec.labels) choices.push_back(absl::StrCat(" ", l));
  return MakeChoiceExample(BuildClPrompt(spec, text), absl::StrCat(" ", Av(label)), std::move(choices));
}

}  // namespace strata
