#pragma once
// The one trainer for every Method: AdamW, warmup + linear / cosine / constant schedule, gradient
// clipping, epochs or max steps, seeded (length-bucketed) shuffling, task-balanced joint batches
// for mtl, progress callback, cooperative cancellation and non-finite loss detection.
//
// Train() never modifies the model it is given: it trains on a ShallowCopy (the method attaches
// adapters or replaces weight slots of the copy by fresh tensors), and on success returns that copy
// with the merged served weights (W0 + W_past installed in LinearLayer weights, no adapters) as
// TrainResult::model. On any failure (CANCELLED, ABORTED for a non-finite loss/gradient/weight,
// INVALID_ARGUMENT, INTERNAL) the method's pending task is aborted: the given model and the
// method's committed state are exactly as before, and the merge does not run.
//
// Loss: causal LM cross-entropy on the loss-mask tokens (token t predicted from the logits at
// t − 1), mean over the batch's target tokens; plus Method::ExtraLoss().
//
// Thread safety: a Trainer holds only options; Train() may run concurrently on different methods
// and models. The model passed in may be read (served) by other threads while training runs.

#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/adapt/method.h"
#include "core/adapt/recipe.h"
#include "core/data/encode.h"
#include "core/model/model.h"
#include "core/model/tokenizer.h"

namespace strata {

class GradientSync;  // core/adapt/data_parallel.h

// The encoded training examples of one task.
struct TrainTask {
  std::string name;
  std::vector<EncodedExample> examples;
};

// Encodes `examples` (EncodeExamples with `options`) into a TrainTask.
TrainTask MakeTrainTask(std::string name, const Tokenizer& tokenizer, const std::vector<Example>& examples,
                        const EncodeOptions& options = {});

struct TrainProgress {
  std::string task;
  int64_t step = 0;  // optimizer steps completed (1-based)
  int64_t total_steps = 0;
  int64_t epoch = 0;      // 0-based epoch of this step
  double loss = 0;        // task loss of this step
  double extra_loss = 0;  // the method's extra term of this step (0 when none)
  double learning_rate = 0;
  double grad_norm = 0;          // before clipping (0 when clipping is off)
  double tokens_per_second = 0;  // real (non-padding) tokens processed per second, since start
  double elapsed_seconds = 0;
  double eta_seconds = 0;
};

struct TrainOptions {
  double learning_rate = 1e-3;
  double weight_decay = 0.0;  // AdamW decoupled weight decay
  double beta1 = 0.9;
  double beta2 = 0.999;
  double adam_eps = 1e-8;
  // "linear" (warmup then linear decay to min_lr_ratio·lr), "cosine", or "constant" (after warmup).
  std::string lr_schedule = "linear";
  int64_t warmup_steps = 0;   // > 0 wins over warmup_ratio
  double warmup_ratio = 0.0;  // fraction of the total steps
  double min_lr_ratio = 0.0;
  double max_grad_norm = 1.0;  // <= 0: no clipping
  int64_t epochs = 1;
  int64_t max_steps = 0;  // > 0: exactly this many steps (epochs ignored)
  int64_t batch_size = 16;
  // Examples per length-sorting chunk (BatchPlanOptions::bucket_size; 0 = 32·batch_size,
  // batch_size = no grouping).
  int64_t bucket_size = 0;
  uint64_t seed = 0;  // batch order and StepContext::rng
  int64_t pad_id = 0;
  // Checked before every step; when set, Train returns CANCELLED (state untouched).
  const std::atomic<bool>* cancel = nullptr;
  // Called after every `progress_every` steps and after the last one, on the training thread.
  std::function<void(const TrainProgress&)> on_progress;
  int64_t progress_every = 1;

  // Row shards per step in this process: the step's rows (a data-parallel member's own rows) are
  // split into this many contiguous parts whose forward and backward run concurrently, part 0 on
  // the training thread and the others on threads of their own, each with 1/shards of the training
  // thread's intra-op threads; their gradients are summed in part order (deterministic; the same
  // update as one pass up to float round-off). Each part beyond the first holds a copy of the
  // trainable gradients during the step. On the CPU this is what uses the cores when the matrices
  // are too small for intra-op threads to pay (stories260K: 2.0x on 2 cores), and it beats intra-op
  // threads on the 110M config too (docs/benchmarks.md). 0 = automatic (ResolveTrainShards).
  int shards = 0;

