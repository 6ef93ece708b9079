#include "server/metrics.h"

#include <grpcpp/support/status.h>

#include <cmath>
#include <map>
#include <mutex>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/eval/metrics.h"
#include "core/jobs/job_store.h"
#include "core/serve/scheduler.h"
#include "core/state/engine.h"
#include "core/state/gate.h"
#include "core/util/process_info.h"

namespace strata {
namespace {

const std::vector<std::string>& CodeNames() {
  static const std::vector<std::string> names = {
      "OK",        "CANCELLED",      "UNKNOWN",           "INVALID_ARGUMENT",   "DEADLINE_EXCEEDED",
      "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
      "ABORTED",   "OUT_OF_RANGE",   "UNIMPLEMENTED",     "INTERNAL",           "UNAVAILABLE",
      "DATA_LOSS", "UNAUTHENTICATED"};
  return names;
}

// Standard process_* figures (names as the official client libraries export them).
class ProcessCollector : public prometheus::Collectable {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override {
    ProcessStats s = ReadProcessStats();
    std::vector<prometheus::MetricFamily> out;
    prometheus::MetricFamily cpu;
    cpu.name = "process_cpu_seconds_total";
    cpu.help = "Total user and system CPU time spent in seconds.";
    cpu.type = prometheus::MetricType::Counter;
    prometheus::ClientMetric m;
    m.counter.value = s.cpu_seconds;
    cpu.metric.push_back(m);
    out.push_back(cpu);
    out.push_back(GaugeFamily("process_resident_memory_bytes", "Resident memory size in bytes.",
                              static_cast<double>(s.resident_bytes)));
    out.push_back(GaugeFamily("process_virtual_memory_bytes", "Virtual memory size in bytes.",
                              static_cast<double>(s.virtual_bytes)));
    out.push_back(GaugeFamily("process_start_time_seconds",
                              "Start time of the process since unix epoch in seconds.",
                              s.start_time_seconds));
    out.push_back(
        GaugeFamily("process_open_fds", "Number of open file descriptors.", static_cast<double>(s.open_fds)));
    out.push_back(GaugeFamily("process_max_fds", "Maximum number of open file descriptors.",
                              static_cast<double>(s.max_fds)));
    out.push_back(GaugeFamily("process_threads", "Number of OS threads in the process.",
                              static_cast<double>(s.threads)));
    auto now = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
    out.push_back(GaugeFamily("strata_uptime_seconds", "Seconds since the server process started.",
                              now - s.start_time_seconds));
    return out;
  }
};

class MetricsInterceptor : public grpc::experimental::Interceptor {
 public:
  MetricsInterceptor(ServerMetrics* metrics, std::string method)
      : metrics_(metrics), method_(std::move(method)), start_(std::chrono::steady_clock::now()) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(grpc::experimental::InterceptionHookPoints::PRE_SEND_STATUS)) {
      grpc::Status status = methods->GetSendStatus();
      double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
      metrics_->RecordRpc(method_, static_cast<int>(status.error_code()), seconds);
    }
    methods->Proceed();
  }

 private:
  ServerMetrics* metrics_;
  std::string method_;
  std::chrono::steady_clock::time_point start_;
};

class MetricsInterceptorFactory : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit MetricsInterceptorFactory(ServerMetrics* metrics) : metrics_(metrics) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(grpc::experimental::ServerRpcInfo* info) override {
    return new MetricsInterceptor(metrics_, info->method());
  }

 private:
  ServerMetrics* metrics_;
};

prometheus::MetricFamily LabeledGaugeFamily(const std::string& name, const std::string& help,
                                            const std::string& label,
                                            const std::vector<std::pair<std::string, double>>& values) {
  prometheus::MetricFamily f;
  f.name = name;
  f.help = help;
  f.type = prometheus::MetricType::Gauge;
  for (const auto& [label_value, value] : values) {
    prometheus::ClientMetric m;
    m.label.push_back({label, label_value});
    m.gauge.value = value;
    f.metric.push_back(m);
  }
  return f;
}

