#pragma once
// Shared pieces of the `strata` CLI: exit codes, output helpers, server connection.

#include <google/protobuf/message.h>
#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace strata::cli {

// Exit codes (documented in README): the contract scripts rely on.
inline constexpr int kExitOk = 0;
inline constexpr int kExitServerError = 1;  // the server answered with an error
inline constexpr int kExitUsage = 2;        // bad command line or bad local input
inline constexpr int kExitUnreachable = 3;  // no server at --server

struct GlobalOptions {
  std::string server = "127.0.0.1:50051";
  bool json = false;
  double timeout_seconds = 10;  // connect + unary RPC deadline
  std::string auth_token_file;
  std::string tls_ca;           // PEM roots: connect with TLS when set
  std::string tls_server_name;  // overrides the name checked against the server certificate
};

// Connects (waits up to timeout). nullptr + message on stderr when unreachable.
std::shared_ptr<grpc::Channel> Connect(const GlobalOptions& opts);

// Adds deadline and auth metadata to a client context.
void PrepareContext(grpc::ClientContext* ctx, const GlobalOptions& opts, bool with_deadline = true);

// Prints an RPC error and returns the exit code for it (3 for UNAVAILABLE, else 1).
int ReportRpcError(const std::string& what, const grpc::Status& status, const GlobalOptions& opts);

// One unary RPC of `Service` on a fresh connection: `call(stub, &ctx, &response)` issues it and
// returns its status. On failure prints the error, sets *exit_code (3 unreachable, 1 server error)
// and returns nullopt.
template <typename Service, typename Response, typename Call>
std::optional<Response> CallUnary(const GlobalOptions& opts, int* exit_code, const std::string& rpc,
                                  Call&& call, bool with_deadline = true) {
  auto channel = Connect(opts);
  if (!channel) {
    *exit_code = kExitUnreachable;
    return std::nullopt;
  }
  auto stub = Service::NewStub(channel);
  grpc::ClientContext ctx;
  PrepareContext(&ctx, opts, with_deadline);
  Response response;
  grpc::Status st = call(*stub, &ctx, &response);
  if (!st.ok()) {
    *exit_code = ReportRpcError(rpc, st, opts);
    return std::nullopt;
  }
  return response;
}

// Prints rows as an aligned two-column table.
void PrintKeyValues(const std::vector<std::pair<std::string, std::string>>& rows);

// Prints rows as an aligned table under `header` (columns separated by two spaces).
void PrintTable(const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows);

// Human-readable numbers.
std::string FormatCount(int64_t n);                 // 1234567 -> "1.23M"
std::string FormatDuration(double s);               // 3725 -> "1h 2m 5s"
std::string FormatBytes(int64_t n);                 // 1536 -> "1.5 KiB"
std::string FormatScore(double v);                  // 0.45 -> "0.4500"; NaN -> "-"
std::string FormatTimestamp(int64_t unix_seconds);  // local time "2024-05-01 12:00:00"; 0 -> "-"

// A message as one JSON line (proto field names, defaults included).
std::string ProtoToJson(const google::protobuf::Message& message);

// Prints a usage-type error (bad local input) and returns kExitUsage.
int UsageError(const std::string& message, const GlobalOptions& opts);

bool StderrIsTerminal();

// A progress indicator on stderr: redrawn in place ("\r") on a terminal; otherwise plain lines,
// at most one per `plain_interval_seconds` (Finish always prints the last one).
class ProgressLine {
 public:
  explicit ProgressLine(double plain_interval_seconds = 2.0);
  ~ProgressLine();
  void Update(const std::string& text, bool force = false);
  void Finish(const std::string& text);

 private:
  bool tty_;
  double interval_;
  double last_ = -1e9;
  size_t width_ = 0;
  bool open_ = false;
  std::string last_text_;  // plain mode: never print the same line twice
};

// "[#####-----]" of `width` cells for fraction in [0, 1].
std::string Bar(double fraction, int width = 24);

}  // namespace strata::cli