  // Data parallelism (core/adapt/data_parallel.h): this process is one member of `sync`'s group.
  // Every member builds the same global batch, runs its contiguous shard of rows and the group sums
  // the gradients (and the loss) each step, so every member applies the one-process update of the
  // whole batch. Member 0 is the one whose `cancel` counts; when the group fails or a member leaves,
  // member 0 goes on alone (recomputing a failed step on the whole batch) and the others return
  // UNAVAILABLE. nullptr: no data parallelism.
  GradientSync* sync = nullptr;
  // A member other than 0: set to leave the group at the next step (Train returns CANCELLED).
  const std::atomic<bool>* leave = nullptr;
  // Called on member 0 when it continues without the group (the reason, for the log).
  std::function<void(const std::string&)> on_group_lost;
  // Train only (a data-parallel follower): no merge; the method's task is aborted after the loop, its
  // committed state is unchanged and TrainResult::model is null.
  bool train_only = false;
};

// INVALID_ARGUMENT naming the field.
absl::Status ValidateTrainOptions(const TrainOptions& options);

// The row shards a step runs with (TrainOptions::shards): `shards` when > 0; else on the CPU one
// per intra-op thread of the training thread (`threads`), at most one per row of the batch and at
// most 1 + 1 GiB / trainable_bytes (the copies of the gradients the extra parts hold: full
// fine-tuning of a large model gets 1); on other devices 1.
int ResolveTrainShards(int shards, const at::Device& device, int threads, int64_t batch_size,
                       int64_t trainable_bytes);

// The trainer's options of `recipe` (learning rate, schedule, warmup, steps, epochs, batch size,
// seed); the caller adds pad_id, cancellation and progress.
TrainOptions TrainOptionsFromRecipe(const TrainingRecipe& recipe);

struct TrainResult {
  std::unique_ptr<CausalLM> model;  // the new served model (shares untouched tensors with the input)
  int64_t steps = 0;
  int64_t epochs = 0;               // epochs started
  int64_t tokens = 0;               // real tokens processed
  int64_t target_tokens = 0;        // tokens the loss was computed on
  double seconds = 0;               // training loop time (without the merge)
  double merge_seconds = 0;         // AfterTraining + EndTask
  std::vector<float> losses;        // task loss per step
  int64_t data_parallel_steps = 0;  // steps whose gradients were summed over a group
  int data_parallel_members = 1;    // the group's size (1: alone)
  double first_loss = 0;            // losses.front()
  double final_loss = 0;            // mean of the last min(10, steps) losses
};

class Trainer {
 public:
  explicit Trainer(TrainOptions options) : options_(std::move(options)) {}
  const TrainOptions& options() const { return options_; }

  // Trains task `task_name` with `method` on `data` (one TrainTask; several only for a joint
  // method: task-balanced batches, each row's task drawn uniformly) starting from `model` (the
  // served model). Total steps: max_steps, else epochs · ceil(examples / batch_size).
  // Errors: INVALID_ARGUMENT (options, empty data, several tasks for a continual method, no
  // trainable parameter, names from Method::BeginTask), CANCELLED, ABORTED (non-finite loss,
  // gradient or trained weight: the message names the step, the task and the learning rate),
  // INTERNAL (torch errors).
  absl::StatusOr<TrainResult> Train(const CausalLM& model, Method& method, const std::string& task_name,
                                    const std::vector<TrainTask>& data) const;

  // The learning rate at 0-based `step` of `total_steps`.
  static double LearningRate(const TrainOptions& options, int64_t step, int64_t total_steps);

  // Mean causal-LM loss over the target tokens of `logits` [B, T, V] for `labels` [B, T] (int64,
  // already shifted: labels[b, t] is the target predicted at position t, ignore_index -100).
  static at::Tensor CausalLmLoss(const at::Tensor& logits, const at::Tensor& labels);

 private:
  TrainOptions options_;
};

}  // namespace strata
