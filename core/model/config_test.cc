#include "core/model/config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace strata {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;

const std::string kModels = std::string(STRATA_SHARED_DIR) + "/models";

// A minimal valid Llama config; tests patch fields into it.
json BaseLlama() {
  return json{{"architectures", {"LlamaForCausalLM"}},
              {"hidden_size", 64},
              {"intermediate_size", 172},
              {"num_hidden_layers", 2},
              {"num_attention_heads", 8},
              {"num_key_value_heads", 4},
              {"vocab_size", 512}};
}

absl::StatusOr<ModelConfig> Parse(const json& j) { return ParseModelConfig(j.dump(), "test.json"); }

// Expects INVALID_ARGUMENT whose message contains every one of `parts`.
void ExpectInvalid(const absl::StatusOr<ModelConfig>& r, const std::vector<std::string>& parts) {
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  for (const std::string& p : parts) EXPECT_THAT(std::string(r.status().message()), HasSubstr(p));
}

// --- real files ------------------------------------------------------------------------------

TEST(ConfigTest, LoadsStories260K) {
  auto c = LoadModelConfig(kModels + "/stories260K/config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, "LlamaForCausalLM");
  EXPECT_EQ(c->hidden_size, 64);
  EXPECT_EQ(c->intermediate_size, 172);
  EXPECT_EQ(c->num_hidden_layers, 5);
  EXPECT_EQ(c->num_attention_heads, 8);
  EXPECT_EQ(c->num_key_value_heads, 4);
  EXPECT_EQ(c->head_dim, 8);
  EXPECT_EQ(c->vocab_size, 512);
  EXPECT_EQ(c->max_position_embeddings, 512);
  EXPECT_DOUBLE_EQ(c->rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c->rope_theta, 10000.0);
  EXPECT_TRUE(c->rope_scaling.type.empty());
  EXPECT_TRUE(c->tie_word_embeddings);
  EXPECT_FALSE(c->attention_bias);
  EXPECT_EQ(c->sliding_window, 0);
  EXPECT_EQ(c->bos_token_id, 1);
  EXPECT_EQ(c->eos_token_ids, std::vector<int32_t>{2});
  EXPECT_FALSE(c->pad_token_id.has_value());
  EXPECT_EQ(c->torch_dtype, "float32");
}

TEST(ConfigTest, LoadsStories260KBf16) {
  auto c = LoadModelConfig(kModels + "/stories260K-bf16/config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->torch_dtype, "bfloat16");
  EXPECT_EQ(c->hidden_size, 64);
}

TEST(ConfigTest, LoadsStories260KQwen2) {
  auto c = LoadModelConfig(kModels + "/stories260K-qwen2/config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, "Qwen2ForCausalLM");
  EXPECT_TRUE(c->attention_bias);
  EXPECT_EQ(c->head_dim, 8);  // derived: no head_dim in this config
  EXPECT_EQ(c->sliding_window, 0);
  EXPECT_EQ(c->num_key_value_heads, 4);
}

TEST(ConfigTest, LoadMissingFileIsNotFound) {
  auto c = LoadModelConfig(kModels + "/does-not-exist/config.json");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("does-not-exist/config.json"));
}

// Found by fuzz_model_config: a number beyond a double threw json::out_of_range (not parse_error)
// out of ParseModelConfig, so a config.json with "rms_norm_eps": 1e505 terminated the process.
TEST(ConfigTest, NumberOverflowIsInvalidArgumentNotAnException) {
  auto c =
      ParseModelConfig(R"({"architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e505})", "config.json");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("config.json: invalid JSON"));
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("number overflow"));
}

// --- defaults and derived fields ---------------------------------------------------------------

TEST(ConfigTest, KeyValueHeadsDefaultToHeads) {
  json j = BaseLlama();
  j.erase("num_key_value_heads");
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_key_value_heads, 8);
  j["num_key_value_heads"] = nullptr;
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_key_value_heads, 8);
}

TEST(ConfigTest, HeadDimDerivedWhenAbsentOrNull) {
  json j = BaseLlama();
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->head_dim, 8);
  j["head_dim"] = nullptr;
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->head_dim, 8);
}

