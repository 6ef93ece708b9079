#pragma once
// Small PNG plots for the benchmarks, drawn by the gnuplot program (Debian gnuplot-nox): the
// script and the data (inline datablocks) go to gnuplot's stdin; nothing else is written but the
// PNG. Terminal pngcairo when gnuplot has it, else png.
//
// Thread safety: each call runs its own gnuplot process. Failures: FAILED_PRECONDITION when
// gnuplot is missing, INTERNAL when it exits non-zero or writes no file (the message names it).

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace strata::bench {

// The path of an executable `gnuplot` on PATH, or "" when there is none.
std::string FindGnuplot();

// Heatmap of values[row][col] (NaN cells blank) with the value printed in each cell; colour range
// [0, 1]; rows top to bottom.
absl::Status PlotHeatmap(const std::string& png, const std::string& title,
                         const std::vector<std::string>& rows, const std::vector<std::string>& cols,
                         const std::vector<std::vector<double>>& values);

// One line per series: values[x][series], x labelled by x_labels.
absl::Status PlotLines(const std::string& png, const std::string& title, const std::string& xlabel,
                       const std::string& ylabel, const std::vector<std::string>& x_labels,
                       const std::vector<std::string>& series, const std::vector<std::vector<double>>& values,
                       double ymin, double ymax);

// Clustered bars: values[group][series].
absl::Status PlotBars(const std::string& png, const std::string& title,
                      const std::vector<std::string>& groups, const std::vector<std::string>& series,
                      const std::vector<std::vector<double>>& values, double ymin, double ymax);

}  // namespace strata::bench
