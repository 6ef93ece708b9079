#pragma once
// One training / evaluation example of a task, in the service's own format.
//
// JSONL line shapes (see jsonl.h for the validation rules):
//   {"prompt": str, "completion": str}                      -> ExampleKind::kCompletion
//   {"prompt": str, "completion": str, "choices": [str,..]} -> ExampleKind::kChoice
//   {"text": str}                                           -> ExampleKind::kText
// Supervised kinds put the loss on completion tokens only; kText puts it on every token.
//
// Plain value types; thread-compatible.

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace strata {

enum class ExampleKind {
  kCompletion,  // prompt + completion (exact-match style)
  kChoice,      // prompt + completion + choices (completion is one of the choices)
  kText,        // plain language modelling
};

// "completion", "choice", "text".
std::string_view ExampleKindName(ExampleKind kind);
std::optional<ExampleKind> ParseExampleKind(std::string_view name);

struct Example {
  ExampleKind kind = ExampleKind::kCompletion;
  std::string prompt;                // kCompletion / kChoice; empty for kText
  std::string completion;            // kCompletion / kChoice; empty for kText
  std::vector<std::string> choices;  // kChoice only
  std::string text;                  // kText only

  // Index of `completion` in `choices`, or -1 (always >= 0 for a validated kChoice example).
  int CorrectChoice() const;

  bool operator==(const Example& other) const;
  bool operator!=(const Example& other) const { return !(*this == other); }
};

Example MakeCompletionExample(std::string prompt, std::string completion);
Example MakeChoiceExample(std::string prompt, std::string completion, std::vector<std::string> choices);
Example MakeTextExample(std::string text);

// The canonical JSONL line of an example (no trailing newline), e.g. for spooling validated
// examples to disk; the validator accepts it back unchanged. Non-ASCII text stays UTF-8.
std::string ExampleToJsonLine(const Example& example);

}  // namespace strata