TEST(ConfigTest, ExplicitHeadDimMayDifferFromHiddenOverHeads) {
  json j = BaseLlama();
  j["head_dim"] = 16;  // Mistral-Nemo style: heads * head_dim != hidden_size
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->head_dim, 16);
}

TEST(ConfigTest, HeadDimUnderivableIsRefused) {
  json j = BaseLlama();
  j["num_attention_heads"] = 6;
  j["num_key_value_heads"] = 6;
  ExpectInvalid(Parse(j), {"test.json", "head_dim", "not divisible"});
}

TEST(ConfigTest, DefaultsForOptionalFields) {
  auto c = Parse(BaseLlama());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_DOUBLE_EQ(c->rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c->rope_theta, 10000.0);
  EXPECT_EQ(c->max_position_embeddings, 2048);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_FALSE(c->attention_bias);
  EXPECT_FALSE(c->bos_token_id.has_value());
  EXPECT_TRUE(c->eos_token_ids.empty());
  EXPECT_TRUE(c->torch_dtype.empty());
}

TEST(ConfigTest, LlamaAttentionBias) {
  json j = BaseLlama();
  j["attention_bias"] = true;
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->attention_bias);
}

TEST(ConfigTest, Qwen2AlwaysHasAttentionBias) {
  json j = BaseLlama();
  j["architectures"] = {"Qwen2ForCausalLM"};
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->attention_bias);
  EXPECT_EQ(c->max_position_embeddings, 32768);
}

TEST(ConfigTest, Qwen2SlidingWindowRefused) {
  json j = BaseLlama();
  j["architectures"] = {"Qwen2ForCausalLM"};
  j["use_sliding_window"] = true;
  j["sliding_window"] = 4096;
  ExpectInvalid(Parse(j), {"use_sliding_window"});
}

TEST(ConfigTest, MistralSlidingWindow) {
  json j = BaseLlama();
  j["architectures"] = {"MistralForCausalLM"};
  j["sliding_window"] = 4096;
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, "MistralForCausalLM");
  EXPECT_EQ(c->sliding_window, 4096);
  EXPECT_FALSE(c->attention_bias);
}

TEST(ConfigTest, MistralSlidingWindowNullMeansNone) {
  json j = BaseLlama();
  j["architectures"] = {"MistralForCausalLM"};
  j["sliding_window"] = nullptr;
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->sliding_window, 0);
}

TEST(ConfigTest, MistralSlidingWindowAbsentDefaultsLikeTransformers) {
  json j = BaseLlama();
  j["architectures"] = {"MistralForCausalLM"};
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->sliding_window, 4096);
}

TEST(ConfigTest, SlidingWindowIgnoredForLlama) {
  json j = BaseLlama();
  j["sliding_window"] = 128;
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->sliding_window, 0);
}

TEST(ConfigTest, TokenIdsIntListOrNull) {
  json j = BaseLlama();
  j["bos_token_id"] = 1;
  j["eos_token_id"] = {2, 3, 7};
  j["pad_token_id"] = 0;
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->bos_token_id, 1);
  EXPECT_EQ(c->eos_token_ids, (std::vector<int32_t>{2, 3, 7}));
  EXPECT_EQ(c->pad_token_id, 0);

  j["bos_token_id"] = {5};
  j["eos_token_id"] = nullptr;
  j["pad_token_id"] = -1;  // old Llama exports: means "no pad token"
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->bos_token_id, 5);
  EXPECT_TRUE(c->eos_token_ids.empty());
  EXPECT_FALSE(c->pad_token_id.has_value());
}

TEST(ConfigTest, ModelTypeFallbackWithoutArchitectures) {
  json j = BaseLlama();
  j.erase("architectures");
  j["model_type"] = "mistral";
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, "MistralForCausalLM");
}

TEST(ConfigTest, DtypeKeyAcceptedForTorchDtype) {
  json j = BaseLlama();
  j["dtype"] = "bfloat16";
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->torch_dtype, "bfloat16");
}

// --- rope scaling ------------------------------------------------------------------------------

