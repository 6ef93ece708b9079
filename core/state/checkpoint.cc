#include "core/state/checkpoint.h"

#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <random>

#include "absl/strings/str_cat.h"
#include "core/model/safetensors.h"
#include "core/util/file_util.h"
#include "core/util/status_macros.h"
#include "nlohmann/json.hpp"

namespace strata {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr char kFormat[] = "strata.checkpoint.v1";
constexpr char kRouterPrefix[] = "router/";

json NumbersToJson(const std::vector<double>& v) {
  json out = json::array();
  for (double x : v) {
    if (std::isfinite(x)) {
      out.push_back(x);
    } else {
      out.push_back(nullptr);
    }
  }
  return out;
}

std::vector<double> NumbersFromJson(const json& j) {
  std::vector<double> out;
  for (const auto& x : j) out.push_back(x.is_null() ? std::nan("") : x.get<double>());
  return out;
}

}  // namespace

absl::Status SaveCheckpoint(const std::string& state_dir, const CheckpointData& data) {
  std::random_device rd;
  const std::string final_dir = state_dir + "/checkpoint";
  const std::string tmp = absl::StrCat(state_dir, "/.checkpoint-tmp-", rd());
  RETURN_IF_ERROR(RemoveAll(tmp));
  RETURN_IF_ERROR(MakeDirs(tmp));
  auto fail = [&](absl::Status st) {
    (void)RemoveAll(tmp);
    return st;
  };
  if (auto st = WriteCheckpointFiles(state_dir, data, tmp); !st.ok()) return fail(st);
  if (auto st = ReplaceDirAtomic(tmp, final_dir); !st.ok()) return fail(st);
  return absl::OkStatus();
}

absl::Status WriteCheckpointFiles(const std::string& state_dir, const CheckpointData& data,
                                  const std::string& tmp) {
  auto fail = [](absl::Status st) { return st; };

  std::vector<std::pair<std::string, at::Tensor>> tensors(data.method_tensors.begin(),
                                                          data.method_tensors.end());
  for (const auto& [name, t] : data.router_tensors)
    tensors.emplace_back(std::string(kRouterPrefix) + name, t);
  if (auto st = WriteSafetensors(tmp + "/method.safetensors", tensors, {{"format", kFormat}}); !st.ok()) {
    return fail(st);
  }
  json tasks = json::array();
  for (const auto& t : data.tasks) {
    tasks.push_back({{"name", t.name},
                     {"scorer", t.scorer},
                     {"job_id", t.job_id},
                     {"description", t.description},
                     {"eval_file", t.eval_file},
                     {"eval_examples", t.eval_examples}});
  }
  auto matrix_json = [](const std::vector<std::vector<double>>& m) {
    json out = json::array();
    for (const auto& row : m) out.push_back(NumbersToJson(row));
    return out;
  };
  json matrix = matrix_json(data.matrix);
  json state = {{"format", kFormat},
                {"base_model", data.base_model_id},
                {"method", data.method},
                {"method_config", data.method_config_json},
                {"weights_version", data.weights_version},
                {"tasks", tasks},
                {"matrix", matrix},
                {"base", NumbersToJson(data.base)},
                {"reference_nll", NumbersToJson(data.reference_nll)},
                {"stage_versions", data.stage_versions},
                {"router", data.router_json.empty() ? std::string("{}") : data.router_json},
                {"routed_matrix", matrix_json(data.routed_matrix)},
                {"auto_matrix", matrix_json(data.auto_matrix)},
                {"router_accuracy", matrix_json(data.router_accuracy)},
                {"reference_nll_auto", NumbersToJson(data.reference_nll_auto)}};
  const std::string state_text = state.dump(1);
  if (auto st = WriteFileAtomic(tmp + "/state.json", state_text); !st.ok()) return fail(st);

  json files = json::object();
  auto method_sha = Sha256File(tmp + "/method.safetensors");
  if (!method_sha.ok()) return fail(method_sha.status());
  files["method.safetensors"] = *method_sha;
  files["state.json"] = Sha256Hex(state_text);
  for (const auto& t : data.tasks) {
    auto sha = Sha256File(state_dir + "/" + t.eval_file);
    if (!sha.ok()) return fail(sha.status());
    files["../" + t.eval_file] = *sha;
  }
  json manifest = {{"format", kFormat}, {"weights_version", data.weights_version}, {"files", files}};
  if (auto st = WriteFileAtomic(tmp + "/manifest.json", manifest.dump(1)); !st.ok()) return fail(st);
  return FsyncPath(tmp);
}

