#pragma once
// SubmitTask's request handling without the server around it: a TaskSpec message as the core's
// TaskSpecification, and one split's data chunks (JSONL bytes and structured examples) through the
// streaming JSONL validator. Torch-free: the SubmitTask fuzz target (fuzz/fuzz_submit_task.cc)
// runs this same code.

#include <cstdint>
#include <string>

#include "core/data/jsonl.h"
#include "core/jobs/job.h"
#include "strata/v1/adaptation.pb.h"

namespace strata {

// The spec as submitted (unknown scorer values are the caller's to refuse first).
TaskSpecification SpecFromProto(const strata::v1::TaskSpec& spec);

// A JSON string literal of `bytes`, copied as they are (invalid UTF-8 included, so that the
// validator refuses it naming the line and field instead of it being replaced silently).
std::string RawJsonString(const std::string& bytes);

// A structured example as the JSONL line the validator checks (only non-empty fields, so a
// missing field is reported as missing and "text" + "prompt" as ambiguous, exactly as in JSONL).
std::string StructuredExampleLine(const strata::v1::Example& example);

// The name a split's line errors carry: `given` (TaskSpec.train_source / eval_source, e.g. the
// client's file path) made printable (control characters become '?', invalid UTF-8 U+FFFD), a
// name over 256 bytes shortened to its last path component (and that to its last 256 bytes), or
// `fallback` when `given` is empty.
std::string SplitSourceName(const std::string& given, const std::string& fallback);

// One split (train or eval) of a submission: a streaming validator plus the bookkeeping the
// limits need. Thread-compatible.
class SplitIngest {
 public:
  SplitIngest(const std::string& source, const ValidationOptions& options) : validator_(source, options) {}

  // Feeds one DataChunk; returns the bytes it carried.
  int64_t Add(const strata::v1::DataChunk& chunk);

  // Non-blank lines seen so far (valid or not): what the example limit counts.
  int64_t lines() const { return validator_.summary().lines - validator_.summary().blank_lines; }
  bool received() const { return received_; }
  JsonlValidator& validator() { return validator_; }

 private:
  JsonlValidator validator_;
  bool received_ = false;
  bool at_line_start_ = true;
};

}  // namespace strata
