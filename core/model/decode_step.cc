// CausalLM::DecodeStep: one new position per sequence through the KV cache on the CPU in float32,
// with the norms, rotary embedding, attention over the cache and the MLP activation as plain loops
// over the activations instead of ~40 LibTorch operators per layer.
//
// At batch 1 the whole step is one OpenMP parallel region: each thread runs one matrix-vector
// product over its share of every weight's rows, with a spinning barrier between phases
// (SpinBarrier says why). A layer's low-rank side path (a task route's LoRA, or Share's shared
// basis with the route's core) splits the same way: each thread computes the rank-r (or k) inner
// vector of the row itself (d·r, or d·k + k², multiply-adds: a small part of its share of the
// weight's d·n) and then its own output rows of the outer factor. Otherwise (several rows, or an
// adapter that exposes no factors) the products run through LinearLayer::Forward (GEMV,
// small-rows kernel or GEMM by row count, adapters included). Measured against the operator path
// and llama2.c in docs/benchmarks.md (issues 14 and 20).
//
// Numerics: the same operations as RunLayers in float32; only summation orders differ (the
// dot products of attention, the side paths and the norms' sums), well inside the 1e-5 the
// KV-cache tests allow.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <limits>
#include <mutex>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "core/model/model.h"

namespace strata {
namespace {

// y[r] = rmsnorm(x[r]) * weight for `rows` rows of `n` values (float accumulation in double).
void RmsNormRows(const float* x, const float* weight, int64_t rows, int64_t n, double eps, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(xr[i]) * xr[i];
    const float mean = static_cast<float>(sum / static_cast<double>(n));
    const float scale = 1.0f / std::sqrt(mean + static_cast<float>(eps));
    for (int64_t i = 0; i < n; ++i) yr[i] = weight[i] * (xr[i] * scale);
  }
}

// The HF rotary embedding (rotate_half) on `heads` heads of `head_dim` values, in place, with
// cos/sin tables of head_dim / 2 entries, then times `scale`.
void RopeHeads(float* x, int64_t heads, int64_t head_dim, const float* cos, const float* sin, float scale) {
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* xh = x + h * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      const float a = xh[i];
      const float b = xh[i + half];
      xh[i] = (a * cos[i] - b * sin[i]) * scale;
      xh[i + half] = (b * cos[i] + a * sin[i]) * scale;
    }
  }
}

// h += x, over x's elements (the residual stream of the step).
void AddTo(float* h, const at::Tensor& x) {
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) h[i] += xp[i];
}

// Whether one row's product through `layer`'s weight can run as matrix-vector products over slices
// of its rows: a contiguous float32 matrix (and bias). Its adapter is SidePath's business.
bool WeightSplitsByRows(const LinearLayer& l) {
  return l.weight.scalar_type() == at::kFloat && l.weight.dim() == 2 && l.weight.is_contiguous() &&
         (!l.bias.defined() || (l.bias.scalar_type() == at::kFloat && l.bias.is_contiguous()));
}

bool CpuFloatMatrix(const at::Tensor& t, int64_t rows, int64_t cols) {
  return t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 &&
         t.size(0) == rows && t.size(1) == cols && t.is_contiguous();
}

// A layer's side path for one row, as raw float32 factors that a team splits by output rows:
//   low rank: y += scale · B (A x), A [r×d], B [n×r] (LinearAdapter::LowRankFactors);
//   shared:   y += L (scale · C (Rᵀ x)), R [d×k], C [kl×k], L [n×kl] (SharedBasisFactors).
// The tensors are held so that factors an adapter computes per call live through the step.
struct SidePath {
  enum Kind { kNone, kLowRank, kShared };
  Kind kind = kNone;
  at::Tensor inner;  // A [r×d] or R [d×k]
  at::Tensor core;   // C [kl×k] (shared only)
  at::Tensor outer;  // B [n×r] or L [n×kl]
  float scale = 1.0f;

