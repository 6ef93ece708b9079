// `strata bench memory`: see memory_bench.h.

#include "bench/memory_bench.h"

#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "bench/bench_util.h"
#include "bench/memory_plan.h"
#include "bench/train_bench.h"
#include "core/adapt/method.h"
#include "core/adapt/trainer.h"
#include "core/model/model.h"
#include "core/model/runtime.h"
#include "core/util/file_util.h"
#include "core/util/process_info.h"
#include "core/util/status_macros.h"
#include "nlohmann/json.hpp"

namespace strata::bench {
namespace {

using json = nlohmann::json;

int Usage(const std::string& message) {
  std::fprintf(stderr, "strata bench memory: %s\n", message.c_str());
  return kExitUsage;
}

std::string Gib(int64_t bytes) {
  const double b = static_cast<double>(bytes);
  if (bytes > 0 && bytes < (int64_t{1} << 20)) return absl::StrFormat("%.1f KiB", b / 1024);
  if (bytes < (int64_t{1} << 30)) return absl::StrFormat("%.1f MiB", b / (1 << 20));
  return absl::StrFormat("%.2f GiB", b / (int64_t{1} << 30));
}

std::string Mib(int64_t bytes) { return absl::StrFormat("%.1f", static_cast<double>(bytes) / (1 << 20)); }

absl::StatusOr<ModelConfig> ResolveConfig(const std::string& name) {
  if (name == "110m") return Llama110mConfig();
  for (const std::string& preset : PresetModelNames()) {
    if (name == preset) return PresetModelConfig(name);
  }
  const std::string path = name + "/config.json";
  if (!PathExists(path)) {
    return absl::InvalidArgumentError(absl::StrCat("--config: \"", name, "\" is neither a preset (",
                                                   absl::StrJoin(PresetModelNames(), ", "),
                                                   ", 110m) nor a directory with config.json"));
  }
  return LoadModelConfig(path);
}

struct Measured {
  int64_t baseline_rss = 0;  // after loading the model, before training
  int64_t peak_rss = 0;      // VmHWM after the steps
  int64_t steps = 0;
};

absl::StatusOr<Measured> MeasureTraining(const MemoryBenchArgs& a, const std::string& method_name,
                                         const std::string& dtype) {
  ModelLoadOptions lo;
  lo.device = "cpu";
  lo.dtype = dtype;
  std::unique_ptr<CausalLM> model;
  if (a.config == "110m") {
    ASSIGN_OR_RETURN(model, CausalLM::RandomInit(Llama110mConfig(), 1234, lo));
  } else {
    ASSIGN_OR_RETURN(model, CausalLM::Load(a.config, lo));
  }
  MethodConfig mc;
  mc.target_modules = SplitList(a.targets);
  mc.rank = a.rank;
  mc.p = a.rank;
  mc.k_max = a.k_max;
  mc.ella_lambda = a.lambda;
  ASSIGN_OR_RETURN(std::unique_ptr<Method> method, CreateMethod(method_name, mc));
  TrainOptions o;
  o.batch_size = a.batch_size;
  o.bucket_size = a.batch_size;
  o.max_steps = a.steps + 1;  // cancelled after `steps`: the peak of the steps, not of a merge
  std::atomic<bool> cancel{false};
  o.cancel = &cancel;
  Measured m;
  o.on_progress = [&](const TrainProgress& p) {
    m.steps = p.step;
    if (p.step >= a.steps) cancel.store(true);
  };
  const TrainTask task =
      RandomTrainTask("memory", a.batch_size * 2, a.seq_len, model->config().vocab_size, 5);
  m.baseline_rss = ReadProcessStats().resident_bytes;
  if (!ResetPeakResident()) {
    return absl::FailedPreconditionError("cannot reset the peak resident size (/proc/self/clear_refs)");
  }
  Trainer trainer(o);
  absl::StatusOr<TrainResult> r = trainer.Train(*model, *method, task.name, {task});
  m.peak_rss = PeakResidentBytes();
  if (r.ok()) return absl::InternalError("the measured run was not cancelled");
  if (r.status().code() != absl::StatusCode::kCancelled) return r.status();
  return m;
}

}  // namespace

void AddMemoryBenchOptions(CLI::App* sub, MemoryBenchArgs* a) {
  sub->add_option("--config", a->config,
                  "Model: a directory with config.json, llama-8b, mistral-7b, qwen2-7b or 110m (random-init "
                  "benchmark config)")
      ->capture_default_str();
  sub->add_option("--dtype", a->dtype,
                  "Weight dtype: float32, bfloat16, float16 (default: bfloat16 on cuda, "
                  "float32 on cpu)");
  sub->add_option("--device", a->device, "cuda or cpu (cpu computes activations in float32)")
      ->capture_default_str();
  sub->add_option("--batch-size", a->batch_size, "Sequences per training step")->capture_default_str();
  sub->add_option("--seq-len", a->seq_len, "Tokens per sequence")->capture_default_str();
  sub->add_option("--targets", a->targets, "Target modules (comma-separated or all-linear)")
      ->capture_default_str();
  sub->add_option("--rank", a->rank, "LoRA rank / Share p")->capture_default_str();
  sub->add_option("--k-max", a->k_max, "Share subspace rank (assumed reached)")->capture_default_str();
  sub->add_option("--tasks", a->tasks, "Learned tasks (for the state that grows per task)")
      ->capture_default_str();
  sub->add_option("--lambda", a->lambda, "ELLA λ (> 0: a dense float32 W_past during each task)")
      ->capture_default_str();
  sub->add_option("--methods", a->methods, "Methods, comma-separated (default: all)")->delimiter(',');
  sub->add_flag("--measure", a->measure, "Also train the (one) method on the CPU and measure the peak RSS");
  sub->add_option("--steps", a->steps, "--measure: training steps")->capture_default_str();
  sub->add_option("--threads", a->threads, "--measure: torch CPU threads")->capture_default_str();
  sub->add_option("--json", a->json_out, "Write the plan (and measurement) as JSON to this file");
}

int RunMemoryBenchCommand(const MemoryBenchArgs& args) {
  MemoryBenchArgs a = args;
  a.methods = FlattenList(a.methods);
  if (a.device != "cpu" && a.device != "cuda") return Usage("--device must be cpu or cuda");
  const std::string dtype = !a.dtype.empty() ? a.dtype : a.device == "cuda" ? "bfloat16" : "float32";
  if (a.measure) {
    if (a.device != "cpu") return Usage("--measure trains on the CPU: pass --device cpu");
    if (a.methods.size() != 1) return Usage("--measure takes exactly one method (--methods NAME)");
    if (dtype == "float16") return Usage("--measure: float16 is CUDA-only");
    if (a.steps < 1 || a.threads < 1) return Usage("--steps and --threads must be positive");
  }
  absl::StatusOr<ModelConfig> config = ResolveConfig(a.config);
  if (!config.ok()) return Usage(std::string(config.status().message()));
  MemoryPlanOptions o;
  o.dtype = dtype;
  o.device = a.device;
  o.batch_size = a.batch_size;
  // The trainer feeds ids[0..T-2] and predicts ids[1..T-1]: a forward pass sees seq_len - 1 tokens.
  o.seq_len = a.measure ? a.seq_len - 1 : a.seq_len;
  o.targets = SplitList(a.targets);
  o.rank = a.rank;
  o.k_max = a.k_max;
  o.tasks = a.measure ? 0 : a.tasks;  // a measurement trains the first task of a fresh state
  o.ella_lambda = a.lambda;
  absl::StatusOr<MemoryPlan> plan = PlanMemory(*config, o, a.methods);
  if (!plan.ok()) return Usage(std::string(plan.status().message()));

  const ModelConfig& c = plan->config;
  std::printf(
      "strata bench memory: %s (%s, hidden %lld, %lld layers, %lld/%lld heads, intermediate %lld, vocab "
      "%lld), %s weights on %s (activations in %s)\n",
      a.config.c_str(), c.architecture.c_str(), static_cast<long long>(c.hidden_size),
      static_cast<long long>(c.num_hidden_layers), static_cast<long long>(c.num_attention_heads),
      static_cast<long long>(c.num_key_value_heads), static_cast<long long>(c.intermediate_size),
      static_cast<long long>(c.vocab_size), dtype.c_str(), a.device.c_str(),
      plan->compute_dtype_bytes == 4 ? "float32" : dtype.c_str());
  std::printf(
      "training: batch %lld x %lld tokens, targets %s, rank %lld, k_max %lld, %lld learned tasks, "
      "lambda %g\n",
      static_cast<long long>(o.batch_size), static_cast<long long>(o.seq_len), a.targets.c_str(),
      static_cast<long long>(a.rank), static_cast<long long>(a.k_max), static_cast<long long>(o.tasks),
      a.lambda);
  std::printf("weights: %lld parameters = %s; target modules hold %lld (%s)\n",
              static_cast<long long>(plan->parameters), Gib(plan->weight_bytes).c_str(),
              static_cast<long long>(plan->adapted_parameters),
              Gib(plan->adapted_parameters * (dtype == "float32" ? 4 : 2)).c_str());
  std::printf("KV cache: %s per token (%s per 4096-token sequence)\n\n",
              Gib(plan->kv_bytes_per_token).c_str(), Gib(plan->kv_bytes_per_token * 4096).c_str());
  std::printf("%-11s %12s %12s %12s %12s %12s %12s %12s %14s\n", "method", "trainable", "state", "checkpoint",
              "task_state", "params+grad", "optimizer", "activations", "training_peak");
  json jm = json::array();
  for (const MethodMemory& m : plan->methods) {
    std::printf("%-11s %12lld %12s %12s %12s %12s %12s %12s %14s\n", m.method.c_str(),
                static_cast<long long>(m.trainable_parameters), Gib(m.state_bytes).c_str(),
                Gib(m.checkpoint_bytes).c_str(), Gib(m.task_state_bytes).c_str(),
                Gib(m.trainable_bytes).c_str(), Gib(m.optimizer_bytes).c_str(),
                Gib(m.activation_bytes).c_str(), Gib(m.training_peak_bytes).c_str());
    jm.push_back({{"method", m.method},
                  {"trainable_parameters", m.trainable_parameters},
                  {"state_bytes", m.state_bytes},
                  {"checkpoint_bytes", m.checkpoint_bytes},
                  {"task_state_bytes", m.task_state_bytes},
                  {"trainable_bytes", m.trainable_bytes},
                  {"optimizer_bytes", m.optimizer_bytes},
                  {"activation_bytes", m.activation_bytes},
                  {"training_peak_bytes", m.training_peak_bytes}});
  }
  std::printf(
      "\nstate = adaptation state in memory beyond the served weights (which hold W0 + W_past); checkpoint "
      "= method.safetensors; task_state = held only while a task trains; training_peak = state + "
      "task_state + params+grad + optimizer + activations, on top of the weights (and, when serving, the KV "
      "caches).\nGPU total while training ~ weights + training_peak.\n");
  json out;
  out["config"] = a.config;
  out["dtype"] = dtype;
  out["device"] = a.device;
  out["batch_size"] = o.batch_size;
  out["seq_len"] = o.seq_len;
  out["targets"] = a.targets;
  out["rank"] = a.rank;
  out["tasks"] = o.tasks;
  out["parameters"] = plan->parameters;
  out["weight_bytes"] = plan->weight_bytes;
  out["kv_bytes_per_token"] = plan->kv_bytes_per_token;
  out["methods"] = jm;

  int exit_code = kExitOk;
  if (a.measure) {
    SetTorchThreads(a.threads);
    absl::StatusOr<Measured> m = MeasureTraining(a, a.methods.front(), dtype);
    if (!m.ok()) {
      std::fprintf(stderr, "strata bench memory: measurement failed: %s\n", m.status().ToString().c_str());
      exit_code = kExitFailed;
    } else {
      const int64_t measured = m->peak_rss - m->baseline_rss;
      const int64_t planned = plan->methods.front().training_peak_bytes;
      const double err = 100.0 * (static_cast<double>(planned) - static_cast<double>(measured)) /
                         static_cast<double>(measured);
      std::printf(
          "\nmeasured (%s, %lld steps, %d threads): RSS after loading %s MiB, peak %s MiB: training peak "
          "%s MiB; planned %s MiB (%+.1f%%)\n",
          a.methods.front().c_str(), static_cast<long long>(m->steps), a.threads,
          Mib(m->baseline_rss).c_str(), Mib(m->peak_rss).c_str(), Mib(measured).c_str(), Mib(planned).c_str(),
          err);
      out["measured"] = {{"method", a.methods.front()},
                         {"steps", m->steps},
                         {"threads", a.threads},
                         {"baseline_rss_bytes", m->baseline_rss},
                         {"peak_rss_bytes", m->peak_rss},
                         {"training_peak_bytes", measured},
                         {"planned_training_peak_bytes", planned},
                         {"error_percent", err},
                         {"runtime", TorchRuntimeSummary()}};
    }
  }
  if (!a.json_out.empty()) {
    absl::Status s = WriteFileAtomic(a.json_out, out.dump(1) + "\n");
    if (!s.ok()) {
      std::fprintf(stderr, "strata bench memory: writing %s: %s\n", a.json_out.c_str(),
                   std::string(s.message()).c_str());
      return kExitFailed;
    }
  }
  return exit_code;
}

}  // namespace strata::bench
