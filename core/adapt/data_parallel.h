#pragma once
// Data-parallel adaptation on LibTorch's c10d (the engine PyTorch's DDP uses): a rendezvous store
// (c10d::TCPStore, hosted by rank 0) that carries rank 0's decisions, and per task a process group
// (ProcessGroupGloo on CPU) that sums the trainable parameters' gradients every step.
//
// How a task runs over N ranks (docs/deploy.md, "Data-parallel adaptation"):
//  1. Rank 0 (the trainer: it owns the job, the merge, the evaluation, the checkpoint and the
//     publish) announces the task: its resolved recipe, the weights version it starts from and the
//     encoded training examples.
//  2. Every other rank (a replica following rank 0's published versions) reads it, waits until it
//     serves that version, and answers ready (or why not) within the join timeout.
//  3. Rank 0 names the members (itself and the ready ranks) and they form the task's group.
//  4. Every member builds the same global batch each step (same seed), takes its contiguous shard
//     of rows, and the group sums the gradients (the loss is normalised by the global batch's target
//     tokens, so the sum is exactly the one-process gradient of the whole batch). Rank 0's cancel
//     and any member's leaving travel in a small control vector summed in the same step.
//  5. A follower discards its result: rank 0 merges, evaluates and publishes, and the follower
//     serves (and later trains from) the published version like any replica.
// A rank that is missing, late or dies never fails a task: rank 0 trains alone from that step on
// (the global batch is the same, so the result is too, up to float summation order).
//
// This header is torch-light (ATen's Tensor only); c10d and Gloo stay in data_parallel.cc.

#include <ATen/core/Tensor.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/data/encode.h"

namespace strata {

struct DataParallelOptions {
  int world_size = 1;  // 1: no data parallelism
  int rank = 0;
  // The rendezvous store: rank 0 hosts a c10d::TCPStore at tcp://HOST:PORT (it listens on every
  // interface at that port: c10d's behaviour in this LibTorch), or every rank opens the
  // c10d::FileStore at file://PATH (one machine, or a shared filesystem; nothing listens).
  std::string host;
  int port = 0;
  std::string store_file;
  std::string backend = "gloo";  // gloo (CPU and CUDA tensors) or nccl (CUDA builds with NCCL)
  // How long rank 0 waits for the other ranks to answer a task (then it trains without them).
  double join_timeout_seconds = 60;
  // A collective (or the store) that does not complete in this time fails; rank 0 then continues
  // alone.
  double timeout_seconds = 300;
};

// Fills `options` from `init` ("tcp://HOST:PORT" or "file:///PATH"; empty: MASTER_ADDR /
// MASTER_PORT) and, where
// world_size/rank are unset (< 0), from WORLD_SIZE / RANK. INVALID_ARGUMENT naming the flag or the
// variable.
absl::StatusOr<DataParallelOptions> ResolveDataParallelOptions(int world_size, int rank,
                                                               const std::string& init);

// Whether this build can run data parallelism (c10d with Gloo compiled in).
bool DataParallelAvailable();

// What the trainer needs from a data-parallel group: one sum across the members per call.
class GradientSync {
 public:
  virtual ~GradientSync() = default;
  virtual int rank() const = 0;  // this process's index among the task's members
  virtual int size() const = 0;  // members
  // Sums each tensor in place across the members (same shapes and order on every member). An error
  // (a member died, the timeout) leaves the tensors undefined; the group is then unusable.
  virtual absl::Status AllReduceSum(std::vector<at::Tensor>& tensors) = 0;
};

// A task as rank 0 announces it.
struct DataParallelTask {
  int64_t seq = 0;          // announcement number (1, 2, ...)
  std::string name;         // the task
  int64_t version = 0;      // the weights version training starts from
  std::string recipe_json;  // the resolved recipe (RecipeToJson)
  std::vector<EncodedExample> examples;
  // Set by NextTask: rank 0 already named the members (an announcement from before this rank
  // came up); there is nothing left to join.
  bool started = false;
};

// The examples in a compact binary form (little-endian int32: count, then per example length,
// target_start and the ids) and back; DATA_LOSS naming the offset for a malformed buffer.
std::string EncodeExamplesBinary(const std::vector<EncodedExample>& examples);
absl::StatusOr<std::vector<EncodedExample>> DecodeExamplesBinary(const std::string& bytes);

class DataParallelGroup {
 public:
  // Rank 0 hosts the store (UNAVAILABLE naming the address when it cannot); the others try to reach
  // it once (5 s) and otherwise later through Reconnect: until then their calls answer UNAVAILABLE,
  // so a replica serves while rank 0 is not up yet.
  static absl::StatusOr<std::unique_ptr<DataParallelGroup>> Connect(const DataParallelOptions& options);
  ~DataParallelGroup();

  const DataParallelOptions& options() const { return options_; }
  int rank() const { return options_.rank; }
  int world_size() const { return options_.world_size; }

  // Rank 0: announces `task` (seq is set here), waits up to the join timeout for the other ranks'
  // answers and returns the group of the members (nullptr when no other rank joined: train alone).
  // `log` receives one line per missing or refusing rank. Never fails the task: store errors are
  // reported through `log` and give nullptr.
  std::unique_ptr<GradientSync> StartTask(DataParallelTask* task,
                                          const std::function<void(std::string)>& log);

  // Other ranks: the next announcement after `after_seq`, or nullopt after `wait` without one.
  absl::StatusOr<std::optional<DataParallelTask>> NextTask(int64_t after_seq, std::chrono::milliseconds wait);
  // The newest announcement number (a restarted follower skips what it missed).
  absl::StatusOr<int64_t> LatestSeq();
  // Other ranks: opens a new connection to rank 0's store (after rank 0 restarted);
  // UNAVAILABLE when it does not answer within 5 s.
  absl::Status Reconnect();
  // Other ranks: answers task `seq` (empty `refusal` = ready) and, when ready, waits for the
  // members and joins the group. nullptr when this rank is not a member (rank 0 did not wait).
  absl::StatusOr<std::unique_ptr<GradientSync>> JoinTask(int64_t seq, const std::string& refusal);

 private:
  struct Impl;
  DataParallelGroup(DataParallelOptions options, std::unique_ptr<Impl> impl);
  DataParallelOptions options_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace strata
