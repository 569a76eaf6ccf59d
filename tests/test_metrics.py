"""GET /metrics (Prometheus text) and /api/metrics/summary after real traffic on the emulator."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from samvad.api.metrics import Metrics
from samvad.app import create_app
from samvad.config import Settings
from tests.support import wait_for
from tools.firestore_proxy import FirestoreProxy

Client = TestClient[web.Request, web.Application]
HISTORY = "/api/session/{userId}/history"


async def scrape(client: Client) -> str:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return await response.text()


def value(text: str, name: str, **labels: str) -> float | None:
    """The sample `name` with exactly these labels (le aside), or None if absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


async def metric(client: Client, name: str, **labels: str) -> float | None:
    return value(await scrape(client), name, **labels)


async def test_requests_cache_backlog_and_flushes_are_counted(client: Client) -> None:
    for i in range(3):
        response = await client.post(
            "/api/session/alice/history", json={"role": "user", "content": f"m{i}"}
        )
        assert response.status == 200
    created = await client.post(
        "/api/session/create?durable=true", json={"userId": "alice", "sessionId": "s-1"}
    )
    assert created.status == 201
    for _ in range(2):
        assert (await client.get("/api/session/s-1")).status == 200
    pushed = await client.post("/api/session/s-1/interruptions", json={"content": "stop"})
    assert pushed.status == 201, await pushed.text()
    assert (await client.post("/api/session/alice/history", data=b"{oops")).status == 400
    assert (await client.get("/no/such/path")).status == 404

    async def flushed() -> str | None:
        text = await scrape(client)
        done = value(text, "samvad_flushes_total") or 0
        pending = value(text, "samvad_write_backlog_entries")
        return text if done >= 2 and pending == 0 else None

    text = await wait_for(flushed, within=10)
    count = "samvad_http_request_duration_seconds_count"
    assert value(text, count, route=HISTORY, method="POST", status_class="2xx") == 3
    assert value(text, count, route=HISTORY, method="POST", status_class="4xx") == 1
    assert value(text, count, route="unmatched", method="GET", status_class="4xx") == 1
    assert value(text, count, route="/api/session/create", method="POST", status_class="2xx") == 1
    hits = value(text, "samvad_cache_hits_total")
    assert hits is not None and hits >= 1
    assert value(text, "samvad_cache_misses_total") is not None
    assert value(text, "samvad_flush_failures_total") == 0
    landed = value(text, "samvad_flush_duration_seconds_count", kind="history", outcome="ok")
    assert landed is not None and landed >= 1
    assert value(text, "samvad_write_backlog_bytes") == 0
    assert value(text, "samvad_write_backlog_oldest_age_seconds") is not None
    assert value(text, "samvad_firestore_reachable") == 1
    assert value(text, "samvad_accepting_writes") == 1
    assert value(text, "samvad_interruptions_held") == 1
    assert value(text, "samvad_websockets_open") == 0


async def test_summary_digests_the_same_figures(client: Client) -> None:
    for i in range(2):
        await client.post("/api/session/bob/history", json={"role": "user", "content": f"x{i}"})
    response = await client.get("/api/metrics/summary")
    assert response.status == 200
    body = await response.json()
    assert body["success"] is True
    summary = body["summary"]
    history = [r for r in summary["requests"] if r["route"] == HISTORY]
    assert history == [
        {
            "route": HISTORY,
            "method": "POST",
            "statusClass": "2xx",
            "count": 2,
            "seconds": history[0]["seconds"],
        }
    ]
    assert history[0]["seconds"] >= 0
    assert summary["firestoreReachable"] is True
    assert summary["acceptingWrites"] is True
    assert set(summary["backlog"]) == {"entries", "bytes", "oldestAgeSeconds"}
    assert summary["uptimeSeconds"] >= 0
    for field in ("cacheHits", "cacheMisses", "flushes", "flushFailures", "websocketsOpen"):
        assert isinstance(summary[field], int)


