#include "server/adaptation_service.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "core/data/dataset.h"
#include "core/data/jsonl.h"
#include "core/util/status_macros.h"
#include "nlohmann/json.hpp"
#include "server/status_util.h"
#include "server/submit_request.h"
#include "strata/v1/scorer_names.h"

namespace strata {
namespace {

namespace pb = strata::v1;

constexpr int kDefaultPageSize = 50;
constexpr int kMaxPageSize = 500;

pb::JobState StateToProto(JobState s) {
  switch (s) {
    case JobState::kQueued:
      return pb::JOB_STATE_QUEUED;
    case JobState::kTraining:
      return pb::JOB_STATE_TRAINING;
    case JobState::kEvaluating:
      return pb::JOB_STATE_EVALUATING;
    case JobState::kSucceeded:
      return pb::JOB_STATE_SUCCEEDED;
    case JobState::kFailed:
      return pb::JOB_STATE_FAILED;
    case JobState::kCancelled:
      return pb::JOB_STATE_CANCELLED;
    case JobState::kHeld:
      return pb::JOB_STATE_HELD;
    case JobState::kRolledBack:
      return pb::JOB_STATE_ROLLED_BACK;
  }
  return pb::JOB_STATE_UNSPECIFIED;
}

std::optional<JobState> StateFromProto(pb::JobState s) {
  switch (s) {
    case pb::JOB_STATE_QUEUED:
      return JobState::kQueued;
    case pb::JOB_STATE_TRAINING:
      return JobState::kTraining;
    case pb::JOB_STATE_EVALUATING:
      return JobState::kEvaluating;
    case pb::JOB_STATE_SUCCEEDED:
      return JobState::kSucceeded;
    case pb::JOB_STATE_FAILED:
      return JobState::kFailed;
    case pb::JOB_STATE_CANCELLED:
      return JobState::kCancelled;
    case pb::JOB_STATE_HELD:
      return JobState::kHeld;
    case pb::JOB_STATE_ROLLED_BACK:
      return JobState::kRolledBack;
    default:
      return std::nullopt;
  }
}

void SetTimestamp(double unix_seconds, google::protobuf::Timestamp* ts) {
  double whole = std::floor(unix_seconds);
  ts->set_seconds(static_cast<int64_t>(whole));
  ts->set_nanos(static_cast<int32_t>(std::min(999999999.0, (unix_seconds - whole) * 1e9)));
}

bool IsTextKind(const std::optional<ExampleKind>& k) { return k.has_value() && *k == ExampleKind::kText; }

double FiniteOr(double v, double fallback) { return std::isfinite(v) ? v : fallback; }

}  // namespace

AdaptationServiceImpl::AdaptationServiceImpl(JobStore* store, Worker* worker, Engine* engine,
                                             const BearerAuth* auth, SubmitLimits limits)
    : store_(store), worker_(worker), engine_(engine), auth_(auth), limits_(limits) {}

void AdaptationServiceImpl::ToProto(const JobRecord& job, pb::Job* out) const {
  out->set_id(job.id);
  out->set_task_name(job.spec.name);
  out->set_method(job.spec.method.empty() ? engine_->method() : job.spec.method);
  out->set_state(StateToProto(job.state));
  if (job.created > 0) SetTimestamp(job.created, out->mutable_created());
  if (job.started > 0) SetTimestamp(job.started, out->mutable_started());
  if (job.finished > 0) SetTimestamp(job.finished, out->mutable_finished());
  out->set_train_examples(job.train_examples);
  out->set_eval_examples(job.eval_examples);
  pb::Progress* p = out->mutable_progress();
  p->set_step(job.progress.step);
  p->set_total_steps(job.progress.total_steps);
  p->set_epoch(job.progress.epoch);
  p->set_loss(job.progress.loss);
  p->set_learning_rate(job.progress.learning_rate);
  p->set_tokens_per_second(job.progress.tokens_per_second);
  p->set_eta_seconds(job.progress.eta_seconds);
  out->set_error(job.error);
  for (const auto& [task, score] : job.eval_results) {
    pb::TaskScore* ts = out->add_eval_results();
    ts->set_task(task);
    ts->set_score(score);
  }
  out->set_weights_version(job.weights_version);
  out->set_queue_position(job.state == JobState::kQueued ? store_->QueuePosition(job.id) : 0);
  out->set_reference_nll(job.reference_nll);
  out->set_attempts(job.attempts);
  for (const auto& r : job.hold_reasons) out->add_hold_reasons(r);
  if (job.spec.min_score.has_value()) out->set_min_score(*job.spec.min_score);
}

absl::Status AdaptationServiceImpl::CheckAdmission(const TaskSpecification& spec) const {
  if (engine_->TaskIsLearned(spec.name)) {
    return absl::AlreadyExistsError(
        absl::StrCat("task '", spec.name, "' is already learned; submit it under another name"));
  }
  if (auto active = store_->ActiveJobForTask(spec.name)) {
    return absl::AlreadyExistsError(absl::StrCat("task '", spec.name, "' is already ",
                                                 JobStateName(active->state), " as job ", active->id));
  }
  if (int queued = store_->QueuedCount(); queued >= limits_.max_queue) {
    return absl::ResourceExhaustedError(absl::StrCat("the queue is full (", queued,
                                                     " jobs queued, --max_queue=", limits_.max_queue,
                                                     "); try again when a job has finished"));
  }
  return absl::OkStatus();
}

absl::StatusOr<JobRecord> AdaptationServiceImpl::QueueJob(const TaskSpecification& spec,
                                                          const std::vector<Example>& train,
                                                          const std::vector<Example>& eval) {
  absl::MutexLock lock(&submit_mu_);
  if (shutting_down_) return absl::UnavailableError("the server is shutting down");
  RETURN_IF_ERROR(CheckAdmission(spec));
  return store_->Create(spec, train, eval);
}

grpc::Status AdaptationServiceImpl::SubmitTask(grpc::ServerContext* context,
                                               grpc::ServerReader<pb::SubmitTaskRequest>* reader,
                                               pb::Job* response) {
  if (auto st = Authorize(auth_, *context); !st.ok()) return st;
  if (shutting_down_) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down");
  pb::SubmitTaskRequest request;
  if (!reader->Read(&request)) {
    return ToGrpcStatus(absl::InvalidArgumentError("empty stream: the first message must carry spec"));
  }
  if (request.payload_case() != pb::SubmitTaskRequest::kSpec) {
    return ToGrpcStatus(
        absl::InvalidArgumentError("the first message must carry spec (then train / eval chunks follow)"));
  }
  if (!pb::Scorer_IsValid(request.spec().scorer())) {
    return ToGrpcStatus(absl::InvalidArgumentError(absl::StrCat(
        "spec.scorer: unknown value ", request.spec().scorer(), " (choice, exact_match, nll or unset)")));
  }
  TaskSpecification spec = SpecFromProto(request.spec());
  if (auto st = ValidateTaskSpecification(spec); !st.ok()) return ToGrpcStatus(st);
  // Everything the job would check against the state (method, fixed rank/alpha, values), before
  // any data is read and long before a job id exists.
  if (auto recipe = engine_->CheckTask(spec); !recipe.ok()) {
    const absl::Status& st = recipe.status();
    return ToGrpcStatus(absl::Status(st.code(), absl::StrCat("spec: ", st.message())));
  }
  // Refuse early (before reading megabytes) what would be refused at the end anyway.
  if (auto st = CheckAdmission(spec); !st.ok()) return ToGrpcStatus(st);

  ValidationOptions vo;
  vo.tokenizer = &engine_->tokenizer();
  vo.max_tokens = spec.overrides.max_seq_len.value_or(static_cast<int32_t>(limits_.max_tokens));
  // Line errors name each split as the client called it (its file), else train.jsonl / eval.jsonl.
  SplitIngest train(SplitSourceName(request.spec().train_source(), "train.jsonl"), vo);
  SplitIngest eval(SplitSourceName(request.spec().eval_source(), "eval.jsonl"), vo);
  int64_t bytes = 0;
  while (reader->Read(&request)) {
    switch (request.payload_case()) {
      case pb::SubmitTaskRequest::kTrain:
        bytes += train.Add(request.train());
        break;
      case pb::SubmitTaskRequest::kEval:
        bytes += eval.Add(request.eval());
        break;
      case pb::SubmitTaskRequest::kSpec:
        return ToGrpcStatus(absl::InvalidArgumentError("spec may only be sent once, in the first message"));
      default:
        return ToGrpcStatus(absl::InvalidArgumentError("a message carries neither spec, train nor eval"));
    }
    if (bytes > limits_.max_bytes) {
      return ToGrpcStatus(absl::ResourceExhaustedError(absl::StrCat(
          "task '", spec.name, "': more than ", limits_.max_bytes, " bytes of data (--max_task_bytes)")));
    }
    if (train.lines() + eval.lines() > limits_.max_examples) {
      return ToGrpcStatus(absl::ResourceExhaustedError(absl::StrCat(
          "task '", spec.name, "': more than ", limits_.max_examples, " examples (--max_task_examples)")));
    }
  }
  if (context->IsCancelled())
    return grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled the upload");
  if (!train.received()) {
    return ToGrpcStatus(absl::InvalidArgumentError(absl::StrCat("task '", spec.name, "': no training data")));
  }
  absl::Status train_status = train.validator().Finish();
  absl::Status eval_status = eval.received() ? eval.validator().Finish() : absl::OkStatus();
  if (!train_status.ok() || !eval_status.ok()) {
    std::string msg;
    if (!train_status.ok()) msg = std::string(train_status.message());
    if (!eval_status.ok()) absl::StrAppend(&msg, msg.empty() ? "" : "\n", eval_status.message());
    return ToGrpcStatus(absl::InvalidArgumentError(msg));
  }
  // The limits again, now that a final line without "\n" has been counted too.
  if (train.lines() + eval.lines() > limits_.max_examples) {
    return ToGrpcStatus(absl::ResourceExhaustedError(absl::StrCat(
        "task '", spec.name, "': more than ", limits_.max_examples, " examples (--max_task_examples)")));
  }
  if (eval.received() &&
      IsTextKind(train.validator().summary().kind) != IsTextKind(eval.validator().summary().kind)) {
    return ToGrpcStatus(absl::InvalidArgumentError(
        absl::StrCat("task '", spec.name, "': the training examples are ",
                     std::string(ExampleKindName(*train.validator().summary().kind)),
                     " examples but the eval examples are ",
                     std::string(ExampleKindName(*eval.validator().summary().kind)),
                     " examples (plain text and prompt/completion data cannot be mixed)")));
  }
  std::vector<Example> train_examples = train.validator().TakeExamples();
  std::vector<Example> eval_examples = eval.validator().TakeExamples();

  if (!eval.received()) {
    auto held_out = HoldOutEval(&train_examples, spec.eval_fraction, spec.eval_cap,
                                static_cast<uint64_t>(spec.overrides.seed.value_or(0)), spec.name);
    if (!held_out.ok()) return ToGrpcStatus(held_out.status());
    eval_examples = std::move(*held_out);
  }

  absl::StatusOr<JobRecord> job = QueueJob(spec, train_examples, eval_examples);
  if (!job.ok()) return ToGrpcStatus(job.status());
  spdlog::info("job {}: task '{}' queued ({} train / {} eval examples, {} bytes)", job->id, spec.name,
               job->train_examples, job->eval_examples, bytes);
  ToProto(*job, response);
  return grpc::Status::OK;
}

grpc::Status AdaptationServiceImpl::GetJob(grpc::ServerContext* context, const pb::GetJobRequest* request,
                                           pb::Job* response) {
  if (auto st = Authorize(auth_, *context); !st.ok()) return st;
  auto job = store_->Get(request->id());
  if (!job.ok()) return ToGrpcStatus(job.status());
  ToProto(*job, response);
  return grpc::Status::OK;
}

grpc::Status AdaptationServiceImpl::ListJobs(grpc::ServerContext* context, const pb::ListJobsRequest* request,
                                             pb::ListJobsResponse* response) {
  if (auto st = Authorize(auth_, *context); !st.ok()) return st;
  if (request->page_size() < 0) {
    return ToGrpcStatus(absl::InvalidArgumentError("page_size: must be >= 0"));
  }
  const int page_size =
      request->page_size() == 0 ? kDefaultPageSize : std::min(request->page_size(), kMaxPageSize);
  // The token is the sequence number of the last job of the previous page (jobs are newest first).
  int64_t before = INT64_MAX;
  if (!request->page_token().empty() && (!absl::SimpleAtoi(request->page_token(), &before) || before <= 0)) {
    return ToGrpcStatus(absl::InvalidArgumentError(
        absl::StrCat("page_token: '", request->page_token(), "' is not a token from ListJobs")));
  }
  std::optional<JobState> filter;
  if (request->state() != pb::JOB_STATE_UNSPECIFIED) {
    filter = StateFromProto(request->state());
    if (!filter) return ToGrpcStatus(absl::InvalidArgumentError("state: unknown job state"));
  }
  std::vector<JobRecord> jobs = store_->List();
  int64_t last = 0;
  bool more = false;
  for (const JobRecord& job : jobs) {
    if (job.sequence >= before) continue;
    if (filter && job.state != *filter) continue;
    if (response->jobs_size() == page_size) {
      more = true;
      break;
    }
    ToProto(job, response->add_jobs());
    last = job.sequence;
  }
  if (more) response->set_next_page_token(absl::StrCat(last));
  return grpc::Status::OK;
}

grpc::Status AdaptationServiceImpl::WatchJob(grpc::ServerContext* context, const pb::WatchJobRequest* request,
                                             grpc::ServerWriter<pb::JobEvent>* writer) {
  if (auto st = Authorize(auth_, *context); !st.ok()) return st;
  if (auto job = store_->Get(request->id()); !job.ok()) return ToGrpcStatus(job.status());
  int64_t seen = 0;  // change counters start at 1: the first wait returns the job at once
  std::optional<JobRecord> previous;
  while (true) {
    if (context->IsCancelled())
      return grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled the watch");
    if (shutting_down_) {
      return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                          "the server is shutting down; watch the job again later");
    }
    JobRecord job;
    if (!store_->WaitForChange(request->id(), &seen, absl::Milliseconds(250), &job)) continue;
    pb::JobEvent event;
    if (!previous) {
      event.set_kind(pb::JobEvent::KIND_SNAPSHOT);
    } else if (job.state == JobState::kSucceeded) {
      event.set_kind(pb::JobEvent::KIND_EVAL);
    } else if (job.state != previous->state) {
      event.set_kind(pb::JobEvent::KIND_STATE);
    } else {
      event.set_kind(pb::JobEvent::KIND_PROGRESS);
    }
    ToProto(job, event.mutable_job());
    if (!writer->Write(event)) return grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
    if (IsTerminal(job.state)) return grpc::Status::OK;
    previous = std::move(job);
  }
}

