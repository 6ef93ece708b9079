#include "server/inference_service.h"

#include <chrono>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/data/encode.h"
#include "core/data/jsonl.h"
#include "core/model/generate.h"
#include "core/model/tokenizer.h"
#include "core/util/utf8.h"
#include "server/status_util.h"

namespace strata {
namespace {

namespace pb = strata::v1;
using Clock = std::chrono::steady_clock;

constexpr int32_t kDefaultMaxNewTokens = 128;

absl::StatusOr<SamplingOptions> SamplingFromProto(const pb::SamplingParams& p, int32_t limit) {
  SamplingOptions o;
  if (p.max_new_tokens() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.max_new_tokens: must be >= 0, got ", p.max_new_tokens()));
  }
  o.max_new_tokens = p.max_new_tokens() == 0 ? std::min(kDefaultMaxNewTokens, limit) : p.max_new_tokens();
  if (o.max_new_tokens > limit) {
    return absl::InvalidArgumentError(absl::StrCat("sampling.max_new_tokens: ", p.max_new_tokens(),
                                                   " is more than this server's limit ", limit,
                                                   " (--max_new_tokens)"));
  }
  if (!std::isfinite(p.temperature()) || p.temperature() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sampling.temperature: must be a finite number >= 0 (0 = greedy), got ", p.temperature()));
  }
  o.temperature = p.temperature();
  if (p.top_k() < 0)
    return absl::InvalidArgumentError(absl::StrCat("sampling.top_k: must be >= 0, got ", p.top_k()));
  o.top_k = p.top_k();
  if (!std::isfinite(p.top_p()) || p.top_p() < 0 || p.top_p() > 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.top_p: must be in [0, 1] (0 or 1 = off), got ", p.top_p()));
  }
  o.top_p = p.top_p() == 0 ? 1.0f : p.top_p();
  o.seed = p.seed();
  o.stop_on_eos = !p.ignore_eos();
  if (p.top_logprobs() < 0 || p.top_logprobs() > kMaxTopLogprobs) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling.top_logprobs: must be in [0, ", kMaxTopLogprobs, "], got ", p.top_logprobs()));
  }
  if (p.top_logprobs() > 0 && !p.logprobs()) {
    return absl::InvalidArgumentError("sampling.top_logprobs: needs sampling.logprobs = true");
  }
  o.logprobs = p.logprobs();
  o.top_logprobs = p.top_logprobs();
  for (const std::string& s : p.stop()) {
    if (s.empty()) return absl::InvalidArgumentError("sampling.stop: stop strings must not be empty");
    o.stop_strings.push_back(s);
  }
  return o;
}

void AddLogprobs(const Tokenizer& tokenizer, const std::vector<TokenLogprob>& logprobs,
                 pb::GenerateResponse* msg) {
  for (const TokenLogprob& lp : logprobs) {
    pb::TokenLogprob* out = msg->add_logprobs();
    out->set_token_id(lp.id);
    out->set_token(TokenDisplayText(tokenizer, lp.id));
    out->set_logprob(lp.logprob);
    for (const auto& [id, logprob] : lp.top) {
      pb::TopLogprob* top = out->add_top_logprobs();
      top->set_token_id(id);
      top->set_token(TokenDisplayText(tokenizer, id));
      top->set_logprob(logprob);
    }
  }
}

// The route a request asks for: `route`, or `task` (the older field), "auto" when both are empty.
absl::StatusOr<std::string> RequestedRoute(const std::string& task, const std::string& route) {
  if (!task.empty() && !route.empty() && task != route) {
    return absl::InvalidArgumentError(
        absl::StrCat("route: '", route, "' and task: '", task, "' name different routes (give one of them)"));
  }
  if (!route.empty()) return route;
  if (!task.empty()) return task;
  return std::string("auto");
}

// Prompts and completions are bytes on the wire (see inference.proto): refuse invalid UTF-8 here,
// naming the field and the byte.
absl::Status CheckUtf8(const std::string& text, const std::string& field) {
  size_t bad = 0;
  if (IsValidUtf8(text, &bad)) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(field, ": invalid UTF-8 at byte ", bad + 1, " (the text must be UTF-8)"));
}

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

}  // namespace

