"""`make fuzz`: every target for a bounded time, then executions and findings per target.

    python tests/fuzz/fuzz.py [--seconds S] [--create-seconds S] [--seed N] [--runs N]

The parser targets (tests/fuzz/targets.py) run coverage-guided under atheris,
one process each, for --seconds; their new inputs are kept in
.fuzz/corpus/<target> (seeded from tests/fuzz/corpus/<target>), so later runs
start where earlier ones stopped. Then whole creates (tests/fuzz/creates.py)
run for --create-seconds on a real store. With --runs each parser target
stops after that many inputs instead (the short seeded pass of `make test`).

Findings (tracebacks, hangs, escapes, multi-line or control-character
errors) are written under .fuzz/findings/; the exit status is 1 if any.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PARSERS = ["tar", "unpack", "image-json", "reference", "config", "json-bounds"]
DICTS = {
    "tar": "tar.dict",
    "unpack": "tar.dict",
    "image-json": "json.dict",
    "json-bounds": "json.dict",
}
SEEDS = {"unpack": "tar"}  # the unpacker starts from the tar reader's seeds


def run_parser(
    target: str, out: str, seconds: float, runs: int, seed: int | None
) -> dict[str, Any]:
    corpus = os.path.join(out, "corpus", target)
    findings = os.path.join(out, "findings", target)
    os.makedirs(corpus, exist_ok=True)
    argv = [
        sys.executable,
        os.path.join(HERE, "guided.py"),
        target,
        findings,
        "-timeout=10",  # one input running longer is a hang
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
        "-max_len=65536",
    ]
    argv += [f"-runs={runs}"] if runs else [f"-max_total_time={int(seconds)}"]
    if seed is not None:
        argv.append(f"-seed={seed}")
    if target in DICTS:
        argv.append(f"-dict={os.path.join(HERE, DICTS[target])}")
    argv += [corpus, os.path.join(HERE, "corpus", SEEDS.get(target, target))]
    start = time.monotonic()
    result = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )
    elapsed = time.monotonic() - start
    log = result.stderr
    executed = re.findall(r"stat::number_of_executed_units: (\d+)", log)
    found: dict[str, int] = {}
    distinct = len(re.findall(r"^FINDING ", log, re.M))
    if distinct:
        found["traceback"] = distinct
    if "libFuzzer: timeout" in log or "ALARM: working on the last Unit" in log:
        found["hang"] = 1
    if result.returncode != 0 and not found:
        found["crash"] = 1  # libFuzzer stopped: out of memory, a signal, a timeout
    if result.returncode != 0:
        os.makedirs(findings, exist_ok=True)
        with open(os.path.join(findings, "libfuzzer.log"), "w") as f:
            f.write(log)
    return {
        "target": target,
        "executions": int(executed[-1]) if executed else 0,
        "seconds": round(elapsed, 1),
        "exec_per_s": round(int(executed[-1]) / elapsed) if executed else 0,
        "corpus": len(os.listdir(corpus)),
        "findings": found,
    }


def run_creates(out: str, seconds: float, runs: int, seed: int | None, jobs: int) -> dict[str, Any]:
    """*jobs* create campaigns at once, each on its own store (a create waits on I/O a lot)."""
    children = []
    for job in range(jobs):
        argv = [sys.executable, os.path.join(HERE, "creates.py"), "--seconds", str(seconds)]
        argv += ["--findings", os.path.join(out, "findings", f"create-{job}")]
        if runs:
            argv += ["--runs", str(runs)]
        if seed is not None:
            argv += ["--seed", str(seed + job)]
        children.append(
            subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    total: dict[str, Any] = {"target": "create", "executions": 0, "created": 0, "refused": 0}
    found: dict[str, int] = {}
    seconds_taken = 0.0
    for child in children:
        stdout, stderr = child.communicate()
        try:
            summary = json.loads(stdout.splitlines()[-1])
        except (IndexError, ValueError):
            found["crash"] = found.get("crash", 0) + 1
            print(f"create campaign failed: {stdout[-2000:]}{stderr[-2000:]}", file=sys.stderr)
            continue
        for key in ("executions", "created", "refused"):
            total[key] += summary[key]
        for kind, count in summary["findings"].items():
            found[kind] = found.get(kind, 0) + count
        seconds_taken = max(seconds_taken, summary["seconds"])
    total["seconds"] = seconds_taken
    total["exec_per_s"] = round(total["executions"] / seconds_taken, 1) if seconds_taken else 0
    total["findings"] = found
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=45, help="per parser target")
    parser.add_argument("--create-seconds", type=float, default=300)
    parser.add_argument("--runs", type=int, default=0, help="inputs per parser target instead")
    parser.add_argument("--create-runs", type=int, default=0, help="creates instead of seconds")
    parser.add_argument("--create-jobs", type=int, default=2, help="create campaigns at once")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", default=os.path.join(ROOT, ".fuzz"))
    parser.add_argument("--only", choices=[*PARSERS, "create"], action="append")
    args = parser.parse_args()
    results = []
    for target in args.only or [*PARSERS, "create"]:
        if target == "create":
            results.append(
                run_creates(
                    args.out, args.create_seconds, args.create_runs, args.seed, args.create_jobs
                )
            )
        else:
            results.append(run_parser(target, args.out, args.seconds, args.runs, args.seed))
        r = results[-1]
        print(
            f"{r['target']:<12} {r['executions']:>9} executions  {r.get('seconds', 0):>6}s  "
            f"{r.get('exec_per_s', 0):>7}/s  findings: {r['findings'] or 'none'}",
            flush=True,
        )
    total = sum(sum(r["findings"].values()) for r in results)
    print(f"fuzz: {total} finding(s)" + (f", see {args.out}/findings" if total else ""))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
