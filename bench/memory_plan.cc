#include "bench/memory_plan.h"

#include <algorithm>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace strata::bench {
namespace {

constexpr const char* kLinears[] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                    "gate_proj", "up_proj", "down_proj"};
constexpr const char* kMethods[] = {"share_ella", "share",  "ella", "seq_lora", "inc_lora",
                                    "o_lora",     "seq_ft", "mtl",  "osft",     "pm"};

struct Shape {
  std::string name;
  int64_t n = 0;  // out_features
  int64_t d = 0;  // in_features
};

// The seven linear layers of one decoder layer, [out, in].
std::vector<Shape> LayerLinears(const ModelConfig& c) {
  const int64_t q = c.num_attention_heads * c.head_dim;
  const int64_t kv = c.num_key_value_heads * c.head_dim;
  return {{"q_proj", q, c.hidden_size},
          {"k_proj", kv, c.hidden_size},
          {"v_proj", kv, c.hidden_size},
          {"o_proj", c.hidden_size, q},
          {"gate_proj", c.intermediate_size, c.hidden_size},
          {"up_proj", c.intermediate_size, c.hidden_size},
          {"down_proj", c.hidden_size, c.intermediate_size}};
}

int64_t DtypeBytes(const std::string& dtype) { return dtype == "float32" ? 4 : 2; }

}  // namespace

std::vector<std::string> PresetModelNames() { return {"llama-8b", "mistral-7b", "qwen2-7b"}; }

absl::StatusOr<ModelConfig> PresetModelConfig(const std::string& name) {
  ModelConfig c;
  c.rms_norm_eps = 1e-5;
  c.tie_word_embeddings = false;
  c.torch_dtype = "bfloat16";
  if (name == "llama-8b") {  // meta-llama/Meta-Llama-3-8B
    c.architecture = "LlamaForCausalLM";
    c.hidden_size = 4096;
    c.intermediate_size = 14336;
    c.num_hidden_layers = 32;
    c.num_attention_heads = 32;
    c.num_key_value_heads = 8;
    c.vocab_size = 128256;
    c.max_position_embeddings = 8192;
    c.rope_theta = 500000.0;
  } else if (name == "mistral-7b") {  // mistralai/Mistral-7B-v0.3
    c.architecture = "MistralForCausalLM";
    c.hidden_size = 4096;
    c.intermediate_size = 14336;
    c.num_hidden_layers = 32;
    c.num_attention_heads = 32;
    c.num_key_value_heads = 8;
    c.vocab_size = 32768;
    c.max_position_embeddings = 32768;
    c.rope_theta = 1000000.0;
  } else if (name == "qwen2-7b") {  // Qwen/Qwen2-7B
    c.architecture = "Qwen2ForCausalLM";
    c.hidden_size = 3584;
    c.intermediate_size = 18944;
    c.num_hidden_layers = 28;
    c.num_attention_heads = 28;
    c.num_key_value_heads = 4;
    c.vocab_size = 152064;
    c.max_position_embeddings = 131072;
    c.rope_theta = 1000000.0;
    c.rms_norm_eps = 1e-6;
    c.attention_bias = true;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("unknown model preset \"", name,
                                                   "\" (valid: ", absl::StrJoin(PresetModelNames(), ", "),
                                                   ", or a model directory with config.json)"));
  }
  c.head_dim = c.hidden_size / c.num_attention_heads;
  return c;
}

