"""The benchmark harness measures something real: a short GET state run against the ceiling and
samvad (real processes, real emulator) gives figures that make sense. No performance thresholds:
timing goals live in bench/ and BENCHMARKS.md."""

from __future__ import annotations

import tempfile
from pathlib import Path

import aiohttp

from bench.workloads import Context, http


async def test_get_state_workload_measures_both_servers(emulator_host: str) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-smoke-") as logs:
        async with aiohttp.ClientSession() as session:
            ctx = Context(quick=True, emulator_host=emulator_host, log_dir=Path(logs), http=session)
            result = await http(
                ctx,
                ops=("state",),
                levels=(2,),
                names=("ceiling", "samvad"),
                duration=1.0,
                warmup=0.3,
            )

    for server in ("ceiling", "samvad"):
        run = result["results"]["state"][server]["2"]
        assert run["requests"] > 0, (server, run)
        assert run["throughput"] > 0, (server, run)
        assert run["ok"] == run["requests"], (server, run["statuses"])
        assert run["errors"] == {}, (server, run["errors"])
        assert 0 < run["p50_ms"] <= run["p99_ms"] <= run["max_ms"], (server, run)
        assert run["server_cpu"] > 0, (server, run)
        assert run["rss_bytes"] > 0, (server, run)
