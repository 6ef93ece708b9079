#pragma once
// `strata bench train`: training throughput per method and the cost of many learned tasks, as a
// library function (registered by the `strata` CLI and the standalone `strata-bench` driver).
//
// Part 1 (throughput): for each model (stories260K loaded from --model, and "110m", a random-init
// Llama config: hidden 768, 12 layers, 12 heads, intermediate 2048, vocab 32000, tied) and each
// method, Trainer::Train on random token ids (batch × seq tokens, every position after the first a
// target, fp32) for warmup + measured steps; it reports the steady-state step time, training
// tokens/s (forward + backward + optimizer step + the method's hooks and extra loss) and the
// achieved model GFLOP/s next to the measured fp32 GEMM GFLOP/s (a 1024³ torch::mm).
// Model FLOPs per step = (4·N + 2·min(P, N))·tokens, N = parameters in matmuls (every
// q/k/v/o/gate/up/down weight + lm_head), P = trainable parameters, tokens = batch × seq: forward
// 2N, input gradients 2N (they flow through every layer even with a frozen base), weight gradients 2
// per trainable parameter. That is 6·N for full fine-tuning (seq_ft, mtl full) and ≈ 4·N for
// adapter methods. Attention-score FLOPs and the adapters' own forward FLOPs are not counted. The
// GEMM rate is measured again right before each method, and the 1-minute load average is printed
// next to it, so contention on a shared machine is visible.
// The measured steps never merge: the run is cancelled after the last timed step.
//
// Part 2 (scaling, --scaling-method, default share_ella): the method's state is grown to t tasks
// (--scaling-tasks, default 1,10,50,100) by BeginTask / EndTask with random small factor values (no
// training); at each t it reports the step time of the next task's training (with the ELLA term),
// the time of the t-th merge (EndTask: Share basis update + W_past += ΔW + served weights), the
// adaptation state bytes (ExportState) and, for comparison, t × the bytes of one rank-r LoRA per
// task on the same target modules.
//
// Exit codes: 0 ok; 1 a measurement failed (reported; the others still run) or the JSON could not
// be written; 2 bad input. Sets the process-wide torch thread count.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace CLI {
class App;
}  // namespace CLI

namespace strata {
struct TrainTask;
class CausalLM;
}  // namespace strata

namespace strata::bench {

// Random-token training data: `rows` sequences of `seq` ids in [3, vocab), every position after the
// first a target (callers include core/adapt/trainer.h for TrainTask).
TrainTask RandomTrainTask(const std::string& name, int64_t rows, int64_t seq, int64_t vocab, uint64_t seed);

// The benchmarks' models: "stories260K" loaded from `model_dir`, or "110m" (Llama110mConfig, random
// init, seed 1234). INVALID_ARGUMENT for another name.
absl::StatusOr<std::unique_ptr<CausalLM>> LoadBenchModel(const std::string& name,
                                                         const std::string& model_dir);

struct TrainBenchArgs {
  std::string model_dir;  // stories260K (default: shared/models/stories260K)
  std::vector<std::string> models = {"stories260K", "110m"};
  std::vector<std::string> methods;  // empty = every name in MethodNames()
  int64_t batch_size = 8;
  int64_t seq_len = 256;
  int64_t warmup = 1;  // untimed steps (110m); stories260K uses max(warmup, 3)
  int64_t steps = 3;   // timed steps (110m); stories260K uses max(steps, 20)
  std::string targets = "all-linear";
  int64_t rank = 8;
  double lr = 1e-3;
  int threads = 2;
  int shards = 0;                             // TrainOptions::shards (0 = automatic)
  std::string scaling_method = "share_ella";  // "" = skip part 2
  std::string scaling_model = "110m";
  std::vector<int64_t> scaling_tasks = {1, 10, 50, 100};
  uint64_t seed = 0;
  std::string json_out;
};

void AddTrainBenchOptions(CLI::App* sub, TrainBenchArgs* args);
int RunTrainBenchCommand(const TrainBenchArgs& args);

}  // namespace strata::bench
