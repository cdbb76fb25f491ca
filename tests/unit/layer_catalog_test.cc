// LayerCatalog: the states the repository RPCs report while layers are loaded, reloaded, fail to load and
// are unloaded, over a real registry (the load and unload are the registry's publish and remove, as the
// server's are apart from the queues).
#include "server/runtime/layer_catalog.h"

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"
#include "server/startup/server_config.h"

namespace attnserve {
namespace {

v1::LayerConfig TinyLayer(const std::string& name, uint64_t seed) {
  v1::LayerConfig c;
  c.set_name(name);
  c.set_embed_dim(8);
  c.set_num_heads(2);
  c.set_seed(seed);
  return c;
}

class LayerCatalogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    v1::ServerConfig config;
    *config.add_layers() = TinyLayer("a", 1);
    ASSERT_TRUE(ApplyLayerDefaultsAndValidate(config.mutable_layers(0)).ok());
    auto registry = LayerRegistry::Create(config);
    ASSERT_TRUE(registry.ok()) << registry.status();
    registry_ = std::move(*registry);
    LayerCatalog::Options options;
    options.configured = {config.layers(0)};
    options.registry = registry_.get();
    options.load = [this](const v1::LayerConfig& layer) -> absl::Status {
      ++loads_;
      {
        absl::MutexLock lock(&loaded_mu_);
        loaded_.emplace_back(layer.name(), layer.seed());
      }
      if (absl::Notification* block = block_load_.load(); block != nullptr) block->WaitForNotification();
      v1::LayerConfig c = layer;
      if (absl::Status s = ApplyLayerDefaultsAndValidate(&c); !s.ok()) return s;
      auto loaded = LoadLayer(c);
      if (!loaded.ok()) return loaded.status();
      registry_->Publish(std::move(*loaded));
      return absl::OkStatus();
    };
    options.unload = [this](const std::string& name) { return registry_->Remove(name); };
    auto catalog = LayerCatalog::Create(options);
    ASSERT_TRUE(catalog.ok()) << catalog.status();
    catalog_ = std::move(*catalog);
  }

  LayerStatus StatusOf(const std::string& name) {
    for (const LayerStatus& s : catalog_->Index()) {
      if (s.name == name) return s;
    }
    ADD_FAILURE() << "no entry for " << name;
    return {};
  }

  std::unique_ptr<LayerRegistry> registry_;
  std::unique_ptr<LayerCatalog> catalog_;
  std::atomic<int> loads_{0};
  std::atomic<absl::Notification*> block_load_{nullptr};
  absl::Mutex loaded_mu_;
  std::vector<std::pair<std::string, uint64_t>> loaded_ ABSL_GUARDED_BY(loaded_mu_);  // (name, seed) in order
};

TEST_F(LayerCatalogTest, ConfiguredLayersStartReady) {
  const LayerStatus a = StatusOf("a");
  EXPECT_EQ(a.state, LayerState::kReady);
  EXPECT_EQ(a.version, 1);
  EXPECT_EQ(std::string(LayerStateName(a.state)), "READY");
}

TEST_F(LayerCatalogTest, ReloadMakesANewVersion) {
  ASSERT_TRUE(catalog_->Load("a", nullptr).ok());
  EXPECT_EQ(StatusOf("a").version, 2);
  EXPECT_EQ(registry_->Find("a")->version, 2);
}

