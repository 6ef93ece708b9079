#pragma once
// `strata bench dp`: data-parallel scaling of one task's training (core/adapt/data_parallel.h).
//
// For each model (stories260K from --model, "110m" a random-init Llama config) it trains the same
// task (random token ids, batch × seq, --method with rank --rank on --targets, no merge) three
// ways and reports steps/s and training tokens/s after --warmup untimed steps:
//   1 rank × 1 thread, 1 rank × --threads threads, and --ranks ranks × (--threads / ranks) threads,
// the ranks being threads of this process, each with its own copy of the model, summing gradients
// through a real c10d ProcessGroupGloo on 127.0.0.1 (rendezvous through a c10d FileStore in a
// temporary directory; nothing listens on the network). Every configuration runs the same global
// batch, so their losses agree (printed as a check).
// On a machine with fewer cores than ranks × threads the ranks compete for the same cores: the
// table then shows the cost of the gradient sums and the gain of data over intra-op parallelism
// for small matrices, not multi-GPU scaling.
//
// Exit codes: 0 ok; 1 a run failed or the JSON could not be written; 2 bad input.

#include <cstdint>
#include <string>
#include <vector>

namespace CLI {
class App;
}  // namespace CLI

namespace strata::bench {

struct DpBenchArgs {
  std::string model_dir;  // stories260K (default: shared/models/stories260K)
  std::vector<std::string> models = {"stories260K"};
  std::string method = "share_ella";
  int64_t batch_size = 16;
  int64_t seq_len = 256;
  int64_t warmup = 3;
  int64_t steps = 20;
  std::string targets = "all-linear";
  int64_t rank = 8;
  int ranks = 2;
  int threads = 2;
  std::string json_out;
};

void AddDpBenchOptions(CLI::App* sub, DpBenchArgs* args);
int RunDpBenchCommand(const DpBenchArgs& args);

}  // namespace strata::bench
