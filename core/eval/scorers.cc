#include "core/eval/scorers.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/data/batching.h"
#include "core/data/encode.h"
#include "core/eval/metrics.h"
#include "core/model/generate.h"
#include "core/util/status_macros.h"

namespace strata {
namespace {

constexpr int64_t kIgnore = -100;

// Indices of `lengths` sorted by length (longest first, stable), cut into batches.
std::vector<std::vector<int64_t>> LengthSortedBatches(const std::vector<int64_t>& lengths,
                                                      int64_t batch_size) {
  std::vector<int64_t> order(lengths.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
  std::vector<std::vector<int64_t>> batches;
  for (size_t i = 0; i < order.size(); i += static_cast<size_t>(batch_size)) {
    const size_t end = std::min(order.size(), i + static_cast<size_t>(batch_size));
    batches.emplace_back(order.begin() + static_cast<std::ptrdiff_t>(i),
                         order.begin() + static_cast<std::ptrdiff_t>(end));
  }
  return batches;
}

// Σ −log p over the target tokens of every sequence (and the target counts), batched by length
// under InferenceMode: one forward and one fused cross-entropy per batch.
absl::Status SequenceNll(const CausalLM& model, const std::vector<EncodedExample>& seqs, int64_t batch_size,
                         int64_t pad_id, std::vector<double>* nll, std::vector<int64_t>* counts) {
  nll->assign(seqs.size(), 0.0);
  counts->assign(seqs.size(), 0);
  std::vector<int64_t> lengths;
  lengths.reserve(seqs.size());
  for (const auto& s : seqs) lengths.push_back(s.length());
  BatchOptions batch_options;
  batch_options.pad_id = pad_id;
  batch_options.ignore_index = kIgnore;
  try {
    c10::InferenceMode guard;
    const auto long_opts = at::TensorOptions().dtype(at::kLong);
    for (const auto& rows : LengthSortedBatches(lengths, batch_size)) {
      Batch batch = MakeBatch(seqs, rows, batch_options);
      const int64_t r = batch.rows;
      const int64_t t = batch.seq_len;
      // Shift labels: position j predicts token j + 1.
      for (int64_t i = 0; i < r; ++i) {
        int64_t* row = batch.labels.data() + i * t;
        for (int64_t j = 0; j + 1 < t; ++j) row[j] = row[j + 1];
        row[t - 1] = kIgnore;
      }
      at::Tensor ids = at::from_blob(batch.input_ids.data(), {r, t}, long_opts);
      at::Tensor labels = at::from_blob(batch.labels.data(), {r, t}, long_opts);
      at::Tensor mask;
      if (batch.real_tokens != r * t) mask = at::from_blob(batch.attention_mask.data(), {r, t}, long_opts);
      if (!model.device().is_cpu()) {
        ids = ids.to(model.device());
        labels = labels.to(model.device());
        if (mask.defined()) mask = mask.to(model.device());
      }
      const at::Tensor logits = model.Forward(ids, mask);  // [r, t, V] float32
      const int64_t vocab = logits.size(-1);
      const at::Tensor token_nll = at::cross_entropy_loss(logits.view({r * t, vocab}), labels.view({r * t}),
                                                          {}, at::Reduction::None, kIgnore)
                                       .view({r, t})
                                       .to(at::kDouble)
                                       .sum(1)
                                       .cpu();
      const double* sums = token_nll.data_ptr<double>();
      for (int64_t i = 0; i < r; ++i) {
        const int64_t idx = batch.example_indices[static_cast<size_t>(i)];
        (*nll)[static_cast<size_t>(idx)] = sums[i];
        (*counts)[static_cast<size_t>(idx)] = seqs[static_cast<size_t>(idx)].num_targets();
      }
    }
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("scoring forward pass failed: ", e.what()));
  }
  return absl::OkStatus();
}

int64_t MaxLen(const CausalLM& model, int64_t requested) {
  return requested > 0 ? requested : model.config().max_position_embeddings;
}

}  // namespace

absl::StatusOr<ChoiceScore> ScoreChoice(const CausalLM& model, const Tokenizer& tokenizer,
                                        const std::vector<Example>& examples, const ScorerOptions& options) {
  if (options.batch_size < 1) return absl::InvalidArgumentError("choice scorer: batch_size must be >= 1");
  EncodeOptions encode;
  encode.max_seq_len = MaxLen(model, options.max_seq_len);
  std::vector<EncodedExample> seqs;
  std::vector<std::pair<size_t, size_t>> owner;  // (example, choice) of each sequence
  for (size_t i = 0; i < examples.size(); ++i) {
    const Example& e = examples[i];
    if (e.kind != ExampleKind::kChoice || e.choices.size() < 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("choice scorer: example ", i, " is not a choice example with at least 2 choices"));
    }
    for (size_t c = 0; c < e.choices.size(); ++c) {
      seqs.push_back(EncodeExample(tokenizer, MakeCompletionExample(e.prompt, e.choices[c]), encode));
      owner.emplace_back(i, c);
    }
  }
  ChoiceScore score;
  score.total = static_cast<int64_t>(examples.size());
  score.log_likelihoods.resize(examples.size());
  for (size_t i = 0; i < examples.size(); ++i)
    score.log_likelihoods[i].assign(examples[i].choices.size(), 0.0);
  if (!seqs.empty()) {
    std::vector<double> nll;
    std::vector<int64_t> counts;
    RETURN_IF_ERROR(SequenceNll(model, seqs, options.batch_size, DefaultPadId(tokenizer), &nll, &counts));
    for (size_t s = 0; s < seqs.size(); ++s) score.log_likelihoods[owner[s].first][owner[s].second] = -nll[s];
  }
  for (size_t i = 0; i < examples.size(); ++i) {
    const auto& ll = score.log_likelihoods[i];
    const int best = static_cast<int>(std::max_element(ll.begin(), ll.end()) - ll.begin());
    score.predicted.push_back(best);
    if (best == examples[i].CorrectChoice()) ++score.correct;
  }
  score.accuracy =
      score.total > 0 ? static_cast<double>(score.correct) / static_cast<double>(score.total) : 0.0;
  return score;
}

