#include "server/replica_follower.h"

#include <prometheus/client_metric.h>
#include <prometheus/metric_family.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <random>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "core/state/checkpoint.h"
#include "core/util/file_util.h"
#include "core/util/status_macros.h"
#include "server/metrics.h"

namespace strata {
namespace {

namespace pb = strata::v1;

double NowUnix() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

double ToUnix(const google::protobuf::Timestamp& ts) { return ts.seconds() + ts.nanos() * 1e-9; }

std::string Digest(std::vector<std::pair<std::string, std::string>> files) {
  std::sort(files.begin(), files.end());
  std::string out;
  for (const auto& [name, sha] : files) absl::StrAppend(&out, name, ":", sha, ";");
  return out;
}

std::string Digest(const pb::PublishedVersion& v) {
  std::vector<std::pair<std::string, std::string>> files;
  for (const auto& f : v.files()) files.emplace_back(f.name(), f.sha256());
  return Digest(std::move(files));
}

// A file name the trainer sends must stay inside the download directory.
bool SafeName(const std::string& name) {
  return !name.empty() && name.find('/') == std::string::npos && name != "." && name != ".." &&
         name != "manifest.json";
}

absl::Status FromGrpc(const grpc::Status& st, const std::string& what) {
  return absl::Status(static_cast<absl::StatusCode>(st.error_code()),
                      absl::StrCat(what, ": ", st.error_message()));
}

}  // namespace

class ReplicaFollower::Collector : public prometheus::Collectable {
 public:
  explicit Collector(const ReplicaFollower* follower) : follower_(follower) {}
  std::vector<prometheus::MetricFamily> Collect() const override {
    const ReplicaStatus s = follower_->Status();
    int64_t ok = 0, failed = 0;
    double last_seconds = 0;
    {
      absl::MutexLock lock(&follower_->mu_);
      ok = follower_->syncs_ok_;
      failed = follower_->syncs_failed_;
      last_seconds = follower_->last_sync_seconds_;
    }
    std::vector<prometheus::MetricFamily> out;
    out.push_back(GaugeFamily("strata_replica_connected",
                              "1 while this replica's watch of the trainer is open.", s.connected ? 1 : 0));
    out.push_back(GaugeFamily("strata_replica_trainer_version",
                              "The weights version the trainer serves, as last announced (0: never heard).",
                              static_cast<double>(s.trainer_version)));
    out.push_back(
        GaugeFamily("strata_replica_lag_versions",
                    "Versions this replica is behind the trainer (0 when it serves the trainer's version).",
                    static_cast<double>(s.lag_versions)));
    out.push_back(
        GaugeFamily("strata_replica_lag_seconds",
                    "Seconds since the trainer began serving a version this replica does not serve yet "
                    "(0 when up to date).",
                    s.lag_seconds));
    out.push_back(GaugeFamily("strata_replica_last_sync_duration_seconds",
                              "Seconds the last sync took (download, verification and swap).", last_seconds));
    prometheus::MetricFamily syncs;
    syncs.name = "strata_replica_syncs_total";
    syncs.help = "Versions downloaded from the trainer, by result (ok, failed).";
    syncs.type = prometheus::MetricType::Counter;
    for (const auto& [result, n] : {std::pair<const char*, int64_t>{"ok", ok}, {"failed", failed}}) {
      prometheus::ClientMetric m;
      m.label.push_back({"result", result});
      m.counter.value = static_cast<double>(n);
      syncs.metric.push_back(m);
    }
    out.push_back(std::move(syncs));
    return out;
  }

