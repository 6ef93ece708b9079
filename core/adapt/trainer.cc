#include "core/adapt/trainer.h"

#include <ATen/ThreadLocalState.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/adapt/data_parallel.h"
#include "core/data/batching.h"
#include "core/data/random.h"
#include "core/model/runtime.h"
#include "core/util/status_macros.h"

namespace strata {
namespace {

constexpr int64_t kIgnoreIndex = -100;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// The model inputs of one batch as tensors. Labels are shifted so that labels[b, t] is the target
// predicted from position t (the next token where it is a training target, else -100); the tensors
// wrap the Batch's buffers (the Batch must outlive them) and are moved to `device`.
struct StepTensors {
  at::Tensor input_ids;
  at::Tensor attention_mask;  // undefined when the batch has no padding
  at::Tensor labels;
};

StepTensors ToTensors(Batch& batch, const at::Device& device) {
  const int64_t rows = batch.rows;
  const int64_t len = batch.seq_len;
  // Shift the labels left by one in place (row by row; the last column has no next token).
  for (int64_t r = 0; r < rows; ++r) {
    int64_t* row = batch.labels.data() + r * len;
    for (int64_t t = 0; t + 1 < len; ++t) row[t] = row[t + 1];
    row[len - 1] = kIgnoreIndex;
  }
  const auto long_opts = at::TensorOptions().dtype(at::kLong);
  StepTensors out;
  out.input_ids = at::from_blob(batch.input_ids.data(), {rows, len}, long_opts);
  out.labels = at::from_blob(batch.labels.data(), {rows, len}, long_opts);
  if (batch.real_tokens != rows * len) {
    out.attention_mask = at::from_blob(batch.attention_mask.data(), {rows, len}, long_opts);
  }
  if (!device.is_cpu()) {
    out.input_ids = out.input_ids.to(device);
    out.labels = out.labels.to(device);
    if (out.attention_mask.defined()) out.attention_mask = out.attention_mask.to(device);
  }
  return out;
}

// Produces the batches of a training run: per-epoch length-bucketed plans for one task, or
// task-balanced rows (task uniform, then the task's examples in a reshuffled cycle) for several.
class BatchSource {
 public:
  BatchSource(const std::vector<TrainTask>& data, const TrainOptions& options)
      : options_(options), rng_(options.seed ^ 0x5bd1e995ULL) {
    for (const TrainTask& task : data) {
      std::vector<int64_t> indices;
      for (const EncodedExample& e : task.examples) {
        if (e.num_targets() > 0) {
          indices.push_back(static_cast<int64_t>(examples_.size()));
          examples_.push_back(e);
        }
      }
      task_indices_.push_back(std::move(indices));
    }
    cursor_.assign(task_indices_.size(), 0);
    order_ = task_indices_;
    for (auto& o : order_) rng_.Shuffle(o);
    batch_options_.pad_id = options.pad_id;
    batch_options_.ignore_index = kIgnoreIndex;
  }

  int64_t num_examples() const { return static_cast<int64_t>(examples_.size()); }
  bool task_empty(size_t i) const { return task_indices_[i].empty(); }
  int64_t steps_per_epoch() const { return (num_examples() + options_.batch_size - 1) / options_.batch_size; }
  const std::vector<EncodedExample>& examples() const { return examples_; }

  // The next batch of the run; sets *epoch.
  Batch Next(int64_t* epoch) {
    if (task_indices_.size() == 1) {
      if (plan_pos_ >= plan_.size()) {
        if (started_) ++epoch_;
        started_ = true;
        BatchPlanOptions plan;
        plan.batch_size = options_.batch_size;
        plan.bucket_size = options_.bucket_size;
        plan.shuffle = true;
        plan.seed = options_.seed + static_cast<uint64_t>(epoch_);
        std::vector<int64_t> lengths;
        lengths.reserve(examples_.size());
        for (const auto& e : examples_) lengths.push_back(e.length());
        plan_ = PlanBatches(lengths, plan);
        plan_pos_ = 0;
      }
      *epoch = epoch_;
      return MakeBatch(examples_, plan_[plan_pos_++], batch_options_);
    }
    // Joint: epochs are counted in steps_per_epoch batches.
    *epoch = joint_steps_ / steps_per_epoch();
    ++joint_steps_;
    std::vector<int64_t> rows;
    rows.reserve(static_cast<size_t>(options_.batch_size));
    std::vector<size_t> non_empty;
    for (size_t t = 0; t < task_indices_.size(); ++t) {
      if (!task_indices_[t].empty()) non_empty.push_back(t);
    }
    for (int64_t r = 0; r < options_.batch_size; ++r) {
      const size_t t = non_empty[static_cast<size_t>(rng_.Below(non_empty.size()))];
      if (cursor_[t] >= order_[t].size()) {
        rng_.Shuffle(order_[t]);
        cursor_[t] = 0;
      }
      rows.push_back(order_[t][cursor_[t]++]);
    }
    return MakeBatch(examples_, rows, batch_options_);
  }

