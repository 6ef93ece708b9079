#include "core/model/safetensors.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <torch/torch.h>

#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

#include "core/model/config.h"
#include "core/util/file_util.h"

namespace strata {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using json = nlohmann::json;

const std::string kModels = std::string(STRATA_SHARED_DIR) + "/models";

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "strata_st_XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { ASSERT_TRUE(RemoveAll(dir_).ok()); }

  std::string Path(const std::string& name) const { return dir_ + "/" + name; }

  // Writes raw bytes.
  std::string WriteBytes(const std::string& name, const std::string& bytes) {
    std::string path = Path(name);
    EXPECT_TRUE(WriteFileAtomic(path, bytes).ok());
    return path;
  }

  // Writes a safetensors file from a literal header and a data buffer (no validation).
  std::string WriteRaw(const std::string& name, const std::string& header, const std::string& data,
                       int64_t header_len_override = -1) {
    uint64_t n = header_len_override >= 0 ? static_cast<uint64_t>(header_len_override) : header.size();
    std::string bytes(8, '\0');
    std::memcpy(bytes.data(), &n, 8);
    return WriteBytes(name, bytes + header + data);
  }

  // Opens `path` and expects failure with `code` and every string of `parts` in the message.
  void ExpectOpenError(const std::string& path, absl::StatusCode code,
                       const std::vector<std::string>& parts) {
    auto f = SafetensorsFile::Open(path);
    ASSERT_FALSE(f.ok());
    EXPECT_EQ(f.status().code(), code) << f.status();
    EXPECT_THAT(std::string(f.status().message()), HasSubstr(path));
    for (const std::string& p : parts) {
      EXPECT_THAT(std::string(f.status().message()), HasSubstr(p));
    }
  }

  std::string dir_;
};

// --- malformed files: one test per case ----------------------------------------------------------

TEST_F(SafetensorsTest, MissingFileIsNotFound) {
  ExpectOpenError(Path("nope.safetensors"), absl::StatusCode::kNotFound, {});
}

TEST_F(SafetensorsTest, EmptyFileIsTruncated) {
  ExpectOpenError(WriteBytes("empty.safetensors", ""), absl::StatusCode::kInvalidArgument,
                  {"truncated", "0 bytes"});
}

TEST_F(SafetensorsTest, FileShorterThan8BytesIsTruncated) {
  ExpectOpenError(WriteBytes("short.safetensors", std::string("\x05\0\0", 3)),
                  absl::StatusCode::kInvalidArgument, {"truncated", "3 bytes"});
}

TEST_F(SafetensorsTest, HeaderLengthPastEnd) {
  ExpectOpenError(WriteRaw("len.safetensors", "{}", "", 1000), absl::StatusCode::kInvalidArgument,
                  {"header length 1000", "past the end"});
}

TEST_F(SafetensorsTest, HugeHeaderLengthPastEnd) {
  ExpectOpenError(WriteRaw("huge.safetensors", "{}", "", INT64_MAX), absl::StatusCode::kInvalidArgument,
                  {"past the end"});
}

TEST_F(SafetensorsTest, BadJson) {
  ExpectOpenError(WriteRaw("json.safetensors", "{\"a\": {\"dtype\": ", ""),
                  absl::StatusCode::kInvalidArgument, {"not valid JSON"});
}

TEST_F(SafetensorsTest, HeaderNotAnObject) {
  ExpectOpenError(WriteRaw("arr.safetensors", "[1, 2, 3]", ""), absl::StatusCode::kInvalidArgument,
                  {"header must be a JSON object", "array"});
}

TEST_F(SafetensorsTest, EntryNotAnObject) {
  ExpectOpenError(WriteRaw("entry.safetensors", R"({"w": 5})", ""), absl::StatusCode::kInvalidArgument,
                  {"tensor 'w'", "object"});
}

TEST_F(SafetensorsTest, UnknownDtype) {
  ExpectOpenError(
      WriteRaw("dtype.safetensors", R"({"w": {"dtype": "F7", "shape": [1], "data_offsets": [0, 4]}})",
               std::string(4, '\0')),
      absl::StatusCode::kInvalidArgument, {"tensor 'w'", "dtype 'F7'"});
}

