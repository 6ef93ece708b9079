#pragma once
// The hyper-parameters of the adaptation methods (MethodConfig) and the registry of the methods and
// their options. Torch-free: the job journal, the server's flag parsing and the recipe use it
// without LibTorch.
//
// Every method registers itself from its own file (methods_*.cc, through MethodRegistrar in
// method.h): its name, capabilities and the options it reads, each option bound to a MethodConfig
// field with its validation and help. The JSON form of a MethodConfig, its validation, the server's
// method flags (--k_max, ...; STRATA_K_MAX) and `strata bench cl`'s options (--k-max) are all
// generated from that registry, so a new method is one new file + one CMake line, and a new option
// is one field below plus its MethodOption in the method's file (docs/DEVELOPING.md).
//
// The defaults below are the server's defaults (chosen on cl-small, docs/benchmarks.md); the
// training recipe (core/adapt/recipe.h) holds the rest.
//
// Thread safety: registration happens during static initialisation; afterwards every function here
// only reads the registry and is safe from any thread.

#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace strata {

inline constexpr char kDefaultMethod[] = "share_ella";

// Hyper-parameters of every method (each reads the fields it registered, plus the common ones:
// target_modules, rank, alpha, seed).
struct MethodConfig {
  // Target modules: short names ("q_proj", "v_proj", "gate_proj", ...), "all-linear"
  // (= q,k,v,o,gate,up,down) or full HF module names ("model.layers.0.self_attn.q_proj").
  std::vector<std::string> target_modules = {"all-linear"};
  int64_t rank = 8;     // LoRA rank r (seq_lora, inc_lora, o_lora, pm, mtl with lora shape)
  double alpha = 16.0;  // LoRA alpha: s = alpha / r (alpha / p for Share)
  // λ of the ELLA penalty (on the rms-normalised past). 0 (chosen on cl-small: the fold and the
  // routed view keep earlier tasks without it; docs/benchmarks.md).
  double ella_lambda = 0.0;
  double olora_lambda = 0.5;  // λ1 of O-LoRA's orthogonality term
  int64_t k_max = 32;         // Share: cap on the subspace rank per side
  int64_t phi = 8;            // Share: temporary basis vectors per side (share_training "subspace")
  int64_t p = 8;              // Share: pseudo-rank per task (follows rank: TrainingRecipe::SetRank)
  // Share: explained-energy fraction a merge keeps. 1 (keep every non-zero direction until k_max
  // binds, then the best rank-k_max summary): measured on cl-small, 0.999 (the paper's) dropped
  // directions while the subspace had room and cost the routed weights one domains answer.
  double energy_threshold = 1.0;
  // share, share_ella: how a task trains before its merge into the subspace.
  //   "lora" (default): a plain rank-p LoRA (A kaiming-uniform, B = 0; the plasticity of inc_lora),
  //       folded into the subspace at the end of the task with its factors balanced
  //       (BalanceLowRankFactors in share.h): the merge Share uses for imported adapters.
  //   "subspace": the published Share training: coefficients on the frozen basis plus φ temporary
  //       vectors per side (ShareModule::BeginTask). Kept for comparison with the paper.
  std::string share_training = "lora";
  // seq_ft and mtl (full): "all" trains every parameter (embeddings, norms, linears); "target"
  // trains the weights of the target modules only.
  std::string ft_scope = "all";
  // mtl: "full" (full fine-tuning, the true upper bound) or "lora" (one LoRA of this config's
  // target modules / rank / alpha, trained jointly).
  std::string mtl_shape = "full";
  uint64_t seed = 0;  // adapter initialisation (mixed with module and task names)
  // osft: unfreeze-rank ratio URR (uniform ranks k_l = floor(min(n,d)·(1 − URR))), in [0, 1].
  double osft_urr = 0.25;
  // osft: "uniform" (r_l = 1 − URR) or "adaptive" (r_l from input/output activation similarity).
  std::string osft_rank = "uniform";
  // pm: perturbation size ε (branch scales 1, 1 + ε, 1 − ε), in [0, 1] (the paper: 0.5; 0.1 chosen
  // on cl-small).
  double pm_epsilon = 0.1;
};

