#pragma once
// The continual-adaptation Method interface (docs ALGORITHMS.md sections 0-3, 6) and its factory.
//
// A Method owns the continual state of one adaptation run (LoRA factors, Share subspaces, ELLA
// aggregates, fine-tuned weights) and knows how to
//   * start a task on a working model: attach side paths (LinearLayer::adapter) or put fresh
//     trainable tensors into weight slots (BeginTask),
//   * expose the trainable tensors, an extra loss term and per-step hooks to the Trainer,
//   * end the task: merge the update into its state and install the served weights W0 + W_past
//     into the working model's LinearLayer weights, with no adapters left (EndTask),
//   * rebuild the served weights on a base model after a restart (ApplyServedWeights), optionally
//     route a base model to one task's weights (ApplyTaskRouting),
//   * export/import its state as named tensors + a JSON config.
//
// Transactions: everything a task changes is pending until EndTask(). AbortTask() (cancellation,
// non-finite loss, any error) drops the pending task and leaves the committed state exactly as it
// was. Methods never modify tensors in place that the served model or the committed state share:
// BeginTask replaces weight slots of the working copy by new tensors and EndTask installs new ones.
//
// Methods register themselves (MethodRegistrar below; MethodNames() lists them): share_ella
// (default), share, ella, seq_lora, inc_lora, o_lora, seq_ft, mtl, osft, pm. Later methods (OSFT,
// Perturb-and-Merge) plug in through the hooks below without trainer changes: BeforeForward (P&M: rescale the
// active branch by 1 ± ε), BeforeOptimizerStep (OSFT: project gradients), AfterOptimizerStep (OSFT: project
// the applied update), AfterTraining (P&M: Fisher pass through TaskContext::for_each_batch).
//
// Thread safety: a Method is used by one trainer at a time (thread-compatible). Const methods may
// run concurrently with each other. Failures are absl::Status naming the method, task, module or
// tensor; c10::Error from torch is never thrown out of the public non-hook methods.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/adapt/method_config.h"
#include "core/model/model.h"

namespace strata {

struct PeftLoraAdapter;

// The full HF names of the linear layers of `model` selected by `targets` (layer order).
// INVALID_ARGUMENT when a target matches nothing (the message lists the valid short names).
absl::StatusOr<std::vector<std::string>> ResolveTargetModules(const CausalLM& model,
                                                              const std::vector<std::string>& targets);

// Serialised method state: tensors (CPU, contiguous) + JSON ({"format", "method", "config",
// "tasks", "modules", "extra"}).
struct MethodState {
  std::string method;
  std::string config_json;
  std::map<std::string, at::Tensor> tensors;
};

// Passed to the per-step hooks.
struct StepContext {
  int64_t step = 0;  // 0-based index of the current step
  int64_t total_steps = 0;
  int64_t epoch = 0;  // 0-based
  double learning_rate = 0;
  CausalLM* model = nullptr;       // the working model
  std::mt19937_64* rng = nullptr;  // seeded from TrainOptions::seed; for randomised hooks
  at::Tensor loss;                 // BeforeOptimizerStep / AfterOptimizerStep: this step's total loss
};

// One batch's loss on the working model: the task loss (mean CE over target tokens) with its graph
// attached (call backward() or torch::autograd::grad), and the batch's target-token count.
using BatchLossCallback = std::function<absl::Status(const at::Tensor& loss, int64_t target_tokens)>;

// Passed to AfterTraining (after the last optimizer step, before EndTask).
struct TaskContext {
  std::string task_name;
  CausalLM* model = nullptr;  // the working model, adapters still attached
  int64_t steps = 0;          // optimizer steps taken
  // Runs `callback` on consecutive batches of the task's training data in file order (no
  // shuffling), `batch_size` rows each (<= 0: the training batch size), at most `max_batches`
  // (<= 0: all). Stops at the first non-OK status, which it returns. Grad mode is on.
  std::function<absl::Status(int64_t batch_size, int64_t max_batches, const BatchLossCallback&)>
      for_each_batch;
};

class Method {
 public:
  virtual ~Method() = default;
  Method(const Method&) = delete;
  Method& operator=(const Method&) = delete;

