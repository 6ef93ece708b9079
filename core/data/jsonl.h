#pragma once
// Parsing and validation of JSONL task files, from a file, a buffer, or chunks of bytes streamed
// over gRPC (a line may be split across chunks).
//
// Line rules (physical lines, numbered from 1, blank lines included in the numbering):
//  * Lines end with "\n"; one trailing "\r" is removed (CRLF files). The last line may lack "\n".
//  * A UTF-8 byte-order mark at the start of line 1 is ignored.
//  * Blank lines (only spaces / tabs) are skipped and counted, never an error.
//  * Every other line must be one JSON object in one of the shapes of example.h:
//      {"prompt": str, "completion": str [, "choices": [str, ...]]} or {"text": str};
//    or, when ValidationOptions::cl_task is set, a benchmark line {"text": str, "label": str} that
//    is converted with the task's prompt (cl_benchmark.h).
//  * Reasons a line is rejected (LineErrorReason): longer than max_line_bytes; invalid UTF-8
//    (strict: no overlongs, surrogates or code points > U+10FFFF); not JSON; not an object;
//    unknown field (unless allow_unknown_fields); both "text" and "prompt"/"completion";
//    missing field; wrong type; empty "prompt", "completion", "text" (or benchmark "text");
//    malformed "choices" (not >= 2 distinct non-empty strings); completion not among the choices;
//    benchmark label not among the task's labels; a kind (completion / choice / text) different
//    from the file's kind, which the first valid line sets (no mixing within a file);
//    more than max_tokens tokens (encode.h CountExampleTokens).
//  * Strict mode (default): every bad line is recorded and reported, and nothing from the input is
//    accepted (Finish() fails; examples stop being collected after the first error).
//    skip_bad_lines: bad lines are dropped and counted, the rest accepted.
//  * An input with no examples at all (empty, only blank lines, or every line bad) fails.
//
// Messages look like `train.jsonl:17: field "completion": expected a string, got number`.
// Finish()'s INVALID_ARGUMENT message lists the first max_reported_errors errors and the count of
// the rest.
//
// Thread safety: JsonlValidator is thread-compatible (one stream = one validator, one thread at a
// time). The Tokenizer it points to must outlive it.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/data/cl_benchmark.h"
#include "core/data/example.h"
#include "core/model/tokenizer.h"
#include "core/util/utf8.h"  // IsValidUtf8

namespace strata {

enum class LineErrorReason {
  kLineTooLong,
  kInvalidUtf8,
  kNotJson,
  kNotObject,
  kUnknownField,
  kAmbiguousKind,  // both "text" and "prompt"/"completion"
  kMissingField,
  kWrongType,
  kEmptyField,
  kBadChoices,
  kCompletionNotInChoices,
  kUnknownLabel,  // benchmark lines only
  kMixedKinds,
  kTooManyTokens,
};

// Stable snake_case name, e.g. "not_json", "completion_not_in_choices".
std::string_view LineErrorReasonName(LineErrorReason reason);

struct LineError {
  int64_t line = 0;  // 1-based physical line number
  LineErrorReason reason = LineErrorReason::kNotJson;
  std::string field;    // the JSON field concerned, or empty
  std::string message;  // without the "source:line: " prefix
};

struct ValidationOptions {
  // Drop bad lines (counted in bad_lines) instead of rejecting the whole input.
  bool skip_bad_lines = false;
  // Longer lines are rejected without being buffered beyond this size (protects the server
  // from a stream without newlines).
  int64_t max_line_bytes = 1 << 20;
  // Token limit per example (0 = none), counted by CountExampleTokens (encode.h). Requires
  // `tokenizer`: without one, AddLine() and Finish() return INVALID_ARGUMENT (misconfiguration).
  int64_t max_tokens = 0;
  const Tokenizer* tokenizer = nullptr;  // not owned
  // Accept and ignore fields other than prompt / completion / choices / text.
  bool allow_unknown_fields = false;
  // When set, lines are benchmark records {"text", "label"} converted with this spec (not owned;
  // must outlive the validator). Unknown fields are then rejected likewise.
  const ClTaskSpec* cl_task = nullptr;
  // How many errors Finish()'s message lists; how many LineError records are kept (all are counted).
  int max_reported_errors = 20;
  int64_t max_stored_errors = 1000;
};

struct ValidationSummary {
  int64_t lines = 0;                // physical lines seen (blank ones included)
  int64_t blank_lines = 0;          // skipped blank lines
  int64_t accepted = 0;             // valid examples
  int64_t bad_lines = 0;            // invalid lines (all counted, even beyond max_stored_errors)
  std::optional<ExampleKind> kind;  // set by the first valid line
};

class JsonlValidator {
 public:
  // `source` prefixes every message (a file name, or e.g. "task capitals train.jsonl").
  explicit JsonlValidator(std::string source, ValidationOptions options = {});

  // Feeds raw bytes. Complete lines are validated now; a trailing partial line (no "\n" yet,
  // possibly cut inside a UTF-8 sequence or between "\r" and "\n") waits for the next chunk
  // or Finish(). Do not mix with AddLine().
  void AddChunk(std::string_view bytes);

  // Validates the next physical line (without its "\n"; a trailing "\r" is removed). Returns the
  // line's error (also recorded) or OK for a valid or blank line. Lines fed after Finish() fail.
  absl::Status AddLine(std::string_view line);

  // Ends the input: validates a pending last line without "\n". OK when the input is accepted
  // (strict mode: no bad line; always: at least one example). Otherwise INVALID_ARGUMENT listing
  // the errors. Idempotent.
  absl::Status Finish();

  // Moves out the examples accepted so far (the server spools them as it goes; it must discard
  // them if Finish() fails). In strict mode no example is collected after the first error.
  std::vector<Example> TakeExamples();

  const std::vector<LineError>& errors() const { return errors_; }
  const ValidationSummary& summary() const { return summary_; }
  const std::string& source() const { return source_; }
  // "source:line: message".
  std::string FormatError(const LineError& error) const;

 private:
  // `line_bytes` is the line's real size (larger than line.size() when `dropped`: a too-long
  // line whose bytes were not buffered).
  absl::Status ProcessLine(std::string_view line, int64_t line_bytes, bool dropped);
  absl::Status Record(LineError error);

  std::string source_;
  ValidationOptions options_;
  ValidationSummary summary_;
  std::vector<LineError> errors_;
  std::vector<Example> examples_;
  std::string pending_;            // partial line carried between chunks
  bool pending_too_long_ = false;  // the pending line already exceeded max_line_bytes
  int64_t pending_bytes_ = 0;      // bytes of the pending line, including dropped ones
  int64_t first_kind_line_ = 0;    // line that set summary_.kind
  bool finished_ = false;
  absl::Status finish_status_;
  absl::Status config_status_;
};

// Validates one line on its own (line number 1, no kind consistency): the Example or the error.
absl::StatusOr<Example> ParseExampleLine(std::string_view line, const ValidationOptions& options = {});

struct ParsedJsonl {
  std::vector<Example> examples;
  ValidationSummary summary;
  std::vector<LineError> errors;  // the skipped lines when skip_bad_lines
};

// Whole-input helpers: OK with the accepted examples, or Finish()'s error. The file is streamed in
// chunks (NOT_FOUND if missing); its path as given names it in messages.
absl::StatusOr<ParsedJsonl> ParseJsonlBuffer(std::string_view buffer, std::string source,
                                             const ValidationOptions& options = {});
absl::StatusOr<ParsedJsonl> ParseJsonlFile(const std::string& path, const ValidationOptions& options = {});

}  // namespace strata
