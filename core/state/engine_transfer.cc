#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/adapt/method.h"
#include "core/adapt/peft_import.h"
#include "core/model/model.h"
#include "core/model/runtime.h"
#include "core/state/engine.h"
#include "core/state/engine_impl.h"
#include "core/util/file_util.h"
#include "core/util/status_macros.h"

// Export (merged weights, the adaptation state) and import (PEFT LoRA adapters into the state).

namespace strata {
namespace fs = std::filesystem;

absl::Status Engine::ExportWeights(const std::string& dir) const {
  auto current = Current();
  RETURN_IF_ERROR(current->model->SaveHf(dir));
  if (!impl_->options.base_model_id.empty() && impl_->options.base_model_id != "embedded-default") {
    for (const char* f : {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}) {
      std::string src = impl_->options.base_model_id + "/" + f;
      if (!PathExists(src)) continue;
      ASSIGN_OR_RETURN(std::string text, ReadFile(src));
      RETURN_IF_ERROR(WriteFileAtomic(dir + "/" + f, text));
    }
  }
  return absl::OkStatus();
}

absl::Status Engine::ExportState(const std::string& dir) const {
  RETURN_IF_ERROR(MakeDirs(dir));
  std::error_code ec;
  const std::string src = impl_->options.state_dir + "/checkpoint";
  if (!PathExists(src))
    return absl::FailedPreconditionError("no task learned yet: there is no state to export");
  for (const auto& e : fs::directory_iterator(src, ec)) {
    ASSIGN_OR_RETURN(std::string text, ReadFile(e.path().string()));
    RETURN_IF_ERROR(WriteFileAtomic(dir + "/" + e.path().filename().string(), text));
  }
  return absl::OkStatus();
}

namespace {

// An import's adapters with the tasks they become (each directory's name), read and checked: the
// method imports, the names follow the task-name rules, are not learned and not repeated.
absl::StatusOr<std::vector<std::pair<std::string, PeftLoraAdapter>>> ReadImport(
    const Engine& engine, const std::vector<std::string>& dirs) {
  if (dirs.empty()) return absl::InvalidArgumentError("dirs: at least one adapter directory is required");
  const std::string method = engine.Current()->method->name();
  const MethodDescriptor* descriptor = FindMethodDescriptor(method);
  if (descriptor == nullptr || !descriptor->adapter_import) return AdapterImportUnsupported(method);
  std::vector<std::pair<std::string, PeftLoraAdapter>> out;
  for (size_t i = 0; i < dirs.size(); ++i) {
    const std::string task = fs::path(AbsolutePath(dirs[i])).filename().string();
    if (absl::Status st = ValidateTaskName(task, "name"); !st.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("dirs[", i, "]: the task name is the directory's name '",
                                                     task, "', which is not a valid task name (",
                                                     st.message(), "); rename the directory"));
    }
    for (size_t j = 0; j < out.size(); ++j) {
      if (out[j].first == task) {
        return absl::InvalidArgumentError(absl::StrCat(
            "dirs[", i, "]: dirs[", j, "] has the same directory name '", task, "' (one task each)"));
      }
    }
    if (engine.TaskIsLearned(task))
      return absl::AlreadyExistsError(absl::StrCat("task '", task, "' already exists"));
    ASSIGN_OR_RETURN(PeftLoraAdapter adapter, ReadPeftLoraAdapter(dirs[i]));
    out.emplace_back(task, std::move(adapter));
  }
  return out;
}

}  // namespace

absl::StatusOr<std::vector<std::string>> Engine::CheckImport(const std::vector<std::string>& dirs) const {
  ASSIGN_OR_RETURN(auto adapters, ReadImport(*this, dirs));
  std::vector<std::string> names;
  for (const auto& [task, adapter] : adapters) names.push_back(task);
  return names;
}

absl::StatusOr<JobOutcome> Engine::RunImport(const JobRecord& job) {
  Impl& s = *impl_;
  absl::MutexLock train_lock(&s.train_mu);
  // Read again at run time: the state (learned tasks) and the files may have changed since the
  // import was queued.
  ASSIGN_OR_RETURN(auto adapters, ReadImport(*this, job.spec.import_dirs));
  SetTorchThreads(s.options.training_threads);
  ASSIGN_OR_RETURN(MethodState previous_state, s.method->ExportState());
  auto rollback = [&](absl::Status st) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.train_mu) {
    return s.Rollback(previous_state, std::move(st));
  };
  std::vector<std::string> names;
  for (const auto& [task, adapter] : adapters) {
    if (auto st = s.method->ImportPeftAdapter(task, adapter, *s.base); !st.ok()) return rollback(st);
    names.push_back(task);
  }
  auto served = s.base->ShallowCopy();
  if (auto st = s.method->ApplyServedWeights(served.get()); !st.ok()) return rollback(st);
  auto new_state = s.method->ExportState();
  if (!new_state.ok()) return rollback(new_state.status());
  std::shared_ptr<const ServedVersion> before = Current();
  ResultsLedger ledger;
  {
    absl::MutexLock lock(&s.mu);
    ledger = s.ledger;
  }
  const int64_t new_version = s.NextVersion(before->version);
  const ResultsLedger kept_ledger = ledger;
  const CheckpointData snapshot = s.Snapshot(*new_state, ledger, s.router, new_version);
  // Imported adapters come without data: they get no router statistics (served by name only).
  auto version =
      s.CheckpointAndPublish(snapshot, *new_state, std::shared_ptr<const CausalLM>(std::move(served)),
                             before->tasks_learned, s.router, std::move(ledger));
  if (!version.ok()) return rollback(version.status());
  // Imports publish without the gate: adapters come without eval data to measure them on.
  s.KeepPublished(
      s.DescribeVersion(new_version, kVersionPublished, before->version, job.id, job.spec.name, kept_ledger));
  spdlog::info("job {}: imported {} adapter(s) [{}] into the {} state: weights version {}", job.id,
               names.size(), absl::StrJoin(names, ", "), s.method->name(), (*version)->version);
  if (on_publish_) on_publish_();
  JobOutcome outcome;
  outcome.weights_version = (*version)->version;
  return outcome;
}

}  // namespace strata
