"""The Strata client: one gRPC channel to a strata-server and a method per call of its API.

Resources (jobs, tasks, the report, server info, versions) come back as plain dicts with every
field of the proto message (see _convert.py: ints stay ints, enums are short names such as
"succeeded", timestamps are datetimes, unset optional fields are None). Inference results come back
as the dataclasses Generation and ScoreResult. Every error the server (or the transport) reports is
raised as StrataError with the gRPC status code and the server's message.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Any,
    Dict,
    Iterator,
    List,
    Literal,
    Mapping,
    Optional,
    Sequence,
    TextIO,
    Tuple,
    Union,
    overload,
)

import grpc


from . import pb
from ._convert import enum_number, to_python
from .progress import ProgressLine, bar, format_bytes, format_duration

DEFAULT_ADDRESS = "127.0.0.1:50051"
#: Bytes of JSONL per SubmitTask message, as the strata CLI sends them.
CHUNK_BYTES = 64 * 1024
_MAX_MESSAGE_BYTES = 256 << 20
_UNSET: Any = object()

PathLike = Union[str, "os.PathLike[str]"]
ProgressArg = Union[bool, TextIO, None]

_TERMINAL_STATES = ("succeeded", "failed", "cancelled", "held", "rolled_back")


class StrataError(Exception):
    """A call failed: `code` is the grpc.StatusCode (e.g. NOT_FOUND, INVALID_ARGUMENT, UNAVAILABLE
    when no server answers), `message` the server's explanation, `method` the RPC."""

    def __init__(self, method: str, code: grpc.StatusCode, message: str) -> None:
        self.method = method
        self.code = code
        self.message = message
        super().__init__(f"{method} failed: {code.name}: {message}")

    @property
    def code_name(self) -> str:
        """The status code's name, e.g. "NOT_FOUND"."""
        return self.code.name

    @classmethod
    def from_rpc_error(cls, method: str, error: grpc.RpcError) -> "StrataError":
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(method, code or grpc.StatusCode.UNKNOWN, details or "")


@dataclass
class CompletionScore:
    """One completion's log-likelihood given the prompt (sum over its `tokens` tokens)."""

    completion: str
    log_likelihood: float
    tokens: int


@dataclass
class ScoreResult:
    """Client.score(): every completion's score, the index of the best, and where it was served."""

    scores: List[CompletionScore]
    best: int
    weights_version: int
    route: str
    route_automatic: bool
    route_confidence: float

    @property
    def best_completion(self) -> str:
        return self.scores[self.best].completion


@dataclass
class Generation:
    """A finished generation: the text, why it stopped ("length", "eos", "stop", "cancelled"), the
    route that served it (a task name, "base" or "merged"), whether the router chose it, with what
    confidence, and the weights version."""

    text: str = ""
    finish_reason: str = ""
    route: str = ""
    route_automatic: bool = False
    route_confidence: float = 0.0
    weights_version: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token_seconds: float = 0.0
    token_ids: List[int] = field(default_factory=list)
    # With generate(logprobs=N): one entry per token id, as
    # {"token_id", "token", "logprob", "top": [(token_id, token, logprob), ...]} (natural log, the
    # model's distribution before temperature/top-k/top-p; top has the N most likely, best first).
    logprobs: List[Dict[str, Any]] = field(default_factory=list)


