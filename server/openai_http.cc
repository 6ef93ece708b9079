#include "server/openai_http.h"

#include <httplib.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <ctime>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/adapt/method.h"
#include "core/serve/scheduler.h"
#include "core/state/engine.h"
#include "nlohmann/json.hpp"
#include "server/auth.h"
#include "server/inference_service.h"
#include "server/metrics.h"

namespace strata {
namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr int32_t kDefaultMaxTokens = 16;  // OpenAI's default for /v1/completions

absl::Status Invalid(absl::string_view param, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(param, ": ", what));
}

// The parameter an INVALID_ARGUMENT message starts with ("max_tokens: ..."), for the error's
// "param" field.
std::string ParamOf(const absl::Status& status) {
  if (!absl::IsInvalidArgument(status)) return "";
  const absl::string_view m = status.message();
  const size_t colon = m.find(':');
  if (colon == absl::string_view::npos || colon == 0) return "";
  const absl::string_view head = m.substr(0, colon);
  for (char c : head) {
    if (!(absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' || c == '[' || c == ']'))
      return "";
  }
  return std::string(head);
}

std::optional<const json*> Field(const json& j, const char* name) {
  auto it = j.find(name);
  if (it == j.end() || it->is_null()) return std::nullopt;
  return &*it;
}

absl::Status ReadInt(const json& j, const char* name, int64_t lo, int64_t hi, int64_t* out) {
  auto f = Field(j, name);
  if (!f) return absl::OkStatus();
  const json& v = **f;
  if (!v.is_number_integer()) {
    if (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>() &&
        std::fabs(v.get<double>()) < 1e15) {
      *out = static_cast<int64_t>(v.get<double>());
    } else {
      return Invalid(name, absl::StrCat("must be an integer, got ", v.dump()));
    }
  } else {
    *out = v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX) ? INT64_MAX
                                                                                          : v.get<int64_t>();
  }
  if (*out < lo || *out > hi)
    return Invalid(name, absl::StrCat("must be in [", lo, ", ", hi, "], got ", *out));
  return absl::OkStatus();
}

absl::Status ReadNumber(const json& j, const char* name, double* out) {
  auto f = Field(j, name);
  if (!f) return absl::OkStatus();
  if (!(*f)->is_number()) return Invalid(name, absl::StrCat("must be a number, got ", (*f)->dump()));
  *out = (*f)->get<double>();
  if (!std::isfinite(*out)) return Invalid(name, "must be finite");
  return absl::OkStatus();
}

absl::Status ReadBool(const json& j, const char* name, bool* out) {
  auto f = Field(j, name);
  if (!f) return absl::OkStatus();
  if (!(*f)->is_boolean()) return Invalid(name, absl::StrCat("must be true or false, got ", (*f)->dump()));
  *out = (*f)->get<bool>();
  return absl::OkStatus();
}

std::string FinishReason(const std::string& ours) {
  if (ours == "eos" || ours == "stop") return "stop";
  if (ours == "cancelled") return "abort";
  return ours;  // "length"
}

std::string RandomHex(size_t n) {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  std::string out;
  while (out.size() < n) absl::StrAppend(&out, absl::Hex(rng(), absl::kZeroPad16));
  out.resize(n);
  return out;
}

// OpenAI's "logprobs" object of a completion choice for `tokens`.
json LogprobsJson(const Tokenizer& tokenizer, const std::vector<TokenLogprob>& tokens) {
  json out = {{"tokens", json::array()}, {"token_logprobs", json::array()}, {"top_logprobs", json::array()}};
  for (const TokenLogprob& t : tokens) {
    const std::string text = TokenDisplayText(tokenizer, t.id);
    out["tokens"].push_back(text);
    out["token_logprobs"].push_back(t.logprob);
    // The N most likely tokens, and the chosen one (as OpenAI: "as well as the chosen token").
    json top = json::object();
    for (const auto& [id, logprob] : t.top) top[TokenDisplayText(tokenizer, id)] = logprob;
    if (!top.contains(text)) top[text] = t.logprob;
    out["top_logprobs"].push_back(std::move(top));
  }
  return out;
}

// One choice of a completion request: its stream and what it has produced.
struct ChoiceRun {
  int index = 0;
  std::shared_ptr<GenerationStream> stream;
  std::deque<StreamEvent> backlog;  // events read while waiting for every choice to start
  bool started = false;
  bool done = false;
  absl::Status error;
  RouteChoice route;
  int64_t version = 0;
  std::string text;  // all of it (non-streaming) or what is not sent yet (streaming)
  std::vector<TokenLogprob> logprobs;
  std::string finish_reason;
  int64_t completion_tokens = 0;
  GenerationFigures figures;
  std::optional<double> last_token_at;
};

// One /v1/completions request while it runs.
struct CompletionRun {
  CompletionRequest request;
  std::string id;
  int64_t created = 0;
  double submitted_after = 0;  // seconds from arrival to Submit
  std::vector<ChoiceRun> choices;

  void CancelAll() {
    for (ChoiceRun& c : choices) {
      if (c.stream) c.stream->Cancel();
    }
  }
  bool AllDone() const {
    return std::all_of(choices.begin(), choices.end(), [](const ChoiceRun& c) { return c.done; });
  }
};

// Applies one event to its choice (metrics figures included).
void Apply(ChoiceRun& c, StreamEvent& e, double submitted_after) {
  switch (e.kind) {
    case StreamEvent::Kind::kStarted:
      c.started = true;
      c.route = e.route;
      c.version = e.version;
      c.figures.prompt_tokens = e.prompt_tokens;
      break;
    case StreamEvent::Kind::kToken:
      if (e.token_id >= 0) {
        ++c.completion_tokens;
        ++c.figures.generation_tokens;
        if (!c.figures.time_to_first_token) c.figures.time_to_first_token = submitted_after + e.seconds;
        if (c.last_token_at) c.figures.inter_token_latencies.push_back(e.seconds - *c.last_token_at);
        c.last_token_at = e.seconds;
        if (e.has_logprob) c.logprobs.push_back(std::move(e.logprob));
      }
      c.text += e.text;
      break;
    case StreamEvent::Kind::kDone:
      c.done = true;
      c.error = e.status;
      if (e.status.ok()) {
        c.finish_reason = FinishReason(e.result.finish_reason);
        c.figures.e2e_seconds = submitted_after + e.seconds;
      }
      break;
  }
}

// Reads whatever events are ready (waiting up to `wait` on one unfinished choice when none is),
// applying them; returns the indices of choices that changed.
// With `on_event`, calls it after each event with the choice's index; it returns false to stop
// (the remaining events are dropped).
std::vector<size_t> Poll(CompletionRun& run, absl::Duration wait,
                         const std::function<bool(size_t)>& on_event = nullptr) {
  std::vector<size_t> changed;
  bool stopped = false;
  auto take = [&](size_t i, std::vector<StreamEvent> events) {
    if (events.empty() || stopped) return;
    for (StreamEvent& e : events) {
      Apply(run.choices[i], e, run.submitted_after);
      if (on_event && !on_event(i)) {
        stopped = true;
        return;
      }
    }
    changed.push_back(i);
  };
  for (size_t i = 0; i < run.choices.size(); ++i) {
    ChoiceRun& c = run.choices[i];
    if (!c.backlog.empty()) {
      std::vector<StreamEvent> events(std::make_move_iterator(c.backlog.begin()),
                                      std::make_move_iterator(c.backlog.end()));
      c.backlog.clear();
      take(i, std::move(events));
    }
    if (!c.done) take(i, c.stream->Next(absl::ZeroDuration()));
  }
  if (changed.empty()) {
    for (size_t i = 0; i < run.choices.size(); ++i) {
      if (!run.choices[i].done) {
        take(i, run.choices[i].stream->Next(wait));
        break;
      }
    }
  }
  return changed;
}

json ChoiceJson(const Tokenizer& tokenizer, const CompletionRun& run, const ChoiceRun& c,
                const std::string& text, const std::vector<TokenLogprob>& logprobs, bool final) {
  json choice = {{"index", c.index}, {"text", text}};
  choice["logprobs"] = run.request.logprobs >= 0 ? LogprobsJson(tokenizer, logprobs) : json(nullptr);
  choice["finish_reason"] = final ? json(c.finish_reason) : json(nullptr);
  // Strata's extensions: where the choice was served.
  choice["route"] = c.route.route;
  choice["weights_version"] = c.version;
  return choice;
}

json UsageJson(const CompletionRun& run) {
  int64_t prompt = 0, completion = 0;
  for (size_t i = 0; i < run.choices.size(); ++i) {
    // The prompt counts once per prompt, not per choice (as OpenAI's usage).
    if (i % static_cast<size_t>(run.request.n) == 0) prompt += run.choices[i].figures.prompt_tokens;
    completion += run.choices[i].completion_tokens;
  }
  return {
      {"prompt_tokens", prompt}, {"completion_tokens", completion}, {"total_tokens", prompt + completion}};
}

}  // namespace

