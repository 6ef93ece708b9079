// PEFT adapter_config.json (ImportAdapters reads it from an operator-supplied directory).
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/adapt/peft_config.h"
#include "fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto config = strata::ParsePeftAdapterConfig(std::string(reinterpret_cast<const char*>(data), size),
                                               "adapter_config.json");
  if (!config.ok()) return 0;
  FUZZ_CHECK(config->r >= 1, "accepted r < 1");
  for (const char* module : {"model.layers.0.self_attn.q_proj", "q_proj", ""}) {
    (void)strata::PeftModuleAlpha(*config, module);
  }
  return 0;
}