TEST_F(SafetensorsTest, MissingDtype) {
  ExpectOpenError(WriteRaw("nodtype.safetensors", R"({"w": {"shape": [1], "data_offsets": [0, 4]}})",
                           std::string(4, '\0')),
                  absl::StatusCode::kInvalidArgument, {"tensor 'w'", "missing 'dtype'"});
}

TEST_F(SafetensorsTest, MissingShape) {
  ExpectOpenError(WriteRaw("noshape.safetensors", R"({"w": {"dtype": "F32", "data_offsets": [0, 4]}})",
                           std::string(4, '\0')),
                  absl::StatusCode::kInvalidArgument, {"tensor 'w'", "missing 'shape'"});
}

TEST_F(SafetensorsTest, MissingDataOffsets) {
  ExpectOpenError(
      WriteRaw("nooff.safetensors", R"({"w": {"dtype": "F32", "shape": [1]}})", std::string(4, '\0')),
      absl::StatusCode::kInvalidArgument, {"tensor 'w'", "missing 'data_offsets'"});
}

TEST_F(SafetensorsTest, OffsetsOutOfRange) {
  ExpectOpenError(
      WriteRaw("range.safetensors", R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})",
               std::string(8, '\0')),
      absl::StatusCode::kInvalidArgument, {"tensor 'w'", "out of range", "8 bytes"});
}

TEST_F(SafetensorsTest, OffsetsBeginAfterEnd) {
  ExpectOpenError(
      WriteRaw("order.safetensors", R"({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}})",
               std::string(8, '\0')),
      absl::StatusCode::kInvalidArgument, {"tensor 'w'", "begin > end"});
}

TEST_F(SafetensorsTest, OffsetsWrongArity) {
  ExpectOpenError(
      WriteRaw("arity.safetensors", R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}})",
               std::string(8, '\0')),
      absl::StatusCode::kInvalidArgument, {"tensor 'w'", "data_offsets"});
}

TEST_F(SafetensorsTest, NegativeOffset) {
  ExpectOpenError(
      WriteRaw("negoff.safetensors", R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}})",
               std::string(8, '\0')),
      absl::StatusCode::kInvalidArgument, {"tensor 'w'", "data_offsets"});
}

TEST_F(SafetensorsTest, OverlappingOffsets) {
  ExpectOpenError(WriteRaw("overlap.safetensors",
                           R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                   "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                           std::string(12, '\0')),
                  absl::StatusCode::kInvalidArgument, {"tensor 'b'", "overlap tensor 'a'"});
}

TEST_F(SafetensorsTest, ShapeTimesDtypeSizeMismatch) {
  ExpectOpenError(
      WriteRaw("size.safetensors", R"({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 8]}})",
               std::string(8, '\0')),
      absl::StatusCode::kInvalidArgument,
      {"tensor 'w'", "shape [2, 3] x BF16", "needs 12 bytes", "span 8 bytes"});
}

TEST_F(SafetensorsTest, ShapeProductOverflow) {
  ExpectOpenError(
      WriteRaw("ovf.safetensors",
               R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 8]}})",
               std::string(8, '\0')),
      absl::StatusCode::kInvalidArgument, {"tensor 'w'", "more than 2^64"});
}

TEST_F(SafetensorsTest, NegativeShape) {
  ExpectOpenError(
      WriteRaw("negshape.safetensors", R"({"w": {"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 8]}})",
               std::string(8, '\0')),
      absl::StatusCode::kInvalidArgument, {"tensor 'w'", "shape[0]", "non-negative integer"});
}

TEST_F(SafetensorsTest, NonIntegerShape) {
  ExpectOpenError(
      WriteRaw("floatshape.safetensors",
               R"({"w": {"dtype": "F32", "shape": [2, 1.5], "data_offsets": [0, 8]}})", std::string(8, '\0')),
      absl::StatusCode::kInvalidArgument, {"tensor 'w'", "shape[1]", "non-negative integer"});
}

TEST_F(SafetensorsTest, ShapeNotAList) {
  ExpectOpenError(
      WriteRaw("shapestr.safetensors", R"({"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}})",
               std::string(8, '\0')),
      absl::StatusCode::kInvalidArgument, {"tensor 'w'", "'shape' must be a list"});
}