 private:
  const ReplicaFollower* follower_;
};

ReplicaFollower::ReplicaFollower(Engine* engine, std::string state_dir, FollowOptions options,
                                 std::function<void(bool)> set_serving)
    : engine_(engine),
      state_dir_(std::move(state_dir)),
      options_(std::move(options)),
      set_serving_(std::move(set_serving)) {}

absl::StatusOr<std::unique_ptr<ReplicaFollower>> ReplicaFollower::Create(
    Engine* engine, std::string state_dir, FollowOptions options, std::function<void(bool)> set_serving) {
  std::unique_ptr<ReplicaFollower> f(
      new ReplicaFollower(engine, std::move(state_dir), std::move(options), std::move(set_serving)));
  const FollowOptions& o = f->options_;
  if (!o.token_file.empty()) {
    auto text = ReadFile(o.token_file);
    if (!text.ok()) {
      return absl::Status(text.status().code(),
                          absl::StrCat("--follow_token_file: ", text.status().message()));
    }
    f->token_ = std::string(absl::StripAsciiWhitespace(*text));
    if (f->token_.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--follow_token_file: ", o.token_file, " holds no token"));
    }
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(o.max_message_bytes);
  // gRPC's own reconnect backoff (default up to 120 s) stays within ours.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, static_cast<int>(o.initial_backoff_seconds * 1000));
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, static_cast<int>(o.initial_backoff_seconds * 1000));
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, static_cast<int>(o.max_backoff_seconds * 1000));
  // A trainer that vanishes without closing the connection (node lost) is noticed by keepalive.
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 30000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (!o.tls_ca.empty()) {
    auto pem = ReadFile(o.tls_ca);
    if (!pem.ok()) {
      return absl::Status(pem.status().code(), absl::StrCat("--follow_tls_ca: ", pem.status().message()));
    }
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = *pem;
    credentials = grpc::SslCredentials(ssl);
    if (!o.tls_server_name.empty()) args.SetSslTargetNameOverride(o.tls_server_name);
  }
  f->channel_ = grpc::CreateCustomChannel(o.trainer, credentials, args);
  f->stub_ = pb::ReplicationService::NewStub(f->channel_);
  f->collector_ = std::make_shared<Collector>(f.get());
  const std::string checkpoint = f->state_dir_ + "/checkpoint";
  if (PathExists(checkpoint)) {
    auto files = ListCheckpointFiles(checkpoint);
    if (files.ok()) {
      std::vector<std::pair<std::string, std::string>> named;
      for (const CheckpointFile& file : *files) named.emplace_back(file.name, file.sha256);
      absl::MutexLock lock(&f->mu_);
      f->served_digest_ = Digest(std::move(named));
    }
  }
  return f;
}

ReplicaFollower::~ReplicaFollower() { Stop(); }

bool ReplicaFollower::HasTrainerState() const {
  absl::MutexLock lock(&mu_);
  return !served_digest_.empty();
}

void ReplicaFollower::Start() {
  {
    absl::MutexLock lock(&mu_);
    serving_ = !served_digest_.empty();
  }
  spdlog::info("replica of the trainer at {}: {}", options_.trainer,
               HasTrainerState() ? absl::StrCat("serving its version ", engine_->Current()->version,
                                                " from the state directory; catching up")
                                 : std::string("no state from it yet; not ready until the first sync"));
  thread_ = std::thread([this] { Run(); });
}

void ReplicaFollower::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    for (grpc::ClientContext* ctx : calls_) ctx->TryCancel();
  }
  if (thread_.joinable()) thread_.join();
}

ReplicaStatus ReplicaFollower::Status() const {
  const int64_t served = engine_->Current()->version;
  absl::MutexLock lock(&mu_);
  ReplicaStatus s;
  s.trainer = options_.trainer;
  s.connected = connected_;
  s.trainer_version = trainer_version_;
  s.last_error = last_error_;
  s.last_sync = last_sync_;
  const bool behind = !trainer_digest_.empty() && trainer_digest_ != served_digest_;
  if (behind) {
    s.lag_versions = std::max<int64_t>(1, trainer_version_ - served);
    s.lag_seconds = std::max(0.0, NowUnix() - trainer_served_since_);
  }
  return s;
}

void ReplicaFollower::PrepareContext(grpc::ClientContext* ctx) const {
  if (!token_.empty()) ctx->AddMetadata("authorization", "Bearer " + token_);
}

bool ReplicaFollower::Track(grpc::ClientContext* ctx) {
  absl::MutexLock lock(&mu_);
  if (stopping_) return false;
  calls_.insert(ctx);
  return true;
}

