#include "server/replica_services.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace strata {
namespace {

namespace pb = strata::v1;

}  // namespace

grpc::Status ReplicaRefusal(const std::string& trainer, const std::string& what) {
  return grpc::Status(
      grpc::StatusCode::FAILED_PRECONDITION,
      absl::StrCat("this server is a read-only replica (inference only); ", what,
                   " goes to the trainer it follows at ", trainer, " (strata --server ", trainer, ")"));
}

// ---- AdaptationService ----------------------------------------------------------------------------

grpc::Status ReplicaAdaptationService::Refuse(grpc::ServerContext* context, const char* what) const {
  if (auto st = Authorize(auth_, *context); !st.ok()) return st;
  return ReplicaRefusal(trainer_, what);
}

grpc::Status ReplicaAdaptationService::SubmitTask(grpc::ServerContext* context,
                                                  grpc::ServerReader<pb::SubmitTaskRequest>*, pb::Job*) {
  return Refuse(context, "SubmitTask");
}
grpc::Status ReplicaAdaptationService::GetJob(grpc::ServerContext* context, const pb::GetJobRequest*,
                                              pb::Job*) {
  return Refuse(context, "GetJob");
}
grpc::Status ReplicaAdaptationService::ListJobs(grpc::ServerContext* context, const pb::ListJobsRequest*,
                                                pb::ListJobsResponse*) {
  return Refuse(context, "ListJobs");
}
grpc::Status ReplicaAdaptationService::WatchJob(grpc::ServerContext* context, const pb::WatchJobRequest*,
                                                grpc::ServerWriter<pb::JobEvent>*) {
  return Refuse(context, "WatchJob");
}
grpc::Status ReplicaAdaptationService::CancelJob(grpc::ServerContext* context, const pb::CancelJobRequest*,
                                                 pb::Job*) {
  return Refuse(context, "CancelJob");
}
grpc::Status ReplicaAdaptationService::ListTasks(grpc::ServerContext* context, const pb::ListTasksRequest*,
                                                 pb::ListTasksResponse*) {
  return Refuse(context, "ListTasks");
}
grpc::Status ReplicaAdaptationService::GetTask(grpc::ServerContext* context, const pb::GetTaskRequest*,
                                               pb::Task*) {
  return Refuse(context, "GetTask");
}
grpc::Status ReplicaAdaptationService::GetReport(grpc::ServerContext* context, const pb::GetReportRequest*,
                                                 pb::Report*) {
  return Refuse(context, "GetReport");
}

// ---- AdminService ---------------------------------------------------------------------------------

grpc::Status ReplicaAdminService::Refuse(grpc::ServerContext* context, const char* what) const {
  if (auto st = Authorize(auth_, *context); !st.ok()) return st;
  return ReplicaRefusal(trainer_, what);
}

grpc::Status ReplicaAdminService::GetServerInfo(grpc::ServerContext* context,
                                                const pb::GetServerInfoRequest* request,
                                                pb::ServerInfo* response) {
  grpc::Status st = admin_->GetServerInfo(context, request, response);
  if (!st.ok() || follower_ == nullptr) return st;
  const ReplicaStatus s = follower_->Status();
  pb::ReplicaStatus* out = response->mutable_replica();
  out->set_trainer(s.trainer);
  out->set_connected(s.connected);
  out->set_trainer_version(s.trainer_version);
  out->set_lag_versions(s.lag_versions);
  out->set_lag_seconds(s.lag_seconds);
  out->set_last_error(s.last_error);
  if (s.last_sync > 0) {
    const double whole = std::floor(s.last_sync);
    out->mutable_last_sync()->set_seconds(static_cast<int64_t>(whole));
    out->mutable_last_sync()->set_nanos(static_cast<int32_t>((s.last_sync - whole) * 1e9));
  }
  return st;
}

grpc::Status ReplicaAdminService::ExportWeights(grpc::ServerContext* context,
                                                const pb::ExportWeightsRequest* request,
                                                pb::ExportWeightsResponse* response) {
  return admin_->ExportWeights(context, request, response);
}
grpc::Status ReplicaAdminService::ExportState(grpc::ServerContext* context, const pb::ExportStateRequest*,
                                              pb::ExportStateResponse*) {
  return Refuse(context, "ExportState");
}
grpc::Status ReplicaAdminService::ImportAdapters(grpc::ServerContext* context,
                                                 const pb::ImportAdaptersRequest*,
                                                 pb::ImportAdaptersResponse*) {
  return Refuse(context, "ImportAdapters");
}
grpc::Status ReplicaAdminService::ListVersions(grpc::ServerContext* context, const pb::ListVersionsRequest*,
                                               pb::ListVersionsResponse*) {
  return Refuse(context, "ListVersions");
}
grpc::Status ReplicaAdminService::PromoteVersion(grpc::ServerContext* context,
                                                 const pb::PromoteVersionRequest*, pb::VersionChange*) {
  return Refuse(context, "PromoteVersion");
}
grpc::Status ReplicaAdminService::RollbackVersion(grpc::ServerContext* context,
                                                  const pb::RollbackVersionRequest*, pb::VersionChange*) {
  return Refuse(context, "RollbackVersion");
}

}  // namespace strata
