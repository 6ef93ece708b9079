// Unit tests of the transport helpers: bearer-token checks and path confinement.

#include <grpcpp/test/server_context_test_spouse.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "server/admin_service.h"
#include "server/auth.h"
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

}  // namespace
}  // namespace strata
