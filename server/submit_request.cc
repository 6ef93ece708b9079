#include "server/submit_request.h"

#include <vector>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "core/util/utf8.h"
#include "strata/v1/scorer_names.h"

namespace strata {

namespace pb = ::strata::v1;

TaskSpecification SpecFromProto(const pb::TaskSpec& p) {
  TaskSpecification s;
  s.name = p.name();
  s.method = p.method();
  if (p.has_eval_fraction()) s.eval_fraction = p.eval_fraction();
  if (p.has_eval_cap()) s.eval_cap = p.eval_cap();
  s.scorer = ScorerNameFromProto(p.scorer());
  s.description = p.description();
  if (p.has_min_score()) s.min_score = p.min_score();
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

std::string SplitSourceName(const std::string& given, const std::string& fallback) {
  constexpr size_t kMaxBytes = 256;
  if (given.empty()) return fallback;
  std::string name = SanitizeUtf8(given);
  for (char& c : name) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = '?';
  }
  if (name.size() > kMaxBytes) {
    if (size_t slash = name.rfind('/'); slash != std::string::npos) name = name.substr(slash + 1);
  }
  if (name.size() > kMaxBytes) {
    // Its last bytes, from a character boundary on.
    size_t start = name.size() - kMaxBytes;
    while (start < name.size() && (static_cast<unsigned char>(name[start]) & 0xC0) == 0x80) ++start;
    name = name.substr(start);
  }
  return name.empty() ? fallback : name;
}

int64_t SplitIngest::Add(const pb::DataChunk& chunk) {
  received_ = true;
  int64_t bytes = 0;
  if (!chunk.jsonl().empty()) {
    validator_.AddChunk(chunk.jsonl());
    at_line_start_ = chunk.jsonl().back() == '\n';
    bytes += static_cast<int64_t>(chunk.jsonl().size());
  }
  for (const pb::Example& e : chunk.examples()) {
    std::string line = StructuredExampleLine(e);
    // A structured example ends a partial JSONL line left by a previous chunk.
    if (!at_line_start_) validator_.AddChunk("\n");
    line.push_back('\n');
    validator_.AddChunk(line);
    at_line_start_ = true;
    bytes += static_cast<int64_t>(line.size());
  }
  return bytes;
}

}  // namespace strata
