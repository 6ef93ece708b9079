#include "core/adapt/method_config.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <nlohmann/json.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "core/util/env_flags.h"

namespace strata {
namespace {

using json = nlohmann::json;

// The options every method reads.
std::vector<MethodOption> CommonOptions() {
  MethodOption targets;
  targets.name = "target_modules";
  targets.field = &MethodConfig::target_modules;
  targets.help = "target modules: all-linear or comma-separated names (q_proj,v_proj,...)";
  targets.flag = "targets";
  MethodOption seed;
  seed.name = "seed";
  seed.field = &MethodConfig::seed;
  seed.help = "adapter initialisation seed (follows the recipe's seed)";
  seed.min = 0;
  seed.flag = "-";
  return {targets, IntegerOption("rank", &MethodConfig::rank, "adapter rank r (Share: pseudo-rank p)", 1),
          NumberOption("alpha", &MethodConfig::alpha, "LoRA alpha (scale alpha / r)", 0,
                       std::numeric_limits<double>::infinity(), /*min_exclusive=*/true),
          seed};
}

struct Registry {
  std::vector<MethodOption> options = CommonOptions();
  std::vector<MethodDescriptor> methods;
};

Registry& GetRegistry() {
  static Registry* registry = new Registry();
  return *registry;
}

bool SameField(const MethodOption::Field& a, const MethodOption::Field& b) { return a == b; }

std::string FormatNumber(double v) {
  if (std::isfinite(v) && v == std::floor(v) && std::fabs(v) < 1e15)
    return absl::StrCat(static_cast<int64_t>(v));
  return absl::StrCat(v);
}

// Checks one field's value against its option; "" when fine, else why.
std::string CheckValue(const MethodConfig& c, const MethodOption& o) {
  if (auto* f = std::get_if<std::string MethodConfig::*>(&o.field)) {
    const std::string& v = c.*(*f);
    if (o.choices.empty()) return v.empty() ? "must not be empty" : "";
    if (std::find(o.choices.begin(), o.choices.end(), v) != o.choices.end()) return "";
    return absl::StrCat(
        "must be ",
        absl::StrJoin(o.choices, " or ",
                      [](std::string* out, const std::string& s) { absl::StrAppend(out, "\"", s, "\""); }),
        ", got \"", v, "\"");
  }
  if (auto* f = std::get_if<std::vector<std::string> MethodConfig::*>(&o.field)) {
    const auto& v = c.*(*f);
    if (v.empty()) return "must not be empty";
    for (const auto& s : v) {
      if (s.empty()) return "must not contain an empty name";
    }
    return "";
  }
  double v = 0;
  if (auto* f = std::get_if<int64_t MethodConfig::*>(&o.field)) v = static_cast<double>(c.*(*f));
  if (auto* f = std::get_if<uint64_t MethodConfig::*>(&o.field)) v = static_cast<double>(c.*(*f));
  if (auto* f = std::get_if<double MethodConfig::*>(&o.field)) v = c.*(*f);
  const bool low_ok = o.min_exclusive ? v > o.min : v >= o.min;
  if (std::isfinite(v) && low_ok && v <= o.max) return "";
  const std::string value = FormatNumber(v);
  if (std::isfinite(o.max)) {
    return absl::StrCat("must be in ", o.min_exclusive ? "(" : "[", FormatNumber(o.min), ", ",
                        FormatNumber(o.max), "], got ", value);
  }
  if (std::isfinite(o.min)) {
    return absl::StrCat("must be finite and ", o.min_exclusive ? "> " : ">= ", FormatNumber(o.min), ", got ",
                        value);
  }
  return absl::StrCat("must be finite, got ", value);
}

json ValueOf(const MethodConfig& c, const MethodOption& o) {
  return std::visit([&](auto member) -> json { return c.*member; }, o.field);
}

}  // namespace

MethodOption IntegerOption(std::string name, int64_t MethodConfig::*field, std::string help, double min) {
  MethodOption o;
  o.name = std::move(name);
  o.field = field;
  o.help = std::move(help);
  o.min = min;
  return o;
}

MethodOption NumberOption(std::string name, double MethodConfig::*field, std::string help, double min,
                          double max, bool min_exclusive) {
  MethodOption o;
  o.name = std::move(name);
  o.field = field;
  o.help = std::move(help);
  o.min = min;
  o.max = max;
  o.min_exclusive = min_exclusive;
  return o;
}

MethodOption ChoiceOption(std::string name, std::string MethodConfig::*field, std::string help,
                          std::vector<std::string> choices) {
  MethodOption o;
  o.name = std::move(name);
  o.field = field;
  o.help = std::move(help);
  o.choices = std::move(choices);
  return o;
}

void RegisterMethodOptions(const std::vector<MethodOption>& options) {
  Registry& r = GetRegistry();
  for (const MethodOption& o : options) {
    auto it = std::find_if(r.options.begin(), r.options.end(),
                           [&](const MethodOption& e) { return e.name == o.name; });
    if (it == r.options.end()) {
      r.options.push_back(o);
    } else if (!SameField(it->field, o.field)) {
      // A programming error caught by method_test (two files binding one name to different fields).
      std::fprintf(stderr, "strata: method option \"%s\" registered for two different fields\n",
                   o.name.c_str());
      std::abort();
    }
  }
}

void RegisterMethodDescriptor(const MethodDescriptor& method) {
  Registry& r = GetRegistry();
  auto it = std::find_if(r.methods.begin(), r.methods.end(),
                         [&](const MethodDescriptor& m) { return m.name == method.name; });
  if (it != r.methods.end()) {
    std::fprintf(stderr, "strata: method \"%s\" registered twice\n", method.name.c_str());
    std::abort();
  }
  r.methods.push_back(method);
}

const std::vector<MethodOption>& AllMethodOptions() { return GetRegistry().options; }

const MethodOption* FindMethodOption(absl::string_view name) {
  for (const MethodOption& o : AllMethodOptions()) {
    if (o.name == name || (!o.FlagName().empty() && o.FlagName() == name) ||
        std::find(o.aliases.begin(), o.aliases.end(), name) != o.aliases.end()) {
      return &o;
    }
  }
  return nullptr;
}

std::vector<MethodDescriptor> MethodDescriptors() {
  std::vector<MethodDescriptor> out = GetRegistry().methods;
  std::stable_sort(out.begin(), out.end(), [](const MethodDescriptor& a, const MethodDescriptor& b) {
    return a.order != b.order ? a.order < b.order : a.name < b.name;
  });
  return out;
}

const MethodDescriptor* FindMethodDescriptor(absl::string_view name) {
  for (const MethodDescriptor& m : GetRegistry().methods) {
    if (m.name == name) return &m;
  }
  return nullptr;
}

std::vector<std::string> MethodNames() {
  std::vector<std::string> out;
  for (const MethodDescriptor& m : MethodDescriptors()) out.push_back(m.name);
  return out;
}

absl::Status CheckMethodName(absl::string_view name) {
  if (FindMethodDescriptor(name) != nullptr) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("unknown method '", name, "' (valid: ", absl::StrJoin(MethodNames(), ", "), ")"));
}