std::string TokenDisplayText(const Tokenizer& tokenizer, int32_t id) {
  std::string token = tokenizer.IdToToken(id);
  if (IsValidUtf8(token)) return token;
  std::string out;
  for (unsigned char c : token) absl::StrAppend(&out, absl::StrFormat("<0x%02X>", c));
  return out;
}

void CountRefusal(ServerMetrics* metrics, const absl::Status& status) {
  if (metrics == nullptr) return;
  if (absl::IsResourceExhausted(status)) metrics->RecordRejected("queue_full");
  if (const auto reason = status.GetPayload(kRefusalReasonPayload);
      reason.has_value() && *reason == "prompt_too_long") {
    metrics->RecordRejected("prompt_too_long");
  }
}

InferenceServiceImpl::InferenceServiceImpl(const Engine* engine, DecodeScheduler* scheduler,
                                           const BearerAuth* auth, ServerMetrics* metrics,
                                           InferenceOptions options)
    : engine_(engine), scheduler_(scheduler), auth_(auth), metrics_(metrics), options_(options) {}

// An admission error, counted by reason.
grpc::Status InferenceServiceImpl::Refused(const absl::Status& status) {
  CountRefusal(metrics_, status);
  return ToGrpcStatus(status);
}

grpc::Status InferenceServiceImpl::Generate(grpc::ServerContext* context, const pb::GenerateRequest* request,
                                            grpc::ServerWriter<pb::GenerateResponse>* writer) {
  const Clock::time_point start = Clock::now();
  if (auto st = Authorize(auth_, *context); !st.ok()) return st;
  if (auto st = CheckUtf8(request->prompt(), "prompt"); !st.ok()) return ToGrpcStatus(st);
  auto sampling = SamplingFromProto(request->sampling(), options_.max_new_tokens);
  if (!sampling.ok()) return ToGrpcStatus(sampling.status());
  auto requested = RequestedRoute(request->task(), request->route());
  if (!requested.ok()) return ToGrpcStatus(requested.status());

  GenerationRequest job;
  job.prompt = request->prompt();
  job.route = *requested;
  job.sampling = *sampling;
  auto stream = scheduler_->Submit(std::move(job));
  if (!stream.ok()) return Refused(stream.status());

  RouteChoice route;
  int64_t version = 0;
  auto set_route = [&](pb::GenerateResponse* msg) {
    msg->set_weights_version(version);
    msg->set_route(route.route);
    msg->set_route_automatic(route.automatic);
    msg->set_route_confidence(route.confidence);
  };
  GenerationFigures figures;
  std::vector<int32_t> pending_ids;            // generated ids not yet sent (their text is incomplete)
  std::vector<TokenLogprob> pending_logprobs;  // theirs, when asked for
  std::optional<double> last_token_at;         // scheduler time of the previous token
  const double submitted_after = Seconds(start);
  for (;;) {
    // Poll for the client going away (or its deadline passing) between events.
    if (context->IsCancelled()) {
      (*stream)->Cancel();
      return grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled the generation");
    }
    for (StreamEvent& e : (*stream)->Next(absl::Milliseconds(50))) {
      switch (e.kind) {
        case StreamEvent::Kind::kStarted:
          route = e.route;
          version = e.version;
          figures.prompt_tokens = e.prompt_tokens;
          if (metrics_) metrics_->RecordRoute(route.route);
          break;
        case StreamEvent::Kind::kToken: {
          if (e.token_id >= 0) {
            pending_ids.push_back(e.token_id);
            if (e.has_logprob) pending_logprobs.push_back(std::move(e.logprob));
            ++figures.generation_tokens;
            if (!figures.time_to_first_token) figures.time_to_first_token = submitted_after + e.seconds;
            if (last_token_at) figures.inter_token_latencies.push_back(e.seconds - *last_token_at);
            last_token_at = e.seconds;
          }
          if (e.text.empty()) break;
          pb::GenerateResponse msg;
          // Proto3 strings must be UTF-8: invalid bytes in generated text become U+FFFD.
          msg.set_text(SanitizeUtf8(e.text));
          for (int32_t i : pending_ids) msg.add_token_ids(i);
          AddLogprobs(engine_->tokenizer(), pending_logprobs, &msg);
          set_route(&msg);
          pending_ids.clear();
          pending_logprobs.clear();
          if (!writer->Write(msg)) {
            (*stream)->Cancel();
            return grpc::Status(grpc::StatusCode::CANCELLED, "the client went away during the generation");
          }
          break;
        }
        case StreamEvent::Kind::kDone: {
          if (!e.status.ok()) return ToGrpcStatus(e.status);
          const GenerationResult& r = e.result;
          figures.e2e_seconds = submitted_after + e.seconds;
          if (metrics_) metrics_->RecordGeneration(figures);
          if (r.finish_reason == "cancelled" || context->IsCancelled()) {
            return grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled the generation");
          }
          pb::GenerateResponse last;
          for (int32_t i : pending_ids) last.add_token_ids(i);
          AddLogprobs(engine_->tokenizer(), pending_logprobs, &last);
          set_route(&last);
          last.set_finish_reason(r.finish_reason);
          last.set_prompt_tokens(static_cast<int32_t>(r.prompt_tokens));
          last.set_completion_tokens(static_cast<int32_t>(r.ids.size()));
          last.set_time_to_first_token_seconds(figures.time_to_first_token.value_or(Seconds(start)));
          writer->Write(last);
          return grpc::Status::OK;
        }
      }
    }
  }
}

