// A file of a fuzz harness's own, for APIs that only read paths: in a fresh directory under $TMPDIR (or /tmp),
// both removed when the object is destroyed (at exit, for a function-local static).
#pragma once

#include <stdlib.h>
#include <unistd.h>

#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace attnserve::fuzz {

class ScratchFile {
 public:
  // `name` is the file's name inside the directory (its extension may matter to the reader).
  explicit ScratchFile(const std::string& name) {
    const char* tmp = std::getenv("TMPDIR");
    dir_ = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/attnserve_fuzz.XXXXXX";
    if (mkdtemp(dir_.data()) == nullptr) {
      std::perror("attnserve fuzz: mkdtemp");
      std::abort();
    }
    path_ = dir_ + "/" + name;
  }
  ~ScratchFile() {
    std::remove(path_.c_str());
    rmdir(dir_.c_str());
  }
  ScratchFile(const ScratchFile&) = delete;
  ScratchFile& operator=(const ScratchFile&) = delete;

  const std::string& path() const { return path_; }

  // Replaces the file's contents; false when it could not be written.
  bool Write(const void* data, size_t size) const {
    std::FILE* f = std::fopen(path_.c_str(), "wb");
    if (f == nullptr) return false;
    const bool written = size == 0 || std::fwrite(data, 1, size, f) == size;
    return std::fclose(f) == 0 && written;
  }

 private:
  std::string dir_;
  std::string path_;
};

}  // namespace attnserve::fuzz
