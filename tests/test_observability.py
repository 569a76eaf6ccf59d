"""Cloud Logging fields of real requests: trace from either header style, request ids, access
lines with route templates and no personal data."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from samvad.api.middlewares import add_routes
from samvad.api.observability import parse_cloud_trace, parse_traceparent
from samvad.app import create_app
from samvad.config import Settings
from samvad.logs import AccessLogger, ErrorAccessLogger, JsonFormatter, access_logger_class

TRACE_ID = "105445aa7843bc8bf206b12000100000"
W3C_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PERSONAL = "alice.private@example.com"


class LogCapture:
    def __init__(self) -> None:
        self.stream = io.StringIO()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines() if line]

    def access(self) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line["logger"] == "aiohttp.access"]

    def text(self) -> str:
        return self.stream.getvalue()


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    """Every log line as the server would print it (samvad.logs.configure's formatter)."""
    capture = LogCapture()
    handler = logging.StreamHandler(capture.stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield capture
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


async def serve(
    aiohttp_client: Callable[..., Any], settings: Settings, access_log_class: type[AccessLogger]
) -> TestClient[web.Request, web.Application]:
    app = create_app(settings)

    async def logs_inside(request: web.Request) -> web.Response:
        # stands for any log call deep in the service while a request is handled
        logging.getLogger("samvad.service").warning("something worth a look")
        return web.json_response({"ok": True})

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        return web.json_response({"ok": True})

    add_routes(app, [web.get("/test/log-inside", logs_inside), web.get("/test/slow", slow)])
    test_server = TestServer(app)
    # the access logger `python -m samvad` runs with (aiohttp's own is the test default)
    await test_server.start_server(access_log_class=access_log_class)
    client: TestClient[web.Request, web.Application] = await aiohttp_client(test_server)
    return client


@pytest.fixture
async def server(
    aiohttp_client: Callable[..., Any], settings: Settings, logs: LogCapture
) -> TestClient[web.Request, web.Application]:
    """SAMVAD_ACCESS_LOG=all: a line for every request."""
    return await serve(aiohttp_client, settings, AccessLogger)


def only(lines: list[dict[str, Any]], request_id: str) -> dict[str, Any]:
    found = [line for line in lines if line.get("requestId") == request_id]
    assert len(found) == 1, found
    return found[0]


async def test_cloud_trace_header_sets_trace_span_and_a_generated_request_id(
    server: TestClient[web.Request, web.Application], logs: LogCapture, settings: Settings
) -> None:
    response = await server.post(
        f"/api/session/{PERSONAL}/history?durable=true&secret=hunter2",
        json={"role": "user", "content": "my card number is 4111"},
        headers={"X-Cloud-Trace-Context": f"{TRACE_ID}/12345;o=1"},
    )
    assert response.status == 200
    request_id = response.headers["X-Request-Id"]
    assert len(request_id) == 32 and int(request_id, 16) >= 0

    line = only(logs.access(), request_id)
    assert line["severity"] == "INFO"
    assert line["logging.googleapis.com/trace"] == f"projects/{settings.project}/traces/{TRACE_ID}"
    assert line["logging.googleapis.com/spanId"] == f"{12345:016x}"
    assert line["logging.googleapis.com/trace_sampled"] is True
    assert line["route"] == "/api/session/{userId}/history"
    assert line["message"] == "POST /api/session/{userId}/history 200"
    http = line["httpRequest"]
    assert http["requestMethod"] == "POST" and http["status"] == 200
    assert http["latency"].endswith("s") and float(http["latency"][:-1]) >= 0
    # neither the user id of the path, nor the query string, nor the body is in any line
    for secret in (PERSONAL, "alice", "hunter2", "durable=true", "4111"):
        assert secret not in logs.text()


async def test_traceparent_sets_trace_and_a_sane_request_id_is_kept(
    server: TestClient[web.Request, web.Application], logs: LogCapture, settings: Settings
) -> None:
    response = await server.get(
        "/api/session/stats",
        headers={
            "traceparent": f"00-{W3C_TRACE_ID}-00f067aa0ba902b7-00",
            "X-Request-Id": "lb-7f3a.42",
        },
    )
    assert response.status == 200
    assert response.headers["X-Request-Id"] == "lb-7f3a.42"
    line = only(logs.access(), "lb-7f3a.42")
    assert line["logging.googleapis.com/trace"] == (
        f"projects/{settings.project}/traces/{W3C_TRACE_ID}"
    )
    assert line["logging.googleapis.com/spanId"] == "00f067aa0ba902b7"
    assert line["logging.googleapis.com/trace_sampled"] is False
    assert line["route"] == "/api/session/stats"


async def test_lines_logged_while_handling_a_request_carry_its_trace(
    server: TestClient[web.Request, web.Application], logs: LogCapture, settings: Settings
) -> None:
    response = await server.get(
        "/test/log-inside", headers={"X-Cloud-Trace-Context": f"{TRACE_ID}/1;o=1"}
    )
    assert response.status == 200
    request_id = response.headers["X-Request-Id"]
    inside = [line for line in logs.lines() if line["message"] == "something worth a look"]
    assert len(inside) == 1
    assert inside[0]["severity"] == "WARNING"
    assert inside[0]["requestId"] == request_id
    assert inside[0]["logging.googleapis.com/trace"].endswith(f"/traces/{TRACE_ID}")
    # and a line logged outside any request carries none
    logging.getLogger("samvad.test").warning("between requests")
    outside = [line for line in logs.lines() if line["message"] == "between requests"]
    assert "requestId" not in outside[0]
    assert "logging.googleapis.com/trace" not in outside[0]


async def test_a_requests_trace_does_not_carry_over_to_the_next_on_the_same_connection(
    server: TestClient[web.Request, web.Application], logs: LogCapture
) -> None:
    # The edge sets a request's log context and leaves it there: it goes with the request's
    # own task. Were it the connection's, what aiohttp answers on that connection without the
    # edge (here a request it cannot parse) would be logged under the request before.
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        b"GET /test/log-inside HTTP/1.1\r\nHost: x\r\n"
        + f"X-Cloud-Trace-Context: {TRACE_ID}/1;o=1\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    writer.write(b"NOT HTTP AT ALL\r\n\r\n")  # on the same connection
    answer = await asyncio.wait_for(reader.read(), 10)  # the server closes after the 400
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400") or answer.startswith(b"HTTP/1.0 400")
    statuses = [line["httpRequest"]["status"] for line in logs.access()]
    assert statuses == [200, 400]
    traced, unparsed = logs.access()
    assert traced["logging.googleapis.com/trace"].endswith(f"/traces/{TRACE_ID}")
    assert "logging.googleapis.com/trace" not in unparsed
    assert unparsed.get("requestId") != traced["requestId"]


async def test_errors_and_unknown_paths_are_logged_by_template_with_request_id(
    server: TestClient[web.Request, web.Application], logs: LogCapture
) -> None:
    missing = await server.get(f"/no/such/{PERSONAL}")
    assert missing.status == 404
    bad = await server.post(f"/api/session/{PERSONAL}/history", data=b"{not json")
    assert bad.status == 400
    assert (await bad.json())["success"] is False

    missing_line = only(logs.access(), missing.headers["X-Request-Id"])
    assert missing_line["route"] == "unmatched"
    assert missing_line["httpRequest"]["status"] == 404
    bad_line = only(logs.access(), bad.headers["X-Request-Id"])
    assert bad_line["route"] == "/api/session/{userId}/history"
    assert bad_line["httpRequest"]["status"] == 400
    assert PERSONAL not in logs.text()


async def test_unusable_ids_and_trace_headers_are_replaced_or_ignored(
    server: TestClient[web.Request, web.Application], logs: LogCapture
) -> None:
    response = await server.get(
        "/healthz",
        headers={
            "X-Request-Id": 'x" "injected": "yes',
            "X-Cloud-Trace-Context": "not-a-trace",
            "traceparent": "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
        },
    )
    assert response.status == 200
    request_id = response.headers["X-Request-Id"]
    assert request_id != 'x" "injected": "yes' and len(request_id) == 32
    line = only(logs.access(), request_id)
    assert "logging.googleapis.com/trace" not in line
    assert "injected" not in logs.text()

    long_id = "a" * 200
    response = await server.get("/healthz", headers={"X-Request-Id": long_id})
    assert response.headers["X-Request-Id"] != long_id


async def test_by_default_only_errors_and_slow_requests_get_an_access_line(
    aiohttp_client: Callable[..., Any], settings: Settings, logs: LogCapture
) -> None:
    assert settings.access_log == "errors"
    access_log_class = access_logger_class(settings.access_log, slow_after=0.2)
    assert access_log_class is not None
    server = await serve(aiohttp_client, settings, access_log_class)

    saved = await server.post("/api/session/u1/state", json={"language": "en"})
    read = await server.get("/api/session/u1/state")
    missing = await server.get("/api/session/nobody/state")
    bad = await server.post("/api/session/u1/history", data=b"{not json")
    slow = await server.get("/test/slow")
    assert [r.status for r in (saved, read, missing, bad, slow)] == [200, 200, 404, 400, 200]

    def ids(response: Any) -> str:
        return str(response.headers["X-Request-Id"])

    logged = {line["requestId"]: line for line in logs.access()}
    assert ids(saved) not in logged and ids(read) not in logged
    assert logged[ids(missing)]["severity"] == "WARNING"
    assert logged[ids(missing)]["httpRequest"]["status"] == 404
    assert logged[ids(bad)]["severity"] == "WARNING"
    assert float(logged[ids(slow)]["httpRequest"]["latency"][:-1]) >= 0.2
    assert logged[ids(slow)]["severity"] == "WARNING"
    assert len(logged) == 3


async def test_error_lines_are_written_when_the_log_level_is_warning(
    aiohttp_client: Callable[..., Any], settings: Settings, logs: LogCapture
) -> None:
    """SAMVAD_LOG_LEVEL=WARNING keeps what an operator must see: 4xx and 5xx lines."""
    access_log_class = access_logger_class("errors", slow_after=1.0)
    assert access_log_class is not None
    server = await serve(aiohttp_client, settings, access_log_class)
    access = logging.getLogger("aiohttp.access")
    access.setLevel(logging.WARNING)
    try:
        missing = await server.get("/api/session/nobody/state")
        read = await server.get("/healthz")
    finally:
        access.setLevel(logging.NOTSET)
    assert (missing.status, read.status) == (404, 200)
    logged = {line["requestId"]: line for line in logs.access()}
    assert logged[missing.headers["X-Request-Id"]]["severity"] == "WARNING"
    assert read.headers["X-Request-Id"] not in logged


def test_access_log_modes() -> None:
    assert access_logger_class("off", 1.0) is None
    every = access_logger_class("all", 2.5)
    assert every is not None and issubclass(every, AccessLogger)
    assert not issubclass(every, ErrorAccessLogger) and every.slow_after == 2.5
    assert Settings.from_env({"SAMVAD_ACCESS_LOG": "all"}).access_log == "all"
    with pytest.raises(ValueError, match="SAMVAD_ACCESS_LOG"):
        Settings.from_env({"SAMVAD_ACCESS_LOG": "loud"})


def test_trace_header_parsing() -> None:
    assert parse_cloud_trace(f"{TRACE_ID}/1;o=1") == (TRACE_ID, "0000000000000001", True)
    assert parse_cloud_trace(f"{TRACE_ID.upper()}/18446744073709551615;o=0") == (
        TRACE_ID,
        "ffffffffffffffff",
        False,
    )
    assert parse_cloud_trace(TRACE_ID) == (TRACE_ID, None, None)
    assert parse_cloud_trace(f"{TRACE_ID}/18446744073709551616") == (TRACE_ID, None, None)
    assert parse_cloud_trace("abc/1;o=1") is None
    assert parse_traceparent(f"00-{W3C_TRACE_ID}-00f067aa0ba902b7-01") == (
        W3C_TRACE_ID,
        "00f067aa0ba902b7",
        True,
    )
    assert parse_traceparent(f"ff-{W3C_TRACE_ID}-00f067aa0ba902b7-01") is None
    assert parse_traceparent(f"00-{W3C_TRACE_ID}-0000000000000000-01") is None
    assert parse_traceparent("00-short-00f067aa0ba902b7-01") is None
