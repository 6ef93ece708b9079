#include "core/state/checkpoint.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>

#include "core/util/file_util.h"

namespace strata {
namespace {
namespace fs = std::filesystem;

struct Dir {
  Dir() {
    path = (fs::temp_directory_path() /
            ("strata-ckpt-" + std::to_string(::getpid()) + "-" + std::to_string(n++)))
               .string();
    fs::remove_all(path);
    fs::create_directories(path + "/tasks/a");
  }
  ~Dir() { fs::remove_all(path); }
  std::string path;
  static inline int n = 0;
};

CheckpointData Sample(const std::string& dir) {
  std::ofstream(dir + "/tasks/a/eval.jsonl") << "{\"prompt\":\"x\",\"completion\":\" y\"}\n";
  CheckpointData d;
  d.base_model_id = "/models/m";
  d.method = "share_ella";
  d.method_config_json = "{\"rank\":8}";
  d.method_tensors["m.beta"] = torch::randn({4, 3});
  d.method_tensors["m.g"] = torch::randn({3, 3}, torch::kDouble);
  d.weights_version = 2;
  d.tasks.push_back({"a", "exact_match", "job-000001", "", "tasks/a/eval.jsonl", 1});
  d.matrix = {{0.5}};
  d.base = {0.1};
  d.reference_nll = {2.0, std::nan("")};
  return d;
}

TEST(Checkpoint, RoundTrip) {
  Dir dir;
  EXPECT_FALSE(LoadCheckpoint(dir.path)->has_value());
  auto d = Sample(dir.path);
  ASSERT_TRUE(SaveCheckpoint(dir.path, d).ok());
  auto back = LoadCheckpoint(dir.path);
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_TRUE(back->has_value());
  const auto& b = **back;
  EXPECT_EQ(b.method, "share_ella");
  EXPECT_EQ(b.weights_version, 2);
  ASSERT_EQ(b.tasks.size(), 1u);
  EXPECT_EQ(b.tasks[0].job_id, "job-000001");
  EXPECT_TRUE(torch::equal(b.method_tensors.at("m.beta"), d.method_tensors.at("m.beta")));
  EXPECT_EQ(b.method_tensors.at("m.g").scalar_type(), torch::kDouble);
  EXPECT_EQ(b.matrix, d.matrix);
  EXPECT_TRUE(std::isnan(b.reference_nll[1]));
  EXPECT_GT(CheckpointBytes(dir.path), 0);
  // A second save replaces the first atomically.
  d.weights_version = 3;
  ASSERT_TRUE(SaveCheckpoint(dir.path, d).ok());
  EXPECT_EQ((*LoadCheckpoint(dir.path))->weights_version, 3);
  EXPECT_FALSE(fs::exists(dir.path + "/checkpoint.old"));
}

TEST(Checkpoint, CorruptedFileIsRefusedByName) {
  Dir dir;
  ASSERT_TRUE(SaveCheckpoint(dir.path, Sample(dir.path)).ok());
  {
    std::fstream f(dir.path + "/checkpoint/method.safetensors",
                   std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-3, std::ios::end);
    f.put('\x7f');
  }
  auto r = LoadCheckpoint(dir.path);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(r.status().message().find("method.safetensors"), std::string::npos) << r.status();
}

TEST(Checkpoint, ChangedEvalSplitIsDetected) {
  Dir dir;
  ASSERT_TRUE(SaveCheckpoint(dir.path, Sample(dir.path)).ok());
  std::ofstream(dir.path + "/tasks/a/eval.jsonl", std::ios::app)
      << "{\"prompt\":\"z\",\"completion\":\" w\"}\n";
  auto r = LoadCheckpoint(dir.path);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("tasks/a/eval.jsonl"), std::string::npos) << r.status();
}

TEST(Checkpoint, PartialCheckpointIsRefused) {
  Dir dir;
  ASSERT_TRUE(SaveCheckpoint(dir.path, Sample(dir.path)).ok());
  fs::remove(dir.path + "/checkpoint/state.json");
  auto r = LoadCheckpoint(dir.path);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(r.status().message().find("state.json"), std::string::npos) << r.status();
  fs::remove(dir.path + "/checkpoint/manifest.json");
  r = LoadCheckpoint(dir.path);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("incomplete"), std::string::npos) << r.status();
}

TEST(Checkpoint, CrashBetweenRenamesRecoversTheOldCheckpoint) {
  Dir dir;
  ASSERT_TRUE(SaveCheckpoint(dir.path, Sample(dir.path)).ok());
  fs::rename(dir.path + "/checkpoint", dir.path + "/checkpoint.old");
  auto r = LoadCheckpoint(dir.path);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_TRUE(r->has_value());
  EXPECT_EQ((*r)->weights_version, 2);
}

TEST(Checkpoint, StartUpRemovesTempDirectoriesOfInterruptedWrites) {
  Dir dir;
  auto d = Sample(dir.path);
  ASSERT_TRUE(SaveCheckpoint(dir.path, d).ok());
  // What kill -9 during SaveCheckpoint leaves: temp directories with partial files.
  for (const char* leftover : {"/.checkpoint-tmp-1", "/.checkpoint-tmp-42"}) {
    fs::create_directories(dir.path + leftover);
    std::ofstream(dir.path + leftover + "/method.safetensors") << "partial";
  }
  fs::create_directories(dir.path + "/.checkpoint-other");  // not ours: kept
  auto back = LoadCheckpoint(dir.path);
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_TRUE(back->has_value());
  EXPECT_EQ((*back)->weights_version, 2);
  EXPECT_FALSE(fs::exists(dir.path + "/.checkpoint-tmp-1"));
  EXPECT_FALSE(fs::exists(dir.path + "/.checkpoint-tmp-42"));
  EXPECT_TRUE(fs::exists(dir.path + "/.checkpoint-other"));
  EXPECT_EQ(RemoveCheckpointLeftovers(dir.path), 0);
}

}  // namespace
}  // namespace strata
