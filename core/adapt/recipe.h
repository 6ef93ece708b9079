#pragma once
// The training recipe: everything that decides how a task is learned (method, method options,
// optimiser schedule, steps, sequence length, seed), with its defaults, validation and JSON in one
// place. The server's flags, the engine, `strata bench cl/train` and a task's overrides all build
// one, so the server runs exactly what the benchmark measured. Torch-free.
//
// A task's effective recipe (ResolveTaskRecipe) is the server's recipe with the task's overrides
// applied, checked against the adaptation state it will join: the options that shape the state
// (rank, alpha, targets, the method's own) are fixed once the first task is learned; the per-task
// ones (learning rate, steps, ELLA λ, ...) may change every task. The server checks this when a
// task is submitted, before a job id is returned, and again when the job runs.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/adapt/method_config.h"

namespace strata {

// The warmup every task trains with by default: 5 % of the steps (measured on cl-small: routed AA
// 0.914 with it, 0.899 without; docs/benchmarks.md).
inline constexpr double kDefaultWarmupRatio = 0.05;

struct TrainingRecipe {
  std::string method = kDefaultMethod;
  MethodConfig method_config;
  double learning_rate = 5e-3;
  int64_t max_steps = 300;  // > 0: exactly this many optimizer steps; 0: epochs
  int64_t epochs = 1;
  int64_t batch_size = 16;
  int64_t max_seq_len = 256;  // tokens per training / scoring sequence (longer examples are refused)
  double warmup_ratio = kDefaultWarmupRatio;  // fraction of the steps
  int64_t warmup_steps = 0;                   // > 0 wins over warmup_ratio
  std::string lr_schedule = "linear";         // linear, cosine or constant (after warmup)
  uint64_t seed = 0;                          // batch order; also the adapter initialisation of a new state

  // Sets the rank r and Share's pseudo-rank p together (they are one setting for users).
  void SetRank(int64_t rank) {
    method_config.rank = rank;
    method_config.p = rank;
  }
};

// A task's overrides of the recipe (unset = the server's recipe).
struct TrainOverrides {
  std::optional<double> learning_rate;
  std::optional<int32_t> max_steps;
  std::optional<int32_t> epochs;
  std::optional<int32_t> batch_size;
  std::optional<int32_t> rank;
  std::optional<double> alpha;
  std::optional<double> ella_lambda;
  std::optional<int32_t> seed;
  std::optional<int32_t> max_seq_len;
};

// INVALID_ARGUMENT "overrides.<field>: <why>" for a value no task may use (non-finite, out of range).
absl::Status ValidateOverrides(const TrainOverrides& overrides);

// INVALID_ARGUMENT naming the field ("recipe: learning_rate must be finite and > 0, got inf", or
// the method config's message).
absl::Status ValidateRecipe(const TrainingRecipe& recipe);

// The adaptation state a task joins.
struct CommittedState {
  std::string method;   // the state's method
  int64_t tasks = 0;    // tasks learned (0: the state is still empty)
  MethodConfig config;  // the state's method config (ignored while tasks == 0)
};

// The recipe task `requested_method` (empty = the state's) trains with: `defaults` with
// `overrides` applied. While the state is empty its method config comes from the defaults with the
// overrides of rank/alpha/λ; afterwards it is the state's config with only the per-task options
// (λ from the overrides or the defaults, the defaults' other per-task options) changed.
// INVALID_ARGUMENT for a bad or non-finite value (naming "overrides.<field>"), FAILED_PRECONDITION
// for a method other than the state's or a state-shaping override that differs from the state.
absl::StatusOr<TrainingRecipe> ResolveTaskRecipe(const TrainingRecipe& defaults,
                                                 absl::string_view requested_method,
                                                 const TrainOverrides& overrides,
                                                 const CommittedState& state);

// {"method", "method_config": {...}, "learning_rate", ...}: logged at start and written by the
// benchmarks next to their results.
std::string RecipeToJson(const TrainingRecipe& recipe);
// The inverse of RecipeToJson (missing fields keep their defaults); INVALID_ARGUMENT naming an
// unknown field, a wrong type or a value ValidateRecipe refuses.
absl::StatusOr<TrainingRecipe> RecipeFromJson(absl::string_view json);

}  // namespace strata
