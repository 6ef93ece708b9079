#include "core/data/encode.h"

#include <algorithm>
#include <string>

namespace strata {
namespace {

std::vector<int32_t> WithBos(const Tokenizer& tokenizer, std::vector<int32_t> ids) {
  if (tokenizer.adds_bos()) {
    if (auto bos = tokenizer.bos_id()) ids.insert(ids.begin(), *bos);
  }
  return ids;
}

bool StartsWith(const std::vector<int32_t>& ids, const std::vector<int32_t>& prefix) {
  return ids.size() >= prefix.size() && std::equal(prefix.begin(), prefix.end(), ids.begin());
}

}  // namespace

std::vector<int32_t> EncodePrompt(const Tokenizer& tokenizer, std::string_view prompt) {
  return WithBos(tokenizer, tokenizer.Encode(prompt, /*add_special_tokens=*/false));
}

PromptCompletionIds EncodePromptCompletion(const Tokenizer& tokenizer, std::string_view prompt,
                                           std::string_view completion) {
  PromptCompletionIds out;
  out.prompt = EncodePrompt(tokenizer, prompt);
  std::string whole_text;
  whole_text.reserve(prompt.size() + completion.size());
  whole_text.append(prompt);
  whole_text.append(completion);
  std::vector<int32_t> whole = EncodePrompt(tokenizer, whole_text);
  if (StartsWith(whole, out.prompt) && whole.size() > out.prompt.size()) {
    out.completion.assign(whole.begin() + static_cast<std::ptrdiff_t>(out.prompt.size()), whole.end());
  } else {
    out.completion = tokenizer.Encode(completion, /*add_special_tokens=*/false);
  }
  return out;
}

std::vector<int32_t> EncodeCompletionAfter(const Tokenizer& tokenizer, std::string_view prompt,
                                           std::string_view completion) {
  size_t start = 0;
  if (prompt.size() > kCompletionContextBytes) {
    // Just after a space or newline, so the tail starts a word as it does inside the prompt.
    const size_t from = prompt.size() - kCompletionContextBytes;
    const size_t ws = prompt.find_first_of(" \n", from);
    if (ws != std::string_view::npos && ws + 1 < prompt.size()) start = ws + 1;
  }
  if (start == 0) return EncodePromptCompletion(tokenizer, prompt, completion).completion;
  const std::string_view tail = prompt.substr(start);
  const std::vector<int32_t> tail_ids = tokenizer.Encode(tail, /*add_special_tokens=*/false);
  std::string joined(tail);
  joined.append(completion);
  const std::vector<int32_t> whole = tokenizer.Encode(joined, /*add_special_tokens=*/false);
  if (StartsWith(whole, tail_ids) && whole.size() > tail_ids.size()) {
    return std::vector<int32_t>(whole.begin() + static_cast<std::ptrdiff_t>(tail_ids.size()), whole.end());
  }
  return tokenizer.Encode(completion, /*add_special_tokens=*/false);
}

EncodedExample EncodeExample(const Tokenizer& tokenizer, const Example& example,
                             const EncodeOptions& options) {
  EncodedExample out;
  const int64_t max_len = options.max_seq_len <= 0 ? 0 : std::max<int64_t>(options.max_seq_len, 2);
  std::optional<int32_t> eos;
  if (options.add_eos) {
    auto eos_ids = tokenizer.eos_ids();
    if (!eos_ids.empty()) eos = eos_ids.front();
  }

  if (example.kind == ExampleKind::kText) {
    out.ids = EncodePrompt(tokenizer, example.text);
    if (eos) out.ids.push_back(*eos);
    out.target_start = 1;
    out.untruncated_length = out.length();
    if (max_len > 0 && out.length() > max_len) {
      out.ids.resize(static_cast<size_t>(max_len));
      out.truncated = true;
    }
    return out;
  }

  PromptCompletionIds pc = EncodePromptCompletion(tokenizer, example.prompt, example.completion);
  if (eos) pc.completion.push_back(*eos);
  // A prompt always yields >= 1 token in practice (validated prompts are non-empty); guard anyway so
  // that the first completion token has a context position.
  if (pc.prompt.empty() && !pc.completion.empty()) {
    pc.prompt.push_back(pc.completion.front());
    pc.completion.erase(pc.completion.begin());
  }
  const int64_t p = static_cast<int64_t>(pc.prompt.size());
  const int64_t c = static_cast<int64_t>(pc.completion.size());
  out.untruncated_length = p + c;
  if (max_len > 0 && p + c > max_len) {
    out.truncated = true;
    const int64_t keep_c = std::min(c, max_len - 1);
    const int64_t budget = max_len - keep_c;  // >= 1
    const bool has_bos =
        tokenizer.adds_bos() && tokenizer.bos_id().has_value() && pc.prompt.front() == *tokenizer.bos_id();
    std::vector<int32_t> prompt;
    prompt.reserve(static_cast<size_t>(budget));
    int64_t tail = budget;
    if (has_bos) {
      prompt.push_back(pc.prompt.front());
      tail = std::min(budget - 1, p - 1);
    }
    tail = std::min(tail, p);
    prompt.insert(prompt.end(), pc.prompt.end() - tail, pc.prompt.end());
    pc.prompt = std::move(prompt);
    pc.completion.resize(static_cast<size_t>(keep_c));
  }
  out.target_start = static_cast<int32_t>(pc.prompt.size());
  out.ids = std::move(pc.prompt);
  out.ids.insert(out.ids.end(), pc.completion.begin(), pc.completion.end());
  return out;
}

std::vector<EncodedExample> EncodeExamples(const Tokenizer& tokenizer, const std::vector<Example>& examples,
                                           const EncodeOptions& options) {
  std::vector<EncodedExample> out;
  out.reserve(examples.size());
  for (const auto& e : examples) out.push_back(EncodeExample(tokenizer, e, options));
  return out;
}

int64_t CountExampleTokens(const Tokenizer& tokenizer, const Example& example) {
  switch (example.kind) {
    case ExampleKind::kText:
      return static_cast<int64_t>(EncodePrompt(tokenizer, example.text).size());
    case ExampleKind::kCompletion: {
      auto pc = EncodePromptCompletion(tokenizer, example.prompt, example.completion);
      return static_cast<int64_t>(pc.prompt.size() + pc.completion.size());
    }
    case ExampleKind::kChoice: {
      int64_t longest = 0;
      for (const auto& choice : example.choices) {
        auto pc = EncodePromptCompletion(tokenizer, example.prompt, choice);
        longest = std::max<int64_t>(longest, static_cast<int64_t>(pc.prompt.size() + pc.completion.size()));
      }
      return longest;
    }
  }
  return 0;
}

}  // namespace strata
