#include "core/state/ledger.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "core/data/jsonl.h"
#include "core/eval/metrics.h"

namespace strata {
namespace {

double Nan() { return std::nan(""); }

// The latest stage's value for task j in `view` (NaN when not measured).
double Latest(const std::vector<std::vector<double>>& view, size_t j) {
  return view.empty() || j >= view.back().size() ? Nan() : view.back()[j];
}

// Appends one stage row to a view whose earlier rows are widened to the task count (NaN = not
// measured; views added later have empty rows for the stages before them).
void AddViewRow(std::vector<std::vector<double>>* view, size_t tasks, const std::vector<double>& row) {
  view->resize(tasks - 1);
  for (auto& r : *view) r.resize(tasks, Nan());
  view->push_back(row);
}

}  // namespace

absl::StatusOr<ResultsLedger> ResultsLedger::FromCheckpoint(const CheckpointData& d,
                                                            const std::string& state_dir,
                                                            bool read_eval_sets) {
  ResultsLedger l;
  l.tasks_ = d.tasks;
  l.matrix_ = d.matrix;
  l.base_scores_ = d.base;
  l.reference_nll_ = d.reference_nll;
  l.stage_versions_ = d.stage_versions;
  l.routed_matrix_ = d.routed_matrix;
  l.auto_matrix_ = d.auto_matrix;
  l.router_accuracy_ = d.router_accuracy;
  l.reference_nll_auto_ = d.reference_nll_auto;
  // States from before the auto view: its stage 0 is the base model's, as in the merged view.
  if (l.reference_nll_auto_.empty() && !l.reference_nll_.empty()) {
    l.reference_nll_auto_.push_back(l.reference_nll_.front());
  }
  for (const auto& t : l.tasks_) {
    if (!read_eval_sets) break;
    auto parsed = ParseJsonlFile(state_dir + "/" + t.eval_file, ValidationOptions{});
    if (!parsed.ok()) return absl::DataLossError(parsed.status().message());
    l.eval_sets_[t.name] = std::move(parsed->examples);
  }
  return l;
}

void ResultsLedger::WriteTo(CheckpointData* d) const {
  d->tasks = tasks_;
  d->matrix = matrix_;
  d->base = base_scores_;
  d->reference_nll = reference_nll_;
  d->stage_versions = stage_versions_;
  d->routed_matrix = routed_matrix_;
  d->auto_matrix = auto_matrix_;
  d->router_accuracy = router_accuracy_;
  d->reference_nll_auto = reference_nll_auto_;
}

void ResultsLedger::SetBaseReferenceNll(double nll) {
  if (reference_nll_.empty()) reference_nll_.push_back(nll);
  // Stage 0 of the auto view is the base model too.
  if (reference_nll_auto_.empty()) reference_nll_auto_.push_back(reference_nll_.front());
}

bool ResultsLedger::HasTask(const std::string& name) const {
  return std::any_of(tasks_.begin(), tasks_.end(), [&](const CheckpointTask& t) { return t.name == name; });
}

const std::vector<Example>& ResultsLedger::EvalSet(const std::string& task) const {
  static const std::vector<Example>* const kEmpty = new std::vector<Example>();
  auto it = eval_sets_.find(task);
  return it == eval_sets_.end() ? *kEmpty : it->second;
}

ResultsLedger ResultsLedger::WithStage(const StageResult& s) const {
  ResultsLedger n = *this;
  n.tasks_.push_back(s.task);
  n.eval_sets_[s.task.name] = s.eval;
  const size_t tasks = n.tasks_.size();
  AddViewRow(&n.routed_matrix_, tasks, s.routed_scores);
  AddViewRow(&n.auto_matrix_, tasks, s.auto_scores);
  AddViewRow(&n.router_accuracy_, tasks, s.router_accuracy);
  n.reference_nll_auto_.resize(tasks, Nan());  // [0] = base, then one per earlier stage
  if (!n.reference_nll_.empty() && std::isnan(n.reference_nll_auto_[0])) {
    n.reference_nll_auto_[0] = n.reference_nll_[0];
  }
  n.reference_nll_auto_.push_back(s.reference_nll_auto);
  // a[t-1][t] goes into the previous row (FWT); the new row holds every task after stage t.
  if (!n.matrix_.empty()) n.matrix_.back().push_back(s.pre_score);
  for (auto& r : n.matrix_) r.resize(tasks, Nan());
  n.matrix_.push_back(s.scores);
  n.base_scores_.push_back(s.base_score);
  if (n.reference_nll_.empty()) n.reference_nll_.push_back(Nan());
  n.reference_nll_.push_back(s.reference_nll);
  n.stage_versions_.resize(tasks - 1, 0);
  n.stage_versions_.push_back(s.weights_version);
  return n;
}

std::vector<TaskInfo> ResultsLedger::Tasks(const std::string& method) const {
  std::vector<TaskInfo> out;
  const auto& m = matrix_;
  std::vector<std::optional<double>> forgetting;
  if (!m.empty()) {
    auto cl = ComputeClReport(m, base_scores_);
    if (cl.ok()) forgetting = cl->task_forgetting;
  }
  for (size_t j = 0; j < tasks_.size(); ++j) {
    const auto& t = tasks_[j];
    TaskInfo info;
    info.name = t.name;
    info.index = static_cast<int32_t>(j + 1);
    info.scorer = t.scorer;
    info.method = method;
    info.job_id = t.job_id;
    info.description = t.description;
    info.eval_examples = t.eval_examples;
    info.base_score = j < base_scores_.size() ? base_scores_[j] : Nan();
    info.history.push_back({0, "", info.base_score, 0});
    for (size_t i = 0; i < m.size(); ++i) {
      if (j >= m[i].size() || std::isnan(m[i][j])) continue;
      info.history.push_back({static_cast<int32_t>(i + 1), tasks_[i].name, m[i][j],
                              i < stage_versions_.size() ? stage_versions_[i] : 0});
      if (i == j) info.learned_score = m[i][j];
    }
    info.current_score = Latest(m, j);
    info.current_routed_score = Latest(routed_matrix_, j);
    info.current_auto_score = Latest(auto_matrix_, j);
    info.router_accuracy = Latest(router_accuracy_, j);
    // F_j as ALGORITHMS.md section 7 defines it (metrics.h); 0 for the newest task.
    info.forgetting = j < forgetting.size() && forgetting[j].has_value() ? *forgetting[j] : 0.0;
    out.push_back(std::move(info));
  }
  return out;
}

EngineReport ResultsLedger::Report() const {
  EngineReport r;
  for (const auto& t : tasks_) r.tasks.push_back(t.name);
  r.matrix = matrix_;
  r.base = base_scores_;
  r.reference_nll = reference_nll_;
  r.routed_matrix = routed_matrix_;
  r.auto_matrix = auto_matrix_;
  r.router_accuracy = router_accuracy_;
  r.reference_nll_auto = reference_nll_auto_;
  // The auto view's summary once every stage of it was measured.
  const bool auto_complete = !r.auto_matrix.empty() && r.auto_matrix.size() == r.matrix.size() &&
                             std::all_of(r.auto_matrix.begin(), r.auto_matrix.end(),
                                         [](const std::vector<double>& row) { return !row.empty(); });
  if (auto_complete) {
    auto cl = ComputeClReport(r.auto_matrix, r.base);
    if (cl.ok()) {
      r.auto_average_score = cl->aa;
      r.auto_backward_transfer = cl->bwt;
      r.auto_forgetting = cl->forgetting;
    }
  }
  if (!r.matrix.empty()) {
    auto cl = ComputeClReport(r.matrix, r.base);
    if (cl.ok()) {
      r.average_score = cl->aa;
      r.backward_transfer = cl->bwt;
      r.forward_transfer = cl->fwt;
      r.forgetting = cl->forgetting;
    }
  }
  return r;
}

}  // namespace strata
