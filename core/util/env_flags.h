#pragma once
// Environment twins for Abseil flags: every flag `--foo_bar` may also be set by `STRATA_FOO_BAR`.
// The command line wins over the environment.

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"

namespace strata {

// For each flag name in `flag_names`, applies the environment variable `prefix + UPPER(name)` when
// set. Call it BEFORE absl::ParseCommandLine so that command-line values override it.
// A bad value is INVALID_ARGUMENT naming the variable.
absl::Status ApplyEnvironmentTwins(const std::vector<std::string>& flag_names,
                                   const std::string& prefix = "STRATA_");

// "grpc_port" -> "STRATA_GRPC_PORT". (Header-only: the method options' flag parsing, which is
// torch- and absl-flags-free, names its twins with it too.)
inline std::string EnvTwinName(const std::string& flag_name, const std::string& prefix = "STRATA_") {
  return prefix + absl::AsciiStrToUpper(flag_name);
}

}  // namespace strata
