// `strata health` and `strata info`.

#include <google/protobuf/util/json_util.h>

#include <iostream>

#include "absl/strings/str_format.h"
#include "client/commands.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "strata/v1/admin.grpc.pb.h"

namespace strata::cli {

void AddHealthCommand(CLI::App& app, GlobalOptions& opts, int* exit_code) {
  auto* cmd = app.add_subcommand("health", "Check the server's health (grpc.health.v1); exit 0 when SERVING");
  auto service = std::make_shared<std::string>();
  cmd->add_option("--service", *service, "Service name to check (default: the whole server)");
  cmd->callback([&opts, exit_code, service] {
    grpc::health::v1::HealthCheckRequest req;
    req.set_service(*service);
    auto resp_or = CallUnary<grpc::health::v1::Health, grpc::health::v1::HealthCheckResponse>(
        opts, exit_code, "health check",
        [&](auto& stub, grpc::ClientContext* ctx, grpc::health::v1::HealthCheckResponse* out) {
          return stub.Check(ctx, req, out);
        });
    if (!resp_or) return;
    const grpc::health::v1::HealthCheckResponse& resp = *resp_or;
    std::string status = grpc::health::v1::HealthCheckResponse::ServingStatus_Name(resp.status());
    if (opts.json) {
      std::cout << nlohmann::json{{"server", opts.server}, {"service", *service}, {"status", status}}.dump()
                << "\n";
    } else {
      std::cout << status << "\n";
    }
    *exit_code = resp.status() == grpc::health::v1::HealthCheckResponse::SERVING ? kExitOk : kExitServerError;
  });
}

void AddInfoCommand(CLI::App& app, GlobalOptions& opts, int* exit_code) {
  auto* cmd = app.add_subcommand("info", "Show what the server is: version, build, device, model, uptime");
  cmd->callback([&opts, exit_code] {
    auto info_or = CallUnary<strata::v1::AdminService, strata::v1::ServerInfo>(
        opts, exit_code, "GetServerInfo",
        [&](auto& stub, grpc::ClientContext* ctx, strata::v1::ServerInfo* out) {
          return stub.GetServerInfo(ctx, strata::v1::GetServerInfoRequest(), out);
        });
    if (!info_or) return;
    const strata::v1::ServerInfo& info = *info_or;
    if (opts.json) {
      std::cout << ProtoToJson(info) << "\n";
      return;
    }
    const auto& m = info.model();
    std::vector<std::pair<std::string, std::string>> rows = {
        {"server", opts.server},
        {"version", absl::StrFormat("%s (%s, %s)", info.version(), info.git_commit(), info.build_type())},
        {"compiler", info.compiler()},
        {"torch", info.torch_version()},
        {"device", info.device()},
        {"blas", info.blas()},
        {"allocator", info.allocator()},
        {"threads",
         absl::StrFormat("training %d, serving %d", info.training_threads(), info.serving_threads())},
        {"state dir", info.state_dir()},
        {"uptime", FormatDuration(info.uptime_seconds())},
    };
    if (m.loaded()) {
      rows.push_back({"model", absl::StrFormat("%s (%s)", m.name(), m.architecture())});
      if (!m.path().empty()) rows.push_back({"model path", m.path()});
      rows.push_back(
          {"parameters", absl::StrFormat("%s (%d)", FormatCount(m.parameter_count()), m.parameter_count())});
      rows.push_back({"shape", absl::StrFormat("hidden %d, layers %d, vocab %d, %s", m.hidden_size(),
                                               m.num_layers(), m.vocab_size(), m.dtype())});
    } else {
      rows.push_back({"model", "no model"});
    }
    rows.push_back({"weights", absl::StrFormat("version %d, %d task(s) learned, method %s",
                                               info.weights_version(), info.tasks_learned(), info.method())});
    if (!info.role().empty()) rows.push_back({"role", info.role()});
    if (info.has_replica()) {
      const auto& r = info.replica();
      rows.push_back(
          {"trainer", absl::StrFormat("%s (%s), serves version %d; %d version(s) behind, lag %.1f s",
                                      r.trainer(), r.connected() ? "connected" : "not connected",
                                      r.trainer_version(), r.lag_versions(), r.lag_seconds())});
      if (!r.last_error().empty()) rows.push_back({"last error", r.last_error()});
    }
    rows.push_back({"security", absl::StrFormat("%s, %s", info.tls() ? "TLS" : "plaintext",
                                                info.auth_required() ? (info.inference_auth_required()
                                                                            ? "bearer token required"
                                                                            : "bearer token required "
                                                                              "(inference open)")
                                                                     : "no token")});
    PrintKeyValues(rows);
  });
}

}  // namespace strata::cli
