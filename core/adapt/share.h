#pragma once
// Share: one shared low-rank subspace per adapted linear layer (docs ALGORITHMS.md section 1).
//
// A ShareModule owns, for one target linear layer W0 ∈ R^{n×d} (n outputs, d inputs):
//   beta  β ∈ R^{n×kβ}, alpha α ∈ R^{d×kα}   column-orthonormal bases (float32, CPU)
//   G_β = Σ_i Eβ_i Eβ_iᵀ = Eβ Eβᵀ (kβ×kβ), G_α likewise: not stored, derived (float64) from the
//   stacked coefficients when a merge needs it (O(k²·Σ r_i) flops, like the re-projection below)
//   per task i (name, rank r_i): Eβ_i ∈ R^{kβ×r_i}, Eα_i ∈ R^{kα×r_i}, stored stacked column-wise
//   in e_beta (kβ × Σ r_i) and e_alpha (kα × Σ r_i) (float32, CPU).
// Task i's adapter: B_i = β Eβ_i (n×r_i), A_i = (α Eα_i)ᵀ (r_i×d), ΔW_i = s·B_i A_i, s = lora_alpha/p.
// The two sides keep their own rank (kβ and kα are chosen independently by the energy rule).
//
// Life cycle of a task (what a Method does per module):
//   ShareTaskFactors f = module.BeginTask(seed, device);  // trainable tensors, step 0 = served model
//   ... optimise f.Parameters() on loss(f.Forward(x) side path) ...
//   module.Merge("task-name", f);                         // basis update, f becomes stale
//   module.TaskDelta("task-name") / TaskB / TaskA          // one task's update, any time later
//   module.CumulativeFactors("task-name")                   // task-routed weights (tasks up to it)
//
// Merge (per side; B side shown, A side identical with α and A_tᵀ):
//   M = [β Eβ_1 … β Eβ_{t−1} | B_t]. With X = [β | B_t] = Q R (Householder QR, float64) and
//   D = blockdiag(G_β, I_r): M Mᵀ = Q (R D Rᵀ) Qᵀ, so the left singular vectors of M are Q·V where
//   R D Rᵀ = V Λ Vᵀ ((kβ+r)-dim eigenproblem). β' = Q V_k with k = smallest rank whose eigenvalues
//   reach energy_threshold·‖M‖²_F (= trace Λ), capped at k_max; numerically-zero directions
//   (λ ≤ 1e-10·‖M‖²_F) are never kept. Coefficients: Eβ_i ← V_kᵀ R[:, :kβ] Eβ_i (= β'ᵀ β Eβ_i) and
//   Eβ_t ← V_kᵀ R[:, kβ:] (= β'ᵀ B_t, the effective factor including temporary vectors);
//   so the new G_β = T G_β Tᵀ + Eβ_t Eβ_tᵀ (T = V_kᵀ R[:, :kβ]) is again Eβ Eβᵀ of the new
//   coefficients (= Λ_k, diagonal, up to round-off), which is why it need not be stored.
// Cost: QR of n×(kβ+r) and d×(kα+r), a (k+r)² eigenproblem and k×k algebra: independent of t. The
// re-projection of the stored coefficients is done eagerly with one (k×k)·(k×Σr_i) GEMM per side, and
// G = E Eᵀ is derived with one more; each is O(k²·Σr_i) flops (≈ 0.8 MFLOP at t = 100, k = 32, p = 8),
// far below the QR for any real layer, so measured merge time is flat in t (see share_test.cc
// MergeCostAndStateSizeDoNotGrow).
// Eager re-projection keeps every read (TaskDelta, export) O(1) and the stored state self-contained.
//
// Thread safety: const methods may run concurrently; Merge*/assignment need exclusive access.
// Copying a ShareModule is cheap and yields an independent module: copies share tensor storage, but
// no method ever writes into an existing tensor (merges assign new ones).
// Failures: absl::Status; INVALID_ARGUMENT (shapes, non-finite values, bad options or state,
// naming the tensor/field), ALREADY_EXISTS (task name taken), NOT_FOUND (unknown task),
// FAILED_PRECONDITION (factors created before the last merge). A failed call leaves the module
// unchanged.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace strata {

struct ShareOptions {
  int64_t k_max = 32;               // cap on the subspace rank per side
  int64_t p = 8;                    // pseudo-rank of each trained task (LoRA rank r = p)
  int64_t phi = 2;                  // temporary basis vectors per side (p is used while k = 0)
  double lora_alpha = 16.0;         // LoRA scale s = lora_alpha / p
  double energy_threshold = 0.999;  // explained-energy fraction of ‖M‖²_F, in (0, 1]

  double scale() const { return lora_alpha / static_cast<double>(p); }
  // INVALID_ARGUMENT naming the field when out of range.
  absl::Status Validate() const;
};

