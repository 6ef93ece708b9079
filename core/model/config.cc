#include "core/model/config.h"

#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/util/file_util.h"
#include "core/util/status_macros.h"

namespace strata {
namespace {

using json = nlohmann::json;

constexpr const char* kLlama = "LlamaForCausalLM";
constexpr const char* kMistral = "MistralForCausalLM";
constexpr const char* kQwen2 = "Qwen2ForCausalLM";
constexpr const char* kSupported = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM";

bool IsSupportedArchitecture(const std::string& a) { return a == kLlama || a == kMistral || a == kQwen2; }

std::string ModelTypeFor(const std::string& arch) {
  if (arch == kMistral) return "mistral";
  if (arch == kQwen2) return "qwen2";
  return "llama";
}

// Short rendering of a JSON value for error messages.
std::string Describe(const json& v) {
  std::string text = v.dump();
  if (text.size() > 40) text = text.substr(0, 37) + "...";
  return absl::StrCat(v.type_name(), " ", text);
}

absl::Status TypeError(const std::string& source, const std::string& field, const std::string& expected,
                       const json& v) {
  return absl::InvalidArgumentError(
      absl::StrCat(source, ": field '", field, "' must be ", expected, ", got ", Describe(v)));
}

absl::Status MissingError(const std::string& source, const std::string& field) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": missing required field '", field, "'"));
}

// Integer value of `v` (an integer, or a float with an integral value) within [lo, hi].
absl::StatusOr<int64_t> AsInt(const json& v, const std::string& source, const std::string& field,
                              int64_t lo = std::numeric_limits<int64_t>::min(),
                              int64_t hi = std::numeric_limits<int64_t>::max()) {
  int64_t out = 0;
  if (v.is_number_unsigned()) {
    uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return TypeError(source, field, "an integer in range", v);
    }
    out = static_cast<int64_t>(u);
  } else if (v.is_number_integer()) {
    out = v.get<int64_t>();
  } else if (v.is_number_float()) {
    double d = v.get<double>();
    if (!std::isfinite(d) || std::trunc(d) != d || d < -9.2e18 || d > 9.2e18) {
      return TypeError(source, field, "an integer", v);
    }
    out = static_cast<int64_t>(d);
  } else {
    return TypeError(source, field, "an integer", v);
  }
  if (out < lo || out > hi) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": field '", field, "' = ", out, " is out of range [", lo, ", ", hi, "]"));
  }
  return out;
}

// Absent or null -> nullopt.
absl::StatusOr<std::optional<int64_t>> OptInt(const json& obj, const std::string& source,
                                              const std::string& field) {
  auto it = obj.find(field);
  if (it == obj.end() || it->is_null()) return std::optional<int64_t>();
  ASSIGN_OR_RETURN(int64_t v, AsInt(*it, source, field));
  return std::optional<int64_t>(v);
}

absl::StatusOr<int64_t> ReqInt(const json& obj, const std::string& source, const std::string& field) {
  ASSIGN_OR_RETURN(std::optional<int64_t> v, OptInt(obj, source, field));
  if (!v) return MissingError(source, field);
  return *v;
}

absl::StatusOr<int64_t> IntOr(const json& obj, const std::string& source, const std::string& field,
                              int64_t def) {
  ASSIGN_OR_RETURN(std::optional<int64_t> v, OptInt(obj, source, field));
  return v ? *v : def;
}

absl::StatusOr<std::optional<double>> OptDouble(const json& obj, const std::string& source,
                                                const std::string& field) {
  auto it = obj.find(field);
  if (it == obj.end() || it->is_null()) return std::optional<double>();
  if (!it->is_number()) return TypeError(source, field, "a number", *it);
  return std::optional<double>(it->get<double>());
}

absl::StatusOr<double> DoubleOr(const json& obj, const std::string& source, const std::string& field,
                                double def) {
  ASSIGN_OR_RETURN(std::optional<double> v, OptDouble(obj, source, field));
  return v ? *v : def;
}

absl::StatusOr<bool> BoolOr(const json& obj, const std::string& source, const std::string& field, bool def) {
  auto it = obj.find(field);
  if (it == obj.end() || it->is_null()) return def;
  if (!it->is_boolean()) return TypeError(source, field, "a boolean", *it);
  return it->get<bool>();
}

