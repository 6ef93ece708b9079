#include "strata/v1/scorer_names.h"

#include <cctype>

namespace strata {

namespace pb = ::strata::v1;

std::string ScorerNameFromProto(pb::Scorer scorer) {
  if (scorer == pb::SCORER_UNSPECIFIED || !pb::Scorer_IsValid(scorer)) return "";
  std::string name = pb::Scorer_Name(scorer).substr(sizeof("SCORER_") - 1);
  for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return name;
}

std::optional<pb::Scorer> ScorerProtoFromName(const std::string& name) {
  if (name.empty()) return pb::SCORER_UNSPECIFIED;
  std::string upper = "SCORER_";
  for (char c : name) upper.push_back(static_cast<char>(std::toupper(static_cast<unsigned char>(c))));
  pb::Scorer out;
  if (!pb::Scorer_Parse(upper, &out) || out == pb::SCORER_UNSPECIFIED) return std::nullopt;
  return out;
}

}  // namespace strata