grpc::Status InferenceServiceImpl::Score(grpc::ServerContext* context, const pb::ScoreRequest* request,
                                         pb::ScoreResponse* response) {
  if (auto st = Authorize(auth_, *context); !st.ok()) return st;
  if (request->completions_size() == 0) {
    return ToGrpcStatus(absl::InvalidArgumentError("completions: at least one is required"));
  }
  if (auto st = CheckUtf8(request->prompt(), "prompt"); !st.ok()) return ToGrpcStatus(st);
  for (int i = 0; i < request->completions_size(); ++i) {
    const std::string field = absl::StrCat("completions[", i, "]");
    if (request->completions(i).empty()) {
      return ToGrpcStatus(absl::InvalidArgumentError(
          absl::StrCat(field, ": empty; a completion needs at least one character to be scored")));
    }
    if (auto st = CheckUtf8(request->completions(i), field); !st.ok()) return ToGrpcStatus(st);
  }
  auto requested = RequestedRoute(request->task(), request->route());
  if (!requested.ok()) return ToGrpcStatus(requested.status());
  std::vector<std::string> completions(request->completions().begin(), request->completions().end());
  auto scored = scheduler_->Score(*requested, request->prompt(), completions);
  if (!scored.ok()) return Refused(scored.status());
  if (metrics_) metrics_->RecordRoute(scored->route.route);
  const CompletionScores& scores = scored->scores;
  for (size_t i = 0; i < completions.size(); ++i) {
    pb::CompletionScore* s = response->add_scores();
    s->set_completion(completions[i]);
    if (i < scores.log_likelihood.size()) s->set_log_likelihood(scores.log_likelihood[i]);
    if (i < scores.tokens.size()) s->set_tokens(scores.tokens[i]);
  }
  response->set_best(scores.best);
  response->set_weights_version(scored->version);
  response->set_route(scored->route.route);
  response->set_route_automatic(scored->route.automatic);
  response->set_route_confidence(scored->route.confidence);
  return grpc::Status::OK;
}

grpc::Status InferenceServiceImpl::Tokenize(grpc::ServerContext* context, const pb::TokenizeRequest* request,
                                            pb::TokenizeResponse* response) {
  if (auto st = Authorize(auth_, *context); !st.ok()) return st;
  const Tokenizer& tokenizer = engine_->tokenizer();
  for (int32_t id : tokenizer.Encode(request->text(), request->add_special_tokens())) {
    response->add_ids(id);
    response->add_tokens(TokenDisplayText(tokenizer, id));
  }
  response->set_weights_version(engine_->Current()->version);
  return grpc::Status::OK;
}

}  // namespace strata
