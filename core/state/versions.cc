#include "core/state/versions.h"

#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <random>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "core/state/checkpoint.h"
#include "core/util/file_util.h"
#include "core/util/status_macros.h"
#include "nlohmann/json.hpp"

namespace strata {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr char kMetaFile[] = "version.json";
constexpr char kFormat[] = "strata.version.v1";

std::string RandomSuffix() {
  std::random_device rd;
  return absl::StrCat(rd(), rd());
}

json MetaToJson(const VersionMeta& m) {
  json scores = json::array();
  for (const auto& [task, score] : m.scores) {
    scores.push_back({{"task", task}, {"score", std::isfinite(score) ? json(score) : json(nullptr)}});
  }
  return {{"format", kFormat},
          {"version", m.version},
          {"status", m.status},
          {"based_on", m.based_on},
          {"created", m.created},
          {"job_id", m.job_id},
          {"task", m.task},
          {"tasks", m.tasks},
          {"scores", scores},
          {"reference_nll", std::isfinite(m.reference_nll) ? json(m.reference_nll) : json(nullptr)},
          {"hold_reasons", m.hold_reasons},
          {"bytes", m.bytes}};
}

absl::StatusOr<VersionMeta> MetaFromJson(const std::string& text, const std::string& source) {
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object() || j.value("format", "") != kFormat) {
    return absl::DataLossError(absl::StrCat(source, ": not a ", kFormat, " file"));
  }
  try {
    VersionMeta m;
    m.version = j.at("version").get<int64_t>();
    m.status = j.at("status").get<std::string>();
    m.based_on = j.value("based_on", int64_t{0});
    m.created = j.value("created", 0.0);
    m.job_id = j.value("job_id", "");
    m.task = j.value("task", "");
    m.tasks = j.value("tasks", std::vector<std::string>{});
    for (const auto& s : j.value("scores", json::array())) {
      const json& v = s.at("score");
      m.scores.emplace_back(s.at("task").get<std::string>(), v.is_null() ? std::nan("") : v.get<double>());
    }
    const json& nll = j.value("reference_nll", json(nullptr));
    m.reference_nll = nll.is_null() ? std::nan("") : nll.get<double>();
    m.hold_reasons = j.value("hold_reasons", std::vector<std::string>{});
    m.bytes = j.value("bytes", int64_t{0});
    if (m.status != kVersionPublished && m.status != kVersionCandidate) {
      return absl::DataLossError(absl::StrCat(source, ": field \"status\": unknown value '", m.status, "'"));
    }
    return m;
  } catch (const std::exception& e) {
    return absl::DataLossError(absl::StrCat(source, ": ", e.what()));
  }
}

// Links `src` to `dst` (no extra disk: checkpoint files are immutable once written), or copies it
// when the file system refuses links.
absl::Status LinkOrCopy(const std::string& src, const std::string& dst) {
  if (::link(src.c_str(), dst.c_str()) == 0) return absl::OkStatus();
  std::error_code ec;
  fs::copy_file(src, dst, fs::copy_options::overwrite_existing, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot copy ", src, " to ", dst, ": ", ec.message()));
  return FsyncPath(dst);
}

absl::Status LinkFiles(const std::string& from, const std::string& to) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(from, ec)) {
    const std::string name = e.path().filename().string();
    if (!e.is_regular_file() || name == kMetaFile) continue;
    RETURN_IF_ERROR(LinkOrCopy(e.path().string(), to + "/" + name));
  }
  if (ec) return absl::InternalError(absl::StrCat("cannot list ", from, ": ", ec.message()));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<VersionStore> VersionStore::Open(const std::string& state_dir) {
  VersionStore store(state_dir);
  RETURN_IF_ERROR(MakeDirs(store.root()));
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(state_dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind(".version-tmp-", 0) == 0 || name.rfind(".version-trash-", 0) == 0) {
      (void)RemoveAll(e.path().string());
    }
  }
  if (auto text = ReadFile(store.root() + "/next_version"); text.ok()) {
    int64_t n = 0;
    if (absl::SimpleAtoi(*text, &n) && n > 0) store.next_version_ = n;
  }
  for (const auto& m : store.List()) store.next_version_ = std::max(store.next_version_, m.version + 1);
  return store;
}

std::string VersionStore::Dir(int64_t version) const { return absl::StrCat(root(), "/v", version); }

absl::Status VersionStore::ReserveThrough(int64_t version) {
  if (version < next_version_) return absl::OkStatus();
  RETURN_IF_ERROR(WriteFileAtomic(root() + "/next_version", absl::StrCat(version + 1, "\n")));
  next_version_ = version + 1;
  return absl::OkStatus();
}

