// Replicas that follow the trainer (strata-server --role=replica --follow=HOST:PORT), end to end on
// 127.0.0.1: one trainer and two replicas, the real binaries and the strata CLI.

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "nlohmann/json.hpp"
#include "strata/v1/replication.grpc.pb.h"
#include "tests/test_util.h"

namespace strata::testing {
namespace {

namespace pb = strata::v1;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

double MetricValue(const std::string& metrics, const std::string& series) {
  std::istringstream in(metrics);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(series + " ", 0) == 0) return std::stod(line.substr(series.size() + 1));
  }
  return std::nan("");
}

// One strata-server on loopback with its own state directory (kept across restarts).
struct Server {
  TempDir dir;
  int grpc_port = FreePort();
  int metrics_port = FreePort();
  std::vector<std::string> flags;
  std::vector<std::string> cli_flags;  // global CLI options (--tls-ca, --auth-token-file)
  std::unique_ptr<Subprocess> proc;
  int starts = 0;

  explicit Server(std::vector<std::string> extra = {}) : flags(std::move(extra)) {}

  std::string addr() const { return "127.0.0.1:" + std::to_string(grpc_port); }

  void Start(bool wait = true) {
    std::vector<std::string> argv = {BinaryPath("strata-server"),
                                     "--grpc_port=" + std::to_string(grpc_port),
                                     "--metrics_port=" + std::to_string(metrics_port),
                                     "--http_port=0",
                                     "--state_dir=" + dir.path() + "/state",
                                     "--threads=2",
                                     "--serving_threads=1",
                                     "--shutdown_grace_seconds=5"};
    argv.insert(argv.end(), flags.begin(), flags.end());
    bool has_model = false;
    for (const auto& f : flags) has_model = has_model || f.rfind("--model=", 0) == 0;
    if (!has_model) argv.push_back("--model=" + Model());
    proc = std::make_unique<Subprocess>(argv, dir.path() + "/server" + std::to_string(++starts) + ".log");
    if (wait) {
      ASSERT_TRUE(WaitForServing(grpc_port, 90, proc.get())) << proc->Log();
    }
  }

  CommandResult Cli(std::vector<std::string> args, int timeout_seconds = 300) const {
    std::vector<std::string> argv = {BinaryPath("strata"), "--server", addr()};
    argv.insert(argv.end(), cli_flags.begin(), cli_flags.end());
    argv.insert(argv.end(), args.begin(), args.end());
    return RunCommand(argv, timeout_seconds);
  }

  json Info() const {
    CommandResult r = Cli({"--json", "--timeout", "5", "info"});
    if (r.exit_code != 0) return json();
    json j = json::parse(r.out, nullptr, /*allow_exceptions=*/false);
    return j.is_discarded() ? json() : j;
  }

  // The served weights version (-1 when the server does not answer).
  int64_t Version() const {
    json j = Info();
    return j.is_object() ? std::stoll(j.value("weights_version", std::string("-1"))) : -1;
  }

  std::string Metrics() const { return HttpGet(metrics_port, "/metrics").value_or(""); }
  std::string Log() const { return proc ? proc->Log() : ""; }
};

// Greedy output of `strata generate` (text on stdout, the route line on stderr).
CommandResult Greedy(const Server& s, const std::string& route, const std::string& prompt) {
  return s.Cli(
      {"generate", "--prompt", prompt, "--route", route, "--max-tokens", "16", "--temperature", "0"});
}

std::string TaskJob(const Server& trainer, const std::string& task, const std::string& train,
                    const std::string& eval) {
  CommandResult r = trainer.Cli(
      {"submit", "--task", task, train, "--eval", eval, "--steps", "8", "--batch-size", "8", "--wait"});
  EXPECT_EQ(r.exit_code, 0) << r.err << r.out << trainer.Log();
  return r.out;
}

