// `strata bench cl`: the report (summary tables, JSON, plots). See cl_bench.h.

#include <cmath>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "bench/bench_util.h"
#include "bench/cl_bench_internal.h"
#include "bench/gnuplot.h"
#include "core/model/runtime.h"
#include "core/util/file_util.h"
#include "core/util/status_macros.h"

namespace strata::bench {
namespace {

std::string Pad(const std::string& s, size_t width, bool right = false) {
  if (s.size() >= width) return s;
  return right ? std::string(width - s.size(), ' ') + s : s + std::string(width - s.size(), ' ');
}

json OptJson(const std::optional<double>& v) {
  if (!v.has_value() || std::isnan(*v)) return nullptr;
  return *v;
}

json ArgsToJson(const ClBenchArgs& a, const std::vector<std::string>& methods,
                const std::vector<BenchTask>& tasks, const std::string& reference) {
  json j;
  j["model"] = a.model_dir;
  j["tasks_dir"] = a.tasks_dir;
  j["order"] = a.order;
  json dirs = json::array();
  for (const BenchTask& t : tasks) dirs.push_back(t.dir);
  j["task_dirs"] = dirs;
  j["methods"] = methods;
  j["max_train"] = a.max_train;
  j["max_test"] = a.max_test;
  const TrainingRecipe& r = a.recipe;
  const MethodConfig& mc = r.method_config;
  j["recipe"] = json::parse(RecipeToJson(r));
  // The flat keys earlier results files have (plots and docs read them).
  j["epochs"] = r.epochs;
  j["steps"] = r.max_steps;
  j["lr"] = r.learning_rate;
  j["batch_size"] = r.batch_size;
  j["rank"] = mc.rank;
  j["alpha"] = mc.alpha;
  j["lambda"] = mc.ella_lambda;
  j["olora_lambda"] = mc.olora_lambda;
  j["phi"] = mc.phi;
  j["k_max"] = mc.k_max;
  j["share_training"] = mc.share_training;
  j["energy_threshold"] = mc.energy_threshold;
  j["pm_epsilon"] = mc.pm_epsilon;
  j["router_layer"] = a.router_layer;
  j["targets"] = absl::StrJoin(mc.target_modules, ",");
  j["warmup_steps"] = r.warmup_steps;
  j["warmup_ratio"] = r.warmup_ratio;
  j["lr_schedule"] = r.lr_schedule;
  j["max_seq_len"] = r.max_seq_len;
  j["seed"] = r.seed;
  j["threads"] = a.threads;
  j["device"] = a.device;
  j["dtype"] = a.dtype;
  j["reference"] = reference;
  j["reference_texts"] = a.reference_texts;
  j["blas"] = LoadedBlasLibrary();
  j["allocator"] = LoadedAllocator();
  j["runtime"] = TorchRuntimeSummary();
  return j;
}

absl::Status WritePlots(const std::string& dir, const std::vector<MethodRun>& runs,
                        const std::vector<BenchTask>& tasks, const std::vector<double>& base) {
  std::vector<std::string> task_names;
  for (const BenchTask& t : tasks) task_names.push_back(t.data.name);
  for (const MethodRun& run : runs) {
    std::vector<std::string> rows = {"base"};
    std::vector<std::vector<double>> values = {base};
    for (size_t i = 0; i < run.matrix.size(); ++i) {
      rows.push_back(run.row_labels[i]);
      values.push_back(run.matrix[i]);
    }
    RETURN_IF_ERROR(
        PlotHeatmap(absl::StrCat(dir, "/", run.name, "_matrix.png"),
                    absl::StrCat(run.name, ": accuracy after each stage (rows) on each task (columns)"), rows,
                    task_names, values));
    RETURN_IF_ERROR(PlotLines(absl::StrCat(dir, "/", run.name, "_stages.png"),
                              absl::StrCat(run.name, ": score of each task across stages"), "after stage",
                              "score", rows, task_names, values, 0.0, 1.0));
  }
  // One summary plot: AA and BWT per method.
  std::vector<std::string> names;
  std::vector<std::vector<double>> bars;  // per method: {AA, BWT}
  for (const MethodRun& run : runs) {
    names.push_back(run.name);
    const double bwt = run.report.has_value() && run.report->bwt.has_value()
                           ? *run.report->bwt
                           : std::numeric_limits<double>::quiet_NaN();
    bars.push_back({run.aa, bwt});
  }
  if (!runs.empty()) {
    RETURN_IF_ERROR(PlotBars(absl::StrCat(dir, "/summary_aa_bwt.png"),
                             absl::StrCat("AA and BWT per method (", absl::StrJoin(task_names, " -> "), ")"),
                             names, {"AA", "BWT"}, bars, -1.0, 1.0));
  }
  return absl::OkStatus();
}

}  // namespace

std::string FormatBytes(int64_t bytes) {
  if (bytes >= (int64_t{1} << 20)) return absl::StrFormat("%.2f MiB", static_cast<double>(bytes) / (1 << 20));
  if (bytes >= (int64_t{1} << 10)) return absl::StrFormat("%.1f KiB", static_cast<double>(bytes) / (1 << 10));
  return absl::StrCat(bytes, " B");
}

std::string FormatOpt(const std::optional<double>& v, bool sign) {
  if (!v.has_value() || std::isnan(*v)) return "-";
  return absl::StrFormat(sign ? "%+.3f" : "%.3f", *v);
}

// The matrix of one method as an aligned table (base row first).
void PrintMatrix(const MethodRun& run, const std::vector<std::vector<double>>& matrix,
                 const std::vector<BenchTask>& tasks, const std::vector<double>& base) {
  size_t label_width = 4;
  for (const auto& l : run.row_labels) label_width = std::max(label_width, l.size());
  label_width += 2;
  std::vector<size_t> widths;
  std::string header = Pad("stage", label_width);
  for (const BenchTask& t : tasks) {
    widths.push_back(std::max<size_t>(7, t.data.name.size()) + 2);
    header += Pad(t.data.name, widths.back(), true);
  }
  std::printf("%s\n", header.c_str());
  auto print_row = [&](const std::string& label, const std::vector<double>& row) {
    std::string line = Pad(label, label_width);
    for (size_t j = 0; j < row.size(); ++j) {
      line += Pad(std::isnan(row[j]) ? "-" : absl::StrFormat("%.3f", row[j]), widths[j], true);
    }
    std::printf("%s\n", line.c_str());
  };
  print_row("base", base);
  for (size_t i = 0; i < matrix.size(); ++i) print_row(run.row_labels[i], matrix[i]);
}

int ReportClBench(const ClBenchResults& r) {
  const ClBenchArgs& args = r.args;
  const std::vector<MethodRun>& runs = r.runs;
  const auto& failures = r.failures;
  const std::vector<std::string>& methods = r.methods;
  const std::vector<BenchTask>& tasks = r.tasks;
  const std::vector<std::string>& task_names = r.task_names;
  const std::vector<double>& base = r.base;
  const std::string& reference = r.reference;
  const size_t T = tasks.size();
  // ---- summary ----------------------------------------------------------------------------------
  std::printf("\nSummary (%s; %zu tasks)\n", absl::StrJoin(task_names, " -> ").c_str(), T);
  std::printf("%-12s %7s %8s %8s %10s %9s %9s %12s %10s %8s\n", "method", "AA", "BWT", "FWT", "forgetting",
              "NLL_bef", "NLL_aft", "state_bytes", "trainable", "seconds");
  for (const MethodRun& run : runs) {
    const std::optional<double> bwt = run.report ? run.report->bwt : std::nullopt;
    const std::optional<double> fwt = run.report ? run.report->fwt : std::nullopt;
    const std::optional<double> fgt = run.report ? run.report->forgetting : std::nullopt;
    std::printf("%-12s %7.3f %8s %8s %10s %9.4f %9.4f %12lld %10lld %8.1f\n", run.name.c_str(), run.aa,
                FormatOpt(bwt, true).c_str(), FormatOpt(fwt, true).c_str(), FormatOpt(fgt).c_str(),
                run.nll_before, run.nll_after, static_cast<long long>(run.state_bytes),
                static_cast<long long>(run.trainable), run.seconds);
  }
  bool any_routed = false;
  for (const MethodRun& run : runs) any_routed = any_routed || run.routed_report.has_value();
  if (any_routed) {
    std::printf(
        "\nTask-routed (the model as of each task, W0 + Σ_{l<=j} ΔW_l; needs the task name at inference)\n");
    std::printf("%-12s %7s %8s %8s %10s\n", "method", "AA", "BWT", "FWT", "forgetting");
    for (const MethodRun& run : runs) {
      if (!run.routed_report.has_value()) continue;
      const ClReport& r = *run.routed_report;
      std::printf("%-12s %7s %8s %8s %10s\n", run.name.c_str(), FormatOpt(r.aa).c_str(),
                  FormatOpt(r.bwt, true).c_str(), FormatOpt(r.fwt, true).c_str(),
                  FormatOpt(r.forgetting).c_str());
    }
  }
  bool any_auto = false;
  for (const MethodRun& run : runs) any_auto = any_auto || run.auto_report.has_value();
  if (any_auto) {
    std::printf(
        "\nAuto-routed (no task name: the router picks the task, or the base model when none fits)\n");
    std::printf("%-12s %7s %8s %10s %10s  %s\n", "method", "AA", "BWT", "forgetting", "ref NLL",
                "router accuracy");
    for (const MethodRun& run : runs) {
      if (!run.auto_report.has_value()) continue;
      const ClReport& r = *run.auto_report;
      std::printf("%-12s %7s %8s %10s %10.4f  %s\n", run.name.c_str(), FormatOpt(r.aa).c_str(),
                  FormatOpt(r.bwt, true).c_str(), FormatOpt(r.forgetting).c_str(), run.auto_reference_nll,
                  absl::StrJoin(run.router_accuracy.back(), " ", [](std::string* o, double v) {
                    absl::StrAppendFormat(o, "%.3f", v);
                  }).c_str());
    }
  }
  for (const auto& [name, why] : failures) std::printf("%-12s FAILED: %s\n", name.c_str(), why.c_str());
  if (std::find(methods.begin(), methods.end(), "mtl") != methods.end() ||
      std::find(methods.begin(), methods.end(), kMtlLora) != methods.end()) {
    std::printf("(mtl: joint training, not a continual method; evaluated once at the end, AA only)\n");
  }
  std::fflush(stdout);

  int exit_code = failures.empty() ? kExitOk : kExitFailed;

  // ---- JSON -------------------------------------------------------------------------------------
  json out;
  out["config"] = ArgsToJson(args, methods, tasks, reference);
  out["tasks"] = task_names;
  json task_info = json::array();
  for (const BenchTask& t : tasks) {
    task_info.push_back({{"name", t.data.name},
                         {"dir", t.dir},
                         {"kind", std::string(TaskKindName(t.data.kind))},
                         {"format", std::string(TaskFormatName(t.data.format))},
                         {"scorer", std::string(ScorerName(t.data.scorer))},
                         {"train", t.data.train.size()},
                         {"test", t.data.test.size()}});
  }
  out["task_info"] = task_info;
  out["base"] = base;
  out["reference_nll_base"] = r.nll_base;
  json jm = json::object();
  for (const MethodRun& run : runs) {
    json j;
    if (run.report.has_value()) {
      j = ClReportToJson(*run.report);
      json tf = json::array();
      for (const auto& f : run.report->task_forgetting) tf.push_back(OptJson(f));
      j["task_forgetting"] = tf;
    } else {
      json matrix = json::array();
      for (const auto& row : run.matrix) matrix.push_back(row);
      j["matrix"] = matrix;
      j["base"] = base;
      j["aa"] = OptJson(run.aa);
      j["bwt"] = nullptr;
      j["fwt"] = nullptr;
      j["forgetting"] = nullptr;
      j["note"] = "joint training on all tasks; evaluated once at the end (single final row): AA only";
    }
    if (run.routed_report.has_value()) {
      j["routed"] = ClReportToJson(*run.routed_report);
    } else {
      j["routed"] = nullptr;
    }
    // Automatic routing (methods with per-task state); these key names are read by other tools.
    if (run.auto_report.has_value()) {
      json a;
      a["aa"] = OptJson(run.auto_report->aa);
      a["bwt"] = OptJson(run.auto_report->bwt);
      a["fwt"] = OptJson(run.auto_report->fwt);
      a["forgetting"] = OptJson(run.auto_report->forgetting);
      a["matrix"] = run.auto_matrix;
      a["router_accuracy"] = run.router_accuracy.empty() ? json(nullptr) : json(run.router_accuracy.back());
      a["router_accuracy_matrix"] = run.router_accuracy;
      a["reference_nll_after"] = OptJson(run.auto_reference_nll);
      j["auto"] = a;
    } else {
      j["auto"] = nullptr;
    }
    j["joint"] = run.joint;
    j["method"] = run.method;
    j["rows"] = run.row_labels;
    j["reference_nll"] = {run.nll_before, run.nll_after};
    j["state_bytes"] = run.state_bytes;
    j["trainable_parameters"] = run.trainable;
    j["trainable_parameters_per_stage"] = run.trainable_per_stage;
    j["seconds"] = run.seconds;
    j["stage_train_seconds"] = run.stage_train_seconds;
    j["stage_eval_seconds"] = run.stage_eval_seconds;
    j["stage_steps"] = run.stage_steps;
    j["stage_final_loss"] = run.stage_final_loss;
    j["stage_merge_seconds"] = run.stage_merge_seconds;
    j["stage_state_bytes"] = run.stage_state_bytes;
    auto nan_to_null = [](const std::vector<double>& v) {
      json a = json::array();
      for (double x : v) a.push_back(std::isnan(x) ? json(nullptr) : json(x));
      return a;
    };
    j["stage_share_k_beta"] = nan_to_null(run.stage_share_k_beta);
    j["stage_share_k_alpha"] = nan_to_null(run.stage_share_k_alpha);
    if (run.method == "pm") {
      j["pm_alphas"] = run.pm_alphas;
      j["pm_merge_terms"] = run.pm_merge_terms;
    }
    j["method_config"] = json::parse(run.method_config_json, nullptr, false);
    jm[run.name] = j;
  }
  out["methods"] = jm;
  json jf = json::object();
  for (const auto& [name, why] : failures) jf[name] = why;
  out["failed"] = jf;
  out["total_seconds"] = r.seconds;
  if (!args.json_out.empty()) {
    absl::Status s =
        WriteFileAtomic(args.json_out, out.dump(1, ' ', false, json::error_handler_t::replace) + "\n");
    if (!s.ok()) {
      std::fprintf(stderr, "strata bench cl: writing %s: %s\n", args.json_out.c_str(),
                   std::string(s.message()).c_str());
      exit_code = kExitFailed;
    } else {
      std::printf("wrote %s\n", args.json_out.c_str());
    }
  }

  // ---- plots ------------------------------------------------------------------------------------
  if (!args.plots_dir.empty()) {
    const std::string gnuplot = FindGnuplot();
    if (gnuplot.empty()) {
      std::printf("plots skipped: gnuplot not found on PATH (Debian: apt-get install gnuplot-nox)\n");
    } else if (absl::Status s = WritePlots(args.plots_dir, runs, tasks, base); !s.ok()) {
      std::fprintf(stderr, "strata bench cl: plots: %s\n", std::string(s.message()).c_str());
      exit_code = kExitFailed;
    } else {
      std::printf("wrote plots to %s\n", args.plots_dir.c_str());
    }
  }
  return exit_code;
}

}  // namespace strata::bench
