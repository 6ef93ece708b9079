// tokenizer.json loading (BPE model, pre-tokenizer regexes, normalizer, added tokens,
// post-processor), then encoding and decoding a fixed text with whatever loaded.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

#include "core/model/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = "/tmp/strata-fuzz-tokenizer-" + std::to_string(::getpid()) + ".json";
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return 0;
  std::fwrite(data, 1, size, f);
  std::fclose(f);
  auto tok = strata::Tokenizer::FromFiles(path, "");
  if (!tok.ok()) return 0;
  for (const char* text : {"Hello world, it's 2026!  naïve café — 東京\n\tend", "", " ", "<s></s><unk>"}) {
    auto ids = (*tok)->Encode(text, true);
    (void)(*tok)->Decode(ids, false);
    (void)(*tok)->Decode(ids, true);
  }
  (void)(*tok)->Decode({-1, 0, 1, 2, 3, 1 << 30}, false);
  return 0;
}
