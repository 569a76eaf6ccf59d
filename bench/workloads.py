"""The workloads. Each takes a Context and returns a JSON-able dict of raw figures."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import timeit
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from bench import servers
from bench.loadgen import percentile
from bench.servers import HttpServer, ProxyProcess
from samvad.config import Settings

ROOT = Path(__file__).resolve().parent.parent
LEVELS = (1, 8, 32, 128)
SERVERS = ("ceiling", "samvad", "baseline")
OPS = ("state", "profile", "append")
SEED_MESSAGES = 20
MESSAGE = "What documents do I need for a home loan, and how long does approval take?"
REPLY = "You need proof of income, identity and address; approval takes about a week."
STATE = {
    "language": "en",
    "conversationContext": {"topic": "home loans", "lastIntent": "eligibility_check"},
    "activeSessionId": "session_123",
}
INTERRUPTION = {
    "content": "wait, what about fees?",
    "heard": "Our rates start at",
    "reason": "barge",
}
SPECS: dict[str, dict[str, Any]] = {
    "state": {"method": "GET", "path": "/api/session/{user}/state"},
    "profile": {"method": "GET", "path": "/api/session/{user}/profile"},
    "append": {
        "method": "POST",
        "path": "/api/session/{user}/history",
        "bodies": [{"role": "user", "content": MESSAGE}, {"role": "assistant", "content": REPLY}],
    },
}


@dataclass
class Context:
    quick: bool
    emulator_host: str
    log_dir: Path
    http: aiohttp.ClientSession
    notes: list[str] = field(default_factory=list)
    rounds: int | None = None  # of each HTTP cell; more rounds, less noise in the best one

    def project(self, name: str) -> str:
        return f"bench-{name}-{uuid.uuid4().hex[:8]}"

    def pick(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full


def log(message: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def summary(latencies_s: Iterable[float]) -> dict[str, float | int]:
    values = sorted(latencies_s)
    return {
        "count": len(values),
        "p50_ms": round(percentile(values, 0.50) * 1e3, 3),
        "p90_ms": round(percentile(values, 0.90) * 1e3, 3),
        "p99_ms": round(percentile(values, 0.99) * 1e3, 3),
        "max_ms": round((values[-1] if values else 0) * 1e3, 3),
    }


async def call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None
) -> tuple[int, Any]:
    async with http.request(method, url, json=body) as response:
        text = await response.text()
        try:
            return response.status, json.loads(text) if text else None
        except ValueError:
            return response.status, text


T = TypeVar("T")


async def for_each(items: Iterable[T], job: Callable[[T], Awaitable[Any]], limit: int) -> None:
    """`job(item)` for every item, at most `limit` at once."""
    slots = asyncio.Semaphore(limit)

    async def run(item: T) -> None:
        async with slots:
            await job(item)

    await asyncio.gather(*(run(item) for item in items))


async def backlog(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    _, body = await call(http, "GET", url + "/readyz")
    return body if isinstance(body, dict) else {}


async def wait_backlog_empty(http: aiohttp.ClientSession, url: str, within: float = 60.0) -> float:
    """Seconds until samvad's write-behind backlog is empty."""
    started = time.perf_counter()
    while time.perf_counter() - started < within:
        if (await backlog(http, url)).get("backlog", {}).get("entries", 1) == 0:
            return time.perf_counter() - started
        await asyncio.sleep(0.05)
    raise RuntimeError(f"backlog of {url} not empty after {within}s")


