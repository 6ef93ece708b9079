#include "core/data/jsonl.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/data/encode.h"
#include "core/util/file_util.h"
#include "nlohmann/json.hpp"

namespace strata {
namespace {

using nlohmann::json;

constexpr std::string_view kBom = "\xEF\xBB\xBF";
constexpr size_t kQuoteLimit = 60;  // bytes of a quoted value shown in a message

// Debian's Abseil has its own string_view (see docs/DEVELOPING.md); absl::StrCat needs it.
absl::string_view Av(std::string_view s) { return absl::string_view(s.data(), s.size()); }

bool IsBlank(std::string_view line) {
  for (char c : line) {
    if (c != ' ' && c != '\t') return false;
  }
  return true;
}

// JSON-quoted (escaped) value for messages, cut at a UTF-8 boundary when long.
std::string Quote(std::string_view s) {
  bool cut = false;
  if (s.size() > kQuoteLimit) {
    size_t n = kQuoteLimit;
    while (n > 0 && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80) --n;
    s = s.substr(0, n);
    cut = true;
  }
  std::string q = json(std::string(s)).dump(-1, ' ', false, json::error_handler_t::replace);
  if (cut) q.insert(q.size() - 1, "...");
  return q;
}

// The useful tail of an nlohmann parse error: "column 12: syntax error while parsing ...".
std::string DescribeParseError(const json::parse_error& e) {
  std::string_view what = e.what();
  size_t col = what.find("column ");
  if (col != std::string_view::npos) return std::string(what.substr(col));
  size_t pe = what.find("] ");
  return std::string(pe == std::string_view::npos ? what : what.substr(pe + 2));
}

struct ParseResult {
  std::optional<Example> example;
  LineError error;  // meaningful when !example
};

ParseResult Fail(LineErrorReason reason, std::string field, std::string message) {
  ParseResult r;
  r.error.reason = reason;
  r.error.field = std::move(field);
  r.error.message = std::move(message);
  return r;
}

ParseResult WrongType(const std::string& field, const char* expected, const json& value) {
  return Fail(LineErrorReason::kWrongType, field,
              absl::StrCat("field \"", field, "\": expected ", expected, ", got ", value.type_name()));
}

ParseResult UnknownField(const std::string& key, const char* expected) {
  return Fail(LineErrorReason::kUnknownField, key,
              absl::StrCat("unknown field ", Quote(key), " (expected ", expected, ")"));
}

// Reads a required non-empty string field; nullopt result means `*out` was set.
std::optional<ParseResult> RequireString(const json& obj, const std::string& field, std::string* out) {
  auto it = obj.find(field);
  if (it == obj.end()) {
    return Fail(LineErrorReason::kMissingField, field, absl::StrCat("missing field \"", field, "\""));
  }
  if (!it->is_string()) return WrongType(field, "a string", *it);
  const auto& s = it->get_ref<const std::string&>();
  if (s.empty()) {
    return Fail(LineErrorReason::kEmptyField, field,
                absl::StrCat("field \"", field, "\": must not be empty"));
  }
  *out = s;
  return std::nullopt;
}

ParseResult ParseNative(const json& obj, const ValidationOptions& options) {
  static const std::set<std::string> kKnown = {"prompt", "completion", "choices", "text"};
  if (!options.allow_unknown_fields) {
    for (const auto& item : obj.items()) {
      if (kKnown.count(item.key()) == 0) {
        return UnknownField(item.key(), "\"prompt\", \"completion\", \"choices\" or \"text\"");
      }
    }
  }
  const bool has_text = obj.contains("text");
  const bool has_supervised = obj.contains("prompt") || obj.contains("completion") || obj.contains("choices");
  if (has_text && has_supervised) {
    return Fail(LineErrorReason::kAmbiguousKind, "text",
                "both \"text\" and \"prompt\"/\"completion\": a line is either {\"prompt\", \"completion\"} "
                "or {\"text\"}");
  }
  if (!has_text && !has_supervised) {
    return Fail(
        LineErrorReason::kMissingField, "",
        "missing fields: expected \"prompt\" and \"completion\" (and optionally \"choices\"), or \"text\"");
  }
  Example ex;
  if (has_text) {
    ex.kind = ExampleKind::kText;
    if (auto err = RequireString(obj, "text", &ex.text)) return *err;
    return ParseResult{std::move(ex), {}};
  }
  ex.kind = ExampleKind::kCompletion;
  // Presence first, so that a line missing a field says so before any type complaint.
  for (const char* f : {"prompt", "completion"}) {
    if (!obj.contains(f)) {
      return Fail(LineErrorReason::kMissingField, f, absl::StrCat("missing field \"", f, "\""));
    }
  }
  if (auto err = RequireString(obj, "prompt", &ex.prompt)) return *err;
  if (auto err = RequireString(obj, "completion", &ex.completion)) return *err;
  auto ch = obj.find("choices");
  if (ch == obj.end()) return ParseResult{std::move(ex), {}};

  ex.kind = ExampleKind::kChoice;
  if (!ch->is_array()) return WrongType("choices", "an array of strings", *ch);
  std::set<std::string_view> seen;
  for (size_t i = 0; i < ch->size(); ++i) {
    const json& c = (*ch)[i];
    if (!c.is_string()) {
      return Fail(LineErrorReason::kWrongType, "choices",
                  absl::StrCat("field \"choices\"[", i, "]: expected a string, got ", c.type_name()));
    }
    const auto& s = c.get_ref<const std::string&>();
    if (s.empty()) {
      return Fail(LineErrorReason::kBadChoices, "choices",
                  absl::StrCat("field \"choices\"[", i, "]: empty choice"));
    }
    if (!seen.insert(s).second) {
      return Fail(LineErrorReason::kBadChoices, "choices",
                  absl::StrCat("field \"choices\"[", i, "]: duplicate choice ", Quote(s)));
    }
  }
  if (ch->size() < 2) {
    return Fail(LineErrorReason::kBadChoices, "choices",
                absl::StrCat("field \"choices\": needs at least 2 choices, got ", ch->size()));
  }
  for (const auto& c : *ch) ex.choices.push_back(c.get<std::string>());
  if (ex.CorrectChoice() < 0) {
    return Fail(LineErrorReason::kCompletionNotInChoices, "completion",
                absl::StrCat("field \"completion\": ", Quote(ex.completion),
                             " is not one of the choices (the match is exact, leading space included)"));
  }
  return ParseResult{std::move(ex), {}};
}

ParseResult ParseBenchmark(const json& obj, const ClTaskSpec& spec, const ValidationOptions& options) {
  if (!options.allow_unknown_fields) {
    for (const auto& item : obj.items()) {
      if (item.key() != "text" && item.key() != "label")
        return UnknownField(item.key(), "\"text\" and \"label\"");
    }
  }
  std::string text, label;
  for (const char* f : {"text", "label"}) {
    if (!obj.contains(f)) {
      return Fail(LineErrorReason::kMissingField, f, absl::StrCat("missing field \"", f, "\""));
    }
  }
  if (auto err = RequireString(obj, "text", &text)) return *err;
  if (auto err = RequireString(obj, "label", &label)) return *err;
  if (spec.LabelIndex(label) < 0) {
    return Fail(LineErrorReason::kUnknownLabel, "label",
                absl::StrCat("field \"label\": ", Quote(label), " is not one of the task's labels (",
                             absl::StrJoin(spec.labels, ", "), ")"));
  }
  auto ex = ConvertClExample(spec, text, label);
  if (!ex.ok()) {
    // Only a whitespace-only text gets here (the label was checked above).
    return Fail(LineErrorReason::kEmptyField, "text", std::string(ex.status().message()));
  }
  return ParseResult{*std::move(ex), {}};
}

// The top-level field whose string value holds byte `offset` of a JSON object line, or "" (also
// when the byte is in a field name or outside any string). A best-effort scan: the line is not
// valid UTF-8, so it was not parsed.
std::string FieldAtOffset(std::string_view line, size_t offset) {
  int depth = 0;
  bool in_string = false, escaped = false, expecting_key = false, string_is_key = false;
  size_t string_start = 0;
  std::string key;
  for (size_t i = 0; i < line.size() && i <= offset; ++i) {
    const char c = line[i];
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
        if (string_is_key) key = std::string(line.substr(string_start, i - string_start));
      }
      continue;
    }
    switch (c) {
      case '"':
        in_string = true;
        string_start = i + 1;
        string_is_key = depth == 1 && expecting_key;
        break;
      case '{':
      case '[':
        ++depth;
        if (depth == 1) expecting_key = c == '{';
        break;
      case '}':
      case ']':
        --depth;
        break;
      case ':':
        if (depth == 1) expecting_key = false;
        break;
      case ',':
        if (depth == 1) expecting_key = true;
        break;
      default:
        break;
    }
  }
  return in_string && !string_is_key && depth >= 1 ? key : std::string();
}

