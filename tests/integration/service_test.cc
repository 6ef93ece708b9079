// The adaptation service end to end: the real strata-server (stories260K) and strata CLI on
// 127.0.0.1, plus raw gRPC stubs where the wire behaviour itself is under test.

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>

#include "nlohmann/json.hpp"
#include "strata/v1/adaptation.grpc.pb.h"
#include "strata/v1/admin.grpc.pb.h"
#include "strata/v1/inference.grpc.pb.h"
#include "tests/test_util.h"

namespace strata::testing {
namespace {

namespace pb = strata::v1;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

// One strata-server on loopback with its own state directory (kept across restarts).
struct Server {
  TempDir dir;
  int grpc_port = FreePort();
  int metrics_port = FreePort();
  int http_port = FreePort();
  std::vector<std::string> flags;
  std::map<std::string, std::string> env;  // e.g. STRATA_FAILPOINT for one start
  std::unique_ptr<Subprocess> proc;
  int starts = 0;

  explicit Server(std::vector<std::string> extra = {}) : flags(std::move(extra)) {}

  std::string addr() const { return "127.0.0.1:" + std::to_string(grpc_port); }
  std::string state() const { return dir.path() + "/state"; }

  void Start(bool wait = true) {
    std::vector<std::string> argv = {BinaryPath("strata-server"),
                                     "--grpc_port=" + std::to_string(grpc_port),
                                     "--metrics_port=" + std::to_string(metrics_port),
                                     "--http_port=" + std::to_string(http_port),
                                     "--state_dir=" + state(),
                                     "--model=" + Model(),
                                     "--threads=2",
                                     "--serving_threads=1",
                                     "--shutdown_grace_seconds=5"};
    argv.insert(argv.end(), flags.begin(), flags.end());
    proc =
        std::make_unique<Subprocess>(argv, dir.path() + "/server" + std::to_string(++starts) + ".log", env);
    if (wait) {
      ASSERT_TRUE(WaitForServing(grpc_port, 60, proc.get())) << proc->Log();
    }
  }

  // `strata --server ADDR args...`
  CommandResult Cli(std::vector<std::string> args, int timeout_seconds = 300) const {
    std::vector<std::string> argv = {BinaryPath("strata"), "--server", addr()};
    argv.insert(argv.end(), args.begin(), args.end());
    return RunCommand(argv, timeout_seconds);
  }

  json CliJson(std::vector<std::string> args) const {
    args.insert(args.begin(), "--json");
    CommandResult r = Cli(args);
    EXPECT_EQ(r.exit_code, 0) << r.err << r.out;
    json j = json::parse(r.out, nullptr, /*allow_exceptions=*/false);
    EXPECT_FALSE(j.is_discarded()) << r.out;
    return j;
  }

  std::string Metrics() const {
    auto body = HttpGet(metrics_port, "/metrics");
    return body.value_or("");
  }

  // Connected before it is returned (through reconnect attempts, as the CLI does): gRPC 1.51 can fail
  // a first connect attempt with a stale errno (see RunStreams in bench/serve_bench.cc), and an RPC
  // without wait_for_ready then fails during the 1 s reconnect backoff.
  std::shared_ptr<grpc::Channel> Channel() const {
    auto channel = grpc::CreateChannel(addr(), grpc::InsecureChannelCredentials());
    EXPECT_TRUE(channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(30)));
    return channel;
  }

  std::string Log() const { return proc ? proc->Log() : ""; }
};

pb::Job GetJob(pb::AdaptationService::Stub& stub, const std::string& id, grpc::Status* status = nullptr) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  pb::GetJobRequest req;
  req.set_id(id);
  pb::Job job;
  grpc::Status st = stub.GetJob(&ctx, req, &job);
  if (status) *status = st;
  return job;
}

// Submits through the CLI; returns the job id (or "" with a test failure).
std::string Submit(const Server& s, const std::string& task, const std::string& train,
                   const std::string& eval, std::vector<std::string> extra = {}) {
  std::vector<std::string> args = {"submit", "--task", task, train};
  if (!eval.empty()) {
    args.push_back("--eval");
    args.push_back(eval);
  }
  args.insert(args.end(), extra.begin(), extra.end());
  CommandResult r = s.Cli(args);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  std::string id = r.out.substr(0, r.out.find('\n'));
  EXPECT_EQ(id.rfind("job-", 0), 0u) << r.out;
  return id;
}

// Expects the CLI to fail with exit 1 and the gRPC code name (and `fragment`) on stderr.
void ExpectRpcError(const CommandResult& r, const std::string& code, const std::string& fragment = "") {
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
  EXPECT_NE(r.err.find(code), std::string::npos) << r.err;
  if (!fragment.empty()) {
    EXPECT_NE(r.err.find(fragment), std::string::npos) << r.err;
  }
}

double MetricValue(const std::string& metrics, const std::string& series) {
  std::istringstream in(metrics);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(series + " ", 0) == 0) return std::stod(line.substr(series.size() + 1));
  }
  return std::nan("");
}

// Generates in a loop on its own channel while training runs; checks every stream stays on one
// weights version and versions never go down.
struct GenerateLoop {
  std::atomic<bool> stop{false};
  std::atomic<int> ok{0};
  std::atomic<int> failed{0};
  std::atomic<bool> mixed_versions{false};
  std::atomic<bool> went_down{false};
  std::atomic<int64_t> last_version{0};
  std::string first_error;
  std::set<int64_t> versions;
  std::thread thread;

  void Start(std::shared_ptr<grpc::Channel> channel) {
    thread = std::thread([this, channel] {
      auto stub = pb::InferenceService::NewStub(channel);
      while (!stop) {
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
        pb::GenerateRequest req;
        req.set_prompt("The capital of France is");
        req.mutable_sampling()->set_max_new_tokens(6);
        auto reader = stub->Generate(&ctx, req);
        pb::GenerateResponse msg;
        std::set<int64_t> seen;
        std::string finish;
        while (reader->Read(&msg)) {
          seen.insert(msg.weights_version());
          if (!msg.finish_reason().empty()) finish = msg.finish_reason();
        }
        grpc::Status st = reader->Finish();
        if (!st.ok() || finish.empty() || seen.empty()) {
          if (failed++ == 0) first_error = st.error_message() + " finish=" + finish;
          continue;
        }
        if (seen.size() != 1) mixed_versions = true;
        int64_t v = *seen.begin();
        if (v < last_version) went_down = true;
        last_version = v;
        versions.insert(v);
        ++ok;
        // Leave the training worker some CPU (2 shared cores).
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    });
  }
  void Stop() {
    stop = true;
    if (thread.joinable()) thread.join();
  }
  ~GenerateLoop() { Stop(); }
};

// Generate with logprobs: one entry per generated id in every message, the chosen token first in
// the greedy top list; an out-of-range top_logprobs is refused naming the field.
TEST(Service, GenerateReportsPerTokenLogprobs) {
  Server s;
  s.Start();
  auto stub = pb::InferenceService::NewStub(s.Channel());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  pb::GenerateRequest req;
  req.set_prompt("Once upon a time");
  req.set_route("base");
  req.mutable_sampling()->set_max_new_tokens(8);
  req.mutable_sampling()->set_ignore_eos(true);
  req.mutable_sampling()->set_logprobs(true);
  req.mutable_sampling()->set_top_logprobs(3);
  auto reader = stub->Generate(&ctx, req);
  pb::GenerateResponse msg;
  int ids = 0, logprobs = 0, completion = 0;
  while (reader->Read(&msg)) {
    ASSERT_EQ(msg.logprobs_size(), msg.token_ids_size()) << msg.DebugString();
    for (int i = 0; i < msg.logprobs_size(); ++i) {
      const pb::TokenLogprob& lp = msg.logprobs(i);
      EXPECT_EQ(lp.token_id(), msg.token_ids(i));
      EXPECT_FALSE(lp.token().empty());
      EXPECT_LE(lp.logprob(), 0.0f);
      ASSERT_EQ(lp.top_logprobs_size(), 3);
      EXPECT_EQ(lp.top_logprobs(0).token_id(), lp.token_id()) << "greedy picks the most likely token";
      EXPECT_FLOAT_EQ(lp.top_logprobs(0).logprob(), lp.logprob());
      EXPECT_GE(lp.top_logprobs(1).logprob(), lp.top_logprobs(2).logprob());
    }
    ids += msg.token_ids_size();
    logprobs += msg.logprobs_size();
    if (!msg.finish_reason().empty()) completion = msg.completion_tokens();
  }
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(ids, 8);
  EXPECT_EQ(logprobs, 8);
  EXPECT_EQ(completion, 8);

  grpc::ClientContext bad_ctx;
  req.mutable_sampling()->set_top_logprobs(21);
  auto bad = stub->Generate(&bad_ctx, req);
  while (bad->Read(&msg)) {
  }
  grpc::Status st = bad->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("sampling.top_logprobs"), std::string::npos) << st.error_message();
}