std::string MethodOptionText(const MethodConfig& c, const MethodOption& o) {
  if (auto* f = std::get_if<std::string MethodConfig::*>(&o.field)) return c.*(*f);
  if (auto* f = std::get_if<std::vector<std::string> MethodConfig::*>(&o.field))
    return absl::StrJoin(c.*(*f), ",");
  if (auto* f = std::get_if<int64_t MethodConfig::*>(&o.field)) return absl::StrCat(c.*(*f));
  if (auto* f = std::get_if<uint64_t MethodConfig::*>(&o.field)) return absl::StrCat(c.*(*f));
  return absl::StrCat(c.*std::get<double MethodConfig::*>(o.field));
}

absl::Status SetMethodOption(MethodConfig* c, const MethodOption& o, absl::string_view text_in,
                             absl::string_view source) {
  const absl::string_view text = absl::StripAsciiWhitespace(text_in);
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", why));
  };
  MethodConfig next = *c;
  if (auto* f = std::get_if<std::string MethodConfig::*>(&o.field)) {
    next.*(*f) = std::string(text);
  } else if (auto* f = std::get_if<std::vector<std::string> MethodConfig::*>(&o.field)) {
    next.*(*f) = absl::StrSplit(text, ',', absl::SkipWhitespace());
  } else if (auto* f = std::get_if<int64_t MethodConfig::*>(&o.field)) {
    if (!absl::SimpleAtoi(text, &(next.*(*f))))
      return bad(absl::StrCat("expected an integer, got \"", text, "\""));
  } else if (auto* f = std::get_if<uint64_t MethodConfig::*>(&o.field)) {
    if (!absl::SimpleAtoi(text, &(next.*(*f)))) {
      return bad(absl::StrCat("expected a non-negative integer, got \"", text, "\""));
    }
  } else {
    double v = 0;
    if (!absl::SimpleAtod(text, &v)) return bad(absl::StrCat("expected a number, got \"", text, "\""));
    next.*std::get<double MethodConfig::*>(o.field) = v;
  }
  if (std::string why = CheckValue(next, o); !why.empty()) return bad(why);
  *c = std::move(next);
  return absl::OkStatus();
}

absl::Status ValidateMethodConfig(const MethodConfig& c) {
  for (const MethodOption& o : AllMethodOptions()) {
    if (std::string why = CheckValue(c, o); !why.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("method config: ", o.name, " ", why));
    }
  }
  return absl::OkStatus();
}

std::string MethodConfigToJson(const MethodConfig& c) {
  json j = json::object();
  for (const MethodOption& o : AllMethodOptions()) j[o.name] = ValueOf(c, o);
  return j.dump();
}

