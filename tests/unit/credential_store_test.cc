// The token and basic-auth files: parsing (every malformed line named), scope lookup in constant time over
// all entries, and reload on change (a broken file keeps the previous entries).
#include "server/security/credential_store.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <random>
#include <string>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace attnserve {
namespace {

std::string DigestHex(const std::string& secret) {
  const Sha256Digest d = Sha256(secret);
  return absl::BytesToHexString(absl::string_view(reinterpret_cast<const char*>(d.data()), d.size()));
}

std::string RandomToken(std::mt19937_64* rng) {
  return absl::StrCat("tok-", (*rng)(), "-", (*rng)());
}

TEST(CredentialFileTest, Sha256MatchesAKnownVector) {
  EXPECT_EQ(DigestHex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(CredentialFileTest, ParsesTokensScopesAndComments) {
  const std::string text = absl::StrCat("# tokens\n\nsha256:", DigestHex("a"), " infer  # the client\n",
                                        "  sha256:", DigestHex("b"), "\tinfer,admin\r\n", "sha256:", DigestHex("c"),
                                        " admin\n");
  auto parsed = ParseCredentialFile(text, CredentialFileKind::kTokens);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ASSERT_EQ(parsed->size(), 3u);
  EXPECT_EQ((*parsed)[0].scopes, kScopeInfer);
  EXPECT_EQ((*parsed)[1].scopes, kScopeInfer | kScopeAdmin);
  EXPECT_EQ((*parsed)[2].scopes, kScopeAdmin);
  EXPECT_EQ((*parsed)[1].digest, Sha256("b"));
}

TEST(CredentialFileTest, NamesTheLineOfEachMistake) {
  const std::string good = absl::StrCat("sha256:", DigestHex("a"), " infer\n");
  const struct {
    std::string line;
    std::string expected;
  } cases[] = {
      {absl::StrCat(DigestHex("a"), " infer"), "expected sha256:<64 hex digits>"},
      {"sha256:abcd infer", "64 hex digits"},
      {absl::StrCat("sha256:", std::string(64, 'g'), " infer"), "64 hex digits"},
      {absl::StrCat("sha256:", DigestHex("a"), " root"), "unknown scope \"root\""},
      {absl::StrCat("sha256:", DigestHex("a")), "expected \"sha256:<hex> <scope>"},
      {absl::StrCat("sha256:", DigestHex("a"), " infer extra"), "expected \"sha256:<hex> <scope>"},
  };
  for (const auto& c : cases) {
    auto parsed = ParseCredentialFile(good + c.line + "\n", CredentialFileKind::kTokens);
    ASSERT_FALSE(parsed.ok()) << c.line;
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(parsed.status().message().find("line 2: "), absl::string_view::npos) << parsed.status();
    EXPECT_NE(parsed.status().message().find(c.expected), absl::string_view::npos) << parsed.status();
  }
}

TEST(CredentialFileTest, BasicAuthLinesHaveUserAndDigest) {
  auto parsed = ParseCredentialFile(absl::StrCat("prometheus sha256:", DigestHex("pw"), "\n"),
                                    CredentialFileKind::kBasicAuth);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ASSERT_EQ(parsed->size(), 1u);
  EXPECT_EQ((*parsed)[0].user, "prometheus");
  EXPECT_FALSE(ParseCredentialFile("prometheus pw\n", CredentialFileKind::kBasicAuth).ok());
}

class CredentialStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/attnserve-credentials-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/tokens";
  }
  void TearDown() override {
    std::remove(path_.c_str());
    rmdir(dir_.c_str());
  }
  // Written to a new file renamed over the old one, as a Secret rotation does.
  void Write(const std::string& text) {
    const std::string tmp = path_ + ".new";
    std::ofstream(tmp) << text;
    ASSERT_EQ(std::rename(tmp.c_str(), path_.c_str()), 0);
  }
  static bool Eventually(const std::function<bool()>& condition) {
    const absl::Time deadline = absl::Now() + absl::Seconds(10);
    while (absl::Now() < deadline) {
      if (condition()) return true;
      absl::SleepFor(absl::Milliseconds(10));
    }
    return condition();
  }

  std::string dir_;
  std::string path_;
  std::mt19937_64 rng_{7};
};

TEST_F(CredentialStoreTest, GrantsTheListedScopesOnly) {
  const std::string reader = RandomToken(&rng_), admin = RandomToken(&rng_);
  Write(absl::StrCat("sha256:", DigestHex(reader), " infer\nsha256:", DigestHex(admin), " infer,admin\n"));
  auto store = CredentialStore::Create({path_, CredentialFileKind::kTokens, absl::Milliseconds(20)});
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_EQ((*store)->ScopesOf("", reader), kScopeInfer);
  EXPECT_EQ((*store)->ScopesOf("", admin), kScopeInfer | kScopeAdmin);
  EXPECT_EQ((*store)->ScopesOf("", RandomToken(&rng_)), kScopeNone);
  EXPECT_EQ((*store)->ScopesOf("", ""), kScopeNone);
  EXPECT_EQ((*store)->ScopesOf("", reader + "x"), kScopeNone);
}

TEST_F(CredentialStoreTest, BasicAuthNeedsTheUserToo) {
  Write(absl::StrCat("prometheus sha256:", DigestHex("pw"), "\n"));
  auto store = CredentialStore::Create({path_, CredentialFileKind::kBasicAuth, absl::Milliseconds(20)});
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_NE((*store)->ScopesOf("prometheus", "pw"), kScopeNone);
  EXPECT_EQ((*store)->ScopesOf("other", "pw"), kScopeNone);
  EXPECT_EQ((*store)->ScopesOf("prometheus", "wrong"), kScopeNone);
}

TEST_F(CredentialStoreTest, ReloadsOnChangeAndKeepsTheOldEntriesWhenTheNewFileIsBroken) {
  const std::string first = RandomToken(&rng_), second = RandomToken(&rng_);
  Write(absl::StrCat("sha256:", DigestHex(first), " infer\n"));
  auto store = CredentialStore::Create({path_, CredentialFileKind::kTokens, absl::Milliseconds(20)});
  ASSERT_TRUE(store.ok()) << store.status();
  Write(absl::StrCat("sha256:", DigestHex(second), " infer\n"));
  EXPECT_TRUE(Eventually([&] { return (*store)->ScopesOf("", second) == kScopeInfer; }));
  EXPECT_EQ((*store)->ScopesOf("", first), kScopeNone);
  EXPECT_EQ((*store)->reloads(), 1);

  Write("sha256:not-hex infer\n");
  EXPECT_TRUE(Eventually([&] { return (*store)->failed_reloads() == 1; }));
  EXPECT_EQ((*store)->ScopesOf("", second), kScopeInfer);  // still in force
}

TEST_F(CredentialStoreTest, CreateFailsOnAMissingOrBrokenFile) {
  auto missing = CredentialStore::Create({path_, CredentialFileKind::kTokens, absl::Seconds(1)});
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  Write("sha256:00 infer\n");
  auto broken = CredentialStore::Create({path_, CredentialFileKind::kTokens, absl::Seconds(1)});
  EXPECT_EQ(broken.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(broken.status().message().find(path_ + ": line 1"), absl::string_view::npos) << broken.status();
}

}  // namespace
}  // namespace attnserve
