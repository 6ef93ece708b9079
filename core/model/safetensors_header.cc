#include "core/model/safetensors_header.h"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/util/status_macros.h"

namespace strata {
namespace {

using json = nlohmann::json;

// The reference implementation refuses headers above 100 MB; so do we.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

absl::Status Malformed(const std::string& path, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": malformed safetensors file: ", what));
}

absl::Status MalformedTensor(const std::string& path, const std::string& tensor, const std::string& what) {
  return absl::InvalidArgumentError(
      absl::StrCat(path, ": malformed safetensors file: tensor '", tensor, "': ", what));
}

std::string Describe(const json& v) {
  std::string text = v.dump(-1, ' ', false, json::error_handler_t::replace);
  if (text.size() > 40) text = text.substr(0, 37) + "...";
  return absl::StrCat(v.type_name(), " ", text);
}

// A non-negative JSON integer (floats, even integral ones, are refused).
bool AsUint(const json& v, uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer()) {
    int64_t i = v.get<int64_t>();
    if (i < 0) return false;
    *out = static_cast<uint64_t>(i);
    return true;
  }
  return false;
}

absl::Status ParseEntry(const std::string& path, const std::string& name, const json& v, uint64_t data_size,
                        SafetensorsEntry* out) {
  if (!v.is_object()) return MalformedTensor(path, name, "entry must be an object, got " + Describe(v));
  auto dt = v.find("dtype");
  if (dt == v.end()) return MalformedTensor(path, name, "missing 'dtype'");
  if (!dt->is_string()) return MalformedTensor(path, name, "'dtype' must be a string, got " + Describe(*dt));
  out->dtype = dt->get<std::string>();
  const uint64_t elem_size = SafetensorsDtypeSize(out->dtype);
  if (elem_size == 0) {
    return MalformedTensor(path, name,
                           absl::StrCat("unknown or unsupported dtype '", out->dtype,
                                        "' (supported: F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL)"));
  }

  auto sh = v.find("shape");
  if (sh == v.end()) return MalformedTensor(path, name, "missing 'shape'");
  if (!sh->is_array()) return MalformedTensor(path, name, "'shape' must be a list, got " + Describe(*sh));
  uint64_t numel = 1;
  bool overflow = false;
  out->shape.clear();
  for (size_t i = 0; i < sh->size(); ++i) {
    uint64_t d = 0;
    if (!AsUint((*sh)[i], &d) || d > static_cast<uint64_t>(INT64_MAX)) {
      return MalformedTensor(
          path, name,
          absl::StrCat("shape[", i, "] must be a non-negative integer, got ", Describe((*sh)[i])));
    }
    out->shape.push_back(static_cast<int64_t>(d));
    if (__builtin_mul_overflow(numel, d, &numel)) overflow = true;
  }

  auto off = v.find("data_offsets");
  if (off == v.end()) return MalformedTensor(path, name, "missing 'data_offsets'");
  if (!off->is_array() || off->size() != 2 || !AsUint((*off)[0], &out->begin) ||
      !AsUint((*off)[1], &out->end)) {
    return MalformedTensor(
        path, name, "'data_offsets' must be [begin, end] non-negative integers, got " + Describe(*off));
  }
  if (out->begin > out->end) {
    return MalformedTensor(path, name,
                           absl::StrCat("data_offsets [", out->begin, ", ", out->end, "] has begin > end"));
  }
  if (out->end > data_size) {
    return MalformedTensor(path, name,
                           absl::StrCat("data_offsets [", out->begin, ", ", out->end,
                                        "] out of range: the data buffer has ", data_size, " bytes"));
  }
  uint64_t nbytes = 0;
  if (overflow || __builtin_mul_overflow(numel, elem_size, &nbytes) || nbytes != out->end - out->begin) {
    std::string shape_str;
    for (size_t i = 0; i < out->shape.size(); ++i) {
      absl::StrAppend(&shape_str, i ? ", " : "", out->shape[i]);
    }
    return MalformedTensor(
        path, name,
        absl::StrCat("shape [", shape_str, "] x ", out->dtype, " (", elem_size, " bytes) needs ",
                     overflow ? std::string("more than 2^64") : absl::StrCat(nbytes),
                     " bytes but data_offsets span ", out->end - out->begin, " bytes"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ParseSafetensorsHeader(const std::string& path, const char* base, uint64_t file_size,
                                    std::map<std::string, SafetensorsEntry>* entries,
                                    std::map<std::string, std::string>* metadata, uint64_t* data_start) {
  if (file_size < 8) {
    return Malformed(path, absl::StrCat("file is truncated (", file_size,
                                        " bytes; at least 8 are needed for the header length)"));
  }
  uint64_t n = 0;
  std::memcpy(&n, base, 8);
  if (n > file_size - 8) {
    return Malformed(
        path, absl::StrCat("header length ", n, " runs past the end of the file (", file_size, " bytes)"));
  }
  if (n > kMaxHeaderBytes) {
    return Malformed(path, absl::StrCat("header length ", n, " exceeds the 100 MB limit"));
  }
  json header;
  try {
    header = json::parse(base + 8, base + 8 + n);
  } catch (const json::exception& e) {
    return Malformed(path, absl::StrCat("header is not valid JSON: ", e.what()));
  }
  if (!header.is_object()) {
    return Malformed(path, absl::StrCat("header must be a JSON object, got ", header.type_name()));
  }
  const uint64_t data_size = file_size - 8 - n;
  *data_start = 8 + n;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (it->is_null()) continue;
      if (!it->is_object()) {
        return Malformed(path, "'__metadata__' must be an object, got " + Describe(*it));
      }
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string()) {
          return Malformed(path, absl::StrCat("'__metadata__' value '", m.key(), "' must be a string, got ",
                                              Describe(*m)));
        }
        (*metadata)[m.key()] = m->get<std::string>();
      }
      continue;
    }
    SafetensorsEntry entry;
    RETURN_IF_ERROR(ParseEntry(path, it.key(), *it, data_size, &entry));
    entries->emplace(it.key(), std::move(entry));
  }
  // Overlap check: sort non-empty ranges by begin; each must start at or after the previous end.
  std::vector<std::pair<const std::string*, const SafetensorsEntry*>> ranges;
  for (const auto& [name, e] : *entries) {
    if (e.end > e.begin) ranges.emplace_back(&name, &e);
  }
  std::sort(ranges.begin(), ranges.end(),
            [](const auto& a, const auto& b) { return a.second->begin < b.second->begin; });
  for (size_t i = 1; i < ranges.size(); ++i) {
    const SafetensorsEntry& prev = *ranges[i - 1].second;
    const SafetensorsEntry& cur = *ranges[i].second;
    if (cur.begin < prev.end) {
      return MalformedTensor(path, *ranges[i].first,
                             absl::StrCat("data_offsets [", cur.begin, ", ", cur.end, "] overlap tensor '",
                                          *ranges[i - 1].first, "' [", prev.begin, ", ", prev.end, "]"));
    }
  }
  return absl::OkStatus();
}

uint64_t SafetensorsDtypeSize(const std::string& dtype) {
  static const std::pair<const char*, uint64_t> kSizes[] = {
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8},
      {"I32", 4}, {"I16", 2}, {"I8", 1},  {"U8", 1},   {"BOOL", 1},
  };
  for (const auto& [name, size] : kSizes) {
    if (dtype == name) return size;
  }
  return 0;
}

}  // namespace strata
