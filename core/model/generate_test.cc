#include "core/model/generate.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/strings/match.h"

namespace strata {
namespace {

const std::string kShared = STRATA_SHARED_DIR;
const std::string kStories = kShared + "/models/stories260K";

// Byte tokenizer like the embedded default: 0..2 are <unk>, <s>, </s>; 3 + b is byte b. Decode
// keeps raw bytes, so it can produce incomplete UTF-8 at the end, exactly what streaming must
// handle.
class FakeByteTokenizer : public Tokenizer {
 public:
  std::vector<int32_t> Encode(std::string_view text, bool add_special_tokens) const override {
    std::vector<int32_t> ids;
    if (add_special_tokens) ids.push_back(1);
    for (unsigned char c : text) ids.push_back(3 + c);
    return ids;
  }
  std::string Decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const override {
    std::string out;
    for (int32_t id : ids) {
      if (id >= 3 && id < 259) {
        out.push_back(static_cast<char>(id - 3));
      } else if (!skip_special_tokens) {
        out += id == 1 ? "<s>" : id == 2 ? "</s>" : "<unk>";
      }
    }
    return out;
  }
  int32_t vocab_size() const override { return 259; }
  std::optional<int32_t> bos_id() const override { return 1; }
  std::vector<int32_t> eos_ids() const override { return {2}; }
  std::optional<int32_t> pad_id() const override { return std::nullopt; }
  std::optional<int32_t> TokenToId(std::string_view) const override { return std::nullopt; }
  std::string IdToToken(int32_t id) const override { return std::to_string(id); }
  bool adds_bos() const override { return true; }
};

std::unique_ptr<CausalLM> DefaultModel(uint64_t seed = 3) {
  auto m = CausalLM::RandomInit(CausalLM::EmbeddedDefaultConfig(), seed);
  EXPECT_TRUE(m.ok()) << m.status();
  return std::move(m).value();
}

// STRATA_TEST_DEVICE (default cpu; scripts/gpu-check.sh sets cuda) for the stories260K tests.
std::unique_ptr<CausalLM> Stories() {
  ModelLoadOptions o;
  const char* device = std::getenv("STRATA_TEST_DEVICE");
  if (device != nullptr && *device != '\0') o.device = device;
  auto m = CausalLM::Load(kStories, o);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? std::move(m).value() : nullptr;
}

nlohmann::json Reference() {
  std::ifstream in(kStories + "/reference_outputs.json");
  return nlohmann::json::parse(in);
}

bool ValidUtf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    }
    i += n;
  }
  return true;
}

// --- golden ------------------------------------------------------------------------------------------

TEST(GenerateGoldenTest, Stories260KPromptIds) {
  auto tok = Tokenizer::FromDirectory(kStories);
  ASSERT_TRUE(tok.ok()) << tok.status();
  const nlohmann::json ref = Reference();
  const std::vector<int32_t> ids = (*tok)->Encode(ref["prompt"].get<std::string>(), true);
  EXPECT_EQ(ids, ref["prompt_ids_with_bos"].get<std::vector<int32_t>>());
}