// The trainable tensors of one module for one task (all float32, on the device given to BeginTask).
//   B_t  = β Eβ_t + Rβ1 Rβ2   (n×p)       A_tᵀ = α Eα_t + Rα1 Rα2   (d×p)
// Init (LoRA convention): B_t = 0 (Eβ_t = 0, Rβ2 = 0, Rβ1 orthonormal columns orthogonal to β) and
// A_t = A0 projected on span(α) ⊕ span(Rα1), where A0 ~ kaiming-uniform(a=√5), i.e. U(±1/√d) as
// PEFT's lora_A, Eα_t = αᵀA0ᵀ, Rα1 = orthonormal top-φ directions of the residual (I − ααᵀ)A0ᵀ,
// Rα2 = Rα1ᵀ·residual. On a side whose basis is still empty (k = 0, the first task) φ = p and the
// side is an ordinary LoRA factor: Rβ1 = B (zeros) resp. Rα1 = A0ᵀ are trained, Rβ2 = Rα2 = I_p are
// frozen and Eβ_t/Eα_t are empty, so task 1 is exactly a rank-p LoRA (B = Rβ1, A = Rα1ᵀ).
// Step 0 therefore reproduces the served model: Forward(x) = 0.
struct ShareTaskFactors {
  at::Tensor beta;            // [n, kβ]  frozen snapshot of the basis
  at::Tensor alpha;           // [d, kα]  frozen snapshot of the basis
  at::Tensor e_beta;          // [kβ, p]
  at::Tensor e_alpha;         // [kα, p]
  at::Tensor r_beta1;         // [n, φβ]
  at::Tensor r_beta2;         // [φβ, p]
  at::Tensor r_alpha1;        // [d, φα]
  at::Tensor r_alpha2;        // [φα, p]
  double scale = 1.0;         // s = lora_alpha / p
  int64_t basis_version = 0;  // ShareModule::version() when created; Merge checks it

  // The tensors with requires_grad (what the optimiser steps), under the member names above.
  std::vector<std::pair<std::string, at::Tensor>> NamedParameters() const;
  std::vector<at::Tensor> Parameters() const;

  at::Tensor B() const;      // [n, p]  effective B_t (differentiable)
  at::Tensor At() const;     // [d, p]  effective A_tᵀ (differentiable)
  at::Tensor A() const;      // [p, d]
  at::Tensor Delta() const;  // [n, d]  s·B_t A_t (differentiable; materialises n×d)
  // LoRA side path for y = x W0ᵀ + b + Forward(x): x [..., d] -> s·(x A_tᵀ) B_tᵀ [..., n], computed
  // in float32 on the factors' device and returned in x's dtype.
  at::Tensor Forward(const at::Tensor& x) const;
};

// Balanced factors of a low-rank update b·a (b [n, r], a [r, d], any dtype/device): returns
// (b', a') in float64 on CPU with b'·a' = b·a (to round-off), b' = Q_b U √S and a'ᵀ = Q_a V √S, where
// b = Q_b R_b and aᵀ = Q_a R_a (reduced QR) and R_b R_aᵀ = U S Vᵀ. The columns of b' are the left
// singular directions of b·a weighted by √σ, those of a'ᵀ the right ones, so both sides carry the
// same energy (Σ σ_i) whatever scale split training left between b and a (a LoRA's A keeps its
// random init, its B is small): the per-side energy rule of a merge then ranks directions by
// their singular value in ΔW. Always r columns: directions beyond rank(b·a) (σ_i ≤ 1e-6·σ_1, float32
// rounding) are exact zero columns. Fails by TORCH_CHECK when the shapes do not chain.
std::pair<at::Tensor, at::Tensor> BalanceLowRankFactors(const at::Tensor& b, const at::Tensor& a);

class ShareModule {
 public:
  // An empty subspace (kβ = kα = 0, no tasks). INVALID_ARGUMENT for bad sizes or options.
  static absl::StatusOr<ShareModule> Create(int64_t out_features, int64_t in_features,
                                            const ShareOptions& options = {});

  int64_t out_features() const { return n_; }
  int64_t in_features() const { return d_; }
  const ShareOptions& options() const { return options_; }
  double scale() const { return options_.scale(); }
  int64_t k_beta() const;
  int64_t k_alpha() const;
  int64_t num_tasks() const { return static_cast<int64_t>(tasks_.size()); }
  // Incremented by every merge that changes the bases; factors from an older version are stale.
  int64_t version() const { return version_; }
  std::vector<std::string> TaskNames() const;  // merge order
  bool HasTask(const std::string& task) const;
  absl::StatusOr<int64_t> TaskRank(const std::string& task) const;

  const at::Tensor& beta() const { return beta_; }    // [n, kβ] float32
  const at::Tensor& alpha() const { return alpha_; }  // [d, kα] float32
  // G_β = Eβ Eβᵀ [kβ, kβ], G_α = Eα Eαᵀ [kα, kα] (float64, CPU), derived on each call.
  at::Tensor g_beta() const;
  at::Tensor g_alpha() const;

  // (1) Fresh trainable factors for the next task (see ShareTaskFactors). Deterministic in seed.
  ShareTaskFactors BeginTask(uint64_t seed, at::Device device = at::Device(at::kCPU)) const;

