#include "core/data/cl_benchmark.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "core/data/jsonl.h"

namespace strata {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

const std::string kCl = std::string(STRATA_SHARED_DIR) + "/data/cl";

TEST(ClBenchmarkTest, LoadsTaskSpec) {
  auto spec = LoadClTaskSpec(kCl + "/agnews/task.json");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->name, "agnews");
  EXPECT_EQ(spec->instruction, "What is the topic of the following paragraph? Choose one from the option.");
  EXPECT_THAT(spec->labels, ElementsAre("World", "Sports", "Business", "Science or Technology"));
  EXPECT_EQ(spec->LabelIndex("Business"), 2);
  EXPECT_EQ(spec->LabelIndex("business"), -1);
}

TEST(ClBenchmarkTest, TaskSpecErrorsNameTheField) {
  EXPECT_THAT(std::string(ParseClTaskSpec(R"({"labels": ["a", "b"]})", "t.json").status().message()),
              HasSubstr("t.json: missing field \"instruction\""));
  EXPECT_THAT(
      std::string(ParseClTaskSpec(R"({"instruction": "i", "labels": ["a"]})", "t.json").status().message()),
      HasSubstr("field \"labels\": expected an array of at least 2 strings"));
  EXPECT_THAT(
      std::string(
          ParseClTaskSpec(R"({"instruction": "i", "labels": ["a", "a"]})", "t.json").status().message()),
      HasSubstr("duplicate label \"a\""));
  EXPECT_THAT(std::string(ParseClTaskSpec("{", "t.json").status().message()), HasSubstr("not valid JSON"));
  // A number beyond a double is out_of_range, not parse_error, in nlohmann: refused, not thrown.
  EXPECT_THAT(
      std::string(ParseClTaskSpec(R"({"instruction": "i", "n": 1e999})", "t.json").status().message()),
      HasSubstr("not valid JSON"));
  EXPECT_EQ(LoadClTaskSpec("/nonexistent/task.json").status().code(), absl::StatusCode::kNotFound);
}

TEST(ClBenchmarkTest, PromptLayout) {
  ClTaskSpec spec{"t", "Pick one.", {"A", "B c"}};
  // Trailing whitespace of the text is dropped so exactly one newline precedes "Answer:".
  EXPECT_EQ(BuildClPrompt(spec, "Text: x y \n"), "Pick one.\nOption: A, B c\nText: x y\nAnswer:");
  EXPECT_EQ(BuildClPrompt(spec, "Title: T\nText:  z"),
            "Pick one.\nOption: A, B c\nTitle: T\nText:  z\nAnswer:");
  auto ex = ConvertClExample(spec, "Text: x", "B c");
  ASSERT_TRUE(ex.ok()) << ex.status();
  EXPECT_EQ(ex->kind, ExampleKind::kChoice);
  EXPECT_EQ(ex->completion, " B c");
  EXPECT_THAT(ex->choices, ElementsAre(" A", " B c"));
  EXPECT_THAT(std::string(ConvertClExample(spec, "Text: x", "C").status().message()),
              HasSubstr("field \"label\": \"C\" is not one of the labels (A, B c)"));
  EXPECT_FALSE(ConvertClExample(spec, " \n", "A").ok());
}

TEST(ClBenchmarkTest, ConvertsTheFirstSst2Example) {
  auto spec = LoadClTaskSpec(kCl + "/sst-2/task.json");
  ASSERT_TRUE(spec.ok()) << spec.status();
  ValidationOptions options;
  options.cl_task = &*spec;
  auto parsed = ParseJsonlFile(kCl + "/sst-2/train.jsonl", options);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ASSERT_EQ(parsed->examples.size(), 2000u);
  const Example& first = parsed->examples[0];
  // Raw line: {"text": "Text: does n't deserve a passing grade ( even on a curve ) . ", "label": "Bad"}
  EXPECT_EQ(first.prompt,
            "What is the sentiment of the following paragraph? Choose one from the option.\n"
            "Option: Good, Bad\n"
            "Text: does n't deserve a passing grade ( even on a curve ) .\n"
            "Answer:");
  EXPECT_EQ(first.completion, " Bad");
  EXPECT_THAT(first.choices, ElementsAre(" Good", " Bad"));
  EXPECT_EQ(first.CorrectChoice(), 1);
  EXPECT_EQ(parsed->examples[1].completion, " Good");
}

TEST(ClBenchmarkTest, BenchmarkLinesAreValidated) {
  ClTaskSpec spec{"t", "Pick one.", {"A", "B"}};
  ValidationOptions options;
  options.cl_task = &spec;
  options.skip_bad_lines = true;
  JsonlValidator v("t/train.jsonl", options);
  v.AddChunk(
      "{\"text\": \"x\", \"label\": \"A\"}\n"
      "{\"text\": \"x\", \"label\": \"Z\"}\n"
      "{\"text\": \"x\"}\n"
      "{\"text\": 3, \"label\": \"A\"}\n"
      "{\"text\": \"x\", \"label\": \"A\", \"extra\": 1}\n"
      "{\"text\": \" \", \"label\": \"A\"}\n"
      "{\"prompt\": \"p\", \"completion\": \" A\"}\n");
  ASSERT_TRUE(v.Finish().ok());
  EXPECT_EQ(v.summary().accepted, 1);
  ASSERT_EQ(v.errors().size(), 6u);
  EXPECT_EQ(v.errors()[0].reason, LineErrorReason::kUnknownLabel);
  EXPECT_EQ(v.FormatError(v.errors()[0]),
            "t/train.jsonl:2: field \"label\": \"Z\" is not one of the task's labels (A, B)");
  EXPECT_EQ(v.errors()[1].reason, LineErrorReason::kMissingField);
  EXPECT_EQ(v.errors()[2].reason, LineErrorReason::kWrongType);
  EXPECT_EQ(v.errors()[3].reason, LineErrorReason::kUnknownField);
  EXPECT_EQ(v.errors()[4].reason, LineErrorReason::kEmptyField);
  EXPECT_EQ(v.errors()[5].reason, LineErrorReason::kUnknownField);  // native line in a benchmark file
}

}  // namespace
}  // namespace strata
