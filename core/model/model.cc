#include "core/model/model.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <tuple>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "core/model/llama_configs.h"
#include "core/model/runtime.h"
#include "core/model/safetensors.h"
#include "core/model/small_gemm.h"
#include "core/util/file_util.h"
#include "core/util/status_macros.h"

namespace strata {
namespace {

constexpr double kPi = 3.14159265358979323846;

absl::StatusOr<at::ScalarType> ParseDtype(const std::string& dtype, const std::string& device) {
  if (dtype == "float32" || dtype == "fp32" || dtype == "float") return at::kFloat;
  if (dtype == "bfloat16" || dtype == "bf16") return at::kBFloat16;
  if (dtype == "float16" || dtype == "fp16" || dtype == "half") {
    if (absl::StartsWith(device, "cuda")) return at::kHalf;
    return absl::InvalidArgumentError(
        "dtype float16: LibTorch has no float16 matmul on CPU; use float32 or bfloat16");
  }
  return absl::InvalidArgumentError(absl::StrCat("dtype \"", dtype, "\": expected float32 or bfloat16"));
}

std::string DtypeName(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "float32";
    case at::kBFloat16:
      return "bfloat16";
    case at::kHalf:
      return "float16";
    default:
      return c10::toString(t);
  }
}

// Casts a stored parameter to the compute dtype (a no-op unless bf16 weights run on CPU).
at::Tensor AsDtype(const at::Tensor& t, at::ScalarType dtype) {
  return !t.defined() || t.scalar_type() == dtype ? t : t.to(dtype);
}

at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor normed = xf * at::rsqrt(xf.square().mean(-1, /*keepdim=*/true).add_(eps));
  return AsDtype(weight, x.scalar_type()) * normed.to(x.scalar_type());
}

// HF rotary embedding x·cos + rotate_half(x)·sin with rotate_half([x1, x2]) = [-x2, x1]: the sign
// lives in `signed_sin` = [-sin, sin] (negation is exact), which saves the negation pass, and the
// product and the sum share one buffer (addcmul_).
at::Tensor ApplyRope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& signed_sin) {
  const int64_t half = x.size(-1) / 2;
  const at::Tensor swapped = at::cat({x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return (x * cos).addcmul_(swapped, signed_sin);
}

// Activations with at most this many rows go through one matrix-vector product per row when the
// small-rows kernel below does not apply (one row always does: one GEMV is as fast as the kernel).
// OpenBLAS runs `linear` on 1-2 rows as a GEMM with small m, which costs 1.5-2x its GEMV on the same
// weights (strata-bench-decode --kernels 1 on the 110M config's matrices, docs/benchmarks.md).
constexpr int64_t kGemvMaxRows = 2;

// y = x Wᵀ + b for `rows` rows of x, one GEMV per row; the same as linear up to summation order.
at::Tensor FewRowLinear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, int64_t rows) {
  const at::Tensor x2 = x.reshape({rows, x.size(-1)});
  auto row = [&](int64_t r) {
    const at::Tensor xr = x2.select(0, r);
    return b.defined() ? at::addmv(b, w, xr) : at::mv(w, xr);
  };
  at::Tensor y;
  if (rows == 1) {
    y = row(0);
  } else {
    std::vector<at::Tensor> ys;
    for (int64_t r = 0; r < rows; ++r) ys.push_back(row(r));
    y = at::stack(ys);
  }
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = w.size(0);
  return y.view(shape);
}

// Activations with 2 to this many rows go through SmallRowsLinear (core/model/small_gemm.h) when no
// gradient is needed: OpenBLAS's GEMM packs the whole weight matrix on every call, and one GEMV per
// row reads it once per row.
constexpr int64_t kSmallRowsMaxRows = kSmallRowsLinearMaxRows;

// y = x Wᵀ + b through SmallRowsLinear; an undefined tensor when it does not apply (not float32 on
// the CPU, autograd needed, or no AVX2/AVX-512 on this CPU).
at::Tensor SmallRowsForward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, int64_t rows) {
  if (x.scalar_type() != at::kFloat || w.scalar_type() != at::kFloat || w.dim() != 2 ||
      (b.defined() && (b.scalar_type() != at::kFloat || b.dim() != 1))) {
    return {};
  }
  if (at::GradMode::is_enabled() &&
      (x.requires_grad() || w.requires_grad() || (b.defined() && b.requires_grad()))) {
    return {};
  }
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = w.contiguous();
  const at::Tensor bc = b.defined() ? b.contiguous() : b;
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = w.size(0);
  at::Tensor y = at::empty(shape, x.options());
  if (!SmallRowsLinear(xc.data_ptr<float>(), rows, wc.data_ptr<float>(), w.size(0), w.size(1),
                       bc.defined() ? bc.data_ptr<float>() : nullptr, y.data_ptr<float>())) {
    return {};
  }
  return y;
}

