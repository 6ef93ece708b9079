#pragma once
// safetensors reader (memory-mapped, zero-copy when the dtype already matches) and writer.
// Format: 8-byte little-endian header length N, N bytes of JSON header
// {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {...}},
// then the data buffer. Offsets are relative to the start of the data buffer.
//
// Every malformed file is reported as INVALID_ARGUMENT (or NOT_FOUND) naming the file and, where
// applicable, the tensor: truncated file, header length past the end, bad JSON, unknown dtype,
// offsets out of range or overlapping, shape x dtype size != byte length. Never a crash.
//
// Thread safety: a SafetensorsFile is immutable after Open; Get() may be called concurrently.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace strata {

struct SafetensorsEntry {
  std::string dtype;           // "F32", "BF16", "F16", "I64", ...
  std::vector<int64_t> shape;
  uint64_t begin = 0;          // byte offsets into the data buffer
  uint64_t end = 0;
};

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

// Writes tensors (any CPU/CUDA tensor; written contiguous, on CPU, in its own dtype) atomically.
absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

// Loads every tensor of a checkpoint directory: `model.safetensors`, or the shards listed in
// `model.safetensors.index.json` ("weight_map"). Tensors are converted to `dtype`.
// Errors name the shard and the tensor.
absl::StatusOr<std::map<std::string, at::Tensor>> LoadCheckpointTensors(const std::string& dir,
                                                                        at::ScalarType dtype);

}  // namespace strata