async def test_each_app_has_its_own_registry(
    aiohttp_client: Callable[..., Any], settings: Settings
) -> None:
    first: Client = await aiohttp_client(create_app(settings))
    second: Client = await aiohttp_client(create_app(settings))
    for _ in range(4):
        await first.get("/healthz")
    await second.get("/healthz")
    count = "samvad_http_request_duration_seconds_count"
    labels = {"route": "/healthz", "method": "GET", "status_class": "2xx"}
    assert await metric(first, count, **labels) == 4
    assert await metric(second, count, **labels) == 1


@pytest.fixture
async def proxied_client(
    aiohttp_client: Callable[..., Any],
    make_settings: Callable[..., Settings],
    emulator_host: str,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[Client, Any]]:
    settings = make_settings(sync_interval=0, store_timeout=1.0)
    proxy = FirestoreProxy(emulator_host)
    await proxy.start()
    # the Firestore client finds its emulator through the environment when the app starts
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", proxy.grpc_host)
    try:
        yield await aiohttp_client(create_app(settings)), proxy
    finally:
        proxy.go_up()
        await proxy.stop()


async def test_an_outage_shows_as_unreachable_failed_flushes_and_a_backlog(
    proxied_client: tuple[Client, Any],
) -> None:
    client, proxy = proxied_client
    await client.post(
        "/api/session/carol/history?durable=true", json={"role": "user", "content": "a"}
    )
    proxy.go_down()
    response = await client.post(
        "/api/session/carol/history", json={"role": "user", "content": "b"}
    )
    assert response.status == 200  # taken: it waits in the backlog
    # a read that must go to Firestore finds it down (and says so with a 503)
    cold = await client.get("/api/session/never-cached")
    assert cold.status == 503

    async def down() -> str | None:
        text = await scrape(client)
        unreachable = value(text, "samvad_firestore_reachable") == 0
        return text if unreachable and value(text, "samvad_flush_failures_total") else None

    text = await wait_for(down, within=15)
    failures = value(text, "samvad_flush_failures_total")
    assert failures is not None and failures >= 1
    failed = value(text, "samvad_flush_duration_seconds_count", kind="history", outcome="failed")
    assert failed is not None and failed >= 1
    assert value(text, "samvad_write_backlog_entries") == 1
    backlog_bytes = value(text, "samvad_write_backlog_bytes")
    assert backlog_bytes is not None and backlog_bytes > 0

    proxy.go_up()

    async def recovered() -> str | None:
        text = await scrape(client)
        up = value(text, "samvad_firestore_reachable") == 1
        return text if up and value(text, "samvad_write_backlog_entries") == 0 else None

    await wait_for(recovered, within=15)


def test_request_latency_is_a_prometheus_histogram() -> None:
    metrics = Metrics()
    for seconds in (0.001, 0.005, 0.0051, 0.3, 20.0):
        metrics.requests.observe(HISTORY, "POST", 200, seconds)
    metrics.requests.observe(HISTORY, "BREW", 503, 0.01)  # unknown methods mint no series
    text = metrics.exposition().decode()
    name = "samvad_http_request_duration_seconds"
    labels = {"route": HISTORY, "method": "POST", "status_class": "2xx"}

    def bucket(le: str) -> float | None:
        return value(text, f"{name}_bucket", **labels, le=le)

    # cumulative, and a bound holds what equals it
    assert [bucket(le) for le in ("0.005", "0.01", "0.25", "0.5", "10.0", "+Inf")] == [
        2,
        3,
        3,
        4,
        4,
        5,
    ]
    assert value(text, f"{name}_count", **labels) == 5
    assert value(text, f"{name}_sum", **labels) == pytest.approx(20.3111)
    other = {"route": HISTORY, "method": "OTHER", "status_class": "5xx"}
    assert value(text, f"{name}_count", **other) == 1
    assert [(t.method, t.status_class, t.count) for t in metrics.requests.totals()] == [
        ("OTHER", "5xx", 1),
        ("POST", "2xx", 5),
    ]
