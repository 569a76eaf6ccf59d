"""Authentication, per-user scoping and rate limits, on the emulator-backed app with auth on."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from samvad.api.keys import SERVICE
from samvad.api.middlewares import add_routes, served_routes
from samvad.api.security import POLICIES, TokenBuckets, policy_key
from samvad.app import create_app
from samvad.auth import AuthConfigError
from samvad.config import Settings
from tests.support import ROOT

Client = TestClient  # type: ignore[type-arg]
API = "/api/session"
ADMIN_KEY = "admin-key-0123456789abcdef"
AGENT_KEY = "agent-key-0123456789abcdef"
SECRET = "hs256-test-secret-that-is-long-enough-for-hs512-too-0123456789abcdef"
AUDIENCE = "samvad-test"
ISSUER = "https://issuer.test/samvad"
WAIT = 5.0


def user_token(
    sub: str | None = "alice",
    key: Any = SECRET,
    algorithm: str = "HS256",
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    payload: dict[str, Any] = {"exp": int(time.time()) + 3600, "iat": int(time.time())}
    if sub is not None:
        payload["sub"] = sub
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def secured(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "auth": "required",
            "api_keys": f"admin:{ADMIN_KEY},agent:{AGENT_KEY}",
            "jwt_secret": SECRET,
        }
        return make_settings(**{**values, **overrides})

    return make


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Any], secured: Callable[..., Settings]
) -> AsyncIterator[Client]:
    yield await aiohttp_client(create_app(secured()))


async def status_of(response: aiohttp.ClientResponse) -> tuple[int, dict[str, Any]]:
    body = await response.json() if response.content_type == "application/json" else {}
    return response.status, body


# ---- every route has a policy --------------------------------------------------------------------


def test_every_route_has_a_policy(settings: Settings) -> None:
    app = create_app(settings)
    missing = sorted(
        f"{route.method} {route.resource.canonical}"
        for route in served_routes(app)
        if route.resource is not None and policy_key(route) not in POLICIES
    )
    assert not missing, (
        f"routes without a policy (add a line to POLICIES in samvad/api/security.py): {missing}"
    )


async def test_a_route_missing_from_the_table_answers_admins_only(
    aiohttp_client: Callable[..., Any],
    secured: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = create_app(secured())

    async def added(request: web.Request) -> web.Response:
        return web.json_response({"success": True})

    add_routes(app, [web.get("/api/added-without-a-policy", added)])
    with caplog.at_level(logging.WARNING, logger="samvad"):
        client = await aiohttp_client(app)
    warned = [r.__dict__["json_fields"] for r in caplog.records if "policy" in r.getMessage()]
    assert warned == [{"routes": ["GET /api/added-without-a-policy"]}]
    response = await client.get("/api/added-without-a-policy", headers=bearer(AGENT_KEY))
    assert response.status == 403
    response = await client.get("/api/added-without-a-policy", headers=bearer(user_token()))
    assert response.status == 403
    response = await client.get("/api/added-without-a-policy", headers=bearer(ADMIN_KEY))
    assert response.status == 200


async def test_a_route_registered_around_the_edge_keeps_the_app_from_starting(
    aiohttp_client: Callable[..., Any], secured: Callable[..., Settings]
) -> None:
    # Such a route would answer without authentication, request id, metrics or JSON errors.
    app = create_app(secured())

    async def unguarded(request: web.Request) -> web.Response:
        return web.json_response({"success": True})

    app.router.add_get("/api/around-the-edge", unguarded)
    with pytest.raises(RuntimeError, match=r"around the edge.*GET /api/around-the-edge"):
        await aiohttp_client(app)


# ---- every role against every endpoint ---------------------------------------------------------

# Columns: no credential, a garbage token, alice's JWT, bob's JWT (on alice's data), agent key,
# admin key. "ok" is any 2xx. Paths name alice's data: her userId, her session s-alice, her
# snapshot. /ws has tests of its own below.
ROLES = ("anonymous", "garbage", "self", "other", "agent", "admin")
OPEN = "ok ok ok ok ok ok"
ADMIN_ONLY = "401 401 403 403 403 ok"
OWN = "401 401 ok 403 ok ok"
OWN_SESSION = "401 401 ok 404 ok ok"
SELF_SERVICE = "401 401 ok 403 403 ok"
ENDPOINTS: list[tuple[str, str, Any, str]] = [
    ("GET", "/healthz", None, OPEN),
    ("GET", "/readyz", None, OPEN),
    ("GET", "/api/openapi.json", None, OPEN),
    ("GET", "/dashboard", None, OPEN),
    ("GET", "/metrics", None, ADMIN_ONLY),
    ("GET", "/api/metrics/summary", None, ADMIN_ONLY),
    ("GET", f"{API}/stats", None, ADMIN_ONLY),
    ("POST", f"{API}/create", {"userId": "alice", "sessionId": "s-alice"}, OWN),
    ("POST", f"{API}/refresh", {"userId": "alice"}, SELF_SERVICE),
    ("GET", f"{API}/user/alice/active", None, OWN),
    ("GET", f"{API}/user/alice/sessions", None, OWN),
    ("POST", f"{API}/user/alice/share", {"key": "topic", "value": "loans"}, OWN),
    ("POST", f"{API}/alice/state", {"language": "en"}, OWN),
    ("GET", f"{API}/alice/state", None, OWN),
    ("GET", f"{API}/alice/profile", None, OWN),
    ("POST", f"{API}/alice/history", {"role": "user", "content": "hello"}, OWN),
    ("POST", f"{API}/alice/snapshots", {"name": "before"}, OWN),
    ("GET", f"{API}/alice/snapshots", None, OWN),
    ("POST", f"{API}/alice/snapshots/{{snapshot}}/restore", None, OWN),
    ("DELETE", f"{API}/alice/snapshots/{{snapshot}}", None, OWN),
    ("GET", f"{API}/alice/export", None, SELF_SERVICE),
    ("GET", f"{API}/s-alice", None, OWN_SESSION),
    ("PATCH", f"{API}/s-alice", {"metadata": {"channel": "web"}}, OWN_SESSION),
    ("PUT", f"{API}/s-alice/end", None, OWN_SESSION),
    ("DELETE", f"{API}/s-alice", None, OWN_SESSION),
    ("POST", f"{API}/s-alice/interruptions", {"heard": "Home loans"}, OWN_SESSION),
    ("GET", f"{API}/s-alice/interruptions", None, OWN_SESSION),
]
CREDENTIALS: dict[str, dict[str, str]] = {
    "anonymous": {},
    "garbage": bearer("not-a-credential"),
    "self": bearer(user_token("alice")),
    "other": bearer(user_token("bob")),
    "agent": bearer(AGENT_KEY),
    "admin": bearer(ADMIN_KEY),
}


def test_the_role_table_covers_every_route(settings: Settings) -> None:
    covered = {(method, _template(path)) for method, path, _, _ in ENDPOINTS} | {("GET", "/ws")}
    routes = {policy_key(route) for route in served_routes(create_app(settings))}
    assert routes - covered == set(), "add the new route to ENDPOINTS"


def _template(path: str) -> str:
    swaps = {"alice": "{userId}", "s-alice": "{sessionId}", "{snapshot}": "{snapshotId}"}
    parts = path.split("/")
    if path.startswith(f"{API}/user/"):
        return "/".join(parts[:4] + [swaps.get(p, p) for p in parts[4:]])
    return "/".join(swaps.get(p, p) for p in parts)


async def _seed(client: Client, snapshot: bool = False) -> str:
    """Alice's data (state, history, an active session, an interruption, a snapshot if asked),
    again. Durable writes: a snapshot taken while a flush of the same user is in flight can
    leave a transaction lock in the emulator that fails the project's cleanup."""
    svc = client.server.app[SERVICE]
    await svc.save_session("s-alice", "alice", durable=True)
    await svc.save_user_state("alice", {"language": "en"}, durable=True)
    await svc.append_to_user_history("alice", "user", "hello", durable=True)
    svc.push_interruption("s-alice", "alice", {"heard": "Home loans"})
    return (await svc.create_snapshot("alice", "seed")).snapshot_id if snapshot else "none"


