#pragma once
// strata.v1.AdaptationService: transport only. Converts proto <-> core types and calls the job
// store (durable queue), the worker (cancel) and the engine (tasks, report).
//
// SubmitTask validates the whole stream before anything is enqueued: the spec, every JSONL line
// and structured example of the train and eval splits (JsonlValidator with the server tokenizer
// and the per-example token limit), the size limits and the task name; then it holds out an eval
// split when none was sent and creates the job durably (JobStore::Create fsyncs). Any error leaves
// nothing behind.
//
// Thread safety: all handlers may run concurrently. submit_mu_ serialises the final
// admission check (duplicate name, queue length) with JobStore::Create so that two streams for
// the same task cannot both be accepted; it is never held while reading a stream. Lock order:
// submit_mu_, then the job store's own lock.

#include <atomic>
#include <cstdint>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "core/jobs/job.h"
#include "core/jobs/job_store.h"
#include "core/jobs/worker.h"
#include "core/state/engine.h"
#include "server/auth.h"
#include "strata/v1/adaptation.grpc.pb.h"

namespace strata {

struct SubmitLimits {
  int64_t max_examples = 100000;           // train + eval examples per task
  int64_t max_bytes = int64_t{256} << 20;  // JSONL bytes (and structured examples) per task
  int max_queue = 100;                     // queued jobs
  int64_t max_tokens = 256;                // per example, unless the spec overrides max_seq_len
};

class AdaptationServiceImpl final : public strata::v1::AdaptationService::Service {
 public:
  // Pointers are not owned and must outlive the service. `auth` may be null (no token required).
  AdaptationServiceImpl(JobStore* store, Worker* worker, Engine* engine, const BearerAuth* auth,
                        SubmitLimits limits);

  // Refuses new submissions (UNAVAILABLE) and ends every WatchJob stream. Call on shutdown, before
  // stopping the worker.
  void BeginShutdown() { shutting_down_ = true; }

  grpc::Status SubmitTask(grpc::ServerContext* context,
                          grpc::ServerReader<strata::v1::SubmitTaskRequest>* reader,
                          strata::v1::Job* response) override;
  grpc::Status GetJob(grpc::ServerContext* context, const strata::v1::GetJobRequest* request,
                      strata::v1::Job* response) override;
  grpc::Status ListJobs(grpc::ServerContext* context, const strata::v1::ListJobsRequest* request,
                        strata::v1::ListJobsResponse* response) override;
  grpc::Status WatchJob(grpc::ServerContext* context, const strata::v1::WatchJobRequest* request,
                        grpc::ServerWriter<strata::v1::JobEvent>* writer) override;
  grpc::Status CancelJob(grpc::ServerContext* context, const strata::v1::CancelJobRequest* request,
                         strata::v1::Job* response) override;
  grpc::Status ListTasks(grpc::ServerContext* context, const strata::v1::ListTasksRequest* request,
                         strata::v1::ListTasksResponse* response) override;
  grpc::Status GetTask(grpc::ServerContext* context, const strata::v1::GetTaskRequest* request,
                       strata::v1::Task* response) override;
  grpc::Status GetReport(grpc::ServerContext* context, const strata::v1::GetReportRequest* request,
                         strata::v1::Report* response) override;

  // Admits and durably queues a job (SubmitTask's last step; AdminService.ImportAdapters queues
  // adapter imports through it): the admission checks under submit_mu_, then JobStore::Create.
  // UNAVAILABLE while shutting down.
  absl::StatusOr<JobRecord> QueueJob(const TaskSpecification& spec, const std::vector<Example>& train,
                                     const std::vector<Example>& eval);

 private:
  // ALREADY_EXISTS when the task is learned or has a queued/running job; RESOURCE_EXHAUSTED when
  // the queue is full.
  absl::Status CheckAdmission(const TaskSpecification& spec) const;
  void ToProto(const JobRecord& job, strata::v1::Job* out) const;

  JobStore* store_;
  Worker* worker_;
  Engine* engine_;
  const BearerAuth* auth_;
  const SubmitLimits limits_;
  std::atomic<bool> shutting_down_{false};
  absl::Mutex submit_mu_;
};

}  // namespace strata
