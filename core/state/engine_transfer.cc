#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include <filesystem>
#include <set>

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

// The task an adapter directory becomes: the directory's name.
std::string AdapterTaskName(const std::string& dir) {
  return fs::path(AbsolutePath(dir)).filename().string();
}

}  // namespace

absl::Status Engine::CheckImport(const std::vector<std::string>& dirs) const {
  if (dirs.empty()) return absl::InvalidArgumentError("dirs: at least one adapter directory is required");
  std::shared_ptr<const ServedVersion> current = Current();
  const MethodDescriptor* method = FindMethodDescriptor(current->method->name());
  if (method == nullptr || !method->adapter_import) return AdapterImportUnsupported(current->method->name());
  std::set<std::string> names;
  for (size_t i = 0; i < dirs.size(); ++i) {
    const std::string task = AdapterTaskName(dirs[i]);
    RETURN_IF_ERROR(ValidateTaskName(task, absl::StrCat("dirs[", i, "] (", dirs[i], ")")));
    if (!names.insert(task).second) {
      return absl::InvalidArgumentError(absl::StrCat("dirs[", i, "]: task '", task, "' is imported twice"));
    }
    if (TaskIsLearned(task))
      return absl::AlreadyExistsError(absl::StrCat("task '", task, "' already exists"));
    auto adapter = ReadPeftLoraAdapter(dirs[i]);
    if (!adapter.ok()) return adapter.status();
  }
  return absl::OkStatus();
}

absl::StatusOr<JobOutcome> Engine::RunImport(const JobRecord& job) {
  const std::vector<std::string>& dirs = job.spec.import_dirs;
  Impl& s = *impl_;
  absl::MutexLock train_lock(&s.train_mu);
  RETURN_IF_ERROR(CheckImport(dirs));
  SetTorchThreads(s.options.training_threads);
  ASSIGN_OR_RETURN(MethodState previous_state, s.method->ExportState());
  auto rollback = [&](absl::Status st) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.train_mu) {
    return s.Rollback(previous_state, std::move(st));
  };
  std::vector<std::string> names;
  for (const auto& dir : dirs) {
    const std::string task = AdapterTaskName(dir);
    auto adapter = ReadPeftLoraAdapter(dir);
    if (!adapter.ok()) return rollback(adapter.status());
    if (auto st = s.method->ImportPeftAdapter(task, *adapter, *s.base); !st.ok()) return rollback(st);
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
  const CheckpointData snapshot = s.Snapshot(*new_state, ledger, s.router, before->version + 1);
  // Imported adapters come without data: they get no router statistics (served by name only).
  auto version =
      s.CheckpointAndPublish(snapshot, *new_state, std::shared_ptr<const CausalLM>(std::move(served)),
                             before->tasks_learned, s.router, std::move(ledger));
  if (!version.ok()) return rollback(version.status());
  spdlog::info("job {}: imported {} adapter(s) [{}] into the {} state: weights version {}", job.id,
               names.size(), absl::StrJoin(names, ", "), s.method->name(), (*version)->version);
  if (on_publish_) on_publish_();
  JobOutcome outcome;
  outcome.weights_version = (*version)->version;
  return outcome;
}

}  // namespace strata
