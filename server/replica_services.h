#pragma once
// What a replica (strata-server --role=replica) answers instead of the trainer's services:
// every AdaptationService call, and the AdminService calls that change or report the adaptation
// state (ExportState, ImportAdapters, ListVersions, PromoteVersion, RollbackVersion), answer
// FAILED_PRECONDITION naming the trainer's address (after the bearer-token check, as on the
// trainer). GetServerInfo (with the replica's status) and ExportWeights (the weights it serves)
// are the trainer's implementation.
//
// Thread safety: as the wrapped services; the follower's Status() is thread-safe.

#include <string>

#include "server/admin_service.h"
#include "server/auth.h"
#include "server/replica_follower.h"
#include "strata/v1/adaptation.grpc.pb.h"
#include "strata/v1/admin.grpc.pb.h"

namespace strata {

// The FAILED_PRECONDITION a replica answers for `what` (e.g. "SubmitTask").
grpc::Status ReplicaRefusal(const std::string& trainer, const std::string& what);

class ReplicaAdaptationService final : public strata::v1::AdaptationService::Service {
 public:
  ReplicaAdaptationService(std::string trainer, const BearerAuth* auth)
      : trainer_(std::move(trainer)), auth_(auth) {}

  grpc::Status SubmitTask(grpc::ServerContext* context, grpc::ServerReader<strata::v1::SubmitTaskRequest>*,
                          strata::v1::Job*) override;
  grpc::Status GetJob(grpc::ServerContext* context, const strata::v1::GetJobRequest*,
                      strata::v1::Job*) override;
  grpc::Status ListJobs(grpc::ServerContext* context, const strata::v1::ListJobsRequest*,
                        strata::v1::ListJobsResponse*) override;
  grpc::Status WatchJob(grpc::ServerContext* context, const strata::v1::WatchJobRequest*,
                        grpc::ServerWriter<strata::v1::JobEvent>*) override;
  grpc::Status CancelJob(grpc::ServerContext* context, const strata::v1::CancelJobRequest*,
                         strata::v1::Job*) override;
  grpc::Status ListTasks(grpc::ServerContext* context, const strata::v1::ListTasksRequest*,
                         strata::v1::ListTasksResponse*) override;
  grpc::Status GetTask(grpc::ServerContext* context, const strata::v1::GetTaskRequest*,
                       strata::v1::Task*) override;
  grpc::Status GetReport(grpc::ServerContext* context, const strata::v1::GetReportRequest*,
                         strata::v1::Report*) override;

 private:
  grpc::Status Refuse(grpc::ServerContext* context, const char* what) const;
  const std::string trainer_;
  const BearerAuth* auth_;
};

class ReplicaAdminService final : public strata::v1::AdminService::Service {
 public:
  // Not owned; must outlive the service.
  ReplicaAdminService(AdminServiceImpl* admin, const ReplicaFollower* follower, std::string trainer,
                      const BearerAuth* auth)
      : admin_(admin), follower_(follower), trainer_(std::move(trainer)), auth_(auth) {}

  grpc::Status GetServerInfo(grpc::ServerContext* context, const strata::v1::GetServerInfoRequest* request,
                             strata::v1::ServerInfo* response) override;
  grpc::Status ExportWeights(grpc::ServerContext* context, const strata::v1::ExportWeightsRequest* request,
                             strata::v1::ExportWeightsResponse* response) override;
  grpc::Status ExportState(grpc::ServerContext* context, const strata::v1::ExportStateRequest*,
                           strata::v1::ExportStateResponse*) override;
  grpc::Status ImportAdapters(grpc::ServerContext* context, const strata::v1::ImportAdaptersRequest*,
                              strata::v1::ImportAdaptersResponse*) override;
  grpc::Status ListVersions(grpc::ServerContext* context, const strata::v1::ListVersionsRequest*,
                            strata::v1::ListVersionsResponse*) override;
  grpc::Status PromoteVersion(grpc::ServerContext* context, const strata::v1::PromoteVersionRequest*,
                              strata::v1::VersionChange*) override;
  grpc::Status RollbackVersion(grpc::ServerContext* context, const strata::v1::RollbackVersionRequest*,
                               strata::v1::VersionChange*) override;

 private:
  grpc::Status Refuse(grpc::ServerContext* context, const char* what) const;
  AdminServiceImpl* admin_;
  const ReplicaFollower* follower_;
  const std::string trainer_;
  const BearerAuth* auth_;
};

}  // namespace strata
