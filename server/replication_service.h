#pragma once
// strata.v1.ReplicationService (trainer side): announces the served weights version to replicas
// (WatchVersions: the served one at once, then each publish, promote and rollback) and streams a
// published version's state files in chunks (DownloadVersion: the files Engine::PublishedStateOf
// lists, read from the kept version's directory, whose files are never modified in place).
// Transport only: the engine says what a version's state is.
//
// Thread safety: handlers may run concurrently; Published() and BeginShutdown() from any thread.
// Each open WatchVersions holds one RPC thread and wakes at least every 250 ms (cancellation).

#include <atomic>
#include <cstdint>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "core/state/engine.h"
#include "server/auth.h"
#include "strata/v1/replication.grpc.pb.h"

namespace strata {

class ReplicationServiceImpl final : public strata::v1::ReplicationService::Service {
 public:
  // Not owned; must outlive the service. `auth` null = no token required.
  ReplicationServiceImpl(Engine* engine, const BearerAuth* auth, int64_t chunk_bytes = int64_t{1} << 20);

  // A new version is served (Engine::SetOnPublish): every watch announces it.
  void Published();
  // Ends every watch with UNAVAILABLE (replicas keep serving and reconnect).
  void BeginShutdown();

  grpc::Status WatchVersions(grpc::ServerContext* context, const strata::v1::WatchVersionsRequest* request,
                             grpc::ServerWriter<strata::v1::PublishedVersion>* writer) override;
  grpc::Status DownloadVersion(grpc::ServerContext* context,
                               const strata::v1::DownloadVersionRequest* request,
                               grpc::ServerWriter<strata::v1::StateChunk>* writer) override;

 private:
  Engine* engine_;
  const BearerAuth* auth_;
  const int64_t chunk_bytes_;
  absl::Mutex mu_;
  int64_t generation_ ABSL_GUARDED_BY(mu_) = 1;  // bumped by every publish
  double served_since_ ABSL_GUARDED_BY(mu_);     // Unix seconds the served version began being served
  bool shutting_down_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace strata
