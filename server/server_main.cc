// strata-server: the Strata gRPC server.
//
// Flags have environment twins (--grpc_port / STRATA_GRPC_PORT); the command line wins.

#include <dlfcn.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <pthread.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/adapt/data_parallel.h"
#include "core/adapt/method.h"
#include "core/adapt/recipe.h"
#include "core/jobs/job_store.h"
#include "core/jobs/worker.h"
#include "core/model/model.h"
#include "core/model/model_summary.h"
#include "core/model/runtime.h"
#include "core/model/tokenizer.h"
#include "core/serve/scheduler.h"
#include "core/state/engine.h"
#include "core/util/env_flags.h"
#include "core/util/file_util.h"
#include "core/util/logging.h"
#include "core/util/status_macros.h"
#include "server/adaptation_service.h"
#include "server/admin_service.h"
#include "server/auth.h"
#include "server/inference_service.h"
#include "server/metrics.h"
#include "server/openai_http.h"
#include "server/replica_follower.h"
#include "server/replica_services.h"
#include "server/replication_service.h"
#include "strata/build_info.h"

// Debian's civetweb (under prometheus-cpp's Exposer) asks for a 100 KiB thread stack, smaller than
// the static TLS of LibTorch + OpenBLAS + glog (~108 KiB), so pthread_create fails with EINVAL and
// the Exposer cannot start. Raise every requested stack size to at least 1 MiB.
extern "C" int pthread_attr_setstacksize(pthread_attr_t* attr, size_t size) {
  using Fn = int (*)(pthread_attr_t*, size_t);
  static Fn real = reinterpret_cast<Fn>(dlsym(RTLD_NEXT, "pthread_attr_setstacksize"));
  constexpr size_t kMinStack = size_t{1} << 20;
  return real(attr, size < kMinStack ? kMinStack : size);
}

ABSL_FLAG(std::string, host, "127.0.0.1", "Address to listen on (gRPC and /metrics).");
ABSL_FLAG(int32_t, grpc_port, 50051, "gRPC port.");
ABSL_FLAG(int32_t, metrics_port, 9464, "Prometheus /metrics HTTP port (0 disables the exposer).");
ABSL_FLAG(int32_t, http_port, 8000,
          "OpenAI-compatible HTTP API port (/v1/completions, /v1/models; 0 disables it). HTTPS with "
          "--tls_cert/--tls_key.");
ABSL_FLAG(int32_t, http_threads, 64,
          "HTTP worker threads: the most HTTP requests (streams included) handled at once; more wait for a "
          "free thread.");
ABSL_FLAG(std::string, state_dir, "./strata-state",
          "Directory for durable state (checkpoints, job journal).");
ABSL_FLAG(std::string, model, "",
          "Hugging Face model directory (config.json, *.safetensors, tokenizer.json). "
          "Empty: the embedded default model (random init, byte-level tokenizer).");
ABSL_FLAG(std::string, device, "cpu", "Device: cpu, cuda or cuda:N.");
ABSL_FLAG(std::string, dtype, "float32", "Weight dtype: float32 or bfloat16.");
ABSL_FLAG(int32_t, threads, 0, "Intra-op CPU threads for LibTorch (0 = number of cores).");
ABSL_FLAG(std::string, log_format, "text", "Log format: text or json (one JSON object per line).");
ABSL_FLAG(std::string, log_level, "info", "Log level: trace, debug, info, warn, error.");
ABSL_FLAG(int32_t, shutdown_grace_seconds, 30, "Seconds in-flight RPCs get to finish on SIGTERM/SIGINT.");
// The training recipe (core/adapt/recipe.h): a task's spec may override the per-task parts. The
// defaults were chosen on the cl-small benchmark (docs/benchmarks.md). The method options (--rank,
// --alpha, --targets, --k_max, --ella_lambda, ...) come from the method registry
// (ParseMethodOptionFlags; listed by --help).
ABSL_FLAG(
    std::string, method, strata::kDefaultMethod,
    "Adaptation method of a new state directory (strata-server --help lists them; an existing checkpoint "
    "keeps its own).");
ABSL_FLAG(double, learning_rate, 5e-3, "Default learning rate.");
ABSL_FLAG(int32_t, max_steps, 300, "Default optimizer steps per task (0 = use epochs).");
ABSL_FLAG(int32_t, batch_size, 16, "Default batch size.");
ABSL_FLAG(double, warmup_ratio, strata::kDefaultWarmupRatio,
          "Learning-rate warmup of each task, as a fraction of its steps.");
ABSL_FLAG(std::string, lr_schedule, "linear",
          "Learning-rate schedule after warmup: linear, cosine or constant.");
ABSL_FLAG(int32_t, max_seq_len, 256,
          "Default maximum tokens per example: longer submitted examples are refused.");
ABSL_FLAG(std::string, unmatched_route, "base",
          "What a request routed automatically gets when its prompt fits no learned task: base (the base "
          "model W0) or merged (the merged weights).");
ABSL_FLAG(int32_t, router_layer, -1,
          "Automatic routing: decoder layers of the base model run for a prompt's feature (-1 = half of "
          "them; a new state directory: a checkpoint keeps its router's layer).");
ABSL_FLAG(std::string, reference_text, "",
          "Text file whose NLL is measured after each task (general-ability retention); empty = none.");
ABSL_FLAG(int32_t, training_threads, 0,
          "Intra-op threads of the training worker (0 = --threads minus the serving threads, at least 1).");
