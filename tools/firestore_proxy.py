"""gRPC pass-through proxy between a Firestore client and the Firestore emulator.

For tests and benchmarks. Every RPC (unary and streaming, any method name) is forwarded as raw
bytes to an upstream endpoint, normally the emulator. On the way the proxy

* counts calls per method, and for successful ``Commit`` / ``BatchWrite`` calls the document
  writes they carried (by kind, per document, and the most writes to one document within one
  wall-clock second);
* can inject an outage: in "down" mode every call, new or in flight, fails with
  ``UNAVAILABLE`` ("injected outage") without upstream being contacted.

Library use::

    proxy = FirestoreProxy("127.0.0.1:8080")
    await proxy.start()
    os.environ["FIRESTORE_EMULATOR_HOST"] = proxy.grpc_host
    ...
    proxy.go_down(); proxy.go_up(); proxy.counts(); proxy.reset()
    await proxy.stop()

Process use::

    python tools/firestore_proxy.py --upstream 127.0.0.1:8080 [--listen-port N] [--control-port N]

prints ``{"grpcHost": "127.0.0.1:N", "controlUrl": "http://127.0.0.1:M"}`` on one line once ready
and runs until SIGTERM/SIGINT. Control endpoints (HTTP): ``GET /counts``, ``POST /reset``,
``POST /down``, ``POST /up``, ``GET /healthz``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import grpc
import grpc.aio
from aiohttp import web
from google.cloud.firestore_v1.types import (
    BatchWriteRequest,
    BatchWriteResponse,
    CommitRequest,
    Write,
)

logger = logging.getLogger("firestore_proxy")

FIRESTORE_SERVICE = "/google.firestore.v1.Firestore/"
COMMIT = FIRESTORE_SERVICE + "Commit"
BATCH_WRITE = FIRESTORE_SERVICE + "BatchWrite"
INJECTED_DETAILS = "injected outage"

# Metadata that gRPC manages itself and must not be copied from one call onto another.
_RESERVED_METADATA = frozenset(
    {
        "content-type",
        "te",
        "host",
        "user-agent",
        "grpc-timeout",
        "grpc-encoding",
        "grpc-accept-encoding",
        "grpc-status",
        "grpc-message",
        "grpc-previous-rpc-attempts",
        "grpc-retry-pushback-ms",
    }
)

# Firestore messages can be large (1 MiB documents, big batches); don't impose gRPC's 4 MiB cap.
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]

MetadataPairs = tuple[tuple[str, str | bytes], ...]
Context: TypeAlias = "grpc.aio.ServicerContext[bytes, bytes]"
Behavior: TypeAlias = Callable[[AsyncIterator[bytes], Context], AsyncIterator[bytes]]


def _filter_metadata(metadata: Sequence[Any] | None) -> MetadataPairs:
    """Copyable (key, value) pairs of ``metadata``, without pseudo-headers and reserved keys."""
    out: list[tuple[str, str | bytes]] = []
    for item in metadata or ():
        key, value = item[0].lower(), item[1]
        if key.startswith(":") or key in _RESERVED_METADATA:
            continue
        out.append((key, value))
    return tuple(out)  # grpc.aio's abort() insists on a tuple


def _method_label(method: str) -> str:
    """Short name for Firestore methods ("Commit"), the full path for anything else."""
    if method.startswith(FIRESTORE_SERVICE):
        return method[len(FIRESTORE_SERVICE) :]
    return method


def _write_target(write: Write) -> tuple[str, str]:
    """(kind, document name) of one ``Write``: kind is "update", "delete" or "transform"."""
    operation = Write.pb(write).WhichOneof("operation")
    if operation == "update":
        return "update", write.update.name
    if operation == "delete":
        return "delete", write.delete
    if operation == "transform":
        return "transform", write.transform.document
    return "unknown", ""


@dataclass
class _Counters:
    updates: int = 0
    deletes: int = 0
    transforms: int = 0
    commits: int = 0
    batch_writes: int = 0
    injected: int = 0
    calls: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    per_document: Counter[str] = field(default_factory=Counter)
    # second -> document -> writes; only recent seconds are kept, the maximum is running.
    per_second: dict[int, Counter[str]] = field(default_factory=dict)
    max_per_doc_per_second: int = 0
    max_per_doc_per_second_doc: str | None = None


@dataclass(eq=False)
class _InFlight:
    """One proxied call currently in progress."""

    method: str
    upstream: grpc.aio.StreamStreamCall | None = None
    killed: bool = False


class _ProxyHandler(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc is untyped
    """Maps every method name onto a bytes-in/bytes-out stream-stream handler."""

    def __init__(self, proxy: FirestoreProxy) -> None:
        self._proxy = proxy

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if isinstance(method, bytes):
            method = method.decode()
        return grpc.stream_stream_rpc_method_handler(self._proxy._make_behavior(method))


class FirestoreProxy:
    """In-process gRPC pass-through proxy with counters, outage injection and HTTP control."""

    def __init__(
        self,
        upstream: str,
        *,
        listen_port: int = 0,
        control_port: int | None = 0,
        host: str = "127.0.0.1",
    ) -> None:
        """``upstream``: "host:port" of the emulator. Ports of 0 pick free ones;
        ``control_port=None`` skips the HTTP control server."""
        self._upstream = upstream
        self._listen_port = listen_port
        self._control_port = control_port
        self._host = host
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None
        self._runner: web.AppRunner | None = None
        self._grpc_port: int | None = None
        self._http_port: int | None = None
        self._down = False
        self._in_flight: set[_InFlight] = set()
        self._counters = _Counters()

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("proxy already started")
        self._channel = grpc.aio.insecure_channel(self._upstream, options=_CHANNEL_OPTIONS)
        server = grpc.aio.server(options=_CHANNEL_OPTIONS)
        server.add_generic_rpc_handlers((_ProxyHandler(self),))
        self._grpc_port = server.add_insecure_port(f"{self._host}:{self._listen_port}")
        if self._grpc_port == 0:
            raise RuntimeError(f"could not bind gRPC port {self._host}:{self._listen_port}")
        await server.start()
        self._server = server
        if self._control_port is not None:
            runner = web.AppRunner(self._make_app(), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, self._host, self._control_port)
            await site.start()
            self._runner = runner
            self._http_port = int(runner.addresses[0][1])
        logger.info(
            "firestore proxy listening on %s (control %s), upstream %s",
            self.grpc_host,
            self.control_url,
            self._upstream,
        )

    async def stop(self, grace: float | None = 0.5) -> None:
        self._kill_in_flight("proxy stopping")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        logger.info("firestore proxy stopped")

    async def __aenter__(self) -> FirestoreProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def upstream(self) -> str:
        return self._upstream

    @property
    def grpc_host(self) -> str:
        """ "127.0.0.1:PORT": the value for FIRESTORE_EMULATOR_HOST."""
        if self._grpc_port is None:
            raise RuntimeError("proxy not started")
        return f"{self._host}:{self._grpc_port}"

    @property
    def control_url(self) -> str | None:
        """ "http://127.0.0.1:PORT" of the HTTP control server (None when disabled)."""
        if self._http_port is None:
            return None
        return f"http://{self._host}:{self._http_port}"

    # ----------------------------------------------------------------- control

    @property
    def is_down(self) -> bool:
        return self._down

    def go_down(self) -> int:
        """Fail every new call with UNAVAILABLE and cancel calls in flight the same way.

        Returns the number of in-flight calls that were cancelled."""
        self._down = True
        killed = self._kill_in_flight(INJECTED_DETAILS)
        logger.info("proxy down (%d in-flight calls cancelled)", killed)
        return killed

    def go_up(self) -> None:
        self._down = False
        logger.info("proxy up")

    def reset(self) -> None:
        self._counters = _Counters()

    def counts(self) -> dict[str, Any]:
        """Snapshot of the counters (the JSON served by ``GET /counts``).

        ``writes`` = ``updates`` + ``deletes`` + ``transforms`` (+ any unknown kind);
        only writes of successful Commit / BatchWrite calls (and, for BatchWrite, only the
        writes whose per-write status was OK) are counted. ``calls`` counts every call the
        proxy received, including failed and injected-failure ones; ``errors`` those that
        ended with a non-OK status."""
        c = self._counters
        return {
            "writes": sum(c.per_document.values()),
            "updates": c.updates,
            "deletes": c.deletes,
            "transforms": c.transforms,
            "commits": c.commits,
            "batchWrites": c.batch_writes,
            "calls": dict(c.calls),
            "errors": dict(c.errors),
            "injected": c.injected,
            "maxWritesPerDocPerSecond": c.max_per_doc_per_second,
            "maxWritesPerDocPerSecondDocument": c.max_per_doc_per_second_doc,
            "perDocument": dict(c.per_document),
            "inFlight": len(self._in_flight),
            "down": self._down,
        }

    def _kill_in_flight(self, reason: str) -> int:
        killed = 0
        for rec in list(self._in_flight):
            if rec.killed:
                continue
            rec.killed = True
            killed += 1
            if rec.upstream is not None and not rec.upstream.done():
                rec.upstream.cancel()
        if killed:
            logger.debug("cancelled %d in-flight calls: %s", killed, reason)
        return killed

    # ----------------------------------------------------------------- counting

    def _record_writes(self, writes: Sequence[Write]) -> None:
        c = self._counters
        now = int(time.time())
        bucket = c.per_second.get(now)
        if bucket is None:
            # Keep only the last few seconds: the maximum is maintained as we go.
            for second in [s for s in c.per_second if s < now - 2]:
                del c.per_second[second]
            bucket = c.per_second[now] = Counter()
        for write in writes:
            kind, name = _write_target(write)
            if kind == "update":
                c.updates += 1
            elif kind == "delete":
                c.deletes += 1
            elif kind == "transform":
                c.transforms += 1
            c.per_document[name] += 1
            bucket[name] += 1
            if bucket[name] > c.max_per_doc_per_second:
                c.max_per_doc_per_second = bucket[name]
                c.max_per_doc_per_second_doc = name

    def _account_success(
        self, method: str, requests: list[bytes], last_response: bytes | None
    ) -> None:
        try:
            if method == COMMIT and requests:
                commit = CommitRequest.deserialize(requests[0])
                self._counters.commits += 1
                self._record_writes(list(commit.writes))
            elif method == BATCH_WRITE and requests:
                batch = BatchWriteRequest.deserialize(requests[0])
                statuses = (
                    list(BatchWriteResponse.deserialize(last_response).status)
                    if last_response is not None
                    else []
                )
                self._counters.batch_writes += 1
                ok = [
                    w
                    for i, w in enumerate(batch.writes)
                    if i >= len(statuses) or statuses[i].code == 0
                ]
                self._record_writes(ok)
        except Exception:  # a counting bug must never break the proxied call
            logger.exception("could not decode %s for counting", method)

    # ----------------------------------------------------------------- proxying

    def _make_behavior(self, method: str) -> Behavior:
        async def behavior(
            request_iterator: AsyncIterator[bytes], context: Context
        ) -> AsyncIterator[bytes]:
            async for response in self._proxy_call(method, request_iterator, context):
                yield response

        return behavior

    async def _proxy_call(
        self,
        method: str,
        request_iterator: AsyncIterator[bytes],
        context: Context,
    ) -> AsyncIterator[bytes]:
        label = _method_label(method)
        c = self._counters
        c.calls[label] += 1
        channel = self._channel
        if self._down or channel is None:
            c.injected += 1
            c.errors[label] += 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, INJECTED_DETAILS)
            return

        counting = method in (COMMIT, BATCH_WRITE)
        requests: list[bytes] = []

        async def pump() -> AsyncIterator[bytes]:
            async for request in request_iterator:
                if counting:
                    requests.append(request)
                yield request

        rec = _InFlight(method)
        self._in_flight.add(rec)
        last_response: bytes | None = None
        call: grpc.aio.StreamStreamCall | None = None
        try:
            call = channel.stream_stream(method)(
                pump(),
                metadata=_filter_metadata(context.invocation_metadata()),
                timeout=context.time_remaining(),
            )
            rec.upstream = call
            if rec.killed:  # went down between admission and now
                call.cancel()
            initial = _filter_metadata(await call.initial_metadata())
            if initial:
                await context.send_initial_metadata(initial)
            async for response in call:
                last_response = response
                yield response
            trailing = _filter_metadata(await call.trailing_metadata())
            if trailing:
                context.set_trailing_metadata(trailing)
        except grpc.aio.AioRpcError as err:
            c.errors[label] += 1
            if rec.killed:
                await context.abort(grpc.StatusCode.UNAVAILABLE, INJECTED_DETAILS)
            logger.debug("%s failed upstream: %s %s", label, err.code(), err.details())
            await context.abort(
                err.code(), err.details() or "", _filter_metadata(err.trailing_metadata())
            )
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if rec.killed and task is not None and task.cancelling() == 0:
                # Our upstream call was cancelled by go_down(), not this handler.
                c.errors[label] += 1
                await context.abort(grpc.StatusCode.UNAVAILABLE, INJECTED_DETAILS)
            raise
        finally:
            self._in_flight.discard(rec)
            if call is not None and not call.done():
                call.cancel()
        if counting:
            # Upstream answered OK, so the writes were applied: count them even if we went
            # down meanwhile (the client then sees an outage for a write that landed).
            self._account_success(method, requests, last_response)
        if rec.killed:
            c.errors[label] += 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, INJECTED_DETAILS)

    # ----------------------------------------------------------------- HTTP control

    def _make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/counts", self._http_counts)
        app.router.add_post("/reset", self._http_reset)
        app.router.add_post("/down", self._http_down)
        app.router.add_post("/up", self._http_up)
        app.router.add_get("/healthz", self._http_healthz)
        return app

    async def _http_counts(self, request: web.Request) -> web.Response:
        return web.json_response(self.counts())

    async def _http_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def _http_down(self, request: web.Request) -> web.Response:
        cancelled = self.go_down()
        return web.json_response({"ok": True, "down": True, "cancelled": cancelled})

    async def _http_up(self, request: web.Request) -> web.Response:
        self.go_up()
        return web.json_response({"ok": True, "down": False})

    async def _http_healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "down": self._down, "upstream": self._upstream})


# --------------------------------------------------------------------- process entry point


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--upstream", required=True, help="emulator host:port")
    parser.add_argument("--listen-port", type=int, default=0, help="gRPC port (0: free port)")
    parser.add_argument("--control-port", type=int, default=0, help="HTTP port (0: free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser.parse_args(argv)


async def serve(proxy: FirestoreProxy) -> None:
    """Run `proxy` as a process: one JSON line with its addresses, then until SIGTERM/SIGINT."""
    await proxy.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sys.stdout.write(json.dumps({"grpcHost": proxy.grpc_host, "controlUrl": proxy.control_url}))
    sys.stdout.write("\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        await proxy.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve(
                FirestoreProxy(
                    args.upstream,
                    listen_port=args.listen_port,
                    control_port=args.control_port,
                    host=args.host,
                )
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