@pytest.mark.parametrize(("method", "path", "body", "expected"), ENDPOINTS, ids=lambda v: str(v))
async def test_every_role_against_every_endpoint(
    client: Client, method: str, path: str, body: Any, expected: str
) -> None:
    got = []
    for role, want in zip(ROLES, expected.split(), strict=True):
        url = path.replace("{snapshot}", await _seed(client, "{snapshot}" in path))
        response = await client.request(method, url, json=body, headers=CREDENTIALS[role])
        status, answer = await status_of(response)
        verdict = "ok" if 200 <= status < 300 else str(status)
        got.append(verdict)
        if verdict != want:
            pytest.fail(f"{role}: {method} {url} answered {status} {answer}, expected {want}")
        if status in (401, 403, 404):
            assert answer["success"] is False and answer["error"]
        if status == 401:
            assert response.headers["WWW-Authenticate"].startswith('Bearer realm="samvad"')
    assert " ".join(got) == expected


async def test_another_users_session_is_exactly_an_unknown_session(client: Client) -> None:
    await _seed(client)
    bob = bearer(user_token("bob"))
    for method, suffix in (("GET", ""), ("PUT", "/end"), ("DELETE", ""), ("GET", "/interruptions")):
        theirs = await client.request(method, f"{API}/s-alice{suffix}", headers=bob)
        unknown = await client.request(method, f"{API}/s-nobody-has{suffix}", headers=bob)
        assert (theirs.status, await theirs.read()) == (unknown.status, await unknown.read())
        assert theirs.status == 404
        assert set(theirs.headers) - {"Date"} == set(unknown.headers) - {"Date"}
    # and nothing was done to it
    assert (await client.get(f"{API}/s-alice", headers=bearer(user_token("alice")))).status == 200


