#include "core/state/versions.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>

#include "core/state/checkpoint.h"
#include "core/util/file_util.h"

namespace strata {
namespace {
namespace fs = std::filesystem;

struct Dir {
  Dir() {
    path = (fs::temp_directory_path() /
            ("strata-versions-" + std::to_string(::getpid()) + "-" + std::to_string(n++)))
               .string();
    fs::remove_all(path);
    fs::create_directories(path + "/tasks/a");
    std::ofstream(path + "/tasks/a/eval.jsonl") << "{\"prompt\":\"x\",\"completion\":\" y\"}\n";
  }
  ~Dir() { fs::remove_all(path); }
  std::string path;
  static inline int n = 0;
};

CheckpointData Sample(int64_t version, float value) {
  CheckpointData d;
  d.base_model_id = "/models/m";
  d.method = "share_ella";
  d.method_config_json = "{}";
  d.method_tensors["w"] = torch::full({2, 2}, value);
  d.weights_version = version;
  d.tasks.push_back({"a", "exact_match", "job-000001", "", "tasks/a/eval.jsonl", 1});
  d.matrix = {{0.5}};
  d.base = {0.1};
  return d;
}

VersionMeta Meta(int64_t version, const std::string& status) {
  VersionMeta m;
  m.version = version;
  m.status = status;
  m.based_on = version - 1;
  m.task = "a";
  m.tasks = {"a"};
  m.scores = {{"a", 0.5}};
  m.reference_nll = std::nan("");
  return m;
}

TEST(VersionStore, KeepsListsRestoresAndRemovesVersions) {
  Dir dir;
  auto store = VersionStore::Open(dir.path);
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_EQ(store->next_version(), 1);
  ASSERT_TRUE(SaveCheckpoint(dir.path, Sample(2, 2.0f)).ok());
  ASSERT_TRUE(store->Add(dir.path + "/checkpoint", Meta(2, kVersionPublished)).ok());
  EXPECT_EQ(store->Add(dir.path + "/checkpoint", Meta(2, kVersionPublished)).code(),
            absl::StatusCode::kAlreadyExists);
  // The kept files are links of the checkpoint's (no extra disk).
  struct stat st {};
  ASSERT_EQ(::stat((store->Dir(2) + "/method.safetensors").c_str(), &st), 0);
  EXPECT_GE(st.st_nlink, 2u);
  ASSERT_TRUE(SaveCheckpoint(dir.path, Sample(3, 3.0f)).ok());
  ASSERT_TRUE(store->Add(dir.path + "/checkpoint", Meta(3, kVersionCandidate)).ok());
  auto list = store->List();
  ASSERT_EQ(list.size(), 2u);
  EXPECT_EQ(list[0].version, 3);  // newest first
  EXPECT_EQ(list[0].status, kVersionCandidate);
  EXPECT_GT(list[0].bytes, 0);
  EXPECT_EQ(store->next_version(), 4);

  // Restore version 2 as the checkpoint.
  auto prepared = store->PrepareRestore(2);
  ASSERT_TRUE(prepared.ok()) << prepared.status();
  EXPECT_EQ(prepared->data.weights_version, 2);
  ASSERT_TRUE(store->CommitRestore(*prepared).ok());
  auto loaded = LoadCheckpoint(dir.path);
  ASSERT_TRUE(loaded.ok() && loaded->has_value());
  EXPECT_EQ((*loaded)->weights_version, 2);
  EXPECT_FLOAT_EQ((*loaded)->method_tensors.at("w")[0][0].item<float>(), 2.0f);
  EXPECT_FALSE(PathExists(prepared->tmp_dir));

  ASSERT_TRUE(store->SetStatus(3, kVersionPublished).ok());
  EXPECT_EQ(store->Get(3)->status, kVersionPublished);
  EXPECT_EQ(store->SetStatus(9, kVersionPublished).code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(store->Remove(3).ok());
  EXPECT_EQ(store->Get(3).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store->PrepareRestore(3).status().code(), absl::StatusCode::kNotFound);

  // Version numbers are never reused, even after their version was removed.
  auto reopened = VersionStore::Open(dir.path);
  ASSERT_TRUE(reopened.ok());
  EXPECT_EQ(reopened->next_version(), 4);
  EXPECT_EQ(reopened->List().size(), 1u);
}

TEST(VersionStore, DamagedVersionIsRefusedAndLeftoversAreRemoved) {
  Dir dir;
  auto store = VersionStore::Open(dir.path);
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE(SaveCheckpoint(dir.path, Sample(2, 2.0f)).ok());
  ASSERT_TRUE(store->Add(dir.path + "/checkpoint", Meta(2, kVersionPublished)).ok());
  ASSERT_TRUE(SaveCheckpoint(dir.path, Sample(3, 3.0f)).ok());  // the checkpoint moves on
  // Damage version 2's state file (replace the link, so the checkpoint's copy stays intact).
  const std::string kept = store->Dir(2) + "/state.json";
  ASSERT_TRUE(RemoveAll(kept).ok());
  std::ofstream(kept) << "{}";
  auto prepared = store->PrepareRestore(2);
  EXPECT_EQ(prepared.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(prepared.status().message().find("state.json"), std::string::npos) << prepared.status();
  // The served checkpoint is untouched and no temp directory is left.
  EXPECT_EQ((*LoadCheckpoint(dir.path))->weights_version, 3);
  for (const auto& e : fs::directory_iterator(dir.path)) {
    EXPECT_EQ(e.path().filename().string().rfind(".checkpoint-tmp-", 0), std::string::npos) << e.path();
  }
  // A version directory half-written by a killed process is removed at open.
  fs::create_directories(dir.path + "/.version-tmp-123");
  fs::create_directories(dir.path + "/.version-trash-456");
  auto reopened = VersionStore::Open(dir.path);
  ASSERT_TRUE(reopened.ok());
  EXPECT_FALSE(PathExists(dir.path + "/.version-tmp-123"));
  EXPECT_FALSE(PathExists(dir.path + "/.version-trash-456"));
}

}  // namespace
}  // namespace strata
