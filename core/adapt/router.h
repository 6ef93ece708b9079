#pragma once
// Automatic task routing (docs ALGORITHMS.md section 9): which learned task a prompt belongs to,
// decided from the base model's view of the prompt, with no example kept.
//
// Features: the base model W0's residual stream after `layer` decoder layers (CausalLM::
// HiddenStates), averaged over the prompt's tokens, the prompt encoded exactly as Generate encodes
// it (EncodePrompt; the last kMaxRouterTokens tokens of a longer prompt). The mean, not the last
// token's state: on cl-small the last token's state sent 6-12 % of capitals and iso3 prompts
// ("The capital of X is" / "The three-letter code of X is") to the wrong task, the mean none
// (docs/benchmarks.md, "Automatic routing").
//
// State, learned at the end of each task from its training prompts (nothing is kept afterwards):
//   per task t: mean μ_t [H] (float32), count n_t, threshold τ_t (a squared distance);
//   shared: within-task scatter S = Σ_t Σ_{x ∈ t} (x − μ_t)(x − μ_t)ᵀ [H, H] (float64), N = Σ_t n_t.
// Rule (LDA with a shared, shrunk covariance and equal priors):
//   Σ = S / max(N − T, 1),  Σ_γ = (1 − γ) Σ + γ (tr Σ / H) I,  D²_t(x) = (x − μ_t)ᵀ Σ_γ⁻¹ (x − μ_t).
//   The nearest task t* = argmin_t D²_t(x) is chosen when D²_t*(x) ≤ τ_t*; otherwise the prompt
//   belongs to no task (the server then serves the base model W0, or the merged weights by flag).
// Calibration of τ_t (out-of-distribution rule): AddTask holds out every `holdout_every`-th training
// prompt, fits μ_t and the scatter on the rest, and sets τ_t = margin · (q-quantile of D²_t over
// the held-out prompts); the held-out prompts are then added to μ_t and S. The task's eval split is
// not used, so router accuracy measured on it is unbiased.
// Confidence: for a task, its LDA posterior softmax_t(−D²_t / 2); for no task, 1 − τ_t*/D²_t*
// (0 at the boundary, towards 1 far outside every task).
// Size: H floats + 3 numbers per task (StateBytesPerTask); the H×H scatter is shared (constant in t).
//
// Thread safety: const methods may run concurrently; AddTask / ImportState / assignment need
// exclusive access. Failures: absl::Status naming the field or tensor; INVALID_ARGUMENT for bad
// shapes or options, ALREADY_EXISTS for a known task name.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/data/example.h"

namespace strata {

class CausalLM;
class Method;
class Tokenizer;

inline constexpr int64_t kMaxRouterTokens = 256;

struct RouterOptions {
  int64_t layer = -1;         // decoder layers run for the feature; -1 = (layers + 1) / 2
  double shrinkage = 0.1;     // γ, in [0, 1]
  double quantile = 0.99;     // q of the held-out distances, in (0, 1]
  double margin = 2.0;        // τ = margin · quantile, >= 1 (chosen on cl-small: docs/benchmarks.md)
  int64_t holdout_every = 5;  // every k-th training prompt calibrates τ (k >= 2)
  absl::Status Validate() const;
  // The layer used for a model with `num_layers` decoder layers.
  int64_t ResolvedLayer(int64_t num_layers) const;
};

struct RouteDecision {
  int64_t task_index = -1;  // into TaskNames(); -1 = no task fits
  std::string task;         // empty when no task fits
  double distance = 0;      // D² to the nearest task
  double threshold = 0;     // τ of the nearest task
  std::string nearest;      // the nearest task, even when it does not fit
  double confidence = 0;    // see the header comment
};

// What the router sees of an example: its prompt (a text example: the text itself).
inline std::string RouterPrompt(const Example& e) { return e.kind == ExampleKind::kText ? e.text : e.prompt; }

// Where a decision points in a RouteModels() list: 0 when no task fits, 1 + task_index otherwise.
inline size_t RouteSlot(const RouteDecision& d) {
  return d.task_index < 0 ? 0 : static_cast<size_t>(d.task_index) + 1;
}

class TaskRouter;

// The models routing decisions select from, for `method`'s committed state: [0] `unmatched` (what a
// prompt that fits no task gets: the base model, or the merged weights); [1 + k] for the router's
// k-th task, the model as of that task (Method::ApplyTaskRouting on a copy of `base`) or, when the
// method keeps no per-task weights or does not know the task, `merged`. Index with RouteSlot().
absl::StatusOr<std::vector<std::shared_ptr<const CausalLM>>> RouteModels(
    const CausalLM& base, const Method& method, const TaskRouter& router,
    std::shared_ptr<const CausalLM> unmatched, std::shared_ptr<const CausalLM> merged);

class TaskRouter {
 public:
  TaskRouter() = default;
  explicit TaskRouter(RouterOptions options) : options_(options) {}

