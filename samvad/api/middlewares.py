"""The request edge: the one place where a request gets its log context, is timed for metrics,
and where errors become HTTP answers (JSON bodies, never a traceback)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from samvad.api.keys import RESPONSE_HEADERS, HeaderHook
from samvad.api.observability import REQUEST_ID_HEADER, request_ids, request_log_context
from samvad.api.responses import error_response
from samvad.errors import BacklogFull, SamvadError, ShuttingDown, StoreUnavailable
from samvad.logs import CURRENT_REQUEST

if TYPE_CHECKING:
    from samvad.api.metrics import Metrics

log = logging.getLogger(__name__)

_HTTP_ERROR_MESSAGES = {404: "not found", 405: "method not allowed", 413: "request body too large"}
# Status of a request whose client went away before it was answered (nginx's convention).
CLIENT_CLOSED = 499


def edge(project: str, metrics: Metrics, header_hooks: list[HeaderHook]) -> Middleware:
    """The outermost middleware. One instead of three middlewares and two response hooks:
    each of them is a frame, a partial or a signal on every request.

    - every log line of the request, errors included, carries its trace and request id;
    - metrics see the status the client got, errors included (a websocket's "latency" is its
      connection's life: samvad_websockets_open tells of those);
    - SamvadErrors, aiohttp's HTTP errors and anything unexpected become JSON answers;
    - every answer names its request id and gets the `header_hooks`' headers.
    """
    ids = request_ids()
    observe = metrics.requests.observe

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        context = request_log_context(request.headers, project, ids, route)
        # Not reset after the handler: aiohttp runs every request in a task of its own, with
        # its own copy of the context (aiohttp#3406), so this goes with the task. The access
        # line, written in that task after the handler returned, finds it there too.
        CURRENT_REQUEST.set(context)
        started = time.perf_counter()
        try:
            response = await handler(request)
        except SamvadError as exc:
            response = _domain_error(exc)
        except web.HTTPException as exc:
            if exc.status < 400:  # a redirect: aiohttp sends it
                observe(route, request.method, exc.status, time.perf_counter() - started)
                raise
            response = _http_error(exc)
        except asyncio.CancelledError:
            observe(route, request.method, CLIENT_CLOSED, time.perf_counter() - started)
            raise
        except Exception:
            log.exception("unhandled error", extra={"json_fields": {"route": route}})
            response = error_response(500, "internal error")
        status = response.status
        if status != 101:
            observe(route, request.method, status, time.perf_counter() - started)
        if not response.prepared:  # else its handler did this (prepare)
            response.headers[REQUEST_ID_HEADER] = context.request_id
            for hook in header_hooks:
                hook(request, response)
        return response

    return middleware


async def prepare(request: web.Request, response: web.StreamResponse) -> None:
    """For handlers that send a response themselves (streams, websocket upgrades): its
    headers as the edge would set them, then prepare."""
    context = CURRENT_REQUEST.get()
    if context is not None:
        response.headers[REQUEST_ID_HEADER] = context.request_id
    for hook in request.app[RESPONSE_HEADERS]:
        hook(request, response)
    await response.prepare(request)


def _domain_error(exc: SamvadError) -> web.Response:
    headers = {}
    if isinstance(exc, BacklogFull | StoreUnavailable | ShuttingDown):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return error_response(exc.status, exc.message, headers)


def _http_error(exc: web.HTTPException) -> web.Response:
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    message = _HTTP_ERROR_MESSAGES.get(exc.status, exc.reason.lower())
    return error_response(exc.status, message, headers)
