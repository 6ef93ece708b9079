#include "core/eval/scorers.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <fstream>
#include <sstream>

#include "core/data/encode.h"
#include "core/model/generate.h"

namespace strata {
namespace {

const std::string kShared = STRATA_SHARED_DIR;

// The embedded default config (byte-level vocab 259) with random weights; embeddings scaled up so
// that the choices' log-likelihoods differ clearly.
std::unique_ptr<CausalLM> RandomByteModel() {
  auto m = CausalLM::RandomInit(CausalLM::EmbeddedDefaultConfig(), 11);
  EXPECT_TRUE(m.ok()) << m.status();
  at::Tensor* embed = (*m)->FindParameter("model.embed_tokens.weight");
  *embed = embed->mul(40.0);
  (*m)->RetieEmbeddings();
  return std::move(m).value();
}

// log p(completion | prompt) by hand: one unpadded forward, log-softmax, sum over the completion.
double HandLogLikelihood(const CausalLM& model, const Tokenizer& tok, const std::string& prompt,
                         const std::string& completion) {
  PromptCompletionIds pc = EncodePromptCompletion(tok, prompt, completion);
  std::vector<int64_t> ids(pc.prompt.begin(), pc.prompt.end());
  ids.insert(ids.end(), pc.completion.begin(), pc.completion.end());
  at::NoGradGuard g;
  const at::Tensor lp =
      at::log_softmax(model.Forward(at::tensor(ids).view({1, -1}), at::Tensor()), -1)[0].to(at::kDouble);
  double total = 0;
  for (size_t t = pc.prompt.size(); t < ids.size(); ++t)
    total += lp[static_cast<int64_t>(t) - 1][ids[t]].item<double>();
  return total;
}

TEST(ChoiceScorerTest, PicksTheChoiceWithTheHighestHandComputedLogLikelihood) {
  auto model = RandomByteModel();
  auto tok = Tokenizer::ByteLevelDefault();
  std::vector<Example> examples;
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {"The answer is", {" yes", " no", " maybe not"}},
      {"Q: 2+2\nA:", {" 4", " four", " 22"}},
      {"x", {"a", "bb"}},
      {"A much longer prompt that forces padding in the batch:", {" left", " right"}},
  };
  // The first two examples name the choice the model prefers, the last two another one.
  std::vector<std::vector<double>> hand;
  for (size_t i = 0; i < cases.size(); ++i) {
    std::vector<double> ll;
    for (const auto& c : cases[i].second) ll.push_back(HandLogLikelihood(*model, *tok, cases[i].first, c));
    const size_t best = std::max_element(ll.begin(), ll.end()) - ll.begin();
    const size_t label = i < 2 ? best : (best + 1) % ll.size();
    examples.push_back(MakeChoiceExample(cases[i].first, cases[i].second[label], cases[i].second));
    hand.push_back(ll);
  }
  for (int64_t batch : {1, 3, 16}) {
    ScorerOptions o;
    o.batch_size = batch;
    auto score = ScoreChoice(*model, *tok, examples, o);
    ASSERT_TRUE(score.ok()) << score.status();
    EXPECT_EQ(score->total, 4);
    EXPECT_EQ(score->correct, 2) << batch;
    EXPECT_DOUBLE_EQ(score->accuracy, 0.5);
    for (size_t i = 0; i < examples.size(); ++i) {
      const size_t best = std::max_element(hand[i].begin(), hand[i].end()) - hand[i].begin();
      EXPECT_EQ(score->predicted[i], static_cast<int>(best)) << i;
      ASSERT_EQ(score->log_likelihoods[i].size(), hand[i].size());
      for (size_t c = 0; c < hand[i].size(); ++c) {
        EXPECT_NEAR(score->log_likelihoods[i][c], hand[i][c], 1e-3 + 1e-5 * std::abs(hand[i][c]))
            << i << "/" << c;
      }
    }
  }
  // Non-choice examples are refused.
  auto bad = ScoreChoice(*model, *tok, {MakeCompletionExample("a", "b")});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
}

struct Stories {
  std::unique_ptr<CausalLM> model;
  std::unique_ptr<Tokenizer> tokenizer;
};

Stories LoadStories() {
  Stories s;
  auto model = CausalLM::Load(kShared + "/models/stories260K");
  EXPECT_TRUE(model.ok()) << model.status();
  auto tok = Tokenizer::FromDirectory(kShared + "/models/stories260K");
  EXPECT_TRUE(tok.ok()) << tok.status();
  s.model = std::move(model).value();
  s.tokenizer = std::move(tok).value();
  return s;
}

// stories260K's golden greedy continuation of "Once upon a time" up to its first newline
// (reference_outputs.json greedy_64_text).
const char kGreedy[] =
    ", there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, "
    "red "
    "ball. She wanted to play with it, but it was too high.";

TEST(ExactMatchScorerTest, GreedyCompletionWithNormalisation) {
  Stories s = LoadStories();
  std::vector<Example> examples = {
      MakeCompletionExample("Once upon a time", kGreedy),
      // Case, punctuation and spacing differ: still a match after normalisation.
      MakeCompletionExample(
          "Once upon a time",
          "There was a little girl named LILY she loved to play outside in the park  One day she "
          "saw a big red ball She wanted to play with it but it was too high!"),
      MakeCompletionExample("Once upon a time", ", there was a little girl named Lucy."),
      MakeCompletionExample("Once upon a time", ", there was a little boy"),
  };
  ExactMatchOptions o;
  o.max_new_tokens = 64;  // stop at the newline
  o.batch_size = 3;
  auto score = ScoreExactMatch(*s.model, *s.tokenizer, examples, o);
  ASSERT_TRUE(score.ok()) << score.status();
  EXPECT_EQ(score->matches, (std::vector<bool>{true, true, false, false}));
  EXPECT_EQ(score->correct, 2);
  EXPECT_DOUBLE_EQ(score->accuracy, 0.5);
  EXPECT_THAT(score->predictions[0], ::testing::HasSubstr("there was a little girl named Lily."));
  EXPECT_THAT(score->predictions[0], ::testing::HasSubstr("too high."));
  EXPECT_EQ(score->predictions[0].find('\n'), std::string::npos);

  // Default budget: as many tokens as the reference completion (so a reference that tokenises
  // differently, e.g. upper case, gets a different budget: normalisation is for the text only).
  std::vector<Example> short_refs = {
      MakeCompletionExample("Once upon a time", ", there was a little girl named Lily."),
      MakeCompletionExample("Once upon a time", ", there was a little girl"),
      MakeCompletionExample("Once upon a time", ", there was a big dog"),
  };
  auto budgeted = ScoreExactMatch(*s.model, *s.tokenizer, short_refs);
  ASSERT_TRUE(budgeted.ok()) << budgeted.status();
  EXPECT_EQ(budgeted->matches, (std::vector<bool>{true, true, false}));
  EXPECT_THAT(budgeted->predictions[1], ::testing::HasSubstr("there was a little girl"));
  EXPECT_THAT(budgeted->predictions[1], ::testing::Not(::testing::HasSubstr("named")));
}

TEST(NllScorerTest, MatchesGoldenPerStoryNll) {
  Stories s = LoadStories();
  std::ifstream in(kShared + "/data/lm/tinystories_val.txt");
  std::stringstream buf;
  buf << in.rdbuf();
  std::vector<std::string> paragraphs = SplitOnBlankLines(buf.str());
  // The golden values are for the first five paragraphs of at least 100 tokens (the reference
  // skipped short ones), each scored on its own: paragraphs 2, 3, 4, 5 and 10 of the file.
  std::vector<std::string> stories;
  std::vector<size_t> picked;
  for (size_t i = 0; i < paragraphs.size() && stories.size() < 5; ++i) {
    if (EncodePrompt(*s.tokenizer, paragraphs[i]).size() >= 100) {
      stories.push_back(paragraphs[i]);
      picked.push_back(i);
    }
  }
  EXPECT_EQ(picked, (std::vector<size_t>{2, 3, 4, 5, 10}));
  NllOptions o;
  o.max_seq_len = 256;
  o.batch_size = 2;
  auto score = ScoreNll(*s.model, *s.tokenizer, stories, o);
  ASSERT_TRUE(score.ok()) << score.status();
  const double golden[] = {1.2758, 1.45215, 1.52679, 1.58091, 1.54445};
  for (size_t i = 0; i < 5; ++i) EXPECT_NEAR(score->per_text[i], golden[i], 1e-4) << "story " << i;
  EXPECT_GT(score->tokens, 0);
  EXPECT_NEAR(score->perplexity, std::exp(score->mean_nll), 1e-9);

  // All windows: every token after BOS is predicted once.
  NllOptions w;
  w.max_seq_len = 32;
  w.all_windows = true;
  auto windows = ScoreNll(*s.model, *s.tokenizer, {stories[1]}, w);
  ASSERT_TRUE(windows.ok()) << windows.status();
  const int64_t n = static_cast<int64_t>(EncodePrompt(*s.tokenizer, stories[1]).size());
  EXPECT_EQ(windows->tokens, n - 1);
  // With a window covering the text, windowing changes nothing.
  NllOptions big;
  big.max_seq_len = 4096;
  big.all_windows = true;
  NllOptions trunc;
  trunc.max_seq_len = 4096;
  auto a = ScoreNll(*s.model, *s.tokenizer, {stories[1]}, big);
  auto b = ScoreNll(*s.model, *s.tokenizer, {stories[1]}, trunc);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->tokens, n - 1);
  EXPECT_NEAR(a->mean_nll, b->mean_nll, 1e-9);
  // Less context, higher loss.
  EXPECT_GT(windows->mean_nll, a->mean_nll);

  EXPECT_EQ(ScoreNll(*s.model, *s.tokenizer, {}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(NllScorerTest, SplitOnBlankLines) {
  EXPECT_EQ(SplitOnBlankLines("a\nb\n\n  \nc\n\n\n d \n"), (std::vector<std::string>{"a\nb", "c", "d"}));
  EXPECT_EQ(SplitOnBlankLines(""), std::vector<std::string>{});
  EXPECT_EQ(SplitOnBlankLines("one"), std::vector<std::string>{"one"});
}

}  // namespace
}  // namespace strata