TEST_F(SafetensorsTest, MetadataValuesMustBeStrings) {
  ExpectOpenError(WriteRaw("meta.safetensors", R"({"__metadata__": {"format": 1}})", ""),
                  absl::StatusCode::kInvalidArgument, {"__metadata__", "'format'", "string"});
}

TEST_F(SafetensorsTest, DirectoryIsNotAFile) {
  ExpectOpenError(dir_, absl::StatusCode::kInvalidArgument, {"not a regular file"});
}

TEST_F(SafetensorsTest, GetUnknownTensorIsNotFound) {
  auto f = SafetensorsFile::Open(WriteRaw("one.safetensors",
                                          R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})",
                                          std::string(4, '\0')));
  ASSERT_TRUE(f.ok()) << f.status();
  auto t = (*f)->Get("v", at::kFloat);
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(t.status().message()), HasSubstr("'v'"));
  EXPECT_THAT(std::string(t.status().message()), HasSubstr("one.safetensors"));
}

// --- well-formed hand-made files ------------------------------------------------------------------

TEST_F(SafetensorsTest, HeaderPaddedWithSpacesAndEmptyMetadataAccepted) {
  float values[2] = {1.5f, -2.0f};
  std::string data(reinterpret_cast<const char*>(values), sizeof(values));
  auto f = SafetensorsFile::Open(WriteRaw(
      "pad.safetensors",
      R"({"__metadata__": {}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}      )", data));
  ASSERT_TRUE(f.ok()) << f.status();
  auto t = (*f)->Get("w", at::kFloat);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_FLOAT_EQ(t->data_ptr<float>()[0], 1.5f);
  EXPECT_FLOAT_EQ(t->data_ptr<float>()[1], -2.0f);
}

TEST_F(SafetensorsTest, UnalignedDataIsCopiedCorrectly) {
  // Header of odd length and a gap: the F32 data is not 4-byte aligned in memory.
  float v = 3.25f;
  std::string data = "xy" + std::string(reinterpret_cast<const char*>(&v), 4);
  auto f = SafetensorsFile::Open(
      WriteRaw("unaligned.safetensors", R"({"w":{"dtype":"F32","shape":[],"data_offsets":[2,6]}})", data));
  ASSERT_TRUE(f.ok()) << f.status();
  auto a = (*f)->Get("w", at::kFloat);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->dim(), 0);
  EXPECT_FLOAT_EQ(a->item<float>(), 3.25f);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a->data_ptr()) % alignof(float), 0u);
  auto b = (*f)->Get("w", at::kDouble);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_DOUBLE_EQ(b->item<double>(), 3.25);
}

// --- writer ----------------------------------------------------------------------------------

TEST_F(SafetensorsTest, WriterRoundTripF32Bf16I64WithMetadata) {
  torch::manual_seed(0);
  at::Tensor f32 = torch::randn({3, 5});
  at::Tensor bf16 = torch::randn({7}).to(at::kBFloat16);
  at::Tensor i64 = torch::arange(-6, 6, torch::kLong).reshape({2, 2, 3});
  std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "héllo"}};
  std::string path = Path("rt.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"b", bf16}, {"a", f32}, {"i", i64}}, meta).ok());

  auto f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->metadata(), meta);
  ASSERT_EQ((*f)->entries().size(), 3u);
  EXPECT_EQ((*f)->entries().at("a").dtype, "F32");
  EXPECT_EQ((*f)->entries().at("b").dtype, "BF16");
  EXPECT_EQ((*f)->entries().at("i").dtype, "I64");
  EXPECT_EQ((*f)->entries().at("i").shape, (std::vector<int64_t>{2, 2, 3}));

  auto a = (*f)->Get("a", at::kFloat);
  auto b = (*f)->Get("b", at::kBFloat16);
  auto i = (*f)->Get("i", at::kLong);
  ASSERT_TRUE(a.ok() && b.ok() && i.ok());
  EXPECT_TRUE(torch::equal(*a, f32));
  EXPECT_TRUE(torch::equal(*b, bf16));
  EXPECT_TRUE(torch::equal(*i, i64));
  EXPECT_EQ(b->scalar_type(), at::kBFloat16);

  // Header length is a multiple of 8 and every tensor is aligned to its element size.
  auto bytes = ReadFile(path);
  ASSERT_TRUE(bytes.ok());
  uint64_t n = 0;
  std::memcpy(&n, bytes->data(), 8);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(bytes->size(), 8 + n + 3 * 5 * 4 + 7 * 2 + 12 * 8);
  EXPECT_EQ((*f)->entries().at("i").begin % 8, 0u);
  EXPECT_EQ((*f)->entries().at("a").begin % 4, 0u);
  EXPECT_EQ((*f)->entries().at("b").begin % 2, 0u);
  EXPECT_TRUE(bytes->at(8 + n - 1) == ' ' || bytes->at(8 + n - 1) == '}');
  json header = json::parse(bytes->substr(8, n));
  EXPECT_EQ(header["__metadata__"]["format"], "pt");
}