const char* const kAttnNames[] = {"q_proj", "k_proj", "v_proj", "o_proj"};
const char* const kMlpNames[] = {"gate_proj", "up_proj", "down_proj"};

}  // namespace

// --- LinearLayer / KVCache -----------------------------------------------------------------------

at::Tensor LinearLayer::Forward(const at::Tensor& x) const {
  const at::Tensor w = AsDtype(weight, x.scalar_type());
  const at::Tensor b = AsDtype(bias, x.scalar_type());
  const int64_t in = x.dim() > 0 ? x.size(-1) : 0;
  const int64_t rows = in > 0 ? x.numel() / in : 0;
  at::Tensor y;
  if (x.device().is_cpu() && rows >= 2 && rows <= kSmallRowsMaxRows) y = SmallRowsForward(x, w, b, rows);
  if (!y.defined() && x.device().is_cpu() && rows >= 1 && rows <= kGemvMaxRows && w.dim() == 2) {
    y = FewRowLinear(x, w, b, rows);
  }
  if (!y.defined()) y = at::linear(x, w, b);
  if (adapter) {
    at::Tensor side = adapter->Forward(x);
    if (side.defined()) y = y + side.to(y.scalar_type());
  }
  return y;
}

void KVCache::Clear() {
  keys_.clear();
  values_.clear();
  key_store_.clear();
  value_store_.clear();
  lengths_.clear();
}

void KVCache::ViewRows(size_t layer, int64_t rows) {
  keys_[layer] = key_store_[layer].narrow(0, 0, rows);
  values_[layer] = value_store_[layer].narrow(0, 0, rows);
}

std::vector<int64_t> KVCache::RemoveRows(std::vector<int64_t> rows) {
  const int64_t b = this->rows();
  std::vector<int64_t> order(static_cast<size_t>(b));
  std::iota(order.begin(), order.end(), 0);
  std::sort(rows.begin(), rows.end(), std::greater<int64_t>());
  TORCH_CHECK(std::adjacent_find(rows.begin(), rows.end()) == rows.end(),
              "KVCache::RemoveRows: repeated row");
  int64_t n = b;
  // Highest first: the last row is never one still to be removed.
  for (int64_t r : rows) {
    TORCH_CHECK(r >= 0 && r < n, "KVCache::RemoveRows: row ", r, " of ", n);
    const int64_t last = n - 1;
    if (r != last) {
      for (size_t i = 0; i < keys_.size(); ++i) {
        if (!keys_[i].defined()) continue;
        const int64_t len = lengths_[i];
        key_store_[i][r].narrow(1, 0, len).copy_(key_store_[i][last].narrow(1, 0, len));
        value_store_[i][r].narrow(1, 0, len).copy_(value_store_[i][last].narrow(1, 0, len));
      }
      order[static_cast<size_t>(r)] = order[static_cast<size_t>(last)];
    }
    --n;
  }
  order.resize(static_cast<size_t>(n));
  for (size_t i = 0; i < keys_.size(); ++i) {
    if (keys_[i].defined()) ViewRows(i, n);
  }
  return order;
}

void KVCache::SelectRows(const at::Tensor& rows, int64_t drop_front) {
  for (size_t i = 0; i < keys_.size(); ++i) {
    if (!keys_[i].defined()) continue;
    TORCH_CHECK(drop_front >= 0 && drop_front <= lengths_[i], "KVCache::SelectRows: cannot drop ", drop_front,
                " of ", lengths_[i], " positions");
    const at::Tensor r = rows.to(keys_[i].device(), at::kLong);
    if (drop_front == 0) {
      keys_[i] = key_store_[i] = keys_[i].index_select(0, r);
      values_[i] = value_store_[i] = values_[i].index_select(0, r);
      continue;
    }
    // Keep the spare capacity: the kept positions move to the front of a buffer of the same size.
    const int64_t keep = lengths_[i] - drop_front;
    at::Tensor k =
        at::empty({r.size(0), keys_[i].size(1), keys_[i].size(2), keys_[i].size(3)}, keys_[i].options());
    at::Tensor v = at::empty_like(k);
    k.narrow(2, 0, keep).copy_(keys_[i].narrow(2, drop_front, keep).index_select(0, r));
    v.narrow(2, 0, keep).copy_(values_[i].narrow(2, drop_front, keep).index_select(0, r));
    keys_[i] = key_store_[i] = k;
    values_[i] = value_store_[i] = v;
    lengths_[i] = keep;
  }
}

