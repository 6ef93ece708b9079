#include "server/auth.h"

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/sha.h>
#include <openssl/x509.h>

#include <string_view>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "core/util/file_util.h"

namespace strata {
namespace {

std::string Digest(absl::string_view data) {
  unsigned char out[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(data.data()), data.size(), out);
  return std::string(reinterpret_cast<const char*>(out), sizeof(out));
}

}  // namespace

absl::StatusOr<std::unique_ptr<BearerAuth>> BearerAuth::FromFile(const std::string& path) {
  auto text = ReadFile(path);
  if (!text.ok()) return text.status();
  std::string token(absl::StripAsciiWhitespace(*text));
  if (token.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("--auth_token_file: ", path, " holds no token"));
  }
  return std::make_unique<BearerAuth>(token);
}

BearerAuth::BearerAuth(const std::string& token) : digest_(Digest(token)) {}

grpc::Status BearerAuth::Check(const grpc::ServerContext& context) const {
  const auto& md = context.client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "this server requires a bearer token: send metadata 'authorization: Bearer <token>' "
                        "(strata --auth-token-file FILE)");
  }
  const absl::Status st =
      CheckValue(absl::string_view(it->second.data(), it->second.size()), "the authorization metadata");
  return st.ok() ? grpc::Status::OK
                 : grpc::Status(grpc::StatusCode::UNAUTHENTICATED, std::string(st.message()));
}

absl::Status BearerAuth::CheckHeader(const std::string* authorization) const {
  if (authorization == nullptr) {
    return absl::UnauthenticatedError(
        "this server requires a bearer token: send the header 'Authorization: Bearer <token>'");
  }
  return CheckValue(*authorization, "the Authorization header");
}

absl::Status BearerAuth::CheckValue(absl::string_view value, absl::string_view what) const {
  constexpr absl::string_view kScheme = "bearer ";
  if (value.size() < kScheme.size() || !absl::EqualsIgnoreCase(value.substr(0, kScheme.size()), kScheme)) {
    return absl::UnauthenticatedError(absl::StrCat(what, " must be 'Bearer <token>'"));
  }
  // Constant-time over the digests.
  const std::string presented = Digest(absl::StripAsciiWhitespace(value.substr(kScheme.size())));
  if (CRYPTO_memcmp(presented.data(), digest_.data(), digest_.size()) != 0) {
    return absl::UnauthenticatedError("invalid bearer token");
  }
  return absl::OkStatus();
}

absl::Status CheckTlsKeyPair(const std::string& cert_pem, const std::string& cert_path,
                             const std::string& key_pem, const std::string& key_path) {
  auto bio_of = [](const std::string& pem) {
    return std::unique_ptr<BIO, decltype(&BIO_free)>(
        BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())), &BIO_free);
  };
  auto cert_bio = bio_of(cert_pem);
  std::unique_ptr<X509, decltype(&X509_free)> cert(
      PEM_read_bio_X509(cert_bio.get(), nullptr, nullptr, nullptr), &X509_free);
  if (!cert) {
    ERR_clear_error();
    return absl::InvalidArgumentError(absl::StrCat("--tls_cert: ", cert_path,
                                                   ": no PEM certificate in the file (expected -----BEGIN "
                                                   "CERTIFICATE-----)"));
  }
  auto key_bio = bio_of(key_pem);
  // An empty passphrase callback: an encrypted key fails instead of prompting on the terminal.
  pem_password_cb* no_password = [](char*, int, int, void*) { return 0; };
  std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> key(
      PEM_read_bio_PrivateKey(key_bio.get(), nullptr, no_password, nullptr), &EVP_PKEY_free);
  if (!key) {
    ERR_clear_error();
    return absl::InvalidArgumentError(
        absl::StrCat("--tls_key: ", key_path,
                     ": no usable PEM private key in the file (not PEM, or encrypted with a passphrase)"));
  }
  if (X509_check_private_key(cert.get(), key.get()) != 1) {
    ERR_clear_error();
    return absl::InvalidArgumentError(absl::StrCat("--tls_key: ", key_path,
                                                   ": the private key does not belong to "
                                                   "the certificate in --tls_cert ",
                                                   cert_path));
  }
  return absl::OkStatus();
}

}  // namespace strata
