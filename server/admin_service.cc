#include "server/admin_service.h"

#include <spdlog/spdlog.h>

#include "absl/strings/str_cat.h"
#include "core/jobs/job.h"
#include "core/util/file_util.h"
#include "server/status_util.h"
#include "strata/build_info.h"

namespace strata {

namespace pb = strata::v1;

absl::StatusOr<std::string> ConfinePath(const std::string& root, const std::string& path,
                                        const std::string& what) {
  if (path.empty()) return absl::InvalidArgumentError(absl::StrCat(what, ": must not be empty"));
  std::string full = AbsolutePath(path.front() == '/' ? path : root + "/" + path);
  // "adapter-a/" names the directory adapter-a (its name becomes a task's name on import).
  while (full.size() > 1 && full.back() == '/') full.pop_back();
  if (!IsWithinRoot(root, full)) {
    return absl::PermissionDeniedError(
        absl::StrCat(what, ": '", path, "' is outside ", root, " (the server's configured root)"));
  }
  return full;
}

AdminServiceImpl::AdminServiceImpl(ServerFacts facts, Engine* engine, AdaptationServiceImpl* adaptation,
                                   const BearerAuth* auth)
    : facts_(std::move(facts)), engine_(engine), adaptation_(adaptation), auth_(auth) {}

grpc::Status AdminServiceImpl::GetServerInfo(grpc::ServerContext* context, const pb::GetServerInfoRequest*,
                                             pb::ServerInfo* out) {
  if (auto st = Authorize(auth_, *context); !st.ok()) return st;
  out->set_version(kVersion);
  out->set_git_commit(kGitCommit);
  out->set_build_type(kBuildType);
  out->set_compiler(kCompiler);
  out->set_torch_version(kTorchVersion);
  out->set_device(facts_.device);
  out->set_blas(facts_.blas);
  out->set_allocator(facts_.allocator);
  out->set_state_dir(facts_.state_dir);
  out->set_training_threads(facts_.training_threads);
  out->set_serving_threads(facts_.serving_threads);
  out->set_uptime_seconds(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - facts_.started).count());
  const ModelSummary& m = engine_->summary();
  auto* mi = out->mutable_model();
  mi->set_loaded(m.loaded);
  if (m.loaded) {
    mi->set_name(m.name);
    mi->set_path(m.path);
    mi->set_architecture(m.architecture);
    mi->set_parameter_count(m.parameter_count);
    mi->set_hidden_size(static_cast<int32_t>(m.hidden_size));
    mi->set_num_layers(static_cast<int32_t>(m.num_layers));
    mi->set_vocab_size(static_cast<int32_t>(m.vocab_size));
    mi->set_dtype(m.dtype);
  }
  auto current = engine_->Current();
  out->set_weights_version(current->version);
  out->set_tasks_learned(current->tasks_learned);
  out->set_method(engine_->method());
  out->set_auth_required(facts_.auth_required);
  out->set_inference_auth_required(facts_.inference_auth_required);
  out->set_tls(facts_.tls);
  return grpc::Status::OK;
}

grpc::Status AdminServiceImpl::ExportWeights(grpc::ServerContext* context,
                                             const pb::ExportWeightsRequest* request,
                                             pb::ExportWeightsResponse* response) {
  if (auto st = Authorize(auth_, *context); !st.ok()) return st;
  auto dir = ConfinePath(facts_.export_root, request->dir(), "dir");
  if (!dir.ok()) return ToGrpcStatus(dir.status());
  const int64_t version = engine_->Current()->version;
  if (auto st = engine_->ExportWeights(*dir); !st.ok()) return ToGrpcStatus(st);
  spdlog::info("exported weights version {} to {}", version, *dir);
  response->set_path(*dir);
  response->set_weights_version(version);
  return grpc::Status::OK;
}

grpc::Status AdminServiceImpl::ExportState(grpc::ServerContext* context,
                                           const pb::ExportStateRequest* request,
                                           pb::ExportStateResponse* response) {
  if (auto st = Authorize(auth_, *context); !st.ok()) return st;
  auto dir = ConfinePath(facts_.export_root, request->dir(), "dir");
  if (!dir.ok()) return ToGrpcStatus(dir.status());
  const int64_t version = engine_->Current()->version;
  if (auto st = engine_->ExportState(*dir); !st.ok()) return ToGrpcStatus(st);
  spdlog::info("exported the adaptation state (weights version {}) to {}", version, *dir);
  response->set_path(*dir);
  response->set_weights_version(version);
  return grpc::Status::OK;
}

grpc::Status AdminServiceImpl::ImportAdapters(grpc::ServerContext* context,
                                              const pb::ImportAdaptersRequest* request,
                                              pb::ImportAdaptersResponse* response) {
  if (auto st = Authorize(auth_, *context); !st.ok()) return st;
  if (request->dirs_size() == 0) {
    return ToGrpcStatus(absl::InvalidArgumentError("dirs: at least one adapter directory is required"));
  }
  std::vector<std::string> dirs;
  for (int i = 0; i < request->dirs_size(); ++i) {
    auto dir = ConfinePath(facts_.import_root, request->dirs(i), absl::StrCat("dirs[", i, "]"));
    if (!dir.ok()) return ToGrpcStatus(dir.status());
    dirs.push_back(*dir);
  }
  // Everything the job will read is checked now; the import then runs on the training worker like a
  // task (this RPC never waits for training).
  auto tasks = engine_->CheckImport(dirs);
  if (!tasks.ok()) return ToGrpcStatus(tasks.status());
  TaskSpecification spec;
  spec.name = tasks->front();
  spec.import_dirs = dirs;
  spec.description = absl::StrCat("import of ", dirs.size(), " PEFT adapter(s)");
  if (auto st = ValidateTaskSpecification(spec); !st.ok()) return ToGrpcStatus(st);
  auto job = adaptation_->QueueJob(spec, {}, {});
  if (!job.ok()) return ToGrpcStatus(job.status());
  spdlog::info("job {}: import of {} adapter(s) queued", job->id, dirs.size());
  response->set_job_id(job->id);
  for (const auto& d : dirs) response->add_paths(d);
  return grpc::Status::OK;
}

}  // namespace strata
