#pragma once
// Engine internals shared by its files (engine.cc: versions and routing; engine_train.cc: a task's
// training run; engine_transfer.cc: import and export). Not part of the public interface.

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "core/adapt/method.h"
#include "core/adapt/router.h"
#include "core/model/model.h"
#include "core/model/tokenizer.h"
#include "core/state/checkpoint.h"
#include "core/state/engine.h"
#include "core/state/evaluator.h"
#include "core/state/ledger.h"
#include "core/state/versions.h"

namespace strata {

// Lock order: train_mu (held by the worker for a whole job or import, and by a promote or a
// rollback) before versions_mu (the kept-version store) before mu (short critical sections: the
// version pointer, the ledger, the routed-model cache). RPC threads take only mu or versions_mu.
struct Engine::Impl {
  std::unique_ptr<CausalLM> base;  // W0, never modified
  // W0 as the "base" route and the weights under every task route (shares base's tensors, no
  // adapters): one object, so a decode batch groups rows by it.
  std::shared_ptr<const CausalLM> base_view;
  std::shared_ptr<const Tokenizer> tokenizer;
  EngineOptions options;
  std::unique_ptr<Evaluator> evaluator;

  absl::Mutex train_mu;
  // The live method state and router: changed only by the worker (RunJob, imports) under train_mu;
  // each published version holds frozen copies.
  std::unique_ptr<Method> method ABSL_GUARDED_BY(train_mu);
  TaskRouter router ABSL_GUARDED_BY(train_mu);

  // The kept versions (opened in Create; changed under train_mu too).
  mutable absl::Mutex versions_mu ABSL_ACQUIRED_AFTER(train_mu);
  std::optional<VersionStore> versions ABSL_GUARDED_BY(versions_mu);

  mutable absl::Mutex mu ABSL_ACQUIRED_AFTER(versions_mu);
  std::shared_ptr<const ServedVersion> current ABSL_GUARDED_BY(mu);
  ResultsLedger ledger ABSL_GUARDED_BY(mu);
  int64_t state_bytes ABSL_GUARDED_BY(mu) = 0;
  // Task-routed models by task, with the weights version they were built from.
  std::map<std::string, std::pair<int64_t, std::shared_ptr<const CausalLM>>> routed_cache ABSL_GUARDED_BY(mu);
  // The candidates kept now (a copy of the version store's, for reports and metrics).
  std::vector<HeldCandidate> candidates ABSL_GUARDED_BY(mu);

  // The models a router decision selects from (RouteModels in router.h) for method state `m`: a
  // prompt that fits no task gets the base model or, with --unmatched_route=merged, `merged`.
  absl::StatusOr<std::vector<std::shared_ptr<const CausalLM>>> BuildRouteModels(
      const Method& m, const TaskRouter& r, std::shared_ptr<const CausalLM> merged) const;

  // Restores the method's committed state after a failure past the merge; returns `st`.
  absl::Status Rollback(const MethodState& previous, absl::Status st) ABSL_EXCLUSIVE_LOCKS_REQUIRED(train_mu);

  // The checkpoint of `state` + `ledger` + `router` as weights version `version`.
  CheckpointData Snapshot(const MethodState& state, const ResultsLedger& ledger, const TaskRouter& router,
                          int64_t version) const;

  // Checkpoints `snapshot`, then publishes `model` as version snapshot.weights_version with a frozen
  // copy of `state` and `router`, and installs `ledger` with it (a restart reports exactly what
  // was published).
  absl::StatusOr<std::shared_ptr<const ServedVersion>> CheckpointAndPublish(
      const CheckpointData& snapshot, const MethodState& state, std::shared_ptr<const CausalLM> model,
      int64_t tasks_learned, const TaskRouter& new_router, ResultsLedger ledger);

  // ---- kept versions (engine_versions.cc) ----
  // A version's description from its ledger (scores in the users' view: auto when measured, else
  // merged).
  VersionMeta DescribeVersion(int64_t version, const std::string& status, int64_t based_on,
                              const std::string& job_id, const std::string& task,
                              const ResultsLedger& l) const;
  // After version `published` was published from <state_dir>/checkpoint: keeps it, discards every
  // candidate and prunes the oldest published versions beyond keep_versions (only once the new one
  // is kept). Failures are logged: the version is served already.
  void KeepPublished(const VersionMeta& meta) ABSL_EXCLUSIVE_LOCKS_REQUIRED(train_mu);
  // Keeps `snapshot` as the candidate `meta.version`, replacing an older candidate.
  absl::Status KeepCandidate(const CheckpointData& snapshot, const VersionMeta& meta)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(train_mu);
  // Startup: completes an interrupted promote or rollback, keeps the served state, prunes.
  absl::Status ReconcileVersions(const ResultsLedger& served_ledger) ABSL_EXCLUSIVE_LOCKS_REQUIRED(train_mu);
  // Prunes published versions beyond keep_versions (never the served one).
  void Prune(int64_t served) ABSL_EXCLUSIVE_LOCKS_REQUIRED(train_mu, versions_mu);
  // Refreshes `candidates` from the version store.
  void RefreshCandidates();
  // A state read from a checkpoint, built completely before anything changes (Restore, AdoptState).
  struct BuiltState {
    std::unique_ptr<Method> method;  // the live copy (the version holds a frozen one)
    TaskRouter router;
    ResultsLedger ledger;
    std::shared_ptr<const ServedVersion> version;
  };
  // Builds `data` (`what` names it in errors, e.g. "version 3"): FAILED_PRECONDITION for another
  // base model; the method, the router, the ledger (eval splits read unless a replica) and the
  // merged weights. Takes mu briefly (the base model's reference NLL).
  absl::StatusOr<BuiltState> BuildState(const CheckpointData& data, const std::string& what) const;
  // Makes `built` the live and the served state (the atomic swap of Current()).
  void InstallState(BuiltState built) ABSL_EXCLUSIVE_LOCKS_REQUIRED(train_mu);
  // Restores kept version `version` as the checkpoint and serves it (promote and rollback).
  absl::StatusOr<std::shared_ptr<const ServedVersion>> Restore(int64_t version)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(train_mu);
  // The next unused version number (>= after + 1).
  int64_t NextVersion(int64_t after);
};

}  // namespace strata