TEST_F(SafetensorsTest, WriterRoundTripAllDtypes) {
  std::vector<std::pair<std::string, at::Tensor>> tensors = {
      {"f64", torch::tensor({1.0, -2.5}, torch::kDouble)},
      {"f32", torch::tensor({1.0f, 2.0f, 3.0f})},
      {"f16", torch::tensor({0.5f, 1.5f}).to(at::kHalf)},
      {"bf16", torch::tensor({0.5f, 1.5f}).to(at::kBFloat16)},
      {"i64", torch::tensor({int64_t{1} << 40}, torch::kLong)},
      {"i32", torch::tensor({-7, 9}, torch::kInt)},
      {"i16", torch::tensor({-3}, torch::kShort)},
      {"i8", torch::tensor({-128, 127}, torch::kChar)},
      {"u8", torch::tensor({0, 255}, torch::kByte)},
      {"bool", torch::tensor({true, false, true}, torch::kBool)},
  };
  std::string path = Path("all.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, tensors).ok());
  auto f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_TRUE((*f)->metadata().empty());
  for (const auto& [name, t] : tensors) {
    auto back = (*f)->Get(name, t.scalar_type());
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_TRUE(torch::equal(*back, t)) << name;
    EXPECT_EQ((*f)->entries().at(name).begin % t.element_size(), 0u) << name;
  }
  auto as_float = (*f)->Get("i32", at::kFloat);
  ASSERT_TRUE(as_float.ok());
  EXPECT_TRUE(torch::equal(*as_float, torch::tensor({-7.0f, 9.0f})));
}

TEST_F(SafetensorsTest, WriterNonContiguousEmptyAndScalar) {
  at::Tensor t = torch::arange(6, torch::kFloat).reshape({2, 3}).t();  // non-contiguous
  at::Tensor empty = torch::zeros({0, 3});
  at::Tensor scalar = torch::tensor(4.0f).reshape({});
  std::string path = Path("shapes.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"t", t}, {"empty", empty}, {"scalar", scalar}}).ok());
  auto f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  auto bt = (*f)->Get("t", at::kFloat);
  auto be = (*f)->Get("empty", at::kFloat);
  auto bs = (*f)->Get("scalar", at::kBFloat16);
  ASSERT_TRUE(bt.ok() && be.ok() && bs.ok());
  EXPECT_TRUE(torch::equal(*bt, t));
  EXPECT_EQ(be->sizes().vec(), (std::vector<int64_t>{0, 3}));
  EXPECT_EQ(bs->dim(), 0);
  EXPECT_EQ(bs->scalar_type(), at::kBFloat16);
  EXPECT_FLOAT_EQ(bs->to(at::kFloat).item<float>(), 4.0f);
}

TEST_F(SafetensorsTest, WriterRejectsBadInput) {
  std::string path = Path("bad.safetensors");
  at::Tensor x = torch::ones({2});
  auto s = WriteSafetensors(path, {{"a", x}, {"a", x}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("duplicate tensor name 'a'"));
  s = WriteSafetensors(path, {{"__metadata__", x}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  s = WriteSafetensors(path, {{"", x}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  s = WriteSafetensors(path, {{"u", at::Tensor()}});
  EXPECT_THAT(std::string(s.message()), HasSubstr("'u' is undefined"));
  s = WriteSafetensors(path, {{"c", torch::ones({2}, torch::kComplexFloat)}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("'c'"));
  EXPECT_FALSE(PathExists(path));
  EXPECT_TRUE(fs::is_empty(dir_));
}

TEST_F(SafetensorsTest, WriterIsAtomicAndReplacesExisting) {
  std::string path = Path("atomic.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"x", torch::ones({4})}}).ok());
  auto old_file = SafetensorsFile::Open(path);
  ASSERT_TRUE(old_file.ok());
  auto old_view = (*old_file)->Get("x", at::kFloat);
  ASSERT_TRUE(old_view.ok());
  ASSERT_TRUE(WriteSafetensors(path, {{"y", torch::zeros({2})}}).ok());
  // No temp files left behind; the new content is visible; the old mapping is unaffected.
  int files = 0;
  for (const auto& e : fs::directory_iterator(dir_)) {
    (void)e;
    ++files;
  }
  EXPECT_EQ(files, 1);
  auto f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ((*f)->entries().count("y"), 1u);
  EXPECT_EQ((*f)->entries().count("x"), 0u);
  EXPECT_TRUE(torch::equal(*old_view, torch::ones({4})));
}

TEST_F(SafetensorsTest, ZeroCopyViewKeepsMappingAliveAndIsCopyOnWrite) {
  std::string path = Path("cow.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"x", torch::arange(8, torch::kFloat)}}).ok());
  at::Tensor view, view2;
  {
    auto f = SafetensorsFile::Open(path);
    ASSERT_TRUE(f.ok());
    auto a = (*f)->Get("x", at::kFloat);
    auto b = (*f)->Get("x", at::kFloat);
    auto c = (*f)->Get("x", at::kDouble);
    ASSERT_TRUE(a.ok() && b.ok() && c.ok());
    EXPECT_EQ(a->data_ptr(), b->data_ptr());  // zero-copy: both views share the mapping
    EXPECT_NE(a->data_ptr(), c->data_ptr());  // converted: a copy
    view = *a;
    view2 = *b;
  }  // the SafetensorsFile handle is gone; the views keep the mapping alive
  EXPECT_TRUE(torch::equal(view, torch::arange(8, torch::kFloat)));
  view.mul_(2);  // private copy-on-write mapping: no fault, the file is untouched
  EXPECT_TRUE(torch::equal(view2, torch::arange(8, torch::kFloat) * 2));
  auto reopened = SafetensorsFile::Open(path);
  ASSERT_TRUE(reopened.ok());
  auto fresh = (*reopened)->Get("x", at::kFloat);
  ASSERT_TRUE(fresh.ok());
  EXPECT_TRUE(torch::equal(*fresh, torch::arange(8, torch::kFloat)));
}

// --- checkpoint directories ---------------------------------------------------------------------

TEST_F(SafetensorsTest, ShardedCheckpointFromWriterAndIndex) {
  torch::manual_seed(1);
  at::Tensor a = torch::randn({4, 4});
  at::Tensor b = torch::randn({3}).to(at::kBFloat16);
  at::Tensor c = torch::randn({2, 5});
  ASSERT_TRUE(
      WriteSafetensors(Path("model-00001-of-00002.safetensors"), {{"a", a}, {"b", b}}, {{"format", "pt"}})
          .ok());
  ASSERT_TRUE(
      WriteSafetensors(Path("model-00002-of-00002.safetensors"), {{"c", c}}, {{"format", "pt"}}).ok());
  json index = {{"metadata", {{"total_size", 4 * 16 + 2 * 3 + 4 * 10}}},
                {"weight_map",
                 {{"a", "model-00001-of-00002.safetensors"},
                  {"b", "model-00001-of-00002.safetensors"},
                  {"c", "model-00002-of-00002.safetensors"}}}};
  ASSERT_TRUE(WriteFileAtomic(Path("model.safetensors.index.json"), index.dump()).ok());

  auto loaded = LoadCheckpointTensors(dir_, at::kFloat);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ASSERT_EQ(loaded->size(), 3u);
  EXPECT_TRUE(torch::equal(loaded->at("a"), a));
  EXPECT_TRUE(torch::equal(loaded->at("b"), b.to(at::kFloat)));
  EXPECT_TRUE(torch::equal(loaded->at("c"), c));
  for (const auto& [name, t] : *loaded) EXPECT_EQ(t.scalar_type(), at::kFloat) << name;
}

TEST_F(SafetensorsTest, WriteCheckpointTensorsShardsAndLoadsBack) {
  torch::manual_seed(2);
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (int i = 0; i < 5; ++i) tensors.push_back({"t" + std::to_string(i), torch::randn({16})});
  // 64 bytes each, at most 128 per shard -> 3 shards.
  ASSERT_TRUE(WriteCheckpointTensors(dir_, tensors, 128, {{"format", "pt"}}).ok());
  EXPECT_TRUE(PathExists(Path("model-00001-of-00003.safetensors")));
  EXPECT_TRUE(PathExists(Path("model-00003-of-00003.safetensors")));
  EXPECT_FALSE(PathExists(Path("model.safetensors")));
  auto index_text = ReadFile(Path("model.safetensors.index.json"));
  ASSERT_TRUE(index_text.ok());
  json index = json::parse(*index_text);
  EXPECT_EQ(index["metadata"]["total_size"], 5 * 64);
  EXPECT_EQ(index["weight_map"]["t4"], "model-00003-of-00003.safetensors");

  auto loaded = LoadCheckpointTensors(dir_, at::kFloat);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ASSERT_EQ(loaded->size(), 5u);
  for (const auto& [name, t] : tensors) EXPECT_TRUE(torch::equal(loaded->at(name), t)) << name;

  // Rewriting as a single file removes the index, so the loader cannot see stale shards.
  ASSERT_TRUE(WriteCheckpointTensors(dir_, {{"only", torch::ones({2})}}).ok());
  EXPECT_FALSE(PathExists(Path("model.safetensors.index.json")));
  loaded = LoadCheckpointTensors(dir_, at::kFloat);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->size(), 1u);
}

TEST_F(SafetensorsTest, CheckpointDirWithoutWeightsIsNotFound) {
  auto r = LoadCheckpointTensors(dir_, at::kFloat);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(dir_));
  r = LoadCheckpointTensors(dir_ + "/missing", at::kFloat);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SafetensorsTest, CheckpointMissingShard) {
  ASSERT_TRUE(WriteSafetensors(Path("model-00001-of-00002.safetensors"), {{"a", torch::ones({2})}}).ok());
  json index = {
      {"weight_map", {{"a", "model-00001-of-00002.safetensors"}, {"b", "model-00002-of-00002.safetensors"}}}};
  ASSERT_TRUE(WriteFileAtomic(Path("model.safetensors.index.json"), index.dump()).ok());
  auto r = LoadCheckpointTensors(dir_, at::kFloat);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("model-00002-of-00002.safetensors"));
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("'b'"));
}

TEST_F(SafetensorsTest, CheckpointIndexNamesTensorMissingFromShard) {
  ASSERT_TRUE(WriteSafetensors(Path("shard.safetensors"), {{"a", torch::ones({2})}}).ok());
  json index = {{"weight_map", {{"a", "shard.safetensors"}, {"ghost", "shard.safetensors"}}}};
  ASSERT_TRUE(WriteFileAtomic(Path("model.safetensors.index.json"), index.dump()).ok());
  auto r = LoadCheckpointTensors(dir_, at::kFloat);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("tensor 'ghost'"));
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("shard.safetensors"));
}

TEST_F(SafetensorsTest, CheckpointIndexBadJson) {
  WriteBytes("model.safetensors.index.json", "{\"weight_map\": ");
  auto r = LoadCheckpointTensors(dir_, at::kFloat);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("model.safetensors.index.json"));
}

TEST_F(SafetensorsTest, CheckpointIndexWithoutWeightMap) {
  WriteBytes("model.safetensors.index.json", R"({"metadata": {}})");
  auto r = LoadCheckpointTensors(dir_, at::kFloat);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("weight_map"));
}

TEST_F(SafetensorsTest, CheckpointIndexShardOutsideDirectory) {
  WriteBytes("model.safetensors.index.json", R"({"weight_map": {"a": "../evil.safetensors"}})");
  auto r = LoadCheckpointTensors(dir_, at::kFloat);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("outside the checkpoint directory"));
  WriteBytes("model.safetensors.index.json", R"({"weight_map": {"a": 7}})");
  r = LoadCheckpointTensors(dir_, at::kFloat);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("weight_map['a']"));
}

