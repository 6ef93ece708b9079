"""Plain-text tables of what the client returns (no pandas): the report, the tasks, the jobs.

The layout follows the strata CLI (`strata report`, `strata tasks`, `strata jobs`)."""

from __future__ import annotations

import math
import sys
from typing import Any, Iterable, List, Mapping, Optional, Sequence, TextIO

from .progress import format_bytes


def format_score(value: Optional[float]) -> str:
    """0.83333 -> '0.8333'; None or NaN -> '-'."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.4f}"


def format_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    table = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [0] * len(header)
    for row in table:
        for i, cell in enumerate(row[: len(widths)]):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in table:
        cells = row[: len(widths)]
        padded = [c.ljust(widths[i]) for i, c in enumerate(cells[:-1])] + cells[-1:]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines) + "\n"


def _key_values(pairs: Sequence[tuple]) -> str:
    width = max((len(k) for k, _ in pairs), default=0)
    return "".join(f"{k.ljust(width)}  {v}\n" for k, v in pairs)


def format_report(report: Mapping[str, Any]) -> str:
    """The accuracy matrices and the continual-learning summary of Client.report(), as text."""
    tasks: List[str] = list(report.get("tasks") or [])
    out = [
        f"method {report.get('method', '')}, weights version {report.get('weights_version', 0)}, "
        f"{len(tasks)} task(s) learned, adaptation state "
        f"{format_bytes(report.get('adaptation_state_bytes') or 0)}\n"
    ]
    for c in report.get("candidates") or []:
        out.append(
            f"held: candidate version {c['version']} (task '{c['task']}', job {c['job_id']}) "
            "is not served:\n"
        )
        out.extend(f"  {reason}\n" for reason in c.get("reasons") or [])
    if not tasks:
        return "".join(out)

    def matrix(title: str, rows: Sequence[Mapping[str, Any]], base: Optional[Sequence[float]]) -> None:
        if not rows:
            return
        body = []
        if base is not None:
            body.append(["base model"] + [format_score(v) for v in base] + ["-"] * (len(tasks) - len(base)))
        for i, row in enumerate(rows):
            scores = list(row.get("scores") or [])
            name = tasks[i] if i < len(tasks) else f"stage {i + 1}"
            body.append(
                [f"after {name}"]
                + [format_score(scores[j]) if j < len(scores) else "-" for j in range(len(tasks))]
            )
        out.append("\n" + title + "\n")
        out.append(format_table([""] + tasks, body))

    matrix(
        "accuracy matrix, merged weights (row: after learning the task; column: score on the task)",
        report.get("matrix") or [],
        report.get("base") or [],
    )
    matrix("accuracy matrix, each task served by its name", report.get("routed_matrix") or [], None)
    matrix(
        "accuracy matrix, routed automatically (what a request naming no task gets)",
        report.get("auto_matrix") or [],
        None,
    )
    matrix(
        "router accuracy (row: after learning the task; column: share of the task's eval prompts "
        "routed to it)",
        report.get("router_accuracy") or [],
        None,
    )

    def summary(key: str, needs_two: bool = True) -> str:
        value = report.get(key)
        if value is None:
            return "- (needs 2 tasks)" if needs_two else "-"
        return f"{value:.4f}"

    def nll_line(values: Sequence[float]) -> str:
        parts = []
        for i, v in enumerate(values or []):
            if v is None or not math.isfinite(v):
                continue
            stage = "base" if i == 0 else (tasks[i - 1] if i - 1 < len(tasks) else str(i))
            parts.append(f"{stage} {v:.4f}")
        return ", ".join(parts)

    pairs = [
        ("average score (AA)", summary("average_score", needs_two=False)),
        ("backward transfer (BWT)", summary("backward_transfer")),
        ("forward transfer (FWT)", summary("forward_transfer")),
        ("forgetting", summary("forgetting")),
        ("auto-routed AA", summary("auto_average_score", needs_two=False)),
        ("auto-routed BWT", summary("auto_backward_transfer")),
        ("auto-routed forgetting", summary("auto_forgetting")),
        (
            "router state",
            f"{format_bytes(report.get('router_bytes') or 0)} "
            f"({format_bytes(report.get('router_bytes_per_task') or 0)} per task)",
        ),
        ("reference NLL, merged", nll_line(report.get("reference_nll")) or "- (no --reference_text)"),
    ]
    auto_nll = nll_line(report.get("reference_nll_auto"))
    if auto_nll:
        pairs.append(("reference NLL, auto-routed", auto_nll))
    out.append("\n" + _key_values(pairs))
    return "".join(out)


def format_tasks(tasks: Sequence[Mapping[str, Any]]) -> str:
    """Client.tasks() as a table: CURRENT/FORGETTING are the merged weights, ROUTED the task served
    by its name, AUTO routed automatically, ROUTER the share of its prompts routed to it."""
    if not tasks:
        return "no tasks learned yet\n"
    rows = [
        [
            t["index"],
            t["name"],
            t["scorer"],
            format_score(t["base_score"]),
            format_score(t["learned_score"]),
            format_score(t["current_score"]),
            format_score(t["forgetting"]),
            format_score(t["current_routed_score"]),
            format_score(t["current_auto_score"]),
            format_score(t["router_accuracy"]),
            t["eval_examples"],
            t["job_id"],
        ]
        for t in tasks
    ]
    header = ["#", "TASK", "SCORER", "BASE", "LEARNED", "CURRENT", "FORGETTING", "ROUTED", "AUTO",
              "ROUTER", "EVAL", "JOB"]  # fmt: skip
    return format_table(header, rows)


def format_jobs(jobs: Sequence[Mapping[str, Any]]) -> str:
    """Client.jobs() as a table, newest first."""
    if not jobs:
        return "no jobs\n"
    rows = []
    for j in jobs:
        p = j.get("progress") or {}
        progress = f"{p.get('step', 0)}/{p['total_steps']}" if p.get("total_steps") else "-"
        if j["state"] == "queued":
            progress = f"#{j['queue_position']} in queue"
        created = j["created"].astimezone().strftime("%Y-%m-%d %H:%M:%S") if j.get("created") else "-"
        rows.append(
            [j["id"], j["task_name"], j["method"], j["state"], progress,
             j["weights_version"] or "-", created, j["error"]]  # fmt: skip
        )
    return format_table(["ID", "TASK", "METHOD", "STATE", "PROGRESS", "VERSION", "CREATED", "ERROR"], rows)


def print_report(report: Mapping[str, Any], file: Optional[TextIO] = None) -> None:
    """Prints format_report(report) (to stdout unless `file` is given)."""
    print(format_report(report), end="", file=file if file is not None else sys.stdout)