// Waits until every replica serves `version`; returns the seconds it took (or -1).
double WaitForVersion(const std::vector<const Server*>& replicas, int64_t version, double timeout_seconds) {
  const auto t0 = Clock::now();
  bool all = WaitUntil(
      [&] {
        for (const Server* r : replicas) {
          if (r->Version() != version) return false;
        }
        return true;
      },
      timeout_seconds);
  return all ? Seconds(t0) : -1;
}

// Replicas swap in every version the trainer serves (publish and rollback), answer exactly as the
// trainer does, refuse adaptation naming the trainer, catch up after their own restart and keep
// serving when the trainer is gone (then follow it again when it is back).
TEST(Replica, FollowsTheTrainerCatchesUpAndOutlivesIt) {
  Server trainer({"--keep_versions=3"});
  trainer.Start();
  const std::vector<std::string> follow = {"--role=replica", "--follow=" + trainer.addr(),
                                           "--follow_max_backoff_seconds=2"};
  Server r1(follow), r2(follow);
  r1.Start(/*wait=*/false);
  r2.Start(/*wait=*/false);
  // Ready once they serve the trainer's version 1 (its empty state).
  ASSERT_TRUE(WaitForServing(r1.grpc_port, 90, r1.proc.get())) << r1.Log();
  ASSERT_TRUE(WaitForServing(r2.grpc_port, 90, r2.proc.get())) << r2.Log();
  EXPECT_EQ(r1.Version(), trainer.Version());
  json info = r1.Info();
  EXPECT_EQ(info["role"], "replica") << info.dump();
  EXPECT_EQ(info["replica"]["trainer"], trainer.addr()) << info.dump();
  EXPECT_EQ(trainer.Info()["role"], "trainer");

  // Adaptation goes to the trainer: refused, naming it.
  const std::string cap_eval =
      HeadLines(ClSmall("capitals/test.jsonl"), 16, trainer.dir.path() + "/cap.jsonl");
  const std::string iso_eval = HeadLines(ClSmall("iso3/test.jsonl"), 16, trainer.dir.path() + "/iso.jsonl");
  CommandResult refused = r1.Cli({"submit", "--task", "capitals", ClSmall("capitals/train.jsonl")});
  EXPECT_EQ(refused.exit_code, 1) << refused.err;
  EXPECT_NE(refused.err.find("FAILED_PRECONDITION"), std::string::npos) << refused.err;
  EXPECT_NE(refused.err.find(trainer.addr()), std::string::npos) << refused.err;
  for (const std::vector<std::string>& cmd : {std::vector<std::string>{"tasks"},
                                              {"jobs"},
                                              {"versions"},
                                              {"rollback"},
                                              {"promote", "2"},
                                              {"export", "--state", "x"},
                                              {"import", "x"}}) {
    CommandResult r = r2.Cli(cmd);
    EXPECT_EQ(r.exit_code, 1) << cmd[0] << ": " << r.err;
    EXPECT_NE(r.err.find("FAILED_PRECONDITION"), std::string::npos) << cmd[0] << ": " << r.err;
    EXPECT_NE(r.err.find(trainer.addr()), std::string::npos) << cmd[0] << ": " << r.err;
  }
  EXPECT_EQ(r1.Cli({"health", "--service", "strata.v1.AdaptationService"}).out, "NOT_SERVING\n");
  EXPECT_EQ(r1.Cli({"health", "--service", "strata.v1.InferenceService"}).out, "SERVING\n");

  // A task learned on the trainer reaches both replicas; greedy output is the trainer's.
  TaskJob(trainer, "capitals", ClSmall("capitals/train.jsonl"), cap_eval);
  const int64_t v2 = trainer.Version();
  ASSERT_GE(v2, 2);
  const double propagation = WaitForVersion({&r1, &r2}, v2, 60);
  ASSERT_GE(propagation, 0) << r1.Log() << r2.Log();
  std::printf("[ measured ] version %lld on both replicas %.2f s after the trainer's job succeeded\n",
              static_cast<long long>(v2), propagation);
  EXPECT_LT(propagation, 20) << "propagation bound";
  const std::string prompt = "The capital of France is";
  CommandResult expected = Greedy(trainer, "capitals", prompt);
  ASSERT_EQ(expected.exit_code, 0) << expected.err;
  for (const Server* r : {&r1, &r2}) {
    CommandResult got = Greedy(*r, "capitals", prompt);
    ASSERT_EQ(got.exit_code, 0) << got.err;
    EXPECT_EQ(got.out, expected.out);
    EXPECT_NE(got.err.find("weights version " + std::to_string(v2)), std::string::npos) << got.err;
    CommandResult auto_route =
        r->Cli({"generate", "--prompt", prompt, "--max-tokens", "8", "--temperature", "0"});
    EXPECT_EQ(auto_route.out,
              trainer.Cli({"generate", "--prompt", prompt, "--max-tokens", "8", "--temperature", "0"}).out);
  }
  std::string metrics = r1.Metrics();
  EXPECT_EQ(MetricValue(metrics, "strata_weights_version"), static_cast<double>(v2)) << metrics;
  EXPECT_EQ(MetricValue(metrics, "strata_replica_lag_versions"), 0) << metrics;
  EXPECT_EQ(MetricValue(metrics, "strata_replica_connected"), 1) << metrics;
  EXPECT_EQ(MetricValue(metrics, "strata_replica_trainer_version"), static_cast<double>(v2)) << metrics;
  EXPECT_EQ(r1.Cli({"export", "weights-on-replica"}).exit_code, 0);

  // A replica killed mid-way (while the trainer learns the next task) serves its last version at
  // once after its restart, then catches up.
  std::thread second([&] { TaskJob(trainer, "iso3", ClSmall("iso3/train.jsonl"), iso_eval); });
  r2.proc->Stop(SIGKILL, 10);
  second.join();
  const int64_t v3 = trainer.Version();
  ASSERT_GT(v3, v2);
  r2.Start();
  EXPECT_GE(r2.Version(), v2);
  ASSERT_GE(WaitForVersion({&r1, &r2}, v3, 60), 0) << r2.Log();
  CommandResult iso_expected = Greedy(trainer, "iso3", "The ISO code of Germany is");
  EXPECT_EQ(Greedy(r2, "iso3", "The ISO code of Germany is").out, iso_expected.out);
  EXPECT_EQ(Greedy(r2, "capitals", prompt).out, expected.out);

  // A rollback on the trainer is followed too.
  CommandResult rollback = trainer.Cli({"rollback"});
  ASSERT_EQ(rollback.exit_code, 0) << rollback.err;
  ASSERT_EQ(trainer.Version(), v2);
  ASSERT_GE(WaitForVersion({&r1, &r2}, v2, 60), 0) << r1.Log();
  EXPECT_EQ(Greedy(r1, "capitals", prompt).out, expected.out);
  EXPECT_EQ(r1.Cli({"generate", "--prompt", prompt, "--route", "iso3"}).exit_code, 1)
      << "iso3 was rolled back";

  // The trainer goes away: replicas keep serving their version and stay ready.
  trainer.proc->Stop(SIGKILL, 10);
  ASSERT_TRUE(WaitUntil([&] { return MetricValue(r1.Metrics(), "strata_replica_connected") == 0; }, 30))
      << r1.Metrics();
  for (const Server* r : {&r1, &r2}) {
    EXPECT_EQ(r->Cli({"health"}).out, "SERVING\n");
    CommandResult got = Greedy(*r, "capitals", prompt);
    EXPECT_EQ(got.exit_code, 0) << got.err;
    EXPECT_EQ(got.out, expected.out);
    EXPECT_EQ(r->Version(), v2);
  }
  EXPECT_EQ(r1.Info()["replica"]["connected"], false);
  EXPECT_TRUE(WaitUntil([&] { return r1.Log().find("reconnecting in") != std::string::npos; }, 10))
      << r1.Log();
  // ... and follow it again once it is back (with its state directory).
  trainer.Start();
  EXPECT_TRUE(WaitUntil([&] { return MetricValue(r2.Metrics(), "strata_replica_connected") == 1; }, 30))
      << r2.Log();
  EXPECT_EQ(r2.Version(), v2);
  EXPECT_EQ(r1.proc->Stop(SIGTERM), 0);
  EXPECT_EQ(r2.proc->Stop(SIGTERM), 0);
}

