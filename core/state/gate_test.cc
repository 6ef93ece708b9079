#include "core/state/gate.h"

#include <gtest/gtest.h>

#include <cmath>

#include "core/jobs/job.h"

namespace strata {
namespace {

double Nan() { return std::nan(""); }

StageResult Stage(const std::string& name, std::vector<double> scores, std::vector<double> auto_scores,
                  double nll, const std::string& scorer = "exact_match") {
  StageResult s;
  s.task = CheckpointTask{name, scorer, "job-" + name, "", "tasks/" + name + "/eval.jsonl", 1};
  s.scores = std::move(scores);
  s.auto_scores = std::move(auto_scores);
  s.routed_scores.assign(s.scores.size(), Nan());
  s.router_accuracy.assign(s.scores.size(), Nan());
  s.reference_nll = nll;
  s.reference_nll_auto = nll;
  return s;
}

ResultsLedger Served() {
  ResultsLedger l;
  l.SetBaseReferenceNll(2.0);
  return l.WithStage(Stage("a", {0.8}, {0.9}, 2.0));
}

TEST(Gate, PassesWhatKeepsItsPromisesAndNamesWhatDoesNot) {
  GateOptions o;
  o.max_forgetting = 0.02;
  const ResultsLedger served = Served();
  // Auto view: 0.9 -> 0.89 is within 0.02 (the merged view's drop does not count when auto exists).
  EXPECT_TRUE(EvaluateGate(o, std::nullopt, served, Stage("b", {0.1, 0.7}, {0.89, 0.7}, 2.0)).publish);
  GateDecision d = EvaluateGate(o, std::nullopt, served, Stage("b", {0.1, 0.7}, {0.2, 0.7}, 2.0));
  EXPECT_FALSE(d.publish);
  ASSERT_EQ(d.reasons.size(), 1u);
  EXPECT_EQ(HoldReasonKind(d.reasons[0]), "forgetting");
  EXPECT_NE(d.reasons[0].find("a score 0.9000 -> 0.2000"), std::string::npos) << d.reasons[0];
  EXPECT_NE(d.reasons[0].find("auto view"), std::string::npos) << d.reasons[0];
  // Without the auto view, the merged one decides.
  d = EvaluateGate(o, std::nullopt, served, Stage("b", {0.5, 0.7}, {Nan(), Nan()}, 2.0));
  ASSERT_FALSE(d.publish);
  EXPECT_NE(d.reasons[0].find("merged view"), std::string::npos) << d.reasons[0];
  // Checks off: everything passes.
  EXPECT_TRUE(EvaluateGate(GateOptions{}, std::nullopt, served, Stage("b", {0, 0}, {0, 0}, 9.0)).publish);
}

TEST(Gate, MinScoreAndReferenceRise) {
  GateOptions o;
  o.min_task_score = 0.5;
  o.max_reference_rise = 0.05;
  const ResultsLedger served = Served();
  GateDecision d = EvaluateGate(o, std::nullopt, served, Stage("b", {0.8, 0.4}, {0.9, 0.4}, 2.2));
  ASSERT_EQ(d.reasons.size(), 2u);
  EXPECT_EQ(HoldReasonKind(d.reasons[0]), "min_task_score");
  EXPECT_NE(d.reasons[0].find("--min_task_score"), std::string::npos) << d.reasons[0];
  EXPECT_EQ(HoldReasonKind(d.reasons[1]), "reference_rise");
  EXPECT_NE(d.reasons[1].find("+10.00%"), std::string::npos) << d.reasons[1];
  // The task's own threshold wins over the server's.
  d = EvaluateGate(o, 0.3, served, Stage("b", {0.8, 0.4}, {0.9, 0.4}, 2.05));
  EXPECT_TRUE(d.publish) << d.reasons[0];
  d = EvaluateGate(o, 0.45, served, Stage("b", {0.8, 0.4}, {0.9, 0.4}, 2.05));
  ASSERT_FALSE(d.publish);
  EXPECT_NE(d.reasons[0].find("its --min-score"), std::string::npos) << d.reasons[0];
}

TEST(Gate, NllScoredTasksForgetWhenTheirNllRises) {
  GateOptions o;
  o.max_forgetting = 0.1;
  ResultsLedger l;
  l = l.WithStage(Stage("lm", {3.0}, {3.0}, Nan(), "nll"));
  EXPECT_TRUE(EvaluateGate(o, std::nullopt, l, Stage("b", {2.5, 0.5}, {2.5, 0.5}, Nan())).publish);
  GateDecision d = EvaluateGate(o, std::nullopt, l, Stage("b", {3.5, 0.5}, {3.5, 0.5}, Nan()));
  ASSERT_FALSE(d.publish);
  EXPECT_NE(d.reasons[0].find("NLL 3.0000 -> 3.5000 (+0.5000"), std::string::npos) << d.reasons[0];
}

TEST(Gate, BadThresholdsAreRefusedNamingTheFlag) {
  GateOptions o;
  o.max_forgetting = -1;
  EXPECT_NE(ValidateGateOptions(o).message().find("--max_forgetting"), std::string::npos);
  o = GateOptions{};
  o.min_task_score = 1.5;
  EXPECT_NE(ValidateGateOptions(o).message().find("--min_task_score"), std::string::npos);
  EXPECT_TRUE(ValidateGateOptions(GateOptions{}).ok());
}

}  // namespace
}  // namespace strata