void ReplicaFollower::Untrack(grpc::ClientContext* ctx) {
  absl::MutexLock lock(&mu_);
  calls_.erase(ctx);
}

void ReplicaFollower::SetServing(bool serving) {
  {
    absl::MutexLock lock(&mu_);
    if (serving_ == serving) return;
    serving_ = serving;
  }
  if (set_serving_) set_serving_(serving);
}

void ReplicaFollower::Run() {
  std::mt19937 rng(std::random_device{}());
  double backoff = options_.initial_backoff_seconds;
  while (true) {
    const bool answered = WatchOnce();
    if (answered) backoff = options_.initial_backoff_seconds;
    std::string why;
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;
      why = last_error_;
    }
    // Jitter spreads the reconnects of many replicas after a trainer restart.
    const double wait = backoff * std::uniform_real_distribution<double>(0.8, 1.2)(rng);
    spdlog::warn("replica: trainer {}: {}; keeping version {}, reconnecting in {:.1f} s", options_.trainer,
                 why, engine_->Current()->version, wait);
    {
      absl::MutexLock lock(&mu_);
      auto stopping = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_; };
      mu_.AwaitWithTimeout(absl::Condition(&stopping), absl::Seconds(wait));
      if (stopping_) return;
    }
    backoff = std::min(backoff * 2, options_.max_backoff_seconds);
  }
}

bool ReplicaFollower::WatchOnce() {
  grpc::ClientContext ctx;
  PrepareContext(&ctx);
  if (!Track(&ctx)) return false;
  pb::WatchVersionsRequest request;
  request.set_replica(options_.name);
  auto reader = stub_->WatchVersions(&ctx, request);
  pb::PublishedVersion announced;
  bool answered = false;
  absl::Status failed;
  while (reader->Read(&announced)) {
    if (!answered) {
      answered = true;
      absl::MutexLock lock(&mu_);
      connected_ = true;
      spdlog::info("replica: connected to the trainer at {}; it serves version {}", options_.trainer,
                   announced.version());
    }
    failed = OnAnnounce(announced);
    if (!failed.ok()) {
      ctx.TryCancel();
      break;
    }
  }
  grpc::Status st = reader->Finish();
  Untrack(&ctx);
  absl::MutexLock lock(&mu_);
  connected_ = false;
  if (!failed.ok()) {
    last_error_ = std::string(failed.message());
  } else if (!stopping_) {
    last_error_ =
        st.ok() ? "the trainer ended the watch"
                : absl::StrCat(answered ? "lost the trainer" : "cannot reach the trainer", " (",
                               st.error_message().empty() ? "no reason given" : st.error_message(), ")");
  }
  return answered;
}

absl::Status ReplicaFollower::OnAnnounce(const pb::PublishedVersion& announced) {
  const std::string digest = Digest(announced);
  const std::string& ours = engine_->options().base_model_id;
  {
    absl::MutexLock lock(&mu_);
    trainer_version_ = announced.version();
    trainer_digest_ = digest;
    trainer_served_since_ = ToUnix(announced.served_since());
  }
  if (announced.base_model_id() != ours) {
    const std::string message = absl::StrCat("the trainer at ", options_.trainer, " serves base model '",
                                             announced.base_model_id(), "' but this replica runs '", ours,
                                             "': start the replica with the trainer's --model; not serving");
    bool first = false;
    {
      absl::MutexLock lock(&mu_);
      first = !model_mismatch_;
      model_mismatch_ = true;
      last_error_ = message;
    }
    if (first) spdlog::error("replica: {}", message);
    SetServing(false);
    return absl::OkStatus();  // keep watching: a restarted trainer may run the right model
  }
  bool up_to_date = false;
  {
    absl::MutexLock lock(&mu_);
    model_mismatch_ = false;
    up_to_date = digest == served_digest_;
  }
  if (!up_to_date) {
    const auto t0 = std::chrono::steady_clock::now();
    absl::Status st = Sync(announced);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    absl::MutexLock lock(&mu_);
    if (!st.ok()) {
      ++syncs_failed_;
      spdlog::error("replica: cannot sync version {} from the trainer at {}: {}", announced.version(),
                    options_.trainer, st.ToString());
      return st;
    }
    ++syncs_ok_;
    served_digest_ = digest;
    last_sync_ = NowUnix();
    last_sync_seconds_ = seconds;
    last_error_.clear();
    spdlog::info(
        "replica: synced version {} from the trainer in {:.3f} s ({:.3f} s after the trainer served it)",
        announced.version(), seconds, std::max(0.0, last_sync_ - trainer_served_since_));
  }
  SetServing(true);
  return absl::OkStatus();
}