// One option of the methods: its name (the JSON key in the method config and the state, and the
// flag name), the MethodConfig field it sets, its help and its validation.
struct MethodOption {
  using Field = std::variant<int64_t MethodConfig::*, uint64_t MethodConfig::*, double MethodConfig::*,
                             std::string MethodConfig::*, std::vector<std::string> MethodConfig::*>;
  std::string name;
  Field field;
  std::string help;
  // Numbers: the valid closed range (an open end with the *_exclusive flags). Always finite.
  double min = -std::numeric_limits<double>::infinity();
  double max = std::numeric_limits<double>::infinity();
  bool min_exclusive = false;
  // Strings: the valid values (empty: any non-empty string).
  std::vector<std::string> choices;
  // May change from task to task (ELLA λ, P&M ε); every other option shapes the state and is fixed
  // once the first task is learned.
  bool per_task = false;
  // The server flag / STRATA_ variable ("" = the name; "-" = not a flag: p follows --rank, seed
  // follows --seed). `strata bench cl` uses the same name with dashes.
  std::string flag;
  // Other names accepted for the flag (e.g. `strata bench cl --lambda`).
  std::vector<std::string> aliases;

  // The flag name ("" when the option is not a flag).
  std::string FlagName() const { return flag == "-" ? "" : flag.empty() ? name : flag; }
};

// Declaring options in one line (the fields not named keep their defaults).
MethodOption IntegerOption(std::string name, int64_t MethodConfig::*field, std::string help, double min);
MethodOption NumberOption(std::string name, double MethodConfig::*field, std::string help, double min,
                          double max = std::numeric_limits<double>::infinity(), bool min_exclusive = false);
MethodOption ChoiceOption(std::string name, std::string MethodConfig::*field, std::string help,
                          std::vector<std::string> choices);

// What a method is, without its factory (method.h adds that): registered by its own file.
struct MethodDescriptor {
  MethodDescriptor() = default;
  MethodDescriptor(std::string name, int order, std::string summary, std::vector<std::string> options = {})
      : name(std::move(name)), summary(std::move(summary)), options(std::move(options)), order(order) {}

  std::string name;
  std::string summary;  // one line, for --help and docs
  // Capabilities: per-task weights (ApplyTaskRouting), PEFT adapter import, joint training (mtl).
  bool task_routing = false;
  bool adapter_import = false;
  bool joint = false;
  // The options it reads besides the common ones (target_modules, rank, alpha, seed).
  std::vector<std::string> options;
  // Listing order: lower first (the default method is 0), then by name.
  int order = 100;
};

// Registers `options` (a name registered twice must bind the same field: the first wins) and, when
// `method` has a name, the method. Called by MethodRegistrar during static initialisation.
void RegisterMethodOptions(const std::vector<MethodOption>& options);
void RegisterMethodDescriptor(const MethodDescriptor& method);

// Every option: the common ones first, then in registration order.
const std::vector<MethodOption>& AllMethodOptions();
// By name, flag name or alias; nullptr when unknown.
const MethodOption* FindMethodOption(absl::string_view name);
// Every registered method in listing order (the default first).
std::vector<MethodDescriptor> MethodDescriptors();
const MethodDescriptor* FindMethodDescriptor(absl::string_view name);
// All method names in listing order, the default first.
std::vector<std::string> MethodNames();
// INVALID_ARGUMENT "unknown method 'x' (valid: share_ella, ...)" unless `name` is registered.
absl::Status CheckMethodName(absl::string_view name);

// The option's value in `config` as text ("all-linear", "8", "0.1", "q_proj,v_proj").
std::string MethodOptionText(const MethodConfig& config, const MethodOption& option);
// Sets the option from text (flags, environment, CLI) and validates that field. INVALID_ARGUMENT
// "<source>: <why>" on a bad value.
absl::Status SetMethodOption(MethodConfig* config, const MethodOption& option, absl::string_view text,
                             absl::string_view source);
// INVALID_ARGUMENT "method config: <field> <why>" for the first bad field.
absl::Status ValidateMethodConfig(const MethodConfig& config);
// Every registered option under its name.
std::string MethodConfigToJson(const MethodConfig& config);
// Missing fields keep their defaults; unknown fields and wrong types are refused (naming them).
absl::StatusOr<MethodConfig> MethodConfigFromJson(absl::string_view json,
                                                  absl::string_view source = "config");

// The method options on a server command line: removes every `--<flag>=V` / `--<flag> V` of a
// registered option (its FlagName() or an alias) from argv (argc updated) and sets it on `config`,
// after the environment twins `<env_prefix><FLAG>` (STRATA_K_MAX; the command line wins).
// INVALID_ARGUMENT "--k_max: <why>" (or "STRATA_K_MAX: <why>") for a bad value. Runs before
// absl::ParseCommandLine, which then never sees these flags.
absl::Status ParseMethodOptionFlags(int* argc, char** argv, MethodConfig* config,
                                    const std::string& env_prefix = "STRATA_");
// One help line per option flag ("  --k_max=32  Share: cap on ... (share_ella, share)"), defaults
// from `defaults`.
std::string MethodOptionsHelp(const MethodConfig& defaults = {});

}  // namespace strata
