#pragma once
// Prometheus metrics of the server: the registry, the /metrics HTTP exposer, build info, standard
// process figures, RED metrics for every RPC (through a gRPC server interceptor), generation
// figures, and the state of the service:
//   jobs and training   strata_jobs{state}, strata_jobs_finished_total{state}, strata_queue_length,
//                       strata_job_journal_quarantined_total,
//                       strata_training_loss,
//                       strata_training_tokens_per_second (read from the job store at scrape time;
//                       the training figures only while a job is in state training: absent, not
//                       the last job's values, when idle or evaluating)
//   served weights      strata_weights_version, strata_weights_info{version} (= 1),
//                       strata_candidate_versions, strata_gate_rejections_total{reason} (from the
//                       journal's held jobs: forgetting, min_task_score, reference_rise)
//   continual learning  strata_task_score{task,view}, strata_task_forgetting{task,view},
//                       strata_average_score{view}, strata_backward_transfer{view},
//                       strata_forward_transfer{view} (each only once defined),
//                       strata_reference_nll{view} (latest stage), strata_router_accuracy{task},
//                       strata_tasks_learned, strata_adaptation_state_bytes, strata_router_bytes
//                       (a snapshot refreshed by RefreshModelFigures: at start and on publish).
//                       view: "merged" (the merged weights), "routed" (each task served by its
//                       name), "auto" (routed automatically: what a request naming no task gets)
//   routing             strata_route_requests_total{route} (Generate and Score requests by the
//                       route taken: base, merged or a task name)
//   serving             (vLLM's names, prefixed strata_) strata_num_requests_running,
//                       strata_num_requests_waiting (the decode scheduler, at scrape time),
//                       strata_time_to_first_token_seconds, strata_time_per_output_token_seconds
//                       (inter-token latency), strata_e2e_request_latency_seconds,
//                       strata_prompt_tokens_total, strata_generation_tokens_total,
//                       strata_batch_size (rows per decode step),
//                       strata_requests_rejected_total{reason} (queue_full, prompt_too_long)
//
// Thread safety: all members are safe to use from any thread after construction. The snapshot has
// its own mutex, never held while calling the engine or the job store.

#include <grpcpp/support/server_interceptor.h>
#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/metric_family.h>
#include <prometheus/registry.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace strata {

class Engine;
class JobStore;
class DecodeScheduler;

// One finished Generate request's serving figures.
// One unlabelled gauge as a metric family, for prometheus::Collectable implementations.
prometheus::MetricFamily GaugeFamily(const std::string& name, const std::string& help, double value);
// The same for a counter whose value the caller keeps (scrape-time state).
prometheus::MetricFamily CounterFamily(const std::string& name, const std::string& help, double value);

struct GenerationFigures {
  int64_t prompt_tokens = 0;
  int64_t generation_tokens = 0;
  std::optional<double> time_to_first_token;  // none when no token was generated
  std::vector<double> inter_token_latencies;  // seconds between consecutive tokens
  double e2e_seconds = 0;                     // arrival to the last token
};

struct BuildFacts {
  std::string version, git_commit, torch_version, device, blas, allocator;
};

// What the continual-learning gauges show (NaN / nullopt values are not exported).
struct ModelFigures {
  struct View {
    std::string name;                                             // merged, routed, auto
    std::vector<std::pair<std::string, double>> task_score;       // current score per task
    std::vector<std::pair<std::string, double>> task_forgetting;  // per task
    std::optional<double> average_score, backward_transfer, forward_transfer, reference_nll;
  };
  int64_t weights_version = 0;
  std::vector<View> views;
  std::vector<std::pair<std::string, double>> router_accuracy;  // per task, latest stage
  int64_t tasks_learned = 0;
  int64_t adaptation_state_bytes = 0;
  int64_t router_bytes = 0;
};

ModelFigures CollectModelFigures(const Engine& engine);

class ServerMetrics {
 public:
  explicit ServerMetrics(const BuildFacts& facts);

  prometheus::Registry& registry() { return *registry_; }
  std::shared_ptr<prometheus::Registry> registry_ptr() { return registry_; }
  std::shared_ptr<prometheus::Collectable> process_collector() { return process_collector_; }

  // Records one finished RPC.
  void RecordRpc(const std::string& method, int grpc_code, double seconds);

  // A gRPC interceptor factory feeding RecordRpc; owned by the server builder.
  std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> MakeInterceptorFactory();

  // One finished generation.
  void RecordGeneration(const GenerationFigures& figures);
  // One decode step of the scheduler over `rows` rows.
  void RecordBatch(int64_t rows);
  // A request refused at admission: "queue_full" or "prompt_too_long".
  void RecordRejected(const std::string& reason);
  // The decode scheduler whose queue the running/waiting gauges show (not owned; may be null).
  void SetScheduler(const DecodeScheduler* scheduler) { scheduler_ = scheduler; }
  // One Generate or Score request served on `route` (base, merged or a task name).
  void RecordRoute(const std::string& route);

  // Sources of the service gauges (not owned; must outlive the exposer). Either may be null.
  void SetSources(const JobStore* jobs, const Engine* engine);
  // Re-reads the continual-learning figures from the engine (at start and after each publish).
  void RefreshModelFigures();

  // Every scrape-time family (jobs, training, weights, continual learning).
  std::shared_ptr<prometheus::Collectable> state_collector() { return state_collector_; }

 private:
  friend class StateCollector;

  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<prometheus::Collectable> process_collector_;
  std::shared_ptr<prometheus::Collectable> state_collector_;
  prometheus::Family<prometheus::Counter>* rpc_requests_;
  prometheus::Family<prometheus::Histogram>* rpc_latency_;
  prometheus::Counter* generation_tokens_;
  prometheus::Counter* prompt_tokens_;
  prometheus::Histogram* time_to_first_token_;
  prometheus::Histogram* time_per_output_token_;
  prometheus::Histogram* e2e_latency_;
  prometheus::Histogram* batch_size_;
  prometheus::Family<prometheus::Counter>* rejected_;
  std::atomic<const DecodeScheduler*> scheduler_{nullptr};
  prometheus::Family<prometheus::Counter>* route_requests_;

  std::atomic<const JobStore*> jobs_{nullptr};
  std::atomic<const Engine*> engine_{nullptr};
  mutable absl::Mutex figures_mu_;
  std::optional<ModelFigures> figures_ ABSL_GUARDED_BY(figures_mu_);
};

// Starts the HTTP exposer for /metrics on host:port. UNAVAILABLE with the reason when it cannot
// bind (port in use, bad address).
absl::StatusOr<std::unique_ptr<prometheus::Exposer>> StartMetricsExposer(const std::string& host, int port,
                                                                         ServerMetrics& metrics);

}  // namespace strata
