#include "core/adapt/recipe.h"

#include <cmath>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "core/util/status_macros.h"

namespace strata {
namespace {

absl::Status Bad(absl::string_view field, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat("recipe: ", field, " ", why));
}

}  // namespace

absl::Status ValidateRecipe(const TrainingRecipe& r) {
  if (absl::Status st = CheckMethodName(r.method); !st.ok()) return Bad("method", std::string(st.message()));
  if (!(std::isfinite(r.learning_rate) && r.learning_rate > 0)) {
    return Bad("learning_rate", absl::StrCat("must be finite and > 0, got ", r.learning_rate));
  }
  if (r.max_steps < 0) return Bad("max_steps", absl::StrCat("must be >= 0 (0 = epochs), got ", r.max_steps));
  if (r.max_steps == 0 && r.epochs < 1)
    return Bad("epochs", absl::StrCat("must be >= 1 when max_steps is 0, got ", r.epochs));
  if (r.batch_size < 1) return Bad("batch_size", absl::StrCat("must be >= 1, got ", r.batch_size));
  if (r.max_seq_len < 8) return Bad("max_seq_len", absl::StrCat("must be >= 8, got ", r.max_seq_len));
  if (!(r.warmup_ratio >= 0 && r.warmup_ratio <= 1)) {
    return Bad("warmup_ratio", absl::StrCat("must be in [0, 1], got ", r.warmup_ratio));
  }
  if (r.warmup_steps < 0) return Bad("warmup_steps", absl::StrCat("must be >= 0, got ", r.warmup_steps));
  if (r.lr_schedule != "linear" && r.lr_schedule != "cosine" && r.lr_schedule != "constant") {
    return Bad("lr_schedule",
               absl::StrCat("must be linear, cosine or constant, got \"", r.lr_schedule, "\""));
  }
  return ValidateMethodConfig(r.method_config);
}

absl::Status ValidateOverrides(const TrainOverrides& o) {
  auto bad = [](absl::string_view field, const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("overrides.", field, ": ", why));
  };
  if (o.learning_rate && !(std::isfinite(*o.learning_rate) && *o.learning_rate > 0)) {
    return bad("learning_rate", absl::StrCat("must be a finite number > 0, got ", *o.learning_rate));
  }
  if (o.max_steps && *o.max_steps < 1)
    return bad("max_steps", absl::StrCat("must be >= 1, got ", *o.max_steps));
  if (o.epochs && *o.epochs < 1) return bad("epochs", absl::StrCat("must be >= 1, got ", *o.epochs));
  if (o.batch_size && (*o.batch_size < 1 || *o.batch_size > 4096)) {
    return bad("batch_size", absl::StrCat("must be in [1, 4096], got ", *o.batch_size));
  }
  if (o.rank && (*o.rank < 1 || *o.rank > 1024))
    return bad("rank", absl::StrCat("must be in [1, 1024], got ", *o.rank));
  if (o.alpha && !(std::isfinite(*o.alpha) && *o.alpha > 0)) {
    return bad("alpha", absl::StrCat("must be a finite number > 0, got ", *o.alpha));
  }
  if (o.ella_lambda && !(std::isfinite(*o.ella_lambda) && *o.ella_lambda >= 0)) {
    return bad("ella_lambda", absl::StrCat("must be a finite number >= 0, got ", *o.ella_lambda));
  }
  if (o.seed && *o.seed < 0) return bad("seed", absl::StrCat("must be >= 0, got ", *o.seed));
  if (o.max_seq_len && (*o.max_seq_len < 8 || *o.max_seq_len > (1 << 20))) {
    return bad("max_seq_len", absl::StrCat("must be in [8, 1048576], got ", *o.max_seq_len));
  }
  return absl::OkStatus();
}

