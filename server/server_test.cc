// Unit tests of the transport helpers: bearer-token checks, path confinement, the OpenAI HTTP
// request parser and error mapping.

#include <grpcpp/test/server_context_test_spouse.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "nlohmann/json.hpp"
#include "server/admin_service.h"
#include "server/auth.h"
#include "server/openai_http.h"
#include "server/status_util.h"

namespace strata {
namespace {

namespace fs = std::filesystem;

grpc::StatusCode CheckWith(const BearerAuth& auth, const char* value) {
  grpc::ServerContext ctx;
  grpc::testing::ServerContextTestSpouse spouse(&ctx);
  if (value != nullptr) spouse.AddClientMetadata("authorization", value);
  return auth.Check(ctx).error_code();
}

TEST(BearerAuth, AcceptsOnlyTheToken) {
  BearerAuth auth("s3cret");
  EXPECT_EQ(CheckWith(auth, "Bearer s3cret"), grpc::StatusCode::OK);
  EXPECT_EQ(CheckWith(auth, "bearer s3cret"), grpc::StatusCode::OK);
  EXPECT_EQ(CheckWith(auth, "Bearer  s3cret "), grpc::StatusCode::OK);
  EXPECT_EQ(CheckWith(auth, nullptr), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(CheckWith(auth, "Bearer s3cre"), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(CheckWith(auth, "Bearer s3cret2"), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(CheckWith(auth, "Basic s3cret"), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(CheckWith(auth, "s3cret"), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(CheckWith(auth, ""), grpc::StatusCode::UNAUTHENTICATED);
}

TEST(BearerAuth, ReadsTheTokenFileAndRefusesAnEmptyOne) {
  const std::string dir = fs::temp_directory_path() / ("strata-auth-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::ofstream(dir + "/token") << "  tok-123\n";
  std::ofstream(dir + "/empty") << " \n";
  auto auth = BearerAuth::FromFile(dir + "/token");
  ASSERT_TRUE(auth.ok()) << auth.status();
  EXPECT_EQ(CheckWith(**auth, "Bearer tok-123"), grpc::StatusCode::OK);
  auto empty = BearerAuth::FromFile(dir + "/empty");
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(empty.status().message().find(dir + "/empty"), std::string::npos);
  EXPECT_EQ(BearerAuth::FromFile(dir + "/missing").status().code(), absl::StatusCode::kNotFound);
  fs::remove_all(dir);
}

TEST(ConfinePath, KeepsPathsUnderTheRoot) {
  const std::string root = fs::temp_directory_path() / ("strata-root-" + std::to_string(::getpid()));
  fs::create_directories(root + "/inside");
  fs::create_directory_symlink("/etc", root + "/link");
  EXPECT_EQ(*ConfinePath(root, "out", "dir"), root + "/out");
  EXPECT_EQ(*ConfinePath(root, "inside/../out", "dir"), root + "/out");
  EXPECT_EQ(*ConfinePath(root, root + "/inside/x", "dir"), root + "/inside/x");
  EXPECT_EQ(ConfinePath(root, "../escape", "dir").status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(ConfinePath(root, "/tmp", "dir").status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(ConfinePath(root, "link/passwd", "dir").status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(ConfinePath(root, root + "-sibling/x", "dir").status().code(),
            absl::StatusCode::kPermissionDenied);
  auto empty = ConfinePath(root, "", "dirs[0]");
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(empty.status().message().find("dirs[0]"), std::string::npos);
  fs::remove_all(root);
}

TEST(StatusUtil, KeepsCodeAndMessage) {
  grpc::Status st = ToGrpcStatus(absl::ResourceExhaustedError("queue full"));
  EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(st.error_message(), "queue full");
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  EXPECT_EQ(ToGrpcCode(absl::StatusCode::kUnauthenticated), grpc::StatusCode::UNAUTHENTICATED);
}

TEST(BearerAuth, ChecksTheHttpHeaderToo) {
  BearerAuth auth("s3cret");
  const std::string good = "Bearer s3cret", lower = "bearer s3cret", wrong = "Bearer nope",
                    basic = "Basic s3cret";
  EXPECT_TRUE(auth.CheckHeader(&good).ok());
  EXPECT_TRUE(auth.CheckHeader(&lower).ok());
  EXPECT_TRUE(absl::IsUnauthenticated(auth.CheckHeader(nullptr)));
  EXPECT_TRUE(absl::IsUnauthenticated(auth.CheckHeader(&wrong)));
  EXPECT_TRUE(absl::IsUnauthenticated(auth.CheckHeader(&basic)));
  EXPECT_NE(auth.CheckHeader(nullptr).message().find("Authorization: Bearer"), std::string::npos);
}

absl::StatusOr<CompletionRequest> Parse(const std::string& body) {
  HttpOptions o;
  o.max_new_tokens = 100;
  o.max_choices = 8;
  return ParseCompletionRequest(body, o);
}

void ExpectInvalid(const std::string& body, const std::string& starts_with) {
  auto r = Parse(body);
  ASSERT_FALSE(r.ok()) << body;
  EXPECT_TRUE(absl::IsInvalidArgument(r.status())) << r.status();
  EXPECT_EQ(std::string(r.status().message()).rfind(starts_with, 0), 0u) << body << " -> " << r.status();
}

TEST(OpenAiHttp, ParsesACompletionRequestWithOpenAisDefaults) {
  auto r = Parse(R"({"prompt": "Once upon a time"})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->prompts, std::vector<std::string>{"Once upon a time"});
  EXPECT_EQ(r->model, "auto");
  EXPECT_EQ(r->sampling.max_new_tokens, 16);
  EXPECT_FLOAT_EQ(r->sampling.temperature, 1.0f);
  EXPECT_FLOAT_EQ(r->sampling.top_p, 1.0f);
  EXPECT_EQ(r->n, 1);
  EXPECT_FALSE(r->stream);
  EXPECT_FALSE(r->seeded);
  EXPECT_EQ(r->logprobs, -1);
  EXPECT_FALSE(r->sampling.logprobs);
  EXPECT_TRUE(r->sampling.stop_on_eos);

  r = Parse(R"({"model": "capitals", "prompt": ["a", "b"], "max_tokens": 100, "temperature": 0, "top_p": 0.5,
               "top_k": -1, "n": 4, "seed": 9, "stop": ["\n", "."], "logprobs": 3, "stream": true,
               "stream_options": {"include_usage": true}, "ignore_eos": true, "user": "me", "best_of": 4,
               "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "suffix": null, "echo": null})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->model, "capitals");
  EXPECT_EQ(r->prompts.size(), 2u);
  EXPECT_EQ(r->sampling.max_new_tokens, 100);
  EXPECT_EQ(r->sampling.temperature, 0.0f);
  EXPECT_FLOAT_EQ(r->sampling.top_p, 0.5f);
  EXPECT_EQ(r->sampling.top_k, 0);
  EXPECT_EQ(r->n, 4);
  EXPECT_TRUE(r->seeded);
  EXPECT_EQ(r->sampling.seed, 9u);
  EXPECT_EQ(r->sampling.stop_strings, (std::vector<std::string>{"\n", "."}));
  EXPECT_EQ(r->logprobs, 3);
  EXPECT_TRUE(r->sampling.logprobs);
  EXPECT_EQ(r->sampling.top_logprobs, 3);
  EXPECT_TRUE(r->stream);
  EXPECT_TRUE(r->include_usage);
  EXPECT_FALSE(r->sampling.stop_on_eos);
}

TEST(OpenAiHttp, RefusesBadRequestsNamingTheParameter) {
  ExpectInvalid("{nope", "the request body is not valid JSON");
  ExpectInvalid("[1]", "the request body must be a JSON object");
  ExpectInvalid(R"({"max_tokens": 3})", "prompt: is required");
  ExpectInvalid(R"({"prompt": ""})", "prompt: must not be empty");
  ExpectInvalid(R"({"prompt": ["a", ""]})", "prompt[1]: must not be empty");
  ExpectInvalid(R"({"prompt": [1, 2]})", "prompt: token-id prompts are not supported");
  ExpectInvalid(R"({"prompt": []})", "prompt: the list is empty");
  ExpectInvalid(R"({"prompt": "a", "max_tokens": 101})",
                "max_tokens: 101 is more than this server's limit 100");
  ExpectInvalid(R"({"prompt": "a", "max_tokens": -1})", "max_tokens: must be in [0,");
  ExpectInvalid(R"({"prompt": "a", "max_tokens": 1.5})", "max_tokens: must be an integer");
  ExpectInvalid(R"({"prompt": "a", "temperature": -1})", "temperature: must be >= 0");
  ExpectInvalid(R"({"prompt": "a", "temperature": "hot"})", "temperature: must be a number");
  ExpectInvalid(R"({"prompt": "a", "top_p": 0})", "top_p: must be in (0, 1]");
  ExpectInvalid(R"({"prompt": "a", "n": 9})", "n: must be in [1, 8]");
  ExpectInvalid(R"({"prompt": ["a", "b", "c"], "n": 3})", "n: 3 prompts x n = 3 is more than 8");
  ExpectInvalid(R"({"prompt": "a", "best_of": 2})", "best_of: is not supported");
  ExpectInvalid(R"({"prompt": "a", "presence_penalty": 1})", "presence_penalty: is not supported");
  ExpectInvalid(R"({"prompt": "a", "logit_bias": {"1": 5}})", "logit_bias: is not supported");
  ExpectInvalid(R"({"prompt": "a", "suffix": "end"})", "suffix: is not supported");
  ExpectInvalid(R"({"prompt": "a", "stop": ["x", ""]})", "stop[1]: stop strings must not be empty");
  ExpectInvalid(R"({"prompt": "a", "stop": 5})", "stop: must be a string");
  ExpectInvalid(R"({"prompt": "a", "logprobs": 21})", "logprobs: must be in [0, 20]");
  ExpectInvalid(R"({"prompt": "a", "logprobs": true})", "logprobs: must be an integer");
  ExpectInvalid(R"({"prompt": "a", "logprobs": 1, "echo": true})", "echo: with logprobs is not supported");
  ExpectInvalid(R"({"prompt": "a", "stream": "yes"})", "stream: must be true or false");
  ExpectInvalid(R"({"prompt": "a", "stream_options": {"include_usage": true}})",
                "stream_options: is only allowed");
  ExpectInvalid(R"({"prompt": "a", "stream": true, "stream_options": {"x": 1}})",
                "stream_options.x: unrecognized");
  ExpectInvalid(R"({"prompt": "a", "max_token": 5})", "max_token: unrecognized request argument");
  ExpectInvalid(R"({"prompt": "a", "model": ""})", "model: must be a non-empty string");
}

TEST(OpenAiHttp, ErrorsUseOpenAisShapeAndHttpCodes) {
  EXPECT_EQ(HttpStatusOf(absl::InvalidArgumentError("x")), 400);
  EXPECT_EQ(HttpStatusOf(absl::UnauthenticatedError("x")), 401);
  EXPECT_EQ(HttpStatusOf(absl::NotFoundError("x")), 404);
  EXPECT_EQ(HttpStatusOf(absl::ResourceExhaustedError("x")), 429);
  EXPECT_EQ(HttpStatusOf(absl::UnavailableError("x")), 503);
  EXPECT_EQ(HttpStatusOf(absl::InternalError("x")), 500);
  const nlohmann::json e =
      nlohmann::json::parse(OpenAiErrorJson(absl::NotFoundError("no learned task 'x'"), "model"));
  EXPECT_EQ(e["error"]["message"], "no learned task 'x'");
  EXPECT_EQ(e["error"]["type"], "invalid_request_error");
  EXPECT_EQ(e["error"]["param"], "model");
  EXPECT_EQ(e["error"]["code"], "model_not_found");
  const nlohmann::json q = nlohmann::json::parse(OpenAiErrorJson(absl::ResourceExhaustedError("full")));
  EXPECT_EQ(q["error"]["type"], "rate_limit_error");
  EXPECT_TRUE(q["error"]["param"].is_null());
}

}  // namespace
}  // namespace strata