  const RouterOptions& options() const { return options_; }
  int64_t num_tasks() const { return static_cast<int64_t>(tasks_.size()); }
  bool empty() const { return tasks_.empty(); }
  std::vector<std::string> TaskNames() const;
  bool HasTask(const std::string& name) const;
  // The feature layer for `model` (options().ResolvedLayer, or the layer stored with the state).
  int64_t FeatureLayer(const CausalLM& model) const;

  // Features of `prompts` on `base` at FeatureLayer(base): [prompts.size(), H] float32 on CPU.
  // Runs under InferenceMode in batches of `batch_size`.
  absl::StatusOr<at::Tensor> Features(const CausalLM& base, const Tokenizer& tokenizer,
                                      const std::vector<std::string>& prompts, int64_t batch_size = 16) const;

  // Adds task `name` from the features of its training prompts ([n, H], n >= 2) taken at decoder
  // layer `layer` (FeatureLayer(base); the first task fixes it, later tasks must match). All or
  // nothing.
  absl::Status AddTask(const std::string& name, const at::Tensor& features, int64_t layer);

  // One decision per row of `features` ([B, H]). An empty router decides "no task" for every row.
  std::vector<RouteDecision> Route(const at::Tensor& features) const;

  int64_t StateBytes() const;         // everything Export writes
  int64_t StateBytesPerTask() const;  // what one more task adds
  int64_t hidden_size() const { return hidden_; }

  // State: tensors "<prefix>means" [T, H] float32 and "<prefix>scatter" [H, H] float64, plus JSON
  // (options, layer, hidden size, per-task name / count / threshold). An empty router exports "{}"
  // and no tensors.
  void ExportState(const std::string& prefix, std::map<std::string, at::Tensor>* tensors,
                   std::string* json) const;
  static absl::StatusOr<TaskRouter> ImportState(const std::string& json, const std::string& prefix,
                                                const std::map<std::string, at::Tensor>& tensors);

 private:
  struct TaskEntry {
    std::string name;
    int64_t count = 0;
    double threshold = 0;
  };
  // Σ_γ⁻¹ as a whitening matrix W (Wᵀ W = Σ_γ⁻¹) and the whitened means, from means_ / scatter_.
  absl::Status Rebuild();
  static at::Tensor Whitening(const at::Tensor& scatter, int64_t dof, int64_t hidden, double shrinkage);

  RouterOptions options_;
  int64_t layer_ = -1;  // fixed by the first task (-1 until then)
  int64_t hidden_ = 0;
  std::vector<TaskEntry> tasks_;
  at::Tensor means_;    // [T, H] float32
  at::Tensor scatter_;  // [H, H] float64
  // Derived (not exported).
  at::Tensor whiten_;          // [H, H] float64
  at::Tensor whitened_means_;  // [T, H] float64
};

}  // namespace strata
