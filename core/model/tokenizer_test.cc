#include "core/model/tokenizer.h"

#include <gtest/gtest.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "nlohmann/json.hpp"

namespace strata {
namespace {

const std::string kShared = STRATA_SHARED_DIR;

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteAll(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  ASSERT_TRUE(out.good()) << "cannot write " << path;
}

std::string Ids(const std::vector<int32_t>& ids) { return "[" + absl::StrJoin(ids, ", ") + "]"; }

// Loads the tokenizer once per directory for the whole test binary.
const Tokenizer& Load(const std::string& dir) {
  static auto* cache = new std::map<std::string, std::unique_ptr<Tokenizer>>();
  auto it = cache->find(dir);
  if (it != cache->end()) return *it->second;
  const auto t0 = std::chrono::steady_clock::now();
  auto tok = Tokenizer::FromDirectory(dir);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!tok.ok()) {
    ADD_FAILURE() << tok.status();
    static auto* fallback = Tokenizer::ByteLevelDefault().release();
    return *fallback;
  }
  std::printf("loaded %s in %.3f s (vocab %d)\n", dir.c_str(), secs, (*tok)->vocab_size());
  return *cache->emplace(dir, std::move(tok).value()).first->second;
}

struct VectorCase {
  std::string text;
  std::vector<int32_t> ids;
};

// Parses llama.cpp's ggml-vocab-*.gguf.{inp,out}: strings separated by "\n__ggml_vocab_test__\n"
// (with a trailing separator) and one line of space-separated ids per string.
std::vector<VectorCase> ReadVectors(const std::string& name) {
  const std::string base = kShared + "/tokenizers/testvectors/ggml-vocab-" + name + ".gguf";
  const std::string inp = ReadAll(base + ".inp");
  const std::string out = ReadAll(base + ".out");
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<std::string> texts = absl::StrSplit(inp, sep);
  // The file ends with a separator, which leaves one empty element at the end.
  if (!texts.empty() && texts.back().empty()) texts.pop_back();
  std::vector<std::string> lines = absl::StrSplit(out, '\n');
  if (!lines.empty() && lines.back().empty()) lines.pop_back();
  std::vector<VectorCase> cases;
  EXPECT_EQ(texts.size(), lines.size()) << base;
  for (size_t i = 0; i < texts.size() && i < lines.size(); ++i) {
    VectorCase c;
    c.text = texts[i];
    for (absl::string_view tok : absl::StrSplit(lines[i], ' ', absl::SkipEmpty())) {
      c.ids.push_back(std::stoi(std::string(tok)));
    }
    cases.push_back(std::move(c));
  }
  return cases;
}

struct VectorPair {
  const char* vectors;
  const char* tokenizer;
};

class TestVectorTest : public ::testing::TestWithParam<VectorPair> {};

TEST_P(TestVectorTest, EncodesEveryStringExactly) {
  const VectorPair p = GetParam();
  const Tokenizer& tok = Load(kShared + "/tokenizers/" + p.tokenizer);
  const std::vector<VectorCase> cases = ReadVectors(p.vectors);
  ASSERT_EQ(cases.size(), 46u);
  int passed = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::vector<int32_t> got = tok.Encode(cases[i].text, /*add_special_tokens=*/false);
    if (got == cases[i].ids) {
      ++passed;
    } else {
      ADD_FAILURE() << p.vectors << " string #" << i << " text=\"" << cases[i].text << "\"\n  expected "
                    << Ids(cases[i].ids) << "\n  got      " << Ids(got);
    }
  }
  std::printf("%s <-> %s: %d/%zu strings match\n", p.vectors, p.tokenizer, passed, cases.size());
  EXPECT_EQ(passed, 46);
}

