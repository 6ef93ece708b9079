#pragma once
// The replica's side of replication (strata-server --role=replica --follow=HOST:PORT): one thread
// watches the trainer's ReplicationService and, for each announced version whose state files differ
// from the ones served here, downloads them into <state_dir>/.checkpoint-tmp-replica-*, checks every
// file's size and SHA-256, writes the checkpoint manifest and hands the directory to
// Engine::AdoptState (verify, build, rename to <state_dir>/checkpoint, swap Current()).
//
// The trainer going away changes nothing that is served: the replica keeps its version, logs the
// loss and reconnects with exponential backoff (with jitter, up to max_backoff_seconds); after
// its own restart it serves the last downloaded state at once (the engine loads it) and catches
// up. Readiness (`set_serving`): SERVING once it serves a trainer's state (at once after a
// restart); NOT_SERVING while the trainer serves another base model (logged with both names), as
// a replica must never answer with a model the trainer does not have.
//
// Metrics (scrape time, collector()): strata_replica_connected, strata_replica_trainer_version,
// strata_replica_lag_versions, strata_replica_lag_seconds, strata_replica_syncs_total{result},
// strata_replica_last_sync_seconds (duration of the last download + swap).
//
// Thread safety: Status() and the collector from any thread; Start/Stop from one thread.

#include <grpcpp/grpcpp.h>
#include <prometheus/collectable.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/state/engine.h"
#include "strata/v1/replication.grpc.pb.h"

namespace strata {

struct FollowOptions {
  std::string trainer;          // HOST:PORT (--follow)
  std::string token_file;       // bearer token presented to the trainer (--follow_token_file)
  std::string tls_ca;           // PEM roots: TLS to the trainer when set (--follow_tls_ca)
  std::string tls_server_name;  // overrides the name checked against the trainer's certificate
  std::string name;             // this replica's name in the trainer's log
  double initial_backoff_seconds = 0.5;
  double max_backoff_seconds = 30;
  int max_message_bytes = 16 << 20;
};

// What `strata info` shows of a replica (ServerInfo.replica).
struct ReplicaStatus {
  std::string trainer;
  bool connected = false;
  int64_t trainer_version = 0;
  int64_t lag_versions = 0;
  double lag_seconds = 0;
  std::string last_error;
  double last_sync = 0;  // Unix seconds; 0 = never in this process
};

class ReplicaFollower {
 public:
  // Reads the token and CA files (INVALID_ARGUMENT / NOT_FOUND naming the flag) and what this
  // replica serves now. `engine` must be a replica engine and outlive the follower.
  static absl::StatusOr<std::unique_ptr<ReplicaFollower>> Create(Engine* engine, std::string state_dir,
                                                                 FollowOptions options,
                                                                 std::function<void(bool)> set_serving);
  ~ReplicaFollower();

  // Whether this replica serves a trainer's state already (its readiness at start).
  bool HasTrainerState() const;
  void Start();
  // Cancels the open calls and joins the thread.
  void Stop();

  ReplicaStatus Status() const;
  std::shared_ptr<prometheus::Collectable> collector() { return collector_; }

 private:
  class Collector;
  ReplicaFollower(Engine* engine, std::string state_dir, FollowOptions options,
                  std::function<void(bool)> set_serving);
  void Run();
  // One watch: returns after the stream ends; true when the trainer answered at least once.
  bool WatchOnce();
  // A version the trainer announced: syncs it unless served already. Not OK: reconnect.
  absl::Status OnAnnounce(const strata::v1::PublishedVersion& announced);
  // Downloads, verifies and adopts `announced`.
  absl::Status Sync(const strata::v1::PublishedVersion& announced);
  void PrepareContext(grpc::ClientContext* ctx) const;
  // Registers a call's context for Stop() (false: stopping, do not start the call).
  bool Track(grpc::ClientContext* ctx);
  void Untrack(grpc::ClientContext* ctx);
  void SetServing(bool serving);

  Engine* engine_;
  const std::string state_dir_;
  const FollowOptions options_;
  const std::function<void(bool)> set_serving_;
  std::string token_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<strata::v1::ReplicationService::Stub> stub_;
  std::shared_ptr<prometheus::Collectable> collector_;
  std::thread thread_;

  mutable absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::set<grpc::ClientContext*> calls_ ABSL_GUARDED_BY(mu_);
  bool connected_ ABSL_GUARDED_BY(mu_) = false;
  bool serving_ ABSL_GUARDED_BY(mu_) = false;
  bool model_mismatch_ ABSL_GUARDED_BY(mu_) = false;
  // The served state's files ("name:sha256;..." sorted; empty: no trainer state yet).
  std::string served_digest_ ABSL_GUARDED_BY(mu_);
  int64_t trainer_version_ ABSL_GUARDED_BY(mu_) = 0;
  std::string trainer_digest_ ABSL_GUARDED_BY(mu_);
  double trainer_served_since_ ABSL_GUARDED_BY(mu_) = 0;
  std::string last_error_ ABSL_GUARDED_BY(mu_);
  double last_sync_ ABSL_GUARDED_BY(mu_) = 0;
  double last_sync_seconds_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t syncs_ok_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t syncs_failed_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace strata
