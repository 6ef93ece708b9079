#include "client/cli_app.h"

#include <cstdlib>
#include <string>

namespace strata::cli {
namespace {

std::string GetEnv(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr ? "" : value;
}

}  // namespace

int RunCli(int argc, char** argv, const OfflineModes& offline) {
  CLI::App app{"strata: client for the Strata continual-adaptation server"};
  app.require_subcommand(1);
  app.fallthrough();
  GlobalOptions opts;
  // The environment twins are the options' defaults, so a flag given wins. (Not CLI11's envname:
  // it validates the variable before --help is handled, so a stale STRATA_AUTH_TOKEN_FILE would
  // break --help, and its errors name the flag instead of the variable.)
  const std::string server_env = GetEnv(kServerEnv);
  const std::string token_env = GetEnv(kAuthTokenFileEnv);
  if (!server_env.empty()) opts.server = server_env;
  if (!token_env.empty()) opts.auth_token_file = token_env;
  app.add_option("--server", opts.server, std::string("Server address host:port (env ") + kServerEnv + ")")
      ->capture_default_str();
  app.add_flag("--json", opts.json, "Machine-readable JSON output");
  app.add_option("--timeout", opts.timeout_seconds, "Seconds to wait for the server (connect and unary RPCs)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  CLI::Option* token_flag =
      app.add_option("--auth-token-file", opts.auth_token_file,
                     std::string("File holding the bearer token (env ") + kAuthTokenFileEnv + ")")
          ->check(CLI::ExistingFile);
  // A token file from the environment is checked like the flag's, once --help has had its turn.
  app.parse_complete_callback([token_flag, token_env] {
    if (token_flag->count() == 0 && !token_env.empty()) {
      if (std::string error = CLI::ExistingFile(token_env); !error.empty()) {
        throw CLI::ValidationError(kAuthTokenFileEnv, error);
      }
    }
  });
  app.add_option("--tls-ca", opts.tls_ca, "PEM root certificate(s): connect with TLS, trusting these")
      ->check(CLI::ExistingFile);
  app.add_option("--tls-server-name", opts.tls_server_name,
                 "With --tls-ca: the name the server certificate must carry (default: the --server host)");

  int exit_code = kExitOk;
  AddHealthCommand(app, opts, &exit_code);
  AddInfoCommand(app, opts, &exit_code);
  AddTokenizeCommand(app, opts, &exit_code, offline);
  AddGenerateCommand(app, opts, &exit_code, offline);
  AddScoreCommand(app, opts, &exit_code);
  AddAdaptationCommands(app, opts, &exit_code);
  AddAdminCommands(app, opts, &exit_code);
  // `strata bench cl|train|dp|memory|serve`: offline benchmarks (bench/), no server needed.
  CLI::App* bench = app.add_subcommand(
      "bench",
      "Benchmarks: continual learning (cl), training (train), data parallelism (dp), memory plan (memory), "
      "serving (serve)");
  offline.bench(bench, opts, &exit_code);
  const std::string environment = std::string("Environment: ") + kServerEnv + " stands for --server, " +
                                  kAuthTokenFileEnv +
                                  " for --auth-token-file\n(a flag given on the command line wins).\n";
  const std::string exit_codes =
      "Exit codes: 0 ok, 1 the server answered with an error, 2 usage error, 3 server unreachable.";
  app.footer(environment + exit_codes);
  // Global options may come before or after the subcommand (fallthrough); list them in every
  // subcommand's --help too.
  for (CLI::App* sub : app.get_subcommands({})) {
    sub->footer(
        "Global options (before or after the subcommand):\n"
        "  --server HOST:PORT          Server address (default 127.0.0.1:50051; env STRATA_SERVER)\n"
        "  --json                      Machine-readable JSON output\n"
        "  --timeout SECONDS           Wait for the server (connect and unary RPCs; default 10)\n"
        "  --auth-token-file FILE      File holding the bearer token (env STRATA_AUTH_TOKEN_FILE)\n"
        "  --tls-ca FILE               Connect with TLS, trusting these PEM roots\n"
        "  --tls-server-name NAME      Name the server certificate must carry\n" +
        environment + exit_codes);
  }

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return kExitUsage;
  }
  return exit_code;
}

}  // namespace strata::cli