TEST_P(TestVectorTest, DecodeRoundTrips) {
  const VectorPair p = GetParam();
  const Tokenizer& tok = Load(kShared + "/tokenizers/" + p.tokenizer);
  const std::vector<VectorCase> cases = ReadVectors(p.vectors);
  for (size_t i = 0; i < cases.size(); ++i) {
    // Decoding the reference ids must give back the text (the test strings are NFC already).
    EXPECT_EQ(tok.Decode(cases[i].ids, true), cases[i].text) << p.vectors << " string #" << i;
    EXPECT_EQ(tok.Decode(tok.Encode(cases[i].text, true), true), cases[i].text)
        << p.vectors << " string #" << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Pairs, TestVectorTest,
                         ::testing::Values(VectorPair{"gpt-2", "gpt2"}, VectorPair{"llama-spm", "llama2"},
                                           VectorPair{"llama-bpe", "llama3"}, VectorPair{"qwen2", "qwen3"}),
                         [](const ::testing::TestParamInfo<VectorPair>& info) {
                           return std::string(info.param.tokenizer);
                         });

// ------------------------------------------------------------------------------------------------
// stories260K: the golden fixture.

nlohmann::json StoriesReference() {
  return nlohmann::json::parse(ReadAll(kShared + "/models/stories260K/reference_outputs.json"));
}

TEST(Stories260K, EncodesPromptWithBos) {
  const Tokenizer& tok = Load(kShared + "/models/stories260K");
  const auto ref = StoriesReference();
  const auto expected = ref["prompt_ids_with_bos"].get<std::vector<int32_t>>();
  EXPECT_EQ(expected, (std::vector<int32_t>{1, 403, 407, 261, 378}));
  EXPECT_EQ(tok.Encode(ref["prompt"].get<std::string>(), true), expected);
  EXPECT_EQ(tok.Encode("Once upon a time", false), (std::vector<int32_t>{403, 407, 261, 378}));
  EXPECT_EQ(tok.vocab_size(), 512);
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_ids(), std::vector<int32_t>{2});
  EXPECT_EQ(tok.pad_id(), std::nullopt);
  EXPECT_TRUE(tok.adds_bos());
}

TEST(Stories260K, DecodesGreedyContinuation) {
  const Tokenizer& tok = Load(kShared + "/models/stories260K");
  const auto ref = StoriesReference();
  const auto ids = ref["greedy_64_ids"].get<std::vector<int32_t>>();
  const std::string text = ref["greedy_64_text"].get<std::string>();
  ASSERT_EQ(ids.size(), 69u);  // 5 prompt ids (with BOS) + 64 generated
  // greedy_64_text is exactly the decode of all ids with BOS skipped; it contains a newline
  // that comes from the byte-fallback token <0x0A> (id 13).
  EXPECT_EQ(tok.Decode(ids, /*skip_special_tokens=*/true), text);
  EXPECT_EQ(text.rfind("Once upon a time", 0), 0u);
  EXPECT_NE(text.find("high.\nLily's mom said"), std::string::npos);
  // Without skipping, BOS is rendered as its piece.
  EXPECT_EQ(tok.Decode(ids, false), "<s> " + text);
  // The text re-encodes to the same ids.
  EXPECT_EQ(tok.Encode(text, true), ids);
}

TEST(Stories260K, ByteFallbackRoundTrip) {
  const Tokenizer& tok = Load(kShared + "/models/stories260K");
  const std::string text = "Zoë said 你好 🦙\ttab";
  const std::vector<int32_t> ids = tok.Encode(text, false);
  bool has_byte = false;
  for (int32_t id : ids) has_byte = has_byte || tok.IdToToken(id).rfind("<0x", 0) == 0;
  EXPECT_TRUE(has_byte) << Ids(ids);
  EXPECT_EQ(tok.Decode(ids, true), text);
  EXPECT_EQ(tok.TokenToId("<0x0A>"), 13);
  EXPECT_EQ(tok.IdToToken(13), "<0x0A>");
}

// ------------------------------------------------------------------------------------------------
// Other tokenizers and special tokens.

TEST(Mistral, LoadsAndEncodes) {
  const Tokenizer& tok = Load(kShared + "/tokenizers/mistral");
  EXPECT_EQ(tok.vocab_size(), 32000);
  EXPECT_TRUE(tok.adds_bos());
  const std::vector<int32_t> ids = tok.Encode("Hello world", true);
  ASSERT_GE(ids.size(), 3u);
  EXPECT_EQ(ids[0], 1);
  EXPECT_EQ(tok.IdToToken(ids[1]), "\xE2\x96\x81Hello");
  EXPECT_EQ(tok.Decode(ids, true), "Hello world");
  EXPECT_EQ(tok.Decode(tok.Encode("  x\n\ty 😀 ü", false), true), "  x\n\ty 😀 ü");
}

TEST(Llama2, SpecialTokensInText) {
  const Tokenizer& tok = Load(kShared + "/tokenizers/llama2");
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_ids(), std::vector<int32_t>{2});
  const std::vector<int32_t> ids = tok.Encode("Hi</s>", false);
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids.back(), 2);
  EXPECT_EQ(tok.Decode(ids, true), "Hi");
  EXPECT_EQ(tok.Decode(ids, false), "Hi</s>");
}

