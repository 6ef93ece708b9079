// SubmitTask's request handling: the names a submission's line errors carry.

#include "server/submit_request.h"

#include <gtest/gtest.h>

#include <string>

namespace strata {
namespace {

TEST(SplitSourceName, TheClientsNameMadePrintableElseTheDefault) {
  EXPECT_EQ(SplitSourceName("", "eval.jsonl"), "eval.jsonl");
  EXPECT_EQ(SplitSourceName("../data/capitals/test.jsonl", "eval.jsonl"), "../data/capitals/test.jsonl");
  EXPECT_EQ(SplitSourceName("données/é.jsonl", "eval.jsonl"), "données/é.jsonl");
  EXPECT_EQ(SplitSourceName("a\nb\tc.jsonl", "train.jsonl"), "a?b?c.jsonl");
  EXPECT_EQ(SplitSourceName("bad\xff.jsonl", "train.jsonl"), "bad\xEF\xBF\xBD.jsonl");
  // Too long: the last path component, and at most 256 bytes of it.
  const std::string dir(300, 'd');
  EXPECT_EQ(SplitSourceName("/" + dir + "/train.jsonl", "train.jsonl"), "train.jsonl");
  EXPECT_EQ(SplitSourceName(std::string(300, 'x') + ".jsonl", "train.jsonl"),
            std::string(250, 'x') + ".jsonl");
  // Cut at a character boundary, never inside one.
  std::string accents;
  for (int i = 0; i < 200; ++i) accents += "\xC3\xA9";  // é
  accents += "x";                                       // 401 bytes: byte 145 continues an é
  const std::string cut = SplitSourceName(accents, "train.jsonl");
  EXPECT_EQ(cut.size(), 255u);
  EXPECT_EQ(cut, accents.substr(accents.size() - cut.size()));
  EXPECT_EQ(static_cast<unsigned char>(cut[0]), 0xC3);
}

// Each split's errors name that split's source: a bad eval line names the eval file.
TEST(SplitIngest, LineErrorsNameTheirOwnSplit) {
  strata::v1::TaskSpec spec;
  spec.set_train_source("data/train-capitals.jsonl");
  spec.set_eval_source("data/test-capitals.jsonl");
  SplitIngest train(SplitSourceName(spec.train_source(), "train.jsonl"), {});
  SplitIngest eval(SplitSourceName(spec.eval_source(), "eval.jsonl"), {});
  strata::v1::DataChunk good, bad;
  good.set_jsonl("{\"prompt\": \"a\", \"completion\": \" b\"}\n");
  bad.set_jsonl("{\"prompt\": \"a\", \"completion\": \" b\"}\n{\"prompt\": \"c\", \"completion\": 3}\n");
  train.Add(good);
  eval.Add(bad);
  EXPECT_TRUE(train.validator().Finish().ok());
  const absl::Status st = eval.validator().Finish();
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("data/test-capitals.jsonl:2: field \"completion\""), absl::string_view::npos)
      << st.message();
  EXPECT_EQ(st.message().find("train"), absl::string_view::npos) << st.message();
}

}  // namespace
}  // namespace strata