  // The side path of `l` (none without an adapter); false when it cannot be split by rows (an
  // adapter without factors, or factors that are not contiguous float32 CPU matrices of its shape).
  static bool Plan(const LinearLayer& l, SidePath* side) {
    *side = SidePath();
    if (!l.adapter) return true;
    const int64_t n = l.weight.size(0);
    const int64_t d = l.weight.size(1);
    at::Tensor left, core, right, b, a;
    double scale = 1.0;
    if (l.adapter->SharedBasisFactors(&left, &core, &right, &scale)) {
      const int64_t kl = left.dim() == 2 ? left.size(1) : -1;
      const int64_t kr = right.dim() == 2 ? right.size(1) : -1;
      if (!CpuFloatMatrix(left, n, kl) || !CpuFloatMatrix(right, d, kr) || !CpuFloatMatrix(core, kl, kr)) {
        return false;
      }
      *side = SidePath{kShared, right, core, left, static_cast<float>(scale)};
      return true;
    }
    if (l.adapter->LowRankFactors(&b, &a, &scale)) {
      const int64_t r = a.dim() == 2 ? a.size(0) : -1;
      if (!CpuFloatMatrix(a, r, d) || !CpuFloatMatrix(b, n, r)) return false;
      *side = SidePath{kLowRank, a, at::Tensor(), b, static_cast<float>(scale)};
      return true;
    }
    return false;
  }

  // y[begin, end) += this side path of the row x (d values); every thread computes the inner vector.
  void AddRows(const float* x, int64_t d, int64_t begin, int64_t end, float* y) const {
    if (kind == kNone) return;
    const int64_t width = outer.size(1);
    std::vector<float> h(static_cast<size_t>(width), 0.0f);
    if (kind == kLowRank) {
      const float* a = inner.data_ptr<float>();
      for (int64_t j = 0; j < width; ++j) {
        const float* aj = a + j * d;
        float sum = 0;
        for (int64_t i = 0; i < d; ++i) sum += aj[i] * x[i];
        h[static_cast<size_t>(j)] = sum * scale;
      }
    } else {
      const int64_t k = inner.size(1);
      const float* r = inner.data_ptr<float>();
      std::vector<float> xr(static_cast<size_t>(k), 0.0f);
      for (int64_t i = 0; i < d; ++i) {
        const float xi = x[i];
        const float* ri = r + i * k;
        for (int64_t j = 0; j < k; ++j) xr[static_cast<size_t>(j)] += xi * ri[j];
      }
      const float* c = core.data_ptr<float>();
      for (int64_t m = 0; m < width; ++m) {
        const float* cm = c + m * k;
        float sum = 0;
        for (int64_t j = 0; j < k; ++j) sum += cm[j] * xr[static_cast<size_t>(j)];
        h[static_cast<size_t>(m)] = sum * scale;
      }
    }
    const float* o = outer.data_ptr<float>();
    for (int64_t row = begin; row < end; ++row) {
      const float* orow = o + row * width;
      float sum = 0;
      for (int64_t m = 0; m < width; ++m) sum += orow[m] * h[static_cast<size_t>(m)];
      y[row] += sum;
    }
  }
};

// A barrier for the threads of one decode step that spins (the phases between two barriers are
// 1 µs to a few ms) and then yields, so a waiting thread gives its core away when another process
// wants it. OpenMP's own barrier under OMP_WAIT_POLICY=PASSIVE (how scripts/serve.sh runs) puts
// the thread to sleep, and waking it costs ~40 µs per matrix product on the 2-core VMs: ~3.5 ms of
// a 20 ms step of the 110M config when each product was its own parallel region.
class SpinBarrier {
 public:
  // Every thread of the team sets the same size before its first Wait().
  void SetSize(int size) { size_.store(size, std::memory_order_relaxed); }
  // Releases every waiting thread and makes every later Wait() return false.
  void Abort() { aborted_.store(true, std::memory_order_release); }
  // Waits for the whole team; false when the team was aborted.
  bool Wait() {
    const int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == size_.load(std::memory_order_relaxed)) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return !aborted_.load(std::memory_order_acquire);
    }
    constexpr int kSpins = 1 << 14;
    for (int spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (aborted_.load(std::memory_order_acquire)) return false;
      if (spins < kSpins) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
    return !aborted_.load(std::memory_order_acquire);
  }

 private:
  std::atomic<int> size_{0};
  std::atomic<int> arrived_{0};
  std::atomic<int> generation_{0};
  std::atomic<bool> aborted_{false};
};

// Thrown by Team::Sync in the other threads when one thread of the team failed.
struct TeamAborted {};