TEST_F(SafetensorsTest, CheckpointMalformedShardNamesShard) {
  WriteBytes("model-00001-of-00001.safetensors", std::string("\x10\0\0\0\0\0\0\0{\"a\":", 13));
  WriteBytes("model.safetensors.index.json", R"({"weight_map": {"a": "model-00001-of-00001.safetensors"}})");
  auto r = LoadCheckpointTensors(dir_, at::kFloat);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("model-00001-of-00001.safetensors"));
}

// --- real models ---------------------------------------------------------------------------------

TEST(RealModelTest, Stories260KF32LoadsAndMatchesConfig) {
  const std::string dir = kModels + "/stories260K";
  auto config = LoadModelConfig(dir + "/config.json");
  ASSERT_TRUE(config.ok()) << config.status();
  auto tensors = LoadCheckpointTensors(dir, at::kFloat);
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  EXPECT_EQ(tensors->size(), 5u * 9u + 2u);  // tied: no lm_head.weight
  EXPECT_TRUE(CheckLlamaTensors(*config, *tensors, dir).ok()) << CheckLlamaTensors(*config, *tensors, dir);
  EXPECT_EQ(tensors->at("model.embed_tokens.weight").sizes().vec(), (std::vector<int64_t>{512, 64}));
  EXPECT_TRUE(torch::isfinite(tensors->at("model.embed_tokens.weight")).all().item<bool>());

  auto file = SafetensorsFile::Open(dir + "/model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->metadata().at("format"), "pt");
  auto a = (*file)->Get("model.norm.weight", at::kFloat);
  auto b = (*file)->Get("model.norm.weight", at::kFloat);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->data_ptr(), b->data_ptr());  // zero-copy
}