  // (3) Merges a trained task under `task`: uses the effective B_t, A_t of `factors` (detached).
  // FAILED_PRECONDITION if factors.basis_version != version() or the shapes do not fit.
  absl::Status Merge(const std::string& task, const ShareTaskFactors& factors);
  // Merges a task given directly by its factors, ΔW = scale()·b·a: b [n, r], a [r, d], any r ≥ 0.
  // A task with r = 0, b = 0 or a = 0 (ΔW exactly 0) is recorded with rank 0 and leaves the bases
  // untouched. Any dtype/device; not differentiated.
  absl::Status MergeFactors(const std::string& task, const at::Tensor& b, const at::Tensor& a);
  // Same with a foreign LoRA scale (ΔW = lora_scale·b·a): lora_scale/scale() is folded into b.
  absl::Status MergeLora(const std::string& task, const at::Tensor& b, const at::Tensor& a,
                         double lora_scale);

  // (4) Task-routed weights, reconstructed from the current subspace (float32, CPU).
  absl::StatusOr<at::Tensor> TaskB(const std::string& task) const;      // [n, r_i]  β Eβ_i
  absl::StatusOr<at::Tensor> TaskA(const std::string& task) const;      // [r_i, d]  (α Eα_i)ᵀ
  absl::StatusOr<at::Tensor> TaskDelta(const std::string& task) const;  // [n, d]    s·B_i A_i
  // The model "as of" `task` (the i-th merged task): Σ_{j ≤ i} ΔW_j = s·β C_i αᵀ with
  // C_i = Σ_{j ≤ i} Eβ_j Eα_jᵀ, as factors B = β [n, kβ] and A = C_i αᵀ [kβ, d] (float32, CPU; one
  // rank-kβ side path whatever i is; rank 1 of zeros while the subspace is empty). Task-routed
  // serving uses this: task i trained on top of the earlier tasks' merged updates, so W0 + ΔW_i
  // alone is not the model it learned on.
  absl::StatusOr<std::pair<at::Tensor, at::Tensor>> CumulativeFactors(const std::string& task) const;
  // The same side path through the basis itself: s·(x α) C_iᵀ βᵀ with β [n, kβ], C_i [kβ, kα] and
  // α [d, kα]. β and α are this module's own tensors (not copies), so the routes of every task of
  // one module share them and a decode batch runs them as one side path with a per-row core
  // (SharedBasisAdapter); do not use them after the module changes (a frozen version's module
  // never does). Zero-size bases give a rank-1 zero path, as CumulativeFactors.
  struct Core {
    at::Tensor beta, core, alpha;
  };
  absl::StatusOr<Core> CumulativeCore(const std::string& task) const;
  // Σ_i ΔW_i over every task = s·β (Σ_i Eβ_i Eα_iᵀ) αᵀ [n, d] (float32, CPU), in one GEMM chain
  // (cost independent of t apart from the k×Σr_i·k product).
  at::Tensor SumOfTaskDeltas() const;
  // The stored coefficients (Eβ_i [kβ, r_i], Eα_i [kα, r_i]).
  absl::StatusOr<std::pair<at::Tensor, at::Tensor>> TaskCoefficients(const std::string& task) const;

  // Bytes of the t-independent state: β, α (bounded by (n+d)·k_max·4).
  int64_t BasisStateBytes() const;
  // Bytes of the stacked per-task coefficients: (kβ + kα)·Σ r_i·4, grows by design.
  int64_t CoefficientBytes() const;

  // (5) State: tensors "<prefix>beta", "<prefix>alpha", "<prefix>e_beta", "<prefix>e_alpha" (CPU,
  // contiguous; zero-size dims possible while k = 0) plus a small JSON config (format
  // "strata.share.v2", options, sizes, version, tasks with names and ranks). G_β and G_α are not
  // stored: they are Eβ Eβᵀ and Eα Eαᵀ.
  void ExportState(const std::string& prefix, std::map<std::string, at::Tensor>* tensors) const;
  std::string ConfigJson() const;
  // Inverse of ExportState/ConfigJson. Copies the tensors (no aliasing of the inputs).
  // INVALID_ARGUMENT naming the tensor/field on missing tensors, bad shapes, bad JSON. Also reads
  // "strata.share.v1" states, whose "<prefix>g_beta"/"<prefix>g_alpha" are checked and dropped.
  static absl::StatusOr<ShareModule> ImportState(const std::string& config_json, const std::string& prefix,
                                                 const std::map<std::string, at::Tensor>& tensors);

 private:
  struct TaskRecord {
    std::string name;
    int64_t offset = 0;  // first column in e_beta_/e_alpha_
    int64_t rank = 0;
  };
  ShareModule() = default;
  const TaskRecord* FindTask(const std::string& task) const;
  absl::Status CheckNewTaskName(const std::string& task) const;

  int64_t n_ = 0;
  int64_t d_ = 0;
  ShareOptions options_;
  int64_t version_ = 0;
  at::Tensor beta_, alpha_;      // float32
  at::Tensor e_beta_, e_alpha_;  // float32, [k, Σ r_i]
  std::vector<TaskRecord> tasks_;
};

}  // namespace strata
