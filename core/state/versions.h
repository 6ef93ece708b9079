#pragma once
// The kept weights versions: <state_dir>/versions/v<N>/{checkpoint files, version.json}. Each is a
// complete adaptation state (the checkpoint files as SaveCheckpoint wrote them, hard-linked from
// the checkpoint when it can: the files are never modified in place, so a link costs no disk) and
// its description (version.json: status, the task and job that made it, every task's score, the
// gate's reasons for a candidate).
//
// A version directory is built under <state_dir>/.version-tmp-*, fsynced, then renamed into place,
// so it is either complete or absent after a crash (Open removes the temp directories). Removing a
// version renames it to .version-trash-* first, so a half-removed version is never listed.
// `next_version` (versions/next_version) is the lowest version number never used: a version
// number names one state forever, even after a rollback discarded it.
//
// Statuses: "published" (served now or before; rollback targets) and "candidate" (trained and
// evaluated, refused by the publish gate; promote publishes it).
//
// Thread safety: thread-compatible; the engine calls it under its training lock.

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/state/checkpoint.h"

namespace strata {

struct VersionMeta {
  int64_t version = 0;
  std::string status;              // "published" or "candidate"
  int64_t based_on = 0;            // the served version this one was trained on (0 = unknown / the base)
  double created = 0;              // Unix seconds
  std::string job_id;              // the job that made it (empty for a state kept before versions existed)
  std::string task;                // the task that job added
  std::vector<std::string> tasks;  // every task the state has, in order
  std::vector<std::pair<std::string, double>> scores;  // each task's score in the users' view
  double reference_nll = 0;                            // NaN when not measured
  std::vector<std::string> hold_reasons;               // a candidate's gate reasons
  int64_t bytes = 0;                                   // disk bytes of its state files
};

inline constexpr char kVersionPublished[] = "published";
inline constexpr char kVersionCandidate[] = "candidate";

class VersionStore {
 public:
  // Opens (creating) <state_dir>/versions and removes what an interrupted write or removal left.
  static absl::StatusOr<VersionStore> Open(const std::string& state_dir);

  // Keeps the checkpoint files in `checkpoint_dir` (a direct child of the state directory) as
  // version meta.version, durably, before returning. ALREADY_EXISTS when that version is kept.
  absl::Status Add(const std::string& checkpoint_dir, VersionMeta meta);
  // Rewrites a kept version's status (atomic). NOT_FOUND for a version not kept.
  absl::Status SetStatus(int64_t version, const std::string& status);
  // Removes a kept version (OK when absent).
  absl::Status Remove(int64_t version);

  // Kept versions, newest first. A version whose version.json cannot be read is skipped (logged).
  std::vector<VersionMeta> List() const;
  absl::StatusOr<VersionMeta> Get(int64_t version) const;
  // The directory holding version `version`'s checkpoint files.
  std::string Dir(int64_t version) const;

  // Restoring a kept version as the state's checkpoint, in two steps so the caller can build
  // everything it needs before anything changes. PrepareRestore links (or copies) the version's
  // files into a temp directory beside the checkpoint and reads them back, verified (SHA-256 of
  // every file, the eval splits included): DATA_LOSS naming the file when they are damaged,
  // NOT_FOUND when the version is not kept. CommitRestore swaps the temp directory in as
  // <state_dir>/checkpoint with one directory rename (ReplaceDirAtomic): a crash leaves the old
  // checkpoint or the new one. AbandonRestore removes the temp directory.
  struct PreparedRestore {
    std::string tmp_dir;
    CheckpointData data;
  };
  absl::StatusOr<PreparedRestore> PrepareRestore(int64_t version) const;
  absl::Status CommitRestore(const PreparedRestore& prepared) const;
  void AbandonRestore(const PreparedRestore& prepared) const;

  int64_t next_version() const { return next_version_; }
  // Reserves version numbers up to `version` (durable before returning).
  absl::Status ReserveThrough(int64_t version);

 private:
  explicit VersionStore(std::string state_dir) : state_dir_(std::move(state_dir)) {}
  std::string root() const { return state_dir_ + "/versions"; }
  std::string state_dir_;
  int64_t next_version_ = 1;
};

}  // namespace strata