int RemoveCheckpointLeftovers(const std::string& state_dir) {
  int removed = 0;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(state_dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind(".checkpoint-tmp-", 0) != 0) continue;
    if (auto st = RemoveAll(entry.path().string()); !st.ok()) {
      spdlog::warn("cannot remove the leftover of an interrupted checkpoint write: {}", st.ToString());
      continue;
    }
    ++removed;
  }
  if (removed > 0) {
    spdlog::info("removed {} temporary checkpoint director{} left by an interrupted write", removed,
                 removed == 1 ? "y" : "ies");
  }
  return removed;
}

absl::StatusOr<std::optional<CheckpointData>> LoadCheckpoint(const std::string& state_dir) {
  RemoveCheckpointLeftovers(state_dir);
  const std::string dir = state_dir + "/checkpoint";
  // A crash between the two renames of ReplaceDirAtomic leaves only checkpoint.old: use it.
  if (!PathExists(dir) && PathExists(dir + ".old")) {
    if (std::rename((dir + ".old").c_str(), dir.c_str()) != 0) {
      return absl::DataLossError(absl::StrCat("cannot restore ", dir, ".old"));
    }
  }
  if (!PathExists(dir)) return std::optional<CheckpointData>();
  ASSIGN_OR_RETURN(CheckpointData data, ReadCheckpointDir(dir));
  return std::optional<CheckpointData>(std::move(data));
}

absl::StatusOr<CheckpointData> ReadCheckpointDir(const std::string& dir) {
  const std::string manifest_path = dir + "/manifest.json";
  auto manifest_text = ReadFile(manifest_path);
  if (!manifest_text.ok()) {
    return absl::DataLossError(absl::StrCat("checkpoint is incomplete: ", manifest_text.status().message()));
  }
  json manifest = json::parse(*manifest_text, nullptr, false);
  if (manifest.is_discarded() || !manifest.is_object() || manifest.value("format", "") != kFormat ||
      !manifest.contains("files")) {
    return absl::DataLossError(absl::StrCat(manifest_path, ": not a ", kFormat, " manifest"));
  }
  for (const auto& [rel, sha] : manifest["files"].items()) {
    std::string path = dir + "/" + rel;
    auto actual = Sha256File(path);
    if (!actual.ok()) {
      return absl::DataLossError(
          absl::StrCat("checkpoint file missing: ", path, " (", actual.status().message(), ")"));
    }
    if (*actual != sha.get<std::string>()) {
      return absl::DataLossError(absl::StrCat("checkpoint file corrupted (SHA-256 mismatch): ", path));
    }
  }
  ASSIGN_OR_RETURN(std::string state_text, ReadFile(dir + "/state.json"));
  json state = json::parse(state_text, nullptr, false);
  if (state.is_discarded()) return absl::DataLossError(absl::StrCat(dir, "/state.json: bad JSON"));
  CheckpointData data;
  try {
    data.base_model_id = state.at("base_model").get<std::string>();
    data.method = state.at("method").get<std::string>();
    data.method_config_json = state.at("method_config").get<std::string>();
    data.weights_version = state.at("weights_version").get<int64_t>();
    for (const auto& t : state.at("tasks")) {
      CheckpointTask task;
      task.name = t.at("name").get<std::string>();
      task.scorer = t.at("scorer").get<std::string>();
      task.job_id = t.value("job_id", "");
      task.description = t.value("description", "");
      task.eval_file = t.at("eval_file").get<std::string>();
      task.eval_examples = t.value("eval_examples", int64_t{0});
      data.tasks.push_back(std::move(task));
    }
    for (const auto& row : state.at("matrix")) data.matrix.push_back(NumbersFromJson(row));
    data.base = NumbersFromJson(state.at("base"));
    data.reference_nll = NumbersFromJson(state.at("reference_nll"));
    if (state.contains("stage_versions"))
      data.stage_versions = state["stage_versions"].get<std::vector<int64_t>>();
    // Absent in checkpoints written before automatic routing: no router, views not measured.
    data.router_json = state.value("router", std::string("{}"));
    auto matrix_from = [&](const char* key, std::vector<std::vector<double>>* out) {
      if (!state.contains(key)) return;
      for (const auto& row : state.at(key)) out->push_back(NumbersFromJson(row));
    };
    matrix_from("routed_matrix", &data.routed_matrix);
    matrix_from("auto_matrix", &data.auto_matrix);
    matrix_from("router_accuracy", &data.router_accuracy);
    if (state.contains("reference_nll_auto"))
      data.reference_nll_auto = NumbersFromJson(state.at("reference_nll_auto"));
  } catch (const std::exception& e) {
    return absl::DataLossError(absl::StrCat(dir, "/state.json: ", e.what()));
  }
  auto file = SafetensorsFile::Open(dir + "/method.safetensors");
  if (!file.ok()) return absl::DataLossError(file.status().message());
  for (const auto& [name, entry] : (*file)->entries()) {
    at::ScalarType dtype = entry.dtype == "F64"    ? at::kDouble
                           : entry.dtype == "I32"  ? at::kInt
                           : entry.dtype == "I64"  ? at::kLong
                           : entry.dtype == "BF16" ? at::kBFloat16
                                                   : at::kFloat;
    ASSIGN_OR_RETURN(at::Tensor t, (*file)->Get(name, dtype));
    // Own the memory: the file may be replaced later.
    if (name.rfind(kRouterPrefix, 0) == 0) {
      data.router_tensors[name.substr(std::string(kRouterPrefix).size())] = t.clone();
    } else {
      data.method_tensors[name] = t.clone();
    }
  }
  return data;
}

