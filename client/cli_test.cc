// The CLI binaries as users run them: `strata` is torch-free and hands the offline commands to
// strata-offline with the same argv; --help lists every command; the environment twins of
// --server and --auth-token-file, the flag winning. (Commands against a real server:
// tests/integration.)

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "tests/test_util.h"

namespace strata::testing {
namespace {

std::string Offline() { return BinaryPath("strata-offline"); }
std::string Stories() { return SharedPath("models/stories260K"); }

// The shared libraries the dynamic loader maps for `binary` (what ldd prints), without running it.
std::string LoadedLibraries(const std::string& binary) {
  CommandResult r = RunCommand({binary}, 60, {{"LD_TRACE_LOADED_OBJECTS", "1"}});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.out;
}

TEST(Cli, StrataLoadsNoLibTorchAndStrataOfflineDoes) {
  const std::string light = LoadedLibraries(BinaryPath("strata"));
  EXPECT_NE(light.find("libgrpc++"), std::string::npos) << light;
  EXPECT_EQ(light.find("libtorch"), std::string::npos) << light;
  EXPECT_EQ(light.find("libc10"), std::string::npos) << light;
  const std::string offline = LoadedLibraries(Offline());
  EXPECT_NE(offline.find("libtorch"), std::string::npos) << offline;
}

TEST(Cli, HelpListsEveryCommandAndTheEnvironmentTwins) {
  CommandResult help = RunCommand({BinaryPath("strata"), "--help"});
  ASSERT_EQ(help.exit_code, 0) << help.err;
  for (const char* command :
       {"health", "info", "tokenize", "generate", "score", "submit", "jobs", "watch", "cancel", "tasks",
        "report", "versions", "promote", "rollback", "export", "import", "bench"}) {
    EXPECT_NE(help.out.find(std::string("\n  ") + command + " "), std::string::npos) << command << help.out;
  }
  for (const char* text : {"STRATA_SERVER", "STRATA_AUTH_TOKEN_FILE", "Exit codes: 0 ok"}) {
    EXPECT_NE(help.out.find(text), std::string::npos) << text << help.out;
  }
  // A subcommand's help: its own options (the offline ones too) and the global ones in the footer.
  CommandResult generate = RunCommand({BinaryPath("strata"), "generate", "--help"});
  ASSERT_EQ(generate.exit_code, 0) << generate.err;
  for (const char* text :
       {"--model", "--threads", "--route", "env STRATA_SERVER", "env STRATA_AUTH_TOKEN_FILE"}) {
    EXPECT_NE(generate.out.find(text), std::string::npos) << text << generate.out;
  }
  // `bench --help` comes from strata-offline: the benchmarks and their options.
  CommandResult bench = RunCommand({BinaryPath("strata"), "bench", "--help"});
  ASSERT_EQ(bench.exit_code, 0) << bench.err;
  for (const char* sub : {"cl", "train", "memory", "serve"}) {
    EXPECT_NE(bench.out.find(std::string("\n  ") + sub + " "), std::string::npos) << sub << bench.out;
  }
  CommandResult memory_help = RunCommand({BinaryPath("strata"), "bench", "memory", "--help"});
  ASSERT_EQ(memory_help.exit_code, 0) << memory_help.err;
  EXPECT_NE(memory_help.out.find("--config"), std::string::npos) << memory_help.out;
}

// The offline commands give through `strata` exactly what strata-offline gives: output and exit code.
TEST(Cli, OfflineCommandsRunThroughStrataOffline) {
  auto both = [](const std::vector<std::string>& args) {
    std::vector<std::string> light = {BinaryPath("strata")};
    std::vector<std::string> offline = {Offline()};
    light.insert(light.end(), args.begin(), args.end());
    offline.insert(offline.end(), args.begin(), args.end());
    return std::make_pair(RunCommand(light), RunCommand(offline));
  };
  auto [plan, plan_offline] =
      both({"bench", "memory", "--config", "110m", "--device", "cpu", "--tasks", "4"});
  ASSERT_EQ(plan.exit_code, 0) << plan.err;
  EXPECT_NE(plan.out.find("110m"), std::string::npos) << plan.out;
  EXPECT_EQ(plan.out, plan_offline.out);

  auto [tokens, tokens_offline] = both({"tokenize", "--model", Stories(), "--text", "Once upon a time"});
  ASSERT_EQ(tokens.exit_code, 0) << tokens.err;
  EXPECT_EQ(tokens.out.rfind("1 ", 0), 0u) << tokens.out;  // BOS first
  EXPECT_EQ(tokens.out, tokens_offline.out);

  auto [json_tokens, unused] =
      both({"--json", "tokenize", "--model", Stories(), "--text", "Once", "--no-special"});
  ASSERT_EQ(json_tokens.exit_code, 0) << json_tokens.err;
  EXPECT_EQ(json_tokens.out.rfind("{\"ids\":[", 0), 0u) << json_tokens.out;

  auto [gen, gen_offline] = both({"generate", "--model", Stories(), "--prompt", "Once upon a time",
                                  "--max-tokens", "8", "--threads", "1"});
  ASSERT_EQ(gen.exit_code, 0) << gen.err;
  EXPECT_GT(gen.out.size(), 1u);
  EXPECT_EQ(gen.out, gen_offline.out);

  // Their errors and exit codes too.
  auto [bad, bad_offline] = both({"bench", "memory", "--config", "no-such-model"});
  EXPECT_EQ(bad.exit_code, 2) << bad.err;
  EXPECT_EQ(bad.exit_code, bad_offline.exit_code);
  EXPECT_NE(bad.err.find("no-such-model"), std::string::npos) << bad.err;
  auto [no_sub, no_sub_offline] = both({"bench"});
  EXPECT_EQ(no_sub.exit_code, 2) << no_sub.err;
  EXPECT_EQ(no_sub.err, no_sub_offline.err);
  auto [task, task_offline] = both({"generate", "--model", Stories(), "--prompt", "x", "--task", "t"});
  EXPECT_EQ(task.exit_code, 2) << task.err;
  EXPECT_NE(task.err.find("--task needs the server"), std::string::npos) << task.err;
}

// Without strata-offline beside it, strata still serves the server commands and says what is
// missing for the offline ones.
TEST(Cli, MissingStrataOfflineIsAUsageErrorNamingIt) {
  TempDir dir;
  const std::string lone = dir.path() + "/strata";
  std::filesystem::copy_file(BinaryPath("strata"), lone);
  std::filesystem::permissions(lone, std::filesystem::perms::owner_exec, std::filesystem::perm_options::add);
  EXPECT_EQ(RunCommand({lone, "--help"}).exit_code, 0);
  CommandResult r = RunCommand({lone, "tokenize", "--model", Stories(), "--text", "x"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find(dir.path() + "/strata-offline"), std::string::npos) << r.err;
  EXPECT_EQ(RunCommand({lone, "bench", "memory"}).exit_code, 2);
  const int port = FreePort();
  CommandResult health =
      RunCommand({lone, "--server", "127.0.0.1:" + std::to_string(port), "--timeout", "1", "health"});
  EXPECT_EQ(health.exit_code, 3) << health.err;
}

// STRATA_SERVER and STRATA_AUTH_TOKEN_FILE stand for the flags; a flag given wins.
TEST(Cli, EnvironmentTwinsAndTheFlagWins) {
  const std::string from_env = "127.0.0.1:" + std::to_string(FreePort());
  const std::string from_flag = "127.0.0.1:" + std::to_string(FreePort());
  CommandResult env_only =
      RunCommand({BinaryPath("strata"), "--timeout", "1", "health"}, 30, {{"STRATA_SERVER", from_env}});
  EXPECT_EQ(env_only.exit_code, 3);
  EXPECT_NE(env_only.err.find("cannot reach a server at " + from_env), std::string::npos) << env_only.err;
  CommandResult both = RunCommand({BinaryPath("strata"), "--timeout", "1", "health", "--server", from_flag},
                                  30, {{"STRATA_SERVER", from_env}});
  EXPECT_EQ(both.exit_code, 3);
  EXPECT_NE(both.err.find("cannot reach a server at " + from_flag), std::string::npos) << both.err;

  // The environment's token file is checked like the flag's (a missing file is a usage error).
  CommandResult missing =
      RunCommand({BinaryPath("strata"), "--server", from_flag, "--timeout", "1", "health"}, 30,
                 {{"STRATA_AUTH_TOKEN_FILE", "/nonexistent/token"}});
  EXPECT_EQ(missing.exit_code, 2);
  EXPECT_NE(missing.err.find("STRATA_AUTH_TOKEN_FILE: File does not exist: /nonexistent/token"),
            std::string::npos)
      << missing.err;
  // ... but not before --help, which always works.
  CommandResult help =
      RunCommand({BinaryPath("strata"), "--help"}, 30, {{"STRATA_AUTH_TOKEN_FILE", "/nonexistent/token"}});
  EXPECT_EQ(help.exit_code, 0) << help.err;
  TempDir dir;
  const std::string token = dir.path() + "/token";
  { std::ofstream(token) << "t\n"; }
  CommandResult flag_wins = RunCommand(
      {BinaryPath("strata"), "--server", from_flag, "--timeout", "1", "--auth-token-file", token, "health"},
      30, {{"STRATA_AUTH_TOKEN_FILE", "/nonexistent/token"}});
  EXPECT_EQ(flag_wins.exit_code, 3) << flag_wins.err;
}

}  // namespace
}  // namespace strata::testing
