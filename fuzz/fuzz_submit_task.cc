// SubmitTask's request handling without a server: the raw bytes of the stream's messages ->
// protobuf parsing -> TaskSpec conversion and ValidateTaskSpecification -> the streaming JSONL
// validator fed with `jsonl` chunks and structured examples, exactly as AdaptationServiceImpl
// feeds it (the glue below mirrors SpecFromProto, StructuredExampleLine and SplitIngest in
// server/adaptation_service.cc; keep them in step). Input: repeated [u16 little-endian length]
// [SubmitTaskRequest bytes].
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
#include "strata/v1/adaptation.pb.h"

namespace pb = strata::v1;

namespace {

strata::TaskSpecification SpecFromProto(const pb::TaskSpec& p) {
  strata::TaskSpecification s;
  s.name = p.name();
  s.method = p.method();
  if (p.has_eval_fraction()) s.eval_fraction = p.eval_fraction();
  if (p.has_eval_cap()) s.eval_cap = p.eval_cap();
  switch (p.scorer()) {
    case pb::SCORER_CHOICE:
      s.scorer = "choice";
      break;
    case pb::SCORER_EXACT_MATCH:
      s.scorer = "exact_match";
      break;
    case pb::SCORER_NLL:
      s.scorer = "nll";
      break;
    default:
      break;
  }
  s.description = p.description();
  const pb::TrainingOverrides& o = p.overrides();
  if (o.has_learning_rate()) s.overrides.learning_rate = o.learning_rate();
  if (o.has_max_steps()) s.overrides.max_steps = o.max_steps();
  if (o.has_epochs()) s.overrides.epochs = o.epochs();
  if (o.has_batch_size()) s.overrides.batch_size = o.batch_size();
  if (o.has_rank()) s.overrides.rank = o.rank();
  if (o.has_alpha()) s.overrides.alpha = o.alpha();
  if (o.has_ella_lambda()) s.overrides.ella_lambda = o.ella_lambda();
  if (o.has_seed()) s.overrides.seed = o.seed();
  if (o.has_max_seq_len()) s.overrides.max_seq_len = o.max_seq_len();
  return s;
}

// A JSON string literal of `bytes`, copied as they are (invalid UTF-8 included, so that the
// validator refuses it naming the line and field instead of it being replaced silently).
std::string RawJsonString(const std::string& bytes) {
  std::string out = "\"";
  for (char c : bytes) {
    if (c == '"' || c == '\\') {
      out.push_back('\\');
      out.push_back(c);
    } else if (static_cast<unsigned char>(c) < 0x20) {
      out += absl::StrFormat("\\u%04x", static_cast<unsigned char>(c));
    } else {
      out.push_back(c);
    }
  }
  out.push_back('"');
  return out;
}

// A structured example as the JSONL line the validator checks (only non-empty fields, so a
// missing field is reported as missing and "text" + "prompt" as ambiguous, exactly as in JSONL).
// The fields are bytes on the wire: their UTF-8 is checked by the validator.
std::string StructuredExampleLine(const pb::Example& e) {
  std::vector<std::string> fields;
  if (!e.prompt().empty()) fields.push_back("\"prompt\": " + RawJsonString(e.prompt()));
  if (!e.completion().empty()) fields.push_back("\"completion\": " + RawJsonString(e.completion()));
  if (e.choices_size() > 0) {
    std::vector<std::string> choices;
    for (const std::string& c : e.choices()) choices.push_back(RawJsonString(c));
    fields.push_back("\"choices\": [" + absl::StrJoin(choices, ", ") + "]");
  }
  if (!e.text().empty()) fields.push_back("\"text\": " + RawJsonString(e.text()));
  return "{" + absl::StrJoin(fields, ", ") + "}";
}

struct Split {
  explicit Split(const strata::ValidationOptions& o) : validator("train.jsonl", o) {}
  void Add(const pb::DataChunk& chunk) {
    if (!chunk.jsonl().empty()) {
      validator.AddChunk(chunk.jsonl());
      at_line_start = chunk.jsonl().back() == '\n';
    }
    for (const pb::Example& e : chunk.examples()) {
      std::string line = StructuredExampleLine(e);
      if (!at_line_start) validator.AddChunk("\n");
      line.push_back('\n');
      validator.AddChunk(line);
      at_line_start = true;
    }
  }
  strata::JsonlValidator validator;
  bool at_line_start = true;
};

}  // namespace

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
  strata::TaskSpecification spec = SpecFromProto(messages[0].spec());
  if (!strata::ValidateTaskSpecification(spec).ok()) return 0;
  strata::ValidationOptions vo;
  vo.tokenizer = tokenizer;
  vo.max_tokens = spec.overrides.max_seq_len.value_or(256);
  Split train(vo), eval(vo);
  for (size_t i = 1; i < messages.size(); ++i) {
    if (messages[i].payload_case() == pb::SubmitTaskRequest::kTrain)
      train.Add(messages[i].train());
    else if (messages[i].payload_case() == pb::SubmitTaskRequest::kEval)
      eval.Add(messages[i].eval());
    else
      return 0;
  }
  const bool ok = train.validator.Finish().ok() && eval.validator.Finish().ok();
  auto examples = train.validator.TakeExamples();
  if (ok) FUZZ_CHECK(!examples.empty(), "accepted training data without an example");
  for (const auto& e : examples) {
    auto back = strata::ParseExampleLine(strata::ExampleToJsonLine(e));
    FUZZ_CHECK(back.ok() && *back == e, "a submitted example does not survive the job journal");
  }
  return 0;
}
