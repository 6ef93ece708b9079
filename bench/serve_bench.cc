#include "bench/serve_bench.h"

#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "bench/bench_util.h"
#include "core/adapt/lora.h"
#include "core/adapt/peft_import.h"
#include "core/model/generate.h"
#include "core/model/model.h"
#include "core/model/runtime.h"
#include "core/model/tokenizer.h"
#include "core/util/file_util.h"
#include "strata/v1/adaptation.grpc.pb.h"
#include "strata/v1/admin.grpc.pb.h"
#include "strata/v1/inference.grpc.pb.h"

namespace strata::bench {
namespace {

namespace fs = std::filesystem;
namespace pb = strata::v1;
using json = nlohmann::json;

const std::vector<std::string> kPrompts = {
    "Once upon a time, there was a little girl named Lily.",
    "Tom and his dog went to the park. They",
    "One day, a big bird flew over the house and",
    "The sun was shining and the children wanted to play",
    "Sam had a red ball. He liked to",
    "In a small town, there lived a kind old man who",
    "Mia saw a cat under the tree. The cat",
    "It was a rainy day, so Ben stayed inside and",
};

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return std::nan("");
  std::sort(v.begin(), v.end());
  const double rank = p * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(v.size() - 1, lo + 1);
  return v[lo] + (v[hi] - v[lo]) * (rank - static_cast<double>(lo));
}

json Number(double v) { return std::isfinite(v) ? json(v) : json(nullptr); }

int FreePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  int port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  ::close(fd);
  return port;
}

// strata-server beside this binary (installed layout), in the build tree, or on PATH.
std::string FindServerBinary(const std::string& given) {
  if (!given.empty()) return given;
  std::error_code ec;
  const fs::path self = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    for (const fs::path& candidate : {self.parent_path() / "strata-server",
                                      self.parent_path().parent_path() / "server" / "strata-server"}) {
      if (fs::exists(candidate)) return candidate.string();
    }
  }
  return "strata-server";
}

