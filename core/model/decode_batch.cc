#include "core/model/decode_batch.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/model/model.h"
#include "core/model/small_gemm.h"
#include "core/model/tokenizer.h"
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

// log_softmax of one row of logits at `token`, and the `top` most likely tokens.
TokenLogprob LogprobsOf(const float* logits, int64_t vocab, int32_t token, int32_t top) {
  double max_logit = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < vocab; ++i) max_logit = std::max(max_logit, static_cast<double>(logits[i]));
  double sum = 0;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(logits[i]) - max_logit);
  const double log_z = max_logit + std::log(sum);
  TokenLogprob out;
  out.id = token;
  out.logprob = static_cast<float>(static_cast<double>(logits[token]) - log_z);
  if (top > 0) {
    const int64_t n = std::min<int64_t>(top, vocab);
    std::vector<int32_t> ids(static_cast<size_t>(vocab));
    std::iota(ids.begin(), ids.end(), 0);
    std::partial_sort(ids.begin(), ids.begin() + n, ids.end(), [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    for (int64_t i = 0; i < n; ++i) {
      out.top.emplace_back(ids[i], static_cast<float>(static_cast<double>(logits[ids[i]]) - log_z));
    }
  }
  return out;
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
  // Batch bookkeeping.
  int64_t id = 0;
  DecodeRow row;
  Clock::time_point start;
  int64_t cache_len = 0;    // positions this row holds in the KV cache (prompt + fed tokens)
  int32_t next_token = -1;  // the last generated token, fed at the next decode step
  bool cancel = false;
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

// The rows of one forward pass and their side paths, shared by the RowAdapters of every layer.
struct ForwardRoutes {
  // Per distinct route in the pass: its model (whose adapters are the side paths) and its rows.
  struct Group {
    const CausalLM* model = nullptr;
    std::vector<int64_t> rows;
    int64_t first = 0;  // rows are [first, first + rows.size()) when contiguous
    bool contiguous = true;
    at::Tensor index;  // int64 rows on the device (when not contiguous)
  };
  std::vector<Group> groups;
  int64_t batch = 0;
  // Changes whenever the row -> route assignment changes (RowAdapters rebuild their plans).
  int64_t epoch = 0;
  std::vector<const CausalLM*> assignment;  // route model of each row
};

// The side path of one linear layer for a batch whose rows have different routes. When every
// route's adapter here goes through the same shared basis (LinearAdapter::SharedBasisFactors, as
// Share's task routes of one version do), the batch runs the basis once, (x R) then Lᵀ, with a
// per-row k×k core in between: the cost of one route. Else, when every route's adapter is low-rank
// (LinearAdapter::LowRankFactors), all of them run as two GEMMs over the concatenated factors, x [A_1; ...;
// A_G]ᵀ masked per row to its own route's columns (times its scale), then [B_1 ... B_G]ᵀ: the cost of one
// rank-Σr side path, whatever the number of routes (the concatenation is rebuilt only when the batch's rows
// change). Otherwise each route's adapter runs on its own rows. Rows without an adapter get none.
class RowAdapter : public LinearAdapter {
 public:
  RowAdapter(std::string name, int64_t out_features, const ForwardRoutes* routes)
      : name_(std::move(name)), out_features_(out_features), routes_(routes) {}

  at::Tensor Forward(const at::Tensor& x) override {
    if (epoch_ != routes_->epoch) Rebuild(x.device());
    if (!any_) return at::Tensor();
    if (shared_) {
      // ((x R) C_rowᵀ) Lᵀ: the basis GEMMs once for every row, a k×k core per row (scale folded in).
      at::Tensor small = SmallSharedSide(x);
      if (small.defined()) return small;
      const at::Tensor xin = x.scalar_type() == right_.scalar_type() ? x : x.to(right_.scalar_type());
      const int64_t batch = x.size(0);
      const at::Tensor h = at::matmul(xin.reshape({batch, -1, x.size(-1)}), right_);  // [B, T, kr]
      const at::Tensor hc = at::bmm(h, row_cores_);                                   // [B, T, kl]
      std::vector<int64_t> shape = x.sizes().vec();
      shape.back() = out_features_;
      return at::matmul(hc, left_t_).view(shape);
    }
    if (low_rank_) {
      const at::Tensor xin = x.scalar_type() == a_.scalar_type() ? x : x.to(a_.scalar_type());
      at::Tensor h = at::linear(xin, a_);  // [B, ..., Σr]
      std::vector<int64_t> shape(static_cast<size_t>(h.dim()), 1);
      shape.front() = mask_.size(0);
      shape.back() = mask_.size(1);
      h.mul_(mask_.view(shape));
      return at::linear(h, b_);
    }
    at::Tensor out;
    for (const ForwardRoutes::Group& g : routes_->groups) {
      const LinearLayer* layer = g.model->FindLinear(name_);
      if (layer == nullptr || !layer->adapter) continue;
      const int64_t n = static_cast<int64_t>(g.rows.size());
      const at::Tensor xs = g.contiguous ? x.narrow(0, g.first, n) : x.index_select(0, g.index);
      const at::Tensor side = layer->adapter->Forward(xs);
      if (!out.defined()) {
        std::vector<int64_t> shape = x.sizes().vec();
        shape.back() = out_features_;
        out = at::zeros(shape, side.options());
      }
      if (g.contiguous) {
        out.narrow(0, g.first, n).copy_(side);
      } else {
        out.index_copy_(0, g.index, side.to(out.scalar_type()));
      }
    }
    return out;  // undefined when no row has a side path here
  }

 private:
  // The shared side path of a decode step (at most kSmallRowsLinearMaxRows rows, float32 on the
  // CPU) as two small-rows products, x R and then Lᵀ, with each row's k×k core applied in a loop
  // between them. The ATen path runs three operators per layer here, each a parallel region whose
  // threads sleep and wake under OMP_WAIT_POLICY=PASSIVE (~40 µs each), 84 layers per 110M step; 16
  // streams on Share routes went from 107-121 to 125-148 tokens/s with this (docs/benchmarks.md).
  // The factors are small enough that both products stay on this thread. Undefined when it does not
  // apply (another dtype or device, more rows, no AVX2).
  at::Tensor SmallSharedSide(const at::Tensor& x) const {
    if (!x.device().is_cpu() || x.scalar_type() != at::kFloat || !right_rows_.defined() ||
        !right_rows_.device().is_cpu() || right_rows_.scalar_type() != at::kFloat ||
        left_rows_.scalar_type() != at::kFloat || row_cores_.scalar_type() != at::kFloat) {
      return at::Tensor();
    }
    const int64_t d = x.size(-1);
    const int64_t rows = d > 0 ? x.numel() / d : 0;
    const int64_t batch = x.size(0);
    if (rows < 1 || rows > kSmallRowsLinearMaxRows || batch != row_cores_.size(0) || rows % batch != 0 ||
        d != right_rows_.size(1)) {
      return at::Tensor();
    }
    const int64_t per_row = rows / batch;  // positions of each batch row (1 when decoding)
    const int64_t kr = right_rows_.size(0);
    const int64_t kl = left_rows_.size(1);
    const int64_t n = left_rows_.size(0);
    const at::Tensor xc = x.contiguous();
    std::vector<float> h(static_cast<size_t>(rows * kr));
    if (!SmallRowsLinear(xc.data_ptr<float>(), rows, right_rows_.data_ptr<float>(), kr, d, nullptr,
                         h.data())) {
      return at::Tensor();
    }
    std::vector<float> hc(static_cast<size_t>(rows * kl), 0.0f);
    const float* cores = row_cores_.data_ptr<float>();  // [batch, kr, kl]
    for (int64_t r = 0; r < rows; ++r) {
      const float* core = cores + (r / per_row) * kr * kl;
      float* out = hc.data() + r * kl;
      for (int64_t i = 0; i < kr; ++i) {
        const float hv = h[static_cast<size_t>(r * kr + i)];
        for (int64_t j = 0; j < kl; ++j) out[j] += hv * core[i * kl + j];
      }
    }
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = n;
    at::Tensor y = at::empty(shape, x.options());
    SmallRowsLinear(hc.data(), rows, left_rows_.data_ptr<float>(), n, kl, nullptr, y.data_ptr<float>());
    return y;
  }

  // Every route with a side path here goes through the same basis (L, R): one core per row.
  bool BuildShared(const at::Device& device) {
    at::Tensor left, right;
    std::vector<at::Tensor> cores(routes_->groups.size());
    for (size_t g = 0; g < routes_->groups.size(); ++g) {
      const LinearLayer* layer = routes_->groups[g].model->FindLinear(name_);
      if (layer == nullptr || !layer->adapter) continue;
      at::Tensor l, c, r;
      double scale = 1.0;
      if (!layer->adapter->SharedBasisFactors(&l, &c, &r, &scale)) return false;
      if (!left.defined()) {
        left = l;
        right = r;
      } else if (!l.is_same(left) || !r.is_same(right)) {
        return false;
      }
      cores[g] = c.t().mul(scale);  // [kr, kl]
    }
    if (!left.defined()) return false;
    std::vector<at::Tensor> per_row(static_cast<size_t>(routes_->batch));
    const at::Tensor zero = at::zeros({right.size(1), left.size(1)}, left.options());
    for (size_t g = 0; g < routes_->groups.size(); ++g) {
      for (int64_t r : routes_->groups[g].rows)
        per_row[static_cast<size_t>(r)] = cores[g].defined() ? cores[g] : zero;
    }
    row_cores_ = at::stack(per_row).to(device).contiguous();  // [B, kr, kl]
    right_ = right;
    left_t_ = left.t();
    if (!device.is_cpu()) {
      right_rows_ = left_rows_ = rows_source_ = at::Tensor();
    } else {
      // R stays the same tensor while its version serves; rows join and leave far more often.
      if (!rows_source_.defined() || !rows_source_.is_same(right)) {
        right_rows_ = right.t().contiguous();  // [kr, d]: SmallRowsLinear's weight layout
        rows_source_ = right;
      }
      left_rows_ = left.contiguous();  // [n, kl]; no copy when it is already
    }
    return true;
  }

  void Rebuild(const at::Device& device) {
    epoch_ = routes_->epoch;
    any_ = false;
    shared_ = false;
    low_rank_ = true;
    for (const ForwardRoutes::Group& g : routes_->groups) {
      const LinearLayer* layer = g.model->FindLinear(name_);
      any_ = any_ || (layer != nullptr && layer->adapter);
    }
    if (!any_) return;
    if (BuildShared(device)) {
      shared_ = true;
      return;
    }
    row_cores_ = right_ = left_t_ = right_rows_ = left_rows_ = rows_source_ = at::Tensor();
    std::vector<at::Tensor> as, bs;
    std::vector<std::pair<int64_t, int64_t>> cols(routes_->groups.size(), {0, 0});  // [begin, end)
    std::vector<double> scales(routes_->groups.size(), 0.0);
    int64_t total = 0;
    for (size_t g = 0; g < routes_->groups.size(); ++g) {
      const LinearLayer* layer = routes_->groups[g].model->FindLinear(name_);
      if (layer == nullptr || !layer->adapter) continue;
      any_ = true;
      at::Tensor b, a;
      double scale = 1.0;
      if (!layer->adapter->LowRankFactors(&b, &a, &scale)) {
        low_rank_ = false;
        continue;
      }
      as.push_back(a);
      bs.push_back(b);
      cols[g] = {total, total + a.size(0)};
      scales[g] = scale;
      total += a.size(0);
    }
    if (!any_ || !low_rank_) {
      a_ = b_ = mask_ = at::Tensor();
      return;
    }
    a_ = at::cat(as, 0);  // [Σr, d]
    b_ = at::cat(bs, 1);  // [n, Σr]
    std::vector<float> mask(static_cast<size_t>(routes_->batch * total), 0.0f);
    for (size_t g = 0; g < routes_->groups.size(); ++g) {
      for (int64_t r : routes_->groups[g].rows) {
        for (int64_t c = cols[g].first; c < cols[g].second; ++c) {
          mask[static_cast<size_t>(r * total + c)] = static_cast<float>(scales[g]);
        }
      }
    }
    mask_ = at::tensor(mask, at::kFloat).view({routes_->batch, total}).to(device, a_.scalar_type());
  }

  std::string name_;
  int64_t out_features_;
  const ForwardRoutes* routes_;
  int64_t epoch_ = -1;
  bool any_ = false;
  bool shared_ = false;
  bool low_rank_ = false;
  at::Tensor a_, b_, mask_;                // concatenated low-rank factors, per-row scaled mask
  at::Tensor right_, left_t_, row_cores_;  // the shared basis and each row's core
  at::Tensor right_rows_, left_rows_;      // Rᵀ and L, contiguous, for SmallSharedSide (CPU only)
  at::Tensor rows_source_;                 // the R they were made from
};

}  // namespace

absl::Status ValidateSamplingOptions(const SamplingOptions& o) {
  if (o.max_new_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("max_new_tokens must be >= 0, got ", o.max_new_tokens));
  }
  if (!(o.temperature >= 0.0f) || std::isinf(o.temperature)) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be a finite value >= 0, got ", o.temperature));
  }
  if (o.top_k < 0) return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", o.top_k));
  if (o.top_logprobs < 0 || o.top_logprobs > kMaxTopLogprobs) {
    return absl::InvalidArgumentError(
        absl::StrCat("top_logprobs must be in [0, ", kMaxTopLogprobs, "], got ", o.top_logprobs));
  }
  if (o.top_logprobs > 0 && !o.logprobs) {
    return absl::InvalidArgumentError("top_logprobs needs logprobs to be requested too");
  }
  if (!(o.top_p > 0.0f && o.top_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", o.top_p));
  }
  for (const std::string& s : o.stop_strings) {
    if (s.empty()) return absl::InvalidArgumentError("stop_strings must not contain empty strings");
  }
  return absl::OkStatus();
}

