#include "core/adapt/share.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <set>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "core/util/status_macros.h"

namespace strata {
namespace {

using json = nlohmann::json;

// v2 (this code) keeps no Gram matrices: G = E Eᵀ is derived from the stored coefficients when a
// merge needs it. v1 states also hold "g_beta"/"g_alpha" (float64); they still load (checked, then
// dropped).
constexpr char kFormat[] = "strata.share.v2";
constexpr char kFormatV1[] = "strata.share.v1";
// Eigen-directions of M Mᵀ carrying at most this fraction of ‖M‖²_F are numerically zero (float32
// inputs put their rounding noise around 1e-14 of the total) and are never kept, whatever the
// threshold.
constexpr double kZeroEnergyFraction = 1e-10;

at::TensorOptions F32() { return at::TensorOptions().dtype(at::kFloat); }
at::TensorOptions F64() { return at::TensorOptions().dtype(at::kDouble); }

std::string Shape(const at::Tensor& t) {
  if (!t.defined()) return "undefined";
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) absl::StrAppend(&s, i ? ", " : "", t.size(i));
  return s + "]";
}

bool AllFinite(const at::Tensor& t) { return t.numel() == 0 || at::isfinite(t).all().item<bool>(); }

// Result of the basis update of one side.
struct SideMerge {
  at::Tensor basis;      // float32 [dim, k']
  at::Tensor transform;  // float64 [k', k]: new coefficients of old columns = transform · old
  at::Tensor e_new;      // float64 [k', r]: coefficients of the new task's effective factor
};

// G = Σ_i E_i E_iᵀ = E Eᵀ (float64 [k, k]) of the stacked coefficients e [k, Σ r_i] (float32).
at::Tensor Gram(const at::Tensor& e) {
  at::Tensor ed = e.to(at::kDouble);
  return ed.mm(ed.t());
}

// Basis update of one side (see the header): basis [dim, k] float32 (column-orthonormal),
// g [k, k] float64 = Σ_i E_i E_iᵀ, factor [dim, r] float64 with r ≥ 1.
SideMerge MergeSide(const at::Tensor& basis, const at::Tensor& g, const at::Tensor& factor, int64_t k_max,
                    double threshold) {
  const int64_t k = basis.size(1);
  const int64_t r = factor.size(1);
  at::Tensor x = at::cat({basis.to(at::kDouble), factor}, 1);  // [dim, k + r]
  at::Tensor q, rr;
  std::tie(q, rr) = at::linalg_qr(x, "reduced");  // q [dim, m'], rr [m', k + r], m' = min(dim, k + r)
  at::Tensor r_old = rr.narrow(1, 0, k);
  at::Tensor r_new = rr.narrow(1, k, r);
  // M Mᵀ restricted to span(q): R blockdiag(G, I) Rᵀ.
  at::Tensor s = r_new.mm(r_new.t());
  if (k > 0) s = s + r_old.mm(g).mm(r_old.t());
  s = 0.5 * (s + s.t());
  at::Tensor evals, evecs;
  std::tie(evals, evecs) = at::linalg_eigh(s, "L");  // ascending
  evals = evals.flip({0}).clamp_min(0.0).contiguous();
  evecs = evecs.flip({1});

  const double total = evals.sum().item<double>();
  int64_t keep = 0;
  if (total > 0.0 && std::isfinite(total)) {
    auto ev = evals.accessor<double, 1>();
    double cum = 0.0;
    for (int64_t i = 0; i < ev.size(0) && keep < k_max; ++i) {
      if (ev[i] <= kZeroEnergyFraction * total) break;
      cum += ev[i];
      keep = i + 1;
      if (cum >= threshold * total) break;
    }
  }
  at::Tensor v = evecs.narrow(1, 0, keep);  // [m', k']
  SideMerge out;
  out.basis = q.mm(v).to(at::kFloat).contiguous();
  out.transform = v.t().mm(r_old).contiguous();  // [k', k]
  out.e_new = v.t().mm(r_new).contiguous();      // [k', r]
  return out;
}

// `phi` orthonormal columns (float32 [dim, phi]) orthogonal to `basis` [dim, k] (as far as dim
// allows): the leading left singular directions of `seed_cols` [dim, c] (may be undefined) first,
// then random Gaussian directions.
at::Tensor ComplementBasis(const at::Tensor& basis, const at::Tensor& seed_cols, int64_t phi,
                           at::Generator& gen) {
  const int64_t dim = basis.size(0);
  std::vector<at::Tensor> cols;
  if (seed_cols.defined() && seed_cols.numel() > 0) {
    at::Tensor u, sv, vh;
    std::tie(u, sv, vh) = at::linalg_svd(seed_cols.to(at::kDouble), false, c10::nullopt);
    const double smax = sv.numel() ? sv.max().item<double>() : 0.0;
    int64_t use = 0;
    if (smax > 0.0) use = (sv > 1e-6 * smax).sum().item<int64_t>();
    use = std::min(use, phi);
    if (use > 0) cols.push_back(u.narrow(1, 0, use));
  }
  cols.push_back(at::randn({dim, phi}, gen, F32()).to(at::kDouble));
  at::Tensor x = at::cat(cols, 1);
  at::Tensor b = basis.to(at::kDouble);
  if (b.size(1) > 0) {
    for (int pass = 0; pass < 2; ++pass) x = x - b.mm(b.t().mm(x));
  }
  at::Tensor q = std::get<0>(at::linalg_qr(x, "reduced"));
  if (q.size(1) >= phi) return q.narrow(1, 0, phi).to(at::kFloat).contiguous();
  // dim < phi: pad with zero columns (the extra temporary vectors can still learn).
  return at::cat({q, at::zeros({dim, phi - q.size(1)}, F64())}, 1).to(at::kFloat).contiguous();
}

absl::Status CheckFactor(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  if (!t.defined() || t.dim() != 2 || (rows >= 0 && t.size(0) != rows) || (cols >= 0 && t.size(1) != cols)) {
    return absl::InvalidArgumentError(absl::StrCat("Share: tensor '", name, "' has shape ", Shape(t),
                                                   ", expected [", rows < 0 ? "*" : std::to_string(rows),
                                                   ", ", cols < 0 ? "*" : std::to_string(cols), "]"));
  }
  return absl::OkStatus();
}

// Typed JSON field access for ImportState.
template <typename T>
absl::StatusOr<T> Field(const json& j, const char* name) {
  auto it = j.find(name);
  if (it == j.end())
    return absl::InvalidArgumentError(absl::StrCat("Share state config: missing field '", name, "'"));
  if constexpr (std::is_same_v<T, std::string>) {
    if (!it->is_string())
      return absl::InvalidArgumentError(
          absl::StrCat("Share state config: field '", name, "' is not a string"));
  } else if constexpr (std::is_integral_v<T>) {
    if (!it->is_number_integer())
      return absl::InvalidArgumentError(
          absl::StrCat("Share state config: field '", name, "' is not an integer"));
  } else {
    if (!it->is_number())
      return absl::InvalidArgumentError(
          absl::StrCat("Share state config: field '", name, "' is not a number"));
  }
  return it->get<T>();
}

absl::StatusOr<at::Tensor> StateTensor(const std::map<std::string, at::Tensor>& tensors,
                                       const std::string& prefix, const char* name, int64_t rows,
                                       int64_t cols, at::ScalarType dtype) {
  const std::string key = prefix + name;
  auto it = tensors.find(key);
  if (it == tensors.end() || !it->second.defined()) {
    return absl::InvalidArgumentError(absl::StrCat("Share state: missing tensor '", key, "'"));
  }
  const at::Tensor& t = it->second;
  if (t.dim() != 2 || t.size(0) != rows || t.size(1) != cols) {
    return absl::InvalidArgumentError(absl::StrCat("Share state: tensor '", key, "' has shape ", Shape(t),
                                                   ", expected [", rows, ", ", cols, "]"));
  }
  if (!at::isFloatingType(t.scalar_type())) {
    return absl::InvalidArgumentError(absl::StrCat("Share state: tensor '", key, "' is not floating point"));
  }
  at::Tensor out = t.detach().to(at::kCPU, dtype).clone().contiguous();
  if (!AllFinite(out)) {
    return absl::InvalidArgumentError(absl::StrCat("Share state: tensor '", key, "' has non-finite values"));
  }
  return out;
}

}  // namespace