class MovableClock:
    def __init__(self) -> None:
        self.at = datetime.now(UTC)

    def now(self) -> datetime:
        return self.at


async def test_an_expired_session_of_another_user_is_unknown_too(
    aiohttp_client: Callable[..., Any], secured: Callable[..., Settings]
) -> None:
    clock = MovableClock()
    client = await aiohttp_client(create_app(secured(session_retention=60), clock=clock))
    await client.server.app[SERVICE].save_session("s-alice", "alice", durable=True)
    clock.at += timedelta(seconds=120)
    agent = await client.get(f"{API}/s-alice", headers=bearer(AGENT_KEY))
    assert agent.status == 410  # keys see the truth
    unknown = await client.get(f"{API}/s-nobody-has", headers=bearer(user_token("bob")))
    for user in ("bob", "alice"):
        theirs = await client.get(f"{API}/s-alice", headers=bearer(user_token(user)))
        assert (theirs.status, await theirs.read()) == (404, await unknown.read())


async def test_user_in_the_body_cannot_be_spelled_around(client: Client) -> None:
    bob = bearer(user_token("bob"))
    for body in ({"user_id": "alice"}, {"userId": "bob", "user_id": "alice"}):
        response = await client.post(f"{API}/create", json=body, headers=bob)
        assert response.status == 403, await response.text()
    response = await client.post(f"{API}/create", json={"sessionId": "x"}, headers=bob)
    assert response.status == 400
    response = await client.post(f"{API}/create", json={"user_id": "bob"}, headers=bob)
    assert response.status == 201, await response.text()


async def test_a_user_erases_itself_and_nobody_else(client: Client) -> None:
    await _seed(client)
    alice = bearer(user_token("alice"))
    refused = await client.post(
        f"{API}/refresh", json={"userId": "alice"}, headers=bearer(AGENT_KEY)
    )
    assert refused.status == 403
    refused = await client.post(
        f"{API}/refresh", json={"userId": "alice"}, headers=bearer(user_token("bob"))
    )
    assert refused.status == 403
    assert (await client.get(f"{API}/alice/state", headers=alice)).status == 200
    done = await client.post(f"{API}/refresh", json={"userId": "alice"}, headers=alice)
    assert done.status == 200 and (await done.json())["cleared"]["userState"] is True
    assert (await client.get(f"{API}/alice/state", headers=alice)).status == 404


# ---- bad credentials --------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(payload: dict[str, Any], header: dict[str, Any]) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}."


def _claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": int(time.time()) + 3600, **extra}