absl::Status CheckPromptIds(const std::vector<int32_t>& prompt, const ModelConfig& config,
                            const std::string& label) {
  if (prompt.empty()) return absl::InvalidArgumentError(absl::StrCat(label, " is empty"));
  if (static_cast<int64_t>(prompt.size()) > config.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat(label, " has ", prompt.size(),
                                                   " tokens, more than the model's max_position_embeddings ",
                                                   config.max_position_embeddings));
  }
  for (int32_t id : prompt) {
    if (id < 0 || id >= config.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat(label, ": token id ", id, " outside the vocabulary [0, ", config.vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

struct DecodeBatch::Impl {
  std::shared_ptr<const CausalLM> weights;
  std::shared_ptr<const Tokenizer> tokenizer;
  std::set<int32_t> eos_ids;  // the tokenizer's and the config's (rows with stop_on_eos)
  std::vector<std::unique_ptr<SequenceState>> pending;  // joining at the next step
  std::vector<std::unique_ptr<SequenceState>> running;  // row r of the cache = running[r]
  KVCache cache;
  at::Tensor mask;  // [running, cache length] int64, 1 = real position
  int64_t next_id = 1;
  int64_t last_step_rows = 0;
  // The mixed-route forward: a copy of the weights whose linear layers carry RowAdapters.
  std::unique_ptr<CausalLM> mixed;
  ForwardRoutes routes;

  const CausalLM& RouteOf(const SequenceState& s) const {
    return s.row.route_model ? *s.row.route_model : *weights;
  }

  // The model to run `rows` on: the route's own model when they share one, else the mixed copy
  // with the routes set up for this pass.
  const CausalLM& ModelFor(const std::vector<SequenceState*>& rows) {
    const CausalLM* first = &RouteOf(*rows.front());
    bool same = true;
    for (const SequenceState* s : rows) same = same && &RouteOf(*s) == first;
    if (same) return *first;
    if (!mixed) {
      mixed = weights->ShallowCopy();
      for (const std::string& name : mixed->LinearNames()) {
        LinearLayer* layer = mixed->FindLinear(name);
        layer->adapter = std::make_shared<RowAdapter>(name, layer->weight.size(0), &routes);
      }
    }
    std::vector<const CausalLM*> assignment;
    for (const SequenceState* s : rows) assignment.push_back(&RouteOf(*s));
    if (assignment == routes.assignment) return *mixed;  // same rows, same routes: same plan
    routes.assignment = assignment;
    ++routes.epoch;
    routes.groups.clear();
    routes.batch = static_cast<int64_t>(rows.size());
    std::map<const CausalLM*, size_t> index;
    for (size_t r = 0; r < rows.size(); ++r) {
      const CausalLM* m = &RouteOf(*rows[r]);
      auto [it, inserted] = index.emplace(m, routes.groups.size());
      if (inserted) {
        routes.groups.emplace_back();
        routes.groups.back().model = m;
        routes.groups.back().first = static_cast<int64_t>(r);
      }
      ForwardRoutes::Group& g = routes.groups[it->second];
      if (!g.rows.empty() && g.rows.back() != static_cast<int64_t>(r) - 1) g.contiguous = false;
      g.rows.push_back(static_cast<int64_t>(r));
    }
    for (ForwardRoutes::Group& g : routes.groups) {
      if (!g.contiguous) g.index = at::tensor(g.rows, at::kLong).to(weights->device());
    }
    return *mixed;
  }

  void Finish(SequenceState& s, const std::string& reason) {
    s.done = true;
    s.result.finish_reason = reason;
    s.result.seconds = std::chrono::duration<double>(Clock::now() - s.start).count();
  }

  // Takes the token picked for `s`: stops, text, callbacks. Sets s.next_token when it goes on.
  void Consume(SequenceState& s, const float* logits, int64_t vocab) {
    const SamplingOptions& options = s.row.sampling;
    const int32_t token = PickToken(logits, vocab, options, s.rng);
    const bool eos = options.stop_on_eos && eos_ids.count(token) != 0;
    const bool stop_id =
        std::find(options.stop_ids.begin(), options.stop_ids.end(), token) != options.stop_ids.end();
    if (eos || stop_id) {
      Detokenize(*tokenizer, s, /*final=*/true);
      Finish(s, eos ? "eos" : "stop");
    } else {
      s.result.ids.push_back(token);
      s.tokens.push_back(token);
      if (options.logprobs)
        s.result.logprobs.push_back(LogprobsOf(logits, vocab, token, options.top_logprobs));
      const bool at_length = static_cast<int64_t>(s.result.ids.size()) >= s.max_new;
      Detokenize(*tokenizer, s, at_length);
      // Stop strings: cut the text before the first occurrence.
      size_t cut = std::string::npos;
      for (const std::string& stop : options.stop_strings) {
        const size_t from = s.emitted > stop.size() ? s.emitted - stop.size() : 0;
        const size_t pos = s.text.find(stop, from);
        if (pos != std::string::npos) cut = std::min(cut, pos);
      }
      if (cut != std::string::npos) {
        s.text.resize(std::max(cut, s.emitted));
        Finish(s, "stop");
      } else if (at_length) {
        Finish(s, "length");
      }
      const size_t end = s.done ? s.text.size() : SafeEnd(s.text, options.stop_strings);
      std::string delta;
      if (end > s.emitted) {
        delta = s.text.substr(s.emitted, end - s.emitted);
        s.emitted = end;
      }
      const TokenLogprob* logprob = options.logprobs ? &s.result.logprobs.back() : nullptr;
      if (s.row.on_token && !s.row.on_token(token, delta, logprob) && !s.done) Finish(s, "cancelled");
      if (!s.done) s.next_token = token;
    }
    if (s.done && s.row.on_token && s.emitted < s.text.size() && s.result.finish_reason != "cancelled") {
      // Deliver text held back for a possible stop string that never completed.
      s.row.on_token(-1, s.text.substr(s.emitted), nullptr);
      s.emitted = s.text.size();
    }
  }

  void Deliver(SequenceState& s) {
    if (s.result.seconds == 0)
      s.result.seconds = std::chrono::duration<double>(Clock::now() - s.start).count();
    s.result.text = std::move(s.text);
    if (s.row.on_done) s.row.on_done(std::move(s.result));
  }

  // Drops finished rows from the running batch (and the cache), delivering their results.
  //
  // The finished rows' places are taken by the last rows (KVCache::RemoveRows: only the moved rows
  // are copied, not the whole cache), so the running order changes. Left padding that no kept row
  // needs is trimmed (a copy of the whole cache) only once it is a quarter of the cache or more;
  // until then attention reads a few masked positions more.
  void Compact() {
    std::vector<int64_t> leaving;
    int64_t longest = 0;
    for (size_t r = 0; r < running.size(); ++r) {
      if (running[r]->done) {
        leaving.push_back(static_cast<int64_t>(r));
      } else {
        longest = std::max(longest, running[r]->cache_len);
      }
    }
    if (leaving.empty()) return;
    for (int64_t r : leaving) Deliver(*running[static_cast<size_t>(r)]);
    routes.assignment.clear();  // a freed route model's address may be reused: rebuild the plans
    if (leaving.size() == running.size()) {
      running.clear();
      cache.Clear();
      mask = at::Tensor();
      return;
    }
    const std::vector<int64_t> order = cache.RemoveRows(leaving);
    std::vector<std::unique_ptr<SequenceState>> kept;
    kept.reserve(order.size());
    for (int64_t old : order) kept.push_back(std::move(running[static_cast<size_t>(old)]));
    running.swap(kept);
    mask = mask.index_select(0, at::tensor(order, at::kLong).to(mask.device()));
    const int64_t drop = cache.length() - longest;  // left padding no kept row needs
    if (drop > 0 && 4 * drop >= cache.length()) {
      const int64_t rows = static_cast<int64_t>(running.size());
      cache.SelectRows(at::arange(rows, at::TensorOptions().dtype(at::kLong).device(weights->device())),
                       drop);
      mask = mask.narrow(1, drop, mask.size(1) - drop);
    }
  }

  // Prefills the pending rows together and adds them to the running batch.
  void Join() {
    std::vector<std::unique_ptr<SequenceState>> joining;
    for (auto& s : pending) {
      if (s->done) {
        Deliver(*s);
      } else {
        joining.push_back(std::move(s));
      }
    }
    pending.clear();
    if (joining.empty()) return;
    const ModelConfig& config = weights->config();
    const at::Device device = weights->device();
    const int64_t batch = static_cast<int64_t>(joining.size());
    int64_t width = 0;
    for (const auto& s : joining)
      width = std::max<int64_t>(width, static_cast<int64_t>(s->row.prompt.size()));
    const int32_t pad = config.pad_token_id.value_or(0);
    at::Tensor input = at::full({batch, width}, pad, at::kLong);
    at::Tensor new_mask = at::zeros({batch, width}, at::kLong);
    bool padded = false;
    {
      auto in = input.accessor<int64_t, 2>();
      for (int64_t r = 0; r < batch; ++r) {
        const std::vector<int32_t>& p = joining[static_cast<size_t>(r)]->row.prompt;
        const int64_t off = width - static_cast<int64_t>(p.size());
        padded = padded || off > 0;
        for (size_t j = 0; j < p.size(); ++j) in[r][off + static_cast<int64_t>(j)] = p[j];
        new_mask[r].narrow(0, off, width - off).fill_(1);
      }
    }
    std::vector<SequenceState*> rows;
    int64_t longest_new = 0;
    for (auto& s : joining) {
      rows.push_back(s.get());
      longest_new = std::max(longest_new, s->max_new);
    }
    KVCache fresh;
    fresh.Reserve(width + longest_new);
    const CausalLM& model = ModelFor(rows);
    const at::Tensor logits = model.Forward(input.to(device), padded ? new_mask.to(device) : at::Tensor(),
                                            &fresh, /*logits_to_keep=*/1);
    last_step_rows = batch;
    const at::Tensor last = logits.select(1, -1).to(at::kCPU, at::kFloat).contiguous();
    const float* data = last.data_ptr<float>();
    std::vector<int64_t> keep;
    for (int64_t r = 0; r < batch; ++r) {
      SequenceState& s = *joining[static_cast<size_t>(r)];
      s.cache_len = static_cast<int64_t>(s.row.prompt.size());
      Consume(s, data + r * config.vocab_size, config.vocab_size);
      if (!s.done) keep.push_back(r);
    }
    std::vector<std::unique_ptr<SequenceState>> staying;
    for (auto& s : joining) {
      if (s->done) {
        Deliver(*s);
      } else {
        staying.push_back(std::move(s));
      }
    }
    if (staying.empty()) return;
    at::Tensor staying_mask = new_mask;
    if (keep.size() < joining.size()) {
      const at::Tensor keep_t = at::tensor(keep, at::kLong);
      int64_t longest = 0;
      for (const auto& s : staying) longest = std::max(longest, s->cache_len);
      const int64_t drop = width - longest;
      fresh.SelectRows(keep_t.to(device), drop);
      staying_mask = new_mask.index_select(0, keep_t).narrow(1, drop, width - drop);
    }
    staying_mask = staying_mask.to(device);
    if (running.empty()) {
      cache = std::move(fresh);
      mask = staying_mask;
    } else {
      const int64_t old_len = mask.size(1);
      const int64_t add_len = staying_mask.size(1);
      const int64_t len = std::max(old_len, add_len);
      // Left-pad the shorter side's mask (the cache pads its keys/values the same way).
      auto left_pad = [&](const at::Tensor& m, int64_t to) {
        if (m.size(1) == to) return m;
        return at::cat({at::zeros({m.size(0), to - m.size(1)}, m.options()), m}, 1);
      };
      cache.AddRows(fresh);
      mask = at::cat({left_pad(mask, len), left_pad(staying_mask, len)}, 0);
    }
    for (auto& s : staying) running.push_back(std::move(s));
    routes.assignment.clear();
  }

  // One decode step for every running row.
  void Decode() {
    if (running.empty()) return;
    const ModelConfig& config = weights->config();
    const at::Device device = weights->device();
    const int64_t b = static_cast<int64_t>(running.size());
    std::vector<int64_t> next;
    std::vector<SequenceState*> rows;
    bool padded = false;
    const int64_t len = cache.length();
    for (auto& s : running) {
      next.push_back(s->next_token);
      rows.push_back(s.get());
      padded = padded || s->cache_len < len;
    }
    mask = at::cat({mask, at::ones({b, 1}, mask.options())}, 1);
    const at::Tensor input = at::tensor(next, at::kLong).view({b, 1}).to(device);
    const CausalLM& model = ModelFor(rows);
    const at::Tensor logits = model.Forward(input, padded ? mask : at::Tensor(), &cache, 1);
    last_step_rows = b;
    const at::Tensor last = logits.select(1, -1).to(at::kCPU, at::kFloat).contiguous();
    const float* data = last.data_ptr<float>();
    for (int64_t r = 0; r < b; ++r) {
      SequenceState& s = *running[static_cast<size_t>(r)];
      s.cache_len += 1;
      Consume(s, data + r * config.vocab_size, config.vocab_size);
    }
  }

  // Ends every row with `status` (the forward pass failed; the cache is in an unknown state).
  void FailAll(const absl::Status& status) {
    for (auto* list : {&running, &pending}) {
      for (auto& s : *list) {
        if (s->row.on_done) s->row.on_done(status);
      }
      list->clear();
    }
    cache.Clear();
    mask = at::Tensor();
  }
};

DecodeBatch::DecodeBatch(std::shared_ptr<const CausalLM> weights, std::shared_ptr<const Tokenizer> tokenizer)
    : impl_(std::make_unique<Impl>()) {
  impl_->weights = std::move(weights);
  impl_->tokenizer = std::move(tokenizer);
  for (int32_t id : impl_->tokenizer->eos_ids()) impl_->eos_ids.insert(id);
  for (int32_t id : impl_->weights->config().eos_token_ids) impl_->eos_ids.insert(id);
}

DecodeBatch::~DecodeBatch() = default;

absl::StatusOr<int64_t> DecodeBatch::Add(DecodeRow row) {
  const ModelConfig& config = impl_->weights->config();
  if (absl::Status st = ValidateSamplingOptions(row.sampling); !st.ok()) return st;
  if (absl::Status st = CheckPromptIds(row.prompt, config, "prompt"); !st.ok()) return st;
  auto state = std::make_unique<SequenceState>();
  SequenceState& s = *state;
  s.start = Clock::now();
  s.id = impl_->next_id++;
  const std::vector<int32_t>& p = row.prompt;
  s.context = std::min(kDecodeContextTokens, p.size());
  s.tokens.assign(p.end() - static_cast<std::ptrdiff_t>(s.context), p.end());
  s.prefix_offset = 0;
  s.read_offset = s.context;
  s.max_new = std::min<int64_t>(row.sampling.max_new_tokens,
                                config.max_position_embeddings - static_cast<int64_t>(p.size()));
  s.rng = Rng(row.sampling.seed ^ (0xD1B54A32D192ED03ULL * (row.stream + 1)));
  s.result.prompt_tokens = static_cast<int64_t>(p.size());
  s.result.finish_reason = "length";
  if (s.max_new <= 0) s.done = true;
  s.row = std::move(row);
  const int64_t id = s.id;
  impl_->pending.push_back(std::move(state));
  return id;
}

void DecodeBatch::Cancel(int64_t id) {
  for (auto* list : {&impl_->running, &impl_->pending}) {
    for (auto& s : *list) {
      if (s->id == id) s->cancel = true;
    }
  }
}

size_t DecodeBatch::size() const { return impl_->running.size() + impl_->pending.size(); }

int64_t DecodeBatch::last_step_rows() const { return impl_->last_step_rows; }

const std::shared_ptr<const CausalLM>& DecodeBatch::weights() const { return impl_->weights; }

absl::Status DecodeBatch::Step() {
  Impl& im = *impl_;
  for (auto* list : {&im.running, &im.pending}) {
    for (auto& s : *list) {
      if (s->cancel && !s->done) im.Finish(*s, "cancelled");
    }
  }
  try {
    c10::InferenceMode inference_guard;
    im.Compact();
    // Rows already running decode first; the joining ones get their first token from the prefill.
    im.Decode();
    im.Compact();
    im.Join();
  } catch (const c10::Error& e) {
    const absl::Status st =
        absl::InternalError(absl::StrCat("generation failed: ", e.what_without_backtrace()));
    im.FailAll(st);
    return st;
  }
  return absl::OkStatus();
}

}  // namespace strata
