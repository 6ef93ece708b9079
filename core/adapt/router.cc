#include "core/adapt/router.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "core/adapt/method.h"
#include "core/data/encode.h"
#include "core/model/model.h"
#include "core/model/tokenizer.h"
#include "core/util/status_macros.h"

namespace strata {
namespace {

using json = nlohmann::json;

constexpr char kFormat[] = "strata.router.v1";

bool AllFinite(const at::Tensor& t) { return t.numel() == 0 || at::isfinite(t).all().item<bool>(); }

// The q-quantile (linear interpolation) of the values in `v` (non-empty).
double Quantile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  const double pos = q * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (pos - static_cast<double>(lo)) * (v[hi] - v[lo]);
}

}  // namespace

absl::Status RouterOptions::Validate() const {
  auto bad = [](const char* field, const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("router options: ", field, " ", why));
  };
  if (layer < -1) return bad("layer", absl::StrCat("must be >= 0 (or -1 = half of the layers), got ", layer));
  if (!(shrinkage >= 0 && shrinkage <= 1))
    return bad("shrinkage", absl::StrCat("must be in [0, 1], got ", shrinkage));
  if (!(quantile > 0 && quantile <= 1))
    return bad("quantile", absl::StrCat("must be in (0, 1], got ", quantile));
  if (!(std::isfinite(margin) && margin >= 1))
    return bad("margin", absl::StrCat("must be >= 1, got ", margin));
  if (holdout_every < 2) return bad("holdout_every", absl::StrCat("must be >= 2, got ", holdout_every));
  return absl::OkStatus();
}

int64_t RouterOptions::ResolvedLayer(int64_t num_layers) const {
  if (layer >= 0) return std::min(layer, num_layers);
  return std::max<int64_t>(1, (num_layers + 1) / 2);
}

std::vector<std::string> TaskRouter::TaskNames() const {
  std::vector<std::string> out;
  for (const TaskEntry& t : tasks_) out.push_back(t.name);
  return out;
}

bool TaskRouter::HasTask(const std::string& name) const {
  return std::any_of(tasks_.begin(), tasks_.end(), [&](const TaskEntry& t) { return t.name == name; });
}

int64_t TaskRouter::FeatureLayer(const CausalLM& model) const {
  return layer_ >= 0 ? std::min(layer_, model.num_layers()) : options_.ResolvedLayer(model.num_layers());
}

absl::StatusOr<at::Tensor> TaskRouter::Features(const CausalLM& base, const Tokenizer& tokenizer,
                                                const std::vector<std::string>& prompts,
                                                int64_t batch_size) const {
  const int64_t layer = FeatureLayer(base);
  const int64_t hidden = base.config().hidden_size;
  if (prompts.empty()) return at::zeros({0, hidden}, at::kFloat);
  batch_size = std::max<int64_t>(1, batch_size);
  c10::InferenceMode guard;
  std::vector<at::Tensor> rows;
  for (size_t start = 0; start < prompts.size(); start += static_cast<size_t>(batch_size)) {
    const size_t end = std::min(prompts.size(), start + static_cast<size_t>(batch_size));
    std::vector<std::vector<int32_t>> ids;
    int64_t longest = 1;
    for (size_t i = start; i < end; ++i) {
      std::vector<int32_t> p = EncodePrompt(tokenizer, prompts[i]);
      if (p.empty())
        return absl::InvalidArgumentError(absl::StrCat("router: prompt ", i, " encodes to no token"));
      if (static_cast<int64_t>(p.size()) > kMaxRouterTokens) p.erase(p.begin(), p.end() - kMaxRouterTokens);
      longest = std::max<int64_t>(longest, static_cast<int64_t>(p.size()));
      ids.push_back(std::move(p));
    }
    const int64_t b = static_cast<int64_t>(ids.size());
    // Right padding: causal attention keeps every real position exact.
    at::Tensor input = at::zeros({b, longest}, at::kLong);
    at::Tensor mask = at::zeros({b, longest}, at::kLong);
    auto in_a = input.accessor<int64_t, 2>();
    auto mask_a = mask.accessor<int64_t, 2>();
    for (int64_t r = 0; r < b; ++r) {
      for (size_t c = 0; c < ids[r].size(); ++c) {
        in_a[r][c] = ids[r][c];
        mask_a[r][c] = 1;
      }
    }
    at::Tensor h;
    try {
      h = base.HiddenStates(input, mask, layer);  // [b, T, H] float32
    } catch (const c10::Error& e) {
      return absl::InternalError(absl::StrCat("router: feature pass failed: ", e.what_without_backtrace()));
    }
    // Mean over the prompt's real tokens (measured against the last token's state alone, which
    // mixes up prompts that differ only in their first words: docs/benchmarks.md).
    at::Tensor m = mask.to(h.device(), at::kFloat).unsqueeze(2);
    rows.push_back(((h * m).sum(1) / m.sum(1)).to(at::kCPU));
  }
  // Leave InferenceMode's tensors behind: a plain copy can be used anywhere.
  at::Tensor out;
  {
    at::Tensor cat = at::cat(rows, 0);
    out = at::empty(cat.sizes(), at::kFloat);
    out.copy_(cat);
  }
  return out;
}

