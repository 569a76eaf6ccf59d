"""Hardening: security headers, CORS, error bodies, size limits, and what the logs never hold."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from samvad.app import create_app
from samvad.config import Settings
from samvad.store.firestore import FirestoreStore
from tests.support import ServerProcess

Client = TestClient  # type: ignore[type-arg]
API = "/api/session"
ADMIN_KEY = "admin-key-0123456789abcdef"
SECRET = "hs256-secret-of-the-header-tests-0123456789abcdef"
WAIT = 5.0
ORIGIN = "https://app.example.com"


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


@pytest.fixture
def secured(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        return make_settings(
            **{"auth": "required", "api_keys": f"admin:{ADMIN_KEY}", "jwt_secret": SECRET}
            | overrides
        )

    return make


@pytest.fixture
async def client(aiohttp_client: Callable[..., Any], secured: Callable[..., Settings]) -> Client:
    return await aiohttp_client(create_app(secured()))  # type: ignore[no-any-return]


# ---- security headers -------------------------------------------------------------------------

EVERY_RESPONSE = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Strict-Transport-Security": "max-age=63072000; includeSubDomains",
}


def assert_hardened(headers: Any, json_body: bool = True) -> None:
    for name, value in EVERY_RESPONSE.items():
        assert headers.get(name) == value, (name, dict(headers))
    if json_body:
        assert headers["Cache-Control"] == "no-store"
        assert headers["Content-Security-Policy"].startswith("default-src 'none'")


@pytest.mark.parametrize(
    ("method", "path", "credential", "status"),
    [
        ("GET", "/healthz", None, 200),
        ("GET", f"{API}/u1/state", None, 401),
        ("GET", f"{API}/u1/state", "bob", 403),
        ("GET", f"{API}/u1/state", "u1", 404),
        ("POST", f"{API}/u1/state", "u1", 200),
        ("GET", "/no/such/path", None, 404),
        ("PUT", "/healthz", None, 405),
        ("GET", f"{API}/stats", "admin", 200),
    ],
)
async def test_every_response_carries_the_security_headers(
    client: Client, method: str, path: str, credential: str | None, status: int
) -> None:
    headers = {}
    if credential == "admin":
        headers = bearer(ADMIN_KEY)
    elif credential is not None:
        headers = bearer(token(credential))
    response = await client.request(method, path, json={}, headers=headers)
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    assert_hardened(response.headers)
    assert "Access-Control-Allow-Origin" not in response.headers  # CORS is off by default


async def test_the_websocket_upgrade_the_export_and_the_html_page_carry_them_too(
    client: Client,
) -> None:
    ws = await client.ws_connect("/ws", params={"userId": "u1", "token": token("u1")})
    assert_hardened(ws._response.headers, json_body=False)
    assert ws._response.headers["X-Request-Id"]
    await ws.close()
    export = await client.get(f"{API}/u1/export", headers=bearer(token("u1")))
    assert export.status == 200
    assert_hardened(export.headers)  # a stream its handler prepares itself
    assert export.headers["X-Request-Id"]
    page = await client.get("/dashboard")
    assert page.status == 200
    assert_hardened(page.headers, json_body=False)
    # the page keeps the policy it needs for its own script
    assert "script-src" in page.headers["Content-Security-Policy"]


# ---- CORS -------------------------------------------------------------------------------------


def preflight(method: str = "POST", origin: str = ORIGIN) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type",
    }


async def test_cors_is_off_unless_origins_are_listed(client: Client) -> None:
    response = await client.options(f"{API}/u1/state", headers=preflight())
    assert response.status == 405
    assert "Access-Control-Allow-Origin" not in response.headers
    response = await client.get("/healthz", headers={"Origin": ORIGIN})
    assert "Access-Control-Allow-Origin" not in response.headers


async def test_cors_for_the_listed_origins_only(
    aiohttp_client: Callable[..., Any], secured: Callable[..., Settings]
) -> None:
    settings = secured(cors_origins=f"{ORIGIN}, https://admin.example.com/")
    client = await aiohttp_client(create_app(settings))

    allowed = await client.options(f"{API}/u1/state", headers=preflight())
    assert allowed.status == 204
    assert allowed.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert {"GET", "POST"} <= set(allowed.headers["Access-Control-Allow-Methods"].split(", "))
    assert "Authorization" in allowed.headers["Access-Control-Allow-Headers"]
    assert int(allowed.headers["Access-Control-Max-Age"]) > 0
    assert "Origin" in allowed.headers.getall("Vary")
    second = await client.options(
        f"{API}/s1", headers=preflight("DELETE", "https://admin.example.com")
    )
    assert second.status == 204
    assert "DELETE" in second.headers["Access-Control-Allow-Methods"]

    refused = await client.options(f"{API}/u1/state", headers=preflight(origin="https://evil.test"))
    assert refused.status == 403
    assert "Access-Control-Allow-Origin" not in refused.headers
    unknown = await client.options("/no/such/path", headers=preflight())
    assert unknown.status == 404

    # the actual requests: the origin is echoed, on errors too, so the page can read them
    answered = await client.get(f"{API}/u1/state", headers={"Origin": ORIGIN})
    assert answered.status == 401
    assert answered.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "WWW-Authenticate" in answered.headers["Access-Control-Expose-Headers"]
    assert "Access-Control-Allow-Credentials" not in answered.headers  # bearer tokens, no cookies
    stranger = await client.get(f"{API}/u1/state", headers={"Origin": "https://evil.test"})
    assert "Access-Control-Allow-Origin" not in stranger.headers
    assert "Origin" in stranger.headers.getall("Vary")


# ---- error bodies -----------------------------------------------------------------------------


class BrokenStore(FirestoreStore):
    """The real store, except that one read fails the way a bug would."""

    async def get_state(self, user_id: str) -> Any:
        raise RuntimeError("internal detail: /srv/samvad/secret-path line 42")


async def test_errors_show_no_internals(
    aiohttp_client: Callable[..., Any], secured: Callable[..., Settings]
) -> None:
    settings = secured()

    def broken(settings: Settings) -> FirestoreStore:
        return BrokenStore.connect(settings.project, timeout=settings.store_timeout)

    client = await aiohttp_client(create_app(settings, store_factory=broken))
    crashed = await client.get(f"{API}/u1/state", headers=bearer(token("u1")))
    assert crashed.status == 500
    assert await crashed.json() == {"success": False, "error": "internal error"}
    assert_hardened(crashed.headers)

    garbled = await client.post(
        f"{API}/u1/history", data=b'{"role": "user", "content": ', headers=bearer(token("u1"))
    )
    assert garbled.status == 400
    text = await garbled.text()
    assert json.loads(text) == {"success": False, "error": "request body is not valid JSON"}
    for leak in ("Traceback", "Expecting", "line 1", ".py"):
        assert leak not in text


# ---- size limits ------------------------------------------------------------------------------


async def test_every_size_limit_is_enforced(
    aiohttp_client: Callable[..., Any], secured: Callable[..., Settings]
) -> None:
    settings = secured(
        max_body_bytes=4096, max_state_bytes=1024, max_message_bytes=100, ws_max_frame_bytes=1024
    )
    client = await aiohttp_client(create_app(settings))
    user = bearer(token("u1"))

    async def refused(response: aiohttp.ClientResponse, status: int, says: str) -> None:
        body = await response.json()
        assert response.status == status, body
        assert body["success"] is False and says in body["error"], body

    # the body limit: before anything reads it, the owner check of a body route included
    huge = {"userId": "u1", "metadata": {"blob": "x" * 5000}}
    await refused(await client.post(f"{API}/create", json=huge, headers=user), 413, "too large")
    await refused(
        await client.post(f"{API}/u1/state", json={"blob": "x" * 5000}, headers=user),
        413,
        "too large",
    )
    # the state limit, under the body limit
    await refused(
        await client.post(f"{API}/u1/state", json={"blob": "x" * 2000}, headers=user),
        413,
        "state is over 1024 bytes",
    )
    ok = await client.post(f"{API}/u1/state", json={"blob": "x" * 500}, headers=user)
    assert ok.status == 200
    # the message limit, over REST and over the websocket
    await refused(
        await client.post(
            f"{API}/u1/history", json={"role": "user", "content": "y" * 101}, headers=user
        ),
        413,
        "content is over 100 bytes",
    )
    ws = await client.ws_connect("/ws", params={"userId": "u1"}, headers=user)
    assert (await ws.receive_json(timeout=WAIT))["type"] == "ready"
    await ws.send_json({"type": "message", "id": 1, "role": "user", "content": "y" * 101})
    answer = await ws.receive_json(timeout=WAIT)
    assert answer["type"] == "error" and "content is over 100 bytes" in answer["error"]
    # the frame limit: refused with an error frame, and far over it the socket is closed
    await ws.send_json({"type": "state", "id": 2, "state": {"blob": "z" * 1100}})
    answer = await ws.receive_json(timeout=WAIT)
    assert answer["type"] == "error" and "frame is over 1024 bytes" in answer["error"]
    await ws.send_str("w" * 5000)
    closing = await ws.receive(timeout=WAIT)
    assert closing.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
    assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    await ws.close()
    profile = await client.get(f"{API}/u1/profile", headers=user)
    assert profile.status == 404  # nothing over a limit was stored


# ---- logs -------------------------------------------------------------------------------------


async def test_logs_hold_no_token_no_message_and_no_query(
    emulator_host: str, project_id: str, tmp_path: Path
) -> None:
    """A real process, its real JSON logs: one request cycle of each kind, then a look."""
    message = f"my account number is {secrets.token_hex(8)}"
    user_id = f"user-{secrets.token_hex(4)}"
    user_token = token(user_id)
    server = ServerProcess(
        project_id,
        emulator_host,
        tmp_path,
        auth="required",
        api_keys=f"admin:{ADMIN_KEY}",
        jwt_secret=SECRET,
        log_level="DEBUG",
        access_log="all",
    )
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            url = f"{server.url}{API}/{user_id}"
            async with http.post(
                f"{url}/history",
                json={"role": "user", "content": message},
                headers=bearer(user_token),
            ) as response:
                assert response.status == 200
            async with http.get(f"{url}/profile", headers=bearer(user_token)) as response:
                assert message in await response.text()
            async with http.get(f"{url}/profile", headers=bearer(user_token + "x")) as response:
                assert response.status == 401
            async with http.get(f"{url}/profile?token={user_token}") as response:
                assert response.status == 401
            async with http.get(f"{server.url}{API}/stats", headers=bearer(ADMIN_KEY)) as response:
                assert response.status == 200
            ws = await http.ws_connect(
                f"{server.url}/ws", params={"userId": user_id, "token": user_token}
            )
            assert (await ws.receive_json(timeout=WAIT))["type"] == "ready"
            await ws.send_json({"type": "message", "role": "assistant", "content": message})
            assert (await ws.receive_json(timeout=WAIT))["type"] == "ack"
            await ws.close()
    finally:
        assert await server.terminate() == 0
    logs = server.logs()
    lines = [json.loads(line) for line in logs.splitlines() if line.strip()]
    assert any(line.get("route") == "/api/session/{userId}/history" for line in lines)
    assert any(line.get("route") == "/ws" for line in lines)
    for secret_text in (message, user_token, ADMIN_KEY, SECRET, "token=", user_id):
        assert secret_text not in logs, secret_text


async def test_auth_off_is_announced_at_start(
    emulator_host: str, project_id: str, tmp_path: Path
) -> None:
    server = ServerProcess(project_id, emulator_host, tmp_path)  # SAMVAD_AUTH=none
    await server.start()
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{server.url}{API}/nobody/state") as response,
        ):
            assert response.status == 404  # no credential needed
    finally:
        await server.terminate()
    warnings = [
        line
        for line in map(json.loads, server.logs().splitlines())
        if line["severity"] == "WARNING" and "authentication is OFF" in line["message"]
    ]
    assert len(warnings) == 1