absl::StatusOr<CompletionRequest> ParseCompletionRequest(absl::string_view body, const HttpOptions& options) {
  json j;
  try {
    j = json::parse(body.begin(), body.end());
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("the request body is not valid JSON: ", e.what()));
  }
  if (!j.is_object()) return absl::InvalidArgumentError("the request body must be a JSON object");
  static const std::set<std::string> kKnown = {"model",
                                               "prompt",
                                               "max_tokens",
                                               "temperature",
                                               "top_p",
                                               "top_k",
                                               "n",
                                               "stream",
                                               "logprobs",
                                               "echo",
                                               "stop",
                                               "seed",
                                               "user",
                                               "best_of",
                                               "logit_bias",
                                               "suffix",
                                               "stream_options",
                                               "presence_penalty",
                                               "frequency_penalty",
                                               "ignore_eos"};
  for (const auto& item : j.items()) {
    if (kKnown.count(item.key()) == 0) {
      return Invalid(item.key(),
                     "unrecognized request argument (this server implements OpenAI's /v1/completions "
                     "parameters listed in the README)");
    }
  }
  CompletionRequest r;
  r.sampling.temperature = 1.0f;  // OpenAI's default
  r.sampling.max_new_tokens = std::min(kDefaultMaxTokens, options.max_new_tokens);

  if (auto f = Field(j, "model")) {
    if (!(*f)->is_string() || (*f)->get<std::string>().empty()) {
      return Invalid("model",
                     "must be a non-empty string: auto, base, merged or a learned task (GET /v1/models)");
    }
    r.model = (*f)->get<std::string>();
  }
  auto prompt = Field(j, "prompt");
  if (!prompt) return Invalid("prompt", "is required (a string or a list of strings)");
  const json& p = **prompt;
  auto add_prompt = [&](const json& v, const std::string& field) -> absl::Status {
    if (v.is_number_integer() || (v.is_array() && !v.empty() && v[0].is_number_integer())) {
      return Invalid(field, "token-id prompts are not supported; send the prompt as text");
    }
    if (!v.is_string()) return Invalid(field, "must be a string or a list of strings");
    if (v.get<std::string>().empty()) return Invalid(field, "must not be empty");
    r.prompts.push_back(v.get<std::string>());
    return absl::OkStatus();
  };
  if (p.is_array()) {
    if (p.empty()) return Invalid("prompt", "the list is empty");
    if (p[0].is_number_integer()) return add_prompt(p, "prompt");
    for (size_t i = 0; i < p.size(); ++i) {
      if (auto st = add_prompt(p[i], absl::StrCat("prompt[", i, "]")); !st.ok()) return st;
    }
  } else if (auto st = add_prompt(p, "prompt"); !st.ok()) {
    return st;
  }

  int64_t v = 0;
  if (Field(j, "max_tokens")) {
    if (auto st = ReadInt(j, "max_tokens", 0, INT64_MAX, &v); !st.ok()) return st;
    if (v > options.max_new_tokens) {
      return Invalid("max_tokens", absl::StrCat(v, " is more than this server's limit ",
                                                options.max_new_tokens, " (--max_new_tokens)"));
    }
    r.sampling.max_new_tokens = static_cast<int32_t>(v);
  }
  double d = r.sampling.temperature;
  if (auto st = ReadNumber(j, "temperature", &d); !st.ok()) return st;
  if (d < 0) return Invalid("temperature", absl::StrCat("must be >= 0 (0 = greedy), got ", d));
  r.sampling.temperature = static_cast<float>(d);
  d = 1.0;
  if (auto st = ReadNumber(j, "top_p", &d); !st.ok()) return st;
  if (!(d > 0 && d <= 1)) return Invalid("top_p", absl::StrCat("must be in (0, 1], got ", d));
  r.sampling.top_p = static_cast<float>(d);
  v = 0;
  if (auto st = ReadInt(j, "top_k", -1, INT32_MAX, &v); !st.ok()) return st;
  r.sampling.top_k = v < 0 ? 0 : static_cast<int32_t>(v);  // -1 (vLLM) or 0 = off
  v = 1;
  if (auto st = ReadInt(j, "n", 1, options.max_choices, &v); !st.ok()) return st;
  r.n = static_cast<int>(v);
  if (static_cast<int64_t>(r.prompts.size()) * r.n > options.max_choices) {
    return Invalid("n", absl::StrCat(r.prompts.size(), " prompts x n = ", r.n, " is more than ",
                                     options.max_choices, " choices in one request (--max_batch_size)"));
  }
  if (auto f = Field(j, "best_of")) {
    if (auto st = ReadInt(j, "best_of", 1, options.max_choices, &v); !st.ok()) return st;
    if (v != r.n) return Invalid("best_of", "is not supported (only best_of = n)");
  }
  for (const char* penalty : {"presence_penalty", "frequency_penalty"}) {
    d = 0;
    if (auto st = ReadNumber(j, penalty, &d); !st.ok()) return st;
    if (d != 0) return Invalid(penalty, "is not supported (only 0)");
  }
  if (auto f = Field(j, "logit_bias"); f && !((*f)->is_object() && (*f)->empty())) {
    return Invalid("logit_bias", "is not supported (only an empty object)");
  }
  if (auto f = Field(j, "suffix"); f && !((*f)->is_string() && (*f)->get<std::string>().empty())) {
    return Invalid("suffix", "is not supported");
  }
  if (auto f = Field(j, "user"); f && !(*f)->is_string()) return Invalid("user", "must be a string");
  if (auto f = Field(j, "stop")) {
    auto add_stop = [&](const json& s, const std::string& field) -> absl::Status {
      if (!s.is_string()) return Invalid(field, "must be a string or a list of strings");
      if (s.get<std::string>().empty()) return Invalid(field, "stop strings must not be empty");
      r.sampling.stop_strings.push_back(s.get<std::string>());
      return absl::OkStatus();
    };
    if ((*f)->is_array()) {
      for (size_t i = 0; i < (*f)->size(); ++i) {
        if (auto st = add_stop((**f)[i], absl::StrCat("stop[", i, "]")); !st.ok()) return st;
      }
    } else if (auto st = add_stop(**f, "stop"); !st.ok()) {
      return st;
    }
  }
  if (Field(j, "seed")) {
    if (auto st = ReadInt(j, "seed", INT64_MIN, INT64_MAX, &v); !st.ok()) return st;
    r.seeded = true;
    r.sampling.seed = static_cast<uint64_t>(v);
  }
  if (Field(j, "logprobs")) {
    if ((**Field(j, "logprobs")).is_boolean()) {
      return Invalid("logprobs",
                     "must be an integer (the number of most likely tokens to report, 0-20), got a "
                     "boolean (that is the chat API's form)");
    }
    if (auto st = ReadInt(j, "logprobs", 0, kMaxTopLogprobs, &v); !st.ok()) return st;
    r.logprobs = static_cast<int>(v);
    r.sampling.logprobs = true;
    r.sampling.top_logprobs = static_cast<int32_t>(v);
  }
  if (auto st = ReadBool(j, "echo", &r.echo); !st.ok()) return st;
  if (r.echo && r.logprobs >= 0) return Invalid("echo", "with logprobs is not supported (prompt logprobs)");
  if (auto st = ReadBool(j, "stream", &r.stream); !st.ok()) return st;
  bool ignore_eos = false;
  if (auto st = ReadBool(j, "ignore_eos", &ignore_eos); !st.ok()) return st;
  r.sampling.stop_on_eos = !ignore_eos;
  if (auto f = Field(j, "stream_options")) {
    if (!r.stream) return Invalid("stream_options", "is only allowed with stream: true");
    if (!(*f)->is_object()) return Invalid("stream_options", "must be an object");
    for (const auto& item : (*f)->items()) {
      if (item.key() != "include_usage") {
        return Invalid(absl::StrCat("stream_options.", item.key()), "unrecognized (only include_usage)");
      }
    }
    if (auto st = ReadBool(**f, "include_usage", &r.include_usage); !st.ok()) {
      return Invalid("stream_options.include_usage", "must be true or false");
    }
  }
  return r;
}

