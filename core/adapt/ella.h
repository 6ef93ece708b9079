#pragma once
// ELLA: one aggregated update matrix per adapted linear layer (docs ALGORITHMS.md section 2).
//
// An EllaModule owns, for one target linear layer W0 ∈ R^{n×d}, W_past ∈ R^{n×d} (float32): the
// running sum of the merged task updates, plus its rms over all entries. Task t trains a fresh
// low-rank ΔW_t (LoraFactors below, or Share's factors in share_ella) with the extra loss
//   Penalty(ΔW_t) = λ ‖ΔW_t ⊙ Ŵ_past‖²_F,   Ŵ_past = W_past / rms(W_past)   (Ŵ = 0 when W_past = 0)
// whose gradient w.r.t. ΔW_t is 2λ ΔW_t ⊙ Ŵ_past². After the task, Merge(ΔW_t) adds the detached
// update to W_past; the served weights are W0 + W_past.
//
// W_past lives on one device (CPU unless To() moves it, e.g. next to the model during training).
// The ella and share_ella methods keep no EllaModule between tasks: the served weights hold
// W0 + W_past, and a task with λ > 0 builds one from W_served − W0 (FromPast) for its duration.
// Thread safety: const methods may run concurrently; Merge/To/assignment need exclusive access.
// Failures: absl::Status, INVALID_ARGUMENT naming the tensor/field (shape, non-finite values, bad
// state); a failed call leaves the module unchanged.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace strata {

struct EllaOptions {
  double lambda = 1.0;            // penalty weight λ (on the rms-normalised past); default to be tuned
  absl::Status Validate() const;  // INVALID_ARGUMENT unless λ is finite and >= 0
};

// A plain LoRA update ΔW = scale·b·a for one module and one task (float32, trainable).
// Init (PEFT convention): a ~ kaiming-uniform(a=√5) = U(±1/√d), b = 0, so step 0 changes nothing.
struct LoraFactors {
  at::Tensor a;        // [r, d]
  at::Tensor b;        // [n, r]
  double scale = 1.0;  // lora_alpha / r

  static LoraFactors Init(int64_t out_features, int64_t in_features, int64_t r, double lora_alpha,
                          uint64_t seed, at::Device device = at::Device(at::kCPU));
  std::vector<std::pair<std::string, at::Tensor>> NamedParameters() const;  // {"a", a}, {"b", b}
  std::vector<at::Tensor> Parameters() const;
  at::Tensor Delta() const;                       // [n, d] scale·b·a (differentiable)
  at::Tensor Forward(const at::Tensor& x) const;  // x [..., d] -> scale·(x aᵀ) bᵀ, in x's dtype
};

class EllaModule {
 public:
  // W_past = 0. INVALID_ARGUMENT for bad sizes or options.
  static absl::StatusOr<EllaModule> Create(int64_t out_features, int64_t in_features,
                                           const EllaOptions& options = {});

  // W_past = `w_past` [n, d] float32, kept as given (not copied; on its device), with
  // `num_merged` merged tasks: e.g. W_served − W0. INVALID_ARGUMENT on shape, dtype, non-finite
  // values, a negative count or bad options.
  static absl::StatusOr<EllaModule> FromPast(const at::Tensor& w_past, const EllaOptions& options,
                                             int64_t num_merged);

  int64_t out_features() const { return n_; }
  int64_t in_features() const { return d_; }
  const EllaOptions& options() const { return options_; }
  int64_t num_merged() const { return num_merged_; }
  const at::Tensor& w_past() const { return w_past_; }  // [n, d] float32
  double past_rms() const { return rms_; }              // sqrt(mean(W_past²)); 0 when W_past = 0
  at::Tensor NormalizedPast() const;                    // Ŵ_past [n, d] float32 (new tensor)

  // Moves W_past to `device` (kept there by later merges).
  void To(at::Device device);

  // λ‖ΔW ⊙ Ŵ_past‖²_F as a 0-dim tensor in delta's dtype on delta's device, differentiable w.r.t.
  // delta [n, d] (a shape mismatch is a programming error and throws c10::Error). Cost: two n×d
  // elementwise ops; W_past is copied per call only when it lives on another device. Exactly 0 (with
  // a zero gradient) while W_past = 0.
  at::Tensor Penalty(const at::Tensor& delta) const;

  // W_past += delta (detached; any dtype/device). INVALID_ARGUMENT on shape or non-finite values.
  absl::Status Merge(const at::Tensor& delta);

  // W0 + W_past, computed in float32 and returned in w0's dtype on w0's device.
  absl::StatusOr<at::Tensor> ServedWeight(const at::Tensor& w0) const;

  // State: tensor "<prefix>w_past" (CPU float32) plus a small JSON config (sizes, λ, num_merged).
  void ExportState(const std::string& prefix, std::map<std::string, at::Tensor>* tensors) const;
  std::string ConfigJson() const;
  // Inverse of the two above; copies the tensor onto the CPU.
  static absl::StatusOr<EllaModule> ImportState(const std::string& config_json, const std::string& prefix,
                                                const std::map<std::string, at::Tensor>& tensors);

 private:
  EllaModule() = default;
  void UpdateRms();

  int64_t n_ = 0;
  int64_t d_ = 0;
  EllaOptions options_;
  int64_t num_merged_ = 0;
  at::Tensor w_past_;
  double rms_ = 0.0;
};

}  // namespace strata