TEST(RealModelTest, Stories260KBf16MatchesF32ToBf16Precision) {
  auto f32 = LoadCheckpointTensors(kModels + "/stories260K", at::kFloat);
  auto bf16_as_f32 = LoadCheckpointTensors(kModels + "/stories260K-bf16", at::kFloat);
  ASSERT_TRUE(f32.ok()) << f32.status();
  ASSERT_TRUE(bf16_as_f32.ok()) << bf16_as_f32.status();
  ASSERT_EQ(f32->size(), bf16_as_f32->size());
  for (const auto& [name, ref] : *f32) {
    const at::Tensor& got = bf16_as_f32->at(name);
    EXPECT_EQ(got.scalar_type(), at::kFloat) << name;
    EXPECT_EQ(got.sizes(), ref.sizes()) << name;
    // bf16 has an 8-bit mantissa: relative error at most 2^-8 after rounding.
    EXPECT_TRUE(torch::allclose(got, ref, /*rtol=*/1.0 / 256, /*atol=*/1e-30)) << name;
    EXPECT_TRUE(torch::equal(got, ref.to(at::kBFloat16).to(at::kFloat))) << name;
  }
}

TEST(RealModelTest, Stories260KBf16GetIsZeroCopy) {
  const std::string path = kModels + "/stories260K-bf16/model.safetensors";
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  const std::string name = "model.layers.0.self_attn.q_proj.weight";
  EXPECT_EQ((*file)->entries().at(name).dtype, "BF16");
  auto a = (*file)->Get(name, at::kBFloat16);
  auto b = (*file)->Get(name, at::kBFloat16);
  auto c = (*file)->Get(name, at::kFloat);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ(a->scalar_type(), at::kBFloat16);
  EXPECT_EQ(a->data_ptr(), b->data_ptr());
  EXPECT_NE(a->data_ptr(), c->data_ptr());
  EXPECT_TRUE(torch::equal(a->to(at::kFloat), *c));
  // The whole checkpoint in bf16 is zero-copy too: a second load shares storage.
  auto all1 = LoadCheckpointTensors(kModels + "/stories260K-bf16", at::kBFloat16);
  ASSERT_TRUE(all1.ok()) << all1.status();
  EXPECT_EQ(all1->at(name).scalar_type(), at::kBFloat16);
}

