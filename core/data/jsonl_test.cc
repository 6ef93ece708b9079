#include "core/data/jsonl.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/data/fake_tokenizer.h"

namespace strata {
namespace {

using ::testing::HasSubstr;
using ::testing::SizeIs;

const std::string kShared = STRATA_SHARED_DIR;
constexpr char kGood[] = R"({"prompt": "p", "completion": " c"})";

struct Outcome {
  absl::Status status;
  std::vector<Example> examples;
  std::vector<LineError> errors;
  ValidationSummary summary;
};

Outcome Finish(JsonlValidator& v) {
  Outcome r;
  r.status = v.Finish();
  r.examples = v.TakeExamples();
  r.errors = v.errors();
  r.summary = v.summary();
  return r;
}

// Validates `input` in one chunk.
Outcome Validate(std::string_view input, ValidationOptions options = {}) {
  JsonlValidator v("train.jsonl", options);
  v.AddChunk(input);
  return Finish(v);
}

// Validates `input` cut into chunks at the given offsets.
Outcome ValidateSplit(std::string_view input, const std::vector<size_t>& cuts,
                      ValidationOptions options = {}) {
  JsonlValidator v("train.jsonl", options);
  size_t prev = 0;
  for (size_t cut : cuts) {
    v.AddChunk(input.substr(prev, cut - prev));
    prev = cut;
  }
  v.AddChunk(input.substr(prev));
  return Finish(v);
}

TEST(JsonlTest, AcceptsCompletionChoiceAndTextFiles) {
  Outcome c = Validate(
      "{\"prompt\": \"The capital of France is\", \"completion\": \" Paris\"}\n"
      "{\"prompt\": \"The capital of Peru is\", \"completion\": \" Lima\"}\n");
  ASSERT_TRUE(c.status.ok()) << c.status;
  ASSERT_THAT(c.examples, SizeIs(2));
  EXPECT_EQ(c.examples[1], MakeCompletionExample("The capital of Peru is", " Lima"));
  EXPECT_EQ(c.summary.kind, ExampleKind::kCompletion);
  EXPECT_EQ(c.summary.lines, 2);
  EXPECT_EQ(c.summary.accepted, 2);
  EXPECT_EQ(c.summary.bad_lines, 0);

  Outcome ch = Validate(
      R"({"prompt": "Word: chat\nLanguage:", "completion": " french", "choices": [" english", " french"]})");
  ASSERT_TRUE(ch.status.ok()) << ch.status;
  EXPECT_EQ(ch.examples.at(0),
            MakeChoiceExample("Word: chat\nLanguage:", " french", {" english", " french"}));
  EXPECT_EQ(ch.summary.kind, ExampleKind::kChoice);

  Outcome t = Validate("{\"text\": \"Once upon a time.\"}\n{\"text\": \"The end.\"}");
  ASSERT_TRUE(t.status.ok()) << t.status;
  EXPECT_EQ(t.examples.at(1), MakeTextExample("The end."));
  EXPECT_EQ(t.summary.kind, ExampleKind::kText);
}

// One case per rejection reason: the line, the reason, a substring of the message.
struct BadLineCase {
  std::string line;
  LineErrorReason reason;
  std::string message;
};

void ExpectRejected(const BadLineCase& c, const ValidationOptions& options = {},
                    const std::string& first_line = kGood) {
  SCOPED_TRACE(c.line);
  // The bad line is line 2, after a valid one, so the line number is checked too.
  Outcome r = Validate(absl::StrCat(first_line, "\n", c.line, "\n"), options);
  ASSERT_FALSE(r.status.ok());
  EXPECT_EQ(r.status.code(), absl::StatusCode::kInvalidArgument);
  ASSERT_THAT(r.errors, SizeIs(1));
  EXPECT_EQ(r.errors[0].line, 2);
  EXPECT_EQ(LineErrorReasonName(r.errors[0].reason), LineErrorReasonName(c.reason));
  EXPECT_THAT(r.errors[0].message, HasSubstr(c.message));
  EXPECT_THAT(std::string(r.status.message()), HasSubstr("train.jsonl:2: " + r.errors[0].message));
  EXPECT_TRUE(r.examples.empty()) << "strict mode accepts nothing";
  EXPECT_EQ(r.summary.bad_lines, 1);
}

TEST(JsonlTest, RejectsNotJson) {
  ExpectRejected({R"({"prompt": "p", "completion": })", LineErrorReason::kNotJson, "not valid JSON: column"});
  ExpectRejected(
      {R"({"prompt": "p", "completion": " c"} trailing)", LineErrorReason::kNotJson, "not valid JSON"});
  ExpectRejected({"{'prompt': 'p'}", LineErrorReason::kNotJson, "not valid JSON"});
  ExpectRejected(
      {"{\"prompt\": \"a\tb\", \"completion\": \" c\"}", LineErrorReason::kNotJson, "not valid JSON"});
}

// Found by fuzz_jsonl: nlohmann throws out_of_range (not parse_error) for a number beyond a double,
// which escaped the validator and terminated the server on a SubmitTask.
TEST(JsonlTest, RejectsNumberOverflowWithoutThrowing) {
  ExpectRejected({R"({"prompt": "p", "completion": 1e999})", LineErrorReason::kNotJson,
                  "not valid JSON: number overflow parsing '1e999'"});
  ExpectRejected(
      {R"({"prompt": "p", "completion": " c", "x": -1e400})", LineErrorReason::kNotJson, "number overflow"});
}

TEST(JsonlTest, RejectsNonObjects) {
  ExpectRejected({R"(["p", " c"])", LineErrorReason::kNotObject, "expected a JSON object, got array"});
  ExpectRejected({R"("p")", LineErrorReason::kNotObject, "expected a JSON object, got string"});
  ExpectRejected({"42", LineErrorReason::kNotObject, "expected a JSON object, got number"});
  ExpectRejected({"null", LineErrorReason::kNotObject, "got null"});
}

TEST(JsonlTest, RejectsUnknownFieldsUnlessAllowed) {
  const std::string line = R"({"prompt": "p", "completion": " c", "label": "x"})";
  ExpectRejected({line, LineErrorReason::kUnknownField, "unknown field \"label\""});
  ValidationOptions allow;
  allow.allow_unknown_fields = true;
  Outcome r = Validate(line, allow);
  ASSERT_TRUE(r.status.ok()) << r.status;
  EXPECT_EQ(r.examples.at(0), MakeCompletionExample("p", " c"));
}

TEST(JsonlTest, RejectsTextMixedWithPromptInOneLine) {
  ExpectRejected({R"({"text": "t", "prompt": "p", "completion": " c"})", LineErrorReason::kAmbiguousKind,
                  "both \"text\" and \"prompt\"/\"completion\""});
}

TEST(JsonlTest, RejectsMissingFields) {
  ExpectRejected({R"({"prompt": "p"})", LineErrorReason::kMissingField, "missing field \"completion\""});
  ExpectRejected({R"({"completion": " c"})", LineErrorReason::kMissingField, "missing field \"prompt\""});
  // Presence is checked before types.
  ExpectRejected({R"({"prompt": 3})", LineErrorReason::kMissingField, "missing field \"completion\""});
  ExpectRejected({"{}", LineErrorReason::kMissingField, "expected \"prompt\" and \"completion\""});
}

TEST(JsonlTest, RejectsWrongTypes) {
  ExpectRejected({R"({"prompt": "p", "completion": 17})", LineErrorReason::kWrongType,
                  "field \"completion\": expected a string, got number"});
  ExpectRejected({R"({"prompt": ["p"], "completion": " c"})", LineErrorReason::kWrongType,
                  "field \"prompt\": expected a string, got array"});
  ExpectRejected({R"({"prompt": "p", "completion": null})", LineErrorReason::kWrongType, "got null"});
  ExpectRejected(
      {R"({"text": true})", LineErrorReason::kWrongType, "field \"text\": expected a string, got boolean"});
  ExpectRejected({R"({"prompt": "p", "completion": " a", "choices": " a"})", LineErrorReason::kWrongType,
                  "field \"choices\": expected an array of strings, got string"});
  ExpectRejected({R"({"prompt": "p", "completion": " a", "choices": [" a", 2]})", LineErrorReason::kWrongType,
                  "field \"choices\"[1]: expected a string, got number"});
}

TEST(JsonlTest, RejectsEmptyFields) {
  ExpectRejected({R"({"prompt": "p", "completion": ""})", LineErrorReason::kEmptyField,
                  "field \"completion\": must not be empty"});
  ExpectRejected({R"({"prompt": "", "completion": " c"})", LineErrorReason::kEmptyField,
                  "field \"prompt\": must not be empty"});
  ExpectRejected({R"({"text": ""})", LineErrorReason::kEmptyField, "field \"text\": must not be empty"}, {},
                 R"({"text": "t"})");
}

TEST(JsonlTest, RejectsBadChoices) {
  const std::string first = R"({"prompt": "p", "completion": " a", "choices": [" a", " b"]})";
  ExpectRejected({R"({"prompt": "p", "completion": " a", "choices": [" a"]})", LineErrorReason::kBadChoices,
                  "needs at least 2 choices, got 1"},
                 {}, first);
  ExpectRejected({R"({"prompt": "p", "completion": " a", "choices": [" a", " a"]})",
                  LineErrorReason::kBadChoices, "field \"choices\"[1]: duplicate choice \" a\""},
                 {}, first);
  ExpectRejected({R"({"prompt": "p", "completion": " a", "choices": [" a", ""]})",
                  LineErrorReason::kBadChoices, "field \"choices\"[1]: empty choice"},
                 {}, first);
}

TEST(JsonlTest, RejectsCompletionNotAmongChoices) {
  const std::string first = R"({"prompt": "p", "completion": " a", "choices": [" a", " b"]})";
  ExpectRejected(
      {R"({"prompt": "p", "completion": "a", "choices": [" a", " b"]})",
       LineErrorReason::kCompletionNotInChoices, "field \"completion\": \"a\" is not one of the choices"},
      {}, first);
}

TEST(JsonlTest, RejectsInvalidUtf8) {
  ExpectRejected({"{\"prompt\": \"caf\xE9\", \"completion\": \" c\"}", LineErrorReason::kInvalidUtf8,
                  "field \"prompt\": invalid UTF-8 at column 16"});
  ExpectRejected({"{\"prompt\": \"\xC0\xAF\", \"completion\": \" c\"}", LineErrorReason::kInvalidUtf8,
                  "invalid UTF-8"});  // overlong '/'
  ExpectRejected({"{\"prompt\": \"\xED\xA0\x80\", \"completion\": \" c\"}", LineErrorReason::kInvalidUtf8,
                  "invalid UTF-8"});  // UTF-16 surrogate
  ExpectRejected({"{\"prompt\": \"\xF4\x90\x80\x80\", \"completion\": \" c\"}", LineErrorReason::kInvalidUtf8,
                  "invalid UTF-8"});  // > U+10FFFF
  ExpectRejected({"{\"prompt\": \"p\", \"completion\": \" \xE2\x82\"}", LineErrorReason::kInvalidUtf8,
                  "field \"completion\": invalid UTF-8"});  // truncated sequence
  ExpectRejected({"{\"prompt\": \"p\\\"\", \"completion\": \" a\", \"choices\": [\" a\", \"\xFF\"]}",
                  LineErrorReason::kInvalidUtf8,
                  "field \"choices\": invalid UTF-8"});  // after an escaped quote
  ExpectRejected({"{\"pro\xFFmpt\": \"p\", \"completion\": \" c\"}", LineErrorReason::kInvalidUtf8,
                  "invalid UTF-8 at column 6"});  // in a field name: no field to name
}

TEST(JsonlTest, RejectsMixedKindsWithinAFile) {
  ExpectRejected({R"({"text": "t"})", LineErrorReason::kMixedKinds,
                  "example kind \"text\" differs from the file's kind \"completion\" (set by line 1)"});
  ExpectRejected({R"({"prompt": "p", "completion": " a", "choices": [" a", " b"]})",
                  LineErrorReason::kMixedKinds, "example kind \"choice\" differs"});
}

TEST(JsonlTest, RejectsOverTokenLimit) {
  testing::FakeTokenizer tok;  // BOS + one token per byte
  ValidationOptions options;
  options.tokenizer = &tok;
  options.max_tokens = 4;  // kGood = BOS 'p' ' ' 'c' = 4 tokens: fits
  ExpectRejected({R"({"prompt": "pp", "completion": " cc"})", LineErrorReason::kTooManyTokens,
                  "example has 6 tokens, over the limit of 4"},
                 options);
  // Choices: the longest choice counts.
  ExpectRejected(
      {R"({"prompt": "p", "completion": " a", "choices": [" a", " bbbb"]})", LineErrorReason::kTooManyTokens,
       "example has 7 tokens, over the limit of 4 (prompt + longest choice)"},
      options, R"({"prompt": "p", "completion": " a", "choices": [" a", " b"]})");
}

TEST(JsonlTest, TokenLimitWithoutTokenizerIsAConfigurationError) {
  ValidationOptions options;
  options.max_tokens = 10;
  JsonlValidator v("train.jsonl", options);
  EXPECT_EQ(v.AddLine(kGood).code(), absl::StatusCode::kInvalidArgument);
  absl::Status s = v.Finish();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("max_tokens"));
}

TEST(JsonlTest, RejectsOverlongLinesWithoutBufferingThem) {
  ValidationOptions options;
  options.max_line_bytes = 40;
  const std::string long_line = R"({"prompt": "a prompt that is far too long", "completion": " c"})";
  ExpectRejected({long_line, LineErrorReason::kLineTooLong, "over the limit of 40"}, options);
  // Across many small chunks, with a valid line after it.
  const std::string input = absl::StrCat(kGood, "\n", long_line, "\n", kGood, "\n");
  std::vector<size_t> cuts;
  for (size_t i = 1; i < input.size(); i += 3) cuts.push_back(i);
  options.skip_bad_lines = true;
  Outcome r = ValidateSplit(input, cuts, options);
  ASSERT_TRUE(r.status.ok()) << r.status;
  EXPECT_EQ(r.summary.accepted, 2);
  ASSERT_THAT(r.errors, SizeIs(1));
  EXPECT_EQ(r.errors[0].line, 2);
  EXPECT_EQ(r.errors[0].message, absl::StrCat("line is ", long_line.size(), " bytes, over the limit of 40"));
}

TEST(JsonlTest, ReportsEveryBadLineWithItsNumber) {
  const std::string input = absl::StrCat(kGood, "\n",                                  // 1
                                         "\n",                                         // 2 blank
                                         R"({"prompt": "p", "completion": 1})", "\n",  // 3
                                         kGood, "\n",                                  // 4
                                         "not json\n",                                 // 5
                                         R"({"prompt": "p"})", "\n");                  // 6
  Outcome r = Validate(input);
  ASSERT_FALSE(r.status.ok());
  ASSERT_THAT(r.errors, SizeIs(3));
  EXPECT_EQ(r.errors[0].line, 3);
  EXPECT_EQ(r.errors[0].field, "completion");
  EXPECT_EQ(r.errors[1].line, 5);
  EXPECT_EQ(r.errors[2].line, 6);
  EXPECT_EQ(r.summary.lines, 6);
  EXPECT_EQ(r.summary.blank_lines, 1);
  EXPECT_EQ(r.summary.accepted, 2);
  EXPECT_EQ(r.summary.bad_lines, 3);
  const std::string msg(r.status.message());
  EXPECT_THAT(msg, HasSubstr("train.jsonl: 3 of 6 lines are invalid; nothing was accepted"));
  EXPECT_THAT(msg, HasSubstr("train.jsonl:3: field \"completion\": expected a string, got number\n"));
  EXPECT_THAT(msg, HasSubstr("train.jsonl:5: not valid JSON"));
  EXPECT_THAT(msg, HasSubstr("train.jsonl:6: missing field \"completion\""));
  EXPECT_TRUE(r.examples.empty());
}

TEST(JsonlTest, CapsTheErrorListInTheMessage) {
  std::string input;
  for (int i = 0; i < 50; ++i) absl::StrAppend(&input, "bad\n");
  ValidationOptions options;
  options.max_reported_errors = 20;
  options.max_stored_errors = 30;
  Outcome r = Validate(input, options);
  ASSERT_FALSE(r.status.ok());
  EXPECT_EQ(r.summary.bad_lines, 50);
  EXPECT_THAT(r.errors, SizeIs(30));  // stored
  const std::string msg(r.status.message());
  EXPECT_THAT(msg, HasSubstr("train.jsonl:20: not valid JSON"));
  EXPECT_THAT(msg, ::testing::Not(HasSubstr("train.jsonl:21:")));
  EXPECT_THAT(msg, HasSubstr("\n... and 30 more"));
}

TEST(JsonlTest, SkipBadLinesAcceptsTheRestAndCounts) {
  ValidationOptions options;
  options.skip_bad_lines = true;
  Outcome r =
      Validate(absl::StrCat(kGood, "\nbad\n", R"({"prompt": "q", "completion": " d"})", "\n{}\n"), options);
  ASSERT_TRUE(r.status.ok()) << r.status;
  ASSERT_THAT(r.examples, SizeIs(2));
  EXPECT_EQ(r.examples[1], MakeCompletionExample("q", " d"));
  EXPECT_EQ(r.summary.bad_lines, 2);
  EXPECT_THAT(r.errors, SizeIs(2));
}

TEST(JsonlTest, NoExamplesIsAnError) {
  Outcome empty = Validate("");
  EXPECT_EQ(empty.status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(empty.status.message()), HasSubstr("train.jsonl: no examples"));
  Outcome blank = Validate("\n  \n\t\r\n");
  EXPECT_FALSE(blank.status.ok());
  EXPECT_EQ(blank.summary.blank_lines, 3);
  ValidationOptions skip;
  skip.skip_bad_lines = true;
  Outcome all_bad = Validate("x\ny\n", skip);
  EXPECT_FALSE(all_bad.status.ok());
  EXPECT_THAT(std::string(all_bad.status.message()), HasSubstr("no examples (2 lines, 0 blank, 2 invalid)"));
  EXPECT_THAT(std::string(all_bad.status.message()), HasSubstr("train.jsonl:2: not valid JSON"));
}

TEST(JsonlTest, HandlesCrlfBlankLinesBomAndMissingFinalNewline) {
  const std::string input = absl::StrCat("\xEF\xBB\xBF", kGood, "\r\n", "\r\n", "   \r\n",
                                         R"({"prompt": "p2", "completion": " c2"})");
  Outcome r = Validate(input);
  ASSERT_TRUE(r.status.ok()) << r.status;
  ASSERT_THAT(r.examples, SizeIs(2));
  EXPECT_EQ(r.examples[0], MakeCompletionExample("p", " c"));
  EXPECT_EQ(r.examples[1], MakeCompletionExample("p2", " c2"));
  EXPECT_EQ(r.summary.lines, 4);
  EXPECT_EQ(r.summary.blank_lines, 2);
}

TEST(JsonlTest, EverySplitPointGivesTheSameResult) {
  // CRLF, a multi-byte character, a blank line, a bad line and no final newline.
  const std::string input = absl::StrCat(
      R"({"prompt": "The capital of Åland Islands is", "completion": " Mariehamn"})", "\r\n\n",
      R"({"prompt": "p", "completion": 5})", "\n", R"({"prompt": "東京は", "completion": " 首都"})");
  ValidationOptions options;
  options.skip_bad_lines = true;
  const Outcome whole = Validate(input, options);
  ASSERT_TRUE(whole.status.ok()) << whole.status;
  ASSERT_THAT(whole.examples, SizeIs(2));
  ASSERT_THAT(whole.errors, SizeIs(1));
  EXPECT_EQ(whole.errors[0].line, 3);
  for (size_t cut = 0; cut <= input.size(); ++cut) {
    SCOPED_TRACE(cut);
    Outcome r = ValidateSplit(input, {cut}, options);
    ASSERT_TRUE(r.status.ok()) << r.status;
    EXPECT_EQ(r.examples, whole.examples);
    ASSERT_THAT(r.errors, SizeIs(1));
    EXPECT_EQ(r.errors[0].line, 3);
    EXPECT_EQ(r.errors[0].message, whole.errors[0].message);
    EXPECT_EQ(r.summary.lines, 4);
    EXPECT_EQ(r.summary.blank_lines, 1);
  }
  // One byte at a time.
  std::vector<size_t> cuts;
  for (size_t i = 1; i < input.size(); ++i) cuts.push_back(i);
  Outcome bytes = ValidateSplit(input, cuts, options);
  EXPECT_EQ(bytes.examples, whole.examples);
  EXPECT_EQ(bytes.summary.lines, 4);
}

TEST(JsonlTest, ExamplesCanBeDrainedWhileStreaming) {
  JsonlValidator v("upload", {});
  v.AddChunk(absl::StrCat(kGood, "\n", kGood));
  EXPECT_THAT(v.TakeExamples(), SizeIs(1));  // the second line is still pending
  v.AddChunk("\n");
  EXPECT_THAT(v.TakeExamples(), SizeIs(1));
  EXPECT_TRUE(v.Finish().ok());
  EXPECT_EQ(v.summary().accepted, 2);
  EXPECT_TRUE(v.TakeExamples().empty());
}

TEST(JsonlTest, AddLineReturnsThatLinesStatus) {
  JsonlValidator v("upload", {});
  EXPECT_TRUE(v.AddLine(kGood).ok());
  EXPECT_TRUE(v.AddLine("").ok());  // blank: skipped
  absl::Status s = v.AddLine(R"({"prompt": "p", "completion": 1})");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "upload:3: field \"completion\": expected a string, got number");
  EXPECT_TRUE(v.AddLine(std::string(kGood) + "\r\n").ok());
  EXPECT_FALSE(v.Finish().ok());
  EXPECT_EQ(v.AddLine(kGood).code(), absl::StatusCode::kFailedPrecondition);
}

