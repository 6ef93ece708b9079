#pragma once
// The decode scheduler: the one thread that runs the server's inference forward passes.
//
// Requests (Submit) wait in a bounded queue and join the running batch at the next step; each step
// decodes one token for every running request, so throughput grows with concurrent users instead
// of each request decoding alone. Requests are routed when they join (a batch of newly admitted
// "auto" prompts shares one router feature pass) on the version current at that moment; rows
// whose routes share the same weights (the base model W0 under "base" and every task route) run in
// one DecodeBatch, each task row with its own low-rank side path; "merged" rows of a version run on
// that version's merged weights. A publish never changes a running row: it finishes on the version
// it started on, new rows start on the new one, and every event names the row's version.
//
// Score requests run on the same thread between decode steps (one batched forward over the
// completions on the prompt's cache), so serving work never competes with itself for cores, and
// the training worker keeps the cores it was given: this thread sets its own intra-op budget
// (serving_threads) and nothing else in the serving path runs LibTorch.
//
// Admission: at most max_batch_size rows decode together; up to max_waiting_requests more wait
// (Submit and Score return RESOURCE_EXHAUSTED beyond that, saying so); prompts longer than
// max_prompt_tokens are refused (INVALID_ARGUMENT) before they queue.
//
// Thread safety: Submit, Score, stats and the stream methods are safe from any thread.

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/model/generate.h"
#include "core/state/engine.h"

namespace strata {

struct SchedulerOptions {
  int max_batch_size = 32;         // rows decoded together, over every route
  int max_waiting_requests = 256;  // queued requests (Generate and Score) beyond the running rows
  int64_t max_prompt_tokens = 0;   // 0 = the model's max_position_embeddings
  int64_t max_score_completions = 64;
  int serving_threads = 1;  // intra-op threads of the scheduler thread
};

// What a generation stream reports, in order: kStarted once (route and version), kToken per
// generated token (text may be empty while a character or a possible stop string is incomplete;
// token_id -1 carries held-back text at the end), kDone once (the result, or the error).
struct StreamEvent {
  enum class Kind { kStarted, kToken, kDone };
  Kind kind = Kind::kToken;
  double seconds = 0;  // since Submit
  // kStarted
  RouteChoice route;
  int64_t version = 0;
  int64_t prompt_tokens = 0;
  // kToken
  int32_t token_id = -1;
  std::string text;
  bool has_logprob = false;  // the request asked for logprobs (and token_id >= 0)
  TokenLogprob logprob;
  // kDone
  absl::Status status;
  GenerationResult result;
};

// One request's event stream, shared by the scheduler (writer) and the caller (reader).
class GenerationStream {
 public:
  // Waits up to `timeout` for events and returns those available (empty on timeout).
  std::vector<StreamEvent> Next(absl::Duration timeout);
  // The caller gave up (client gone, deadline passed): the row leaves the batch at the next step
  // (or never joins), freeing its slot.
  void Cancel() { cancelled_.store(true); }
  bool cancelled() const { return cancelled_.load(); }

 private:
  friend class DecodeScheduler;
  void Push(StreamEvent event);
  absl::Mutex mu_;
  std::deque<StreamEvent> events_ ABSL_GUARDED_BY(mu_);
  std::atomic<bool> cancelled_{false};
};

// A refusal's reason for metrics rides on the status as a payload under this key (value
// "prompt_too_long"), so callers classify it without parsing the message.
inline constexpr char kRefusalReasonPayload[] = "strata.dev/refusal-reason";

struct GenerationRequest {
  std::string prompt;
  std::string route = "auto";  // as Engine::Resolve
  SamplingOptions sampling;
  // The request field the prompt came from, as errors about it name it ("prompt[2]" for the third
  // prompt of an HTTP batch).
  std::string prompt_field = "prompt";
};

struct ScoreOutcome {
  RouteChoice route;
  int64_t version = 0;
  CompletionScores scores;
};

class DecodeScheduler {
 public:
  struct Stats {
    int64_t running = 0;  // rows in decode batches
    int64_t waiting = 0;  // requests queued (Generate and Score)
  };
  // Called on the scheduler thread after each decode step with the rows it decoded (batch size).
  using StepObserver = std::function<void(int64_t rows)>;

  // Starts the scheduler thread. `engine` must outlive the scheduler.
  DecodeScheduler(const Engine* engine, SchedulerOptions options, StepObserver on_step = nullptr);
  // Stops the thread; requests still queued or running end with UNAVAILABLE.
  ~DecodeScheduler();

  // Tokenises and checks the request (INVALID_ARGUMENT naming the field: sampling options, an
  // empty or too long prompt), then queues it (RESOURCE_EXHAUSTED when max_waiting_requests are
  // already waiting). The stream reports its route and tokens as the scheduler runs it; a route
  // that cannot be served (an unknown task) ends it with kDone and that error.
  absl::StatusOr<std::shared_ptr<GenerationStream>> Submit(GenerationRequest request);

  // Log-likelihoods of `completions` after `prompt` on `route` (Engine::ScoreCompletions), run on
  // the scheduler thread between steps; blocks until done. Same admission as Submit, and at most
  // max_score_completions completions.
  absl::StatusOr<ScoreOutcome> Score(const std::string& route, const std::string& prompt,
                                     const std::vector<std::string>& completions);

  Stats stats() const;
  const SchedulerOptions& options() const { return options_; }

 private:
  struct Pending;
  struct Running;
  void Loop();
  absl::Status CheckPromptLength(int64_t tokens, const std::string& field) const;
  // UNAVAILABLE while stopping, RESOURCE_EXHAUSTED when max_waiting_requests are waiting.
  absl::Status CheckRoomLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Engine* engine_;
  const SchedulerOptions options_;
  StepObserver on_step_;

  mutable absl::Mutex mu_;
  std::deque<std::shared_ptr<Pending>> waiting_ ABSL_GUARDED_BY(mu_);
  std::deque<std::function<void()>> exclusive_ ABSL_GUARDED_BY(mu_);  // Score jobs
  int64_t running_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace strata
