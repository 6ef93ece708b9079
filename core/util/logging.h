#pragma once
// Process-wide logging setup (spdlog). Text by default; "json" emits one JSON object per line
// with fields ts, level, logger, msg (and thread). Thread-safe after InitLogging().

#include <string>

#include "absl/status/status.h"

namespace strata {

// format: "text" or "json"; level: trace|debug|info|warn|error. INVALID_ARGUMENT otherwise.
absl::Status InitLogging(const std::string& format, const std::string& level);

}  // namespace strata