void KVCache::AddRows(const KVCache& other) {
  if (other.keys_.empty()) return;
  if (keys_.empty()) {
    // Copies (the other cache may go on being used).
    Clear();
    for (size_t i = 0; i < other.keys_.size(); ++i) {
      keys_.push_back(other.keys_[i].defined() ? other.keys_[i].clone() : at::Tensor());
      values_.push_back(other.values_[i].defined() ? other.values_[i].clone() : at::Tensor());
    }
    key_store_ = keys_;
    value_store_ = values_;
    lengths_ = other.lengths_;
    return;
  }
  TORCH_CHECK(other.keys_.size() == keys_.size(), "KVCache::AddRows: ", other.keys_.size(),
              " layers, expected ", keys_.size());
  for (size_t i = 0; i < keys_.size(); ++i) {
    const at::Tensor& ka = keys_[i];
    const at::Tensor& kb = other.keys_[i];
    TORCH_CHECK(ka.defined() && kb.defined() && ka.size(1) == kb.size(1) && ka.size(3) == kb.size(3),
                "KVCache::AddRows: layer ", i, " shapes differ");
    const int64_t la = lengths_[i];
    const int64_t lb = other.lengths_[i];
    const int64_t ba = ka.size(0);
    const int64_t bb = kb.size(0);
    if (lb <= la && key_store_[i].size(0) >= ba + bb) {
      // The new rows go into spare rows, left-padded to this cache's length; nothing else moves.
      at::Tensor k = key_store_[i].narrow(0, ba, bb);
      at::Tensor v = value_store_[i].narrow(0, ba, bb);
      if (lb < la) {
        k.narrow(2, 0, la - lb).zero_();
        v.narrow(2, 0, la - lb).zero_();
      }
      k.narrow(2, la - lb, lb).copy_(kb.narrow(2, 0, lb));
      v.narrow(2, la - lb, lb).copy_(other.values_[i].narrow(2, 0, lb));
      ViewRows(i, ba + bb);
      continue;
    }
    const int64_t len = std::max(la, lb);
    const int64_t capacity = std::max({len, reserve_, std::max(ka.size(2), kb.size(2))});
    // Spare rows for later joins: the row capacity at least doubles.
    const int64_t row_capacity = std::max<int64_t>(ba + bb, 2 * key_store_[i].size(0));
    at::Tensor k_store = at::empty({row_capacity, ka.size(1), capacity, ka.size(3)}, ka.options());
    at::Tensor v_store = at::empty_like(k_store);
    at::Tensor k = k_store.narrow(0, 0, ba + bb);
    at::Tensor v = v_store.narrow(0, 0, ba + bb);
    // Padding must be finite: a masked position still enters probs·V with weight 0.
    if (la < len) {
      k.narrow(0, 0, ba).narrow(2, 0, len - la).zero_();
      v.narrow(0, 0, ba).narrow(2, 0, len - la).zero_();
    }
    if (lb < len) {
      k.narrow(0, ba, bb).narrow(2, 0, len - lb).zero_();
      v.narrow(0, ba, bb).narrow(2, 0, len - lb).zero_();
    }
    k.narrow(0, 0, ba).narrow(2, len - la, la).copy_(ka.narrow(2, 0, la));
    v.narrow(0, 0, ba).narrow(2, len - la, la).copy_(values_[i].narrow(2, 0, la));
    k.narrow(0, ba, bb).narrow(2, len - lb, lb).copy_(kb.narrow(2, 0, lb));
    v.narrow(0, ba, bb).narrow(2, len - lb, lb).copy_(other.values_[i].narrow(2, 0, lb));
    key_store_[i] = k_store;
    value_store_[i] = v_store;
    ViewRows(i, ba + bb);
    lengths_[i] = len;
  }
}

