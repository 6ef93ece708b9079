// strata-bench-decode: prefill and KV-cached decode throughput of the Strata decoder.
//
//   strata-bench-decode [--threads N] [--models stories260K,110m] [--dtype float32|bfloat16]
//                       [--prompt 32] [--new 128] [--reps 3] [--model-dir DIR] [--batches 1,8,16]
//                       [--decode-step 0|1] [--adapter none|lora|share]
//
// For each model and batch size (--batches, default 1, 8 and 16) it times a prefill of a --prompt-token
// random prompt and then --new greedy decode steps through the KV cache (the model's own Forward loop, no
// tokenizer), and a single-sequence prefill of 256 tokens. Each figure is the median over --reps runs after
// one warm-up run. Tokens/s counts every sequence of the batch. Then the cost of automatic routing: the
// router's feature pass on W0 (the first (layers + 1) / 2 decoder layers over the prompt) and its
// decision among 8 tasks, against a batch-1 generation of 64 tokens (prefill + 64 decode steps).
// With a tokenizer (the model directory's, or ../shared/tokenizers/llama2 for the 110M config) it
// also times strata::Generate (greedy, detokenised, streamed) against the bare Forward loop.
// --kernels 1 prints only the table of one 110M decode step's matrix products for 1-32 rows through
// at::linear (GEMM), one GEMV per row (1-8 rows), the small-rows kernel (core/model/small_gemm.h) and
// at::linear on the rows zero-padded to a multiple of 16. --decode-step 0 runs decode steps through the
// per-layer operators instead of CausalLM::DecodeStep (core/model/decode_step.cc), to compare.
// --adapter puts a side path on every linear layer but the head, as a task route has: a rank-8 LoRA
// (lora), or Share's route, a k = 32 basis on each side with a 32×32 core (share, k_max's default).

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/bench_util.h"
#include "core/adapt/lora.h"
#include "core/adapt/router.h"
#include "core/model/generate.h"
#include "core/model/model.h"
#include "core/model/runtime.h"
#include "core/model/small_gemm.h"
#include "core/model/tokenizer.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Flags {
  int threads = 2;
  std::vector<std::string> models = {"stories260K", "110m"};
  std::string dtype = "float32";
  std::string device = "cpu";
  int64_t prompt = 32;
  int64_t new_tokens = 128;
  int reps = 3;
  std::string model_dir = std::string(STRATA_SHARED_DIR) + "/models/stories260K";
  // Tokenizer for the 110M model's Generate() figure (vocab 32000).
  std::string tokenizer_110m = std::string(STRATA_SHARED_DIR) + "/tokenizers/llama2";
  bool kernels = false;  // --kernels 1: the GEMM-vs-GEMV table only
  std::vector<int64_t> batches = {1, 8, 16};
  bool decode_step = true;       // --decode-step 0: steps through the per-layer operators (RunLayers)
  std::string adapter = "none";  // none | lora | share: a side path on every linear layer
};

void Usage() {
  std::fprintf(stderr,
               "usage: strata-bench-decode [--threads N] [--models stories260K,110m] "
               "[--dtype float32|bfloat16] [--device cpu|cuda] [--prompt 32] [--new 128] [--reps 3] "
               "[--model-dir DIR] [--kernels 0|1] [--batches 1,8,16] [--decode-step 0|1] "
               "[--adapter none|lora|share]\n");
}