 private:
  const TrainOptions& options_;
  Rng rng_;
  BatchOptions batch_options_;
  std::vector<EncodedExample> examples_;
  std::vector<std::vector<int64_t>> task_indices_;
  // Single task.
  std::vector<std::vector<int64_t>> plan_;
  size_t plan_pos_ = 0;
  int64_t epoch_ = 0;
  bool started_ = false;
  // Joint.
  std::vector<std::vector<int64_t>> order_;
  std::vector<size_t> cursor_;
  int64_t joint_steps_ = 0;
};

// AdamW (decoupled weight decay, PyTorch's update rule) over flat buffers: the trainable tensors
// are re-pointed (set_data) at views of one contiguous buffer per dtype/device, and their .grad at
// views of a matching gradient buffer that autograd accumulates into in place. A step is then ~10
// element-wise ops over the whole buffer instead of ~10 ops per tensor, zeroing the gradients is
// one fill, and nothing is allocated per step. The tensors' values are copied once at construction.
class FlatAdamW {
 public:
  FlatAdamW(const std::vector<at::Tensor>& params, const TrainOptions& o) : o_(o) {
    at::NoGradGuard no_grad;
    for (const at::Tensor& p : params) {
      Group* group = nullptr;
      for (auto& g : groups_) {
        if (g.dtype == p.scalar_type() && g.device == p.device()) group = &g;
      }
      if (group == nullptr) {
        groups_.emplace_back();
        group = &groups_.back();
        group->dtype = p.scalar_type();
        group->device = p.device();
      }
      group->params.push_back(p);
      group->numel += p.numel();
    }
    for (auto& g : groups_) {
      const auto opts = at::TensorOptions().dtype(g.dtype).device(g.device);
      g.value = at::empty({g.numel}, opts);
      g.grad = at::zeros({g.numel}, opts);
      g.exp_avg = at::zeros({g.numel}, opts);
      g.exp_avg_sq = at::zeros({g.numel}, opts);
      if (!(g.dtype == at::kFloat && g.device.is_cpu())) g.denom = at::empty({g.numel}, opts);
      int64_t offset = 0;
      for (at::Tensor p : g.params) {
        const int64_t n = p.numel();
        at::Tensor view = g.value.narrow(0, offset, n).view(p.sizes());
        view.copy_(p.detach());
        p.set_data(view);
        p.mutable_grad() = g.grad.narrow(0, offset, n).view(p.sizes());
        offset += n;
      }
    }
  }

  void ZeroGrad() {
    for (auto& g : groups_) g.grad.zero_();
  }

  // The gradient buffers (one per dtype/device): what a data-parallel group sums.
  std::vector<at::Tensor> GradBuffers() const {
    std::vector<at::Tensor> out;
    for (const auto& g : groups_) out.push_back(g.grad);
    return out;
  }

  // Global L2 norm of all gradients (one sync).
  double GradNorm() {
    at::NoGradGuard no_grad;
    double sq = 0;
    for (auto& g : groups_) {
      const double n = g.grad.norm().item<double>();
      sq += n * n;
    }
    return std::sqrt(sq);
  }

  // One AdamW step; the gradients are taken times `grad_scale` (gradient clipping) without
  // rewriting the gradient buffer.
  void Step(double lr, double grad_scale) {
    at::NoGradGuard no_grad;
    ++step_;
    const double bc1 = 1.0 - std::pow(o_.beta1, static_cast<double>(step_));
    const double bc2 = 1.0 - std::pow(o_.beta2, static_cast<double>(step_));
    for (auto& g : groups_) {
      if (g.dtype == at::kFloat && g.device.is_cpu()) {
        FusedCpuStep(g, lr, grad_scale, bc1, bc2);
        continue;
      }
      const at::Tensor grad = grad_scale == 1.0 ? g.grad : g.grad.mul(grad_scale);
      if (o_.weight_decay > 0) g.value.mul_(1.0 - lr * o_.weight_decay);
      g.exp_avg.mul_(o_.beta1).add_(grad, 1.0 - o_.beta1);
      g.exp_avg_sq.mul_(o_.beta2).addcmul_(grad, grad, 1.0 - o_.beta2);
      at::sqrt_out(g.denom, g.exp_avg_sq);
      g.denom.div_(std::sqrt(bc2)).add_(o_.adam_eps);
      g.value.addcdiv_(g.exp_avg, g.denom, -lr / bc1);
    }
  }

