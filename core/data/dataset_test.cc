#include "core/data/dataset.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>

#include "core/data/fake_tokenizer.h"

namespace strata {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::SizeIs;

const std::string kData = std::string(STRATA_SHARED_DIR) + "/data";

// A scratch task directory under the test temp dir, removed at the end of the test.
class ScratchTask {
 public:
  explicit ScratchTask(const std::string& name)
      : dir_(::testing::TempDir() + "/strata_dataset_test/" + name) {
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  ~ScratchTask() { std::filesystem::remove_all(dir_); }
  void Write(const std::string& file, const std::string& contents) const {
    std::ofstream(dir_ + "/" + file, std::ios::binary) << contents;
  }
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
};

TEST(DatasetTest, NamesRoundTrip) {
  for (Scorer s : {Scorer::kExactMatch, Scorer::kChoice, Scorer::kNll})
    EXPECT_EQ(ParseScorer(ScorerName(s)), s);
  for (TaskKind k : {TaskKind::kKnowledge, TaskKind::kSkill}) EXPECT_EQ(ParseTaskKind(TaskKindName(k)), k);
  EXPECT_FALSE(ParseScorer("accuracy").has_value());
}

TEST(DatasetTest, LoadsClSmallTasks) {
  auto capitals = LoadTaskDir(kData + "/cl-small/capitals");
  ASSERT_TRUE(capitals.ok()) << capitals.status();
  EXPECT_EQ(capitals->name, "capitals");
  EXPECT_EQ(capitals->format, TaskFormat::kNative);
  EXPECT_EQ(capitals->kind, TaskKind::kKnowledge);
  EXPECT_EQ(capitals->scorer, Scorer::kExactMatch);
  EXPECT_EQ(capitals->example_kind, ExampleKind::kCompletion);
  EXPECT_THAT(capitals->train, SizeIs(230));
  EXPECT_THAT(capitals->test, SizeIs(230));
  EXPECT_EQ(capitals->train[0], MakeCompletionExample("The capital of Afghanistan is", " Kabul"));

  auto iso3 = LoadTaskDir(kData + "/cl-small/iso3");
  ASSERT_TRUE(iso3.ok()) << iso3.status();
  EXPECT_THAT(iso3->train, SizeIs(242));
  EXPECT_EQ(iso3->train[1].completion, " ALA");

  auto langid = LoadTaskDir(kData + "/cl-small/langid");
  ASSERT_TRUE(langid.ok()) << langid.status();
  EXPECT_EQ(langid->kind, TaskKind::kSkill);
  EXPECT_EQ(langid->scorer, Scorer::kChoice);
  EXPECT_EQ(langid->example_kind, ExampleKind::kChoice);
  EXPECT_THAT(langid->train, SizeIs(2400));
  EXPECT_THAT(langid->test, SizeIs(450));
  EXPECT_THAT(langid->test[0].choices, ElementsAre(" english", " french", " german"));
}

TEST(DatasetTest, LoadsClBenchmarkTasks) {
  EXPECT_EQ(*DetectTaskFormat(kData + "/cl/sst-2"), TaskFormat::kClBenchmark);
  EXPECT_EQ(*DetectTaskFormat(kData + "/cl-small/langid"), TaskFormat::kNative);
  auto sst2 = LoadTaskDir(kData + "/cl/sst-2");
  ASSERT_TRUE(sst2.ok()) << sst2.status();
  EXPECT_EQ(sst2->name, "sst-2");
  EXPECT_EQ(sst2->format, TaskFormat::kClBenchmark);
  EXPECT_EQ(sst2->kind, TaskKind::kSkill);
  EXPECT_EQ(sst2->scorer, Scorer::kChoice);
  EXPECT_THAT(sst2->train, SizeIs(2000));
  EXPECT_THAT(sst2->test, SizeIs(872));
  EXPECT_EQ(sst2->train[0].completion, " Bad");
  EXPECT_THAT(sst2->train[0].prompt, HasSubstr("\nOption: Good, Bad\nText: does n't deserve"));

  TaskLoadOptions capped;
  capped.max_train = 100;
  capped.max_test = 50;
  auto dbpedia = LoadTaskDir(kData + "/cl/dbpedia", capped);
  ASSERT_TRUE(dbpedia.ok()) << dbpedia.status();
  EXPECT_THAT(dbpedia->train, SizeIs(100));
  EXPECT_THAT(dbpedia->test, SizeIs(50));
  EXPECT_EQ(dbpedia->total_train, 5700);
  EXPECT_THAT(dbpedia->train[0].choices, SizeIs(14));
}

TEST(DatasetTest, CapsAreSeededSamplesInFileOrder) {
  TaskLoadOptions options;
  options.max_train = 40;
  options.max_test = 30;
  options.seed = 7;
  auto a = LoadTaskDir(kData + "/cl-small/langid", options);
  auto b = LoadTaskDir(kData + "/cl-small/langid", options);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_THAT(a->train, SizeIs(40));
  EXPECT_THAT(a->test, SizeIs(30));
  EXPECT_EQ(a->train, b->train);  // deterministic
  EXPECT_EQ(a->test, b->test);
  options.seed = 8;
  auto c = LoadTaskDir(kData + "/cl-small/langid", options);
  ASSERT_TRUE(c.ok());
  EXPECT_NE(a->train, c->train);
  // Not the head of the file: the file's first example is unlikely to be the sample's first.
  auto all = LoadTaskDir(kData + "/cl-small/langid");
  ASSERT_TRUE(all.ok());
  std::vector<Example> head(all->train.begin(), all->train.begin() + 40);
  EXPECT_NE(a->train, head);
}

TEST(DatasetTest, KnowledgeTestIsRestrictedToTrainedFacts) {
  TaskLoadOptions options;
  options.max_train = 25;
  auto capitals = LoadTaskDir(kData + "/cl-small/capitals", options);
  ASSERT_TRUE(capitals.ok()) << capitals.status();
  ASSERT_THAT(capitals->train, SizeIs(25));
  EXPECT_EQ(capitals->test, capitals->train);  // test.jsonl == train.jsonl for capitals
  // The sample spans the alphabet (a head would hold only countries starting with A or B).
  EXPECT_THAT(capitals->train.back().prompt, ::testing::Not(HasSubstr("of A")));

  options.max_test = 10;
  auto fewer = LoadTaskDir(kData + "/cl-small/capitals", options);
  ASSERT_TRUE(fewer.ok());
  ASSERT_THAT(fewer->test, SizeIs(10));
  std::set<std::string> trained;
  for (const auto& e : fewer->train) trained.insert(e.prompt);
  for (const auto& e : fewer->test) EXPECT_EQ(trained.count(e.prompt), 1u) << e.prompt;
}

TEST(DatasetTest, SampleIndices) {
  auto s = SampleIndices(100, 10, 3);
  ASSERT_THAT(s, SizeIs(10));
  EXPECT_TRUE(std::is_sorted(s.begin(), s.end()));
  EXPECT_EQ(std::set<size_t>(s.begin(), s.end()).size(), 10u);
  for (size_t i : s) EXPECT_LT(i, 100u);
  EXPECT_EQ(s, SampleIndices(100, 10, 3));
  EXPECT_NE(s, SampleIndices(100, 10, 4));
  EXPECT_THAT(SampleIndices(5, 9, 1), ElementsAre(0, 1, 2, 3, 4));
  // Roughly uniform: every index of 10 is drawn about 5000 times in 10000 samples of 5.
  std::vector<int> hits(10, 0);
  for (uint64_t seed = 0; seed < 10000; ++seed) {
    for (size_t i : SampleIndices(10, 5, seed)) ++hits[i];
  }
  for (int h : hits) EXPECT_NEAR(h, 5000, 300);
}

TEST(DatasetTest, NativeDefaultsAndConsistencyChecks) {
  ScratchTask t("defaults");
  t.Write("task.json", "{}");
  t.Write("train.jsonl", "{\"prompt\": \"p\", \"completion\": \" a\", \"choices\": [\" a\", \" b\"]}\n");
  t.Write("test.jsonl", "{\"prompt\": \"q\", \"completion\": \" b\", \"choices\": [\" a\", \" b\"]}\n");
  auto task = LoadTaskDir(t.dir());
  ASSERT_TRUE(task.ok()) << task.status();
  EXPECT_EQ(task->name, "defaults");  // the directory name
  EXPECT_EQ(LoadTaskDir(t.dir() + "/")->name, "defaults");
  EXPECT_EQ(task->kind, TaskKind::kSkill);
  EXPECT_EQ(task->scorer, Scorer::kChoice);

  t.Write("task.json", R"({"scorer": "choice"})");
  t.Write("train.jsonl", "{\"prompt\": \"p\", \"completion\": \" a\"}\n");
  t.Write("test.jsonl", "{\"prompt\": \"p\", \"completion\": \" a\"}\n");
  EXPECT_THAT(std::string(LoadTaskDir(t.dir()).status().message()),
              HasSubstr("scorer \"choice\" needs examples with \"choices\""));

  t.Write("task.json", R"({"kind": "facts"})");
  EXPECT_THAT(std::string(LoadTaskDir(t.dir()).status().message()),
              HasSubstr("field \"kind\": \"facts\" is not one of knowledge, skill"));

  t.Write("task.json", "{}");
  t.Write("test.jsonl", "{\"text\": \"t\"}\n");
  EXPECT_THAT(std::string(LoadTaskDir(t.dir()).status().message()),
              HasSubstr("train.jsonl holds completion examples but test.jsonl holds text examples"));
}

TEST(DatasetTest, BadLinesNameTheFileAndLine) {
  ScratchTask t("bad");
  t.Write("task.json", R"({"name": "bad", "kind": "skill", "scorer": "exact_match"})");
  t.Write("train.jsonl",
          "{\"prompt\": \"p\", \"completion\": \" a\"}\n{\"prompt\": \"p\", \"completion\": 1}\n");
  t.Write("test.jsonl", "{\"prompt\": \"p\", \"completion\": \" a\"}\n");
  auto strict = LoadTaskDir(t.dir());
  ASSERT_FALSE(strict.ok());
  EXPECT_THAT(std::string(strict.status().message()),
              HasSubstr("bad/train.jsonl:2: field \"completion\": expected a string, got number"));

  TaskLoadOptions skip;
  skip.validation.skip_bad_lines = true;
  auto lenient = LoadTaskDir(t.dir(), skip);
  ASSERT_TRUE(lenient.ok()) << lenient.status();
  EXPECT_THAT(lenient->train, SizeIs(1));
  EXPECT_EQ(lenient->skipped_train_lines, 1);
}

TEST(DatasetTest, TokenLimitAppliesToTaskFiles) {
  testing::FakeTokenizer tok;
  TaskLoadOptions options;
  options.validation.tokenizer = &tok;
  options.validation.max_tokens = 40;  // "The capital of X is Y" is longer for most countries
  options.validation.skip_bad_lines = true;
  auto capitals = LoadTaskDir(kData + "/cl-small/capitals", options);
  ASSERT_TRUE(capitals.ok()) << capitals.status();
  EXPECT_GT(capitals->skipped_train_lines, 0);
  EXPECT_LT(capitals->train.size(), 230u);
  for (const auto& e : capitals->train) EXPECT_LE(1 + e.prompt.size() + e.completion.size(), 40u);
}

TEST(DatasetTest, MissingDirectoryOrFile) {
  EXPECT_EQ(LoadTaskDir(kData + "/cl-small/nope").status().code(), absl::StatusCode::kNotFound);
  ScratchTask t("nofiles");
  t.Write("task.json", "{}");
  auto r = LoadTaskDir(t.dir());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("train.jsonl"));
}

}  // namespace
}  // namespace strata
