#include <spdlog/spdlog.h>

#include "absl/strings/str_cat.h"
#include "core/adapt/method.h"
#include "core/state/checkpoint.h"
#include "core/state/engine.h"
#include "core/state/engine_impl.h"
#include "core/util/file_util.h"
#include "core/util/status_macros.h"

// Replication: the trainer's side (the files of a published version) and the replica's (serving a
// downloaded state). The transport is server/replication_service.cc and server/replica_follower.cc.

namespace strata {

absl::StatusOr<PublishedState> Engine::PublishedStateOf(int64_t version) const {
  const Impl& s = *impl_;
  if (s.options.replica) {
    return absl::FailedPreconditionError(
        "this server is a read-only replica: the trainer keeps the versions");
  }
  const std::shared_ptr<const ServedVersion> current = Current();
  if (version == 0) version = current->version;
  PublishedState out;
  {
    absl::MutexLock lock(&s.versions_mu);
    if (!s.versions.has_value()) return absl::UnavailableError("the kept versions are not open yet");
    ASSIGN_OR_RETURN(VersionMeta meta, s.versions->Get(version));
    if (meta.status != kVersionPublished) {
      return absl::FailedPreconditionError(absl::StrCat(
          "version ", version, " is a candidate (never served): replicas serve published versions"));
    }
    out.version = version;
    out.tasks = meta.tasks;
    out.created = meta.created;
    out.dir = s.versions->Dir(version);
  }
  out.base_model_id = s.options.base_model_id;
  out.method = current->method->name();  // one method per state directory
  ASSIGN_OR_RETURN(std::vector<CheckpointFile> files, ListCheckpointFiles(out.dir));
  for (CheckpointFile& f : files) {
    // The eval splits stay with the trainer: a replica serves, it never evaluates.
    if (f.name.rfind("../", 0) == 0) continue;
    if (f.bytes < 0) {
      return absl::NotFoundError(
          absl::StrCat("version ", version, ": ", f.name, " is gone (pruned meanwhile?)"));
    }
    out.files.push_back(std::move(f));
  }
  return out;
}

absl::StatusOr<std::shared_ptr<const ServedVersion>> Engine::AdoptState(const std::string& dir) {
  Impl& s = *impl_;
  auto fail = [&dir](absl::Status st) {
    (void)RemoveAll(dir);
    return st;
  };
  if (!s.options.replica) {
    return fail(absl::FailedPreconditionError("only a replica adopts another server's state"));
  }
  absl::MutexLock train_lock(&s.train_mu);
  auto data = ReadCheckpointDir(dir);
  if (!data.ok()) return fail(data.status());
  auto built = s.BuildState(*data, absl::StrCat("the trainer's version ", data->weights_version));
  if (!built.ok()) return fail(built.status());
  // Durable first: a restart serves this state at once.
  if (auto st = ReplaceDirAtomic(dir, s.options.state_dir + "/checkpoint"); !st.ok()) return fail(st);
  std::shared_ptr<const ServedVersion> served = built->version;
  const int64_t before = Current()->version;
  s.InstallState(std::move(*built));
  spdlog::info("serving the trainer's version {} ({} task(s), method {}; was version {})", served->version,
               served->tasks_learned, served->method->name(), before);
  if (on_publish_) on_publish_();
  return served;
}

}  // namespace strata