  bool AllFinite() {
    at::NoGradGuard no_grad;
    for (auto& g : groups_) {
      if (!at::isfinite(g.value).all().item<bool>()) return false;
    }
    return true;
  }

  // Drops the gradient views and the optimizer state. The tensors keep viewing the value buffer
  // (which holds exactly their values, so nothing is wasted).
  void Release() {
    for (auto& g : groups_) {
      for (at::Tensor p : g.params) p.mutable_grad() = at::Tensor();
    }
    groups_.clear();
  }

 private:
  struct Group {
    at::ScalarType dtype;
    at::Device device = at::Device(at::kCPU);
    std::vector<at::Tensor> params;
    int64_t numel = 0;
    at::Tensor value, grad, exp_avg, exp_avg_sq, denom;
  };

  // The same update as the tensor ops above (PyTorch's AdamW) in one pass over the buffers: the
  // op-by-op form reads and writes the whole parameter set ~20 times per step (a measured ~5% of a
  // 110M full fine-tuning step), this loop reads value, grad and both moments once and writes three.
  void FusedCpuStep(Group& g, double lr, double grad_scale, double bc1, double bc2) {
    float* value = g.value.data_ptr<float>();
    const float* grad = g.grad.data_ptr<float>();
    float* m = g.exp_avg.data_ptr<float>();
    float* v = g.exp_avg_sq.data_ptr<float>();
    const float decay = static_cast<float>(1.0 - lr * o_.weight_decay);
    const bool decays = o_.weight_decay > 0;
    const float gs = static_cast<float>(grad_scale);
    const float b1 = static_cast<float>(o_.beta1), c1 = static_cast<float>(1.0 - o_.beta1);
    const float b2 = static_cast<float>(o_.beta2), c2 = static_cast<float>(1.0 - o_.beta2);
    const float inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
    const float eps = static_cast<float>(o_.adam_eps);
    const float step_size = static_cast<float>(-lr / bc1);
    at::parallel_for(0, g.numel, 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float gi = grad[i] * gs;
        const float w = decays ? value[i] * decay : value[i];
        const float mi = m[i] * b1 + gi * c1;
        const float vi = v[i] * b2 + gi * gi * c2;
        m[i] = mi;
        v[i] = vi;
        value[i] = w + step_size * (mi / (std::sqrt(vi) * inv_sqrt_bc2 + eps));
      }
    });
  }
  const TrainOptions& o_;
  std::vector<Group> groups_;
  int64_t step_ = 0;
};

// Aborts the method's pending task unless Commit() was called.
class AbortGuard {
 public:
  AbortGuard(Method& method, CausalLM* model) : method_(method), model_(model) {}
  ~AbortGuard() {
    if (!committed_) method_.AbortTask(model_);
  }
  void Commit() { committed_ = true; }

 private:
  Method& method_;
  CausalLM* model_;
  bool committed_ = false;
};

// Extra gradient copies the automatic shard count may hold during a step (parts beyond the first).
constexpr int64_t kAutoShardGradientBytes = int64_t{1} << 30;

