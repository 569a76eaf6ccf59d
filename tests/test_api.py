"""The REST API of the design note, through aiohttp's test client, on the Firestore emulator."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from samvad.api.keys import SERVICE
from samvad.api.routes import RENDERED
from samvad.app import create_app
from samvad.config import Settings
from samvad.errors import InvalidId
from samvad.ids import check_id
from samvad.store.firestore import FirestoreStore
from tests.support import wait_for

Client = TestClient  # type: ignore[type-arg]
API = "/api/session"


async def ok(response: Any, status: int = 200) -> dict[str, Any]:
    body = await response.json()
    assert response.status == status, body
    assert body["success"] is True
    return body  # type: ignore[no-any-return]


async def failed(response: Any, status: int) -> str:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["success"] is False and isinstance(body["error"], str) and body["error"]
    return body["error"]  # type: ignore[no-any-return]


async def test_state_round_trip(client: Client) -> None:
    state = {
        "language": "en",
        "conversationContext": {"topic": "home loans"},
        "activeSessionId": "session_123",
    }
    body = await ok(await client.post(f"{API}/user_456/state", json=state))
    assert body == {
        "success": True,
        "message": "User state saved successfully",
        "userId": "user_456",
    }
    got = await ok(await client.get(f"{API}/user_456/state"))
    assert got["userId"] == "user_456"
    assert {k: got["state"][k] for k in state} == state
    assert got["state"]["isActive"] is True
    assert got["state"]["updatedAt"].endswith("Z")
    replaced = {"language": "hi"}
    await ok(await client.post(f"{API}/user_456/state", json=replaced))
    got = await ok(await client.get(f"{API}/user_456/state"))
    assert "conversationContext" not in got["state"] and got["state"]["language"] == "hi"


async def test_history_cap_keeps_newest_100_in_order(client: Client) -> None:
    for i in range(130):
        await ok(
            await client.post(
                f"{API}/u1/history",
                json={"role": "user" if i % 2 else "assistant", "content": f"message {i}"},
            )
        )
    profile = (await ok(await client.get(f"{API}/u1/profile")))["profile"]
    contents = [m["content"] for m in profile["conversationHistory"]]
    assert contents == [f"message {i}" for i in range(30, 130)]
    assert profile["historyLength"] == 100
    stamps = [m["timestamp"] for m in profile["conversationHistory"]]
    assert stamps == sorted(stamps)
    assert profile["createdAt"] <= stamps[0] and profile["lastUpdated"] == stamps[-1]


async def test_profile_preferences_follow_state(client: Client) -> None:
    await ok(
        await client.post(
            f"{API}/u1/state", json={"language": "hi", "preferences": {"voiceSpeed": 1.0}}
        )
    )
    await ok(await client.post(f"{API}/u1/history", json={"role": "user", "content": "hi"}))
    profile = (await ok(await client.get(f"{API}/u1/profile")))["profile"]
    assert profile["preferences"] == {"voiceSpeed": 1.0, "language": "hi"}


async def test_concurrent_appends_lose_nothing_and_survive_restart(
    aiohttp_client: Callable[..., Any], settings: Settings
) -> None:
    first = await aiohttp_client(create_app(settings))
    sent = [f"turn {i}" for i in range(60)]
    replies = await asyncio.gather(
        *(first.post(f"{API}/u1/history", json={"role": "user", "content": c}) for c in sent)
    )
    assert [r.status for r in replies] == [200] * 60
    profile = (await ok(await first.get(f"{API}/u1/profile")))["profile"]
    assert sorted(m["content"] for m in profile["conversationHistory"]) == sorted(sent)
    await first.close()  # flushes on shutdown

    second = await aiohttp_client(create_app(settings))
    profile = (await ok(await second.get(f"{API}/u1/profile")))["profile"]
    assert sorted(m["content"] for m in profile["conversationHistory"]) == sorted(sent)


async def test_everything_survives_a_restart(
    aiohttp_client: Callable[..., Any], settings: Settings
) -> None:
    first = await aiohttp_client(create_app(settings))
    await ok(await first.post(f"{API}/u1/state", json={"language": "en"}))
    await ok(await first.post(f"{API}/u1/history", json={"role": "user", "content": "hello"}))
    await ok(await first.post(f"{API}/create", json={"sessionId": "s1", "userId": "u1"}), 201)
    await ok(await first.post(f"{API}/create", json={"sessionId": "s2", "userId": "u1"}), 201)
    await ok(await first.put(f"{API}/s2/end"))
    await first.close()

    second = await aiohttp_client(create_app(settings))
    assert (await ok(await second.get(f"{API}/u1/state")))["state"]["language"] == "en"
    history = (await ok(await second.get(f"{API}/u1/profile")))["profile"]["conversationHistory"]
    assert [m["content"] for m in history] == ["hello"]
    assert (await ok(await second.get(f"{API}/s1")))["session"]["isActive"] is True
    ended = (await ok(await second.get(f"{API}/s2")))["session"]
    assert ended["isActive"] is False and ended["endedAt"] >= ended["createdAt"]
    active = await ok(await second.get(f"{API}/user/u1/active"))
    assert [s["id"] for s in active["sessions"]] == ["s1"]


async def test_session_lifecycle(client: Client) -> None:
    created = await ok(
        await client.post(
            f"{API}/create",
            json={
                "sessionId": "session_123",
                "userId": "user_456",
                "language": "en",
                "metadata": {"platform": "web", "deviceId": "device_789"},
            },
        ),
        201,
    )
    assert created["sessionId"] == "session_123" and created["userId"] == "user_456"
    assert created["language"] == "en" and created["metadata"]["deviceId"] == "device_789"
    again = await ok(
        await client.post(
            f"{API}/create",
            json={"sessionId": "session_123", "userId": "user_456", "language": "hi"},
        ),
        200,
    )
    assert again["language"] == "hi" and again["metadata"]["platform"] == "web"

    generated = await ok(await client.post(f"{API}/create", json={"userId": "user_456"}), 201)
    assert generated["sessionId"] and generated["sessionId"] != "session_123"

    session = (await ok(await client.get(f"{API}/session_123")))["session"]
    assert session["id"] == "session_123" and session["userId"] == "user_456"
    assert session["language"] == "hi" and session["isActive"] is True

    # A second session becomes the newest by lastActivity: listed first.
    await ok(
        await client.post(f"{API}/create", json={"sessionId": "session_123", "userId": "user_456"})
    )
    active = await ok(await client.get(f"{API}/user/user_456/active"))
    assert active["count"] == 2
    assert [s["id"] for s in active["sessions"]] == ["session_123", generated["sessionId"]]

    ended = await ok(await client.put(f"{API}/session_123/end"))
    assert ended["sessionId"] == "session_123" and ended["endedAt"]
    session = (await ok(await client.get(f"{API}/session_123")))["session"]
    assert session["isActive"] is False and session["endedAt"] == ended["endedAt"]
    active = await ok(await client.get(f"{API}/user/user_456/active"))
    assert [s["id"] for s in active["sessions"]] == [generated["sessionId"]]


async def test_session_belongs_to_one_user(client: Client) -> None:
    await ok(await client.post(f"{API}/create", json={"sessionId": "s1", "userId": "a"}), 201)
    await failed(await client.post(f"{API}/create", json={"sessionId": "s1", "userId": "b"}), 409)
    assert (await ok(await client.get(f"{API}/s1")))["session"]["userId"] == "a"


async def test_refresh_wipes_the_user_and_nobody_else(client: Client) -> None:
    for user in ("u1", "u2"):
        await ok(await client.post(f"{API}/{user}/state", json={"language": "en"}))
        await ok(await client.post(f"{API}/{user}/history", json={"role": "user", "content": "x"}))
        await ok(
            await client.post(f"{API}/create", json={"sessionId": f"{user}-a", "userId": user}), 201
        )
    await ok(await client.post(f"{API}/create", json={"sessionId": "u1-b", "userId": "u1"}), 201)
    body = await ok(await client.post(f"{API}/refresh", json={"userId": "u1"}))
    assert body["message"] == "User data cleared successfully" and body["userId"] == "u1"
    assert body["cleared"] == {
        "userState": True,
        "userProfile": True,
        "sessions": 2,
        "interruptions": 0,
        "snapshots": 0,
    }
    await failed(await client.get(f"{API}/u1/state"), 404)
    await failed(await client.get(f"{API}/u1/profile"), 404)
    await failed(await client.get(f"{API}/u1-a"), 404)
    assert (await ok(await client.get(f"{API}/user/u1/active")))["count"] == 0
    assert (await ok(await client.get(f"{API}/u2/state")))["state"]["language"] == "en"
    assert (await ok(await client.get(f"{API}/u2-a")))["session"]["isActive"] is True
    again = await ok(await client.post(f"{API}/refresh", json={"userId": "u1"}))
    assert again["cleared"] == {
        "userState": False,
        "userProfile": False,
        "sessions": 0,
        "interruptions": 0,
        "snapshots": 0,
    }


async def test_rendered_reads_follow_every_change_and_forget_a_wiped_user(
    client: Client,
) -> None:
    """Cached reads answer with the body rendered for the record the service holds: the same
    bytes while it is unchanged, a new body after any change, nothing kept after a wipe."""
    rendered = client.app[RENDERED]
    await ok(await client.post(f"{API}/u1/state", json={"language": "en"}))
    await ok(await client.post(f"{API}/u1/history", json={"role": "user", "content": "first"}))

    async def body(path: str) -> bytes:
        response = await client.get(f"{API}/u1/{path}")
        assert response.status == 200
        return await response.read()

    state, profile = await body("state"), await body("profile")
    assert await body("state") == state and await body("profile") == profile
    assert len(rendered) == 2

    await ok(await client.post(f"{API}/u1/state", json={"language": "hi", "mood": "calm"}))
    assert json.loads(await body("state"))["state"]["mood"] == "calm"
    # the profile's preferences come from the state: its body follows the state too
    assert json.loads(await body("profile"))["profile"]["preferences"] == {"language": "hi"}
    await ok(await client.post(f"{API}/u1/history", json={"role": "assistant", "content": "2nd"}))
    history = json.loads(await body("profile"))["profile"]["conversationHistory"]
    assert [m["content"] for m in history] == ["first", "2nd"]
    writer = client.app[SERVICE].writer

    async def flushed() -> bool:
        return writer.stats().entries == 0

    await wait_for(flushed, within=10)
    # stored: the profile now comes from the cache, unchanged
    assert json.loads(await body("profile"))["profile"]["conversationHistory"] == history

    await ok(await client.post(f"{API}/refresh", json={"userId": "u1"}))
    await failed(await client.get(f"{API}/u1/profile"), 404)
    gc.collect()
    assert len(rendered) == 0


async def test_delete_session(client: Client) -> None:
    await ok(await client.post(f"{API}/create", json={"sessionId": "s1", "userId": "u1"}), 201)
    body = await ok(await client.delete(f"{API}/s1"))
    assert body == {
        "success": True,
        "message": "Session cleared successfully",
        "sessionId": "s1",
        "cleared": {"session": True, "interruptions": 0},
    }
    await failed(await client.get(f"{API}/s1"), 404)
    await failed(await client.delete(f"{API}/s1"), 404)


async def test_unknown_things_are_404(client: Client) -> None:
    await failed(await client.get(f"{API}/nobody/state"), 404)
    await failed(await client.get(f"{API}/nobody/profile"), 404)
    await failed(await client.get(f"{API}/no-such-session"), 404)
    await failed(await client.put(f"{API}/no-such-session/end"), 404)
    await failed(await client.delete(f"{API}/no-such-session"), 404)
    await failed(await client.get("/api/nowhere"), 404)


async def test_api_words_are_never_ids(client: Client) -> None:
    stats = await ok(await client.get(f"{API}/stats"))
    assert "activeSessions" in stats["stats"]
    for word in ("stats", "create", "refresh", "user"):
        error = await failed(
            await client.post(f"{API}/create", json={"sessionId": word, "userId": "u1"}), 400
        )
        assert "reserved" in error
    refused = await client.delete(f"{API}/stats")
    await failed(refused, 405)
    assert refused.headers["Allow"].split(",") == ["GET", "HEAD"]
    await failed(await client.put(f"{API}/create/end"), 404)
    refused = await client.get(f"{API}/refresh")
    await failed(refused, 405)
    assert refused.headers["Allow"] == "POST"
    # ... while a user may well be called "stats" or "user"
    await ok(await client.post(f"{API}/stats/state", json={"a": 1}))
    await ok(await client.post(f"{API}/user/history", json={"role": "user", "content": "x"}))
    assert (await ok(await client.get(f"{API}/user/profile")))["profile"]["historyLength"] == 1


async def test_stats_count_through_firestore(client: Client, settings: Settings) -> None:
    await ok(await client.post(f"{API}/create", json={"sessionId": "a1", "userId": "a"}), 201)
    await ok(await client.post(f"{API}/create", json={"sessionId": "a2", "userId": "a"}), 201)
    await ok(await client.post(f"{API}/create", json={"sessionId": "b1", "userId": "b"}), 201)
    await ok(await client.post(f"{API}/a/history", json={"role": "user", "content": "x"}))
    await ok(await client.put(f"{API}/b1/end"))
    expected = {"activeUsers": 1, "activeSessions": 2, "totalProfiles": 1, "totalInterruptions": 0}
    stats: dict[str, Any] = {}
    for _ in range(100):  # write-behind + cached counts: converge within a few seconds
        stats = (await ok(await client.get(f"{API}/stats")))["stats"]
        if {k: stats[k] for k in expected} == expected:
            break
        await asyncio.sleep(0.1)
    assert {k: stats[k] for k in expected} == expected
    assert stats["firestoreReachable"] is True
    assert stats["backlog"] == {"entries": 0, "bytes": 0, "oldestAgeSeconds": 0.0}


async def test_stats_polling_is_served_from_cache(client: Client, settings: Settings) -> None:
    svc = client.app[SERVICE]
    calls = 0
    real = svc.store.counts

    async def counting(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        return await real(*args)

    svc.store.counts = counting  # type: ignore[method-assign]
    results = await asyncio.gather(*(client.get(f"{API}/stats") for _ in range(50)))
    assert all(r.status == 200 for r in results)
    assert calls == 1


async def test_durable_write_is_in_firestore_when_acknowledged(
    client: Client, settings: Settings
) -> None:
    body = await ok(
        await client.post(
            f"{API}/u1/history?durable=true", json={"role": "user", "content": "keep me"}
        )
    )
    assert body["durable"] is True
    body = await ok(
        await client.post(f"{API}/u1/state", json={"a": 1}, headers={"X-Samvad-Durable": "true"})
    )
    assert body["durable"] is True
    store = FirestoreStore.connect(settings.project)
    try:
        profile = await store.get_profile("u1", 100)
        state = await store.get_state("u1")
    finally:
        await store.close()
    assert profile is not None and [m.content for m in profile.messages] == ["keep me"]
    assert state is not None and state.data == {"a": 1}


BAD_BODIES: list[tuple[str, str, bytes, int]] = [
    ("POST", "/u1/history", b"{not json", 400),
    ("POST", "/u1/history", b"", 400),
    ("POST", "/u1/history", b"[1, 2]", 400),
    ("POST", "/u1/history", b'"text"', 400),
    ("POST", "/u1/history", b"NaN", 400),
    ("POST", "/u1/history", b'{"role": "user"}', 400),
    ("POST", "/u1/history", b'{"content": "x"}', 400),
    ("POST", "/u1/history", b'{"role": "robot", "content": "x"}', 400),
    ("POST", "/u1/history", b'{"role": "user", "content": ""}', 400),
    ("POST", "/u1/history", b'{"role": "user", "content": "   "}', 400),
    ("POST", "/u1/history", b'{"role": "user", "content": 42}', 400),
    ("POST", "/u1/history", b'{"role": "user", "content": "x", "extra": 1}', 400),
    ("POST", "/u1/history", b'{"role": "user", "content": "x", "n": Infinity}', 400),
    ("POST", "/u1/state", b"[]", 400),
    ("POST", "/u1/state", b"null", 400),
    ("POST", "/u1/state", b'{"a": ' * 40 + b"1" + b"}" * 40, 400),
    ("POST", "/u1/state", b"\xff\xfe", 400),
    # valid JSON, but a lone surrogate is no text: it could be stored, never answered
    ("POST", "/u1/state", b'{"language": "\\udc00"}', 400),
    ("POST", "/u1/state", b'{"\\ud800": 1}', 400),
    ("POST", "/create", b'{"userId": "u1", "metadata": {"n": ["\\ud83d"]}}', 400),
    ("POST", "/create", b'{"sessionId": "s1"}', 400),
    ("POST", "/create", b'{"userId": 5}', 400),
    ("POST", "/create", b'{"userId": "u1", "metadata": [1]}', 400),
    ("POST", "/create", b'{"userId": "u1", "sessionId": ".."}', 400),
    ("POST", "/create", b'{"userId": "a/b"}', 400),
    ("POST", "/create", b'{"userId": "__x__"}', 400),
    ("POST", "/refresh", b"{}", 400),
    ("POST", "/refresh", b'{"userId": "."}', 400),
    ("POST", "/refresh", b'{"userId": null}', 400),
]


@pytest.mark.parametrize(("method", "path", "payload", "status"), BAD_BODIES)
async def test_bad_input_is_a_clear_json_error(
    client: Client, method: str, path: str, payload: bytes, status: int
) -> None:
    await ok(await client.post(f"{API}/u1/state", json={"keep": "me"}))
    response = await client.request(
        method, API + path, data=payload, headers={"Content-Type": "application/json"}
    )
    error = await failed(response, status)
    assert "Traceback" not in error
    # nothing stored was touched by the bad request
    assert (await ok(await client.get(f"{API}/u1/state")))["state"]["keep"] == "me"


async def test_size_limits_are_413(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings]
) -> None:
    client = await aiohttp_client(
        create_app(make_settings(max_message_bytes=1000, max_body_bytes=64 * 1024))
    )
    await failed(
        await client.post(f"{API}/u1/history", json={"role": "user", "content": "x" * 1001}), 413
    )
    await ok(await client.post(f"{API}/u1/history", json={"role": "user", "content": "é" * 500}))
    await failed(
        await client.post(f"{API}/u1/history", json={"role": "user", "content": "é" * 501}), 413
    )
    await failed(await client.post(f"{API}/u1/state", data=json.dumps({"big": "x" * 70_000})), 413)
    profile = (await ok(await client.get(f"{API}/u1/profile")))["profile"]
    assert profile["historyLength"] == 1


@pytest.mark.parametrize("bad", ["__x__", "__" + "a" * 10 + "__", "x" * 1501, "é" * 751])
async def test_bad_ids_in_paths_are_400(client: Client, bad: str) -> None:
    await failed(await client.get(f"{API}/{bad}/state"), 400)
    await failed(
        await client.post(f"{API}/{bad}/history", json={"role": "user", "content": "x"}), 400
    )
    await failed(await client.get(f"{API}/{bad}"), 400)


async def test_encoded_slash_in_a_path_id_is_400(client: Client) -> None:
    await failed(await client.get(f"{API}/a%2Fb/state"), 400)


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "__id__", "x" * 1500, 7, None])
def test_id_rules(bad: Any) -> None:
    with pytest.raises(InvalidId):
        check_id("userId", bad)


@pytest.mark.parametrize("good", ["user_456", "x" * 1499, "ünïcode", "a.b", "_x_", "__x"])
def test_valid_ids(good: str) -> None:
    assert check_id("userId", good) == good


async def test_large_appends_land_whatever_the_flush_rounds(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings]
) -> None:
    """29 messages of 60 KiB stored, then 71 more held for the shutdown flush: one commit
    cannot carry them (the emulator, like gRPC's default, takes 4 MiB a message), so they
    must land in slices, each with the profile's inline tail."""
    settings = make_settings(flush_delay=60, flush_interval=60)
    first = await aiohttp_client(create_app(settings))
    sent = [f"{i:03d}" + "x" * (60 * 1024 - 3) for i in range(100)]
    for i, text in enumerate(sent[:29]):
        durable = "?durable=true" if i == 28 else ""  # flushes the first 29 now
        reply = await ok(
            await first.post(f"{API}/u1/history{durable}", json={"role": "user", "content": text})
        )
    assert reply["durable"] is True
    for text in sent[29:]:
        await ok(await first.post(f"{API}/u1/history", json={"role": "user", "content": text}))
    await first.close()  # the shutdown flush takes all 71 at once
    store = FirestoreStore.connect(settings.project)
    try:
        profile = await store.get_profile("u1", 100)
    finally:
        await store.close()
    assert profile is not None and [m.content for m in profile.messages] == sent