absl::StatusOr<ExactMatchScore> ScoreExactMatch(const CausalLM& model, const Tokenizer& tokenizer,
                                                const std::vector<Example>& examples,
                                                const ExactMatchOptions& options) {
  if (options.batch_size < 1)
    return absl::InvalidArgumentError("exact-match scorer: batch_size must be >= 1");
  if (options.extra_new_tokens < 0 || options.max_new_tokens < 0) {
    return absl::InvalidArgumentError("exact-match scorer: token budgets must be >= 0");
  }
  std::vector<std::vector<int32_t>> prompts;
  std::vector<int64_t> budgets;
  for (size_t i = 0; i < examples.size(); ++i) {
    const Example& e = examples[i];
    if (e.kind == ExampleKind::kText) {
      return absl::InvalidArgumentError(
          absl::StrCat("exact-match scorer: example ", i, " is a text example"));
    }
    PromptCompletionIds ids = EncodePromptCompletion(tokenizer, e.prompt, e.completion);
    int64_t budget = options.max_new_tokens > 0
                         ? options.max_new_tokens
                         : static_cast<int64_t>(ids.completion.size()) + options.extra_new_tokens;
    budgets.push_back(std::max<int64_t>(budget, 1));
    prompts.push_back(std::move(ids.prompt));
  }
  ExactMatchScore score;
  score.total = static_cast<int64_t>(examples.size());
  score.predictions.assign(examples.size(), "");
  score.matches.assign(examples.size(), false);

  SamplingOptions sampling;
  sampling.temperature = 0.0f;
  sampling.stop_on_eos = true;
  if (options.stop_at_bos && tokenizer.bos_id()) sampling.stop_ids.push_back(*tokenizer.bos_id());
  if (options.stop_at_newline) sampling.stop_strings.push_back("\n");
  // Batches of similar budgets (and, within them, similar prompt lengths).
  std::vector<int64_t> key(examples.size());
  for (size_t i = 0; i < examples.size(); ++i) {
    key[i] = budgets[i] * 1000000 + static_cast<int64_t>(prompts[i].size());
  }
  for (const auto& rows : LengthSortedBatches(key, options.batch_size)) {
    std::vector<std::vector<int32_t>> batch_prompts;
    int64_t budget = 0;
    for (int64_t r : rows) {
      batch_prompts.push_back(prompts[static_cast<size_t>(r)]);
      budget = std::max(budget, budgets[static_cast<size_t>(r)]);
    }
    sampling.max_new_tokens = static_cast<int32_t>(budget);
    absl::StatusOr<std::vector<GenerationResult>> results;
    try {
      results = Generate(model, tokenizer, batch_prompts, sampling);
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat("exact-match scorer: generation failed: ", e.what()));
    }
    if (!results.ok()) return results.status();
    for (size_t j = 0; j < rows.size(); ++j) {
      const size_t idx = static_cast<size_t>(rows[j]);
      std::vector<int32_t> ids = (*results)[j].ids;
      if (static_cast<int64_t>(ids.size()) > budgets[idx]) ids.resize(static_cast<size_t>(budgets[idx]));
      std::string text = tokenizer.Decode(ids, /*skip_special_tokens=*/true);
      if (options.stop_at_newline) {
        const size_t nl = text.find('\n');
        if (nl != std::string::npos) text.resize(nl);
      }
      score.matches[idx] = ExactMatch(text, examples[idx].completion);
      if (score.matches[idx]) ++score.correct;
      score.predictions[idx] = std::move(text);
    }
  }
  score.accuracy =
      score.total > 0 ? static_cast<double>(score.correct) / static_cast<double>(score.total) : 0.0;
  return score;
}