// A strata-server child process, stopped (SIGTERM, then SIGKILL) by the destructor.
class ServerProcess {
 public:
  ServerProcess(const std::vector<std::string>& argv, const std::string& log_path) : log_path_(log_path) {
    pid_ = ::fork();
    if (pid_ == 0) {
      const int fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (fd >= 0) {
        ::dup2(fd, 1);
        ::dup2(fd, 2);
      }
      std::vector<char*> args;
      for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      ::execvp(args[0], args.data());
      std::fprintf(stderr, "cannot run %s\n", args[0]);
      ::_exit(127);
    }
  }
  ~ServerProcess() {
    if (pid_ <= 0 || exited_) return;
    ::kill(pid_, SIGTERM);
    for (int i = 0; i < 300; ++i) {
      if (::waitpid(pid_, nullptr, WNOHANG) == pid_) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
  bool Running() {
    if (pid_ <= 0 || exited_) return false;
    if (::waitpid(pid_, nullptr, WNOHANG) == pid_) exited_ = true;
    return !exited_;
  }
  std::string LogTail() const {
    std::ifstream in(log_path_);
    std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    return all.size() > 3000 ? all.substr(all.size() - 3000) : all;
  }

 private:
  pid_t pid_ = -1;
  bool exited_ = false;
  std::string log_path_;
};

// The model directory to serve: a directory, the shared stories260K, or the 110M config written
// with the project's safetensors writer (+ the Llama 2 tokenizer).
absl::StatusOr<std::string> PrepareModel(const std::string& model, const std::string& work) {
  if (model == "stories260K") return std::string(STRATA_SHARED_DIR) + "/models/stories260K";
  if (model != "110m") return model;
  const std::string dir = work + "/model-110m";
  if (fs::exists(dir + "/config.json")) return dir;
  std::printf("writing the random-init 110M model to %s ...\n", dir.c_str());
  std::fflush(stdout);
  auto m = CausalLM::RandomInit(Llama110mConfig(), /*seed=*/110);
  if (!m.ok()) return m.status();
  if (absl::Status st = (*m)->SaveHf(dir); !st.ok()) return st;
  const std::string tok = std::string(STRATA_SHARED_DIR) + "/tokenizers/llama2";
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"}) {
    std::error_code ec;
    if (fs::exists(tok + "/" + f))
      fs::copy_file(tok + "/" + f, dir + "/" + f, fs::copy_options::overwrite_existing, ec);
    if (ec) return absl::InternalError(absl::StrCat("copy ", f, ": ", ec.message()));
  }
  return dir;
}

// `n` random rank-8 LoRA adapters on every linear layer of `model`, as PEFT directories.
absl::StatusOr<std::vector<std::string>> WriteAdapters(const CausalLM& model, int n,
                                                       const std::string& root) {
  std::vector<std::string> dirs;
  for (int t = 0; t < n; ++t) {
    PeftLoraAdapter adapter;
    adapter.r = 8;
    adapter.lora_alpha = 16;
    adapter.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
    uint64_t seed = 1000 + static_cast<uint64_t>(t) * 100000;
    for (const std::string& name : model.LinearNames()) {
      const LinearLayer* layer = model.FindLinear(name);
      PeftLoraModule m;
      m.a = KaimingUniform(8, layer->weight.size(1), seed++, at::kFloat, at::kCPU);
      m.b = KaimingUniform(layer->weight.size(0), 8, seed++, at::kFloat, at::kCPU).mul(0.1);
      m.scale = 2.0;
      adapter.modules[name] = m;
    }
    const std::string dir = absl::StrCat(root, "/bench-task-", t);
    if (absl::Status st = WritePeftLoraAdapter(dir, adapter); !st.ok()) return st;
    dirs.push_back(dir);
  }
  return dirs;
}

struct Figures {
  int streams = 0;
  int tasks = 0;
  bool training = false;
  int64_t requests = 0;
  int64_t tokens = 0;
  int errors = 0;
  std::string first_error;
  double seconds = 0;
  std::vector<double> ttft, itl;
  std::optional<double> training_steps_per_second;
  std::optional<double> in_process_tokens_per_second;
};

// `streams` concurrent clients, each `requests` Generate calls on its route.
Figures RunStreams(const std::string& addr, int streams, const std::vector<std::string>& routes,
                   const ServeBenchArgs& args) {
  Figures f;
  f.streams = streams;
  std::mutex mu;
  const Clock::time_point start = Clock::now();
  std::vector<std::thread> threads;
  for (int s = 0; s < streams; ++s) {
    threads.emplace_back([&, s] {
      grpc::ChannelArguments ch_args;
      ch_args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // one connection per client
      auto channel = grpc::CreateCustomChannel(addr, grpc::InsecureChannelCredentials(), ch_args);
      auto stub = pb::InferenceService::NewStub(channel);
      std::vector<double> ttft, itl;
      int64_t tokens = 0;
      int errors = 0;
      std::string first_error;
      // Connect first, through reconnect attempts, as the strata CLI does: gRPC 1.51 (Debian 12) reads
      // connect()'s errno after taking a mutex, and the first contended abseil mutex of a process sets
      // errno = ENOENT (its CPU-frequency probe), so one of many channels connecting at once can fail its
      // first attempt with "UNKNOWN: ipv4:127.0.0.1:PORT: No such file or directory" (fixed upstream by
      // grpc/grpc#35064). Without this, that stream's requests fail during the 1 s reconnect backoff.
      const bool connected =
          channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(30));
      if (!connected) {
        errors = args.requests;
        first_error = absl::StrCat("could not connect to ", addr, " within 30 s");
        std::fprintf(stderr, "stream %d: %s\n", s, first_error.c_str());
      }
      for (int r = 0; connected && r < args.requests; ++r) {
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(30));
        pb::GenerateRequest req;
        req.set_prompt(kPrompts[static_cast<size_t>(s + r) % kPrompts.size()]);
        req.set_route(routes[static_cast<size_t>(s) % routes.size()]);
        req.mutable_sampling()->set_max_new_tokens(args.max_tokens);
        req.mutable_sampling()->set_ignore_eos(true);
        const Clock::time_point t0 = Clock::now();
        Clock::time_point last = t0;
        bool first = true;
        auto reader = stub->Generate(&ctx, req);
        pb::GenerateResponse msg;
        while (reader->Read(&msg)) {
          const int n = msg.token_ids_size();
          if (n == 0) continue;
          const Clock::time_point now = Clock::now();
          const double gap = std::chrono::duration<double>(now - last).count();
          if (first) {
            ttft.push_back(gap);
            for (int i = 1; i < n; ++i) itl.push_back(0);
            first = false;
          } else {
            for (int i = 0; i < n; ++i) itl.push_back(gap / n);
          }
          last = now;
          tokens += n;
        }
        const grpc::Status st = reader->Finish();
        if (!st.ok()) {
          if (errors++ == 0) first_error = absl::StrCat(st.error_code(), ": ", st.error_message());
          // Each failure as it happens (the table only keeps the first; stdout may go to a file).
          std::fprintf(stderr, "stream %d request %d (route %s): gRPC status %d: %s\n", s, r,
                       req.route().c_str(), static_cast<int>(st.error_code()), st.error_message().c_str());
        }
      }
      std::lock_guard<std::mutex> lock(mu);
      f.requests += args.requests;
      f.tokens += tokens;
      f.errors += errors;
      if (f.first_error.empty()) f.first_error = first_error;
      f.ttft.insert(f.ttft.end(), ttft.begin(), ttft.end());
      f.itl.insert(f.itl.end(), itl.begin(), itl.end());
    });
  }
  for (auto& t : threads) t.join();
  f.seconds = SecondsSince(start);
  return f;
}