TEST(GenerateGoldenTest, Stories260KGreedy64) {
  auto m = Stories();
  ASSERT_NE(m, nullptr);
  auto tok = Tokenizer::FromDirectory(kStories);
  ASSERT_TRUE(tok.ok()) << tok.status();
  const nlohmann::json ref = Reference();
  const std::vector<int32_t> prompt = ref["prompt_ids_with_bos"].get<std::vector<int32_t>>();
  const std::vector<int32_t> all = ref["greedy_64_ids"].get<std::vector<int32_t>>();
  SamplingOptions o;
  o.max_new_tokens = 64;
  o.stop_ids = {1};  // the model starts a new story with BOS instead of emitting EOS
  std::string streamed;
  int calls = 0;
  auto r = Generate(*m, **tok, {prompt}, o, [&](size_t index, int32_t id, const std::string& delta) {
    EXPECT_EQ(index, 0u);
    EXPECT_TRUE(ValidUtf8(delta));
    streamed += delta;
    ++calls;
    return true;
  });
  ASSERT_TRUE(r.ok()) << r.status();
  const GenerationResult& g = (*r)[0];
  EXPECT_EQ(g.ids, std::vector<int32_t>(all.begin() + static_cast<std::ptrdiff_t>(prompt.size()), all.end()));
  EXPECT_EQ(g.finish_reason, "length");
  EXPECT_EQ(g.prompt_tokens, 5);
  EXPECT_EQ(calls, 64);
  // The text continues the prompt: prompt text + generated text == the reference text.
  EXPECT_EQ(ref["prompt"].get<std::string>() + g.text, ref["greedy_64_text"].get<std::string>());
  EXPECT_EQ(streamed, g.text);
  EXPECT_GT(g.seconds, 0);
}

TEST(GenerateGoldenTest, Stories260KStopsAtBos) {
  auto m = Stories();
  ASSERT_NE(m, nullptr);
  auto tok = Tokenizer::FromDirectory(kStories);
  ASSERT_TRUE(tok.ok());
  SamplingOptions o;
  o.max_new_tokens = 400;
  o.stop_ids = {1};
  auto r = Generate(*m, **tok, {(*tok)->Encode("Once upon a time", true)}, o);
  ASSERT_TRUE(r.ok()) << r.status();
  const GenerationResult& g = (*r)[0];
  EXPECT_EQ(g.finish_reason, "stop") << g.text;
  EXPECT_LT(g.ids.size(), 400u);
  for (int32_t id : g.ids) EXPECT_NE(id, 1);
}

TEST(GenerateGoldenTest, StopStringTruncatesAndNeverStreams) {
  auto m = Stories();
  ASSERT_NE(m, nullptr);
  auto tok = Tokenizer::FromDirectory(kStories);
  ASSERT_TRUE(tok.ok());
  const nlohmann::json ref = Reference();
  SamplingOptions o;
  o.max_new_tokens = 64;
  o.stop_strings = {"Lily"};
  std::string streamed;
  auto r = Generate(*m, **tok, {ref["prompt_ids_with_bos"].get<std::vector<int32_t>>()}, o,
                    [&](size_t, int32_t, const std::string& delta) {
                      streamed += delta;
                      EXPECT_FALSE(absl::StrContains(streamed, "Li")) << streamed;
                      return true;
                    });
  ASSERT_TRUE(r.ok()) << r.status();
  const GenerationResult& g = (*r)[0];
  EXPECT_EQ(g.finish_reason, "stop");
  EXPECT_EQ(g.text, ", there was a little girl named ");
  EXPECT_EQ(streamed, g.text);
  // ids run up to and including the token that completed the stop string.
  EXPECT_LT(g.ids.size(), 64u);
  EXPECT_TRUE(absl::StrContains((*tok)->Decode(g.ids, true), "Lily"));
}

