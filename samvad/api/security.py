"""Who may call what: authentication, per-user scoping, rate limits, CORS and security headers.

`install_security(app, settings)` makes the app's `Guard`, which the edge
(samvad/api/middlewares.py) asks about every request before its route's handler runs
(authentication, ownership, rate limits) and about CORS preflights; and it adds a response hook
that sets the security headers (and the CORS headers) on every response, websocket upgrades and
error answers included.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from aiohttp import hdrs, web
from cachetools import TTLCache

from samvad.api.keys import RESPONSE_HEADERS, SERVICE, HeaderHook
from samvad.api.responses import JSON_CSP, SECURITY_HEADERS, JsonResponse, error_response
from samvad.api.routes import read_object
from samvad.auth import (
    AuthConfigError,
    Authenticator,
    InvalidToken,
    Principal,
    Role,
    VerifierUnavailable,
    build_authenticator,
)
from samvad.clock import monotonic
from samvad.config import Settings
from samvad.errors import Gone, InvalidInput, NotFound, SamvadError

log = logging.getLogger(__name__)

Limit = Literal["refresh", "append"]
Owner = Literal["path", "query", "body", "session"]

EVERYONE: frozenset[Role] = frozenset({"user", "agent", "admin"})
SELF_OR_ADMIN: frozenset[Role] = frozenset({"user", "admin"})
ADMINS: frozenset[Role] = frozenset({"admin"})


@dataclass(frozen=True)
class Policy:
    """Who may call a route.

    `roles` may call it at all. A `user` principal (an end user's JWT) may in addition only reach
    its own data: `owner` says where the route names whose data it is: the `userId` of the path,
    of the query or of the JSON body, or the owner of the path's `sessionId`.
    """

    roles: frozenset[Role] = frozenset()
    owner: Owner | None = None
    limit: Limit | None = None  # the rate limit a call counts against
    query_token: bool = False  # `?token=` taken too: browsers cannot set websocket headers
    public: bool = False

    def __post_init__(self) -> None:
        if "user" in self.roles and self.owner is None:
            raise ValueError("a policy open to users must say where the user is (owner)")


PUBLIC = Policy(public=True)
ADMIN = Policy(ADMINS)
OWN_USER = Policy(EVERYONE, owner="path")  # {userId} in the path
OWN_SESSION = Policy(EVERYONE, owner="session")  # {sessionId} in the path
SELF_SERVICE = Policy(SELF_OR_ADMIN, owner="path")  # erasure and export: not for agents

# THE POLICY TABLE. Every route has one line: (method, route template as aiohttp shows it in
# resource.canonical) -> Policy. HEAD follows GET. Adding a route means adding its line here
# (and its operation in samvad/api/openapi.py); tests/test_auth.py fails for a route that has
# none, and until it has one such a route answers admins only.
POLICIES: dict[tuple[str, str], Policy] = {
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/api/openapi.json"): PUBLIC,
    ("GET", "/dashboard"): PUBLIC,  # the page holds nothing; its data calls carry a key
    ("GET", "/metrics"): ADMIN,
    ("GET", "/api/metrics/summary"): ADMIN,
    ("GET", "/api/session/stats"): ADMIN,
    ("POST", "/api/session/create"): Policy(EVERYONE, owner="body"),
    ("POST", "/api/session/refresh"): Policy(SELF_OR_ADMIN, owner="body", limit="refresh"),
    ("GET", "/api/session/user/{userId}/active"): OWN_USER,
    ("GET", "/api/session/user/{userId}/sessions"): OWN_USER,
    ("POST", "/api/session/user/{userId}/share"): OWN_USER,
    ("POST", "/api/session/{userId}/state"): OWN_USER,
    ("GET", "/api/session/{userId}/state"): OWN_USER,
    ("GET", "/api/session/{userId}/profile"): OWN_USER,
    ("POST", "/api/session/{userId}/history"): Policy(EVERYONE, owner="path", limit="append"),
    ("POST", "/api/session/{userId}/snapshots"): OWN_USER,
    ("GET", "/api/session/{userId}/snapshots"): OWN_USER,
    ("POST", "/api/session/{userId}/snapshots/{snapshotId}/restore"): OWN_USER,
    ("DELETE", "/api/session/{userId}/snapshots/{snapshotId}"): OWN_USER,
    ("GET", "/api/session/{userId}/export"): SELF_SERVICE,
    ("GET", "/api/session/{sessionId}"): OWN_SESSION,
    ("PATCH", "/api/session/{sessionId}"): OWN_SESSION,
    ("PUT", "/api/session/{sessionId}/end"): OWN_SESSION,
    ("DELETE", "/api/session/{sessionId}"): OWN_SESSION,
    ("POST", "/api/session/{sessionId}/interruptions"): OWN_SESSION,
    ("GET", "/api/session/{sessionId}/interruptions"): OWN_SESSION,
    ("GET", "/ws"): Policy(EVERYONE, owner="query", query_token=True),
}
UNLISTED = ADMIN  # secure by default: a route someone forgot to list is not open


def table_key(method: str, template: str) -> tuple[str, str]:
    """The key in POLICIES of the route `method template`: HEAD follows GET."""
    return ("GET" if method == hdrs.METH_HEAD else method), template


def policy_key(route: web.AbstractRoute) -> tuple[str, str]:
    return table_key(route.method, route.resource.canonical if route.resource is not None else "")


# ---- rate limits --------------------------------------------------------------------------------


class RateLimited(SamvadError):
    status = 429
    public_message = "rate limit exceeded"

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"rate limit exceeded; retry in {math.ceil(retry_after)} s")
        self.retry_after = retry_after


class TokenBuckets:
    """One token bucket per principal. A bucket idle long enough to be full again is the same
    as no bucket: the cache forgets it then, so memory follows the principals active lately
    (and never exceeds `max_keys` buckets; past that the least recent are forgotten early)."""

    def __init__(
        self, rate: float, burst: float, max_keys: int, timer: Callable[[], float] = monotonic
    ) -> None:
        self.rate = rate  # tokens a second
        self.burst = burst
        self._timer = timer
        self._buckets: TTLCache[str, tuple[float, float]] = TTLCache(
            maxsize=max_keys, ttl=burst / rate, timer=timer
        )

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> float:
        """0 if a token was taken; else the seconds until one will be there."""
        now = self._timer()
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate
        self._buckets[key] = (tokens - 1, now)
        return 0.0


def rate_limits(settings: Settings) -> dict[Limit, TokenBuckets]:
    limits: dict[Limit, TokenBuckets] = {}
    per_minute = settings.rate_refresh_per_minute
    if per_minute > 0:
        limits["refresh"] = TokenBuckets(
            per_minute / 60, max(1.0, per_minute), settings.rate_principals
        )
    per_second = settings.rate_append_per_second
    if per_second > 0:
        limits["append"] = TokenBuckets(per_second, max(1.0, per_second), settings.rate_principals)
    return limits


# ---- what the app keeps --------------------------------------------------------------------------


@dataclass
class Guard:
    """The app's authentication, rate limits and CORS origins; the edge
    (samvad/api/middlewares.py) asks it about every request."""

    authenticator: Authenticator | None  # None: SAMVAD_AUTH=none
    limits: dict[Limit, TokenBuckets]
    cors_origins: frozenset[str]

    def take(self, principal: Principal, limit: Limit) -> None:
        buckets = self.limits.get(limit)
        if buckets is None:
            return
        wait = buckets.take(principal.key)
        if wait > 0:
            raise RateLimited(wait)

    async def authorize(self, request: web.Request, policy: Policy) -> web.Response | None:
        """None if the request may go on to its handler (its principal is then on the request,
        `principal_of`); else the answer that refuses it. Only for a policy that is not
        public, with authentication on."""
        assert self.authenticator is not None
        token = _bearer(request, policy)
        if not token:
            return _unauthorized(None if token is None else "empty token")
        try:
            principal = await self.authenticator.authenticate(token)
        except InvalidToken as exc:
            return _unauthorized(exc.reason)
        except VerifierUnavailable:
            return error_response(
                503, "cannot verify tokens right now; retry shortly", {hdrs.RETRY_AFTER: "5"}
            )
        if principal.role not in policy.roles:
            return _forbidden(f"a {principal.role} credential may not call this")
        if principal.role == "user" and policy.owner is not None:
            owner = await _owner_of(request, policy.owner)
            if owner != principal.user_id:
                if policy.owner == "session":
                    # Exactly the answer of an unknown session: ids of others cannot be probed.
                    raise NotFound("no such session")
                return _forbidden("this token may only reach its own user's data")
        if policy.limit is not None:
            try:
                self.take(principal, policy.limit)
            except RateLimited as exc:
                retry = str(max(1, math.ceil(exc.retry_after)))
                return error_response(429, exc.message, {hdrs.RETRY_AFTER: retry})
        request[PRINCIPAL] = principal
        return None

    def preflight(self, request: web.Request, allowed: set[str]) -> web.Response | None:
        """The answer to a CORS preflight for a path whose routes take `allowed` methods; None
        if the request is not one (or CORS is off)."""
        if (
            request.method != hdrs.METH_OPTIONS
            or not self.cors_origins
            or hdrs.ACCESS_CONTROL_REQUEST_METHOD not in request.headers
            or hdrs.ORIGIN not in request.headers
        ):
            return None
        if request.headers[hdrs.ORIGIN] not in self.cors_origins:
            return error_response(403, "origin not allowed")
        if not allowed:
            return None  # an unknown path: 404
        return web.Response(
            status=204,
            headers={
                hdrs.ACCESS_CONTROL_ALLOW_METHODS: ", ".join(sorted(allowed)),
                hdrs.ACCESS_CONTROL_ALLOW_HEADERS: CORS_ALLOW_HEADERS,
                hdrs.ACCESS_CONTROL_MAX_AGE: CORS_MAX_AGE,
            },
        )


GUARD = web.AppKey("guard", Guard)
PRINCIPAL = web.RequestKey("principal", Principal)


def principal_of(request: web.Request) -> Principal | None:
    """Who made the request; None when authentication is off."""
    return request.get(PRINCIPAL)


def take_rate(request: web.Request, limit: Limit) -> None:
    """Count one call of the request's principal against `limit` (raises RateLimited); for calls
    that do not come as requests of their own, like websocket frames."""
    principal = request.get(PRINCIPAL)
    if principal is not None:
        request.app[GUARD].take(principal, limit)


# ---- answers -------------------------------------------------------------------------------------

REALM = 'Bearer realm="samvad"'
CORS_ALLOW_HEADERS = "Authorization, Content-Type, X-Samvad-Durable"
CORS_EXPOSE_HEADERS = "Retry-After, WWW-Authenticate, X-Samvad-Partial"
CORS_MAX_AGE = "600"


def _unauthorized(reason: str | None) -> web.Response:
    if reason is None:
        return error_response(
            401,
            "authentication required: send Authorization: Bearer <token>",
            {hdrs.WWW_AUTHENTICATE: REALM},
        )
    challenge = f'{REALM}, error="invalid_token", error_description="{reason}"'
    return error_response(401, f"invalid token: {reason}", {hdrs.WWW_AUTHENTICATE: challenge})


def _forbidden(message: str) -> web.Response:
    return error_response(
        403, message, {hdrs.WWW_AUTHENTICATE: f'{REALM}, error="insufficient_scope"'}
    )


def _bearer(request: web.Request, policy: Policy) -> str | None:
    header = request.headers.get(hdrs.AUTHORIZATION)
    if header is not None:
        scheme, _, token = header.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None
    if policy.query_token:
        return request.query.get("token")
    return None


async def _owner_of(request: web.Request, owner: Owner) -> str | None:
    """The user whose data the request is about, as the route names it."""
    if owner == "path":
        return request.match_info.get("userId")
    if owner == "query":
        user_id = request.query.get("userId")
        if user_id is None:
            raise InvalidInput("userId is required")
        return user_id
    if owner == "body":
        # aiohttp keeps the body: the handler reads the same bytes, through the same parser.
        # The wire models take a field by its Python name too: both spellings must agree.
        data = await read_object(request)
        named = {data[key] for key in ("userId", "user_id") if key in data}
        if not named or not all(isinstance(value, str) for value in named):
            raise InvalidInput("userId: a string is required")
        return named.pop() if len(named) == 1 else None
    try:
        record = await request.app[SERVICE].get_session(request.match_info["sessionId"])
    except Gone:
        # Whose it was is not known here, and a 410 would tell that it existed.
        raise NotFound("no such session") from None
    return record.user_id


def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Before a response's headers go out: what its handler set itself stays (setdefault)."""
    if isinstance(response, JsonResponse):
        return  # made with all of them
    headers = response.headers
    for name, value in SECURITY_HEADERS.items():
        headers.setdefault(name, value)
    # The raw header, not response.content_type: that parses it anew for every response.
    if headers.get(hdrs.CONTENT_TYPE, "").startswith("application/json"):
        headers.setdefault(hdrs.CONTENT_SECURITY_POLICY, JSON_CSP)


def cors_headers(origins: frozenset[str]) -> HeaderHook:
    def set_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
        headers = response.headers
        headers.add(hdrs.VARY, hdrs.ORIGIN)
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None and origin in origins:
            headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
            if request.method != hdrs.METH_OPTIONS:
                headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = CORS_EXPOSE_HEADERS

    return set_cors_headers


# ---- wiring -------------------------------------------------------------------------------------


def parse_origins(value: str | None) -> frozenset[str]:
    origins = set()
    for raw in (value or "").split(","):
        origin = raw.strip().rstrip("/")
        if not origin:
            continue
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
            raise AuthConfigError(
                f"SAMVAD_CORS_ORIGINS: {origin!r} is not an origin like https://app.example.com"
            )
        origins.add(f"{parts.scheme}://{parts.netloc}".lower())
    return frozenset(origins)


def install_security(app: web.Application, settings: Settings) -> Guard:
    """The app's Guard, for the edge, and its response hooks; raises AuthConfigError when
    authentication is required and cannot work (the server must then not start)."""
    guard = Guard(
        build_authenticator(settings), rate_limits(settings), parse_origins(settings.cors_origins)
    )
    app[GUARD] = guard
    app[RESPONSE_HEADERS].append(security_headers)
    if guard.cors_origins:
        app[RESPONSE_HEADERS].append(cors_headers(guard.cors_origins))

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        if guard.authenticator is None:
            log.warning(
                "SAMVAD_AUTH=none: authentication is OFF; anyone can read and wipe any user"
            )
        yield
        if guard.authenticator is not None:
            await guard.authenticator.close()

    app.cleanup_ctx.append(lifetime)
    return guard