int HttpStatusOf(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kOk:
      return 200;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kOutOfRange:
      return 400;
    case absl::StatusCode::kUnauthenticated:
      return 401;
    case absl::StatusCode::kPermissionDenied:
      return 403;
    case absl::StatusCode::kNotFound:
      return 404;
    case absl::StatusCode::kResourceExhausted:
      return 429;
    case absl::StatusCode::kUnavailable:
      return 503;
    case absl::StatusCode::kDeadlineExceeded:
      return 504;
    case absl::StatusCode::kUnimplemented:
      return 501;
    default:
      return 500;
  }
}

std::string OpenAiErrorJson(const absl::Status& status, const std::string& param) {
  const int http = HttpStatusOf(status);
  std::string type = "server_error";
  if (http == 400 || http == 404 || http == 501) type = "invalid_request_error";
  if (http == 401) type = "authentication_error";
  if (http == 403) type = "permission_error";
  if (http == 429) type = "rate_limit_error";
  std::string code = absl::AsciiStrToLower(absl::StatusCodeToString(status.code()));
  if (http == 404 && param == "model") code = "model_not_found";
  json error = {{"message", std::string(status.message())}, {"type", type}, {"code", code}};
  error["param"] = param.empty() ? json(nullptr) : json(param);
  return json{{"error", error}}.dump() + "\n";
}