std::pair<at::Tensor, at::Tensor> BalanceLowRankFactors(const at::Tensor& b, const at::Tensor& a) {
  at::NoGradGuard no_grad;
  at::Tensor bd = b.detach().to(at::kCPU, at::kDouble);
  at::Tensor ad = a.detach().to(at::kCPU, at::kDouble);
  const int64_t r = bd.size(1);
  TORCH_CHECK(ad.dim() == 2 && ad.size(0) == r, "BalanceLowRankFactors: b ", Shape(bd), " and a ", Shape(ad),
              " do not chain");
  if (r == 0) return {bd, ad};
  at::Tensor qb, rb, qa, ra;
  std::tie(qb, rb) = at::linalg_qr(bd, "reduced");      // qb [n, m_b], rb [m_b, r]
  std::tie(qa, ra) = at::linalg_qr(ad.t(), "reduced");  // qa [d, m_a], ra [m_a, r]
  at::Tensor u, sv, vh;
  std::tie(u, sv, vh) = at::linalg_svd(rb.mm(ra.t()), /*full_matrices=*/false, c10::nullopt);
  // Directions with σ_i ≤ 1e-6·σ_1 are rounding noise of float32 factors (a rank-deficient b·a):
  // exact zero columns, so that they claim no subspace direction.
  const double smax = sv.numel() > 0 ? sv.max().item<double>() : 0.0;
  at::Tensor root = at::where(sv > 1e-6 * smax, sv, at::zeros_like(sv)).sqrt();  // [m], m = min(m_b, m_a)
  at::Tensor b_out = qb.mm(u).mul(root);                                         // [n, m]
  at::Tensor a_out = qa.mm(vh.t()).mul(root).t();                                // [m, d]
  const int64_t m = root.size(0);
  if (m < r) {
    b_out = at::cat({b_out, at::zeros({bd.size(0), r - m}, F64())}, 1);
    a_out = at::cat({a_out, at::zeros({r - m, ad.size(1)}, F64())}, 0);
  }
  return {b_out.contiguous(), a_out.contiguous()};
}

