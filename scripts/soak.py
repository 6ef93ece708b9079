#!/usr/bin/env python3
"""Soak test of strata-server on 127.0.0.1 (driven by scripts/soak.sh; see there for the options).

Phase 1: kill -9 the server at random moments while jobs train and while a checkpoint is being
written (a .checkpoint-tmp-* directory exists), restarting it on the same state directory each time.
Phase 2: a mixed load for --duration seconds: 16 concurrent Generate streams, task submissions and
cancels, /metrics scrapes every second, the server's RSS sampled every 5 s.
Phase 3: waits for the queue to drain, then checks that every accepted job id is in the journal and
finished (succeeded / cancelled, or failed with a reason), restarts the server to check the state
loads, and compares RSS at the start and the end of the load. Prints a JSON summary; exit 1 on a
lost job, an unexplained failure, an unexpected error or unbounded RSS growth."""
import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

p = argparse.ArgumentParser()
p.add_argument("--build", required=True)
p.add_argument("--shared", required=True)
p.add_argument("--work", required=True)
p.add_argument("--kills", type=int, default=20)
p.add_argument("--duration", type=int, default=600)
p.add_argument("--streams", type=int, default=16)
p.add_argument("--steps", type=int, default=40)
p.add_argument("--seed", type=int, default=1)
p.add_argument("--rss_growth_limit", type=float, default=1.5, help="end RSS / start RSS above which the run fails")
args = p.parse_args()
random.seed(args.seed)