TEST(GenerateGoldenTest, StopStringPrefixHeldBackThenReleasedOrFlushed) {
  auto m = Stories();
  ASSERT_NE(m, nullptr);
  auto tok = Tokenizer::FromDirectory(kStories);
  ASSERT_TRUE(tok.ok());
  const nlohmann::json ref = Reference();
  const std::vector<int32_t> prompt = ref["prompt_ids_with_bos"].get<std::vector<int32_t>>();
  const std::string full =
      ref["greedy_64_text"].get<std::string>().substr(ref["prompt"].get<std::string>().size());
  SamplingOptions o;
  o.max_new_tokens = 64;
  // "girl named " is a prefix of the stop string: it is held back until "Lily" shows that the
  // stop string does not occur, then released together with "Lily".
  o.stop_strings = {"girl named Lucy"};
  std::vector<std::pair<int32_t, std::string>> deltas;
  auto collect = [&](size_t, int32_t id, const std::string& d) {
    deltas.emplace_back(id, d);
    return true;
  };
  auto r = Generate(*m, **tok, {prompt}, o, collect);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)[0].text, full);
  EXPECT_EQ((*r)[0].finish_reason, "length");
  std::string streamed;
  bool released_together = false;
  for (const auto& [id, d] : deltas) {
    streamed += d;
    released_together = released_together || absl::StrContains(d, "girl named Lily");
  }
  EXPECT_EQ(streamed, full);
  EXPECT_TRUE(released_together);
  // Stopping on the "Lily" token while "girl named" is held back: flushed by a final id -1 call.
  const std::vector<int32_t>& ids = (*r)[0].ids;
  size_t lily = 0;
  while (lily < ids.size() && (*tok)->Decode({ids[lily]}, true).find("Lily") == std::string::npos) {
    ++lily;
  }
  ASSERT_LT(lily, ids.size());
  o.stop_ids = {ids[lily]};
  deltas.clear();
  r = Generate(*m, **tok, {prompt}, o, collect);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)[0].finish_reason, "stop");
  EXPECT_EQ((*r)[0].text, ", there was a little girl named");
  ASSERT_FALSE(deltas.empty());
  EXPECT_EQ(deltas.back().first, -1);
  streamed.clear();
  for (const auto& [id, d] : deltas) streamed += d;
  EXPECT_EQ(streamed, (*r)[0].text);
}

TEST(GenerateGoldenTest, BatchEqualsSingleRuns) {
  auto m = Stories();
  ASSERT_NE(m, nullptr);
  auto tok = Tokenizer::FromDirectory(kStories);
  ASSERT_TRUE(tok.ok());
  const std::vector<std::vector<int32_t>> prompts = {
      (*tok)->Encode("Once upon a time", true),
      (*tok)->Encode("Tom and his dog went to the park. They", true),
      (*tok)->Encode("The", true),
  };
  SamplingOptions o;
  o.max_new_tokens = 40;
  o.stop_ids = {1};
  auto batch = Generate(*m, **tok, prompts, o);
  ASSERT_TRUE(batch.ok()) << batch.status();
  ASSERT_EQ(batch->size(), 3u);
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto single = Generate(*m, **tok, {prompts[i]}, o);
    ASSERT_TRUE(single.ok());
    EXPECT_EQ((*batch)[i].ids, (*single)[0].ids) << i;
    EXPECT_EQ((*batch)[i].text, (*single)[0].text) << i;
    EXPECT_EQ((*batch)[i].finish_reason, (*single)[0].finish_reason) << i;
    EXPECT_EQ((*batch)[i].prompt_tokens, static_cast<int64_t>(prompts[i].size()));
  }
  // Sampled generation in a batch equals the single runs too (per-sequence RNG streams).
  o.temperature = 0.8f;
  o.top_p = 0.9f;
  o.seed = 5;
  batch = Generate(*m, **tok, prompts, o);
  ASSERT_TRUE(batch.ok());
  auto single = Generate(*m, **tok, {prompts[0]}, o);
  ASSERT_TRUE(single.ok());
  EXPECT_EQ((*batch)[0].ids, (*single)[0].ids);
}

// --- unit tests on a random model with a byte tokenizer ------------------------------------------

TEST(GenerateTest, SeedDeterminism) {
  auto m = DefaultModel();
  FakeByteTokenizer tok;
  SamplingOptions o;
  o.max_new_tokens = 24;
  o.temperature = 1.0f;
  o.stop_on_eos = false;
  o.seed = 123;
  const std::vector<std::vector<int32_t>> prompts = {tok.Encode("hello", true)};
  auto a = Generate(*m, tok, prompts, o);
  auto b = Generate(*m, tok, prompts, o);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ((*a)[0].ids, (*b)[0].ids);
  EXPECT_EQ((*a)[0].ids.size(), 24u);
  o.seed = 124;
  auto c = Generate(*m, tok, prompts, o);
  ASSERT_TRUE(c.ok());
  EXPECT_NE((*a)[0].ids, (*c)[0].ids);
}

