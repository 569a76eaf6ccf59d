"""Session lifecycle, expiry, listing, snapshots, export, shared context: time is a test's clock."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp.test_utils import TestClient

from samvad.api.keys import SERVICE
from samvad.app import create_app
from samvad.config import Settings

API = "/api/session"
DAY = 86400.0
Client = TestClient  # type: ignore[type-arg]


class FakeClock:
    def __init__(self) -> None:
        self.at = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.at

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


async def start(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings], **overrides: Any
) -> tuple[Client, FakeClock]:
    clock = FakeClock()
    settings = make_settings(**overrides)
    return await aiohttp_client(create_app(settings, clock=clock)), clock


async def stats_until(client: Client, **expected: int) -> dict[str, Any]:
    """Stats are Firestore counts: they follow writes once the write-behind has flushed."""
    stats: dict[str, Any] = {}
    for _ in range(50):
        stats = (await body(await client.get(f"{API}/stats")))["stats"]
        if all(stats[k] == v for k, v in expected.items()):
            return stats
        await asyncio.sleep(0.1)
    raise AssertionError(f"stats never reached {expected}: {stats}")


async def body(response: Any, status: int = 200) -> dict[str, Any]:
    data = await response.json()
    assert response.status == status, data
    return data  # type: ignore[no-any-return]


async def create(client: Client, session_id: str, user_id: str = "u1") -> None:
    await body(
        await client.post(f"{API}/create", json={"sessionId": session_id, "userId": user_id}), 201
    )


async def test_status_moves_from_active_to_abandoned_to_archived(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings]
) -> None:
    client, clock = await start(aiohttp_client, make_settings, session_retention=60 * DAY)
    await create(client, "idle")
    await create(client, "done")
    await body(await client.put(f"{API}/done/end"))
    session = (await body(await client.get(f"{API}/idle")))["session"]
    assert (session["status"], session["isActive"]) == ("active", True)

    clock.advance(DAY - 1)
    assert (await body(await client.get(f"{API}/idle")))["session"]["status"] == "active"
    clock.advance(2)
    session = (await body(await client.get(f"{API}/idle")))["session"]
    assert (session["status"], session["isActive"]) == ("abandoned", False)
    assert session["abandonedAt"] > session["lastActivity"]
    active = await body(await client.get(f"{API}/user/u1/active"))
    assert active["count"] == 0  # the API never shows an idle session as active
    await stats_until(client, activeSessions=0, activeUsers=0)
    assert (await body(await client.get(f"{API}/done")))["session"]["status"] == "ended"

    clock.advance(7 * DAY)
    assert (await body(await client.get(f"{API}/idle")))["session"]["status"] == "archived"
    assert (await body(await client.get(f"{API}/done")))["session"]["status"] == "archived"


async def test_activity_keeps_a_session_active(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings]
) -> None:
    client, clock = await start(aiohttp_client, make_settings)
    await create(client, "s1")
    for _ in range(3):
        clock.advance(DAY - 60)
        await body(await client.patch(f"{API}/s1", json={"context": {"turn": "next"}}))
    session = (await body(await client.get(f"{API}/s1")))["session"]
    assert session["status"] == "active"
    await stats_until(client, activeSessions=1, activeUsers=1)


async def test_expired_session_is_410_and_expired_data_is_gone(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings]
) -> None:
    client, clock = await start(aiohttp_client, make_settings)
    await create(client, "s1")
    await body(await client.post(f"{API}/u1/state", json={"language": "en"}))
    await body(await client.post(f"{API}/u1/history", json={"role": "user", "content": "old"}))
    clock.advance(7 * DAY + 1)
    for method in ("GET", "DELETE"):
        assert (await body(await client.request(method, f"{API}/s1"), 410))["success"] is False
    assert (await client.put(f"{API}/s1/end")).status == 410
    assert (await body(await client.get(f"{API}/u1/state")))["state"]["language"] == "en"
    clock.advance(23 * DAY)
    await body(await client.get(f"{API}/u1/state"), 404)
    await body(await client.get(f"{API}/u1/profile"), 404)
    # writing again starts afresh: nothing expired comes back with it
    await body(await client.post(f"{API}/u1/history", json={"role": "user", "content": "new"}))
    await create(client, "s1")
    history = (await body(await client.get(f"{API}/u1/profile")))["profile"]["conversationHistory"]
    assert [m["content"] for m in history] == ["new"]


async def test_listing_pages_through_every_session_newest_first(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings]
) -> None:
    client, clock = await start(aiohttp_client, make_settings)
    for i in range(25):
        await create(client, f"s{i:02d}")
        clock.advance(1)
    await create(client, "other", user_id="u2")
    for i in (3, 7, 11):
        await body(await client.put(f"{API}/s{i:02d}/end"))
        clock.advance(1)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        url = f"{API}/user/u1/sessions?limit=10" + (f"&cursor={cursor}" if cursor else "")
        page = await body(await client.get(url))
        seen += [s["id"] for s in page["sessions"]]
        pages += 1
        cursor = page.get("nextCursor")
        if cursor is None:
            break
    assert pages == 3
    ended_first = ["s11", "s07", "s03"]  # ending is activity: they are the newest
    rest = [f"s{i:02d}" for i in reversed(range(25)) if i not in (3, 7, 11)]
    assert seen == ended_first + rest

    ended = await body(await client.get(f"{API}/user/u1/sessions?status=ended&limit=2"))
    assert [s["id"] for s in ended["sessions"]] == ["s11", "s07"]
    more = await body(
        await client.get(
            f"{API}/user/u1/sessions?status=ended&limit=2&cursor={ended['nextCursor']}"
        )
    )
    assert [s["id"] for s in more["sessions"]] == ["s03"] and "nextCursor" not in more
    for bad in ("status=sleeping", "limit=0", "limit=101", "limit=x", "cursor=%%%", "cursor=WzFd"):
        await body(await client.get(f"{API}/user/u1/sessions?{bad}"), 400)


async def test_patch_merges_metadata_and_context(client: Client) -> None:
    await body(
        await client.post(
            f"{API}/create", json={"sessionId": "s1", "userId": "u1", "metadata": {"a": 1, "b": 2}}
        ),
        201,
    )
    patched = await body(
        await client.patch(
            f"{API}/s1", json={"metadata": {"b": None, "c": 3}, "context": {"topic": "loans"}}
        )
    )
    assert patched["session"]["metadata"] == {"a": 1, "c": 3}
    assert patched["session"]["context"] == {"topic": "loans"}
    session = (await body(await client.get(f"{API}/s1")))["session"]
    assert session["metadata"] == {"a": 1, "c": 3} and session["context"] == {"topic": "loans"}
    await body(await client.patch(f"{API}/nope", json={"context": {}}), 404)
    await body(await client.patch(f"{API}/s1", json={"context": [1]}), 400)


async def test_share_sets_a_key_on_every_active_session(client: Client) -> None:
    for sid in ("a", "b", "c"):
        await create(client, sid)
    await create(client, "elsewhere", user_id="u2")
    await body(await client.put(f"{API}/c/end"))
    shared = await body(
        await client.post(f"{API}/user/u1/share", json={"key": "cart", "value": {"items": 2}})
    )
    assert sorted(shared["sessionIds"]) == ["a", "b"]
    for sid, expected in (
        ("a", {"cart": {"items": 2}}),
        ("b", {"cart": {"items": 2}}),
        ("c", {}),
        ("elsewhere", {}),
    ):
        assert (await body(await client.get(f"{API}/{sid}")))["session"]["context"] == expected
    await body(await client.post(f"{API}/user/u1/share", json={"value": 1}), 400)


async def test_participants_join_and_leave(client: Client) -> None:
    await create(client, "s1")
    svc = client.app[SERVICE]
    await svc.join_session("s1", "conn-1", device_id="phone", platform="ios")
    await svc.join_session("s1", "conn-2", platform="web")
    await svc.leave_session("s1", "conn-1")
    participants = (await body(await client.get(f"{API}/s1")))["session"]["participants"]
    assert [(p.get("deviceId"), p["platform"]) for p in participants] == [
        ("phone", "ios"),
        (None, "web"),
    ]
    assert "leftAt" in participants[0] and "leftAt" not in participants[1]
    assert participants[0]["joinedAt"] <= participants[0]["leftAt"]


async def test_snapshots_capture_restore_undo_and_cap(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings]
) -> None:
    client, clock = await start(aiohttp_client, make_settings, max_snapshots=3)
    await body(await client.post(f"{API}/u1/state", json={"step": "one"}))
    await body(await client.post(f"{API}/u1/history", json={"role": "user", "content": "first"}))
    made = await body(await client.post(f"{API}/u1/snapshots", json={"name": "before"}), 201)
    snapshot = made["snapshot"]
    assert snapshot["name"] == "before" and snapshot["size"] > 0

    await body(await client.post(f"{API}/u1/state", json={"step": "two"}))
    await body(await client.post(f"{API}/u1/history", json={"role": "user", "content": "second"}))
    restored = await body(await client.post(f"{API}/u1/snapshots/{snapshot['id']}/restore"))
    assert restored["restored"]["id"] == snapshot["id"]
    undo = restored["undoSnapshot"]
    assert (await body(await client.get(f"{API}/u1/state")))["state"]["step"] == "one"
    history = (await body(await client.get(f"{API}/u1/profile")))["profile"]["conversationHistory"]
    assert [m["content"] for m in history] == ["first"]

    await body(await client.post(f"{API}/u1/snapshots/{undo['id']}/restore"))
    assert (await body(await client.get(f"{API}/u1/state")))["state"]["step"] == "two"
    history = (await body(await client.get(f"{API}/u1/profile")))["profile"]["conversationHistory"]
    assert [m["content"] for m in history] == ["first", "second"]

    listed = await body(await client.get(f"{API}/u1/snapshots"))
    assert listed["count"] == 3  # before, its undo, the undo's undo: at the cap of 3
    clock.advance(1)
    await body(await client.post(f"{API}/u1/snapshots", json={"name": "latest"}), 201)
    listed = await body(await client.get(f"{API}/u1/snapshots"))
    names = [s["name"] for s in listed["snapshots"]]
    assert listed["count"] == 3 and names[0] == "latest" and "before" not in names

    gone = listed["snapshots"][-1]["id"]
    await body(await client.delete(f"{API}/u1/snapshots/{gone}"))
    await body(await client.delete(f"{API}/u1/snapshots/{gone}"), 404)
    await body(await client.post(f"{API}/u1/snapshots/{gone}/restore"), 404)
    await body(await client.post(f"{API}/nobody/snapshots", json={"name": "x"}), 404)

    cleared = await body(await client.post(f"{API}/refresh", json={"userId": "u1"}))
    assert cleared["cleared"]["snapshots"] == 2
    assert (await body(await client.get(f"{API}/u1/snapshots")))["count"] == 0


async def test_snapshot_of_a_large_history_round_trips(client: Client) -> None:
    sent = [f"{i:03d}" + "x" * (60 * 1024 - 3) for i in range(100)]  # 6 MB: many commits
    for text in sent:
        await body(await client.post(f"{API}/u1/history", json={"role": "user", "content": text}))
    snap = await body(await client.post(f"{API}/u1/snapshots", json={"name": "big"}), 201)
    await body(await client.post(f"{API}/refresh", json={"userId": "u2"}))
    await body(await client.post(f"{API}/u1/history", json={"role": "user", "content": "later"}))
    await body(await client.post(f"{API}/u1/snapshots/{snap['snapshot']['id']}/restore"))
    history = (await body(await client.get(f"{API}/u1/profile")))["profile"]["conversationHistory"]
    assert [m["content"] for m in history] == sent


async def test_export_holds_exactly_the_users_data(client: Client) -> None:
    for user in ("u1", "u2"):
        await body(await client.post(f"{API}/{user}/state", json={"owner": user}))
        await body(
            await client.post(f"{API}/{user}/history", json={"role": "user", "content": user})
        )
        await create(client, f"{user}-s", user_id=user)
    await create(client, "u1-t", user_id="u1")
    await body(await client.put(f"{API}/u1-t/end"))
    await body(await client.post(f"{API}/u1/snapshots", json={"name": "kept"}), 201)
    client.app[SERVICE].push_interruption("u1-s", "u1", {"heard": "half a sentence"})
    client.app[SERVICE].push_interruption("u2-s", "u2", {"heard": "not yours"})

    response = await client.get(f"{API}/u1/export")
    assert response.status == 200
    assert "attachment" in response.headers["Content-Disposition"]
    export = json.loads(await response.read())
    assert export["userId"] == "u1" and export["state"] == {"owner": "u1"}
    assert [m["content"] for m in export["history"]] == ["u1"]
    assert sorted(s["id"] for s in export["sessions"]) == ["u1-s", "u1-t"]
    assert all(s["userId"] == "u1" for s in export["sessions"])
    assert [s["name"] for s in export["snapshots"]] == ["kept"]
    assert export["snapshots"][0]["state"] == {"owner": "u1"}
    assert [m["content"] for m in export["snapshots"][0]["history"]] == ["u1"]
    assert list(export["interruptions"]) == ["u1-s"]
    assert export["interruptions"]["u1-s"][0]["heard"] == "half a sentence"
    assert "u2" not in json.dumps(export)

    empty = json.loads(await (await client.get(f"{API}/nobody/export")).read())
    assert (empty["state"], empty["history"], empty["sessions"], empty["snapshots"]) == (
        None,
        [],
        [],
        [],
    )


async def ready(ws: Any) -> dict[str, Any]:
    frame = await ws.receive_json(timeout=10)
    assert frame["type"] == "ready", frame
    return frame  # type: ignore[no-any-return]


async def next_event(ws: Any) -> dict[str, Any]:
    while True:
        frame = await ws.receive_json(timeout=10)
        if frame["type"] == "event":
            return frame  # type: ignore[no-any-return]


async def test_websocket_participants_join_and_leave(client: Client) -> None:
    phone = await client.ws_connect("/ws?userId=u1&sessionId=s1&deviceId=phone-1&platform=ios")
    await ready(phone)
    web_ = await client.ws_connect("/ws?userId=u1&sessionId=s1&platform=web")
    await ready(web_)
    await phone.close()
    participants: list[dict[str, Any]] = []
    for _ in range(50):  # the leave is recorded once the server sees the close
        participants = (await body(await client.get(f"{API}/s1")))["session"]["participants"]
        if "leftAt" in participants[0]:
            break
        await asyncio.sleep(0.1)
    assert [(p.get("deviceId"), p["platform"], p["userId"]) for p in participants] == [
        ("phone-1", "ios", "u1"),
        (None, "web", "u1"),
    ]
    assert "leftAt" in participants[0] and "leftAt" not in participants[1]
    await web_.close()


async def test_share_reaches_the_sockets_of_active_sessions(client: Client) -> None:
    first = await client.ws_connect("/ws?userId=u1&sessionId=a")
    await ready(first)
    second = await client.ws_connect("/ws?userId=u1&sessionId=b")
    await ready(second)
    shared = await body(
        await client.post(f"{API}/user/u1/share", json={"key": "cart", "value": [1, 2]})
    )
    assert sorted(shared["sessionIds"]) == ["a", "b"]
    for ws in (first, second):
        event = await next_event(ws)
        assert event["event"] == "context" and event["key"] == "cart"
        assert event["value"] == [1, 2] and event["context"] == {"cart": [1, 2]}
    await first.close()
    await second.close()
