#include "server/admin_service.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <optional>

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
                                   const BearerAuth* auth, Worker* worker)
    : facts_(std::move(facts)), engine_(engine), adaptation_(adaptation), auth_(auth), worker_(worker) {}

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
  out->set_role(facts_.role);
  return grpc::Status::OK;
}

namespace {

// An export directory under the export root, not the root itself (replacing it would remove every
// other export).
absl::StatusOr<std::string> ExportDir(const std::string& root, const std::string& path) {
  auto dir = ConfinePath(root, path, "dir");
  if (!dir.ok()) return dir.status();
  std::string normal_root = AbsolutePath(root);
  while (normal_root.size() > 1 && normal_root.back() == '/') normal_root.pop_back();
  if (*dir == normal_root) {
    return absl::InvalidArgumentError(absl::StrCat("dir: '", path, "' is the export root itself (",
                                                   normal_root, "); name a directory under it"));
  }
  return dir;
}

}  // namespace

grpc::Status AdminServiceImpl::ExportWeights(grpc::ServerContext* context,
                                             const pb::ExportWeightsRequest* request,
                                             pb::ExportWeightsResponse* response) {
  if (auto st = Authorize(auth_, *context); !st.ok()) return st;
  auto dir = ExportDir(facts_.export_root, request->dir());
  if (!dir.ok()) return ToGrpcStatus(dir.status());
  const std::string& task = request->task();
  if (!task.empty() && task != "merged") {
    AdapterExportOptions options;
    options.overwrite = request->overwrite();
    options.rank = request->rank();
    auto exported = engine_->ExportAdapter(task, *dir, options);
    if (!exported.ok()) return ToGrpcStatus(exported.status());
    spdlog::info(
        "exported task '{}' ({}, weights version {}) as a PEFT LoRA adapter to {}: rank {} (exact: {}), {} "
        "modules, relative error {:.3g} (worst module {}: {:.3g})",
        task, exported->method, exported->weights_version, *dir, exported->rank, exported->exact_rank,
        exported->modules, exported->relative_error, exported->max_error_module, exported->max_module_error);
    response->set_path(*dir);
    response->set_weights_version(exported->weights_version);
    response->set_task(exported->task);
    response->set_method(exported->method);
    response->set_rank(static_cast<int32_t>(exported->rank));
    response->set_exact_rank(static_cast<int32_t>(exported->exact_rank));
    response->set_relative_error(exported->relative_error);
    response->set_modules(static_cast<int32_t>(exported->modules));
    response->set_dense(exported->dense);
    return grpc::Status::OK;
  }
  if (request->rank() != 0) {
    return ToGrpcStatus(absl::InvalidArgumentError(
        "rank: applies to a task's adapter export (task), not to the full merged model"));
  }
  const int64_t version = engine_->Current()->version;
  ExportOptions options;
  options.overwrite = request->overwrite();
  if (auto st = engine_->ExportWeights(*dir, options); !st.ok()) return ToGrpcStatus(st);
  spdlog::info("exported weights version {} to {}", version, *dir);
  response->set_path(*dir);
  response->set_weights_version(version);
  return grpc::Status::OK;
}

grpc::Status AdminServiceImpl::ExportState(grpc::ServerContext* context,
                                           const pb::ExportStateRequest* request,
                                           pb::ExportStateResponse* response) {
  if (auto st = Authorize(auth_, *context); !st.ok()) return st;
  auto dir = ExportDir(facts_.export_root, request->dir());
  if (!dir.ok()) return ToGrpcStatus(dir.status());
  const int64_t version = engine_->Current()->version;
  ExportOptions options;
  options.overwrite = request->overwrite();
  if (auto st = engine_->ExportState(*dir, options); !st.ok()) return ToGrpcStatus(st);
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

namespace {

void SetTimestamp(double unix_seconds, google::protobuf::Timestamp* ts) {
  const double whole = std::floor(unix_seconds);
  ts->set_seconds(static_cast<int64_t>(whole));
  ts->set_nanos(static_cast<int32_t>(std::min(999999999.0, (unix_seconds - whole) * 1e9)));
}

}  // namespace

grpc::Status AdminServiceImpl::ListVersions(grpc::ServerContext* context, const pb::ListVersionsRequest*,
                                            pb::ListVersionsResponse* response) {
  if (auto st = Authorize(auth_, *context); !st.ok()) return st;
  const int64_t served = engine_->Current()->version;
  for (const VersionMeta& m : engine_->Versions()) {
    pb::WeightsVersion* v = response->add_versions();
    v->set_version(m.version);
    v->set_status(m.status);
    v->set_served(m.version == served);
    v->set_based_on(m.based_on);
    if (m.created > 0) SetTimestamp(m.created, v->mutable_created());
    v->set_job_id(m.job_id);
    v->set_task(m.task);
    for (const auto& [task, score] : m.scores) {
      pb::TaskScoreAt* ts = v->add_scores();
      ts->set_task(task);
      ts->set_score(score);
    }
    v->set_reference_nll(m.reference_nll);
    for (const auto& r : m.hold_reasons) v->add_hold_reasons(r);
    v->set_bytes(m.bytes);
  }
  response->set_served_version(served);
  response->set_keep_versions(engine_->options().keep_versions);
  return grpc::Status::OK;
}

grpc::Status AdminServiceImpl::FinishVersionChange(const absl::StatusOr<VersionChange>& change,
                                                   pb::VersionChange* response) {
  if (!change.ok()) return ToGrpcStatus(change.status());
  response->set_from_version(change->from_version);
  response->set_to_version(change->to_version);
  for (const auto& t : change->tasks_added) response->add_tasks_added(t);
  for (const auto& t : change->tasks_removed) response->add_tasks_removed(t);
  response->set_seconds(change->seconds);
  if (worker_ != nullptr) {
    // The state changed durably; the journal follows (a crash before this is reconciled at start).
    auto jobs = worker_->ReconcileVersions();
    if (!jobs.ok()) {
      spdlog::error("the job journal does not reflect version {} yet: {}", change->to_version,
                    jobs.status().ToString());
    } else {
      for (const auto& id : *jobs) response->add_jobs_changed(id);
    }
  }
  return grpc::Status::OK;
}

grpc::Status AdminServiceImpl::PromoteVersion(grpc::ServerContext* context,
                                              const pb::PromoteVersionRequest* request,
                                              pb::VersionChange* response) {
  if (auto st = Authorize(auth_, *context); !st.ok()) return st;
  if (request->version() <= 0) {
    return ToGrpcStatus(absl::InvalidArgumentError(
        absl::StrCat("version: must be a kept candidate version (> 0), got ", request->version())));
  }
  return FinishVersionChange(engine_->Promote(request->version()), response);
}

grpc::Status AdminServiceImpl::RollbackVersion(grpc::ServerContext* context,
                                               const pb::RollbackVersionRequest* request,
                                               pb::VersionChange* response) {
  if (auto st = Authorize(auth_, *context); !st.ok()) return st;
  if (request->version() < 0) {
    return ToGrpcStatus(absl::InvalidArgumentError(
        absl::StrCat("version: must be a kept version, or 0 for the one before the served version, got ",
                     request->version())));
  }
  std::optional<int64_t> target;
  if (request->version() > 0) target = request->version();
  return FinishVersionChange(engine_->Rollback(target), response);
}

}  // namespace strata
