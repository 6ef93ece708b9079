// gnuplot-driven PNG plots: see gnuplot.h.

#include "bench/gnuplot.h"

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"

namespace strata::bench {
namespace {

// A gnuplot single-quoted string ('' escapes a quote).
std::string Quote(const std::string& s) {
  return absl::StrCat("'", absl::StrReplaceAll(s, {{"'", "''"}}), "'");
}

std::string Num(double v) { return std::isnan(v) ? std::string("NaN") : absl::StrFormat("%.6g", v); }

bool HasPngCairo(const std::string& gnuplot) {
  static int cached = -1;
  if (cached < 0) {
    const std::string cmd = absl::StrCat("echo 'set terminal' | '", gnuplot, "' 2>&1 | grep -q pngcairo");
    cached = std::system(cmd.c_str()) == 0 ? 1 : 0;
  }
  return cached == 1;
}

std::string Header(const std::string& gnuplot, const std::string& png, int width, int height) {
  std::string s = HasPngCairo(gnuplot)
                      ? absl::StrFormat("set terminal pngcairo size %d,%d font 'Sans,9'\n", width, height)
                      : absl::StrFormat("set terminal png size %d,%d\n", width, height);
  absl::StrAppend(&s, "set termoption noenhanced\nset output ", Quote(png), "\n");
  return s;
}

absl::Status Run(const std::string& png, const std::string& script) {
  const std::string gnuplot = FindGnuplot();
  if (gnuplot.empty()) return absl::FailedPreconditionError("gnuplot not found on PATH");
  std::remove(png.c_str());
  const std::string cmd = absl::StrCat("'", gnuplot, "' 2>&1");
  FILE* pipe = popen(cmd.c_str(), "w");
  if (pipe == nullptr) return absl::InternalError(absl::StrCat("cannot start ", gnuplot));
  std::fwrite(script.data(), 1, script.size(), pipe);
  const int status = pclose(pipe);
  if (status != 0) {
    return absl::InternalError(absl::StrCat("gnuplot failed (status ", status, ") drawing ", png));
  }
  struct stat st;
  if (stat(png.c_str(), &st) != 0 || st.st_size == 0) {
    return absl::InternalError(absl::StrCat("gnuplot wrote no ", png));
  }
  return absl::OkStatus();
}

std::string Tics(const std::vector<std::string>& labels) {
  std::string s = "(";
  for (size_t i = 0; i < labels.size(); ++i) {
    absl::StrAppend(&s, i ? ", " : "", Quote(labels[i]), " ", i);
  }
  return s + ")";
}

}  // namespace

std::string FindGnuplot() {
  const char* path = std::getenv("PATH");
  const std::string p = path != nullptr ? path : "/usr/local/bin:/usr/bin:/bin";
  for (absl::string_view dir : absl::StrSplit(p, ':', absl::SkipEmpty())) {
    const std::string candidate = absl::StrCat(std::string(dir), "/gnuplot");
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

absl::Status PlotHeatmap(const std::string& png, const std::string& title,
                         const std::vector<std::string>& rows, const std::vector<std::string>& cols,
                         const std::vector<std::vector<double>>& values) {
  const int width = 220 + 110 * static_cast<int>(cols.size());
  const int height = 140 + 44 * static_cast<int>(rows.size());
  std::string s = Header(FindGnuplot(), png, std::max(width, 480), std::max(height, 300));
  absl::StrAppend(&s, "$M << EOD\n");
  for (const auto& row : values) {
    for (size_t j = 0; j < row.size(); ++j) absl::StrAppend(&s, j ? " " : "", Num(row[j]));
    absl::StrAppend(&s, "\n");
  }
  absl::StrAppend(&s, "EOD\n");
  absl::StrAppend(
      &s, "set title ", Quote(title), "\n", "set xtics ", Tics(cols), " scale 0\n", "set ytics ", Tics(rows),
      " scale 0\n",
      absl::StrFormat("set xrange [-0.5:%f]\nset yrange [%f:-0.5]\n", cols.size() - 0.5, rows.size() - 0.5),
      "set cbrange [0:1]\nset cblabel 'score'\n",
      "set palette defined (0 '#f7fbff', 0.5 '#6baed6', 1 '#08519c')\n",
      "set xlabel 'evaluated task'\nset ylabel 'after stage'\n", "plot $M matrix with image notitle, ",
      "$M matrix using 1:2:($3 == $3 ? sprintf('%.2f', $3) : '') with labels notitle\n");
  return Run(png, s);
}

absl::Status PlotLines(const std::string& png, const std::string& title, const std::string& xlabel,
                       const std::string& ylabel, const std::vector<std::string>& x_labels,
                       const std::vector<std::string>& series, const std::vector<std::vector<double>>& values,
                       double ymin, double ymax) {
  std::string s = Header(FindGnuplot(), png, 640, 400);
  absl::StrAppend(&s, "$D << EOD\n");
  for (size_t i = 0; i < values.size(); ++i) {
    absl::StrAppend(&s, i);
    for (double v : values[i]) absl::StrAppend(&s, " ", Num(v));
    absl::StrAppend(&s, "\n");
  }
  absl::StrAppend(&s, "EOD\n");
  absl::StrAppend(
      &s, "set title ", Quote(title), "\n", "set xtics ", Tics(x_labels), "\n",
      absl::StrFormat("set xrange [-0.2:%f]\nset yrange [%g:%g]\n", x_labels.size() - 0.8, ymin, ymax),
      "set xlabel ", Quote(xlabel), "\nset ylabel ", Quote(ylabel), "\n",
      "set key outside right\nset grid ytics\nplot ");
  for (size_t k = 0; k < series.size(); ++k) {
    absl::StrAppend(&s, k ? ", " : "", "$D using 1:", k + 2, " with linespoints lw 2 pt 7 title ",
                    Quote(series[k]));
  }
  absl::StrAppend(&s, "\n");
  return Run(png, s);
}

absl::Status PlotBars(const std::string& png, const std::string& title,
                      const std::vector<std::string>& groups, const std::vector<std::string>& series,
                      const std::vector<std::vector<double>>& values, double ymin, double ymax) {
  std::string s = Header(FindGnuplot(), png, std::max(480, 120 + 80 * static_cast<int>(groups.size())), 400);
  absl::StrAppend(&s, "$D << EOD\n");
  for (size_t i = 0; i < values.size(); ++i) {
    absl::StrAppend(&s, "\"", absl::StrReplaceAll(groups[i], {{"\"", "'"}}), "\"");
    for (double v : values[i]) absl::StrAppend(&s, " ", Num(v));
    absl::StrAppend(&s, "\n");
  }
  absl::StrAppend(&s, "EOD\n");
  absl::StrAppend(&s, "set title ", Quote(title), "\n",
                  "set style data histograms\nset style histogram clustered gap 1\n",
                  "set style fill solid 0.8 border -1\nset boxwidth 0.9\n",
                  absl::StrFormat("set yrange [%g:%g]\n", ymin, ymax),
                  "set grid ytics\nset xzeroaxis lt -1\n",
                  "set key outside right\nset xtics rotate by -30\nplot ");
  for (size_t k = 0; k < series.size(); ++k) {
    absl::StrAppend(&s, k ? ", " : "", "$D using ", k + 2, k == 0 ? ":xtic(1)" : "", " title ",
                    Quote(series[k]));
  }
  absl::StrAppend(&s, "\n");
  return Run(png, s);
}

}  // namespace strata::bench
