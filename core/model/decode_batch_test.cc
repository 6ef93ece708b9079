#include "core/model/decode_batch.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/model/model.h"
#include "core/model/test_adapters.h"
#include "core/model/tokenizer.h"

namespace strata {
namespace {

const std::string kStories = std::string(STRATA_SHARED_DIR) + "/models/stories260K";

std::shared_ptr<const CausalLM> Stories() {
  auto m = CausalLM::Load(kStories);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? std::shared_ptr<const CausalLM>(std::move(m).value()) : nullptr;
}

// A "task route": the weights with a side path on every linear layer.
std::shared_ptr<const CausalLM> Route(const CausalLM& weights, uint64_t seed, bool expose = true) {
  auto copy = weights.ShallowCopy();
  uint64_t i = 0;
  for (const std::string& name : copy->LinearNames()) {
    LinearLayer* layer = copy->FindLinear(name);
    // An odd seed leaves every other layer without a side path (a route need not adapt every layer).
    if (i++ % 2 == 1 && seed % 2 == 1) continue;
    const int64_t rank = 2 + static_cast<int64_t>(seed % 3);
    layer->adapter =
        std::make_shared<FixedLowRank>(layer->weight.size(1), layer->weight.size(0), rank, seed + i, expose);
  }
  return std::shared_ptr<const CausalLM>(std::move(copy));
}

struct Outcome {
  std::vector<int32_t> ids;
  std::string text;
  std::string streamed;
  std::string finish_reason;
  bool done = false;
};

DecodeRow MakeRow(const std::vector<int32_t>& prompt, const SamplingOptions& o, Outcome* out,
                  std::shared_ptr<const CausalLM> route = nullptr) {
  DecodeRow row;
  row.prompt = prompt;
  row.sampling = o;
  row.route_model = std::move(route);
  row.on_token = [out](int32_t, const std::string& delta, const TokenLogprob*) {
    out->streamed += delta;
    return true;
  };
  row.on_done = [out](absl::StatusOr<GenerationResult> r) {
    ASSERT_TRUE(r.ok()) << r.status();
    out->ids = r->ids;
    out->text = r->text;
    out->finish_reason = r->finish_reason;
    out->done = true;
  };
  return row;
}

class DecodeBatchTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = Stories();
    ASSERT_NE(model_, nullptr);
    auto tok = Tokenizer::FromDirectory(kStories);
    ASSERT_TRUE(tok.ok()) << tok.status();
    tok_ = std::shared_ptr<const Tokenizer>(std::move(tok).value());
    prompts_ = {tok_->Encode("Once upon a time", true),
                tok_->Encode("Tom and his dog went to the park. They", true), tok_->Encode("The", true),
                tok_->Encode("Lily wanted to play with the big red ball, but", true)};
    options_.max_new_tokens = 24;
    options_.stop_ids = {1};
  }
  // The request alone, through Generate() on its route's model.
  GenerationResult Alone(size_t prompt, const SamplingOptions& o, const CausalLM* route = nullptr) {
    auto r = Generate(route ? *route : *model_, *tok_, {prompts_[prompt]}, o);
    EXPECT_TRUE(r.ok()) << r.status();
    return (*r)[0];
  }
  // The prompts as rows of one batch, row i on routes[i] (null: the weights alone), run to the end
  // into *out; with step_after >= 0, one step runs right after that row is added.
  void RunBatch(const SamplingOptions& o, const std::vector<std::shared_ptr<const CausalLM>>& routes,
                std::vector<Outcome>* out, int step_after = -1) {
    DecodeBatch batch(model_, tok_);
    out->assign(prompts_.size(), Outcome());
    for (size_t i = 0; i < prompts_.size(); ++i) {
      ASSERT_TRUE(batch.Add(MakeRow(prompts_[i], o, &(*out)[i], routes[i])).ok());
      if (static_cast<int>(i) == step_after) {
        ASSERT_TRUE(batch.Step().ok());
      }
    }
    while (!batch.empty()) ASSERT_TRUE(batch.Step().ok());
  }
  std::shared_ptr<const CausalLM> model_;
  std::shared_ptr<const Tokenizer> tok_;
  std::vector<std::vector<int32_t>> prompts_;
  SamplingOptions options_;
};

