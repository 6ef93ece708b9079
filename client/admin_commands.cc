// `strata export`, `import`, `versions`, `promote` and `rollback`: the AdminService.

#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "client/commands.h"
#include "strata/v1/adaptation.grpc.pb.h"
#include "strata/v1/admin.grpc.pb.h"

namespace strata::cli {

namespace pb = strata::v1;

void AddAdminCommands(CLI::App& app, GlobalOptions& opts, int* exit_code) {
  {
    auto* cmd = app.add_subcommand(
        "export",
        "Write the served weights (a Hugging Face model directory), with --task a learned task as a PEFT "
        "LoRA "
        "adapter (adapter_config.json + adapter_model.safetensors), or with --state the adaptation state "
        "into "
        "a directory on the server (under its --export_root; relative paths are taken relative to it). A "
        "non-empty directory is refused unless --overwrite");
    struct Args {
      std::string dir;
      bool state = false;
      bool overwrite = false;
      std::string task;
      int rank = 0;
    };
    auto a = std::make_shared<Args>();
    cmd->add_option("dir", a->dir, "Directory on the server")->required();
    cmd->add_flag("--state", a->state, "Export the adaptation state (checkpoint) instead of the weights");
    cmd->add_flag("--overwrite", a->overwrite, "Replace the directory when it is not empty");
    cmd->add_option("--task", a->task,
                    "Export this task's route (the model as of the task minus the base weights) as a PEFT "
                    "LoRA adapter; 'merged' = the full model");
    cmd->add_option(
           "--rank", a->rank,
           "With --task: the adapter's rank (truncated SVD; the relative error is printed); 0 = exact. "
           "Needed for methods whose update is dense (osft, pm, seq_ft, ella, ...)")
        ->check(CLI::Range(0, 65536));
    cmd->callback([&opts, exit_code, a] {
      if (a->state && (!a->task.empty() || a->rank != 0)) {
        *exit_code =
            UsageError("--state exports the whole adaptation state; it takes no --task or --rank", opts);
        return;
      }
      if (a->rank != 0 && a->task.empty()) {
        *exit_code = UsageError("--rank applies to a task's adapter (--task NAME)", opts);
        return;
      }
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
      std::string what = a->state ? "the state" : "weights";
      if (a->state) {
        pb::ExportStateRequest request;
        request.set_dir(a->dir);
        request.set_overwrite(a->overwrite);
        pb::ExportStateResponse response;
        st = stub->ExportState(&ctx, request, &response);
        path = response.path();
        version = response.weights_version();
        json = ProtoToJson(response);
      } else {
        pb::ExportWeightsRequest request;
        request.set_dir(a->dir);
        request.set_overwrite(a->overwrite);
        request.set_task(a->task);
        request.set_rank(a->rank);
        pb::ExportWeightsResponse response;
        st = stub->ExportWeights(&ctx, request, &response);
        path = response.path();
        version = response.weights_version();
        json = ProtoToJson(response);
        if (!response.task().empty()) {
          what = absl::StrFormat("task '%s' (%s) as a PEFT LoRA adapter of rank %d", response.task(),
                                 response.method(), response.rank());
          if (response.rank() < response.exact_rank()) {
            absl::StrAppendFormat(&what, " (exact rank %d; relative error %.3g)", response.exact_rank(),
                                  response.relative_error());
          } else {
            absl::StrAppend(&what, " (exact)");
          }
        }
      }
      if (!st.ok()) {
        *exit_code = ReportRpcError(a->state ? "ExportState" : "ExportWeights", st, opts);
        return;
      }
      if (opts.json) {
        std::cout << json << "\n";
      } else {
        std::cout << absl::StrFormat("exported %s of weights version %d to %s\n", what, version, path);
      }
    });
  }
  {
    auto* cmd = app.add_subcommand("import",
                                   "Fold PEFT LoRA adapter directories on the server (under its "
                                   "--import_root) into the adaptation state: queues an import job and "
                                   "waits for it (--no-wait: print the job id)");
    auto dirs = std::make_shared<std::vector<std::string>>();
    auto no_wait = std::make_shared<bool>(false);
    cmd->add_option("dirs", *dirs, "Adapter directories on the server")->required();
    cmd->add_flag("--no-wait", *no_wait,
                  "Print the import job's id and return (follow it with strata watch)");
    cmd->callback([&opts, exit_code, dirs, no_wait] {
      pb::ImportAdaptersRequest request;
      for (const auto& d : *dirs) request.add_dirs(d);
      auto response_or = CallUnary<pb::AdminService, pb::ImportAdaptersResponse>(
          opts, exit_code, "ImportAdapters",
          [&](auto& stub, grpc::ClientContext* ctx, pb::ImportAdaptersResponse* out) {
            return stub.ImportAdapters(ctx, request, out);
          });
      if (!response_or) return;
      const pb::ImportAdaptersResponse& response = *response_or;
      if (*no_wait) {
        std::cout << (opts.json ? ProtoToJson(response) : response.job_id()) << "\n";
        return;
      }
      // Follow the job to its end (it runs after the jobs queued before it).
      auto channel = Connect(opts);
      if (!channel) {
        *exit_code = kExitUnreachable;
        return;
      }
      auto stub = pb::AdaptationService::NewStub(channel);
      grpc::ClientContext ctx;
      PrepareContext(&ctx, opts, /*with_deadline=*/false);
      pb::WatchJobRequest watch;
      watch.set_id(response.job_id());
      auto reader = stub->WatchJob(&ctx, watch);
      pb::JobEvent event;
      pb::Job job;
      while (reader->Read(&event)) job = event.job();
      if (grpc::Status st = reader->Finish(); !st.ok()) {
        *exit_code = ReportRpcError("WatchJob", st, opts);
        return;
      }
      if (opts.json) {
        std::cout << ProtoToJson(job) << "\n";
      } else if (job.state() == pb::JOB_STATE_SUCCEEDED) {
        std::cout << absl::StrFormat("imported %d adapter(s); weights version %d (job %s)\n",
                                     response.paths_size(), job.weights_version(), job.id());
      } else {
        std::cerr << absl::StrFormat("import job %s did not succeed: %s\n", job.id(), job.error());
      }
      if (job.state() != pb::JOB_STATE_SUCCEEDED) *exit_code = kExitServerError;
    });
  }
  {
    auto* cmd = app.add_subcommand("versions",
                                   "The kept weights versions: the last --keep_versions published ones "
                                   "(rollback targets) and the candidate a held job left (promote target)");
    cmd->callback([&opts, exit_code] {
      auto r = CallUnary<pb::AdminService, pb::ListVersionsResponse>(
          opts, exit_code, "ListVersions",
          [&](auto& stub, grpc::ClientContext* ctx, pb::ListVersionsResponse* out) {
            return stub.ListVersions(ctx, pb::ListVersionsRequest(), out);
          });
      if (!r) return;
      if (opts.json) {
        std::cout << ProtoToJson(*r) << "\n";
        return;
      }
      std::vector<std::vector<std::string>> rows;
      for (const auto& v : r->versions()) {
        std::vector<std::string> scores;
        for (const auto& s : v.scores())
          scores.push_back(absl::StrCat(s.task(), " ", FormatScore(s.score())));
        std::string status = v.status();
        if (v.served()) status += " (served)";
        rows.push_back({absl::StrCat(v.version()), status, v.task().empty() ? "-" : v.task(),
                        v.job_id().empty() ? "-" : v.job_id(),
                        scores.empty() ? "-" : absl::StrJoin(scores, ", "),
                        FormatTimestamp(v.created().seconds()), FormatBytes(v.bytes())});
      }
      PrintTable({"VERSION", "STATUS", "TASK", "JOB", "SCORES", "CREATED", "SIZE"}, rows);
      for (const auto& v : r->versions()) {
        if (v.hold_reasons().empty()) continue;
        std::cout << absl::StrFormat("\ncandidate version %d held because:\n", v.version());
        for (const auto& reason : v.hold_reasons()) std::cout << "  " << reason << "\n";
      }
      std::cout << absl::StrFormat("\nserved: version %d; published versions kept: %d (--keep_versions)\n",
                                   r->served_version(), r->keep_versions());
    });
  }
  auto print_change = [](const pb::VersionChange& c, const GlobalOptions& opts, const char* verb) {
    if (opts.json) {
      std::cout << ProtoToJson(c) << "\n";
      return;
    }
    std::cout << absl::StrFormat("%s: served weights version %d -> %d (%.3f s)\n", verb, c.from_version(),
                                 c.to_version(), c.seconds());
    if (!c.tasks_added().empty())
      std::cout << "tasks added: " << absl::StrJoin(c.tasks_added(), ", ") << "\n";
    if (!c.tasks_removed().empty()) {
      std::cout << "tasks rolled back (they may be submitted again): "
                << absl::StrJoin(c.tasks_removed(), ", ") << "\n";
    }
    if (!c.jobs_changed().empty())
      std::cout << "jobs updated: " << absl::StrJoin(c.jobs_changed(), ", ") << "\n";
  };
  {
    auto* cmd = app.add_subcommand("promote", "Publish a candidate version the publish gate held");
    auto version = std::make_shared<int64_t>(0);
    cmd->add_option("version", *version, "Candidate version (strata versions)")
        ->required()
        ->check(CLI::PositiveNumber);
    cmd->callback([&opts, exit_code, version, print_change] {
      pb::PromoteVersionRequest request;
      request.set_version(*version);
      auto r = CallUnary<pb::AdminService, pb::VersionChange>(
          opts, exit_code, "PromoteVersion",
          [&](auto& stub, grpc::ClientContext* ctx, pb::VersionChange* out) {
            return stub.PromoteVersion(ctx, request, out);
          });
      if (r) print_change(*r, opts, "promoted");
    });
  }
  {
    auto* cmd =
        app.add_subcommand("rollback",
                           "Serve an earlier kept version again (default: the one before the served "
                           "version); newer versions are discarded and their tasks may be submitted again");
    auto version = std::make_shared<int64_t>(0);
    cmd->add_option("version", *version, "Published version to serve again (strata versions)")
        ->check(CLI::PositiveNumber);
    cmd->callback([&opts, exit_code, version, print_change] {
      pb::RollbackVersionRequest request;
      request.set_version(*version);
      auto r = CallUnary<pb::AdminService, pb::VersionChange>(
          opts, exit_code, "RollbackVersion",
          [&](auto& stub, grpc::ClientContext* ctx, pb::VersionChange* out) {
            return stub.RollbackVersion(ctx, request, out);
          });
      if (r) print_change(*r, opts, "rolled back");
    });
  }
}

}  // namespace strata::cli
