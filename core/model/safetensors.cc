#include "core/model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/util/file_util.h"
#include "core/util/status_macros.h"

namespace strata {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors is little-endian");

struct DtypeInfo {
  const char* name;
  at::ScalarType type;
  uint64_t size;
};

const DtypeInfo kDtypes[] = {
    {"F64", at::kDouble, 8}, {"F32", at::kFloat, 4}, {"F16", at::kHalf, 2},  {"BF16", at::kBFloat16, 2},
    {"I64", at::kLong, 8},   {"I32", at::kInt, 4},   {"I16", at::kShort, 2}, {"I8", at::kChar, 1},
    {"U8", at::kByte, 1},    {"BOOL", at::kBool, 1},
};

const DtypeInfo* DtypeByName(const std::string& name) {
  for (const DtypeInfo& d : kDtypes) {
    if (name == d.name) return &d;
  }
  return nullptr;
}

const DtypeInfo* DtypeByType(at::ScalarType type) {
  for (const DtypeInfo& d : kDtypes) {
    if (type == d.type) return &d;
  }
  return nullptr;
}

absl::Status ErrnoError(const std::string& what, const std::string& path, int err) {
  std::string msg = absl::StrCat(what, " '", path, "': ", std::strerror(err));
  if (err == ENOENT) return absl::NotFoundError(msg);
  if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(msg);
  if (err == ENOSPC) return absl::ResourceExhaustedError(msg);
  return absl::InternalError(msg);
}

absl::Status Malformed(const std::string& path, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": malformed safetensors file: ", what));
}

std::string Describe(const json& v) {
  std::string text = v.dump();
  if (text.size() > 40) text = text.substr(0, 37) + "...";
  return absl::StrCat(v.type_name(), " ", text);
}

at::TensorOptions Options(at::ScalarType type) { return at::TensorOptions().dtype(type).device(at::kCPU); }

absl::Status WriteAll(int fd, const void* data, size_t size, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = ::write(fd, p, std::min<size_t>(size, size_t{1} << 30));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError("cannot write", path, errno);
    }
    p += n;
    size -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

std::string ParentDir(const std::string& path) {
  fs::path parent = fs::path(path).parent_path();
  return parent.empty() ? std::string(".") : parent.string();
}

uint64_t TensorBytes(const at::Tensor& t) {
  return static_cast<uint64_t>(t.numel()) * static_cast<uint64_t>(t.element_size());
}

}  // namespace

// --- reader ----------------------------------------------------------------------------------

absl::StatusOr<std::shared_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError("cannot open safetensors file", path, errno);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return ErrnoError("cannot stat", path, err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    return Malformed(path, absl::StrCat("file is truncated (", size,
                                        " bytes; at least 8 are needed for the header length)"));
  }
  // MAP_PRIVATE + PROT_WRITE: zero-copy tensors are copy-on-write, so an in-place update by a
  // caller neither faults nor reaches the file. The fd is not needed once mapped.
  void* map = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  int err = errno;
  ::close(fd);
  if (map == MAP_FAILED) return ErrnoError("cannot mmap", path, err);

  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->map_ = map;
  file->map_size_ = size;
  uint64_t data_start = 0;
  RETURN_IF_ERROR(ParseSafetensorsHeader(path, static_cast<const char*>(map), size, &file->entries_,
                                         &file->metadata_, &data_start));
  file->data_start_ = data_start;
  file->self_ = file;
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, map_size_);
}

absl::StatusOr<at::Tensor> SafetensorsFile::Get(const std::string& name, at::ScalarType dtype) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) {
    return absl::NotFoundError(absl::StrCat(path_, ": no tensor named '", name, "'"));
  }
  const SafetensorsEntry& e = it->second;
  const DtypeInfo* info = DtypeByName(e.dtype);  // validated by Open
  const uint64_t nbytes = e.end - e.begin;
  try {
    if (nbytes == 0) return at::empty(e.shape, Options(dtype));
    char* ptr = static_cast<char*>(map_) + data_start_ + e.begin;
    const bool aligned = reinterpret_cast<uintptr_t>(ptr) % info->size == 0;
    if (info->type == dtype && aligned) {
      std::shared_ptr<const SafetensorsFile> keep = self_.lock();
      if (keep == nullptr) {
        return absl::FailedPreconditionError(
            absl::StrCat(path_, ": SafetensorsFile must be owned by the shared_ptr from Open"));
      }
      return torch::from_blob(
          ptr, e.shape, [keep](void*) {}, Options(info->type));
    }
    at::Tensor src;
    if (aligned) {
      src = torch::from_blob(ptr, e.shape, Options(info->type));  // converted below, not kept
    } else {
      src = at::empty(e.shape, Options(info->type));
      std::memcpy(src.data_ptr(), ptr, nbytes);
      if (info->type == dtype) return src;
    }
    return src.to(dtype);
  } catch (const c10::Error& ex) {
    return absl::InternalError(absl::StrCat(path_, ": cannot read tensor '", name, "' as ",
                                            c10::toString(dtype), ": ", ex.what_without_backtrace()));
  }
}

