#pragma once
// The durable adaptation checkpoint: <state_dir>/checkpoint/{manifest.json, state.json,
// method.safetensors}. Written into a fresh temp directory, every file fsynced, then swapped into
// place with a directory rename (ReplaceDirAtomic): a crash leaves either the old or the new
// checkpoint, never a mix. The manifest records the SHA-256 of every file (including the kept eval
// splits under <state_dir>/tasks/); Load verifies them and refuses a corrupted or partial
// checkpoint with DATA_LOSS naming the file.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace strata {

struct CheckpointTask {
  std::string name;
  std::string scorer;
  std::string job_id;
  std::string description;
  std::string eval_file;  // relative to state_dir, e.g. "tasks/capitals/eval.jsonl"
  int64_t eval_examples = 0;
};

struct CheckpointData {
  std::string base_model_id;
  std::string method;
  std::string method_config_json;
  std::map<std::string, at::Tensor> method_tensors;
  int64_t weights_version = 0;
  std::vector<CheckpointTask> tasks;
  // matrix[i][j]: score on task j after stage i+1 (NaN = not measured); base[j]; reference_nll per
  // stage ([0] = base; NaN when not configured).
  std::vector<std::vector<double>> matrix;
  std::vector<double> base;
  std::vector<double> reference_nll;
  // Weights version published after each stage (same length as matrix).
  std::vector<int64_t> stage_versions;
  // Automatic task routing: the router's JSON ("{}" or empty = none) and tensors (stored in
  // method.safetensors under "router/"), and the other evaluation views (same shape as matrix; rows
  // may be empty for stages measured before they existed): routed by name, auto-routed, router
  // accuracy; the reference NLL through auto routing per stage ([0] = base).
  std::string router_json;
  std::map<std::string, at::Tensor> router_tensors;  // names without the "router/" prefix
  std::vector<std::vector<double>> routed_matrix, auto_matrix, router_accuracy;
  std::vector<double> reference_nll_auto;
};

// Writes `data` as <state_dir>/checkpoint atomically (see above).
absl::Status SaveCheckpoint(const std::string& state_dir, const CheckpointData& data);
// Writes the checkpoint files of `data` (method.safetensors, state.json, manifest.json) into the
// existing directory `dir` and fsyncs it; the manifest names the eval splits as "../tasks/...", so
// `dir` must become a direct child of `state_dir` (SaveCheckpoint renames it to checkpoint/).
absl::Status WriteCheckpointFiles(const std::string& state_dir, const CheckpointData& data,
                                  const std::string& dir);
// Reads and verifies the checkpoint files in `dir` (a direct child of the state directory: its
// "../tasks/..." entries are checked too). DATA_LOSS naming the file when one is missing or corrupt.
absl::StatusOr<CheckpointData> ReadCheckpointDir(const std::string& dir);
// nullopt when there is no checkpoint yet. Called at start-up by the process that owns `state_dir`:
// it first removes what an interrupted SaveCheckpoint left (RemoveCheckpointLeftovers).
absl::StatusOr<std::optional<CheckpointData>> LoadCheckpoint(const std::string& state_dir);
// Removes <state_dir>/.checkpoint-tmp-* (temp directories of a SaveCheckpoint that was killed before
// its rename; never part of a checkpoint). Returns how many were removed; failures are logged.
int RemoveCheckpointLeftovers(const std::string& state_dir);
// One file of a checkpoint as its manifest lists it.
struct CheckpointFile {
  std::string name;  // relative to the checkpoint directory ("../tasks/<name>/eval.jsonl" for an eval split)
  int64_t bytes = 0;
  std::string sha256;  // lower-case hex
};
// The files the manifest in `dir` lists, in its order, with their sizes on disk (-1 for a file not
// there, e.g. the eval splits seen from a kept version's directory); the SHA-256 values are the
// manifest's, not recomputed. DATA_LOSS when the manifest is missing or is not a checkpoint manifest.
absl::StatusOr<std::vector<CheckpointFile>> ListCheckpointFiles(const std::string& dir);
// Writes <dir>/manifest.json listing `files` (already written into `dir`, each with its SHA-256) for
// weights version `weights_version`, and fsyncs `dir`: a checkpoint assembled from another state
// directory's files (a replica's copy of the trainer's serving files, without the eval splits).
// ReadCheckpointDir then verifies exactly those files.
absl::Status WriteCheckpointManifest(const std::string& dir, int64_t weights_version,
                                     const std::vector<CheckpointFile>& files);
// Total bytes of the checkpoint files (the adaptation state on disk).
int64_t CheckpointBytes(const std::string& state_dir);
// Total bytes of the regular files directly in `dir` (0 when it does not exist).
int64_t DirFileBytes(const std::string& dir);

}  // namespace strata
