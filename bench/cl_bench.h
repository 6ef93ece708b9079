#pragma once
// `strata bench cl`: the continual-learning benchmark (docs ALGORITHMS.md sections 6-7) as a
// library function, so both the `strata` CLI and the standalone `strata-bench` driver run it.
//
// For every method it trains the task order stage by stage from the same base model (one
// Trainer::Train per task), evaluates every task of the order after every stage (a[i][j] for all
// i, j, including tasks not trained yet) and the base model once (b_j), and reports the accuracy
// matrix, AA / BWT / FWT / forgetting (core/eval/metrics.h), the NLL of a reference text before and
// after, the trainable parameters, the adaptation state size (Method::ExportState tensor bytes) and
// the wall time. `mtl` (Method::joint()) trains all tasks at once in one Train call
// (steps × number of tasks) and is evaluated once at the end: its matrix is a single final row and
// only AA is reported. Output: an aligned text report on stdout, JSON (--json), optional gnuplot
// PNGs (--plots).
//
// Exit codes: 0 ok; 1 a method failed at run time (the others still run and are written; the JSON
// lists the failure under "failed"), or the JSON/plots could not be written; 2 bad input (unknown
// method, task directory or model, empty order, duplicate task, bad numbers).
//
// Thread safety: RunClBenchCommand sets the process-wide torch thread count; run one at a time.

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/adapt/recipe.h"

namespace CLI {
class App;
}  // namespace CLI

namespace strata::bench {

struct ClBenchArgs {
  std::string model_dir;             // HF model directory (config.json, model.safetensors, tokenizer.json)
  std::string tasks_dir;             // parent of the task directories named in `order`
  std::vector<std::string> order;    // task directory names (or paths containing '/'), in training order
  std::vector<std::string> methods;  // empty = every name in MethodNames(); "mtl_lora" = mtl with LoRA shape
  int64_t max_train = 0;             // per task, 0 = all (seeded sample, dataset.h)
  int64_t max_test = 0;              // per task, 0 = all
  // The training recipe: the server's defaults (core/adapt/recipe.h), so the benchmark measures
  // what the server runs. Method options come from the method registry (--k-max, --ella-lambda /
  // --lambda, ...; method_options holds the command line's, applied in RunClBenchCommand).
  // recipe.max_steps: optimizer steps per stage (0 = epochs); mtl: steps × tasks.
  TrainingRecipe recipe;
  std::vector<std::pair<std::string, std::string>> method_options;  // option name -> text
  int64_t warmup_steps = -1;  // >= 0: this many warmup steps instead of the recipe's warmup ratio
  int64_t router_layer = -1;  // automatic routing: feature layer (-1 = half; server default)
  int threads = 2;
  std::string device = "cpu";  // cpu, cuda or cuda:N (model, training and scoring)
  // Weight dtype: float32 or bfloat16 (on CUDA bf16 weights and activations; adapters, Share and the
  // optimizer stay float32; on CPU bf16 weights compute in float32). float16 on CUDA only.
  std::string dtype = "float32";
  std::string reference;         // reference text (default shared/data/lm/tinystories_val.txt)
  int64_t reference_texts = 64;  // first N stories (blank-line separated)
  std::string json_out;          // required by the CLI; empty = no JSON
  std::string plots_dir;         // empty = no plots
  bool quiet = false;            // no per-stage progress lines on stderr
};

// Registers the options above on `sub` (the caller owns `args` and sets the callback).
void AddClBenchOptions(CLI::App* sub, ClBenchArgs* args);

// Runs the benchmark; see the exit codes above.
int RunClBenchCommand(const ClBenchArgs& args);

// The default reference text (STRATA_SHARED_DIR/data/lm/tinystories_val.txt).
std::string DefaultReferenceText();

}  // namespace strata::bench
