#include "core/eval/metrics.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

namespace strata {
namespace {

using ::testing::HasSubstr;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kTol = 1e-12;

// Rows = after stage 1, 2, 3; columns = task 1, 2, 3 (1-based in the comments, as in ALGORITHMS.md).
// Task 1 improves after stage 2 (0.8 -> 0.85) before dropping to 0.5, so forgetting != -BWT.
const std::vector<std::vector<double>> kMatrix = {
    {0.80, 0.30, 0.20},
    {0.85, 0.90, 0.40},
    {0.50, 0.70, 0.95},
};
const std::vector<double> kBase = {0.10, 0.25, 0.30};

TEST(ClMetricsTest, HandComputed3x3) {
  auto r = ComputeClReport(kMatrix, kBase);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->num_tasks(), 3);
  // AA = (a[3][1] + a[3][2] + a[3][3]) / 3 = (0.5 + 0.7 + 0.95) / 3 = 2.15 / 3 = 0.716666...
  ASSERT_TRUE(r->aa.has_value());
  EXPECT_NEAR(*r->aa, 2.15 / 3.0, kTol);
  // BWT = ((a[3][1] − a[1][1]) + (a[3][2] − a[2][2])) / 2 = ((0.5 − 0.8) + (0.7 − 0.9)) / 2 = −0.25
  ASSERT_TRUE(r->bwt.has_value());
  EXPECT_NEAR(*r->bwt, -0.25, kTol);
  // FWT = ((a[1][2] − b_2) + (a[2][3] − b_3)) / 2 = ((0.3 − 0.25) + (0.4 − 0.3)) / 2 = 0.075
  ASSERT_TRUE(r->fwt.has_value());
  EXPECT_NEAR(*r->fwt, 0.075, kTol);
  // F_1 = max(a[1][1], a[2][1]) − a[3][1] = max(0.8, 0.85) − 0.5 = 0.35
  // F_2 = max(a[2][2]) − a[3][2] = 0.9 − 0.7 = 0.2
  // forgetting = (0.35 + 0.2) / 2 = 0.275
  ASSERT_EQ(r->task_forgetting.size(), 3u);
  EXPECT_NEAR(r->task_forgetting[0].value(), 0.35, kTol);
  EXPECT_NEAR(r->task_forgetting[1].value(), 0.20, kTol);
  EXPECT_FALSE(r->task_forgetting[2].has_value());  // the last task has no later stage
  ASSERT_TRUE(r->forgetting.has_value());
  EXPECT_NEAR(*r->forgetting, 0.275, kTol);
}

TEST(ClMetricsTest, SingleTaskHasOnlyAa) {
  auto r = ComputeClReport({{0.7}}, {0.2});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_NEAR(r->aa.value(), 0.7, kTol);
  EXPECT_FALSE(r->bwt.has_value());
  EXPECT_FALSE(r->fwt.has_value());
  EXPECT_FALSE(r->forgetting.has_value());
  ASSERT_EQ(r->task_forgetting.size(), 1u);
  EXPECT_FALSE(r->task_forgetting[0].has_value());
}

TEST(ClMetricsTest, TwoTasksWithoutBase) {
  // a = [[0.9, 0.1], [0.6, 0.8]]: AA = 0.7, BWT = 0.6 − 0.9 = −0.3, F_1 = 0.9 − 0.6 = 0.3; no base -> no FWT.
  auto r = ComputeClReport({{0.9, 0.1}, {0.6, 0.8}});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_NEAR(r->aa.value(), 0.7, kTol);
  EXPECT_NEAR(r->bwt.value(), -0.3, kTol);
  EXPECT_NEAR(r->forgetting.value(), 0.3, kTol);
  EXPECT_FALSE(r->fwt.has_value());
  // Negative forgetting (backward improvement) is kept as is, not clamped.
  auto better = ComputeClReport({{0.5, 0.1}, {0.6, 0.8}});
  ASSERT_TRUE(better.ok());
  EXPECT_NEAR(better->forgetting.value(), -0.1, kTol);
  EXPECT_NEAR(better->bwt.value(), 0.1, kTol);
}

TEST(ClMetricsTest, UnmeasuredEntriesOnlyRemoveTheMetricsThatNeedThem) {
  auto m = kMatrix;
  m[0][1] = kNaN;  // task 2 not evaluated after stage 1: FWT needs it
  m[0][2] = kNaN;  // not needed by anything but FWT either
  auto r = ComputeClReport(m, kBase);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(r->fwt.has_value());
  EXPECT_NEAR(r->aa.value(), 2.15 / 3.0, kTol);
  EXPECT_NEAR(r->bwt.value(), -0.25, kTol);
  EXPECT_NEAR(r->forgetting.value(), 0.275, kTol);

  auto m2 = kMatrix;
  m2[1][0] = kNaN;  // F_1 needs a[2][1]
  auto r2 = ComputeClReport(m2, kBase);
  ASSERT_TRUE(r2.ok());
  EXPECT_FALSE(r2->task_forgetting[0].has_value());
  EXPECT_TRUE(r2->task_forgetting[1].has_value());
  EXPECT_FALSE(r2->forgetting.has_value());
  EXPECT_NEAR(r2->bwt.value(), -0.25, kTol);  // BWT does not use a[2][1]
}

TEST(ClMetricsTest, RejectsMalformedInput) {
  EXPECT_EQ(ComputeClReport({}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(ComputeClReport({{0.1, 0.2}, {0.3}}).status().message()),
              HasSubstr("row 1 has 1 entries, expected 2"));
  EXPECT_THAT(std::string(ComputeClReport(kMatrix, {0.1}).status().message()),
              HasSubstr("base scores: 1 entries, expected 3"));
  EXPECT_FALSE(ComputeClReport({{std::numeric_limits<double>::infinity()}}).ok());
}

TEST(ClMetricsTest, JsonShape) {
  auto r = ComputeClReport(kMatrix, kBase);
  ASSERT_TRUE(r.ok());
  nlohmann::json j = ClReportToJson(*r);
  std::vector<std::string> keys;
  for (const auto& item : j.items()) keys.push_back(item.key());
  EXPECT_THAT(keys, ::testing::UnorderedElementsAre("matrix", "base", "aa", "bwt", "fwt", "forgetting"));
  EXPECT_EQ(j["matrix"].size(), 3u);
  EXPECT_DOUBLE_EQ(j["matrix"][1][0].get<double>(), 0.85);
  EXPECT_DOUBLE_EQ(j["base"][2].get<double>(), 0.30);
  EXPECT_NEAR(j["bwt"].get<double>(), -0.25, kTol);
  EXPECT_NEAR(j["fwt"].get<double>(), 0.075, kTol);

  auto back = ClReportFromJson(nlohmann::json::parse(j.dump()));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->matrix, kMatrix);
  EXPECT_NEAR(back->forgetting.value(), 0.275, kTol);
}

TEST(ClMetricsTest, JsonNullsForAbsentValues) {
  auto r = ComputeClReport({{0.7}});
  ASSERT_TRUE(r.ok());
  nlohmann::json j = ClReportToJson(*r);
  EXPECT_EQ(j.dump(), R"({"aa":0.7,"base":[],"bwt":null,"forgetting":null,"fwt":null,"matrix":[[0.7]]})");
  auto nan = ComputeClReport({{0.5, kNaN}, {0.4, 0.6}}, {0.1, 0.2});
  ASSERT_TRUE(nan.ok());
  nlohmann::json jn = ClReportToJson(*nan);
  EXPECT_TRUE(jn["matrix"][0][1].is_null());
  EXPECT_TRUE(jn["fwt"].is_null());
  auto back = ClReportFromJson(jn);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(std::isnan(back->matrix[0][1]));
  EXPECT_THAT(std::string(ClReportFromJson(nlohmann::json{{"matrix", {{"x"}}}}).status().message()),
              HasSubstr("\"matrix\"[0][0]: expected a number or null, got string"));
}

TEST(NormalizeAnswerTest, HandMadeCases) {
  EXPECT_EQ(NormalizeAnswer("Paris"), "paris");
  EXPECT_EQ(NormalizeAnswer(" Paris"), "paris");
  EXPECT_EQ(NormalizeAnswer("  The Valley!\n"), "the valley");
  EXPECT_EQ(NormalizeAnswer("Pago\t\tPago"), "pago pago");
  EXPECT_EQ(NormalizeAnswer("Saint-Denis"), "saintdenis");
  EXPECT_EQ(NormalizeAnswer("U.S.A."), "usa");
  EXPECT_EQ(NormalizeAnswer("a - b"), "a b");  // deleting punctuation never leaves a double space
  EXPECT_EQ(NormalizeAnswer("!?."), "");
  EXPECT_EQ(NormalizeAnswer(""), "");
  EXPECT_EQ(NormalizeAnswer("AFG"), "afg");
  // Every ASCII punctuation character goes; digits and letters stay.
  EXPECT_EQ(NormalizeAnswer("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~x1"), "x1");
  // Non-ASCII is untouched: letters are not lower-cased, "«»" and NBSP are not punctuation/space.
  EXPECT_EQ(NormalizeAnswer("Åland"), "Åland");
  EXPECT_EQ(NormalizeAnswer("ÅLAND"), "Åland");
  EXPECT_EQ(NormalizeAnswer("«Kyiv»"), "«kyiv»");
  EXPECT_EQ(NormalizeAnswer("a\xC2\xA0"
                            "b"),
            "a\xC2\xA0"
            "b");
}

TEST(NormalizeAnswerTest, ExactMatch) {
  EXPECT_TRUE(ExactMatch(" Kabul", "Kabul"));
  EXPECT_TRUE(ExactMatch("kabul.", " Kabul"));
  EXPECT_TRUE(ExactMatch("Andorra  la Vella", " Andorra la Vella"));
  EXPECT_FALSE(ExactMatch("Kabul Afghanistan", "Kabul"));
  EXPECT_FALSE(ExactMatch("", "Kabul"));
}

}  // namespace
}  // namespace strata
