// strata: the command-line client of a Strata server (and offline model tools).
//
// Exit codes: 0 ok, 1 the server answered with an error, 2 usage error, 3 server unreachable.

#include <CLI/CLI.hpp>
#include <iostream>

#include "bench/cl_bench.h"
#include "bench/memory_bench.h"
#include "bench/serve_bench.h"
#include "bench/train_bench.h"
#include "client/cli_common.h"
#include "client/commands.h"

int main(int argc, char** argv) {
  using namespace strata::cli;
  CLI::App app{"strata: client for the Strata continual-adaptation server"};
  app.require_subcommand(1);
  app.fallthrough();
  GlobalOptions opts;
  app.add_option("--server", opts.server, "Server address host:port")->capture_default_str();
  app.add_flag("--json", opts.json, "Machine-readable JSON output");
  app.add_option("--timeout", opts.timeout_seconds, "Seconds to wait for the server (connect and unary RPCs)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--auth-token-file", opts.auth_token_file, "File holding the bearer token")
      ->check(CLI::ExistingFile);
  app.add_option("--tls-ca", opts.tls_ca, "PEM root certificate(s): connect with TLS, trusting these")
      ->check(CLI::ExistingFile);
  app.add_option("--tls-server-name", opts.tls_server_name,
                 "With --tls-ca: the name the server certificate must carry (default: the --server host)");

  int exit_code = kExitOk;
  AddHealthCommand(app, opts, &exit_code);
  AddInfoCommand(app, opts, &exit_code);
  AddTokenizeCommand(app, opts, &exit_code);
  AddGenerateCommand(app, opts, &exit_code);
  AddScoreCommand(app, opts, &exit_code);
  AddAdaptationCommands(app, opts, &exit_code);
  AddAdminCommands(app, opts, &exit_code);
  // `strata bench cl|train`: offline benchmarks (bench/), no server needed.
  CLI::App* bench = app.add_subcommand(
      "bench",
      "Benchmarks: continual learning (cl), training (train), memory plan (memory), serving (serve)");
  bench->require_subcommand(1);
  strata::bench::ClBenchArgs cl_args;
  CLI::App* bench_cl =
      bench->add_subcommand("cl", "Continual-learning benchmark: accuracy matrix, AA/BWT/FWT per method");
  strata::bench::AddClBenchOptions(bench_cl, &cl_args);
  bench_cl->callback([&] { exit_code = strata::bench::RunClBenchCommand(cl_args); });
  strata::bench::TrainBenchArgs train_args;
  CLI::App* bench_train =
      bench->add_subcommand("train", "Training throughput and cost against the number of tasks");
  strata::bench::AddTrainBenchOptions(bench_train, &train_args);
  bench_train->callback([&] { exit_code = strata::bench::RunTrainBenchCommand(train_args); });
  strata::bench::MemoryBenchArgs memory_args;
  CLI::App* bench_memory = bench->add_subcommand(
      "memory", "Memory plan from a model config (weights, KV cache, state, training peak)");
  strata::bench::AddMemoryBenchOptions(bench_memory, &memory_args);
  bench_memory->callback([&] { exit_code = strata::bench::RunMemoryBenchCommand(memory_args); });
  strata::bench::ServeBenchArgs serve_args;
  CLI::App* bench_serve = bench->add_subcommand(
      "serve",
      "Serving throughput and latency of a real server under concurrent streams (optionally training)");
  strata::bench::AddServeBenchOptions(bench_serve, &serve_args);
  bench_serve->callback([&] { exit_code = strata::bench::RunServeBenchCommand(serve_args); });
  // Global options may come before or after the subcommand (fallthrough); list them in every
  // subcommand's --help too.
  for (CLI::App* sub : app.get_subcommands({})) {
    sub->footer(
        "Global options (before or after the subcommand):\n"
        "  --server HOST:PORT          Server address (default 127.0.0.1:50051)\n"
        "  --json                      Machine-readable JSON output\n"
        "  --timeout SECONDS           Wait for the server (connect and unary RPCs; default 10)\n"
        "  --auth-token-file FILE      File holding the bearer token\n"
        "  --tls-ca FILE               Connect with TLS, trusting these PEM roots\n"
        "  --tls-server-name NAME      Name the server certificate must carry\n"
        "Exit codes: 0 ok, 1 the server answered with an error, 2 usage error, 3 server unreachable.");
  }

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return kExitUsage;
  }
  return exit_code;
}
