#pragma once
// A torch-free description of a loaded model, for server info and logs.

#include <cstdint>
#include <string>

namespace strata {

class CausalLM;

struct ModelSummary {
  bool loaded = false;
  std::string name;  // directory base name or "embedded-default"
  std::string path;  // empty for the embedded default
  std::string architecture;
  int64_t parameter_count = 0;
  int64_t hidden_size = 0;
  int64_t num_layers = 0;
  int64_t vocab_size = 0;
  std::string dtype;
  std::string device;
};

ModelSummary SummarizeModel(const CausalLM& model, const std::string& name, const std::string& path);

}  // namespace strata