// One gauge family with several labels per series.
prometheus::MetricFamily MultiLabelGaugeFamily(
    const std::string& name, const std::string& help,
    const std::vector<std::pair<std::vector<prometheus::ClientMetric::Label>, double>>& series) {
  prometheus::MetricFamily f;
  f.name = name;
  f.help = help;
  f.type = prometheus::MetricType::Gauge;
  for (const auto& [labels, value] : series) {
    if (!std::isfinite(value)) continue;
    prometheus::ClientMetric m;
    m.label = labels;
    m.gauge.value = value;
    f.metric.push_back(m);
  }
  return f;
}

std::vector<std::pair<std::string, double>> Finite(
    const std::vector<std::pair<std::string, double>>& values) {
  std::vector<std::pair<std::string, double>> out;
  for (const auto& v : values) {
    if (std::isfinite(v.second)) out.push_back(v);
  }
  return out;
}

}  // namespace

// One unlabelled series of a gauge or a counter.
static prometheus::MetricFamily SingleValueFamily(const std::string& name, const std::string& help,
                                                  prometheus::MetricType type, double value) {
  prometheus::MetricFamily f;
  f.name = name;
  f.help = help;
  f.type = type;
  prometheus::ClientMetric m;
  if (type == prometheus::MetricType::Counter) {
    m.counter.value = value;
  } else {
    m.gauge.value = value;
  }
  f.metric.push_back(m);
  return f;
}

prometheus::MetricFamily GaugeFamily(const std::string& name, const std::string& help, double value) {
  return SingleValueFamily(name, help, prometheus::MetricType::Gauge, value);
}

prometheus::MetricFamily CounterFamily(const std::string& name, const std::string& help, double value) {
  return SingleValueFamily(name, help, prometheus::MetricType::Counter, value);
}