TEST(Qwen3, ChatTokensAndNfc) {
  const Tokenizer& tok = Load(kShared + "/tokenizers/qwen3");
  EXPECT_EQ(tok.vocab_size(), 151669);
  EXPECT_FALSE(tok.adds_bos());
  EXPECT_EQ(tok.bos_id(), std::nullopt);
  EXPECT_EQ(tok.eos_ids(), std::vector<int32_t>{151645});
  EXPECT_EQ(tok.pad_id(), 151643);
  const std::vector<int32_t> ids = tok.Encode("<|im_start|>user\nhi<|im_end|>", true);
  ASSERT_GE(ids.size(), 4u);
  EXPECT_EQ(ids.front(), 151644);
  EXPECT_EQ(ids.back(), 151645);
  EXPECT_EQ(tok.Decode(ids, true), "user\nhi");
  EXPECT_EQ(tok.Decode(ids, false), "<|im_start|>user\nhi<|im_end|>");
  // <think> is an added, non-special token: matched in text, kept when skipping specials.
  const std::vector<int32_t> think = tok.Encode("<think>x</think>", false);
  EXPECT_EQ(think.front(), 151667);
  EXPECT_EQ(think.back(), 151668);
  EXPECT_EQ(tok.Decode(think, true), "<think>x</think>");
  // NFC: "e" + combining acute encodes like the precomposed "é".
  EXPECT_EQ(tok.Encode("caf\x65\xCC\x81", false), tok.Encode("caf\xC3\xA9", false));
}

TEST(Llama3, SpecialTokensAndIds) {
  const Tokenizer& tok = Load(kShared + "/tokenizers/llama3");
  EXPECT_EQ(tok.vocab_size(), 128256);
  EXPECT_EQ(tok.bos_id(), 128000);
  // This tokenizer.json's post_processor is ByteLevel only and its tokenizer_config.json has no
  // add_bos_token, so (as in HF) Encode(..., true) adds nothing; callers prepend bos_id() if needed.
  EXPECT_FALSE(tok.adds_bos());
  EXPECT_EQ(tok.Encode("Hello world", true), (std::vector<int32_t>{9906, 1917}));
  EXPECT_EQ(tok.eos_ids(), std::vector<int32_t>{128001});
  EXPECT_EQ(tok.TokenToId("<|eot_id|>"), 128009);
  EXPECT_EQ(tok.IdToToken(128009), "<|eot_id|>");
  const std::vector<int32_t> ids =
      tok.Encode("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>", false);
  EXPECT_EQ(ids.front(), 128006);
  EXPECT_EQ(ids.back(), 128009);
  EXPECT_EQ(tok.Decode(ids, true), "user\n\nHi");
}

TEST(Gpt2, EndOfTextAndBytes) {
  const Tokenizer& tok = Load(kShared + "/tokenizers/gpt2");
  EXPECT_EQ(tok.vocab_size(), 50257);
  EXPECT_FALSE(tok.adds_bos());
  EXPECT_EQ(tok.Encode("a<|endoftext|>b", true), (std::vector<int32_t>{64, 50256, 65}));
  EXPECT_EQ(tok.Decode({64, 50256, 65}, true), "ab");
  // A character cut in half at the end is kept as raw bytes for streaming callers; a broken
  // sequence in the middle becomes U+FFFD.
  const std::vector<int32_t> llama = tok.Encode("🦙", false);  // 4 bytes over 3 tokens
  ASSERT_EQ(llama.size(), 3u);
  EXPECT_EQ(tok.Decode({llama[0], llama[1]}, true), std::string("\xF0\x9F\xA6"));
  std::vector<int32_t> broken = {llama[0], 64};
  EXPECT_EQ(tok.Decode(broken, true),
            "\xEF\xBF\xBD\xEF\xBF\xBD"
            "a");
  // Invalid UTF-8 input does not crash and decodes to U+FFFD.
  EXPECT_EQ(tok.Decode(tok.Encode(std::string("x\xFFy"), false), true), "x\xEF\xBF\xBDy");
}