SERVER = os.path.join(args.build, "server", "strata-server")
CLI = os.path.join(args.build, "client", "strata")
STATE = os.path.join(args.work, "state")
MODEL = os.path.join(args.shared, "models", "stories260K")
os.makedirs(args.work, exist_ok=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


GRPC, METRICS = free_port(), free_port()
ADDR = f"127.0.0.1:{GRPC}"
LOG = open(os.path.join(args.work, "server.log"), "ab")
stats = {"kills": 0, "kills_during_checkpoint_write": 0, "kills_during_training": 0, "server_starts": 0,
         "checkpoint_tmp_dirs_left_by_kills": 0, "checkpoint_tmp_dirs_left_after_start": 0,
         "submitted": 0, "accepted": 0, "refused_submissions": {}, "cancels": 0, "generate_streams": 0,
         "generate_errors": 0, "scrapes": 0, "scrape_errors": 0, "unexpected_errors": []}
accepted = []  # job ids
lock = threading.Lock()
server = None


def cli(*argv, timeout=300, rpc_timeout=60):
    """(exit code, stdout, stderr); exit code 124 when the CLI did not finish within `timeout`."""
    try:
        r = subprocess.run([CLI, "--server", ADDR, "--timeout", str(rpc_timeout), *argv], capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, "", f"the CLI did not finish within {timeout} s"
    return r.returncode, r.stdout, r.stderr


def start_server():
    global server
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    server = subprocess.Popen([SERVER, f"--model={MODEL}", f"--state_dir={STATE}", "--host=127.0.0.1",
                               f"--grpc_port={GRPC}", f"--metrics_port={METRICS}", "--http_port=0", f"--max_steps={args.steps}",
                               "--batch_size=8", "--threads=2", "--max_queue=1000"],
                              stdout=LOG, stderr=LOG, env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        if server.poll() is not None:
            sys.exit(f"soak: the server exited with {server.returncode} at start (see {LOG.name})")
        if cli("health", timeout=60, rpc_timeout=2)[0] == 0:
            stats["server_starts"] += 1
            return
        time.sleep(0.2)
    server.kill()
    sys.exit("soak: the server did not become SERVING within 300 s")


def rss_mb():
    with open(f"/proc/{server.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def task_files(i):
    src = os.path.join(args.shared, "data", "cl-small", random.choice(["capitals", "iso3", "domains"]), "train.jsonl")
    with open(src) as f:
        lines = f.readlines()
    random.shuffle(lines)
    train = os.path.join(args.work, f"train-{i}.jsonl")
    with open(train, "w") as f:
        f.writelines(lines[:48])
    return train


def _cleanup():
    if server is not None and server.poll() is None:
        server.kill()


import atexit  # noqa: E402

atexit.register(_cleanup)

submit_counter = [0]


def submit():
    with lock:
        submit_counter[0] += 1
        i = submit_counter[0]
        stats["submitted"] += 1
    train = task_files(i)
    rc, out, err = cli("submit", "--task", f"soak-{i}", train, "--eval-fraction", "0.15", "--seed", str(i))
    if rc == 0:
        job = out.strip().split()[-1]
        with lock:
            accepted.append(job)
            stats["accepted"] += 1
        return job
    reason = err.strip().split(":")[0][:60] or f"exit {rc}"
    with lock:
        stats["refused_submissions"][reason] = stats["refused_submissions"].get(reason, 0) + 1
    if rc == 3 or "INTERNAL" in err:
        with lock:
            stats["unexpected_errors"].append(f"submit: {err.strip()[:200]}")
    return None


def jobs():
    rc, out, err = cli("--json", "jobs")
    if rc != 0:
        raise RuntimeError(f"jobs: {err}")
    return json.loads(out).get("jobs", [])


def kill9(why):
    server.send_signal(signal.SIGKILL)
    server.wait()
    stats["kills"] += 1
    stats[why] += 1


# ---- phase 1: kill -9 during training and checkpoint writes ---------------------------------
t0 = time.time()
start_server()
while stats["kills"] < args.kills:
    if sum(1 for j in jobs() if j["state"] in ("JOB_STATE_QUEUED", "JOB_STATE_TRAINING")) < 2:
        submit()
        submit()
    if stats["kills"] % 2 == 0:
        # Kill while a checkpoint is being written: poll for the temp directory.
        deadline = time.time() + 90
        hit = False
        while time.time() < deadline and not hit:
            try:
                hit = any(n.startswith(".checkpoint-tmp-") for n in os.listdir(STATE))
            except FileNotFoundError:
                pass
            if not hit:
                time.sleep(0.0005)
        kill9("kills_during_checkpoint_write" if hit else "kills_during_training")
    else:
        # Kill at a random moment while a job trains.
        deadline = time.time() + 60
        while time.time() < deadline and not any(j["state"] == "JOB_STATE_TRAINING" for j in jobs()):
            time.sleep(0.2)
        time.sleep(random.uniform(0.1, 3.0))
        kill9("kills_during_training")
    stats["checkpoint_tmp_dirs_left_by_kills"] += sum(1 for n in os.listdir(STATE) if n.startswith(".checkpoint-tmp-"))
    start_server()
    stats["checkpoint_tmp_dirs_left_after_start"] += sum(
        1 for n in os.listdir(STATE) if n.startswith(".checkpoint-tmp-"))
phase1_seconds = time.time() - t0

# ---- phase 2: mixed load --------------------------------------------------------------------
stop = threading.Event()
prompts = ["Once upon a time", "The capital of France is", "Lily and Tom went to the park.", "One day, a little"]


def generate_loop():
    while not stop.is_set():
        rc, out, err = cli("generate", "--prompt", random.choice(prompts), "--max-tokens", "24",
                           "--temperature", "0.8", "--seed", str(random.randint(1, 1 << 30)))
        with lock:
            stats["generate_streams"] += 1
            if rc != 0:
                stats["generate_errors"] += 1
                stats["unexpected_errors"].append(f"generate exit {rc}: {err.strip()[:200]}")


def scrape_loop():
    while not stop.is_set():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{METRICS}/metrics", timeout=10) as r:
                body = r.read()
            ok = b"strata_queue_length" in body
        except Exception as e:  # noqa: BLE001
            ok = False
            with lock:
                stats["unexpected_errors"].append(f"scrape: {e}")
        with lock:
            stats["scrapes"] += 1
            stats["scrape_errors"] += 0 if ok else 1
        time.sleep(1)


def submit_loop():
    while not stop.is_set():
        job = submit()
        if job and random.random() < 0.3:
            time.sleep(random.uniform(0, 5))
            rc, out, err = cli("cancel", job)
            with lock:
                stats["cancels"] += 1
                if rc not in (0, 1) or (rc == 1 and "FAILED_PRECONDITION" not in err):
                    stats["unexpected_errors"].append(f"cancel {job}: exit {rc}: {err.strip()[:200]}")
        stop.wait(random.uniform(4, 10))


rss = []
rss_start = rss_mb()
threads = [threading.Thread(target=generate_loop) for _ in range(args.streams)]
threads += [threading.Thread(target=scrape_loop), threading.Thread(target=submit_loop)]
for t in threads:
    t.start()
t1 = time.time()
while time.time() - t1 < args.duration:
    time.sleep(5)
    rss.append(round(rss_mb(), 1))
stop.set()
for t in threads:
    t.join()
rss_end = rss_mb()

# ---- phase 3: drain, check every accepted job, restart ----------------------------------------
deadline = time.time() + 900
while time.time() < deadline:
    if all(j["state"] in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED") for j in jobs()):
        break
    time.sleep(2)
final = {j["id"]: j for j in jobs()}
lost = [j for j in accepted if j not in final]
unfinished = [j for j in accepted if j in final and final[j]["state"] not in
              ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED")]
failed_without_reason = [j for j in accepted if j in final and final[j]["state"] == "JOB_STATE_FAILED"
                         and not final[j].get("error")]
by_state = {}
for j in accepted:
    if j in final:
        by_state[final[j]["state"]] = by_state.get(final[j]["state"], 0) + 1
failure_reasons = sorted({final[j]["error"][:120] for j in accepted if j in final and
                          final[j]["state"] == "JOB_STATE_FAILED"})
server.send_signal(signal.SIGTERM)
graceful_rc = server.wait(timeout=120)
leftovers = [n for n in os.listdir(STATE) if n.startswith(".checkpoint-tmp-")]
start_server()
rc, out, err = cli("--json", "info")
state_loads = rc == 0
tasks_rc, tasks_out, _ = cli("--json", "tasks")
after_restart = {j["id"]: j["state"] for j in jobs()}
server.send_signal(signal.SIGTERM)
server.wait(timeout=120)

summary = {
    "machine": f"{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
    "phase1_seconds": round(phase1_seconds), "load_seconds": args.duration,
    **{k: v for k, v in stats.items() if k != "unexpected_errors"},
    "unexpected_errors": len(stats["unexpected_errors"]), "unexpected_error_samples": stats["unexpected_errors"][:5],
    "accepted_jobs_by_state": by_state, "lost_jobs": lost, "unfinished_jobs": unfinished,
    "failed_without_reason": failed_without_reason, "failure_reasons": failure_reasons,
    "checkpoint_tmp_left_after_restarts": leftovers, "graceful_exit_code": graceful_rc,
    "state_loads_after_restart": state_loads,
    "tasks_learned": len(json.loads(tasks_out).get("tasks", [])) if tasks_rc == 0 else None,
    "jobs_unchanged_by_restart": all(after_restart.get(j) == final[j]["state"] for j in final),
    "rss_mb_start": round(rss_start, 1), "rss_mb_end": round(rss_end, 1), "rss_mb_max": max(rss) if rss else None,
}
print(json.dumps(summary, indent=1))
ok = (not lost and not unfinished and not failed_without_reason and not stats["unexpected_errors"] and state_loads
      and not leftovers and rss_end <= args.rss_growth_limit * rss_start and summary["jobs_unchanged_by_restart"])
sys.exit(0 if ok else 1)