std::pair<at::Tensor, at::Tensor> KVCache::Append(size_t layer, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes(), "KVCache: keys/values must be [B, H, T, D]");
  if (layer >= keys_.size()) {
    keys_.resize(layer + 1);
    values_.resize(layer + 1);
    key_store_.resize(layer + 1);
    value_store_.resize(layer + 1);
    lengths_.resize(layer + 1, 0);
  }
  at::Tensor& keys = keys_[layer];
  at::Tensor& values = values_[layer];
  const int64_t len = lengths_[layer];
  const int64_t t = k.size(2);
  if (keys.defined()) {
    TORCH_CHECK(keys.size(0) == k.size(0) && keys.size(1) == k.size(1) && keys.size(3) == k.size(3),
                "KVCache: layer ", layer, " holds batch ", keys.size(0), " x ", keys.size(1), " heads, got ",
                k.sizes());
  }
  if (!keys.defined() || keys.size(2) < len + t) {
    const int64_t old_capacity = keys.defined() ? keys.size(2) : 0;
    const int64_t capacity = std::max({len + t, reserve_, 2 * old_capacity});
    // Keep the spare rows (AddRows) when the positions grow.
    const int64_t row_capacity = keys.defined() ? key_store_[layer].size(0) : k.size(0);
    at::Tensor new_keys = at::empty({row_capacity, k.size(1), capacity, k.size(3)}, k.options());
    at::Tensor new_values = at::empty({row_capacity, v.size(1), capacity, v.size(3)}, v.options());
    if (len > 0) {
      new_keys.narrow(0, 0, k.size(0)).narrow(2, 0, len).copy_(keys.narrow(2, 0, len));
      new_values.narrow(0, 0, k.size(0)).narrow(2, 0, len).copy_(values.narrow(2, 0, len));
    }
    key_store_[layer] = new_keys;
    value_store_[layer] = new_values;
    ViewRows(layer, k.size(0));
  }
  keys.narrow(2, len, t).copy_(k);
  values.narrow(2, len, t).copy_(v);
  lengths_[layer] = len + t;
  return {keys.narrow(2, 0, len + t), values.narrow(2, 0, len + t)};
}

// --- construction ----------------------------------------------------------------------------------

ModelConfig CausalLM::EmbeddedDefaultConfig() {
  ModelConfig c =
      TiedLlamaConfig(/*hidden=*/64, /*intermediate=*/176, /*layers=*/4, /*heads=*/4, /*kv_heads=*/2,
                      /*vocab=*/259, /*max_positions=*/512);
  c.rope_theta = 10000.0;
  c.torch_dtype = "float32";
  return c;
}

absl::StatusOr<std::unique_ptr<CausalLM>> CausalLM::FromTensors(
    const ModelConfig& config_in, const std::map<std::string, at::Tensor>& tensors,
    const ModelLoadOptions& options, const std::string& source) {
  ModelConfig config = config_in;
  // A checkpoint without lm_head.weight ties it to the embedding.
  if (tensors.find("lm_head.weight") == tensors.end()) config.tie_word_embeddings = true;
  RETURN_IF_ERROR(ValidateModelConfig(config, source));
  ASSIGN_OR_RETURN(const std::string device_name, ResolveDevice(options.device));
  ASSIGN_OR_RETURN(const at::ScalarType dtype, ParseDtype(options.dtype, device_name));

  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& [name, t] : tensors) {
    if (!t.defined()) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": tensor ", name, " is undefined"));
    }
    shapes[name] = t.sizes().vec();
  }
  RETURN_IF_ERROR(CheckLlamaTensorShapes(config, shapes, source));

  const at::Device device(device_name);
  // Parameters are always owned by the model (never views of a memory-mapped file), so callers
  // can train them in place.
  auto get = [&](const std::string& name) -> at::Tensor {
    const at::Tensor& src = tensors.at(name);
    at::Tensor t = src.detach().to(device, dtype).contiguous();
    if (t.data_ptr() == src.data_ptr()) t = t.clone();
    return t;
  };

  std::unique_ptr<CausalLM> model(new CausalLM());
  model->config_ = config;
  model->config_.torch_dtype = DtypeName(dtype);
  model->embed_tokens_ = get("model.embed_tokens.weight");
  model->final_norm_ = get("model.norm.weight");
  model->lm_head_.name = "lm_head";
  model->lm_head_.weight = config.tie_word_embeddings ? model->embed_tokens_ : get("lm_head.weight");
  model->layers_.resize(static_cast<size_t>(config.num_hidden_layers));
  for (int64_t i = 0; i < config.num_hidden_layers; ++i) {
    DecoderLayer& layer = model->layers_[static_cast<size_t>(i)];
    const std::string prefix = absl::StrCat("model.layers.", i, ".");
    layer.input_norm = get(prefix + "input_layernorm.weight");
    layer.post_attn_norm = get(prefix + "post_attention_layernorm.weight");
    LinearLayer* attn[] = {&layer.q, &layer.k, &layer.v, &layer.o};
    for (int j = 0; j < 4; ++j) {
      attn[j]->name = prefix + "self_attn." + kAttnNames[j];
      attn[j]->weight = get(attn[j]->name + ".weight");
      if (config.attention_bias && j < 3) attn[j]->bias = get(attn[j]->name + ".bias");
    }
    LinearLayer* mlp[] = {&layer.gate, &layer.up, &layer.down};
    for (int j = 0; j < 3; ++j) {
      mlp[j]->name = prefix + "mlp." + kMlpNames[j];
      mlp[j]->weight = get(mlp[j]->name + ".weight");
    }
  }
  model->InitRope();
  return model;
}