TEST(Tokenizer, ConcurrentEncodeIsConsistent) {
  const Tokenizer& tok = Load(kShared + "/tokenizers/llama3");
  const std::string text = ReadAll(kShared + "/tokenizers/testvectors/ggml-vocab-llama-bpe.gguf.inp");
  const std::vector<int32_t> expected = tok.Encode(text, false);
  std::vector<std::thread> threads;
  std::vector<int> ok(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int k = 0; k < 20; ++k) ok[t] += tok.Encode(text, false) == expected;
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(ok[t], 20);
}

TEST(Tokenizer, EncodeThroughputIsReasonable) {
  const Tokenizer& tok = Load(kShared + "/models/stories260K");
  const std::string text = ReadAll(kShared + "/data/lm/tinystories_val.txt").substr(0, 200000);
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<int32_t> ids = tok.Encode(text, false);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("stories260K: %zu bytes -> %zu ids in %.3f s\n", text.size(), ids.size(), secs);
  EXPECT_EQ(tok.Decode(ids, true), text);
  EXPECT_LT(secs, 5.0);
}

TEST(Tokenizer, LongInputsAndThroughputOnLargeVocabularies) {
  const std::string story = ReadAll(kShared + "/data/lm/tinystories_val.txt").substr(0, 200000);
  for (const char* name : {"llama3", "qwen3"}) {
    const Tokenizer& tok = Load(kShared + "/tokenizers/" + name);
    const auto t0 = std::chrono::steady_clock::now();
    const std::vector<int32_t> ids = tok.Encode(story, false);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("%s: %zu bytes -> %zu ids in %.3f s\n", name, story.size(), ids.size(), secs);
    EXPECT_EQ(tok.Decode(ids, true), story) << name;
    EXPECT_LT(secs, 5.0) << name;
    // Pathological runs (one regex match / one BPE word of 100k characters) must not break.
    for (const std::string& s :
         {std::string(100000, ' ') + "x", std::string(100000, 'a'), std::string(30000, '!') + "\n\n"}) {
      EXPECT_EQ(tok.Decode(tok.Encode(s, false), true), s) << name;
    }
  }
  const Tokenizer& spm = Load(kShared + "/tokenizers/llama2");
  const std::string spaces(50000, ' ');
  EXPECT_EQ(spm.Decode(spm.Encode(spaces, false), true), spaces);
}

// Synthetic tokenizer.json files for features the shipped tokenizers do not exercise.
std::string WriteTemp(const std::string& name, const std::string& text) {
  const std::string path = ::testing::TempDir() + "/strata_tok_" + name;
  WriteAll(path, text);
  return path;
}

TEST(Tokenizer, AddedTokenStripFlags) {
  const std::string path = WriteTemp("strip.json", R"({
    "added_tokens": [
      {"id": 3, "content": "<l>", "lstrip": true, "rstrip": false, "normalized": false, "special": true},
      {"id": 4, "content": "<r>", "lstrip": false, "rstrip": true, "normalized": false, "special": true},
      {"id": 5, "content": "<w>", "single_word": true, "normalized": false, "special": false},
      {"id": 6, "content": "<ll>", "normalized": false, "special": true}],
    "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, " ": 2, "<": 7, "w": 8, ">": 9, "l": 10},
              "merges": []}})");
  auto tok = Tokenizer::FromFiles(path, "");
  ASSERT_TRUE(tok.ok()) << tok.status();
  const Tokenizer& t = **tok;
  EXPECT_EQ(t.Encode("a <l> b", false), (std::vector<int32_t>{0, 3, 2, 1}));
  EXPECT_EQ(t.Encode("a <r> b", false), (std::vector<int32_t>{0, 2, 4, 1}));
  EXPECT_EQ(t.Encode("a <w> b", false), (std::vector<int32_t>{0, 2, 5, 2, 1}));
  EXPECT_EQ(t.Encode("a<w>b", false), (std::vector<int32_t>{0, 7, 8, 9, 1}));  // not a single word
  EXPECT_EQ(t.Encode("<ll><l>", false), (std::vector<int32_t>{6, 3}));         // longest match first
  // No decoder: tokens are joined with spaces (as HF tokenizers does).
  EXPECT_EQ(t.Decode({0, 3, 5, 1}, true), "a <w> b");
  EXPECT_EQ(t.Decode({0, 3, 5, 1}, false), "a <l> <w> b");
}