// `line` has no "\r\n", no BOM and is not blank.
ParseResult ParseLine(std::string_view line, const ValidationOptions& options) {
  size_t bad = 0;
  if (!IsValidUtf8(line, &bad)) {
    std::string field = FieldAtOffset(line, bad);
    std::string where = field.empty() ? std::string() : absl::StrCat("field \"", field, "\": ");
    return Fail(LineErrorReason::kInvalidUtf8, field,
                absl::StrCat(where, "invalid UTF-8 at column ", bad + 1));
  }
  if (line.find('\n') != std::string_view::npos) {
    return Fail(LineErrorReason::kNotJson, "", "not valid JSON: the line contains a newline character");
  }
  json obj;
  try {
    obj = json::parse(line.begin(), line.end());
  } catch (const json::parse_error& e) {
    return Fail(LineErrorReason::kNotJson, "", absl::StrCat("not valid JSON: ", DescribeParseError(e)));
  } catch (const json::exception& e) {
    // out_of_range 406: a number beyond a double ({"prompt": 1e999}); uncaught, it ended the server.
    const std::string what = e.what();
    const size_t pos = what.find("number overflow");
    return Fail(LineErrorReason::kNotJson, "",
                absl::StrCat("not valid JSON: ", pos == std::string::npos ? what : what.substr(pos)));
  }
  if (!obj.is_object()) {
    return Fail(LineErrorReason::kNotObject, "",
                absl::StrCat("expected a JSON object, got ", obj.type_name()));
  }
  ParseResult r =
      options.cl_task != nullptr ? ParseBenchmark(obj, *options.cl_task, options) : ParseNative(obj, options);
  if (r.example && options.max_tokens > 0 && options.tokenizer != nullptr) {
    const int64_t n = CountExampleTokens(*options.tokenizer, *r.example);
    if (n > options.max_tokens) {
      return Fail(LineErrorReason::kTooManyTokens, "",
                  absl::StrCat("example has ", n, " tokens, over the limit of ", options.max_tokens,
                               r.example->kind == ExampleKind::kChoice ? " (prompt + longest choice)" : ""));
    }
  }
  return r;
}

