"""`python -m bench`: run the workloads, keep the raw figures, regenerate BENCHMARKS.md and plots.

    python -m bench                    # everything (`make bench`): about 10 minutes
    python -m bench --quick            # a smoke run: every workload, small and short
    python -m bench --only http,cold   # some workloads; the others' figures are kept as they were
    python -m bench --report-only      # BENCHMARKS.md and plots from bench/results/latest.json

Starts a Firestore emulator (samvad.emulator.FirestoreEmulator) unless FIRESTORE_EMULATOR_HOST
names one. Results: bench/results/latest.json (the document and plots are made from it only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.workloads import WORKLOADS, Context, log
from samvad.emulator import FirestoreEmulator

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "latest.json"


def raise_open_files() -> int:
    """Children inherit it: the server and the websocket client each need ~10,000 sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict[str, Any]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_total = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    import aiohttp as aiohttp_module

    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "ram_bytes": mem_total,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp_module.__version__,
    }


def run_info(argv: list[str]) -> dict[str, Any]:
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(dirty) and dirty != "unknown",
        "command": " ".join(["python -m bench", *argv]).strip(),
        "load_average_before": list(os.getloadavg()),
    }


def server_logs(folder: Path, tail: int = 1500) -> str:
    """The end of every server's log, for a workload that failed."""
    parts = []
    for log_file in sorted(folder.glob("*.log")):
        parts.append(f"-- {log_file.name}:\n{log_file.read_text(errors='replace')[-tail:]}")
    return "\n".join(parts)


async def run_workloads(
    names: list[str], quick: bool, emulator_host: str, rounds: int | None
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="samvad-bench-") as logs:
        connector = aiohttp.TCPConnector(limit=200)
        async with aiohttp.ClientSession(connector=connector) as http:
            ctx = Context(
                quick=quick,
                emulator_host=emulator_host,
                log_dir=Path(logs),
                http=http,
                rounds=rounds,
            )
            for name in names:
                log(f"== {name}")
                started = time.perf_counter()
                ctx.notes = []
                try:
                    results[name] = await WORKLOADS[name](ctx)
                except Exception:
                    log(traceback.format_exc())
                    results[name] = {"error": traceback.format_exc(limit=3)}
                    log(server_logs(Path(logs)))
                results[name]["wall_seconds"] = round(time.perf_counter() - started, 1)
                results[name]["notes"] = ctx.notes
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small and short: a smoke run")
    parser.add_argument("--only", default="", help=f"comma-separated: {','.join(WORKLOADS)}")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the raw results JSON")
    parser.add_argument("--report-only", action="store_true", help="regenerate the document only")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds of each HTTP cell (default 2; layers 4)"
    )
    parser.add_argument("--no-report", action="store_true", help="leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)

    if not args.report_only:
        names = [n.strip() for n in args.only.split(",") if n.strip()] or list(WORKLOADS)
        unknown = [n for n in names if n not in WORKLOADS]
        if unknown:
            parser.error(f"unknown workload(s): {', '.join(unknown)}")
        previous: dict[str, Any] = {}
        if args.only and args.results.exists():
            previous = json.loads(args.results.read_text())
        info = {**run_info(argv), "machine": machine(), "open_files": raise_open_files()}
        log(f"load average before: {info['load_average_before']}")
        started = time.perf_counter()
        if os.environ.get("FIRESTORE_EMULATOR_HOST"):
            results = asyncio.run(
                run_workloads(names, args.quick, os.environ["FIRESTORE_EMULATOR_HOST"], args.rounds)
            )
        else:
            with FirestoreEmulator() as emulator:
                results = asyncio.run(run_workloads(names, args.quick, emulator.host, args.rounds))
        info["wall_seconds"] = round(time.perf_counter() - started, 1)
        info["quick"] = args.quick
        info["load_average_after"] = list(os.getloadavg())
        merged = {**previous.get("workloads", {}), **results}
        runs = {**previous.get("runs", {}), **{name: info for name in names}}
        document = {
            "run": info,
            "runs": runs,
            "workloads": merged,
        }
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(document, indent=1) + "\n")
        log(f"results: {args.results} ({info['wall_seconds']} s)")

    if not args.no_report:
        from bench.report import write_report

        write_report(args.results)
    return 0
