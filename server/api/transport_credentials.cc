#include "server/api/transport_credentials.h"

#include <openssl/bio.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <algorithm>

#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>

#include "absl/strings/str_cat.h"

namespace attnserve {
namespace {

struct BioDeleter {
  void operator()(BIO* b) const { BIO_free(b); }
};
struct X509Deleter {
  void operator()(X509* x) const { X509_free(x); }
};
struct KeyDeleter {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
using Bio = std::unique_ptr<BIO, BioDeleter>;

absl::Status Bad(const char* field, const std::string& path, const char* what) {
  return absl::InvalidArgumentError(absl::StrCat("security.", field, ": ", path, ": ", what));
}

absl::Status CheckKeyPair(const attnserve::v1::SecurityConfig& s) {
  Bio cert_bio(BIO_new_file(s.tls_cert_file().c_str(), "r"));
  if (cert_bio == nullptr) return Bad("tls_cert_file", s.tls_cert_file(), "cannot be read");
  std::unique_ptr<X509, X509Deleter> cert(PEM_read_bio_X509(cert_bio.get(), nullptr, nullptr, nullptr));
  if (cert == nullptr) return Bad("tls_cert_file", s.tls_cert_file(), "holds no PEM certificate");
  Bio key_bio(BIO_new_file(s.tls_key_file().c_str(), "r"));
  if (key_bio == nullptr) return Bad("tls_key_file", s.tls_key_file(), "cannot be read");
  std::unique_ptr<EVP_PKEY, KeyDeleter> key(PEM_read_bio_PrivateKey(key_bio.get(), nullptr, nullptr, nullptr));
  if (key == nullptr) return Bad("tls_key_file", s.tls_key_file(), "holds no unencrypted PEM private key");
  if (X509_check_private_key(cert.get(), key.get()) != 1) {
    return Bad("tls_key_file", s.tls_key_file(), "does not match the certificate of tls_cert_file");
  }
  return absl::OkStatus();
}

absl::Status CheckCaBundle(const std::string& path) {
  Bio bio(BIO_new_file(path.c_str(), "r"));
  if (bio == nullptr) return Bad("tls_client_ca_file", path, "cannot be read");
  std::unique_ptr<X509, X509Deleter> cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (cert == nullptr) return Bad("tls_client_ca_file", path, "holds no PEM certificate");
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> BuildServerCredentials(
    const attnserve::v1::SecurityConfig& security) {
  if (security.tls_cert_file().empty()) return grpc::InsecureServerCredentials();
  if (absl::Status s = CheckKeyPair(security); !s.ok()) return s;
  const bool mtls = !security.tls_client_ca_file().empty();
  if (mtls) {
    if (absl::Status s = CheckCaBundle(security.tls_client_ca_file()); !s.ok()) return s;
  }
  const auto interval_s = static_cast<unsigned int>(std::max<int64_t>(1, security.tls_reload_interval_ms() / 1000));
  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      security.tls_key_file(), security.tls_cert_file(), mtls ? security.tls_client_ca_file() : "", interval_s);
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_identity_key_cert_pairs();
  if (mtls) {
    options.watch_root_certs();
    options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  } else {
    options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  }
  return grpc::experimental::TlsServerCredentials(options);
}

}  // namespace attnserve
