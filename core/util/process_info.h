#pragma once
// Facts about the running process read from /proc (Linux). All functions are thread-safe.

#include <cstdint>

namespace strata {

struct ProcessStats {
  double cpu_seconds = 0;  // user + system
  int64_t resident_bytes = 0;
  int64_t virtual_bytes = 0;
  double start_time_seconds = 0;  // since the Unix epoch
  int64_t open_fds = 0;
  int64_t max_fds = 0;
  int64_t threads = 0;
};

ProcessStats ReadProcessStats();

// Peak resident set size of the process (VmHWM of /proc/self/status), in bytes; 0 if unreadable.
int64_t PeakResidentBytes();
// Resets the peak (VmHWM) to the current resident size (writes "5" to /proc/self/clear_refs,
// Linux >= 4.0). Returns false when the kernel refuses; the peak then keeps counting from the
// process start.
bool ResetPeakResident();

}  // namespace strata