TEST(GenerateTest, TopKOneEqualsGreedy) {
  auto m = DefaultModel();
  FakeByteTokenizer tok;
  SamplingOptions greedy;
  greedy.max_new_tokens = 20;
  greedy.stop_on_eos = false;
  const std::vector<std::vector<int32_t>> prompts = {tok.Encode("abc", true), tok.Encode("xy", true)};
  auto g = Generate(*m, tok, prompts, greedy);
  SamplingOptions k1 = greedy;
  k1.temperature = 1.5f;
  k1.top_k = 1;
  k1.seed = 9;
  auto s = Generate(*m, tok, prompts, k1);
  ASSERT_TRUE(g.ok() && s.ok());
  EXPECT_EQ((*g)[0].ids, (*s)[0].ids);
  EXPECT_EQ((*g)[1].ids, (*s)[1].ids);
  // A tiny top_p keeps only the most likely token: greedy as well.
  SamplingOptions p = greedy;
  p.temperature = 1.0f;
  p.top_p = 1e-6f;
  auto t = Generate(*m, tok, prompts, p);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ((*g)[0].ids, (*t)[0].ids);
}

TEST(GenerateTest, TopKRestrictsSamples) {
  auto m = DefaultModel();
  FakeByteTokenizer tok;
  const std::vector<int32_t> prompt = tok.Encode("q", true);
  // The 3 most likely next tokens after the prompt.
  const at::Tensor logits =
      m->Forward(torch::tensor(std::vector<int64_t>(prompt.begin(), prompt.end())).view({1, -1}),
                 at::Tensor(), nullptr, 1)[0][0];
  const at::Tensor top3 = std::get<1>(logits.topk(3));
  for (uint64_t seed = 0; seed < 30; ++seed) {
    SamplingOptions o;
    o.max_new_tokens = 1;
    o.temperature = 5.0f;
    o.top_k = 3;
    o.seed = seed;
    o.stop_on_eos = false;
    auto r = Generate(*m, tok, {prompt}, o);
    ASSERT_TRUE(r.ok());
    ASSERT_EQ((*r)[0].ids.size(), 1u);
    EXPECT_TRUE((top3 == (*r)[0].ids[0]).any().item<bool>()) << (*r)[0].ids[0];
  }
}

TEST(GenerateTest, StreamingNeverSplitsUtf8) {
  auto m = DefaultModel(4);
  FakeByteTokenizer tok;
  SamplingOptions o;
  o.max_new_tokens = 200;
  o.temperature = 2.0f;  // random bytes, many of them invalid or partial UTF-8
  o.seed = 77;
  o.stop_on_eos = false;
  std::vector<std::string> streamed(2);
  auto r = Generate(*m, tok, {tok.Encode("\xC3\xA9t\xC3", true), tok.Encode("z", true)}, o,
                    [&](size_t i, int32_t, const std::string& delta) {
                      // Every delta is valid UTF-8 on its own (never half a character;
                      // invalid bytes come out as U+FFFD).
                      EXPECT_TRUE(ValidUtf8(delta));
                      streamed[i] += delta;
                      return true;
                    });
  ASSERT_TRUE(r.ok()) << r.status();
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_TRUE(ValidUtf8((*r)[i].text));
    EXPECT_EQ(streamed[i], (*r)[i].text);
    EXPECT_EQ((*r)[i].ids.size(), 200u);
  }
}

