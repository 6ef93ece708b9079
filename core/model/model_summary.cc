#include "core/model/model_summary.h"

#include <c10/core/ScalarType.h>

#include "core/model/model.h"

namespace strata {

ModelSummary SummarizeModel(const CausalLM& model, const std::string& name, const std::string& path) {
  ModelSummary s;
  s.loaded = true;
  s.name = name;
  s.path = path;
  const ModelConfig& c = model.config();
  s.architecture = c.architecture;
  s.parameter_count = model.ParameterCount();
  s.hidden_size = c.hidden_size;
  s.num_layers = c.num_hidden_layers;
  s.vocab_size = c.vocab_size;
  s.dtype = model.dtype() == c10::ScalarType::BFloat16 ? "bfloat16" : "float32";
  s.device = model.device().str();
  return s;
}

}  // namespace strata