at::Tensor TaskRouter::Whitening(const at::Tensor& scatter, int64_t dof, int64_t hidden, double shrinkage) {
  at::Tensor sigma = scatter / static_cast<double>(std::max<int64_t>(dof, 1));
  const double avg = sigma.diagonal().mean().item<double>();
  at::Tensor eye = at::eye(hidden, at::TensorOptions().dtype(at::kDouble));
  // Shrink towards a scaled identity; a floor keeps a degenerate (all-equal) task invertible.
  sigma = (1.0 - shrinkage) * sigma + (shrinkage * avg + 1e-9 * std::max(avg, 1.0)) * eye;
  sigma = 0.5 * (sigma + sigma.t());
  at::Tensor l = at::linalg_cholesky(sigma);  // Σ = L Lᵀ -> W = L⁻¹, ‖W (x − μ)‖² = D²
  return at::linalg_solve_triangular(l, eye, /*upper=*/false);
}

absl::Status TaskRouter::Rebuild() {
  if (tasks_.empty()) {
    whiten_ = at::Tensor();
    whitened_means_ = at::Tensor();
    return absl::OkStatus();
  }
  int64_t n = 0;
  for (const TaskEntry& t : tasks_) n += t.count;
  at::Tensor w;
  try {
    w = Whitening(scatter_, n - num_tasks(), hidden_, options_.shrinkage);
  } catch (const c10::Error& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("router: the shared covariance cannot be inverted: ", e.what_without_backtrace()));
  }
  if (!AllFinite(w)) return absl::InvalidArgumentError("router: the shared covariance is not finite");
  whiten_ = w;
  whitened_means_ = means_.to(at::kDouble).mm(w.t());
  return absl::OkStatus();
}