// `prefix` qualifies the field name in messages ("rope_scaling.").
absl::StatusOr<std::optional<std::string>> OptString(const json& obj, const std::string& source,
                                                     const std::string& field,
                                                     const std::string& prefix = "") {
  auto it = obj.find(field);
  if (it == obj.end() || it->is_null()) return std::optional<std::string>();
  if (!it->is_string()) return TypeError(source, prefix + field, "a string", *it);
  return std::optional<std::string>(it->get<std::string>());
}

// Token ids: int, list of ints, or null.
absl::StatusOr<std::vector<int32_t>> TokenIds(const json& obj, const std::string& source,
                                              const std::string& field) {
  std::vector<int32_t> out;
  auto it = obj.find(field);
  if (it == obj.end() || it->is_null()) return out;
  const int64_t lo = std::numeric_limits<int32_t>::min();
  const int64_t hi = std::numeric_limits<int32_t>::max();
  if (it->is_array()) {
    for (size_t i = 0; i < it->size(); ++i) {
      ASSIGN_OR_RETURN(int64_t v, AsInt((*it)[i], source, absl::StrCat(field, "[", i, "]"), lo, hi));
      out.push_back(static_cast<int32_t>(v));
    }
    return out;
  }
  if (!it->is_number()) return TypeError(source, field, "an integer, a list of integers or null", *it);
  ASSIGN_OR_RETURN(int64_t v, AsInt(*it, source, field, lo, hi));
  out.push_back(static_cast<int32_t>(v));
  return out;
}

absl::StatusOr<std::string> ParseArchitecture(const json& j, const std::string& source) {
  auto it = j.find("architectures");
  if (it != j.end() && !it->is_null()) {
    if (!it->is_array()) return TypeError(source, "architectures", "a list of strings", *it);
    if (it->empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": field 'architectures' is empty (supported: ", kSupported, ")"));
    }
    for (size_t i = 0; i < it->size(); ++i) {
      if (!(*it)[i].is_string()) {
        return TypeError(source, absl::StrCat("architectures[", i, "]"), "a string", (*it)[i]);
      }
    }
    std::string arch = (*it)[0].get<std::string>();
    if (!IsSupportedArchitecture(arch)) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": unsupported architecture '", arch, "' (supported: ", kSupported, ")"));
    }
    return arch;
  }
  ASSIGN_OR_RETURN(std::optional<std::string> model_type, OptString(j, source, "model_type"));
  if (!model_type) return MissingError(source, "architectures");
  if (*model_type == "llama") return std::string(kLlama);
  if (*model_type == "mistral") return std::string(kMistral);
  if (*model_type == "qwen2") return std::string(kQwen2);
  return absl::InvalidArgumentError(absl::StrCat(source, ": unsupported model_type '", *model_type,
                                                 "' and no 'architectures' (supported: ", kSupported, ")"));
}

absl::StatusOr<RopeScaling> ParseRopeScaling(const json& j, const std::string& source) {
  RopeScaling rs;
  auto it = j.find("rope_scaling");
  if (it == j.end() || it->is_null()) return rs;
  if (!it->is_object()) return TypeError(source, "rope_scaling", "an object or null", *it);
  const json& r = *it;
  // Newer HF configs write "rope_type", older ones "type".
  std::optional<std::string> type;
  for (const char* key : {"rope_type", "type"}) {
    ASSIGN_OR_RETURN(type, OptString(r, source, key, "rope_scaling."));
    if (type) break;
  }
  if (!type) return MissingError(source, "rope_scaling.rope_type");
  if (*type == "default") return rs;
  if (*type != "llama3") {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": unsupported rope_scaling type '", *type, "' (supported: none, llama3)"));
  }
  rs.type = "llama3";
  auto req_double = [&](const char* key) -> absl::StatusOr<double> {
    auto kit = r.find(key);
    std::string field = absl::StrCat("rope_scaling.", key);
    if (kit == r.end() || kit->is_null()) return MissingError(source, field);
    if (!kit->is_number()) return TypeError(source, field, "a number", *kit);
    return kit->get<double>();
  };
  ASSIGN_OR_RETURN(rs.factor, req_double("factor"));
  ASSIGN_OR_RETURN(rs.low_freq_factor, req_double("low_freq_factor"));
  ASSIGN_OR_RETURN(rs.high_freq_factor, req_double("high_freq_factor"));
  {
    auto kit = r.find("original_max_position_embeddings");
    std::string field = "rope_scaling.original_max_position_embeddings";
    if (kit == r.end() || kit->is_null()) return MissingError(source, field);
    ASSIGN_OR_RETURN(rs.original_max_position_embeddings, AsInt(*kit, source, field));
  }
  return rs;
}

