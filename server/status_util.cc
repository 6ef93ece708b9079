#include "server/status_util.h"

#include <string>

namespace strata {

grpc::StatusCode ToGrpcCode(absl::StatusCode code) {
  // absl and gRPC share the canonical code numbering (google.rpc.Code).
  int c = static_cast<int>(code);
  if (c < 0 || c > 16) return grpc::StatusCode::UNKNOWN;
  return static_cast<grpc::StatusCode>(c);
}

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(ToGrpcCode(status.code()), std::string(status.message()));
}

}  // namespace strata