absl::Status ReplicaFollower::Sync(const pb::PublishedVersion& announced) {
  std::vector<CheckpointFile> files;
  for (const auto& f : announced.files()) {
    if (!SafeName(f.name()) || f.bytes() < 0) {
      return absl::DataLossError(absl::StrCat("the trainer lists a bad file '", f.name(), "'"));
    }
    files.push_back({f.name(), f.bytes(), f.sha256()});
  }
  if (files.empty()) return absl::DataLossError("the trainer lists no state files");
  const std::string tmp =
      absl::StrCat(state_dir_, "/.checkpoint-tmp-replica-", std::random_device{}(), "-", announced.version());
  RETURN_IF_ERROR(MakeDirs(tmp));
  auto fail = [&tmp](absl::Status st) {
    (void)RemoveAll(tmp);
    return st;
  };
  grpc::ClientContext ctx;
  PrepareContext(&ctx);
  if (!Track(&ctx)) return fail(absl::CancelledError("the replica is stopping"));
  pb::DownloadVersionRequest request;
  request.set_version(announced.version());
  auto reader = stub_->DownloadVersion(&ctx, request);
  pb::StateChunk chunk;
  size_t index = 0;
  int64_t written = 0;
  std::ofstream out;
  absl::Status bad;
  while (reader->Read(&chunk)) {
    // Chunks come file by file, in the announced order, each from offset 0.
    if (index < files.size() && chunk.file() != files[index].name && written == files[index].bytes) {
      out.close();
      ++index;
      written = 0;
    }
    if (index >= files.size() || chunk.file() != files[index].name || chunk.offset() != written ||
        written + static_cast<int64_t>(chunk.data().size()) > files[index].bytes) {
      bad = absl::DataLossError(
          absl::StrCat("unexpected chunk of '", chunk.file(), "' at offset ", chunk.offset()));
      ctx.TryCancel();
      break;
    }
    if (!out.is_open()) out.open(tmp + "/" + files[index].name, std::ios::binary | std::ios::trunc);
    out.write(chunk.data().data(), static_cast<std::streamsize>(chunk.data().size()));
    if (!out) {
      bad = absl::InternalError(absl::StrCat("cannot write ", tmp, "/", files[index].name));
      ctx.TryCancel();
      break;
    }
    written += static_cast<int64_t>(chunk.data().size());
  }
  out.close();
  grpc::Status st = reader->Finish();
  Untrack(&ctx);
  if (!bad.ok()) return fail(bad);
  if (!st.ok()) return fail(FromGrpc(st, absl::StrCat("download of version ", announced.version())));
  if (index + 1 != files.size() || written != files.back().bytes) {
    return fail(
        absl::DataLossError(absl::StrCat("download of version ", announced.version(), " ended early")));
  }
  for (const CheckpointFile& f : files) {
    const std::string path = tmp + "/" + f.name;
    auto sha = Sha256File(path);
    if (!sha.ok()) return fail(sha.status());
    if (*sha != f.sha256) {
      return fail(absl::DataLossError(absl::StrCat("version ", announced.version(), ": ", f.name,
                                                   " arrived corrupted (SHA-256 mismatch)")));
    }
    if (auto s = FsyncPath(path); !s.ok()) return fail(s);
  }
  if (auto s = WriteCheckpointManifest(tmp, announced.version(), files); !s.ok()) return fail(s);
  // Verifies again as a checkpoint, builds, renames into place and swaps (removes tmp on failure).
  return engine_->AdoptState(tmp).status();
}

}  // namespace strata