struct OpenAiHttpServer::Impl {
  const Engine* engine = nullptr;
  DecodeScheduler* scheduler = nullptr;
  const BearerAuth* auth = nullptr;
  ServerMetrics* metrics = nullptr;
  HttpOptions options;
  std::unique_ptr<httplib::Server> server;
  std::thread listener;
  int port = 0;
  int64_t created = 0;
  std::atomic<bool> stopping{false};
  std::atomic<bool> cancel_all{false};
  std::mutex active_mu;
  std::condition_variable active_cv;
  int active = 0;  // requests in a handler or a stream

  void Enter() {
    std::lock_guard<std::mutex> lock(active_mu);
    ++active;
  }
  void Leave() {
    std::lock_guard<std::mutex> lock(active_mu);
    --active;
    active_cv.notify_all();
  }

  static void Error(httplib::Response& res, const absl::Status& status, std::string param = "") {
    if (param.empty()) param = ParamOf(status);
    res.status = HttpStatusOf(status);
    if (absl::IsResourceExhausted(status)) res.set_header("Retry-After", "1");
    res.set_content(OpenAiErrorJson(status, param), "application/json");
  }

  absl::Status Authorize(const httplib::Request& req) const {
    if (auth == nullptr) return absl::OkStatus();
    if (!req.has_header("Authorization")) return auth->CheckHeader(nullptr);
    const std::string value = req.get_header_value("Authorization");
    return auth->CheckHeader(&value);
  }