// One thread's view of the team running a decode step: its index, the team size, and the barrier.
struct Team {
  int id = 0;
  int size = 1;
  SpinBarrier* barrier = nullptr;

  void Sync() const {
    if (size > 1 && !barrier->Wait()) throw TeamAborted{};
  }
  // This thread's share [begin, end) of n items.
  std::pair<int64_t, int64_t> Range(int64_t n) const { return {n * id / size, n * (id + 1) / size}; }
};

// out = layer(x). One row through a layer whose weight splits by rows and whose side path is
// planned (`side`, possibly none): each thread of the team writes its share of the output features
// with one matrix-vector product over those rows of the weight (all of them in a team of one;
// OpenBLAS runs single-threaded inside the parallel region), plus those rows of the side path.
// Otherwise (`side` null: several rows, or a step with a layer that does not split; only ever a
// team of one, see DecodeStep) LinearLayer::Forward: GEMV, small-rows kernel or GEMM by row count,
// and the adapter.
void TeamLinear(const Team& team, const LinearLayer& layer, const SidePath* side, const at::Tensor& x,
                const at::Tensor& out) {
  if (side == nullptr) {
    out.copy_(layer.Forward(x));
    return;
  }
  const auto [begin, end] = team.Range(out.size(1));
  if (end <= begin) return;
  const at::Tensor xv = x.view({x.size(1)});
  at::Tensor yv = out.view({out.size(1)}).narrow(0, begin, end - begin);
  const at::Tensor w = layer.weight.narrow(0, begin, end - begin);
  if (layer.bias.defined()) {
    at::addmv_out(yv, layer.bias.narrow(0, begin, end - begin), w, xv);
  } else {
    at::mv_out(yv, w, xv);
  }
  side->AddRows(x.data_ptr<float>(), x.size(1), begin, end, out.data_ptr<float>());
}

// Plans the side path of every linear layer of a step of `rows` rows, in the order the step runs
// them (q, k, v, o, gate, up, down per decoder layer, then the head): true when the step splits by
// rows (one row; every weight a contiguous float32 matrix; every adapter none or with factors).
// `Layers` is CausalLM's decoder layers.
template <typename Layers>
bool PlanSides(const Layers& layers, const LinearLayer& head, int64_t rows, std::vector<SidePath>* sides) {
  sides->clear();
  if (rows != 1) return false;
  std::vector<const LinearLayer*> linears;
  for (const auto& l : layers) {
    for (const LinearLayer* linear : {&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down})
      linears.push_back(linear);
  }
  linears.push_back(&head);
  sides->resize(linears.size());
  for (size_t i = 0; i < linears.size(); ++i) {
    if (!WeightSplitsByRows(*linears[i]) || !SidePath::Plan(*linears[i], &(*sides)[i])) {
      sides->clear();
      return false;
    }
  }
  return true;
}