grpc::Status AdaptationServiceImpl::CancelJob(grpc::ServerContext* context,
                                              const pb::CancelJobRequest* request, pb::Job* response) {
  if (auto st = Authorize(auth_, *context); !st.ok()) return st;
  auto job = worker_->Cancel(request->id());
  if (!job.ok()) return ToGrpcStatus(job.status());
  ToProto(*job, response);
  return grpc::Status::OK;
}

namespace {

void TaskToProto(const TaskInfo& t, pb::Task* out) {
  out->set_name(t.name);
  out->set_index(t.index);
  out->set_scorer(ScorerProtoFromName(t.scorer).value_or(pb::SCORER_UNSPECIFIED));
  out->set_method(t.method);
  out->set_base_score(t.base_score);
  out->set_learned_score(t.learned_score);
  out->set_current_score(t.current_score);
  out->set_forgetting(FiniteOr(t.forgetting, 0.0));
  for (const ScoreHistoryPoint& h : t.history) {
    pb::ScorePoint* p = out->add_history();
    p->set_stage(h.stage);
    p->set_after_task(h.after_task);
    p->set_score(h.score);
    p->set_weights_version(h.weights_version);
  }
  out->set_eval_examples(t.eval_examples);
  out->set_job_id(t.job_id);
  out->set_description(t.description);
  out->set_current_routed_score(t.current_routed_score);
  out->set_current_auto_score(t.current_auto_score);
  out->set_router_accuracy(t.router_accuracy);
}

void MatrixToProto(const std::vector<std::vector<double>>& m,
                   google::protobuf::RepeatedPtrField<pb::MatrixRow>* out) {
  for (const auto& row : m) {
    pb::MatrixRow* r = out->Add();
    for (double v : row) r->add_scores(v);
  }
}

}  // namespace