// The same prompts decoded in-process (base weights, greedy, no EOS stop): tokens/s.
double InProcessTokensPerSecond(const CausalLM& model, const Tokenizer& tokenizer, const ServeBenchArgs& args,
                                int threads) {
  SetTorchThreads(threads);
  SamplingOptions o;
  o.max_new_tokens = args.max_tokens;
  o.stop_on_eos = false;
  // One untimed request first (the server has served many by now).
  (void)Generate(model, tokenizer, {tokenizer.Encode(kPrompts.back(), true)}, o);
  int64_t tokens = 0;
  const Clock::time_point start = Clock::now();
  for (int r = 0; r < args.requests; ++r) {
    const std::vector<int32_t> ids =
        tokenizer.Encode(kPrompts[static_cast<size_t>(r) % kPrompts.size()], true);
    auto out = Generate(model, tokenizer, {ids}, o);
    if (out.ok()) tokens += static_cast<int64_t>((*out)[0].ids.size());
  }
  return static_cast<double>(tokens) / SecondsSince(start);
}

// A training job of synthetic examples with many steps (cancelled at the end of the bench).
absl::StatusOr<std::string> SubmitTrainingJob(pb::AdaptationService::Stub& stub) {
  grpc::ClientContext ctx;
  pb::Job job;
  auto writer = stub.SubmitTask(&ctx, &job);
  pb::SubmitTaskRequest spec;
  spec.mutable_spec()->set_name(absl::StrCat("bench-training-", ::getpid(), "-", time(nullptr)));
  spec.mutable_spec()->mutable_overrides()->set_max_steps(100000);
  spec.mutable_spec()->mutable_overrides()->set_batch_size(8);
  writer->Write(spec);
  const char* colors[] = {"red", "blue", "green", "yellow", "purple", "orange", "black", "white"};
  std::string jsonl;
  for (int i = 0; i < 400; ++i) {
    absl::StrAppend(&jsonl,
                    json{{"prompt", absl::StrCat("The ball number ", i, " is")},
                         {"completion", absl::StrCat(" ", colors[i % 8])}}
                        .dump(),
                    "\n");
  }
  pb::SubmitTaskRequest train;
  train.mutable_train()->set_jsonl(jsonl);
  writer->Write(train);
  writer->WritesDone();
  const grpc::Status st = writer->Finish();
  if (!st.ok()) return absl::InternalError(absl::StrCat("SubmitTask: ", st.error_message()));
  return job.id();
}

