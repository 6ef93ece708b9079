#include "core/data/example.h"

#include <gtest/gtest.h>

#include "core/data/jsonl.h"

namespace strata {
namespace {

TEST(ExampleTest, KindNamesRoundTrip) {
  for (ExampleKind k : {ExampleKind::kCompletion, ExampleKind::kChoice, ExampleKind::kText}) {
    auto parsed = ParseExampleKind(ExampleKindName(k));
    ASSERT_TRUE(parsed.has_value());
    EXPECT_EQ(*parsed, k);
  }
  EXPECT_FALSE(ParseExampleKind("choices").has_value());
}

TEST(ExampleTest, CorrectChoice) {
  Example e = MakeChoiceExample("Q:", " b", {" a", " b", " c"});
  EXPECT_EQ(e.CorrectChoice(), 1);
  e.completion = "b";  // exact match only: the leading space matters
  EXPECT_EQ(e.CorrectChoice(), -1);
}

TEST(ExampleTest, JsonLineIsCanonicalAndValidatesBack) {
  const Example c = MakeCompletionExample("The capital of Åland Islands is", " Mariehamn");
  EXPECT_EQ(ExampleToJsonLine(c),
            R"({"prompt":"The capital of Åland Islands is","completion":" Mariehamn"})");
  const Example ch = MakeChoiceExample("Word: x\nLanguage:", " french", {" english", " french"});
  EXPECT_EQ(ExampleToJsonLine(ch),
            R"({"prompt":"Word: x\nLanguage:","completion":" french","choices":[" english"," french"]})");
  const Example t = MakeTextExample("Once upon a \"time\"");
  EXPECT_EQ(ExampleToJsonLine(t), R"({"text":"Once upon a \"time\""})");
  for (const Example& e : {c, ch, t}) {
    auto back = ParseExampleLine(ExampleToJsonLine(e));
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(*back, e);
  }
}

}  // namespace
}  // namespace strata