absl::Status ShareOptions::Validate() const {
  if (k_max < 1)
    return absl::InvalidArgumentError(absl::StrCat("ShareOptions.k_max must be >= 1, got ", k_max));
  if (p < 1) return absl::InvalidArgumentError(absl::StrCat("ShareOptions.p must be >= 1, got ", p));
  if (phi < 1) return absl::InvalidArgumentError(absl::StrCat("ShareOptions.phi must be >= 1, got ", phi));
  if (!(std::isfinite(lora_alpha) && lora_alpha > 0)) {
    return absl::InvalidArgumentError(absl::StrCat("ShareOptions.lora_alpha must be > 0, got ", lora_alpha));
  }
  if (!(energy_threshold > 0.0 && energy_threshold <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("ShareOptions.energy_threshold must be in (0, 1], got ", energy_threshold));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// ShareTaskFactors

std::vector<std::pair<std::string, at::Tensor>> ShareTaskFactors::NamedParameters() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  const std::pair<const char*, const at::Tensor*> all[] = {{"e_beta", &e_beta},     {"e_alpha", &e_alpha},
                                                           {"r_beta1", &r_beta1},   {"r_beta2", &r_beta2},
                                                           {"r_alpha1", &r_alpha1}, {"r_alpha2", &r_alpha2}};
  for (const auto& [name, t] : all) {
    if (t->defined() && t->requires_grad()) out.emplace_back(name, *t);
  }
  return out;
}

std::vector<at::Tensor> ShareTaskFactors::Parameters() const {
  std::vector<at::Tensor> out;
  for (auto& [name, t] : NamedParameters()) out.push_back(t);
  return out;
}

at::Tensor ShareTaskFactors::B() const {
  at::Tensor b = r_beta1.mm(r_beta2);
  if (beta.size(1) > 0) b = b + beta.mm(e_beta);
  return b;
}

at::Tensor ShareTaskFactors::At() const {
  at::Tensor a = r_alpha1.mm(r_alpha2);
  if (alpha.size(1) > 0) a = a + alpha.mm(e_alpha);
  return a;
}

at::Tensor ShareTaskFactors::A() const { return At().t(); }

at::Tensor ShareTaskFactors::Delta() const { return B().mm(A()).mul(scale); }

at::Tensor ShareTaskFactors::Forward(const at::Tensor& x) const {
  at::Tensor xf = x.to(r_alpha1.device(), r_alpha1.scalar_type());
  at::Tensor y = at::matmul(at::matmul(xf, At()), B().t()).mul(scale);
  return y.to(x.device(), x.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// ShareModule

absl::StatusOr<ShareModule> ShareModule::Create(int64_t out_features, int64_t in_features,
                                                const ShareOptions& options) {
  RETURN_IF_ERROR(options.Validate());
  if (out_features < 1 || in_features < 1) {
    return absl::InvalidArgumentError(absl::StrCat("ShareModule: bad layer size out_features=", out_features,
                                                   " in_features=", in_features));
  }
  ShareModule m;
  m.n_ = out_features;
  m.d_ = in_features;
  m.options_ = options;
  m.beta_ = at::zeros({out_features, 0}, F32());
  m.alpha_ = at::zeros({in_features, 0}, F32());
  m.e_beta_ = at::zeros({0, 0}, F32());
  m.e_alpha_ = at::zeros({0, 0}, F32());
  return m;
}

int64_t ShareModule::k_beta() const { return beta_.size(1); }
int64_t ShareModule::k_alpha() const { return alpha_.size(1); }

std::vector<std::string> ShareModule::TaskNames() const {
  std::vector<std::string> out;
  out.reserve(tasks_.size());
  for (const TaskRecord& t : tasks_) out.push_back(t.name);
  return out;
}

const ShareModule::TaskRecord* ShareModule::FindTask(const std::string& task) const {
  for (const TaskRecord& t : tasks_) {
    if (t.name == task) return &t;
  }
  return nullptr;
}

bool ShareModule::HasTask(const std::string& task) const { return FindTask(task) != nullptr; }

absl::StatusOr<int64_t> ShareModule::TaskRank(const std::string& task) const {
  const TaskRecord* rec = FindTask(task);
  if (rec == nullptr) return absl::NotFoundError(absl::StrCat("Share: no task '", task, "'"));
  return rec->rank;
}

absl::Status ShareModule::CheckNewTaskName(const std::string& task) const {
  if (task.empty()) return absl::InvalidArgumentError("Share: empty task name");
  if (HasTask(task)) return absl::AlreadyExistsError(absl::StrCat("Share: task '", task, "' already merged"));
  return absl::OkStatus();
}

ShareTaskFactors ShareModule::BeginTask(uint64_t seed, at::Device device) const {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const int64_t p = options_.p;
  const int64_t kb = k_beta();
  const int64_t ka = k_alpha();
  ShareTaskFactors f;
  f.scale = scale();
  f.basis_version = version_;

  // LoRA A init: kaiming-uniform(a = sqrt(5)) on [p, d] = U(-1/sqrt(d), 1/sqrt(d)).
  const double bound = 1.0 / std::sqrt(static_cast<double>(d_));
  at::Tensor a0t = at::rand({p, d_}, gen, F32()).mul(2.0).sub(1.0).mul(bound).t().contiguous();  // [d, p]

  // A side.
  if (ka == 0) {
    f.e_alpha = at::zeros({0, p}, F32());
    f.r_alpha1 = a0t;
    f.r_alpha2 = at::eye(p, F32());
  } else {
    f.e_alpha = alpha_.t().mm(a0t).contiguous();                        // [kα, p]
    at::Tensor residual = a0t - alpha_.mm(f.e_alpha);                   // [d, p]
    f.r_alpha1 = ComplementBasis(alpha_, residual, options_.phi, gen);  // [d, φ]
    f.r_alpha2 = f.r_alpha1.t().mm(residual).contiguous();              // [φ, p]
  }
  // B side: zero at step 0.
  if (kb == 0) {
    f.e_beta = at::zeros({0, p}, F32());
    f.r_beta1 = at::zeros({n_, p}, F32());
    f.r_beta2 = at::eye(p, F32());
  } else {
    f.e_beta = at::zeros({kb, p}, F32());
    f.r_beta1 = ComplementBasis(beta_, at::Tensor(), options_.phi, gen);  // [n, φ]
    f.r_beta2 = at::zeros({options_.phi, p}, F32());
  }

  auto place = [&](at::Tensor& t, bool trainable) {
    t = t.to(device).detach();
    if (trainable) t.requires_grad_(true);
  };
  f.beta = beta_.to(device).detach();
  f.alpha = alpha_.to(device).detach();
  place(f.e_beta, kb > 0);
  place(f.e_alpha, ka > 0);
  place(f.r_beta1, true);
  place(f.r_beta2, kb > 0);
  place(f.r_alpha1, true);
  place(f.r_alpha2, ka > 0);
  return f;
}

absl::Status ShareModule::Merge(const std::string& task, const ShareTaskFactors& factors) {
  if (factors.basis_version != version_) {
    return absl::FailedPreconditionError(
        absl::StrCat("Share: factors for task '", task, "' were created at basis version ",
                     factors.basis_version, ", the module is at version ", version_));
  }
  RETURN_IF_ERROR(CheckFactor(factors.beta, "beta", n_, k_beta()));
  RETURN_IF_ERROR(CheckFactor(factors.alpha, "alpha", d_, k_alpha()));
  RETURN_IF_ERROR(CheckFactor(factors.e_beta, "e_beta", k_beta(), -1));
  RETURN_IF_ERROR(CheckFactor(factors.e_alpha, "e_alpha", k_alpha(), factors.e_beta.size(1)));
  RETURN_IF_ERROR(CheckFactor(factors.r_beta1, "r_beta1", n_, -1));
  RETURN_IF_ERROR(CheckFactor(factors.r_beta2, "r_beta2", factors.r_beta1.size(1), factors.e_beta.size(1)));
  RETURN_IF_ERROR(CheckFactor(factors.r_alpha1, "r_alpha1", d_, -1));
  RETURN_IF_ERROR(
      CheckFactor(factors.r_alpha2, "r_alpha2", factors.r_alpha1.size(1), factors.e_beta.size(1)));
  at::NoGradGuard no_grad;
  return MergeLora(task, factors.B().detach(), factors.A().detach(), factors.scale);
}

absl::Status ShareModule::MergeLora(const std::string& task, const at::Tensor& b, const at::Tensor& a,
                                    double lora_scale) {
  if (!(std::isfinite(lora_scale))) {
    return absl::InvalidArgumentError(absl::StrCat("Share: task '", task, "': non-finite LoRA scale"));
  }
  RETURN_IF_ERROR(CheckFactor(b, "b", n_, -1));
  if (lora_scale == scale()) return MergeFactors(task, b, a);
  at::NoGradGuard no_grad;
  return MergeFactors(task, b.detach().to(at::kDouble).mul(lora_scale / scale()), a);
}

absl::Status ShareModule::MergeFactors(const std::string& task, const at::Tensor& b, const at::Tensor& a) {
  RETURN_IF_ERROR(CheckNewTaskName(task));
  RETURN_IF_ERROR(CheckFactor(b, "b", n_, -1));
  RETURN_IF_ERROR(CheckFactor(a, "a", b.size(1), d_));
  at::NoGradGuard no_grad;
  at::Tensor bd = b.detach().to(at::kCPU, at::kDouble);
  at::Tensor ad = a.detach().to(at::kCPU, at::kDouble);
  if (!AllFinite(bd) || !AllFinite(ad)) {
    return absl::InvalidArgumentError(absl::StrCat("Share: task '", task, "' has non-finite factor values"));
  }
  const int64_t r = bd.size(1);
  const int64_t offset = e_beta_.size(1);
  // An empty task, or one whose ΔW is exactly zero (B = 0 or A = 0, e.g. merged before any step):
  // recorded with rank 0 so that its factors do not claim subspace directions.
  if (r == 0 || bd.abs().max().item<double>() == 0.0 || ad.abs().max().item<double>() == 0.0) {
    tasks_.push_back({task, offset, 0});
    return absl::OkStatus();
  }
  SideMerge mb = MergeSide(beta_, g_beta(), bd, options_.k_max, options_.energy_threshold);
  SideMerge ma = MergeSide(alpha_, g_alpha(), ad.t(), options_.k_max, options_.energy_threshold);
  // Eager re-projection of every stored task: one GEMM per side.
  at::Tensor e_beta =
      at::cat({mb.transform.mm(e_beta_.to(at::kDouble)), mb.e_new}, 1).to(at::kFloat).contiguous();
  at::Tensor e_alpha =
      at::cat({ma.transform.mm(e_alpha_.to(at::kDouble)), ma.e_new}, 1).to(at::kFloat).contiguous();
  // Commit (nothing above mutated the module).
  beta_ = mb.basis;
  alpha_ = ma.basis;
  e_beta_ = e_beta;
  e_alpha_ = e_alpha;
  tasks_.push_back({task, offset, r});
  ++version_;
  return absl::OkStatus();
}

absl::StatusOr<std::pair<at::Tensor, at::Tensor>> ShareModule::TaskCoefficients(
    const std::string& task) const {
  const TaskRecord* rec = FindTask(task);
  if (rec == nullptr) return absl::NotFoundError(absl::StrCat("Share: no task '", task, "'"));
  return std::make_pair(e_beta_.narrow(1, rec->offset, rec->rank).clone(),
                        e_alpha_.narrow(1, rec->offset, rec->rank).clone());
}

absl::StatusOr<at::Tensor> ShareModule::TaskB(const std::string& task) const {
  const TaskRecord* rec = FindTask(task);
  if (rec == nullptr) return absl::NotFoundError(absl::StrCat("Share: no task '", task, "'"));
  at::NoGradGuard no_grad;
  if (k_beta() == 0) return at::zeros({n_, rec->rank}, F32());
  return beta_.mm(e_beta_.narrow(1, rec->offset, rec->rank));
}

absl::StatusOr<at::Tensor> ShareModule::TaskA(const std::string& task) const {
  const TaskRecord* rec = FindTask(task);
  if (rec == nullptr) return absl::NotFoundError(absl::StrCat("Share: no task '", task, "'"));
  at::NoGradGuard no_grad;
  if (k_alpha() == 0) return at::zeros({rec->rank, d_}, F32());
  return alpha_.mm(e_alpha_.narrow(1, rec->offset, rec->rank)).t().contiguous();
}

absl::StatusOr<at::Tensor> ShareModule::TaskDelta(const std::string& task) const {
  ASSIGN_OR_RETURN(at::Tensor b, TaskB(task));
  ASSIGN_OR_RETURN(at::Tensor a, TaskA(task));
  at::NoGradGuard no_grad;
  if (b.size(1) == 0) return at::zeros({n_, d_}, F32());
  return b.mm(a).mul(scale());
}

absl::StatusOr<std::pair<at::Tensor, at::Tensor>> ShareModule::CumulativeFactors(
    const std::string& task) const {
  const TaskRecord* rec = FindTask(task);
  if (rec == nullptr) return absl::NotFoundError(absl::StrCat("Share: no task '", task, "'"));
  at::NoGradGuard no_grad;
  const int64_t cols = rec->offset + rec->rank;  // tasks are stored in order: columns of tasks ≤ i
  if (k_beta() == 0 || k_alpha() == 0 || cols == 0) {
    return std::make_pair(at::zeros({n_, 1}, F32()), at::zeros({1, d_}, F32()));
  }
  at::Tensor c = e_beta_.narrow(1, 0, cols)
                     .to(at::kDouble)
                     .mm(e_alpha_.narrow(1, 0, cols).to(at::kDouble).t())
                     .to(at::kFloat);  // [kβ, kα]
  return std::make_pair(beta_.clone(), c.mm(alpha_.t()).contiguous());
}

absl::StatusOr<ShareModule::Core> ShareModule::CumulativeCore(const std::string& task) const {
  const TaskRecord* rec = FindTask(task);
  if (rec == nullptr) return absl::NotFoundError(absl::StrCat("Share: no task '", task, "'"));
  at::NoGradGuard no_grad;
  const int64_t cols = rec->offset + rec->rank;
  if (k_beta() == 0 || k_alpha() == 0 || cols == 0) {
    return Core{at::zeros({n_, 1}, F32()), at::zeros({1, 1}, F32()), at::zeros({d_, 1}, F32())};
  }
  at::Tensor c = e_beta_.narrow(1, 0, cols)
                     .to(at::kDouble)
                     .mm(e_alpha_.narrow(1, 0, cols).to(at::kDouble).t())
                     .to(at::kFloat)
                     .contiguous();  // [kβ, kα]
  return Core{beta_, c, alpha_};
}

at::Tensor ShareModule::SumOfTaskDeltas() const {
  at::NoGradGuard no_grad;
  if (k_beta() == 0 || k_alpha() == 0 || e_beta_.size(1) == 0) return at::zeros({n_, d_}, F32());
  at::Tensor c = e_beta_.to(at::kDouble).mm(e_alpha_.to(at::kDouble).t()).to(at::kFloat);  // [kβ, kα]
  return beta_.mm(c).mm(alpha_.t()).mul(scale());
}

at::Tensor ShareModule::g_beta() const {
  at::NoGradGuard no_grad;
  return Gram(e_beta_);
}

at::Tensor ShareModule::g_alpha() const {
  at::NoGradGuard no_grad;
  return Gram(e_alpha_);
}

int64_t ShareModule::BasisStateBytes() const { return beta_.numel() * 4 + alpha_.numel() * 4; }

int64_t ShareModule::CoefficientBytes() const { return (e_beta_.numel() + e_alpha_.numel()) * 4; }

void ShareModule::ExportState(const std::string& prefix, std::map<std::string, at::Tensor>* tensors) const {
  (*tensors)[prefix + "beta"] = beta_.contiguous();
  (*tensors)[prefix + "alpha"] = alpha_.contiguous();
  (*tensors)[prefix + "e_beta"] = e_beta_.contiguous();
  (*tensors)[prefix + "e_alpha"] = e_alpha_.contiguous();
}

std::string ShareModule::ConfigJson() const {
  json j;
  j["format"] = kFormat;
  j["out_features"] = n_;
  j["in_features"] = d_;
  j["k_max"] = options_.k_max;
  j["p"] = options_.p;
  j["phi"] = options_.phi;
  j["lora_alpha"] = options_.lora_alpha;
  j["energy_threshold"] = options_.energy_threshold;
  j["version"] = version_;
  j["k_beta"] = k_beta();
  j["k_alpha"] = k_alpha();
  json tasks = json::array();
  for (const TaskRecord& t : tasks_) tasks.push_back({{"name", t.name}, {"rank", t.rank}});
  j["tasks"] = tasks;
  return j.dump();
}

absl::StatusOr<ShareModule> ShareModule::ImportState(const std::string& config_json,
                                                     const std::string& prefix,
                                                     const std::map<std::string, at::Tensor>& tensors) {
  json j = json::parse(config_json, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("Share state config for '", prefix, "' is not a JSON object"));
  }
  ASSIGN_OR_RETURN(std::string format, Field<std::string>(j, "format"));
  if (format != kFormat && format != kFormatV1) {
    return absl::InvalidArgumentError(absl::StrCat("Share state config: format '", format, "', expected '",
                                                   kFormat, "' (or '", kFormatV1, "')"));
  }
  ShareOptions options;
  ASSIGN_OR_RETURN(int64_t n, Field<int64_t>(j, "out_features"));
  ASSIGN_OR_RETURN(int64_t d, Field<int64_t>(j, "in_features"));
  ASSIGN_OR_RETURN(options.k_max, Field<int64_t>(j, "k_max"));
  ASSIGN_OR_RETURN(options.p, Field<int64_t>(j, "p"));
  ASSIGN_OR_RETURN(options.phi, Field<int64_t>(j, "phi"));
  ASSIGN_OR_RETURN(options.lora_alpha, Field<double>(j, "lora_alpha"));
  ASSIGN_OR_RETURN(options.energy_threshold, Field<double>(j, "energy_threshold"));
  ASSIGN_OR_RETURN(int64_t version, Field<int64_t>(j, "version"));
  ASSIGN_OR_RETURN(int64_t kb, Field<int64_t>(j, "k_beta"));
  ASSIGN_OR_RETURN(int64_t ka, Field<int64_t>(j, "k_alpha"));
  ASSIGN_OR_RETURN(ShareModule m, Create(n, d, options));
  if (kb < 0 || kb > n || ka < 0 || ka > d || version < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("Share state config: bad k_beta=", kb, " k_alpha=", ka, " version=", version));
  }
  auto tasks_it = j.find("tasks");
  if (tasks_it == j.end() || !tasks_it->is_array()) {
    return absl::InvalidArgumentError("Share state config: field 'tasks' is not an array");
  }
  int64_t total_rank = 0;
  for (const json& t : *tasks_it) {
    if (!t.is_object())
      return absl::InvalidArgumentError("Share state config: a 'tasks' entry is not an object");
    ASSIGN_OR_RETURN(std::string name, Field<std::string>(t, "name"));
    ASSIGN_OR_RETURN(int64_t rank, Field<int64_t>(t, "rank"));
    if (rank < 0)
      return absl::InvalidArgumentError(
          absl::StrCat("Share state config: task '", name, "' has rank ", rank));
    RETURN_IF_ERROR(m.CheckNewTaskName(name));
    m.tasks_.push_back({name, total_rank, rank});
    total_rank += rank;
  }
  ASSIGN_OR_RETURN(m.beta_, StateTensor(tensors, prefix, "beta", n, kb, at::kFloat));
  ASSIGN_OR_RETURN(m.alpha_, StateTensor(tensors, prefix, "alpha", d, ka, at::kFloat));
  if (format == kFormatV1) {
    // A v1 state's Gram matrices: checked as before, then dropped (derived from e_beta/e_alpha).
    RETURN_IF_ERROR(StateTensor(tensors, prefix, "g_beta", kb, kb, at::kDouble).status());
    RETURN_IF_ERROR(StateTensor(tensors, prefix, "g_alpha", ka, ka, at::kDouble).status());
  }
  ASSIGN_OR_RETURN(m.e_beta_, StateTensor(tensors, prefix, "e_beta", kb, total_rank, at::kFloat));
  ASSIGN_OR_RETURN(m.e_alpha_, StateTensor(tensors, prefix, "e_alpha", ka, total_rank, at::kFloat));
  m.version_ = version;
  return m;
}

}  // namespace strata
