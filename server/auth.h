#pragma once
// Bearer-token authentication of RPCs ("authorization: Bearer <token>" metadata).
//
// The services call Check() first thing in every handler they protect (AdaptationService and
// AdminService always when a token is configured; InferenceService with --auth_inference). Health
// and reflection are never checked. A handler-level check is used rather than an interceptor:
// gRPC 1.51's server interceptors cannot fail a call with a status, and an AuthMetadataProcessor
// needs TLS credentials (insecure credentials abort on it).
//
// The comparison is constant-time over SHA-256 digests, so neither the token's bytes nor its
// length leak through timing.
//
// Thread safety: immutable after construction; Check() is safe from any thread.

#include <grpcpp/server_context.h>
#include <grpcpp/support/status.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace strata {

class BearerAuth {
 public:
  // Reads the token from `path` (surrounding whitespace removed). INVALID_ARGUMENT naming the file
  // when it is empty, NOT_FOUND when missing.
  static absl::StatusOr<std::unique_ptr<BearerAuth>> FromFile(const std::string& path);
  explicit BearerAuth(const std::string& token);

  // OK when the call carries the token; UNAUTHENTICATED (saying what is missing) otherwise.
  grpc::Status Check(const grpc::ServerContext& context) const;
  // The same check for an HTTP request's Authorization header (null when absent): OK, or
  // UNAUTHENTICATED saying what is missing.
  absl::Status CheckHeader(const std::string* authorization) const;

 private:
  // OK when `value` is "Bearer <the token>"; UNAUTHENTICATED naming `what` otherwise.
  absl::Status CheckValue(absl::string_view value, absl::string_view what) const;
  std::string digest_;  // raw SHA-256 of the token
};

// Checks TLS material before gRPC sees it (gRPC only fails to bind, which reads like a busy port):
// `cert_pem` must hold at least one PEM certificate, `key_pem` an unencrypted PEM private key,
// and the key must belong to the first certificate. INVALID_ARGUMENT naming the flag and file.
absl::Status CheckTlsKeyPair(const std::string& cert_pem, const std::string& cert_path,
                             const std::string& key_pem, const std::string& key_path);

// Check() when `auth` is set, OK otherwise (auth disabled or not required for this service).
inline grpc::Status Authorize(const BearerAuth* auth, const grpc::ServerContext& context) {
  return auth ? auth->Check(context) : grpc::Status::OK;
}

}  // namespace strata