bool ParseFlags(int argc, char** argv, Flags* f) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&](std::string* out) {
      if (i + 1 >= argc) return false;
      *out = argv[++i];
      return true;
    };
    std::string v;
    if (arg == "--help" || arg == "-h") return false;
    if (!value(&v)) return false;
    if (arg == "--threads") {
      if (!absl::SimpleAtoi(v, &f->threads) || f->threads < 1) return false;
    } else if (arg == "--models") {
      f->models = absl::StrSplit(v, ',', absl::SkipEmpty());
    } else if (arg == "--dtype") {
      f->dtype = v;
    } else if (arg == "--device") {
      f->device = v;
    } else if (arg == "--prompt") {
      if (!absl::SimpleAtoi(v, &f->prompt) || f->prompt < 1) return false;
    } else if (arg == "--new") {
      if (!absl::SimpleAtoi(v, &f->new_tokens) || f->new_tokens < 1) return false;
    } else if (arg == "--reps") {
      if (!absl::SimpleAtoi(v, &f->reps) || f->reps < 1) return false;
    } else if (arg == "--model-dir") {
      f->model_dir = v;
    } else if (arg == "--kernels") {
      f->kernels = v == "1";
    } else if (arg == "--decode-step") {
      if (v != "0" && v != "1") return false;
      f->decode_step = v == "1";
    } else if (arg == "--adapter") {
      if (v != "none" && v != "lora" && v != "share") return false;
      f->adapter = v;
    } else if (arg == "--batches") {
      f->batches.clear();
      for (absl::string_view b : absl::StrSplit(v, ',', absl::SkipEmpty())) {
        int64_t n = 0;
        if (!absl::SimpleAtoi(b, &n) || n < 1) return false;
        f->batches.push_back(n);
      }
      if (f->batches.empty()) return false;
    } else {
      return false;
    }
  }
  return true;
}

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// The matrix products of one decode step of `c` (every q/k/v/o/gate/up/down weight of every layer
// + the lm_head) on `rows` activation rows, through at::linear (a GEMM) and through one at::mv
// (GEMV) per row; median ms over `reps` steps. Random weights; only the shapes matter.
void KernelCompare(const strata::ModelConfig& c, int reps) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const int64_t h = c.hidden_size;
  const int64_t qd = c.num_attention_heads * c.head_dim;
  const int64_t kvd = c.num_key_value_heads * c.head_dim;
  std::vector<at::Tensor> weights;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    for (auto [out, in] : {std::pair<int64_t, int64_t>{qd, h},
                           {kvd, h},
                           {kvd, h},
                           {h, qd},
                           {c.intermediate_size, h},
                           {c.intermediate_size, h},
                           {h, c.intermediate_size}}) {
      weights.push_back(at::randn({out, in}, f32).mul_(0.02));
    }
  }
  weights.push_back(at::randn({c.vocab_size, h}, f32).mul_(0.02));
  std::printf("matrix products of one decode step (%zu matrices), ms per step; small-rows kernel: %s\n",
              weights.size(),
              *strata::SmallRowsLinearIsa() ? strata::SmallRowsLinearIsa() : "none on this CPU");
  std::printf("%6s %12s %12s %12s %14s\n", "rows", "linear", "mv per row", "small-rows", "linear pad 16");
  for (int64_t rows : {1, 2, 3, 4, 6, 8, 10, 12, 13, 14, 15, 16, 20, 24, 28, 32}) {
    std::vector<at::Tensor> xs;
    for (const at::Tensor& w : weights) xs.push_back(at::randn({rows, w.size(1)}, f32));
    const int64_t padded = (rows + 15) / 16 * 16;
    std::vector<double> gemm_ms, gemv_ms, small_ms, pad_ms;
    for (int r = 0; r < reps + 1; ++r) {
      auto t0 = Clock::now();
      for (size_t i = 0; i < weights.size(); ++i) (void)at::linear(xs[i], weights[i]);
      auto t1 = Clock::now();
      if (rows <= 8) {
        for (size_t i = 0; i < weights.size(); ++i) {
          for (int64_t row = 0; row < rows; ++row) (void)at::mv(weights[i], xs[i][row]);
        }
      }
      auto t2 = Clock::now();
      for (size_t i = 0; i < weights.size(); ++i) {
        at::Tensor y = at::empty({rows, weights[i].size(0)}, f32);
        strata::SmallRowsLinear(xs[i].data_ptr<float>(), rows, weights[i].data_ptr<float>(),
                                weights[i].size(0), weights[i].size(1), nullptr, y.data_ptr<float>());
      }
      auto t3 = Clock::now();
      for (size_t i = 0; i < weights.size(); ++i) {  // what LinearLayer does for 13-15 rows
        at::Tensor xp = at::zeros({padded, xs[i].size(1)}, f32);
        xp.narrow(0, 0, rows).copy_(xs[i]);
        (void)at::linear(xp, weights[i]).narrow(0, 0, rows);
      }
      auto t4 = Clock::now();
      if (r == 0) continue;  // warm-up
      gemm_ms.push_back(1e3 * Seconds(t0, t1));
      gemv_ms.push_back(1e3 * Seconds(t1, t2));
      small_ms.push_back(1e3 * Seconds(t2, t3));
      pad_ms.push_back(1e3 * Seconds(t3, t4));
    }
    if (rows <= 8) {
      std::printf("%6ld %12.2f %12.2f %12.2f %14.2f\n", rows, Median(gemm_ms), Median(gemv_ms),
                  Median(small_ms), Median(pad_ms));
    } else {
      std::printf("%6ld %12.2f %12s %12.2f %14.2f\n", rows, Median(gemm_ms), "-", Median(small_ms),
                  Median(pad_ms));
    }
    std::fflush(stdout);
  }
}