std::optional<pb::Job> GetJob(pb::AdaptationService::Stub& stub, const std::string& id) {
  grpc::ClientContext ctx;
  pb::GetJobRequest req;
  req.set_id(id);
  pb::Job job;
  if (!stub.GetJob(&ctx, req, &job).ok()) return std::nullopt;
  return job;
}

std::optional<std::pair<int64_t, Clock::time_point>> StepNow(pb::AdaptationService::Stub& stub,
                                                             const std::string& id) {
  auto job = GetJob(stub, id);
  if (!job) return std::nullopt;
  return std::make_pair(job->progress().step(), Clock::now());
}

double StepsPerSecond(const std::pair<int64_t, Clock::time_point>& a,
                      const std::pair<int64_t, Clock::time_point>& b) {
  return static_cast<double>(b.first - a.first) / std::chrono::duration<double>(b.second - a.second).count();
}

json ToJson(const Figures& f, const std::string& model) {
  return json{{"model", model},
              {"streams", f.streams},
              {"tasks", f.tasks},
              {"training", f.training},
              {"tokens_per_second", f.seconds > 0 ? static_cast<double>(f.tokens) / f.seconds : 0.0},
              {"ttft_p50_s", Number(Percentile(f.ttft, 0.5))},
              {"ttft_p95_s", Number(Percentile(f.ttft, 0.95))},
              {"itl_p50_s", Number(Percentile(f.itl, 0.5))},
              {"itl_p95_s", Number(Percentile(f.itl, 0.95))},
              {"errors", f.errors},
              {"training_steps_per_second",
               f.training_steps_per_second ? json(*f.training_steps_per_second) : json(nullptr)},
              {"requests", f.requests},
              {"tokens", f.tokens},
              {"seconds", f.seconds},
              {"in_process_tokens_per_second",
               f.in_process_tokens_per_second ? json(*f.in_process_tokens_per_second) : json(nullptr)}};
}

std::string Ms(double s) { return std::isfinite(s) ? absl::StrFormat("%.1f", s * 1000) : "-"; }

void PrintRow(const Figures& f) {
  std::printf(
      "%7d %5d %8s %9.1f %9s %9s %9s %9s %6d %11s %10s\n", f.streams, f.tasks, f.training ? "yes" : "no",
      f.seconds > 0 ? static_cast<double>(f.tokens) / f.seconds : 0.0, Ms(Percentile(f.ttft, 0.5)).c_str(),
      Ms(Percentile(f.ttft, 0.95)).c_str(), Ms(Percentile(f.itl, 0.5)).c_str(),
      Ms(Percentile(f.itl, 0.95)).c_str(), f.errors,
      f.training_steps_per_second ? absl::StrFormat("%.2f", *f.training_steps_per_second).c_str() : "-",
      f.in_process_tokens_per_second ? absl::StrFormat("%.1f", *f.in_process_tokens_per_second).c_str()
                                     : "-");
  if (!f.first_error.empty()) std::printf("        first error: %s\n", f.first_error.c_str());
  std::fflush(stdout);
}

}  // namespace

