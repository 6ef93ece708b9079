#pragma once
// The text-classification continual-learning benchmark (O-LoRA / OSFT / ELLA; ../shared/data/cl):
// `task.json` = {"name", "instruction", "labels": [...], ...} and JSONL lines {"text", "label"}.
//
// Conversion to a kChoice Example (the benchmark prompt, exact layout, '\n' = one LF byte):
//
//   prompt     = instruction + "\n"
//              + "Option: " + join(labels, ", ") + "\n"
//              + RStrip(text) + "\n"
//              + "Answer:"
//   completion = " " + label
//   choices    = " " + each label, in task.json order
//
// RStrip removes trailing ASCII whitespace (space, \t, \r, \n, \v, \f) from the text, so every
// task has exactly one newline before "Answer:" (the raw texts end variously with "\n" or " ").
// Leading and inner whitespace of the text is kept verbatim. There is no trailing space after
// "Answer:" (the space belongs to the completion, as in the benchmark).
//
// Thread-compatible value types; functions are pure and fail with INVALID_ARGUMENT / NOT_FOUND
// naming the file and field.

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/data/example.h"

namespace strata {

struct ClTaskSpec {
  std::string name;                 // task.json "name" (may be empty: callers fall back to the directory)
  std::string instruction;          // non-empty
  std::vector<std::string> labels;  // >= 2, distinct, non-empty

  // Index of `label` in `labels`, or -1.
  int LabelIndex(std::string_view label) const;
};

// Parses the contents of a benchmark task.json; `source` names it in errors.
absl::StatusOr<ClTaskSpec> ParseClTaskSpec(std::string_view json_text, std::string_view source);
// Reads and parses `path` (NOT_FOUND when missing).
absl::StatusOr<ClTaskSpec> LoadClTaskSpec(const std::string& path);

// The benchmark prompt for one text (layout above).
std::string BuildClPrompt(const ClTaskSpec& spec, std::string_view text);

// Converts one {"text", "label"} record. INVALID_ARGUMENT when the label is not one of the spec's
// labels or the text is empty.
absl::StatusOr<Example> ConvertClExample(const ClTaskSpec& spec, std::string_view text,
                                         std::string_view label);

}  // namespace strata
