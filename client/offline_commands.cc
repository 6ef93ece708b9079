// The LibTorch half of the CLI (strata-offline): tokenize and generate with --model DIR (their
// options and server modes: inference_commands.cc), and `strata bench`.

#include "client/offline_commands.h"

#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>
#include <thread>

#include "absl/strings/str_join.h"
#include "bench/cl_bench.h"
#include "bench/dp_bench.h"
#include "bench/memory_bench.h"
#include "bench/serve_bench.h"
#include "bench/train_bench.h"
#include "core/model/generate.h"
#include "core/model/model.h"
#include "core/model/runtime.h"
#include "core/model/tokenizer.h"
#include "nlohmann/json.hpp"

namespace strata::cli {
namespace {

std::string Utf8Safe(const std::string& s) {
  // nlohmann::json throws on invalid UTF-8 when dumping; replace instead.
  return nlohmann::json(s).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace

int OfflineTokenize(const TokenizeArgs& args, const GlobalOptions& opts) {
  auto tok = Tokenizer::FromDirectory(args.model);
  if (!tok.ok()) {
    std::fprintf(stderr, "strata: %s\n", std::string(tok.status().message()).c_str());
    return kExitUsage;
  }
  std::vector<int32_t> ids = (*tok)->Encode(args.text, !args.no_special);
  if (opts.json) {
    std::cout << nlohmann::json{{"ids", ids}}.dump() << "\n";
  } else {
    std::cout << absl::StrJoin(ids, " ") << "\n";
  }
  return kExitOk;
}

int OfflineGenerate(const GenerateArgs& args, const GlobalOptions& opts) {
  if (!args.task.empty()) {
    return UsageError("--task needs the server (it routes to a learned task); drop --model", opts);
  }
  auto device = ResolveDevice(args.device);
  if (!device.ok()) {
    std::fprintf(stderr, "strata: %s\n", std::string(device.status().message()).c_str());
    return kExitUsage;
  }
  SetTorchThreads(args.threads > 0 ? args.threads : static_cast<int>(std::thread::hardware_concurrency()));
  ModelLoadOptions lo;
  lo.device = *device;
  auto model = CausalLM::Load(args.model, lo);
  if (!model.ok()) {
    std::fprintf(stderr, "strata: %s\n", std::string(model.status().message()).c_str());
    return kExitUsage;
  }
  auto tok = Tokenizer::FromDirectory(args.model);
  if (!tok.ok()) {
    std::fprintf(stderr, "strata: %s\n", std::string(tok.status().message()).c_str());
    return kExitUsage;
  }
  SamplingOptions so;
  so.max_new_tokens = args.max_tokens;
  so.temperature = args.temperature;
  so.top_k = args.top_k;
  so.top_p = args.top_p;
  so.seed = args.seed;
  so.stop_strings = args.stop;
  std::vector<int32_t> prompt = (*tok)->Encode(args.prompt, true);
  TokenCallback stream;
  if (!opts.json) {
    stream = [](size_t, int32_t, const std::string& delta) {
      std::cout << delta << std::flush;
      return true;
    };
  }
  auto t0 = std::chrono::steady_clock::now();
  auto results = Generate(**model, **tok, {prompt}, so, stream);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!results.ok()) {
    std::fprintf(stderr, "strata: %s\n", std::string(results.status().message()).c_str());
    return kExitUsage;
  }
  const GenerationResult& r = (*results)[0];
  if (opts.json) {
    nlohmann::json j;
    j["text"] = nlohmann::json::parse(Utf8Safe(r.text));
    j["ids"] = r.ids;
    j["finish_reason"] = r.finish_reason;
    j["prompt_tokens"] = r.prompt_tokens;
    j["tokens_per_second"] = secs > 0 ? r.ids.size() / secs : 0.0;
    std::cout << j.dump() << "\n";
  } else {
    std::cout << "\n";
  }
  return kExitOk;
}

void AddBenchCommands(CLI::App* bench, const GlobalOptions& /*opts*/, int* exit_code) {
  bench->require_subcommand(1);
  auto cl_args = std::make_shared<bench::ClBenchArgs>();
  CLI::App* cl =
      bench->add_subcommand("cl", "Continual-learning benchmark: accuracy matrix, AA/BWT/FWT per method");
  bench::AddClBenchOptions(cl, cl_args.get());
  cl->callback([exit_code, cl_args] { *exit_code = bench::RunClBenchCommand(*cl_args); });
  auto train_args = std::make_shared<bench::TrainBenchArgs>();
  CLI::App* train =
      bench->add_subcommand("train", "Training throughput and cost against the number of tasks");
  bench::AddTrainBenchOptions(train, train_args.get());
  train->callback([exit_code, train_args] { *exit_code = bench::RunTrainBenchCommand(*train_args); });
  auto dp_args = std::make_shared<bench::DpBenchArgs>();
  CLI::App* dp = bench->add_subcommand("dp", "Data-parallel scaling of a task's training (c10d/Gloo ranks)");
  bench::AddDpBenchOptions(dp, dp_args.get());
  dp->callback([exit_code, dp_args] { *exit_code = bench::RunDpBenchCommand(*dp_args); });
  auto memory_args = std::make_shared<bench::MemoryBenchArgs>();
  CLI::App* memory = bench->add_subcommand(
      "memory", "Memory plan from a model config (weights, KV cache, state, training peak)");
  bench::AddMemoryBenchOptions(memory, memory_args.get());
  memory->callback([exit_code, memory_args] { *exit_code = bench::RunMemoryBenchCommand(*memory_args); });
  auto serve_args = std::make_shared<bench::ServeBenchArgs>();
  CLI::App* serve = bench->add_subcommand(
      "serve",
      "Serving throughput and latency of a real server under concurrent streams (optionally training)");
  bench::AddServeBenchOptions(serve, serve_args.get());
  serve->callback([exit_code, serve_args] { *exit_code = bench::RunServeBenchCommand(*serve_args); });
}

OfflineModes InProcessOfflineModes() { return {OfflineTokenize, OfflineGenerate, AddBenchCommands}; }

}  // namespace strata::cli