// --- writer ----------------------------------------------------------------------------------

absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  struct Item {
    const std::string* name;
    at::Tensor data;
    const DtypeInfo* info;
    uint64_t begin = 0;
    uint64_t end = 0;
  };
  std::vector<Item> items;
  std::set<std::string> seen;
  for (const auto& [name, tensor] : tensors) {
    if (name.empty() || name == "__metadata__") {
      return absl::InvalidArgumentError(absl::StrCat(path, ": invalid tensor name '", name, "'"));
    }
    if (!seen.insert(name).second) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": duplicate tensor name '", name, "'"));
    }
    if (!tensor.defined()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", name, "' is undefined"));
    }
    const DtypeInfo* info = DtypeByType(tensor.scalar_type());
    if (info == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", name, "' has dtype ",
                                                     c10::toString(tensor.scalar_type()),
                                                     " which safetensors cannot store here"));
    }
    at::Tensor data;
    try {
      data = tensor.detach().to(at::kCPU).contiguous();
    } catch (const c10::Error& ex) {
      return absl::InternalError(
          absl::StrCat(path, ": cannot copy tensor '", name, "' to CPU: ", ex.what_without_backtrace()));
    }
    items.push_back({&name, std::move(data), info});
  }
  // Larger elements first: with an 8-aligned data buffer every tensor is then naturally aligned.
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.info->size > b.info->size; });
  uint64_t offset = 0;
  json header = json::object();
  for (Item& item : items) {
    item.begin = offset;
    item.end = offset + TensorBytes(item.data);
    offset = item.end;
    header[*item.name] = {{"dtype", item.info->name},
                          {"shape", item.data.sizes().vec()},
                          {"data_offsets", {item.begin, item.end}}};
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string header_text;
  try {
    header_text = header.dump();
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": tensor names and metadata must be valid UTF-8: ", e.what()));
  }
  header_text.append((8 - header_text.size() % 8) % 8, ' ');
  const uint64_t header_len = header_text.size();

  std::random_device rd;
  const std::string tmp = absl::StrCat(path, ".tmp.", ::getpid(), ".", rd());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError("cannot create", tmp, errno);
  auto fail = [&](absl::Status s) {
    ::close(fd);
    ::unlink(tmp.c_str());
    return s;
  };
  absl::Status s = WriteAll(fd, &header_len, 8, tmp);
  if (s.ok()) s = WriteAll(fd, header_text.data(), header_text.size(), tmp);
  for (const Item& item : items) {
    if (!s.ok()) break;
    if (item.end > item.begin) s = WriteAll(fd, item.data.data_ptr(), item.end - item.begin, tmp);
  }
  if (!s.ok()) return fail(s);
  if (::fsync(fd) != 0) return fail(ErrnoError("fsync failed for", tmp, errno));
  if (::close(fd) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    return ErrnoError("cannot close", tmp, err);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    return ErrnoError("cannot rename into", path, err);
  }
  return FsyncPath(ParentDir(path));
}

// --- checkpoint directories --------------------------------------------------------------------