BAD_HS256_TOKENS: dict[str, Callable[[], str]] = {
    "expired": lambda: user_token(exp=int(time.time()) - 3600, aud=AUDIENCE, iss=ISSUER),
    "wrong audience": lambda: user_token(aud="someone-else", iss=ISSUER),
    "wrong issuer": lambda: user_token(aud=AUDIENCE, iss="https://evil.test"),
    "no audience": lambda: user_token(iss=ISSUER),
    "bad signature": lambda: user_token(
        key="another-secret-that-is-long-enough-0123456", aud=AUDIENCE, iss=ISSUER
    ),
    "alg none": lambda: _unsigned(_claims(aud=AUDIENCE, iss=ISSUER), {"alg": "none", "typ": "JWT"}),
    "alg None": lambda: _unsigned(_claims(aud=AUDIENCE, iss=ISSUER), {"alg": "None"}),
    "HS512": lambda: user_token(algorithm="HS512", aud=AUDIENCE, iss=ISSUER),
    "missing sub": lambda: user_token(sub=None, aud=AUDIENCE, iss=ISSUER),
    "missing exp": lambda: user_token(exp=None, aud=AUDIENCE, iss=ISSUER),
    "sub not an id": lambda: user_token(sub="a/b", aud=AUDIENCE, iss=ISSUER),
    "sub not a string": lambda: jwt.encode(
        {**_claims(aud=AUDIENCE, iss=ISSUER), "sub": 42}, SECRET, algorithm="HS256"
    ),
    "not a JWT": lambda: "a.b.c",
    "tampered payload": lambda: _tamper(user_token("bob", aud=AUDIENCE, iss=ISSUER)),
}


def _tamper(token: str) -> str:
    header, _, signature = token.split(".")
    payload = _b64(json.dumps(_claims(aud=AUDIENCE, iss=ISSUER)).encode())
    return f"{header}.{payload}.{signature}"


@pytest.mark.parametrize("case", list(BAD_HS256_TOKENS))
async def test_bad_jwts_are_refused(
    aiohttp_client: Callable[..., Any], secured: Callable[..., Settings], case: str
) -> None:
    client = await aiohttp_client(create_app(secured(jwt_audience=AUDIENCE, jwt_issuer=ISSUER)))
    good = user_token(aud=AUDIENCE, iss=ISSUER)
    assert (await client.get(f"{API}/alice/state", headers=bearer(good))).status == 404
    response = await client.get(f"{API}/alice/state", headers=bearer(BAD_HS256_TOKENS[case]()))
    assert response.status == 401, await response.text()
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="samvad", error="invalid_token"'), challenge
    body = await response.json()
    assert body["success"] is False and body["error"].startswith("invalid token")


async def test_a_little_clock_skew_is_forgiven(client: Client) -> None:
    token = user_token(exp=int(time.time()) - 5)  # within the default 30 s leeway
    assert (await client.get(f"{API}/alice/state", headers=bearer(token))).status == 404


async def test_credentials_in_the_query_are_for_websockets_only(client: Client) -> None:
    response = await client.get(f"{API}/alice/state", params={"token": ADMIN_KEY})
    assert response.status == 401
    response = await client.get(
        f"{API}/alice/state", headers={"Authorization": f"Basic {ADMIN_KEY}"}
    )
    assert response.status == 401


# ---- RS256 and ES256 from a key set ----------------------------------------------------------


def _jwk(public_key: Any, kid: str, algorithm: str) -> dict[str, Any]:
    jwk_dict: dict[str, Any]
    if algorithm == "RS256":
        jwk_dict = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public_key))
    else:
        jwk_dict = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public_key))
    return {**jwk_dict, "kid": kid, "use": "sig", "alg": algorithm}


@pytest.fixture(scope="module")
def signing_keys() -> dict[str, Any]:
    return {
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "rotated": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "stranger": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }


def _jwks(signing_keys: dict[str, Any], *names: str) -> dict[str, Any]:
    algorithms = {"RS256": "RS256", "ES256": "ES256", "rotated": "RS256"}
    return {"keys": [_jwk(signing_keys[n].public_key(), f"kid-{n}", algorithms[n]) for n in names]}


def _signed(signing_keys: dict[str, Any], name: str, kid: str | None = None, **claims: Any) -> str:
    algorithm = "ES256" if name == "ES256" else "RS256"
    payload = {"aud": AUDIENCE, "iss": ISSUER, **claims}
    return user_token(
        key=signing_keys[name],
        algorithm=algorithm,
        headers={"kid": kid or f"kid-{name}"},
        **payload,
    )


