#include "core/adapt/data_parallel.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <nlohmann/json.hpp>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

#if STRATA_WITH_C10D
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#endif

namespace strata {
namespace {

using Clock = std::chrono::steady_clock;

std::chrono::milliseconds Millis(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000.0));
}

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? std::string() : std::string(v);
}

void PutInt32(std::string* out, int32_t v) {
  char b[4];
  std::memcpy(b, &v, 4);
  out->append(b, 4);
}

}  // namespace

absl::StatusOr<DataParallelOptions> ResolveDataParallelOptions(int world_size, int rank,
                                                               const std::string& init) {
  DataParallelOptions o;
  auto env_int = [](const char* name, int* out) -> absl::Status {
    const std::string v = Env(name);
    if (v.empty()) return absl::OkStatus();
    if (!absl::SimpleAtoi(v, out)) {
      return absl::InvalidArgumentError(absl::StrCat("environment ", name, ": not an integer: '", v, "'"));
    }
    return absl::OkStatus();
  };
  o.world_size = world_size;
  o.rank = rank;
  if (world_size < 0) {
    o.world_size = 1;
    if (auto st = env_int("WORLD_SIZE", &o.world_size); !st.ok()) return st;
  }
  if (o.world_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--world_size: must be >= 1, got ", o.world_size));
  }
  if (o.world_size == 1 && rank <= 0) {
    o.rank = 0;
    return o;
  }
  if (rank < 0) {
    o.rank = 0;
    if (auto st = env_int("RANK", &o.rank); !st.ok()) return st;
  }
  if (o.rank < 0 || o.rank >= o.world_size) {
    return absl::InvalidArgumentError(absl::StrCat("--dist_rank: must be in [0, ", o.world_size,
                                                   ") for --world_size ", o.world_size, ", got ", o.rank));
  }
  if (o.world_size == 1) return o;
  std::string host, port_text;
  if (init.rfind("file://", 0) == 0) {
    o.store_file = init.substr(7);
    if (o.store_file.empty() || o.store_file[0] != '/') {
      return absl::InvalidArgumentError(
          absl::StrCat("--dist_init: file:// needs an absolute path (file:///dir/store), got '", init, "'"));
    }
    return o;
  }
  if (!init.empty()) {
    const std::string kScheme = "tcp://";
    const size_t colon = init.rfind(':');
    if (init.rfind(kScheme, 0) != 0 || colon == std::string::npos || colon <= kScheme.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--dist_init: expected tcp://HOST:PORT (rank 0's address) or file:///PATH, got '", init, "'"));
    }
    host = init.substr(kScheme.size(), colon - kScheme.size());
    port_text = init.substr(colon + 1);
  } else {
    host = Env("MASTER_ADDR");
    port_text = Env("MASTER_PORT");
    if (host.empty() || port_text.empty()) {
      return absl::InvalidArgumentError(
          "--dist_init: data parallelism (--world_size > 1) needs rank 0's address: --dist_init "
          "tcp://HOST:PORT, or MASTER_ADDR and MASTER_PORT in the environment");
    }
  }
  if (!absl::SimpleAtoi(port_text, &o.port) || o.port < 1 || o.port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--dist_init: the port must be in 1..65535, got '", port_text, "'"));
  }
  o.host = host;
  return o;
}

std::string EncodeExamplesBinary(const std::vector<EncodedExample>& examples) {
  std::string out;
  size_t total = 4;
  for (const auto& e : examples) total += 8 + 4 * e.ids.size();
  out.reserve(total);
  PutInt32(&out, static_cast<int32_t>(examples.size()));
  for (const auto& e : examples) {
    PutInt32(&out, static_cast<int32_t>(e.ids.size()));
    PutInt32(&out, e.target_start);
    out.append(reinterpret_cast<const char*>(e.ids.data()), 4 * e.ids.size());
  }
  return out;
}

