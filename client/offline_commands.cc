// `strata tokenize` and `strata generate`: offline with --model DIR (no server needed), otherwise
// on the server (inference_commands.cc).

#include <chrono>
#include <cstdio>
#include <iostream>
#include <thread>

#include "absl/strings/str_join.h"
#include "client/commands.h"
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

void AddTokenizeCommand(CLI::App& app, GlobalOptions& opts, int* exit_code) {
  auto* cmd = app.add_subcommand(
      "tokenize", "Print the token ids of a text (with the server's tokenizer, or offline with --model DIR)");
  struct Args {
    std::string model, text;
    bool no_special = false;
  };
  auto a = std::make_shared<Args>();
  cmd->add_option("--model", a->model, "Model or tokenizer directory (tokenizer.json): offline, no server")
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--text", a->text, "Text to tokenize")->required();
  cmd->add_flag("--no-special", a->no_special, "Do not add BOS/EOS");
  cmd->callback([&opts, exit_code, a] {
    if (a->model.empty()) {
      *exit_code = ServerTokenize(a->text, !a->no_special, opts);
      return;
    }
    auto tok = Tokenizer::FromDirectory(a->model);
    if (!tok.ok()) {
      std::fprintf(stderr, "strata: %s\n", std::string(tok.status().message()).c_str());
      *exit_code = kExitUsage;
      return;
    }
    std::vector<int32_t> ids = (*tok)->Encode(a->text, !a->no_special);
    if (opts.json) {
      std::cout << nlohmann::json{{"ids", ids}}.dump() << "\n";
    } else {
      std::cout << absl::StrJoin(ids, " ") << "\n";
    }
  });
}

void AddGenerateCommand(CLI::App& app, GlobalOptions& opts, int* exit_code) {
  auto* cmd = app.add_subcommand(
      "generate", "Generate text on the server's served weights (streamed), or offline with --model DIR");
  auto a = std::make_shared<GenerateArgs>();
  cmd->add_option("--model", a->model, "Hugging Face model directory: generate offline, no server")
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--prompt", a->prompt, "Prompt text")->required();
  cmd->add_option("--task", a->task,
                  "Server: use the task-routed weights of this learned task (= --route NAME)");
  cmd->add_option(
      "--route", a->route,
      "Server: auto (default: the server picks the learned task the prompt belongs to, or the base "
      "model), merged, base, or a learned task's name");
  cmd->add_option("--max-tokens", a->max_tokens, "Maximum new tokens")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--temperature", a->temperature, "Sampling temperature (0 = greedy)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--top-k", a->top_k, "Top-k sampling (0 = off)")->check(CLI::NonNegativeNumber);
  cmd->add_option("--top-p", a->top_p, "Nucleus sampling (1 = off)")->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--seed", a->seed, "Sampling seed");
  cmd->add_option("--stop", a->stop, "Stop string (repeatable)");
  cmd->add_option("--device", a->device, "Offline: cpu or cuda")->capture_default_str();
  cmd->add_option("--threads", a->threads, "Offline: CPU threads (0 = all cores)");
  cmd->callback([&opts, exit_code, a] {
    if (a->model.empty()) {
      *exit_code = ServerGenerate(*a, opts);
      return;
    }
    if (!a->task.empty()) {
      *exit_code = UsageError("--task needs the server (it routes to a learned task); drop --model", opts);
      return;
    }
    auto device = ResolveDevice(a->device);
    if (!device.ok()) {
      std::fprintf(stderr, "strata: %s\n", std::string(device.status().message()).c_str());
      *exit_code = kExitUsage;
      return;
    }
    SetTorchThreads(a->threads > 0 ? a->threads : static_cast<int>(std::thread::hardware_concurrency()));
    ModelLoadOptions lo;
    lo.device = *device;
    auto model = CausalLM::Load(a->model, lo);
    if (!model.ok()) {
      std::fprintf(stderr, "strata: %s\n", std::string(model.status().message()).c_str());
      *exit_code = kExitUsage;
      return;
    }
    auto tok = Tokenizer::FromDirectory(a->model);
    if (!tok.ok()) {
      std::fprintf(stderr, "strata: %s\n", std::string(tok.status().message()).c_str());
      *exit_code = kExitUsage;
      return;
    }
    SamplingOptions so;
    so.max_new_tokens = a->max_tokens;
    so.temperature = a->temperature;
    so.top_k = a->top_k;
    so.top_p = a->top_p;
    so.seed = a->seed;
    so.stop_strings = a->stop;
    std::vector<int32_t> prompt = (*tok)->Encode(a->prompt, true);
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
      *exit_code = kExitUsage;
      return;
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
  });
}

}  // namespace strata::cli