// Rows that join a running batch at different steps (different cache lengths, left padding added
// on both sides, rows leaving in between) get exactly the greedy tokens they get alone.
TEST_F(DecodeBatchTest, JoiningMidwayEqualsAlone) {
  DecodeBatch batch(model_, tok_);
  std::vector<Outcome> out(prompts_.size());
  SamplingOptions shorter = options_;
  shorter.max_new_tokens = 5;  // leaves early: its cache rows are dropped while others run
  ASSERT_TRUE(batch.Add(MakeRow(prompts_[0], options_, &out[0])).ok());
  ASSERT_TRUE(batch.Step().ok());
  ASSERT_TRUE(batch.Step().ok());
  ASSERT_TRUE(batch.Add(MakeRow(prompts_[1], shorter, &out[1])).ok());
  ASSERT_TRUE(batch.Step().ok());
  ASSERT_TRUE(batch.Add(MakeRow(prompts_[2], options_, &out[2])).ok());
  for (int i = 0; i < 7; ++i) ASSERT_TRUE(batch.Step().ok());
  ASSERT_TRUE(batch.Add(MakeRow(prompts_[3], options_, &out[3])).ok());
  int steps = 0;
  while (!batch.empty()) {
    ASSERT_TRUE(batch.Step().ok());
    ASSERT_LT(++steps, 100);
  }
  for (size_t i = 0; i < out.size(); ++i) {
    const GenerationResult alone = Alone(i, i == 1 ? shorter : options_);
    ASSERT_TRUE(out[i].done) << i;
    EXPECT_EQ(out[i].ids, alone.ids) << i;
    EXPECT_EQ(out[i].text, alone.text) << i;
    EXPECT_EQ(out[i].streamed, alone.text) << i;
    EXPECT_EQ(out[i].finish_reason, alone.finish_reason) << i;
  }
}

// Each step gives every running row one token; a row's first token comes from its prefill.
TEST_F(DecodeBatchTest, OneTokenPerRowPerStep) {
  DecodeBatch batch(model_, tok_);
  Outcome a, b;
  SamplingOptions o = options_;
  o.stop_ids.clear();
  o.stop_on_eos = false;
  ASSERT_TRUE(batch.Add(MakeRow(prompts_[0], o, &a)).ok());
  ASSERT_TRUE(batch.Step().ok());
  EXPECT_EQ(batch.last_step_rows(), 1);
  ASSERT_TRUE(batch.Add(MakeRow(prompts_[1], o, &b)).ok());
  ASSERT_TRUE(batch.Step().ok());
  // The step decoded the running row, then prefilled the joining one.
  EXPECT_EQ(batch.last_step_rows(), 1);
  ASSERT_TRUE(batch.Step().ok());
  EXPECT_EQ(batch.last_step_rows(), 2);
  EXPECT_EQ(batch.size(), 2u);
}

// Rows of different routes in one batch (side paths per row, shared base GEMMs) equal each request
// run alone on its route's model, greedy and sampled.
TEST_F(DecodeBatchTest, PerRowRoutesEqualPerRequestRoutes) {
  for (bool low_rank : {true, false}) {
    for (float temperature : {0.0f, 0.9f}) {
      // Routes of different ranks; one leaves some layers without a side path.
      const auto route_a = Route(*model_, 11, low_rank);
      const auto route_b = Route(*model_, 24, low_rank);
      const std::vector<std::shared_ptr<const CausalLM>> routes = {route_a, nullptr, route_b, route_a};
      SamplingOptions o = options_;
      o.temperature = temperature;
      o.seed = 7;
      std::vector<Outcome> out;
      // A step after row 1: rows of one route end up apart in the batch.
      ASSERT_NO_FATAL_FAILURE(RunBatch(o, routes, &out, /*step_after=*/1));
      for (size_t i = 0; i < prompts_.size(); ++i) {
        const GenerationResult alone = Alone(i, o, routes[i].get());
        EXPECT_EQ(out[i].ids, alone.ids)
            << "row " << i << " temperature " << temperature << " low-rank " << low_rank;
        EXPECT_EQ(out[i].text, alone.text) << i;
      }
      // The side paths matter: route a's tokens differ from the weights alone.
      EXPECT_NE(Alone(0, o, route_a.get()).ids, Alone(0, o).ids);
    }
  }
}

