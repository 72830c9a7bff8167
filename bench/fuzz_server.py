"""A long schema-driven fuzz run against the server: schemathesis over every POST route of /openapi.json.

    python -m bench.fuzz_server [--examples 300] [--seed 1]

Starts `python -m server` (the embedded default model, with an API key, its context cut to 256 tokens so
that a generated `max_tokens: null` finishes in seconds) on 127.0.0.1, runs schemathesis
with the check that no answer is a server error, counts the requests and their statuses from its HAR
report, then checks that a normal request still succeeds. Writes bench/results/fuzz-<device>.json;
`python -m bench.report` puts it into BENCHMARKS.md. The suite runs a short version (tests/test_abuse.py).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import RESULTS
from bench.launcher import ServerProcess

KEY = "fuzz-key"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz_server", description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=60, help="examples per operation and phase")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        server = ServerProcess(None, "--log-level", "warning", "--max-model-len", "256", api_key=KEY,
                               log_path=Path(scratch) / "server.log")
        try:
            har = Path(scratch) / "requests.har"
            command = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{server.url}/openapi.json",
                       "--checks", "not_a_server_error", "--include-method", "POST", "--max-examples",
                       str(args.examples), "--seed", str(args.seed), "--header", f"Authorization: Bearer {KEY}",
                       "--request-timeout", "60", "--no-color", "--report", "har", "--report-har-path", str(har)]
            start = time.monotonic()
            run = subprocess.run(command, capture_output=True, text=True, cwd=scratch)
            seconds = time.monotonic() - start
            entries = json.loads(har.read_text())["log"]["entries"]
            statuses = collections.Counter(str(e["response"]["status"]) for e in entries)
            routes = collections.Counter(re.sub(r"^https?://[^/]+", "", e["request"]["url"]) for e in entries)
            with server.client() as client:
                after = client.post("/v1/completions", json={"prompt": "def f(x):", "max_tokens": 4}).status_code
        finally:
            server.stop()
    failures = re.search(r"Failures:(.*?)(?:\n\n|$)", run.stdout, re.S)
    result = {
        "benchmark": "fuzz", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", "device_type": "cpu",
        "tool": "schemathesis " + subprocess.run([command[0], "--version"], capture_output=True,
                                                 text=True).stdout.split()[-1],
        "examples_per_operation": args.examples, "server_args": "--max-model-len 256", "seed": args.seed,
        "requests": len(entries),
        "seconds": round(seconds, 1), "statuses": dict(sorted(statuses.items())), "routes": dict(routes),
        "server_errors": sum(n for status, n in statuses.items() if status.startswith("5")),
        "schemathesis_exit": run.returncode, "failures": failures.group(1).strip() if failures else "",
        "normal_request_after": after}
    path = RESULTS / "fuzz-cpu.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