std::string Shape(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace

bool operator==(const RopeScaling& a, const RopeScaling& b) {
  return a.type == b.type && a.factor == b.factor && a.low_freq_factor == b.low_freq_factor &&
         a.high_freq_factor == b.high_freq_factor &&
         a.original_max_position_embeddings == b.original_max_position_embeddings;
}

bool operator==(const ModelConfig& a, const ModelConfig& b) {
  return a.architecture == b.architecture && a.hidden_size == b.hidden_size &&
         a.intermediate_size == b.intermediate_size && a.num_hidden_layers == b.num_hidden_layers &&
         a.num_attention_heads == b.num_attention_heads && a.num_key_value_heads == b.num_key_value_heads &&
         a.head_dim == b.head_dim && a.rms_norm_eps == b.rms_norm_eps && a.rope_theta == b.rope_theta &&
         a.rope_scaling == b.rope_scaling && a.max_position_embeddings == b.max_position_embeddings &&
         a.vocab_size == b.vocab_size && a.tie_word_embeddings == b.tie_word_embeddings &&
         a.attention_bias == b.attention_bias && a.sliding_window == b.sliding_window &&
         a.bos_token_id == b.bos_token_id && a.eos_token_ids == b.eos_token_ids &&
         a.pad_token_id == b.pad_token_id && a.torch_dtype == b.torch_dtype;
}

absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text, const std::string& source) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::parse_error& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": invalid JSON at byte ", e.byte, ": ", e.what()));
  } catch (const json::exception& e) {
    // out_of_range: a number too large for a double (1e999); not a parse_error.
    return absl::InvalidArgumentError(absl::StrCat(source, ": invalid JSON: ", e.what()));
  }
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": config must be a JSON object, got ", j.type_name()));
  }

  ModelConfig c;
  ASSIGN_OR_RETURN(c.architecture, ParseArchitecture(j, source));
  const bool llama = c.architecture == kLlama;
  const bool mistral = c.architecture == kMistral;
  const bool qwen2 = c.architecture == kQwen2;

  ASSIGN_OR_RETURN(c.hidden_size, ReqInt(j, source, "hidden_size"));
  ASSIGN_OR_RETURN(c.intermediate_size, ReqInt(j, source, "intermediate_size"));
  ASSIGN_OR_RETURN(c.num_hidden_layers, ReqInt(j, source, "num_hidden_layers"));
  ASSIGN_OR_RETURN(c.num_attention_heads, ReqInt(j, source, "num_attention_heads"));
  ASSIGN_OR_RETURN(c.vocab_size, ReqInt(j, source, "vocab_size"));
  ASSIGN_OR_RETURN(c.num_key_value_heads, IntOr(j, source, "num_key_value_heads", c.num_attention_heads));
  ASSIGN_OR_RETURN(std::optional<int64_t> head_dim, OptInt(j, source, "head_dim"));
  if (head_dim) {
    c.head_dim = *head_dim;
  } else {
    if (c.num_attention_heads <= 0 || c.hidden_size % c.num_attention_heads != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": head_dim is absent and hidden_size (", c.hidden_size,
                       ") is not divisible by num_attention_heads (", c.num_attention_heads, ")"));
    }
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  ASSIGN_OR_RETURN(c.rms_norm_eps, DoubleOr(j, source, "rms_norm_eps", 1e-6));
  ASSIGN_OR_RETURN(c.rope_theta, DoubleOr(j, source, "rope_theta", 10000.0));
  ASSIGN_OR_RETURN(c.rope_scaling, ParseRopeScaling(j, source));
  const int64_t default_max_pos = mistral ? 131072 : qwen2 ? 32768 : 2048;
  ASSIGN_OR_RETURN(c.max_position_embeddings, IntOr(j, source, "max_position_embeddings", default_max_pos));
  ASSIGN_OR_RETURN(c.tie_word_embeddings, BoolOr(j, source, "tie_word_embeddings", false));

  // Attention biases: Llama reads attention_bias; Qwen2 always has q/k/v biases; Mistral none.
  ASSIGN_OR_RETURN(bool attention_bias, BoolOr(j, source, "attention_bias", false));
  if (llama) c.attention_bias = attention_bias;
  if (qwen2) c.attention_bias = true;
  if (mistral && attention_bias) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": field 'attention_bias' = true is not supported for ", kMistral));
  }
  ASSIGN_OR_RETURN(bool mlp_bias, BoolOr(j, source, "mlp_bias", false));
  if (mlp_bias) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": field 'mlp_bias' = true is not supported"));
  }
  ASSIGN_OR_RETURN(std::optional<std::string> act, OptString(j, source, "hidden_act"));
  if (act && *act != "silu") {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": field 'hidden_act' = '", *act, "' is not supported (only 'silu')"));
  }

  if (mistral) {
    // HF MistralConfig defaults sliding_window to 4096 when the key is absent; null disables it.
    auto it = j.find("sliding_window");
    if (it == j.end()) {
      c.sliding_window = 4096;
    } else if (!it->is_null()) {
      ASSIGN_OR_RETURN(c.sliding_window, AsInt(*it, source, "sliding_window"));
    }
  }
  if (qwen2) {
    ASSIGN_OR_RETURN(bool use_sw, BoolOr(j, source, "use_sliding_window", false));
    if (use_sw) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": field 'use_sliding_window' = true is not supported for ", kQwen2));
    }
  }

  ASSIGN_OR_RETURN(std::vector<int32_t> bos, TokenIds(j, source, "bos_token_id"));
  if (!bos.empty()) c.bos_token_id = bos[0];
  ASSIGN_OR_RETURN(c.eos_token_ids, TokenIds(j, source, "eos_token_id"));
  ASSIGN_OR_RETURN(std::vector<int32_t> pad, TokenIds(j, source, "pad_token_id"));
  if (!pad.empty() && pad[0] >= 0) c.pad_token_id = pad[0];

  ASSIGN_OR_RETURN(std::optional<std::string> dtype, OptString(j, source, "torch_dtype"));
  if (!dtype) {
    ASSIGN_OR_RETURN(dtype, OptString(j, source, "dtype"));
  }
  if (dtype) c.torch_dtype = *dtype;

  RETURN_IF_ERROR(ValidateModelConfig(c, source));
  return c;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  return ParseModelConfig(text, path);
}

