// strata-bench: standalone driver for the benchmark commands that `strata bench` also registers.
//
//   strata-bench cl --model DIR --tasks DIR --order t1,t2 [--methods m1,m2] ... --json OUT [--plots DIR]
//   strata-bench train [--models stories260K,110m] [--methods ...] [--json OUT]
//   strata-bench dp [--models stories260K,110m] [--ranks 2] [--threads 2] [--json OUT]
//   strata-bench memory --config DIR|llama-8b|mistral-7b|qwen2-7b|110m [--dtype ...] [--measure ...]
//   strata-bench serve --model DIR|stories260K|110m --streams 1,16 --tasks 1,8 [--with-training] --json OUT
//
// Exit codes: 0 ok, 1 a measurement / method failed, 2 usage error.

#include <CLI/CLI.hpp>

#include "bench/cl_bench.h"
#include "bench/dp_bench.h"
#include "bench/memory_bench.h"
#include "bench/serve_bench.h"
#include "bench/train_bench.h"

int main(int argc, char** argv) {
  CLI::App app{"strata-bench: continual-learning and training benchmarks"};
  app.require_subcommand(1);
  int exit_code = 0;

  strata::bench::ClBenchArgs cl_args;
  CLI::App* cl =
      app.add_subcommand("cl", "Continual-learning benchmark: accuracy matrix, AA/BWT/FWT per method");
  strata::bench::AddClBenchOptions(cl, &cl_args);
  cl->callback([&] { exit_code = strata::bench::RunClBenchCommand(cl_args); });

  strata::bench::TrainBenchArgs train_args;
  CLI::App* train =
      app.add_subcommand("train", "Training throughput per method and cost against the task count");
  strata::bench::AddTrainBenchOptions(train, &train_args);
  train->callback([&] { exit_code = strata::bench::RunTrainBenchCommand(train_args); });

  strata::bench::DpBenchArgs dp_args;
  CLI::App* dp = app.add_subcommand("dp", "Data-parallel scaling of a task's training (c10d/Gloo ranks)");
  strata::bench::AddDpBenchOptions(dp, &dp_args);
  dp->callback([&] { exit_code = strata::bench::RunDpBenchCommand(dp_args); });

  strata::bench::MemoryBenchArgs memory_args;
  CLI::App* memory =
      app.add_subcommand("memory", "Memory plan from a model config; --measure checks it on the CPU");
  strata::bench::AddMemoryBenchOptions(memory, &memory_args);
  memory->callback([&] { exit_code = strata::bench::RunMemoryBenchCommand(memory_args); });

  strata::bench::ServeBenchArgs serve_args;
  CLI::App* serve =
      app.add_subcommand("serve", "Serving throughput and latency of a real server under concurrent streams");
  strata::bench::AddServeBenchOptions(serve, &serve_args);
  serve->callback([&] { exit_code = strata::bench::RunServeBenchCommand(serve_args); });

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return 2;
  }
  return exit_code;
}
