#pragma once
// `strata bench serve`: serving throughput and latency of a real server under concurrent streams,
// optionally with a training job running, as a library function (registered by the `strata` CLI
// and the standalone `strata-bench` driver).
//
//   strata bench serve --model DIR|stories260K|110m --streams 1,16 --tasks 0,1,8 [--with-training]
//                      --max-tokens 64 [--requests 2] [--threads 2] --json FILE
//
// Starts strata-server on 127.0.0.1 (a fresh state directory; or --target HOST:PORT uses a running
// one) on the model (110m: the random-init ~110M Llama config written as a model directory with the
// project's safetensors writer, with the Llama 2 tokenizer), imports max(--tasks) random rank-8
// LoRA adapters as learned tasks (PEFT import: no training), then for every (streams, tasks)
// combination runs `streams` concurrent streaming Generate clients, each on its own channel, each
// sending --requests requests of --max-tokens tokens (ignore_eos, greedy) on task (stream mod
// tasks) by name (tasks 0: route "base"). It reports the aggregate tokens/s (tokens received /
// wall time of the combination), time to first token and inter-token latency percentiles (client
// side: between token-bearing messages, divided by the tokens in the message) and errors.
// For 1 stream it also decodes the same prompts in-process (Generate on the same weights with the
// server's serving thread count) for the gRPC overhead.
//
// With --with-training a training job (synthetic examples, many steps) is submitted after the
// idle runs; its steps/s is measured alone (an entry with 0 streams) and during every combination
// again (entries with training true). The job is cancelled at the end.
//
// JSON: {"results": [{"model", "streams", "tasks", "training", "tokens_per_second", "ttft_p50_s",
// "ttft_p95_s", "itl_p50_s", "itl_p95_s", "errors", "training_steps_per_second", "requests",
// "tokens", "seconds", "in_process_tokens_per_second"}], "server": {...}} with
// training_steps_per_second null without training and in_process_tokens_per_second null except for
// 1-stream entries.
//
// Exit codes: 0 ok; 1 a request failed or the server could not be started; 2 bad input.

#include <cstdint>
#include <string>
#include <vector>

namespace CLI {
class App;
}  // namespace CLI

namespace strata::bench {

struct ServeBenchArgs {
  std::string model = "stories260K";  // a model directory, "stories260K" or "110m"
  std::string target;                 // HOST:PORT of a running server (else one is started)
  std::string server_binary;          // strata-server (default: beside this binary, else PATH)
  std::vector<int> streams = {1, 16};
  std::vector<int> tasks = {1, 8};
  bool with_training = false;
  bool loaded_only = false;  // with training: skip the runs without it
  int max_tokens = 64;
  int requests = 2;  // per stream and combination
  int threads = 2;   // the server's --threads
  int serving_threads = 0;
  int training_threads = 0;
  double training_window_s = 20;  // seconds the training job is measured alone
  std::string json_path;
  std::string work_dir;  // temporary files (default: a new directory under /tmp)
};

void AddServeBenchOptions(CLI::App* sub, ServeBenchArgs* args);
int RunServeBenchCommand(const ServeBenchArgs& args);

}  // namespace strata::bench
