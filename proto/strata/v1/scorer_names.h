#pragma once
// The one conversion between the API's Scorer enum and the scorer names the core uses
// ("choice", "exact_match", "nll"; core/data/dataset.h): SCORER_EXACT_MATCH <-> "exact_match".
// Used by the server (task specs, task listings) and the CLI (flags, tables).

#include <optional>
#include <string>

#include "strata/v1/adaptation.pb.h"

namespace strata {

// "" for SCORER_UNSPECIFIED (the server picks one from the data) and for values outside the enum.
std::string ScorerNameFromProto(strata::v1::Scorer scorer);
// SCORER_UNSPECIFIED for ""; nullopt for a name that is not a scorer.
std::optional<strata::v1::Scorer> ScorerProtoFromName(const std::string& name);

}  // namespace strata
