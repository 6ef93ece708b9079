#pragma once
// strata.v1.AdminService: transport only. Server facts, and export / import of weights and state
// confined to configured root directories (paths outside them are PERMISSION_DENIED; relative paths
// are taken relative to the root).
//
// Thread safety: handlers may run concurrently; the engine serialises what must be serialised.

#include <chrono>
#include <string>

#include "core/jobs/worker.h"
#include "core/model/model_summary.h"
#include "core/state/engine.h"
#include "server/adaptation_service.h"
#include "server/auth.h"
#include "strata/v1/admin.grpc.pb.h"

namespace strata {

struct ServerFacts {
  std::string device;
  std::string blas;
  std::string allocator;
  std::string state_dir;
  int training_threads = 0;
  int serving_threads = 0;
  std::chrono::steady_clock::time_point started;
  bool auth_required = false;
  bool inference_auth_required = false;
  bool tls = false;
  // Absolute directories export / import paths must lie under.
  std::string export_root;
  std::string import_root;
  // "trainer" or "replica" (--role).
  std::string role = "trainer";
};

class AdminServiceImpl final : public strata::v1::AdminService::Service {
 public:
  // Not owned; must outlive the service. `auth` null = no token required. `adaptation` queues the
  // adapter import jobs; `worker` brings the job journal in line after a promote or a rollback.
  AdminServiceImpl(ServerFacts facts, Engine* engine, AdaptationServiceImpl* adaptation,
                   const BearerAuth* auth, Worker* worker = nullptr);

  grpc::Status GetServerInfo(grpc::ServerContext* context, const strata::v1::GetServerInfoRequest* request,
                             strata::v1::ServerInfo* response) override;
  grpc::Status ExportWeights(grpc::ServerContext* context, const strata::v1::ExportWeightsRequest* request,
                             strata::v1::ExportWeightsResponse* response) override;
  grpc::Status ExportState(grpc::ServerContext* context, const strata::v1::ExportStateRequest* request,
                           strata::v1::ExportStateResponse* response) override;
  grpc::Status ImportAdapters(grpc::ServerContext* context, const strata::v1::ImportAdaptersRequest* request,
                              strata::v1::ImportAdaptersResponse* response) override;
  grpc::Status ListVersions(grpc::ServerContext* context, const strata::v1::ListVersionsRequest* request,
                            strata::v1::ListVersionsResponse* response) override;
  grpc::Status PromoteVersion(grpc::ServerContext* context, const strata::v1::PromoteVersionRequest* request,
                              strata::v1::VersionChange* response) override;
  grpc::Status RollbackVersion(grpc::ServerContext* context,
                               const strata::v1::RollbackVersionRequest* request,
                               strata::v1::VersionChange* response) override;

 private:
  // Converts a promote's or rollback's result and reconciles the job journal.
  grpc::Status FinishVersionChange(const absl::StatusOr<VersionChange>& change,
                                   strata::v1::VersionChange* response);

  ServerFacts facts_;
  Engine* engine_;
  AdaptationServiceImpl* adaptation_;
  const BearerAuth* auth_;
  Worker* worker_;
};

// `path` resolved against `root` (relative paths are taken relative to it), or PERMISSION_DENIED
// when it lies outside `root` (after normalisation and symlinks); `what` names the field.
absl::StatusOr<std::string> ConfinePath(const std::string& root, const std::string& path,
                                        const std::string& what);

}  // namespace strata
