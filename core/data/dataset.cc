#include "core/data/dataset.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <numeric>
#include <random>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/data/cl_benchmark.h"
#include "core/data/random.h"
#include "core/util/file_util.h"
#include "core/util/status_macros.h"
#include "nlohmann/json.hpp"

namespace strata {
namespace {

using nlohmann::json;

std::string JoinPath(const std::string& dir, const char* name) {
  return (std::filesystem::path(dir) / name).string();
}

absl::StatusOr<json> ReadTaskJson(const std::string& dir) {
  const std::string path = JoinPath(dir, "task.json");
  if (!PathExists(dir)) return absl::NotFoundError(absl::StrCat(dir, ": no such task directory"));
  ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {  // parse_error, or out_of_range for 1e999
    return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON: ", e.what()));
  }
  if (!j.is_object()) return absl::InvalidArgumentError(absl::StrCat(path, ": expected a JSON object"));
  return j;
}

// Optional string field of task.json.
absl::StatusOr<std::optional<std::string>> OptionalString(const json& j, const char* field,
                                                          const std::string& path) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) return std::optional<std::string>();
  if (!it->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": field \"", field, "\": expected a string, got ", it->type_name()));
  }
  return std::optional<std::string>(it->get<std::string>());
}

// "a/b/capitals/" -> "capitals".
std::string DirBaseName(const std::string& dir) {
  std::filesystem::path p = std::filesystem::path(dir).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();
  return p.filename().string();
}

std::vector<Example> Select(std::vector<Example> all, const std::vector<size_t>& indices) {
  std::vector<Example> out;
  out.reserve(indices.size());
  for (size_t i : indices) out.push_back(std::move(all[i]));
  return out;
}

std::vector<Example> Cap(std::vector<Example> all, int64_t max, uint64_t seed) {
  if (max <= 0 || static_cast<size_t>(max) >= all.size()) return all;
  return Select(std::move(all), SampleIndices(all.size(), static_cast<size_t>(max), seed));
}

}  // namespace

std::string_view TaskKindName(TaskKind kind) { return kind == TaskKind::kKnowledge ? "knowledge" : "skill"; }

std::optional<TaskKind> ParseTaskKind(std::string_view name) {
  if (name == "knowledge") return TaskKind::kKnowledge;
  if (name == "skill") return TaskKind::kSkill;
  return std::nullopt;
}

std::string_view ScorerName(Scorer scorer) {
  switch (scorer) {
    case Scorer::kExactMatch:
      return "exact_match";
    case Scorer::kChoice:
      return "choice";
    case Scorer::kNll:
      return "nll";
  }
  return "unknown";
}

std::optional<Scorer> ParseScorer(std::string_view name) {
  if (name == "exact_match") return Scorer::kExactMatch;
  if (name == "choice") return Scorer::kChoice;
  if (name == "nll") return Scorer::kNll;
  return std::nullopt;
}

std::string_view TaskFormatName(TaskFormat format) {
  return format == TaskFormat::kNative ? "native" : "cl_benchmark";
}

std::vector<size_t> SampleIndices(size_t n, size_t k, uint64_t seed) {
  std::vector<size_t> idx(n);
  std::iota(idx.begin(), idx.end(), size_t{0});
  if (k >= n) return idx;
  // Partial Fisher-Yates: the first k positions become a uniform sample.
  Rng rng(seed);
  for (size_t i = 0; i < k; ++i) {
    const size_t j = i + static_cast<size_t>(rng.Below(n - i));
    std::swap(idx[i], idx[j]);
  }
  idx.resize(k);
  std::sort(idx.begin(), idx.end());
  return idx;
}

absl::StatusOr<TaskFormat> DetectTaskFormat(const std::string& dir) {
  ASSIGN_OR_RETURN(json j, ReadTaskJson(dir));
  return j.contains("instruction") ? TaskFormat::kClBenchmark : TaskFormat::kNative;
}

