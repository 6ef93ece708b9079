// strata-offline: the `strata` command line with the commands that need LibTorch run in process
// (`tokenize --model DIR`, `generate --model DIR`, `strata bench ...`). `strata` execs it for
// those, with the same argv; run directly it accepts every `strata` command line too.
//
// Exit codes: those of strata (client/main.cc).

#include "client/cli_app.h"
#include "client/offline_commands.h"

int main(int argc, char** argv) {
  return strata::cli::RunCli(argc, argv, strata::cli::InProcessOfflineModes());
}