absl::StatusOr<std::unique_ptr<CausalLM>> CausalLM::Load(const std::string& dir,
                                                         const ModelLoadOptions& options) {
  ASSIGN_OR_RETURN(const ModelConfig config, LoadModelConfig(dir + "/config.json"));
  ASSIGN_OR_RETURN(const std::string device_name, ResolveDevice(options.device));
  ASSIGN_OR_RETURN(const at::ScalarType dtype, ParseDtype(options.dtype, device_name));
  // Read in the target dtype when the CPU can hold it; float16 (CUDA only) is converted later.
  const at::ScalarType read_dtype = dtype == at::kHalf ? at::kFloat : dtype;
  ASSIGN_OR_RETURN(auto tensors, LoadCheckpointTensors(dir, read_dtype));
  return FromTensors(config, tensors, options, dir);
}

absl::StatusOr<std::unique_ptr<CausalLM>> CausalLM::RandomInit(const ModelConfig& config, uint64_t seed,
                                                               const ModelLoadOptions& options) {
  RETURN_IF_ERROR(ValidateModelConfig(config, "RandomInit config"));
  at::Generator gen = at::detail::createCPUGenerator(seed);
  std::map<std::string, at::Tensor> tensors;
  const at::TensorOptions f32 = at::TensorOptions().dtype(at::kFloat);
  for (const ExpectedTensor& e : ExpectedLlamaTensors(config)) {
    if (e.optional) continue;  // lm_head when tied
    at::Tensor t;
    if (absl::EndsWith(e.name, "norm.weight")) {
      t = at::ones(e.shape, f32);
    } else if (absl::EndsWith(e.name, ".bias")) {
      t = at::zeros(e.shape, f32);
    } else {
      t = at::randn(e.shape, gen, f32).mul_(0.02);
    }
    tensors.emplace(e.name, std::move(t));
  }
  return FromTensors(config, tensors, options, "RandomInit");
}

std::vector<double> RopeInverseFrequencies(const ModelConfig& config) {
  const int64_t dim = config.head_dim;
  std::vector<double> inv(static_cast<size_t>(std::max<int64_t>(dim / 2, 0)));
  const RopeScaling& rs = config.rope_scaling;
  for (int64_t i = 0; i < dim / 2; ++i) {
    double freq = 1.0 / std::pow(config.rope_theta, static_cast<double>(2 * i) / dim);
    if (rs.type == "llama3") {
      const double old_len = static_cast<double>(rs.original_max_position_embeddings);
      const double low_freq_wavelen = old_len / rs.low_freq_factor;
      const double high_freq_wavelen = old_len / rs.high_freq_factor;
      const double wavelen = 2 * kPi / freq;
      if (wavelen < high_freq_wavelen) {
        // High frequencies are kept.
      } else if (wavelen > low_freq_wavelen) {
        freq = freq / rs.factor;
      } else {
        const double smooth =
            (old_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor);
        freq = (1 - smooth) * freq / rs.factor + smooth * freq;
      }
    }
    inv[static_cast<size_t>(i)] = freq;
  }
  return inv;
}

void CausalLM::InitRope() {
  const std::vector<double> inv = RopeInverseFrequencies(config_);
  rope_inv_freq_ = at::tensor(inv, at::TensorOptions().dtype(at::kDouble)).to(at::kFloat).to(device());
}

at::Device CausalLM::device() const { return embed_tokens_.device(); }