TEST(Tokenizer, MetaspacePreTokenizer) {
  const std::string path = WriteTemp("metaspace.json", R"({
    "added_tokens": [{"id": 4, "content": "<x>", "normalized": false, "special": true}],
    "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false},
    "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false},
    "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<x>", "type_id": 0}},
      {"Sequence": {"id": "A", "type_id": 0}}], "special_tokens": {"<x>": {"id": "<x>", "ids": [4], "tokens": ["<x>"]}}},
    "model": {"type": "BPE", "vocab": {"▁": 0, "a": 1, "b": 2, "▁a": 3, "<x>": 4},
              "merges": ["▁ a"]}})");
  auto tok = Tokenizer::FromFiles(path, "");
  ASSERT_TRUE(tok.ok()) << tok.status();
  const Tokenizer& t = **tok;
  EXPECT_EQ(t.Encode("a b", false), (std::vector<int32_t>{3, 0, 2}));
  EXPECT_EQ(t.Encode("a b", true), (std::vector<int32_t>{4, 3, 0, 2}));
  EXPECT_EQ(t.Encode("<x>a", false), (std::vector<int32_t>{4, 1}));  // "first": no prefix after <x>
  EXPECT_EQ(t.Decode({3, 0, 2}, true), "a b");
  EXPECT_EQ(t.bos_id(), 4);  // no tokenizer_config.json: taken from the template
  EXPECT_TRUE(t.adds_bos());
}

// ------------------------------------------------------------------------------------------------
// ByteLevelDefault.

TEST(ByteLevelDefault, MapsBytesAndSpecials) {
  auto tok = Tokenizer::ByteLevelDefault();
  EXPECT_EQ(tok->vocab_size(), 259);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_ids(), std::vector<int32_t>{2});
  EXPECT_EQ(tok->pad_id(), std::nullopt);
  EXPECT_TRUE(tok->adds_bos());
  EXPECT_EQ(tok->Encode("Hi", true), (std::vector<int32_t>{1, 3 + 'H', 3 + 'i'}));
  EXPECT_EQ(tok->Encode("Hi", false), (std::vector<int32_t>{3 + 'H', 3 + 'i'}));
  EXPECT_EQ(tok->Encode("\xC3\xA9", false), (std::vector<int32_t>{3 + 0xC3, 3 + 0xA9}));
  EXPECT_EQ(tok->Encode("", true), std::vector<int32_t>{1});
  EXPECT_EQ(tok->Decode({1, 3 + 'H', 3 + 'i', 2}, true), "Hi");
  EXPECT_EQ(tok->Decode({1, 3 + 'H', 2}, false), "<s>H</s>");
  EXPECT_EQ(tok->TokenToId("</s>"), 2);
  EXPECT_EQ(tok->TokenToId("<0x41>"), 3 + 0x41);
  EXPECT_EQ(tok->IdToToken(0), "<unk>");
  EXPECT_EQ(tok->IdToToken(3 + 0x41), "<0x41>");
  EXPECT_EQ(tok->IdToToken(259), "");
  const std::string all_text = "héllo wörld 🦙\n";
  EXPECT_EQ(tok->Decode(tok->Encode(all_text, true), true), all_text);
}

// ------------------------------------------------------------------------------------------------
// Errors.

class TokenizerErrorTest : public ::testing::Test {
 protected:
  std::string Write(const std::string& name, const std::string& text) {
    const std::string path = ::testing::TempDir() + "/strata_tok_" + name;
    WriteAll(path, text);
    return path;
  }
  static std::string Minimal(const std::string& model) {
    return R"({"version":"1.0","added_tokens":[],"normalizer":null,"pre_tokenizer":null,
               "post_processor":null,"decoder":null,"model":)" +
           model + "}";
  }
};

