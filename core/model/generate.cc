#include "core/model/generate.h"

#include <memory>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/model/decode_batch.h"
#include "core/model/model.h"
#include "core/model/tokenizer.h"

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
      row.on_token = [&on_token, i](int32_t id, const std::string& delta) { return on_token(i, id, delta); };
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

}  // namespace strata