namespace {

constexpr const char* kSingleFile = "model.safetensors";
constexpr const char* kIndexFile = "model.safetensors.index.json";

absl::StatusOr<std::map<std::string, at::Tensor>> LoadAll(const std::string& path, at::ScalarType dtype) {
  ASSIGN_OR_RETURN(std::shared_ptr<SafetensorsFile> file, SafetensorsFile::Open(path));
  std::map<std::string, at::Tensor> out;
  for (const auto& [name, entry] : file->entries()) {
    ASSIGN_OR_RETURN(out[name], file->Get(name, dtype));
  }
  return out;
}

// A shard name must stay inside the checkpoint directory.
bool IsSafeShardName(const std::string& name) {
  if (name.empty()) return false;
  fs::path p(name);
  if (p.is_absolute()) return false;
  for (const auto& part : p) {
    if (part == "..") return false;
  }
  return true;
}

absl::StatusOr<std::map<std::string, at::Tensor>> LoadSharded(const std::string& dir,
                                                              const std::string& index_path,
                                                              at::ScalarType dtype) {
  ASSIGN_OR_RETURN(std::string text, ReadFile(index_path));
  json index;
  try {
    index = json::parse(text);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(index_path, ": invalid JSON: ", e.what()));
  }
  if (!index.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(index_path, ": must be a JSON object, got ", index.type_name()));
  }
  auto wm = index.find("weight_map");
  if (wm == index.end() || !wm->is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(index_path, ": field 'weight_map' must be an object"));
  }
  if (wm->empty()) {
    return absl::InvalidArgumentError(absl::StrCat(index_path, ": 'weight_map' is empty"));
  }
  std::map<std::string, std::vector<std::string>> by_shard;
  for (auto it = wm->begin(); it != wm->end(); ++it) {
    if (!it->is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": weight_map['", it.key(),
                                                     "'] must be a shard file name, got ", Describe(*it)));
    }
    std::string shard = it->get<std::string>();
    if (!IsSafeShardName(shard)) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": weight_map['", it.key(),
                                                     "'] names shard '", shard,
                                                     "' outside the checkpoint directory"));
    }
    by_shard[shard].push_back(it.key());
  }
  std::map<std::string, at::Tensor> out;
  for (const auto& [shard, names] : by_shard) {
    const std::string shard_path = (fs::path(dir) / shard).string();
    if (!PathExists(shard_path)) {
      return absl::NotFoundError(absl::StrCat(index_path, ": shard '", shard_path, "' (holding ",
                                              names.size(), " tensor(s), e.g. '", names[0],
                                              "') does not exist"));
    }
    ASSIGN_OR_RETURN(std::shared_ptr<SafetensorsFile> file, SafetensorsFile::Open(shard_path));
    for (const std::string& name : names) {
      if (file->entries().count(name) == 0) {
        return absl::NotFoundError(absl::StrCat(index_path, ": tensor '", name, "' is mapped to shard '",
                                                shard_path, "' which does not contain it"));
      }
      ASSIGN_OR_RETURN(out[name], file->Get(name, dtype));
    }
  }
  return out;
}

}  // namespace

absl::StatusOr<std::map<std::string, at::Tensor>> LoadCheckpointTensors(const std::string& dir,
                                                                        at::ScalarType dtype) {
  std::error_code ec;
  if (fs::is_regular_file(dir, ec)) return LoadAll(dir, dtype);
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat("checkpoint directory '", dir, "' does not exist"));
  }
  const std::string single = (fs::path(dir) / kSingleFile).string();
  if (PathExists(single)) return LoadAll(single, dtype);
  const std::string index = (fs::path(dir) / kIndexFile).string();
  if (PathExists(index)) return LoadSharded(dir, index, dtype);
  return absl::NotFoundError(absl::StrCat("'", dir, "' has neither ", kSingleFile, " nor ", kIndexFile));
}

absl::Status WriteCheckpointTensors(const std::string& dir,
                                    const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                                    uint64_t max_shard_bytes,
                                    const std::map<std::string, std::string>& metadata) {
  RETURN_IF_ERROR(MakeDirs(dir));
  const std::string single = (fs::path(dir) / kSingleFile).string();
  const std::string index = (fs::path(dir) / kIndexFile).string();

  std::set<std::string> seen;
  for (const auto& item : tensors) {
    if (!seen.insert(item.first).second) {
      return absl::InvalidArgumentError(absl::StrCat(dir, ": duplicate tensor name '", item.first, "'"));
    }
  }
  // Greedy split in the given order.
  std::vector<std::vector<std::pair<std::string, at::Tensor>>> shards(1);
  uint64_t total = 0, current = 0;
  for (const auto& item : tensors) {
    const uint64_t bytes = item.second.defined() ? TensorBytes(item.second) : 0;
    if (max_shard_bytes > 0 && !shards.back().empty() && current + bytes > max_shard_bytes) {
      shards.emplace_back();
      current = 0;
    }
    shards.back().push_back(item);
    current += bytes;
    total += bytes;
  }

  if (shards.size() == 1) {
    RETURN_IF_ERROR(WriteSafetensors(single, tensors, metadata));
    RETURN_IF_ERROR(RemoveAll(index));
    return absl::OkStatus();
  }
  nlohmann::ordered_json weight_map = nlohmann::ordered_json::object();
  const size_t n = shards.size();
  for (size_t k = 0; k < n; ++k) {
    const std::string name = absl::StrFormat("model-%05d-of-%05d.safetensors", k + 1, n);
    RETURN_IF_ERROR(WriteSafetensors((fs::path(dir) / name).string(), shards[k], metadata));
    for (const auto& item : shards[k]) weight_map[item.first] = name;
  }
  nlohmann::ordered_json j;
  j["metadata"] = {{"total_size", total}};
  j["weight_map"] = std::move(weight_map);
  RETURN_IF_ERROR(WriteFileAtomic(index, j.dump(2) + "\n"));
  return RemoveAll(single);
}

absl::Status CheckLlamaTensors(const ModelConfig& config, const std::map<std::string, at::Tensor>& tensors,
                               const std::string& source) {
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& [name, t] : tensors) {
    shapes[name] = t.defined() ? t.sizes().vec() : std::vector<int64_t>{};
  }
  return CheckLlamaTensorShapes(config, shapes, source);
}

}  // namespace strata