TEST(ConfigTest, RopeScalingLlama3) {
  json j = BaseLlama();
  j["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", 8.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192}};
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.type, "llama3");
  EXPECT_DOUBLE_EQ(c->rope_scaling.factor, 8.0);
  EXPECT_DOUBLE_EQ(c->rope_scaling.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(c->rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 8192);
}

TEST(ConfigTest, RopeScalingLegacyTypeKey) {
  json j = BaseLlama();
  j["rope_scaling"] = {{"type", "llama3"},
                       {"factor", 32},
                       {"low_freq_factor", 1},
                       {"high_freq_factor", 4},
                       {"original_max_position_embeddings", 8192}};
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.type, "llama3");
  EXPECT_DOUBLE_EQ(c->rope_scaling.factor, 32.0);
}

TEST(ConfigTest, RopeScalingNullOrDefaultIsNone) {
  json j = BaseLlama();
  j["rope_scaling"] = nullptr;
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->rope_scaling.type.empty());
  j["rope_scaling"] = {{"rope_type", "default"}};
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->rope_scaling.type.empty());
}

TEST(ConfigTest, RopeScalingUnsupportedTypeRefusedByName) {
  json j = BaseLlama();
  j["rope_scaling"] = {{"type", "yarn"}, {"factor", 4.0}};
  ExpectInvalid(Parse(j), {"test.json", "rope_scaling", "'yarn'"});
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  ExpectInvalid(Parse(j), {"'linear'"});
}

TEST(ConfigTest, RopeScalingLlama3MissingParameter) {
  json j = BaseLlama();
  j["rope_scaling"] = {{"rope_type", "llama3"},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192}};
  ExpectInvalid(Parse(j), {"rope_scaling.factor"});
}

TEST(ConfigTest, RopeScalingWrongTypes) {
  json j = BaseLlama();
  j["rope_scaling"] = "llama3";
  ExpectInvalid(Parse(j), {"'rope_scaling'", "object"});
  j["rope_scaling"] = {{"rope_type", 3}};
  ExpectInvalid(Parse(j), {"rope_scaling.rope_type", "string"});
  j["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", "8"},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192}};
  ExpectInvalid(Parse(j), {"rope_scaling.factor", "number"});
}

TEST(ConfigTest, RopeScalingLlama3InconsistentFactors) {
  json j = BaseLlama();
  j["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", 8.0},
                       {"low_freq_factor", 4.0},
                       {"high_freq_factor", 1.0},
                       {"original_max_position_embeddings", 8192}};
  ExpectInvalid(Parse(j), {"low_freq_factor", "high_freq_factor"});
}

// --- refusals and type errors ------------------------------------------------------------------

TEST(ConfigTest, UnsupportedArchitectureRefusedByName) {
  json j = BaseLlama();
  j["architectures"] = {"GPT2LMHeadModel"};
  ExpectInvalid(Parse(j), {"test.json", "unsupported architecture 'GPT2LMHeadModel'"});
}

TEST(ConfigTest, UnsupportedModelTypeRefusedByName) {
  json j = BaseLlama();
  j.erase("architectures");
  j["model_type"] = "gemma";
  ExpectInvalid(Parse(j), {"'gemma'"});
}

TEST(ConfigTest, MissingArchitecture) {
  json j = BaseLlama();
  j.erase("architectures");
  ExpectInvalid(Parse(j), {"missing required field 'architectures'"});
}

TEST(ConfigTest, ArchitecturesWrongType) {
  json j = BaseLlama();
  j["architectures"] = "LlamaForCausalLM";
  ExpectInvalid(Parse(j), {"'architectures'", "list"});
  j["architectures"] = json::array();
  ExpectInvalid(Parse(j), {"'architectures'", "empty"});
}

TEST(ConfigTest, MissingRequiredFieldNamed) {
  for (const char* field :
       {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"}) {
    json j = BaseLlama();
    j.erase(field);
    ExpectInvalid(Parse(j), {"test.json", std::string("missing required field '") + field + "'"});
  }
}

TEST(ConfigTest, WrongIntegerTypeNamed) {
  json j = BaseLlama();
  j["hidden_size"] = "64";
  ExpectInvalid(Parse(j), {"test.json", "'hidden_size'", "integer", "string"});
}

TEST(ConfigTest, NonIntegralIntegerNamed) {
  json j = BaseLlama();
  j["num_hidden_layers"] = 2.5;
  ExpectInvalid(Parse(j), {"'num_hidden_layers'", "integer"});
}

TEST(ConfigTest, IntegralFloatAcceptedForInteger) {
  json j = BaseLlama();
  j["max_position_embeddings"] = 4096.0;
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->max_position_embeddings, 4096);
}