at::ScalarType CausalLM::dtype() const { return embed_tokens_.scalar_type(); }

at::ScalarType CausalLM::compute_dtype() const { return device().is_cpu() ? at::kFloat : dtype(); }

// --- forward ---------------------------------------------------------------------------------------

// `sin` is the signed table of ApplyRope ([-sin, sin]).
at::Tensor CausalLM::Attention(const DecoderLayer& layer, size_t index, const at::Tensor& x,
                               const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& mask,
                               KVCache* cache) const {
  const int64_t batch = x.size(0);
  const int64_t t = x.size(1);
  const int64_t heads = config_.num_attention_heads;
  const int64_t kv_heads = config_.num_key_value_heads;
  const int64_t head_dim = config_.head_dim;
  const int64_t groups = heads / kv_heads;

  at::Tensor q = layer.q.Forward(x).view({batch, t, heads, head_dim}).transpose(1, 2);
  at::Tensor k = layer.k.Forward(x).view({batch, t, kv_heads, head_dim}).transpose(1, 2);
  at::Tensor v = layer.v.Forward(x).view({batch, t, kv_heads, head_dim}).transpose(1, 2);
  // q takes the 1/√head_dim score scale: QKᵀ then comes out scaled, and the pass is over q
  // [t, head_dim] instead of the scores [t, s] (forward and backward).
  q = ApplyRope(q, cos, sin).mul_(1.0 / std::sqrt(static_cast<double>(head_dim)));
  k = ApplyRope(k, cos, sin);
  if (cache != nullptr) std::tie(k, v) = cache->Append(index, k, v);
  const int64_t s = k.size(2);

  // Grouped-query attention without repeating K/V: query head h = kv * groups + g uses KV head kv,
  // so the queries of one KV head are laid out as [groups * t] rows.
  const at::Tensor qg = q.reshape({batch, kv_heads, groups * t, head_dim});
  at::Tensor scores = at::matmul(qg, k.transpose(-2, -1)).to(at::kFloat);
  // The mask is added in place: matmul's backward does not need its output.
  if (mask.defined()) scores.view({batch, kv_heads, groups, t, s}).add_(mask);
  at::Tensor probs;
  if (at::GradMode::is_enabled() && scores.requires_grad()) {
    probs = at::softmax(scores, -1);
  } else {
    // Inference: the probabilities overwrite the scores (the kernel works row by row, reading
    // each row before writing it).
    probs = at::_softmax_out(scores, scores, -1, /*half_to_float=*/false);
  }
  probs = probs.to(v.scalar_type());
  const at::Tensor out = at::matmul(probs, v)  // [B, kv_heads, groups * t, head_dim]
                             .view({batch, heads, t, head_dim})
                             .transpose(1, 2)
                             .reshape({batch, t, heads * head_dim});
  return layer.o.Forward(out);
}

at::Tensor CausalLM::Forward(const at::Tensor& input_ids, const at::Tensor& attention_mask, KVCache* cache,
                             int64_t logits_to_keep) const {
  if (CanDecodeStep(input_ids, attention_mask, cache)) return DecodeStep(input_ids, cache);
  at::Tensor h = RunLayers(input_ids, attention_mask, cache, static_cast<int64_t>(layers_.size()));
  const int64_t t = h.size(1);
  h = RmsNorm(h, final_norm_, config_.rms_norm_eps);
  if (logits_to_keep > 0 && logits_to_keep < t) h = h.narrow(1, t - logits_to_keep, logits_to_keep);
  return lm_head_.Forward(h).to(at::kFloat);
}

at::Tensor CausalLM::HiddenStates(const at::Tensor& input_ids, const at::Tensor& attention_mask,
                                  int64_t num_layers) const {
  TORCH_CHECK(num_layers >= 0 && num_layers <= static_cast<int64_t>(layers_.size()),
              "CausalLM::HiddenStates: num_layers must be in [0, ", layers_.size(), "], got ", num_layers);
  return RunLayers(input_ids, attention_mask, nullptr, num_layers).to(at::kFloat);
}

