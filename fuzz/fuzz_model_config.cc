// Hugging Face config.json parsing and validation. Property: an accepted config survives
// ModelConfigToJson -> ParseModelConfig unchanged (the documented round trip of ExportWeights).
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/model/config.h"
#include "fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto config = strata::ParseModelConfig(text, "config.json");
  if (!config.ok()) return 0;
  (void)strata::ExpectedLlamaTensors(*config);
  auto back = strata::ParseModelConfig(strata::ModelConfigToJson(*config), "round-trip");
  FUZZ_CHECK(back.ok(), "an accepted config does not re-parse from ModelConfigToJson");
  FUZZ_CHECK(*back == *config, "an accepted config changes in the config.json round trip");
  return 0;
}
