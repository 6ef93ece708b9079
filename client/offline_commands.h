#pragma once
// The LibTorch half of the CLI, linked only into strata-offline: `tokenize --model DIR`,
// `generate --model DIR` and `strata bench cl|train|memory|serve` (bench/). `strata` itself never
// links this; it execs strata-offline for these commands (client/main.cc).

#include "client/commands.h"

namespace strata::cli {

// Offline tokenize / generate on a model directory; return the exit code (2 for bad local input).
int OfflineTokenize(const TokenizeArgs& args, const GlobalOptions& opts);
int OfflineGenerate(const GenerateArgs& args, const GlobalOptions& opts);

// Registers cl, train, memory and serve under `bench`.
void AddBenchCommands(CLI::App* bench, const GlobalOptions& opts, int* exit_code);

// The three together, as strata-offline runs them.
OfflineModes InProcessOfflineModes();

}  // namespace strata::cli
