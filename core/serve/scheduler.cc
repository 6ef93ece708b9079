#include "core/serve/scheduler.h"

#include <c10/core/impl/VirtualGuardImpl.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include <chrono>
#include <future>
#include <map>
#include <utility>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "core/data/encode.h"
#include "core/model/decode_batch.h"
#include "core/model/model.h"
#include "core/model/runtime.h"
#include "core/model/tokenizer.h"

namespace strata {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

}  // namespace

// ---- GenerationStream ------------------------------------------------------------------------------

std::vector<StreamEvent> GenerationStream::Next(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto available = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !events_.empty(); };
  mu_.AwaitWithTimeout(absl::Condition(&available), timeout);
  std::vector<StreamEvent> out(std::make_move_iterator(events_.begin()),
                               std::make_move_iterator(events_.end()));
  events_.clear();
  return out;
}

void GenerationStream::Push(StreamEvent event) {
  absl::MutexLock lock(&mu_);
  events_.push_back(std::move(event));
}

// ---- DecodeScheduler -------------------------------------------------------------------------------

struct DecodeScheduler::Pending {
  GenerationRequest request;
  std::vector<int32_t> ids;
  std::shared_ptr<GenerationStream> stream;
  Clock::time_point submitted;
};

// A row in a decode batch and the stream it reports to.
struct DecodeScheduler::Running {
  DecodeBatch* batch = nullptr;
  int64_t id = 0;
  std::shared_ptr<GenerationStream> stream;
};

DecodeScheduler::DecodeScheduler(const Engine* engine, SchedulerOptions options, StepObserver on_step)
    : engine_(engine), options_(options), on_step_(std::move(on_step)) {
  thread_ = std::thread([this] { Loop(); });
}

DecodeScheduler::~DecodeScheduler() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  thread_.join();
}

absl::Status DecodeScheduler::CheckPromptLength(int64_t tokens, const std::string& field) const {
  const int64_t positions = engine_->Current()->model->config().max_position_embeddings;
  const int64_t limit =
      options_.max_prompt_tokens > 0 ? std::min(options_.max_prompt_tokens, positions) : positions;
  if (tokens > limit) {
    absl::Status st = absl::InvalidArgumentError(
        absl::StrCat(field, ": ", tokens, " tokens, more than this server's limit of ", limit,
                     options_.max_prompt_tokens > 0 && options_.max_prompt_tokens < positions
                         ? " (--max_prompt_tokens)"
                         : " (the model's positions)"));
    st.SetPayload(kRefusalReasonPayload, absl::Cord("prompt_too_long"));
    return st;
  }
  return absl::OkStatus();
}

absl::Status DecodeScheduler::CheckRoomLocked() const {
  if (stop_) return absl::UnavailableError("the server is shutting down");
  const int64_t waiting = static_cast<int64_t>(waiting_.size() + exclusive_.size());
  if (waiting >= options_.max_waiting_requests) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the server is busy: ", running_, " requests running and ", waiting,
                     " waiting (--max_waiting_requests ", options_.max_waiting_requests, "); retry later"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<GenerationStream>> DecodeScheduler::Submit(GenerationRequest request) {
  if (absl::Status st = ValidateSamplingOptions(request.sampling); !st.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("sampling: ", st.message()));
  }
  auto pending = std::make_shared<Pending>();
  pending->submitted = Clock::now();
  pending->ids = EncodePrompt(engine_->tokenizer(), request.prompt);
  if (pending->ids.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(request.prompt_field, ": no tokens (the prompt is empty)"));
  }
  if (absl::Status st = CheckPromptLength(static_cast<int64_t>(pending->ids.size()), request.prompt_field);
      !st.ok()) {
    return st;
  }
  pending->request = std::move(request);
  pending->stream = std::make_shared<GenerationStream>();
  absl::MutexLock lock(&mu_);
  if (absl::Status st = CheckRoomLocked(); !st.ok()) return st;
  waiting_.push_back(pending);
  return pending->stream;
}

