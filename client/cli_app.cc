#include "client/cli_app.h"

#include <string>

namespace strata::cli {

int RunCli(int argc, char** argv, const OfflineModes& offline) {
  CLI::App app{"strata: client for the Strata continual-adaptation server"};
  app.require_subcommand(1);
  app.fallthrough();
  GlobalOptions opts;
  app.add_option("--server", opts.server, "Server address host:port")
      ->capture_default_str()
      ->envname(kServerEnv);
  app.add_flag("--json", opts.json, "Machine-readable JSON output");
  app.add_option("--timeout", opts.timeout_seconds, "Seconds to wait for the server (connect and unary RPCs)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--auth-token-file", opts.auth_token_file, "File holding the bearer token")
      ->check(CLI::ExistingFile)
      ->envname(kAuthTokenFileEnv);
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
  // `strata bench cl|train|memory|serve`: offline benchmarks (bench/), no server needed.
  CLI::App* bench = app.add_subcommand(
      "bench",
      "Benchmarks: continual learning (cl), training (train), memory plan (memory), serving (serve)");
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