// The scrape-time families of the service state (see metrics.h).
class StateCollector : public prometheus::Collectable {
 public:
  explicit StateCollector(const ServerMetrics* metrics) : metrics_(metrics) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    std::vector<prometheus::MetricFamily> out;
    if (const JobStore* store = metrics_->jobs_.load()) CollectJobs(*store, &out);
    if (const Engine* engine = metrics_->engine_.load()) {
      const int64_t version = engine->Current()->version;
      out.push_back(GaugeFamily("strata_weights_version", "The weights version being served.",
                                static_cast<double>(version)));
      out.push_back(LabeledGaugeFamily("strata_weights_info",
                                       "The weights version being served, as a label; the value is always 1.",
                                       "version", {{absl::StrCat(version), 1.0}}));
      out.push_back(GaugeFamily("strata_candidate_versions",
                                "Candidate versions kept but not served (the publish gate held their jobs).",
                                static_cast<double>(engine->CandidateCount())));
      if (const Engine::DataParallelFigures dp = engine->DataParallelStats(); dp.world_size > 1) {
        CollectDataParallel(dp, &out);
      }
    }
    if (const DecodeScheduler* scheduler = metrics_->scheduler_.load()) {
      const DecodeScheduler::Stats stats = scheduler->stats();
      out.push_back(GaugeFamily("strata_num_requests_running",
                                "Generate requests decoding in the scheduler's batches.",
                                static_cast<double>(stats.running)));
      out.push_back(GaugeFamily("strata_num_requests_waiting",
                                "Inference requests (Generate and Score) waiting for the decode scheduler.",
                                static_cast<double>(stats.waiting)));
    }
    std::optional<ModelFigures> figures;
    {
      absl::MutexLock lock(&metrics_->figures_mu_);
      figures = metrics_->figures_;
    }
    if (figures) CollectFigures(*figures, &out);
    return out;
  }

 private:
  static void CollectDataParallel(const Engine::DataParallelFigures& dp,
                                  std::vector<prometheus::MetricFamily>* out) {
    out->push_back(GaugeFamily("strata_data_parallel_world_size",
                               "Data-parallel ranks configured (--world_size).", dp.world_size));
    out->push_back(GaugeFamily("strata_data_parallel_rank",
                               "This server's data-parallel rank (0: the trainer).", dp.rank));
    if (dp.rank == 0) {
      out->push_back(
          GaugeFamily("strata_data_parallel_last_task_ranks",
                      "Ranks that trained the latest task (1: rank 0 alone; below the world size: a "
                      "rank did not join).",
                      dp.last_task_ranks));
      out->push_back(CounterFamily("strata_data_parallel_groups_lost_total",
                                   "Tasks rank 0 finished alone after a member left or died.",
                                   static_cast<double>(dp.groups_lost)));
    }
    out->push_back(CounterFamily("strata_data_parallel_tasks_total", "Tasks this rank trained in a group.",
                                 static_cast<double>(dp.tasks)));
    out->push_back(CounterFamily("strata_data_parallel_steps_total",
                                 "Training steps whose gradients this rank summed with its group.",
                                 static_cast<double>(dp.steps)));
  }

  static void CollectJobs(const JobStore& store, std::vector<prometheus::MetricFamily>* out) {
    std::vector<std::pair<std::string, double>> by_state;
    std::map<JobState, double> counts;
    std::optional<JobRecord> training;
    for (const JobRecord& job : store.List()) {
      counts[job.state] += 1;
      // Only a job that trains now: idle, the training gauges are absent (no series, so Prometheus
      // marks them stale and graphs show a gap) rather than repeating the last job's figures.
      if (job.state == JobState::kTraining && job.progress.step > 0) training = job;
    }
    for (JobState s : {JobState::kQueued, JobState::kTraining, JobState::kEvaluating, JobState::kSucceeded,
                       JobState::kFailed, JobState::kCancelled, JobState::kHeld, JobState::kRolledBack}) {
      by_state.emplace_back(JobStateName(s), counts[s]);
    }
    out->push_back(LabeledGaugeFamily("strata_jobs", "Jobs in the journal by state.", "state", by_state));
    // Finished jobs never leave their terminal state and the journal keeps every job, so the count
    // is monotonic (and survives restarts): a counter. A rolled-back job had succeeded and still
    // counts so; a held job counts once promoted (the gate's holds: strata_gate_rejections_total).
    counts[JobState::kSucceeded] += counts[JobState::kRolledBack];
    prometheus::MetricFamily finished;
    finished.name = "strata_jobs_finished_total";
    finished.help =
        "Jobs that ended, by final state (succeeded, failed, cancelled; succeeded includes the jobs rolled "
        "back "
        "since), from the job journal.";
    finished.type = prometheus::MetricType::Counter;
    for (JobState s : {JobState::kSucceeded, JobState::kFailed, JobState::kCancelled}) {
      prometheus::ClientMetric m;
      m.label.push_back({"state", JobStateName(s)});
      m.counter.value = counts[s];
      finished.metric.push_back(m);
    }
    counts[JobState::kSucceeded] -= counts[JobState::kRolledBack];
    out->push_back(finished);
    // The gate's decisions stay in the journal (a promoted or rolled-back job keeps its reasons),
    // so the count is monotonic too.
    std::map<std::string, double> rejections;
    for (const char* kind : kGateReasonKinds) rejections[kind] = 0;
    for (const JobRecord& job : store.List()) {
      for (const std::string& reason : job.hold_reasons) {
        if (auto it = rejections.find(HoldReasonKind(reason)); it != rejections.end()) it->second += 1;
      }
    }
    prometheus::MetricFamily gate;
    gate.name = "strata_gate_rejections_total";
    gate.help =
        "New versions the publish gate refused (kept as candidates, jobs held), by failed check: forgetting, "
        "min_task_score, reference_rise (from the job journal).";
    gate.type = prometheus::MetricType::Counter;
    for (const auto& [kind, count] : rejections) {
      prometheus::ClientMetric m;
      m.label.push_back({"reason", kind});
      m.counter.value = count;
      gate.metric.push_back(m);
    }
    out->push_back(gate);
    prometheus::MetricFamily quarantined;
    quarantined.name = "strata_job_journal_quarantined_total";
    quarantined.help =
        "Job journal entries (jobs/*/job.json) found unreadable at start-up and moved to jobs/.quarantine/ "
        "(their jobs are listed as failed).";
    quarantined.type = prometheus::MetricType::Counter;
    {
      prometheus::ClientMetric m;
      m.counter.value = static_cast<double>(store.QuarantinedCount());
      quarantined.metric.push_back(m);
    }
    out->push_back(quarantined);
    out->push_back(GaugeFamily("strata_queue_length", "Jobs waiting for the training worker.",
                               counts[JobState::kQueued]));
    if (training) {
      if (std::isfinite(training->progress.loss)) {
        out->push_back(
            GaugeFamily("strata_training_loss",
                        "Training loss of the training job's latest step (absent while no job trains).",
                        training->progress.loss));
      }
      out->push_back(GaugeFamily(
          "strata_training_tokens_per_second",
          "Training throughput of the training job in tokens per second (absent while no job trains).",
          training->progress.tokens_per_second));
    }
  }

  static void CollectFigures(const ModelFigures& f, std::vector<prometheus::MetricFamily>* out) {
    using Series = std::vector<std::pair<std::vector<prometheus::ClientMetric::Label>, double>>;
    Series score, forgetting, aa, bwt, fwt, nll;
    for (const ModelFigures::View& v : f.views) {
      for (const auto& [task, value] : v.task_score)
        score.push_back({{{"task", task}, {"view", v.name}}, value});
      for (const auto& [task, value] : v.task_forgetting) {
        forgetting.push_back({{{"task", task}, {"view", v.name}}, value});
      }
      auto add = [&](Series* s, const std::optional<double>& value) {
        if (value.has_value()) s->push_back({{{"view", v.name}}, *value});
      };
      add(&aa, v.average_score);
      add(&bwt, v.backward_transfer);
      add(&fwt, v.forward_transfer);
      add(&nll, v.reference_nll);
    }
    const char* views =
        " (view: merged = the merged weights, routed = each task served by its name, auto = "
        "routed automatically, what a request naming no task gets)";
    auto push = [&](const char* name, const std::string& help, const Series& s) {
      prometheus::MetricFamily family = MultiLabelGaugeFamily(name, help + views, s);
      if (!family.metric.empty()) out->push_back(std::move(family));
    };
    push("strata_task_score", "Score of each learned task on the served weights", score);
    push("strata_task_forgetting",
         "Forgetting of each learned task: best earlier score minus the current score", forgetting);
    push("strata_average_score", "Average score over the learned tasks (AA) after the latest task", aa);
    push("strata_backward_transfer", "Backward transfer (BWT) over the learned tasks", bwt);
    push("strata_forward_transfer", "Forward transfer (FWT) over the learned tasks", fwt);
    push("strata_reference_nll",
         "Mean negative log-likelihood of the reference text on the served weights (general ability)", nll);
    out->push_back(LabeledGaugeFamily("strata_router_accuracy",
                                      "Fraction of each task's eval prompts the router sends to that task "
                                      "(latest stage).",
                                      "task", Finite(f.router_accuracy)));
    out->push_back(GaugeFamily("strata_router_bytes", "Size of the automatic task router's state in bytes.",
                               static_cast<double>(f.router_bytes)));
    out->push_back(GaugeFamily("strata_tasks_learned", "Tasks learned by the served weights.",
                               static_cast<double>(f.tasks_learned)));
    out->push_back(GaugeFamily("strata_adaptation_state_bytes",
                               "Size of the durable adaptation state (checkpoint) in bytes.",
                               static_cast<double>(f.adaptation_state_bytes)));
  }

  const ServerMetrics* metrics_;
};