absl::Status TaskRouter::AddTask(const std::string& name, const at::Tensor& features, int64_t layer) {
  RETURN_IF_ERROR(options_.Validate());
  if (name.empty()) return absl::InvalidArgumentError("router: empty task name");
  if (HasTask(name))
    return absl::AlreadyExistsError(absl::StrCat("router: task '", name, "' is already known"));
  if (!features.defined() || features.dim() != 2 || features.size(0) < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("router: task '", name, "' needs the features of at least 2 training prompts"));
  }
  at::Tensor x = features.detach().to(at::kCPU, at::kDouble);
  if (!AllFinite(x))
    return absl::InvalidArgumentError(absl::StrCat("router: task '", name, "' has non-finite features"));
  const int64_t h = x.size(1);
  if (hidden_ != 0 && h != hidden_) {
    return absl::InvalidArgumentError(absl::StrCat("router: task '", name, "' features have width ", h,
                                                   ", the router was built for ", hidden_));
  }
  if (layer < 0 || (layer_ >= 0 && layer != layer_)) {
    return absl::InvalidArgumentError(absl::StrCat("router: task '", name, "' features come from layer ",
                                                   layer, ", the router uses layer ", layer_));
  }
  const int64_t n = x.size(0);
  // Split: every holdout_every-th prompt calibrates (at least one), the rest fit.
  std::vector<int64_t> fit_idx, cal_idx;
  for (int64_t i = 0; i < n; ++i)
    ((i % options_.holdout_every) == options_.holdout_every - 1 ? cal_idx : fit_idx).push_back(i);
  if (cal_idx.empty()) {
    cal_idx.push_back(fit_idx.back());
    fit_idx.pop_back();
  }
  at::Tensor fit = x.index_select(0, at::tensor(fit_idx, at::kLong));
  at::Tensor cal = x.index_select(0, at::tensor(cal_idx, at::kLong));

  // Candidate state with the fit part.
  TaskRouter next = *this;
  next.hidden_ = h;
  auto add_scatter = [](const at::Tensor& rows, const at::Tensor& mean) {
    at::Tensor c = rows - mean.unsqueeze(0);
    return c.t().mm(c);
  };
  at::Tensor mu_fit = fit.mean(0);
  at::Tensor scatter = next.scatter_.defined() ? next.scatter_ : at::zeros({h, h}, at::kDouble);
  int64_t n_total = 0;
  for (const TaskEntry& t : tasks_) n_total += t.count;
  at::Tensor w;
  try {
    w = Whitening(scatter + add_scatter(fit, mu_fit), n_total + fit.size(0) - (num_tasks() + 1), h,
                  options_.shrinkage);
  } catch (const c10::Error& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("router: task '", name, "': covariance: ", e.what_without_backtrace()));
  }
  at::Tensor d2 = (cal - mu_fit.unsqueeze(0)).mm(w.t()).square().sum(1);
  std::vector<double> dist(d2.data_ptr<double>(), d2.data_ptr<double>() + d2.numel());
  const double threshold = options_.margin * Quantile(dist, options_.quantile);

  // Final state: all prompts in the mean and the scatter.
  at::Tensor mu = x.mean(0);
  next.scatter_ = scatter + add_scatter(x, mu);
  at::Tensor mu_row = mu.to(at::kFloat).unsqueeze(0);
  next.means_ = next.means_.defined() ? at::cat({next.means_, mu_row}, 0) : mu_row;
  next.tasks_.push_back({name, n, threshold});
  next.layer_ = layer;
  RETURN_IF_ERROR(next.Rebuild());
  *this = std::move(next);
  return absl::OkStatus();
}

std::vector<RouteDecision> TaskRouter::Route(const at::Tensor& features) const {
  std::vector<RouteDecision> out;
  const int64_t b = features.defined() && features.dim() == 2 ? features.size(0) : 0;
  out.resize(static_cast<size_t>(b));
  if (tasks_.empty() || b == 0) return out;
  at::Tensor z = features.detach().to(at::kCPU, at::kDouble).mm(whiten_.t());  // [B, H]
  // D² [B, T] = ‖z‖² − 2 z·m + ‖m‖²
  at::Tensor d2 = (z.square().sum(1, true) - 2.0 * z.mm(whitened_means_.t()) +
                   whitened_means_.square().sum(1).unsqueeze(0))
                      .clamp_min(0.0);
  at::Tensor post = at::softmax(-0.5 * d2, 1);
  auto d2a = d2.accessor<double, 2>();
  auto pa = post.accessor<double, 2>();
  for (int64_t r = 0; r < b; ++r) {
    int64_t best = 0;
    for (int64_t t = 1; t < num_tasks(); ++t) {
      if (d2a[r][t] < d2a[r][best]) best = t;
    }
    RouteDecision& d = out[static_cast<size_t>(r)];
    d.distance = d2a[r][best];
    d.threshold = tasks_[static_cast<size_t>(best)].threshold;
    d.nearest = tasks_[static_cast<size_t>(best)].name;
    if (d.distance <= d.threshold) {
      d.task_index = best;
      d.task = d.nearest;
      d.confidence = pa[r][best];
    } else {
      d.confidence = d.distance > 0 ? 1.0 - d.threshold / d.distance : 0.0;
    }
  }
  return out;
}

int64_t TaskRouter::StateBytes() const {
  if (tasks_.empty()) return 0;
  return means_.numel() * 4 + scatter_.numel() * 8 + num_tasks() * 24;
}

int64_t TaskRouter::StateBytesPerTask() const { return hidden_ * 4 + 24; }

