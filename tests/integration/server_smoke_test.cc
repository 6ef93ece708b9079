// Runs the real strata-server and strata CLI on 127.0.0.1 (foundation behaviour).

#include <gtest/gtest.h>
#include <signal.h>

#include <fstream>
#include <sstream>
#include <string>

#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace strata::testing {
namespace {

struct RunningServer {
  TempDir dir;
  int grpc_port = FreePort();
  int metrics_port = FreePort();
  std::unique_ptr<Subprocess> proc;

  std::string addr() const { return "127.0.0.1:" + std::to_string(grpc_port); }

  void Start(std::vector<std::string> extra = {}, std::map<std::string, std::string> env = {}) {
    std::vector<std::string> argv = {BinaryPath("strata-server"),
                                     "--grpc_port=" + std::to_string(grpc_port),
                                     "--metrics_port=" + std::to_string(metrics_port),
                                     "--http_port=0",
                                     "--state_dir=" + dir.path() + "/state",
                                     "--threads=1"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    proc = std::make_unique<Subprocess>(argv, dir.path() + "/server.log", env);
  }
};

TEST(ServerSmoke, HealthInfoMetricsAndCleanShutdown) {
  RunningServer s;
  s.Start();
  ASSERT_TRUE(WaitForServing(s.grpc_port, 60, s.proc.get())) << s.proc->Log();

  auto health = RunCommand({BinaryPath("strata"), "health", "--server", s.addr()});
  EXPECT_EQ(health.exit_code, 0) << health.err;
  EXPECT_EQ(health.out, "SERVING\n");

  auto health_json = RunCommand({BinaryPath("strata"), "health", "--server", s.addr(), "--json"});
  ASSERT_EQ(health_json.exit_code, 0) << health_json.err;
  EXPECT_EQ(nlohmann::json::parse(health_json.out)["status"], "SERVING");

  // STRATA_SERVER stands for --server; a --server given wins.
  auto from_env = RunCommand({BinaryPath("strata"), "health"}, 30, {{"STRATA_SERVER", s.addr()}});
  EXPECT_EQ(from_env.exit_code, 0) << from_env.err;
  EXPECT_EQ(from_env.out, "SERVING\n");
  auto flag_wins = RunCommand({BinaryPath("strata"), "--server", "127.0.0.1:" + std::to_string(FreePort()),
                               "--timeout", "1", "health"},
                              30, {{"STRATA_SERVER", s.addr()}});
  EXPECT_EQ(flag_wins.exit_code, 3) << flag_wins.err;

  auto svc = RunCommand(
      {BinaryPath("strata"), "health", "--server", s.addr(), "--service", "strata.v1.AdminService"});
  EXPECT_EQ(svc.exit_code, 0) << svc.err;
  EXPECT_EQ(svc.out, "SERVING\n");

  auto info = RunCommand({BinaryPath("strata"), "info", "--server", s.addr(), "--json"});
  ASSERT_EQ(info.exit_code, 0) << info.err;
  auto j = nlohmann::json::parse(info.out);
  EXPECT_EQ(j["version"], "0.1.0");
  EXPECT_EQ(j["device"], "cpu");
  EXPECT_EQ(j["training_threads"], 1);
  EXPECT_NE(j["blas"].get<std::string>().find("blas"), std::string::npos) << j["blas"];
  EXPECT_TRUE(j["model"]["loaded"].get<bool>());
  EXPECT_EQ(j["model"]["name"], "embedded-default");
  EXPECT_EQ(j["model"]["architecture"], "LlamaForCausalLM");
  EXPECT_GT(std::stoll(j["model"]["parameter_count"].get<std::string>()), 10000);
  EXPECT_GE(j["uptime_seconds"].get<double>(), 0.0);

  auto table = RunCommand({BinaryPath("strata"), "info", "--server", s.addr()});
  ASSERT_EQ(table.exit_code, 0) << table.err;
  EXPECT_NE(table.out.find("embedded-default"), std::string::npos) << table.out;
  EXPECT_NE(table.out.find("parameters"), std::string::npos) << table.out;

  int http_status = 0;
  auto metrics = HttpGet(s.metrics_port, "/metrics", &http_status);
  ASSERT_TRUE(metrics.has_value());
  EXPECT_EQ(http_status, 200);
  for (const char* name :
       {"strata_build_info{", "process_cpu_seconds_total", "process_resident_memory_bytes",
        "process_start_time_seconds", "strata_uptime_seconds",
        "strata_rpc_requests_total{code=\"OK\",method=\"/strata.v1.AdminService/GetServerInfo\"}",
        "strata_rpc_duration_seconds_bucket"}) {
    EXPECT_NE(metrics->find(name), std::string::npos) << name << " missing from:\n" << *metrics;
  }

  EXPECT_EQ(s.proc->Stop(SIGTERM), 0) << s.proc->Log();
  EXPECT_NE(s.proc->Log().find("shutdown complete"), std::string::npos) << s.proc->Log();
}

TEST(ServerSmoke, RealModelAndJsonLogs) {
  RunningServer s;
  s.Start({"--model=" + SharedPath("models/stories260K"), "--log_format=json"});
  ASSERT_TRUE(WaitForServing(s.grpc_port, 60, s.proc.get())) << s.proc->Log();
  auto info = RunCommand({BinaryPath("strata"), "info", "--server", s.addr(), "--json"});
  ASSERT_EQ(info.exit_code, 0) << info.err;
  auto j = nlohmann::json::parse(info.out);
  EXPECT_EQ(j["model"]["name"], "stories260K");
  EXPECT_EQ(j["model"]["hidden_size"], 64);
  EXPECT_EQ(j["model"]["num_layers"], 5);
  EXPECT_EQ(j["model"]["vocab_size"], 512);
  ASSERT_EQ(s.proc->Stop(SIGINT), 0);
  std::istringstream log(s.proc->Log());
  std::string line;
  int lines = 0;
  while (std::getline(log, line)) {
    if (line.empty()) continue;
    auto parsed = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    ASSERT_FALSE(parsed.is_discarded()) << "not JSON: " << line;
    EXPECT_TRUE(parsed.contains("msg") && parsed.contains("level") && parsed.contains("ts")) << line;
    ++lines;
  }
  EXPECT_GT(lines, 3);
}

TEST(ServerSmoke, EnvironmentTwinSetsThePort) {
  RunningServer s;
  int env_port = FreePort();
  std::vector<std::string> argv = {BinaryPath("strata-server"), "--metrics_port=0", "--http_port=0",
                                   "--state_dir=" + s.dir.path() + "/state", "--threads=1"};
  Subprocess proc(argv, s.dir.path() + "/server.log", {{"STRATA_GRPC_PORT", std::to_string(env_port)}});
  ASSERT_TRUE(WaitForServing(env_port, 60, &proc)) << proc.Log();
  EXPECT_EQ(proc.Stop(SIGTERM), 0);
}

TEST(ServerSmoke, BadFlagsFailAtStartWithClearMessages) {
  TempDir dir;
  auto unknown = RunCommand({BinaryPath("strata-server"), "--no_such_flag=1"});
  EXPECT_NE(unknown.exit_code, 0);
  EXPECT_NE(unknown.err.find("no_such_flag"), std::string::npos) << unknown.err;

  auto bad_port = RunCommand({BinaryPath("strata-server"), "--grpc_port=70000"});
  EXPECT_EQ(bad_port.exit_code, 2);
  EXPECT_NE(bad_port.err.find("--grpc_port"), std::string::npos) << bad_port.err;

  auto not_int = RunCommand({BinaryPath("strata-server"), "--grpc_port=abc"});
  EXPECT_NE(not_int.exit_code, 0);
  EXPECT_NE(not_int.err.find("grpc_port"), std::string::npos) << not_int.err;

  auto bad_env = RunCommand({BinaryPath("strata-server")}, 30, {{"STRATA_METRICS_PORT", "lots"}});
  EXPECT_EQ(bad_env.exit_code, 2);
  EXPECT_NE(bad_env.err.find("STRATA_METRICS_PORT"), std::string::npos) << bad_env.err;

  // The method options are checked at start, each error naming its flag.
  for (const auto& [flag, want] : std::vector<std::pair<std::string, std::string>>{
           {"--method=nope", "--method: unknown method 'nope'"},
           {"--pm_epsilon=2", "--pm_epsilon:"},
           {"--phi=0", "--phi:"},
           {"--targets=", "--targets:"},
           {"--osft_rank=sometimes", "--osft_rank:"},
           {"--max_forgetting=lots", "--max_forgetting: expected a number or 'off'"},
           {"--max_forgetting=-0.1", "--max_forgetting: must be"},
           {"--min_task_score=2", "--min_task_score: must be"},
           {"--keep_versions=0", "--keep_versions: must be >= 1"}}) {
    auto bad = RunCommand({BinaryPath("strata-server"), flag});
    EXPECT_EQ(bad.exit_code, 2) << flag;
    EXPECT_NE(bad.err.find(want), std::string::npos) << flag << ": " << bad.err;
  }

  // Method options come from the method registry, with environment twins, and --help lists them.
  auto bad_option_env = RunCommand({BinaryPath("strata-server")}, 30, {{"STRATA_K_MAX", "0"}});
  EXPECT_EQ(bad_option_env.exit_code, 2);
  EXPECT_NE(bad_option_env.err.find("STRATA_K_MAX: must be finite and >= 1, got 0"), std::string::npos)
      << bad_option_env.err;
  auto help = RunCommand({BinaryPath("strata-server"), "--help"});
  EXPECT_NE(help.out.find("share_ella"), std::string::npos) << help.out;
  EXPECT_NE(help.out.find("--k_max=32"), std::string::npos) << help.out;
  EXPECT_NE(help.out.find("--pm_epsilon=0.1"), std::string::npos) << help.out;

  auto bad_device =
      RunCommand({BinaryPath("strata-server"), "--device=tpu", "--state_dir=" + dir.path(),
                  "--metrics_port=0", "--http_port=0", "--grpc_port=" + std::to_string(FreePort())});
  EXPECT_EQ(bad_device.exit_code, 2);
  EXPECT_NE(bad_device.err.find("tpu"), std::string::npos) << bad_device.err;

  // Unusable TLS material is named as such (gRPC alone only fails to bind, which read as "port in use").
  std::ofstream(dir.path() + "/cert.pem") << "not a certificate\n";
  std::ofstream(dir.path() + "/key.pem") << "not a key\n";
  auto bad_tls =
      RunCommand({BinaryPath("strata-server"), "--tls_cert=" + dir.path() + "/cert.pem",
                  "--tls_key=" + dir.path() + "/key.pem", "--state_dir=" + dir.path(), "--metrics_port=0",
                  "--http_port=0", "--grpc_port=" + std::to_string(FreePort())});
  EXPECT_EQ(bad_tls.exit_code, 2);
  EXPECT_NE(bad_tls.err.find("--tls_cert: " + dir.path() + "/cert.pem: no PEM certificate"),
            std::string::npos)
      << bad_tls.err;
  EXPECT_EQ(bad_tls.err.find("port in use"), std::string::npos) << bad_tls.err;

  auto bad_model =
      RunCommand({BinaryPath("strata-server"), "--model=" + dir.path() + "/nope", "--state_dir=" + dir.path(),
                  "--metrics_port=0", "--http_port=0", "--grpc_port=" + std::to_string(FreePort())});
  EXPECT_EQ(bad_model.exit_code, 2);
  EXPECT_NE(bad_model.err.find("nope"), std::string::npos) << bad_model.err;
}

TEST(ServerSmoke, PortInUseIsReported) {
  RunningServer first;
  first.Start();
  ASSERT_TRUE(WaitForServing(first.grpc_port, 60, first.proc.get())) << first.proc->Log();
  TempDir dir;
  auto second = RunCommand({BinaryPath("strata-server"), "--grpc_port=" + std::to_string(FreePort()),
                            "--metrics_port=" + std::to_string(first.metrics_port), "--http_port=0",
                            "--state_dir=" + dir.path(), "--threads=1"});
  EXPECT_EQ(second.exit_code, 2);
  EXPECT_NE(second.err.find(std::to_string(first.metrics_port)), std::string::npos) << second.err;

  // The gRPC port: refused too (not shared through SO_REUSEPORT).
  TempDir dir2;
  auto third = RunCommand({BinaryPath("strata-server"), "--grpc_port=" + std::to_string(first.grpc_port),
                           "--metrics_port=0", "--http_port=0", "--state_dir=" + dir2.path(), "--threads=1"});
  EXPECT_EQ(third.exit_code, 2) << third.err;
  EXPECT_NE(third.err.find("cannot listen for gRPC"), std::string::npos) << third.err;
}

TEST(Cli, ExitCodes) {
  int port = FreePort();
  auto unreachable = RunCommand(
      {BinaryPath("strata"), "health", "--server", "127.0.0.1:" + std::to_string(port), "--timeout", "1"});
  EXPECT_EQ(unreachable.exit_code, 3);
  EXPECT_NE(unreachable.err.find("cannot reach"), std::string::npos) << unreachable.err;

  auto usage = RunCommand({BinaryPath("strata"), "no-such-command"});
  EXPECT_EQ(usage.exit_code, 2);
  auto missing = RunCommand({BinaryPath("strata")});
  EXPECT_EQ(missing.exit_code, 2);
  auto help = RunCommand({BinaryPath("strata"), "--help"});
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_NE(help.out.find("health"), std::string::npos);
  auto sub_help = RunCommand({BinaryPath("strata"), "info", "--help"});
  EXPECT_EQ(sub_help.exit_code, 0);
  EXPECT_NE(sub_help.out.find("--server"), std::string::npos) << sub_help.out;
}

TEST(Cli, OfflineTokenizeAndGenerate) {
  const std::string model = SharedPath("models/stories260K");
  auto tok = RunCommand({BinaryPath("strata"), "tokenize", "--model", model, "--text", "Once upon a time"});
  ASSERT_EQ(tok.exit_code, 0) << tok.err;
  EXPECT_EQ(tok.out, "1 403 407 261 378\n");
  auto tok_json = RunCommand(
      {BinaryPath("strata"), "tokenize", "--model", model, "--text", "Once upon a time", "--json"});
  ASSERT_EQ(tok_json.exit_code, 0) << tok_json.err;
  EXPECT_EQ(nlohmann::json::parse(tok_json.out)["ids"], nlohmann::json({1, 403, 407, 261, 378}));

  auto gen = RunCommand({BinaryPath("strata"), "generate", "--model", model, "--prompt", "Once upon a time",
                         "--max-tokens", "16", "--temperature", "0", "--threads", "1"});
  ASSERT_EQ(gen.exit_code, 0) << gen.err;
  EXPECT_EQ(gen.out.rfind(", there was a little girl", 0), 0u) << gen.out;

  auto gen_json =
      RunCommand({BinaryPath("strata"), "generate", "--model", model, "--prompt", "Once upon a time",
                  "--max-tokens", "16", "--temperature", "0", "--json", "--threads", "1"});
  ASSERT_EQ(gen_json.exit_code, 0) << gen_json.err;
  auto j = nlohmann::json::parse(gen_json.out);
  EXPECT_EQ(j["ids"].size(), 16u);
  EXPECT_EQ(j["text"].get<std::string>().rfind(", there was", 0), 0u);
  EXPECT_GT(j["tokens_per_second"].get<double>(), 0.0);

  auto missing = RunCommand({BinaryPath("strata"), "generate", "--model", "/nonexistent", "--prompt", "x"});
  EXPECT_EQ(missing.exit_code, 2);
}

}  // namespace
}  // namespace strata::testing