  void Models(const httplib::Request& req, httplib::Response& res) {
    if (auto st = Authorize(req); !st.ok()) return Error(res, st);
    json data = json::array();
    auto model = [&](const std::string& id, const std::string& what) {
      data.push_back(
          {{"id", id}, {"object", "model"}, {"created", created}, {"owned_by", "strata"}, {"strata", what}});
    };
    model("auto", "the router picks a learned task from the prompt (or --unmatched_route)");
    model("base", "the base model W0");
    model("merged", "the merged weights of every learned task");
    const std::shared_ptr<const ServedVersion> version = engine->Current();
    if (version->method && version->method->SupportsTaskRouting()) {
      for (const std::string& task : version->method->tasks())
        model(task, "the model as of this learned task");
    }
    res.set_content(json{{"object", "list"}, {"data", data}}.dump() + "\n", "application/json");
  }

  void Completions(const httplib::Request& req, httplib::Response& res) {
    const Clock::time_point arrived = Clock::now();
    if (stopping.load()) return Error(res, absl::UnavailableError("the server is shutting down"));
    if (auto st = Authorize(req); !st.ok()) return Error(res, st);
    auto parsed = ParseCompletionRequest(req.body, options);
    if (!parsed.ok()) return Error(res, parsed.status());

    auto run = std::make_shared<CompletionRun>();
    run->request = std::move(parsed).value();
    run->id = absl::StrCat("cmpl-", RandomHex(24));
    run->created = static_cast<int64_t>(std::time(nullptr));
    const CompletionRequest& request = run->request;
    const uint64_t base_seed = request.seeded ? request.sampling.seed : std::random_device{}();
    run->submitted_after = std::chrono::duration<double>(Clock::now() - arrived).count();
    for (size_t p = 0; p < request.prompts.size(); ++p) {
      for (int j = 0; j < request.n; ++j) {
        GenerationRequest g;
        g.prompt = request.prompts[p];
        g.route = request.model;
        g.sampling = request.sampling;
        g.sampling.seed = base_seed + static_cast<uint64_t>(j);
        if (request.prompts.size() > 1) g.prompt_field = absl::StrCat("prompt[", p, "]");
        auto stream = scheduler->Submit(std::move(g));
        if (!stream.ok()) {
          run->CancelAll();
          CountRefusal(metrics, stream.status());
          return Error(res, stream.status());
        }
        ChoiceRun c;
        c.index = static_cast<int>(run->choices.size());
        c.stream = std::move(stream).value();
        run->choices.push_back(std::move(c));
      }
    }
    // Wait until every choice is routed (or failed), so that an unknown model is a 404 rather than
    // an error inside a 200 stream.
    for (ChoiceRun& c : run->choices) {
      while (true) {
        if (cancel_all.load()) {
          run->CancelAll();
          return Error(res, absl::UnavailableError("the server is shutting down"));
        }
        std::vector<StreamEvent> events = c.stream->Next(absl::Milliseconds(50));
        bool decided = false;
        for (StreamEvent& e : events) {
          if (e.kind == StreamEvent::Kind::kDone && !c.started && !decided && !e.status.ok()) {
            run->CancelAll();
            return Error(res, e.status, absl::IsNotFound(e.status) ? "model" : "");
          }
          if (e.kind != StreamEvent::Kind::kToken) decided = true;
          if (e.kind == StreamEvent::Kind::kStarted) {
            c.started = true;
            c.route = e.route;  // for an echo chunk sent before the backlog is applied
            c.version = e.version;
          }
          c.backlog.push_back(std::move(e));
        }
        if (decided) break;
      }
      c.started = false;  // Apply() sets it again from the backlog
    }
    if (request.stream) return Stream(run, res);

    while (!run->AllDone()) {
      if (cancel_all.load()) {
        run->CancelAll();
        return Error(res, absl::UnavailableError("the server is shutting down"));
      }
      Poll(*run, absl::Milliseconds(50));
    }
    json choices = json::array();
    for (ChoiceRun& c : run->choices) {
      if (!c.error.ok()) return Error(res, c.error);
      Record(c);
      const std::string& prompt = request.prompts[static_cast<size_t>(c.index / request.n)];
      choices.push_back(ChoiceJson(engine->tokenizer(), *run, c, request.echo ? prompt + c.text : c.text,
                                   c.logprobs, true));
    }
    json body = {{"id", run->id},          {"object", "text_completion"}, {"created", run->created},
                 {"model", request.model}, {"choices", choices},          {"usage", UsageJson(*run)}};
    res.set_content(body.dump() + "\n", "application/json");
  }

