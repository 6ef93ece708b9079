#include <signal.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/adapt/method.h"
#include "core/adapt/peft_export.h"
#include "core/adapt/peft_import.h"
#include "core/model/model.h"
#include "core/model/runtime.h"
#include "core/state/engine.h"
#include "core/state/engine_impl.h"
#include "core/util/file_util.h"
#include "core/util/status_macros.h"

// Export (merged weights, the adaptation state, a task's route as a PEFT LoRA adapter) and import
// (PEFT LoRA adapters into the state).

namespace strata {
namespace fs = std::filesystem;

namespace {

// Removes the ".<name>.export-tmp-<pid>-<n>" directories beside `target` left by a process that
// crashed mid-export (its pid is gone). A live pid's (this process's concurrent export, or another
// server's) is kept.
void RemoveStaleExportTemps(const fs::path& target) {
  const std::string prefix = absl::StrCat(".", target.filename().string(), ".export-tmp-");
  std::error_code ec;
  for (fs::directory_iterator it(target.parent_path(), ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.rfind(prefix, 0) != 0) continue;
    const std::string rest = name.substr(prefix.size());
    int64_t pid = 0;
    if (!absl::SimpleAtoi(rest.substr(0, rest.find('-')), &pid) || pid <= 0 || pid > INT32_MAX) continue;
    if (pid == ::getpid() || ::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;
    if (RemoveAll(it->path().string()).ok()) {
      spdlog::info("removed {}, left by an export that crashed (process {})", it->path().string(), pid);
    }
  }
}

// Writes an export directory atomically: `write` fills a fresh temporary directory beside `dir`,
// which is then renamed into place (replacing `dir` only with `overwrite`). A crash leaves at most a
// stale ".<name>.export-tmp-*" beside it (removed by the next export to `dir`), never a half-written
// `dir`.
absl::Status WriteExportDir(const std::string& dir, bool overwrite,
                            const std::function<absl::Status(const std::string&)>& write) {
  static std::atomic<int64_t> counter{0};
  std::error_code ec;
  // Absolute, without a trailing '/': a relative `dir` still has a parent to write beside.
  std::string absolute = AbsolutePath(dir);
  while (absolute.size() > 1 && absolute.back() == '/') absolute.pop_back();
  const fs::path target(absolute);
  if (fs::exists(fs::symlink_status(target, ec))) {
    if (!fs::is_directory(fs::symlink_status(target, ec))) {
      return absl::AlreadyExistsError(
          absl::StrCat("export directory ", dir, " exists and is not a directory; choose another path"));
    }
    if (!overwrite && !fs::is_empty(target, ec)) {
      return absl::AlreadyExistsError(absl::StrCat("export directory ", dir,
                                                   " is not empty; set overwrite (strata export --overwrite) "
                                                   "to replace its contents, or choose another directory"));
    }
  }
  const std::string parent = target.parent_path().string();
  RETURN_IF_ERROR(MakeDirs(parent));
  RemoveStaleExportTemps(target);
  const std::string tmp =
      (target.parent_path() /
       absl::StrCat(".", target.filename().string(), ".export-tmp-", ::getpid(), "-", counter.fetch_add(1)))
          .string();
  RETURN_IF_ERROR(RemoveAll(tmp));
  RETURN_IF_ERROR(MakeDirs(tmp));
  absl::Status st = write(tmp);
  if (st.ok()) st = FsyncPath(tmp);
  if (st.ok()) {
    if (overwrite) {
      st = ReplaceDirAtomic(tmp, target.string());
    } else if (::rename(tmp.c_str(), target.c_str()) != 0) {
      // rename(2) replaces only an empty directory: a directory filled since the check is kept.
      const int err = errno;
      st = (err == ENOTEMPTY || err == EEXIST)
               ? absl::AlreadyExistsError(absl::StrCat("export directory ", dir,
                                                       " is not empty (written meanwhile); set overwrite "
                                                       "(strata export --overwrite) to replace it"))
               : absl::InternalError(
                     absl::StrCat("cannot rename ", tmp, " to ", dir, ": ", std::strerror(err)));
    } else {
      st = FsyncPath(parent);
    }
  }
  if (!st.ok()) RemoveAll(tmp).IgnoreError();
  return st;
}

}  // namespace

absl::Status Engine::ExportWeights(const std::string& dir, const ExportOptions& options) const {
  auto current = Current();
  return WriteExportDir(dir, options.overwrite, [&](const std::string& out) -> absl::Status {
    RETURN_IF_ERROR(current->model->SaveHf(out));
    if (!impl_->options.base_model_id.empty() && impl_->options.base_model_id != "embedded-default") {
      for (const char* f : {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}) {
        std::string src = impl_->options.base_model_id + "/" + f;
        if (!PathExists(src)) continue;
        ASSIGN_OR_RETURN(std::string text, ReadFile(src));
        RETURN_IF_ERROR(WriteFileAtomic(out + "/" + f, text));
      }
    }
    return absl::OkStatus();
  });
}

absl::Status Engine::ExportState(const std::string& dir, const ExportOptions& options) const {
  const std::string src = impl_->options.state_dir + "/checkpoint";
  if (!PathExists(src))
    return absl::FailedPreconditionError("no task learned yet: there is no state to export");
  return WriteExportDir(dir, options.overwrite, [&](const std::string& out) -> absl::Status {
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(src, ec)) {
      ASSIGN_OR_RETURN(std::string text, ReadFile(e.path().string()));
      RETURN_IF_ERROR(WriteFileAtomic(out + "/" + e.path().filename().string(), text));
    }
    if (ec) return absl::InternalError(absl::StrCat("cannot list ", src, ": ", ec.message()));
    return absl::OkStatus();
  });
}

absl::StatusOr<AdapterExport> Engine::ExportAdapter(const std::string& task, const std::string& dir,
                                                    const AdapterExportOptions& options) const {
  if (task.empty() || task == "base" || task == "merged" || task == "auto") {
    return absl::InvalidArgumentError(absl::StrCat(
        "task: '", task,
        "' is not a learned task (route 'base' is W0 itself, 'merged' is exported as the full model, 'auto' "
        "chooses a task per prompt); name a learned task"));
  }
  if (options.rank < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank: must be >= 0 (0: the exact rank), got ", options.rank));
  }
  std::shared_ptr<const ServedVersion> version = Current();
  const Method& method = *version->method;
  const std::vector<std::string>& tasks = method.tasks();
  if (std::find(tasks.begin(), tasks.end(), task) == tasks.end()) {
    return absl::NotFoundError(absl::StrCat("no learned task '", task, "'"));
  }
  const CausalLM& base = *impl_->base;
  const std::vector<std::string> linear = base.LinearNames();
  std::vector<ModuleUpdate> updates;
  const bool dense = !method.SupportsTaskRouting();
  if (!dense) {
    // Exactly what serving the route applies on top of W0: the routed model's side paths.
    ASSIGN_OR_RETURN(std::shared_ptr<const CausalLM> routed, Routed(*version, task));
    for (const std::string& name : linear) {
      const LinearLayer* layer = routed->FindLinear(name);
      if (layer == nullptr || layer->adapter == nullptr) continue;
      ModuleUpdate u;
      u.module = name;
      at::Tensor b, a;
      if (layer->adapter->SharedBasisFactors(&u.left, &u.core, &u.right, &u.scale)) {
        // ΔW = s·L C Rᵀ
      } else if (layer->adapter->LowRankFactors(&b, &a, &u.scale)) {
        u.left = b;
        u.right = a.t();
      } else {
        return absl::InternalError(
            absl::StrCat("task '", task, "': the route's side path on ", name, " is not low-rank"));
      }
      updates.push_back(std::move(u));
    }
  } else {
    // The served weights are the model as of the latest task; earlier tasks' models are gone.
    if (task != tasks.back()) {
      return absl::FailedPreconditionError(
          absl::StrCat("method ", method.name(),
                       " keeps no per-task weights: its served weights hold every task, so only ",
                       "the latest task ('", tasks.back(), "') can be exported; the model as of '", task,
                       "' was changed by the tasks learned after it"));
    }
    if (options.rank == 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "method ", method.name(), " changes the weights densely (it keeps no low-rank factors): task '",
          task, "' can be exported as a LoRA adapter only approximately; set rank (strata export --task ",
          task,
          " --rank R) for the best rank-R approximation (truncated SVD; the relative error is reported), or "
          "export the full model (strata export DIR)"));
    }
    const CausalLM& served = *version->model;
    std::map<std::string, at::Tensor> base_params;
    for (auto& [name, t] : base.NamedParameters()) base_params.emplace(name, t);
    const std::set<std::string> linear_weights = [&] {
      std::set<std::string> out;
      for (const auto& name : linear) out.insert(name + ".weight");
      return out;
    }();
    for (const auto& [name, t] : served.NamedParameters()) {
      if (linear_weights.count(name)) continue;
      auto it = base_params.find(name);
      if (it != base_params.end() && (t.is_same(it->second) || at::equal(t, it->second))) continue;
      return absl::UnimplementedError(absl::StrCat("method ", method.name(), " changed ", name,
                                                   ", which a LoRA adapter on the linear layers cannot "
                                                   "carry; export the full model (strata export DIR)"));
    }
    for (const std::string& name : linear) {
      const at::Tensor& w = served.FindLinear(name)->weight;
      const at::Tensor& w0 = base.FindLinear(name)->weight;
      if (w.is_same(w0) || at::equal(w, w0)) continue;
      ModuleUpdate u;
      u.module = name;
      u.dense = w.to(at::kFloat).sub(w0.to(at::kFloat));
      updates.push_back(std::move(u));
    }
  }
  if (updates.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("task '", task, "' leaves the base weights unchanged: there is no adapter to export"));
  }
  ASSIGN_OR_RETURN(PeftFactorization f, FactorizeForPeft(updates, options.rank));
  std::vector<std::string> names;
  for (const auto& u : updates) names.push_back(u.module);
  f.adapter.target_modules = PeftTargetModules(names, linear);
  const std::string& base_id = impl_->options.base_model_id;
  f.adapter.base_model_name_or_path = base_id == "embedded-default" ? summary_.name : base_id;
  RETURN_IF_ERROR(WriteExportDir(
      dir, options.overwrite, [&](const std::string& out) { return WritePeftLoraAdapter(out, f.adapter); }));
  AdapterExport out;
  out.task = task;
  out.method = method.name();
  out.weights_version = version->version;
  out.rank = f.rank;
  out.exact_rank = f.exact_rank;
  out.modules = static_cast<int64_t>(updates.size());
  out.relative_error = f.relative_error;
  out.max_module_error = f.max_module_error;
  out.max_error_module = f.max_error_module;
  out.dense = dense;
  return out;
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