ABSL_FLAG(int32_t, training_shards, 0,
          "Row shards of each training step run concurrently on their own threads, splitting "
          "--training_threads between them (0 = automatic: one per training thread on the CPU, at most 1 GiB "
          "of extra gradient copies; 1 on CUDA).");
ABSL_FLAG(int32_t, serving_threads, 0,
          "Intra-op threads of the decode scheduler, which runs every inference forward pass (0 = half of "
          "--threads, at least 1). Training and serving run at once, so the two budgets should add up to "
          "the cores: OpenMP threads spin while waiting, and oversubscribed cores slow both.");
// Serving (the decode scheduler).
ABSL_FLAG(int32_t, max_batch_size, 32, "Most requests decoded together in one step (over every route).");
ABSL_FLAG(int32_t, max_waiting_requests, 256,
          "Most inference requests waiting for a batch slot; more are refused with RESOURCE_EXHAUSTED.");
ABSL_FLAG(int32_t, max_prompt_tokens, 0,
          "Most prompt tokens of one Generate or Score request (0 = the model's "
          "positions).");
ABSL_FLAG(int32_t, max_score_completions, 64, "Most completions one Score request may carry.");
// Limits.
ABSL_FLAG(int64_t, max_task_examples, 100000, "Most examples (train + eval) one task may have.");
ABSL_FLAG(int64_t, max_task_bytes, int64_t{256} << 20, "Most bytes of data one task may have.");
ABSL_FLAG(int32_t, max_queue, 100, "Most jobs waiting in the queue.");
ABSL_FLAG(int32_t, max_job_attempts, 3,
          "Times a job may start training: a job interrupted by a crash (kill -9, OOM) is re-run until "
          "then, and then fails with the reason.");
ABSL_FLAG(std::string, max_forgetting, "0.02",
          "Publish gate: the most any learned task's score may drop (in the view users get) for a new "
          "version to be published; otherwise it is kept as a candidate and its job held ('off' disables).");
ABSL_FLAG(std::string, min_task_score, "off",
          "Publish gate: the least score a new task must reach to be published (a task's --min-score wins; "
          "'off' = none).");
ABSL_FLAG(std::string, max_reference_rise, "off",
          "Publish gate: the most the reference-text NLL may rise, relative (0.05 = 5%; 'off' = unchecked).");
ABSL_FLAG(
    int32_t, keep_versions, 3,
    "Published versions whose states are kept for rollback (the served one included), plus one candidate.");
ABSL_FLAG(int32_t, max_new_tokens, 1024, "Most tokens one Generate request may ask for.");
ABSL_FLAG(int32_t, max_message_bytes, 16 << 20, "Largest gRPC message the server accepts or sends.");
// Export / import roots.
ABSL_FLAG(std::string, export_root, "",
          "Directory that ExportWeights / ExportState paths must lie under (default <state_dir>/exports).");
ABSL_FLAG(std::string, import_root, "",
          "Directory that ImportAdapters paths must lie under (default <state_dir>/imports).");
// Security.
ABSL_FLAG(std::string, tls_cert, "", "PEM certificate chain: serve gRPC over TLS (with --tls_key).");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert.");
ABSL_FLAG(std::string, auth_token_file, "",
          "File holding a bearer token that AdaptationService and AdminService calls must carry "
          "(metadata 'authorization: Bearer <token>'); empty = no token.");
ABSL_FLAG(bool, auth_inference, false, "Require the bearer token for InferenceService too.");
// Replication (docs/deploy.md: one trainer, N read-only replicas).
ABSL_FLAG(std::string, role, "trainer",
          "trainer (learns and serves; announces its published versions to replicas) or replica (serves the "
          "versions of the trainer at --follow, inference only: adaptation and version changes are refused "
          "with FAILED_PRECONDITION naming the trainer).");
ABSL_FLAG(std::string, follow, "",
          "A replica's trainer, HOST:PORT (its gRPC port). The replica must run the trainer's --model.");
ABSL_FLAG(
    std::string, follow_token_file, "",
    "File holding the bearer token a replica presents to its trainer (the trainer's --auth_token_file).");
ABSL_FLAG(std::string, follow_tls_ca, "",
          "PEM CA certificates: a replica connects to its trainer over TLS, checking its certificate.");
ABSL_FLAG(std::string, follow_tls_server_name, "",
          "Overrides the name checked against the trainer's certificate (--follow_tls_ca).");
ABSL_FLAG(double, follow_max_backoff_seconds, 30,
          "Longest wait between a replica's reconnects to its trainer (the wait doubles from 0.5 s).");
// Data-parallel adaptation (docs/deploy.md): rank 0 is the trainer, ranks 1..N-1 are replicas of it
// that also train their shard of every step of its tasks.
ABSL_FLAG(int32_t, world_size, 0,
          "Ranks of data-parallel adaptation (0 = $WORLD_SIZE, else 1: no data parallelism).");
ABSL_FLAG(int32_t, dist_rank, -1,
          "This server's data-parallel rank (-1 = $RANK, else 0; --rank is the adapter rank). Rank 0 must be "
          "--role=trainer; the others "
          "--role=replica following it.");
ABSL_FLAG(
    std::string, dist_init, "",
    "Rendezvous of the ranks: tcp://HOST:PORT (rank 0 hosts a c10d TCPStore there; empty = "
    "$MASTER_ADDR:$MASTER_PORT) or file:///PATH (a c10d FileStore: one machine or a shared filesystem).");
ABSL_FLAG(std::string, dist_backend, "gloo",
          "c10d backend for the gradient sums: gloo, or nccl (CUDA builds with NCCL).");