int64_t ActivationPeakBytes(const ModelConfig& c, const MemoryPlanOptions& o, bool full_ft, bool adapters) {
  const std::set<std::string> t(o.targets.begin(), o.targets.end());
  auto targeted = [&](const char* name) { return full_ft || t.count("all-linear") > 0 || t.count(name) > 0; };
  const int64_t cb = o.device == "cpu" ? 4 : DtypeBytes(o.dtype);  // compute dtype bytes
  const int64_t h = c.hidden_size;
  const int64_t q = c.num_attention_heads * c.head_dim;
  const int64_t kv = c.num_key_value_heads * c.head_dim;
  const int64_t inter = c.intermediate_size;
  const int64_t tokens = o.batch_size * o.seq_len;
  // Tensors the forward graph keeps for backward, per token and decoder layer (compute dtype),
  // following core/model/model.cc (a frozen linear keeps no input; an adapter or a trained weight
  // keeps its input):
  //   the residual stream entering each RMSNorm (2h); q and k after RoPE and v (q + 2kv, kept by
  //   the attention matmuls); SiLU's input, its output and up's output (3·inter, kept by silu and
  //   the product); the inputs of adapted/trained linears: the first norm's output (h, for q/k/v),
  //   the attention output (q, for o), the second norm's output (h, for gate/up), the MLP product
  //   (inter, for down); each adapter's x·Aᵀ (r).
  int64_t per_token = 2 * h + q + 2 * kv + 3 * inter;
  if (targeted("q_proj") || targeted("k_proj") || targeted("v_proj")) per_token += h;
  if (targeted("o_proj")) per_token += q;
  if (targeted("gate_proj") || targeted("up_proj")) per_token += h;
  if (targeted("down_proj")) per_token += inter;
  if (adapters) {
    for (const char* name : kLinears) {
      if (targeted(name)) per_token += o.rank;
    }
  }
  int64_t bytes = c.num_hidden_layers * tokens * per_token * cb;
  // RMSNorm computes in float32: with a 16-bit compute dtype it keeps a float32 copy of its input.
  if (cb != 4) bytes += c.num_hidden_layers * tokens * 2 * h * 4;
  // Attention probabilities [B, heads, T, T]: softmax's float32 output, plus its copy in the
  // compute dtype for the value matmul when that is not float32.
  bytes += c.num_hidden_layers * o.batch_size * c.num_attention_heads * o.seq_len * o.seq_len *
           (4 + (cb != 4 ? cb : 0));
  // Backward through one layer's attention softmax holds three more float32 [B, heads, T, T] buffers
  // at once (the gradients of the probabilities, of the masked scores and of the scaled scores).
  bytes += 3 * o.batch_size * c.num_attention_heads * o.seq_len * o.seq_len * 4;
  // The loss head, float32 [tokens, vocab]: the logits, log-softmax's output (kept by the loss) and,
  // at the start of backward, nll_loss's gradient and log-softmax's input gradient (four at once);
  // with a 16-bit compute dtype also the lm_head output before its float32 cast.
  bytes += tokens * c.vocab_size * (4 * 4 + (cb != 4 ? cb : 0));
  return bytes;
}