std::string ModelConfigToJson(const ModelConfig& c) {
  // nlohmann::ordered_json keeps the HF field order, which makes the file easy to diff.
  nlohmann::ordered_json j;
  j["architectures"] = {c.architecture};
  j["model_type"] = ModelTypeFor(c.architecture);
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["head_dim"] = c.head_dim;
  j["vocab_size"] = c.vocab_size;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope_theta;
  if (c.rope_scaling.type.empty()) {
    j["rope_scaling"] = nullptr;
  } else {
    nlohmann::ordered_json r;
    r["rope_type"] = c.rope_scaling.type;
    r["factor"] = c.rope_scaling.factor;
    r["low_freq_factor"] = c.rope_scaling.low_freq_factor;
    r["high_freq_factor"] = c.rope_scaling.high_freq_factor;
    r["original_max_position_embeddings"] = c.rope_scaling.original_max_position_embeddings;
    j["rope_scaling"] = r;
  }
  j["hidden_act"] = "silu";
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  if (c.architecture == kQwen2) {
    j["use_sliding_window"] = false;
    j["sliding_window"] = nullptr;
  } else if (c.architecture == kMistral) {
    if (c.sliding_window > 0) {
      j["sliding_window"] = c.sliding_window;
    } else {
      j["sliding_window"] = nullptr;
    }
  } else {
    j["attention_bias"] = c.attention_bias;
    j["mlp_bias"] = false;
  }
  if (c.bos_token_id) {
    j["bos_token_id"] = *c.bos_token_id;
  } else {
    j["bos_token_id"] = nullptr;
  }
  if (c.eos_token_ids.empty()) {
    j["eos_token_id"] = nullptr;
  } else if (c.eos_token_ids.size() == 1) {
    j["eos_token_id"] = c.eos_token_ids[0];
  } else {
    j["eos_token_id"] = c.eos_token_ids;
  }
  if (c.pad_token_id) {
    j["pad_token_id"] = *c.pad_token_id;
  } else {
    j["pad_token_id"] = nullptr;
  }
  if (!c.torch_dtype.empty()) j["torch_dtype"] = c.torch_dtype;
  return j.dump(2) + "\n";
}