async def run_loadgen(
    server: HttpServer,
    spec: dict[str, Any],
    connections: int,
    duration: float,
    warmup: float,
) -> dict[str, Any]:
    """bench.loadgen in a process of its own against `server`."""
    argv = [
        sys.executable,
        "-m",
        "bench.loadgen",
        f"--port={server.port}",
        f"--connections={connections}",
        f"--duration={duration}",
        f"--warmup={warmup}",
        f"--spec={json.dumps(spec)}",
    ]
    if server.process is not None:
        argv.append(f"--server-pid={server.pid}")
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), duration + warmup + 60)
    if process.returncode != 0:
        raise RuntimeError(f"loadgen failed: {err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out)
    return result


# ---- the generator's own ceiling -----------------------------------------------------------------


async def generator(ctx: Context) -> dict[str, Any]:
    """The load generator against a server that answers with canned bytes at once."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.loadgen",
        "--null-server",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    port = json.loads(await process.stdout.readline())["port"]
    null = HttpServer("null", [], {}, ctx.log_dir, port)
    null.process = process
    spec = {**SPECS["state"], "users": [f"bench-u{i}" for i in range(128)]}
    runs = {}
    try:
        for connections in ctx.pick((1, 32, 128), (32,)):
            result = await run_loadgen(null, spec, connections, ctx.pick(3.0, 1.0), 0.5)
            runs[str(connections)] = result
            log(f"generator ceiling at {connections}: {result['throughput']:.0f}/s")
    finally:
        process.terminate()
        await process.wait()
    return {"runs": runs}


# ---- HTTP throughput and latency -----------------------------------------------------------------


async def seed(
    ctx: Context, server: HttpServer, users: list[str], messages: int = SEED_MESSAGES
) -> None:
    """A state and `messages` history messages for each user, through the server's own API."""

    async def one(user: str) -> None:
        status, _ = await call(ctx.http, "POST", f"{server.url}/api/session/{user}/state", STATE)
        assert status == 200, status
        for i in range(messages):
            body = (
                {"role": "user", "content": MESSAGE}
                if i % 2 == 0
                else {
                    "role": "assistant",
                    "content": REPLY,
                }
            )
            status, _ = await call(
                ctx.http, "POST", f"{server.url}/api/session/{user}/history", body
            )
            assert status == 200, status

    await for_each(users, one, 32)


async def start_http_servers(ctx: Context, names: Iterable[str]) -> dict[str, HttpServer]:
    started: dict[str, HttpServer] = {}
    try:
        for name in names:
            started[name] = await _http_server(ctx, name).start()
    except BaseException:
        for server in started.values():
            await server.stop()
        raise
    return started


def _http_server(ctx: Context, name: str) -> HttpServer:
    if name == "ceiling":
        return servers.ceiling(ctx.log_dir)
    if name == "samvad":
        return servers.samvad("samvad", ctx.project("samvad"), ctx.emulator_host, ctx.log_dir)
    if name == "samvad-quiet":  # the access log off
        project = ctx.project("quiet")
        return servers.samvad(name, project, ctx.emulator_host, ctx.log_dir, log_level="WARNING")
    if name == "baseline":
        project = ctx.project("baseline")
        return servers.baseline(name, project, ctx.emulator_host, ctx.log_dir)
    raise ValueError(name)


async def settle(ctx: Context, name: str, server: HttpServer) -> None:
    """Let background work of the last run finish before the next one is measured."""
    if name.startswith("samvad"):
        await wait_backlog_empty(ctx.http, server.url)
    await asyncio.sleep(0.2)


def best_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the most throughput, and the least server CPU per request of any round:
    interference from other work on the machine only ever slows a run down and makes each
    request cost more CPU (caches, shared cores), never the other way."""
    best = dict(max(rounds, key=lambda r: r["throughput"]))
    per_request = [
        r["server_cpu"] / r["throughput"] * 1e6
        for r in rounds
        if r["throughput"] and r["server_cpu"]
    ]
    best["cpu_us_per_request"] = round(min(per_request), 1) if per_request else None
    best["rounds"] = [
        {k: r[k] for k in ("throughput", "p50_ms", "p99_ms", "server_cpu")} for r in rounds
    ]
    return best


async def http(
    ctx: Context,
    ops: Iterable[str] = OPS,
    levels: Iterable[int] | None = None,
    names: Iterable[str] = SERVERS,
    duration: float | None = None,
    warmup: float | None = None,
    rounds: int | None = None,
) -> dict[str, Any]:
    """Closed-loop throughput and latency of each op at each connection count. The servers take
    turns cell by cell (the order rotates), each cell `rounds` times, so that noise from other
    work on the machine falls on all of them alike."""
    levels = tuple(levels or ctx.pick(LEVELS, (1, 8)))
    names = tuple(names)
    duration = duration or ctx.pick(1.5, 1.0)
    warmup = warmup or ctx.pick(0.4, 0.3)
    rounds = rounds or ctx.rounds or ctx.pick(2, 1)
    users = [f"bench-u{i}" for i in range(max(levels))]
    running = await start_http_servers(ctx, names)
    results: dict[str, Any] = {op: {name: {} for name in names} for op in ops}
    try:
        for name, server in running.items():
            await seed(ctx, server, users)
            await settle(ctx, name, server)
        for op in ops:
            spec = {**SPECS[op], "users": users}
            for index, connections in enumerate(levels):
                runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
                for turn in range(rounds):
                    shift = (index + turn) % len(names)
                    for name in names[shift:] + names[:shift]:
                        server = running[name]
                        result = await run_loadgen(server, spec, connections, duration, warmup)
                        result["rss_bytes"] = server.rss()
                        runs[name].append(result)
                        log(
                            f"{op:8} {name:9} c={connections:<4} {result['throughput']:8.0f}/s "
                            f"p50 {result['p50_ms']:.2f} p99 {result['p99_ms']:.2f} ms "
                            f"cpu srv {result['server_cpu']} cli {result['client_cpu']}"
                        )
                        await settle(ctx, name, server)
                for name in names:
                    results[op][name][str(connections)] = best_of(runs[name])
    finally:
        for server in running.values():
            await server.stop()
    return {
        "duration": duration,
        "warmup": warmup,
        "rounds": rounds,
        "levels": list(levels),
        "results": results,
    }


# What each variant changes, as SAMVAD_<NAME> settings of the server (bench_drop: bench/layers.py).
LAYER_VARIANTS: dict[str, dict[str, str]] = {
    "samvad": {},
    "with an access line per request": {"access_log": "all"},
    "without the change feed": {"sync_interval": "0"},
    "without the edge": {"bench_drop": "edge"},
    "without edge and feed": {"bench_drop": "edge", "sync_interval": "0"},
}


async def layers(ctx: Context) -> dict[str, Any]:
    """What each cross-cutting layer costs: samvad with one layer changed at a time
    (bench/layers.py), GET state at 32 connections, side by side with the ceiling."""
    users = [f"bench-u{i}" for i in range(32)]
    spec = {**SPECS["state"], "users": users}
    rounds = ctx.rounds or ctx.pick(4, 1)
    started: dict[str, HttpServer] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        started["ceiling"] = await servers.ceiling(ctx.log_dir).start()
        for label, settings in LAYER_VARIANTS.items():
            server = servers.samvad(
                f"layers-{len(started)}",
                ctx.project(f"layers{len(started)}"),
                ctx.emulator_host,
                ctx.log_dir,
                module="bench.layers",
                **settings,
            )
            started[label] = await server.start()
        for name, server in started.items():
            await seed(ctx, server, users, messages=2)
            await settle(ctx, name, server)
        runs = {name: [] for name in started}
        for turn in range(rounds):
            names = list(started)
            shift = turn % len(names)
            for name in names[shift:] + names[:shift]:
                result = await run_loadgen(started[name], spec, 32, ctx.pick(1.2, 1.0), 0.3)
                runs[name].append(result)
                log(f"layers {name}: {result['throughput']:.0f}/s")
                await settle(ctx, name, started[name])
    finally:
        for server in started.values():
            await server.stop()
    best = {name: best_of(r) for name, r in runs.items()}
    base = best["samvad"]["cpu_us_per_request"]
    return {
        "connections": 32,
        "rounds": rounds,
        "variants": LAYER_VARIANTS,
        "results": best,
        "saved_us_per_request": {
            name: round(base - r["cpu_us_per_request"], 1)
            for name, r in best.items()
            if name not in ("samvad", "ceiling") and base and r["cpu_us_per_request"]
        },
    }


# ---- cold reads ----------------------------------------------------------------------------------


async def cold(ctx: Context) -> dict[str, Any]:
    """GETs of users that nothing has read yet, against a direct get of the same documents."""
    from google.cloud.firestore_v1 import AsyncClient

    from samvad.store.base import Message, UserState
    from samvad.store.firestore import FirestoreStore

    project = ctx.project("cold")
    count = ctx.pick(300, 30)
    state_users = [f"cold-s{i}" for i in range(count)]
    profile_users = [f"cold-p{i}" for i in range(count)]
    os.environ["FIRESTORE_EMULATOR_HOST"] = ctx.emulator_host
    store = FirestoreStore.connect(project)
    now_us = int(time.time() * 1e6)

    async def write(user: str) -> None:
        await store.put_state(UserState(user, STATE, now_us))
        messages = [
            Message(
                f"{now_us + i:017d}-bench",
                "user" if i % 2 == 0 else "assistant",
                MESSAGE,
                now_us + i,
            )
            for i in range(10)
        ]
        await store.append_messages(user, messages, 100)

    await for_each(state_users + profile_users, write, 16)
    await store.close()

    server = servers.samvad("samvad-cold", project, ctx.emulator_host, ctx.log_dir)
    await server.start()
    client = AsyncClient(project=project)
    try:
        await asyncio.sleep(1.5)  # the change feed's first poll is behind us
        # one warm-up request each way, on users that are not measured
        await call(ctx.http, "GET", f"{server.url}/api/session/none/state")
        await client.collection("user_states").document("none").get()

        async def timed(read: Awaitable[Any]) -> float:
            started = time.perf_counter()
            await read
            return time.perf_counter() - started

        async def samvad_get(path: str) -> None:
            status, _ = await call(ctx.http, "GET", server.url + path)
            assert status == 200, (path, status)

        async def direct_get(collection: str, user: str) -> None:
            snap = await client.collection(collection).document(user).get()
            assert snap.exists

        async def direct_profile(user: str) -> None:
            await direct_get("user_profiles", user)
            await direct_get("user_states", user)

        async def direct_both(user: str) -> None:
            await asyncio.gather(direct_get("user_profiles", user), direct_get("user_states", user))

        # Each user's reads one after the other, the order alternating from user to user, so
        # that neither way always meets the emulator first (or right after the seeding).
        times: dict[str, list[float]] = {
            key: []
            for key in (
                "samvad_state",
                "direct_get",
                "samvad_profile",
                "direct_two_gets",
                "direct_two_gets_at_once",
            )
        }
        for i, user in enumerate(state_users):
            reads = [
                ("samvad_state", samvad_get(f"/api/session/{user}/state")),
                ("direct_get", direct_get("user_states", user)),
            ]
            for key, read in reads if i % 2 == 0 else reversed(reads):
                times[key].append(await timed(read))
        for i, user in enumerate(profile_users):
            reads = [
                ("samvad_profile", samvad_get(f"/api/session/{user}/profile")),
                ("direct_two_gets", direct_profile(user)),
                ("direct_two_gets_at_once", direct_both(user)),
            ]
            for key, read in reads if i % 2 == 0 else reversed(reads):
                times[key].append(await timed(read))
        cached = [await timed(samvad_get(f"/api/session/{u}/state")) for u in state_users]
        results: dict[str, Any] = {key: summary(values) for key, values in times.items()}
        results["samvad_state_cached"] = summary(cached)
        for key, value in results.items():
            log(f"cold {key}: p50 {value['p50_ms']} p99 {value['p99_ms']} ms")
    finally:
        client.close()  # type: ignore[no-untyped-call]
        await server.stop()
    return {"users": count, **results}


# ---- the voice workloads, counted at the proxy ---------------------------------------------------


def by_collection(per_document: dict[str, int]) -> dict[str, int]:
    """Writes per collection ("user_profiles", "sessions", "user_profiles/history", ...)."""
    out: Counter[str] = Counter()
    for name, writes in per_document.items():
        parts = name.split("/documents/", 1)[-1].split("/")
        out["/".join(parts[0::2])] += writes
    return dict(out.most_common())


def tally(counts: dict[str, Any], messages: int, turns: int) -> dict[str, Any]:
    reads = counts["reads"]
    writes = counts["writes"]
    return {
        "messages": messages,
        "turns": turns,
        "writes": writes,
        "updates": counts["updates"],
        "deletes": counts["deletes"],
        "transforms": counts["transforms"],
        "commits": counts["commits"],
        "writes_by_collection": by_collection(counts["perDocument"]),
        "reads": reads,
        "writes_per_message": round(writes / messages, 3) if messages else None,
        "max_writes_per_doc_per_second": counts["maxWritesPerDocPerSecond"],
        "max_writes_doc": _short_doc(counts.get("maxWritesPerDocPerSecondDocument")),
        "calls": counts["calls"],
        "errors": counts["errors"],
    }


def _short_doc(name: str | None) -> str | None:
    return name.split("/documents/", 1)[-1] if name else None


@dataclass
class Traffic:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    statuses: Counter[str] = field(default_factory=Counter)

    async def send(
        self, http: aiohttp.ClientSession, kind: str, method: str, url: str, body: Any = None
    ) -> int:
        started = time.perf_counter()
        try:
            status, _ = await call(http, method, url, body)
        except aiohttp.ClientError:
            status = 599
        self.latencies.setdefault(kind, []).append(time.perf_counter() - started)
        self.statuses[f"{kind} {status}"] += 1
        return status

    def report(self) -> dict[str, Any]:
        return {
            "statuses": dict(self.statuses),
            "latency": {kind: summary(values) for kind, values in self.latencies.items()},
        }


async def at(t0: float, offset: float) -> None:
    delay = t0 + offset - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


async def chatty(
    ctx: Context, server: HttpServer, prefix: str, seconds: float, interruptions: bool
) -> tuple[Traffic, int]:
    """10 users, 5 messages a second each (user and assistant alternating), and a barge-in
    over REST every 10th message."""
    users = 10
    per_second = 5
    traffic = Traffic()
    sent = 0

    async def user(u: int) -> None:
        nonlocal sent
        t0 = time.perf_counter() + u * 0.02
        for k in range(int(seconds * per_second)):
            await at(t0, k / per_second)
            body = {"role": "user" if k % 2 == 0 else "assistant", "content": MESSAGE}
            url = f"{server.url}/api/session/{prefix}-u{u}/history"
            await traffic.send(ctx.http, "append", "POST", url, body)
            sent += 1
            if interruptions and k % 10 == 5:
                url = f"{server.url}/api/session/{prefix}-s{u}/interruptions"
                await traffic.send(ctx.http, "interruption", "POST", url, INTERRUPTION)

    await asyncio.gather(*(user(u) for u in range(users)))
    return traffic, sent


async def create_sessions(ctx: Context, server: HttpServer, prefix: str, users: int) -> None:
    for u in range(users):
        body = {"sessionId": f"{prefix}-s{u}", "userId": f"{prefix}-u{u}", "language": "en"}
        status, _ = await call(ctx.http, "POST", f"{server.url}/api/session/create", body)
        assert status in (200, 201), status


async def paced(ctx: Context, server: HttpServer, prefix: str, turns: int) -> tuple[Traffic, int]:
    """The design note's session: on connect the state and history are read and the session is
    created; `turns` turns (a user message, the assistant's 1.2 s later, one turn every 2.4 s);
    5 session updates; the session ended. 10 users at once."""
    users = 10
    traffic = Traffic()
    period = 2.4

    async def user(u: int) -> None:
        uid, sid = f"{prefix}-u{u}", f"{prefix}-s{u}"
        t0 = time.perf_counter() + u * 0.05
        await at(t0, 0)
        await traffic.send(ctx.http, "get", "GET", f"{server.url}/api/session/{uid}/state")
        await traffic.send(ctx.http, "get", "GET", f"{server.url}/api/session/{uid}/profile")
        session = {"sessionId": sid, "userId": uid, "language": "en", "metadata": {"turn": 0}}
        await traffic.send(ctx.http, "session", "POST", f"{server.url}/api/session/create", session)
        updates = {round(turns * i / 5) for i in range(5)}
        for k in range(turns):
            await at(t0, 0.1 + k * period)
            url = f"{server.url}/api/session/{uid}/history"
            await traffic.send(
                ctx.http, "append", "POST", url, {"role": "user", "content": MESSAGE}
            )
            await at(t0, 0.1 + k * period + period / 2)
            await traffic.send(
                ctx.http, "append", "POST", url, {"role": "assistant", "content": REPLY}
            )
            if k in updates:
                update = {**session, "metadata": {"turn": k}}
                await traffic.send(
                    ctx.http, "session", "POST", f"{server.url}/api/session/create", update
                )
        await at(t0, 0.1 + turns * period)
        await traffic.send(ctx.http, "session", "PUT", f"{server.url}/api/session/{sid}/end")

    await asyncio.gather(*(user(u) for u in range(users)))
    return traffic, users * turns


async def interruptions_available(ctx: Context, server: HttpServer, prefix: str) -> str | None:
    """None if POST /api/session/{sessionId}/interruptions works, else why not."""
    status, body = await call(
        ctx.http, "POST", f"{server.url}/api/session/{prefix}-s0/interruptions", INTERRUPTION
    )
    return None if status == 201 else f"POST .../interruptions answered {status}: {body}"


async def quiesce(ctx: Context, name: str, server: HttpServer, feed: float) -> None:
    """Everything written has landed, and samvad's change feed has seen it."""
    if name == "samvad":
        await wait_backlog_empty(ctx.http, server.url)
        await asyncio.sleep(feed)
    else:
        await asyncio.sleep(0.5)


async def voice(ctx: Context) -> dict[str, Any]:
    """Idle change-feed polling, the chatty workload and the paced one, for samvad and the
    baseline in turn, every Firestore call counted at the proxy."""
    proxy = await ProxyProcess(ctx.emulator_host, ctx.log_dir).start()
    seconds = ctx.pick(20.0, 3.0)
    turns = ctx.pick(10, 2)
    idle_seconds = ctx.pick(60.0, 4.0)
    out: dict[str, Any] = {"chatty_seconds": seconds, "paced_turns": turns}
    try:
        for name in ("samvad", "baseline"):
            project = ctx.project(f"voice-{name}")
            if name == "samvad":
                server = servers.samvad("samvad-voice", project, proxy.grpc_host, ctx.log_dir)
            else:
                server = servers.baseline("baseline-voice", project, proxy.grpc_host, ctx.log_dir)
            await server.start()
            result: dict[str, Any] = {}
            try:
                await asyncio.sleep(2.5)
                if name == "samvad":
                    await proxy.reset()
                    await asyncio.sleep(idle_seconds)
                    idle = await proxy.counts()
                    result["idle"] = {
                        "seconds": idle_seconds,
                        "reads": idle["reads"],
                        "calls": idle["calls"],
                        "writes": idle["writes"],
                    }
                    log(f"idle feed: {idle['reads']['billed']} reads in {idle_seconds}s")

                await create_sessions(ctx, server, "chat", 10)
                missing = await interruptions_available(ctx, server, "chat")
                if missing:
                    ctx.notes.append(f"voice/{name}: interruptions not sent: {missing}")
                await quiesce(ctx, name, server, 2.5)
                await proxy.reset()
                started = time.perf_counter()
                traffic, messages = await chatty(ctx, server, "chat", seconds, missing is None)
                elapsed = time.perf_counter() - started
                await quiesce(ctx, name, server, 2.5)
                counts = await proxy.counts()
                result["chatty"] = {
                    **tally(counts, messages, messages // 2),
                    "seconds": round(elapsed, 2),
                    "interruptions": missing is None,
                    **traffic.report(),
                }
                log(
                    f"chatty {name}: {result['chatty']['writes_per_message']} writes/message, "
                    f"max {result['chatty']['max_writes_per_doc_per_second']}/doc/s"
                )

                await proxy.reset()
                started = time.perf_counter()
                traffic, turns_done = await paced(ctx, server, "paced", turns)
                elapsed = time.perf_counter() - started
                await quiesce(ctx, name, server, 2.5)
                counts = await proxy.counts()
                result["paced"] = {
                    **tally(counts, turns_done * 2, turns_done),
                    "seconds": round(elapsed, 2),
                    "sessions": 10,
                    **traffic.report(),
                }
                log(
                    f"paced {name}: {result['paced']['writes']} writes, "
                    f"{result['paced']['reads']['billed']} reads for {turns_done} turns"
                )
            finally:
                await server.stop()
            out[name] = result
    finally:
        await proxy.stop()
    return out


# ---- recovery ------------------------------------------------------------------------------------


async def emulator_flush_rate(ctx: Context, host: str, users: int, concurrency: int) -> float:
    """History flushes a second that Firestore at `host` takes from samvad's own store code,
    called from this process (no samvad server): the ceiling of any backlog drain there."""
    from samvad.store.base import Message
    from samvad.store.firestore import FirestoreStore

    os.environ["FIRESTORE_EMULATOR_HOST"] = host
    store = FirestoreStore.connect(ctx.project("flushrate"))
    now_us = int(time.time() * 1e6)

    async def flush(i: int) -> None:
        message = Message(f"{now_us + i:017d}-bench", "user", MESSAGE, now_us + i)
        await store.append_messages(f"rate-u{i}", [message], 100)

    try:
        started = time.perf_counter()
        await for_each(range(users), flush, concurrency)
        return users / (time.perf_counter() - started)
    finally:
        await store.close()
        os.environ["FIRESTORE_EMULATOR_HOST"] = ctx.emulator_host


async def recovery(ctx: Context) -> dict[str, Any]:
    """Appends of many distinct users acknowledged while Firestore is down; then it comes back
    and the backlog is drained: how long, and how it drains over time."""
    pending = ctx.pick(10_000, 300)
    settings = Settings()
    sample, concurrency = ctx.pick(500, 100), settings.flush_concurrency
    direct_rate = await emulator_flush_rate(ctx, ctx.emulator_host, sample, concurrency)
    proxy = await ProxyProcess(ctx.emulator_host, ctx.log_dir).start()
    server = servers.samvad(
        "samvad-recovery",
        ctx.project("recovery"),
        proxy.grpc_host,
        ctx.log_dir,
        backlog_max_bytes=512 * 1024 * 1024,
    )
    try:
        proxied_rate = await emulator_flush_rate(ctx, proxy.grpc_host, sample, concurrency)
        log(f"emulator: {direct_rate:.0f} flushes/s direct, {proxied_rate:.0f} via the proxy")
        await server.start()
        await asyncio.sleep(2.0)
        await proxy.down()
        statuses: Counter[int] = Counter()

        async def append(i: int) -> None:
            body = {"role": "user", "content": MESSAGE}
            status, _ = await call(
                ctx.http, "POST", f"{server.url}/api/session/rec-u{i}/history", body
            )
            statuses[status] += 1

        started = time.perf_counter()
        await for_each(range(pending), append, 32)
        acknowledged_in = time.perf_counter() - started
        # The first failed flush opens the circuit (a store call gives up after its deadline).
        noticed = time.perf_counter()
        while (await backlog(ctx.http, server.url)).get("firestoreReachable", True):
            if time.perf_counter() - noticed > 60:
                raise RuntimeError("samvad never noticed that Firestore was down")
            await asyncio.sleep(0.1)
        noticed_in = time.perf_counter() - noticed
        await asyncio.sleep(2.0)  # down for a while, as in a real outage: the prober backs off
        before = await backlog(ctx.http, server.url)
        log(f"recovery: {statuses}, backlog {before.get('backlog')}")
        await proxy.reset()
        series: list[tuple[float, int, bool]] = []
        t0 = time.perf_counter()
        await proxy.up()
        reachable_at = None
        while time.perf_counter() - t0 < 300:
            ready = await backlog(ctx.http, server.url)
            t = round(time.perf_counter() - t0, 3)
            entries = ready["backlog"]["entries"]
            series.append((t, entries, ready["firestoreReachable"]))
            if reachable_at is None and ready["firestoreReachable"]:
                reachable_at = t
            if entries == 0:
                break
            await asyncio.sleep(0.1)
        counts = await proxy.counts()
    finally:
        await server.stop()
        await proxy.stop()
    empty_at = series[-1][0] if series and series[-1][1] == 0 else None
    log(f"recovery: reachable after {reachable_at}s, empty after {empty_at}s")
    return {
        "pending": pending,
        "statuses": {str(k): v for k, v in statuses.items()},
        "acknowledged_seconds": round(acknowledged_in, 3),
        "outage_noticed_after_s": round(noticed_in, 3),
        "backlog_before": before.get("backlog"),
        "reachable_after_s": reachable_at,
        "empty_after_s": empty_at,
        "drain_after_reachable_s": round(empty_at - reachable_at, 3)
        if empty_at is not None and reachable_at is not None
        else None,
        "writes_during_drain": counts["writes"],
        "series": series,
        "retry_max_s": settings.retry_max,
        "flush_concurrency": settings.flush_concurrency,
        "emulator_direct_flushes_per_s": round(direct_rate, 1),
        "emulator_proxied_flushes_per_s": round(proxied_rate, 1),
    }


# ---- websockets ----------------------------------------------------------------------------------


async def _ws_probe(ctx: Context, server: HttpServer) -> str | None:
    """None if /ws opens and sends its ready frame, else why not."""
    try:
        async with ctx.http.ws_connect(
            f"{server.url}/ws", params={"userId": "probe-u", "sessionId": "probe-s"}
        ) as ws:
            frame = await ws.receive(timeout=10)
            if frame.type is aiohttp.WSMsgType.TEXT and '"ready"' in frame.data:
                return None
            return f"first frame was {frame.type.name} {str(frame.data)[:200]}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"


class _WsClient:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def event(self, within: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), within)
        if not line:
            raise RuntimeError("websocket client exited")
        event: dict[str, Any] = json.loads(line)
        return event

    async def command(self, text: str, within: float = 60.0) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode() + b"\n")
        await self.process.stdin.drain()
        return await self.event(within)


async def _ws_client(server: HttpServer, count: int, prefix: str) -> _WsClient:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.wsclient",
        f"--url={server.url}",
        f"--count={count}",
        f"--prefix={prefix}",
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    return _WsClient(process)


async def websockets(ctx: Context) -> dict[str, Any]:
    """RSS of one samvad process before and after `count` idle agent sockets, heartbeats on."""
    count = ctx.pick(10_000, 200)
    heartbeat = ctx.pick(5.0, 2.0)
    # More flushes at once only so that the 10,000 session writes land sooner: the figure here
    # is what idle sockets cost, measured once nothing is pending.
    server = servers.samvad(
        "samvad-ws",
        ctx.project("ws"),
        ctx.emulator_host,
        ctx.log_dir,
        ws_heartbeat=heartbeat,
        flush_concurrency=64,
    )
    await server.start()
    try:
        reason = await _ws_probe(ctx, server)
        if reason is not None:
            ctx.notes.append(f"websockets not measured: {reason}")
            return {"measured": False, "reason": reason}
        warm = await _ws_client(server, 50, "warm")  # first use of every code path
        await warm.event(120)
        await warm.command("close")
        await warm.process.wait()
        await wait_backlog_empty(ctx.http, server.url, 120)
        await asyncio.sleep(1.0)
        rss_before = server.rss()
        client = await _ws_client(server, count, "idle")
        opened = await client.event(900)
        log(f"websockets: {opened}")
        await wait_backlog_empty(ctx.http, server.url, 300)
        cpu0, t0 = server.cpu(), time.perf_counter()
        await asyncio.sleep(heartbeat * 2.5)  # at least two heartbeats on every socket
        idle_cpu = (server.cpu() - cpu0) / (time.perf_counter() - t0)
        rss_after = server.rss()
        still_open = (await client.command("report"))["open"]
        closed = await client.command("close", 300)
        await client.process.wait()
        log(f"websockets: {still_open} open after heartbeats, rss {rss_before} -> {rss_after}")
    finally:
        await server.stop()
    return {
        "measured": True,
        "count": count,
        "opened": opened["opened"],
        "failed": opened["failed"],
        "refusals": opened["refusals"],
        "open_seconds": opened["seconds"],
        "open_after_heartbeats": still_open,
        "heartbeat_s": heartbeat,
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "bytes_per_connection": round((rss_after - rss_before) / max(1, opened["opened"])),
        "idle_cpu": round(idle_cpu, 3),
        "close_seconds": closed["seconds"],
        "open_files_limit": opened["openFilesLimit"],
    }


# ---- interruption push, in process ---------------------------------------------------------------


def push_latency(pushes: int, sessions: int = 1000) -> dict[str, Any]:
    """`service.push_interruption` timed call by call in this process (no I/O is involved)."""
    from samvad.service import SessionPersistenceService
    from samvad.store.memory import MemoryStore

    service = SessionPersistenceService(MemoryStore(), Settings())
    data = dict(INTERRUPTION)
    for i in range(min(pushes, 10_000)):  # warm-up
        service.push_interruption(f"s{i % sessions}", f"u{i % sessions}", data)
    clock = time.perf_counter_ns
    samples = []
    for i in range(pushes):
        sid, uid = f"s{i % sessions}", f"u{i % sessions}"
        started = clock()
        service.push_interruption(sid, uid, data)
        samples.append(clock() - started)
    samples.sort()
    return {
        "pushes": pushes,
        "sessions": sessions,
        "p50_us": round(percentile(samples, 0.5) / 1e3, 2),
        "p99_us": round(percentile(samples, 0.99) / 1e3, 2),
        "p999_us": round(percentile(samples, 0.999) / 1e3, 2),
        "max_us": round(samples[-1] / 1e3, 2),
        "gc_enabled": gc.isenabled(),
    }


async def interruptions(ctx: Context) -> dict[str, Any]:
    result: dict[str, Any] = {"in_process": push_latency(ctx.pick(200_000, 20_000))}
    log(f"interruption push: {result['in_process']}")
    script = ROOT / "bench" / "interruption_push.py"
    if script.exists():
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(process.communicate(), 300)
            result["interruption_push_py"] = {
                "exit": process.returncode,
                "output": out.decode()[-6000:],
            }
        except TimeoutError:
            process.kill()
            result["interruption_push_py"] = {"exit": None, "output": "timed out after 300 s"}
    return result


# ---- profiles ------------------------------------------------------------------------------------


def top_frames(collapsed: str, limit: int = 25) -> dict[str, Any]:
    """Self and inclusive shares of frames in py-spy's collapsed ("raw") output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame_name(f) for f in stack.split(";")]
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def share(count: int) -> float:
        return round(100 * count / total, 1) if total else 0.0

    return {
        "samples": total,
        "self": [(name, share(c)) for name, c in own.most_common(limit)],
        "inclusive": [(name, share(c)) for name, c in inclusive.most_common(limit * 2)],
    }


def _frame_name(frame: str) -> str:
    """`render (samvad/api/routes.py:60)` -> `render (samvad/api/routes.py)`."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3.11/", str(ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})" if path else name