ModelFigures CollectModelFigures(const Engine& engine) {
  ModelFigures f;
  EngineReport report = engine.Report();
  f.weights_version = report.weights_version;
  const size_t stages = report.matrix.size();
  // Only the latest stage counts (an older value would pass for the current one).
  auto latest = [&](const std::vector<double>& per_stage) -> std::optional<double> {
    if (per_stage.size() != stages + 1 || !std::isfinite(per_stage.back())) return std::nullopt;
    return per_stage.back();
  };
  auto finite = [](const std::optional<double>& v) -> std::optional<double> {
    return v.has_value() && std::isfinite(*v) ? v : std::nullopt;
  };
  auto add_view = [&](const char* name, const std::vector<std::vector<double>>& m,
                      const std::vector<double>& reference) {
    if (m.size() != stages || stages == 0) return;
    ModelFigures::View v;
    v.name = name;
    auto cl = ComputeClReport(m, report.base);
    for (size_t j = 0; j < report.tasks.size() && j < m.back().size(); ++j) {
      v.task_score.emplace_back(report.tasks[j], m.back()[j]);
      // F_j (metrics.h); 0 for the newest task.
      double forgetting = j + 1 == report.tasks.size() ? 0.0 : std::nan("");
      if (cl.ok() && j < cl->task_forgetting.size() && cl->task_forgetting[j].has_value()) {
        forgetting = *cl->task_forgetting[j];
      }
      v.task_forgetting.emplace_back(report.tasks[j], forgetting);
    }
    if (cl.ok()) {
      v.average_score = finite(cl->aa);
      v.backward_transfer = finite(cl->bwt);
      v.forward_transfer = finite(cl->fwt);
    }
    v.reference_nll = latest(reference);
    f.views.push_back(std::move(v));
  };
  add_view("merged", report.matrix, report.reference_nll);
  add_view("routed", report.routed_matrix, {});
  add_view("auto", report.auto_matrix, report.reference_nll_auto);
  if (f.views.empty()) {
    // No task yet: the reference NLL of the base model still shows.
    ModelFigures::View v;
    v.name = "merged";
    if (report.reference_nll.size() == 1 && std::isfinite(report.reference_nll[0])) {
      v.reference_nll = report.reference_nll[0];
    }
    f.views.push_back(std::move(v));
  }
  if (!report.router_accuracy.empty() && report.router_accuracy.size() == stages) {
    for (size_t j = 0; j < report.tasks.size() && j < report.router_accuracy.back().size(); ++j) {
      f.router_accuracy.emplace_back(report.tasks[j], report.router_accuracy.back()[j]);
    }
  }
  f.tasks_learned = static_cast<int64_t>(report.tasks.size());
  f.adaptation_state_bytes = report.adaptation_state_bytes;
  f.router_bytes = report.router_bytes;
  return f;
}

