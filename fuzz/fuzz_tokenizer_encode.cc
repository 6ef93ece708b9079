// Encoding and decoding arbitrary bytes with the real tokenizers of ../shared (STRATA_SHARED_DIR):
// GPT-2, Llama-2 (byte fallback), Llama-3, Qwen3 (NFC), Mistral and stories260K; plus decoding
// arbitrary ids. Input: byte 0 picks the tokenizer and the mode, the rest is text (or ids).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "core/model/tokenizer.h"
#include "fuzz/fuzz_util.h"

namespace {
std::vector<std::unique_ptr<strata::Tokenizer>>* Tokenizers() {
  static auto* all = [] {
    auto* out = new std::vector<std::unique_ptr<strata::Tokenizer>>();
    out->push_back(strata::Tokenizer::ByteLevelDefault());
    const char* shared = std::getenv("STRATA_SHARED_DIR");
    if (shared == nullptr) {
      std::fprintf(stderr,
                   "fuzz_tokenizer_encode: set STRATA_SHARED_DIR (../shared) for the real tokenizers\n");
      return out;
    }
    for (const char* dir : {"/models/stories260K", "/tokenizers/gpt2", "/tokenizers/llama2",
                            "/tokenizers/llama3", "/tokenizers/qwen3", "/tokenizers/mistral"}) {
      auto tok = strata::Tokenizer::FromDirectory(std::string(shared) + dir);
      if (!tok.ok()) {
        std::fprintf(stderr, "fuzz_tokenizer_encode: %s\n", std::string(tok.status().message()).c_str());
        std::abort();
      }
      out->push_back(std::move(*tok));
    }
    return out;
  }();
  return all;
}
}  // namespace

// Loads the tokenizers (tens of seconds under ASan for the 9-11 MB ones) before the per-input timeout.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  Tokenizers();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto& toks = *Tokenizers();
  if (size < 1) return 0;
  const strata::Tokenizer& tok = *toks[data[0] % toks.size()];
  const std::string text(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (data[0] & 0x80) {
    std::vector<int32_t> ids(text.size() / 4);
    if (!ids.empty()) std::memcpy(ids.data(), text.data(), ids.size() * 4);
    (void)tok.Decode(ids, data[0] & 0x40);
    return 0;
  }
  auto ids = tok.Encode(text, data[0] & 0x40);
  for (int32_t id : ids)
    FUZZ_CHECK(id >= 0 && id < tok.vocab_size(), "Encode returned an id outside the vocabulary");
  (void)tok.Decode(ids, false);
  return 0;
}
