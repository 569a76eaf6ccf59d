"""Nothing acknowledged is lost: real server processes, real emulator, real kills and outages."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support import ServerProcess, request, wait_for
from tools.firestore_proxy import FirestoreProxy

API = "/api/session"
StartServer = Callable[..., Awaitable[ServerProcess]]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def start_server(
    tmp_path: Path, project_id: str, emulator_host: str
) -> AsyncIterator[StartServer]:
    started: list[ServerProcess] = []

    async def start(firestore_host: str | None = None, **settings: Any) -> ServerProcess:
        defaults = {"sync_interval": 0.5, "retry_base": 0.05, "retry_max": 0.5}
        server = ServerProcess(
            project_id, firestore_host or emulator_host, tmp_path, **{**defaults, **settings}
        )
        started.append(server)
        return await server.start()

    yield start
    for server in started:
        await server.kill()


@pytest.fixture
async def proxy(emulator_host: str) -> AsyncIterator[Any]:
    """A gRPC pass-through in front of the emulator that can play an outage."""
    proxy = FirestoreProxy(emulator_host)
    await proxy.start()
    yield proxy
    await proxy.stop()


async def history(http: aiohttp.ClientSession, server: ServerProcess, user: str) -> list[str]:
    status, body, _ = await request(http, "GET", f"{server.url}{API}/{user}/profile")
    if status == 404:
        return []
    assert status == 200, body
    return [m["content"] for m in body["profile"]["conversationHistory"]]


async def append(http: aiohttp.ClientSession, server: ServerProcess, user: str, text: str) -> int:
    status, body, _ = await request(
        http, "POST", f"{server.url}{API}/{user}/history", json={"role": "user", "content": text}
    )
    assert status in (200, 503), body
    return status


async def test_sigterm_flushes_every_acknowledged_append(
    start_server: StartServer, http: aiohttp.ClientSession
) -> None:
    # Flush windows far longer than the test: only the shutdown flush can save these writes.
    first = await start_server(flush_delay=60, flush_interval=60)
    sent = [f"turn {i}" for i in range(25)]
    for text in sent:
        assert await append(http, first, "u1", text) == 200
    _, body, _ = await request(http, "GET", f"{first.url}/readyz")
    assert body["backlog"]["entries"] == 1  # 25 appends coalesced into one pending write

    started = time.monotonic()
    assert await first.terminate(within=10) == 0  # inside Cloud Run's 10 s grace period
    assert time.monotonic() - started < 10

    second = await start_server()
    assert await history(http, second, "u1") == sent


async def test_outage_keeps_serving_and_everything_lands(
    start_server: StartServer, proxy: Any, http: aiohttp.ClientSession
) -> None:
    server = await start_server(firestore_host=proxy.grpc_host, store_timeout=1.0)
    proxy.go_down()
    latencies = []
    sent = [f"while down {i}" for i in range(40)]
    for text in sent:
        t0 = time.monotonic()
        assert await append(http, server, "u1", text) == 200
        latencies.append(time.monotonic() - t0)
    for path, payload, expected in [
        ("/u1/state", {"language": "hi", "topic": "loans"}, 200),
        ("/create", {"sessionId": "s1", "userId": "u1", "language": "hi"}, 201),
    ]:
        t0 = time.monotonic()
        status, body, _ = await request(http, "POST", f"{server.url}{API}{path}", json=payload)
        latencies.append(time.monotonic() - t0)
        assert status == expected, body
    status, body, _ = await request(http, "PUT", f"{server.url}{API}/s1/end")
    assert status == 200, body
    # No request waited on the failing Firestore (its own calls retry for ~1.5 s at least).
    assert max(latencies) < 1.0, latencies

    # Served from memory meanwhile.
    assert await history(http, server, "u1") == sent
    status, body, _ = await request(http, "GET", f"{server.url}{API}/u1/state")
    assert status == 200 and body["state"]["topic"] == "loans"
    status, body, _ = await request(http, "GET", f"{server.url}{API}/s1")
    assert status == 200 and body["session"]["isActive"] is False

    async def unreachable() -> Any:
        _, ready, _ = await request(http, "GET", f"{server.url}/readyz")
        return not ready["firestoreReachable"] and ready

    ready = await wait_for(unreachable, within=20)
    assert ready["backlog"]["entries"] == 3 and ready["backlog"]["bytes"] > 0
    status, body, _ = await request(http, "GET", f"{server.url}{API}/stats")
    assert status == 200 and body["stats"]["backlog"]["entries"] == 3
    assert body["stats"]["firestoreReachable"] is False

    proxy.go_up()

    async def drained() -> bool:
        _, ready, _ = await request(http, "GET", f"{server.url}/readyz")
        return bool(ready["firestoreReachable"] and ready["backlog"]["entries"] == 0)

    await wait_for(drained, within=30)
    await server.kill()  # no shutdown flush: it must all be in Firestore already

    fresh = await start_server()
    assert await history(http, fresh, "u1") == sent
    status, body, _ = await request(http, "GET", f"{fresh.url}{API}/u1/state")
    assert status == 200 and body["state"] == {**body["state"], "language": "hi", "topic": "loans"}
    status, body, _ = await request(http, "GET", f"{fresh.url}{API}/s1")
    assert status == 200 and body["session"]["isActive"] is False


async def test_full_backlog_says_503_and_loses_nothing_acknowledged(
    start_server: StartServer, proxy: Any, http: aiohttp.ClientSession
) -> None:
    server = await start_server(
        firestore_host=proxy.grpc_host, store_timeout=1.0, backlog_max_bytes=20_000
    )
    proxy.go_down()
    acknowledged = []
    refused = None
    for i in range(100):
        status, body, headers = await request(
            http,
            "POST",
            f"{server.url}{API}/user{i}/history",
            json={"role": "user", "content": "x" * 1000},
        )
        if status == 503:
            refused = (body, headers)
            break
        assert status == 200, body
        acknowledged.append(f"user{i}")
    assert refused is not None and acknowledged, "the backlog never filled"
    body, headers = refused
    assert body["success"] is False and "backlog" in body["error"]
    assert int(headers["Retry-After"]) >= 1
    _, ready, _ = await request(http, "GET", f"{server.url}/readyz")
    assert ready["acceptingWrites"] is False

    proxy.go_up()

    async def drained() -> bool:
        _, ready, _ = await request(http, "GET", f"{server.url}/readyz")
        return bool(ready["backlog"]["entries"] == 0)

    await wait_for(drained, within=30)
    await server.kill()
    fresh = await start_server()
    for user in acknowledged:
        assert await history(http, fresh, user) == ["x" * 1000]


async def test_durable_write_during_an_outage_is_202_not_durable(
    start_server: StartServer, proxy: Any, http: aiohttp.ClientSession
) -> None:
    server = await start_server(
        firestore_host=proxy.grpc_host, store_timeout=1.0, durable_timeout=0.5
    )
    proxy.go_down()
    status, body, _ = await request(
        http,
        "POST",
        f"{server.url}{API}/u1/history?durable=true",
        json={"role": "user", "content": "important"},
    )
    assert status == 202 and body["durable"] is False
    proxy.go_up()
    assert await server.terminate() == 0
    fresh = await start_server()
    assert await history(http, fresh, "u1") == ["important"]


async def test_refresh_right_after_appends_is_final(
    start_server: StartServer, http: aiohttp.ClientSession
) -> None:
    server = await start_server(flush_delay=60, flush_interval=60)
    for i in range(10):
        assert await append(http, server, "u1", f"secret {i}") == 200
    status, body, _ = await request(
        http, "POST", f"{server.url}{API}/refresh", json={"userId": "u1"}
    )
    assert status == 200 and body["cleared"]["userProfile"] is True
    assert await server.terminate() == 0
    fresh = await start_server()
    assert await history(http, fresh, "u1") == []


async def test_refresh_on_another_instance_beats_a_pending_backlog(
    start_server: StartServer, http: aiohttp.ClientSession
) -> None:
    holder = await start_server(flush_delay=60, flush_interval=60)  # keeps its writes pending
    wiper = await start_server()
    for i in range(10):
        assert await append(http, holder, "u1", f"secret {i}") == 200
    status, _, _ = await request(http, "POST", f"{holder.url}{API}/u1/state", json={"secret": True})
    assert status == 200
    status, body, _ = await request(
        http, "POST", f"{wiper.url}{API}/refresh", json={"userId": "u1"}
    )
    assert status == 200, body
    assert await holder.terminate() == 0  # flushes its backlog after the wipe: must be dropped
    fresh = await start_server()
    assert await history(http, fresh, "u1") == []
    status, _, _ = await request(http, "GET", f"{fresh.url}{API}/u1/state")
    assert status == 404


async def test_two_instances_interleave_appends_in_order(
    start_server: StartServer, http: aiohttp.ClientSession
) -> None:
    a = await start_server()
    b = await start_server()
    status, _, _ = await request(http, "POST", f"{a.url}{API}/u1/state", json={"v": 1})
    assert status == 200
    sent = [f"m{i}" for i in range(40)]
    for i, text in enumerate(sent):
        assert await append(http, a if i % 2 == 0 else b, "u1", text) == 200
    # both caches now hold a partial view; the change feed must bring them together
    for server in (a, b):

        async def complete(server: ServerProcess = server) -> bool:
            return await history(http, server, "u1") == sent

        await wait_for(complete, within=10)

    async def state_on_b(expected: int) -> bool:
        status, body, _ = await request(http, "GET", f"{b.url}{API}/u1/state")
        return status == 200 and body["state"]["v"] == expected

    await wait_for(lambda: state_on_b(1), within=10)  # b has it cached now
    status, _, _ = await request(http, "POST", f"{a.url}{API}/u1/state", json={"v": 2})
    assert status == 200
    await wait_for(lambda: state_on_b(2), within=10)


async def test_a_60kib_by_100_history_survives_a_restart(
    start_server: StartServer, http: aiohttp.ClientSession
) -> None:
    server = await start_server()
    sent = [f"{i:03d}" + "é" * (30 * 1024 - 2) for i in range(100)]  # 60 KiB of UTF-8 each
    assert all(len(text.encode()) <= 60 * 1024 for text in sent)
    for text in sent:
        assert await append(http, server, "u1", text) == 200
    assert await server.terminate() == 0
    fresh = await start_server()
    assert await history(http, fresh, "u1") == sent