absl::StatusOr<ScoreOutcome> DecodeScheduler::Score(const std::string& route, const std::string& prompt,
                                                    const std::vector<std::string>& completions) {
  if (static_cast<int64_t>(completions.size()) > options_.max_score_completions) {
    return absl::InvalidArgumentError(absl::StrCat("completions: ", completions.size(), " given, at most ",
                                                   options_.max_score_completions,
                                                   " per request (--max_score_completions)"));
  }
  auto ids = std::make_shared<std::vector<int32_t>>(EncodePrompt(engine_->tokenizer(), prompt));
  if (absl::Status st = CheckPromptLength(static_cast<int64_t>(ids->size()), "prompt"); !st.ok()) return st;
  auto result = std::make_shared<std::promise<absl::StatusOr<ScoreOutcome>>>();
  std::future<absl::StatusOr<ScoreOutcome>> done = result->get_future();
  auto job = [this, route, prompt, completions, ids, result] {
    ScoreOutcome out;
    const std::shared_ptr<const ServedVersion> version = engine_->Current();
    out.version = version->version;
    auto choices = engine_->ResolveBatch(*version, route, {prompt});
    if (!choices.ok()) {
      result->set_value(choices.status());
      return;
    }
    out.route = choices->front();
    auto scores = engine_->ScoreCompletions(*out.route.model, prompt, completions, ids.get());
    if (!scores.ok()) {
      result->set_value(scores.status());
      return;
    }
    out.scores = std::move(scores).value();
    result->set_value(std::move(out));
  };
  {
    absl::MutexLock lock(&mu_);
    if (absl::Status st = CheckRoomLocked(); !st.ok()) return st;
    exclusive_.push_back(std::move(job));
  }
  return done.get();
}

DecodeScheduler::Stats DecodeScheduler::stats() const {
  absl::MutexLock lock(&mu_);
  Stats s;
  s.running = running_;
  s.waiting = static_cast<int64_t>(waiting_.size() + exclusive_.size());
  return s;
}