struct RunTimes {
  double prefill = 0;
  double decode = 0;
};

// One prefill of [batch, prompt] and `steps` greedy decode steps through the KV cache.
RunTimes RunOnce(const strata::CausalLM& model, int64_t batch, int64_t prompt, int64_t steps, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  const at::Tensor ids =
      at::randint(3, model.config().vocab_size, {batch, prompt}, gen, at::TensorOptions().dtype(at::kLong));
  strata::KVCache cache;
  cache.Reserve(prompt + steps);
  RunTimes t;
  const auto t0 = Clock::now();
  at::Tensor logits = model.Forward(ids, at::Tensor(), &cache, 1);
  at::Tensor next = logits.select(1, -1).argmax(-1).view({batch, 1});
  (void)next.sum().item<int64_t>();  // waits for the device (CUDA runs asynchronously)
  const auto t1 = Clock::now();
  for (int64_t s = 0; s < steps; ++s) {
    logits = model.Forward(next, at::Tensor(), &cache, 1);
    next = logits.select(1, -1).argmax(-1).view({batch, 1});
  }
  (void)next.sum().item<int64_t>();
  const auto t2 = Clock::now();
  t.prefill = Seconds(t0, t1);
  t.decode = Seconds(t1, t2);
  return t;
}

// strata::Generate (greedy, the tokenizer's incremental detokenisation and a streaming callback,
// as the server runs it) against the bare Forward loop of RunOnce on the same prompt length and
// number of new tokens: median tokens/s of each and their ratio.
void GenerateVsForward(const strata::CausalLM& model, const strata::Tokenizer& tokenizer, const Flags& f) {
  at::Generator gen = at::detail::createCPUGenerator(5);
  const at::Tensor ids =
      at::randint(3, model.config().vocab_size, {f.prompt}, gen, at::TensorOptions().dtype(at::kLong));
  std::vector<int32_t> prompt(static_cast<size_t>(f.prompt));
  for (int64_t i = 0; i < f.prompt; ++i)
    prompt[static_cast<size_t>(i)] = static_cast<int32_t>(ids[i].item<int64_t>());
  strata::SamplingOptions options;
  options.max_new_tokens = static_cast<int32_t>(f.new_tokens);
  options.stop_on_eos = false;
  std::vector<double> generate_tps, forward_tps;
  size_t streamed = 0;
  for (int r = 0; r < f.reps + 1; ++r) {
    const auto t0 = Clock::now();
    auto result =
        strata::Generate(model, tokenizer, {prompt}, options, [&](size_t, int32_t, const std::string& delta) {
          streamed += delta.size();
          return true;
        });
    const double g = Seconds(t0, Clock::now());
    const RunTimes b = RunOnce(model, 1, f.prompt, f.new_tokens, 400 + r);
    if (r == 0 || !result.ok()) continue;
    generate_tps.push_back(static_cast<double>((*result)[0].ids.size()) / g);
    forward_tps.push_back(static_cast<double>(f.new_tokens) / (b.prefill + b.decode));
  }
  if (generate_tps.empty()) return;
  std::printf(
      "Generate (greedy, detokenised, streamed; prefill included): %.1f tokens/s | bare "
      "Forward loop: %.1f tokens/s | ratio %.3f\n",
      Median(generate_tps), Median(forward_tps), Median(generate_tps) / Median(forward_tps));
  std::fflush(stdout);
}

