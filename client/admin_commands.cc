// `strata export` and `strata import`: the AdminService's export / import.

#include <iostream>

#include "absl/strings/str_format.h"
#include "client/commands.h"
#include "strata/v1/admin.grpc.pb.h"

namespace strata::cli {

namespace pb = strata::v1;

void AddAdminCommands(CLI::App& app, GlobalOptions& opts, int* exit_code) {
  {
    auto* cmd = app.add_subcommand(
        "export",
        "Write the served weights (a Hugging Face model directory) or, with --state, the adaptation state "
        "into a "
        "directory on the server (under its --export_root; relative paths are taken relative to it)");
    struct Args {
      std::string dir;
      bool state = false;
    };
    auto a = std::make_shared<Args>();
    cmd->add_option("dir", a->dir, "Directory on the server")->required();
    cmd->add_flag("--state", a->state, "Export the adaptation state (checkpoint) instead of the weights");
    cmd->callback([&opts, exit_code, a] {
      auto channel = Connect(opts);
      if (!channel) {
        *exit_code = kExitUnreachable;
        return;
      }
      auto stub = pb::AdminService::NewStub(channel);
      grpc::ClientContext ctx;
      PrepareContext(&ctx, opts, /*with_deadline=*/false);
      std::string path;
      int64_t version = 0;
      grpc::Status st;
      std::string json;
      if (a->state) {
        pb::ExportStateRequest request;
        request.set_dir(a->dir);
        pb::ExportStateResponse response;
        st = stub->ExportState(&ctx, request, &response);
        path = response.path();
        version = response.weights_version();
        json = ProtoToJson(response);
      } else {
        pb::ExportWeightsRequest request;
        request.set_dir(a->dir);
        pb::ExportWeightsResponse response;
        st = stub->ExportWeights(&ctx, request, &response);
        path = response.path();
        version = response.weights_version();
        json = ProtoToJson(response);
      }
      if (!st.ok()) {
        *exit_code = ReportRpcError(a->state ? "ExportState" : "ExportWeights", st, opts);
        return;
      }
      if (opts.json) {
        std::cout << json << "\n";
      } else {
        std::cout << absl::StrFormat("exported %s of weights version %d to %s\n",
                                     a->state ? "the state" : "weights", version, path);
      }
    });
  }
  {
    auto* cmd = app.add_subcommand("import",
                                   "Fold PEFT LoRA adapter directories on the server (under its "
                                   "--import_root) into the adaptation state");
    auto dirs = std::make_shared<std::vector<std::string>>();
    cmd->add_option("dirs", *dirs, "Adapter directories on the server")->required();
    cmd->callback([&opts, exit_code, dirs] {
      pb::ImportAdaptersRequest request;
      for (const auto& d : *dirs) request.add_dirs(d);
      auto response_or = CallUnary<pb::AdminService, pb::ImportAdaptersResponse>(
          opts, exit_code, "ImportAdapters",
          [&](auto& stub, grpc::ClientContext* ctx, pb::ImportAdaptersResponse* out) {
            return stub.ImportAdapters(ctx, request, out);
          },
          /*with_deadline=*/false);
      if (!response_or) return;
      const pb::ImportAdaptersResponse& response = *response_or;
      if (opts.json) {
        std::cout << ProtoToJson(response) << "\n";
      } else {
        std::cout << absl::StrFormat("imported %d adapter(s); weights version %d\n", response.paths_size(),
                                     response.weights_version());
      }
    });
  }
}

}  // namespace strata::cli