absl::StatusOr<std::vector<CheckpointFile>> ListCheckpointFiles(const std::string& dir) {
  const std::string manifest_path = dir + "/manifest.json";
  auto text = ReadFile(manifest_path);
  if (!text.ok())
    return absl::DataLossError(absl::StrCat("checkpoint is incomplete: ", text.status().message()));
  json manifest = json::parse(*text, nullptr, false);
  if (manifest.is_discarded() || !manifest.is_object() || manifest.value("format", "") != kFormat ||
      !manifest.contains("files") || !manifest["files"].is_object()) {
    return absl::DataLossError(absl::StrCat(manifest_path, ": not a ", kFormat, " manifest"));
  }
  std::vector<CheckpointFile> out;
  for (const auto& [name, sha] : manifest["files"].items()) {
    if (!sha.is_string()) return absl::DataLossError(absl::StrCat(manifest_path, ": bad entry '", name, "'"));
    std::error_code ec;
    const auto size = fs::file_size(dir + "/" + name, ec);
    out.push_back({name, ec ? int64_t{-1} : static_cast<int64_t>(size), sha.get<std::string>()});
  }
  return out;
}

absl::Status WriteCheckpointManifest(const std::string& dir, int64_t weights_version,
                                     const std::vector<CheckpointFile>& files) {
  json listed = json::object();
  for (const CheckpointFile& f : files) listed[f.name] = f.sha256;
  json manifest = {{"format", kFormat}, {"weights_version", weights_version}, {"files", listed}};
  RETURN_IF_ERROR(WriteFileAtomic(dir + "/manifest.json", manifest.dump(1)));
  return FsyncPath(dir);
}

int64_t CheckpointBytes(const std::string& state_dir) { return DirFileBytes(state_dir + "/checkpoint"); }

int64_t DirFileBytes(const std::string& dir) {
  std::error_code ec;
  int64_t total = 0;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (e.is_regular_file()) total += static_cast<int64_t>(e.file_size(ec));
  }
  return total;
}

}  // namespace strata