// --adapter: a side path on every linear layer of the decoder (not the head), in the weights' dtype
// and device, with random factors (their values do not change the cost).
void AddAdapters(strata::CausalLM* model, const std::string& kind) {
  if (kind == "none") return;
  at::Generator gen = at::detail::createCPUGenerator(11);
  for (const std::string& name : model->LinearNames()) {
    strata::LinearLayer* layer = model->FindLinear(name);
    const at::TensorOptions o = layer->weight.options();
    const int64_t n = layer->weight.size(0);
    const int64_t d = layer->weight.size(1);
    auto random = [&](int64_t rows, int64_t cols) {
      return (at::randn({rows, cols}, gen, at::kFloat) * 0.02).to(o);
    };
    if (kind == "lora") {
      layer->adapter = std::make_shared<strata::LoraAdapter>(random(8, d), random(n, 8), 16.0 / 8);
    } else {
      layer->adapter =
          std::make_shared<strata::SharedBasisAdapter>(random(n, 32), random(32, 32), random(d, 32), 1.0);
    }
  }
}

void Bench(const std::string& name, const strata::CausalLM& model, const Flags& f,
           const strata::Tokenizer* tokenizer) {
  const strata::ModelConfig& c = model.config();
  std::printf(
      "\n== %s: %.2fM parameters (hidden %ld, %ld layers, %ld heads / %ld kv, "
      "intermediate %ld, vocab %ld), %s, side paths: %s\n",
      name.c_str(), static_cast<double>(model.ParameterCount()) / 1e6, c.hidden_size, c.num_hidden_layers,
      c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.vocab_size, f.dtype.c_str(),
      f.adapter.c_str());
  RunOnce(model, 1, f.prompt, 8, 99);  // warm-up
  for (int64_t batch : f.batches) {
    std::vector<double> prefill, decode;
    for (int r = 0; r < f.reps; ++r) {
      const RunTimes t = RunOnce(model, batch, f.prompt, f.new_tokens, 100 + r);
      prefill.push_back(static_cast<double>(batch * f.prompt) / t.prefill);
      decode.push_back(static_cast<double>(batch * f.new_tokens) / t.decode);
    }
    std::printf(
        "batch %ld: prefill %ld tokens: %10.1f tokens/s | decode %ld new tokens: "
        "%10.1f tokens/s (%.2f ms/step)\n",
        batch, f.prompt, Median(prefill), f.new_tokens, Median(decode),
        1e3 * static_cast<double>(batch) / Median(decode));
    std::fflush(stdout);
  }
  const int64_t long_prompt = std::min<int64_t>(256, c.max_position_embeddings);
  std::vector<double> prefill;
  for (int r = 0; r < f.reps; ++r) {
    const RunTimes t = RunOnce(model, 1, long_prompt, 0, 200 + r);
    prefill.push_back(static_cast<double>(long_prompt) / t.prefill);
  }
  std::printf("batch 1: prefill %ld tokens: %10.1f tokens/s\n", long_prompt, Median(prefill));
  std::fflush(stdout);

  if (tokenizer != nullptr) GenerateVsForward(model, *tokenizer, f);

  // Automatic routing overhead (what Engine::Resolve adds to a request; tokenisation excluded).
  strata::TaskRouter router;
  const int64_t layer = router.FeatureLayer(model);
  at::Generator gen = at::detail::createCPUGenerator(7);
  for (int t = 0; t < 8; ++t) {
    at::Tensor feats = at::randn({64, c.hidden_size}, gen, at::TensorOptions().dtype(at::kFloat));
    feats.select(1, t).add_(5.0);
    (void)router.AddTask("task" + std::to_string(t), feats, layer);
  }
  const at::Tensor ids =
      at::randint(3, c.vocab_size, {1, f.prompt}, gen, at::TensorOptions().dtype(at::kLong));
  const at::Tensor mask = at::ones({1, f.prompt}, at::TensorOptions().dtype(at::kLong));
  std::vector<double> feature_s, decide_s, generate_s;
  for (int r = 0; r < f.reps + 1; ++r) {
    const auto t0 = Clock::now();
    at::Tensor h = model.HiddenStates(ids, mask, layer).mean(1);
    const auto t1 = Clock::now();
    auto decisions = router.Route(h);
    const auto t2 = Clock::now();
    const RunTimes g = RunOnce(model, 1, f.prompt, 64, 300 + r);
    if (r == 0) continue;  // warm-up
    feature_s.push_back(Seconds(t0, t1));
    decide_s.push_back(Seconds(t1, t2));
    generate_s.push_back(g.prefill + g.decode);
  }
  const double feature = Median(feature_s), decide = Median(decide_s), generate = Median(generate_s);
  std::printf(
      "routing: feature pass (%ld of %ld layers, %ld-token prompt) %.3f ms + decision (8 tasks) %.3f ms "
      "= %.1f%% of a 64-token generation (%.1f ms)\n",
      layer, c.num_hidden_layers, f.prompt, 1e3 * feature, 1e3 * decide,
      100.0 * (feature + decide) / generate, 1e3 * generate);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  Flags f;
  if (!ParseFlags(argc, argv, &f)) {
    Usage();
    return 2;
  }
  strata::SetTorchThreads(f.threads);
  c10::InferenceMode guard;
  std::printf("%s\n", strata::TorchRuntimeSummary().c_str());
  {
    std::ifstream loadavg("/proc/loadavg");
    std::string line;
    std::getline(loadavg, line);
    const char* wait = std::getenv("OMP_WAIT_POLICY");
    std::printf("load average at start: %s; OMP_WAIT_POLICY=%s\n", line.c_str(),
                wait != nullptr ? wait : "(unset)");
  }
  strata::ModelLoadOptions options;
  options.dtype = f.dtype;
  auto device = strata::ResolveDevice(f.device);
  if (!device.ok()) {
    std::fprintf(stderr, "--device: %s\n", std::string(device.status().message()).c_str());
    return 2;
  }
  options.device = *device;
  std::printf("device %s, dtype %s\n", device->c_str(), f.dtype.c_str());
  if (f.kernels) {
    KernelCompare(strata::bench::Llama110mConfig(), f.reps);
    return 0;
  }
  for (const std::string& name : f.models) {
    if (name == "stories260K") {
      auto model = strata::CausalLM::Load(f.model_dir, options);
      if (!model.ok()) {
        std::fprintf(stderr, "loading %s: %s\n", f.model_dir.c_str(), model.status().ToString().c_str());
        return 1;
      }
      (*model)->set_decode_step_enabled(f.decode_step);
      AddAdapters(model->get(), f.adapter);
      auto tokenizer = strata::Tokenizer::FromDirectory(f.model_dir);
      Bench(name, **model, f, tokenizer.ok() ? tokenizer->get() : nullptr);
    } else if (name == "110m") {
      strata::ModelConfig c = strata::bench::Llama110mConfig();
      auto model = strata::CausalLM::RandomInit(c, 1234, options);
      if (!model.ok()) {
        std::fprintf(stderr, "RandomInit 110m: %s\n", model.status().ToString().c_str());
        return 1;
      }
      (*model)->set_decode_step_enabled(f.decode_step);
      AddAdapters(model->get(), f.adapter);
      auto tokenizer = strata::Tokenizer::FromDirectory(f.tokenizer_110m);
      Bench("random-init 110M (Llama, tied)", **model, f, tokenizer.ok() ? tokenizer->get() : nullptr);
    } else {
      std::fprintf(stderr, "unknown model %s (expected stories260K or 110m)\n", name.c_str());
      return 2;
    }
  }
  return 0;
}
