// ConfigWatcher: a write in place, an editor's write-and-rename and a Kubernetes ConfigMap's symlink swap are
// each seen (once per distinct content); an unchanged rewrite is not; Trigger runs it anyway.
#include "server/startup/config_watcher.h"

#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"

namespace attnserve {
namespace {

std::string TempDir() {
  char pattern[] = "/tmp/config_watcher_XXXXXX";
  const char* dir = mkdtemp(pattern);
  EXPECT_NE(dir, nullptr);
  return dir ? dir : "/tmp";
}

void WriteFile(const std::string& path, const std::string& content) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << content;
}

class ConfigWatcherTest : public ::testing::Test {
 protected:
  void Watch(const std::string& path) {
    ConfigWatcher::Options options;
    options.path = path;
    options.check_interval = absl::Seconds(30);  // events only: a missed one fails the test
    options.settle = absl::Milliseconds(20);
    options.on_change = [this](const std::string& content, bool triggered) {
      absl::MutexLock lock(&mu_);
      seen_.push_back(absl::StrCat(triggered ? "trigger:" : "", content));
    };
    auto watcher = ConfigWatcher::Create(options);
    ASSERT_TRUE(watcher.ok()) << watcher.status();
    watcher_ = std::move(*watcher);
  }
  // Waits until `n` changes were seen (false after 5 s), and returns them.
  std::vector<std::string> WaitForChanges(size_t n) {
    absl::MutexLock lock(&mu_);
    auto enough = [this, n]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return seen_.size() >= n; };
    mu_.AwaitWithTimeout(absl::Condition(&enough), absl::Seconds(5));
    return seen_;
  }

  absl::Mutex mu_;
  std::vector<std::string> seen_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<ConfigWatcher> watcher_;
  const std::string dir_ = TempDir();
};

TEST_F(ConfigWatcherTest, SeesAWriteInPlaceOncePerContent) {
  const std::string path = dir_ + "/config.pbtxt";
  WriteFile(path, "a");
  Watch(path);
  WriteFile(path, "b");
  EXPECT_EQ(WaitForChanges(1), std::vector<std::string>{"b"});
  WriteFile(path, "b");  // same bytes: no change
  WriteFile(path, "c");
  EXPECT_EQ(WaitForChanges(2), (std::vector<std::string>{"b", "c"}));
}

TEST_F(ConfigWatcherTest, SeesAWriteAndRename) {
  const std::string path = dir_ + "/config.pbtxt";
  WriteFile(path, "old");
  Watch(path);
  WriteFile(dir_ + "/.config.tmp", "new");
  ASSERT_EQ(std::rename((dir_ + "/.config.tmp").c_str(), path.c_str()), 0);
  EXPECT_EQ(WaitForChanges(1), std::vector<std::string>{"new"});
}

// A ConfigMap volume: config.pbtxt -> ..data/config.pbtxt, ..data -> ..2024_1; an update writes ..2024_2 and
// renames a new ..data symlink over the old one.
TEST_F(ConfigWatcherTest, SeesAConfigMapSymlinkSwap) {
  ASSERT_EQ(mkdir((dir_ + "/..v1").c_str(), 0755), 0);
  WriteFile(dir_ + "/..v1/config.pbtxt", "v1");
  ASSERT_EQ(symlink("..v1", (dir_ + "/..data").c_str()), 0);
  ASSERT_EQ(symlink("..data/config.pbtxt", (dir_ + "/config.pbtxt").c_str()), 0);
  Watch(dir_ + "/config.pbtxt");
  ASSERT_EQ(mkdir((dir_ + "/..v2").c_str(), 0755), 0);
  WriteFile(dir_ + "/..v2/config.pbtxt", "v2");
  ASSERT_EQ(symlink("..v2", (dir_ + "/..data_tmp").c_str()), 0);
  ASSERT_EQ(std::rename((dir_ + "/..data_tmp").c_str(), (dir_ + "/..data").c_str()), 0);
  EXPECT_EQ(WaitForChanges(1), std::vector<std::string>{"v2"});
}

TEST_F(ConfigWatcherTest, TriggerRunsWithUnchangedContent) {
  const std::string path = dir_ + "/config.pbtxt";
  WriteFile(path, "same");
  Watch(path);
  watcher_->Trigger();
  EXPECT_EQ(WaitForChanges(1), std::vector<std::string>{"trigger:same"});
}

TEST(ConfigWatcherCreateTest, RefusesAMissingDirectory) {
  ConfigWatcher::Options options;
  options.path = "/nonexistent-dir-for-attnserve/config.pbtxt";
  options.on_change = [](const std::string&, bool) {};
  EXPECT_EQ(ConfigWatcher::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace attnserve