// Two tasks learned while generation keeps answering; report, tasks and metrics; a cancel of a
// finished job; a restart that finds the same tasks and scores.
TEST(Service, LearnsTwoTasksWhileServingAndSurvivesRestart) {
  Server s;
  s.Start();
  const std::string cap_eval =
      HeadLines(ClSmall("capitals/test.jsonl"), 24, s.dir.path() + "/capitals-eval.jsonl");
  const std::string iso_eval = HeadLines(ClSmall("iso3/test.jsonl"), 24, s.dir.path() + "/iso3-eval.jsonl");

  GenerateLoop gen;
  gen.Start(s.Channel());
  const auto t0 = Clock::now();
  // Long enough that `watch` (a new process) connects while it trains.
  const std::string job1 = Submit(s, "capitals", ClSmall("capitals/train.jsonl"), cap_eval,
                                  {"--steps", "60", "--batch-size", "8"});
  ASSERT_FALSE(job1.empty());
  // `watch --json` from the start: a snapshot first, then events until the job ends.
  CommandResult watch1;
  std::thread watcher([&] { watch1 = s.Cli({"--json", "watch", job1}); });
  const std::string job2 =
      Submit(s, "iso3", ClSmall("iso3/train.jsonl"), iso_eval, {"--steps", "8", "--batch-size", "8"});
  watcher.join();
  ASSERT_FALSE(job2.empty());
  ASSERT_EQ(watch1.exit_code, 0) << watch1.err << s.Log();
  {
    std::istringstream lines(watch1.out);
    std::string line;
    std::vector<json> events;
    while (std::getline(lines, line)) events.push_back(json::parse(line));
    ASSERT_GE(events.size(), 2u);
    EXPECT_EQ(events.front()["kind"], "KIND_SNAPSHOT");
    EXPECT_EQ(events.back()["kind"], "KIND_EVAL");
    EXPECT_EQ(events.back()["job"]["state"], "JOB_STATE_SUCCEEDED");
    EXPECT_EQ(events.back()["job"]["weights_version"], "2");
  }
  CommandResult watch2 = s.Cli({"watch", job2});
  ASSERT_EQ(watch2.exit_code, 0) << watch2.err << s.Log();
  EXPECT_NE(watch2.out.find("succeeded: task 'iso3' learned"), std::string::npos) << watch2.out;
  EXPECT_NE(watch2.out.find("capitals"), std::string::npos) << watch2.out;
  // A few more answers on the final version.
  WaitUntil([&] { return gen.last_version == 3; }, 30);
  gen.Stop();
  std::printf("two tasks learned in %.1f s; %d generations meanwhile\n",
              std::chrono::duration<double>(Clock::now() - t0).count(), gen.ok.load());
  EXPECT_EQ(gen.failed, 0) << gen.first_error;
  EXPECT_GE(gen.ok, 3);
  EXPECT_FALSE(gen.mixed_versions);
  EXPECT_FALSE(gen.went_down);
  EXPECT_EQ(gen.last_version, 3);

  json tasks = s.CliJson({"tasks"});
  ASSERT_EQ(tasks["tasks"].size(), 2u) << tasks.dump();
  EXPECT_EQ(tasks["tasks"][0]["name"], "capitals");
  EXPECT_EQ(tasks["tasks"][0]["index"], 1);
  EXPECT_EQ(tasks["tasks"][0]["scorer"], "SCORER_EXACT_MATCH");
  EXPECT_EQ(tasks["tasks"][0]["job_id"], job1);
  EXPECT_EQ(tasks["tasks"][0]["eval_examples"], "24");
  EXPECT_EQ(tasks["tasks"][1]["name"], "iso3");

  json report = s.CliJson({"report"});
  EXPECT_EQ(report["tasks"], json({"capitals", "iso3"}));
  ASSERT_EQ(report["matrix"].size(), 2u);
  EXPECT_EQ(report["matrix"][1]["scores"].size(), 2u);
  EXPECT_EQ(report["method"], "share_ella");
  EXPECT_EQ(report["weights_version"], "3");
  EXPECT_TRUE(report.contains("average_score")) << report.dump();
  EXPECT_TRUE(report.contains("backward_transfer")) << report.dump();
  EXPECT_GT(std::stoll(report["adaptation_state_bytes"].get<std::string>()), 0);
  CommandResult report_text = s.Cli({"report"});
  ASSERT_EQ(report_text.exit_code, 0) << report_text.err;
  for (const char* want : {"after capitals", "after iso3", "base model", "backward transfer (BWT)",
                           "forgetting", "reference NLL"}) {
    EXPECT_NE(report_text.out.find(want), std::string::npos) << want << " in\n" << report_text.out;
  }
  CommandResult jobs_text = s.Cli({"jobs", "--state", "succeeded"});
  EXPECT_EQ(jobs_text.exit_code, 0);
  EXPECT_NE(jobs_text.out.find(job1), std::string::npos) << jobs_text.out;
  EXPECT_NE(jobs_text.out.find(job2), std::string::npos) << jobs_text.out;

  // Cancelling a finished job is a precondition failure.
  ExpectRpcError(s.Cli({"cancel", job1}), "FAILED_PRECONDITION", "already succeeded");

  const std::string metrics = s.Metrics();
  for (const char* series :
       {"strata_task_score{task=\"capitals\",view=\"merged\"}",
        "strata_task_score{task=\"iso3\",view=\"merged\"}",
        "strata_task_score{task=\"iso3\",view=\"routed\"}", "strata_task_score{task=\"iso3\",view=\"auto\"}",
        "strata_task_forgetting{task=\"capitals\",view=\"merged\"}",
        "strata_task_forgetting{task=\"capitals\",view=\"auto\"}", "strata_average_score{view=\"merged\"}",
        "strata_average_score{view=\"auto\"}", "strata_backward_transfer{view=\"auto\"}",
        "strata_router_accuracy{task=\"capitals\"}", "strata_router_bytes",
        "strata_adaptation_state_bytes"}) {
    EXPECT_FALSE(std::isnan(MetricValue(metrics, series))) << series << " missing from\n" << metrics;
  }
  // The router sends each task's eval prompts to it.
  EXPECT_EQ(MetricValue(metrics, "strata_router_accuracy{task=\"capitals\"}"), 1.0) << metrics;
  EXPECT_EQ(MetricValue(metrics, "strata_router_accuracy{task=\"iso3\"}"), 1.0) << metrics;

  // Automatic routing through the CLI: a capitals prompt takes the capitals route, a story the base
  // model (which continues it as the base model does); --route merged / base / a name as asked.
  json routed = s.CliJson({"generate", "--prompt", "The capital of France is", "--max-tokens", "4"});
  EXPECT_EQ(routed["route"], "capitals") << routed.dump();
  EXPECT_EQ(routed["route_automatic"], true);
  EXPECT_GT(routed["route_confidence"].get<double>(), 0.5);
  json story = s.CliJson({"generate", "--prompt", "Once upon a time", "--max-tokens", "8"});
  EXPECT_EQ(story["route"], "base") << story.dump();
  CommandResult story_text = s.Cli({"generate", "--prompt", "Once upon a time", "--max-tokens", "6"});
  EXPECT_EQ(story_text.out.rfind(", there was a little", 0), 0u) << story_text.out;
  EXPECT_NE(story_text.err.find("route base (chosen automatically"), std::string::npos) << story_text.err;
  EXPECT_EQ(s.CliJson({"generate", "--prompt", "The capital of France is", "--max-tokens", "2", "--route",
                       "merged"})["route"],
            "merged");
  EXPECT_EQ(s.CliJson({"generate", "--prompt", "Once upon a time", "--max-tokens", "2", "--route",
                       "iso3"})["route"],
            "iso3");
  json scored = s.CliJson(
      {"score", "--prompt", "The capital of France is", "--completion", " Paris", "--completion", " Rome"});
  EXPECT_EQ(scored["route"], "capitals") << scored.dump();
  ExpectRpcError(s.Cli({"generate", "--prompt", "x", "--route", "capitals", "--task", "iso3"}),
                 "INVALID_ARGUMENT", "different routes");
  const std::string metrics_routes = s.Metrics();
  EXPECT_GE(MetricValue(metrics_routes, "strata_route_requests_total{route=\"capitals\"}"), 2)
      << metrics_routes;
  EXPECT_GE(MetricValue(metrics_routes, "strata_route_requests_total{route=\"base\"}"), 2) << metrics_routes;
  EXPECT_EQ(MetricValue(metrics, "strata_tasks_learned"), 2);
  EXPECT_EQ(MetricValue(metrics, "strata_weights_version"), 3);
  EXPECT_EQ(MetricValue(metrics, "strata_weights_info{version=\"3\"}"), 1);
  EXPECT_EQ(MetricValue(metrics, "strata_jobs{state=\"succeeded\"}"), 2);
  EXPECT_EQ(MetricValue(metrics, "strata_jobs_finished_total{state=\"succeeded\"}"), 2);
  EXPECT_EQ(MetricValue(metrics, "strata_jobs_finished_total{state=\"failed\"}"), 0);
  EXPECT_EQ(MetricValue(metrics, "strata_queue_length"), 0);
  EXPECT_GE(MetricValue(metrics, "strata_generation_tokens_total"), 6.0 * gen.ok);
  EXPECT_GE(MetricValue(metrics, "strata_time_to_first_token_seconds_count"), gen.ok);
  // The decode scheduler's figures (vLLM's names).
  EXPECT_GE(MetricValue(metrics, "strata_prompt_tokens_total"), 2.0 * gen.ok);
  EXPECT_GE(MetricValue(metrics, "strata_time_per_output_token_seconds_count"), 5.0 * gen.ok);
  EXPECT_GE(MetricValue(metrics, "strata_e2e_request_latency_seconds_count"), gen.ok);
  EXPECT_GE(MetricValue(metrics, "strata_batch_size_count"), 6.0 * gen.ok);
  EXPECT_EQ(MetricValue(metrics, "strata_num_requests_running"), 0) << metrics;
  EXPECT_EQ(MetricValue(metrics, "strata_num_requests_waiting"), 0);
  EXPECT_NE(
      metrics.find("strata_rpc_requests_total{code=\"OK\",method=\"/strata.v1.InferenceService/Generate\"}"),
      std::string::npos);
  EXPECT_NE(metrics.find("method=\"/strata.v1.AdaptationService/SubmitTask\""), std::string::npos);

  json info = s.CliJson({"info"});
  EXPECT_EQ(info["weights_version"], "3");
  EXPECT_EQ(info["tasks_learned"], "2");
  EXPECT_EQ(info["method"], "share_ella");

  // Restart on the same state directory: the same tasks, scores and jobs.
  ASSERT_EQ(s.proc->Stop(SIGTERM), 0) << s.Log();
  EXPECT_NE(s.Log().find("shutdown complete"), std::string::npos);
  s.Start();
  json tasks_after = s.CliJson({"tasks"});
  ASSERT_EQ(tasks_after["tasks"].size(), 2u) << tasks_after.dump();
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(tasks_after["tasks"][i]["name"], tasks["tasks"][i]["name"]);
    EXPECT_EQ(tasks_after["tasks"][i]["current_score"], tasks["tasks"][i]["current_score"]);
    EXPECT_EQ(tasks_after["tasks"][i]["learned_score"], tasks["tasks"][i]["learned_score"]);
  }
  json report_after = s.CliJson({"report"});
  EXPECT_EQ(report_after["matrix"], report["matrix"]);
  EXPECT_EQ(report_after["weights_version"], "3");
  json jobs_after = s.CliJson({"jobs"});
  ASSERT_EQ(jobs_after["jobs"].size(), 2u);
  EXPECT_EQ(jobs_after["jobs"][0]["id"], job2);  // newest first
  EXPECT_EQ(jobs_after["jobs"][0]["state"], "JOB_STATE_SUCCEEDED");
  const std::string metrics_after = s.Metrics();
  EXPECT_FALSE(std::isnan(MetricValue(metrics_after, "strata_task_score{task=\"iso3\",view=\"auto\"}")))
      << metrics_after;
  json report_routes = s.CliJson({"report"});
  EXPECT_EQ(report_routes["router_accuracy"], report["router_accuracy"]);
  EXPECT_EQ(s.CliJson({"generate", "--prompt", "The capital of France is", "--max-tokens", "2"})["route"],
            "capitals");
  // A relearn under the same name is refused.
  ExpectRpcError(s.Cli({"submit", "--task", "capitals", ClSmall("capitals/train.jsonl"), "--eval", cap_eval}),
                 "ALREADY_EXISTS", "already learned");
}

