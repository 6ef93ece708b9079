// strata: the command-line client of a Strata server (and offline model tools).
//
// This binary is torch-free (gRPC, protobuf, CLI11), so that the server commands start in
// milliseconds. The commands that need LibTorch (`tokenize --model DIR`, `generate --model DIR`,
// `strata bench ...`) are parsed here like every other and then run by strata-offline, the
// sibling binary beside this one (same directory: the build tree's client/ or the install's bin/),
// which is exec'd with the same argv: same options, output and exit codes as if run here.
//
// Exit codes: 0 ok, 1 the server answered with an error, 2 usage error (also: strata-offline
// missing for an offline command), 3 server unreachable.

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <string>

#include "client/cli_app.h"

namespace {

using namespace strata::cli;

constexpr char kOfflineBinary[] = "strata-offline";

// Replaces this process with strata-offline on the same argv (argv[0] too: usage messages name
// the command as typed); returns only when that fails.
int ExecOffline(char** argv, const GlobalOptions& opts) {
  std::error_code ec;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  std::cout.flush();
  std::fflush(nullptr);
  std::string offline = kOfflineBinary;
  if (ec) {
    ::execvp(kOfflineBinary, argv);  // no /proc: the PATH
  } else {
    offline = (self.parent_path() / kOfflineBinary).string();
    ::execv(offline.c_str(), argv);
  }
  const int error = errno;
  return UsageError("this command runs in " + offline + ", which cannot be started (" + std::strerror(error) +
                        "); it is built and installed beside strata",
                    opts);
}

}  // namespace

int main(int argc, char** argv) {
  OfflineModes exec_offline;
  exec_offline.tokenize = [argv](const TokenizeArgs&, const GlobalOptions& opts) {
    return ExecOffline(argv, opts);
  };
  exec_offline.generate = [argv](const GenerateArgs&, const GlobalOptions& opts) {
    return ExecOffline(argv, opts);
  };
  // Everything after `bench` goes to strata-offline untouched (its --help included), so this binary
  // needs none of the benchmarks' options.
  exec_offline.bench = [argv](CLI::App* bench, const GlobalOptions& opts, int* exit_code) {
    bench->prefix_command();
    bench->set_help_flag();
    bench->fallthrough(false);
    bench->callback([argv, &opts, exit_code] { *exit_code = ExecOffline(argv, opts); });
  };
  return RunCli(argc, argv, exec_offline);
}