absl::Status ValidateModelConfig(const ModelConfig& c, const std::string& source) {
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": invalid config: ", what));
  };
  if (!IsSupportedArchitecture(c.architecture)) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": unsupported architecture '", c.architecture,
                                                   "' (supported: ", kSupported, ")"));
  }
  const std::pair<const char*, int64_t> positive[] = {
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads},
      {"head_dim", c.head_dim},
      {"vocab_size", c.vocab_size},
      {"max_position_embeddings", c.max_position_embeddings},
  };
  for (const auto& [name, value] : positive) {
    if (value <= 0) return bad(absl::StrCat("field '", name, "' = ", value, " must be positive"));
  }
  // Guard against absurd sizes whose products would overflow tensor shapes.
  const int64_t kMaxDim = int64_t{1} << 24;
  for (const auto& [name, value] : positive) {
    if (value > kMaxDim && std::string(name) != "max_position_embeddings") {
      return bad(absl::StrCat("field '", name, "' = ", value, " is implausibly large"));
    }
  }
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return bad(absl::StrCat("num_attention_heads (", c.num_attention_heads,
                            ") is not a multiple of num_key_value_heads (", c.num_key_value_heads, ")"));
  }
  if (c.head_dim % 2 != 0) {
    return bad(absl::StrCat("field 'head_dim' = ", c.head_dim, " must be even (rotary embedding)"));
  }
  if (!(c.rms_norm_eps > 0) || !std::isfinite(c.rms_norm_eps)) {
    return bad(absl::StrCat("field 'rms_norm_eps' = ", c.rms_norm_eps, " must be positive"));
  }
  if (!(c.rope_theta > 0) || !std::isfinite(c.rope_theta)) {
    return bad(absl::StrCat("field 'rope_theta' = ", c.rope_theta, " must be positive"));
  }
  if (c.sliding_window < 0) {
    return bad(absl::StrCat("field 'sliding_window' = ", c.sliding_window, " must be >= 0"));
  }
  const RopeScaling& rs = c.rope_scaling;
  if (rs.type == "llama3") {
    if (!(rs.factor >= 1.0) || !std::isfinite(rs.factor)) {
      return bad(absl::StrCat("rope_scaling.factor = ", rs.factor, " must be >= 1"));
    }
    if (!(rs.low_freq_factor > 0) || !(rs.high_freq_factor > rs.low_freq_factor) ||
        !std::isfinite(rs.high_freq_factor)) {
      return bad(absl::StrCat("rope_scaling needs 0 < low_freq_factor (", rs.low_freq_factor,
                              ") < high_freq_factor (", rs.high_freq_factor, ")"));
    }
    if (rs.original_max_position_embeddings <= 0) {
      return bad(absl::StrCat("rope_scaling.original_max_position_embeddings = ",
                              rs.original_max_position_embeddings, " must be positive"));
    }
  } else if (!rs.type.empty()) {
    return bad(absl::StrCat("unsupported rope_scaling type '", rs.type, "' (supported: none, llama3)"));
  }
  auto check_id = [&](const char* field, int64_t id) -> absl::Status {
    if (id < 0 || id >= c.vocab_size) {
      return bad(
          absl::StrCat("field '", field, "' = ", id, " is outside the vocabulary [0, ", c.vocab_size, ")"));
    }
    return absl::OkStatus();
  };
  if (c.bos_token_id) RETURN_IF_ERROR(check_id("bos_token_id", *c.bos_token_id));
  for (int32_t id : c.eos_token_ids) RETURN_IF_ERROR(check_id("eos_token_id", id));
  if (c.pad_token_id) RETURN_IF_ERROR(check_id("pad_token_id", *c.pad_token_id));
  return absl::OkStatus();
}