// Share-style routes (one basis per layer, a core per route) in one batch: the batch runs the basis
// once with a core per row (on the CPU, the small-rows side path of decode steps) and each row gets
// the tokens it gets alone through its route's own side path.
TEST_F(DecodeBatchTest, PerRowSharedBasisRoutesEqualPerRequestRoutes) {
  at::Generator gen = at::detail::createCPUGenerator(5);
  std::map<std::string, std::pair<at::Tensor, at::Tensor>> bases;  // layer -> (L [n×kl], R [d×kr])
  for (const std::string& name : model_->LinearNames()) {
    const LinearLayer* layer = model_->FindLinear(name);
    bases[name] = {at::randn({layer->weight.size(0), 6}, gen, at::kFloat) * 0.4,
                   at::randn({layer->weight.size(1), 5}, gen, at::kFloat) * 0.4};
  }
  auto route = [&](uint64_t seed) {
    at::Generator g = at::detail::createCPUGenerator(seed);
    auto copy = model_->ShallowCopy();
    for (const std::string& name : copy->LinearNames()) {
      const auto& [left, right] = bases[name];
      copy->FindLinear(name)->adapter =
          std::make_shared<FixedSharedBasis>(left, right, at::randn({6, 5}, g, at::kFloat), 0.5);
    }
    return std::shared_ptr<const CausalLM>(std::move(copy));
  };
  const auto route_a = route(31);
  const auto route_b = route(32);
  const std::vector<std::shared_ptr<const CausalLM>> routes = {route_b, route_a, nullptr, route_b};
  for (float temperature : {0.0f, 0.9f}) {
    SamplingOptions o = options_;
    o.temperature = temperature;
    o.seed = 3;
    std::vector<Outcome> out;
    ASSERT_NO_FATAL_FAILURE(RunBatch(o, routes, &out));
    for (size_t i = 0; i < prompts_.size(); ++i) {
      EXPECT_EQ(out[i].ids, Alone(i, o, routes[i].get()).ids)
          << "row " << i << " temperature " << temperature;
    }
  }
  // The side paths matter, and differ between routes.
  EXPECT_NE(Alone(1, options_, route_a.get()).ids, Alone(1, options_).ids);
  EXPECT_NE(Alone(1, options_, route_a.get()).ids, Alone(1, options_, route_b.get()).ids);
}

// A cancelled row leaves at the next step (its slot is free), the others go on unchanged.
TEST_F(DecodeBatchTest, CancelFreesTheSlot) {
  DecodeBatch batch(model_, tok_);
  std::vector<Outcome> out(2);
  auto a = batch.Add(MakeRow(prompts_[0], options_, &out[0]));
  auto b = batch.Add(MakeRow(prompts_[1], options_, &out[1]));
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(batch.Step().ok());
  ASSERT_TRUE(batch.Step().ok());
  batch.Cancel(*a);
  EXPECT_FALSE(out[0].done);
  ASSERT_TRUE(batch.Step().ok());
  EXPECT_TRUE(out[0].done);
  EXPECT_EQ(out[0].finish_reason, "cancelled");
  EXPECT_EQ(batch.size(), 1u);
  EXPECT_EQ(batch.last_step_rows(), 1);
  while (!batch.empty()) ASSERT_TRUE(batch.Step().ok());
  EXPECT_EQ(out[1].ids, Alone(1, options_).ids);
  // A row cancelled before it joined never runs.
  Outcome c;
  auto id = batch.Add(MakeRow(prompts_[2], options_, &c));
  ASSERT_TRUE(id.ok());
  batch.Cancel(*id);
  ASSERT_TRUE(batch.Step().ok());
  EXPECT_TRUE(c.done);
  EXPECT_EQ(c.finish_reason, "cancelled");
  EXPECT_TRUE(c.ids.empty());
  EXPECT_TRUE(batch.empty());
}