absl::StatusOr<NllScore> ScoreNll(const CausalLM& model, const Tokenizer& tokenizer,
                                  const std::vector<std::string>& texts, const NllOptions& options) {
  if (options.batch_size < 1) return absl::InvalidArgumentError("NLL scorer: batch_size must be >= 1");
  if (options.max_seq_len < 2) return absl::InvalidArgumentError("NLL scorer: max_seq_len must be >= 2");
  if (texts.empty()) return absl::InvalidArgumentError("NLL scorer: no text");
  std::vector<EncodedExample> windows;
  std::vector<size_t> owner;
  const int64_t len = options.max_seq_len;
  for (size_t i = 0; i < texts.size(); ++i) {
    const std::vector<int32_t> ids = EncodePrompt(tokenizer, texts[i]);
    const int64_t n = static_cast<int64_t>(ids.size());
    if (n < 2)
      return absl::InvalidArgumentError(absl::StrCat("NLL scorer: text ", i, " has no token to predict"));
    for (int64_t start = 0; start + 1 < n; start += len - 1) {
      EncodedExample w;
      const int64_t end = std::min(n, start + len);
      w.ids.assign(ids.begin() + start, ids.begin() + end);
      w.target_start = 1;
      w.untruncated_length = n;
      windows.push_back(std::move(w));
      owner.push_back(i);
      if (!options.all_windows) break;
    }
  }
  std::vector<double> nll;
  std::vector<int64_t> counts;
  RETURN_IF_ERROR(SequenceNll(model, windows, options.batch_size, DefaultPadId(tokenizer), &nll, &counts));
  std::vector<double> text_nll(texts.size(), 0.0);
  std::vector<int64_t> text_tokens(texts.size(), 0);
  NllScore score;
  double total = 0;
  for (size_t w = 0; w < windows.size(); ++w) {
    text_nll[owner[w]] += nll[w];
    text_tokens[owner[w]] += counts[w];
    total += nll[w];
    score.tokens += counts[w];
  }
  for (size_t i = 0; i < texts.size(); ++i) {
    score.per_text.push_back(text_nll[i] / static_cast<double>(text_tokens[i]));
  }
  score.mean_nll = total / static_cast<double>(score.tokens);
  score.perplexity = std::exp(score.mean_nll);
  return score;
}

std::vector<std::string> SplitOnBlankLines(std::string_view text) {
  std::vector<std::string> out;
  std::string current;
  auto is_space = [](char c) {
    return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\v' || c == '\f';
  };
  auto flush = [&]() {
    size_t b = 0, e = current.size();
    while (b < e && is_space(current[b])) ++b;
    while (e > b && is_space(current[e - 1])) --e;
    if (e > b) out.push_back(current.substr(b, e - b));
    current.clear();
  };
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string_view::npos) nl = text.size();
    std::string_view line = text.substr(pos, nl - pos);
    const bool blank = std::all_of(line.begin(), line.end(), is_space);
    if (blank) {
      flush();
    } else {
      current.append(line.data(), line.size());
      current.push_back('\n');
    }
    pos = nl + 1;
  }
  flush();
  return out;
}

absl::StatusOr<double> MeanNllOnModels(const std::vector<std::shared_ptr<const CausalLM>>& models,
                                       const std::vector<size_t>& model_of_text, const Tokenizer& tokenizer,
                                       const std::vector<std::string>& texts, const NllOptions& options) {
  if (model_of_text.size() != texts.size()) {
    return absl::InvalidArgumentError("MeanNllOnModels: one model index per text is required");
  }
  std::map<size_t, std::vector<std::string>> groups;
  for (size_t i = 0; i < texts.size(); ++i) {
    if (model_of_text[i] >= models.size()) {
      return absl::InvalidArgumentError(absl::StrCat("MeanNllOnModels: text ", i, " names model ",
                                                     model_of_text[i], " of ", models.size()));
    }
    groups[model_of_text[i]].push_back(texts[i]);
  }
  double nll = 0;
  int64_t tokens = 0;
  for (const auto& [index, group] : groups) {
    ASSIGN_OR_RETURN(NllScore s, ScoreNll(*models[index], tokenizer, group, options));
    nll += s.mean_nll * static_cast<double>(s.tokens);
    tokens += s.tokens;
  }
  if (tokens == 0) return absl::InvalidArgumentError("MeanNllOnModels: no text to score");
  return nll / static_cast<double>(tokens);
}

}  // namespace strata