absl::StatusOr<std::vector<EncodedExample>> DecodeExamplesBinary(const std::string& bytes) {
  size_t pos = 0;
  auto get = [&](int32_t* v) {
    if (pos + 4 > bytes.size()) return false;
    std::memcpy(v, bytes.data() + pos, 4);
    pos += 4;
    return true;
  };
  int32_t count = 0;
  if (!get(&count) || count < 0) return absl::DataLossError("training examples: no valid count at offset 0");
  std::vector<EncodedExample> out;
  out.reserve(static_cast<size_t>(count));
  for (int32_t i = 0; i < count; ++i) {
    int32_t n = 0, target_start = 0;
    const size_t at = pos;
    if (!get(&n) || !get(&target_start) || n < 0 || pos + 4 * static_cast<size_t>(n) > bytes.size()) {
      return absl::DataLossError(
          absl::StrCat("training examples: example ", i, " at offset ", at, " is cut short"));
    }
    EncodedExample e;
    e.ids.resize(static_cast<size_t>(n));
    std::memcpy(e.ids.data(), bytes.data() + pos, 4 * static_cast<size_t>(n));
    pos += 4 * static_cast<size_t>(n);
    e.target_start = target_start;
    e.untruncated_length = n;
    out.push_back(std::move(e));
  }
  if (pos != bytes.size()) {
    return absl::DataLossError(
        absl::StrCat("training examples: ", bytes.size() - pos, " bytes after the last example"));
  }
  return out;
}

#if STRATA_WITH_C10D

bool DataParallelAvailable() { return true; }

namespace {

std::vector<uint8_t> Bytes(const std::string& s) { return std::vector<uint8_t>(s.begin(), s.end()); }
std::string Text(const std::vector<uint8_t>& v) { return std::string(v.begin(), v.end()); }

std::string Key(int64_t seq, const std::string& what) { return absl::StrCat("task/", seq, "/", what); }

// The task's group: ProcessGroupGloo (or ProcessGroupNCCL), held by its own type (a ProcessGroup in
// LibTorch 1.13, a Backend in 2.x; both have this allreduce).
template <typename Group>
class ProcessGroupSync : public GradientSync {
 public:
  ProcessGroupSync(c10::intrusive_ptr<Group> group, int rank, int size)
      : group_(std::move(group)), rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  absl::Status AllReduceSum(std::vector<at::Tensor>& tensors) override {
    try {
      for (at::Tensor& t : tensors) {
        std::vector<at::Tensor> one{t};
        group_->allreduce(one)->wait();
      }
    } catch (const std::exception& e) {
      return absl::UnavailableError(absl::StrCat("data-parallel all-reduce failed: ", e.what()));
    }
    return absl::OkStatus();
  }

 private:
  c10::intrusive_ptr<Group> group_;
  int rank_, size_;
};

}  // namespace

// The network device Gloo's connections use: GLOO_SOCKET_IFNAME's interface when set (as in
// PyTorch); loopback when the store is on this machine's loopback or a file; else the interface
// this host's name resolves to.
std::shared_ptr<::gloo::transport::Device> GlooDevice(const DataParallelOptions& o) {
  const std::string ifname = Env("GLOO_SOCKET_IFNAME");
  if (!ifname.empty()) return c10d::ProcessGroupGloo::createDeviceForInterface(ifname);
  if (!o.store_file.empty() || o.host == "localhost" || o.host.rfind("127.", 0) == 0 || o.host == "::1") {
    return c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1");
  }
  return c10d::ProcessGroupGloo::createDefaultDevice();
}

// Rank 0's TCPStore (`server`: hosted here) or a connection to it, trying for `connect_timeout`;
// its calls then time out after --dist_timeout_seconds. Throws what c10d throws.
c10::intrusive_ptr<c10d::Store> OpenTcpStore(const DataParallelOptions& o, bool server,
                                             std::chrono::milliseconds connect_timeout) {
  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(o.port);
  so.isServer = server;
  so.waitWorkers = false;
  so.timeout = connect_timeout;
  auto store = c10::make_intrusive<c10d::TCPStore>(o.host, so);
  store->setTimeout(Millis(o.timeout_seconds));
  return store;
}

std::string Where(const DataParallelOptions& o) {
  return o.store_file.empty() ? absl::StrCat("tcp://", o.host, ":", o.port)
                              : absl::StrCat("file://", o.store_file);
}

