"""A closed-loop HTTP/1.1 load generator, run as its own process.

N keep-alive connections, each with exactly one request in flight: send, read the whole answer,
send the next. Requests are pre-built bytes and answers are parsed only as far as the status
line and Content-Length, on a bare asyncio.Protocol: a client built on aiohttp's ClientSession
costs about as much CPU per request as the server it measures, and on a 2-core machine it would
cap the figures it reports. Its own ceiling (against a server that answers with canned bytes) is
measured by every run and reported beside the results.

    python -m bench.loadgen --port P --connections 32 --duration 3 --spec '{"method": "GET", ...}'
    python -m bench.loadgen --null-server     # prints the port, answers every request at once

The spec: {"method", "path" (with "{user}"), "users" (connection i uses users[i % len]),
"bodies" (optional: a connection cycles through them)}. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (from /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def percentile(sorted_values: list[int] | list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0 for none)."""
    if not sorted_values:
        return 0.0
    rank = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values) + 0.5) - 1))
    return float(sorted_values[rank])


def build_requests(spec: dict[str, Any], port: int, connections: int) -> list[list[bytes]]:
    """The request bytes each connection cycles through."""
    method = spec["method"].upper()
    users: list[str] = spec["users"]
    bodies: list[Any] = spec.get("bodies") or [None]
    host = f"127.0.0.1:{port}"
    plans = []
    for i in range(connections):
        path = spec["path"].replace("{user}", quote(users[i % len(users)], safe=""))
        requests = []
        for body in bodies:
            payload = b"" if body is None else json.dumps(body).encode()
            head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
            if body is not None:
                head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
            requests.append((head + "\r\n").encode() + payload)
        plans.append(requests)
    return plans


@dataclass
class _Totals:
    recording: bool = False
    stopping: bool = False
    latencies_ns: array[int] = field(default_factory=lambda: array("q"))
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)


class _Connection(asyncio.Protocol):
    def __init__(self, totals: _Totals, requests: list[bytes], done: asyncio.Future[None]) -> None:
        self._totals = totals
        self._requests = requests
        self._next = 0
        self._done = done
        self._buffer = b""
        self._need = -1  # bytes of the whole answer, once its head is in
        self._status = 0
        self._sent_ns = 0
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._send()

    def _send(self) -> None:
        request = self._requests[self._next]
        self._next = (self._next + 1) % len(self._requests)
        self._sent_ns = time.perf_counter_ns()
        assert self._transport is not None
        self._transport.write(request)

    def data_received(self, data: bytes) -> None:
        self._buffer = self._buffer + data if self._buffer else data
        while True:
            if self._need < 0:
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = self._buffer[:end]
                match = _CONTENT_LENGTH.search(head)
                if match is None:
                    self._fail("answer without Content-Length")
                    return
                self._status = int(head[9:12])
                self._need = end + 4 + int(match.group(1))
            if len(self._buffer) < self._need:
                return
            self._buffer = self._buffer[self._need :]
            self._need = -1
            totals = self._totals
            if totals.recording:
                totals.latencies_ns.append(time.perf_counter_ns() - self._sent_ns)
                totals.statuses[self._status] += 1
            if totals.stopping:
                assert self._transport is not None
                self._transport.close()
                return
            self._send()

    def _fail(self, reason: str) -> None:
        self._totals.errors[reason] += 1
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._totals.stopping:
            self._totals.errors["connection lost"] += 1
        if not self._done.done():
            self._done.set_result(None)


async def run_closed_loop(
    port: int,
    spec: dict[str, Any],
    connections: int,
    duration: float,
    warmup: float = 0.5,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """Drive `connections` closed loops for `warmup` + `duration` seconds; figures of `duration`."""
    loop = asyncio.get_running_loop()
    totals = _Totals()
    plans = build_requests(spec, port, connections)
    finished: list[asyncio.Future[None]] = []
    for requests in plans:
        done: asyncio.Future[None] = loop.create_future()
        finished.append(done)
        await loop.create_connection(
            lambda r=requests, d=done: _Connection(totals, r, d),  # type: ignore[misc]
            "127.0.0.1",
            port,
        )
    await asyncio.sleep(warmup)
    server_cpu0 = cpu_seconds(server_pid) if server_pid else 0.0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    totals.recording = True
    await asyncio.sleep(duration)
    totals.recording = False
    wall = time.perf_counter() - wall0
    client_cpu = (time.process_time() - cpu0) / wall
    server_cpu = (cpu_seconds(server_pid) - server_cpu0) / wall if server_pid else None
    totals.stopping = True
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(10):
            await asyncio.gather(*finished)
    latencies = sorted(totals.latencies_ns)
    ok = sum(n for status, n in totals.statuses.items() if 200 <= status < 300)
    return {
        "connections": connections,
        "seconds": round(wall, 3),
        "requests": len(latencies),
        "throughput": round(len(latencies) / wall, 1),
        "ok": ok,
        "statuses": {str(k): v for k, v in sorted(totals.statuses.items())},
        "errors": dict(totals.errors),
        "p50_ms": round(percentile(latencies, 0.50) / 1e6, 3),
        "p90_ms": round(percentile(latencies, 0.90) / 1e6, 3),
        "p99_ms": round(percentile(latencies, 0.99) / 1e6, 3),
        "max_ms": round((latencies[-1] if latencies else 0) / 1e6, 3),
        "client_cpu": round(client_cpu, 3),
        "server_cpu": round(server_cpu, 3) if server_cpu is not None else None,
    }


# ---- the null server: the generator's own ceiling ------------------------------------------------

_CANNED_BODY = json.dumps(
    {
        "success": True,
        "userId": "bench-u0",
        "state": {"language": "en", "conversationContext": {"topic": "home loans"}},
    }
).encode()
_CANNED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
    + f"Content-Length: {len(_CANNED_BODY)}\r\n\r\n".encode()
    + _CANNED_BODY
)


class _NullServer(asyncio.Protocol):
    """Answers each request head (GET only: no body is expected) with the same canned bytes."""

    def __init__(self) -> None:
        self._pending = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._pending += data
        heads = self._pending.count(b"\r\n\r\n")
        if heads:
            self._pending = self._pending[self._pending.rfind(b"\r\n\r\n") + 4 :]
            assert self._transport is not None
            self._transport.write(_CANNED * heads)


async def _serve_null(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_NullServer, "127.0.0.1", port)
    bound = server.sockets[0].getsockname()[1]
    sys.stdout.write(json.dumps({"port": bound}) + "\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="closed-loop HTTP/1.1 load generator")
    parser.add_argument("--null-server", action="store_true", help="serve canned answers instead")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--server-pid", type=int, default=None)
    parser.add_argument("--spec", default="{}")
    args = parser.parse_args(argv)
    if args.null_server:
        asyncio.run(_serve_null(args.port))
        return 0
    result = asyncio.run(
        run_closed_loop(
            args.port,
            json.loads(args.spec),
            args.connections,
            args.duration,
            args.warmup,
            args.server_pid,
        )
    )
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