void AddServeBenchOptions(CLI::App* sub, ServeBenchArgs* a) {
  sub->add_option("--model", a->model, "Model directory, stories260K (the shared one) or 110m (random init)")
      ->capture_default_str();
  sub->add_option("--target", a->target, "HOST:PORT of a running server (default: start one on 127.0.0.1)");
  sub->add_option("--server-binary", a->server_binary,
                  "strata-server to start (default: beside strata, else PATH)");
  sub->add_option("--streams", a->streams, "Concurrent streaming clients, comma-separated")
      ->delimiter(',')
      ->capture_default_str();
  sub->add_option("--tasks", a->tasks,
                  "Learned tasks the streams spread over (0 = route base), comma-separated")
      ->delimiter(',')
      ->capture_default_str();
  sub->add_flag("--with-training", a->with_training,
                "Also run every combination with a training job running");
  sub->add_flag("--loaded-only", a->loaded_only,
                "With --with-training: measure only while the training job runs (skip the idle runs)");
  sub->add_option("--max-tokens", a->max_tokens, "Tokens per request (ignore_eos)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--requests", a->requests, "Requests per stream and combination")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--threads", a->threads, "The started server's --threads")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--serving-threads", a->serving_threads,
                  "The started server's --serving_threads (0 = its default)")
      ->capture_default_str();
  sub->add_option("--training-threads", a->training_threads,
                  "The started server's --training_threads (0 = its default)")
      ->capture_default_str();
  sub->add_option("--training-window", a->training_window_s, "Seconds the training job is measured alone")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--json", a->json_path, "Write the results as JSON to this file");
  sub->add_option("--work-dir", a->work_dir,
                  "Directory for the state, model and logs (default: a new /tmp dir)");
}

