"""strata_client against a real strata-server (stories260K) on 127.0.0.1.

Run by run_tests.sh, which installs the package into a fresh venv first; needs
STRATA_SERVER_BIN (the strata-server binary) and STRATA_SHARED_DIR (models and data).
One server for the whole class: the tests run in name order and build on each other
(test_3_submit learns the task that test_4 and test_5 read).
"""

from __future__ import annotations

import io
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import grpc

import strata_client
from strata_client import Client, StrataError, format_report, format_tasks

SERVER_BIN = os.environ.get("STRATA_SERVER_BIN", "")
SHARED = Path(os.environ.get("STRATA_SHARED_DIR", ""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """strata-server on stories260K, 127.0.0.1, a free port and its own temporary state."""

    def __init__(self, *flags: str) -> None:
        self.tmp = tempfile.mkdtemp(prefix="strata-py-test-")
        self.address = f"127.0.0.1:{free_port()}"
        self.log_path = Path(self.tmp) / "server.log"
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
        self.proc = subprocess.Popen(
            [
                SERVER_BIN,
                f"--grpc_port={self.address.split(':')[1]}",
                "--metrics_port=0",
                "--http_port=0",
                f"--state_dir={self.tmp}/state",
                f"--model={SHARED}/models/stories260K",
                "--threads=2",
                "--serving_threads=1",
                "--shutdown_grace_seconds=2",
                *flags,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        if os.environ.get("STRATA_KEEP_TEST_DIR"):
            print(f"kept {self.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def start_server(*flags: str) -> ServerProcess:
    """Starts a server and waits until it is SERVING (stops it and raises otherwise)."""
    server = ServerProcess(*flags)
    try:
        with Client(server.address) as c:
            c.wait_ready(timeout=60)
    except StrataError as e:
        log = server.log()
        server.stop()
        raise AssertionError(f"strata-server did not start: {e}\n{log}") from None
    return server


@unittest.skipUnless(SERVER_BIN, "STRATA_SERVER_BIN not set")
class LiveServerTest(unittest.TestCase):
    server: ServerProcess
    tmp: str
    client: Client
    job_id: str = ""

    @classmethod
    def setUpClass(cls) -> None:
        cls.server = start_server()
        cls.tmp = cls.server.tmp
        # The address comes from the environment, as a user's would.
        os.environ["STRATA_SERVER"] = cls.server.address
        cls.client = Client()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.client.close()
        cls.server.stop()

    def server_log(self) -> str:
        return self.server.log()

    def test_0_installed_package_is_tested(self) -> None:
        # run_tests.sh installs into a venv; the copy under test must be that one, not the source.
        if os.environ.get("STRATA_EXPECT_INSTALLED"):
            self.assertIn(os.environ["STRATA_EXPECT_INSTALLED"], strata_client.__file__)
        self.assertEqual(self.client.address, os.environ["STRATA_SERVER"])

    def test_1_health_and_info(self) -> None:
        self.assertEqual(self.client.health(), "SERVING")
        info = self.client.info()
        self.assertEqual(info["model"]["name"], "stories260K")
        self.assertTrue(info["model"]["loaded"])
        self.assertGreater(info["model"]["parameter_count"], 0)
        self.assertIsInstance(info["weights_version"], int)
        self.assertEqual(info["method"], "share_ella")
        self.assertFalse(info["auth_required"])

    def test_2_generate_and_score(self) -> None:
        full = self.client.generate("Once upon a time", max_new_tokens=12, route="base")
        self.assertTrue(full.text)
        self.assertEqual(full.route, "base")
        self.assertIn(full.finish_reason, ("length", "eos"))
        self.assertGreater(full.completion_tokens, 0)
        self.assertEqual(len(full.token_ids), full.completion_tokens)

        stream = self.client.generate("Once upon a time", max_new_tokens=12, route="base", stream=True)
        pieces = list(stream)
        self.assertGreater(len(pieces), 1)
        # Greedy either way: the stream's pieces make up the same text.
        self.assertEqual("".join(pieces), full.text)
        self.assertEqual(stream.generation.text, full.text)
        self.assertEqual(stream.generation.finish_reason, full.finish_reason)
        self.assertEqual(full.logprobs, [], "no logprobs unless asked")

        with_lp = self.client.generate("Once upon a time", max_new_tokens=12, route="base", logprobs=2)
        self.assertEqual(with_lp.text, full.text)
        self.assertEqual([lp["token_id"] for lp in with_lp.logprobs], with_lp.token_ids)
        for lp in with_lp.logprobs:
            self.assertLessEqual(lp["logprob"], 0.0)
            self.assertEqual(len(lp["top"]), 2)
            self.assertEqual(lp["top"][0][0], lp["token_id"])  # greedy: the most likely token

        scored = self.client.score("Once upon a time there was a", [" little", " xylophone"], route="base")
        self.assertEqual(len(scored.scores), 2)
        self.assertEqual(scored.best_completion, " little")
        self.assertTrue(all(s.log_likelihood < 0 and s.tokens > 0 for s in scored.scores))
        self.assertEqual(scored.route, "base")

        ids = self.client.tokenize("Once upon a time")["ids"]
        self.assertGreater(len(ids), 0)

    def test_2_errors_carry_code_and_message(self) -> None:
        with self.assertRaises(StrataError) as e:
            self.client.job("job-999999")
        self.assertEqual(e.exception.code, grpc.StatusCode.NOT_FOUND)
        self.assertIn("job-999999", e.exception.message)
        with self.assertRaises(StrataError) as e:
            self.client.generate("x", route="no-such-task")
        self.assertEqual(e.exception.code_name, "NOT_FOUND")
        with self.assertRaises(StrataError) as e:
            list(self.client.watch("job-999999"))
        self.assertEqual(e.exception.code, grpc.StatusCode.NOT_FOUND)
        # A bad line is refused with its line number; nothing is queued.
        bad = Path(self.tmp) / "bad.jsonl"
        bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 1}\n')
        with self.assertRaises(StrataError) as e:
            self.client.submit("bad", bad, progress=False)
        self.assertEqual(e.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn(":2", e.exception.message)
        self.assertEqual(self.client.jobs(), [])
        with self.assertRaises(FileNotFoundError):
            self.client.submit("missing", Path(self.tmp) / "missing.jsonl")

    def test_3_submit_and_follow(self) -> None:
        data = SHARED / "data" / "cl-small" / "capitals"
        train = Path(self.tmp) / "capitals-train.jsonl"
        test = Path(self.tmp) / "capitals-test.jsonl"
        train.write_text("".join((data / "train.jsonl").read_text().splitlines(True)[:40]))
        test.write_text("".join((data / "test.jsonl").read_text().splitlines(True)[:16]))
        upload = io.StringIO()
        # 1 KiB chunks: the 40 lines travel in several messages.
        job = self.client.submit(
            "capitals", train, test, max_steps=4, batch_size=4, progress=upload, chunk_bytes=1024
        )
        self.assertTrue(job["id"].startswith("job-"), job)
        self.assertEqual(job["task_name"], "capitals")
        self.assertEqual(job["train_examples"], 40)
        self.assertEqual(job["eval_examples"], 16)
        lines = upload.getvalue().splitlines()
        self.assertTrue(lines, "no upload progress")
        self.assertIn("56 lines", lines[-1])  # 40 training + 16 eval
        self.assertIn("[" + "#" * 30 + "]", lines[-1])

        kinds = []
        last = None
        for event in self.client.watch(job["id"]):
            kinds.append(event["kind"])
            last = event["job"]
        self.assertEqual(kinds[0], "snapshot")
        self.assertIsNotNone(last)
        self.assertEqual(last["state"], "succeeded", self.server_log())

        followed = io.StringIO()
        final = self.client.wait(job["id"], progress=followed)  # an ended job: its snapshot
        self.assertEqual(final["state"], "succeeded")
        self.assertIn("succeeded", followed.getvalue())
        self.assertGreater(final["weights_version"], 0)
        self.assertEqual([r["task"] for r in final["eval_results"]], ["capitals"])
        self.assertIsNotNone(final["finished"])
        self.assertEqual(self.client.job(job["id"])["state"], "succeeded")
        self.assertEqual([j["id"] for j in self.client.jobs(state="succeeded")], [job["id"]])
        self.assertEqual(self.client.jobs(state="failed"), [])
        type(self).job_id = job["id"]

    def test_4_tasks_and_report(self) -> None:
        if not self.job_id:
            self.skipTest("test_3 did not learn a task")
        tasks = self.client.tasks()
        self.assertEqual([t["name"] for t in tasks], ["capitals"])
        t = tasks[0]
        self.assertEqual(t["index"], 1)
        self.assertEqual(t["job_id"], self.job_id)
        self.assertEqual(t["eval_examples"], 16)
        self.assertTrue(0.0 <= t["learned_score"] <= 1.0)
        self.assertIn("capitals", format_tasks(tasks))
        self.assertEqual(self.client.task("capitals")["name"], "capitals")

        report = self.client.report()
        self.assertEqual(report["tasks"], ["capitals"])
        self.assertEqual(len(report["matrix"]), 1)
        self.assertEqual(len(report["matrix"][0]["scores"]), 1)
        self.assertAlmostEqual(report["average_score"], report["matrix"][0]["scores"][0])
        self.assertIsNone(report["backward_transfer"])  # needs 2 tasks
        self.assertGreater(report["weights_version"], 0)
        text = format_report(report)
        self.assertIn("accuracy matrix, merged weights", text)
        self.assertIn("after capitals", text)
        self.assertIn("- (needs 2 tasks)", text)
        print("\n" + text, file=sys.stderr)

    def test_5_generate_on_the_learned_task(self) -> None:
        if not self.job_id:
            self.skipTest("test_3 did not learn a task")
        g = self.client.generate("The capital of France is", route="capitals", max_new_tokens=4)
        self.assertEqual(g.route, "capitals")
        self.assertFalse(g.route_automatic)
        self.assertEqual(g.weights_version, self.client.info()["weights_version"])
        versions = self.client.versions()
        self.assertTrue(any(v["served"] for v in versions))

    def test_6_module_cli(self) -> None:
        run = [sys.executable, "-m", "strata_client"]
        health = subprocess.run(run + ["health"], capture_output=True, text=True, timeout=60)
        self.assertEqual((health.returncode, health.stdout), (0, "SERVING\n"), health.stderr)
        tasks = subprocess.run(run + ["tasks"], capture_output=True, text=True, timeout=60)
        self.assertEqual(tasks.returncode, 0, tasks.stderr)
        self.assertIn("capitals", tasks.stdout)
        unknown = subprocess.run(run + ["watch", "job-999999"], capture_output=True, text=True, timeout=60)
        self.assertEqual(unknown.returncode, 1)
        self.assertIn("NOT_FOUND", unknown.stderr)


@unittest.skipUnless(SERVER_BIN, "STRATA_SERVER_BIN not set")
class AuthTest(unittest.TestCase):
    """A server started with --auth_token_file: the token travels as `authorization: Bearer`."""

    def test_token(self) -> None:
        token_dir = tempfile.mkdtemp(prefix="strata-py-token-")
        token_file = Path(token_dir) / "token"
        token_file.write_text("python-client-secret\n")
        server = start_server(f"--auth_token_file={token_file}")
        try:
            with Client(server.address) as anonymous:
                self.assertEqual(anonymous.health(), "SERVING")  # health stays open
                with self.assertRaises(StrataError) as e:
                    anonymous.jobs()
                self.assertEqual(e.exception.code, grpc.StatusCode.UNAUTHENTICATED)
            with Client(server.address, token_file=token_file) as client:
                self.assertEqual(client.jobs(), [])
                self.assertTrue(client.info()["auth_required"])
            with Client(server.address, token="wrong") as client:
                with self.assertRaises(StrataError) as e:
                    client.report()
                self.assertEqual(e.exception.code_name, "UNAUTHENTICATED")
        finally:
            server.stop()
            shutil.rmtree(token_dir, ignore_errors=True)


class OfflineTest(unittest.TestCase):
    """What needs no server: errors when none answers, arguments, and the tables."""

    def test_unreachable_server_is_unavailable(self) -> None:
        with Client(f"127.0.0.1:{free_port()}", timeout=5) as client:
            with self.assertRaises(StrataError) as e:
                client.health()
            self.assertEqual(e.exception.code, grpc.StatusCode.UNAVAILABLE)
            with self.assertRaises(StrataError):
                client.wait_ready(timeout=0.5)

    def test_token_file_and_address_from_the_environment(self) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".token") as f:
            f.write("s3cret\n")
            f.flush()
            old = dict(os.environ)
            os.environ.update(STRATA_SERVER="127.0.0.1:1", STRATA_AUTH_TOKEN_FILE=f.name)
            try:
                client = Client()
            finally:
                os.environ.clear()
                os.environ.update(old)
        self.assertEqual(client.address, "127.0.0.1:1")
        self.assertEqual(client.metadata, (("authorization", "Bearer s3cret"),))
        client.close()

    def test_submit_argument_errors(self) -> None:
        with Client("127.0.0.1:1") as client:
            with self.assertRaises(ValueError):
                client.submit("t", __file__, __file__, eval_fraction=0.2)
            with self.assertRaises(ValueError):
                client.submit("t", __file__, scorer="best")

    def test_report_table(self) -> None:
        report = {
            "tasks": ["a", "b"],
            "matrix": [{"scores": [0.5, 0.1]}, {"scores": [0.25, 0.75]}],
            "base": [0.0, 0.125],
            "average_score": 0.5,
            "backward_transfer": -0.25,
            "forward_transfer": None,
            "forgetting": 0.25,
            "reference_nll": [2.0, float("nan"), 2.5],
            "method": "share_ella",
            "weights_version": 2,
            "adaptation_state_bytes": 2048,
        }
        text = format_report(report)
        self.assertIn("method share_ella, weights version 2, 2 task(s) learned, adaptation state 2.0 KiB", text)
        self.assertIn("base model  0.0000  0.1250", text)
        self.assertIn("after b     0.2500  0.7500", text)
        self.assertIn("backward transfer (BWT)  -0.2500", text)
        self.assertIn("forward transfer (FWT)   - (needs 2 tasks)", text)
        self.assertIn("reference NLL, merged    base 2.0000, b 2.5000", text)
        self.assertTrue(math.isnan(report["reference_nll"][1]))  # not modified


if __name__ == "__main__":
    unittest.main(verbosity=2)