// A model scripted to continue byte token t with next[t]: attention and MLP outputs are zeroed so
// the final hidden state is the (normalised) embedding of the last token, and lm_head row next[t]
// is that embedding, so greedy decoding walks the chain.
std::unique_ptr<CausalLM> ScriptedModel(const std::vector<std::pair<int32_t, int32_t>>& next) {
  ModelConfig c = CausalLM::EmbeddedDefaultConfig();
  c.tie_word_embeddings = false;
  auto m = CausalLM::RandomInit(c, 8);
  EXPECT_TRUE(m.ok());
  for (const std::string& name : (*m)->LinearNames()) {
    if (absl::EndsWith(name, "o_proj") || absl::EndsWith(name, "down_proj")) {
      LinearLayer* l = (*m)->FindLinear(name);
      l->weight = torch::zeros_like(l->weight);
    }
  }
  const at::Tensor embed = *(*m)->FindParameter("model.embed_tokens.weight");
  at::Tensor head = torch::zeros_like(embed);
  for (const auto& [from, to] : next) head[to] = embed[from] * 10;
  *(*m)->FindParameter("lm_head.weight") = head;
  (*m)->FindLinear("lm_head")->weight = head;
  return std::move(m).value();
}

TEST(GenerateTest, StreamingHoldsSplitCharacters) {
  auto b = [](int byte) { return 3 + byte; };
  // A -> C3 A9 (é) -> E4 BD A0 (你) -> A ...
  auto m = ScriptedModel({{b('A'), b(0xC3)},
                          {b(0xC3), b(0xA9)},
                          {b(0xA9), b(0xE4)},
                          {b(0xE4), b(0xBD)},
                          {b(0xBD), b(0xA0)},
                          {b(0xA0), b('A')}});
  FakeByteTokenizer tok;
  SamplingOptions o;
  o.max_new_tokens = 7;
  o.stop_on_eos = false;
  std::vector<std::string> deltas;
  auto r = Generate(*m, tok, {{1, b('A')}}, o, [&](size_t, int32_t, const std::string& d) {
    deltas.push_back(d);
    return true;
  });
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)[0].ids,
            (std::vector<int32_t>{b(0xC3), b(0xA9), b(0xE4), b(0xBD), b(0xA0), b('A'), b(0xC3)}));
  // The last token starts a character that never completes: it ends as U+FFFD.
  EXPECT_EQ(deltas, (std::vector<std::string>{"", "\xC3\xA9", "", "", "\xE4\xBD\xA0", "A", "\xEF\xBF\xBD"}));
  EXPECT_EQ((*r)[0].text,
            "\xC3\xA9\xE4\xBD\xA0"
            "A\xEF\xBF\xBD");
  // Stopping on the byte after a partial character flushes it as U+FFFD (id -1).
  o.stop_ids = {b(0xBD)};
  std::vector<std::pair<int32_t, std::string>> calls;
  r = Generate(*m, tok, {{1, b('A')}}, o, [&](size_t, int32_t id, const std::string& d) {
    calls.emplace_back(id, d);
    return true;
  });
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)[0].finish_reason, "stop");
  EXPECT_EQ((*r)[0].text, "\xC3\xA9\xEF\xBF\xBD");
  ASSERT_EQ(calls.size(), 4u);
  EXPECT_EQ(calls[3], (std::pair<int32_t, std::string>{-1, "\xEF\xBF\xBD"}));
}