ABSL_FLAG(double, dist_join_timeout_seconds, 60,
          "How long rank 0 waits for the other ranks to join a task before training without them.");
ABSL_FLAG(double, dist_timeout_seconds, 300,
          "A gradient sum or store call that takes longer fails (rank 0 then goes on alone).");

namespace strata {
namespace {

// clang-format off
const std::vector<std::string> kFlagNames = {
    "host", "grpc_port", "metrics_port", "http_port", "http_threads", "state_dir", "model", "device", "dtype", "threads",
    "log_format", "log_level", "shutdown_grace_seconds",
    // Training defaults and thread budgets.
    "method", "learning_rate", "max_steps", "batch_size", "warmup_ratio", "lr_schedule", "max_seq_len",
    "unmatched_route", "router_layer", "reference_text", "training_threads", "training_shards", "serving_threads",
    "max_batch_size", "max_waiting_requests", "max_prompt_tokens", "max_score_completions",
    // Limits, roots, security.
    "max_task_examples", "max_task_bytes", "max_queue", "max_job_attempts", "max_new_tokens", "max_message_bytes",
    // The publish gate and kept versions.
    "max_forgetting", "min_task_score", "max_reference_rise", "keep_versions",
    "export_root", "import_root", "tls_cert", "tls_key", "auth_token_file", "auth_inference",
    // Replication.
    "role", "follow", "follow_token_file", "follow_tls_ca", "follow_tls_server_name",
    "follow_max_backoff_seconds",
    // Data parallelism.
    "world_size", "dist_rank", "dist_init", "dist_backend", "dist_join_timeout_seconds", "dist_timeout_seconds"};
// clang-format on

// The method options from the command line and environment (ParseMethodOptionFlags in main).
MethodConfig& MethodFlags() {
  static MethodConfig* config = new MethodConfig();
  return *config;
}

// The server's training recipe: the flags above plus the method options.
TrainingRecipe ServerRecipe() {
  TrainingRecipe r;
  r.method = absl::GetFlag(FLAGS_method);
  r.method_config = MethodFlags();
  r.SetRank(r.method_config.rank);
  r.learning_rate = absl::GetFlag(FLAGS_learning_rate);
  r.max_steps = absl::GetFlag(FLAGS_max_steps);
  r.batch_size = absl::GetFlag(FLAGS_batch_size);
  r.warmup_ratio = absl::GetFlag(FLAGS_warmup_ratio);
  r.lr_schedule = absl::GetFlag(FLAGS_lr_schedule);
  r.max_seq_len = absl::GetFlag(FLAGS_max_seq_len);
  return r;
}

// A gate threshold flag: a number, or "off" (unset).
absl::StatusOr<std::optional<double>> GateFlag(const char* name, const std::string& value) {
  if (value == "off" || value.empty()) return std::optional<double>();
  double v = 0;
  if (!absl::SimpleAtod(value, &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, ": expected a number or 'off', got '", value, "'"));
  }
  return std::optional<double>(v);
}

absl::StatusOr<GateOptions> ServerGate() {
  GateOptions g;
  ASSIGN_OR_RETURN(g.max_forgetting, GateFlag("max_forgetting", absl::GetFlag(FLAGS_max_forgetting)));
  ASSIGN_OR_RETURN(g.min_task_score, GateFlag("min_task_score", absl::GetFlag(FLAGS_min_task_score)));
  ASSIGN_OR_RETURN(g.max_reference_rise,
                   GateFlag("max_reference_rise", absl::GetFlag(FLAGS_max_reference_rise)));
  RETURN_IF_ERROR(ValidateGateOptions(g));
  return g;
}

absl::Status ValidateFlags() {
  auto port_ok = [](int p, bool allow_zero) { return (allow_zero && p == 0) || (p >= 1 && p <= 65535); };
  if (!port_ok(absl::GetFlag(FLAGS_grpc_port), false)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--grpc_port: ", absl::GetFlag(FLAGS_grpc_port), " is not a port (1-65535)"));
  }
  if (!port_ok(absl::GetFlag(FLAGS_metrics_port), true)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--metrics_port: ", absl::GetFlag(FLAGS_metrics_port), " is not a port (0-65535)"));
  }
  if (absl::GetFlag(FLAGS_unmatched_route) != "base" && absl::GetFlag(FLAGS_unmatched_route) != "merged") {
    return absl::InvalidArgumentError(absl::StrCat("--unmatched_route: must be base or merged, got '",
                                                   absl::GetFlag(FLAGS_unmatched_route), "'"));
  }
  if (absl::GetFlag(FLAGS_router_layer) < -1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--router_layer: must be -1 (half of the layers) or >= 0, got ", absl::GetFlag(FLAGS_router_layer)));
  }
  if (absl::GetFlag(FLAGS_threads) < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--threads: must be >= 0, got ", absl::GetFlag(FLAGS_threads)));
  }
  if (absl::GetFlag(FLAGS_host).empty()) return absl::InvalidArgumentError("--host: must not be empty");
  std::string dtype = absl::GetFlag(FLAGS_dtype);
  if (dtype != "float32" && dtype != "bfloat16") {
    return absl::InvalidArgumentError(absl::StrCat("--dtype: '", dtype, "' (expected float32 or bfloat16)"));
  }
  if (absl::GetFlag(FLAGS_state_dir).empty())
    return absl::InvalidArgumentError("--state_dir: must not be empty");
  if (absl::GetFlag(FLAGS_shutdown_grace_seconds) < 0) {
    return absl::InvalidArgumentError("--shutdown_grace_seconds: must be >= 0");
  }
  auto at_least = [](const char* name, int64_t value, int64_t min) -> absl::Status {
    if (value < min)
      return absl::InvalidArgumentError(absl::StrCat("--", name, ": must be >= ", min, ", got ", value));
    return absl::OkStatus();
  };
  for (const absl::Status& st :
       {at_least("max_steps", absl::GetFlag(FLAGS_max_steps), 0),
        at_least("batch_size", absl::GetFlag(FLAGS_batch_size), 1),
        at_least("training_threads", absl::GetFlag(FLAGS_training_threads), 0),
        at_least("training_shards", absl::GetFlag(FLAGS_training_shards), 0),
        at_least("serving_threads", absl::GetFlag(FLAGS_serving_threads), 0),
        at_least("max_task_examples", absl::GetFlag(FLAGS_max_task_examples), 1),
        at_least("max_task_bytes", absl::GetFlag(FLAGS_max_task_bytes), 1),
        at_least("max_queue", absl::GetFlag(FLAGS_max_queue), 1),
        at_least("max_job_attempts", absl::GetFlag(FLAGS_max_job_attempts), 1),
        at_least("keep_versions", absl::GetFlag(FLAGS_keep_versions), 1), ServerGate().status(),
        at_least("max_new_tokens", absl::GetFlag(FLAGS_max_new_tokens), 1),
        at_least("max_batch_size", absl::GetFlag(FLAGS_max_batch_size), 1),
        at_least("max_waiting_requests", absl::GetFlag(FLAGS_max_waiting_requests), 1),
        at_least("max_prompt_tokens", absl::GetFlag(FLAGS_max_prompt_tokens), 0),
        at_least("max_score_completions", absl::GetFlag(FLAGS_max_score_completions), 1),
        at_least("max_message_bytes", absl::GetFlag(FLAGS_max_message_bytes), 4096)}) {
    if (!st.ok()) return st;
  }
  // The recipe, checked as the engine will check it (the error names the flag).
  if (absl::Status st = ValidateRecipe(ServerRecipe()); !st.ok()) {
    // "recipe: <field> <why>" / "method config: <field> <why>" -> "--<flag>: <why>"
    std::string message(st.message());
    for (const std::string prefix : {"recipe: ", "method config: "}) {
      if (message.rfind(prefix, 0) != 0) continue;
      std::string rest = message.substr(prefix.size());
      std::string field = rest.substr(0, rest.find(' '));
      std::string why = rest.substr(std::min(rest.size(), field.size() + 1));
      if (const MethodOption* o = FindMethodOption(field); o != nullptr && !o->FlagName().empty()) {
        field = o->FlagName();
      }
      if (field == "p") field = "rank";
      message = absl::StrCat("--", field, ": ", why);
    }
    return absl::InvalidArgumentError(message);
  }
  if (absl::GetFlag(FLAGS_tls_cert).empty() != absl::GetFlag(FLAGS_tls_key).empty()) {
    return absl::InvalidArgumentError("--tls_cert and --tls_key: give both or neither");
  }
  if (absl::GetFlag(FLAGS_auth_inference) && absl::GetFlag(FLAGS_auth_token_file).empty()) {
    return absl::InvalidArgumentError("--auth_inference: needs --auth_token_file");
  }
  const std::string role = absl::GetFlag(FLAGS_role);
  if (role != "trainer" && role != "replica") {
    return absl::InvalidArgumentError(absl::StrCat("--role: '", role, "' (expected trainer or replica)"));
  }
  const std::string follow = absl::GetFlag(FLAGS_follow);
  if (role == "replica") {
    const size_t colon = follow.rfind(':');
    int port = 0;
    if (follow.empty() || colon == std::string::npos || colon == 0 ||
        !absl::SimpleAtoi(follow.substr(colon + 1), &port) || port < 1 || port > 65535) {
      return absl::InvalidArgumentError(
          absl::StrCat("--follow: a replica needs its trainer's address as HOST:PORT, got '", follow, "'"));
    }
    if (absl::GetFlag(FLAGS_follow_max_backoff_seconds) < 0.5) {
      return absl::InvalidArgumentError("--follow_max_backoff_seconds: must be >= 0.5");
    }
  } else {
    for (const char* flag : {"follow", "follow_token_file", "follow_tls_ca", "follow_tls_server_name"}) {
      const std::string value =
          flag == std::string("follow")              ? follow
          : flag == std::string("follow_token_file") ? absl::GetFlag(FLAGS_follow_token_file)
          : flag == std::string("follow_tls_ca")     ? absl::GetFlag(FLAGS_follow_tls_ca)
                                                     : absl::GetFlag(FLAGS_follow_tls_server_name);
      if (!value.empty())
        return absl::InvalidArgumentError(absl::StrCat("--", flag, ": needs --role=replica"));
    }
  }
  return absl::OkStatus();
}

// The data-parallel group of this server (nullptr without data parallelism): the flags, or
// WORLD_SIZE/RANK/MASTER_ADDR/MASTER_PORT, checked against the role. Rank 0 hosts the store here.
absl::StatusOr<std::shared_ptr<DataParallelGroup>> ServerDataParallel(bool replica) {
  const int world_flag = absl::GetFlag(FLAGS_world_size);
  if (world_flag < 0)
    return absl::InvalidArgumentError("--world_size: must be >= 0 (0 = $WORLD_SIZE, else 1)");
  auto o = ResolveDataParallelOptions(world_flag == 0 ? -1 : world_flag, absl::GetFlag(FLAGS_dist_rank),
                                      absl::GetFlag(FLAGS_dist_init));
  if (!o.ok()) return o.status();
  if (o->world_size == 1) return std::shared_ptr<DataParallelGroup>();
  if (o->rank == 0 && replica) {
    return absl::InvalidArgumentError(
        "--dist_rank 0: rank 0 owns the jobs, merges and checkpoints: it must be "
        "--role=trainer (the other ranks are its replicas)");
  }
  if (o->rank > 0 && !replica) {
    return absl::InvalidArgumentError(
        absl::StrCat("--dist_rank ", o->rank,
                     ": ranks other than 0 must be --role=replica --follow=<rank 0's gRPC address> "
                     "(they serve and train from rank 0's published versions)"));
  }
  o->backend = absl::GetFlag(FLAGS_dist_backend);
  o->join_timeout_seconds = absl::GetFlag(FLAGS_dist_join_timeout_seconds);
  o->timeout_seconds = absl::GetFlag(FLAGS_dist_timeout_seconds);
  if (!(o->join_timeout_seconds > 0))
    return absl::InvalidArgumentError("--dist_join_timeout_seconds: must be > 0");
  if (!(o->timeout_seconds > 0)) return absl::InvalidArgumentError("--dist_timeout_seconds: must be > 0");
  if (!DataParallelAvailable()) {
    return absl::UnimplementedError(
        "--world_size > 1: this build has no c10d with Gloo (Debian: install libgloo-dev and rebuild)");
  }
  auto group = DataParallelGroup::Connect(*o);
  if (!group.ok()) return group.status();
  spdlog::info(
      "data parallelism: rank {} of {} ({}, store {}{})", o->rank, o->world_size, o->backend,
      o->store_file.empty() ? absl::StrCat("tcp://", o->host, ":", o->port) : "file://" + o->store_file,
      o->rank == 0 ? ", hosted here" : "");
  return std::shared_ptr<DataParallelGroup>(std::move(*group));
}

struct LoadedModel {
  std::unique_ptr<CausalLM> model;
  std::shared_ptr<const Tokenizer> tokenizer;
  ModelSummary summary;
  std::string id;  // identifies the base model in checkpoints: its absolute directory
};

absl::StatusOr<LoadedModel> LoadModel(const std::string& dir, const std::string& device,
                                      const std::string& dtype) {
  LoadedModel out;
  ModelLoadOptions opts;
  opts.device = device;
  opts.dtype = dtype;
  if (dir.empty()) {
    auto model = CausalLM::RandomInit(CausalLM::EmbeddedDefaultConfig(), /*seed=*/1234, opts);
    if (!model.ok()) return model.status();
    out.model = std::move(*model);
    out.tokenizer = std::shared_ptr<const Tokenizer>(Tokenizer::ByteLevelDefault());
    out.summary = SummarizeModel(*out.model, "embedded-default", "");
    out.id = "embedded-default";
    return out;
  }
  auto model = CausalLM::Load(dir, opts);
  if (!model.ok()) return model.status();
  auto tok = Tokenizer::FromDirectory(dir);
  if (!tok.ok()) return tok.status();
  out.model = std::move(*model);
  out.tokenizer = std::shared_ptr<const Tokenizer>(std::move(*tok));
  std::string abs = AbsolutePath(dir);
  out.summary = SummarizeModel(*out.model, std::filesystem::path(abs).filename().string(), abs);
  out.id = abs;
  return out;
}

int Fail(const absl::Status& status) {
  spdlog::critical("{}", status.ToString());
  std::fprintf(stderr, "strata-server: %s\n", std::string(status.message()).c_str());
  return 2;
}

absl::StatusOr<std::string> ReadPem(const std::string& path, const char* flag) {
  auto text = ReadFile(path);
  if (!text.ok())
    return absl::Status(text.status().code(), absl::StrCat("--", flag, ": ", text.status().message()));
  return text;
}

// A replica's health: overall and InferenceService are its readiness (it serves a trainer's state);
// AdminService always serves; AdaptationService never (it refuses every call). The overall
// SetServingStatus sets every service, so it goes first.
void SetReplicaHealth(grpc::HealthCheckServiceInterface* health, bool ready) {
  health->SetServingStatus("strata.v1.InferenceService", ready);
  health->SetServingStatus(ready);
  health->SetServingStatus("strata.v1.AdminService", true);
  health->SetServingStatus("strata.v1.AdaptationService", false);
}

int Run() {
  auto started = std::chrono::steady_clock::now();
  // Block the shutdown signals in every thread; one thread waits for them with sigwait.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  const std::string host = absl::GetFlag(FLAGS_host);
  const int grpc_port = absl::GetFlag(FLAGS_grpc_port);
  const int metrics_port = absl::GetFlag(FLAGS_metrics_port);
  const std::string state_dir = AbsolutePath(absl::GetFlag(FLAGS_state_dir));
  const std::string export_root = AbsolutePath(
      absl::GetFlag(FLAGS_export_root).empty() ? state_dir + "/exports" : absl::GetFlag(FLAGS_export_root));
  const std::string import_root = AbsolutePath(
      absl::GetFlag(FLAGS_import_root).empty() ? state_dir + "/imports" : absl::GetFlag(FLAGS_import_root));
  const bool replica = absl::GetFlag(FLAGS_role) == "replica";
  const std::string trainer = absl::GetFlag(FLAGS_follow);

  auto device = ResolveDevice(absl::GetFlag(FLAGS_device));
  if (!device.ok()) return Fail(device.status());
  int threads = absl::GetFlag(FLAGS_threads);
  if (threads == 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  // The budget: serving gets half the cores unless told, training the rest (at least one each).
  const int serving_threads = absl::GetFlag(FLAGS_serving_threads) > 0 ? absl::GetFlag(FLAGS_serving_threads)
                                                                       : std::max(1, threads / 2);
  const int training_threads = absl::GetFlag(FLAGS_training_threads) > 0
                                   ? absl::GetFlag(FLAGS_training_threads)
                                   : std::max(1, threads - serving_threads);
  SetTorchThreads(threads);
  spdlog::info("strata-server {} ({}, {}) starting", kVersion, kGitCommit, kBuildType);
  spdlog::info("runtime: {}", TorchRuntimeSummary());
  spdlog::info("BLAS: {}; allocator: {}; torch threads: {} (training worker {}, decode scheduler {})",
               LoadedBlasLibrary(), LoadedAllocator(), GetTorchThreads(), training_threads, serving_threads);
  if (training_threads + serving_threads > threads) {
    spdlog::warn(
        "training ({}) + serving ({}) threads exceed --threads {}: the two will slow each other down",
        training_threads, serving_threads, threads);
  }

  for (const std::string& dir : {state_dir, export_root, import_root}) {
    if (auto st = MakeDirs(dir); !st.ok()) return Fail(st);
  }

  // Security material first: a bad file should stop the server before the model loads.
  std::unique_ptr<BearerAuth> auth;
  if (!absl::GetFlag(FLAGS_auth_token_file).empty()) {
    auto a = BearerAuth::FromFile(absl::GetFlag(FLAGS_auth_token_file));
    if (!a.ok()) return Fail(a.status());
    auth = std::move(*a);
  }
  std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
  const bool tls = !absl::GetFlag(FLAGS_tls_cert).empty();
  if (tls) {
    auto cert = ReadPem(absl::GetFlag(FLAGS_tls_cert), "tls_cert");
    if (!cert.ok()) return Fail(cert.status());
    auto key = ReadPem(absl::GetFlag(FLAGS_tls_key), "tls_key");
    if (!key.ok()) return Fail(key.status());
    if (auto st = CheckTlsKeyPair(*cert, absl::GetFlag(FLAGS_tls_cert), *key, absl::GetFlag(FLAGS_tls_key));
        !st.ok()) {
      return Fail(st);
    }
    grpc::SslServerCredentialsOptions ssl;
    ssl.pem_key_cert_pairs.push_back({*key, *cert});
    credentials = grpc::SslServerCredentials(ssl);
  }

  const std::string model_dir = absl::GetFlag(FLAGS_model);
  spdlog::info("loading model: {}", model_dir.empty() ? "embedded default" : model_dir);
  auto t0 = std::chrono::steady_clock::now();
  auto loaded = LoadModel(model_dir, *device, absl::GetFlag(FLAGS_dtype));
  if (!loaded.ok()) return Fail(loaded.status());
  const ModelSummary summary = loaded->summary;
  spdlog::info("model '{}' ({}, {} parameters, {}) loaded in {:.2f} s", summary.name, summary.architecture,
               summary.parameter_count, summary.dtype,
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());

  EngineOptions engine_options;
  engine_options.state_dir = state_dir;
  engine_options.recipe = ServerRecipe();
  spdlog::info("training recipe: {}", RecipeToJson(engine_options.recipe));
  engine_options.reference_text_path = absl::GetFlag(FLAGS_reference_text);
  engine_options.unmatched_route = absl::GetFlag(FLAGS_unmatched_route);
  engine_options.router.layer = absl::GetFlag(FLAGS_router_layer);
  engine_options.training_threads = training_threads;
  engine_options.training_shards = absl::GetFlag(FLAGS_training_shards);
  engine_options.serving_threads = serving_threads;
  engine_options.base_model_id = loaded->id;
  engine_options.gate = *ServerGate();  // checked by ValidateFlags
  engine_options.keep_versions = absl::GetFlag(FLAGS_keep_versions);
  engine_options.replica = replica;
  auto data_parallel = ServerDataParallel(replica);
  if (!data_parallel.ok()) return Fail(data_parallel.status());
  engine_options.data_parallel = *data_parallel;
  auto engine_or = Engine::Create(std::move(loaded->model), loaded->tokenizer, summary, engine_options);
  if (!engine_or.ok()) return Fail(engine_or.status());
  std::unique_ptr<Engine> engine = std::move(*engine_or);
  SetTorchThreads(threads);  // the engine may have changed this thread's budget
  auto store_or = JobStore::Open(state_dir + "/jobs");
  if (!store_or.ok()) return Fail(store_or.status());
  std::unique_ptr<JobStore> store = std::move(*store_or);
  spdlog::info("state {}: method {}, weights version {}, {} task(s) learned, {} job(s) in the journal",
               state_dir, engine->method(), engine->Current()->version, engine->Current()->tasks_learned,
               store->List().size());

  BuildFacts facts{kVersion, kGitCommit, kTorchVersion, *device, LoadedBlasLibrary(), LoadedAllocator()};
  ServerMetrics metrics(facts);
  metrics.SetSources(store.get(), engine.get());
  metrics.RefreshModelFigures();
  // A trainer announces every served version to its replicas.
  ReplicationServiceImpl replication(engine.get(), auth.get());
  engine->SetOnPublish([&metrics, &replication] {
    metrics.RefreshModelFigures();
    replication.Published();
  });
  // A replica follows its trainer; its readiness is the follower's (set once the server runs).
  std::atomic<grpc::HealthCheckServiceInterface*> health_service{nullptr};
  std::unique_ptr<ReplicaFollower> follower;
  std::atomic<bool> dp_stop{false};  // a data-parallel rank > 0 leaves its task and stops following
  std::thread dp_follower;
  if (replica) {
    FollowOptions follow;
    follow.trainer = trainer;
    follow.token_file = absl::GetFlag(FLAGS_follow_token_file);
    follow.tls_ca = absl::GetFlag(FLAGS_follow_tls_ca);
    follow.tls_server_name = absl::GetFlag(FLAGS_follow_tls_server_name);
    follow.max_backoff_seconds = absl::GetFlag(FLAGS_follow_max_backoff_seconds);
    follow.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
    char hostname[256] = {0};
    gethostname(hostname, sizeof(hostname) - 1);
    follow.name = absl::StrCat(hostname, ":", grpc_port);
    auto f = ReplicaFollower::Create(engine.get(), state_dir, follow, [&health_service](bool serving) {
      grpc::HealthCheckServiceInterface* health = health_service.load();
      if (health == nullptr) return;
      SetReplicaHealth(health, serving);
      spdlog::info("replica: {}", serving ? "SERVING" : "NOT_SERVING");
    });
    if (!f.ok()) return Fail(f.status());
    follower = std::move(*f);
  }
  std::unique_ptr<prometheus::Exposer> exposer;
  if (metrics_port != 0) {
    auto ex = StartMetricsExposer(host, metrics_port, metrics);
    if (!ex.ok()) return Fail(ex.status());
    exposer = std::move(*ex);
    if (follower) exposer->RegisterCollectable(follower->collector());
    spdlog::info("metrics on http://{}:{}/metrics", host, metrics_port);
  }

  Worker worker(store.get(), engine.get(), absl::GetFlag(FLAGS_max_job_attempts));

  ServerFacts server_facts;
  server_facts.device = *device;
  server_facts.blas = LoadedBlasLibrary();
  server_facts.allocator = LoadedAllocator();
  server_facts.state_dir = state_dir;
  server_facts.training_threads = training_threads;
  server_facts.serving_threads = serving_threads;
  server_facts.started = started;
  server_facts.auth_required = auth != nullptr;
  server_facts.inference_auth_required = auth != nullptr && absl::GetFlag(FLAGS_auth_inference);
  server_facts.tls = tls;
  server_facts.export_root = export_root;
  server_facts.import_root = import_root;
  server_facts.role = replica ? "replica" : "trainer";
  SubmitLimits limits;
  limits.max_examples = absl::GetFlag(FLAGS_max_task_examples);
  limits.max_bytes = absl::GetFlag(FLAGS_max_task_bytes);
  limits.max_queue = absl::GetFlag(FLAGS_max_queue);
  limits.max_tokens = absl::GetFlag(FLAGS_max_seq_len);
  AdaptationServiceImpl adaptation(store.get(), &worker, engine.get(), auth.get(), limits);
  AdminServiceImpl admin(server_facts, engine.get(), &adaptation, auth.get(), &worker);
  ReplicaAdaptationService replica_adaptation(trainer, auth.get());
  ReplicaAdminService replica_admin(&admin, follower.get(), trainer, auth.get());
  SchedulerOptions scheduler_options;
  scheduler_options.max_batch_size = absl::GetFlag(FLAGS_max_batch_size);
  scheduler_options.max_waiting_requests = absl::GetFlag(FLAGS_max_waiting_requests);
  scheduler_options.max_prompt_tokens = absl::GetFlag(FLAGS_max_prompt_tokens);
  scheduler_options.max_score_completions = absl::GetFlag(FLAGS_max_score_completions);
  scheduler_options.serving_threads = serving_threads;
  DecodeScheduler scheduler(engine.get(), scheduler_options,
                            [&metrics](int64_t rows) { metrics.RecordBatch(rows); });
  metrics.SetScheduler(&scheduler);
  spdlog::info("decode scheduler: batches of up to {} requests, {} may wait",
               scheduler_options.max_batch_size, scheduler_options.max_waiting_requests);
  InferenceOptions inference_options;
  inference_options.max_new_tokens = absl::GetFlag(FLAGS_max_new_tokens);
  InferenceServiceImpl inference(engine.get(), &scheduler,
                                 server_facts.inference_auth_required ? auth.get() : nullptr, &metrics,
                                 inference_options);

  std::unique_ptr<OpenAiHttpServer> http;
  if (const int http_port = absl::GetFlag(FLAGS_http_port); http_port != 0) {
    HttpOptions http_options;
    http_options.host = host;
    http_options.port = http_port;
    http_options.threads = absl::GetFlag(FLAGS_http_threads);
    http_options.max_new_tokens = inference_options.max_new_tokens;
    http_options.max_choices = scheduler_options.max_batch_size;
    http_options.max_body_bytes = absl::GetFlag(FLAGS_max_message_bytes);
    if (tls) {
      http_options.tls_cert_path = absl::GetFlag(FLAGS_tls_cert);
      http_options.tls_key_path = absl::GetFlag(FLAGS_tls_key);
    }
    auto started_http = OpenAiHttpServer::Start(engine.get(), &scheduler,
                                                server_facts.inference_auth_required ? auth.get() : nullptr,
                                                &metrics, http_options);
    if (!started_http.ok()) return Fail(started_http.status());
    http = std::move(*started_http);
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int bound_port = 0;
  builder.AddListeningPort(absl::StrCat(host, ":", grpc_port), credentials, &bound_port);
  // gRPC sets SO_REUSEPORT by default: a second server on the same port would bind it too and take
  // part of the connections. Refuse a port in use instead.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.SetMaxReceiveMessageSize(absl::GetFlag(FLAGS_max_message_bytes));
  builder.SetMaxSendMessageSize(absl::GetFlag(FLAGS_max_message_bytes));
  // Replicas keep a watch open on the trainer with keepalive pings (ReplicaFollower).
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 20000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  if (replica) {
    builder.RegisterService(&replica_admin);
    builder.RegisterService(&replica_adaptation);
  } else {
    builder.RegisterService(&admin);
    builder.RegisterService(&adaptation);
    builder.RegisterService(&replication);
  }
  builder.RegisterService(&inference);
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(metrics.MakeInterceptorFactory());
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || bound_port == 0) {
    return Fail(absl::UnavailableError(absl::StrCat("cannot listen for gRPC on ", host, ":", grpc_port,
                                                    " (port in use or address not available)")));
  }
  // Jobs interrupted by a crash are re-queued (or marked done) before the worker takes the next one.
  // A replica trains nothing.
  if (auto st = replica ? absl::OkStatus() : worker.Start(); !st.ok()) {
    server->Shutdown();
    return Fail(st);
  }
  std::vector<std::string> services = {"strata.v1.AdminService", "strata.v1.AdaptationService",
                                       "strata.v1.InferenceService"};
  if (!replica) services.push_back("strata.v1.ReplicationService");
  auto* health = server->GetHealthCheckService();
  if (replica) {
    // Ready once it serves a trainer's state (at once after a restart); it never adapts.
    SetReplicaHealth(health, follower->HasTrainerState());
    health_service = health;
    follower->Start();
    if (engine_options.data_parallel != nullptr) {
      dp_follower = std::thread([&engine, &dp_stop] { engine->FollowDataParallel(&dp_stop); });
    }
  } else {
    for (const auto& name : services) health->SetServingStatus(name, true);
    health->SetServingStatus(true);
  }
  spdlog::info("serving gRPC on {}:{}{} as {} (health, reflection, {}{})", host, bound_port,
               tls ? " with TLS" : "",
               replica ? absl::StrCat("a replica of ", trainer) : std::string("the trainer"),
               replica ? "AdminService, InferenceService; adaptation refused"
                       : "AdminService, AdaptationService, InferenceService, ReplicationService",
               auth ? (server_facts.inference_auth_required ? "; bearer token required"
                                                            : "; bearer token required except for inference")
                    : "");

  int sig = 0;
  sigwait(&signals, &sig);
  const int grace = absl::GetFlag(FLAGS_shutdown_grace_seconds);
  spdlog::info("received {}, shutting down (grace {} s)", sig == SIGTERM ? "SIGTERM" : "SIGINT", grace);
  health_service = nullptr;
  health->SetServingStatus(false);
  for (const auto& name : services) health->SetServingStatus(name, false);
  dp_stop = true;
  if (dp_follower.joinable()) dp_follower.join();
  if (follower) follower->Stop();
  replication.BeginShutdown();
  adaptation.BeginShutdown();
  // The running job stops at its next step and stays queued for the next start.
  worker.Stop();
  std::thread http_stop([&http, grace] {
    if (http) http->Stop(grace);
  });
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(grace));
  server->Wait();
  http_stop.join();
  http.reset();
  exposer.reset();
  metrics.SetScheduler(nullptr);
  spdlog::info("shutdown complete");
  return 0;
}

}  // namespace
}  // namespace strata

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Strata continual-adaptation server.\n"
      "Usage: strata-server [--model=DIR] [--grpc_port=50051] [--metrics_port=9464] [--state_dir=DIR] ...\n"
      "Every flag has an environment twin: --grpc_port <-> STRATA_GRPC_PORT.");
  // Environment first, so the command line overrides it.
  if (auto st = strata::ApplyEnvironmentTwins(strata::kFlagNames); !st.ok()) {
    std::fprintf(stderr, "strata-server: %s\n", std::string(st.message()).c_str());
    return 2;
  }
  if (auto st = strata::ParseMethodOptionFlags(&argc, argv, &strata::MethodFlags()); !st.ok()) {
    std::fprintf(stderr, "strata-server: %s\n", std::string(st.message()).c_str());
    return 2;
  }
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "--helpfull" || arg == "-help" || arg == "--helpshort") {
      std::printf("Methods (--method):\n");
      for (const strata::MethodDescriptor& m : strata::MethodDescriptors()) {
        std::printf("    %-11s %s\n", m.name.c_str(), m.summary.c_str());
      }
      std::printf("\nMethod options (also STRATA_<NAME>; from the method registry):\n%s\n",
                  strata::MethodOptionsHelp().c_str());
      std::fflush(stdout);
    }
  }
  std::vector<char*> rest = absl::ParseCommandLine(argc, argv);
  if (rest.size() > 1) {
    std::fprintf(stderr, "strata-server: unexpected argument '%s' (flags are --name=value)\n", rest[1]);
    return 2;
  }
  if (auto st = strata::ValidateFlags(); !st.ok()) {
    std::fprintf(stderr, "strata-server: %s\n", std::string(st.message()).c_str());
    return 2;
  }
  if (auto st = strata::InitLogging(absl::GetFlag(FLAGS_log_format), absl::GetFlag(FLAGS_log_level));
      !st.ok()) {
    std::fprintf(stderr, "strata-server: %s\n", std::string(st.message()).c_str());
    return 2;
  }
  return strata::Run();
}