int RunServeBenchCommand(const ServeBenchArgs& args) {
  for (int s : args.streams) {
    if (s < 1) return (std::fprintf(stderr, "--streams: every value must be >= 1, got %d\n", s), kExitUsage);
  }
  for (int t : args.tasks) {
    if (t < 0) return (std::fprintf(stderr, "--tasks: every value must be >= 0, got %d\n", t), kExitUsage);
  }
  std::string work = args.work_dir;
  if (work.empty()) {
    char tmpl[] = "/tmp/strata-bench-serve-XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) return (std::perror("mkdtemp"), kExitFailed);
    work = tmpl;
  }
  if (absl::Status st = MakeDirs(work); !st.ok()) {
    std::fprintf(stderr, "%s\n", std::string(st.message()).c_str());
    return kExitFailed;
  }
  const int serving_threads = args.serving_threads > 0 ? args.serving_threads : std::max(1, args.threads / 2);
  const int max_tasks = *std::max_element(args.tasks.begin(), args.tasks.end());

  // The model, loaded here too (adapter shapes, in-process comparison).
  std::unique_ptr<CausalLM> model;
  std::unique_ptr<Tokenizer> tokenizer;
  std::string model_dir;
  if (args.target.empty() || args.model != "stories260K") {
    auto dir = PrepareModel(args.model, work);
    if (!dir.ok())
      return (std::fprintf(stderr, "--model: %s\n", std::string(dir.status().message()).c_str()), kExitUsage);
    model_dir = *dir;
    auto m = CausalLM::Load(model_dir);
    if (!m.ok())
      return (std::fprintf(stderr, "--model: %s\n", std::string(m.status().message()).c_str()), kExitUsage);
    model = std::move(*m);
    auto t = Tokenizer::FromDirectory(model_dir);
    if (!t.ok())
      return (std::fprintf(stderr, "--model: %s\n", std::string(t.status().message()).c_str()), kExitUsage);
    tokenizer = std::move(*t);
  }

  // The in-process reference (1 stream, base weights) first, while nothing else runs.
  std::optional<double> in_process;
  if (model && std::count(args.streams.begin(), args.streams.end(), 1) > 0 &&
      std::count(args.tasks.begin(), args.tasks.end(), 0) > 0) {
    in_process = InProcessTokensPerSecond(*model, *tokenizer, args, serving_threads);
    std::printf("in-process decode (1 stream, base weights, %d threads): %.1f tokens/s\n", serving_threads,
                *in_process);
  }

  std::unique_ptr<ServerProcess> server;
  std::string addr = args.target;
  const std::string state_dir = work + "/state";
  if (addr.empty()) {
    // A fresh state each run (the model directory in the work dir is kept for the next run).
    std::error_code ec;
    fs::remove_all(state_dir, ec);
    const int port = FreePort();
    addr = absl::StrCat("127.0.0.1:", port);
    std::vector<std::string> argv = {FindServerBinary(args.server_binary),
                                     "--host=127.0.0.1",
                                     absl::StrCat("--grpc_port=", port),
                                     "--metrics_port=0",
                                     "--http_port=0",
                                     "--state_dir=" + state_dir,
                                     "--model=" + model_dir,
                                     absl::StrCat("--threads=", args.threads),
                                     absl::StrCat("--max_new_tokens=", std::max(args.max_tokens, 1024)),
                                     "--max_batch_size=64"};
    if (args.serving_threads > 0) argv.push_back(absl::StrCat("--serving_threads=", args.serving_threads));
    if (args.training_threads > 0) argv.push_back(absl::StrCat("--training_threads=", args.training_threads));
    std::printf("starting %s (log %s/server.log)\n", absl::StrJoin(argv, " ").c_str(), work.c_str());
    std::fflush(stdout);
    server = std::make_unique<ServerProcess>(argv, work + "/server.log");
  }
  auto channel = grpc::CreateChannel(addr, grpc::InsecureChannelCredentials());
  auto admin = pb::AdminService::NewStub(channel);
  auto adaptation = pb::AdaptationService::NewStub(channel);
  pb::ServerInfo info;
  {
    const Clock::time_point start = Clock::now();
    for (;;) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
      if (admin->GetServerInfo(&ctx, pb::GetServerInfoRequest(), &info).ok()) break;
      if ((server && !server->Running()) || SecondsSince(start) > 300) {
        std::fprintf(stderr, "the server at %s did not come up%s\n", addr.c_str(),
                     server ? (":\n" + server->LogTail()).c_str() : "");
        return kExitFailed;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  }
  std::printf("server %s: model %s, %d training / %d serving threads, method %s\n", addr.c_str(),
              info.model().name().c_str(), info.training_threads(), info.serving_threads(),
              info.method().c_str());

  // Tasks: imported adapters on a started server; a running one must have enough already.
  std::vector<std::string> task_names;
  {
    grpc::ClientContext ctx;
    pb::ListTasksResponse tasks;
    adaptation->ListTasks(&ctx, pb::ListTasksRequest(), &tasks);
    for (const auto& t : tasks.tasks()) task_names.push_back(t.name());
  }
  if (static_cast<int>(task_names.size()) < max_tasks) {
    if (!server || !model) {
      std::fprintf(stderr, "--tasks: the server at %s has %zu learned tasks, %d needed\n", addr.c_str(),
                   task_names.size(), max_tasks);
      return kExitUsage;
    }
    const Clock::time_point t0 = Clock::now();
    auto dirs =
        WriteAdapters(*model, max_tasks - static_cast<int>(task_names.size()), state_dir + "/imports");
    if (!dirs.ok())
      return (std::fprintf(stderr, "adapters: %s\n", dirs.status().ToString().c_str()), kExitFailed);
    grpc::ClientContext ctx;
    pb::ImportAdaptersRequest req;
    for (const auto& d : *dirs) req.add_dirs(d);
    pb::ImportAdaptersResponse resp;
    const grpc::Status st = admin->ImportAdapters(&ctx, req, &resp);
    if (!st.ok())
      return (std::fprintf(stderr, "ImportAdapters: %s\n", st.error_message().c_str()), kExitFailed);
    for (;;) {
      auto job = GetJob(*adaptation, resp.job_id());
      if (job && job->state() == pb::JOB_STATE_SUCCEEDED) break;
      if (!job || job->state() == pb::JOB_STATE_FAILED || job->state() == pb::JOB_STATE_CANCELLED) {
        std::fprintf(stderr, "import job %s: %s\n", resp.job_id().c_str(),
                     job ? job->error().c_str() : "gone");
        return kExitFailed;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    for (const auto& d : *dirs) task_names.push_back(fs::path(d).filename().string());
    std::printf("imported %zu adapters as tasks in %.1f s\n", dirs->size(), SecondsSince(t0));
  }

  std::printf("\n%7s %5s %8s %9s %9s %9s %9s %9s %6s %11s %10s\n", "streams", "tasks", "training", "tokens/s",
              "ttft p50", "ttft p95", "itl p50", "itl p95", "errors", "train st/s", "in-proc/s");
  std::printf("%7s %5s %8s %9s %9s %9s %9s %9s %6s %11s %10s\n", "", "", "", "", "ms", "ms", "ms", "ms", "",
              "", "");
  std::vector<Figures> results;
  bool failed = false;
  auto run_all = [&](bool training, const std::string& job_id) {
    for (int tasks : args.tasks) {
      std::vector<std::string> routes;
      if (tasks == 0) routes = {"base"};
      for (int t = 0; t < tasks; ++t) routes.push_back(task_names[static_cast<size_t>(t)]);
      for (int streams : args.streams) {
        auto before = training ? StepNow(*adaptation, job_id) : std::nullopt;
        Figures f = RunStreams(addr, streams, routes, args);
        f.tasks = tasks;
        f.training = training;
        if (training) {
          auto after = StepNow(*adaptation, job_id);
          if (before && after) f.training_steps_per_second = StepsPerSecond(*before, *after);
        }
        if (streams == 1 && tasks == 0 && !training) f.in_process_tokens_per_second = in_process;
        failed = failed || f.errors > 0;
        PrintRow(f);
        results.push_back(std::move(f));
      }
    }
  };
  if (!(args.with_training && args.loaded_only)) run_all(false, "");
  if (args.with_training) {
    auto id = SubmitTrainingJob(*adaptation);
    if (!id.ok()) return (std::fprintf(stderr, "%s\n", id.status().ToString().c_str()), kExitFailed);
    // Wait until it trains, then measure it alone.
    for (;;) {
      auto job = GetJob(*adaptation, *id);
      if (job && job->state() == pb::JOB_STATE_TRAINING && job->progress().step() >= 2) break;
      if (!job || job->state() >= pb::JOB_STATE_SUCCEEDED) {
        std::fprintf(stderr, "training job %s did not start: %s\n", id->c_str(),
                     job ? job->error().c_str() : "gone");
        return kExitFailed;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    auto a = StepNow(*adaptation, *id);
    std::this_thread::sleep_for(std::chrono::duration<double>(args.training_window_s));
    auto b = StepNow(*adaptation, *id);
    Figures alone;
    alone.training = true;
    if (a && b) alone.training_steps_per_second = StepsPerSecond(*a, *b);
    PrintRow(alone);
    results.push_back(alone);
    run_all(true, *id);
    grpc::ClientContext ctx;
    pb::CancelJobRequest cancel;
    cancel.set_id(*id);
    pb::Job job;
    adaptation->CancelJob(&ctx, cancel, &job);
  }

  if (!args.json_path.empty()) {
    json out;
    out["results"] = json::array();
    const std::string model_name = args.model;
    for (const Figures& f : results) out["results"].push_back(ToJson(f, model_name));
    out["server"] = {{"address", addr},
                     {"threads", args.threads},
                     {"training_threads", info.training_threads()},
                     {"serving_threads", info.serving_threads()},
                     {"max_tokens", args.max_tokens},
                     {"requests_per_stream", args.requests},
                     {"blas", info.blas()},
                     {"allocator", info.allocator()}};
    if (absl::Status st = WriteFileAtomic(args.json_path, out.dump(2) + "\n"); !st.ok()) {
      std::fprintf(stderr, "--json: %s\n", std::string(st.message()).c_str());
      return kExitFailed;
    }
    std::printf("wrote %s\n", args.json_path.c_str());
  }
  return failed ? kExitFailed : kExitOk;
}

}  // namespace strata::bench