// Runs fn(0) … fn(parts − 1) concurrently for each step's row shards (TrainOptions::shards): part 0
// on the calling thread, the others on `parts − 1` threads kept for the whole training run (a
// thread per step costs its allocator caches: 3.8× the page faults on stories260K), each with
// `threads` intra-op threads and the thread-local ATen state (grad mode) of the thread that made
// the pool.
class ShardPool {
 public:
  ShardPool(int parts, int threads) : threads_(threads), errors_(static_cast<size_t>(parts)) {
    for (int i = 1; i < parts; ++i) workers_.emplace_back([this, i] { Loop(i); });
  }
  ~ShardPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    start_.notify_all();
    for (std::thread& w : workers_) w.join();
  }
  ShardPool(const ShardPool&) = delete;
  ShardPool& operator=(const ShardPool&) = delete;

  // Returns when every part is done; rethrows the first part's exception.
  void Run(const std::function<void(int)>& fn) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      pending_ = static_cast<int>(workers_.size());
      ++generation_;
    }
    start_.notify_all();
    const int caller_threads = GetTorchThreads();
    SetTorchThreads(threads_);
    Call(0);
    SetTorchThreads(caller_threads);
    {
      std::unique_lock<std::mutex> lock(mu_);
      done_.wait(lock, [this] { return pending_ == 0; });
      fn_ = nullptr;
    }
    for (std::exception_ptr& e : errors_) {
      if (e) std::rethrow_exception(std::exchange(e, nullptr));
    }
  }

 private:
  void Call(int i) {
    try {
      (*fn_)(i);
    } catch (...) {
      errors_[static_cast<size_t>(i)] = std::current_exception();
    }
  }
  void Loop(int i) {
    at::ThreadLocalStateGuard guard(state_);
    SetTorchThreads(threads_);
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      start_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      lock.unlock();
      Call(i);
      lock.lock();
      if (--pending_ == 0) done_.notify_one();
    }
  }

  const int threads_;
  const at::ThreadLocalState state_;
  std::vector<std::exception_ptr> errors_;  // one per part, written by that part only
  std::mutex mu_;
  std::condition_variable start_, done_;
  const std::function<void(int)>* fn_ = nullptr;  // guarded by mu_ (read by a part after its start)
  uint64_t generation_ = 0;                       // guarded by mu_
  int pending_ = 0;                               // guarded by mu_
  bool stop_ = false;                             // guarded by mu_
  std::vector<std::thread> workers_;
};

bool AllFinite(const std::vector<at::Tensor>& tensors, size_t* bad) {
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (!at::isfinite(tensors[i]).all().item<bool>()) {
      *bad = i;
      return false;
    }
  }
  return true;
}

}  // namespace

TrainTask MakeTrainTask(std::string name, const Tokenizer& tokenizer, const std::vector<Example>& examples,
                        const EncodeOptions& options) {
  TrainTask task;
  task.name = std::move(name);
  task.examples = EncodeExamples(tokenizer, examples, options);
  return task;
}

int ResolveTrainShards(int shards, const at::Device& device, int threads, int64_t batch_size,
                       int64_t trainable_bytes) {
  if (shards > 0) return shards;
  if (!device.is_cpu()) return 1;
  int64_t n = std::min<int64_t>(std::max(1, threads), std::max<int64_t>(1, batch_size));
  if (trainable_bytes > 0) n = std::min<int64_t>(n, 1 + kAutoShardGradientBytes / trainable_bytes);
  return static_cast<int>(std::max<int64_t>(1, n));
}

TrainOptions TrainOptionsFromRecipe(const TrainingRecipe& recipe) {
  TrainOptions o;
  o.learning_rate = recipe.learning_rate;
  o.lr_schedule = recipe.lr_schedule;
  o.warmup_steps = recipe.warmup_steps;
  o.warmup_ratio = recipe.warmup_ratio;
  o.max_steps = recipe.max_steps;
  o.epochs = recipe.epochs;
  o.batch_size = recipe.batch_size;
  o.seed = recipe.seed;
  return o;
}

absl::Status ValidateTrainOptions(const TrainOptions& o) {
  auto bad = [](const std::string& field, const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("train options: ", field, " ", why));
  };
  if (!(std::isfinite(o.learning_rate) && o.learning_rate >= 0)) {
    return bad("learning_rate", absl::StrCat("must be finite and >= 0, got ", o.learning_rate));
  }
  if (!(std::isfinite(o.weight_decay) && o.weight_decay >= 0))
    return bad("weight_decay", "must be finite and >= 0");
  if (!(o.beta1 >= 0 && o.beta1 < 1)) return bad("beta1", "must be in [0, 1)");
  if (!(o.beta2 >= 0 && o.beta2 < 1)) return bad("beta2", "must be in [0, 1)");
  if (!(o.adam_eps > 0)) return bad("adam_eps", "must be > 0");
  if (o.lr_schedule != "linear" && o.lr_schedule != "cosine" && o.lr_schedule != "constant") {
    return bad("lr_schedule",
               absl::StrCat("must be linear, cosine or constant, got \"", o.lr_schedule, "\""));
  }
  if (o.warmup_steps < 0) return bad("warmup_steps", "must be >= 0");
  if (!(o.warmup_ratio >= 0 && o.warmup_ratio <= 1)) return bad("warmup_ratio", "must be in [0, 1]");
  if (!(o.min_lr_ratio >= 0 && o.min_lr_ratio <= 1)) return bad("min_lr_ratio", "must be in [0, 1]");
  if (std::isnan(o.max_grad_norm)) return bad("max_grad_norm", "must be a number");
  if (o.max_steps < 0) return bad("max_steps", "must be >= 0");
  if (o.max_steps == 0 && o.epochs < 1) return bad("epochs", "must be >= 1 when max_steps is 0");
  if (o.batch_size < 1) return bad("batch_size", absl::StrCat("must be >= 1, got ", o.batch_size));
  if (o.bucket_size < 0) return bad("bucket_size", "must be >= 0");
  if (o.progress_every < 1) return bad("progress_every", "must be >= 1");
  if (o.shards < 0) return bad("shards", absl::StrCat("must be >= 0 (0 = automatic), got ", o.shards));
  if (o.pad_id < 0) return bad("pad_id", "must be >= 0");
  return absl::OkStatus();
}