struct DataParallelGroup::Impl {
  c10::intrusive_ptr<c10d::Store> store;  // null until a rank other than 0 reaches rank 0's

  absl::StatusOr<c10d::Store*> Store(const DataParallelOptions& o) const;

  // The group of task `seq` over `members` (ranks, sorted; this rank among them).
  absl::StatusOr<std::unique_ptr<GradientSync>> Form(const DataParallelOptions& o, int64_t seq,
                                                     const std::vector<int>& members) {
    int group_rank = -1;
    for (size_t i = 0; i < members.size(); ++i) {
      if (members[i] == o.rank) group_rank = static_cast<int>(i);
    }
    if (group_rank < 0) return std::unique_ptr<GradientSync>();
    const int size = static_cast<int>(members.size());
    try {
      auto prefixed = c10::make_intrusive<c10d::PrefixStore>(Key(seq, "pg"), store);
      if (o.backend == "nccl") {
#ifdef USE_C10D_NCCL
        auto group = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, group_rank, size);
        return std::unique_ptr<GradientSync>(
            new ProcessGroupSync<c10d::ProcessGroupNCCL>(std::move(group), group_rank, size));
#else
        return absl::UnimplementedError(
            "--dist_backend nccl: this build has no NCCL (cmake -DSTRATA_WITH_NCCL=ON with a CUDA LibTorch); "
            "use gloo");
#endif
      }
      auto options = c10d::ProcessGroupGloo::Options::create(Millis(o.timeout_seconds));
      options->devices.push_back(GlooDevice(o));
      options->threads = 1;
      auto group = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, group_rank, size, options);
      return std::unique_ptr<GradientSync>(
          new ProcessGroupSync<c10d::ProcessGroupGloo>(std::move(group), group_rank, size));
    } catch (const std::exception& e) {
      return absl::UnavailableError(absl::StrCat("task ", seq,
                                                 ": cannot form the data-parallel group of ranks ",
                                                 absl::StrJoin(members, ","), ": ", e.what()));
    }
  }
};

DataParallelGroup::DataParallelGroup(DataParallelOptions options, std::unique_ptr<Impl> impl)
    : options_(std::move(options)), impl_(std::move(impl)) {}
DataParallelGroup::~DataParallelGroup() = default;

absl::StatusOr<std::unique_ptr<DataParallelGroup>> DataParallelGroup::Connect(const DataParallelOptions& o) {
  if (o.world_size < 2) return absl::InvalidArgumentError("data parallelism needs --world_size >= 2");
  if (o.backend != "gloo" && o.backend != "nccl") {
    return absl::InvalidArgumentError(
        absl::StrCat("--dist_backend: '", o.backend, "' (expected gloo or nccl)"));
  }
  auto impl = std::make_unique<Impl>();
  if (!o.store_file.empty()) {
    try {
      // -1 workers: the file is never removed by c10d (ranks come and go; the trainer outlives them).
      impl->store = c10::make_intrusive<c10d::FileStore>(o.store_file, -1);
      impl->store->setTimeout(Millis(o.timeout_seconds));
    } catch (const std::exception& e) {
      return absl::UnavailableError(
          absl::StrCat("--dist_init ", Where(o), ": cannot open the store: ", e.what()));
    }
    return std::unique_ptr<DataParallelGroup>(new DataParallelGroup(o, std::move(impl)));
  }
  if (o.rank == 0) {
    try {
      impl->store = OpenTcpStore(o, /*server=*/true, Millis(o.timeout_seconds));
    } catch (const std::exception& e) {
      return absl::UnavailableError(absl::StrCat(
          "--dist_init ", Where(o), ": rank 0 cannot host the rendezvous store there: ", e.what()));
    }
    return std::unique_ptr<DataParallelGroup>(new DataParallelGroup(o, std::move(impl)));
  }
  // Another rank connects later (Reconnect) when rank 0 is not up yet: a replica serves meanwhile.
  auto group = std::unique_ptr<DataParallelGroup>(new DataParallelGroup(o, std::move(impl)));
  (void)group->Reconnect();
  return group;
}

