#include "core/data/encode.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/data/fake_tokenizer.h"
#include "nlohmann/json.hpp"

namespace strata {
namespace {

using ::testing::ElementsAre;
using testing::FakeTokenizer;

std::vector<int32_t> Cat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

TEST(EncodeTest, PromptGetsBosCompletionGetsNoSpecials) {
  FakeTokenizer tok;
  auto pc = EncodePromptCompletion(tok, "Q:", " yes");
  EXPECT_EQ(pc.prompt, Cat({1}, FakeTokenizer::Ids("Q:")));
  EXPECT_EQ(pc.completion, FakeTokenizer::Ids(" yes"));
  EXPECT_EQ(EncodePrompt(tok, "Q:"), pc.prompt);

  FakeTokenizer no_bos(false, false, /*adds_bos=*/false);
  EXPECT_EQ(EncodePrompt(no_bos, "Q:"), FakeTokenizer::Ids("Q:"));
}

TEST(EncodeTest, CompletionIsTheContinuationNotASeparateEncoding) {
  // SentencePiece-like: Encode(" Paris") alone would be "  Paris" (extra leading space token).
  FakeTokenizer sp(/*prepend_space=*/true);
  auto pc = EncodePromptCompletion(sp, "is", " Paris");
  EXPECT_EQ(pc.prompt, Cat({1}, FakeTokenizer::Ids(" is")));
  EXPECT_EQ(pc.completion, FakeTokenizer::Ids(" Paris"));
  EXPECT_NE(sp.Encode(" Paris", false), pc.completion);
}

TEST(EncodeTest, MergeAcrossTheBoundaryFallsBackToSeparateEncoding) {
  FakeTokenizer merging(false, /*merge_ab=*/true);
  auto pc = EncodePromptCompletion(merging, "xa", "b");
  EXPECT_EQ(pc.prompt, Cat({1}, FakeTokenizer::Ids("xa")));
  EXPECT_EQ(pc.completion, FakeTokenizer::Ids("b"));  // not the merged id
}

TEST(EncodeTest, SupervisedExampleTargetsOnlyTheCompletion) {
  FakeTokenizer tok;
  EncodedExample e = EncodeExample(tok, MakeCompletionExample("Q:", " yes"));
  EXPECT_EQ(e.ids, Cat(Cat({1}, FakeTokenizer::Ids("Q:")), FakeTokenizer::Ids(" yes")));
  EXPECT_EQ(e.target_start, 3);  // BOS Q :
  EXPECT_EQ(e.num_targets(), 4);
  EXPECT_FALSE(e.truncated);
  // Choice examples train on their completion like the others.
  EncodedExample c = EncodeExample(tok, MakeChoiceExample("Q:", " no", {" yes", " no"}));
  EXPECT_EQ(c.target_start, 3);
  EXPECT_EQ(c.num_targets(), 3);
}

TEST(EncodeTest, TextTargetsEveryTokenAfterBos) {
  FakeTokenizer tok;
  EncodedExample e = EncodeExample(tok, MakeTextExample("abc"));
  EXPECT_EQ(e.ids, Cat({1}, FakeTokenizer::Ids("abc")));
  EXPECT_EQ(e.target_start, 1);
  EXPECT_EQ(e.num_targets(), 3);
}

TEST(EncodeTest, AddEosAppendsATarget) {
  FakeTokenizer tok;
  EncodeOptions options;
  options.add_eos = true;
  EncodedExample e = EncodeExample(tok, MakeCompletionExample("Q:", " y"), options);
  EXPECT_EQ(e.ids.back(), 2);
  EXPECT_EQ(e.num_targets(), 3);  // ' ', 'y', EOS
  EncodedExample t = EncodeExample(tok, MakeTextExample("ab"), options);
  EXPECT_EQ(t.ids, Cat(Cat({1}, FakeTokenizer::Ids("ab")), {2}));
}

TEST(EncodeTest, TruncationKeepsBosTheEndOfThePromptAndTheWholeCompletion) {
  FakeTokenizer tok;
  EncodeOptions options;
  options.max_seq_len = 10;
  // BOS + 20 prompt tokens + 4 completion tokens = 25 > 10.
  const std::string prompt = "instruction-text Ans:";
  ASSERT_EQ(prompt.size(), 21u);
  EncodedExample e = EncodeExample(tok, MakeCompletionExample(prompt, " Bad"), options);
  EXPECT_TRUE(e.truncated);
  EXPECT_EQ(e.untruncated_length, 1 + 21 + 4);
  ASSERT_EQ(e.length(), 10);
  // BOS + the last 5 prompt tokens ("Ans:" end kept) + the whole completion.
  EXPECT_EQ(e.ids, Cat(Cat({1}, FakeTokenizer::Ids(" Ans:")), FakeTokenizer::Ids(" Bad")));
  EXPECT_EQ(e.target_start, 6);
  EXPECT_EQ(e.num_targets(), 4);
  EXPECT_EQ(tok.Decode(e.ids, true), " Ans: Bad");
}

TEST(EncodeTest, TruncationOfAnOverlongCompletionKeepsItsHead) {
  FakeTokenizer tok;
  EncodeOptions options;
  options.max_seq_len = 4;
  EncodedExample e = EncodeExample(tok, MakeCompletionExample("Q:", " abcdef"), options);
  EXPECT_TRUE(e.truncated);
  EXPECT_EQ(e.ids, Cat({1}, FakeTokenizer::Ids(" ab")));  // BOS is the only context left
  EXPECT_EQ(e.target_start, 1);

  FakeTokenizer no_bos(false, false, false);
  EncodedExample n = EncodeExample(no_bos, MakeCompletionExample("Q:", " abcdef"), options);
  EXPECT_EQ(n.ids, FakeTokenizer::Ids(": ab"));  // the last prompt token is the context
  EXPECT_EQ(n.target_start, 1);
}

TEST(EncodeTest, TextTruncationKeepsTheHead) {
  FakeTokenizer tok;
  EncodeOptions options;
  options.max_seq_len = 3;
  EncodedExample e = EncodeExample(tok, MakeTextExample("abcdef"), options);
  EXPECT_TRUE(e.truncated);
  EXPECT_EQ(e.ids, Cat({1}, FakeTokenizer::Ids("ab")));
}

TEST(EncodeTest, NoTruncationWhenItFits) {
  FakeTokenizer tok;
  EncodeOptions options;
  options.max_seq_len = 7;
  EncodedExample e = EncodeExample(tok, MakeCompletionExample("Q:", " yes"), options);  // exactly 7
  EXPECT_FALSE(e.truncated);
  EXPECT_EQ(e.length(), 7);
}

TEST(EncodeTest, CountExampleTokensUsesTheLongestChoice) {
  FakeTokenizer tok;
  EXPECT_EQ(CountExampleTokens(tok, MakeCompletionExample("Q:", " a")), 5);
  EXPECT_EQ(CountExampleTokens(tok, MakeChoiceExample("Q:", " a", {" a", " bbb"})), 7);
  EXPECT_EQ(CountExampleTokens(tok, MakeTextExample("abc")), 4);
}

TEST(EncodeTest, ByteLevelDefaultTokenizer) {
  auto tok = Tokenizer::ByteLevelDefault();
  auto pc = EncodePromptCompletion(*tok, "Hi", " there");
  ASSERT_FALSE(pc.prompt.empty());
  EXPECT_THAT(pc.prompt, ElementsAre(1, 3 + 'H', 3 + 'i'));
  ASSERT_EQ(pc.completion.size(), 6u);
  EXPECT_EQ(pc.completion[0], 3 + ' ');
}

TEST(EncodeTest, Stories260KCompletionHasNoSpuriousSpaceToken) {
  auto tok = Tokenizer::FromDirectory(std::string(STRATA_SHARED_DIR) + "/models/stories260K");
  ASSERT_TRUE(tok.ok()) << tok.status();
  const std::string prompt = "The capital of France is";
  const std::string completion = " Paris";
  auto pc = EncodePromptCompletion(**tok, prompt, completion);
  ASSERT_FALSE(pc.prompt.empty());
  EXPECT_EQ(pc.prompt.front(), 1);  // BOS
  EXPECT_EQ(pc.prompt, (*tok)->Encode(prompt, true));
  // prompt + completion ids are exactly the tokenization of the whole text ...
  EXPECT_EQ(Cat(pc.prompt, pc.completion), (*tok)->Encode(prompt + completion, true));
  EXPECT_EQ((*tok)->Decode(Cat(pc.prompt, pc.completion), true), prompt + completion);
  // ... unlike the separate encoding, whose Prepend("▁") normalizer doubles the space.
  const auto separate = (*tok)->Encode(completion, false);
  EXPECT_NE(separate, pc.completion);
  EXPECT_EQ((*tok)->Decode(Cat(pc.prompt, separate), true), prompt + " " + completion);
}

// The completion ids after a long prompt, from the prompt's tail only, equal the ids of the whole
// prompt + completion, for the real tokenizers (SentencePiece-style and byte-level BPE) on the
// cl-small tasks' prompts made long.
TEST(EncodeTest, CompletionAfterALongPromptEqualsTheWholeEncoding) {
  const std::string shared = STRATA_SHARED_DIR;
  std::vector<std::pair<std::string, std::string>> pairs;
  for (const char* task : {"capitals", "iso3", "langid", "domains"}) {
    std::ifstream in(shared + "/data/cl-small/" + task + "/test.jsonl");
    std::string line;
    for (int n = 0; n < 40 && std::getline(in, line); ++n) {
      const auto j = nlohmann::json::parse(line);
      if (j.contains("prompt") && j.contains("completion")) {
        pairs.emplace_back(j["prompt"].get<std::string>(), j["completion"].get<std::string>());
      }
    }
  }
  ASSERT_GT(pairs.size(), 100u);
  for (const char* name : {"llama2", "gpt2", "qwen3", "mistral"}) {
    auto tok = Tokenizer::FromDirectory(shared + "/tokenizers/" + name);
    ASSERT_TRUE(tok.ok()) << name << ": " << tok.status();
    for (size_t i = 0; i < pairs.size(); ++i) {
      // A few-shot style prompt: earlier pairs, then this one's prompt.
      std::string prompt;
      for (size_t k = 1; k <= 3; ++k) {
        const auto& shot = pairs[(i + k) % pairs.size()];
        prompt += shot.first + shot.second + "\n";
      }
      prompt += pairs[i].first;
      for (const std::string& completion : {pairs[i].second, std::string(" no"), std::string("\nX")}) {
        EXPECT_EQ(EncodeCompletionAfter(**tok, prompt, completion),
                  EncodePromptCompletion(**tok, prompt, completion).completion)
            << name << " prompt " << i << " completion '" << completion << "'";
      }
    }
  }
}

}  // namespace
}  // namespace strata
