#pragma once
// `strata bench memory`: the memory planner (bench/memory_plan.h) as a command, and an optional
// measurement of one method's real training steps on a CPU config to check the plan.
//
//   strata bench memory --config DIR|llama-8b|mistral-7b|qwen2-7b|110m [--dtype bfloat16]
//       [--device cuda|cpu] [--batch-size 8] [--seq-len 256] [--targets all-linear] [--rank 8]
//       [--tasks 100] [--lambda 0] [--methods m1,m2] [--json FILE]
//       [--measure --methods ONE [--steps 2] [--threads 2]]
//
// The plan needs only config.json. --measure (CPU, float32 or bfloat16 weights; --config a model
// directory or 110m, the random-init benchmark config) loads the model, records the resident set
// (VmRSS), resets the peak (VmHWM) and trains the method for --steps steps on random tokens
// (batch × seq, every position a target), then prints the measured peak above the baseline next to
// the plan's training peak. One method per process, so the allocator's cached pages of an earlier
// run cannot hide a later one's peak.
//
// Exit codes: 0 ok; 1 a measurement failed or the JSON could not be written; 2 bad input.

#include <cstdint>
#include <string>
#include <vector>

namespace CLI {
class App;
}  // namespace CLI

namespace strata::bench {

struct MemoryBenchArgs {
  std::string config = "llama-8b";
  std::string dtype;  // default: bfloat16 on cuda, float32 on cpu
  std::string device = "cuda";
  int64_t batch_size = 8;
  int64_t seq_len = 256;
  std::string targets = "all-linear";
  int64_t rank = 8;
  int64_t k_max = 32;
  int64_t tasks = 100;
  double lambda = 0.0;
  std::vector<std::string> methods;
  bool measure = false;
  int64_t steps = 2;
  int threads = 2;
  std::string json_out;
};

void AddMemoryBenchOptions(CLI::App* sub, MemoryBenchArgs* args);
int RunMemoryBenchCommand(const MemoryBenchArgs& args);

}  // namespace strata::bench