std::vector<ExpectedTensor> ExpectedLlamaTensors(const ModelConfig& c) {
  const int64_t h = c.hidden_size;
  const int64_t q = c.num_attention_heads * c.head_dim;
  const int64_t kv = c.num_key_value_heads * c.head_dim;
  const int64_t inter = c.intermediate_size;
  std::vector<ExpectedTensor> out;
  out.push_back({"model.embed_tokens.weight", {c.vocab_size, h}, false});
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    out.push_back({p + "input_layernorm.weight", {h}, false});
    out.push_back({p + "self_attn.q_proj.weight", {q, h}, false});
    out.push_back({p + "self_attn.k_proj.weight", {kv, h}, false});
    out.push_back({p + "self_attn.v_proj.weight", {kv, h}, false});
    if (c.attention_bias) {
      out.push_back({p + "self_attn.q_proj.bias", {q}, false});
      out.push_back({p + "self_attn.k_proj.bias", {kv}, false});
      out.push_back({p + "self_attn.v_proj.bias", {kv}, false});
    }
    out.push_back({p + "self_attn.o_proj.weight", {h, q}, false});
    out.push_back({p + "post_attention_layernorm.weight", {h}, false});
    out.push_back({p + "mlp.gate_proj.weight", {inter, h}, false});
    out.push_back({p + "mlp.up_proj.weight", {inter, h}, false});
    out.push_back({p + "mlp.down_proj.weight", {h, inter}, false});
  }
  out.push_back({"model.norm.weight", {h}, false});
  out.push_back({"lm_head.weight", {c.vocab_size, h}, c.tie_word_embeddings});
  return out;
}

bool IsIgnoredCheckpointTensor(const std::string& name) {
  static const std::string kSuffix = "rotary_emb.inv_freq";
  return name.size() >= kSuffix.size() &&
         name.compare(name.size() - kSuffix.size(), kSuffix.size(), kSuffix) == 0;
}

absl::Status CheckLlamaTensorShapes(const ModelConfig& config,
                                    const std::map<std::string, std::vector<int64_t>>& shapes,
                                    const std::string& source) {
  constexpr size_t kShow = 5;
  std::vector<std::string> missing, unexpected, mismatched;
  std::set<std::string> expected_names;
  for (const ExpectedTensor& e : ExpectedLlamaTensors(config)) {
    expected_names.insert(e.name);
    auto it = shapes.find(e.name);
    if (it == shapes.end()) {
      if (!e.optional) missing.push_back(e.name);
      continue;
    }
    if (it->second != e.shape) {
      mismatched.push_back(absl::StrCat(e.name, ": expected ", Shape(e.shape), ", got ", Shape(it->second)));
    }
  }
  for (const auto& [name, shape] : shapes) {
    if (!expected_names.count(name) && !IsIgnoredCheckpointTensor(name)) {
      unexpected.push_back(name);
    }
  }
  if (missing.empty() && unexpected.empty() && mismatched.empty()) return absl::OkStatus();
  auto list = [&](const std::vector<std::string>& v, const char* what) {
    std::vector<std::string> head(v.begin(), v.begin() + std::min(v.size(), kShow));
    std::string s = absl::StrCat(v.size(), " ", what, ": ", absl::StrJoin(head, "; "));
    if (v.size() > kShow) absl::StrAppend(&s, "; ... (", v.size() - kShow, " more)");
    return s;
  };
  std::vector<std::string> parts;
  if (!missing.empty()) parts.push_back(list(missing, "missing tensor(s)"));
  if (!unexpected.empty()) parts.push_back(list(unexpected, "unexpected tensor(s)"));
  if (!mismatched.empty()) parts.push_back(list(mismatched, "shape mismatch(es)"));
  return absl::InvalidArgumentError(absl::StrCat(source, ": checkpoint does not match ", config.architecture,
                                                 " config: ", absl::StrJoin(parts, " | ")));
}

}  // namespace strata
