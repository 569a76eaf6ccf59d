"""Prometheus metrics (`GET /metrics`) and a JSON digest of them for the dashboard.

One CollectorRegistry per app, built in the app factory: two apps in one process (tests, two
instances in a benchmark) never share or clash over series. What the service already counts
(cache hits, the write backlog, Firestore reachability, held interruptions, open websockets) is
read at scrape time by a collector, so no hot path pays for metrics it does not need.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import AsyncIterator, Iterable
from itertools import accumulate

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from samvad.api.keys import SERVICE
from samvad.api.middlewares import add_routes
from samvad.api.realtime import CONNECTIONS
from samvad.api.routes import backlog_out, render
from samvad.models import BacklogOut, Ok, WireModel

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FLUSH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0)
# Methods beyond these are one label value: a client must not be able to mint new series.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class _Series:
    __slots__ = ("buckets", "count", "seconds")

    def __init__(self, buckets: int) -> None:
        self.buckets = [0] * buckets  # per bucket, not cumulative; the last one is +Inf
        self.count = 0
        self.seconds = 0.0


class RequestLatency(Collector):
    """`samvad_http_request_duration_seconds`, kept without locks.

    prometheus_client's Histogram takes a lock and walks its buckets on every observation, a
    cost on every request; requests are only ever observed on the event loop's thread, so
    plain counters do, turned into a histogram when scraped.
    """

    name = "samvad_http_request_duration_seconds"

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self._bounds = buckets
        self._series: dict[tuple[str, str, int], _Series] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method if method in _METHODS else "OTHER", status // 100)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(len(self._bounds) + 1)
        series.buckets[bisect_left(self._bounds, seconds)] += 1  # `le`: bounds are inclusive
        series.count += 1
        series.seconds += seconds

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(
            self.name,
            "Time from a request reaching the app to its response being ready, by route template.",
            labels=["route", "method", "status_class"],
        )
        for (route, method, status_class), series in sorted(self._series.items()):
            cumulative = list(accumulate(series.buckets))
            buckets = [(str(b), float(n)) for b, n in zip(self._bounds, cumulative, strict=False)]
            family.add_metric(
                [route, method, f"{status_class}xx"],
                [*buckets, ("+Inf", float(series.count))],
                series.seconds,
            )
        yield family

    def totals(self) -> list[RouteTotals]:
        return [
            RouteTotals(
                route=route,
                method=method,
                status_class=f"{status_class}xx",
                count=series.count,
                seconds=round(series.seconds, 6),
            )
            for (route, method, status_class), series in sorted(self._series.items())
        ]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.started = time.time()
        self.requests = RequestLatency(REQUEST_BUCKETS)
        self.registry.register(self.requests)
        self.flush_seconds = Histogram(
            "samvad_flush_duration_seconds",
            "Time one write-behind flush took (one coalesced document write), by outcome.",
            ["kind", "outcome"],
            buckets=FLUSH_BUCKETS,
            registry=self.registry,
        )

    def observe_flush(self, kind: str, seconds: float, landed: bool) -> None:
        self.flush_seconds.labels(kind, "ok" if landed else "failed").observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


METRICS = web.AppKey("metrics", Metrics)


class ServiceCollector(Collector):
    """What the service and the websocket registry hold, read when scraped."""

    def __init__(self, app: web.Application) -> None:
        self._app = app

    def collect(self) -> Iterable[Metric]:
        service = self._app.get(SERVICE)
        if service is None:  # scraped before startup or after cleanup
            return
        yield CounterMetricFamily(
            "samvad_cache_hits", "Reads answered from this instance's cache.", service.cache_hits
        )
        yield CounterMetricFamily(
            "samvad_cache_misses", "Reads that had to go to Firestore.", service.cache_misses
        )
        backlog = service.writer.stats()
        for name, help_text, value in (
            (
                "entries",
                "Documents with acknowledged writes not yet in Firestore.",
                backlog.entries,
            ),
            ("bytes", "Size of the writes not yet in Firestore.", backlog.bytes),
            ("oldest_age_seconds", "Age of the oldest unflushed write.", backlog.oldest_age),
            ("in_flight", "Flushes running now.", backlog.in_flight),
        ):
            yield GaugeMetricFamily(f"samvad_write_backlog_{name}", help_text, value)
        yield CounterMetricFamily(
            "samvad_flushes", "Write-behind flushes that landed in Firestore.", backlog.flushes
        )
        yield CounterMetricFamily(
            "samvad_flush_failures",
            "Write-behind flushes that failed and were kept for retry.",
            backlog.failures,
        )
        health = service.health
        yield GaugeMetricFamily(
            "samvad_firestore_reachable",
            "1 while Firestore answers, 0 while the circuit is open.",
            1 if health.reachable else 0,
        )
        yield GaugeMetricFamily(
            "samvad_firestore_unreachable_seconds",
            "How long Firestore has been unreachable (0 while reachable).",
            health.unreachable_for,
        )
        yield GaugeMetricFamily(
            "samvad_accepting_writes",
            "1 while writes are taken (0: backlog full or shutting down; /readyz says 503).",
            1 if service.writer.accepting and not service.writer.full else 0,
        )
        yield GaugeMetricFamily(
            "samvad_interruptions_held",
            "Interruptions held in this instance's memory.",
            service.interruptions.total,
        )
        connections = self._app.get(CONNECTIONS)
        if connections is not None:
            yield GaugeMetricFamily(
                "samvad_websockets_open",
                "Agent websockets open on this instance.",
                len(connections),
            )


# ---- the routes ---------------------------------------------------------------------------------


class RouteTotals(WireModel):
    route: str
    method: str
    status_class: str
    count: int
    seconds: float


class MetricsSummary(WireModel):
    uptime_seconds: float
    requests: list[RouteTotals]
    cache_hits: int
    cache_misses: int
    backlog: BacklogOut
    flushes: int
    flush_failures: int
    firestore_reachable: bool
    accepting_writes: bool
    websockets_open: int
    interruptions_held: int


class MetricsSummaryResponse(Ok):
    summary: MetricsSummary


async def metrics_text(request: web.Request) -> web.Response:
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def metrics_summary(request: web.Request) -> web.Response:
    """Cumulative figures; the dashboard derives rates from two polls."""
    metrics = request.app[METRICS]
    service = request.app[SERVICE]
    stats = service.writer.stats()
    connections = request.app.get(CONNECTIONS)
    summary = MetricsSummary(
        uptime_seconds=round(time.time() - metrics.started, 3),
        requests=metrics.requests.totals(),
        cache_hits=service.cache_hits,
        cache_misses=service.cache_misses,
        backlog=backlog_out(stats),
        flushes=stats.flushes,
        flush_failures=stats.failures,
        firestore_reachable=service.health.reachable,
        accepting_writes=service.writer.accepting and not service.writer.full,
        websockets_open=len(connections) if connections is not None else 0,
        interruptions_held=service.interruptions.total,
    )
    return render(MetricsSummaryResponse(summary=summary))


def setup_metrics(app: web.Application, metrics: Metrics) -> None:
    """Call after the service's cleanup context is registered: the flush hook needs it.
    Requests are observed by the edge (samvad/api/middlewares.py)."""
    app[METRICS] = metrics
    metrics.registry.register(ServiceCollector(app))

    async def flush_hook(app: web.Application) -> AsyncIterator[None]:
        app[SERVICE].writer.on_flush = metrics.observe_flush
        yield

    app.cleanup_ctx.append(flush_hook)
    add_routes(
        app, [web.get("/metrics", metrics_text), web.get("/api/metrics/summary", metrics_summary)]
    )
