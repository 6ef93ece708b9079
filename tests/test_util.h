#pragma once
// Helpers for integration tests that run the real binaries on 127.0.0.1.

#include <sys/types.h>

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace strata::testing {

// Paths of the built binaries and of ../shared.
std::string BinaryPath(const std::string& name);  // e.g. "strata-server" -> <build>/server/strata-server
std::string SharedPath(const std::string& rel);   // e.g. "models/stories260K"

// The stories260K model directory and a cl-small file (e.g. "capitals/train.jsonl") in ../shared.
std::string Model();
std::string ClSmall(const std::string& rel);

// Writes `text` to `path` (binary, replacing it).
void WriteFile(const std::string& path, const std::string& text);
// The first `n` lines of `src`, written to `path`; returns `path`.
std::string HeadLines(const std::string& src, int n, const std::string& path);
// Polls `done` every 50 ms until it holds or `timeout_seconds` pass; returns its last value.
bool WaitUntil(const std::function<bool()>& done, double timeout_seconds);

// A free TCP port on 127.0.0.1 (bound and released; racy in theory, fine for tests).
int FreePort();

// A fresh temporary directory, removed by the destructor.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

struct CommandResult {
  int exit_code = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};

// Runs argv to completion (with a timeout), capturing stdout and stderr.
CommandResult RunCommand(const std::vector<std::string>& argv, int timeout_seconds = 120,
                         const std::map<std::string, std::string>& env = {});

// A child process (stdout+stderr to a log file) killed by the destructor.
class Subprocess {
 public:
  Subprocess(const std::vector<std::string>& argv, const std::string& log_path,
             const std::map<std::string, std::string>& env = {});
  ~Subprocess();
  pid_t pid() const { return pid_; }
  bool Running();
  // Sends `sig` and waits up to `timeout_seconds`; returns the exit status (or -1).
  int Stop(int sig, int timeout_seconds = 30);
  std::string Log() const;

 private:
  pid_t pid_ = -1;
  std::string log_path_;
  std::optional<int> status_;
};

// Plain HTTP/1.0 GET to 127.0.0.1:port; returns the body, or nullopt on connection failure.
std::optional<std::string> HttpGet(int port, const std::string& path, int* status_code = nullptr);

// Polls `strata health` until SERVING or timeout.
bool WaitForServing(int grpc_port, int timeout_seconds, Subprocess* server);

}  // namespace strata::testing