async def profile(ctx: Context) -> dict[str, Any]:
    """py-spy against the samvad process under the GET state and the POST append workloads."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        ctx.notes.append("profile: py-spy is not installed (pip install -e '.[bench]')")
        return {"measured": False}
    out_dir = ROOT / "bench" / "results" / "profiles"
    out_dir.mkdir(parents=True, exist_ok=True)
    running = await start_http_servers(ctx, ("samvad",))
    server = running["samvad"]
    users = [f"bench-u{i}" for i in range(32)]
    seconds = ctx.pick(8, 2)
    results: dict[str, Any] = {}
    try:
        await seed(ctx, server, users, messages=SEED_MESSAGES)
        await settle(ctx, "samvad", server)
        for op in ("state", "append"):
            spec = {**SPECS[op], "users": users}
            load = asyncio.ensure_future(run_loadgen(server, spec, 32, seconds + 1.5, 0.5))
            await asyncio.sleep(1.0)
            target = out_dir / f"samvad-{op}.txt"
            process = await asyncio.create_subprocess_exec(
                spy,
                "record",
                "--pid",
                str(server.pid),
                "--duration",
                str(seconds),
                "--rate",
                "200",
                "--format",
                "raw",
                "--nonblocking",
                "-o",
                str(target),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            _, err = await process.communicate()
            throughput = (await load)["throughput"]
            if process.returncode != 0 or not target.exists():
                ctx.notes.append(f"profile {op}: py-spy failed: {err.decode()[-500:]}")
                continue
            results[op] = {"throughput": throughput, **top_frames(target.read_text())}
            log(f"profile {op}: {results[op]['samples']} samples")
            await settle(ctx, "samvad", server)
    finally:
        await server.stop()
    return {"measured": bool(results), **results}


# ---- micro-benchmarks of hot-path pieces, in this process --------------------------------------


def _best_us(function: Callable[[], Any], number: int) -> float:
    """Microseconds per call: the best of 5 timings of `number` calls."""
    return round(min(timeit.repeat(function, number=number, repeat=5)) / number * 1e6, 2)


def flush_encoding(number: int) -> dict[str, Any]:
    """CPU of encoding (and decoding) one history flush of samvad's layout, by history length:
    the profile document with its inline tail of messages, as the Firestore client encodes it
    on the event loop. Beside it, the same tail as one JSON text field."""
    from google.cloud.firestore_v1 import _helpers

    from samvad.clock import from_micros
    from samvad.store.base import Message
    from samvad.store.firestore import _message_doc

    out: dict[str, Any] = {}
    now_us = int(time.time() * 1e6)
    for length in (10, 50, 100):
        messages = [
            Message(f"{now_us + i:017d}-bench", "user", MESSAGE, now_us + i) for i in range(length)
        ]
        doc = {
            "userId": "bench-u0",
            "createdAt": from_micros(now_us),
            "lastUpdated": from_micros(now_us),
            "version": 1,
            "tail": [_message_doc(m) for m in messages],
            "chunks": [],
            "nextChunk": 0,
        }
        as_text = {
            **doc,
            "tail": json.dumps([[m.id, m.role, m.content, m.at_us] for m in messages]),
        }
        encoded = _helpers.encode_dict(doc)
        out[str(length)] = {
            "encode_us": _best_us(partial(_helpers.encode_dict, doc), number),
            "decode_us": _best_us(partial(_helpers.decode_dict, encoded, None), number),
            "encode_tail_as_text_us": _best_us(partial(_helpers.encode_dict, as_text), number),
        }
    return out


async def request_pieces(number: int) -> dict[str, Any]:
    """Per-request pieces of a cached GET state and of an append, each timed alone."""
    import itertools
    import logging
    import uuid

    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request
    from aiohttp.web_urldispatcher import UrlMappingMatchInfo
    from multidict import CIMultiDict, CIMultiDictProxy

    from samvad import logs
    from samvad.api import routes
    from samvad.api.metrics import Metrics
    from samvad.api.observability import request_log_context
    from samvad.api.responses import SECURITY_HEADERS, json_response
    from samvad.models import StateResponse

    app = web.Application()
    app.add_routes(routes.routes)
    route = next(
        r
        for r in app.router.routes()
        if r.method == "GET"
        and r.resource
        and r.resource.canonical == "/api/session/{userId}/state"
    )
    match_info = UrlMappingMatchInfo({"userId": "u1"}, route)
    request = make_mocked_request("GET", "/api/session/u1/state", app=app)
    request._match_info = match_info  # make_mocked_request would put a Mock route in its place
    response = web.Response(body=b'{"success":true}', content_type="application/json")
    model = StateResponse(user_id="u1", state={**STATE, "updatedAt": "x", "isActive": True})
    body = json.dumps({"role": "user", "content": MESSAGE}).encode()

    class Body:
        async def read(self) -> bytes:
            return body

    def read_object() -> None:
        coroutine = routes.read_object(Body())  # type: ignore[arg-type]
        with contextlib.suppress(StopIteration):
            coroutine.send(None)

    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    with tempfile.TemporaryFile("w") as sink:
        handler = logging.StreamHandler(sink)
        handler.setFormatter(logs.JsonFormatter())
        root.handlers[:] = [handler]
        root.setLevel(logging.INFO)
        access = logs.AccessLogger(logging.getLogger("aiohttp.access"), "")
        context = logs.RequestLogContext(request_id=uuid.uuid4().hex)
        token = logs.CURRENT_REQUEST.set(context)  # as the edge sets it
        try:
            access_line = _best_us(lambda: access.log(request, response, 0.0012), number)
        finally:
            logs.CURRENT_REQUEST.reset(token)
            root.handlers[:], root.level = saved_handlers, saved_level
    headers = CIMultiDictProxy(CIMultiDict({"Host": "127.0.0.1"}))
    metrics = Metrics()
    counter, prefix = itertools.count(), uuid.uuid4().hex[:16]

    def with_setdefault() -> None:
        headers_out = web.Response(body=b"{}", content_type="application/json").headers
        for name, value in SECURITY_HEADERS.items():
            headers_out.setdefault(name, value)
        headers_out.setdefault("Content-Security-Policy", "x")

    return {
        "render_state_response": _best_us(lambda: routes.render(model), number),
        "read_object_append_body": _best_us(read_object, number),
        "access_line": access_line,
        "request_log_context_no_trace": _best_us(lambda: request_log_context(headers, "p"), number),
        "uuid4_hex": _best_us(lambda: uuid.uuid4().hex, number),
        "prefix_and_counter_id": _best_us(lambda: f"{prefix}{next(counter):016x}", number),
        "request_latency_observe": _best_us(
            lambda: metrics.requests.observe("/api/session/{userId}/state", "GET", 200, 4e-4),
            number,
        ),
        "response_with_security_headers_setdefault": _best_us(with_setdefault, number),
        "response_with_security_headers_prebuilt": _best_us(lambda: json_response(b"{}"), number),
    }


async def micro(ctx: Context) -> dict[str, Any]:
    result = {
        "flush_encoding": flush_encoding(ctx.pick(50, 5)),
        "request_pieces": await request_pieces(ctx.pick(20_000, 2_000)),
    }
    log(f"micro: {result}")
    return result


WORKLOADS: dict[str, Callable[[Context], Awaitable[dict[str, Any]]]] = {
    "generator": generator,
    "http": http,
    "layers": layers,
    "cold": cold,
    "voice": voice,
    "recovery": recovery,
    "websockets": websockets,
    "interruptions": interruptions,
    "profile": profile,
    "micro": micro,
}