@pytest.fixture
async def jwks_client(
    aiohttp_client: Callable[..., Any],
    secured: Callable[..., Settings],
    signing_keys: dict[str, Any],
    tmp_path: Path,
) -> Client:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(_jwks(signing_keys, "RS256", "ES256")))
    settings = secured(
        jwt_secret=None, jwt_jwks_file=str(path), jwt_audience=AUDIENCE, jwt_issuer=ISSUER
    )
    return await aiohttp_client(create_app(settings))  # type: ignore[no-any-return]


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
async def test_rs256_and_es256_tokens_from_a_jwks_file(
    jwks_client: Client, signing_keys: dict[str, Any], algorithm: str
) -> None:
    token = bearer(_signed(signing_keys, algorithm, sub="alice"))
    saved = await jwks_client.post(f"{API}/alice/state", json={"a": 1}, headers=token)
    assert saved.status == 200, await saved.text()
    assert (await jwks_client.get(f"{API}/alice/state", headers=token)).status == 200
    assert (await jwks_client.get(f"{API}/bob/state", headers=token)).status == 403
    expired = _signed(signing_keys, algorithm, sub="alice", exp=int(time.time()) - 3600)
    assert (await jwks_client.get(f"{API}/alice/state", headers=bearer(expired))).status == 401


def _hs256_with(key: bytes, payload: dict[str, Any]) -> str:
    """The classic confusion attack: the server's public key used as an HMAC secret."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    signing_input = f"{header}.{_b64(json.dumps(payload).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


async def test_keyset_tokens_that_must_fail(
    jwks_client: Client, signing_keys: dict[str, Any]
) -> None:
    from cryptography.hazmat.primitives import serialization

    public_pem = (
        signing_keys["RS256"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    cases = {
        "HS256 to an RS256 server": user_token(aud=AUDIENCE, iss=ISSUER),
        "HS256 signed with the public key": _hs256_with(
            public_pem, _claims(aud=AUDIENCE, iss=ISSUER)
        ),
        "unknown kid": _signed(signing_keys, "stranger"),
        "known kid, other key": _signed(signing_keys, "stranger", kid="kid-RS256"),
        "ES256 header on an RSA key": _signed(signing_keys, "ES256", kid="kid-RS256"),
        "wrong audience": _signed(signing_keys, "RS256", aud="another-project"),
        "wrong issuer": _signed(signing_keys, "RS256", iss="https://securetoken.google.com/x"),
        "alg none": _unsigned(
            _claims(aud=AUDIENCE, iss=ISSUER), {"alg": "none", "kid": "kid-RS256"}
        ),
    }
    for case, token in cases.items():
        response = await jwks_client.get(f"{API}/alice/state", headers=bearer(token))
        assert response.status == 401, case
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"], case


class JwksServer:
    """A key-set endpoint on localhost, as Google's is for Firebase, counting its fetches."""

    def __init__(self, keys: dict[str, Any]) -> None:
        self.keys = keys
        self.fetches = 0
        self.up = True
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if not self.up:
            return web.Response(status=500)
        return web.json_response(self.keys, headers={"Cache-Control": "public, max-age=3600"})

    async def __aenter__(self) -> JwksServer:
        app = web.Application()
        app.router.add_get("/jwks", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/jwks"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def test_firebase_style_tokens_from_a_jwks_url(
    aiohttp_client: Callable[..., Any],
    secured: Callable[..., Settings],
    signing_keys: dict[str, Any],
) -> None:
    project = "my-firebase-project"
    issuer = f"https://securetoken.google.com/{project}"
    async with JwksServer(_jwks(signing_keys, "RS256")) as jwks:
        settings = secured(
            api_keys=None,
            jwt_secret=None,
            jwt_jwks_url=jwks.url,
            jwt_audience=project,
            jwt_issuer=issuer,
        )
        client = await aiohttp_client(create_app(settings))

        def firebase_token(name: str, uid: str) -> dict[str, str]:
            now = int(time.time())
            return bearer(
                user_token(
                    uid,
                    key=signing_keys[name],
                    algorithm="RS256",
                    headers={"kid": f"kid-{name}"},
                    aud=project,
                    iss=issuer,
                    auth_time=now,
                    user_id=uid,
                    firebase={"identities": {}, "sign_in_provider": "anonymous"},
                )
            )

        token = firebase_token("RS256", "uid-alice")
        assert (await client.post(f"{API}/uid-alice/state", json={}, headers=token)).status == 200
        assert (await client.get(f"{API}/uid-alice/state", headers=token)).status == 200
        assert (await client.get(f"{API}/uid-bob/state", headers=token)).status == 403
        assert jwks.fetches == 1  # kept, not fetched per request

        # the issuer rotates its keys: an unknown kid makes the server look again, once
        jwks.keys = _jwks(signing_keys, "RS256", "rotated")
        rotated = firebase_token("rotated", "uid-alice")
        assert (await client.get(f"{API}/uid-alice/state", headers=rotated)).status == 200
        assert jwks.fetches == 2
        # forged kids do not make it fetch again and again
        for _ in range(3):
            forged = firebase_token("stranger", "uid-alice")
            assert (await client.get(f"{API}/uid-alice/state", headers=forged)).status == 401
        assert jwks.fetches == 2