TEST(ConfigTest, WrongBoolTypeNamed) {
  json j = BaseLlama();
  j["tie_word_embeddings"] = 1;
  ExpectInvalid(Parse(j), {"'tie_word_embeddings'", "boolean"});
}

TEST(ConfigTest, WrongNumberTypeNamed) {
  json j = BaseLlama();
  j["rope_theta"] = "10000";
  ExpectInvalid(Parse(j), {"'rope_theta'", "number"});
  j = BaseLlama();
  j["rms_norm_eps"] = true;
  ExpectInvalid(Parse(j), {"'rms_norm_eps'", "number"});
}

TEST(ConfigTest, WrongStringTypeNamed) {
  json j = BaseLlama();
  j["torch_dtype"] = 32;
  ExpectInvalid(Parse(j), {"'torch_dtype'", "string"});
}

TEST(ConfigTest, WrongTokenIdTypeNamed) {
  json j = BaseLlama();
  j["eos_token_id"] = "2";
  ExpectInvalid(Parse(j), {"'eos_token_id'"});
  j["eos_token_id"] = {2, "x"};
  ExpectInvalid(Parse(j), {"'eos_token_id[1]'"});
  j["eos_token_id"] = 5000000000LL;
  ExpectInvalid(Parse(j), {"'eos_token_id'", "out of range"});
}

TEST(ConfigTest, SlidingWindowWrongTypeNamed) {
  json j = BaseLlama();
  j["architectures"] = {"MistralForCausalLM"};
  j["sliding_window"] = "4096";
  ExpectInvalid(Parse(j), {"'sliding_window'"});
}

TEST(ConfigTest, MlpBiasRefused) {
  json j = BaseLlama();
  j["mlp_bias"] = true;
  ExpectInvalid(Parse(j), {"mlp_bias"});
}

TEST(ConfigTest, HiddenActOtherThanSiluRefused) {
  json j = BaseLlama();
  j["hidden_act"] = "gelu";
  ExpectInvalid(Parse(j), {"hidden_act", "'gelu'"});
}

TEST(ConfigTest, InvalidJson) {
  auto c = ParseModelConfig("{\"hidden_size\": 64,", "bad.json");
  ExpectInvalid(c, {"bad.json", "invalid JSON"});
}

TEST(ConfigTest, NotAnObject) {
  ExpectInvalid(ParseModelConfig("[1, 2]", "arr.json"), {"arr.json", "object"});
}

// --- validation --------------------------------------------------------------------------------

TEST(ConfigTest, ValidateHeadsNotMultipleOfKvHeads) {
  json j = BaseLlama();
  j["num_key_value_heads"] = 3;
  ExpectInvalid(Parse(j), {"num_attention_heads", "num_key_value_heads"});
}

TEST(ConfigTest, ValidateNonPositiveSizes) {
  for (const char* field : {"hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size",
                            "num_key_value_heads", "max_position_embeddings"}) {
    json j = BaseLlama();
    j[field] = 0;
    j["head_dim"] = 8;
    ExpectInvalid(Parse(j), {std::string("'") + field + "'"});
  }
}

TEST(ConfigTest, ValidateOddHeadDim) {
  json j = BaseLlama();
  j["head_dim"] = 7;
  ExpectInvalid(Parse(j), {"head_dim", "even"});
}

TEST(ConfigTest, ValidateTokenIdOutsideVocab) {
  json j = BaseLlama();
  j["eos_token_id"] = 512;
  ExpectInvalid(Parse(j), {"eos_token_id", "outside the vocabulary"});
}

TEST(ConfigTest, ValidateNonPositiveEpsAndTheta) {
  json j = BaseLlama();
  j["rms_norm_eps"] = 0.0;
  ExpectInvalid(Parse(j), {"rms_norm_eps"});
  j = BaseLlama();
  j["rope_theta"] = -1.0;
  ExpectInvalid(Parse(j), {"rope_theta"});
}