TEST(JsonlTest, FinishIsIdempotent) {
  JsonlValidator v("x", {});
  v.AddChunk(kGood);
  EXPECT_TRUE(v.Finish().ok());
  EXPECT_TRUE(v.Finish().ok());
  EXPECT_EQ(v.summary().lines, 1);
}

TEST(JsonlTest, ParseExampleLine) {
  auto ok = ParseExampleLine(std::string(kGood) + "\r\n");
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(*ok, MakeCompletionExample("p", " c"));
  auto bad = ParseExampleLine(R"({"prompt": "p", "completion": 1})");
  EXPECT_EQ(bad.status().message(), "field \"completion\": expected a string, got number");
}

TEST(JsonlTest, ParsesRealFilesAndNamesMissingOnes) {
  auto langid = ParseJsonlFile(kShared + "/data/cl-small/langid/train.jsonl");
  ASSERT_TRUE(langid.ok()) << langid.status();
  EXPECT_THAT(langid->examples, SizeIs(2400));
  EXPECT_EQ(langid->summary.kind, ExampleKind::kChoice);
  EXPECT_EQ(langid->examples[0].prompt, "Word: nebeligstem\nLanguage:");
  EXPECT_EQ(langid->examples[0].completion, " german");

  auto missing = ParseJsonlFile("/nonexistent/train.jsonl");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("/nonexistent/train.jsonl"));
}

TEST(JsonlTest, FileErrorsNameThePath) {
  const std::string path = ::testing::TempDir() + "/strata_jsonl_test_bad.jsonl";
  {
    std::ofstream out(path, std::ios::binary);
    out << kGood << "\n"
        << R"({"prompt": "p", "completion": 3})"
        << "\n";
  }
  auto r = ParseJsonlFile(path);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()),
              HasSubstr(path + ":2: field \"completion\": expected a string, got number"));
  std::remove(path.c_str());
}

}  // namespace
}  // namespace strata
