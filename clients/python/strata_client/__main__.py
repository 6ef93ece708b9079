"""`python3 -m strata_client` (installed as `strata-py`): a few commands for scripts and checks.

    strata-py [--server HOST:PORT] health | info | tasks | jobs | report
    strata-py submit --task NAME TRAIN [--eval FILE] [--steps N] [--wait]
    strata-py watch JOB
    strata-py generate PROMPT [--route R] [--max-tokens N]

The strata C++ CLI (build/client/strata) is the full one; this one shows the library at work.
Exit codes as the CLI's: 0 ok, 1 server error (or the job did not succeed), 3 unreachable.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

import grpc

from . import Client, StrataError, format_jobs, format_tasks, print_report


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="strata-py", description=__doc__.splitlines()[0])
    parser.add_argument("--server", help="host:port (default $STRATA_SERVER or 127.0.0.1:50051)")
    parser.add_argument("--auth-token-file", help="bearer token file ($STRATA_AUTH_TOKEN_FILE)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("health", "info", "tasks", "jobs", "report"):
        sub.add_parser(name)
    p = sub.add_parser("submit")
    p.add_argument("--task", required=True)
    p.add_argument("train")
    p.add_argument("--eval")
    p.add_argument("--steps", type=int)
    p.add_argument("--wait", action="store_true")
    p = sub.add_parser("watch")
    p.add_argument("job")
    p = sub.add_parser("generate")
    p.add_argument("prompt")
    p.add_argument("--route")
    p.add_argument("--max-tokens", type=int, default=0)
    args = parser.parse_args(argv)

    client = Client(args.server, token_file=args.auth_token_file)
    try:
        if args.command == "health":
            status = client.health()
            print(status)
            return 0 if status == "SERVING" else 1
        if args.command == "info":
            print(json.dumps(client.info(), indent=2, default=str))
        elif args.command == "tasks":
            print(format_tasks(client.tasks()), end="")
        elif args.command == "jobs":
            print(format_jobs(client.jobs()), end="")
        elif args.command == "report":
            print_report(client.report())
        elif args.command in ("submit", "watch"):
            if args.command == "submit":
                job = client.submit(args.task, args.train, args.eval, max_steps=args.steps, wait=args.wait)
            else:
                job = client.wait(args.job)
            print(job["id"], job["state"])
            return 0 if job["state"] in ("succeeded", "queued") else 1
        elif args.command == "generate":
            stream = client.generate(args.prompt, route=args.route, max_new_tokens=args.max_tokens, stream=True)
            for piece in stream:
                print(piece, end="", flush=True)
            g = stream.generation
            print()
            print(f"route {g.route}, weights version {g.weights_version}, {g.finish_reason}", file=sys.stderr)
        return 0
    except StrataError as e:
        print(f"strata-py: {e}", file=sys.stderr)
        return 3 if e.code == grpc.StatusCode.UNAVAILABLE else 1
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