TEST_F(LayerCatalogTest, UnloadThenLoadAgain) {
  ASSERT_TRUE(catalog_->Unload("a").ok());
  LayerStatus a = StatusOf("a");
  EXPECT_EQ(a.state, LayerState::kUnavailable);
  EXPECT_EQ(a.reason, "unloaded");
  EXPECT_EQ(a.version, 0);
  EXPECT_EQ(catalog_->Unload("a").code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(catalog_->Load("a", nullptr).ok());
  a = StatusOf("a");
  EXPECT_EQ(a.state, LayerState::kReady);
  EXPECT_EQ(a.version, 2);  // versions never repeat
}

TEST_F(LayerCatalogTest, OverrideConfigAddsALayerAndIsRemembered) {
  const v1::LayerConfig fresh = TinyLayer("fresh", 9);
  ASSERT_TRUE(catalog_->Load("fresh", &fresh).ok());
  EXPECT_EQ(StatusOf("fresh").state, LayerState::kReady);
  ASSERT_TRUE(catalog_->Unload("fresh").ok());
  ASSERT_TRUE(catalog_->Load("fresh", nullptr).ok());  // from the override it was last loaded with
  EXPECT_EQ(registry_->Find("fresh")->config.seed(), 9u);
}

TEST_F(LayerCatalogTest, RefusesUnknownNamesAndMismatchedConfigs) {
  EXPECT_EQ(catalog_->Load("nope", nullptr).code(), absl::StatusCode::kNotFound);
  const v1::LayerConfig other = TinyLayer("other", 1);
  const absl::Status mismatch = catalog_->Load("a", &other);
  EXPECT_EQ(mismatch.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(mismatch.message().find("parameters.config: name 'other' differs from model_name 'a'"),
            std::string::npos)
      << mismatch;
  EXPECT_EQ(loads_, 0);
}

TEST_F(LayerCatalogTest, FailedReloadKeepsThePreviousVersionServing) {
  v1::LayerConfig broken = TinyLayer("a", 1);
  broken.set_num_heads(3);  // does not divide embed_dim 8
  const absl::Status failed = catalog_->Load("a", &broken);
  EXPECT_FALSE(failed.ok());
  const LayerStatus a = StatusOf("a");
  EXPECT_EQ(a.state, LayerState::kReady);
  EXPECT_EQ(a.version, 1);
  EXPECT_NE(a.reason.find("the last load failed (the previous version serves)"), std::string::npos) << a.reason;
  ASSERT_TRUE(catalog_->Load("a", nullptr).ok());  // the config file's entry, not the broken override
}

TEST_F(LayerCatalogTest, FailedFirstLoadIsUnavailableWithItsReason) {
  v1::LayerConfig broken = TinyLayer("b", 1);
  broken.set_num_heads(3);
  const absl::Status failed = catalog_->Load("b", &broken);
  EXPECT_EQ(failed.code(), absl::StatusCode::kInvalidArgument);
  const LayerStatus b = StatusOf("b");
  EXPECT_EQ(b.state, LayerState::kUnavailable);
  EXPECT_EQ(b.reason, failed.message());
}

TEST_F(LayerCatalogTest, IndexShowsLoadingWhileALoadRuns) {
  absl::Notification release;
  block_load_ = &release;
  std::thread loader([this] { EXPECT_TRUE(catalog_->Load("a", nullptr).ok()); });
  bool saw_loading = false;
  for (int i = 0; i < 2000 && !saw_loading; ++i) {
    saw_loading = StatusOf("a").state == LayerState::kLoading;
    if (!saw_loading) absl::SleepFor(absl::Milliseconds(1));
  }
  EXPECT_TRUE(saw_loading);
  EXPECT_EQ(StatusOf("a").version, 1);  // the old version serves meanwhile
  release.Notify();
  loader.join();
  EXPECT_EQ(StatusOf("a").state, LayerState::kReady);
}

std::vector<v1::LayerConfig> Validated(std::vector<v1::LayerConfig> layers) {
  for (auto& l : layers) EXPECT_TRUE(ApplyLayerDefaultsAndValidate(&l).ok());
  return layers;
}

TEST_F(LayerCatalogTest, ReconcileLoadsNewReloadsChangedUnloadsRemoved) {
  ASSERT_TRUE(catalog_->Reconcile(Validated({TinyLayer("a", 1), TinyLayer("b", 2)}), false).ok());
  EXPECT_EQ(StatusOf("a").version, 1);  // unchanged: not reloaded
  EXPECT_EQ(StatusOf("b").state, LayerState::kReady);
  ASSERT_TRUE(catalog_->Reconcile(Validated({TinyLayer("b", 3)}), false).ok());
  EXPECT_EQ(StatusOf("a").state, LayerState::kUnavailable);
  EXPECT_EQ(StatusOf("a").reason, "removed from the config file");
  EXPECT_EQ(registry_->Find("a"), nullptr);
  EXPECT_EQ(StatusOf("b").version, 2);  // its entry changed
  EXPECT_EQ(registry_->Find("b")->config.seed(), 3u);
  ASSERT_TRUE(catalog_->Reconcile(Validated({TinyLayer("b", 3)}), true).ok());
  EXPECT_EQ(StatusOf("b").version, 3);  // reload_all (SIGHUP)
}

TEST_F(LayerCatalogTest, ReconcileLeavesLayersLoadedByConfigAlone) {
  const v1::LayerConfig extra = TinyLayer("extra", 4);
  ASSERT_TRUE(catalog_->Load("extra", &extra).ok());
  ASSERT_TRUE(catalog_->Reconcile(Validated({TinyLayer("a", 1)}), false).ok());
  EXPECT_EQ(StatusOf("extra").state, LayerState::kReady);
}

// A reconcile that starts while a load through the RPCs runs waits for it before it plans: it never plans
// from state that load is about to change (it would then load the RPC's config as the file's).
TEST_F(LayerCatalogTest, AReconcileWaitsForALoadRunning) {
  absl::Notification release;
  block_load_ = &release;
  const v1::LayerConfig admin = Validated({TinyLayer("b", 9)})[0];
  std::thread operator_load([&] { EXPECT_TRUE(catalog_->Load("b", &admin).ok()); });
  for (int i = 0; i < 2000 && loads_ == 0; ++i) absl::SleepFor(absl::Milliseconds(1));  // blocked in it
  ASSERT_EQ(loads_, 1);
  std::thread reconciler(
      [this] { EXPECT_TRUE(catalog_->Reconcile(Validated({TinyLayer("a", 1), TinyLayer("b", 2)}), false).ok()); });
  absl::SleepFor(absl::Milliseconds(50));  // time for the reconcile to plan, were it not waiting
  block_load_ = nullptr;
  release.Notify();
  operator_load.join();
  reconciler.join();
  absl::MutexLock lock(&loaded_mu_);
  const std::vector<std::pair<std::string, uint64_t>> want = {{"b", 9}, {"b", 2}};
  EXPECT_EQ(loaded_, want);  // the operator's b, then the file's
  EXPECT_EQ(registry_->Find("b")->config.seed(), 2u);
}

// A layer new to the config file is LOADING from the moment the reload plans it, never READY before it serves
// (CI: a client saw it READY while the layer before it loaded, and got NOT_FOUND).
TEST_F(LayerCatalogTest, ALayerNewToTheFileIsNotReadyBeforeItLoads) {
  absl::Notification release;
  block_load_ = &release;
  std::thread reconciler([this] {
    EXPECT_TRUE(catalog_->Reconcile(Validated({TinyLayer("a", 1), TinyLayer("b", 2), TinyLayer("c", 3)}), false).ok());
  });
  for (int i = 0; i < 2000 && loads_ == 0; ++i) absl::SleepFor(absl::Milliseconds(1));  // b's load is blocked
  ASSERT_EQ(loads_, 1);
  EXPECT_EQ(StatusOf("b").state, LayerState::kLoading);
  EXPECT_EQ(StatusOf("c").state, LayerState::kLoading) << "c shown " << LayerStateName(StatusOf("c").state);
  EXPECT_EQ(registry_->Find("c"), nullptr);
  EXPECT_EQ(StatusOf("a").state, LayerState::kReady);  // unchanged and serving
  block_load_ = nullptr;
  release.Notify();
  reconciler.join();
  EXPECT_EQ(StatusOf("c").state, LayerState::kReady);
  EXPECT_NE(registry_->Find("c"), nullptr);
}

TEST_F(LayerCatalogTest, ReconcileTriesEveryLayerAndNamesTheOneThatFailed) {
  v1::LayerConfig broken = TinyLayer("broken", 1);
  broken.set_weights_path("/nonexistent/attnserve-weights.safetensors");
  const absl::Status s = catalog_->Reconcile({TinyLayer("a", 1), broken, Validated({TinyLayer("c", 5)})[0]}, false);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("layer 'broken'"), std::string::npos) << s;
  EXPECT_EQ(StatusOf("c").state, LayerState::kReady);  // loaded although another failed
  EXPECT_EQ(StatusOf("broken").state, LayerState::kUnavailable);
}

}  // namespace
}  // namespace attnserve