async def test_an_unreachable_key_set_is_a_503_not_a_401(
    aiohttp_client: Callable[..., Any],
    secured: Callable[..., Settings],
    signing_keys: dict[str, Any],
) -> None:
    async with JwksServer(_jwks(signing_keys, "RS256")) as jwks:
        jwks.up = False
        settings = secured(jwt_secret=None, jwt_jwks_url=jwks.url, jwt_audience=AUDIENCE)
        client = await aiohttp_client(create_app(settings))
        token = bearer(_signed(signing_keys, "RS256", sub="alice"))
        response = await client.get(f"{API}/alice/state", headers=token)
        assert response.status == 503 and response.headers["Retry-After"]
        assert (await client.get(f"{API}/alice/state", headers=bearer(AGENT_KEY))).status == 404


# ---- websockets -------------------------------------------------------------------------------


async def _handshake(client: Client, headers: dict[str, str] | None = None, **params: str) -> int:
    try:
        ws = await client.ws_connect("/ws", params=params, headers=headers)
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status
    ready = await ws.receive_json(timeout=WAIT)
    assert ready["type"] == "ready" and ready["userId"] == params["userId"]
    await ws.close()
    return 101


async def test_websocket_handshake(client: Client) -> None:
    alice = user_token("alice")
    assert await _handshake(client, userId="alice") == 401
    assert await _handshake(client, userId="alice", token="garbage") == 401
    assert await _handshake(client, userId="alice", token=alice) == 101
    assert await _handshake(client, userId="bob", token=alice) == 403
    assert await _handshake(client, headers=bearer(alice), userId="alice") == 101
    assert await _handshake(client, headers=bearer(AGENT_KEY), userId="bob") == 101
    assert await _handshake(client, userId="carol", token=ADMIN_KEY) == 101


# ---- rate limits ------------------------------------------------------------------------------


async def test_refreshes_are_limited_per_principal(
    aiohttp_client: Callable[..., Any], secured: Callable[..., Settings]
) -> None:
    client = await aiohttp_client(create_app(secured(rate_refresh_per_minute=2)))
    alice = bearer(user_token("alice"))
    for _ in range(2):
        assert (
            await client.post(f"{API}/refresh", json={"userId": "alice"}, headers=alice)
        ).status == 200
    limited = await client.post(f"{API}/refresh", json={"userId": "alice"}, headers=alice)
    assert limited.status == 429
    assert 1 <= int(limited.headers["Retry-After"]) <= 30  # one token per 30 s
    body = await limited.json()
    assert body["success"] is False and "rate limit" in body["error"]
    # another principal has a bucket of its own
    bob = bearer(user_token("bob"))
    assert (await client.post(f"{API}/refresh", json={"userId": "bob"}, headers=bob)).status == 200
    # and nothing of alice was wiped by the refused call (there was nothing to: 200 cleared 0)


