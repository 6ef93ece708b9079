#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "core/adapt/data_parallel.h"
#include "core/adapt/method.h"
#include "core/adapt/trainer.h"
#include "core/model/model.h"
#include "core/model/runtime.h"
#include "core/model/tokenizer.h"
#include "core/state/engine.h"
#include "core/state/engine_impl.h"

// Data parallelism, the follower's side: a replica (rank > 0) that joins rank 0's tasks and trains
// its shard of every step. Rank 0's side is in RunJob (engine_train.cc); the transport is
// core/adapt/data_parallel.cc.

namespace strata {
namespace {

using Clock = std::chrono::steady_clock;

}  // namespace

absl::Status Engine::TrainDataParallelShard(const DataParallelTask& task, GradientSync* sync,
                                            const std::atomic<bool>* leave) {
  Impl& s = *impl_;
  const std::shared_ptr<const ServedVersion> current = Current();
  if (current->version != task.version) {
    return absl::FailedPreconditionError(absl::StrCat("task '", task.name, "' starts from weights version ",
                                                      task.version, "; this rank serves version ",
                                                      current->version));
  }
  auto recipe = RecipeFromJson(task.recipe_json);
  if (!recipe.ok()) return recipe.status();
  // The committed state the task starts from, as rank 0's live method holds it: a new state is
  // built from the task's recipe, a learned one from the served version's frozen copy.
  std::unique_ptr<Method> method;
  if (current->method == nullptr || current->method->num_tasks() == 0) {
    auto created = CreateMethod(recipe->method, recipe->method_config);
    if (!created.ok()) return created.status();
    method = std::move(*created);
  } else {
    auto state = current->method->ExportState();
    if (!state.ok()) return state.status();
    auto rebuilt = CreateMethodFromState(*state);
    if (!rebuilt.ok()) return rebuilt.status();
    method = std::move(*rebuilt);
    if (auto st = method->SetTaskConfig(recipe->method_config); !st.ok()) return st;
  }
  SetTorchThreads(s.options.training_threads);
  TrainOptions to = TrainOptionsFromRecipe(*recipe);
  to.pad_id = s.tokenizer->pad_id().value_or(0);
  to.shards = s.options.training_shards;
  to.sync = sync;
  to.leave = leave;
  to.train_only = true;
  to.progress_every = 50;
  to.on_progress = [&task, sync](const TrainProgress& p) {
    spdlog::info("task '{}' (data-parallel rank {} of {}): step {}/{}, loss {:.4f}, {:.0f} tokens/s",
                 task.name, sync->rank(), sync->size(), p.step, p.total_steps, p.loss, p.tokens_per_second);
  };
  std::vector<TrainTask> data(1);
  data[0].name = task.name;
  data[0].examples = task.examples;
  auto result = Trainer(to).Train(*current->model, *method, task.name, data);
  if (!result.ok()) return result.status();
  ++dp_tasks_;
  dp_steps_ += result->data_parallel_steps;
  spdlog::info(
      "task '{}': trained {} data-parallel steps as rank {} of {} ({:.1f} s, loss {:.4f} -> {:.4f}); "
      "rank 0 merges and publishes",
      task.name, result->data_parallel_steps, sync->rank(), sync->size(), result->seconds, result->first_loss,
      result->final_loss);
  return absl::OkStatus();
}

Engine::DataParallelFigures Engine::DataParallelStats() const {
  DataParallelFigures f;
  if (const DataParallelGroup* group = impl_->options.data_parallel.get()) {
    f.world_size = group->world_size();
    f.rank = group->rank();
  }
  f.last_task_ranks = dp_last_task_ranks_.load();
  f.tasks = dp_tasks_.load();
  f.steps = dp_steps_.load();
  f.groups_lost = dp_groups_lost_.load();
  return f;
}

void Engine::FollowDataParallel(const std::atomic<bool>* stop) {
  Impl& s = *impl_;
  DataParallelGroup* group = s.options.data_parallel.get();
  if (group == nullptr) return;
  const DataParallelOptions& o = group->options();
  auto stopped = [stop] { return stop != nullptr && stop->load(); };
  // Start at the newest announcement: a task announced before this rank came up may still be
  // gathering its ranks.
  int64_t after = -1;
  Clock::time_point next_complaint = Clock::now();
  while (!stopped()) {
    if (after < 0) {
      auto latest = group->LatestSeq();
      if (!latest.ok() && latest.status().code() == absl::StatusCode::kUnavailable &&
          group->Reconnect().ok()) {
        latest = group->LatestSeq();
      }
      if (!latest.ok()) {
        if (Clock::now() >= next_complaint) {
          spdlog::warn("data parallelism: {} (retrying)", std::string(latest.status().message()));
          next_complaint = Clock::now() + std::chrono::seconds(60);
        }
        std::this_thread::sleep_for(std::chrono::seconds(1));
        continue;
      }
      after = std::max<int64_t>(0, *latest - 1);
      spdlog::info("data parallelism: rank {} of {} follows rank 0's tasks (from announcement {})", o.rank,
                   o.world_size, after + 1);
    }
    auto next = group->NextTask(after, std::chrono::seconds(1));
    if (!next.ok()) {
      if (next.status().code() == absl::StatusCode::kUnavailable) {
        // Rank 0's store went away (a restart starts counting again): the branch above reconnects,
        // retries and complains.
        after = -1;
      } else {
        spdlog::warn("data parallelism: announcement {}: {}", after + 1,
                     std::string(next.status().message()));
        ++after;
      }
      continue;
    }
    if (!next->has_value()) continue;
    const DataParallelTask& task = **next;
    after = task.seq;
    if (task.started) {
      spdlog::info("data parallelism: task '{}' (announcement {}) started without this rank", task.name,
                   task.seq);
      continue;
    }
    // The replica may still be downloading the version the task starts from.
    const Clock::time_point deadline =
        Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(o.join_timeout_seconds * 500));
    while (Current()->version != task.version && Clock::now() < deadline && !stopped()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    std::string refusal;
    if (stopped()) {
      refusal = "shutting down";
    } else if (const int64_t v = Current()->version; v != task.version) {
      refusal = absl::StrCat("serves weights version ", v, ", the task starts from version ", task.version);
    }
    auto sync = group->JoinTask(task.seq, refusal);
    if (!sync.ok()) {
      spdlog::warn("data parallelism: task '{}': {}", task.name, std::string(sync.status().message()));
      continue;
    }
    if (!refusal.empty()) {
      spdlog::warn("data parallelism: not joining task '{}': {}", task.name, refusal);
      continue;
    }
    if (*sync == nullptr) {
      spdlog::info("data parallelism: task '{}' started without this rank (answered too late)", task.name);
      continue;
    }
    spdlog::info("data parallelism: task '{}' ({} examples) as rank {} of {}", task.name,
                 task.examples.size(), (*sync)->rank(), (*sync)->size());
    if (auto st = TrainDataParallelShard(task, sync->get(), stop); !st.ok()) {
      spdlog::warn("data parallelism: task '{}': {}", task.name, std::string(st.message()));
    }
  }
}

}  // namespace strata
