#pragma once
// The OpenAI-compatible HTTP API (cpp-httplib, Debian's libcpp-httplib-dev): what OpenAI SDKs,
// LangChain, eval harnesses and curl scripts speak.
//
//   POST /v1/completions   prompt (a string or a list of strings), model (the route: "auto",
//                          "base", "merged" or a learned task; default "auto"), max_tokens,
//                          temperature, top_p, top_k, seed, stop, n, logprobs, echo, ignore_eos,
//                          stream (server-sent events in OpenAI's format, ending "data: [DONE]"),
//                          stream_options.include_usage
//   GET  /v1/models        "auto", "base", "merged" and one model id per learned task
//   GET  /health           200 while serving
//
// Transport only, like InferenceService: every request goes to the same decode scheduler, with
// the same limits (--max_new_tokens, --max_prompt_tokens, --max_waiting_requests) and metrics.
// Errors are OpenAI's error object {"error": {"message", "type", "param", "code"}} with the HTTP
// status of the gRPC code (400 invalid argument, 401 token, 404 unknown model or path, 429 queue
// full, 503 shutting down, 500 internal). With a bearer token on inference (--auth_inference),
// /v1/* needs "Authorization: Bearer <token>" (/health does not); with --tls_cert/--tls_key the
// port serves HTTPS with the same certificate.
//
// Thread safety: requests run concurrently on the HTTP server's worker threads.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/model/generate.h"

namespace strata {

class BearerAuth;
class DecodeScheduler;
class Engine;
class ServerMetrics;

struct HttpOptions {
  std::string host = "127.0.0.1";
  int port = 8000;
  int threads = 64;               // worker threads: at most this many requests (streams) at once
  int32_t max_new_tokens = 1024;  // per choice (--max_new_tokens)
  int max_choices = 32;           // prompts x n in one request (--max_batch_size)
  int64_t max_body_bytes = 16 << 20;
  std::string tls_cert_path, tls_key_path;  // both set: HTTPS
};

// A POST /v1/completions body, checked.
struct CompletionRequest {
  std::vector<std::string> prompts;
  std::string model = "auto";
  SamplingOptions sampling;  // max_tokens, temperature, top_p, top_k, stop, ignore_eos, logprobs
  bool seeded = false;       // `seed` given: choice j of a prompt samples with seed + j
  int n = 1;
  bool echo = false;
  bool stream = false;
  bool include_usage = false;
  int logprobs = -1;  // -1 = off; N >= 0: each token's logprob and the N most likely
};

// Parses and checks a /v1/completions body: INVALID_ARGUMENT naming the parameter (OpenAI's
// defaults: max_tokens 16, temperature 1; unknown parameters are refused, as OpenAI does).
absl::StatusOr<CompletionRequest> ParseCompletionRequest(absl::string_view body, const HttpOptions& options);

// The HTTP status OpenAI-style clients expect for a status code, and the error JSON body.
int HttpStatusOf(const absl::Status& status);
std::string OpenAiErrorJson(const absl::Status& status, const std::string& param = "");

class OpenAiHttpServer {
 public:
  // Binds host:port (UNAVAILABLE naming them when it cannot) and starts serving on its own
  // threads. The engine, scheduler, auth (null = no token) and metrics (may be null) must outlive
  // the server.
  static absl::StatusOr<std::unique_ptr<OpenAiHttpServer>> Start(const Engine* engine,
                                                                 DecodeScheduler* scheduler,
                                                                 const BearerAuth* auth,
                                                                 ServerMetrics* metrics, HttpOptions options);
  ~OpenAiHttpServer();  // Stop(0)

  // Stops accepting connections; requests still running get `grace_seconds` to finish, then their
  // generations are cancelled. Returns when every worker has finished.
  void Stop(double grace_seconds);

  int port() const;

 private:
  struct Impl;
  explicit OpenAiHttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace strata