grpc::Status AdaptationServiceImpl::ListTasks(grpc::ServerContext* context, const pb::ListTasksRequest*,
                                              pb::ListTasksResponse* response) {
  if (auto st = Authorize(auth_, *context); !st.ok()) return st;
  for (const TaskInfo& t : engine_->Tasks()) TaskToProto(t, response->add_tasks());
  return grpc::Status::OK;
}

grpc::Status AdaptationServiceImpl::GetTask(grpc::ServerContext* context, const pb::GetTaskRequest* request,
                                            pb::Task* response) {
  if (auto st = Authorize(auth_, *context); !st.ok()) return st;
  auto task = engine_->Task(request->name());
  if (!task.ok()) return ToGrpcStatus(task.status());
  TaskToProto(*task, response);
  return grpc::Status::OK;
}

grpc::Status AdaptationServiceImpl::GetReport(grpc::ServerContext* context, const pb::GetReportRequest*,
                                              pb::Report* response) {
  if (auto st = Authorize(auth_, *context); !st.ok()) return st;
  EngineReport r = engine_->Report();
  for (const std::string& t : r.tasks) response->add_tasks(t);
  MatrixToProto(r.matrix, response->mutable_matrix());
  MatrixToProto(r.routed_matrix, response->mutable_routed_matrix());
  MatrixToProto(r.auto_matrix, response->mutable_auto_matrix());
  MatrixToProto(r.router_accuracy, response->mutable_router_accuracy());
  for (double v : r.reference_nll_auto) response->add_reference_nll_auto(v);
  for (double b : r.base) response->add_base(b);
  // Unset while undefined (or not a number: a failed evaluation).
  auto set_if = [](const std::optional<double>& v, auto setter) {
    if (v.has_value() && std::isfinite(*v)) setter(*v);
  };
  set_if(r.average_score, [&](double v) { response->set_average_score(v); });
  set_if(r.backward_transfer, [&](double v) { response->set_backward_transfer(v); });
  set_if(r.forward_transfer, [&](double v) { response->set_forward_transfer(v); });
  set_if(r.forgetting, [&](double v) { response->set_forgetting(v); });
  set_if(r.auto_average_score, [&](double v) { response->set_auto_average_score(v); });
  set_if(r.auto_backward_transfer, [&](double v) { response->set_auto_backward_transfer(v); });
  set_if(r.auto_forgetting, [&](double v) { response->set_auto_forgetting(v); });
  response->set_router_bytes(r.router_bytes);
  response->set_router_bytes_per_task(r.router_bytes_per_task);
  for (double v : r.reference_nll) response->add_reference_nll(v);
  response->set_method(r.method);
  response->set_weights_version(r.weights_version);
  response->set_adaptation_state_bytes(r.adaptation_state_bytes);
  for (const HeldCandidate& c : r.candidates) {
    pb::HeldCandidate* out = response->add_candidates();
    out->set_version(c.version);
    out->set_task(c.task);
    out->set_job_id(c.job_id);
    for (const auto& reason : c.reasons) out->add_reasons(reason);
  }
  return grpc::Status::OK;
}

}  // namespace strata