TEST(GenerateTest, StopIdsAndEos) {
  auto m = DefaultModel();
  FakeByteTokenizer tok;
  SamplingOptions o;
  o.max_new_tokens = 10;
  o.stop_on_eos = false;
  const std::vector<std::vector<int32_t>> prompts = {tok.Encode("hi", true)};
  auto g = Generate(*m, tok, prompts, o);
  ASSERT_TRUE(g.ok());
  const std::vector<int32_t> ids = (*g)[0].ids;
  ASSERT_EQ(ids.size(), 10u);
  // Stop at the 4th generated token (if it did not occur earlier).
  size_t first = 0;
  while (ids[first] != ids[3]) ++first;
  o.stop_ids = {ids[3]};
  auto s = Generate(*m, tok, prompts, o);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ((*s)[0].finish_reason, "stop");
  EXPECT_EQ((*s)[0].ids, std::vector<int32_t>(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(first)));
  EXPECT_EQ((*s)[0].text, tok.Decode((*s)[0].ids, true));
  // As EOS (the model config's eos ids): finish_reason "eos".
  ModelConfig c = CausalLM::EmbeddedDefaultConfig();
  c.eos_token_ids = {ids[3]};
  auto m2 = CausalLM::RandomInit(c, 3);
  ASSERT_TRUE(m2.ok());
  SamplingOptions e;
  e.max_new_tokens = 10;
  auto r = Generate(**m2, tok, prompts, e);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)[0].finish_reason, "eos");
  EXPECT_EQ((*r)[0].ids.size(), first);
}

TEST(GenerateTest, StopStringCutsText) {
  auto m = DefaultModel();
  FakeByteTokenizer tok;
  SamplingOptions o;
  o.max_new_tokens = 12;
  o.stop_on_eos = false;
  const std::vector<std::vector<int32_t>> prompts = {tok.Encode("hi", true)};
  auto g = Generate(*m, tok, prompts, o);
  ASSERT_TRUE(g.ok());
  const std::string text = (*g)[0].text;
  ASSERT_GE(text.size(), 6u);
  // A stop string that never completes changes nothing.
  SamplingOptions never = o;
  never.stop_strings = {text.substr(text.size() - 2) + "\x01\x02\x03"};
  std::string streamed;
  auto h = Generate(*m, tok, prompts, never, [&](size_t, int32_t, const std::string& d) {
    streamed += d;
    return true;
  });
  ASSERT_TRUE(h.ok());
  EXPECT_EQ((*h)[0].text, text);
  EXPECT_EQ(streamed, text);
  EXPECT_EQ((*h)[0].finish_reason, "length");
  // A stop string found in the middle: the text is cut before its first occurrence.
  SamplingOptions cut = o;
  cut.stop_strings = {text.substr(3, 2)};
  const size_t pos = text.find(text.substr(3, 2));
  auto c = Generate(*m, tok, prompts, cut);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ((*c)[0].finish_reason, "stop");
  EXPECT_EQ((*c)[0].text, text.substr(0, pos));
}

TEST(GenerateTest, CancelAndZeroTokens) {
  auto m = DefaultModel();
  FakeByteTokenizer tok;
  SamplingOptions o;
  o.max_new_tokens = 30;
  o.stop_on_eos = false;
  int calls = 0;
  auto r = Generate(*m, tok, {tok.Encode("a", true), tok.Encode("bcd", true)}, o,
                    [&](size_t i, int32_t, const std::string&) {
                      ++calls;
                      return !(i == 0 && calls >= 3);
                    });
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)[0].finish_reason, "cancelled");
  EXPECT_LE((*r)[0].ids.size(), 3u);
  EXPECT_EQ((*r)[1].finish_reason, "length");
  EXPECT_EQ((*r)[1].ids.size(), 30u);
  o.max_new_tokens = 0;
  r = Generate(*m, tok, {tok.Encode("a", true)}, o);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE((*r)[0].ids.empty());
  EXPECT_EQ((*r)[0].finish_reason, "length");
}

TEST(GenerateTest, StopsAtMaxPositions) {
  auto m = DefaultModel();
  FakeByteTokenizer tok;
  SamplingOptions o;
  o.max_new_tokens = 100;
  o.stop_on_eos = false;
  std::vector<int32_t> prompt(500, 3 + 'a');
  prompt[0] = 1;
  auto r = Generate(*m, tok, {prompt}, o);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)[0].ids.size(), 12u);  // 512 positions in all
  EXPECT_EQ((*r)[0].finish_reason, "length");
}