async def test_appends_are_limited_over_rest_and_websocket_together(
    aiohttp_client: Callable[..., Any], secured: Callable[..., Settings]
) -> None:
    client = await aiohttp_client(create_app(secured(rate_append_per_second=0.01)))
    alice = user_token("alice")
    message = {"role": "user", "content": "hi"}
    first = await client.post(f"{API}/alice/history", json=message, headers=bearer(alice))
    assert first.status == 200
    second = await client.post(f"{API}/alice/history", json=message, headers=bearer(alice))
    assert second.status == 429 and int(second.headers["Retry-After"]) >= 1
    ws = await client.ws_connect("/ws", params={"userId": "alice", "token": alice})
    await ws.receive_json(timeout=WAIT)
    await ws.send_json({"type": "message", "id": 1, **message})
    answer = await ws.receive_json(timeout=WAIT)
    assert answer["type"] == "error" and answer["id"] == 1 and "rate limit" in answer["error"]
    await ws.send_json({"type": "ping", "id": 2})  # other frames are not limited
    assert (await ws.receive_json(timeout=WAIT))["type"] == "pong"
    await ws.close()
    # the agent is another principal
    agent = await client.post(f"{API}/alice/history", json=message, headers=bearer(AGENT_KEY))
    assert agent.status == 200
    profile = await client.get(f"{API}/alice/profile", headers=bearer(AGENT_KEY))
    assert (await profile.json())["profile"]["historyLength"] == 2


def test_buckets_refill_and_idle_ones_are_forgotten() -> None:
    now = [1000.0]
    buckets = TokenBuckets(rate=1.0, burst=2, max_keys=100, timer=lambda: now[0])
    assert buckets.take("a") == 0 and buckets.take("a") == 0
    assert buckets.take("a") == pytest.approx(1.0)
    now[0] += 0.5
    assert buckets.take("a") == pytest.approx(0.5)
    now[0] += 0.5
    assert buckets.take("a") == 0
    for i in range(500):
        buckets.take(f"p{i}")
    assert len(buckets) <= 100  # bounded however many principals come
    now[0] += 3  # every bucket is full again: nothing needs keeping
    buckets.take("b")
    assert len(buckets) == 1


# ---- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({}, "SAMVAD_API_KEYS"),
        ({"api_keys": "admin:short"}, "shorter than"),
        ({"api_keys": "root:" + "k" * 20}, "role agent or admin"),
        ({"api_keys": f"admin:{ADMIN_KEY},agent:{ADMIN_KEY}"}, "two roles"),
        ({"jwt_secret": "too-short"}, "SAMVAD_JWT_SECRET"),
        ({"jwt_jwks_url": "https://keys.test/jwks"}, "SAMVAD_JWT_AUDIENCE"),
        ({"jwt_jwks_url": "http://keys.test/jwks", "jwt_audience": "a"}, "https://"),
        ({"api_keys_file": "/nonexistent/keys"}, "SAMVAD_API_KEYS_FILE"),
        ({"jwt_jwks_file": "/nonexistent/jwks.json", "jwt_audience": "a"}, "SAMVAD_JWT_JWKS_FILE"),
        ({"api_keys": f"admin:{ADMIN_KEY}", "cors_origins": "example.com"}, "SAMVAD_CORS_ORIGINS"),
    ],
)
def test_unusable_security_settings_refuse_to_build(
    make_settings: Callable[..., Settings], overrides: dict[str, Any], says: str
) -> None:
    with pytest.raises(AuthConfigError, match=says):
        create_app(make_settings(auth="required", **overrides))


async def test_keys_from_a_file(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# agents\nagent:{AGENT_KEY}\n\nadmin:{ADMIN_KEY}\n")
    client = await aiohttp_client(
        create_app(make_settings(auth="required", api_keys_file=str(path)))
    )
    assert (await client.get(f"{API}/stats", headers=bearer(ADMIN_KEY))).status == 200
    assert (await client.get(f"{API}/stats", headers=bearer(AGENT_KEY))).status == 403
    assert (await client.get(f"{API}/stats", headers=bearer(AGENT_KEY + "x"))).status == 401


def test_secrets_do_not_show_in_settings(secured: Callable[..., Settings]) -> None:
    shown = repr(secured()) + str(secured().model_dump())
    assert ADMIN_KEY not in shown and SECRET not in shown


def _bare_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAMVAD_")}
    env.update({"HOST": "127.0.0.1", "PORT": "0", "GOOGLE_CLOUD_PROJECT": "refusal-test"})
    env.setdefault("FIRESTORE_EMULATOR_HOST", "127.0.0.1:1")
    return env


def test_the_server_refuses_to_start_without_credentials() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "samvad"],
        env=_bare_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "SAMVAD_API_KEYS" in output and "SAMVAD_JWT_" in output and "SAMVAD_AUTH=none" in output
    assert "Traceback" not in output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert any(line["severity"] == "CRITICAL" for line in lines)