absl::StatusOr<MemoryPlan> PlanMemory(const ModelConfig& config, const MemoryPlanOptions& o,
                                      const std::vector<std::string>& methods_in) {
  if (o.dtype != "float32" && o.dtype != "bfloat16" && o.dtype != "float16") {
    return absl::InvalidArgumentError(
        absl::StrCat("--dtype: \"", o.dtype, "\" (expected float32, bfloat16 or float16)"));
  }
  if (o.device != "cpu" && o.device != "cuda") {
    return absl::InvalidArgumentError(absl::StrCat("--device: \"", o.device, "\" (expected cpu or cuda)"));
  }
  if (o.dtype == "float16" && o.device == "cpu") {
    return absl::InvalidArgumentError("--dtype float16 is CUDA-only (as ModelLoadOptions)");
  }
  if (o.batch_size < 1 || o.seq_len < 1 || o.rank < 1 || o.k_max < 1 || o.tasks < 0) {
    return absl::InvalidArgumentError(
        "--batch-size, --seq-len, --rank and --k-max must be positive and --tasks non-negative");
  }
  if (config.hidden_size < 1 || config.num_hidden_layers < 1 || config.num_attention_heads < 1 ||
      config.head_dim < 1 || config.vocab_size < 1 || config.intermediate_size < 1) {
    return absl::InvalidArgumentError("model config: sizes must be positive");
  }
  const std::set<std::string> valid_targets = {"all-linear", "q_proj",    "k_proj",  "v_proj",
                                               "o_proj",     "gate_proj", "up_proj", "down_proj"};
  if (o.targets.empty()) return absl::InvalidArgumentError("--targets: at least one target module");
  for (const std::string& target : o.targets) {
    if (!valid_targets.count(target)) {
      return absl::InvalidArgumentError(absl::StrCat("--targets: unknown module \"", target,
                                                     "\" (valid: all-linear, q_proj, k_proj, v_proj, o_proj, "
                                                     "gate_proj, up_proj, down_proj)"));
    }
  }
  std::vector<std::string> methods = methods_in;
  if (methods.empty()) methods.assign(std::begin(kMethods), std::end(kMethods));
  for (const std::string& m : methods) {
    if (std::find(std::begin(kMethods), std::end(kMethods), m) == std::end(kMethods)) {
      return absl::InvalidArgumentError(absl::StrCat("--methods: unknown method \"", m, "\""));
    }
  }

  MemoryPlan plan;
  plan.config = config;
  plan.options = o;
  const int64_t wb = DtypeBytes(o.dtype);
  const int64_t cb = o.device == "cpu" ? 4 : wb;
  plan.compute_dtype_bytes = cb;
  const std::set<std::string> t(o.targets.begin(), o.targets.end());
  const bool all = t.count("all-linear") > 0;

  // Parameters: embeddings, lm_head unless tied, 2 norms per layer + the final norm, the linears,
  // q/k/v biases.
  const int64_t h = config.hidden_size;
  const int64_t kv = config.num_key_value_heads * config.head_dim;
  const int64_t q = config.num_attention_heads * config.head_dim;
  int64_t params = config.vocab_size * h * (config.tie_word_embeddings ? 1 : 2) + h;
  int64_t sum_nd = 0, sum_n_plus_d = 0, sum_osft_k = 0;
  int64_t adapted_modules = 0;
  for (const Shape& s : LayerLinears(config)) {
    params += config.num_hidden_layers * s.n * s.d;
    if (all || t.count(s.name)) {
      adapted_modules += config.num_hidden_layers;
      sum_nd += config.num_hidden_layers * s.n * s.d;
      sum_n_plus_d += config.num_hidden_layers * (s.n + s.d);
      const int64_t k = static_cast<int64_t>(static_cast<double>(std::min(s.n, s.d)) * (1.0 - o.osft_urr));
      sum_osft_k += config.num_hidden_layers * k * (s.n + s.d);
    }
  }
  params += config.num_hidden_layers * 2 * h;
  if (config.attention_bias) params += config.num_hidden_layers * (q + 2 * kv);
  plan.parameters = params;
  plan.weight_bytes = params * wb;
  plan.adapted_parameters = sum_nd;
  // Keys and values of every layer, in the compute dtype (core/model/model.h: KVCache).
  plan.kv_bytes_per_token = 2 * config.num_hidden_layers * kv * cb;

  const int64_t lora_params = o.rank * sum_n_plus_d;  // one rank-r LoRA on every target module
  // Share, float32 per module: bases β [n, k], α [d, k] and coefficients 2·k·p per task (k =
  // min(k_max, p·t), the subspace rank reached); the Gram matrices are derived, not kept.
  const int64_t k = std::min(o.k_max, o.rank * o.tasks);
  const int64_t share_bytes = 4 * (k * sum_n_plus_d + adapted_modules * 2 * k * o.rank * o.tasks);
  const int64_t adapted_weight_bytes = sum_nd * wb;
  for (const std::string& name : methods) {
    MethodMemory m;
    m.method = name;
    const bool full = name == "seq_ft" || name == "mtl";
    if (full || name == "osft") {
      // Full fine-tuning (ft_scope all) or OSFT's target weights: a trained copy in the weight dtype
      // (the flat AdamW value buffer) + its gradient; AdamW exp_avg, exp_avg_sq and the denominator
      // buffer, in the weight dtype. The state shares the served tensors (nothing beyond them); a
      // checkpoint stores the trained parameters.
      const int64_t p = full ? params : sum_nd;
      m.trainable_parameters = p;
      m.trainable_bytes = 2 * p * wb;
      m.optimizer_bytes = 3 * p * wb;
      m.checkpoint_bytes = p * wb;
      if (name == "osft") m.task_state_bytes = 4 * sum_osft_k;  // frozen U_h, V_h (float32)
    } else {
      // Adapters: float32 factors (master weights even for 16-bit models) in the flat AdamW
      // buffers: value + gradient, exp_avg + exp_avg_sq + denominator.
      m.trainable_parameters = lora_params;
      m.trainable_bytes = 2 * 4 * lora_params;
      m.optimizer_bytes = 3 * 4 * lora_params;
      if (name == "share_ella" || name == "share") {
        m.state_bytes = share_bytes;
        m.checkpoint_bytes = share_bytes + (name == "share_ella" ? adapted_weight_bytes : 0);
      } else if (name == "ella") {
        m.checkpoint_bytes = adapted_weight_bytes;
      } else if (name == "seq_lora") {
        m.state_bytes = m.checkpoint_bytes = o.tasks > 0 ? 4 * lora_params : 0;
      } else if (name == "inc_lora" || name == "o_lora") {
        m.state_bytes = m.checkpoint_bytes = 4 * lora_params * o.tasks;
      } else if (name == "pm") {
        // W_past, the Fisher sum and the Fisher-weighted sum: three dense float32 per module.
        m.state_bytes = m.checkpoint_bytes = 3 * 4 * sum_nd;
      }
      if ((name == "share_ella" || name == "ella") && o.ella_lambda > 0.0 && o.tasks > 0) {
        m.task_state_bytes = 4 * sum_nd;  // Ŵ_past = W_served − W0, float32, during a task
      }
    }
    m.activation_bytes = ActivationPeakBytes(config, o, full, /*adapters=*/!full && name != "osft");
    m.training_peak_bytes =
        m.state_bytes + m.task_state_bytes + m.trainable_bytes + m.optimizer_bytes + m.activation_bytes;
    plan.methods.push_back(m);
  }
  return plan;
}

}  // namespace strata::bench
