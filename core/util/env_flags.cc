#include "core/util/env_flags.h"

#include <cstdlib>

#include "absl/flags/reflection.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace strata {

absl::Status ApplyEnvironmentTwins(const std::vector<std::string>& flag_names, const std::string& prefix) {
  for (const auto& name : flag_names) {
    absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    if (flag == nullptr) {
      return absl::InternalError(absl::StrCat("no such flag --", name));
    }
    std::string env = EnvTwinName(name, prefix);
    const char* value = std::getenv(env.c_str());
    if (value == nullptr) continue;
    std::string error;
    if (!flag->ParseFrom(value, &error)) {
      return absl::InvalidArgumentError(
          absl::StrCat("environment variable ", env, "='", value, "' (twin of --", name, "): ", error));
    }
  }
  return absl::OkStatus();
}

}  // namespace strata