  void Record(const ChoiceRun& c) {
    if (metrics == nullptr) return;
    metrics->RecordRoute(c.route.route);
    metrics->RecordGeneration(c.figures);
  }

  // Server-sent events: one "data: {chunk}" per text piece of a choice, a last chunk per choice
  // with its finish_reason, the usage chunk when asked for, then "data: [DONE]".
  void Stream(const std::shared_ptr<CompletionRun>& run, httplib::Response& res) {
    res.set_header("Cache-Control", "no-cache");
    res.set_header("X-Accel-Buffering", "no");
    Enter();
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, run](size_t, httplib::DataSink& sink) {
          const Tokenizer& tokenizer = engine->tokenizer();
          const CompletionRequest& request = run->request;
          auto send = [&](const json& chunk) {
            const std::string event = absl::StrCat("data: ", chunk.dump(), "\n\n");
            return sink.write(event.data(), event.size());
          };
          auto chunk_of = [&](json choices) {
            return json{{"id", run->id},
                        {"object", "text_completion"},
                        {"created", run->created},
                        {"model", request.model},
                        {"choices", std::move(choices)}};
          };
          if (request.echo) {
            for (ChoiceRun& c : run->choices) {
              const std::string& prompt = request.prompts[static_cast<size_t>(c.index / request.n)];
              if (!send(chunk_of(json::array({ChoiceJson(tokenizer, *run, c, prompt, {}, false)})))) {
                run->CancelAll();
                return false;
              }
            }
          }
          std::vector<bool> finished(run->choices.size(), false);
          while (true) {
            if (cancel_all.load() || !sink.is_writable()) {
              run->CancelAll();
              return false;
            }
            // Each event's text (and its tokens' logprobs) goes out as one chunk as it comes, as
            // OpenAI streams; a choice's last chunk carries its finish_reason.
            enum class Outcome { kGoing, kFailed, kGone } outcome = Outcome::kGoing;
            Poll(*run, absl::Milliseconds(50), [&](size_t i) {
              ChoiceRun& c = run->choices[i];
              if (!c.error.ok()) {
                send(json::parse(OpenAiErrorJson(c.error)));
                outcome = Outcome::kFailed;
                return false;
              }
              if (c.text.empty() && !(c.done && !finished[i])) return true;
              const bool last = c.done;
              if (!send(chunk_of(json::array({ChoiceJson(tokenizer, *run, c, c.text, c.logprobs, last)})))) {
                outcome = Outcome::kGone;
                return false;
              }
              c.text.clear();
              c.logprobs.clear();
              if (last) {
                finished[i] = true;
                Record(c);
              }
              return true;
            });
            if (outcome != Outcome::kGoing) {
              run->CancelAll();
              if (outcome == Outcome::kGone) return false;
              sink.done();
              return true;
            }
            if (std::all_of(finished.begin(), finished.end(), [](bool f) { return f; })) break;
          }
          if (request.include_usage) {
            json usage = chunk_of(json::array());
            usage["usage"] = UsageJson(*run);
            send(usage);
          }
          const std::string done = "data: [DONE]\n\n";
          sink.write(done.data(), done.size());
          sink.done();
          return true;
        },
        [this, run](bool) {
          run->CancelAll();
          Leave();
        });
  }
};

