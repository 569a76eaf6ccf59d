"""JSON-line logs that Cloud Logging understands: `severity`, `message`, and structured fields."""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

_SEVERITY = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARNING",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "CRITICAL",
}


# The route of a request no route served (404, 405, a CORS preflight), in metrics and logs.
UNMATCHED = "unmatched"


class RequestLogContext(NamedTuple):  # a tuple: made on every request, cheaper than a dataclass
    """What ties a log line to its request in Cloud Logging: the trace and a request id (and,
    for the access line, the route template the request matched)."""

    request_id: str
    trace: str | None = None  # projects/<project>/traces/<trace id>
    span_id: str | None = None  # 16 hex digits
    sampled: bool | None = None
    route: str = UNMATCHED

    def fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"requestId": self.request_id}
        if self.trace is not None:
            fields["logging.googleapis.com/trace"] = self.trace
        if self.span_id is not None:
            fields["logging.googleapis.com/spanId"] = self.span_id
        if self.sampled is not None:
            fields["logging.googleapis.com/trace_sampled"] = self.sampled
        return fields


# Set by the edge (samvad.api.middlewares) in the task that handles the request. A ContextVar,
# not app state: every request runs in a task of its own, and log calls deep in the service (and
# the access line, written in that task when the response is sent) must find their request's
# trace without it being passed down.
CURRENT_REQUEST: ContextVar[RequestLogContext | None] = ContextVar(
    "samvad_current_request", default=None
)


# datetimes and dataclasses go through `default=str`, as with json.dumps.
_ORJSON_OPTIONS = (
    orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
)


def _json_line(entry: dict[str, Any]) -> str:
    """orjson is several times faster than json.dumps on every line (one per request); lines it
    would write differently (non-ASCII text, which json.dumps escapes) or cannot write (integers
    beyond 64 bits) still go through json.dumps."""
    try:
        line = orjson.dumps(entry, default=str, option=_ORJSON_OPTIONS).decode()
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(entry, default=str)
    return line if line.isascii() else json.dumps(entry, default=str)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": _SEVERITY.get(record.levelno, "DEFAULT"),
            "message": record.getMessage(),
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "logger": record.name,
        }
        context = CURRENT_REQUEST.get()
        if context is not None:
            entry.update(context.fields())
        fields = getattr(record, "json_fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _json_line(entry)


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class AccessLogger(AbstractAccessLogger):
    """One line per request: route template, never the raw path (ids are personal data), no
    query string, no body; the request's trace and id so it groups with its other lines.
    Severity follows the status, as in Cloud Run's own request log: 5xx ERROR, 4xx WARNING;
    a request slower than `slow_after` is a WARNING too."""

    slow_after = 1.0

    @property
    def enabled(self) -> bool:
        # When not even an ERROR line would be written, aiohttp skips the access line
        # altogether, not just its output.
        return self.logger.isEnabledFor(logging.ERROR)

    def severity(self, response: StreamResponse, time: float) -> int:
        if response.status >= 500:
            return logging.ERROR
        if response.status >= 400 or time >= self.slow_after:
            return logging.WARNING
        return logging.INFO

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        level = self.severity(response, time)
        if not self.logger.isEnabledFor(level):  # handle() below does not look at levels
            return
        fields: dict[str, Any] = {}
        # None for a request aiohttp could not parse: it answered 400 without routing it.
        context = CURRENT_REQUEST.get()
        route = UNMATCHED
        if context is not None:
            fields.update(context.fields())
            route = context.route
        fields["httpRequest"] = {
            "requestMethod": request.method,
            "status": response.status,
            "latency": f"{time:.6f}s",
            "responseSize": str(response.body_length),
            "protocol": f"HTTP/{request.version.major}.{request.version.minor}",
        }
        fields["route"] = route
        # The record is made here rather than by logger.info, which would also walk the stack to
        # find its caller: a cost on every request for a line that names no caller.
        record = self.logger.makeRecord(
            self.logger.name,
            level,
            __name__,
            0,
            f"{request.method} {route} {response.status}",
            (),
            None,
            extra={"json_fields": fields},
        )
        self.logger.handle(record)


class ErrorAccessLogger(AccessLogger):
    """Lines only for answers worth a look: 4xx, 5xx and slow requests (WARNING and up)."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        if response.status >= 400 or time >= self.slow_after:
            super().log(request, response, time)


def access_logger_class(mode: str, slow_after: float) -> type[AccessLogger] | None:
    """The access logger for SAMVAD_ACCESS_LOG (`all`, `errors`, `off`: None)."""
    if mode == "off":
        return None
    base = AccessLogger if mode == "all" else ErrorAccessLogger
    return type(base.__name__, (base,), {"slow_after": slow_after})