  virtual std::string name() const = 0;
  const MethodConfig& config() const { return config_; }
  // Merged (committed) tasks, in order.
  const std::vector<std::string>& tasks() const { return tasks_; }
  int64_t num_tasks() const { return static_cast<int64_t>(tasks_.size()); }
  // Resolved target modules (empty until the first task or an import).
  const std::vector<std::string>& modules() const { return modules_; }
  bool task_active() const { return active_; }
  // Changes the options that may differ from task to task (MethodOption::per_task: the ELLA
  // penalty weight, P&M's perturbation size) to `config`'s. FAILED_PRECONDITION while a task is
  // active; INVALID_ARGUMENT naming the field when `config` differs in an option that shapes the
  // state (those are fixed: the committed state was built with them) or holds a bad value.
  absl::Status SetTaskConfig(const MethodConfig& config);
  const std::string& active_task() const { return active_task_; }

  // Whether the trainer may pass several tasks' data at once (joint, task-balanced training: mtl).
  virtual bool joint() const { return false; }

  // ---- one task -------------------------------------------------------------------------------
  // Starts `task_name` on `model`: the trainer's working copy (ShallowCopy of the served model,
  // whose target weights are W0 + W_past). FAILED_PRECONDITION if a task is active,
  // ALREADY_EXISTS for a task name already merged, INVALID_ARGUMENT for unknown target modules or
  // shapes that differ from the committed state.
  absl::Status BeginTask(const std::string& task_name, CausalLM* model);
  // The tensors to optimise (leaves with requires_grad), with names for logs/tests. Valid between
  // BeginTask and EndTask/AbortTask.
  virtual std::vector<std::pair<std::string, at::Tensor>> TrainableParameters() const = 0;
  // The method's extra loss term for this step (ELLA penalty, O-LoRA orthogonality), a 0-dim
  // tensor with autograd, or undefined when there is none. Called once per step after forward.
  virtual at::Tensor ExtraLoss() { return at::Tensor(); }
  // Hooks (default: nothing). BeforeForward runs before the step's forward pass,
  // BeforeOptimizerStep after backward (gradients available, before clipping), AfterOptimizerStep
  // after optimizer.step(). During training the trainer keeps the trainable tensors and their
  // .grad as views of flat optimizer buffers: hooks must change values and gradients in place
  // (p.grad().copy_(projected), p.sub_(...) under NoGradGuard), never re-point them (set_data,
  // assigning p.mutable_grad()).
  virtual void BeforeForward(StepContext& ctx) {}
  virtual void BeforeOptimizerStep(StepContext& ctx) {}
  virtual void AfterOptimizerStep(StepContext& ctx) {}
  // After the last step, before EndTask (e.g. a Fisher pass). A non-OK status aborts the task.
  virtual absl::Status AfterTraining(TaskContext& ctx) { return absl::OkStatus(); }
  // Merges the pending task (the "merge": W_past += ΔW_t, basis update, ...), installs the served
  // weights into `model`'s LinearLayer weights (new tensors) and removes every adapter. On error
  // the task is aborted and the committed state is unchanged.
  absl::Status EndTask(CausalLM* model);
  // Drops the pending task (committed state unchanged); removes adapters from `model` if given.
  // The caller discards the working model. No-op when no task is active.
  void AbortTask(CausalLM* model);

  // ---- serving --------------------------------------------------------------------------------
  // Installs the served weights on `base`, a model holding the base weights W0 (e.g. a fresh
  // ShallowCopy of the loaded checkpoint): W0 + W_past for the committed tasks (the state of a
  // method with no task leaves `base` unchanged). INVALID_ARGUMENT on missing modules/shapes.
  virtual absl::Status ApplyServedWeights(CausalLM* base) const = 0;
  virtual bool SupportsTaskRouting() const { return false; }
  // Routes `base` (holding W0) to task `task`, the i-th merged task: attaches a frozen low-rank side
  // path that gives the model as of that task, W0 + Σ_{j ≤ i} ΔW_j (task i trained on top of the
  // earlier tasks' merged updates, so its own ΔW_i on W0 alone is not the model it learned; later
  // tasks are left out, so they cannot make it forget). Share builds it from the subspace (rank k,
  // whatever i is); inc_lora/o_lora from the stored LoRAs (rank r·i). NOT_FOUND for an unknown
  // task, UNIMPLEMENTED when unsupported.
  virtual absl::Status ApplyTaskRouting(const std::string& task, CausalLM* base) const;

