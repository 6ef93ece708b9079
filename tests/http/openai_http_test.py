#!/usr/bin/env python3
"""The OpenAI-compatible HTTP API against a real strata-server on 127.0.0.1 (stories260K).

Python's own HTTP client (http.client) and curl, as users' tools would call it: /health,
/v1/models, /v1/completions (one prompt, a list, n, seed, stop, logprobs, echo), streaming as
server-sent events (chunks, finish_reason, usage, [DONE]), OpenAI's error JSON with the HTTP codes,
a learned task as a model id (and its greedy text equal to gRPC's on the same route), and the bearer
token when inference auth is on.

Usage: openai_http_test.py BUILD_DIR SHARED_DIR
"""

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest

BUILD = SHARED = None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One strata-server on loopback with its own state directory."""

    def __init__(self, extra=()):
        self.dir = tempfile.mkdtemp(prefix="strata-http-")
        self.grpc = free_port()
        self.http = free_port()
        self.log = open(os.path.join(self.dir, "server.log"), "w")
        argv = [os.path.join(BUILD, "server", "strata-server"), f"--grpc_port={self.grpc}",
                f"--http_port={self.http}", "--metrics_port=0", f"--state_dir={self.dir}/state",
                f"--model={SHARED}/models/stories260K", "--threads=2", "--serving_threads=1",
                "--max_steps=30", "--batch_size=8", "--shutdown_grace_seconds=5", *extra]
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("strata-server exited:\n" + self.read_log())
            try:
                status, _, _ = self.request("GET", "/health")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("strata-server did not serve HTTP within 120 s:\n" + self.read_log())

    def read_log(self):
        with open(os.path.join(self.dir, "server.log")) as f:
            return f.read()

    def request(self, method, path, body=None, headers=None, timeout=120):
        conn = http.client.HTTPConnection("127.0.0.1", self.http, timeout=timeout)
        data = None if body is None else (body if isinstance(body, (bytes, str)) else json.dumps(body))
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read().decode()
        conn.close()
        return resp.status, dict(resp.getheaders()), raw

    def json(self, method, path, body=None, headers=None):
        status, hdrs, raw = self.request(method, path, body, headers)
        return status, json.loads(raw)

    def cli(self, *args):
        out = subprocess.run([os.path.join(BUILD, "client", "strata"), "--server", f"127.0.0.1:{self.grpc}",
                              *args], capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise AssertionError(f"strata {' '.join(args)} failed ({out.returncode}): {out.stderr}")
        return out.stdout

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def sse_events(server, body):
    """POSTs a streaming completion; returns the parsed data events (the last one is '[DONE]')."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http, timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, (resp.status, resp.read())
    assert resp.getheader("Content-Type").startswith("text/event-stream"), resp.getheader("Content-Type")
    events = []
    buf = b""
    while True:
        chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(1)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            line = event.decode()
            assert line.startswith("data: "), line
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    conn.close()
    return events


class OpenAiHttpTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.s = Server()

    @classmethod
    def tearDownClass(cls):
        cls.s.stop()

    def test_health_and_models(self):
        status, _, raw = self.s.request("GET", "/health")
        self.assertEqual(status, 200)
        status, body = self.s.json("GET", "/v1/models")
        self.assertEqual(status, 200)
        self.assertEqual(body["object"], "list")
        ids = [m["id"] for m in body["data"]]
        self.assertEqual(ids[:3], ["auto", "base", "merged"])
        for m in body["data"]:
            self.assertEqual(m["object"], "model")
            self.assertIsInstance(m["created"], int)

    def test_completion_greedy_matches_grpc(self):
        body = {"model": "base", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
        status, r = self.s.json("POST", "/v1/completions", body)
        self.assertEqual(status, 200, r)
        self.assertEqual(r["object"], "text_completion")
        self.assertTrue(r["id"].startswith("cmpl-"))
        self.assertEqual(r["model"], "base")
        self.assertEqual(len(r["choices"]), 1)
        c = r["choices"][0]
        self.assertEqual(c["index"], 0)
        self.assertIn(c["finish_reason"], ("length", "stop"))
        self.assertIsNone(c["logprobs"])
        self.assertTrue(c["text"])
        u = r["usage"]
        self.assertGreater(u["prompt_tokens"], 0)
        self.assertEqual(u["total_tokens"], u["prompt_tokens"] + u["completion_tokens"])
        if c["finish_reason"] == "length":
            self.assertEqual(u["completion_tokens"], 12)
        # The same scheduler as gRPC: the same greedy text on the same route.
        grpc = json.loads(self.s.cli("--json", "generate", "--prompt", "Once upon a time", "--max-tokens", "12",
                                     "--temperature", "0", "--route", "base"))
        self.assertEqual(c["text"], grpc["text"])

    def test_list_of_prompts_n_and_seed(self):
        body = {"model": "base", "prompt": ["Tom had a dog", "The sun was"], "max_tokens": 8, "n": 2,
                "temperature": 0.9, "seed": 7}
        status, r = self.s.json("POST", "/v1/completions", body)
        self.assertEqual(status, 200, r)
        self.assertEqual([c["index"] for c in r["choices"]], [0, 1, 2, 3])
        status, again = self.s.json("POST", "/v1/completions", body)
        self.assertEqual([c["text"] for c in again["choices"]], [c["text"] for c in r["choices"]],
                         "a seed makes sampling repeatable")
        # Choices of one prompt sample with seed + j: not all equal over several tokens.
        self.assertNotEqual(r["choices"][0]["text"] + r["choices"][2]["text"],
                            r["choices"][1]["text"] + r["choices"][3]["text"])

    def test_stop_and_echo(self):
        status, r = self.s.json("POST", "/v1/completions",
                                {"model": "base", "prompt": "Once upon a time", "max_tokens": 40,
                                 "temperature": 0, "stop": ["."], "echo": True})
        self.assertEqual(status, 200, r)
        c = r["choices"][0]
        self.assertTrue(c["text"].startswith("Once upon a time"), c["text"])
        self.assertNotIn(".", c["text"][len("Once upon a time"):])

    def test_logprobs(self):
        status, r = self.s.json("POST", "/v1/completions",
                                {"model": "base", "prompt": "Once upon a time", "max_tokens": 6,
                                 "temperature": 0, "logprobs": 3, "ignore_eos": True})
        self.assertEqual(status, 200, r)
        lp = r["choices"][0]["logprobs"]
        self.assertEqual(len(lp["tokens"]), r["usage"]["completion_tokens"])
        self.assertEqual(len(lp["token_logprobs"]), len(lp["tokens"]))
        for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
            self.assertLessEqual(logprob, 0.0)
            self.assertGreaterEqual(len(top), 3)
            # Greedy: the chosen token is the most likely one.
            self.assertAlmostEqual(max(top.values()), logprob, places=5)
            self.assertIn(token, top)

    def test_stream(self):
        body = {"model": "base", "prompt": "Lily wanted to play", "max_tokens": 16, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}, "logprobs": 1}
        events = sse_events(self.s, body)
        self.assertEqual(events[-1], "[DONE]")
        chunks = events[:-1]
        usage = chunks[-1]
        self.assertEqual(usage["choices"], [])
        text = ""
        tokens = 0
        finish = None
        for ch in chunks[:-1]:
            self.assertEqual(ch["object"], "text_completion")
            self.assertEqual(len(ch["choices"]), 1)
            c = ch["choices"][0]
            text += c["text"]
            tokens += len(c["logprobs"]["tokens"])
            if c["finish_reason"] is not None:
                self.assertIsNone(finish, "one final chunk per choice")
                finish = c["finish_reason"]
        self.assertIn(finish, ("length", "stop"))
        self.assertGreater(len(chunks), 3, "the text streams in pieces")
        self.assertEqual(usage["usage"]["completion_tokens"], tokens)
        status, whole = self.s.json("POST", "/v1/completions", {k: v for k, v in body.items()
                                                                if k not in ("stream", "stream_options")})
        self.assertEqual(text, whole["choices"][0]["text"])

    def test_stream_with_echo_and_n(self):
        events = sse_events(self.s, {"model": "base", "prompt": "Once upon a time", "max_tokens": 4, "n": 2,
                                     "seed": 3, "echo": True, "stream": True})
        self.assertEqual(events[-1], "[DONE]")
        texts = {0: "", 1: ""}
        finished = set()
        for ch in events[:-1]:
            c = ch["choices"][0]
            self.assertEqual(c["route"], "base")
            texts[c["index"]] += c["text"]
            if c["finish_reason"] is not None:
                finished.add(c["index"])
        self.assertEqual(finished, {0, 1})
        for text in texts.values():
            self.assertTrue(text.startswith("Once upon a time"), text)
            self.assertGreater(len(text), len("Once upon a time"))

    def test_curl(self):
        url = f"http://127.0.0.1:{self.s.http}/v1/completions"
        out = subprocess.run(["curl", "-sS", "-f", url, "-H", "Content-Type: application/json", "-d",
                              json.dumps({"model": "base", "prompt": "Once upon a time", "max_tokens": 5,
                                          "temperature": 0})], capture_output=True, text=True, timeout=120)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(json.loads(out.stdout)["object"], "text_completion")
        out = subprocess.run(["curl", "-sS", "-N", url, "-H", "Content-Type: application/json", "-d",
                              json.dumps({"model": "base", "prompt": "Once upon a time", "max_tokens": 5,
                                          "stream": True})], capture_output=True, text=True, timeout=120)
        self.assertEqual(out.returncode, 0, out.stderr)
        lines = [l for l in out.stdout.split("\n") if l]
        self.assertTrue(all(l.startswith("data: ") for l in lines), out.stdout)
        self.assertEqual(lines[-1], "data: [DONE]")
        out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                              f"http://127.0.0.1:{self.s.http}/v1/nowhere"], capture_output=True, text=True,
                             timeout=60)
        self.assertEqual(out.stdout, "404")

    def test_errors(self):
        def error(body, code, param=None, path="/v1/completions", method="POST"):
            status, hdrs, raw = self.s.request(method, path, body)
            self.assertEqual(status, code, raw)
            e = json.loads(raw)["error"]
            self.assertTrue(e["message"])
            self.assertIn("type", e)
            if param is not None:
                self.assertEqual(e["param"], param, e)
            return e

        e = error({"model": "no-such-task", "prompt": "hi"}, 404, "model")
        self.assertEqual(e["code"], "model_not_found")
        self.assertIn("no-such-task", e["message"])
        error({"prompt": "hi", "max_tokens": -1}, 400, "max_tokens")
        error({"prompt": "hi", "max_tokens": 10**7}, 400, "max_tokens")
        error({"prompt": "hi", "temperature": "hot"}, 400, "temperature")
        error({"prompt": "hi", "top_p": 0}, 400, "top_p")
        error({"prompt": "hi", "max_token": 5}, 400, "max_token")
        error({"prompt": "hi", "logprobs": True}, 400, "logprobs")
        error({"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty")
        error({"prompt": [1, 2, 3]}, 400, "prompt")
        error({"prompt": ""}, 400, "prompt")
        error({"model": "base"}, 400, "prompt")
        e = error("{not json", 400)
        self.assertIn("JSON", e["message"])
        error(None, 404, path="/v1/nowhere", method="GET")
        error({"prompt": "hi"}, 404, path="/v1/chat/completions")

    def test_learned_task_is_a_model(self):
        train = f"{SHARED}/data/cl-small/capitals/train.jsonl"
        self.s.cli("submit", "--task", "capitals", train, "--steps", "20", "--wait")
        status, body = self.s.json("GET", "/v1/models")
        self.assertIn("capitals", [m["id"] for m in body["data"]])
        prompt = "The capital of France is"
        status, r = self.s.json("POST", "/v1/completions",
                                {"model": "capitals", "prompt": prompt, "max_tokens": 6, "temperature": 0})
        self.assertEqual(status, 200, r)
        self.assertEqual(r["choices"][0]["route"], "capitals")
        grpc = json.loads(self.s.cli("--json", "generate", "--prompt", prompt, "--max-tokens", "6",
                                     "--temperature", "0", "--route", "capitals"))
        self.assertEqual(r["choices"][0]["text"], grpc["text"])


class PortTest(unittest.TestCase):
    def test_http_port_in_use_is_refused(self):
        first = Server()
        try:
            d = tempfile.mkdtemp()
            out = subprocess.run([os.path.join(BUILD, "server", "strata-server"), f"--grpc_port={free_port()}",
                                  f"--http_port={first.http}", "--metrics_port=0", f"--state_dir={d}/state",
                                  "--threads=1"], capture_output=True, text=True, timeout=120)
            shutil.rmtree(d, ignore_errors=True)
            self.assertEqual(out.returncode, 2, out.stderr)
            self.assertIn(f"cannot listen for HTTP on 127.0.0.1:{first.http}", out.stderr)
        finally:
            first.stop()


class AuthTest(unittest.TestCase):
    def test_bearer_token(self):
        token_dir = tempfile.mkdtemp()
        token_file = os.path.join(token_dir, "token")
        with open(token_file, "w") as f:
            f.write("s3cret\n")
        s = Server([f"--auth_token_file={token_file}", "--auth_inference"])
        try:
            body = {"prompt": "Once", "max_tokens": 2}
            status, _, raw = s.request("POST", "/v1/completions", body)
            self.assertEqual(status, 401, raw)
            self.assertEqual(json.loads(raw)["error"]["type"], "authentication_error")
            status, _, raw = s.request("POST", "/v1/completions", body, {"Authorization": "Bearer wrong"})
            self.assertEqual(status, 401, raw)
            status, _, raw = s.request("GET", "/v1/models", None, {"Authorization": "Bearer s3cret"})
            self.assertEqual(status, 200, raw)
            status, _, raw = s.request("POST", "/v1/completions", body, {"Authorization": "Bearer s3cret"})
            self.assertEqual(status, 200, raw)
        finally:
            s.stop()
            shutil.rmtree(token_dir, ignore_errors=True)


if __name__ == "__main__":
    BUILD, SHARED = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    unittest.main(argv=sys.argv[:1], verbosity=2)
