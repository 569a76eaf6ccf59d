"""The request edge: the one place where a request gets its log context, is authenticated, is
timed for metrics, and where errors become HTTP answers (JSON bodies, never a traceback).

The edge wraps each route's handler where the route is registered (`add_routes`), rather than
sitting in aiohttp's middleware chain: with any middleware installed, aiohttp wraps every
request's handler anew (a cached build of partials, plus a middleware of its own that sets the
request's current app), which costs a cached read about a twentieth of its time. A catch-all
route, matched after every other, answers what no route serves (404, 405, CORS preflights), and
the app refuses to start with a route that did not go through the edge.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler

from samvad.api.keys import RESPONSE_HEADERS, HeaderHook
from samvad.api.observability import REQUEST_ID_HEADER, request_ids, request_log_context
from samvad.api.responses import error_response
from samvad.api.security import POLICIES, PUBLIC, UNLISTED, Guard, Policy, table_key
from samvad.errors import BacklogFull, SamvadError, ShuttingDown, StoreUnavailable
from samvad.logs import CURRENT_REQUEST, UNMATCHED

if TYPE_CHECKING:
    from samvad.api.metrics import Metrics

log = logging.getLogger(__name__)

_HTTP_ERROR_MESSAGES = {404: "not found", 405: "method not allowed", 413: "request body too large"}
# Status of a request whose client went away before it was answered (nginx's convention).
CLIENT_CLOSED = 499


class Edge:
    """What every request passes through, around its route's handler:

    - every log line of the request, errors included, carries its trace and request id;
    - the route's policy is enforced (samvad/api/security.py) before its handler runs;
    - metrics see the status the client got, errors included (a websocket's "latency" is its
      connection's life: samvad_websockets_open tells of those);
    - SamvadErrors, aiohttp's HTTP errors and anything unexpected become JSON answers;
    - every answer names its request id and gets the `header_hooks`' headers.
    """

    def __init__(
        self, project: str, metrics: Metrics, guard: Guard, header_hooks: list[HeaderHook]
    ) -> None:
        self._project = project
        self._observe = metrics.requests.observe
        self._guard = guard
        self._header_hooks = header_hooks
        self._ids = request_ids()
        self._handlers: set[Handler] = set()  # what `wrap` made: every route's must be one
        self._catch_all: web.AbstractResource | None = None
        self._unlisted: list[str] = []  # routes without a line in the policy table

    def wrap(
        self, handler: Handler, method: str, route: str, policy: Policy | None = None
    ) -> Handler:
        """`handler` of the route `method route` (route: its resource's canonical template),
        under `policy`, by default the route's line in the policy table."""
        project, ids, observe, hooks = self._project, self._ids, self._observe, self._header_hooks
        guard = self._guard
        if policy is None:
            policy = POLICIES.get(table_key(method, route))
            if policy is None:
                self._unlisted.append(f"{method} {route}")
                policy = UNLISTED
        checked = guard.authenticator is not None and not policy.public

        async def at_edge(request: web.Request) -> web.StreamResponse:
            context = request_log_context(request.headers, project, ids, route)
            # Not reset after the handler: aiohttp runs every request in a task of its own,
            # with its own copy of the context (aiohttp#3406), so this goes with the task. The
            # access line, written in that task after the handler returned, finds it there too.
            CURRENT_REQUEST.set(context)
            started = time.perf_counter()
            try:
                refusal = await guard.authorize(request, policy) if checked else None
                response = await handler(request) if refusal is None else refusal
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
                for hook in hooks:
                    hook(request, response)
            return response

        self._handlers.add(at_edge)
        return at_edge

    def routes(self, definitions: Iterable[web.AbstractRouteDef]) -> list[web.RouteDef]:
        """The same route definitions, each handler behind the edge."""
        wrapped = []
        for definition in definitions:
            if not isinstance(definition, web.RouteDef):
                raise TypeError(f"only routes to handlers go through the edge: {definition!r}")
            method, path = definition.method, definition.path
            route = web.DynamicResource(path).canonical if "{" in path else path
            handler = self.wrap(definition.handler, method, route)
            wrapped.append(web.RouteDef(method, path, handler, definition.kwargs))
        return wrapped

    def install(self, app: web.Application) -> None:
        """The catch-all route, and the check at startup that every route is behind the edge."""
        # Indexed under "/", the router's last resort: every route of its own is matched first.
        catch_all = app.router.add_route(
            "*", "/{tail:.*}", self.wrap(self._unmatched, "*", UNMATCHED, PUBLIC), name=UNMATCHED
        )
        self._catch_all = catch_all.resource

        async def every_route_behind_the_edge(app: web.Application) -> None:
            around = sorted(
                f"{route.method} {route.resource.canonical if route.resource else ''}"
                for route in app.router.routes()
                if route.handler not in self._handlers
            )
            if around:
                raise RuntimeError(f"routes registered around the edge (use add_routes): {around}")
            if self._unlisted:
                log.warning(
                    "routes without a policy answer admins only",
                    extra={"json_fields": {"routes": sorted(self._unlisted)}},
                )

        app.on_startup.append(every_route_behind_the_edge)

    async def _unmatched(self, request: web.Request) -> web.StreamResponse:
        allowed: set[str] = set()
        for resource in request.app.router.resources():
            if resource is not self._catch_all:
                _, methods = await resource.resolve(request)
                allowed |= methods
        preflight = self._guard.preflight(request, allowed)
        if preflight is not None:
            return preflight
        if allowed:
            raise web.HTTPMethodNotAllowed(request.method, allowed)
        raise web.HTTPNotFound()


EDGE = web.AppKey("edge", Edge)


def add_routes(app: web.Application, definitions: Iterable[web.AbstractRouteDef]) -> None:
    """Register routes behind the app's edge: the only way routes are added."""
    app.router.add_routes(app[EDGE].routes(definitions))


def served_routes(app: web.Application) -> list[web.AbstractRoute]:
    """The app's routes, without the edge's catch-all."""
    return [route for route in app.router.routes() if route.name != UNMATCHED]


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
