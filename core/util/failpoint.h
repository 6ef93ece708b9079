#pragma once
// Crash-test hooks: MaybeCrashAt("name") kills the process with SIGKILL when the environment
// variable STRATA_FAILPOINT equals "name" (the integration tests use it to check that a state
// change interrupted at that point is either complete or absent after a restart). A no-op otherwise;
// the variable is read once.

#include <signal.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

namespace strata {

inline void MaybeCrashAt(const char* name) {
  static const std::string armed = [] {
    const char* v = std::getenv("STRATA_FAILPOINT");
    return std::string(v == nullptr ? "" : v);
  }();
  if (!armed.empty() && armed == name) ::kill(::getpid(), SIGKILL);
}

}  // namespace strata