at::Tensor CausalLM::RunLayers(const at::Tensor& input_ids, const at::Tensor& attention_mask, KVCache* cache,
                               int64_t num_layers) const {
  TORCH_CHECK(input_ids.dim() == 2, "CausalLM::Forward: input_ids must be [B, T], got ", input_ids.sizes());
  const int64_t batch = input_ids.size(0);
  const int64_t t = input_ids.size(1);
  TORCH_CHECK(batch > 0 && t > 0, "CausalLM::Forward: empty input ", input_ids.sizes());
  const int64_t past = cache != nullptr ? cache->length() : 0;
  const int64_t total = past + t;
  const at::Device dev = device();
  const at::TensorOptions long_opts = at::TensorOptions().dtype(at::kLong).device(dev);
  const at::TensorOptions float_opts = at::TensorOptions().dtype(at::kFloat).device(dev);
  const at::Tensor ids = input_ids.to(dev, at::kLong);

  // Positions and the additive attention mask [B or 1, 1, 1, T, total] (broadcast over KV heads
  // and query groups). A query always sees itself, so padding rows never become all -inf.
  // Mistral's sliding window: a query sees the `window` most recent keys, itself included (padding
  // is only ever at the left or right of the real tokens, so cache distance = position distance).
  const int64_t window = config_.sliding_window;
  const bool windowed = window > 0 && total > window;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  at::Tensor positions;
  at::Tensor mask;
  if (attention_mask.defined() || t > 1 || windowed) {
    const at::Tensor query_index = at::arange(past, total, long_opts).view({t, 1});
    const at::Tensor key_index = at::arange(total, long_opts).view({1, total});
    at::Tensor visible = key_index.le(query_index);  // [T, total]
    if (windowed) visible = visible & key_index.gt(query_index - window);
    if (attention_mask.defined()) {
      TORCH_CHECK(
          attention_mask.dim() == 2 && attention_mask.size(0) == batch && attention_mask.size(1) == total,
          "CausalLM::Forward: attention_mask must be [", batch, ", ", total, "] (cached ", past, " + new ", t,
          "), got ", attention_mask.sizes());
      const at::Tensor m = attention_mask.to(dev, at::kLong);
      positions = (m.cumsum(1) - 1).clamp_min(0).narrow(1, past, t);
      const at::Tensor key_ok = m.ne(0).view({batch, 1, total});
      const at::Tensor allowed = (visible.unsqueeze(0) & key_ok) | key_index.eq(query_index).unsqueeze(0);
      mask = at::zeros({batch, t, total}, float_opts)
                 .masked_fill_(allowed.logical_not(), neg_inf)
                 .view({batch, 1, 1, t, total});
    } else {
      mask = at::zeros({t, total}, float_opts)
                 .masked_fill_(visible.logical_not(), neg_inf)
                 .view({1, 1, 1, t, total});
    }
  }
  // A single new position without padding or window sees every cached key: no mask.
  if (!positions.defined()) {
    positions = at::arange(past, total, long_opts).view({1, t}).expand({batch, t});
  }
  const at::Tensor angles = positions.to(at::kFloat).unsqueeze(-1) * rope_inv_freq_;  // [B,T,D/2]
  const at::Tensor half_cos = angles.cos().unsqueeze(1);                              // [B,1,T,D/2]
  const at::Tensor half_sin = angles.sin().unsqueeze(1);
  const at::ScalarType compute = compute_dtype();
  const at::Tensor cos = at::cat({half_cos, half_cos}, -1).to(compute);   // [B,1,T,D]
  const at::Tensor sin = at::cat({-half_sin, half_sin}, -1).to(compute);  // signed (ApplyRope)

  at::Tensor h = AsDtype(at::embedding(embed_tokens_, ids), compute);
  const double eps = config_.rms_norm_eps;
  for (size_t i = 0; i < static_cast<size_t>(num_layers); ++i) {
    const DecoderLayer& layer = layers_[i];
    h = h + Attention(layer, i, RmsNorm(h, layer.input_norm, eps), cos, sin, mask, cache);
    const at::Tensor n = RmsNorm(h, layer.post_attn_norm, eps);
    h = h + layer.down.Forward(at::silu(layer.gate.Forward(n)) * layer.up.Forward(n));
  }
  return h;
}

// --- parameters -------------------------------------------------------------------------------------

std::vector<std::string> CausalLM::LinearNames() const {
  std::vector<std::string> names;
  names.reserve(layers_.size() * 7);
  for (const DecoderLayer& layer : layers_) {
    for (const LinearLayer* l :
         {&layer.q, &layer.k, &layer.v, &layer.o, &layer.gate, &layer.up, &layer.down}) {
      names.push_back(l->name);
    }
  }
  return names;
}

