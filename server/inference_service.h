#pragma once
// strata.v1.InferenceService: transport only. Generate and Score go to the decode scheduler
// (core/serve/scheduler.h), which batches every running request and runs all serving forward
// passes on its own thread and thread budget; a handler tokenises nothing heavier than the
// prompt, relays the scheduler's events as stream messages and maps errors. A request is served
// on one version from start to finish (the one current when it joined the batch); every response
// names it. A client that goes away or passes its deadline frees its batch slot at once.
//
// Thread safety: handlers run concurrently on gRPC's threads.

#include <cstdint>
#include <string>

#include "core/serve/scheduler.h"
#include "core/state/engine.h"
#include "server/auth.h"
#include "server/metrics.h"
#include "strata/v1/inference.grpc.pb.h"

namespace strata {

// A token as the vocabulary spells it; a byte piece that is not UTF-8 on its own reads <0xXX>.
std::string TokenDisplayText(const Tokenizer& tokenizer, int32_t id);

// Counts an admission refusal of the scheduler (queue full, prompt too long) in `metrics` (may be
// null).
void CountRefusal(ServerMetrics* metrics, const absl::Status& status);

struct InferenceOptions {
  int32_t max_new_tokens = 1024;  // per request
};

class InferenceServiceImpl final : public strata::v1::InferenceService::Service {
 public:
  // Not owned; must outlive the service. `auth` null = no token required; `metrics` may be null.
  InferenceServiceImpl(const Engine* engine, DecodeScheduler* scheduler, const BearerAuth* auth,
                       ServerMetrics* metrics, InferenceOptions options);

  grpc::Status Generate(grpc::ServerContext* context, const strata::v1::GenerateRequest* request,
                        grpc::ServerWriter<strata::v1::GenerateResponse>* writer) override;
  grpc::Status Score(grpc::ServerContext* context, const strata::v1::ScoreRequest* request,
                     strata::v1::ScoreResponse* response) override;
  grpc::Status Tokenize(grpc::ServerContext* context, const strata::v1::TokenizeRequest* request,
                        strata::v1::TokenizeResponse* response) override;

 private:
  grpc::Status Refused(const absl::Status& status);

  const Engine* engine_;
  DecodeScheduler* scheduler_;
  const BearerAuth* auth_;
  ServerMetrics* metrics_;
  const InferenceOptions options_;
};

}  // namespace strata
