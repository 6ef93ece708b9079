// The streaming JSONL validator (what SubmitTask and `strata validate` run on client bytes), fed in
// chunks that split lines and UTF-8 sequences anywhere. Properties: no crash, every accepted
// example survives the job journal's round trip (ExampleToJsonLine -> ParseExampleLine).
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "core/data/jsonl.h"
#include "core/model/tokenizer.h"
#include "fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const auto* tokenizer = strata::Tokenizer::ByteLevelDefault().release();
  if (size < 1) return 0;
  const uint8_t mode = data[0];
  std::string_view rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  strata::ValidationOptions options;
  options.skip_bad_lines = mode & 1;
  options.allow_unknown_fields = mode & 2;
  if (mode & 4) {
    options.tokenizer = tokenizer;
    options.max_tokens = 48;
  }
  if (mode & 8) options.max_line_bytes = 96;
  const size_t chunk = 1 + (mode >> 4) * 11;
  strata::JsonlValidator validator("fuzz.jsonl", options);
  for (size_t i = 0; i < rest.size(); i += chunk) validator.AddChunk(rest.substr(i, chunk));
  absl::Status st = validator.Finish();
  auto examples = validator.TakeExamples();
  if (st.ok()) FUZZ_CHECK(!examples.empty(), "Finish() OK without an example");
  for (const strata::Example& e : examples) {
    const std::string line = strata::ExampleToJsonLine(e);
    auto back = strata::ParseExampleLine(line);
    FUZZ_CHECK(back.ok(), "an accepted example does not re-parse from ExampleToJsonLine");
    FUZZ_CHECK(*back == e, "an accepted example changes in the JSONL round trip");
  }
  return 0;
}
