#include "core/adapt/peft_export.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"

namespace strata {
namespace {

// One module's update as an SVD: ΔW = u diag(s) vᵀ with u [n×m], s [m] (descending), v [d×m].
struct ModuleSvd {
  at::Tensor u, s, v;
  int64_t n = 0, d = 0;
};

// A dense matrix's SVD in float64 on the CPU when it is small (exact enough for any test), else in
// float32 on its own device (a 7B-class module: one float64 SVD would cost minutes on a CPU).
ModuleSvd DenseSvd(const at::Tensor& dense) {
  const bool small = dense.numel() <= (int64_t{1} << 22);
  at::Tensor x = small ? dense.detach().to(at::kCPU, at::kDouble) : dense.detach().to(at::kFloat);
  auto [u, s, vh] = at::linalg_svd(x, /*full_matrices=*/false, c10::nullopt);
  ModuleSvd out;
  out.n = dense.size(0);
  out.d = dense.size(1);
  out.u = u.to(at::kCPU, at::kDouble);
  out.s = s.to(at::kCPU, at::kDouble);
  out.v = vh.t().to(at::kCPU, at::kDouble);
  return out;
}

// scale · left · core · rightᵀ through QR of both sides: only a small p'×q' matrix is decomposed, so
// the cost is O((n + d)·r²) however large the layer.
ModuleSvd LowRankSvd(const ModuleUpdate& m) {
  const at::Tensor left = m.left.detach().to(at::kCPU, at::kDouble);
  const at::Tensor right = m.right.detach().to(at::kCPU, at::kDouble);
  ModuleSvd out;
  out.n = left.size(0);
  out.d = right.size(0);
  if (left.size(1) == 0 || right.size(1) == 0) {
    out.u = at::zeros({out.n, 0}, at::kDouble);
    out.s = at::zeros({0}, at::kDouble);
    out.v = at::zeros({out.d, 0}, at::kDouble);
    return out;
  }
  auto [ql, rl] = at::linalg_qr(left, "reduced");   // ql [n, p'], rl [p', p]
  auto [qr, rr] = at::linalg_qr(right, "reduced");  // qr [d, q'], rr [q', q]
  at::Tensor inner = m.core.defined() ? rl.mm(m.core.detach().to(at::kCPU, at::kDouble)) : rl;
  at::Tensor small = inner.mm(rr.t()).mul(m.scale);  // [p', q']
  auto [u, s, vh] = at::linalg_svd(small, /*full_matrices=*/false, c10::nullopt);
  out.u = ql.mm(u);
  out.s = s;
  out.v = qr.mm(vh.t());
  return out;
}

// Singular values at or below kRankTolerance × the largest are rounding noise of the float32
// factors (measured: ~1e-8 where the structure has a zero, e.g. an early task's Share route after
// later tasks grew the basis, against >= 1e-2 for real directions); they are not exported, and
// still count in the reported error.
constexpr double kRankTolerance = 1e-6;

int64_t NumericalRank(const at::Tensor& s) {
  if (s.numel() == 0) return 0;
  const double largest = s.max().item<double>();
  if (!(largest > 0)) return 0;
  return s.gt(largest * kRankTolerance).sum().item<int64_t>();
}

absl::Status CheckUpdate(const ModuleUpdate& m) {
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("PEFT export: module '", m.module, "': ", what));
  };
  if (m.dense.defined()) {
    if (m.left.defined() || m.right.defined()) return bad("both a dense and a low-rank update");
    if (m.dense.dim() != 2) return bad("the dense update is not a matrix");
    return absl::OkStatus();
  }
  if (!m.left.defined() || !m.right.defined() || m.left.dim() != 2 || m.right.dim() != 2) {
    return bad("the low-rank update needs 2-D left and right factors");
  }
  const int64_t p = m.left.size(1), q = m.right.size(1);
  if (m.core.defined() ? (m.core.dim() != 2 || m.core.size(0) != p || m.core.size(1) != q) : p != q) {
    return bad(absl::StrCat("factors do not fit: left [", m.left.size(0), ", ", p, "], core ",
                            m.core.defined() ? absl::StrCat("[", m.core.size(0), ", ", m.core.size(1), "]")
                                             : std::string("identity"),
                            ", right [", m.right.size(0), ", ", q, "]"));
  }
  if (!std::isfinite(m.scale)) return bad("the scale is not finite");
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<PeftFactorization> FactorizeForPeft(const std::vector<ModuleUpdate>& updates,
                                                   int64_t max_rank) {
  if (updates.empty()) return absl::InvalidArgumentError("PEFT export: no module update to export");
  if (max_rank < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("PEFT export: rank must be >= 0 (0: exact), got ", max_rank));
  }
  std::vector<ModuleSvd> svds;
  PeftFactorization out;
  std::set<std::string> seen;
  at::NoGradGuard no_grad;
  for (const ModuleUpdate& m : updates) {
    if (!seen.insert(m.module).second) {
      return absl::InvalidArgumentError(absl::StrCat("PEFT export: module '", m.module, "' appears twice"));
    }
    if (absl::Status st = CheckUpdate(m); !st.ok()) return st;
    if (m.dense.defined() && !at::isfinite(m.dense).all().item<bool>()) {
      return absl::InvalidArgumentError(
          absl::StrCat("PEFT export: module '", m.module, "': the update has non-finite values"));
    }
    try {
      svds.push_back(m.dense.defined() ? DenseSvd(m.dense) : LowRankSvd(m));
    } catch (const c10::Error& e) {
      return absl::InternalError(
          absl::StrCat("PEFT export: module '", m.module, "': SVD failed: ", e.what_without_backtrace()));
    }
    if (!at::isfinite(svds.back().s).all().item<bool>()) {
      return absl::InvalidArgumentError(
          absl::StrCat("PEFT export: module '", m.module, "': the update has non-finite values"));
    }
    out.exact_rank = std::max(out.exact_rank, NumericalRank(svds.back().s));
  }
  out.rank = std::max<int64_t>(1, max_rank > 0 ? std::min(max_rank, out.exact_rank) : out.exact_rank);
  const int64_t r = out.rank;
  double total = 0, dropped = 0;
  for (size_t i = 0; i < updates.size(); ++i) {
    const ModuleSvd& svd = svds[i];
    const int64_t keep = std::min<int64_t>(r, NumericalRank(svd.s));
    const double energy = svd.s.numel() > 0 ? svd.s.square().sum().item<double>() : 0.0;
    const double lost = keep < svd.s.size(0) ? svd.s.slice(0, keep).square().sum().item<double>() : 0.0;
    total += energy;
    dropped += lost;
    const double module_error = energy > 0 ? std::sqrt(lost / energy) : 0.0;
    if (module_error > out.max_module_error || out.max_error_module.empty()) {
      out.max_module_error = module_error;
      out.max_error_module = updates[i].module;
    }
    // Balanced factors, padded with zeros up to r.
    at::Tensor root = svd.s.slice(0, 0, keep).sqrt();
    at::Tensor b = at::zeros({svd.n, r}, at::kDouble);
    at::Tensor a = at::zeros({r, svd.d}, at::kDouble);
    if (keep > 0) {
      b.slice(1, 0, keep).copy_(svd.u.slice(1, 0, keep).mul(root.unsqueeze(0)));
      a.slice(0, 0, keep).copy_(svd.v.slice(1, 0, keep).mul(root.unsqueeze(0)).t());
    }
    PeftLoraModule module;
    module.a = a.to(at::kFloat).contiguous();
    module.b = b.to(at::kFloat).contiguous();
    module.scale = 1.0;
    out.adapter.modules.emplace(updates[i].module, std::move(module));
  }
  out.relative_error = total > 0 ? std::sqrt(dropped / total) : 0.0;
  out.adapter.r = r;
  out.adapter.lora_alpha = static_cast<double>(r);
  out.adapter.use_rslora = false;
  return out;
}

std::vector<std::string> PeftTargetModules(const std::vector<std::string>& exported,
                                           const std::vector<std::string>& all_linear) {
  auto last_part = [](const std::string& name) {
    const size_t dot = name.rfind('.');
    return dot == std::string::npos ? name : name.substr(dot + 1);
  };
  const std::set<std::string> chosen(exported.begin(), exported.end());
  std::map<std::string, bool> complete;  // last part -> every layer with it is exported
  for (const auto& name : exported) complete[last_part(name)] = true;
  for (const auto& name : all_linear) {
    auto it = complete.find(last_part(name));
    if (it != complete.end() && !chosen.count(name)) it->second = false;
  }
  const bool all_complete =
      std::all_of(complete.begin(), complete.end(), [](const auto& entry) { return entry.second; });
  if (!all_complete) {
    std::vector<std::string> names(chosen.begin(), chosen.end());
    return names;
  }
  std::vector<std::string> parts;
  for (const auto& [part, ok] : complete) parts.push_back(part);
  return parts;
}

}  // namespace strata
