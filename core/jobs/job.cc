#include "core/jobs/job.h"

#include <chrono>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "core/data/dataset.h"
#include "core/util/status_macros.h"
#include "nlohmann/json.hpp"

namespace strata {

using nlohmann::json;

const char* JobStateName(JobState s) {
  switch (s) {
    case JobState::kQueued:
      return "queued";
    case JobState::kTraining:
      return "training";
    case JobState::kEvaluating:
      return "evaluating";
    case JobState::kSucceeded:
      return "succeeded";
    case JobState::kFailed:
      return "failed";
    case JobState::kCancelled:
      return "cancelled";
    case JobState::kHeld:
      return "held";
    case JobState::kRolledBack:
      return "rolled_back";
  }
  return "unknown";
}

std::optional<JobState> ParseJobState(const std::string& name) {
  for (JobState s : {JobState::kQueued, JobState::kTraining, JobState::kEvaluating, JobState::kSucceeded,
                     JobState::kFailed, JobState::kCancelled, JobState::kHeld, JobState::kRolledBack}) {
    if (name == JobStateName(s)) return s;
  }
  return std::nullopt;
}

bool IsTerminal(JobState s) {
  return s == JobState::kSucceeded || s == JobState::kFailed || s == JobState::kCancelled ||
         s == JobState::kHeld || s == JobState::kRolledBack;
}

std::string HoldReasonKind(const std::string& reason) { return reason.substr(0, reason.find(':')); }

absl::Status ValidateTaskName(const std::string& name, const std::string& field) {
  if (name.empty() || name.size() > 64) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": '", name, "' must be 1-64 characters"));
  }
  for (char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
              c == '_' || c == '-';
    if (!ok) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": '", name, "' may only contain letters, digits, '.', '_' and '-'"));
    }
  }
  if (name == "." || name == "..")
    return absl::InvalidArgumentError(absl::StrCat(field, ": not a valid name"));
  // Route names of Generate/Score: a task may not take them.
  if (name == "auto" || name == "merged" || name == "base") {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ": '", name, "' is reserved (requests use auto, merged and base as route names)"));
  }
  return absl::OkStatus();
}

absl::Status ValidateTaskSpecification(const TaskSpecification& spec) {
  RETURN_IF_ERROR(ValidateTaskName(spec.name, "spec.name"));
  for (size_t i = 0; i < spec.import_dirs.size(); ++i) {
    if (spec.import_dirs[i].empty()) {
      return absl::InvalidArgumentError(absl::StrCat("spec.import_dirs[", i, "]: empty path"));
    }
  }
  if (!(spec.eval_fraction >= 0 && spec.eval_fraction < 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("spec.eval_fraction: must be in [0, 1), got ", spec.eval_fraction));
  }
  if (spec.eval_cap < 1) return absl::InvalidArgumentError("spec.eval_cap: must be >= 1");
  if (!spec.scorer.empty() && !ParseScorer(spec.scorer).has_value()) {
    return absl::InvalidArgumentError(
        absl::StrCat("spec.scorer: '", spec.scorer, "' (expected choice, exact_match or nll)"));
  }
  if (absl::Status st = ValidateOverrides(spec.overrides); !st.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("spec.", st.message()));
  }
  if (spec.min_score.has_value()) {
    if (!std::isfinite(*spec.min_score) || *spec.min_score < 0 || *spec.min_score > 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "spec.min_score: must be in [0, 1] (a fraction of the eval split), got ", *spec.min_score));
    }
    if (spec.scorer == "nll") {
      return absl::InvalidArgumentError(
          "spec.min_score: does not apply to the nll scorer (lower is better; scores are not fractions)");
    }
  }
  return absl::OkStatus();
}