// A replica must run the trainer's base model: another one is refused (not ready, logged with
// both names). The replication RPCs need the trainer's bearer token; the replica presents it from
// --follow_token_file, over TLS with --follow_tls_ca.
TEST(Replica, RefusesAnotherBaseModelAndUsesTheTrainersTokenAndTls) {
  TempDir keys;
  WriteFile(keys.path() + "/token", "s3cret-token\n");
  const bool tls = std::filesystem::exists("/usr/bin/openssl");
  std::vector<std::string> trainer_flags = {"--auth_token_file=" + keys.path() + "/token"};
  std::vector<std::string> follow_tls;
  std::string cert;
  if (tls) {
    CommandResult made =
        RunCommand({"/usr/bin/openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", keys.path() + "/key.pem", "-out", keys.path() + "/cert.pem"},
                   60);
    ASSERT_EQ(made.exit_code, 0) << made.err;
    cert = keys.path() + "/cert.pem";
    trainer_flags.push_back("--tls_cert=" + cert);
    trainer_flags.push_back("--tls_key=" + keys.path() + "/key.pem");
    follow_tls.push_back("--follow_tls_ca=" + cert);
  }
  Server trainer(trainer_flags);
  if (tls) trainer.cli_flags = {"--tls-ca", cert};
  trainer.Start(/*wait=*/false);
  ASSERT_TRUE(WaitUntil(
      [&] {
        return trainer.Cli({"--timeout", "1", "health"}).exit_code == 0;
      },
      90))
      << trainer.Log();

  // The RPCs need the token.
  {
    auto creds = tls ? grpc::SslCredentials(grpc::SslCredentialsOptions{[&] {
                                                                          std::ifstream in(cert);
                                                                          std::stringstream ss;
                                                                          ss << in.rdbuf();
                                                                          return ss.str();
                                                                        }(),
                                                                        "", ""})
                     : grpc::InsecureChannelCredentials();
    auto stub = pb::ReplicationService::NewStub(grpc::CreateChannel(trainer.addr(), creds));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    auto reader = stub->WatchVersions(&ctx, pb::WatchVersionsRequest());
    pb::PublishedVersion v;
    EXPECT_FALSE(reader->Read(&v));
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::UNAUTHENTICATED);
    grpc::ClientContext ctx2;
    ctx2.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    ctx2.AddMetadata("authorization", "Bearer s3cret-token");
    pb::DownloadVersionRequest req;
    req.set_version(1);
    auto download = stub->DownloadVersion(&ctx2, req);
    pb::StateChunk chunk;
    int64_t bytes = 0;
    std::vector<std::string> files;
    while (download->Read(&chunk)) {
      if (files.empty() || files.back() != chunk.file()) files.push_back(chunk.file());
      bytes += static_cast<int64_t>(chunk.data().size());
    }
    EXPECT_TRUE(download->Finish().ok());
    EXPECT_EQ(files, (std::vector<std::string>{"method.safetensors", "state.json"}));
    EXPECT_GT(bytes, 0);
  }

  std::vector<std::string> good_flags = {"--role=replica", "--follow=" + trainer.addr(),
                                         "--follow_token_file=" + keys.path() + "/token"};
  good_flags.insert(good_flags.end(), follow_tls.begin(), follow_tls.end());
  Server good(good_flags);
  good.Start();
  EXPECT_EQ(good.Version(), 1);

  std::vector<std::string> no_token_flags = {"--role=replica", "--follow=" + trainer.addr(),
                                             "--follow_max_backoff_seconds=1"};
  no_token_flags.insert(no_token_flags.end(), follow_tls.begin(), follow_tls.end());
  Server no_token(no_token_flags);
  no_token.Start(/*wait=*/false);
  EXPECT_TRUE(WaitUntil(
      [&] {
        return no_token.Log().find("UNAUTHENTICATED") != std::string::npos ||
               no_token.Log().find("bearer token") != std::string::npos;
      },
      60))
      << no_token.Log();
  EXPECT_EQ(no_token.Cli({"health"}).out, "NOT_SERVING\n");

  std::vector<std::string> other_flags = good_flags;
  other_flags.push_back("--model=");  // the embedded default model, not the trainer's
  Server other(other_flags);
  other.Start(/*wait=*/false);
  EXPECT_TRUE(WaitUntil([&] { return other.Log().find("serves base model") != std::string::npos; }, 60))
      << other.Log();
  // The server names the model by its absolute, lexically normal path (the shared dir may be ../shared).
  EXPECT_NE(other.Log().find(std::filesystem::absolute(Model()).lexically_normal().string()),
            std::string::npos)
      << other.Log();
  EXPECT_EQ(other.Cli({"health"}).out, "NOT_SERVING\n");
  json info = other.Info();
  EXPECT_NE(info["replica"]["last_error"].get<std::string>().find("--model"), std::string::npos)
      << info.dump();

  // Flags a replica needs, checked at start.
  CommandResult bad =
      RunCommand({BinaryPath("strata-server"), "--role=replica", "--metrics_port=0", "--http_port=0"});
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.err.find("--follow"), std::string::npos) << bad.err;
  bad =
      RunCommand({BinaryPath("strata-server"), "--follow=127.0.0.1:1", "--metrics_port=0", "--http_port=0"});
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.err.find("--role=replica"), std::string::npos) << bad.err;
}

