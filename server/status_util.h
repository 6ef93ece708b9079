#pragma once
// The one place where absl::Status becomes grpc::Status (house style: map errors once, at the edge).

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace strata {

grpc::Status ToGrpcStatus(const absl::Status& status);
grpc::StatusCode ToGrpcCode(absl::StatusCode code);

}  // namespace strata