TEST(RealModelTest, Stories260KQwen2HasBiases) {
  const std::string dir = kModels + "/stories260K-qwen2";
  auto config = LoadModelConfig(dir + "/config.json");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->architecture, "Qwen2ForCausalLM");
  EXPECT_TRUE(config->attention_bias);
  auto tensors = LoadCheckpointTensors(dir, at::kFloat);
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  EXPECT_EQ(tensors->size(), 5u * 12u + 2u);
  EXPECT_EQ(tensors->at("model.layers.0.self_attn.q_proj.bias").sizes().vec(), (std::vector<int64_t>{64}));
  EXPECT_EQ(tensors->at("model.layers.4.self_attn.k_proj.bias").sizes().vec(), (std::vector<int64_t>{32}));
  auto s = CheckLlamaTensors(*config, *tensors, dir);
  EXPECT_TRUE(s.ok()) << s;

  // The same tensors do not satisfy a Llama config without biases: 15 unexpected names.
  ModelConfig llama = *config;
  llama.architecture = "LlamaForCausalLM";
  llama.attention_bias = false;
  s = CheckLlamaTensors(llama, *tensors, dir);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("15 unexpected tensor(s)"));
  EXPECT_THAT(std::string(s.message()), HasSubstr(dir));
}

TEST(RealModelTest, CheckLlamaTensorsReportsProblems) {
  const std::string dir = kModels + "/stories260K";
  auto config = LoadModelConfig(dir + "/config.json");
  auto tensors = LoadCheckpointTensors(dir, at::kFloat);
  ASSERT_TRUE(config.ok() && tensors.ok());
  auto t = *tensors;
  t.erase("model.norm.weight");
  t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch::ones({4});  // ignored
  t["model.extra.weight"] = torch::ones({1});
  t["model.layers.2.mlp.down_proj.weight"] = torch::ones({172, 64});
  auto s = CheckLlamaTensors(*config, t, "src");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  std::string m(s.message());
  EXPECT_THAT(m, HasSubstr("1 missing tensor(s): model.norm.weight"));
  EXPECT_THAT(m, HasSubstr("1 unexpected tensor(s): model.extra.weight"));
  EXPECT_THAT(m, HasSubstr("model.layers.2.mlp.down_proj.weight: expected [64, 172], got [172, 64]"));
  EXPECT_THAT(m, ::testing::Not(HasSubstr("inv_freq")));
}