// Data-parallel adaptation with the real binaries: rank 0 (the trainer) and rank 1 (a replica of
// it) meet through a c10d FileStore (nothing listens but Gloo's loopback connections), train every
// step of a task together, and rank 1 then serves the version rank 0 published. A rank killed
// mid-task costs rank 0 nothing but speed; restarted, it joins the next task.
TEST(DataParallel, TwoServerRanksLearnTasksTogetherAndSurviveALostRank) {
  Server trainer;
  const std::string store = trainer.dir.path() + "/dp-store";
  trainer.flags = {"--world_size=2", "--dist_rank=0", "--dist_init=file://" + store,
                   "--dist_join_timeout_seconds=20"};
  trainer.Start();
  Server r1({"--role=replica", "--follow=" + trainer.addr(), "--follow_max_backoff_seconds=2",
             "--world_size=2", "--dist_rank=1", "--dist_init=file://" + store});
  r1.Start();
  ASSERT_TRUE(WaitUntil([&] { return r1.Log().find("follows rank 0's tasks") != std::string::npos; }, 30))
      << r1.Log();

  const std::string cap_eval =
      HeadLines(ClSmall("capitals/test.jsonl"), 16, trainer.dir.path() + "/cap.jsonl");
  TaskJob(trainer, "capitals", ClSmall("capitals/train.jsonl"), cap_eval);
  EXPECT_NE(trainer.Log().find("task 'capitals': data-parallel over 2 of 2 ranks"), std::string::npos)
      << trainer.Log();
  EXPECT_NE(trainer.Log().find("(8 over 2 data-parallel ranks)"), std::string::npos) << trainer.Log();
  ASSERT_TRUE(WaitUntil(
      [&] {
        return r1.Log().find("task 'capitals': trained 8 data-parallel steps as rank 1 of 2") !=
               std::string::npos;
      },
      30))
      << r1.Log();
  const int64_t v2 = trainer.Version();
  ASSERT_GE(WaitForVersion({&r1}, v2, 60), 0) << r1.Log();
  const std::string prompt = "The capital of France is";
  CommandResult expected = Greedy(trainer, "capitals", prompt);
  ASSERT_EQ(expected.exit_code, 0) << expected.err;
  EXPECT_EQ(Greedy(r1, "capitals", prompt).out, expected.out);
  std::string metrics = trainer.Metrics();
  EXPECT_EQ(MetricValue(metrics, "strata_data_parallel_world_size"), 2) << metrics;
  EXPECT_EQ(MetricValue(metrics, "strata_data_parallel_last_task_ranks"), 2) << metrics;
  EXPECT_EQ(MetricValue(metrics, "strata_data_parallel_steps_total"), 8) << metrics;
  metrics = r1.Metrics();
  EXPECT_EQ(MetricValue(metrics, "strata_data_parallel_rank"), 1) << metrics;
  EXPECT_EQ(MetricValue(metrics, "strata_data_parallel_tasks_total"), 1) << metrics;

  // Rank 1 dies during the next task: rank 0 recomputes that step alone and finishes the task.
  const std::string iso_eval = HeadLines(ClSmall("iso3/test.jsonl"), 16, trainer.dir.path() + "/iso.jsonl");
  std::thread second([&] {
    CommandResult r = trainer.Cli({"submit", "--task", "iso3", ClSmall("iso3/train.jsonl"), "--eval",
                                   iso_eval, "--steps", "300", "--batch-size", "8", "--wait"});
    EXPECT_EQ(r.exit_code, 0) << r.err << r.out;
  });
  // Killed once it has trained 50 of the 300 steps (its first progress line).
  ASSERT_TRUE(WaitUntil(
      [&] {
        return r1.Log().find("task 'iso3' (data-parallel rank 1 of 2): step 50/300") != std::string::npos;
      },
      120))
      << r1.Log();
  r1.proc->Stop(SIGKILL, 10);
  second.join();
  EXPECT_NE(trainer.Log().find("task 'iso3': data-parallel group lost"), std::string::npos) << trainer.Log();
  EXPECT_EQ(MetricValue(trainer.Metrics(), "strata_data_parallel_groups_lost_total"), 1) << trainer.Metrics();
  const int64_t v3 = trainer.Version();
  ASSERT_GT(v3, v2);

  // Restarted, rank 1 catches up with the published version and joins the next task.
  r1.Start();
  ASSERT_GE(WaitForVersion({&r1}, v3, 60), 0) << r1.Log();
  const std::string dom_eval =
      HeadLines(ClSmall("domains/test.jsonl"), 16, trainer.dir.path() + "/dom.jsonl");
  TaskJob(trainer, "domains", ClSmall("domains/train.jsonl"), dom_eval);
  ASSERT_TRUE(WaitUntil(
      [&] {
        return r1.Log().find("task 'domains': trained 8 data-parallel steps as rank 1 of 2") !=
               std::string::npos;
      },
      30))
      << r1.Log();
  ASSERT_GE(WaitForVersion({&r1}, trainer.Version(), 60), 0) << r1.Log();
  EXPECT_EQ(Greedy(r1, "domains", "The internet domain .fr belongs to").out,
            Greedy(trainer, "domains", "The internet domain .fr belongs to").out);
  EXPECT_EQ(r1.proc->Stop(SIGTERM), 0) << r1.Log();
  EXPECT_EQ(trainer.proc->Stop(SIGTERM), 0);

  // The roles the ranks need, checked at start.
  CommandResult bad = RunCommand({BinaryPath("strata-server"), "--world_size=2", "--dist_rank=1",
                                  "--dist_init=file://" + store, "--metrics_port=0", "--http_port=0"});
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.err.find("ranks other than 0 must be --role=replica"), std::string::npos) << bad.err;
  bad = RunCommand({BinaryPath("strata-server"), "--world_size=2", "--dist_rank=0", "--dist_init=tcp://h",
                    "--metrics_port=0", "--http_port=0"});
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.err.find("--dist_init: expected tcp://HOST:PORT"), std::string::npos) << bad.err;
}

}  // namespace
}  // namespace strata::testing
