#include "core/data/example.h"

#include <utility>

#include "nlohmann/json.hpp"

namespace strata {

std::string_view ExampleKindName(ExampleKind kind) {
  switch (kind) {
    case ExampleKind::kCompletion:
      return "completion";
    case ExampleKind::kChoice:
      return "choice";
    case ExampleKind::kText:
      return "text";
  }
  return "unknown";
}

std::optional<ExampleKind> ParseExampleKind(std::string_view name) {
  if (name == "completion") return ExampleKind::kCompletion;
  if (name == "choice") return ExampleKind::kChoice;
  if (name == "text") return ExampleKind::kText;
  return std::nullopt;
}

int Example::CorrectChoice() const {
  for (size_t i = 0; i < choices.size(); ++i) {
    if (choices[i] == completion) return static_cast<int>(i);
  }
  return -1;
}

bool Example::operator==(const Example& other) const {
  return kind == other.kind && prompt == other.prompt && completion == other.completion &&
         choices == other.choices && text == other.text;
}

Example MakeCompletionExample(std::string prompt, std::string completion) {
  Example e;
  e.kind = ExampleKind::kCompletion;
  e.prompt = std::move(prompt);
  e.completion = std::move(completion);
  return e;
}

Example MakeChoiceExample(std::string prompt, std::string completion, std::vector<std::string> choices) {
  Example e;
  e.kind = ExampleKind::kChoice;
  e.prompt = std::move(prompt);
  e.completion = std::move(completion);
  e.choices = std::move(choices);
  return e;
}

Example MakeTextExample(std::string text) {
  Example e;
  e.kind = ExampleKind::kText;
  e.text = std::move(text);
  return e;
}

std::string ExampleToJsonLine(const Example& example) {
  // ordered_json keeps the conventional key order (prompt, completion, choices).
  nlohmann::ordered_json j;
  if (example.kind == ExampleKind::kText) {
    j["text"] = example.text;
  } else {
    j["prompt"] = example.prompt;
    j["completion"] = example.completion;
    if (example.kind == ExampleKind::kChoice) j["choices"] = example.choices;
  }
  // Strings were validated as UTF-8; `replace` only guards against unvalidated callers.
  return j.dump(-1, ' ', /*ensure_ascii=*/false, nlohmann::json::error_handler_t::replace);
}

}  // namespace strata