// The other published methods through the service: a server started with --method=osft or pm
// learns two tasks submitted with `--method <m>`, serves the merged weights (an export of them
// generates the same text offline), keeps the method across a restart and refuses another method.
TEST(Service, OsftAndPerturbAndMergeLearnThroughTheService) {
  for (const std::string method : {"osft", "pm"}) {
    SCOPED_TRACE(method);
    Server s({"--method=" + method, "--reference_text=" + SharedPath("data/lm/tinystories_val.txt")});
    s.Start();
    const std::string dir = s.dir.path();
    const std::string cap_train = HeadLines(ClSmall("capitals/train.jsonl"), 48, dir + "/capitals.jsonl");
    const std::string cap_eval = HeadLines(ClSmall("capitals/test.jsonl"), 16, dir + "/capitals-eval.jsonl");
    const std::string iso_train = HeadLines(ClSmall("iso3/train.jsonl"), 48, dir + "/iso3.jsonl");
    const std::string iso_eval = HeadLines(ClSmall("iso3/test.jsonl"), 16, dir + "/iso3-eval.jsonl");
    for (const auto& [task, train, eval] : std::vector<std::tuple<std::string, std::string, std::string>>{
             {"capitals", cap_train, cap_eval}, {"iso3", iso_train, iso_eval}}) {
      CommandResult r = s.Cli({"submit", "--task", task, train, "--eval", eval, "--method", method, "--steps",
                               "6", "--batch-size", "8", "--wait"});
      ASSERT_EQ(r.exit_code, 0) << r.err << r.out << s.Log();
      EXPECT_NE(r.out.find("succeeded: task '" + task + "' learned"), std::string::npos) << r.out;
    }
    json report = s.CliJson({"report"});
    EXPECT_EQ(report["method"], method);
    EXPECT_EQ(report["tasks"], json({"capitals", "iso3"}));
    ASSERT_EQ(report["matrix"].size(), 2u) << report.dump();
    EXPECT_EQ(report["weights_version"], "3");
    EXPECT_TRUE(report.contains("backward_transfer")) << report.dump();
    EXPECT_GT(std::stoll(report["adaptation_state_bytes"].get<std::string>()), 0);
    const std::string metrics = s.Metrics();
    EXPECT_EQ(MetricValue(metrics, "strata_tasks_learned"), 2) << metrics;
    EXPECT_FALSE(std::isnan(MetricValue(metrics, "strata_task_score{task=\"iso3\",view=\"merged\"}")))
        << metrics;
    // No per-task weights: a prompt that fits a task is served on the merged weights.
    EXPECT_EQ(s.CliJson({"generate", "--prompt", "The capital of France is", "--max-tokens", "2"})["route"],
              "merged");

    // The served model is the method's merged weights: they changed from the base, and an export of
    // them generates the same greedy text offline.
    const std::vector<std::string> gen = {
        "generate", "--prompt", "The capital of France is", "--max-tokens", "12", "--temperature", "0"};
    std::vector<std::string> gen_merged = gen;
    gen_merged.insert(gen_merged.end(), {"--route", "merged"});
    CommandResult served = s.Cli(gen_merged);
    ASSERT_EQ(served.exit_code, 0) << served.err;
    json exported = s.CliJson({"export", "merged"});
    std::vector<std::string> offline = {BinaryPath("strata")};
    offline.insert(offline.end(), gen.begin(), gen.end());
    offline.insert(offline.end(), {"--model", exported["path"].get<std::string>(), "--threads", "1"});
    CommandResult from_export = RunCommand(offline);
    ASSERT_EQ(from_export.exit_code, 0) << from_export.err;
    EXPECT_EQ(from_export.out, served.out);
    std::vector<std::string> base = {BinaryPath("strata")};
    base.insert(base.end(), gen.begin(), gen.end());
    base.insert(base.end(), {"--model", Model(), "--threads", "1"});
    CommandResult from_base = RunCommand(base);
    ASSERT_EQ(from_base.exit_code, 0) << from_base.err;
    EXPECT_NE(from_base.out, served.out) << "the served weights did not change";

    ExpectRpcError(
        s.Cli({"submit", "--task", "other", cap_train, "--eval", cap_eval, "--method", "share_ella"}),
        "FAILED_PRECONDITION", method);
    ASSERT_EQ(s.proc->Stop(SIGTERM), 0) << s.Log();
    s.Start();
    json info = s.CliJson({"info"});
    EXPECT_EQ(info["method"], method);
    EXPECT_EQ(info["tasks_learned"], "2");
    EXPECT_EQ(s.CliJson({"report"})["matrix"], report["matrix"]);
    CommandResult after = s.Cli(gen);
    EXPECT_EQ(after.out, served.out);
  }
}