  // ---- import ---------------------------------------------------------------------------------
  // Merges an existing PEFT LoRA adapter as the committed task `task` without gradient steps (Share:
  // into the subspace; ELLA: into W_past). `base` (holding W0) resolves the target modules when the
  // state has none yet. Every adapter module must be a target module. UNIMPLEMENTED for methods
  // without a subspace; FAILED_PRECONDITION while a task is active; ALREADY_EXISTS for a known task.
  // All or nothing.
  virtual absl::Status ImportPeftAdapter(const std::string& task, const PeftLoraAdapter& adapter,
                                         const CausalLM& base);

  // ---- state ----------------------------------------------------------------------------------
  // FAILED_PRECONDITION while a task is active. Tensors are CPU and contiguous (they may share
  // storage with the method's own immutable tensors).
  absl::StatusOr<MethodState> ExportState() const;
  // Replaces the committed state (config included) by `state`; the method name must match.
  // All or nothing: on error the method is unchanged.
  absl::Status ImportState(const MethodState& state);

 protected:
  explicit Method(MethodConfig config) : config_(std::move(config)) {}

  // Called by BeginTask with modules() resolved and checked; task_index = num_tasks().
  virtual absl::Status DoBeginTask(const std::string& task_name, CausalLM* model) = 0;
  // Must either fully commit or return an error without changing the committed state.
  virtual absl::Status DoEndTask(const std::string& task_name, CausalLM* model) = 0;
  virtual void DoAbortTask() = 0;
  // Method-specific state: tensors, and a JSON object (as text; "{}" when there is nothing) stored
  // under "extra" in the state's config.
  virtual void ExportTensors(std::map<std::string, at::Tensor>* tensors, std::string* extra_json) const = 0;
  // Rebuilds the committed state from an export. config(), tasks(), modules() and module_shapes_
  // already hold the imported values when this runs. Must not change the method-specific state on
  // error (build into locals, then swap).
  virtual absl::Status ImportTensors(const std::map<std::string, at::Tensor>& tensors,
                                     const std::string& extra_json) = 0;
  // Whether the method adapts LinearLayers (needs modules()); false for full fine-tuning.
  virtual bool uses_modules() const { return true; }

  MethodConfig config_;
  std::vector<std::string> tasks_;
  std::vector<std::string> modules_;
  // [out, in] shapes of modules_ (recorded at the first task; checked later).
  std::vector<std::pair<int64_t, int64_t>> module_shapes_;

 private:
  bool active_ = false;
  std::string active_task_;
};

// The factory of a registered method.
using MethodFactory = std::function<std::unique_ptr<Method>(const MethodConfig& config)>;

// Registers a method from its own file, during static initialisation:
//
//   MethodDescriptor FooDescriptor() { MethodDescriptor d; d.name = "foo"; ...; return d; }
//   const MethodRegistrar kRegisterFoo(FooDescriptor(), [](const MethodConfig& c) {
//     return std::unique_ptr<Method>(new FooMethod(c)); }, FooOptions());
//
// (docs/DEVELOPING.md). The library holding the methods is linked whole (CMake WHOLE_ARCHIVE), so
// every registrar runs in every binary that links strata_core_adapt.
class MethodRegistrar {
 public:
  MethodRegistrar(const MethodDescriptor& method, MethodFactory factory,
                  const std::vector<MethodOption>& options = {});
};

// The method `name` with `config` (validated). INVALID_ARGUMENT for an unknown name, listing the
// valid ones, or for a bad config.
absl::StatusOr<std::unique_ptr<Method>> CreateMethod(const std::string& name,
                                                     const MethodConfig& config = {});
// CreateMethod(state.method, config from state) + ImportState(state).
absl::StatusOr<std::unique_ptr<Method>> CreateMethodFromState(const MethodState& state);

// UNIMPLEMENTED "method <method> cannot import LoRA adapters ...; use share or share_ella" (the
// registered methods with adapter import).
absl::Status AdapterImportUnsupported(const std::string& method);

// ---- helpers for method implementations -----------------------------------------------------------
// Replaces `layer`'s weight by weight + delta (a new tensor in the weight's dtype; no autograd).
void AddToWeight(LinearLayer* layer, const at::Tensor& delta);
// "[n, d]" ("undefined" for an undefined tensor), for error messages.
std::string ShapeString(const at::Tensor& t);

}  // namespace strata
