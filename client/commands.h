#pragma once
// Subcommand registration for the `strata` CLI. Each Add* function registers CLI11 subcommands
// whose callbacks store the exit code in *exit_code. Torch-free: both binaries (strata and
// strata-offline) register every command through these.

#include <CLI/CLI.hpp>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "client/cli_common.h"

namespace strata::cli {

struct TokenizeArgs {
  std::string model, text;
  bool no_special = false;
};

struct GenerateArgs {
  std::string model, prompt, task, route, device = "cpu";
  int max_tokens = 64;
  float temperature = 0, top_p = 1;
  int top_k = 0, threads = 0;
  uint64_t seed = 0;
  std::vector<std::string> stop;
};

// The commands that need LibTorch: `tokenize --model DIR`, `generate --model DIR` and `strata
// bench`. `strata` (torch-free) execs strata-offline for them; strata-offline runs them itself
// (offline_commands.h). Each function returns the exit code.
struct OfflineModes {
  std::function<int(const TokenizeArgs&, const GlobalOptions&)> tokenize;
  std::function<int(const GenerateArgs&, const GlobalOptions&)> generate;
  // Completes the `bench` subcommand (already named and described) and sets its callbacks.
  std::function<void(CLI::App* bench, const GlobalOptions& opts, int* exit_code)> bench;
};

void AddHealthCommand(CLI::App& app, GlobalOptions& opts, int* exit_code);
void AddInfoCommand(CLI::App& app, GlobalOptions& opts, int* exit_code);
// tokenize and generate: offline with --model DIR (offline.tokenize / offline.generate), otherwise
// on the server.
void AddTokenizeCommand(CLI::App& app, GlobalOptions& opts, int* exit_code, const OfflineModes& offline);
void AddGenerateCommand(CLI::App& app, GlobalOptions& opts, int* exit_code, const OfflineModes& offline);
// score (server).
void AddScoreCommand(CLI::App& app, GlobalOptions& opts, int* exit_code);
// submit, jobs, watch, cancel, tasks, report.
void AddAdaptationCommands(CLI::App& app, GlobalOptions& opts, int* exit_code);
// export, import, versions, promote, rollback.
void AddAdminCommands(CLI::App& app, GlobalOptions& opts, int* exit_code);

// Server modes of tokenize and generate (inference_commands.cc); return the exit code.
int ServerTokenize(const std::string& text, bool add_special_tokens, const GlobalOptions& opts);
int ServerGenerate(const GenerateArgs& args, const GlobalOptions& opts);

}  // namespace strata::cli