TEST_F(DecodeBatchTest, RefusesBadRows) {
  DecodeBatch batch(model_, tok_);
  Outcome o;
  EXPECT_EQ(batch.Add(MakeRow({}, options_, &o)).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(batch.Add(MakeRow({1, 100000}, options_, &o)).status().code(),
            absl::StatusCode::kInvalidArgument);
  SamplingOptions bad = options_;
  bad.top_p = 0;
  EXPECT_EQ(batch.Add(MakeRow({1}, bad, &o)).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(batch.empty());
  EXPECT_FALSE(o.done);
}

// Logprobs: each generated token's log-probability is log_softmax of the model's logits at its
// step (checked against a full forward pass over prompt + generated ids), the top list is sorted
// and starts with the greedy token, and a batch row reports the same values as the row alone.
TEST_F(DecodeBatchTest, LogprobsAreTheModelsLogSoftmax) {
  SamplingOptions o = options_;
  o.max_new_tokens = 6;
  o.stop_ids.clear();
  o.stop_on_eos = false;
  o.logprobs = true;
  o.top_logprobs = 5;
  const GenerationResult alone = Alone(1, o);
  ASSERT_EQ(alone.logprobs.size(), alone.ids.size());
  ASSERT_EQ(alone.ids.size(), 6u);
  std::vector<int64_t> all(prompts_[1].begin(), prompts_[1].end());
  all.insert(all.end(), alone.ids.begin(), alone.ids.end());
  c10::InferenceMode guard;
  const at::Tensor logits =
      model_->Forward(at::tensor(all, at::kLong).unsqueeze(0), at::Tensor(), nullptr, 0);
  const at::Tensor logp = at::log_softmax(logits[0].to(at::kDouble), -1);
  for (size_t t = 0; t < alone.ids.size(); ++t) {
    const TokenLogprob& lp = alone.logprobs[t];
    const int64_t pos = static_cast<int64_t>(prompts_[1].size() + t) - 1;
    EXPECT_EQ(lp.id, alone.ids[t]);
    EXPECT_NEAR(lp.logprob, logp[pos][lp.id].item<double>(), 1e-3) << "token " << t;
    ASSERT_EQ(lp.top.size(), 5u);
    EXPECT_EQ(lp.top[0].first, lp.id) << "greedy: the chosen token is the most likely";
    for (size_t k = 1; k < lp.top.size(); ++k) EXPECT_GE(lp.top[k - 1].second, lp.top[k].second);
    EXPECT_LE(lp.logprob, 0.0f);
  }

  // In a batch with another row (different length, no logprobs), the same values.
  DecodeBatch batch(model_, tok_);
  Outcome other, mine;
  std::vector<TokenLogprob> streamed;
  ASSERT_TRUE(batch.Add(MakeRow(prompts_[3], options_, &other)).ok());
  DecodeRow row = MakeRow(prompts_[1], o, &mine);
  row.on_token = [&streamed](int32_t id, const std::string&, const TokenLogprob* lp) {
    EXPECT_NE(lp, nullptr);
    if (lp != nullptr) {
      EXPECT_EQ(lp->id, id);
      streamed.push_back(*lp);
    }
    return true;
  };
  ASSERT_TRUE(batch.Add(std::move(row)).ok());
  while (!batch.empty()) ASSERT_TRUE(batch.Step().ok());
  ASSERT_EQ(mine.ids, alone.ids);
  ASSERT_EQ(streamed.size(), alone.logprobs.size());
  for (size_t t = 0; t < streamed.size(); ++t) {
    EXPECT_NEAR(streamed[t].logprob, alone.logprobs[t].logprob, 1e-4);
    ASSERT_EQ(streamed[t].top.size(), alone.logprobs[t].top.size());
    for (size_t k = 0; k < streamed[t].top.size(); ++k) {
      EXPECT_EQ(streamed[t].top[k].first, alone.logprobs[t].top[k].first);
    }
  }
}

TEST(DecodeBatchOptions, TopLogprobsOutOfRangeOrWithoutLogprobsIsRefused) {
  SamplingOptions o;
  o.logprobs = true;
  o.top_logprobs = kMaxTopLogprobs + 1;
  EXPECT_TRUE(absl::IsInvalidArgument(ValidateSamplingOptions(o)));
  o.top_logprobs = 2;
  EXPECT_TRUE(ValidateSamplingOptions(o).ok());
  o.logprobs = false;
  EXPECT_TRUE(absl::IsInvalidArgument(ValidateSamplingOptions(o)));
}

}  // namespace
}  // namespace strata
