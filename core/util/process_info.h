#pragma once
// Facts about the running process read from /proc (Linux). All functions are thread-safe.

#include <cstdint>

namespace strata {

struct ProcessStats {
  double cpu_seconds = 0;          // user + system
  int64_t resident_bytes = 0;
  int64_t virtual_bytes = 0;
  double start_time_seconds = 0;   // since the Unix epoch
  int64_t open_fds = 0;
  int64_t max_fds = 0;
  int64_t threads = 0;
};

ProcessStats ReadProcessStats();

}  // namespace strata
