#include "core/util/process_info.h"

#include <dirent.h>
#include <sys/resource.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace strata {
namespace {

double BootTimeSeconds() {
  std::ifstream in("/proc/stat");
  std::string key;
  while (in >> key) {
    if (key == "btime") {
      double t = 0;
      in >> t;
      return t;
    }
    std::string rest;
    std::getline(in, rest);
  }
  return 0;
}

}  // namespace

ProcessStats ReadProcessStats() {
  ProcessStats s;
  static const double kTicks = static_cast<double>(sysconf(_SC_CLK_TCK));
  static const int64_t kPage = sysconf(_SC_PAGESIZE);
  std::ifstream stat("/proc/self/stat");
  std::string line;
  if (std::getline(stat, line)) {
    // Fields after the command name (which may contain spaces) start after the last ')'.
    auto pos = line.rfind(')');
    std::istringstream rest(line.substr(pos + 2));
    std::vector<std::string> f;
    std::string tok;
    while (rest >> tok) f.push_back(tok);
    // f[0] is field 3 (state); utime=14, stime=15, num_threads=20, starttime=22, vsize=23, rss=24.
    auto field = [&](int n) -> std::string { return n - 3 < static_cast<int>(f.size()) ? f[n - 3] : "0"; };
    s.cpu_seconds = (std::stod(field(14)) + std::stod(field(15))) / kTicks;
    s.threads = std::stoll(field(20));
    s.start_time_seconds = BootTimeSeconds() + std::stod(field(22)) / kTicks;
    s.virtual_bytes = std::stoll(field(23));
    s.resident_bytes = std::stoll(field(24)) * kPage;
  }
  if (DIR* d = opendir("/proc/self/fd")) {
    int64_t n = 0;
    while (readdir(d) != nullptr) ++n;
    closedir(d);
    s.open_fds = n > 2 ? n - 3 : 0;  // ".", ".." and the DIR's own descriptor
  }
  rlimit rl{};
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0) s.max_fds = static_cast<int64_t>(rl.rlim_cur);
  return s;
}

int64_t PeakResidentBytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmHWM:", 0) == 0) {
      std::istringstream f(line.substr(6));
      int64_t kib = 0;
      f >> kib;
      return kib * 1024;
    }
  }
  return 0;
}

bool ResetPeakResident() {
  std::ofstream out("/proc/self/clear_refs");
  if (!out) return false;
  out << "5";
  out.flush();
  return static_cast<bool>(out);
}

}  // namespace strata
