"""Latency of an interruption frame, through the websocket handler's own dispatch.

    .venv/bin/python bench/interruption_push.py [--pushes 100000] [--socket 10000]

In process (the goal is p99 < 1 ms): each push is one `Connection.on_text` call, the code the
handler runs for every text frame: size check, JSON parse, frame validation, the push into the
session's interruption deque and the ack put on the socket's send queue, ready to go out.
The service runs on the in-memory store; an interruption touches no store at all.

With --socket N, also N round trips (interruption frame out, ack back) over a loopback
websocket to the full app, for scale: that adds the network stack and both event loops.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import aiohttp
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from samvad.api.realtime import Connection, Connections
from samvad.app import create_app
from samvad.config import Settings
from samvad.service import SessionPersistenceService
from samvad.store.memory import MemoryStore


def report(name: str, samples_ns: list[int]) -> None:
    samples_ns.sort()
    n = len(samples_ns)

    def pct(p: float) -> float:
        return samples_ns[min(n - 1, int(p * n))] / 1000

    print(
        f"{name:<28} n={n:<7} p50={pct(0.50):8.2f} us  p99={pct(0.99):8.2f} us  "
        f"p99.9={pct(0.999):8.2f} us  max={samples_ns[-1] / 1000:9.2f} us  "
        f"mean={statistics.fmean(samples_ns) / 1000:7.2f} us"
    )


def bench_settings() -> Settings:
    # Its own loopback server only: no authentication (where the server has it), no change feed.
    return Settings.from_env({"SAMVAD_AUTH": "none", "SAMVAD_SYNC_INTERVAL": "0"})


def frame(i: int) -> str:
    return json.dumps(
        {
            "type": "interruption",
            "id": i,
            "heard": "Home loans start at 8.5 percent a year for",
            "content": "Sorry, I meant a car loan.",
            "reason": "barge-in",
            "spokenWords": 9,
        }
    )


async def in_process(pushes: int) -> None:
    settings = bench_settings()
    service = SessionPersistenceService(MemoryStore(), settings)
    await service.start()
    hub = Connections(service, settings)
    request = make_mocked_request("GET", "/ws")
    conn = Connection(hub, request, web.WebSocketResponse(), "bench-user", "bench-session")
    texts = [frame(i) for i in range(1000)]

    for i in range(5000):  # warm up caches and pydantic's validators
        await conn.on_text(texts[i % 1000])
        conn.queue.get_nowait()

    handled: list[int] = []
    pushed: list[int] = []
    clock = time.perf_counter_ns
    for i in range(pushes):
        text = texts[i % 1000]
        started = clock()
        await conn.on_text(text)
        handled.append(clock() - started)
        ack = conn.queue.get_nowait()  # what the writer task would send
        assert ack.startswith('{"type":"ack"'), ack
    data = json.loads(texts[0])
    for _ in range(pushes):
        started = clock()
        service.push_interruption("bench-session", "bench-user", data)
        pushed.append(clock() - started)

    assert len(service.interruptions.recent("bench-session")) == settings.interruptions_per_session
    report("frame handled (on_text)", handled)
    report("service.push_interruption", pushed)
    await service.close()


async def over_socket(round_trips: int) -> None:
    settings = bench_settings()
    runner = web.AppRunner(create_app(settings, store_factory=lambda _: MemoryStore()))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    samples: list[int] = []
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"http://{host}:{port}/ws", params={"userId": "bench"})
        await ws.receive()  # ready
        for i in range(round_trips + 500):
            text = frame(i)
            started = time.perf_counter_ns()
            await ws.send_str(text)
            answer = await ws.receive()
            if i >= 500:  # the first ones warm up
                samples.append(time.perf_counter_ns() - started)
            assert '"ack"' in answer.data, answer
        await ws.close()
    await runner.cleanup()
    report("loopback round trip", samples)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pushes", type=int, default=100_000)
    parser.add_argument("--socket", type=int, default=0, help="loopback round trips (0: none)")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, gc enabled")
    gc.collect()
    await in_process(args.pushes)
    if args.socket:
        await over_socket(args.socket)


if __name__ == "__main__":
    asyncio.run(main())