absl::StatusOr<MethodConfig> MethodConfigFromJson(absl::string_view text, absl::string_view source_in) {
  const std::string source(source_in);
  json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded())
    return absl::InvalidArgumentError(absl::StrCat(source, ": method config is not valid JSON"));
  if (!j.is_object())
    return absl::InvalidArgumentError(absl::StrCat(source, ": method config must be a JSON object"));
  MethodConfig c;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    const json& v = it.value();
    auto bad = [&](const char* want) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": field \"", key, "\" must be ", want));
    };
    const MethodOption* o = nullptr;
    for (const MethodOption& e : AllMethodOptions()) {
      if (e.name == key) o = &e;
    }
    if (o == nullptr) {
      std::vector<std::string> names;
      for (const MethodOption& e : AllMethodOptions()) names.push_back(e.name);
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": unknown field \"", key, "\" (valid: ", absl::StrJoin(names, ", "), ")"));
    }
    if (auto* f = std::get_if<std::vector<std::string> MethodConfig::*>(&o->field)) {
      if (v.is_string()) {
        c.*(*f) = {v.get<std::string>()};
        continue;
      }
      if (!v.is_array()) return bad("a string or a list of strings");
      std::vector<std::string> list;
      for (const json& e : v) {
        if (!e.is_string()) return bad("a string or a list of strings");
        list.push_back(e.get<std::string>());
      }
      c.*(*f) = std::move(list);
    } else if (auto* f = std::get_if<std::string MethodConfig::*>(&o->field)) {
      if (!v.is_string()) return bad("a string");
      c.*(*f) = v.get<std::string>();
    } else if (auto* f = std::get_if<int64_t MethodConfig::*>(&o->field)) {
      if (!v.is_number_integer()) return bad("an integer");
      c.*(*f) = v.get<int64_t>();
    } else if (auto* f = std::get_if<uint64_t MethodConfig::*>(&o->field)) {
      if (!v.is_number_unsigned() && !(v.is_number_integer() && v.get<int64_t>() >= 0)) {
        return bad("a non-negative integer");
      }
      c.*(*f) = v.get<uint64_t>();
    } else {
      if (!v.is_number()) return bad("a number");
      c.*std::get<double MethodConfig::*>(o->field) = v.get<double>();
    }
  }
  return c;
}

absl::Status ParseMethodOptionFlags(int* argc, char** argv, MethodConfig* config,
                                    const std::string& env_prefix) {
  for (const MethodOption& o : AllMethodOptions()) {
    const std::string flag = o.FlagName();
    if (flag.empty()) continue;
    const std::string env = EnvTwinName(flag, env_prefix);
    if (const char* value = std::getenv(env.c_str()); value != nullptr) {
      if (absl::Status st = SetMethodOption(config, o, value, env); !st.ok()) return st;
    }
  }
  int out = 1;
  for (int i = 1; i < *argc; ++i) {
    absl::string_view arg = argv[i];
    if (arg == "--") {  // everything after belongs to absl / the program
      while (i < *argc) argv[out++] = argv[i++];
      break;
    }
    const MethodOption* o = nullptr;
    absl::string_view name, value;
    bool has_value = false;
    if (absl::ConsumePrefix(&arg, "--") || absl::ConsumePrefix(&arg, "-")) {
      const size_t eq = arg.find('=');
      name = arg.substr(0, eq);
      if (eq != absl::string_view::npos) {
        value = arg.substr(eq + 1);
        has_value = true;
      }
      o = FindMethodOption(name);
      if (o != nullptr && o->FlagName().empty()) o = nullptr;
    }
    if (o == nullptr) {
      argv[out++] = argv[i];
      continue;
    }
    if (!has_value) {
      if (i + 1 >= *argc) return absl::InvalidArgumentError(absl::StrCat("--", name, ": missing value"));
      value = argv[++i];
    }
    if (absl::Status st = SetMethodOption(config, *o, value, absl::StrCat("--", name)); !st.ok()) return st;
  }
  *argc = out;
  argv[out] = nullptr;
  return absl::OkStatus();
}

std::string MethodOptionsHelp(const MethodConfig& defaults) {
  std::string out;
  for (const MethodOption& o : AllMethodOptions()) {
    if (o.FlagName().empty()) continue;
    std::vector<std::string> users;
    for (const MethodDescriptor& m : MethodDescriptors()) {
      if (std::find(m.options.begin(), m.options.end(), o.name) != m.options.end()) users.push_back(m.name);
    }
    absl::StrAppend(&out, "    --", o.FlagName(), "=", MethodOptionText(defaults, o), "  ", o.help,
                    users.empty() ? "" : absl::StrCat(" (", absl::StrJoin(users, ", "), ")"),
                    o.per_task ? "; per task" : "; fixed by a state's first task", "\n");
  }
  return out;
}

}  // namespace strata