TEST(ConfigTest, ValidateDirectly) {
  ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  auto s = ValidateModelConfig(c, "mem");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("mem"));
  c.hidden_size = 64;
  c.intermediate_size = 128;
  c.num_hidden_layers = 1;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.vocab_size = 100;
  EXPECT_TRUE(ValidateModelConfig(c, "mem").ok());
  c.architecture = "FalconForCausalLM";
  EXPECT_THAT(std::string(ValidateModelConfig(c, "mem").message()), HasSubstr("'FalconForCausalLM'"));
}

// --- round trip --------------------------------------------------------------------------------

void ExpectRoundTrip(const ModelConfig& c) {
  std::string text = ModelConfigToJson(c);
  auto back = ParseModelConfig(text, "roundtrip.json");
  ASSERT_TRUE(back.ok()) << back.status() << "\n" << text;
  EXPECT_TRUE(*back == c) << text;
  EXPECT_EQ(ModelConfigToJson(*back), text);
}

TEST(ConfigTest, RoundTripRealConfigs) {
  for (const char* name : {"stories260K", "stories260K-bf16", "stories260K-qwen2"}) {
    SCOPED_TRACE(name);
    auto c = LoadModelConfig(kModels + "/" + name + "/config.json");
    ASSERT_TRUE(c.ok()) << c.status();
    ExpectRoundTrip(*c);
  }
}

TEST(ConfigTest, RoundTripAllFields) {
  ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.hidden_size = 4096;
  c.intermediate_size = 14336;
  c.num_hidden_layers = 32;
  c.num_attention_heads = 32;
  c.num_key_value_heads = 8;
  c.head_dim = 128;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 500000.0;
  c.rope_scaling = {"llama3", 8.0, 1.0, 4.0, 8192};
  c.max_position_embeddings = 131072;
  c.vocab_size = 128256;
  c.tie_word_embeddings = false;
  c.attention_bias = true;
  c.bos_token_id = 128000;
  c.eos_token_ids = {128001, 128008, 128009};
  c.pad_token_id = 128004;
  c.torch_dtype = "bfloat16";
  ExpectRoundTrip(c);

  // HF-compatible spelling of the fields.
  json j = json::parse(ModelConfigToJson(c));
  EXPECT_EQ(j["architectures"], json({"LlamaForCausalLM"}));
  EXPECT_EQ(j["model_type"], "llama");
  EXPECT_EQ(j["rope_scaling"]["rope_type"], "llama3");
  EXPECT_EQ(j["eos_token_id"], json({128001, 128008, 128009}));
  EXPECT_EQ(j["attention_bias"], true);

  c.eos_token_ids.clear();
  c.bos_token_id.reset();
  c.pad_token_id.reset();
  c.rope_scaling = {};
  c.torch_dtype.clear();
  ExpectRoundTrip(c);
}

TEST(ConfigTest, RoundTripMistralAndQwen2) {
  auto mistral = Parse([] {
    json j = BaseLlama();
    j["architectures"] = {"MistralForCausalLM"};
    j["sliding_window"] = 4096;
    j["rope_theta"] = 1000000.0;
    return j;
  }());
  ASSERT_TRUE(mistral.ok()) << mistral.status();
  ExpectRoundTrip(*mistral);
  mistral->sliding_window = 0;
  ExpectRoundTrip(*mistral);
  EXPECT_TRUE(json::parse(ModelConfigToJson(*mistral))["sliding_window"].is_null());

  json q = BaseLlama();
  q["architectures"] = {"Qwen2ForCausalLM"};
  q["eos_token_id"] = {2, 3};
  auto qwen = Parse(q);
  ASSERT_TRUE(qwen.ok()) << qwen.status();
  ExpectRoundTrip(*qwen);
  EXPECT_EQ(json::parse(ModelConfigToJson(*qwen))["model_type"], "qwen2");
}

// --- expected tensors --------------------------------------------------------------------------

