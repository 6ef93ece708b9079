#pragma once
// The `strata` command line as a whole: global options (with their environment twins), every
// subcommand, help, parsing and the exit code. Both binaries run it and differ only in how the
// offline modes run (OfflineModes): `strata` (torch-free) execs strata-offline for them,
// strata-offline runs them in process. So both accept exactly the same command lines.

#include "client/commands.h"

namespace strata::cli {

// The environment twins of the global options (the flag wins).
inline constexpr char kServerEnv[] = "STRATA_SERVER";
inline constexpr char kAuthTokenFileEnv[] = "STRATA_AUTH_TOKEN_FILE";

// Parses argv, runs the chosen command and returns the process exit code (kExit*).
int RunCli(int argc, char** argv, const OfflineModes& offline);

}  // namespace strata::cli