TEST_F(SafetensorsTest, RealModelReexportedShardedRoundTrips) {
  const std::string src = kModels + "/stories260K";
  auto config = LoadModelConfig(src + "/config.json");
  auto tensors = LoadCheckpointTensors(src, at::kFloat);
  ASSERT_TRUE(config.ok() && tensors.ok());
  std::vector<std::pair<std::string, at::Tensor>> items(tensors->begin(), tensors->end());
  ASSERT_TRUE(WriteCheckpointTensors(dir_, items, 400 * 1024, {{"format", "pt"}}).ok());
  ASSERT_TRUE(WriteFileAtomic(Path("config.json"), ModelConfigToJson(*config)).ok());
  EXPECT_TRUE(PathExists(Path("model.safetensors.index.json")));
  auto config2 = LoadModelConfig(Path("config.json"));
  ASSERT_TRUE(config2.ok()) << config2.status();
  EXPECT_TRUE(*config2 == *config);
  auto back = LoadCheckpointTensors(dir_, at::kFloat);
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_EQ(back->size(), tensors->size());
  for (const auto& [name, t] : *tensors) EXPECT_TRUE(torch::equal(back->at(name), t)) << name;
  EXPECT_TRUE(CheckLlamaTensors(*config2, *back, dir_).ok());
}

}  // namespace
}  // namespace strata