// Prometheus itself scrapes the server and answers a query for both tasks' scores.
TEST(Service, PrometheusScrapesTaskScores) {
  const std::string prometheus = "/usr/bin/prometheus";
  if (!std::filesystem::exists(prometheus)) GTEST_SKIP() << "prometheus is not installed";
  Server s;
  s.Start();
  const std::string cap_eval =
      HeadLines(ClSmall("capitals/test.jsonl"), 8, s.dir.path() + "/capitals-eval.jsonl");
  const std::string iso_eval = HeadLines(ClSmall("iso3/test.jsonl"), 8, s.dir.path() + "/iso3-eval.jsonl");
  Submit(s, "capitals", ClSmall("capitals/train.jsonl"), cap_eval, {"--steps", "2", "--batch-size", "4"});
  const std::string job2 =
      Submit(s, "iso3", ClSmall("iso3/train.jsonl"), iso_eval, {"--steps", "2", "--batch-size", "4"});
  ASSERT_EQ(s.Cli({"watch", job2}).exit_code, 0) << s.Log();

  const int web_port = FreePort();
  const std::string config = s.dir.path() + "/prometheus.yml";
  WriteFile(config,
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: strata\n    static_configs:\n      - targets: ['127.0.0.1:" +
                std::to_string(s.metrics_port) + "']\n");
  Subprocess prom({prometheus, "--config.file=" + config, "--storage.tsdb.path=" + s.dir.path() + "/tsdb",
                   "--web.listen-address=127.0.0.1:" + std::to_string(web_port)},
                  s.dir.path() + "/prometheus.log");
  std::set<std::string> tasks;
  std::string last;
  WaitUntil(
      [&] {
        auto body = HttpGet(web_port, "/api/v1/query?query=strata_task_score");
        if (!body) return false;
        last = *body;
        json j = json::parse(*body, nullptr, false);
        if (j.is_discarded() || j.value("status", "") != "success") return false;
        tasks.clear();
        for (const auto& r : j["data"]["result"]) {
          tasks.insert(r["metric"]["task"].get<std::string>());
          EXPECT_EQ(r["metric"]["job"], "strata");
        }
        return tasks.size() == 2;
      },
      90);
  EXPECT_EQ(tasks, (std::set<std::string>{"capitals", "iso3"})) << last << "\n" << prom.Log();
  auto up = HttpGet(web_port, "/api/v1/query?query=strata_tasks_learned");
  ASSERT_TRUE(up.has_value());
  json j = json::parse(*up, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << *up;
  ASSERT_EQ(j["data"]["result"].size(), 1u) << *up;
  EXPECT_EQ(j["data"]["result"][0]["value"][1], "2");
}

// kill -9 in the middle of training: after a restart the job runs again (attempt 2); SIGTERM
// during training re-queues it (attempt 3 after the next start); cancelling it then leaves the
// model untouched.
TEST(Service, JobInterruptedByKillRunsAgainAfterRestart) {
  Server s;
  s.Start();
  const std::string eval = HeadLines(ClSmall("capitals/test.jsonl"), 8, s.dir.path() + "/eval.jsonl");
  const std::string id =
      Submit(s, "long", ClSmall("capitals/train.jsonl"), eval, {"--steps", "100000", "--batch-size", "4"});
  auto channel = s.Channel();
  auto stub = pb::AdaptationService::NewStub(channel);
  ASSERT_TRUE(WaitUntil([&] { return GetJob(*stub, id).progress().step() >= 2; }, 120)) << s.Log();
  EXPECT_EQ(GetJob(*stub, id).attempts(), 1);
  // The training figures are exported while the job trains.
  const std::string metrics = s.Metrics();
  EXPECT_EQ(MetricValue(metrics, "strata_jobs{state=\"training\"}"), 1) << metrics;
  EXPECT_GT(MetricValue(metrics, "strata_training_loss"), 0) << metrics;
  EXPECT_GT(MetricValue(metrics, "strata_training_tokens_per_second"), 0) << metrics;

  s.proc->Stop(SIGKILL);
  s.Start();
  channel = s.Channel();
  stub = pb::AdaptationService::NewStub(channel);
  ASSERT_TRUE(WaitUntil(
      [&] {
        pb::Job j = GetJob(*stub, id);
        return j.state() == pb::JOB_STATE_TRAINING && j.progress().step() >= 1;
      },
      120))
      << s.Log();
  EXPECT_EQ(GetJob(*stub, id).attempts(), 2);
  EXPECT_NE(s.Log().find("re-queued"), std::string::npos) << s.Log();

  // A graceful stop keeps the job queued for the next start, and uses no attempt.
  EXPECT_EQ(s.proc->Stop(SIGTERM), 0) << s.Log();
  s.Start();
  channel = s.Channel();
  stub = pb::AdaptationService::NewStub(channel);
  ASSERT_TRUE(WaitUntil(
      [&] {
        pb::Job j = GetJob(*stub, id);
        return j.state() == pb::JOB_STATE_TRAINING && j.progress().step() >= 1;
      },
      120))
      << s.Log();
  EXPECT_EQ(GetJob(*stub, id).attempts(), 2);

  CommandResult cancel = s.Cli({"cancel", id});
  EXPECT_EQ(cancel.exit_code, 0) << cancel.err;
  CommandResult watch = s.Cli({"watch", id});
  EXPECT_EQ(watch.exit_code, 1) << watch.out << watch.err;
  EXPECT_NE(watch.err.find("cancelled"), std::string::npos) << watch.err;
  EXPECT_EQ(GetJob(*stub, id).state(), pb::JOB_STATE_CANCELLED);
  // Idle again: the training gauges are gone (not the cancelled job's last figures).
  const std::string idle = s.Metrics();
  EXPECT_EQ(MetricValue(idle, "strata_jobs{state=\"cancelled\"}"), 1) << idle;
  EXPECT_EQ(idle.find("strata_training_loss"), std::string::npos) << idle;
  EXPECT_EQ(idle.find("strata_training_tokens_per_second"), std::string::npos) << idle;
  ExpectRpcError(s.Cli({"cancel", id}), "FAILED_PRECONDITION");
  json tasks = s.CliJson({"tasks"});
  EXPECT_TRUE(!tasks.contains("tasks") || tasks["tasks"].empty()) << tasks.dump();
  EXPECT_EQ(s.CliJson({"info"})["weights_version"], "1");
}

// Every bad input gets its own status code, and nothing is enqueued for it.
TEST(Service, BadInputsGetTheirCodes) {
  Server s({"--max_task_examples=100", "--max_task_bytes=30000", "--max_queue=1", "--max_new_tokens=64",
            "--max_seq_len=128"});
  s.Start();
  const std::string dir = s.dir.path();
  const std::string eval = HeadLines(ClSmall("capitals/test.jsonl"), 8, dir + "/eval.jsonl");
  const std::string small = HeadLines(ClSmall("capitals/train.jsonl"), 50, dir + "/small.jsonl");

  // A bad JSON line: INVALID_ARGUMENT naming the line.
  WriteFile(dir + "/bad.jsonl",
            "{\"prompt\": \"a\", \"completion\": \" b\"}\n{\"prompt\": \"c\", \"completion\": \" d\"}\n"
            "{\"prompt\": \"e\", \"completion\": }\n{\"prompt\": \"f\"}\n");
  // Each file's errors carry its own name (the path given to the CLI).
  ExpectRpcError(s.Cli({"submit", "--task", "bad", dir + "/bad.jsonl", "--eval", eval}), "INVALID_ARGUMENT",
                 dir + "/bad.jsonl:3:");
  ExpectRpcError(s.Cli({"submit", "--task", "bad", dir + "/bad.jsonl", "--eval", eval}), "INVALID_ARGUMENT",
                 dir + "/bad.jsonl:4:");
  std::filesystem::copy_file(dir + "/bad.jsonl", dir + "/bad-eval.jsonl");
  CommandResult bad_eval = s.Cli({"submit", "--task", "bad", small, "--eval", dir + "/bad-eval.jsonl"});
  ExpectRpcError(bad_eval, "INVALID_ARGUMENT", dir + "/bad-eval.jsonl:3:");
  EXPECT_EQ(bad_eval.err.find("small.jsonl"), std::string::npos) << bad_eval.err;
  // Longer than --max_seq_len tokens.
  WriteFile(dir + "/long.jsonl",
            "{\"prompt\": \"" + std::string(2000, 'x') + "\", \"completion\": \" y\"}\n");
  ExpectRpcError(s.Cli({"submit", "--task", "toolong", dir + "/long.jsonl", "--eval", eval}),
                 "INVALID_ARGUMENT", "long.jsonl:1:");
  // A bad name and a different method.
  ExpectRpcError(s.Cli({"submit", "--task", "no/slash", small, "--eval", eval}), "INVALID_ARGUMENT",
                 "spec.name");
  ExpectRpcError(s.Cli({"submit", "--task", "other", small, "--eval", eval, "--method", "seq_lora"}),
                 "FAILED_PRECONDITION", "share_ella");
  // Limits.
  ExpectRpcError(s.Cli({"submit", "--task", "many", ClSmall("capitals/train.jsonl"), "--eval", eval}),
                 "RESOURCE_EXHAUSTED", "--max_task_examples");
  ExpectRpcError(s.Cli({"submit", "--task", "big", ClSmall("langid/train.jsonl")}), "RESOURCE_EXHAUSTED",
                 "--max_task_bytes");

  // Raw stream: the first message must be the spec.
  auto channel = s.Channel();
  auto stub = pb::AdaptationService::NewStub(channel);
  {
    grpc::ClientContext ctx;
    pb::Job job;
    auto writer = stub->SubmitTask(&ctx, &job);
    pb::SubmitTaskRequest msg;
    msg.mutable_train()->set_jsonl("{\"prompt\": \"a\", \"completion\": \" b\"}\n");
    writer->Write(msg);
    writer->WritesDone();
    grpc::Status st = writer->Finish();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
    EXPECT_NE(st.error_message().find("first message"), std::string::npos) << st.error_message();
  }
  // Structured examples go through the same checks (a missing completion is refused) ...
  {
    grpc::ClientContext ctx;
    pb::Job job;
    auto writer = stub->SubmitTask(&ctx, &job);
    pb::SubmitTaskRequest spec;
    spec.mutable_spec()->set_name("structured");
    writer->Write(spec);
    pb::SubmitTaskRequest msg;
    auto* e = msg.mutable_train()->add_examples();
    e->set_prompt("2+2=");
    e->set_completion(" 4");
    msg.mutable_train()->add_examples()->set_prompt("3+3=");
    writer->Write(msg);
    writer->WritesDone();
    grpc::Status st = writer->Finish();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
    EXPECT_NE(st.error_message().find("train.jsonl:2:"), std::string::npos) << st.error_message();
  }
  // ... and invalid UTF-8 in a structured example is refused naming its line and field (it used to
  // fail the stream's parsing and read as "no training data").
  {
    grpc::ClientContext ctx;
    pb::Job job;
    auto writer = stub->SubmitTask(&ctx, &job);
    pb::SubmitTaskRequest spec;
    spec.mutable_spec()->set_name("structured");
    writer->Write(spec);
    pb::SubmitTaskRequest msg;
    auto* e = msg.mutable_train()->add_examples();
    e->set_prompt("2+2=");
    e->set_completion(" 4");
    e = msg.mutable_train()->add_examples();
    e->set_prompt("caf\xE9=");
    e->set_completion(" 5");
    writer->Write(msg);
    writer->WritesDone();
    grpc::Status st = writer->Finish();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
    EXPECT_NE(st.error_message().find("train.jsonl:2: field \"prompt\": invalid UTF-8"), std::string::npos)
        << st.error_message();
  }
  EXPECT_TRUE(s.CliJson({"jobs"})["jobs"].empty()) << "a refused submission left a job behind";

  // ... and a good mixed stream (a JSONL chunk ending mid-line, then structured examples) is accepted,
  // with a seeded hold-out: 10% of 40 examples.
  {
    grpc::ClientContext ctx;
    pb::Job job;
    auto writer = stub->SubmitTask(&ctx, &job);
    pb::SubmitTaskRequest spec;
    spec.mutable_spec()->set_name("running");
    spec.mutable_spec()->mutable_overrides()->set_max_steps(100000);
    writer->Write(spec);
    pb::SubmitTaskRequest chunk;
    chunk.mutable_train()->set_jsonl("{\"prompt\": \"1+1=\", \"completion\": \" 2\"}\n{\"prompt\": \"1+");
    writer->Write(chunk);
    pb::SubmitTaskRequest rest;
    rest.mutable_train()->set_jsonl("2=\", \"completion\": \" 3\"}");  // no final newline
    for (int i = 0; i < 38; ++i) {
      auto* e = rest.mutable_train()->add_examples();
      e->set_prompt(std::to_string(i) + "+1=");
      e->set_completion(" " + std::to_string(i + 1));
    }
    writer->Write(rest);
    writer->WritesDone();
    grpc::Status st = writer->Finish();
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_EQ(job.train_examples(), 36);
    EXPECT_EQ(job.eval_examples(), 4);
    EXPECT_EQ(job.state(), pb::JOB_STATE_QUEUED);
  }
  ASSERT_TRUE(WaitUntil([&] { return GetJob(*stub, "job-000001").state() == pb::JOB_STATE_TRAINING; }, 60));
  // One queued job fills --max_queue=1; a duplicate name is ALREADY_EXISTS first.
  const std::string queued = Submit(s, "queued", small, "", {"--eval-fraction", "0.2"});
  EXPECT_EQ(GetJob(*stub, queued).eval_examples(), 10);
  EXPECT_EQ(GetJob(*stub, queued).train_examples(), 40);
  EXPECT_EQ(GetJob(*stub, queued).queue_position(), 1);
  ExpectRpcError(s.Cli({"submit", "--task", "queued", small, "--eval", eval}), "ALREADY_EXISTS", queued);
  ExpectRpcError(s.Cli({"submit", "--task", "running", small, "--eval", eval}), "ALREADY_EXISTS", "training");
  ExpectRpcError(s.Cli({"submit", "--task", "third", small, "--eval", eval}), "RESOURCE_EXHAUSTED",
                 "--max_queue");

  // Unknown jobs and tasks.
  ExpectRpcError(s.Cli({"watch", "job-999999"}), "NOT_FOUND", "job-999999");
  ExpectRpcError(s.Cli({"cancel", "job-999999"}), "NOT_FOUND");
  ExpectRpcError(s.Cli({"generate", "--prompt", "x", "--task", "nosuch"}), "NOT_FOUND", "nosuch");
  // Paging.
  {
    grpc::ClientContext ctx;
    pb::ListJobsRequest req;
    req.set_page_size(1);
    pb::ListJobsResponse page;
    ASSERT_TRUE(stub->ListJobs(&ctx, req, &page).ok());
    ASSERT_EQ(page.jobs_size(), 1);
    EXPECT_EQ(page.jobs(0).id(), queued);
    ASSERT_FALSE(page.next_page_token().empty());
    grpc::ClientContext ctx2;
    req.set_page_token(page.next_page_token());
    pb::ListJobsResponse page2;
    ASSERT_TRUE(stub->ListJobs(&ctx2, req, &page2).ok());
    ASSERT_EQ(page2.jobs_size(), 1);
    EXPECT_EQ(page2.jobs(0).id(), "job-000001");
    EXPECT_TRUE(page2.next_page_token().empty());
    grpc::ClientContext ctx3;
    req.set_page_token("garbage");
    EXPECT_EQ(stub->ListJobs(&ctx3, req, &page2).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  // Cancelling the queued job works at once; a second cancel is FAILED_PRECONDITION.
  CommandResult cancel = s.Cli({"cancel", queued});
  EXPECT_EQ(cancel.exit_code, 0) << cancel.err;
  EXPECT_NE(cancel.out.find("cancelled"), std::string::npos) << cancel.out;
  ExpectRpcError(s.Cli({"cancel", queued}), "FAILED_PRECONDITION", "already cancelled");

  // Sampling limits.
  ExpectRpcError(s.Cli({"generate", "--prompt", "x", "--max-tokens", "65"}), "INVALID_ARGUMENT",
                 "--max_new_tokens");

  // Invalid UTF-8 in a prompt, an empty completion, a single completion.
  ExpectRpcError(s.Cli({"generate", "--prompt", "caf\xE9", "--max-tokens", "2"}), "INVALID_ARGUMENT",
                 "prompt: invalid UTF-8 at byte 4");
  ExpectRpcError(s.Cli({"score", "--prompt", "2+2=", "--completion", " 4", "--completion", ""}),
                 "INVALID_ARGUMENT", "completions[1]: empty");
  {
    json one = s.CliJson({"score", "--prompt", "2+2=", "--completion", " 4"});
    ASSERT_EQ(one["scores"].size(), 1u) << one.dump();
    json two = s.CliJson({"score", "--prompt", "2+2=", "--completion", " 4", "--completion", " 5"});
    EXPECT_LT(one["scores"][0]["log_likelihood"].get<double>(), 0) << one.dump();
    // The same score alone or in a set, up to float32 rounding (a batch of 2 rows runs other GEMM
    // kernels than 1 row).
    EXPECT_NEAR(one["scores"][0]["log_likelihood"].get<double>(),
                two["scores"][0]["log_likelihood"].get<double>(), 1e-4);
    EXPECT_EQ(one["best"], 0);
  }
  // An adapter directory whose name breaks the task-name rules is refused before anything is read.
  std::filesystem::create_directories(s.state() + "/imports/bad name!");
  ExpectRpcError(s.Cli({"import", "bad name!"}), "INVALID_ARGUMENT", "not a valid task name");

  // Export / import outside the roots.
  ExpectRpcError(s.Cli({"export", dir + "/elsewhere"}), "PERMISSION_DENIED", "outside");
  ExpectRpcError(s.Cli({"export", "../../escape"}), "PERMISSION_DENIED");
  ExpectRpcError(s.Cli({"export", "--state", "/tmp"}), "PERMISSION_DENIED");
  ExpectRpcError(s.Cli({"import", "/etc"}), "PERMISSION_DENIED");
  EXPECT_FALSE(std::filesystem::exists(dir + "/elsewhere"));
  EXPECT_EQ(RunCommand(
                {BinaryPath("strata"), "--server", s.addr(), "submit", "--task", "x", dir + "/missing.jsonl"})
                .exit_code,
            2);
}

// Server-mode tokenize / generate / score agree with the offline tools on the base model, and
// exported weights load offline and generate the same text.
TEST(Service, ServerInferenceMatchesOfflineAndExportRoundTrips) {
  Server s;
  s.Start();
  const std::string model = Model();
  CommandResult tok = s.Cli({"tokenize", "--text", "Once upon a time"});
  ASSERT_EQ(tok.exit_code, 0) << tok.err;
  EXPECT_EQ(tok.out, "1 403 407 261 378\n");
  json tok_json = s.CliJson({"tokenize", "--text", "Once upon a time"});
  EXPECT_EQ(tok_json["tokens"][1], "▁Once");
  EXPECT_EQ(tok_json["weights_version"], 1);

  const std::vector<std::string> gen_args = {
      "generate", "--prompt", "Once upon a time", "--max-tokens", "16", "--temperature", "0"};
  CommandResult served = s.Cli(gen_args);
  ASSERT_EQ(served.exit_code, 0) << served.err;
  EXPECT_EQ(served.out.rfind(", there was a little girl", 0), 0u) << served.out;
  std::vector<std::string> offline_args = gen_args;
  offline_args.insert(offline_args.end(), {"--model", model, "--threads", "1"});
  CommandResult offline = RunCommand([&] {
    std::vector<std::string> argv = {BinaryPath("strata")};
    argv.insert(argv.end(), offline_args.begin(), offline_args.end());
    return argv;
  }());
  ASSERT_EQ(offline.exit_code, 0) << offline.err;
  EXPECT_EQ(served.out, offline.out);
  json served_json = s.CliJson(gen_args);
  EXPECT_EQ(served_json["ids"].size(), 16u);
  EXPECT_EQ(served_json["completion_tokens"], 16);
  EXPECT_EQ(served_json["finish_reason"], "length");
  EXPECT_EQ(served_json["weights_version"], 1);
  EXPECT_GT(served_json["time_to_first_token_seconds"].get<double>(), 0.0);

  json score = s.CliJson({"score", "--prompt", "Once upon a time, there was a little", "--completion",
                          " girl", "--completion", " banana xylophone"});
  ASSERT_EQ(score["scores"].size(), 2u);
  EXPECT_EQ(score["best"], 0);
  EXPECT_GT(score["scores"][0]["log_likelihood"].get<double>(),
            score["scores"][1]["log_likelihood"].get<double>());

  // No task learned yet: there is no adaptation state to export.
  ExpectRpcError(s.Cli({"export", "--state", "state-copy"}), "FAILED_PRECONDITION");
  json exported = s.CliJson({"export", "weights-v1"});
  const std::string path = exported["path"];
  EXPECT_EQ(path, s.state() + "/exports/weights-v1");
  EXPECT_TRUE(std::filesystem::exists(path + "/config.json"));
  std::vector<std::string> argv = {BinaryPath("strata")};
  argv.insert(argv.end(), gen_args.begin(), gen_args.end());
  argv.insert(argv.end(), {"--model", path, "--threads", "1"});
  CommandResult from_export = RunCommand(argv);
  ASSERT_EQ(from_export.exit_code, 0) << from_export.err;
  EXPECT_EQ(from_export.out, served.out);
}

// A PEFT LoRA adapter directory for stories260K (q_proj and v_proj of every layer, rank 2), with
// the safetensors file written by hand (8-byte header length, JSON header, little-endian float32).
void WritePeftAdapter(const std::string& dir) {
  std::filesystem::create_directories(dir);
  WriteFile(dir + "/adapter_config.json",
            R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],)"
            R"( "base_model_name_or_path": "stories260K"})");
  const int r = 2, hidden = 64;
  json header = json::object();
  std::string data;
  auto add = [&](const std::string& name, int rows, int cols, float scale) {
    const size_t begin = data.size();
    for (int i = 0; i < rows * cols; ++i) {
      float v = scale * static_cast<float>((i * 7919) % 13 - 6) / 6.0f;
      data.append(reinterpret_cast<const char*>(&v), sizeof(v));
    }
    header[name] = {{"dtype", "F32"}, {"shape", {rows, cols}}, {"data_offsets", {begin, data.size()}}};
  };
  for (int layer = 0; layer < 5; ++layer) {
    for (const auto& [module, out] :
         std::vector<std::pair<std::string, int>>{{"q_proj", 64}, {"v_proj", 32}}) {
      const std::string base =
          "base_model.model.model.layers." + std::to_string(layer) + ".self_attn." + module;
      add(base + ".lora_A.weight", r, hidden, 0.05f);
      add(base + ".lora_B.weight", out, r, 0.05f);
    }
  }
  std::string h = header.dump();
  while ((8 + h.size()) % 8 != 0) h.push_back(' ');
  std::string file(8, '\0');
  uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  WriteFile(dir + "/adapter_model.safetensors", file + h + data);
}

// ImportAdapters folds a PEFT adapter from under --import_root into the state and publishes a new
// weights version.
TEST(Service, ImportsPeftAdapterFromTheImportRoot) {
  Server s;
  s.Start();
  WritePeftAdapter(s.state() + "/imports/adapter-a");
  CommandResult r = s.Cli({"import", "adapter-a"});
  ASSERT_EQ(r.exit_code, 0) << r.err << s.Log();
  EXPECT_NE(r.out.find("imported 1 adapter(s); weights version 2"), std::string::npos) << r.out;
  EXPECT_EQ(s.CliJson({"info"})["weights_version"], "2");
  json gen = s.CliJson({"generate", "--prompt", "Once upon a time", "--max-tokens", "4"});
  EXPECT_EQ(gen["weights_version"], 2);
  ExpectRpcError(s.Cli({"import", "missing-adapter"}), "NOT_FOUND");
  // The import is a queued job like a task: --no-wait returns its id at once; a directory whose name
  // cannot name a task, or a task already learned, is refused before anything is queued.
  WritePeftAdapter(s.state() + "/imports/adapter-b");
  CommandResult queued = s.Cli({"import", "--no-wait", "adapter-b/"});  // a trailing slash names it too
  ASSERT_EQ(queued.exit_code, 0) << queued.err;
  const std::string job_id = queued.out.substr(0, queued.out.find('\n'));
  CommandResult watched = s.Cli({"watch", job_id});
  EXPECT_EQ(watched.exit_code, 0) << watched.out << watched.err;
  EXPECT_EQ(s.CliJson({"info"})["weights_version"], "3");
  ExpectRpcError(s.Cli({"import", "adapter-a"}), "ALREADY_EXISTS");
  WritePeftAdapter(s.state() + "/imports/auto");
  ExpectRpcError(s.Cli({"import", "auto"}), "INVALID_ARGUMENT", "reserved");
}

// `strata export --task` writes a learned task's route as a PEFT LoRA adapter under --export_root,
// which `strata import` accepts; a non-empty directory needs --overwrite (the full-model export too).
TEST(Service, ExportsATaskAsPeftAdapter) {
  Server s;
  s.Start();
  const std::string dir = s.dir.path();
  const std::string train = HeadLines(ClSmall("capitals/train.jsonl"), 48, dir + "/capitals.jsonl");
  const std::string eval = HeadLines(ClSmall("capitals/test.jsonl"), 16, dir + "/capitals-eval.jsonl");
  CommandResult learned = s.Cli(
      {"submit", "--task", "capitals", train, "--eval", eval, "--steps", "6", "--batch-size", "8", "--wait"});
  ASSERT_EQ(learned.exit_code, 0) << learned.err << learned.out << s.Log();

  json exported = s.CliJson({"export", "--task", "capitals", "capitals-lora"});
  const std::string path = s.state() + "/exports/capitals-lora";
  EXPECT_EQ(exported["path"], path);
  EXPECT_EQ(exported["task"], "capitals");
  EXPECT_EQ(exported["method"], "share_ella");
  EXPECT_GE(exported["rank"].get<int>(), 1);
  EXPECT_LE(exported["rank"].get<int>(), 32);
  EXPECT_LT(exported["relative_error"].get<double>(), 1e-6);  // exact up to float32 rounding
  EXPECT_EQ(exported["modules"], 35);  // every linear layer of 5 layers (--targets all-linear)
  EXPECT_TRUE(std::filesystem::exists(path + "/adapter_config.json"));
  EXPECT_TRUE(std::filesystem::exists(path + "/adapter_model.safetensors"));

  ExpectRpcError(s.Cli({"export", "--task", "capitals", "capitals-lora"}), "ALREADY_EXISTS", "--overwrite");
  CommandResult replaced = s.Cli({"export", "--task", "capitals", "capitals-lora", "--overwrite"});
  ASSERT_EQ(replaced.exit_code, 0) << replaced.err;
  EXPECT_NE(replaced.out.find("exported task 'capitals' (share_ella) as a PEFT LoRA adapter of rank"),
            std::string::npos)
      << replaced.out;
  CommandResult truncated = s.Cli({"export", "--task", "capitals", "capitals-r1", "--rank", "1"});
  ASSERT_EQ(truncated.exit_code, 0) << truncated.err;
  EXPECT_NE(truncated.out.find("relative error"), std::string::npos) << truncated.out;
  ExpectRpcError(s.Cli({"export", "--task", "nope", "x"}), "NOT_FOUND");
  ExpectRpcError(s.Cli({"export", "."}), "INVALID_ARGUMENT", "export root");
  EXPECT_EQ(s.Cli({"export", "--rank", "2", "x"}).exit_code, 2);
  EXPECT_EQ(s.Cli({"export", "--state", "--task", "capitals", "x"}).exit_code, 2);

  // The full model and the state refuse a non-empty directory the same way.
  s.CliJson({"export", "weights"});
  ExpectRpcError(s.Cli({"export", "weights"}), "ALREADY_EXISTS", "not empty");
  EXPECT_EQ(s.Cli({"export", "weights", "--overwrite"}).exit_code, 0);
  s.CliJson({"export", "--state", "state-copy"});
  ExpectRpcError(s.Cli({"export", "--state", "state-copy"}), "ALREADY_EXISTS");

  // The adapter is what ImportAdapters reads (a new task, stacked on the state's).
  std::filesystem::create_directories(s.state() + "/imports");
  std::filesystem::copy(path, s.state() + "/imports/capitals_copy");
  CommandResult imported = s.Cli({"import", "capitals_copy"});
  EXPECT_EQ(imported.exit_code, 0) << imported.err << s.Log();
}

std::string MakeCertificate(const std::string& dir) {
  CommandResult r =
      RunCommand({"/usr/bin/openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                  "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout",
                  dir + "/key.pem", "-out", dir + "/cert.pem"},
                 60);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return dir + "/cert.pem";
}

// A bearer token guards AdaptationService and AdminService (health stays open; inference too unless
// --auth_inference), over TLS.
TEST(Service, BearerTokenAndTls) {
  if (!std::filesystem::exists("/usr/bin/openssl")) GTEST_SKIP() << "openssl is not installed";
  TempDir keys;
  const std::string cert = MakeCertificate(keys.path());
  WriteFile(keys.path() + "/token", "s3cret-token\n");
  WriteFile(keys.path() + "/wrong", "not-the-token\n");
  Server s({"--tls_cert=" + cert, "--tls_key=" + keys.path() + "/key.pem",
            "--auth_token_file=" + keys.path() + "/token"});
  s.Start(/*wait=*/false);
  auto tls = [&](std::vector<std::string> args) {
    std::vector<std::string> argv = {BinaryPath("strata"), "--server", s.addr(), "--tls-ca", cert};
    argv.insert(argv.end(), args.begin(), args.end());
    return RunCommand(argv, 60);
  };
  ASSERT_TRUE(WaitUntil([&] { return tls({"--timeout", "1", "health"}).exit_code == 0; }, 60)) << s.Log();
  EXPECT_EQ(tls({"health", "--service", "strata.v1.AdaptationService"}).out, "SERVING\n");
  // Plaintext to a TLS port never connects.
  EXPECT_EQ(s.Cli({"--timeout", "2", "health"}).exit_code, 3);

  ExpectRpcError(tls({"tasks"}), "UNAUTHENTICATED", "bearer token");
  ExpectRpcError(tls({"info"}), "UNAUTHENTICATED");
  ExpectRpcError(tls({"--auth-token-file", keys.path() + "/wrong", "tasks"}), "UNAUTHENTICATED", "invalid");
  ExpectRpcError(tls({"export", "x"}), "UNAUTHENTICATED");
  ExpectRpcError(tls({"submit", "--task", "t", ClSmall("capitals/train.jsonl")}), "UNAUTHENTICATED");
  // The version RPCs are admin RPCs under the same token.
  ExpectRpcError(tls({"versions"}), "UNAUTHENTICATED");
  ExpectRpcError(tls({"promote", "2"}), "UNAUTHENTICATED");
  ExpectRpcError(tls({"rollback"}), "UNAUTHENTICATED");
  CommandResult versions = tls({"--auth-token-file", keys.path() + "/token", "versions"});
  EXPECT_EQ(versions.exit_code, 0) << versions.err;
  ExpectRpcError(tls({"--auth-token-file", keys.path() + "/token", "rollback"}), "FAILED_PRECONDITION",
                 "no version before");
  CommandResult ok = tls({"--auth-token-file", keys.path() + "/token", "tasks"});
  EXPECT_EQ(ok.exit_code, 0) << ok.err;
  // STRATA_AUTH_TOKEN_FILE (and STRATA_SERVER) stand for the flags; a flag given wins.
  const std::map<std::string, std::string> env = {{"STRATA_SERVER", s.addr()},
                                                  {"STRATA_AUTH_TOKEN_FILE", keys.path() + "/token"}};
  CommandResult from_env = RunCommand({BinaryPath("strata"), "--tls-ca", cert, "tasks"}, 60, env);
  EXPECT_EQ(from_env.exit_code, 0) << from_env.err;
  ExpectRpcError(RunCommand({BinaryPath("strata"), "--tls-ca", cert, "--auth-token-file",
                             keys.path() + "/wrong", "tasks"},
                            60, env),
                 "UNAUTHENTICATED", "invalid");
  CommandResult info = tls({"--auth-token-file", keys.path() + "/token", "--json", "info"});
  ASSERT_EQ(info.exit_code, 0) << info.err;
  json j = json::parse(info.out);
  EXPECT_TRUE(j["tls"].get<bool>());
  EXPECT_TRUE(j["auth_required"].get<bool>());
  EXPECT_FALSE(j["inference_auth_required"].get<bool>());
  // Inference stays open without --auth_inference.
  CommandResult gen = tls({"generate", "--prompt", "Once", "--max-tokens", "4"});
  EXPECT_EQ(gen.exit_code, 0) << gen.err;
  EXPECT_EQ(s.proc->Stop(SIGTERM), 0);

  Server closed({"--auth_token_file=" + keys.path() + "/token", "--auth_inference"});
  closed.Start();
  ExpectRpcError(closed.Cli({"generate", "--prompt", "Once", "--max-tokens", "4"}), "UNAUTHENTICATED");
  ExpectRpcError(closed.Cli({"tokenize", "--text", "Once"}), "UNAUTHENTICATED");
  CommandResult with_token = closed.Cli(
      {"--auth-token-file", keys.path() + "/token", "generate", "--prompt", "Once", "--max-tokens", "4"});
  EXPECT_EQ(with_token.exit_code, 0) << with_token.err;
  EXPECT_EQ(closed.Cli({"health"}).exit_code, 0);
  const std::string metrics = closed.Metrics();
  EXPECT_NE(metrics.find("code=\"UNAUTHENTICATED\",method=\"/strata.v1.InferenceService/Generate\""),
            std::string::npos)
      << metrics;

  // Inconsistent security flags stop the server at start.
  CommandResult half =
      RunCommand({BinaryPath("strata-server"), "--tls_cert=" + cert, "--metrics_port=0", "--http_port=0"});
  EXPECT_EQ(half.exit_code, 2);
  EXPECT_NE(half.err.find("--tls_key"), std::string::npos) << half.err;
  CommandResult empty_token = RunCommand(
      {BinaryPath("strata-server"), "--auth_token_file=/dev/null", "--metrics_port=0", "--http_port=0",
       "--state_dir=" + keys.path() + "/st", "--grpc_port=" + std::to_string(FreePort())});
  EXPECT_EQ(empty_token.exit_code, 2);
  EXPECT_NE(empty_token.err.find("no token"), std::string::npos) << empty_token.err;
}

// A copy of `src` whose every completion is " Paris": the same prompts as capitals, contradicting
// answers (a task built to destroy what capitals taught).
std::string ContradictingCapitals(const std::string& path) {
  std::ifstream in(ClSmall("capitals/train.jsonl"));
  std::string line, out;
  while (std::getline(in, line)) {
    json j = json::parse(line);
    j["completion"] = " Paris";
    out += j.dump() + "\n";
  }
  WriteFile(path, out);
  return path;
}

json Versions(const Server& s) { return s.CliJson({"versions"}); }

std::set<int64_t> KeptVersions(const json& versions) {
  std::set<int64_t> out;
  for (const auto& v : versions.value("versions", json::array()))
    out.insert(std::stoll(v["version"].get<std::string>()));
  return out;
}

std::string Served(const Server& s) { return s.CliJson({"info"})["weights_version"].get<std::string>(); }

// The publish gate: a task that destroys an earlier one is held as a candidate (the served version
// unchanged), visible in jobs, report, versions and metrics; promote publishes it; rollback serves
// the earlier version again and the rolled-back task may be submitted again; --keep_versions prunes.
TEST(Versions, GateHoldsAContradictingTaskThenPromoteAndRollback) {
  // seq_lora: no per-task weights, so what users get (auto routing) is the merged weights, where
  // the contradiction lands (share_ella's per-task routing would keep capitals intact).
  Server s({"--method=seq_lora", "--keep_versions=2"});
  s.Start();
  const std::string cap_train = ClSmall("capitals/train.jsonl");
  const std::string cap_eval = ClSmall("capitals/test.jsonl");
  CommandResult learned =
      s.Cli({"submit", "--task", "capitals", cap_train, "--eval", cap_eval, "--steps", "200", "--wait"});
  ASSERT_EQ(learned.exit_code, 0) << learned.out << learned.err << s.Log();
  EXPECT_EQ(Served(s), "2");
  EXPECT_EQ(KeptVersions(Versions(s)), (std::set<int64_t>{1, 2}));  // the empty state is version 1

  const std::string paris = ContradictingCapitals(s.dir.path() + "/paris.jsonl");
  CommandResult held =
      s.Cli({"submit", "--task", "paris", paris, "--eval", paris, "--steps", "120", "--wait"});
  EXPECT_EQ(held.exit_code, 1) << held.out << held.err << s.Log();
  EXPECT_NE(held.out.find("held"), std::string::npos) << held.out;
  EXPECT_NE(held.out.find("forgetting: capitals score"), std::string::npos) << held.out;
  EXPECT_NE(held.out.find("strata promote 3"), std::string::npos) << held.out;

  auto channel = s.Channel();
  auto stub = pb::AdaptationService::NewStub(channel);
  json jobs = s.CliJson({"jobs", "--state", "held"});
  ASSERT_EQ(jobs["jobs"].size(), 1u) << jobs.dump();
  const std::string paris_job = jobs["jobs"][0]["id"];
  pb::Job job = GetJob(*stub, paris_job);
  EXPECT_EQ(job.state(), pb::JOB_STATE_HELD);
  EXPECT_EQ(job.weights_version(), 3);
  ASSERT_EQ(job.hold_reasons_size(), 1);
  EXPECT_EQ(job.hold_reasons(0).rfind("forgetting: capitals", 0), 0u) << job.hold_reasons(0);
  // Not served: the version and the answers are those of version 2.
  EXPECT_EQ(Served(s), "2");
  CommandResult before = s.Cli({"generate", "--prompt", "The capital of Germany is", "--max-tokens", "4"});
  EXPECT_NE(before.err.find("weights version 2"), std::string::npos) << before.err;
  json report = s.CliJson({"report"});
  ASSERT_EQ(report["candidates"].size(), 1u) << report.dump();
  EXPECT_EQ(report["candidates"][0]["version"], "3");
  EXPECT_EQ(report["candidates"][0]["task"], "paris");
  std::string metrics = s.Metrics();
  EXPECT_EQ(MetricValue(metrics, "strata_candidate_versions"), 1) << metrics;
  EXPECT_EQ(MetricValue(metrics, "strata_gate_rejections_total{reason=\"forgetting\"}"), 1) << metrics;
  EXPECT_EQ(MetricValue(metrics, "strata_gate_rejections_total{reason=\"min_task_score\"}"), 0) << metrics;
  EXPECT_EQ(MetricValue(metrics, "strata_jobs{state=\"held\"}"), 1) << metrics;
  EXPECT_EQ(MetricValue(metrics, "strata_weights_version"), 2) << metrics;
  json versions = Versions(s);
  EXPECT_EQ(KeptVersions(versions), (std::set<int64_t>{1, 2, 3}));  // 2 published + the candidate
  for (const auto& v : versions["versions"]) {
    if (v["version"] == "3") {
      EXPECT_EQ(v["status"], "candidate");
      EXPECT_FALSE(v.value("served", false));
    }
  }
  // The held candidate survives a restart.
  ASSERT_EQ(s.proc->Stop(SIGTERM), 0) << s.Log();
  s.Start();
  EXPECT_EQ(Served(s), "2");
  EXPECT_EQ(KeptVersions(Versions(s)), (std::set<int64_t>{1, 2, 3}));

  // Wrong targets get their codes.
  ExpectRpcError(s.Cli({"promote", "2"}), "FAILED_PRECONDITION", "not a candidate");
  ExpectRpcError(s.Cli({"promote", "9"}), "NOT_FOUND", "version 9 is not kept");
  ExpectRpcError(s.Cli({"rollback", "3"}), "FAILED_PRECONDITION", "strata promote 3");

  CommandResult promoted = s.Cli({"promote", "3"});
  ASSERT_EQ(promoted.exit_code, 0) << promoted.err << s.Log();
  EXPECT_NE(promoted.out.find("2 -> 3"), std::string::npos) << promoted.out;
  EXPECT_EQ(Served(s), "3");
  channel = s.Channel();
  stub = pb::AdaptationService::NewStub(channel);
  EXPECT_EQ(GetJob(*stub, paris_job).state(), pb::JOB_STATE_SUCCEEDED);
  CommandResult after = s.Cli({"generate", "--prompt", "The capital of Germany is", "--max-tokens", "4"});
  EXPECT_NE(after.err.find("weights version 3"), std::string::npos) << after.err;
  EXPECT_NE(after.out.find("Paris"), std::string::npos) << after.out;
  // --keep_versions=2: version 1 is pruned once version 3 is kept.
  EXPECT_EQ(KeptVersions(Versions(s)), (std::set<int64_t>{2, 3}));
  EXPECT_FALSE(std::filesystem::exists(s.state() + "/versions/v1"));
  metrics = s.Metrics();
  EXPECT_EQ(MetricValue(metrics, "strata_candidate_versions"), 0) << metrics;
  EXPECT_EQ(MetricValue(metrics, "strata_gate_rejections_total{reason=\"forgetting\"}"), 1) << metrics;

  // Rollback (default: the version before the served one), then the task can be submitted again.
  CommandResult rolled = s.Cli({"rollback"});
  ASSERT_EQ(rolled.exit_code, 0) << rolled.err << s.Log();
  EXPECT_NE(rolled.out.find("3 -> 2"), std::string::npos) << rolled.out;
  EXPECT_NE(rolled.out.find("paris"), std::string::npos) << rolled.out;
  EXPECT_EQ(Served(s), "2");
  EXPECT_EQ(GetJob(*stub, paris_job).state(), pb::JOB_STATE_ROLLED_BACK);
  CommandResult answer = s.Cli({"generate", "--prompt", "The capital of Germany is", "--max-tokens", "4"});
  EXPECT_NE(answer.err.find("weights version 2"), std::string::npos) << answer.err;
  EXPECT_EQ(answer.out, before.out);
  json tasks = s.CliJson({"tasks"});
  ASSERT_EQ(tasks["tasks"].size(), 1u) << tasks.dump();
  EXPECT_EQ(KeptVersions(Versions(s)), std::set<int64_t>{2});
  ExpectRpcError(s.Cli({"rollback"}), "FAILED_PRECONDITION", "no version before");
  const std::string again = Submit(s, "paris", paris, paris, {"--steps", "2"});
  EXPECT_FALSE(again.empty());
}

// kill -9 in the middle of a rollback: after the restart it is either fully done or not at all;
// a publish killed after its state was kept but before older states were pruned keeps both.
TEST(Versions, RollbackKilledAtEitherSideOfTheSwapIsAllOrNothing) {
  Server s({"--method=seq_lora", "--max_forgetting=off", "--keep_versions=2"});
  s.Start();
  const std::string eval = HeadLines(ClSmall("capitals/test.jsonl"), 16, s.dir.path() + "/eval.jsonl");
  CommandResult learned = s.Cli({"submit", "--task", "capitals", ClSmall("capitals/train.jsonl"), "--eval",
                                 eval, "--steps", "4", "--batch-size", "4", "--wait"});
  ASSERT_EQ(learned.exit_code, 0) << learned.out << learned.err << s.Log();
  EXPECT_EQ(Served(s), "2");
  // The next publish is killed after its state is kept, before the older states are pruned.
  ASSERT_EQ(s.proc->Stop(SIGTERM), 0) << s.Log();
  s.env = {{"STRATA_FAILPOINT", "versions.before_prune"}};
  s.Start();
  const std::string paris = ContradictingCapitals(s.dir.path() + "/paris.jsonl");
  const std::string id = Submit(s, "paris", paris, eval, {"--steps", "4", "--batch-size", "4"});
  ASSERT_TRUE(WaitUntil([&] { return !s.proc->Running(); }, 300)) << s.Log();
  EXPECT_TRUE(std::filesystem::exists(s.state() + "/versions/v3"));
  EXPECT_TRUE(std::filesystem::exists(s.state() + "/versions/v1"));  // not pruned yet
  s.env.clear();
  s.Start();
  EXPECT_EQ(Served(s), "3");
  EXPECT_EQ(KeptVersions(Versions(s)), (std::set<int64_t>{2, 3}));  // pruned at start
  auto channel = s.Channel();
  auto stub = pb::AdaptationService::NewStub(channel);
  EXPECT_EQ(GetJob(*stub, id).state(), pb::JOB_STATE_SUCCEEDED);

  // Killed before the swap: nothing changed.
  ASSERT_EQ(s.proc->Stop(SIGTERM), 0) << s.Log();
  s.env = {{"STRATA_FAILPOINT", "restore.before_commit"}};
  s.Start();
  CommandResult r = s.Cli({"rollback", "2"});
  EXPECT_NE(r.exit_code, 0) << r.out;
  ASSERT_TRUE(WaitUntil([&] { return !s.proc->Running(); }, 60)) << s.Log();
  s.env.clear();
  s.Start();
  EXPECT_EQ(Served(s), "3");
  EXPECT_EQ(KeptVersions(Versions(s)), (std::set<int64_t>{2, 3}));
  channel = s.Channel();
  stub = pb::AdaptationService::NewStub(channel);
  EXPECT_EQ(GetJob(*stub, id).state(), pb::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(s.CliJson({"tasks"})["tasks"].size(), 2u);

  // Killed right after the swap: the restart completes it (newer version discarded, job marked).
  ASSERT_EQ(s.proc->Stop(SIGTERM), 0) << s.Log();
  s.env = {{"STRATA_FAILPOINT", "restore.after_commit"}};
  s.Start();
  r = s.Cli({"rollback", "2"});
  EXPECT_NE(r.exit_code, 0) << r.out;
  ASSERT_TRUE(WaitUntil([&] { return !s.proc->Running(); }, 60)) << s.Log();
  s.env.clear();
  s.Start();
  EXPECT_EQ(Served(s), "2");
  EXPECT_EQ(KeptVersions(Versions(s)), std::set<int64_t>{2});
  channel = s.Channel();
  stub = pb::AdaptationService::NewStub(channel);
  EXPECT_EQ(GetJob(*stub, id).state(), pb::JOB_STATE_ROLLED_BACK);
  json tasks = s.CliJson({"tasks"});
  ASSERT_EQ(tasks["tasks"].size(), 1u) << tasks.dump();
  EXPECT_EQ(tasks["tasks"][0]["name"], "capitals");
  // No temporary directory of the interrupted change is left.
  for (const auto& e : std::filesystem::directory_iterator(s.state())) {
    EXPECT_NE(e.path().filename().string()[0], '.') << e.path();
  }
}

}  // namespace
}  // namespace strata::testing