namespace {
template <typename T>
void PutOpt(json& j, const char* key, const std::optional<T>& v) {
  if (v.has_value()) j[key] = *v;
}
// An integer field as T: absent or null -> `fallback`; a float, string, ... or a value outside T's
// range throws std::invalid_argument naming the field (caught below as DATA_LOSS). nlohmann's own
// get<int64_t>() casts a float such as 5e88 to an integer, which is undefined behaviour.
template <typename T>
T IntOr(const json& j, const char* key, T fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  bool in_range = false;
  T out{};
  if (it->is_number_unsigned()) {
    const uint64_t v = it->get<uint64_t>();
    in_range = v <= static_cast<uint64_t>(std::numeric_limits<T>::max());
    out = static_cast<T>(v);
  } else if (it->is_number_integer()) {
    const int64_t v = it->get<int64_t>();
    in_range = v >= static_cast<int64_t>(std::numeric_limits<T>::min()) &&
               v <= static_cast<int64_t>(std::numeric_limits<T>::max());
    out = static_cast<T>(v);
  } else {
    throw std::invalid_argument(
        absl::StrCat("field \"", key, "\": expected an integer, got ", it->type_name()));
  }
  if (!in_range) throw std::invalid_argument(absl::StrCat("field \"", key, "\": integer out of range"));
  return out;
}

template <typename T>
T IntAt(const json& j, const char* key) {
  if (!j.contains(key)) throw std::invalid_argument(absl::StrCat("missing field \"", key, "\""));
  return IntOr<T>(j, key, T{});
}

template <typename T>
void GetOpt(const json& j, const char* key, std::optional<T>& v) {
  if (!j.contains(key) || j[key].is_null()) return;
  if constexpr (std::is_integral_v<T>) {
    v = IntOr<T>(j, key, T{});
  } else {
    v = j[key].get<T>();
  }
}
}  // namespace

std::string JobToJson(const JobRecord& job) {
  json o = json::object();
  PutOpt(o, "learning_rate", job.spec.overrides.learning_rate);
  PutOpt(o, "max_steps", job.spec.overrides.max_steps);
  PutOpt(o, "epochs", job.spec.overrides.epochs);
  PutOpt(o, "batch_size", job.spec.overrides.batch_size);
  PutOpt(o, "rank", job.spec.overrides.rank);
  PutOpt(o, "alpha", job.spec.overrides.alpha);
  PutOpt(o, "ella_lambda", job.spec.overrides.ella_lambda);
  PutOpt(o, "seed", job.spec.overrides.seed);
  PutOpt(o, "max_seq_len", job.spec.overrides.max_seq_len);
  json spec = {{"name", job.spec.name},
               {"method", job.spec.method},
               {"overrides", o},
               {"eval_fraction", job.spec.eval_fraction},
               {"eval_cap", job.spec.eval_cap},
               {"scorer", job.spec.scorer},
               {"description", job.spec.description}};
  if (job.spec.min_score.has_value()) spec["min_score"] = *job.spec.min_score;
  if (!job.spec.import_dirs.empty()) spec["import_dirs"] = job.spec.import_dirs;
  json results = json::array();
  for (const auto& [task, score] : job.eval_results) results.push_back({{"task", task}, {"score", score}});
  json j = {{"format", "strata.job.v1"},
            {"id", job.id},
            {"sequence", job.sequence},
            {"spec", spec},
            {"state", JobStateName(job.state)},
            {"created", job.created},
            {"started", job.started},
            {"finished", job.finished},
            {"train_examples", job.train_examples},
            {"eval_examples", job.eval_examples},
            {"progress",
             {{"step", job.progress.step},
              {"total_steps", job.progress.total_steps},
              {"epoch", job.progress.epoch},
              {"loss", std::isfinite(job.progress.loss) ? job.progress.loss : 0.0},
              {"learning_rate", job.progress.learning_rate},
              {"tokens_per_second", job.progress.tokens_per_second},
              {"eta_seconds", job.progress.eta_seconds}}},
            {"error", job.error},
            {"eval_results", results},
            {"weights_version", job.weights_version},
            {"reference_nll", std::isfinite(job.reference_nll) ? job.reference_nll : 0.0},
            {"attempts", job.attempts}};
  if (!job.hold_reasons.empty()) j["hold_reasons"] = job.hold_reasons;
  return j.dump(1, ' ', false, json::error_handler_t::replace);
}