// Runs body(team) on `threads` threads as one OpenMP parallel region (one wake-up of the pool per
// step), or on the calling thread alone. The first exception of any thread is rethrown here.
template <typename Body>
void RunTeam(int threads, const Body& body) {
  if (threads <= 1 || omp_in_parallel()) {
    body(Team{});
    return;
  }
  SpinBarrier barrier;
  std::mutex error_mu;
  std::exception_ptr error;
  const at::ThreadLocalState state;  // grad / inference mode of the caller, for every thread
#pragma omp parallel num_threads(threads)
  {
    at::ThreadLocalStateGuard guard(state);
    const Team team{omp_get_thread_num(), omp_get_num_threads(), &barrier};
    barrier.SetSize(team.size);
    try {
      body(team);
    } catch (const TeamAborted&) {
      // Another thread failed; its exception is the one reported.
    } catch (...) {
      {
        std::lock_guard<std::mutex> lock(error_mu);
        if (!error) error = std::current_exception();
      }
      barrier.Abort();
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace

int CausalLM::DecodeStepTeamSize(int64_t rows) const {
  std::vector<SidePath> sides;
  return PlanSides(layers_, lm_head_, rows, &sides) ? std::max(1, at::get_num_threads()) : 1;
}

bool CausalLM::CanDecodeStep(const at::Tensor& input_ids, const at::Tensor& attention_mask,
                             const KVCache* cache) const {
  if (!decode_step_enabled_ || cache == nullptr || attention_mask.defined()) return false;
  if (!device().is_cpu() || dtype() != at::kFloat || at::GradMode::is_enabled()) return false;
  if (input_ids.dim() != 2 || input_ids.size(1) != 1 || input_ids.size(0) < 1) return false;
  // An empty cache is a prefill of one token; a cache of other rows is an error Forward reports.
  if (cache->length() == 0 || cache->rows() != input_ids.size(0)) return false;
  // Mistral's window needs the mask once the sequence is longer than the window.
  const int64_t window = config_.sliding_window;
  return !(window > 0 && cache->length() + 1 > window);
}

at::Tensor CausalLM::DecodeStep(const at::Tensor& input_ids, KVCache* cache) const {
  const int64_t rows = input_ids.size(0);
  const int64_t hidden = config_.hidden_size;
  const int64_t heads = config_.num_attention_heads;
  const int64_t kv_heads = config_.num_key_value_heads;
  const int64_t head_dim = config_.head_dim;
  const int64_t groups = heads / kv_heads;
  const int64_t inter = config_.intermediate_size;
  const int64_t vocab = embed_tokens_.size(0);
  const int64_t past = cache->length();
  const at::TensorOptions opts = at::TensorOptions().dtype(at::kFloat);

  // Embeddings (the same range check as at::embedding).
  const at::Tensor ids = input_ids.to(at::kCPU, at::kLong).contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  const at::Tensor embed = embed_tokens_.contiguous();
  at::Tensor h = at::empty({rows, hidden}, opts);
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(id[r] >= 0 && id[r] < vocab, "CausalLM::Forward: token id ", id[r], " out of range [0, ",
                vocab, ")");
    std::copy_n(embed.data_ptr<float>() + id[r] * hidden, hidden, h.data_ptr<float>() + r * hidden);
  }

  // Every row is at position `past` (no padding): one rotary table for the step, in float32 as
  // RunLayers computes it (position · inverse frequency, then cos and sin).
  const int64_t half = head_dim / 2;
  std::vector<float> cos_table(static_cast<size_t>(half));
  std::vector<float> sin_table(static_cast<size_t>(half));
  const at::Tensor inv_freq = rope_inv_freq_.contiguous();
  for (int64_t i = 0; i < half; ++i) {
    const float angle = static_cast<float>(past) * inv_freq.data_ptr<float>()[i];
    cos_table[static_cast<size_t>(i)] = std::cos(angle);
    sin_table[static_cast<size_t>(i)] = std::sin(angle);
  }
  const float q_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  const double eps = config_.rms_norm_eps;

  const at::Tensor normed = at::empty({rows, hidden}, opts);
  const at::Tensor q = at::empty({rows, heads * head_dim}, opts);
  const at::Tensor k = at::empty({rows, kv_heads * head_dim}, opts);
  const at::Tensor v = at::empty({rows, kv_heads * head_dim}, opts);
  const at::Tensor attn = at::empty({rows, heads * head_dim}, opts);
  const at::Tensor o = at::empty({rows, hidden}, opts);
  const at::Tensor gate = at::empty({rows, inter}, opts);
  const at::Tensor up = at::empty({rows, inter}, opts);
  const at::Tensor down = at::empty({rows, hidden}, opts);
  const at::Tensor logits = at::empty({rows, lm_head_.weight.size(0)}, opts);
  float* hp = h.data_ptr<float>();
  at::Tensor keys;  // this layer's cached keys/values (set by the team's first thread)
  at::Tensor values;

  // Each linear layer's side path when the step splits by rows (7 per decoder layer, then the head).
  std::vector<SidePath> sides;
  auto side = [&sides](size_t layer, size_t slot) -> const SidePath* {
    return sides.empty() ? nullptr : &sides[layer * 7 + slot];
  };

  // The step, run by each thread of a team (one thread, or one OpenMP team for the whole step).
  auto body = [&](const Team& team) {
    for (size_t index = 0; index < layers_.size(); ++index) {
      const DecoderLayer& layer = layers_[index];
      if (team.id == 0) {
        RmsNormRows(hp, layer.input_norm.data_ptr<float>(), rows, hidden, eps, normed.data_ptr<float>());
      }
      team.Sync();
      TeamLinear(team, layer.q, side(index, 0), normed, q);
      TeamLinear(team, layer.k, side(index, 1), normed, k);
      TeamLinear(team, layer.v, side(index, 2), normed, v);
      team.Sync();
      if (team.id == 0) {
        for (int64_t r = 0; r < rows; ++r) {
          RopeHeads(q.data_ptr<float>() + r * heads * head_dim, heads, head_dim, cos_table.data(),
                    sin_table.data(), q_scale);
          RopeHeads(k.data_ptr<float>() + r * kv_heads * head_dim, kv_heads, head_dim, cos_table.data(),
                    sin_table.data(), 1.0f);
        }
        std::tie(keys, values) = cache->Append(index, k.view({rows, 1, kv_heads, head_dim}).transpose(1, 2),
                                               v.view({rows, 1, kv_heads, head_dim}).transpose(1, 2));
      }
      team.Sync();
      // One (row, query head) per task: scores against every cached key, softmax, weighted values.
      const int64_t positions = keys.size(2);
      const float* kp = keys.data_ptr<float>();
      const float* vp = values.data_ptr<float>();
      const float* qp = q.data_ptr<float>();
      float* ap = attn.data_ptr<float>();
      std::vector<float> scores(static_cast<size_t>(positions));
      const auto [task_begin, task_end] = team.Range(rows * heads);
      for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t r = task / heads;
        const int64_t head = task % heads;
        const int64_t kv = head / groups;
        const float* qh = qp + r * heads * head_dim + head * head_dim;
        const float* kh = kp + r * keys.stride(0) + kv * keys.stride(1);
        const float* vh = vp + r * values.stride(0) + kv * values.stride(1);
        const int64_t k_pos = keys.stride(2);
        const int64_t v_pos = values.stride(2);
        float best = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < positions; ++s) {
          const float* ks = kh + s * k_pos;
          float dot = 0;
          for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * ks[d];
          scores[static_cast<size_t>(s)] = dot;
          best = std::max(best, dot);
        }
        float total = 0;
        for (int64_t s = 0; s < positions; ++s) {
          const float e = std::exp(scores[static_cast<size_t>(s)] - best);
          scores[static_cast<size_t>(s)] = e;
          total += e;
        }
        float* out = ap + r * heads * head_dim + head * head_dim;
        std::fill_n(out, head_dim, 0.0f);
        for (int64_t s = 0; s < positions; ++s) {
          const float p = scores[static_cast<size_t>(s)] / total;
          const float* vs = vh + s * v_pos;
          for (int64_t d = 0; d < head_dim; ++d) out[d] += p * vs[d];
        }
      }
      team.Sync();
      TeamLinear(team, layer.o, side(index, 3), attn, o);
      team.Sync();
      if (team.id == 0) {
        AddTo(hp, o);
        RmsNormRows(hp, layer.post_attn_norm.data_ptr<float>(), rows, hidden, eps, normed.data_ptr<float>());
      }
      team.Sync();
      TeamLinear(team, layer.gate, side(index, 4), normed, gate);
      TeamLinear(team, layer.up, side(index, 5), normed, up);
      {
        // SiLU(gate) · up into gate, over the columns this thread computed.
        const auto [begin, end] = team.Range(inter);
        for (int64_t r = 0; r < rows; ++r) {
          float* g = gate.data_ptr<float>() + r * inter;
          const float* u = up.data_ptr<float>() + r * inter;
          for (int64_t i = begin; i < end; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
        }
      }
      team.Sync();
      TeamLinear(team, layer.down, side(index, 6), gate, down);
      team.Sync();
      if (team.id == 0) AddTo(hp, down);
    }
    if (team.id == 0)
      RmsNormRows(hp, final_norm_.data_ptr<float>(), rows, hidden, eps, normed.data_ptr<float>());
    team.Sync();
    TeamLinear(team, lm_head_, side(layers_.size(), 0), normed, logits);
  };
  // One row splits every product (and its side path) over the intra-op threads, one GEMV each
  // over its share of the weight's rows; otherwise the products themselves use the threads.
  const bool split = PlanSides(layers_, lm_head_, rows, &sides);
  RunTeam(split ? at::get_num_threads() : 1, body);
  return logits.view({rows, 1, logits.size(1)});
}

}  // namespace strata
