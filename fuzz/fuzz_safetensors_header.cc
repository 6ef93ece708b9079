// The safetensors header parser (model weights, adapters, checkpoints). Input: a whole file.
// Property: never crashes, and every accepted entry lies inside the data buffer.
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>

#include "core/model/safetensors_header.h"
#include "fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::map<std::string, strata::SafetensorsEntry> entries;
  std::map<std::string, std::string> metadata;
  uint64_t data_start = 0;
  absl::Status st = strata::ParseSafetensorsHeader("fuzz.safetensors", reinterpret_cast<const char*>(data),
                                                   size, &entries, &metadata, &data_start);
  if (!st.ok()) return 0;
  FUZZ_CHECK(data_start >= 8 && data_start <= size, "data_start outside the file");
  for (const auto& [name, e] : entries) {
    FUZZ_CHECK(e.begin <= e.end && e.end <= size - data_start, "accepted entry outside the data buffer");
    uint64_t numel = 1;
    for (int64_t d : e.shape) numel *= static_cast<uint64_t>(d);
    FUZZ_CHECK(numel * strata::SafetensorsDtypeSize(e.dtype) == e.end - e.begin,
               "accepted entry size mismatch");
  }
  return 0;
}