LinearLayer* CausalLM::FindLinear(const std::string& name) {
  if (name == "lm_head") return &lm_head_;
  constexpr absl::string_view kPrefix = "model.layers.";
  if (!absl::StartsWith(name, kPrefix)) return nullptr;
  const size_t dot = name.find('.', kPrefix.size());
  if (dot == std::string::npos) return nullptr;
  size_t index = 0;
  if (!absl::SimpleAtoi(absl::string_view(name).substr(kPrefix.size(), dot - kPrefix.size()), &index) ||
      index >= layers_.size()) {
    return nullptr;
  }
  DecoderLayer& layer = layers_[index];
  for (LinearLayer* l : {&layer.q, &layer.k, &layer.v, &layer.o, &layer.gate, &layer.up, &layer.down}) {
    if (l->name == name) return l;
  }
  return nullptr;
}

const LinearLayer* CausalLM::FindLinear(const std::string& name) const {
  return const_cast<CausalLM*>(this)->FindLinear(name);
}

std::vector<std::pair<std::string, at::Tensor>> CausalLM::NamedParameters() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  out.emplace_back("model.embed_tokens.weight", embed_tokens_);
  for (size_t i = 0; i < layers_.size(); ++i) {
    const DecoderLayer& layer = layers_[i];
    for (const LinearLayer* l :
         {&layer.q, &layer.k, &layer.v, &layer.o, &layer.gate, &layer.up, &layer.down}) {
      out.emplace_back(l->name + ".weight", l->weight);
      if (l->bias.defined()) out.emplace_back(l->name + ".bias", l->bias);
    }
    out.emplace_back(absl::StrCat("model.layers.", i, ".input_layernorm.weight"), layer.input_norm);
    out.emplace_back(absl::StrCat("model.layers.", i, ".post_attention_layernorm.weight"),
                     layer.post_attn_norm);
  }
  out.emplace_back("model.norm.weight", final_norm_);
  if (!config_.tie_word_embeddings) out.emplace_back("lm_head.weight", lm_head_.weight);
  return out;
}

at::Tensor* CausalLM::FindParameter(const std::string& name) {
  if (name == "model.embed_tokens.weight") return &embed_tokens_;
  if (name == "model.norm.weight") return &final_norm_;
  if (name == "lm_head.weight") return config_.tie_word_embeddings ? nullptr : &lm_head_.weight;
  const size_t dot = name.rfind('.');
  if (dot == std::string::npos) return nullptr;
  const std::string module = name.substr(0, dot);
  const std::string leaf = name.substr(dot + 1);
  if (LinearLayer* l = FindLinear(module); l != nullptr && module != "lm_head") {
    if (leaf == "weight") return &l->weight;
    if (leaf == "bias" && l->bias.defined()) return &l->bias;
    return nullptr;
  }
  for (size_t i = 0; i < layers_.size(); ++i) {
    if (name == absl::StrCat("model.layers.", i, ".input_layernorm.weight")) {
      return &layers_[i].input_norm;
    }
    if (name == absl::StrCat("model.layers.", i, ".post_attention_layernorm.weight")) {
      return &layers_[i].post_attn_norm;
    }
  }
  return nullptr;
}

void CausalLM::RetieEmbeddings() {
  if (config_.tie_word_embeddings) lm_head_.weight = embed_tokens_;
}

int64_t CausalLM::ParameterCount() const {
  int64_t n = 0;
  for (const auto& [name, t] : NamedParameters()) n += t.numel();
  return n;
}

std::unique_ptr<CausalLM> CausalLM::ShallowCopy() const {
  std::unique_ptr<CausalLM> copy(new CausalLM(*this));
  copy->ClearAdapters();
  return copy;
}

void CausalLM::ClearAdapters() {
  lm_head_.adapter.reset();
  for (DecoderLayer& layer : layers_) {
    for (LinearLayer* l : {&layer.q, &layer.k, &layer.v, &layer.o, &layer.gate, &layer.up, &layer.down}) {
      l->adapter.reset();
    }
  }
}

absl::Status CausalLM::SaveHf(const std::string& dir) const {
  RETURN_IF_ERROR(MakeDirs(dir));
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (auto& [name, t] : NamedParameters()) tensors.emplace_back(name, t.detach());
  RETURN_IF_ERROR(WriteSafetensors(dir + "/model.safetensors", tensors, {{"format", "pt"}}));
  ModelConfig config = config_;
  config.torch_dtype = DtypeName(dtype());
  return WriteFileAtomic(dir + "/config.json", ModelConfigToJson(config));
}

}  // namespace strata
