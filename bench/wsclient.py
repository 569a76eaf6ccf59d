"""Many idle agent websockets from one asyncio process: opens them, keeps them, reports.

    python -m bench.wsclient --url http://127.0.0.1:P --count 10000 --prefix ws

Each socket is `GET /ws?userId=<prefix>-u<i>&sessionId=<prefix>-s<i>` and waits for its ready
frame; a reader task per socket answers the server's heartbeat pings (aiohttp answers pings
while a socket is being read). Prints one JSON line once all are open, then reads commands
on stdin: `report` prints how many are still open; `close` closes them all and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import Counter

import aiohttp

ATTEMPTS = 5


def raise_open_files() -> int:
    """Lift the soft limit on open files to the hard one; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _emit(event: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def _open(
    http: aiohttp.ClientSession, url: str, prefix: str, i: int, failures: Counter[str]
) -> aiohttp.ClientWebSocketResponse | None:
    try:
        ws = await http.ws_connect(
            f"{url}/ws",
            params={"userId": f"{prefix}-u{i}", "sessionId": f"{prefix}-s{i}"},
            autoping=True,
            timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
        )
        ready = await ws.receive(timeout=60)
    except aiohttp.WSServerHandshakeError as exc:
        failures[f"handshake {exc.status}"] += 1
        return None
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        failures[type(exc).__name__] += 1
        return None
    if ready.type is not aiohttp.WSMsgType.TEXT or '"ready"' not in ready.data:
        failures[f"no ready frame: {ready.type.name}"] += 1
        await ws.close()
        return None
    return ws


async def _read(ws: aiohttp.ClientWebSocketResponse) -> None:
    async for _ in ws:
        pass


async def run(url: str, count: int, concurrency: int, prefix: str) -> None:
    limit = raise_open_files()
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    readers: list[asyncio.Task[None]] = []
    failures: Counter[str] = Counter()
    slots = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def open_one(i: int) -> None:
            # A refused open is tried again, as an agent would reconnect: the figure wanted is
            # what the sockets cost once open.
            for attempt in range(ATTEMPTS):
                if attempt:
                    await asyncio.sleep(attempt)
                async with slots:
                    ws = await _open(http, url, prefix, i, failures)
                if ws is not None:
                    sockets.append(ws)
                    readers.append(asyncio.get_running_loop().create_task(_read(ws)))
                    return

        started = time.perf_counter()
        await asyncio.gather(*(open_one(i) for i in range(count)))
        _emit(
            {
                "event": "opened",
                "opened": len(sockets),
                "refusals": dict(failures),
                "failed": count - len(sockets),
                "seconds": round(time.perf_counter() - started, 3),
                "openFilesLimit": limit,
            }
        )
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        while True:
            line = (await stdin.readline()).decode().strip()
            if line == "report":
                _emit({"event": "report", "open": sum(1 for ws in sockets if not ws.closed)})
            elif line in ("close", ""):
                break
        started = time.perf_counter()
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        _emit({"event": "closed", "seconds": round(time.perf_counter() - started, 3)})


def main() -> int:
    parser = argparse.ArgumentParser(description="many idle agent websockets")
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--prefix", default="ws")
    args = parser.parse_args()
    asyncio.run(run(args.url, args.count, args.concurrency, args.prefix))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