void DecodeScheduler::Loop() {
  SetTorchThreads(options_.serving_threads);
  const at::Device device = engine_->Current()->model->device();
  if (device.is_cuda()) {
    // Serving kernels go to a high-priority stream of their own (streams are per thread), so a
    // training step queued on the default stream does not hold decode steps back.
    try {
      c10::impl::VirtualGuardImpl cuda(c10::DeviceType::CUDA);
      cuda.exchangeStream(cuda.getStreamFromGlobalPool(device, /*isHighPriority=*/true));
      spdlog::info("decode scheduler: high-priority CUDA stream on {}", device.str());
    } catch (const c10::Error& e) {
      spdlog::warn("decode scheduler: no separate CUDA stream ({}); serving shares the default stream",
                   e.what_without_backtrace());
    }
  }
  std::shared_ptr<const Tokenizer> tokenizer(&engine_->tokenizer(), [](const Tokenizer*) {});
  // One decode batch per weights object (W0 for base and task routes, each version's merged model).
  std::map<const CausalLM*, std::unique_ptr<DecodeBatch>> batches;
  std::map<int64_t, Running> rows;  // by a scheduler-wide key
  int64_t next_key = 1;

  auto fail = [](const std::shared_ptr<GenerationStream>& stream, const absl::Status& status,
                 double seconds) {
    StreamEvent e;
    e.kind = StreamEvent::Kind::kDone;
    e.status = status;
    e.seconds = seconds;
    stream->Push(std::move(e));
  };

  // Routes the admitted requests on the current version and adds them to their batches.
  auto admit = [&](std::vector<std::shared_ptr<Pending>> admitted) {
    const std::shared_ptr<const ServedVersion> version = engine_->Current();
    std::map<std::string, std::vector<std::shared_ptr<Pending>>> by_route;
    for (auto& p : admitted) {
      if (p->stream->cancelled()) {
        fail(p->stream, absl::CancelledError("cancelled while waiting"), Since(p->submitted));
        continue;
      }
      by_route[p->request.route].push_back(std::move(p));
    }
    for (auto& [route, group] : by_route) {
      std::vector<std::string> prompts;
      for (const auto& p : group) prompts.push_back(p->request.prompt);
      auto choices = engine_->ResolveBatch(*version, route, prompts);
      for (size_t i = 0; i < group.size(); ++i) {
        const std::shared_ptr<Pending>& p = group[i];
        if (!choices.ok()) {
          fail(p->stream, choices.status(), Since(p->submitted));
          continue;
        }
        const RouteChoice& choice = (*choices)[i];
        std::unique_ptr<DecodeBatch>& batch = batches[choice.weights.get()];
        if (!batch) batch = std::make_unique<DecodeBatch>(choice.weights, tokenizer);
        const int64_t key = next_key++;
        const std::shared_ptr<GenerationStream> stream = p->stream;
        const Clock::time_point submitted = p->submitted;
        DecodeRow row;
        row.prompt = p->ids;
        row.sampling = p->request.sampling;
        if (choice.model != choice.weights) row.route_model = choice.model;
        row.on_token = [stream, submitted](int32_t id, const std::string& delta,
                                           const TokenLogprob* logprob) {
          StreamEvent e;
          e.kind = StreamEvent::Kind::kToken;
          e.token_id = id;
          e.text = delta;
          if (logprob != nullptr) {
            e.has_logprob = true;
            e.logprob = *logprob;
          }
          e.seconds = Since(submitted);
          stream->Push(std::move(e));
          return !stream->cancelled();
        };
        row.on_done = [stream, submitted, key, &rows](absl::StatusOr<GenerationResult> r) {
          StreamEvent e;
          e.kind = StreamEvent::Kind::kDone;
          e.seconds = Since(submitted);
          if (r.ok()) {
            e.result = std::move(r).value();
          } else {
            e.status = r.status();
          }
          stream->Push(std::move(e));
          rows.erase(key);
        };
        auto id = batch->Add(std::move(row));
        if (!id.ok()) {
          fail(stream, id.status(), Since(submitted));
          continue;
        }
        StreamEvent started;
        started.kind = StreamEvent::Kind::kStarted;
        started.route = choice;
        started.version = version->version;
        started.prompt_tokens = static_cast<int64_t>(p->ids.size());
        started.seconds = Since(submitted);
        stream->Push(std::move(started));
        rows[key] = Running{batch.get(), *id, stream};
      }
    }
  };

  while (true) {
    std::vector<std::shared_ptr<Pending>> admitted;
    std::deque<std::function<void()>> jobs;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stop_ || !exclusive_.empty() || running_ > 0 || !waiting_.empty();
      };
      mu_.Await(absl::Condition(&ready));
      if (stop_) break;
      jobs.swap(exclusive_);
      while (!waiting_.empty() &&
             running_ + static_cast<int64_t>(admitted.size()) < options_.max_batch_size) {
        admitted.push_back(std::move(waiting_.front()));
        waiting_.pop_front();
      }
      running_ += static_cast<int64_t>(admitted.size());  // counted as running from now on
    }
    for (auto& job : jobs) job();
    if (!admitted.empty()) admit(std::move(admitted));
    for (auto& [key, row] : rows) {
      if (row.stream->cancelled()) row.batch->Cancel(row.id);
    }
    for (auto it = batches.begin(); it != batches.end();) {
      DecodeBatch& batch = *it->second;
      if (!batch.empty()) {
        if (absl::Status st = batch.Step(); !st.ok()) {
          spdlog::error("decode step failed: {}", st.ToString());
        } else if (on_step_) {
          on_step_(batch.last_step_rows());
        }
      }
      it = batch.empty() ? batches.erase(it) : std::next(it);
    }
    absl::MutexLock lock(&mu_);
    running_ = static_cast<int64_t>(rows.size());
  }

  // Shutting down: whatever is left ends with UNAVAILABLE.
  const absl::Status gone = absl::UnavailableError("the server is shutting down");
  for (auto& [key, row] : rows) fail(row.stream, gone, 0);
  rows.clear();
  std::deque<std::shared_ptr<Pending>> waiting;
  std::deque<std::function<void()>> jobs;
  {
    absl::MutexLock lock(&mu_);
    waiting.swap(waiting_);
    jobs.swap(exclusive_);
  }
  for (auto& p : waiting) fail(p->stream, gone, Since(p->submitted));
  // Score jobs still queued run now so their callers are answered (the engine outlives us).
  for (auto& job : jobs) job();
}

}  // namespace strata