absl::StatusOr<TrainingRecipe> ResolveTaskRecipe(const TrainingRecipe& defaults,
                                                 absl::string_view requested_method, const TrainOverrides& o,
                                                 const CommittedState& state) {
  if (!requested_method.empty()) {
    if (absl::Status st = CheckMethodName(requested_method); !st.ok()) return st;
    if (requested_method != state.method) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the task asks for method ", requested_method, ", but this server's adaptation state uses ",
          state.method, " (one method per state directory; start another server with --method=",
          requested_method, " and its own --state_dir)"));
    }
  }
  RETURN_IF_ERROR(ValidateOverrides(o));
  TrainingRecipe r = defaults;
  r.method = state.method;
  if (o.learning_rate) r.learning_rate = *o.learning_rate;
  if (o.max_steps) r.max_steps = *o.max_steps;
  if (o.epochs) r.epochs = *o.epochs;
  if (o.batch_size) r.batch_size = *o.batch_size;
  if (o.seed) r.seed = static_cast<uint64_t>(*o.seed);
  if (o.max_seq_len) r.max_seq_len = *o.max_seq_len;
  if (state.tasks == 0) {
    // The state is still empty: this task shapes it (the defaults with the task's rank and alpha).
    if (o.rank) r.SetRank(*o.rank);
    if (o.alpha) r.method_config.alpha = *o.alpha;
    r.method_config.seed = defaults.seed;
  } else {
    if (o.rank && *o.rank != state.config.rank) {
      return absl::FailedPreconditionError(absl::StrCat(
          "overrides.rank: the rank is fixed once the first task is learned (", state.config.rank, ")"));
    }
    if (o.alpha && *o.alpha != state.config.alpha) {
      return absl::FailedPreconditionError(absl::StrCat(
          "overrides.alpha: alpha is fixed once the first task is learned (", state.config.alpha, ")"));
    }
    // The state's config, with this task's per-task options.
    MethodConfig c = state.config;
    for (const MethodOption& opt : AllMethodOptions()) {
      if (!opt.per_task) continue;
      std::visit([&](auto member) { c.*member = defaults.method_config.*member; }, opt.field);
    }
    r.method_config = std::move(c);
  }
  if (o.ella_lambda) r.method_config.ella_lambda = *o.ella_lambda;
  if (absl::Status st = ValidateRecipe(r); !st.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("task recipe: ", st.message()));
  }
  return r;
}

std::string RecipeToJson(const TrainingRecipe& r) {
  nlohmann::json j;
  j["method"] = r.method;
  j["method_config"] = nlohmann::json::parse(MethodConfigToJson(r.method_config));
  j["learning_rate"] = r.learning_rate;
  j["max_steps"] = r.max_steps;
  j["epochs"] = r.epochs;
  j["batch_size"] = r.batch_size;
  j["max_seq_len"] = r.max_seq_len;
  j["warmup_ratio"] = r.warmup_ratio;
  j["warmup_steps"] = r.warmup_steps;
  j["lr_schedule"] = r.lr_schedule;
  j["seed"] = r.seed;
  return j.dump();
}

absl::StatusOr<TrainingRecipe> RecipeFromJson(absl::string_view json) {
  TrainingRecipe r;
  try {
    const nlohmann::json j = nlohmann::json::parse(json);
    if (!j.is_object()) return absl::InvalidArgumentError("recipe: not a JSON object");
    for (const auto& [key, value] : j.items()) {
      if (key == "method") {
        r.method = value.get<std::string>();
      } else if (key == "method_config") {
        auto mc = MethodConfigFromJson(value.dump(), "recipe.method_config");
        if (!mc.ok()) return mc.status();
        r.method_config = std::move(*mc);
      } else if (key == "learning_rate") {
        r.learning_rate = value.get<double>();
      } else if (key == "max_steps") {
        r.max_steps = value.get<int64_t>();
      } else if (key == "epochs") {
        r.epochs = value.get<int64_t>();
      } else if (key == "batch_size") {
        r.batch_size = value.get<int64_t>();
      } else if (key == "max_seq_len") {
        r.max_seq_len = value.get<int64_t>();
      } else if (key == "warmup_ratio") {
        r.warmup_ratio = value.get<double>();
      } else if (key == "warmup_steps") {
        r.warmup_steps = value.get<int64_t>();
      } else if (key == "lr_schedule") {
        r.lr_schedule = value.get<std::string>();
      } else if (key == "seed") {
        r.seed = value.get<uint64_t>();
      } else {
        return absl::InvalidArgumentError(absl::StrCat("recipe: unknown field '", key, "'"));
      }
    }
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("recipe: ", e.what()));
  }
  if (absl::Status st = ValidateRecipe(r); !st.ok()) return st;
  return r;
}

}  // namespace strata