ModelConfig SmallConfig(const char* arch = "LlamaForCausalLM") {
  json j = BaseLlama();
  j["architectures"] = {arch};
  j["tie_word_embeddings"] = false;
  auto c = Parse(j);
  EXPECT_TRUE(c.ok()) << c.status();
  return *c;
}

std::map<std::string, std::vector<int64_t>> ShapesOf(const ModelConfig& c, bool with_optional) {
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const ExpectedTensor& e : ExpectedLlamaTensors(c)) {
    if (!e.optional || with_optional) shapes[e.name] = e.shape;
  }
  return shapes;
}

TEST(ExpectedTensorsTest, LlamaNamesAndShapes) {
  ModelConfig c = SmallConfig();
  auto expected = ExpectedLlamaTensors(c);
  ASSERT_EQ(expected.size(), 2u * 9u + 3u);
  auto shapes = ShapesOf(c, true);
  EXPECT_EQ(shapes.at("model.embed_tokens.weight"), (std::vector<int64_t>{512, 64}));
  EXPECT_EQ(shapes.at("model.layers.1.self_attn.q_proj.weight"), (std::vector<int64_t>{64, 64}));
  EXPECT_EQ(shapes.at("model.layers.1.self_attn.k_proj.weight"), (std::vector<int64_t>{32, 64}));
  EXPECT_EQ(shapes.at("model.layers.1.self_attn.v_proj.weight"), (std::vector<int64_t>{32, 64}));
  EXPECT_EQ(shapes.at("model.layers.0.self_attn.o_proj.weight"), (std::vector<int64_t>{64, 64}));
  EXPECT_EQ(shapes.at("model.layers.0.mlp.gate_proj.weight"), (std::vector<int64_t>{172, 64}));
  EXPECT_EQ(shapes.at("model.layers.0.mlp.up_proj.weight"), (std::vector<int64_t>{172, 64}));
  EXPECT_EQ(shapes.at("model.layers.0.mlp.down_proj.weight"), (std::vector<int64_t>{64, 172}));
  EXPECT_EQ(shapes.at("model.layers.0.input_layernorm.weight"), (std::vector<int64_t>{64}));
  EXPECT_EQ(shapes.at("model.layers.0.post_attention_layernorm.weight"), (std::vector<int64_t>{64}));
  EXPECT_EQ(shapes.at("model.norm.weight"), (std::vector<int64_t>{64}));
  EXPECT_EQ(shapes.at("lm_head.weight"), (std::vector<int64_t>{512, 64}));
  EXPECT_EQ(shapes.count("model.layers.0.self_attn.q_proj.bias"), 0u);
  EXPECT_FALSE(expected.back().optional);
}

TEST(ExpectedTensorsTest, Qwen2HasBiases) {
  ModelConfig c = SmallConfig("Qwen2ForCausalLM");
  auto shapes = ShapesOf(c, true);
  EXPECT_EQ(shapes.size(), 2u * 12u + 3u);
  EXPECT_EQ(shapes.at("model.layers.0.self_attn.q_proj.bias"), (std::vector<int64_t>{64}));
  EXPECT_EQ(shapes.at("model.layers.0.self_attn.k_proj.bias"), (std::vector<int64_t>{32}));
  EXPECT_EQ(shapes.at("model.layers.0.self_attn.v_proj.bias"), (std::vector<int64_t>{32}));
}

TEST(ExpectedTensorsTest, TiedLmHeadIsOptional) {
  ModelConfig c = SmallConfig();
  c.tie_word_embeddings = true;
  auto expected = ExpectedLlamaTensors(c);
  EXPECT_EQ(expected.back().name, "lm_head.weight");
  EXPECT_TRUE(expected.back().optional);
}

TEST(ExpectedTensorsTest, IgnoredNames) {
  EXPECT_TRUE(IsIgnoredCheckpointTensor("model.layers.0.self_attn.rotary_emb.inv_freq"));
  EXPECT_TRUE(IsIgnoredCheckpointTensor("model.rotary_emb.inv_freq"));
  EXPECT_FALSE(IsIgnoredCheckpointTensor("model.norm.weight"));
}

TEST(CheckTensorShapesTest, CompleteCheckpointPasses) {
  ModelConfig c = SmallConfig();
  EXPECT_TRUE(CheckLlamaTensorShapes(c, ShapesOf(c, true), "ckpt").ok());
}