// The store, or UNAVAILABLE while a rank other than 0 has not reached rank 0's yet.
absl::StatusOr<c10d::Store*> DataParallelGroup::Impl::Store(const DataParallelOptions& o) const {
  if (store) return store.get();
  return absl::UnavailableError(
      absl::StrCat("--dist_init ", Where(o), ": rank 0's store is not reachable yet"));
}

std::unique_ptr<GradientSync> DataParallelGroup::StartTask(DataParallelTask* task,
                                                           const std::function<void(std::string)>& log) {
  c10d::Store& store = *impl_->store;
  int64_t seq = 0;
  try {
    seq = store.add("seq", 1);
    task->seq = seq;
    if (seq > 1) {  // the previous announcement's data is read by now (or never will be)
      store.deleteKey(Key(seq - 1, "data"));
    }
    nlohmann::json spec;
    spec["name"] = task->name;
    spec["version"] = task->version;
    spec["recipe"] = task->recipe_json;
    store.set(Key(seq, "data"), Bytes(EncodeExamplesBinary(task->examples)));
    store.set(Key(seq, "spec"), Bytes(spec.dump()));
  } catch (const std::exception& e) {
    log(absl::StrCat("data parallelism: cannot announce the task (", e.what(), "); training alone"));
    return nullptr;
  }
  std::vector<int> members{0};
  const Clock::time_point deadline = Clock::now() + Millis(options_.join_timeout_seconds);
  try {
    std::vector<bool> answered(static_cast<size_t>(options_.world_size), false);
    answered[0] = true;
    int pending = options_.world_size - 1;
    while (pending > 0 && Clock::now() < deadline) {
      for (int r = 1; r < options_.world_size; ++r) {
        if (answered[static_cast<size_t>(r)]) continue;
        const std::string key = Key(seq, absl::StrCat("answer/", r));
        if (!store.check({key})) continue;
        answered[static_cast<size_t>(r)] = true;
        --pending;
        const std::string refusal = Text(store.get(key));
        if (refusal.empty()) {
          members.push_back(r);
        } else {
          log(absl::StrCat("data parallelism: rank ", r, " does not join task '", task->name,
                           "': ", refusal));
        }
      }
      if (pending > 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    for (int r = 1; r < options_.world_size; ++r) {
      if (!answered[static_cast<size_t>(r)]) {
        log(absl::StrCat("data parallelism: rank ", r, " did not answer task '", task->name, "' within ",
                         options_.join_timeout_seconds, " s"));
      }
    }
    std::sort(members.begin(), members.end());
    store.set(Key(seq, "members"), Bytes(absl::StrJoin(members, ",")));
  } catch (const std::exception& e) {
    log(absl::StrCat("data parallelism: store error while gathering the ranks (", e.what(),
                     "); training alone"));
    return nullptr;
  }
  if (members.size() == 1) return nullptr;
  auto group = impl_->Form(options_, seq, members);
  if (!group.ok()) {
    log(absl::StrCat("data parallelism: ", group.status().message(), "; training alone"));
    return nullptr;
  }
  return std::move(*group);
}

absl::Status DataParallelGroup::Reconnect() {
  if (!options_.store_file.empty() || options_.rank == 0) return absl::OkStatus();
  try {
    impl_->store = OpenTcpStore(options_, /*server=*/false, std::chrono::seconds(5));
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("--dist_init ", Where(options_), ": rank 0's store: ", e.what()));
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> DataParallelGroup::LatestSeq() {
  auto store = impl_->Store(options_);
  if (!store.ok()) return store.status();
  try {
    return (*store)->add("seq", 0);
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("data parallelism: rank 0's store: ", e.what()));
  }
}

absl::StatusOr<std::optional<DataParallelTask>> DataParallelGroup::NextTask(int64_t after_seq,
                                                                            std::chrono::milliseconds wait) {
  auto store_or = impl_->Store(options_);
  if (!store_or.ok()) return store_or.status();
  c10d::Store& store = **store_or;
  const int64_t seq = after_seq + 1;
  const Clock::time_point deadline = Clock::now() + wait;
  try {
    while (!store.check({Key(seq, "spec")})) {
      if (Clock::now() >= deadline) return std::optional<DataParallelTask>();
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    DataParallelTask task;
    task.seq = seq;
    const std::string spec_text = Text(store.get(Key(seq, "spec")));
    const nlohmann::json spec = nlohmann::json::parse(spec_text);
    task.name = spec.at("name").get<std::string>();
    task.version = spec.at("version").get<int64_t>();
    task.recipe_json = spec.at("recipe").get<std::string>();
    task.started = store.check({Key(seq, "members")});
    if (task.started) return std::optional<DataParallelTask>(std::move(task));
    if (!store.check({Key(seq, "data")})) {
      return absl::DeadlineExceededError(absl::StrCat(
          "task ", seq, " ('", task.name, "'): its training data is gone (announced too long ago)"));
    }
    auto examples = DecodeExamplesBinary(Text(store.get(Key(seq, "data"))));
    if (!examples.ok()) return examples.status();
    task.examples = std::move(*examples);
    return std::optional<DataParallelTask>(std::move(task));
  } catch (const nlohmann::json::exception& e) {
    return absl::DataLossError(absl::StrCat("task ", seq, ": malformed announcement: ", e.what()));
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("data parallelism: rank 0's store: ", e.what()));
  }
}

absl::StatusOr<std::unique_ptr<GradientSync>> DataParallelGroup::JoinTask(int64_t seq,
                                                                          const std::string& refusal) {
  auto store_or = impl_->Store(options_);
  if (!store_or.ok()) return store_or.status();
  c10d::Store& store = **store_or;
  std::vector<int> members;
  try {
    store.set(Key(seq, absl::StrCat("answer/", options_.rank)), Bytes(refusal));
    if (!refusal.empty()) return std::unique_ptr<GradientSync>();
    // Rank 0 names the members at the latest after its join timeout.
    const Clock::time_point deadline =
        Clock::now() + Millis(options_.join_timeout_seconds + options_.timeout_seconds);
    while (!store.check({Key(seq, "members")})) {
      if (Clock::now() >= deadline) {
        return absl::DeadlineExceededError(absl::StrCat("task ", seq, ": rank 0 named no members"));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    for (absl::string_view part : absl::StrSplit(Text(store.get(Key(seq, "members"))), ',')) {
      int r = 0;
      if (!absl::SimpleAtoi(part, &r))
        return absl::DataLossError(absl::StrCat("task ", seq, ": malformed members"));
      members.push_back(r);
    }
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("data parallelism: rank 0's store: ", e.what()));
  }
  return impl_->Form(options_, seq, members);
}

#else  // !STRATA_WITH_C10D

bool DataParallelAvailable() { return false; }

struct DataParallelGroup::Impl {};
DataParallelGroup::DataParallelGroup(DataParallelOptions options, std::unique_ptr<Impl> impl)
    : options_(std::move(options)), impl_(std::move(impl)) {}
DataParallelGroup::~DataParallelGroup() = default;

absl::StatusOr<std::unique_ptr<DataParallelGroup>> DataParallelGroup::Connect(const DataParallelOptions&) {
  return absl::UnimplementedError(
      "data parallelism: this build has no c10d with Gloo (Debian: install libgloo-dev and rebuild; "
      "another LibTorch: -DSTRATA_DATA_PARALLEL=ON)");
}
std::unique_ptr<GradientSync> DataParallelGroup::StartTask(DataParallelTask*,
                                                           const std::function<void(std::string)>&) {
  return nullptr;
}
absl::StatusOr<std::optional<DataParallelTask>> DataParallelGroup::NextTask(int64_t,
                                                                            std::chrono::milliseconds) {
  return absl::UnimplementedError("data parallelism is not built in");
}
absl::StatusOr<int64_t> DataParallelGroup::LatestSeq() {
  return absl::UnimplementedError("data parallelism is not built in");
}
absl::Status DataParallelGroup::Reconnect() {
  return absl::UnimplementedError("data parallelism is not built in");
}
absl::StatusOr<std::unique_ptr<GradientSync>> DataParallelGroup::JoinTask(int64_t, const std::string&) {
  return absl::UnimplementedError("data parallelism is not built in");
}

#endif

}  // namespace strata