OpenAiHttpServer::OpenAiHttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

OpenAiHttpServer::~OpenAiHttpServer() { Stop(0); }

int OpenAiHttpServer::port() const { return impl_->port; }

absl::StatusOr<std::unique_ptr<OpenAiHttpServer>> OpenAiHttpServer::Start(const Engine* engine,
                                                                          DecodeScheduler* scheduler,
                                                                          const BearerAuth* auth,
                                                                          ServerMetrics* metrics,
                                                                          HttpOptions options) {
  auto impl = std::make_unique<Impl>();
  impl->engine = engine;
  impl->scheduler = scheduler;
  impl->auth = auth;
  impl->metrics = metrics;
  impl->options = options;
  impl->created = static_cast<int64_t>(std::time(nullptr));
  const bool tls = !options.tls_cert_path.empty();
  if (tls) {
    auto ssl =
        std::make_unique<httplib::SSLServer>(options.tls_cert_path.c_str(), options.tls_key_path.c_str());
    if (!ssl->is_valid()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--http_port: cannot serve HTTPS with --tls_cert=", options.tls_cert_path,
                       " and --tls_key=", options.tls_key_path));
    }
    impl->server = std::move(ssl);
  } else {
    impl->server = std::make_unique<httplib::Server>();
  }
  httplib::Server& svr = *impl->server;
  const int threads = std::max(1, options.threads);
  svr.new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
  svr.set_payload_max_length(static_cast<size_t>(options.max_body_bytes));
  svr.set_keep_alive_timeout(2);
  // httplib's default sets SO_REUSEPORT, which lets a second server bind the same port and take
  // half of its connections; SO_REUSEADDR only (a restart may rebind a port in TIME_WAIT).
  svr.set_socket_options([](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, reinterpret_cast<void*>(&yes), sizeof(yes));
  });
  Impl* self = impl.get();
  auto guarded = [self](void (Impl::*handler)(const httplib::Request&, httplib::Response&)) {
    return [self, handler](const httplib::Request& req, httplib::Response& res) {
      self->Enter();
      try {
        (self->*handler)(req, res);
      } catch (const std::exception& e) {
        Impl::Error(res, absl::InternalError(absl::StrCat("internal error: ", e.what())));
      }
      self->Leave();
    };
  };
  svr.Post("/v1/completions", guarded(&Impl::Completions));
  svr.Get("/v1/models", guarded(&Impl::Models));
  svr.Get("/health", [self](const httplib::Request&, httplib::Response& res) {
    if (self->stopping.load()) return Impl::Error(res, absl::UnavailableError("the server is shutting down"));
    res.set_content("ok\n", "text/plain");
  });
  svr.Post("/v1/chat/completions", [](const httplib::Request&, httplib::Response& res) {
    Impl::Error(res,
                absl::NotFoundError("/v1/chat/completions is not served (the model has no chat template); "
                                    "use /v1/completions"));
  });
  svr.Get("/v1/completions", [](const httplib::Request&, httplib::Response& res) {
    Impl::Error(res, absl::InvalidArgumentError("/v1/completions takes POST with a JSON body"));
    res.status = 405;
  });
  svr.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    const int status = res.status;
    if (status == 404) {
      Impl::Error(res, absl::NotFoundError(
                           absl::StrCat("no such endpoint: ", req.method, " ", req.path,
                                        " (this server serves /v1/completions, /v1/models, /health)")));
    } else if (status == 413) {
      Impl::Error(res, absl::InvalidArgumentError("the request body is larger than --max_message_bytes"));
      res.status = 413;
    } else {
      Impl::Error(res, absl::InvalidArgumentError(absl::StrCat("HTTP ", status)));
      res.status = status;
    }
  });
  if (!svr.bind_to_port(options.host, options.port)) {
    return absl::UnavailableError(absl::StrCat("cannot listen for HTTP on ", options.host, ":", options.port,
                                               " (--http_port; port in use or address not available)"));
  }
  impl->port = options.port;
  impl->listener = std::thread([self] { self->server->listen_after_bind(); });
  // Stop() before the accept loop runs would not end it (httplib's stop() acts on a running
  // server only), so return once it runs.
  for (int i = 0; i < 5000 && !svr.is_running(); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  spdlog::info("OpenAI-compatible HTTP on {}://{}:{}/v1 ({} worker threads)", tls ? "https" : "http",
               options.host, options.port, threads);
  return std::unique_ptr<OpenAiHttpServer>(new OpenAiHttpServer(std::move(impl)));
}

void OpenAiHttpServer::Stop(double grace_seconds) {
  Impl& impl = *impl_;
  if (!impl.listener.joinable()) return;
  impl.stopping.store(true);
  impl.server->stop();  // no new connections; running requests go on
  {
    std::unique_lock<std::mutex> lock(impl.active_mu);
    impl.active_cv.wait_for(lock, std::chrono::duration<double>(std::max(0.0, grace_seconds)),
                            [&] { return impl.active == 0; });
  }
  impl.cancel_all.store(true);  // what is still running ends now
  impl.listener.join();
}

}  // namespace strata