TEST_F(TokenizerErrorTest, MissingFile) {
  auto tok = Tokenizer::FromFiles("/nonexistent/dir/tokenizer.json", "");
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(tok.status().message().find("/nonexistent/dir/tokenizer.json"), std::string::npos)
      << tok.status();
  auto dir = Tokenizer::FromDirectory("/nonexistent/dir");
  ASSERT_FALSE(dir.ok());
  EXPECT_EQ(dir.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(dir.status().message().find("/nonexistent/dir"), std::string::npos) << dir.status();
}

TEST_F(TokenizerErrorTest, BadJson) {
  const std::string path = Write("bad.json", "{\"model\": {\"type\": \"BPE\", ");
  auto tok = Tokenizer::FromFiles(path, "");
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(tok.status().message().find(path), std::string::npos) << tok.status();
  EXPECT_NE(tok.status().message().find("invalid JSON"), std::string::npos) << tok.status();
}

TEST_F(TokenizerErrorTest, UnsupportedModelTypes) {
  for (const std::string type : {"WordPiece", "Unigram", "WordLevel"}) {
    const std::string path = Write(type + ".json", Minimal(R"({"type":")" + type + R"(","vocab":{"a":0}})"));
    auto tok = Tokenizer::FromFiles(path, "");
    ASSERT_FALSE(tok.ok()) << type;
    EXPECT_EQ(tok.status().code(), absl::StatusCode::kUnimplemented) << tok.status();
    EXPECT_NE(tok.status().message().find(type), std::string::npos) << tok.status();
    EXPECT_NE(tok.status().message().find("model.type"), std::string::npos) << tok.status();
    EXPECT_NE(tok.status().message().find(path), std::string::npos) << tok.status();
  }
}

TEST_F(TokenizerErrorTest, MissingFields) {
  struct Case {
    std::string name, json, field;
  };
  const std::vector<Case> cases = {
      {"nomodel.json", R"({"version":"1.0"})", "'model'"},
      {"novocab.json", Minimal(R"({"type":"BPE","merges":[]})"), "model.vocab"},
      {"nomerges.json", Minimal(R"({"type":"BPE","vocab":{"a":0}})"), "model.merges"},
      {"badmerge.json", Minimal(R"({"type":"BPE","vocab":{"a":0,"b":1},"merges":["a b"]})"),
       "model.merges[0]"},
      {"badmerge2.json", Minimal(R"({"type":"BPE","vocab":{"a":0},"merges":[["a"]]})"), "model.merges[0]"},
      {"badadded.json", R"({"added_tokens":[{"id":5}],"model":{"type":"BPE","vocab":{"a":0},"merges":[]}})",
       "added_tokens[0].content"},
      {"badpretok.json",
       R"({"pre_tokenizer":{"type":"BertPreTokenizer"},"model":{"type":"BPE","vocab":{"a":0},"merges":[]}})",
       "pre_tokenizer.type"},
  };
  for (const Case& c : cases) {
    const std::string path = Write(c.name, c.json);
    auto tok = Tokenizer::FromFiles(path, "");
    ASSERT_FALSE(tok.ok()) << c.name;
    EXPECT_NE(tok.status().message().find(c.field), std::string::npos) << c.name << ": " << tok.status();
    EXPECT_NE(tok.status().message().find(path), std::string::npos) << c.name << ": " << tok.status();
  }
}

// Found by fuzz_tokenizer_load: one id of 266662777 made the dense id table allocate 8.5 GB.
TEST_F(TokenizerErrorTest, HugeVocabIdIsRefusedNotAllocated) {
  const std::string path =
      Write("hugeid.json", Minimal(R"({"type":"BPE","vocab":{"a":0,"b":266662777},"merges":[]})"));
  auto tok = Tokenizer::FromFiles(path, "");
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(tok.status().message().find("model.vocab"), std::string::npos) << tok.status();
  EXPECT_NE(tok.status().message().find("largest id is 266662777 for 2 tokens"), std::string::npos)
      << tok.status();
  // Holes are fine (ids below twice the token count plus 1024).
  const std::string holes =
      Write("holes.json", Minimal(R"({"type":"BPE","vocab":{"a":0,"b":900},"merges":[]})"));
  EXPECT_TRUE(Tokenizer::FromFiles(holes, "").ok());
}

TEST_F(TokenizerErrorTest, BadConfig) {
  const std::string json_path =
      Write("ok.json", Minimal(R"({"type":"BPE","vocab":{"a":0,"b":1,"ab":2},"merges":["a b"]})"));
  const std::string bad = Write("bad_config.json", "{");
  auto tok = Tokenizer::FromFiles(json_path, bad);
  ASSERT_FALSE(tok.ok());
  EXPECT_NE(tok.status().message().find(bad), std::string::npos) << tok.status();
  const std::string unknown = Write("unknown_config.json", R"({"bos_token": "<nope>"})");
  tok = Tokenizer::FromFiles(json_path, unknown);
  ASSERT_FALSE(tok.ok());
  EXPECT_NE(tok.status().message().find("bos_token"), std::string::npos) << tok.status();
  // The minimal file itself loads and merges.
  tok = Tokenizer::FromFiles(json_path, "");
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->Encode("aab", false), (std::vector<int32_t>{0, 2}));
}

}  // namespace
}  // namespace strata
