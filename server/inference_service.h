#pragma once
// strata.v1.InferenceService: transport only. Each request takes the served version once
// (Engine::Current()) and runs start to finish on it, even when the worker publishes a newer one
// meanwhile; every response names that version. A request sets its own LibTorch thread budget
// (OpenMP thread counts are per calling thread).
//
// Thread safety: handlers run concurrently on gRPC's threads; they only read immutable served
// versions.

#include <cstdint>

#include "core/state/engine.h"
#include "server/auth.h"
#include "server/metrics.h"
#include "strata/v1/inference.grpc.pb.h"

namespace strata {

struct InferenceOptions {
  int serving_threads = 1;
  int32_t max_new_tokens = 1024;  // per request
};

class InferenceServiceImpl final : public strata::v1::InferenceService::Service {
 public:
  // Not owned; must outlive the service. `auth` null = no token required; `metrics` may be null.
  InferenceServiceImpl(const Engine* engine, const BearerAuth* auth, ServerMetrics* metrics,
                       InferenceOptions options);

  grpc::Status Generate(grpc::ServerContext* context, const strata::v1::GenerateRequest* request,
                        grpc::ServerWriter<strata::v1::GenerateResponse>* writer) override;
  grpc::Status Score(grpc::ServerContext* context, const strata::v1::ScoreRequest* request,
                     strata::v1::ScoreResponse* response) override;
  grpc::Status Tokenize(grpc::ServerContext* context, const strata::v1::TokenizeRequest* request,
                        strata::v1::TokenizeResponse* response) override;

 private:
  const Engine* engine_;
  const BearerAuth* auth_;
  ServerMetrics* metrics_;
  const InferenceOptions options_;
};

}  // namespace strata
