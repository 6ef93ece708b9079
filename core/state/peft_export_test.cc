// Engine::ExportAdapter on the real stories260K model: a learned task's route written as a PEFT LoRA
// directory, read back by the project's own PEFT import into a fresh state, serves the same greedy
// tokens; the files are laid out as PEFT writes them; a non-empty directory is refused unless
// overwrite; methods with dense updates need a rank and report the truncation error.

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "absl/strings/str_cat.h"
#include "core/adapt/peft_import.h"
#include "core/data/dataset.h"
#include "core/model/model.h"
#include "core/model/runtime.h"
#include "core/model/safetensors.h"
#include "core/model/tokenizer.h"
#include "core/state/engine.h"
#include "core/util/file_util.h"

namespace strata {
namespace {
namespace fs = std::filesystem;
using json = nlohmann::json;

const std::string kModel = std::string(STRATA_SHARED_DIR) + "/models/stories260K";

struct Dir {
  Dir() {
    path = (fs::temp_directory_path() /
            ("strata-peft-export-" + std::to_string(::getpid()) + "-" + std::to_string(n++)))
               .string();
    fs::remove_all(path);
  }
  ~Dir() { fs::remove_all(path); }
  std::string path;
  static inline int n = 0;
};

EngineOptions Options(const std::string& dir, const std::string& method) {
  EngineOptions o;
  o.state_dir = dir;
  o.base_model_id = kModel;
  o.recipe.method = method;
  o.recipe.max_steps = 24;
  o.recipe.batch_size = 8;
  o.recipe.learning_rate = 1e-2;
  o.recipe.method_config.target_modules = {"q_proj", "v_proj"};
  o.training_threads = 2;
  return o;
}

std::unique_ptr<Engine> MakeEngine(const EngineOptions& o) {
  auto model = CausalLM::Load(kModel);
  EXPECT_TRUE(model.ok()) << model.status();
  auto tok = Tokenizer::FromDirectory(kModel);
  EXPECT_TRUE(tok.ok()) << tok.status();
  ModelSummary summary;
  summary.name = "stories260K";
  auto engine =
      Engine::Create(std::move(*model), std::shared_ptr<const Tokenizer>(std::move(*tok)), summary, o);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? std::move(engine).value() : nullptr;
}

void Learn(Engine& engine, const std::string& task) {
  TaskLoadOptions lo;
  lo.max_train = 48;
  lo.max_test = 8;
  auto t = LoadTaskDir(std::string(STRATA_SHARED_DIR) + "/data/cl-small/" + task, lo);
  ASSERT_TRUE(t.ok()) << t.status();
  JobRecord job;
  job.id = "job-" + task;
  job.spec.name = task;
  JobContext ctx;
  auto r = engine.RunJob(job, t->train, t->test, ctx);
  ASSERT_TRUE(r.ok()) << r.status();
}

// Imports the adapter directory `dir` (its name is the task's) into `engine` as an import job does.
void Import(Engine& engine, const std::string& dir) {
  JobRecord job;
  job.id = "job-import";
  job.spec.name = fs::path(dir).filename().string();
  job.spec.import_dirs = {dir};
  JobContext ctx;
  auto r = engine.RunJob(job, {}, {}, ctx);
  ASSERT_TRUE(r.ok()) << r.status();
}

const std::vector<std::string> kPrompts = {"The capital of France is", "The capital of Japan is",
                                           "The three-letter code of Germany is",
                                           "The three-letter code of Brazil is", "Once upon a time"};

std::vector<std::vector<int32_t>> Greedy(const Engine& engine, const std::string& route) {
  SamplingOptions sampling;
  sampling.max_new_tokens = 12;
  sampling.temperature = 0;
  auto r = engine.GenerateRouted(*engine.Current(), route, kPrompts, sampling);
  EXPECT_TRUE(r.ok()) << r.status();
  std::vector<std::vector<int32_t>> out;
  if (!r.ok()) return out;
  for (const auto& [choice, result] : *r) {
    EXPECT_EQ(choice.route, route);
    out.push_back(result.ids);
  }
  return out;
}

at::Tensor RouteLogits(const Engine& engine, const std::string& route) {
  auto model = engine.Routed(*engine.Current(), route);
  EXPECT_TRUE(model.ok()) << model.status();
  c10::InferenceMode guard;
  auto ids = torch::tensor({1, 403, 407, 261, 378}, torch::kLong).unsqueeze(0);
  return (*model)->Forward(ids, at::Tensor());
}

at::Tensor BaseLogits(const Engine& engine) {
  auto choice = engine.Resolve(*engine.Current(), "base", "");
  EXPECT_TRUE(choice.ok()) << choice.status();
  c10::InferenceMode guard;
  auto ids = torch::tensor({1, 403, 407, 261, 378}, torch::kLong).unsqueeze(0);
  return choice->model->Forward(ids, at::Tensor());
}

// The "done means": export -> import of a task adapter gives the same greedy tokens on 5
// prompts. Both tasks of a two-task share_ella state (the first one's route leaves the later task
// out), each imported into a fresh state; and an inc_lora route (rank r per task) the same way.
TEST(PeftExport, RoundTripThroughTheImportServesTheSameGreedyTokens) {
  SetTorchThreads(2);
  for (const std::string method : {"share_ella", "inc_lora"}) {
    SCOPED_TRACE(method);
    Dir state, exports;
    auto engine = MakeEngine(Options(state.path, method));
    ASSERT_NE(engine, nullptr);
    Learn(*engine, "capitals");
    Learn(*engine, "iso3");
    const auto base_tokens = Greedy(*engine, "base");
    for (const std::string task : {"capitals", "iso3"}) {
      SCOPED_TRACE(task);
      const std::string dir = exports.path + "/" + task;
      auto exported = engine->ExportAdapter(task, dir);
      ASSERT_TRUE(exported.ok()) << exported.status();
      EXPECT_EQ(exported->method, method);
      EXPECT_LT(exported->relative_error, 1e-6);  // float32 rounding only
      EXPECT_FALSE(exported->dense);
      EXPECT_EQ(exported->modules, 10);  // q_proj and v_proj of 5 layers
      EXPECT_EQ(exported->rank, exported->exact_rank);
      // Rank 8 per task up to this one (inc_lora: its LoRAs side by side; share_ella: the task's
      // cumulative core in the shared basis, k = 16 <= k_max after two tasks, of rank 8 for the first).
      EXPECT_EQ(exported->rank, task == "capitals" ? 8 : 16);

      Dir fresh_state;
      auto fresh = MakeEngine(Options(fresh_state.path, "share_ella"));
      ASSERT_NE(fresh, nullptr);
      Import(*fresh, dir);
      const auto want = Greedy(*engine, task);
      const auto got = Greedy(*fresh, task);
      EXPECT_EQ(got, want);
      EXPECT_NE(want, base_tokens) << "the route generates what the base model does: the test shows nothing";
      const at::Tensor want_logits = RouteLogits(*engine, task);
      const double diff = (RouteLogits(*fresh, task) - want_logits).abs().max().item<double>();
      EXPECT_LT(diff, 1e-3);
      EXPECT_GT((want_logits - BaseLogits(*engine)).abs().max().item<double>(), 50 * diff + 1e-3);
    }
  }
}

// adapter_config.json and adapter_model.safetensors as PEFT's save_pretrained writes them for a Llama
// model: tensor names, [r, in] / [out, r] shapes, float32, one r with lora_alpha = r.
TEST(PeftExport, FilesAreLaidOutAsPeftWritesThem) {
  SetTorchThreads(2);
  Dir state, exports;
  EngineOptions options = Options(state.path, "share_ella");
  options.recipe.method_config.target_modules = {"all-linear"};
  options.recipe.max_steps = 4;
  auto engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  Learn(*engine, "capitals");
  const std::string dir = exports.path + "/capitals";
  auto exported = engine->ExportAdapter("capitals", dir);
  ASSERT_TRUE(exported.ok()) << exported.status();
  const int64_t r = exported->rank;
  EXPECT_GE(r, 1);
  EXPECT_LE(r, 32);

  std::set<std::string> files;
  for (const auto& e : fs::directory_iterator(dir)) files.insert(e.path().filename().string());
  EXPECT_EQ(files, (std::set<std::string>{"adapter_config.json", "adapter_model.safetensors"}));
  auto text = ReadFile(dir + "/adapter_config.json");
  ASSERT_TRUE(text.ok());
  const json config = json::parse(*text);
  EXPECT_EQ(config["peft_type"], "LORA");
  EXPECT_EQ(config["task_type"], "CAUSAL_LM");
  EXPECT_EQ(config["r"], r);
  EXPECT_EQ(config["lora_alpha"], r);
  EXPECT_EQ(config["base_model_name_or_path"], kModel);
  EXPECT_EQ(config["bias"], "none");
  EXPECT_EQ(config["use_dora"], false);
  EXPECT_EQ(config["use_rslora"], false);
  EXPECT_EQ(config["fan_in_fan_out"], false);
  EXPECT_TRUE(config["modules_to_save"].is_null());
  EXPECT_EQ(config["rank_pattern"], json::object());
  EXPECT_EQ(config["alpha_pattern"], json::object());
  std::vector<std::string> targets = config["target_modules"];
  std::sort(targets.begin(), targets.end());
  EXPECT_EQ(targets, (std::vector<std::string>{"down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                               "up_proj", "v_proj"}));

  auto file = SafetensorsFile::Open(dir + "/adapter_model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  // stories260K: hidden 64, 4 KV heads of 8 (k/v out 32), intermediate 172, 5 layers.
  const std::map<std::string, std::pair<int64_t, int64_t>> shapes = {
      {"self_attn.q_proj", {64, 64}}, {"self_attn.k_proj", {32, 64}}, {"self_attn.v_proj", {32, 64}},
      {"self_attn.o_proj", {64, 64}}, {"mlp.gate_proj", {172, 64}},   {"mlp.up_proj", {172, 64}},
      {"mlp.down_proj", {64, 172}}};
  std::set<std::string> want_names;
  for (int layer = 0; layer < 5; ++layer) {
    for (const auto& [module, out_in] : shapes) {
      const std::string prefix = absl::StrCat("base_model.model.model.layers.", layer, ".", module);
      want_names.insert(prefix + ".lora_A.weight");
      want_names.insert(prefix + ".lora_B.weight");
      const SafetensorsEntry& a = (*file)->entries().at(prefix + ".lora_A.weight");
      const SafetensorsEntry& b = (*file)->entries().at(prefix + ".lora_B.weight");
      EXPECT_EQ(a.dtype, "F32");
      EXPECT_EQ(b.dtype, "F32");
      EXPECT_EQ(a.shape, (std::vector<int64_t>{r, out_in.second})) << prefix;
      EXPECT_EQ(b.shape, (std::vector<int64_t>{out_in.first, r})) << prefix;
    }
  }
  std::set<std::string> names;
  for (const auto& [name, entry] : (*file)->entries()) names.insert(name);
  EXPECT_EQ(names, want_names);
  EXPECT_EQ((*file)->metadata().at("format"), "pt");
}

// A non-empty directory is refused (naming it) and left as it was unless overwrite; an empty one is
// used; a file is never replaced; no temporary directory is left behind. The same for the full-model
// and state exports.
TEST(PeftExport, RefusesANonEmptyDirectoryUnlessOverwrite) {
  SetTorchThreads(2);
  Dir state, exports;
  EngineOptions options = Options(state.path, "share_ella");
  options.recipe.max_steps = 2;
  auto engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  Learn(*engine, "capitals");
  const std::string dir = exports.path + "/capitals";
  ASSERT_TRUE(engine->ExportAdapter("capitals", dir).ok());
  auto before = ReadFile(dir + "/adapter_model.safetensors");
  ASSERT_TRUE(before.ok());

  WriteFileAtomic(dir + "/stray.txt", "not ours").IgnoreError();
  auto again = engine->ExportAdapter("capitals", dir);
  ASSERT_EQ(again.status().code(), absl::StatusCode::kAlreadyExists) << again.status();
  EXPECT_NE(again.status().message().find(dir), std::string::npos) << again.status();
  EXPECT_NE(again.status().message().find("overwrite"), std::string::npos) << again.status();
  EXPECT_TRUE(PathExists(dir + "/stray.txt"));
  EXPECT_EQ(*ReadFile(dir + "/adapter_model.safetensors"), *before);

  AdapterExportOptions overwrite;
  overwrite.overwrite = true;
  ASSERT_TRUE(engine->ExportAdapter("capitals", dir, overwrite).ok());
  EXPECT_FALSE(PathExists(dir + "/stray.txt"));  // replaced as a whole, not merged into
  EXPECT_TRUE(ReadPeftLoraAdapter(dir).ok());

  // A trailing '/' names the same directory.
  EXPECT_EQ(engine->ExportAdapter("capitals", dir + "/").status().code(), absl::StatusCode::kAlreadyExists);
  ASSERT_TRUE(engine->ExportAdapter("capitals", exports.path + "/slash/").ok());
  EXPECT_TRUE(PathExists(exports.path + "/slash/adapter_config.json"));
  // An empty directory is fine without overwrite; a file is refused even with it.
  fs::create_directories(exports.path + "/empty");
  EXPECT_TRUE(engine->ExportAdapter("capitals", exports.path + "/empty").ok());
  WriteFileAtomic(exports.path + "/file", "x").IgnoreError();
  EXPECT_EQ(engine->ExportAdapter("capitals", exports.path + "/file", overwrite).status().code(),
            absl::StatusCode::kAlreadyExists);

  // The full model and the state follow the same rule. A temporary directory left by an export that
  // crashed (its process is gone) is removed by the next export to that path; a live process's is not.
  const std::string weights = exports.path + "/weights";
  const std::string stale = exports.path + "/.weights.export-tmp-2147483000-0";
  const std::string live = exports.path + "/.weights.export-tmp-" + std::to_string(getpid()) + "-999";
  ASSERT_TRUE(MakeDirs(stale).ok() && MakeDirs(live).ok());
  ASSERT_TRUE(WriteFileAtomic(stale + "/model.safetensors", "partial").ok());
  ASSERT_TRUE(engine->ExportWeights(weights).ok());
  EXPECT_FALSE(PathExists(stale));
  EXPECT_TRUE(PathExists(live));
  ASSERT_TRUE(RemoveAll(live).ok());
  EXPECT_EQ(engine->ExportWeights(weights).code(), absl::StatusCode::kAlreadyExists);
  ExportOptions replace;
  replace.overwrite = true;
  EXPECT_TRUE(engine->ExportWeights(weights, replace).ok());
  EXPECT_TRUE(PathExists(weights + "/model.safetensors"));
  const std::string state_copy = exports.path + "/state";
  ASSERT_TRUE(engine->ExportState(state_copy).ok());
  EXPECT_EQ(engine->ExportState(state_copy).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_TRUE(engine->ExportState(state_copy, replace).ok());

  for (const auto& e : fs::directory_iterator(exports.path)) {
    EXPECT_EQ(e.path().filename().string().find("export-tmp"), std::string::npos) << e.path();
    EXPECT_EQ(e.path().extension(), "") << e.path();  // no "<dir>.old" left by a replace
  }
  // Routes that are not tasks, and unknown tasks.
  EXPECT_EQ(engine->ExportAdapter("base", exports.path + "/b").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine->ExportAdapter("nope", exports.path + "/n").status().code(), absl::StatusCode::kNotFound);
  AdapterExportOptions negative;
  negative.rank = -1;
  EXPECT_EQ(engine->ExportAdapter("capitals", exports.path + "/n", negative).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// Methods that keep only merged weights (here OSFT): the latest task's update W_served − W0 is dense;
// without a rank the export is refused naming the method, an earlier task is refused, and with a
// rank the file holds the best approximation of that rank with the relative error reported. A
// method that changes embeddings (seq_ft on all parameters) is refused.
TEST(PeftExport, DenseUpdatesNeedARankAndReportTheTruncationError) {
  SetTorchThreads(2);
  Dir state, exports;
  EngineOptions options = Options(state.path, "osft");
  options.recipe.max_steps = 6;
  options.recipe.learning_rate = 1e-3;
  auto engine = MakeEngine(options);
  ASSERT_NE(engine, nullptr);
  Learn(*engine, "capitals");
  Learn(*engine, "iso3");

  auto refused = engine->ExportAdapter("iso3", exports.path + "/iso3");
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
  EXPECT_NE(refused.status().message().find("osft"), std::string::npos) << refused.status();
  EXPECT_NE(refused.status().message().find("--rank"), std::string::npos) << refused.status();
  EXPECT_FALSE(PathExists(exports.path + "/iso3"));
  AdapterExportOptions rank4;
  rank4.rank = 4;
  auto earlier = engine->ExportAdapter("capitals", exports.path + "/capitals", rank4);
  EXPECT_EQ(earlier.status().code(), absl::StatusCode::kFailedPrecondition) << earlier.status();
  EXPECT_NE(earlier.status().message().find("latest"), std::string::npos) << earlier.status();

  // The dense update, from the served and the base weights.
  std::map<std::string, at::Tensor> delta;
  {
    auto base = CausalLM::Load(kModel);
    ASSERT_TRUE(base.ok());
    const CausalLM& served = *engine->Current()->model;
    for (const auto& name : served.LinearNames()) {
      at::Tensor d =
          served.FindLinear(name)->weight.to(at::kDouble) - (*base)->FindLinear(name)->weight.to(at::kDouble);
      if (d.abs().max().item<double>() > 0) delta[name] = d;
    }
  }
  ASSERT_EQ(delta.size(), 10u);
  auto measured_error = [&](const std::string& dir) {
    auto adapter = ReadPeftLoraAdapter(dir);
    EXPECT_TRUE(adapter.ok()) << adapter.status();
    double err = 0, total = 0;
    for (const auto& [name, d] : delta) {
      at::Tensor got = adapter->modules.at(name).Delta().to(at::kDouble);
      err += (got - d).square().sum().item<double>();
      total += d.square().sum().item<double>();
    }
    return std::sqrt(err / total);
  };

  auto truncated = engine->ExportAdapter("iso3", exports.path + "/iso3", rank4);
  ASSERT_TRUE(truncated.ok()) << truncated.status();
  EXPECT_TRUE(truncated->dense);
  EXPECT_EQ(truncated->rank, 4);
  EXPECT_GT(truncated->exact_rank, 4);
  EXPECT_LE(truncated->exact_rank, 64);  // min(out, in) of q_proj
  EXPECT_GT(truncated->relative_error, 0.0);
  EXPECT_LT(truncated->relative_error, 1.0);
  EXPECT_NEAR(measured_error(exports.path + "/iso3"), truncated->relative_error, 1e-4);

  AdapterExportOptions full;
  full.rank = 64;
  auto exact = engine->ExportAdapter("iso3", exports.path + "/iso3-full", full);
  ASSERT_TRUE(exact.ok()) << exact.status();
  EXPECT_EQ(exact->rank, exact->exact_rank);
  EXPECT_LT(exact->relative_error, 1e-5);  // singular values under 1e-6 of the largest dropped
  EXPECT_LT(measured_error(exports.path + "/iso3-full"), 1e-5);

  Dir ft_state;
  EngineOptions ft = Options(ft_state.path, "seq_ft");
  ft.recipe.max_steps = 2;
  ft.recipe.learning_rate = 1e-3;
  auto seq_ft = MakeEngine(ft);
  ASSERT_NE(seq_ft, nullptr);
  Learn(*seq_ft, "capitals");
  auto embeddings = seq_ft->ExportAdapter("capitals", exports.path + "/ft", rank4);
  EXPECT_EQ(embeddings.status().code(), absl::StatusCode::kUnimplemented) << embeddings.status();
  EXPECT_NE(embeddings.status().message().find("seq_ft"), std::string::npos) << embeddings.status();
}

}  // namespace
}  // namespace strata