class GenerateStream:
    """Client.generate(stream=True): iterate to get the text pieces as the server streams them.

    `generation` fills in as the pieces arrive (text so far, route, weights version; the finish
    reason and token counts once the stream ends). `cancel()` stops the generation; `result()`
    reads the rest and returns the Generation. Errors are raised as StrataError while iterating."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._done = False
        self.generation = Generation()

    def __iter__(self) -> "GenerateStream":
        return self

    def __next__(self) -> str:
        while True:
            if self._done:
                raise StopIteration
            try:
                response = next(self._call)
            except StopIteration:
                self._done = True
                raise
            except grpc.RpcError as e:
                self._done = True
                raise StrataError.from_rpc_error("Generate", e) from None
            g = self.generation
            g.text += response.text
            g.token_ids.extend(response.token_ids)
            for lp in response.logprobs:
                g.logprobs.append(
                    {
                        "token_id": lp.token_id,
                        "token": lp.token,
                        "logprob": lp.logprob,
                        "top": [(t.token_id, t.token, t.logprob) for t in lp.top_logprobs],
                    }
                )
            g.route = response.route or g.route
            g.route_automatic = response.route_automatic
            g.route_confidence = response.route_confidence
            g.weights_version = response.weights_version or g.weights_version
            g.finish_reason = response.finish_reason or g.finish_reason
            g.prompt_tokens = response.prompt_tokens or g.prompt_tokens
            g.completion_tokens = response.completion_tokens or g.completion_tokens
            g.time_to_first_token_seconds = (
                response.time_to_first_token_seconds or g.time_to_first_token_seconds
            )
            if response.text:
                return response.text

    def cancel(self) -> None:
        """Stops the generation (the server frees its batch slot)."""
        self._done = True
        self._call.cancel()

    def result(self) -> Generation:
        """Reads the rest of the stream; returns the whole Generation."""
        for _ in self:
            pass
        return self.generation


def _progress_stream(progress: ProgressArg) -> Optional[TextIO]:
    if progress is True:
        return sys.stderr
    if not progress:
        return None
    return progress  # a file-like object


def job_progress_text(job: Mapping[str, Any]) -> str:
    """One line about a job, as `strata watch` draws it."""
    head = f"{job['id']} {job['task_name']}"
    state = job["state"]
    p = job.get("progress") or {}
    if state == "queued":
        return f"{head}: queued (position {job['queue_position']})"
    if state == "training":
        total = p.get("total_steps") or 0
        if total <= 0:
            return f"{head}: training"
        step = p.get("step") or 0
        text = f"{head}: training {bar(step / total)} {step}/{total} loss {p.get('loss', 0.0):.4f}"
        if 0 < step < total:
            text += " ETA " + format_duration(p.get("eta_seconds") or 0.0)
        return text
    if state == "evaluating":
        return f"{head}: evaluating every task"
    return f"{head}: {state}" + (f" ({job['error']})" if job.get("error") else "")


class Client:
    """A connection to one strata-server.

    Args:
        address: "host:port"; default $STRATA_SERVER, else 127.0.0.1:50051.
        token: bearer token for a server started with --auth_token_file.
        token_file: file holding the token (read once, whitespace stripped); default
            $STRATA_AUTH_TOKEN_FILE when `token` is not given.
        root_certificates: PEM CA certificates (bytes, or a path) to reach a server started with
            --tls_cert/--tls_key; `tls=True` without them uses the system's roots.
        tls_server_name: the name the server certificate must carry (default: the address's host).
        timeout: deadline in seconds of unary calls (not of submit, watch/wait and generate).

    The channel connects lazily; close() (or `with Client() as c:`) releases it. One Client may be
    used from several threads.
    """

    def __init__(
        self,
        address: Optional[str] = None,
        *,
        token: Optional[str] = None,
        token_file: Optional[PathLike] = None,
        root_certificates: Union[bytes, PathLike, None] = None,
        tls: Optional[bool] = None,
        tls_server_name: Optional[str] = None,
        timeout: float = 30.0,
    ) -> None:
        self.address = address or os.environ.get("STRATA_SERVER") or DEFAULT_ADDRESS
        self.timeout = timeout
        if token is None:
            token_file = token_file or os.environ.get("STRATA_AUTH_TOKEN_FILE") or None
            if token_file:
                token = Path(token_file).read_text(encoding="utf-8").strip()
        self._metadata: Tuple[Tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        options: List[Tuple[str, Any]] = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
        ]
        if root_certificates is not None or tls:
            certs = root_certificates
            if certs is not None and not isinstance(certs, bytes):
                certs = Path(certs).read_bytes()
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            credentials = grpc.ssl_channel_credentials(root_certificates=certs)
            self._channel = grpc.secure_channel(self.address, credentials, options)
        else:
            self._channel = grpc.insecure_channel(self.address, options)
        #: The raw stubs, for calls this class does not wrap (pass metadata=client.metadata).
        self.adaptation = pb.adaptation_pb2_grpc.AdaptationServiceStub(self._channel)
        self.inference = pb.inference_pb2_grpc.InferenceServiceStub(self._channel)
        self.admin = pb.admin_pb2_grpc.AdminServiceStub(self._channel)
        self.health_stub = pb.health_pb2_grpc.HealthStub(self._channel)

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def metadata(self) -> Tuple[Tuple[str, str], ...]:
        """The call metadata (the bearer token, when one is set)."""
        return self._metadata

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.address!r})"

    def _unary(self, method: str, fn: Any, request: Any, timeout: Any = _UNSET) -> Any:
        try:
            return fn(
                request,
                timeout=self.timeout if timeout is _UNSET else timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as e:
            raise StrataError.from_rpc_error(method, e) from None

    # -- server --------------------------------------------------------------------------------

    def health(self, service: str = "", timeout: Optional[float] = _UNSET) -> str:
        """The grpc.health.v1 status: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN"."""
        request = pb.health_pb2.HealthCheckRequest(service=service)
        response = self._unary("health check", self.health_stub.Check, request, timeout)
        return pb.health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Waits until the server answers SERVING; StrataError (the last error) after `timeout` s."""
        import time

        deadline = time.monotonic() + timeout
        last: Optional[StrataError] = None
        while True:
            try:
                status = self.health(timeout=max(0.1, min(2.0, deadline - time.monotonic())))
                if status == "SERVING":
                    return
                last = StrataError("health check", grpc.StatusCode.UNAVAILABLE, status)
            except StrataError as e:
                last = e
            if time.monotonic() >= deadline:
                raise last
            time.sleep(0.2)

    def info(self) -> Dict[str, Any]:
        """What the server is: version, git commit, device, BLAS, threads, model (a dict), weights
        version, tasks learned, method, uptime, whether auth and TLS are on."""
        return to_python(
            self._unary("GetServerInfo", self.admin.GetServerInfo, pb.admin_pb2.GetServerInfoRequest())
        )

    def versions(self) -> List[Dict[str, Any]]:
        """The kept weights versions, newest first (published and candidate)."""
        response = self._unary(
            "ListVersions", self.admin.ListVersions, pb.admin_pb2.ListVersionsRequest()
        )
        return [to_python(v) for v in response.versions]

    # -- adaptation ----------------------------------------------------------------------------

    def submit(
        self,
        task: str,
        train_path: PathLike,
        eval_path: Optional[PathLike] = None,
        *,
        method: Optional[str] = None,
        scorer: Optional[str] = None,
        description: str = "",
        eval_fraction: Optional[float] = None,
        eval_cap: Optional[int] = None,
        min_score: Optional[float] = None,
        learning_rate: Optional[float] = None,
        max_steps: Optional[int] = None,
        epochs: Optional[int] = None,
        batch_size: Optional[int] = None,
        rank: Optional[int] = None,
        alpha: Optional[float] = None,
        ella_lambda: Optional[float] = None,
        seed: Optional[int] = None,
        max_seq_len: Optional[int] = None,
        progress: ProgressArg = True,
        wait: bool = False,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> Dict[str, Any]:
        """Streams a task's JSONL data to the server (as `strata submit` does) and returns its job.

        Each line of `train_path` (and `eval_path`) is {"prompt", "completion"[, "choices"]} or
        {"text"}; the server validates every line before queueing anything (INVALID_ARGUMENT naming
        the line otherwise). Without `eval_path` the server holds out `eval_fraction` (default 0.1,
        at most `eval_cap`, default 200) of the training examples. `scorer`: "choice",
        "exact_match" or "nll" (default: choice when examples have choices). `min_score`: the
        publish gate's least score for this task. The training overrides (`learning_rate` ...
        `max_seq_len`) default to the server's settings.

        `progress`: True draws an upload bar on stderr (and with `wait` the job's progress), a file
        object draws it there, False draws nothing. `wait`: follow the job until it ends and return
        its final state (see wait()).

        Returns the job as a dict ("id", "state", ...). Raises StrataError when the server refuses
        the task, FileNotFoundError for a missing file, ValueError for conflicting arguments.
        """
        if eval_path is not None and (eval_fraction is not None or eval_cap is not None):
            raise ValueError("eval_fraction / eval_cap apply only without eval_path")
        files = [(Path(train_path), False)]
        if eval_path is not None:
            files.append((Path(eval_path), True))
        for path, _ in files:
            if not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")
        total = sum(path.stat().st_size for path, _ in files)

        apb = pb.adaptation_pb2
        spec = apb.TaskSpec(name=task, method=method or "", description=description)
        if scorer:
            spec.scorer = enum_number(apb.Scorer.DESCRIPTOR, scorer)
        if eval_fraction is not None:
            spec.eval_fraction = eval_fraction
        if eval_cap is not None:
            spec.eval_cap = eval_cap
        if min_score is not None:
            spec.min_score = min_score
        overrides = {
            "learning_rate": learning_rate,
            "max_steps": max_steps,
            "epochs": epochs,
            "batch_size": batch_size,
            "rank": rank,
            "alpha": alpha,
            "ella_lambda": ella_lambda,
            "seed": seed,
            "max_seq_len": max_seq_len,
        }
        for name, value in overrides.items():
            if value is not None:
                setattr(spec.overrides, name, value)

        stream = _progress_stream(progress)
        line = ProgressLine(stream) if stream is not None else None
        counts = {"sent": 0, "lines": 0}

        def text() -> str:
            fraction = counts["sent"] / total if total > 0 else 1.0
            return (
                f"upload {bar(fraction)} {format_bytes(counts['sent'])} / {format_bytes(total)}, "
                f"{counts['lines']} lines"
            )

        def requests() -> Iterator[Any]:
            # gRPC reads this iterator on its own thread while the call is open.
            yield apb.SubmitTaskRequest(spec=spec)
            for path, is_eval in files:
                with open(path, "rb") as f:
                    while True:
                        data = f.read(chunk_bytes)
                        if not data:
                            break
                        chunk = apb.DataChunk(jsonl=data)
                        yield apb.SubmitTaskRequest(eval=chunk) if is_eval else apb.SubmitTaskRequest(
                            train=chunk
                        )
                        counts["sent"] += len(data)
                        counts["lines"] += data.count(b"\n")
                        if line:
                            line.update(text())

        try:
            job = self.adaptation.SubmitTask(requests(), metadata=self._metadata)
        except grpc.RpcError as e:
            if line:
                line.finish(text() + " (refused)")
            raise StrataError.from_rpc_error("SubmitTask", e) from None
        if line:
            line.finish(text())
        result = to_python(job)
        if wait:
            return self.wait(result["id"], progress=progress)
        return result

    def job(self, job_id: str) -> Dict[str, Any]:
        """One job (NOT_FOUND for an unknown id)."""
        request = pb.adaptation_pb2.GetJobRequest(id=job_id)
        return to_python(self._unary("GetJob", self.adaptation.GetJob, request))

    def jobs(self, state: Optional[str] = None) -> List[Dict[str, Any]]:
        """Every job, newest first; `state` ("queued", "training", ..., "failed") filters."""
        apb = pb.adaptation_pb2
        request = apb.ListJobsRequest(page_size=500)
        if state:
            request.state = enum_number(apb.JobState.DESCRIPTOR, state)
        jobs: List[Dict[str, Any]] = []
        while True:
            page = self._unary("ListJobs", self.adaptation.ListJobs, request)
            jobs.extend(to_python(j) for j in page.jobs)
            if not page.next_page_token:
                return jobs
            request.page_token = page.next_page_token

    def cancel(self, job_id: str) -> Dict[str, Any]:
        """Cancels a queued job at once, a running one at its next step (the model stays unchanged)."""
        request = pb.adaptation_pb2.CancelJobRequest(id=job_id)
        return to_python(self._unary("CancelJob", self.adaptation.CancelJob, request))

    def watch(self, job_id: str, timeout: Optional[float] = None) -> Iterator[Dict[str, Any]]:
        """Follows a job: yields {"kind": "snapshot"|"state"|"progress"|"eval", "job": {...}} for the
        job as it is, then every change, until the job ends (then the iterator stops)."""
        request = pb.adaptation_pb2.WatchJobRequest(id=job_id)
        call = self.adaptation.WatchJob(request, timeout=timeout, metadata=self._metadata)
        try:
            for event in call:
                yield to_python(event)
        except grpc.RpcError as e:
            raise StrataError.from_rpc_error("WatchJob", e) from None
        finally:
            call.cancel()

    def wait(
        self, job_id: str, progress: ProgressArg = True, timeout: Optional[float] = None
    ) -> Dict[str, Any]:
        """Follows a job until it ends (drawing its progress as `strata watch` does unless
        `progress` is False) and returns its final state: check job["state"] == "succeeded";
        job["eval_results"] holds every task's score, job["error"] why it failed."""
        stream = _progress_stream(progress)
        line = ProgressLine(stream) if stream is not None else None
        last: Optional[Dict[str, Any]] = None
        for event in self.watch(job_id, timeout=timeout):
            job = event["job"]
            changed = last is None or job["state"] != last["state"]
            last = job
            if line:
                if changed and line.is_terminal:
                    line.finish(job_progress_text(job))  # keep each state on its own line
                else:
                    line.update(job_progress_text(job), force=changed)
        if last is None:
            raise StrataError("WatchJob", grpc.StatusCode.INTERNAL, "the stream ended without an event")
        if line:
            line.finish(job_progress_text(last))
        return last

    def tasks(self) -> List[Dict[str, Any]]:
        """The learned tasks in learning order: scores (base, learned, current, routed, auto),
        forgetting, the router's accuracy, and the score history."""
        response = self._unary(
            "ListTasks", self.adaptation.ListTasks, pb.adaptation_pb2.ListTasksRequest()
        )
        return [to_python(t) for t in response.tasks]

    def task(self, name: str) -> Dict[str, Any]:
        """One learned task (NOT_FOUND otherwise)."""
        request = pb.adaptation_pb2.GetTaskRequest(name=name)
        return to_python(self._unary("GetTask", self.adaptation.GetTask, request))

    def report(self) -> Dict[str, Any]:
        """The accuracy matrix (report["matrix"][i]["scores"][j]: task j after stage i) and the
        continual-learning summary (average_score, backward_transfer, forward_transfer,
        forgetting: None while undefined). strata_client.print_report() prints it as tables."""
        return to_python(
            self._unary("GetReport", self.adaptation.GetReport, pb.adaptation_pb2.GetReportRequest())
        )

    # -- inference -----------------------------------------------------------------------------

    @overload
    def generate(self, prompt: str, *, stream: Literal[True], **kwargs: Any) -> GenerateStream: ...

    @overload
    def generate(
        self, prompt: str, *, stream: Literal[False] = False, **kwargs: Any
    ) -> Generation: ...

    def generate(  # type: ignore[misc]
        self,
        prompt: str,
        *,
        route: Optional[str] = None,
        task: Optional[str] = None,
        max_new_tokens: int = 0,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 0.0,
        seed: int = 0,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        logprobs: Optional[int] = None,
        stream: bool = False,
        timeout: Optional[float] = None,
    ) -> Union[Generation, GenerateStream]:
        """Generates text from `prompt`.

        `route`: "auto" (default: the server picks the learned task the prompt belongs to), "base",
        "merged" or a task's name (`task` is the same as route=<name>). `max_new_tokens` 0 = the
        server's default (128); `temperature` 0 = greedy; `top_p` 0 or 1 = off. `logprobs` N
        (0-20): each token's log-probability and the N most likely tokens (Generation.logprobs).

        stream=False: returns a Generation (text, finish_reason, route, weights_version, ...).
        stream=True: returns a GenerateStream; iterate it for the text pieces as they come:

            for piece in client.generate("Once upon a time", stream=True):
                print(piece, end="", flush=True)
        """
        ipb = pb.inference_pb2
        request = ipb.GenerateRequest(
            prompt=prompt.encode("utf-8"),
            sampling=ipb.SamplingParams(
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
                stop=list(stop),
                ignore_eos=ignore_eos,
                logprobs=logprobs is not None,
                top_logprobs=logprobs or 0,
            ),
            task=task or "",
            route=route or "",
        )
        call = self.inference.Generate(request, timeout=timeout, metadata=self._metadata)
        result = GenerateStream(call)
        return result if stream else result.result()

    def score(
        self,
        prompt: str,
        completions: Union[str, Sequence[str]],
        *,
        route: Optional[str] = None,
        task: Optional[str] = None,
        timeout: Optional[float] = _UNSET,
    ) -> ScoreResult:
        """Log-likelihood of each completion given the prompt, and the best of them; `route` as in
        generate()."""
        if isinstance(completions, str):
            completions = [completions]
        request = pb.inference_pb2.ScoreRequest(
            prompt=prompt.encode("utf-8"),
            completions=[c.encode("utf-8") for c in completions],
            task=task or "",
            route=route or "",
        )
        r = self._unary("Score", self.inference.Score, request, timeout)
        return ScoreResult(
            scores=[CompletionScore(s.completion, s.log_likelihood, s.tokens) for s in r.scores],
            best=r.best,
            weights_version=r.weights_version,
            route=r.route,
            route_automatic=r.route_automatic,
            route_confidence=r.route_confidence,
        )

    def tokenize(self, text: str, add_special_tokens: bool = False) -> Dict[str, Any]:
        """The server's tokenizer: {"ids": [...], "tokens": [...], "weights_version": n}."""
        request = pb.inference_pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        return to_python(self._unary("Tokenize", self.inference.Tokenize, request))