absl::StatusOr<JobRecord> JobFromJson(const std::string& text, const std::string& source) {
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object())
    return absl::DataLossError(absl::StrCat(source, ": not a JSON object"));
  try {
    JobRecord job;
    job.id = j.at("id").get<std::string>();
    job.sequence = IntAt<int64_t>(j, "sequence");
    const json& s = j.at("spec");
    job.spec.name = s.at("name").get<std::string>();
    job.spec.method = s.value("method", "");
    job.spec.eval_fraction = s.value("eval_fraction", 0.1);
    job.spec.eval_cap = IntOr<int32_t>(s, "eval_cap", 200);
    job.spec.scorer = s.value("scorer", "");
    job.spec.description = s.value("description", "");
    if (s.contains("min_score") && !s["min_score"].is_null())
      job.spec.min_score = s["min_score"].get<double>();
    if (s.contains("import_dirs")) job.spec.import_dirs = s.at("import_dirs").get<std::vector<std::string>>();
    if (s.contains("overrides")) {
      const json& o = s["overrides"];
      GetOpt(o, "learning_rate", job.spec.overrides.learning_rate);
      GetOpt(o, "max_steps", job.spec.overrides.max_steps);
      GetOpt(o, "epochs", job.spec.overrides.epochs);
      GetOpt(o, "batch_size", job.spec.overrides.batch_size);
      GetOpt(o, "rank", job.spec.overrides.rank);
      GetOpt(o, "alpha", job.spec.overrides.alpha);
      GetOpt(o, "ella_lambda", job.spec.overrides.ella_lambda);
      GetOpt(o, "seed", job.spec.overrides.seed);
      GetOpt(o, "max_seq_len", job.spec.overrides.max_seq_len);
    }
    auto state = ParseJobState(j.at("state").get<std::string>());
    if (!state) return absl::DataLossError(absl::StrCat(source, ": field \"state\": unknown value"));
    job.state = *state;
    job.created = j.value("created", 0.0);
    job.started = j.value("started", 0.0);
    job.finished = j.value("finished", 0.0);
    job.train_examples = IntOr<int64_t>(j, "train_examples", 0);
    job.eval_examples = IntOr<int64_t>(j, "eval_examples", 0);
    if (j.contains("progress")) {
      const json& p = j["progress"];
      job.progress.step = IntOr<int64_t>(p, "step", 0);
      job.progress.total_steps = IntOr<int64_t>(p, "total_steps", 0);
      job.progress.epoch = IntOr<int32_t>(p, "epoch", 0);
      job.progress.loss = p.value("loss", 0.0);
      job.progress.learning_rate = p.value("learning_rate", 0.0);
      job.progress.tokens_per_second = p.value("tokens_per_second", 0.0);
      job.progress.eta_seconds = p.value("eta_seconds", 0.0);
    }
    job.error = j.value("error", "");
    if (j.contains("eval_results")) {
      for (const auto& r : j["eval_results"]) {
        job.eval_results.emplace_back(r.at("task").get<std::string>(), r.at("score").get<double>());
      }
    }
    job.weights_version = IntOr<int64_t>(j, "weights_version", 0);
    job.reference_nll = j.value("reference_nll", 0.0);
    job.attempts = IntOr<int32_t>(j, "attempts", 0);
    if (j.contains("hold_reasons")) job.hold_reasons = j["hold_reasons"].get<std::vector<std::string>>();
    return job;
  } catch (const std::exception& e) {
    return absl::DataLossError(absl::StrCat(source, ": ", e.what()));
  }
}

double NowUnixSeconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace strata