TEST(CheckTensorShapesTest, MissingTensorReported) {
  ModelConfig c = SmallConfig();
  auto shapes = ShapesOf(c, true);
  shapes.erase("model.layers.1.mlp.up_proj.weight");
  auto s = CheckLlamaTensorShapes(c, shapes, "ckpt-dir");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("ckpt-dir"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("1 missing tensor(s): model.layers.1.mlp.up_proj.weight"));
}

TEST(CheckTensorShapesTest, UnexpectedTensorReported) {
  ModelConfig c = SmallConfig();
  auto shapes = ShapesOf(c, true);
  shapes["model.layers.2.mlp.up_proj.weight"] = {172, 64};
  auto s = CheckLlamaTensorShapes(c, shapes, "ckpt");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("1 unexpected tensor(s): model.layers.2.mlp.up_proj.weight"));
}

TEST(CheckTensorShapesTest, ShapeMismatchReported) {
  ModelConfig c = SmallConfig();
  auto shapes = ShapesOf(c, true);
  shapes["model.layers.0.self_attn.k_proj.weight"] = {64, 64};
  auto s = CheckLlamaTensorShapes(c, shapes, "ckpt");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("model.layers.0.self_attn.k_proj.weight: expected [32, 64], got [64, 64]"));
}

TEST(CheckTensorShapesTest, ManyProblemsTruncatedWithCounts) {
  ModelConfig c = SmallConfig();
  std::map<std::string, std::vector<int64_t>> shapes;  // nothing at all
  for (int i = 0; i < 7; ++i) shapes["extra." + std::to_string(i)] = {1};
  auto s = CheckLlamaTensorShapes(c, shapes, "ckpt");
  std::string m(s.message());
  EXPECT_THAT(m, HasSubstr("21 missing tensor(s)"));
  EXPECT_THAT(m, HasSubstr("(16 more)"));
  EXPECT_THAT(m, HasSubstr("7 unexpected tensor(s)"));
  EXPECT_THAT(m, HasSubstr("(2 more)"));
}

TEST(CheckTensorShapesTest, RotaryInvFreqIgnored) {
  ModelConfig c = SmallConfig();
  auto shapes = ShapesOf(c, true);
  shapes["model.layers.0.self_attn.rotary_emb.inv_freq"] = {4};
  EXPECT_TRUE(CheckLlamaTensorShapes(c, shapes, "ckpt").ok());
}

TEST(CheckTensorShapesTest, UntiedWithoutLmHeadIsMissing) {
  ModelConfig c = SmallConfig();
  auto shapes = ShapesOf(c, true);
  shapes.erase("lm_head.weight");
  auto s = CheckLlamaTensorShapes(c, shapes, "ckpt");
  EXPECT_THAT(std::string(s.message()), HasSubstr("missing tensor(s): lm_head.weight"));
}

TEST(CheckTensorShapesTest, TiedAcceptsPresentOrAbsentLmHead) {
  ModelConfig c = SmallConfig();
  c.tie_word_embeddings = true;
  EXPECT_TRUE(CheckLlamaTensorShapes(c, ShapesOf(c, false), "ckpt").ok());
  EXPECT_TRUE(CheckLlamaTensorShapes(c, ShapesOf(c, true), "ckpt").ok());
  auto shapes = ShapesOf(c, true);
  shapes["lm_head.weight"] = {64, 64};
  EXPECT_THAT(std::string(CheckLlamaTensorShapes(c, shapes, "ckpt").message()),
              HasSubstr("lm_head.weight: expected [512, 64], got [64, 64]"));
}

TEST(CheckTensorShapesTest, Qwen2WithoutBiasesReported) {
  ModelConfig qwen = SmallConfig("Qwen2ForCausalLM");
  ModelConfig llama = SmallConfig();
  auto s = CheckLlamaTensorShapes(qwen, ShapesOf(llama, true), "ckpt");
  EXPECT_THAT(std::string(s.message()), HasSubstr("6 missing tensor(s)"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("self_attn.q_proj.bias"));
}

}  // namespace
}  // namespace strata
