// `strata tokenize` / `strata generate` (their options; the server modes here, the --model DIR
// modes through OfflineModes) and `strata score`: the InferenceService.

#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "client/commands.h"
#include "nlohmann/json.hpp"
#include "strata/v1/inference.grpc.pb.h"

namespace strata::cli {
namespace {

namespace pb = strata::v1;

nlohmann::json Text(const std::string& s) {
  // Generated text may end mid-character in theory; never let a dump throw.
  return nlohmann::json::parse(
      nlohmann::json(s).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
}

// "route capitals (chosen automatically, confidence 0.99), weights version 3"
std::string RouteLine(const std::string& route, bool automatic, double confidence, int64_t version) {
  return absl::StrFormat("route %s (%s), weights version %d", route,
                         automatic ? absl::StrFormat("chosen automatically, confidence %.2f", confidence)
                                   : std::string("as requested"),
                         version);
}

}  // namespace

int ServerTokenize(const std::string& text, bool add_special_tokens, const GlobalOptions& opts) {
  auto channel = Connect(opts);
  if (!channel) return kExitUnreachable;
  auto stub = pb::InferenceService::NewStub(channel);
  grpc::ClientContext ctx;
  PrepareContext(&ctx, opts);
  pb::TokenizeRequest request;
  request.set_text(text);
  request.set_add_special_tokens(add_special_tokens);
  pb::TokenizeResponse response;
  grpc::Status st = stub->Tokenize(&ctx, request, &response);
  if (!st.ok()) return ReportRpcError("Tokenize", st, opts);
  std::vector<int32_t> ids(response.ids().begin(), response.ids().end());
  if (opts.json) {
    std::vector<std::string> tokens(response.tokens().begin(), response.tokens().end());
    std::cout << nlohmann::json{{"ids", ids},
                                {"tokens", tokens},
                                {"weights_version", response.weights_version()}}
                     .dump()
              << "\n";
  } else {
    std::cout << absl::StrJoin(ids, " ") << "\n";
  }
  return kExitOk;
}

int ServerGenerate(const GenerateArgs& a, const GlobalOptions& opts) {
  auto channel = Connect(opts);
  if (!channel) return kExitUnreachable;
  auto stub = pb::InferenceService::NewStub(channel);
  grpc::ClientContext ctx;
  PrepareContext(&ctx, opts, /*with_deadline=*/false);
  pb::GenerateRequest request;
  request.set_prompt(a.prompt);
  request.set_task(a.task);
  request.set_route(a.route);
  pb::SamplingParams* s = request.mutable_sampling();
  s->set_max_new_tokens(a.max_tokens);
  s->set_temperature(a.temperature);
  s->set_top_k(a.top_k);
  s->set_top_p(a.top_p);
  s->set_seed(a.seed);
  for (const auto& stop : a.stop) s->add_stop(stop);
  auto t0 = std::chrono::steady_clock::now();
  auto reader = stub->Generate(&ctx, request);
  pb::GenerateResponse msg;
  std::string text;
  std::vector<int32_t> ids;
  pb::GenerateResponse last;
  int64_t version = 0;
  pb::GenerateResponse route;  // the route fields come with every message
  while (reader->Read(&msg)) {
    text += msg.text();
    ids.insert(ids.end(), msg.token_ids().begin(), msg.token_ids().end());
    version = msg.weights_version();
    route = msg;
    if (!opts.json && !msg.text().empty()) std::cout << msg.text() << std::flush;
    if (!msg.finish_reason().empty()) last = msg;
  }
  grpc::Status st = reader->Finish();
  if (!opts.json && !text.empty()) std::cout << "\n";
  if (!st.ok()) return ReportRpcError("Generate", st, opts);
  if (!opts.json)
    std::cerr << RouteLine(route.route(), route.route_automatic(), route.route_confidence(), version) << "\n";
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (opts.json) {
    nlohmann::json j;
    j["text"] = Text(text);
    j["ids"] = ids;
    j["finish_reason"] = last.finish_reason();
    j["prompt_tokens"] = last.prompt_tokens();
    j["completion_tokens"] = last.completion_tokens();
    j["time_to_first_token_seconds"] = last.time_to_first_token_seconds();
    j["weights_version"] = version;
    j["route"] = route.route();
    j["route_automatic"] = route.route_automatic();
    j["route_confidence"] = route.route_confidence();
    j["tokens_per_second"] = secs > 0 ? ids.size() / secs : 0.0;
    std::cout << j.dump() << "\n";
  }
  return kExitOk;
}

void AddTokenizeCommand(CLI::App& app, GlobalOptions& opts, int* exit_code, const OfflineModes& offline) {
  auto* cmd = app.add_subcommand(
      "tokenize", "Print the token ids of a text (with the server's tokenizer, or offline with --model DIR)");
  auto a = std::make_shared<TokenizeArgs>();
  cmd->add_option("--model", a->model, "Model or tokenizer directory (tokenizer.json): offline, no server")
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--text", a->text, "Text to tokenize")->required();
  cmd->add_flag("--no-special", a->no_special, "Do not add BOS/EOS");
  cmd->callback([&opts, exit_code, a, run_offline = offline.tokenize] {
    *exit_code = a->model.empty() ? ServerTokenize(a->text, !a->no_special, opts) : run_offline(*a, opts);
  });
}

void AddGenerateCommand(CLI::App& app, GlobalOptions& opts, int* exit_code, const OfflineModes& offline) {
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
  cmd->callback([&opts, exit_code, a, run_offline = offline.generate] {
    *exit_code = a->model.empty() ? ServerGenerate(*a, opts) : run_offline(*a, opts);
  });
}

void AddScoreCommand(CLI::App& app, GlobalOptions& opts, int* exit_code) {
  auto* cmd = app.add_subcommand("score", "Log-likelihood of completions after a prompt (server)");
  struct Args {
    std::string prompt, task, route;
    std::vector<std::string> completions;
  };
  auto a = std::make_shared<Args>();
  cmd->add_option("--prompt", a->prompt, "Prompt text")->required();
  cmd->add_option("--completion", a->completions, "A completion (repeatable)")->required();
  cmd->add_option("--task", a->task, "Use the task-routed weights of this learned task (= --route NAME)");
  cmd->add_option(
      "--route", a->route,
      "auto (default: the server picks the learned task the prompt belongs to, or the base model), "
      "merged, base, or a learned task's name");
  cmd->callback([&opts, exit_code, a] {
    pb::ScoreRequest request;
    request.set_prompt(a->prompt);
    request.set_task(a->task);
    request.set_route(a->route);
    for (const auto& c : a->completions) request.add_completions(c);
    auto response_or = CallUnary<pb::InferenceService, pb::ScoreResponse>(
        opts, exit_code, "Score", [&](auto& stub, grpc::ClientContext* ctx, pb::ScoreResponse* out) {
          return stub.Score(ctx, request, out);
        });
    if (!response_or) return;
    const pb::ScoreResponse& response = *response_or;
    if (opts.json) {
      std::cout << ProtoToJson(response) << "\n";
      return;
    }
    std::vector<std::vector<std::string>> rows;
    for (int i = 0; i < response.scores_size(); ++i) {
      const auto& s = response.scores(i);
      rows.push_back({i == response.best() ? "*" : "", absl::StrFormat("%.4f", s.log_likelihood()),
                      absl::StrCat(s.tokens()), nlohmann::json(s.completion()).dump()});
    }
    PrintTable({"BEST", "LOG-LIKELIHOOD", "TOKENS", "COMPLETION"}, rows);
    std::cout << RouteLine(response.route(), response.route_automatic(), response.route_confidence(),
                           response.weights_version())
              << "\n";
  });
}

}  // namespace strata::cli