ServerMetrics::ServerMetrics(const BuildFacts& facts) : registry_(std::make_shared<prometheus::Registry>()) {
  prometheus::BuildGauge()
      .Name("strata_build_info")
      .Help("Build facts of the running server; the value is always 1.")
      .Register(*registry_)
      .Add({{"version", facts.version},
            {"git_commit", facts.git_commit},
            {"torch_version", facts.torch_version},
            {"device", facts.device},
            {"blas", facts.blas},
            {"allocator", facts.allocator}})
      .Set(1);
  process_collector_ = std::make_shared<ProcessCollector>();
  rpc_requests_ = &prometheus::BuildCounter()
                       .Name("strata_rpc_requests_total")
                       .Help("Finished RPCs by full method name and gRPC status code.")
                       .Register(*registry_);
  rpc_latency_ =
      &prometheus::BuildHistogram()
           .Name("strata_rpc_duration_seconds")
           .Help("RPC latency from arrival to status, by full method name (streams: whole stream).")
           .Register(*registry_);
  generation_tokens_ = &prometheus::BuildCounter()
                            .Name("strata_generation_tokens_total")
                            .Help("Tokens generated by InferenceService.Generate.")
                            .Register(*registry_)
                            .Add({});
  prompt_tokens_ = &prometheus::BuildCounter()
                        .Name("strata_prompt_tokens_total")
                        .Help("Prompt tokens of the Generate requests that started decoding.")
                        .Register(*registry_)
                        .Add({});
  time_per_output_token_ =
      &prometheus::BuildHistogram()
           .Name("strata_time_per_output_token_seconds")
           .Help("Inter-token latency: time between consecutive generated tokens of one request.")
           .Register(*registry_)
           .Add({}, prometheus::Histogram::BucketBoundaries{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075,
                                                            0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5});
  e2e_latency_ = &prometheus::BuildHistogram()
                      .Name("strata_e2e_request_latency_seconds")
                      .Help("Generate: time from a request's arrival to its last token.")
                      .Register(*registry_)
                      .Add({}, prometheus::Histogram::BucketBoundaries{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                                                       2.5, 5, 10, 30, 60, 120});
  batch_size_ = &prometheus::BuildHistogram()
                     .Name("strata_batch_size")
                     .Help("Rows (requests) decoded together in one step of the decode scheduler.")
                     .Register(*registry_)
                     .Add({}, prometheus::Histogram::BucketBoundaries{1, 2, 4, 8, 16, 32, 64, 128, 256});
  rejected_ = &prometheus::BuildCounter()
                   .Name("strata_requests_rejected_total")
                   .Help(
                       "Inference requests refused at admission, by reason (queue_full: "
                       "--max_waiting_requests reached; prompt_too_long: over --max_prompt_tokens).")
                   .Register(*registry_);
  for (const char* reason : {"queue_full", "prompt_too_long"}) rejected_->Add({{"reason", reason}});
  time_to_first_token_ = &prometheus::BuildHistogram()
                              .Name("strata_time_to_first_token_seconds")
                              .Help("Time from a Generate request's arrival to its first generated token.")
                              .Register(*registry_)
                              .Add({}, prometheus::Histogram::BucketBoundaries{0.005, 0.01, 0.025, 0.05, 0.1,
                                                                               0.25, 0.5, 1, 2.5, 5, 10, 30});
  route_requests_ =
      &prometheus::BuildCounter()
           .Name("strata_route_requests_total")
           .Help(
               "Generate and Score requests by the route they were served on (base, merged or a "
               "learned task's name).")
           .Register(*registry_);
  state_collector_ = std::make_shared<StateCollector>(this);
}

