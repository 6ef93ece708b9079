#pragma once
// Subcommand registration for the `strata` CLI. Each Add* function registers CLI11 subcommands
// whose callbacks store the exit code in *exit_code.

#include <CLI/CLI.hpp>
#include <cstdint>
#include <string>
#include <vector>

#include "client/cli_common.h"

namespace strata::cli {

void AddHealthCommand(CLI::App& app, GlobalOptions& opts, int* exit_code);
void AddInfoCommand(CLI::App& app, GlobalOptions& opts, int* exit_code);
// tokenize and generate: offline with --model DIR, otherwise on the server.
void AddTokenizeCommand(CLI::App& app, GlobalOptions& opts, int* exit_code);
void AddGenerateCommand(CLI::App& app, GlobalOptions& opts, int* exit_code);
// score (server).
void AddScoreCommand(CLI::App& app, GlobalOptions& opts, int* exit_code);
// submit, jobs, watch, cancel, tasks, report.
void AddAdaptationCommands(CLI::App& app, GlobalOptions& opts, int* exit_code);
// export, import, versions, promote, rollback.
void AddAdminCommands(CLI::App& app, GlobalOptions& opts, int* exit_code);

struct GenerateArgs {
  std::string model, prompt, task, route, device = "cpu";
  int max_tokens = 64;
  float temperature = 0, top_p = 1;
  int top_k = 0, threads = 0;
  uint64_t seed = 0;
  std::vector<std::string> stop;
};

// Server modes of tokenize and generate (inference_commands.cc); return the exit code.
int ServerTokenize(const std::string& text, bool add_special_tokens, const GlobalOptions& opts);
int ServerGenerate(const GenerateArgs& args, const GlobalOptions& opts);

}  // namespace strata::cli