absl::Status CheckConfig(const ValidationOptions& options) {
  if (options.max_tokens > 0 && options.tokenizer == nullptr) {
    return absl::InvalidArgumentError("ValidationOptions: max_tokens is set but no tokenizer is given");
  }
  if (options.max_line_bytes <= 0) {
    return absl::InvalidArgumentError("ValidationOptions: max_line_bytes must be positive");
  }
  return absl::OkStatus();
}

}  // namespace

std::string_view LineErrorReasonName(LineErrorReason reason) {
  switch (reason) {
    case LineErrorReason::kLineTooLong:
      return "line_too_long";
    case LineErrorReason::kInvalidUtf8:
      return "invalid_utf8";
    case LineErrorReason::kNotJson:
      return "not_json";
    case LineErrorReason::kNotObject:
      return "not_object";
    case LineErrorReason::kUnknownField:
      return "unknown_field";
    case LineErrorReason::kAmbiguousKind:
      return "ambiguous_kind";
    case LineErrorReason::kMissingField:
      return "missing_field";
    case LineErrorReason::kWrongType:
      return "wrong_type";
    case LineErrorReason::kEmptyField:
      return "empty_field";
    case LineErrorReason::kBadChoices:
      return "bad_choices";
    case LineErrorReason::kCompletionNotInChoices:
      return "completion_not_in_choices";
    case LineErrorReason::kUnknownLabel:
      return "unknown_label";
    case LineErrorReason::kMixedKinds:
      return "mixed_kinds";
    case LineErrorReason::kTooManyTokens:
      return "too_many_tokens";
  }
  return "unknown";
}

