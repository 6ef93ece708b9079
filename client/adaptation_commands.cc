// `strata submit`, `jobs`, `watch`, `cancel`, `tasks`, `report`: the AdaptationService.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/commands.h"
#include "nlohmann/json.hpp"
#include "strata/v1/adaptation.grpc.pb.h"
#include "strata/v1/scorer_names.h"

namespace strata::cli {
namespace {

namespace pb = strata::v1;

constexpr size_t kChunkBytes = 64 * 1024;

const std::map<std::string, pb::JobState>& StateNames() {
  static const std::map<std::string, pb::JobState> names = {{"queued", pb::JOB_STATE_QUEUED},
                                                            {"training", pb::JOB_STATE_TRAINING},
                                                            {"evaluating", pb::JOB_STATE_EVALUATING},
                                                            {"succeeded", pb::JOB_STATE_SUCCEEDED},
                                                            {"failed", pb::JOB_STATE_FAILED},
                                                            {"cancelled", pb::JOB_STATE_CANCELLED},
                                                            {"held", pb::JOB_STATE_HELD},
                                                            {"rolled_back", pb::JOB_STATE_ROLLED_BACK}};
  return names;
}

std::string StateName(pb::JobState s) {
  for (const auto& [name, state] : StateNames()) {
    if (state == s) return name;
  }
  return "unknown";
}

// "auto" when the server chose the scorer from the data.
std::string ScorerName(pb::Scorer s) {
  const std::string name = ScorerNameFromProto(s);
  return name.empty() ? "auto" : name;
}

std::string ProgressText(const pb::Job& job) {
  const pb::Progress& p = job.progress();
  switch (job.state()) {
    case pb::JOB_STATE_QUEUED:
      return absl::StrFormat("%s %s: queued (position %d)", job.id(), job.task_name(), job.queue_position());
    case pb::JOB_STATE_TRAINING: {
      if (p.total_steps() <= 0) return absl::StrFormat("%s %s: training", job.id(), job.task_name());
      double fraction = static_cast<double>(p.step()) / static_cast<double>(p.total_steps());
      std::string text = absl::StrFormat("%s %s: training %s %d/%d loss %.4f", job.id(), job.task_name(),
                                         Bar(fraction), p.step(), p.total_steps(), p.loss());
      if (p.step() > 0 && p.step() < p.total_steps())
        absl::StrAppend(&text, " ETA ", FormatDuration(p.eta_seconds()));
      return text;
    }
    case pb::JOB_STATE_EVALUATING:
      return absl::StrFormat("%s %s: evaluating every task", job.id(), job.task_name());
    default:
      return absl::StrFormat("%s %s: %s", job.id(), job.task_name(), StateName(job.state()));
  }
}

// Prints how a finished job ended; returns the exit code (0 only when it succeeded).
int PrintOutcome(const pb::Job& job, const GlobalOptions& opts) {
  if (opts.json) {
    std::cout << ProtoToJson(job) << "\n";
  } else if (job.state() == pb::JOB_STATE_SUCCEEDED) {
    double seconds = static_cast<double>(job.finished().seconds() - job.started().seconds());
    std::cout << absl::StrFormat("%s succeeded: task '%s' learned in %s; weights version %d\n", job.id(),
                                 job.task_name(), FormatDuration(seconds), job.weights_version());
    std::vector<std::vector<std::string>> rows;
    for (const auto& r : job.eval_results()) rows.push_back({r.task(), FormatScore(r.score())});
    PrintTable({"TASK", "SCORE"}, rows);
    if (job.reference_nll() != 0 && std::isfinite(job.reference_nll())) {
      std::cout << absl::StrFormat("reference NLL %.4f\n", job.reference_nll());
    }
  } else if (job.state() == pb::JOB_STATE_HELD) {
    std::cout << absl::StrFormat(
        "%s held: task '%s' trained, but the publish gate kept it as candidate version %d (not served)\n",
        job.id(), job.task_name(), job.weights_version());
    for (const auto& reason : job.hold_reasons()) std::cout << "  " << reason << "\n";
    std::vector<std::vector<std::string>> rows;
    for (const auto& r : job.eval_results()) rows.push_back({r.task(), FormatScore(r.score())});
    PrintTable({"TASK", "SCORE (candidate, merged)"}, rows);
    std::cout << absl::StrFormat("publish it anyway: strata promote %d\n", job.weights_version());
  }
  if (job.state() == pb::JOB_STATE_SUCCEEDED) return kExitOk;
  std::fprintf(stderr, "strata: job %s %s: %s\n", job.id().c_str(), StateName(job.state()).c_str(),
               job.error().c_str());
  return kExitServerError;
}

// Follows a job until it ends. With `json_events`, prints every event as a JSON line (and nothing
// else on stdout); otherwise draws progress on stderr and prints the outcome.
int FollowJob(pb::AdaptationService::Stub& stub, const std::string& id, const GlobalOptions& opts,
              bool json_events) {
  grpc::ClientContext ctx;
  PrepareContext(&ctx, opts, /*with_deadline=*/false);
  pb::WatchJobRequest request;
  request.set_id(id);
  auto reader = stub.WatchJob(&ctx, request);
  pb::JobEvent event;
  pb::Job last;
  bool have = false;
  pb::JobState last_state = pb::JOB_STATE_UNSPECIFIED;
  ProgressLine progress;
  while (reader->Read(&event)) {
    last = event.job();
    have = true;
    if (json_events) {
      std::cout << ProtoToJson(event) << std::endl;
      continue;
    }
    bool changed = last.state() != last_state;
    last_state = last.state();
    if (changed && StderrIsTerminal()) {
      progress.Finish(ProgressText(last));  // keep each state on its own line
    } else {
      progress.Update(ProgressText(last), changed);
    }
  }
  grpc::Status status = reader->Finish();
  if (!status.ok()) return ReportRpcError("WatchJob", status, opts);
  if (!have) return ReportRpcError("WatchJob", grpc::Status(grpc::StatusCode::INTERNAL, "no event"), opts);
  if (json_events) return last.state() == pb::JOB_STATE_SUCCEEDED ? kExitOk : kExitServerError;
  return PrintOutcome(last, opts);
}

void AddSubmit(CLI::App& app, GlobalOptions& opts, int* exit_code) {
  auto* cmd = app.add_subcommand("submit", "Stream a task's JSONL data to the server; prints the job id");
  struct Args {
    std::string task, file, eval_file, method, scorer, description;
    double eval_fraction = 0.1, lr = 0, alpha = 0, ella_lambda = 0, min_score = 0;
    int eval_cap = 0, steps = 0, epochs = 0, batch_size = 0, rank = 0, seed = 0, max_seq_len = 0;
    bool wait = false;
  };
  auto a = std::make_shared<Args>();
  cmd->add_option("--task", a->task, "Task name: [A-Za-z0-9._-], 1-64 characters")->required();
  cmd->add_option("file", a->file, "Training data (JSONL: prompt/completion[/choices] or text lines)")
      ->required()
      ->check(CLI::ExistingFile);
  auto* eval = cmd->add_option("--eval", a->eval_file, "Evaluation data (JSONL)")->check(CLI::ExistingFile);
  auto* fraction =
      cmd->add_option("--eval-fraction", a->eval_fraction,
                      "Without --eval: fraction of the training data held out (server default 0.1)")
          ->check(CLI::Range(0.0, 0.99));
  fraction->excludes(eval);
  auto* cap =
      cmd->add_option("--eval-cap", a->eval_cap, "Without --eval: at most this many held out (default 200)")
          ->check(CLI::PositiveNumber);
  cap->excludes(eval);
  auto* method =
      cmd->add_option("--method", a->method, "Method (must be the server's; default: the server's)");
  auto* lr = cmd->add_option("--lr", a->lr, "Learning rate")->check(CLI::PositiveNumber);
  auto* steps = cmd->add_option("--steps", a->steps, "Optimizer steps")->check(CLI::PositiveNumber);
  auto* epochs = cmd->add_option("--epochs", a->epochs, "Epochs (when steps is 0 on the server)")
                     ->check(CLI::PositiveNumber);
  auto* batch = cmd->add_option("--batch-size", a->batch_size, "Batch size")->check(CLI::PositiveNumber);
  auto* rank = cmd->add_option("--rank", a->rank, "Adapter rank (fixed after the first task)")
                   ->check(CLI::PositiveNumber);
  auto* alpha = cmd->add_option("--alpha", a->alpha, "LoRA alpha (fixed after the first task)")
                    ->check(CLI::PositiveNumber);
  auto* lambda = cmd->add_option("--lambda", a->ella_lambda, "ELLA penalty weight for this task")
                     ->check(CLI::NonNegativeNumber);
  auto* seed =
      cmd->add_option("--seed", a->seed, "Training and hold-out seed")->check(CLI::NonNegativeNumber);
  auto* seq = cmd->add_option("--max-seq-len", a->max_seq_len, "Maximum tokens per example")
                  ->check(CLI::PositiveNumber);
  cmd->add_option("--scorer", a->scorer,
                  "How the task is scored (default: choice for choices, else exact_match)")
      ->check(CLI::IsMember({"choice", "exact_match", "nll"}));
  cmd->add_option("--description", a->description, "Free-form description kept with the task");
  auto* min_score = cmd->add_option("--min-score", a->min_score,
                                    "Publish gate: the least score in [0, 1] the task must reach for its "
                                    "version to be served (otherwise the job is held)")
                        ->check(CLI::Range(0.0, 1.0));
  cmd->add_flag("--wait", a->wait,
                "Follow the job until it ends and print its evaluation (exit 1 if it fails)");
  cmd->callback([&opts, exit_code, a, fraction, cap, method, lr, steps, epochs, batch, rank, alpha, lambda,
                 seed, seq, min_score] {
    pb::SubmitTaskRequest spec_msg;
    pb::TaskSpec* spec = spec_msg.mutable_spec();
    spec->set_name(a->task);
    if (method->count()) spec->set_method(a->method);
    if (fraction->count()) spec->set_eval_fraction(a->eval_fraction);
    if (cap->count()) spec->set_eval_cap(a->eval_cap);
    if (!a->scorer.empty()) {
      spec->set_scorer(ScorerProtoFromName(a->scorer).value_or(pb::SCORER_UNSPECIFIED));
    }
    spec->set_description(a->description);
    // The server names each file in its line errors ("FILE:LINE: ...").
    spec->set_train_source(a->file);
    if (!a->eval_file.empty()) spec->set_eval_source(a->eval_file);
    if (min_score->count()) spec->set_min_score(a->min_score);
    pb::TrainingOverrides* o = spec->mutable_overrides();
    if (lr->count()) o->set_learning_rate(a->lr);
    if (steps->count()) o->set_max_steps(a->steps);
    if (epochs->count()) o->set_epochs(a->epochs);
    if (batch->count()) o->set_batch_size(a->batch_size);
    if (rank->count()) o->set_rank(a->rank);
    if (alpha->count()) o->set_alpha(a->alpha);
    if (lambda->count()) o->set_ella_lambda(a->ella_lambda);
    if (seed->count()) o->set_seed(a->seed);
    if (seq->count()) o->set_max_seq_len(a->max_seq_len);

    std::vector<std::pair<std::string, bool>> files = {{a->file, false}};
    if (!a->eval_file.empty()) files.push_back({a->eval_file, true});
    int64_t total = 0;
    for (const auto& [path, is_eval] : files) {
      std::error_code ec;
      total += static_cast<int64_t>(std::filesystem::file_size(path, ec));
    }

    auto channel = Connect(opts);
    if (!channel) {
      *exit_code = kExitUnreachable;
      return;
    }
    auto stub = pb::AdaptationService::NewStub(channel);
    pb::Job job;
    {
      grpc::ClientContext ctx;
      PrepareContext(&ctx, opts, /*with_deadline=*/false);
      auto writer = stub->SubmitTask(&ctx, &job);
      bool open = writer->Write(spec_msg);
      int64_t sent = 0, lines = 0;
      ProgressLine progress;
      auto text = [&] {
        return absl::StrFormat("upload %s %s / %s, %d lines", Bar(total > 0 ? double(sent) / total : 1.0),
                               FormatBytes(sent), FormatBytes(total), lines);
      };
      for (const auto& [path, is_eval] : files) {
        if (!open) break;
        std::ifstream in(path, std::ios::binary);
        if (!in) {
          ctx.TryCancel();
          *exit_code = UsageError("cannot read " + path, opts);
          return;
        }
        std::string buf(kChunkBytes, '\0');
        while (open && in) {
          in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
          std::streamsize n = in.gcount();
          if (n <= 0) break;
          pb::SubmitTaskRequest msg;
          pb::DataChunk* chunk = is_eval ? msg.mutable_eval() : msg.mutable_train();
          chunk->set_jsonl(buf.data(), static_cast<size_t>(n));
          open = writer->Write(msg);
          sent += n;
          lines += std::count(buf.data(), buf.data() + n, '\n');
          progress.Update(text());
        }
      }
      if (open) writer->WritesDone();
      grpc::Status status = writer->Finish();
      if (!status.ok()) {
        progress.Finish(text() + " (refused)");
        *exit_code = ReportRpcError("SubmitTask", status, opts);
        return;
      }
      progress.Finish(text());
    }
    if (!a->wait) {
      std::cout << (opts.json ? ProtoToJson(job) : job.id()) << "\n";
      return;
    }
    if (!opts.json) std::cout << job.id() << std::endl;
    *exit_code = FollowJob(*stub, job.id(), opts, /*json_events=*/false);
  });
}

void AddJobs(CLI::App& app, GlobalOptions& opts, int* exit_code) {
  auto* cmd = app.add_subcommand("jobs", "List jobs, newest first");
  auto state = std::make_shared<std::string>();
  std::vector<std::string> names;
  for (const auto& [name, s] : StateNames()) names.push_back(name);
  cmd->add_option("--state", *state, "Only jobs in this state")->check(CLI::IsMember(names));
  cmd->callback([&opts, exit_code, state] {
    auto channel = Connect(opts);
    if (!channel) {
      *exit_code = kExitUnreachable;
      return;
    }
    auto stub = pb::AdaptationService::NewStub(channel);
    pb::ListJobsResponse all;
    pb::ListJobsRequest request;
    request.set_page_size(500);
    if (!state->empty()) request.set_state(StateNames().at(*state));
    do {
      grpc::ClientContext ctx;
      PrepareContext(&ctx, opts);
      pb::ListJobsResponse page;
      grpc::Status st = stub->ListJobs(&ctx, request, &page);
      if (!st.ok()) {
        *exit_code = ReportRpcError("ListJobs", st, opts);
        return;
      }
      for (const auto& j : page.jobs()) *all.add_jobs() = j;
      request.set_page_token(page.next_page_token());
    } while (!request.page_token().empty());
    if (opts.json) {
      std::cout << ProtoToJson(all) << "\n";
      return;
    }
    std::vector<std::vector<std::string>> rows;
    for (const auto& j : all.jobs()) {
      std::string progress = "-";
      if (j.progress().total_steps() > 0) {
        progress = absl::StrFormat("%d/%d", j.progress().step(), j.progress().total_steps());
      }
      if (j.state() == pb::JOB_STATE_QUEUED) progress = absl::StrFormat("#%d in queue", j.queue_position());
      rows.push_back({j.id(), j.task_name(), j.method(), StateName(j.state()), progress,
                      j.weights_version() > 0 ? absl::StrCat(j.weights_version()) : "-",
                      FormatTimestamp(j.created().seconds()), j.error()});
    }
    if (rows.empty()) {
      std::cout << "no jobs\n";
      return;
    }
    PrintTable({"ID", "TASK", "METHOD", "STATE", "PROGRESS", "VERSION", "CREATED", "ERROR"}, rows);
  });
}

void AddWatch(CLI::App& app, GlobalOptions& opts, int* exit_code) {
  auto* cmd = app.add_subcommand(
      "watch", "Follow a job until it ends and print its evaluation (exit 1 if it failed or was cancelled)");
  auto id = std::make_shared<std::string>();
  cmd->add_option("job", *id, "Job id (e.g. job-000001)")->required();
  cmd->callback([&opts, exit_code, id] {
    auto channel = Connect(opts);
    if (!channel) {
      *exit_code = kExitUnreachable;
      return;
    }
    auto stub = pb::AdaptationService::NewStub(channel);
    *exit_code = FollowJob(*stub, *id, opts, /*json_events=*/opts.json);
  });
}

void AddCancel(CLI::App& app, GlobalOptions& opts, int* exit_code) {
  auto* cmd = app.add_subcommand("cancel", "Cancel a queued or running job (the model stays unchanged)");
  auto id = std::make_shared<std::string>();
  cmd->add_option("job", *id, "Job id")->required();
  cmd->callback([&opts, exit_code, id] {
    pb::CancelJobRequest request;
    request.set_id(*id);
    auto job_or = CallUnary<pb::AdaptationService, pb::Job>(
        opts, exit_code, "CancelJob", [&](auto& stub, grpc::ClientContext* ctx, pb::Job* out) {
          return stub.CancelJob(ctx, request, out);
        });
    if (!job_or) return;
    const pb::Job& job = *job_or;
    if (opts.json) {
      std::cout << ProtoToJson(job) << "\n";
    } else if (job.state() == pb::JOB_STATE_CANCELLED) {
      std::cout << job.id() << " cancelled\n";
    } else {
      std::cout << job.id() << " cancelling (training stops at its next step)\n";
    }
  });
}

void AddTasks(CLI::App& app, GlobalOptions& opts, int* exit_code) {
  auto* cmd = app.add_subcommand("tasks", "List the learned tasks with their scores");
  cmd->callback([&opts, exit_code] {
    auto tasks_or = CallUnary<pb::AdaptationService, pb::ListTasksResponse>(
        opts, exit_code, "ListTasks", [&](auto& stub, grpc::ClientContext* ctx, pb::ListTasksResponse* out) {
          return stub.ListTasks(ctx, pb::ListTasksRequest(), out);
        });
    if (!tasks_or) return;
    const pb::ListTasksResponse& tasks = *tasks_or;
    if (opts.json) {
      std::cout << ProtoToJson(tasks) << "\n";
      return;
    }
    if (tasks.tasks_size() == 0) {
      std::cout << "no tasks learned yet\n";
      return;
    }
    std::vector<std::vector<std::string>> rows;
    for (const auto& t : tasks.tasks()) {
      rows.push_back({absl::StrCat(t.index()), t.name(), ScorerName(t.scorer()), FormatScore(t.base_score()),
                      FormatScore(t.learned_score()), FormatScore(t.current_score()),
                      FormatScore(t.forgetting()), FormatScore(t.current_routed_score()),
                      FormatScore(t.current_auto_score()), FormatScore(t.router_accuracy()),
                      absl::StrCat(t.eval_examples()), t.job_id()});
    }
    // CURRENT/FORGETTING: the merged weights; ROUTED: served by the task's name; AUTO: routed
    // automatically (what a request naming no task gets); ROUTER: share of its prompts routed to it.
    PrintTable({"#", "TASK", "SCORER", "BASE", "LEARNED", "CURRENT", "FORGETTING", "ROUTED", "AUTO", "ROUTER",
                "EVAL", "JOB"},
               rows);
  });
}

void AddReport(CLI::App& app, GlobalOptions& opts, int* exit_code) {
  auto* cmd = app.add_subcommand(
      "report",
      "The accuracy matrix and the continual-learning summary (AA, BWT, FWT, forgetting, reference NLL)");
  cmd->callback([&opts, exit_code] {
    auto r_or = CallUnary<pb::AdaptationService, pb::Report>(
        opts, exit_code, "GetReport", [&](auto& stub, grpc::ClientContext* ctx, pb::Report* out) {
          return stub.GetReport(ctx, pb::GetReportRequest(), out);
        });
    if (!r_or) return;
    const pb::Report& r = *r_or;
    if (opts.json) {
      std::cout << ProtoToJson(r) << "\n";
      return;
    }
    std::cout << absl::StrFormat("method %s, weights version %d, %d task(s) learned, adaptation state %s\n",
                                 r.method(), r.weights_version(), r.tasks_size(),
                                 FormatBytes(r.adaptation_state_bytes()));
    for (const pb::HeldCandidate& c : r.candidates()) {
      std::cout << absl::StrFormat(
          "held: candidate version %d (task '%s', job %s) is not served (strata promote %d publishes it):\n",
          c.version(), c.task(), c.job_id(), c.version());
      for (const auto& reason : c.reasons()) std::cout << "  " << reason << "\n";
    }
    if (r.tasks_size() == 0) return;
    auto print_matrix = [&](const std::string& title,
                            const google::protobuf::RepeatedPtrField<pb::MatrixRow>& matrix, bool with_base) {
      if (matrix.empty()) return;
      std::cout << "\n" << title << "\n";
      std::vector<std::string> header = {""};
      for (const auto& t : r.tasks()) header.push_back(t);
      std::vector<std::vector<std::string>> rows;
      if (with_base) {
        std::vector<std::string> base = {"base model"};
        for (int j = 0; j < r.tasks_size(); ++j)
          base.push_back(j < r.base_size() ? FormatScore(r.base(j)) : "-");
        rows.push_back(base);
      }
      for (int i = 0; i < matrix.size(); ++i) {
        std::vector<std::string> row = {"after " +
                                        (i < r.tasks_size() ? r.tasks(i) : absl::StrCat("stage ", i + 1))};
        for (int j = 0; j < r.tasks_size(); ++j) {
          row.push_back(j < matrix.Get(i).scores_size() ? FormatScore(matrix.Get(i).scores(j)) : "-");
        }
        rows.push_back(row);
      }
      PrintTable(header, rows);
    };
    print_matrix("accuracy matrix, merged weights (row: after learning the task; column: score on the task)",
                 r.matrix(), true);
    print_matrix("accuracy matrix, each task served by its name (--route TASK)", r.routed_matrix(), false);
    print_matrix("accuracy matrix, routed automatically (what a request naming no task gets)",
                 r.auto_matrix(), false);
    print_matrix(
        "router accuracy (row: after learning the task; column: share of the task's eval prompts routed "
        "to it)",
        r.router_accuracy(), false);
    std::cout << "\n";
    auto opt = [](bool has, double v) {
      return has ? absl::StrFormat("%.4f", v) : std::string("- (needs 2 tasks)");
    };
    std::vector<std::pair<std::string, std::string>> summary = {
        {"average score (AA)", r.has_average_score() ? absl::StrFormat("%.4f", r.average_score()) : "-"},
        {"backward transfer (BWT)", opt(r.has_backward_transfer(), r.backward_transfer())},
        {"forward transfer (FWT)", opt(r.has_forward_transfer(), r.forward_transfer())},
        {"forgetting", opt(r.has_forgetting(), r.forgetting())},
        {"auto-routed AA",
         r.has_auto_average_score() ? absl::StrFormat("%.4f", r.auto_average_score()) : "-"},
        {"auto-routed BWT", opt(r.has_auto_backward_transfer(), r.auto_backward_transfer())},
        {"auto-routed forgetting", opt(r.has_auto_forgetting(), r.auto_forgetting())},
        {"router state", absl::StrCat(FormatBytes(r.router_bytes()), " (",
                                      FormatBytes(r.router_bytes_per_task()), " per task)")},
    };
    std::string nll;
    for (int i = 0; i < r.reference_nll_size(); ++i) {
      if (!std::isfinite(r.reference_nll(i))) continue;
      std::string stage = i == 0 ? "base" : (i - 1 < r.tasks_size() ? r.tasks(i - 1) : absl::StrCat(i));
      absl::StrAppend(&nll, nll.empty() ? "" : ", ", stage, " ", absl::StrFormat("%.4f", r.reference_nll(i)));
    }
    summary.push_back({"reference NLL, merged", nll.empty() ? "- (no --reference_text)" : nll});
    std::string nll_auto;
    for (int i = 0; i < r.reference_nll_auto_size(); ++i) {
      if (!std::isfinite(r.reference_nll_auto(i))) continue;
      std::string stage = i == 0 ? "base" : (i - 1 < r.tasks_size() ? r.tasks(i - 1) : absl::StrCat(i));
      absl::StrAppend(&nll_auto, nll_auto.empty() ? "" : ", ", stage, " ",
                      absl::StrFormat("%.4f", r.reference_nll_auto(i)));
    }
    if (!nll_auto.empty()) summary.push_back({"reference NLL, auto-routed", nll_auto});
    PrintKeyValues(summary);
  });
}

}  // namespace

void AddAdaptationCommands(CLI::App& app, GlobalOptions& opts, int* exit_code) {
  AddSubmit(app, opts, exit_code);
  AddJobs(app, opts, exit_code);
  AddWatch(app, opts, exit_code);
  AddCancel(app, opts, exit_code);
  AddTasks(app, opts, exit_code);
  AddReport(app, opts, exit_code);
}

}  // namespace strata::cli
