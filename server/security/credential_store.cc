#include "server/security/credential_store.h"

#include <openssl/crypto.h>
#include <sys/stat.h>

#include <fstream>
#include <sstream>

#include <spdlog/spdlog.h>

#include "absl/strings/str_cat.h"
#include "common/thread_name.h"

namespace attnserve {
namespace {

absl::StatusOr<std::string> ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot be read"));
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace

absl::StatusOr<std::unique_ptr<CredentialStore>> CredentialStore::Create(const Options& options) {
  if (options.path.empty()) return absl::InvalidArgumentError("credential file: empty path");
  if (options.reload_interval <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("credential file: reload_interval must be positive");
  }
  std::unique_ptr<CredentialStore> store(new CredentialStore(options));
  absl::Status loaded = store->Load();
  if (!loaded.ok()) return loaded;
  store->watcher_ = std::thread([s = store.get()] {
    NameThisThread("attn-credwatch");
    s->Watch();
  });
  return store;
}

CredentialStore::~CredentialStore() {
  stop_.Notify();
  if (watcher_.joinable()) watcher_.join();
}

absl::Status CredentialStore::Load() {
  struct stat st {};
  if (stat(options_.path.c_str(), &st) != 0) return absl::NotFoundError(absl::StrCat(options_.path, ": no such file"));
  const Stamp stamp{static_cast<uint64_t>(st.st_ino), static_cast<int64_t>(st.st_size),
                    static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec};
  absl::StatusOr<std::string> text = ReadWholeFile(options_.path);
  if (!text.ok()) return text.status();
  absl::StatusOr<std::vector<Credential>> parsed = ParseCredentialFile(*text, options_.kind);
  stamp_ = stamp;  // a broken file is not retried until it changes again
  if (!parsed.ok()) return absl::InvalidArgumentError(absl::StrCat(options_.path, ": ", parsed.status().message()));
  auto credentials = std::make_shared<const std::vector<Credential>>(*std::move(parsed));
  absl::MutexLock lock(&mu_);
  credentials_ = std::move(credentials);
  return absl::OkStatus();
}

void CredentialStore::Watch() {
  while (!stop_.WaitForNotificationWithTimeout(options_.reload_interval)) {
    struct stat st {};
    if (stat(options_.path.c_str(), &st) != 0) continue;  // mid-rotation: the old credentials stay
    const Stamp now{static_cast<uint64_t>(st.st_ino), static_cast<int64_t>(st.st_size),
                    static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec};
    if (now == stamp_) continue;
    const absl::Status status = Load();
    absl::MutexLock lock(&mu_);
    if (status.ok()) {
      ++reloads_;
      spdlog::info("{}: reloaded, {} entries", options_.path, credentials_->size());
    } else {
      ++failed_reloads_;
      spdlog::error("{} (the previous entries stay in force)", std::string(status.message()));
    }
  }
}

uint32_t CredentialStore::ScopesOf(absl::string_view user, absl::string_view secret) const {
  const Sha256Digest digest = Sha256(secret);
  std::shared_ptr<const std::vector<Credential>> credentials;
  {
    absl::MutexLock lock(&mu_);
    credentials = credentials_;
  }
  uint32_t scopes = kScopeNone;
  for (const Credential& c : *credentials) {  // every entry, so the time says nothing about which matched
    const bool same_digest = CRYPTO_memcmp(c.digest.data(), digest.data(), digest.size()) == 0;
    if (same_digest && c.user == user) scopes |= c.scopes;
  }
  return scopes;
}

int64_t CredentialStore::reloads() const {
  absl::MutexLock lock(&mu_);
  return reloads_;
}

int64_t CredentialStore::failed_reloads() const {
  absl::MutexLock lock(&mu_);
  return failed_reloads_;
}

}  // namespace attnserve