JsonlValidator::JsonlValidator(std::string source, ValidationOptions options)
    : source_(std::move(source)), options_(options), config_status_(CheckConfig(options)) {}

std::string JsonlValidator::FormatError(const LineError& error) const {
  return absl::StrCat(source_, ":", error.line, ": ", error.message);
}

absl::Status JsonlValidator::Record(LineError error) {
  ++summary_.bad_lines;
  absl::Status status = absl::InvalidArgumentError(FormatError(error));
  if (static_cast<int64_t>(errors_.size()) < options_.max_stored_errors) errors_.push_back(std::move(error));
  if (!options_.skip_bad_lines) {
    // Nothing will be accepted: free what was collected and stop collecting.
    examples_.clear();
    examples_.shrink_to_fit();
  }
  return status;
}

void JsonlValidator::AddChunk(std::string_view bytes) {
  if (!config_status_.ok() || finished_) return;
  // +1 tolerates the "\r" of a CRLF line of exactly max_line_bytes.
  const auto max_buffered = static_cast<size_t>(options_.max_line_bytes) + 1;
  while (!bytes.empty()) {
    const size_t nl = bytes.find('\n');
    const std::string_view piece = bytes.substr(0, nl);  // the whole rest when npos
    if (nl != std::string_view::npos && pending_bytes_ == 0) {
      // Fast path: the whole line is inside this chunk; no copy.
      ProcessLine(piece, static_cast<int64_t>(piece.size()), /*dropped=*/false).IgnoreError();
      bytes.remove_prefix(nl + 1);
      continue;
    }
    pending_bytes_ += static_cast<int64_t>(piece.size());
    if (!pending_too_long_) {
      if (pending_.size() + piece.size() > max_buffered) {
        pending_too_long_ = true;  // stop buffering; the line is reported when it ends
        pending_.clear();
        pending_.shrink_to_fit();
      } else {
        pending_.append(piece);
      }
    }
    if (nl == std::string_view::npos) return;
    ProcessLine(pending_, pending_bytes_, pending_too_long_).IgnoreError();
    pending_.clear();
    pending_too_long_ = false;
    pending_bytes_ = 0;
    bytes.remove_prefix(nl + 1);
  }
}

absl::Status JsonlValidator::AddLine(std::string_view line) {
  if (!config_status_.ok()) return config_status_;
  if (finished_) {
    return absl::FailedPreconditionError(absl::StrCat(source_, ": line added after the end of the input"));
  }
  if (!line.empty() && line.back() == '\n') line.remove_suffix(1);
  return ProcessLine(line, static_cast<int64_t>(line.size()), /*dropped=*/false);
}

absl::Status JsonlValidator::ProcessLine(std::string_view line, int64_t line_bytes, bool dropped) {
  const int64_t line_no = ++summary_.lines;
  auto record = [&](ParseResult&& r) {
    r.error.line = line_no;
    return Record(std::move(r.error));
  };
  if (!line.empty() && line.back() == '\r') {
    line.remove_suffix(1);
    --line_bytes;
  }
  if (dropped || line_bytes > options_.max_line_bytes) {
    return record(
        Fail(LineErrorReason::kLineTooLong, "",
             absl::StrCat("line is ", line_bytes, " bytes, over the limit of ", options_.max_line_bytes)));
  }
  if (line_no == 1 && line.substr(0, kBom.size()) == kBom) line.remove_prefix(kBom.size());
  if (IsBlank(line)) {
    ++summary_.blank_lines;
    return absl::OkStatus();
  }
  ParseResult r = ParseLine(line, options_);
  if (!r.example) return record(std::move(r));
  if (!summary_.kind) {
    summary_.kind = r.example->kind;
    first_kind_line_ = line_no;
  } else if (*summary_.kind != r.example->kind) {
    return record(Fail(LineErrorReason::kMixedKinds, "",
                       absl::StrCat("example kind \"", Av(ExampleKindName(r.example->kind)),
                                    "\" differs from the file's kind \"", Av(ExampleKindName(*summary_.kind)),
                                    "\" (set by line ", first_kind_line_, "); a file holds one kind")));
  }
  ++summary_.accepted;
  if (options_.skip_bad_lines || summary_.bad_lines == 0) examples_.push_back(*std::move(r.example));
  return absl::OkStatus();
}

