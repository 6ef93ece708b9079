#pragma once
// safetensors reader (memory-mapped, zero-copy when the dtype already matches) and writer.
// Format: 8-byte little-endian header length N, N bytes of JSON header
// {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {...}},
// then the data buffer. Offsets are relative to the start of the data buffer.
//
// Every malformed file is reported as INVALID_ARGUMENT (or NOT_FOUND) naming the file and, where
// applicable, the tensor: truncated file, header length past the end, bad JSON, unknown dtype,
// offsets out of range or overlapping, shape x dtype size != byte length. Never a crash.
// Gaps between tensors in the data buffer are tolerated (not produced by the writer).
// Supported dtypes: F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL; others are refused by name.
//
// Thread safety: a SafetensorsFile is immutable after Open; Get() may be called concurrently.
//
// Zero-copy tensors point into a private (copy-on-write) mapping of the file: writing to them never
// reaches the file and never faults, but two zero-copy Get()s of one name share memory.
// Tensors whose data is not aligned to their element size in the file are copied instead.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/config.h"
#include "core/model/safetensors_header.h"

namespace strata {

class SafetensorsFile {
 public:
  // Maps the file and validates the whole header. The mapping lives as long as this object or
  // any tensor returned by Get() without a copy.
  static absl::StatusOr<std::shared_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  const std::map<std::string, SafetensorsEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // Returns tensor `name` converted to `dtype` (zero-copy view of the mapping when the stored dtype
  // already equals `dtype`; the view keeps the file mapped). NOT_FOUND if absent.
  absl::StatusOr<at::Tensor> Get(const std::string& name, at::ScalarType dtype) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  std::map<std::string, SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  size_t data_start_ = 0;
  std::weak_ptr<SafetensorsFile> self_;
};

// Writes tensors (any CPU/CUDA tensor; written contiguous, on CPU, in its own dtype) atomically:
// streamed into a temp file in the same directory, fsync, rename, fsync of the directory.
// The header is padded with spaces so the data buffer starts at a multiple of 8, and tensors are
// laid out by decreasing element size, so every tensor is aligned to its element size (and can be
// mapped zero-copy). "__metadata__" is written only when `metadata` is non-empty.
// INVALID_ARGUMENT for empty/duplicate/reserved names, undefined tensors, unsupported dtypes.
absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

// Loads every tensor of a checkpoint directory: `model.safetensors`, or the shards listed in
// `model.safetensors.index.json` ("weight_map"). Tensors are converted to `dtype` (zero-copy when
// already stored in `dtype`; such tensors keep their shard mapped). Errors name the shard and the
// tensor. As in transformers, `model.safetensors` wins when both layouts are present. `dir` may
// also be a single .safetensors file. Only the tensors named in the weight_map are loaded.
// NOT_FOUND: no checkpoint in `dir`, a shard missing, a tensor of the index missing from its shard.
// INVALID_ARGUMENT: malformed index (bad JSON, no weight_map object, non-string or escaping shard
// names such as "../x" or "/abs"), or any malformed shard.
absl::StatusOr<std::map<std::string, at::Tensor>> LoadCheckpointTensors(const std::string& dir,
                                                                        at::ScalarType dtype);

// Writes `tensors` into `dir` (created if needed) as HF does: a single `model.safetensors` when
// max_shard_bytes == 0 or everything fits, else `model-0000K-of-0000N.safetensors` shards (greedy
// in the given order, at most max_shard_bytes of tensor data each unless one tensor is larger)
// plus `model.safetensors.index.json` {"metadata": {"total_size": bytes}, "weight_map": {...}}.
// Each file is written atomically; the file of the other layout, if present, is removed. Shards of
// an earlier, differently sized write are not cleaned up: export into a fresh directory.
absl::Status WriteCheckpointTensors(const std::string& dir,
                                    const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                                    uint64_t max_shard_bytes = 0,
                                    const std::map<std::string, std::string>& metadata = {});

// CheckLlamaTensorShapes (config.h) over loaded tensors: reports missing names, unexpected names
// (ignoring "...rotary_emb.inv_freq") and shape mismatches against the config, as
// INVALID_ARGUMENT prefixed by `source`. A stored lm_head.weight is accepted with tied embeddings.
absl::Status CheckLlamaTensors(const ModelConfig& config, const std::map<std::string, at::Tensor>& tensors,
                               const std::string& source);

}  // namespace strata
