#pragma once
// Task directories: train.jsonl + test.jsonl + task.json, in either format
//  * native (../shared/data/cl-small/<task>): task.json {"name", "kind": "knowledge"|"skill",
//    "scorer": "exact_match"|"choice"|"nll", ...}; lines in the service's format (jsonl.h);
//  * cl benchmark (../shared/data/cl/<task>): task.json {"name", "instruction", "labels", ...};
//    lines {"text", "label"} converted with the benchmark prompt (cl_benchmark.h).
// The format is detected from task.json: an "instruction" field means the benchmark.
//
// Defaults when native task.json omits them: "kind" = skill; "scorer" = choice for choice
// examples, nll for text examples, exact_match otherwise. A benchmark task is kind skill, scorer
// choice. The name is task.json "name", else the directory's base name.
// Consistency checks: scorer choice needs choice examples; exact_match needs completion or choice
// examples; train and test hold the same example kind.
//
// Capping (max_train / max_test > 0): a seeded uniform sample without replacement, kept in file
// order (the shared files are sorted, e.g. capitals alphabetically, so a head would be biased).
// Same seed, same files -> same subset on every platform (own RNG, not std distributions).
// For kind knowledge (test = the trained facts), the test split is first restricted to examples
// that are in the (capped) train split, then capped itself.
//
// Thread safety: functions are pure. Errors: NOT_FOUND for a missing directory/file,
// INVALID_ARGUMENT naming the file (and line) otherwise.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/data/example.h"
#include "core/data/jsonl.h"

namespace strata {

enum class TaskKind { kKnowledge, kSkill };
enum class Scorer { kExactMatch, kChoice, kNll };
enum class TaskFormat { kNative, kClBenchmark };

std::string_view TaskKindName(TaskKind kind);  // "knowledge", "skill"
std::optional<TaskKind> ParseTaskKind(std::string_view name);
std::string_view ScorerName(Scorer scorer);  // "exact_match", "choice", "nll"
std::optional<Scorer> ParseScorer(std::string_view name);
std::string_view TaskFormatName(TaskFormat format);  // "native", "cl_benchmark"

struct TaskData {
  std::string name;
  TaskKind kind = TaskKind::kSkill;
  Scorer scorer = Scorer::kExactMatch;
  TaskFormat format = TaskFormat::kNative;
  ExampleKind example_kind = ExampleKind::kCompletion;
  std::vector<Example> train;
  std::vector<Example> test;
  // Lines dropped by skip_bad_lines, and examples before capping.
  int64_t skipped_train_lines = 0;
  int64_t skipped_test_lines = 0;
  int64_t total_train = 0;
  int64_t total_test = 0;
};

struct TaskLoadOptions {
  int64_t max_train = 0;  // 0 = all
  int64_t max_test = 0;   // 0 = all
  uint64_t seed = 0;
  // Line validation (skip_bad_lines, token limit with a tokenizer, ...). `cl_task` is ignored:
  // it is set from task.json for benchmark tasks.
  ValidationOptions validation;
};

absl::StatusOr<TaskFormat> DetectTaskFormat(const std::string& dir);

absl::StatusOr<TaskData> LoadTaskDir(const std::string& dir, const TaskLoadOptions& options = {});

// `k` distinct indices of [0, n), sorted ascending, uniformly sampled with `seed` (all of them when
// k >= n). Deterministic across platforms.
std::vector<size_t> SampleIndices(size_t n, size_t k, uint64_t seed);

// Holds out a task's eval split from its training examples when no eval data was sent:
// floor(n · eval_fraction) examples (at least 1 when the fraction is > 0, at most eval_cap), drawn
// with `seed`; both splits keep the file order. Returns the eval split and leaves the rest in
// `train`. INVALID_ARGUMENT naming `task` when nothing would be held out or nothing would be left
// to train on (`train` is then unchanged).
absl::StatusOr<std::vector<Example>> HoldOutEval(std::vector<Example>* train, double eval_fraction,
                                                 int64_t eval_cap, uint64_t seed, const std::string& task);

}  // namespace strata