absl::Status VersionStore::Add(const std::string& checkpoint_dir, VersionMeta meta) {
  const std::string final_dir = Dir(meta.version);
  if (PathExists(final_dir)) {
    return absl::AlreadyExistsError(absl::StrCat("version ", meta.version, " is already kept"));
  }
  RETURN_IF_ERROR(ReserveThrough(meta.version));
  const std::string tmp = absl::StrCat(state_dir_, "/.version-tmp-", RandomSuffix());
  RETURN_IF_ERROR(MakeDirs(tmp));
  auto fail = [&](absl::Status st) {
    (void)RemoveAll(tmp);
    return st;
  };
  if (auto st = LinkFiles(checkpoint_dir, tmp); !st.ok()) return fail(st);
  meta.bytes = DirFileBytes(tmp);
  if (auto st = WriteFileAtomic(tmp + "/" + kMetaFile, MetaToJson(meta).dump(1)); !st.ok()) return fail(st);
  if (auto st = FsyncPath(tmp); !st.ok()) return fail(st);
  if (::rename(tmp.c_str(), final_dir.c_str()) != 0) {
    return fail(absl::InternalError(
        absl::StrCat("cannot rename ", tmp, " to ", final_dir, ": ", std::strerror(errno))));
  }
  return FsyncPath(root());
}

absl::Status VersionStore::SetStatus(int64_t version, const std::string& status) {
  ASSIGN_OR_RETURN(VersionMeta meta, Get(version));
  meta.status = status;
  if (status == kVersionPublished) meta.hold_reasons.clear();
  return WriteFileAtomic(Dir(version) + "/" + kMetaFile, MetaToJson(meta).dump(1));
}

absl::Status VersionStore::Remove(int64_t version) {
  const std::string dir = Dir(version);
  if (!PathExists(dir)) return absl::OkStatus();
  const std::string trash = absl::StrCat(state_dir_, "/.version-trash-", RandomSuffix());
  if (::rename(dir.c_str(), trash.c_str()) != 0) {
    return absl::InternalError(absl::StrCat("cannot remove ", dir, ": ", std::strerror(errno)));
  }
  RETURN_IF_ERROR(FsyncPath(root()));
  return RemoveAll(trash);
}

absl::StatusOr<VersionMeta> VersionStore::Get(int64_t version) const {
  const std::string path = Dir(version) + "/" + kMetaFile;
  if (!PathExists(path)) return absl::NotFoundError(absl::StrCat("version ", version, " is not kept"));
  ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  return MetaFromJson(text, path);
}

std::vector<VersionMeta> VersionStore::List() const {
  std::vector<VersionMeta> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(root(), ec)) {
    const std::string name = e.path().filename().string();
    int64_t n = 0;
    if (!e.is_directory() || name.size() < 2 || name[0] != 'v' || !absl::SimpleAtoi(name.substr(1), &n))
      continue;
    auto meta = Get(n);
    if (!meta.ok()) {
      spdlog::warn("kept version {} is unreadable and is not listed: {}", name, meta.status().ToString());
      continue;
    }
    out.push_back(std::move(*meta));
  }
  std::sort(out.begin(), out.end(),
            [](const VersionMeta& a, const VersionMeta& b) { return a.version > b.version; });
  return out;
}

absl::StatusOr<VersionStore::PreparedRestore> VersionStore::PrepareRestore(int64_t version) const {
  if (!PathExists(Dir(version) + "/" + kMetaFile)) {
    return absl::NotFoundError(absl::StrCat("version ", version, " is not kept"));
  }
  PreparedRestore out;
  out.tmp_dir = absl::StrCat(state_dir_, "/.checkpoint-tmp-", RandomSuffix());
  RETURN_IF_ERROR(MakeDirs(out.tmp_dir));
  auto fail = [&](absl::Status st) {
    AbandonRestore(out);
    return st;
  };
  if (auto st = LinkFiles(Dir(version), out.tmp_dir); !st.ok()) return fail(st);
  if (auto st = FsyncPath(out.tmp_dir); !st.ok()) return fail(st);
  auto data = ReadCheckpointDir(out.tmp_dir);
  if (!data.ok()) {
    return fail(absl::DataLossError(
        absl::StrCat("kept version ", version, " cannot be restored: ", data.status().message())));
  }
  out.data = std::move(*data);
  return out;
}

absl::Status VersionStore::CommitRestore(const PreparedRestore& prepared) const {
  return ReplaceDirAtomic(prepared.tmp_dir, state_dir_ + "/checkpoint");
}

void VersionStore::AbandonRestore(const PreparedRestore& prepared) const {
  (void)RemoveAll(prepared.tmp_dir);
}

}  // namespace strata