TEST(GenerateTest, InvalidArguments) {
  auto m = DefaultModel();
  FakeByteTokenizer tok;
  SamplingOptions o;
  EXPECT_EQ(Generate(*m, tok, {{}}, o).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Generate(*m, tok, {{1, 400}}, o).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Generate(*m, tok, {std::vector<int32_t>(513, 5)}, o).status().code(),
            absl::StatusCode::kInvalidArgument);
  SamplingOptions bad = o;
  bad.temperature = -1;
  EXPECT_EQ(Generate(*m, tok, {{1}}, bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = o;
  bad.top_p = 0;
  EXPECT_EQ(Generate(*m, tok, {{1}}, bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = o;
  bad.top_k = -2;
  EXPECT_EQ(Generate(*m, tok, {{1}}, bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = o;
  bad.max_new_tokens = -1;
  EXPECT_EQ(Generate(*m, tok, {{1}}, bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = o;
  bad.stop_strings = {""};
  EXPECT_EQ(Generate(*m, tok, {{1}}, bad).status().code(), absl::StatusCode::kInvalidArgument);
  auto empty = Generate(*m, tok, {}, o);
  ASSERT_TRUE(empty.ok());
  EXPECT_TRUE(empty->empty());
}

TEST(GenerateTest, Bfloat16Generation) {
  ModelLoadOptions lo;
  lo.dtype = "bfloat16";
  auto m = CausalLM::RandomInit(CausalLM::EmbeddedDefaultConfig(), 3, lo);
  ASSERT_TRUE(m.ok());
  FakeByteTokenizer tok;
  SamplingOptions o;
  o.max_new_tokens = 16;
  o.stop_on_eos = false;
  auto r = Generate(**m, tok, {tok.Encode("abc", true), tok.Encode("z", true)}, o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)[0].ids.size(), 16u);
  EXPECT_EQ((*r)[1].ids.size(), 16u);
}

// Continuations scored on the prompt's shared KV cache (right-padded, batched, several batches)
// equal each prompt + continuation run whole.
TEST(GenerateTest, ContinuationLogLikelihoodsEqualWholeSequences) {
  auto m = DefaultModel();
  FakeByteTokenizer tok;
  const std::vector<int32_t> prompt = tok.Encode("The capital of France is", true);
  const std::vector<std::vector<int32_t>> conts = {tok.Encode(" Paris", false), tok.Encode(" a", false),
                                                   tok.Encode(" Lyon, of course", false),
                                                   tok.Encode("!", false)};
  auto ll = ContinuationLogLikelihoods(*m, prompt, conts, /*batch_size=*/3);
  ASSERT_TRUE(ll.ok()) << ll.status();
  ASSERT_EQ(ll->size(), conts.size());
  c10::InferenceMode guard;
  for (size_t i = 0; i < conts.size(); ++i) {
    std::vector<int64_t> whole(prompt.begin(), prompt.end());
    whole.insert(whole.end(), conts[i].begin(), conts[i].end());
    const int64_t n = static_cast<int64_t>(whole.size());
    const at::Tensor logits = m->Forward(at::tensor(whole, at::kLong).view({1, n}), at::Tensor());
    const at::Tensor lp = at::log_softmax(logits[0].to(at::kDouble), -1);
    double expected = 0;
    for (int64_t j = static_cast<int64_t>(prompt.size()); j < n; ++j)
      expected += lp[j - 1][whole[j]].item<double>();
    EXPECT_NEAR((*ll)[i], expected, 1e-4) << i;
  }
  EXPECT_EQ(ContinuationLogLikelihoods(*m, prompt, {{}}).status().code(), absl::StatusCode::kInvalidArgument);
  auto too_long = ContinuationLogLikelihoods(*m, prompt, {std::vector<int32_t>(600, 5)});
  EXPECT_EQ(too_long.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(too_long.status().message(), "completions[0]")) << too_long.status();
}

}  // namespace
}  // namespace strata
