#include "core/model/generate.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/util/utf8.h"

namespace strata {
namespace {

using Clock = std::chrono::steady_clock;

// Number of prompt tokens decoded in front of the generated ones so that decoders which strip a
// leading space at the start of a text ("▁Paris" -> "Paris") keep it in the middle of one.
constexpr size_t kDecodeContextTokens = 4;

// A small, portable PRNG (splitmix64): the sampled sequence depends only on the seed.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  // Uniform in [0, 1).
  double Uniform() { return static_cast<double>(Next() >> 11) * (1.0 / 9007199254740992.0); }

 private:
  uint64_t state_;
};

int32_t Argmax(const float* logits, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i) {
    if (logits[i] > logits[best]) best = i;
  }
  return static_cast<int32_t>(best);
}

// Picks the next token from one row of float logits.
int32_t PickToken(const float* logits, int64_t vocab, const SamplingOptions& options, Rng& rng) {
  if (options.temperature <= 0.0f) return Argmax(logits, vocab);
  const double inv_t = 1.0 / static_cast<double>(options.temperature);
  std::vector<int32_t> cand;
  const bool filtered = (options.top_k > 0 && options.top_k < vocab) || options.top_p < 1.0f;
  cand.resize(static_cast<size_t>(vocab));
  std::iota(cand.begin(), cand.end(), 0);
  auto better = [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  if (options.top_k > 0 && options.top_k < vocab) {
    std::nth_element(cand.begin(), cand.begin() + options.top_k, cand.end(), better);
    cand.resize(static_cast<size_t>(options.top_k));
  }
  if (filtered) std::sort(cand.begin(), cand.end(), better);
  double max_logit = -std::numeric_limits<double>::infinity();
  for (int32_t id : cand) max_logit = std::max(max_logit, static_cast<double>(logits[id]));
  std::vector<double> probs(cand.size());
  double total = 0;
  for (size_t i = 0; i < cand.size(); ++i) {
    probs[i] = std::exp((static_cast<double>(logits[cand[i]]) - max_logit) * inv_t);
    total += probs[i];
  }
  size_t keep = cand.size();
  if (options.top_p < 1.0f) {
    // Smallest prefix (in descending probability) whose mass reaches top_p; at least one token.
    double cum = 0;
    for (size_t i = 0; i < cand.size(); ++i) {
      cum += probs[i] / total;
      if (cum >= static_cast<double>(options.top_p)) {
        keep = i + 1;
        break;
      }
    }
    total = 0;
    for (size_t i = 0; i < keep; ++i) total += probs[i];
  }
  const double u = rng.Uniform() * total;
  double acc = 0;
  for (size_t i = 0; i < keep; ++i) {
    acc += probs[i];
    if (u < acc) return cand[i];
  }
  return cand[keep - 1];
}

struct SequenceState {
  std::vector<int32_t> tokens;  // decode context (last prompt tokens) + generated ids
  size_t context = 0;           // number of leading context tokens in `tokens`
  size_t prefix_offset = 0;     // incremental detokenisation (see Detokenize)
  size_t read_offset = 0;
  std::string text;    // generated text decoded so far (complete UTF-8 only)
  size_t emitted = 0;  // bytes of `text` delivered through the callback
  int64_t max_new = 0;
  bool done = false;
  Rng rng{0};
  GenerationResult result;
};

// Appends the text of newly generated tokens to state.text: decodes tokens[prefix_offset:] and
// subtracts the text of tokens[prefix_offset:read_offset], so each step costs O(1) in the length
// of the generation. Text ending in an incomplete UTF-8 sequence waits for the next token.
void Detokenize(const Tokenizer& tokenizer, SequenceState& s, bool final) {
  const auto begin = s.tokens.begin();
  const std::string prefix_text =
      tokenizer.Decode(std::vector<int32_t>(begin + static_cast<std::ptrdiff_t>(s.prefix_offset),
                                            begin + static_cast<std::ptrdiff_t>(s.read_offset)),
                       /*skip_special_tokens=*/true);
  const std::string new_text = tokenizer.Decode(
      std::vector<int32_t>(begin + static_cast<std::ptrdiff_t>(s.prefix_offset), s.tokens.end()),
      /*skip_special_tokens=*/true);
  if (new_text.size() <= prefix_text.size() || new_text.compare(0, prefix_text.size(), prefix_text) != 0) {
    if (new_text.compare(0, prefix_text.size(), prefix_text) != 0) {
      // The decoder rewrote earlier text (unusual): fall back to decoding all generated tokens.
      const std::string all = tokenizer.Decode(
          std::vector<int32_t>(begin + static_cast<std::ptrdiff_t>(s.context), s.tokens.end()), true);
      const std::string clean = SanitizeUtf8(final ? all : all.substr(0, CompleteUtf8Prefix(all)));
      if (clean.size() > s.text.size() && clean.compare(0, s.text.size(), s.text) == 0) {
        s.text = clean;
      }
      s.prefix_offset = s.read_offset = s.tokens.size();
    }
    return;
  }
  const std::string delta = new_text.substr(prefix_text.size());
  // Wait for the rest of a character split across tokens (at the end it becomes U+FFFD).
  if (!final && CompleteUtf8Prefix(delta) < delta.size()) return;
  s.text += SanitizeUtf8(delta);
  s.prefix_offset = s.read_offset;
  s.read_offset = s.tokens.size();
}

// Bytes of s.text that may be delivered now: everything except a suffix that could be the start of
// a stop string.
size_t SafeEnd(const std::string& text, const std::vector<std::string>& stop_strings) {
  size_t end = text.size();
  for (const std::string& stop : stop_strings) {
    for (size_t len = std::min(stop.size() - 1, text.size()); len > 0; --len) {
      if (text.compare(text.size() - len, len, stop, 0, len) == 0) {
        end = std::min(end, text.size() - len);
        break;
      }
    }
  }
  return end;
}

absl::Status ValidateOptions(const SamplingOptions& o) {
  if (o.max_new_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("max_new_tokens must be >= 0, got ", o.max_new_tokens));
  }
  if (!(o.temperature >= 0.0f) || std::isinf(o.temperature)) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be a finite value >= 0, got ", o.temperature));
  }
  if (o.top_k < 0) return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", o.top_k));
  if (!(o.top_p > 0.0f && o.top_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", o.top_p));
  }
  for (const std::string& s : o.stop_strings) {
    if (s.empty()) return absl::InvalidArgumentError("stop_strings must not contain empty strings");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<GenerationResult>> Generate(const CausalLM& model, const Tokenizer& tokenizer,
                                                       const std::vector<std::vector<int32_t>>& prompts,
                                                       const SamplingOptions& options,
                                                       const TokenCallback& on_token) {
  const Clock::time_point start = Clock::now();
  if (absl::Status s = ValidateOptions(options); !s.ok()) return s;
  const ModelConfig& config = model.config();
  const int64_t vocab = config.vocab_size;
  if (prompts.empty()) return std::vector<GenerationResult>{};
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (prompts[i].empty()) {
      return absl::InvalidArgumentError(absl::StrCat("prompt ", i, " is empty"));
    }
    if (static_cast<int64_t>(prompts[i].size()) > config.max_position_embeddings) {
      return absl::InvalidArgumentError(absl::StrCat(
          "prompt ", i, " has ", prompts[i].size(), " tokens, more than the model's max_position_embeddings ",
          config.max_position_embeddings));
    }
    for (int32_t id : prompts[i]) {
      if (id < 0 || id >= vocab) {
        return absl::InvalidArgumentError(
            absl::StrCat("prompt ", i, ": token id ", id, " outside the vocabulary [0, ", vocab, ")"));
      }
    }
  }

  std::set<int32_t> eos_ids;
  if (options.stop_on_eos) {
    for (int32_t id : tokenizer.eos_ids()) eos_ids.insert(id);
    for (int32_t id : config.eos_token_ids) eos_ids.insert(id);
  }
  const std::set<int32_t> stop_ids(options.stop_ids.begin(), options.stop_ids.end());

  const size_t n = prompts.size();
  std::vector<SequenceState> seqs(n);
  for (size_t i = 0; i < n; ++i) {
    SequenceState& s = seqs[i];
    const std::vector<int32_t>& p = prompts[i];
    s.context = std::min(kDecodeContextTokens, p.size());
    s.tokens.assign(p.end() - static_cast<std::ptrdiff_t>(s.context), p.end());
    s.prefix_offset = 0;
    s.read_offset = s.context;
    s.max_new = std::min<int64_t>(options.max_new_tokens,
                                  config.max_position_embeddings - static_cast<int64_t>(p.size()));
    s.rng = Rng(options.seed ^ (0xD1B54A32D192ED03ULL * (i + 1)));
    s.result.prompt_tokens = static_cast<int64_t>(p.size());
    s.result.finish_reason = "length";
    if (s.max_new <= 0) s.done = true;
  }

  // Marks a sequence finished.
  auto finish = [&](size_t i, const std::string& reason) {
    SequenceState& s = seqs[i];
    s.done = true;
    s.result.finish_reason = reason;
    s.result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  };

  try {
    c10::InferenceMode inference_guard;
    const at::Device device = model.device();
    // Active rows of the batch -> sequence index.
    std::vector<size_t> rows;
    for (size_t i = 0; i < n; ++i) {
      if (!seqs[i].done) rows.push_back(i);
    }
    if (!rows.empty()) {
      const int64_t batch = static_cast<int64_t>(rows.size());
      int64_t width = 0;
      for (size_t i : rows) width = std::max<int64_t>(width, static_cast<int64_t>(prompts[i].size()));
      const int32_t pad = config.pad_token_id.value_or(0);
      at::Tensor input = at::full({batch, width}, pad, at::kLong);
      at::Tensor mask = at::zeros({batch, width}, at::kLong);
      bool padded = false;
      for (int64_t r = 0; r < batch; ++r) {
        const std::vector<int32_t>& p = prompts[rows[static_cast<size_t>(r)]];
        const int64_t off = width - static_cast<int64_t>(p.size());
        padded = padded || off > 0;
        auto in = input.accessor<int64_t, 2>();
        for (size_t j = 0; j < p.size(); ++j) in[r][off + static_cast<int64_t>(j)] = p[j];
        mask[r].narrow(0, off, width - off).fill_(1);
      }
      int64_t longest_new = 0;
      for (size_t i : rows) longest_new = std::max(longest_new, seqs[i].max_new);
      KVCache cache;
      cache.Reserve(width + longest_new);
      at::Tensor step_mask = padded ? mask.to(device) : at::Tensor();
      at::Tensor logits = model.Forward(input.to(device), step_mask, &cache, /*logits_to_keep=*/1);

      while (!rows.empty()) {
        const at::Tensor last = logits.select(1, -1).to(at::kCPU, at::kFloat).contiguous();
        const float* data = last.data_ptr<float>();
        std::vector<int64_t> keep;
        std::vector<int64_t> next;
        for (size_t r = 0; r < rows.size(); ++r) {
          const size_t i = rows[r];
          SequenceState& s = seqs[i];
          const int32_t token = PickToken(data + static_cast<int64_t>(r) * vocab, vocab, options, s.rng);
          if (eos_ids.count(token) != 0 || stop_ids.count(token) != 0) {
            Detokenize(tokenizer, s, /*final=*/true);
            finish(i, eos_ids.count(token) != 0 ? "eos" : "stop");
          } else {
            s.result.ids.push_back(token);
            s.tokens.push_back(token);
            const bool at_length = static_cast<int64_t>(s.result.ids.size()) >= s.max_new;
            Detokenize(tokenizer, s, at_length);
            // Stop strings: cut the text before the first occurrence.
            size_t cut = std::string::npos;
            for (const std::string& stop : options.stop_strings) {
              const size_t from = s.emitted > stop.size() ? s.emitted - stop.size() : 0;
              const size_t pos = s.text.find(stop, from);
              if (pos != std::string::npos) cut = std::min(cut, pos);
            }
            if (cut != std::string::npos) {
              s.text.resize(std::max(cut, s.emitted));
              finish(i, "stop");
            } else if (at_length) {
              finish(i, "length");
            }
            const size_t end = s.done ? s.text.size() : SafeEnd(s.text, options.stop_strings);
            std::string delta;
            if (end > s.emitted) {
              delta = s.text.substr(s.emitted, end - s.emitted);
              s.emitted = end;
            }
            if (on_token && !on_token(i, token, delta) && !s.done) {
              finish(i, "cancelled");
            }
          }
          if (s.done) {
            // Deliver text held back for a possible stop string that never completed.
            if (on_token && s.emitted < s.text.size() && s.result.finish_reason != "cancelled") {
              on_token(i, -1, s.text.substr(s.emitted));
              s.emitted = s.text.size();
            }
          } else {
            keep.push_back(static_cast<int64_t>(r));
            next.push_back(s.result.ids.back());
          }
        }
        if (keep.empty()) break;
        if (keep.size() < rows.size()) {
          std::vector<size_t> new_rows;
          for (int64_t r : keep) new_rows.push_back(rows[static_cast<size_t>(r)]);
          rows.swap(new_rows);
          const at::Tensor keep_t = at::tensor(keep, at::kLong).to(device);
          cache.SelectRows(keep_t);
          if (step_mask.defined()) step_mask = step_mask.index_select(0, keep_t);
        }
        const int64_t b = static_cast<int64_t>(rows.size());
        if (step_mask.defined()) {
          step_mask = at::cat({step_mask, at::ones({b, 1}, step_mask.options())}, 1);
        }
        const at::Tensor step_input = at::tensor(next, at::kLong).view({b, 1}).to(device);
        logits = model.Forward(step_input, step_mask, &cache, 1);
      }
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("generation failed: ", e.what_without_backtrace()));
  }

  std::vector<GenerationResult> results;
  results.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    SequenceState& s = seqs[i];
    if (s.result.seconds == 0) {
      s.result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    }
    s.result.text = std::move(s.text);
    results.push_back(std::move(s.result));
  }
  return results;
}

}  // namespace strata
