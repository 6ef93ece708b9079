#include "server/replication_service.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "server/status_util.h"

namespace strata {
namespace {

namespace pb = strata::v1;

double NowUnix() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

void SetTimestamp(double unix_seconds, google::protobuf::Timestamp* ts) {
  const double whole = std::floor(unix_seconds);
  ts->set_seconds(static_cast<int64_t>(whole));
  ts->set_nanos(static_cast<int32_t>((unix_seconds - whole) * 1e9));
}

void ToProto(const PublishedState& state, double served_since, pb::PublishedVersion* out) {
  out->set_version(state.version);
  out->set_base_model_id(state.base_model_id);
  out->set_method(state.method);
  for (const auto& t : state.tasks) out->add_tasks(t);
  SetTimestamp(served_since, out->mutable_served_since());
  if (state.created > 0) SetTimestamp(state.created, out->mutable_created());
  for (const CheckpointFile& f : state.files) {
    pb::StateFile* file = out->add_files();
    file->set_name(f.name);
    file->set_bytes(f.bytes);
    file->set_sha256(f.sha256);
  }
}

std::string Peer(const grpc::ServerContext& context, const std::string& name) {
  return name.empty() ? context.peer() : absl::StrCat(name, " (", context.peer(), ")");
}

}  // namespace

ReplicationServiceImpl::ReplicationServiceImpl(Engine* engine, const BearerAuth* auth, int64_t chunk_bytes)
    : engine_(engine), auth_(auth), chunk_bytes_(chunk_bytes), served_since_(NowUnix()) {}

void ReplicationServiceImpl::Published() {
  absl::MutexLock lock(&mu_);
  ++generation_;
  served_since_ = NowUnix();
}

void ReplicationServiceImpl::BeginShutdown() {
  absl::MutexLock lock(&mu_);
  shutting_down_ = true;
}

grpc::Status ReplicationServiceImpl::WatchVersions(grpc::ServerContext* context,
                                                   const pb::WatchVersionsRequest* request,
                                                   grpc::ServerWriter<pb::PublishedVersion>* writer) {
  if (auto st = Authorize(auth_, *context); !st.ok()) return st;
  const std::string who = Peer(*context, request->replica());
  spdlog::info("replica {} watches the served version", who);
  int64_t announced = 0;  // generations start at 1: the first pass announces at once
  int64_t last_version = -1;
  while (true) {
    int64_t generation = 0;
    double served_since = 0;
    {
      absl::MutexLock lock(&mu_);
      auto changed = [this, announced]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return shutting_down_ || generation_ != announced;
      };
      mu_.AwaitWithTimeout(absl::Condition(&changed), absl::Milliseconds(250));
      if (shutting_down_) {
        return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the trainer is shutting down; watch again later");
      }
      generation = generation_;
      served_since = served_since_;
    }
    if (context->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "the replica went away");
    if (generation == announced) continue;
    auto state = engine_->PublishedStateOf(0);
    if (absl::IsNotFound(state.status())) {
      // A publish is still keeping it (the announce follows its callback anyway): look again soon.
      absl::SleepFor(absl::Milliseconds(100));
      continue;
    }
    if (!state.ok()) return ToGrpcStatus(state.status());
    announced = generation;
    if (state->version == last_version) continue;
    pb::PublishedVersion msg;
    ToProto(*state, served_since, &msg);
    if (!writer->Write(msg)) return grpc::Status(grpc::StatusCode::CANCELLED, "the replica went away");
    last_version = state->version;
    spdlog::debug("announced version {} to replica {}", state->version, who);
  }
}

grpc::Status ReplicationServiceImpl::DownloadVersion(grpc::ServerContext* context,
                                                     const pb::DownloadVersionRequest* request,
                                                     grpc::ServerWriter<pb::StateChunk>* writer) {
  if (auto st = Authorize(auth_, *context); !st.ok()) return st;
  if (request->version() <= 0) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "version: must be a published version (>= 1)");
  }
  auto state = engine_->PublishedStateOf(request->version());
  if (!state.ok()) return ToGrpcStatus(state.status());
  // Every file is opened before the first byte is sent: a prune meanwhile cannot mix versions.
  std::vector<std::unique_ptr<std::ifstream>> files;
  for (const CheckpointFile& f : state->files) {
    auto in = std::make_unique<std::ifstream>(state->dir + "/" + f.name, std::ios::binary);
    if (!*in) {
      return grpc::Status(grpc::StatusCode::NOT_FOUND, absl::StrCat("version ", state->version, ": ", f.name,
                                                                    " is gone (pruned meanwhile?)"));
    }
    files.push_back(std::move(in));
  }
  std::string buffer(static_cast<size_t>(chunk_bytes_), '\0');
  for (size_t i = 0; i < files.size(); ++i) {
    const CheckpointFile& f = state->files[i];
    int64_t offset = 0;
    do {
      if (context->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "the replica went away");
      const int64_t want = std::min<int64_t>(chunk_bytes_, f.bytes - offset);
      files[i]->read(buffer.data(), want);
      if (files[i]->gcount() != want) {
        return grpc::Status(grpc::StatusCode::DATA_LOSS, absl::StrCat("version ", state->version, ": ",
                                                                      f.name, " is shorter than listed"));
      }
      pb::StateChunk chunk;
      chunk.set_file(f.name);
      chunk.set_offset(offset);
      chunk.set_data(buffer.data(), static_cast<size_t>(want));
      if (!writer->Write(chunk)) return grpc::Status(grpc::StatusCode::CANCELLED, "the replica went away");
      offset += want;
    } while (offset < f.bytes);
  }
  spdlog::info("sent version {} ({} file(s)) to {}", state->version, state->files.size(), context->peer());
  return grpc::Status::OK;
}

}  // namespace strata
