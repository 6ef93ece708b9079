#pragma once
// The torch-free part of the safetensors reader: the header parser (see safetensors.h for the
// format). Separate so that it can be fuzzed and tested without LibTorch.

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace strata {

struct SafetensorsEntry {
  std::string dtype;  // "F32", "BF16", "F16", "I64", ...
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets into the data buffer
  uint64_t end = 0;
};

// Bytes per element of a supported dtype name (F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL), else 0.
uint64_t SafetensorsDtypeSize(const std::string& dtype);

// Validates the whole header of a safetensors file held in memory (`base`, `file_size` bytes):
// header length, JSON, every entry (dtype, shape, offsets inside the data buffer, size = shape x
// dtype), no overlaps, "__metadata__" strings. Fills `entries`, `metadata` and `data_start` (the
// offset of the data buffer). INVALID_ARGUMENT naming `path` and the tensor; never throws.
absl::Status ParseSafetensorsHeader(const std::string& path, const char* base, uint64_t file_size,
                                    std::map<std::string, SafetensorsEntry>* entries,
                                    std::map<std::string, std::string>* metadata, uint64_t* data_start);

}  // namespace strata