void TaskRouter::ExportState(const std::string& prefix, std::map<std::string, at::Tensor>* tensors,
                             std::string* json_out) const {
  if (tasks_.empty()) {
    *json_out = "{}";
    return;
  }
  (*tensors)[prefix + "means"] = means_.contiguous();
  (*tensors)[prefix + "scatter"] = scatter_.contiguous();
  json j;
  j["format"] = kFormat;
  j["layer"] = layer_;
  j["hidden"] = hidden_;
  j["shrinkage"] = options_.shrinkage;
  j["quantile"] = options_.quantile;
  j["margin"] = options_.margin;
  j["holdout_every"] = options_.holdout_every;
  json tasks = json::array();
  for (const TaskEntry& t : tasks_)
    tasks.push_back({{"name", t.name}, {"count", t.count}, {"threshold", t.threshold}});
  j["tasks"] = tasks;
  *json_out = j.dump();
}

absl::StatusOr<TaskRouter> TaskRouter::ImportState(const std::string& text, const std::string& prefix,
                                                   const std::map<std::string, at::Tensor>& tensors) {
  json j = json::parse(text.empty() ? std::string("{}") : text, nullptr, false);
  if (j.is_discarded() || !j.is_object())
    return absl::InvalidArgumentError("router state: not a JSON object");
  TaskRouter r;
  if (j.empty()) return r;
  auto bad = [](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("router state: ", why));
  };
  if (j.value("format", "") != kFormat) return bad(absl::StrCat("format must be '", kFormat, "'"));
  try {
    r.layer_ = j.at("layer").get<int64_t>();
    r.hidden_ = j.at("hidden").get<int64_t>();
    r.options_.layer = r.layer_;
    r.options_.shrinkage = j.at("shrinkage").get<double>();
    r.options_.quantile = j.at("quantile").get<double>();
    r.options_.margin = j.at("margin").get<double>();
    r.options_.holdout_every = j.at("holdout_every").get<int64_t>();
    for (const json& t : j.at("tasks")) {
      r.tasks_.push_back(
          {t.at("name").get<std::string>(), t.at("count").get<int64_t>(), t.at("threshold").get<double>()});
    }
  } catch (const json::exception& e) {
    return bad(absl::StrCat("bad field: ", e.what()));
  }
  RETURN_IF_ERROR(r.options_.Validate());
  if (r.hidden_ < 1 || r.tasks_.empty()) return bad("no hidden size or no task");
  auto get = [&](const char* name, int64_t rows, int64_t cols,
                 at::ScalarType dtype) -> absl::StatusOr<at::Tensor> {
    auto it = tensors.find(prefix + name);
    if (it == tensors.end() || !it->second.defined())
      return bad(absl::StrCat("missing tensor '", prefix, name, "'"));
    const at::Tensor& t = it->second;
    if (t.dim() != 2 || t.size(0) != rows || t.size(1) != cols) {
      return bad(absl::StrCat("tensor '", prefix, name, "' must be [", rows, ", ", cols, "]"));
    }
    at::Tensor out = t.detach().to(at::kCPU, dtype).clone().contiguous();
    if (!AllFinite(out)) return bad(absl::StrCat("tensor '", prefix, name, "' has non-finite values"));
    return out;
  };
  ASSIGN_OR_RETURN(r.means_, get("means", r.num_tasks(), r.hidden_, at::kFloat));
  ASSIGN_OR_RETURN(r.scatter_, get("scatter", r.hidden_, r.hidden_, at::kDouble));
  RETURN_IF_ERROR(r.Rebuild());
  return r;
}

absl::StatusOr<std::vector<std::shared_ptr<const CausalLM>>> RouteModels(
    const CausalLM& base, const Method& method, const TaskRouter& router,
    std::shared_ptr<const CausalLM> unmatched, std::shared_ptr<const CausalLM> merged) {
  std::vector<std::shared_ptr<const CausalLM>> out = {std::move(unmatched)};
  const auto& known = method.tasks();
  for (const std::string& task : router.TaskNames()) {
    if (method.SupportsTaskRouting() && std::find(known.begin(), known.end(), task) != known.end()) {
      std::unique_ptr<CausalLM> model = base.ShallowCopy();
      RETURN_IF_ERROR(method.ApplyTaskRouting(task, model.get()));
      out.push_back(std::shared_ptr<const CausalLM>(std::move(model)));
    } else {
      out.push_back(merged);
    }
  }
  return out;
}

}  // namespace strata