void ServerMetrics::RecordRoute(const std::string& route) {
  route_requests_->Add({{"route", route}}).Increment();
}

void ServerMetrics::RecordGeneration(const GenerationFigures& f) {
  generation_tokens_->Increment(static_cast<double>(f.generation_tokens));
  prompt_tokens_->Increment(static_cast<double>(f.prompt_tokens));
  if (f.time_to_first_token.has_value()) time_to_first_token_->Observe(*f.time_to_first_token);
  for (double s : f.inter_token_latencies) time_per_output_token_->Observe(s);
  e2e_latency_->Observe(f.e2e_seconds);
}

void ServerMetrics::RecordBatch(int64_t rows) { batch_size_->Observe(static_cast<double>(rows)); }

void ServerMetrics::RecordRejected(const std::string& reason) {
  rejected_->Add({{"reason", reason}}).Increment();
}

void ServerMetrics::SetSources(const JobStore* jobs, const Engine* engine) {
  jobs_ = jobs;
  engine_ = engine;
}

void ServerMetrics::RefreshModelFigures() {
  const Engine* engine = engine_.load();
  if (engine == nullptr) return;
  ModelFigures figures = CollectModelFigures(*engine);
  absl::MutexLock lock(&figures_mu_);
  figures_ = std::move(figures);
}

void ServerMetrics::RecordRpc(const std::string& method, int grpc_code, double seconds) {
  const auto& names = CodeNames();
  std::string code = grpc_code >= 0 && grpc_code < static_cast<int>(names.size()) ? names[grpc_code]
                                                                                  : absl::StrCat(grpc_code);
  rpc_requests_->Add({{"method", method}, {"code", code}}).Increment();
  static const prometheus::Histogram::BucketBoundaries kBuckets = {
      0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300};
  rpc_latency_->Add({{"method", method}}, kBuckets).Observe(seconds);
}

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
ServerMetrics::MakeInterceptorFactory() {
  return std::make_unique<MetricsInterceptorFactory>(this);
}

absl::StatusOr<std::unique_ptr<prometheus::Exposer>> StartMetricsExposer(const std::string& host, int port,
                                                                         ServerMetrics& metrics) {
  std::string addr = absl::StrCat(host, ":", port);
  try {
    auto exposer = std::make_unique<prometheus::Exposer>(addr, /*num_threads=*/2);
    exposer->RegisterCollectable(metrics.registry_ptr());
    exposer->RegisterCollectable(metrics.process_collector());
    exposer->RegisterCollectable(metrics.state_collector());
    return exposer;
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("cannot serve /metrics on ", addr,
                                               " (port in use or address not available): ", e.what()));
  }
}

}  // namespace strata
