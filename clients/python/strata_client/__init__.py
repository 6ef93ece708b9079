"""strata_client: the Python client of a Strata continual-adaptation server (gRPC).

    from strata_client import Client, print_report

    client = Client()                       # $STRATA_SERVER or 127.0.0.1:50051
    job = client.submit("capitals", "train.jsonl", "test.jsonl", max_steps=50, wait=True)
    print(client.generate("The capital of France is", max_new_tokens=8).text)
    print_report(client.report())
"""

__version__ = "0.1.0"

from .client import (
    CHUNK_BYTES,
    DEFAULT_ADDRESS,
    Client,
    CompletionScore,
    GenerateStream,
    Generation,
    ScoreResult,
    StrataError,
    job_progress_text,
)
from .tables import format_jobs, format_report, format_table, format_tasks, print_report

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_ADDRESS",
    "Client",
    "CompletionScore",
    "GenerateStream",
    "Generation",
    "ScoreResult",
    "StrataError",
    "format_jobs",
    "format_report",
    "format_table",
    "format_tasks",
    "job_progress_text",
    "print_report",
]