absl::Status JsonlValidator::Finish() {
  if (!config_status_.ok()) return config_status_;
  if (finished_) return finish_status_;
  if (pending_bytes_ > 0) {
    ProcessLine(pending_, pending_bytes_, pending_too_long_).IgnoreError();
    pending_.clear();
    pending_too_long_ = false;
    pending_bytes_ = 0;
  }
  finished_ = true;

  const bool rejected = summary_.bad_lines > 0 && !options_.skip_bad_lines;
  if (!rejected && summary_.accepted > 0) {
    finish_status_ = absl::OkStatus();
    return finish_status_;
  }
  std::string msg;
  if (rejected) {
    msg = absl::StrCat(source_, ": ", summary_.bad_lines, " of ", summary_.lines,
                       " lines are invalid; nothing was accepted");
  } else {
    msg = absl::StrCat(source_, ": no examples (", summary_.lines, " lines, ", summary_.blank_lines,
                       " blank, ", summary_.bad_lines, " invalid)");
  }
  int64_t listed = 0;
  for (const auto& e : errors_) {
    if (listed >= options_.max_reported_errors) break;
    absl::StrAppend(&msg, "\n", FormatError(e));
    ++listed;
  }
  if (summary_.bad_lines > listed) absl::StrAppend(&msg, "\n... and ", summary_.bad_lines - listed, " more");
  finish_status_ = absl::InvalidArgumentError(msg);
  examples_.clear();
  return finish_status_;
}

std::vector<Example> JsonlValidator::TakeExamples() {
  std::vector<Example> out;
  out.swap(examples_);
  return out;
}

absl::StatusOr<Example> ParseExampleLine(std::string_view line, const ValidationOptions& options) {
  if (absl::Status s = CheckConfig(options); !s.ok()) return s;
  if (!line.empty() && line.back() == '\n') line.remove_suffix(1);
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  if (IsBlank(line)) return absl::InvalidArgumentError("blank line");
  if (static_cast<int64_t>(line.size()) > options.max_line_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("line is ", line.size(), " bytes, over the limit of ", options.max_line_bytes));
  }
  ParseResult r = ParseLine(line, options);
  if (!r.example) return absl::InvalidArgumentError(r.error.message);
  return *std::move(r.example);
}

namespace {

absl::StatusOr<ParsedJsonl> Collect(JsonlValidator& v) {
  if (absl::Status s = v.Finish(); !s.ok()) return s;
  ParsedJsonl out;
  out.examples = v.TakeExamples();
  out.summary = v.summary();
  out.errors = v.errors();
  return out;
}

}  // namespace

absl::StatusOr<ParsedJsonl> ParseJsonlBuffer(std::string_view buffer, std::string source,
                                             const ValidationOptions& options) {
  JsonlValidator v(std::move(source), options);
  v.AddChunk(buffer);
  return Collect(v);
}

absl::StatusOr<ParsedJsonl> ParseJsonlFile(const std::string& path, const ValidationOptions& options) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    const int err = errno;
    if (!PathExists(path)) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    return absl::InternalError(absl::StrCat(path, ": cannot open: ", std::strerror(err)));
  }
  JsonlValidator v(path, options);
  std::string buf(1 << 16, '\0');
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const std::streamsize got = in.gcount();
    if (got > 0) v.AddChunk(std::string_view(buf.data(), static_cast<size_t>(got)));
  }
  if (in.bad()) return absl::InternalError(absl::StrCat(path, ": read error"));
  return Collect(v);
}

}  // namespace strata
