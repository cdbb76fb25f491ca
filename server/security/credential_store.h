// A credential file held in memory and reloaded when it changes on disk (a rotated Kubernetes Secret
// swaps the file under its mount: the watcher sees a new inode, size or modification time).
//
// Thread-safety: ScopesOf may be called from any thread while the watcher reloads.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include "absl/strings/string_view.h"
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "server/security/credential_file.h"

namespace attnserve {

class CredentialStore {
 public:
  struct Options {
    std::string path;
    CredentialFileKind kind = CredentialFileKind::kTokens;
    // How often the file's identity (inode, size, modification time) is checked; a change reloads it.
    absl::Duration reload_interval = absl::Seconds(1);
  };
  // Reads and parses the file: its error (naming the path, and the line for a malformed entry) otherwise.
  static absl::StatusOr<std::unique_ptr<CredentialStore>> Create(const Options& options);
  ~CredentialStore();
  CredentialStore(const CredentialStore&) = delete;
  CredentialStore& operator=(const CredentialStore&) = delete;

  // The scopes of the entry whose secret is `secret` (and, in a basic auth file, whose user is `user`);
  // kScopeNone when none matches. Compares digests in constant time over every entry.
  uint32_t ScopesOf(absl::string_view user, absl::string_view secret) const;

  // Reloads that took effect, and reloads refused because the new file did not parse (the previous
  // credentials stay).
  int64_t reloads() const;
  int64_t failed_reloads() const;

 private:
  struct Stamp {
    uint64_t inode = 0;
    int64_t size = -1;
    int64_t mtime_ns = 0;
    bool operator==(const Stamp& o) const { return inode == o.inode && size == o.size && mtime_ns == o.mtime_ns; }
  };
  explicit CredentialStore(const Options& options) : options_(options) {}
  absl::Status Load();
  void Watch();

  const Options options_;
  mutable absl::Mutex mu_;
  std::shared_ptr<const std::vector<Credential>> credentials_ ABSL_GUARDED_BY(mu_);
  int64_t reloads_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t failed_reloads_ ABSL_GUARDED_BY(mu_) = 0;
  Stamp stamp_;  // the loaded file's; only the watcher thread touches it after Create
  absl::Notification stop_;
  std::thread watcher_;
};

}  // namespace attnserve
