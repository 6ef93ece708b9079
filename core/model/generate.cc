#include "core/model/generate.h"

#include <torch/torch.h>

#include <algorithm>
#include <memory>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/model/decode_batch.h"
#include "core/model/model.h"
#include "core/model/tokenizer.h"
#include "core/util/status_macros.h"

namespace strata {

absl::StatusOr<std::vector<GenerationResult>> Generate(const CausalLM& model, const Tokenizer& tokenizer,
                                                       const std::vector<std::vector<int32_t>>& prompts,
                                                       const SamplingOptions& options,
                                                       const TokenCallback& on_token) {
  if (absl::Status s = ValidateSamplingOptions(options); !s.ok()) return s;
  if (prompts.empty()) return std::vector<GenerationResult>{};
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (absl::Status s = CheckPromptIds(prompts[i], model.config(), absl::StrCat("prompt ", i)); !s.ok())
      return s;
  }
  // The caller owns the model and the tokenizer for the whole call.
  DecodeBatch batch(std::shared_ptr<const CausalLM>(&model, [](const CausalLM*) {}),
                    std::shared_ptr<const Tokenizer>(&tokenizer, [](const Tokenizer*) {}));
  std::vector<GenerationResult> results(prompts.size());
  absl::Status failed;
  for (size_t i = 0; i < prompts.size(); ++i) {
    DecodeRow row;
    row.prompt = prompts[i];
    row.sampling = options;
    row.stream = i;
    if (on_token) {
      row.on_token = [&on_token, i](int32_t id, const std::string& delta, const TokenLogprob*) {
        return on_token(i, id, delta);
      };
    }
    row.on_done = [&results, &failed, i](absl::StatusOr<GenerationResult> r) {
      if (r.ok()) {
        results[i] = std::move(r).value();
      } else {
        failed = r.status();
      }
    };
    if (auto added = batch.Add(std::move(row)); !added.ok()) return added.status();
  }
  while (!batch.empty()) {
    if (absl::Status s = batch.Step(); !s.ok()) return s;
  }
  if (!failed.ok()) return failed;
  return results;
}

absl::StatusOr<std::vector<double>> ContinuationLogLikelihoods(
    const CausalLM& model, const std::vector<int32_t>& prompt,
    const std::vector<std::vector<int32_t>>& continuations, int64_t batch_size) {
  const ModelConfig& config = model.config();
  RETURN_IF_ERROR(CheckPromptIds(prompt, config, "prompt"));
  if (batch_size < 1) return absl::InvalidArgumentError("batch_size must be >= 1");
  const int64_t p = static_cast<int64_t>(prompt.size());
  for (size_t i = 0; i < continuations.size(); ++i) {
    const std::string label = absl::StrCat("completions[", i, "]");
    RETURN_IF_ERROR(CheckPromptIds(continuations[i], config, label));
    const int64_t c = static_cast<int64_t>(continuations[i].size());
    if (p + c > config.max_position_embeddings) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the prompt (", p, " tokens) and ", label, " (", c,
          " tokens) do not fit the model's max_position_embeddings ", config.max_position_embeddings));
    }
  }
  std::vector<double> out(continuations.size(), 0.0);
  if (continuations.empty()) return out;
  try {
    c10::InferenceMode guard;
    const at::Device device = model.device();
    // The prompt once: its cache, and the distribution of the first continuation token.
    KVCache prompt_cache;
    const at::Tensor ids =
        at::tensor(std::vector<int64_t>(prompt.begin(), prompt.end()), at::kLong).view({1, p});
    const at::Tensor first = at::log_softmax(
        model.Forward(ids.to(device), at::Tensor(), &prompt_cache, 1).select(1, 0).to(at::kCPU, at::kDouble),
        -1);  // [1, V]
    const double* first_lp = first.data_ptr<double>();
    for (size_t start = 0; start < continuations.size(); start += static_cast<size_t>(batch_size)) {
      const size_t end = std::min(continuations.size(), start + static_cast<size_t>(batch_size));
      const int64_t rows = static_cast<int64_t>(end - start);
      int64_t width = 0;
      for (size_t i = start; i < end; ++i)
        width = std::max<int64_t>(width, static_cast<int64_t>(continuations[i].size()));
      // Right-padded continuations; the mask covers the prompt's positions too.
      at::Tensor input = at::zeros({rows, width}, at::kLong);
      at::Tensor mask = at::ones({rows, p + width}, at::kLong);
      auto in = input.accessor<int64_t, 2>();
      for (int64_t r = 0; r < rows; ++r) {
        const auto& c = continuations[start + static_cast<size_t>(r)];
        for (size_t j = 0; j < c.size(); ++j) in[r][static_cast<int64_t>(j)] = c[j];
        const int64_t len = static_cast<int64_t>(c.size());
        if (len < width) mask[r].narrow(0, p + len, width - len).zero_();
      }
      KVCache cache;
      cache.AddRows(prompt_cache);
      cache.SelectRows(at::zeros({rows}, at::kLong).to(device));  // the prompt's row, once per continuation
      const at::Tensor logits = model.Forward(input.to(device), mask.to(device), &cache);  // [rows, width, V]
      // Position j predicts token j + 1; the first token comes from the prompt's last position.
      // log p(target) = logit(target) - logsumexp(logits): no [rows, width, V] softmax copy.
      at::Tensor picked;
      if (width > 1) {
        const at::Tensor head = logits.narrow(1, 0, width - 1);
        const at::Tensor targets = input.narrow(1, 1, width - 1).to(device).unsqueeze(-1);
        picked =
            (head.gather(2, targets).squeeze(-1).to(at::kDouble) - at::logsumexp(head, -1).to(at::kDouble))
                .to(at::kCPU)
                .contiguous();
      }
      for (int64_t r = 0; r < rows; ++r) {
        const auto& c = continuations[start + static_cast<size_t>(r)];
        double sum = first_lp[c[0]];
        if (c.size() > 1) {
          const double* row = picked.data_ptr<double>() + r * (width - 1);
          for (size_t j = 1; j < c.size(); ++j) sum += row[j - 1];
        }
        out[start + static_cast<size_t>(r)] = sum;
      }
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("scoring failed: ", e.what_without_backtrace()));
  }
  return out;
}

}  // namespace strata