absl::StatusOr<TaskData> LoadTaskDir(const std::string& dir, const TaskLoadOptions& options) {
  ASSIGN_OR_RETURN(json j, ReadTaskJson(dir));
  const std::string task_json = JoinPath(dir, "task.json");
  TaskData task;
  task.format = j.contains("instruction") ? TaskFormat::kClBenchmark : TaskFormat::kNative;

  ASSIGN_OR_RETURN(std::optional<std::string> name, OptionalString(j, "name", task_json));
  task.name = name && !name->empty() ? *name : DirBaseName(dir);

  ValidationOptions vopts = options.validation;
  vopts.cl_task = nullptr;
  ClTaskSpec spec;
  std::optional<TaskKind> kind;
  std::optional<Scorer> scorer;
  if (task.format == TaskFormat::kClBenchmark) {
    ASSIGN_OR_RETURN(spec, ParseClTaskSpec(j.dump(), task_json));
    vopts.cl_task = &spec;
    kind = TaskKind::kSkill;
    scorer = Scorer::kChoice;
  } else {
    ASSIGN_OR_RETURN(std::optional<std::string> kind_name, OptionalString(j, "kind", task_json));
    if (kind_name) {
      kind = ParseTaskKind(*kind_name);
      if (!kind) {
        return absl::InvalidArgumentError(
            absl::StrCat(task_json, ": field \"kind\": \"", *kind_name, "\" is not one of knowledge, skill"));
      }
    }
    ASSIGN_OR_RETURN(std::optional<std::string> scorer_name, OptionalString(j, "scorer", task_json));
    if (scorer_name) {
      scorer = ParseScorer(*scorer_name);
      if (!scorer) {
        return absl::InvalidArgumentError(absl::StrCat(task_json, ": field \"scorer\": \"", *scorer_name,
                                                       "\" is not one of exact_match, choice, nll"));
      }
    }
  }

  ASSIGN_OR_RETURN(ParsedJsonl train, ParseJsonlFile(JoinPath(dir, "train.jsonl"), vopts));
  ASSIGN_OR_RETURN(ParsedJsonl test, ParseJsonlFile(JoinPath(dir, "test.jsonl"), vopts));
  // Both succeeded, so both have at least one example and hence a kind.
  task.example_kind = *train.summary.kind;
  if (*test.summary.kind != task.example_kind) {
    return absl::InvalidArgumentError(absl::StrCat(
        dir, ": train.jsonl holds ", std::string(ExampleKindName(task.example_kind)),
        " examples but test.jsonl holds ", std::string(ExampleKindName(*test.summary.kind)), " examples"));
  }
  task.kind = kind.value_or(TaskKind::kSkill);
  if (!scorer) {
    scorer = task.example_kind == ExampleKind::kChoice ? Scorer::kChoice
             : task.example_kind == ExampleKind::kText ? Scorer::kNll
                                                       : Scorer::kExactMatch;
  }
  task.scorer = *scorer;
  if (task.scorer == Scorer::kChoice && task.example_kind != ExampleKind::kChoice) {
    return absl::InvalidArgumentError(absl::StrCat(
        task_json, ": scorer \"choice\" needs examples with \"choices\", ",
        "but the task's examples are of kind ", std::string(ExampleKindName(task.example_kind))));
  }
  if (task.scorer == Scorer::kExactMatch && task.example_kind == ExampleKind::kText) {
    return absl::InvalidArgumentError(
        absl::StrCat(task_json, ": scorer \"exact_match\" needs prompt/completion examples, not text"));
  }

  task.skipped_train_lines = train.summary.bad_lines;
  task.skipped_test_lines = test.summary.bad_lines;
  task.total_train = static_cast<int64_t>(train.examples.size());
  task.total_test = static_cast<int64_t>(test.examples.size());
  task.train = Cap(std::move(train.examples), options.max_train, options.seed);

  std::vector<Example> test_examples = std::move(test.examples);
  if (task.kind == TaskKind::kKnowledge && task.train.size() < static_cast<size_t>(task.total_train)) {
    std::set<std::string> trained;
    for (const auto& e : task.train) trained.insert(ExampleToJsonLine(e));
    std::vector<Example> kept;
    for (auto& e : test_examples) {
      if (trained.count(ExampleToJsonLine(e)) > 0) kept.push_back(std::move(e));
    }
    test_examples = std::move(kept);
  }
  // A different stream for the test split, so that a test file equal to train is not sampled in
  // lockstep by accident for skill tasks.
  task.test = Cap(std::move(test_examples), options.max_test, options.seed ^ 0x9E3779B97F4A7C15ull);
  return task;
}

absl::StatusOr<std::vector<Example>> HoldOutEval(std::vector<Example>* train, double eval_fraction,
                                                 int64_t eval_cap, uint64_t seed, const std::string& task) {
  const size_t n = train->size();
  size_t n_eval = static_cast<size_t>(std::floor(static_cast<double>(n) * eval_fraction));
  if (eval_fraction > 0 && n_eval == 0) n_eval = 1;
  n_eval = std::min(n_eval, static_cast<size_t>(std::max<int64_t>(eval_cap, 0)));
  if (n_eval == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("task '", task, "': no eval data; send eval chunks or set eval_fraction > 0"));
  }
  if (n_eval >= n) {
    return absl::InvalidArgumentError(
        absl::StrCat("task '", task, "': ", n,
                     " example(s) cannot be split into training and held-out eval "
                     "data; send more examples or separate eval data"));
  }
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(seed);
  for (size_t i = n - 1; i > 0; --i) {
    std::uniform_int_distribution<size_t> pick(0, i);
    std::swap(order[i], order[pick(rng)]);
  }
  std::vector<bool> is_eval(n, false);
  for (size_t i = 0; i < n_eval; ++i) is_eval[order[i]] = true;
  std::vector<Example> kept, eval;
  kept.reserve(n - n_eval);
  eval.reserve(n_eval);
  for (size_t i = 0; i < n; ++i) (is_eval[i] ? eval : kept).push_back(std::move((*train)[i]));
  *train = std::move(kept);
  return eval;
}

}  // namespace strata