double Trainer::LearningRate(const TrainOptions& o, int64_t step, int64_t total_steps) {
  const int64_t warmup =
      o.warmup_steps > 0 ? o.warmup_steps
                         : static_cast<int64_t>(std::ceil(o.warmup_ratio * static_cast<double>(total_steps)));
  if (step < warmup) return o.learning_rate * static_cast<double>(step + 1) / static_cast<double>(warmup);
  if (o.lr_schedule == "constant") return o.learning_rate;
  const double progress = std::min(1.0, static_cast<double>(step - warmup) /
                                            static_cast<double>(std::max<int64_t>(1, total_steps - warmup)));
  double factor;
  if (o.lr_schedule == "cosine") {
    factor = 0.5 * (1.0 + std::cos(M_PI * progress));
  } else {
    factor = 1.0 - progress;
  }
  return o.learning_rate * (o.min_lr_ratio + (1.0 - o.min_lr_ratio) * factor);
}

at::Tensor Trainer::CausalLmLoss(const at::Tensor& logits, const at::Tensor& labels) {
  const int64_t vocab = logits.size(-1);
  return at::cross_entropy_loss(logits.reshape({-1, vocab}), labels.reshape({-1}), {}, at::Reduction::Mean,
                                kIgnoreIndex);
}

absl::StatusOr<TrainResult> Trainer::Train(const CausalLM& model, Method& method,
                                           const std::string& task_name,
                                           const std::vector<TrainTask>& data) const {
  const TrainOptions& o = options_;
  RETURN_IF_ERROR(ValidateTrainOptions(o));
  if (data.empty())
    return absl::InvalidArgumentError(absl::StrCat("task \"", task_name, "\": no training data"));
  if (data.size() > 1 && !method.joint()) {
    return absl::InvalidArgumentError(absl::StrCat("method ", method.name(),
                                                   " trains one task at a time, got ", data.size(),
                                                   " datasets (joint training is method mtl)"));
  }
  BatchSource source(data, o);
  for (size_t i = 0; i < data.size(); ++i) {
    if (source.task_empty(i)) {
      return absl::InvalidArgumentError(absl::StrCat("task \"",
                                                     data[i].name.empty() ? task_name : data[i].name,
                                                     "\": no example with a training target"));
    }
  }
  const int64_t total_steps = o.max_steps > 0 ? o.max_steps : o.epochs * source.steps_per_epoch();

  c10::InferenceMode no_inference(false);
  at::AutoGradMode grad_mode(true);

  std::unique_ptr<CausalLM> work = model.ShallowCopy();
  work->ClearAdapters();
  RETURN_IF_ERROR(method.BeginTask(task_name, work.get()));
  AbortGuard guard(method, work.get());

  std::vector<at::Tensor> params;
  std::vector<std::string> param_names;
  for (auto& [pname, t] : method.TrainableParameters()) {
    if (!t.defined() || !t.requires_grad() || !t.is_leaf()) {
      return absl::InternalError(absl::StrCat("method ", method.name(), ": trainable tensor \"", pname,
                                              "\" is not a leaf with requires_grad"));
    }
    bool seen = false;  // a tensor listed twice is optimised once
    for (const at::Tensor& p : params) seen = seen || p.is_same(t);
    if (!seen) {
      params.push_back(t);
      param_names.push_back(pname);
    }
  }
  if (params.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("method ", method.name(), " has no trainable parameter"));
  }

  TrainResult result;
  result.losses.reserve(static_cast<size_t>(total_steps));
  const at::Device device = work->device();
  std::mt19937_64 hook_rng(o.seed * 0x9e3779b97f4a7c15ULL + 1);
  const Clock::time_point start = Clock::now();

  try {
    FlatAdamW optimizer(params, o);
    // Row shards per step and the intra-op threads each of them runs with.
    int64_t trainable_bytes = 0;
    for (const at::Tensor& p : params) trainable_bytes += p.numel() * static_cast<int64_t>(p.element_size());
    const int shards = ResolveTrainShards(o.shards, device, GetTorchThreads(), o.batch_size, trainable_bytes);
    std::unique_ptr<ShardPool> shard_pool;
    if (shards > 1) shard_pool = std::make_unique<ShardPool>(shards, std::max(1, GetTorchThreads() / shards));
    int64_t epoch = 0;
    GradientSync* sync = o.sync;  // null once member 0 continues alone
    const bool member0 = sync == nullptr || sync->rank() == 0;
    if (sync != nullptr) result.data_parallel_members = sync->size();
    for (int64_t step = 0; step < total_steps; ++step) {
      const bool cancelled = o.cancel != nullptr && o.cancel->load(std::memory_order_relaxed);
      if (cancelled && sync == nullptr) {
        return absl::CancelledError(absl::StrCat("training of task \"", task_name, "\" cancelled at step ",
                                                 step, " of ", total_steps, "; nothing was merged"));
      }
      const double lr = LearningRate(o, step, total_steps);
      Batch batch = source.Next(&epoch);
      StepTensors in = ToTensors(batch, device);

      StepContext ctx;
      ctx.step = step;
      ctx.total_steps = total_steps;
      ctx.epoch = epoch;
      ctx.learning_rate = lr;
      ctx.model = work.get();
      ctx.rng = &hook_rng;
      method.BeforeForward(ctx);

      struct Part {
        double task = 0;
        double extra = 0;
      };
      const int64_t rows = batch.rows;
      // Target tokens in rows [lo, hi), counted on the host labels (ToTensors shifted them in place;
      // the shift keeps every target): no device round trip.
      auto targets_in_rows = [&batch, rows](int64_t lo, int64_t hi) -> int64_t {
        if (lo == 0 && hi == rows) return batch.target_tokens;
        const auto first = batch.labels.begin() + lo * batch.seq_len;
        return std::count_if(first, first + (hi - lo) * batch.seq_len,
                             [](int64_t label) { return label != kIgnoreIndex; });
      };
      // The task loss of rows [lo, hi) (when `weighted`, scaled to the rows' share of the global mean) plus
      // `extra`, back-propagated into the gradient buffers; returns the unscaled-by-extra task value.
      // With `grads` set, the gradients are returned there (one per params entry, undefined where
      // unused) instead of being added into the buffers.
      auto rows_pass = [&](int64_t lo, int64_t hi, bool weighted, const at::Tensor& extra,
                           std::vector<at::Tensor>* grads = nullptr) -> double {
        double task = 0;
        at::Tensor loss;
        const int64_t targets = targets_in_rows(lo, hi);
        if (targets > 0) {
          at::Tensor ids = in.input_ids, mask = in.attention_mask, labels = in.labels;
          if (lo != 0 || hi != rows) {
            ids = ids.narrow(0, lo, hi - lo);
            labels = labels.narrow(0, lo, hi - lo);
            if (mask.defined()) mask = mask.narrow(0, lo, hi - lo);
          }
          at::Tensor task_loss = CausalLmLoss(work->Forward(ids, mask), labels);
          if (weighted) {
            task_loss = task_loss * (static_cast<double>(targets) / static_cast<double>(batch.target_tokens));
          }
          task = task_loss.item<double>();
          loss = task_loss;
        }
        if (extra.defined()) loss = loss.defined() ? loss + extra : extra;
        if (loss.defined() && loss.requires_grad()) {
          if (grads == nullptr) {
            loss.backward();
          } else {
            *grads = torch::autograd::grad({loss}, params, {}, /*retain_graph=*/false, /*create_graph=*/false,
                                           /*allow_unused=*/true);
          }
        }
        return task;
      };
      // Forward and backward of rows [lo, hi) of the batch. Alone (members == 1) the loss is the
      // batch's mean; in a group it is this shard's share of the global mean (summed target losses
      // over the global batch's target tokens) and the extra term counts 1/members per member.
      // With shards > 1 the rows are split again into contiguous parts run concurrently on their own
      // threads (ShardPool), each adding its share of the mean into the same gradient buffers.
      auto forward_backward = [&](int64_t lo, int64_t hi, int members) {
        Part part;
        optimizer.ZeroGrad();
        const at::Tensor extra = method.ExtraLoss();
        if (extra.defined()) part.extra = extra.item<double>();
        const at::Tensor extra_share =
            extra.defined() && members > 1 ? extra / static_cast<double>(members) : extra;
        if (shards <= 1) {
          part.task = rows_pass(lo, hi, members > 1, extra_share);
        } else {
          // Part 0 back-propagates into the zeroed buffers; every other part returns its gradients
          // (one copy of the trainable gradients each, during the step), added into the buffers in
          // part order afterwards, so a run is deterministic whatever the threads' timing. A part
          // may get no rows (fewer rows than shards): it adds nothing.
          std::vector<double> tasks(static_cast<size_t>(shards), 0.0);
          std::vector<std::vector<at::Tensor>> grads(static_cast<size_t>(shards));
          shard_pool->Run([&](int i) {
            const int64_t a = lo + (hi - lo) * i / shards, b = lo + (hi - lo) * (i + 1) / shards;
            if (a < b || i == 0) {  // part 0 back-propagates into the zeroed buffers itself
              tasks[static_cast<size_t>(i)] = rows_pass(a, b, true, i == 0 ? extra_share : at::Tensor(),
                                                        i == 0 ? nullptr : &grads[static_cast<size_t>(i)]);
            }
          });
          at::NoGradGuard no_grad;
          for (size_t i = 0; i < grads.size(); ++i) {
            part.task += tasks[i];
            for (size_t j = 0; j < grads[i].size(); ++j) {
              if (grads[i][j].defined()) params[j].mutable_grad().add_(grads[i][j]);
            }
          }
        }
        return part;
      };

      Part part;
      bool group_ends = false;  // a member left after this step
      if (sync == nullptr) {
        part = forward_backward(0, rows, 1);
      } else {
        const int members = sync->size();
        const int64_t lo = rows * sync->rank() / members, hi = rows * (sync->rank() + 1) / members;
        part = forward_backward(lo, hi, members);
        const bool leaving = !member0 && o.leave != nullptr && o.leave->load(std::memory_order_relaxed);
        // On the model's device: NCCL sums only CUDA tensors.
        std::vector<at::Tensor> control{
            at::tensor({part.task, member0 && cancelled ? 1.0 : 0.0, leaving ? 1.0 : 0.0}, at::kDouble)
                .to(device)};
        std::vector<double> flags(3);
        absl::Status synced = sync->AllReduceSum(control);
        if (synced.ok()) {
          const at::Tensor host = control[0].cpu();
          for (int i = 0; i < 3; ++i) flags[static_cast<size_t>(i)] = host[i].item<double>();
        }
        const bool group_cancel = synced.ok() && flags[1] > 0;
        if (synced.ok() && !group_cancel) {
          std::vector<at::Tensor> grads = optimizer.GradBuffers();
          synced = sync->AllReduceSum(grads);
        }
        if (!synced.ok()) {
          if (!member0) {
            return absl::UnavailableError(absl::StrCat("training of task \"", task_name, "\" left at step ",
                                                       step + 1, ": ", synced.message()));
          }
          if (o.on_group_lost) {
            o.on_group_lost(absl::StrCat(synced.message(), "; step ", step + 1, " of ", total_steps,
                                         " and the rest run on this rank alone"));
          }
          sync = nullptr;
          part = forward_backward(0, rows, 1);
        } else {
          if (group_cancel) {
            return absl::CancelledError(absl::StrCat("training of task \"", task_name,
                                                     "\" cancelled at step ", step, " of ", total_steps,
                                                     "; nothing was merged"));
          }
          part.task = flags[0];
          group_ends = flags[2] > 0;
          ++result.data_parallel_steps;
        }
      }
      const double task_value = part.task;
      const double extra_value = part.extra;
      if (!std::isfinite(task_value) || !std::isfinite(extra_value)) {
        return absl::AbortedError(absl::StrCat(
            "training of task \"", task_name, "\" stopped: non-finite ",
            std::isfinite(task_value) ? absl::StrCat("extra loss (", method.name(), ") ", extra_value)
                                      : absl::StrCat("loss ", task_value),
            " at step ", step + 1, " of ", total_steps, " (learning rate ", lr,
            "); nothing was merged, the served weights are unchanged"));
      }

      ctx.loss = at::scalar_tensor(task_value + extra_value, at::kDouble);
      method.BeforeOptimizerStep(ctx);
      double grad_norm = 0.0;
      if (o.max_grad_norm > 0) {
        grad_norm = optimizer.GradNorm();
        if (!std::isfinite(grad_norm)) {
          return absl::AbortedError(absl::StrCat("training of task \"", task_name,
                                                 "\" stopped: non-finite gradient norm at step ", step + 1,
                                                 " of ", total_steps, " (learning rate ", lr,
                                                 "); nothing was merged, the served weights are unchanged"));
        }
      }
      const double grad_scale =
          grad_norm > o.max_grad_norm && o.max_grad_norm > 0 ? o.max_grad_norm / (grad_norm + 1e-6) : 1.0;
      optimizer.Step(lr, grad_scale);
      method.AfterOptimizerStep(ctx);
      if (group_ends) {
        if (!member0) {
          const bool left = o.leave != nullptr && o.leave->load(std::memory_order_relaxed);
          return left ? absl::CancelledError(absl::StrCat("left the training of task \"", task_name,
                                                          "\" after step ", step + 1))
                      : absl::UnavailableError(absl::StrCat("training of task \"", task_name,
                                                            "\": a member left after step ", step + 1));
        }
        if (o.on_group_lost) {
          o.on_group_lost(absl::StrCat("a member left after step ", step + 1, " of ", total_steps,
                                       "; the rest run on this rank alone"));
        }
        sync = nullptr;
      }

      result.steps = step + 1;
      result.epochs = epoch + 1;
      result.tokens += batch.real_tokens;
      result.target_tokens += batch.target_tokens;
      result.losses.push_back(static_cast<float>(task_value));
      if (o.on_progress && ((step + 1) % o.progress_every == 0 || step + 1 == total_steps)) {
        TrainProgress p;
        p.task = task_name;
        p.step = step + 1;
        p.total_steps = total_steps;
        p.epoch = epoch;
        p.loss = task_value;
        p.extra_loss = extra_value;
        p.learning_rate = lr;
        p.grad_norm = grad_norm;
        p.elapsed_seconds = Seconds(start, Clock::now());
        p.tokens_per_second =
            p.elapsed_seconds > 0 ? static_cast<double>(result.tokens) / p.elapsed_seconds : 0;
        p.eta_seconds =
            p.elapsed_seconds / static_cast<double>(step + 1) * static_cast<double>(total_steps - step - 1);
        o.on_progress(p);
      }
    }
    size_t bad = 0;
    optimizer.Release();
    if (!AllFinite(params, &bad)) {
      return absl::AbortedError(
          absl::StrCat("training of task \"", task_name, "\" stopped: trained tensor \"", param_names[bad],
                       "\" has non-finite values after ", result.steps, " steps (learning rate ",
                       o.learning_rate, "); nothing was merged, the served weights are unchanged"));
    }
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("training of task \"", task_name, "\" failed: ", e.what()));
  }
  result.seconds = Seconds(start, Clock::now());
  if (!result.losses.empty()) {
    result.first_loss = result.losses.front();
    const size_t n = std::min<size_t>(10, result.losses.size());
    double sum = 0;
    for (size_t i = result.losses.size() - n; i < result.losses.size(); ++i) sum += result.losses[i];
    result.final_loss = sum / static_cast<double>(n);
  }
  if (o.train_only) return result;  // the guard aborts the task: the committed state is unchanged

  const Clock::time_point merge_start = Clock::now();
  TaskContext task_ctx;
  task_ctx.task_name = task_name;
  task_ctx.model = work.get();
  task_ctx.steps = result.steps;
  CausalLM* work_ptr = work.get();
  task_ctx.for_each_batch = [&source, work_ptr, this](int64_t batch_size, int64_t max_batches,
                                                      const BatchLossCallback& callback) -> absl::Status {
    BatchPlanOptions plan;
    plan.batch_size = batch_size > 0 ? batch_size : options_.batch_size;
    plan.shuffle = false;
    BatchOptions batch_options;
    batch_options.pad_id = options_.pad_id;
    batch_options.ignore_index = kIgnoreIndex;
    const auto batches = PlanBatches(source.examples(), plan);
    int64_t done = 0;
    for (const auto& rows : batches) {
      if (max_batches > 0 && done >= max_batches) break;
      Batch batch = MakeBatch(source.examples(), rows, batch_options);
      StepTensors in = ToTensors(batch, work_ptr->device());
      at::Tensor loss = CausalLmLoss(work_ptr->Forward(in.input_ids, in.attention_mask), in.labels);
      RETURN_IF_ERROR(callback(loss, batch.target_tokens));
      ++done;
    }
    return absl::OkStatus();
  };
  try {
    RETURN_IF_ERROR(method.AfterTraining(task_ctx));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("method ", method.name(), ": after-training pass of task \"",
                                            task_name, "\" failed: ", e.what()));
  }
  RETURN_IF_ERROR(method.EndTask(work.get()));  // aborts the task itself on error
  guard.Commit();
  result.merge_seconds = Seconds(merge_start, Clock::now());
  result.model = std::move(work);
  return result;
}

}  // namespace strata
