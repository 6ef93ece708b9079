// The scrape-time training gauges: present (with the job's figures) only while a job trains.

#include "server/metrics.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "core/jobs/job_store.h"

namespace strata {
namespace {

namespace fs = std::filesystem;

// The value of the single-series gauge `name` in one scrape, or nullopt when it is absent.
std::optional<double> Scrape(ServerMetrics& metrics, const std::string& name) {
  for (const prometheus::MetricFamily& family : metrics.state_collector()->Collect()) {
    if (family.name != name) continue;
    EXPECT_EQ(family.metric.size(), 1u) << name;
    if (family.metric.empty()) return std::nullopt;
    return family.metric[0].gauge.value;
  }
  return std::nullopt;
}

TEST(ServerMetrics, TrainingGaugesAreAbsentWhileNoJobTrains) {
  const fs::path dir = fs::temp_directory_path() / ("strata-metrics-test-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  auto store = JobStore::Open(dir.string());
  ASSERT_TRUE(store.ok()) << store.status();
  ServerMetrics metrics(BuildFacts{});
  metrics.SetSources(store->get(), /*engine=*/nullptr);

  Example example;
  example.prompt = "a";
  example.completion = " b";
  TaskSpecification spec;
  spec.name = "t1";
  auto job = (*store)->Create(spec, {example}, {example});
  ASSERT_TRUE(job.ok()) << job.status();
  // Queued: no training figures yet (the queue length is there).
  EXPECT_EQ(Scrape(metrics, "strata_queue_length"), 1.0);
  EXPECT_FALSE(Scrape(metrics, "strata_training_loss").has_value());
  EXPECT_FALSE(Scrape(metrics, "strata_training_tokens_per_second").has_value());

  // Training: the latest step's figures.
  job->state = JobState::kTraining;
  ASSERT_TRUE((*store)->Update(*job).ok());
  JobProgress progress;
  progress.step = 3;
  progress.total_steps = 10;
  progress.loss = 1.25;
  progress.tokens_per_second = 480;
  (*store)->SetProgress(job->id, progress);
  EXPECT_EQ(Scrape(metrics, "strata_training_loss"), 1.25);
  EXPECT_EQ(Scrape(metrics, "strata_training_tokens_per_second"), 480.0);

  // Evaluating, then finished: the job keeps its progress, the gauges go away.
  for (JobState after : {JobState::kEvaluating, JobState::kSucceeded}) {
    auto current = (*store)->Get(job->id);
    ASSERT_TRUE(current.ok());
    EXPECT_EQ(current->progress.step, 3);
    current->state = after;
    ASSERT_TRUE((*store)->Update(*current).ok());
    EXPECT_FALSE(Scrape(metrics, "strata_training_loss").has_value()) << JobStateName(after);
    EXPECT_FALSE(Scrape(metrics, "strata_training_tokens_per_second").has_value()) << JobStateName(after);
  }

  // A second job training shows its own figures, not the first job's.
  spec.name = "t2";
  auto second = (*store)->Create(spec, {example}, {example});
  ASSERT_TRUE(second.ok()) << second.status();
  second->state = JobState::kTraining;
  ASSERT_TRUE((*store)->Update(*second).ok());
  EXPECT_FALSE(Scrape(metrics, "strata_training_loss").has_value());  // no step yet
  progress.step = 1;
  progress.loss = 2.5;
  progress.tokens_per_second = 100;
  (*store)->SetProgress(second->id, progress);
  EXPECT_EQ(Scrape(metrics, "strata_training_loss"), 2.5);
  EXPECT_EQ(Scrape(metrics, "strata_training_tokens_per_second"), 100.0);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace strata
