#include "client/cli_common.h"

#include <google/protobuf/util/json_util.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <iostream>
#include <sstream>

#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "nlohmann/json.hpp"

namespace strata::cli {

std::shared_ptr<grpc::Channel> Connect(const GlobalOptions& opts) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(256 << 20);
  args.SetMaxSendMessageSize(256 << 20);
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (!opts.tls_ca.empty()) {
    std::ifstream in(opts.tls_ca);
    std::stringstream ss;
    ss << in.rdbuf();
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = ss.str();
    credentials = grpc::SslCredentials(ssl);
    if (!opts.tls_server_name.empty()) args.SetSslTargetNameOverride(opts.tls_server_name);
  }
  auto channel = grpc::CreateCustomChannel(opts.server, credentials, args);
  auto deadline = std::chrono::system_clock::now() +
                  std::chrono::milliseconds(static_cast<int64_t>(opts.timeout_seconds * 1000));
  if (!channel->WaitForConnected(deadline)) {
    if (opts.json) {
      std::cout << nlohmann::json{{"error", "unreachable"}, {"server", opts.server}}.dump() << "\n";
    }
    std::fprintf(stderr, "strata: cannot reach a server at %s (is strata-server running? see --server)\n",
                 opts.server.c_str());
    return nullptr;
  }
  return channel;
}

void PrepareContext(grpc::ClientContext* ctx, const GlobalOptions& opts, bool with_deadline) {
  if (with_deadline) {
    ctx->set_deadline(std::chrono::system_clock::now() +
                      std::chrono::milliseconds(static_cast<int64_t>(opts.timeout_seconds * 1000)));
  }
  if (!opts.auth_token_file.empty()) {
    std::ifstream in(opts.auth_token_file);
    std::stringstream ss;
    ss << in.rdbuf();
    std::string token(absl::StripAsciiWhitespace(ss.str()));
    ctx->AddMetadata("authorization", "Bearer " + token);
  }
}

int ReportRpcError(const std::string& what, const grpc::Status& status, const GlobalOptions& opts) {
  static const char* kNames[] = {
      "OK",        "CANCELLED",      "UNKNOWN",           "INVALID_ARGUMENT",   "DEADLINE_EXCEEDED",
      "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
      "ABORTED",   "OUT_OF_RANGE",   "UNIMPLEMENTED",     "INTERNAL",           "UNAVAILABLE",
      "DATA_LOSS", "UNAUTHENTICATED"};
  int code = static_cast<int>(status.error_code());
  std::string name = code >= 0 && code <= 16 ? kNames[code] : "UNKNOWN";
  if (opts.json) {
    std::cout << nlohmann::json{{"error", name}, {"message", status.error_message()}}.dump() << "\n";
  }
  std::fprintf(stderr, "strata: %s failed: %s: %s\n", what.c_str(), name.c_str(),
               status.error_message().c_str());
  return status.error_code() == grpc::StatusCode::UNAVAILABLE ? kExitUnreachable : kExitServerError;
}

void PrintKeyValues(const std::vector<std::pair<std::string, std::string>>& rows) {
  size_t width = 0;
  for (const auto& [k, v] : rows) width = std::max(width, k.size());
  for (const auto& [k, v] : rows) {
    std::cout << absl::StrFormat("%-*s  %s\n", static_cast<int>(width), k, v);
  }
}

void PrintTable(const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> widths(header.size(), 0);
  auto measure = [&](const std::vector<std::string>& row) {
    for (size_t i = 0; i < row.size() && i < widths.size(); ++i)
      widths[i] = std::max(widths[i], row[i].size());
  };
  measure(header);
  for (const auto& r : rows) measure(r);
  auto print = [&](const std::vector<std::string>& row) {
    std::string line;
    for (size_t i = 0; i < row.size() && i < widths.size(); ++i) {
      if (i + 1 == row.size()) {
        line += row[i];
      } else {
        line += absl::StrFormat("%-*s  ", static_cast<int>(widths[i]), row[i]);
      }
    }
    std::cout << line << "\n";
  };
  print(header);
  for (const auto& r : rows) print(r);
}

std::string FormatBytes(int64_t n) {
  if (n >= (int64_t{1} << 30)) return absl::StrFormat("%.1f GiB", n / 1073741824.0);
  if (n >= (int64_t{1} << 20)) return absl::StrFormat("%.1f MiB", n / 1048576.0);
  if (n >= (int64_t{1} << 10)) return absl::StrFormat("%.1f KiB", n / 1024.0);
  return absl::StrFormat("%d B", n);
}

std::string FormatScore(double v) { return std::isfinite(v) ? absl::StrFormat("%.4f", v) : "-"; }

std::string FormatTimestamp(int64_t unix_seconds) {
  if (unix_seconds <= 0) return "-";
  time_t t = static_cast<time_t>(unix_seconds);
  struct tm tm;
  localtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}

std::string ProtoToJson(const google::protobuf::Message& message) {
  std::string json;
  google::protobuf::util::JsonPrintOptions po;
  po.always_print_primitive_fields = true;
  po.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(message, &json, po);
  return json;
}

int UsageError(const std::string& message, const GlobalOptions& opts) {
  if (opts.json) std::cout << nlohmann::json{{"error", "usage"}, {"message", message}}.dump() << "\n";
  std::fprintf(stderr, "strata: %s\n", message.c_str());
  return kExitUsage;
}

bool StderrIsTerminal() { return ::isatty(STDERR_FILENO) == 1; }

ProgressLine::ProgressLine(double plain_interval_seconds)
    : tty_(StderrIsTerminal()), interval_(plain_interval_seconds) {}

ProgressLine::~ProgressLine() {
  if (tty_ && open_) std::fputs("\n", stderr);
}

void ProgressLine::Update(const std::string& text, bool force) {
  double now = std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  if (tty_) {
    if (!force && now - last_ < 0.1) return;
    last_ = now;
    std::string line = text;
    if (line.size() < width_) line.append(width_ - line.size(), ' ');
    width_ = text.size();
    std::fprintf(stderr, "\r%s", line.c_str());
    std::fflush(stderr);
    open_ = true;
    return;
  }
  if (!force && now - last_ < interval_) return;
  if (text == last_text_) return;
  last_ = now;
  last_text_ = text;
  std::fprintf(stderr, "%s\n", text.c_str());
}

void ProgressLine::Finish(const std::string& text) {
  Update(text, /*force=*/true);
  if (tty_ && open_) {
    std::fputs("\n", stderr);
    open_ = false;
    width_ = 0;
  }
}

std::string Bar(double fraction, int width) {
  fraction = std::clamp(fraction, 0.0, 1.0);
  int full = static_cast<int>(fraction * width + 0.5);
  return "[" + std::string(full, '#') + std::string(width - full, '-') + "]";
}

std::string FormatCount(int64_t n) {
  if (n >= 1000000000) return absl::StrFormat("%.2fB", n / 1e9);
  if (n >= 1000000) return absl::StrFormat("%.2fM", n / 1e6);
  if (n >= 1000) return absl::StrFormat("%.1fK", n / 1e3);
  return absl::StrFormat("%d", n);
}

std::string FormatDuration(double s) {
  int64_t t = static_cast<int64_t>(s);
  if (t >= 3600) return absl::StrFormat("%dh %dm %ds", t / 3600, (t % 3600) / 60, t % 60);
  if (t >= 60) return absl::StrFormat("%dm %ds", t / 60, t % 60);
  return absl::StrFormat("%.1fs", s);
}

}  // namespace strata::cli
