// SubmitTask's request handling without a server: the raw bytes of the stream's messages ->
// protobuf parsing -> TaskSpec conversion and ValidateTaskSpecification -> the streaming JSONL
// validator fed with `jsonl` chunks and structured examples, through the same code the server
// runs (server/submit_request.h: SpecFromProto, StructuredExampleLine, SplitIngest). Input: repeated [u16
// little-endian length] [SubmitTaskRequest bytes].
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "core/data/jsonl.h"
#include "core/jobs/job.h"
#include "core/model/tokenizer.h"
#include "fuzz/fuzz_util.h"
#include "nlohmann/json.hpp"
#include "server/submit_request.h"
#include "strata/v1/adaptation.pb.h"

namespace pb = strata::v1;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const auto* tokenizer = strata::Tokenizer::ByteLevelDefault().release();
  std::vector<pb::SubmitTaskRequest> messages;
  size_t pos = 0;
  while (pos + 2 <= size && messages.size() < 64) {
    const size_t n = std::min<size_t>(data[pos] | (data[pos + 1] << 8), size - pos - 2);
    pb::SubmitTaskRequest request;
    if (!request.ParseFromArray(data + pos + 2, static_cast<int>(n))) return 0;  // the server: Read() fails
    messages.push_back(std::move(request));
    pos += 2 + n;
  }
  if (messages.empty() || messages[0].payload_case() != pb::SubmitTaskRequest::kSpec) return 0;
  strata::TaskSpecification spec = strata::SpecFromProto(messages[0].spec());
  if (!strata::ValidateTaskSpecification(spec).ok()) return 0;
  strata::ValidationOptions vo;
  vo.tokenizer = tokenizer;
  vo.max_tokens = spec.overrides.max_seq_len.value_or(256);
  strata::SplitIngest train(strata::SplitSourceName(messages[0].spec().train_source(), "train.jsonl"), vo);
  strata::SplitIngest eval(strata::SplitSourceName(messages[0].spec().eval_source(), "eval.jsonl"), vo);
  for (size_t i = 1; i < messages.size(); ++i) {
    if (messages[i].payload_case() == pb::SubmitTaskRequest::kTrain)
      train.Add(messages[i].train());
    else if (messages[i].payload_case() == pb::SubmitTaskRequest::kEval)
      eval.Add(messages[i].eval());
    else
      return 0;
  }
  const bool ok = train.validator().Finish().ok() && eval.validator().Finish().ok();
  auto examples = train.validator().TakeExamples();
  if (ok) FUZZ_CHECK(!examples.empty(), "accepted training data without an example");
  for (const auto& e : examples) {
    auto back = strata::ParseExampleLine(strata::ExampleToJsonLine(e));
    FUZZ_CHECK(back.ok() && *back == e, "a submitted example does not survive the job journal");
  }
  return 0;
}
