"""The agent websocket (/ws) and the interruption endpoints, over real sockets on the emulator."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient

from samvad.api.keys import SERVICE
from samvad.api.realtime import CONNECTIONS, SEND_QUEUE_FRAMES
from samvad.app import create_app
from samvad.config import Settings
from samvad.store.firestore import FirestoreStore

Client = TestClient  # type: ignore[type-arg]
WS = aiohttp.ClientWebSocketResponse
API = "/api/session"
WAIT = 5.0  # seconds any single frame may take to arrive


async def open_ws(client: Client, **params: str) -> tuple[WS, dict[str, Any]]:
    ws = await client.ws_connect("/ws", params=params)
    ready = await ws.receive_json(timeout=WAIT)
    assert ready["type"] == "ready", ready
    return ws, ready


async def ask(ws: WS, frame: dict[str, Any]) -> dict[str, Any]:
    """Send a frame; the next frame from the server."""
    await ws.send_json(frame)
    answer: dict[str, Any] = await ws.receive_json(timeout=WAIT)
    return answer


async def still_open(ws: WS, frame_id: str = "alive") -> None:
    assert await ask(ws, {"type": "ping", "id": frame_id}) == {"type": "pong", "id": frame_id}


async def closed_with(ws: WS) -> tuple[int, str]:
    """Frames are skipped until the close: its code and reason."""
    while True:
        msg = await ws.receive(timeout=WAIT)
        if msg.type is WSMsgType.CLOSE:
            return msg.data, msg.extra
        if msg.type in (WSMsgType.CLOSED, WSMsgType.ERROR):
            raise AssertionError(f"socket ended without a close frame: {msg}")


async def eventually(check: Callable[[], Awaitable[Any]], within: float = 15.0) -> Any:
    """Poll `check` until it returns something truthy; fail after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = await check()
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"not true within {within}s (last: {result!r})")
        await asyncio.sleep(0.05)


async def session_of(client: Client, session_id: str) -> dict[str, Any]:
    response = await client.get(f"{API}/{session_id}")
    body = await response.json()
    assert response.status == 200, body
    return body["session"]  # type: ignore[no-any-return]


@pytest.fixture
async def short_grace(
    aiohttp_client: Callable[..., Awaitable[Client]], make_settings: Callable[..., Settings]
) -> Client:
    return await aiohttp_client(create_app(make_settings(ws_resume_grace=0.3)))


# ---- connecting ---------------------------------------------------------------------------------


async def test_ready_frame_of_a_new_session(client: Client) -> None:
    ws, ready = await open_ws(client, userId="u1", language="hi-IN")
    assert ready["sessionId"].startswith("session_")
    assert ready == {
        "type": "ready",
        "sessionId": ready["sessionId"],
        "userId": "u1",
        "resumed": False,
        "state": None,
        "history": [],
        "interruptions": [],
    }
    session = await session_of(client, ready["sessionId"])
    assert session["isActive"] is True
    assert session["userId"] == "u1" and session["language"] == "hi-IN"
    await ws.close()


async def test_ready_frame_carries_state_history_and_interruptions(client: Client) -> None:
    state = {"language": "en", "topic": {"name": "loans", "depth": 2}}
    assert (await client.post(f"{API}/u1/state", json=state)).status == 200
    for i in range(105):
        role = "user" if i % 2 == 0 else "assistant"
        body = {"role": role, "content": f"m{i}"}
        assert (await client.post(f"{API}/u1/history", json=body)).status == 200
    created = await client.post(f"{API}/create", json={"userId": "u1", "sessionId": "s1"})
    assert created.status == 201
    for reason in ("barge-in", "noise"):
        pushed = await client.post(f"{API}/s1/interruptions", json={"reason": reason, "n": 1})
        assert pushed.status == 201

    ws, ready = await open_ws(client, userId="u1", sessionId="s1")
    assert ready["sessionId"] == "s1" and ready["resumed"] is True
    assert ready["state"] == state
    history = ready["history"]
    assert [m["content"] for m in history] == [f"m{i}" for i in range(5, 105)]  # newest 100
    assert history[0]["role"] == "assistant" and history[0]["timestamp"].endswith("Z")
    assert [(i["reason"], i["n"]) for i in ready["interruptions"]] == [
        ("barge-in", 1),
        ("noise", 1),
    ]
    assert all(set(i) == {"reason", "n", "timestamp"} for i in ready["interruptions"])
    await ws.close()


@pytest.mark.parametrize(
    "query",
    [
        {},
        {"userId": ""},
        {"userId": "a/b"},
        {"userId": "__reserved__"},
        {"userId": "u1", "sessionId": "stats"},
        {"userId": "u1", "sessionId": "s/1"},
        {"userId": "u1", "language": "x" * 65},
    ],
)
async def test_bad_ids_are_refused_before_the_upgrade(
    client: Client, query: dict[str, str]
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/ws", params=query)
    assert refused.value.status == 400
    plain = await client.get("/ws", params=query)  # the same refusal, readable
    assert plain.status == 400 and plain.content_type == "application/json"
    body = await plain.json()
    assert body["success"] is False and body["error"]
    assert len(client.app[CONNECTIONS]) == 0


async def test_plain_get_and_foreign_session_are_refused(client: Client) -> None:
    plain = await client.get("/ws", params={"userId": "u1"})
    assert plain.status == 400
    assert "websocket" in (await plain.json())["error"]
    ws, ready = await open_ws(client, userId="owner")
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(
            "/ws", params={"userId": "intruder", "sessionId": ready["sessionId"]}
        )
    assert refused.value.status == 409
    await still_open(ws)
    await ws.close()


# ---- frames -------------------------------------------------------------------------------------


async def test_message_and_state_frames_are_acked_and_visible_over_rest(client: Client) -> None:
    ws, _ = await open_ws(client, userId="u1")
    answer = await ask(ws, {"type": "message", "id": "m1", "role": "user", "content": "namaste"})
    assert answer == {"type": "ack", "id": "m1"}
    answer = await ask(ws, {"type": "message", "id": 2, "role": "assistant", "content": "hello"})
    assert answer == {"type": "ack", "id": 2}
    answer = await ask(ws, {"type": "state", "id": "s", "state": {"step": 3, "language": "hi"}})
    assert answer == {"type": "ack", "id": "s"}

    profile = await (await client.get(f"{API}/u1/profile")).json()
    history = profile["profile"]["conversationHistory"]
    assert [(m["role"], m["content"]) for m in history] == [
        ("user", "namaste"),
        ("assistant", "hello"),
    ]
    state = (await (await client.get(f"{API}/u1/state")).json())["state"]
    assert state["step"] == 3 and state["language"] == "hi"

    context = await ask(ws, {"type": "context", "id": "c"})
    assert context["type"] == "context" and context["id"] == "c"
    assert context["state"] == {"step": 3, "language": "hi"}
    assert [m["content"] for m in context["history"]] == ["namaste", "hello"]
    assert context["interruptions"] == []
    await ws.close()


async def test_interruptions_keep_the_newest_three(client: Client) -> None:
    ws, ready = await open_ws(client, userId="u1")
    sid = ready["sessionId"]
    for i in range(5):
        frame = {"type": "interruption", "id": i, "heard": f"h{i}", "content": f"c{i}", "vad": 0.5}
        assert await ask(ws, frame) == {"type": "ack", "id": i}

    listed = await client.get(f"{API}/{sid}/interruptions")
    body = await listed.json()
    assert listed.status == 200
    assert body["success"] is True and body["sessionId"] == sid and body["count"] == 3
    items = body["interruptions"]
    assert [(i["heard"], i["content"], i["vad"]) for i in items] == [
        ("h2", "c2", 0.5),
        ("h3", "c3", 0.5),
        ("h4", "c4", 0.5),
    ]
    assert all(set(i) == {"heard", "content", "vad", "timestamp"} for i in items)
    assert items[0]["timestamp"] <= items[1]["timestamp"] <= items[2]["timestamp"]

    stats = await (await client.get(f"{API}/stats")).json()
    assert stats["stats"]["totalInterruptions"] == 3
    context = await ask(ws, {"type": "context"})
    assert context["interruptions"] == items
    await ws.close()


async def test_interruption_endpoints(client: Client) -> None:
    missing = await client.post(f"{API}/nope/interruptions", json={"content": "x"})
    assert missing.status == 404 and (await missing.json())["success"] is False
    assert (await client.get(f"{API}/nope/interruptions")).status == 404

    await client.post(f"{API}/create", json={"userId": "u1", "sessionId": "s1"})
    pushed = await client.post(
        f"{API}/s1/interruptions", json={"content": "wait", "heard": "The rate", "x": [1]}
    )
    body = await pushed.json()
    assert pushed.status == 201
    assert body["success"] is True and body["sessionId"] == "s1"
    assert body["interruption"]["content"] == "wait" and body["interruption"]["x"] == [1]
    assert body["interruption"]["timestamp"].endswith("Z")
    assert set(body["interruption"]) == {"content", "heard", "x", "timestamp"}

    for bad, status in [
        ([1, 2], 400),
        ({"timestamp": "2020-01-01T00:00:00Z"}, 400),
        ({"content": 5}, 400),
        ({"heard": "x" * (70 * 1024)}, 413),
    ]:
        refused = await client.post(f"{API}/s1/interruptions", json=bad)
        assert refused.status == status, await refused.text()
    listed = await (await client.get(f"{API}/s1/interruptions")).json()
    assert listed["count"] == 1

    deleted = await (await client.delete(f"{API}/s1")).json()
    assert deleted["cleared"]["interruptions"] == 1
    assert (await client.get(f"{API}/s1/interruptions")).status == 404
    stats = await (await client.get(f"{API}/stats")).json()
    assert stats["stats"]["totalInterruptions"] == 0


async def test_refresh_clears_interruptions(client: Client) -> None:
    ws, ready = await open_ws(client, userId="u1")
    for i in range(2):
        assert (await ask(ws, {"type": "interruption", "id": i}))["type"] == "ack"
    refreshed = await (await client.post(f"{API}/refresh", json={"userId": "u1"})).json()
    assert refreshed["cleared"]["interruptions"] == 2
    stats = await (await client.get(f"{API}/stats")).json()
    assert stats["stats"]["totalInterruptions"] == 0
    assert (await client.get(f"{API}/{ready['sessionId']}/interruptions")).status == 404
    await ws.close()


BAD_FRAMES: list[tuple[str, str | None, str]] = [
    ("not json", None, "not valid JSON"),
    ("[1, 2]", None, "JSON object"),
    ('"ping"', None, "JSON object"),
    ("NaN", None, "not valid JSON"),
    ('{"type": "state", "id": "s", "state": {"mood": "\\udc00"}}', None, "not valid JSON"),
    ('{"id": "a"}', "a", "type must be one of"),
    ('{"type": "dance", "id": "b"}', "b", "type must be one of"),
    ('{"type": 7, "id": "c"}', "c", "type must be one of"),
    ('{"type": "message", "id": "d", "role": "robot", "content": "x"}', "d", "role"),
    ('{"type": "message", "id": "e", "role": "user"}', "e", "content"),
    ('{"type": "message", "id": "f", "role": "user", "content": ""}', "f", "content"),
    ('{"type": "message", "id": "g", "role": "user", "content": "x", "extra": 1}', "g", "extra"),
    ('{"type": "state", "id": "h", "state": [1]}', "h", "state"),
    ('{"type": "interruption", "id": "i", "content": 5}', "i", "content"),
    ('{"type": "interruption", "id": "j", "timestamp": "now"}', "j", "timestamp"),
    ('{"type": "ping", "id": "k", "extra": true}', "k", "extra"),
    ('{"type": "ping", "id": 1.5}', None, "id"),
    ('{"type": "state", "id": "l", "state": ' + "[" * 40 + "]" * 40 + "}", "l", "deeper"),
    # valid frames the service refuses: its message, not a traceback
    ('{"type": "message", "id": "m", "role": "user", "content": "   "}', "m", "empty"),
]


async def test_bad_frames_get_error_frames_and_the_socket_stays_open(client: Client) -> None:
    ws, _ = await open_ws(client, userId="u1")
    for text, frame_id, fragment in BAD_FRAMES:
        answer = await ask_text(ws, text)
        assert answer["type"] == "error", (text, answer)
        assert answer["id"] == frame_id, (text, answer)
        assert fragment in answer["error"], (text, answer)
        assert "Traceback" not in answer["error"]
    await ws.send_bytes(b'{"type": "ping"}')
    answer = await ws.receive_json(timeout=WAIT)
    assert answer["type"] == "error" and "binary" in answer["error"]
    await still_open(ws)
    profile = await client.get(f"{API}/u1/profile")
    assert profile.status == 404  # none of the refused messages was appended
    await ws.close()


async def ask_text(ws: WS, text: str) -> dict[str, Any]:
    await ws.send_str(text)
    answer: dict[str, Any] = await ws.receive_json(timeout=WAIT)
    return answer


async def test_frames_over_the_limit_are_refused(
    aiohttp_client: Callable[..., Awaitable[Client]], make_settings: Callable[..., Settings]
) -> None:
    client = await aiohttp_client(create_app(make_settings(ws_max_frame_bytes=4096)))
    ws, _ = await open_ws(client, userId="u1")
    fits = {"type": "state", "id": "fits", "state": {"blob": "x" * 3900}}
    assert await ask(ws, fits) == {"type": "ack", "id": "fits"}
    over = {"type": "state", "id": "over", "state": {"blob": "x" * 4100}}
    answer = await ask(ws, over)
    assert answer["type"] == "error" and "4096 bytes" in answer["error"]
    # counted in bytes, not characters: 1400 three-byte characters are 4200 bytes
    wide = {"type": "message", "id": "wide", "role": "user", "content": "\u0905" * 1400}
    assert "4096 bytes" in (await ask_text(ws, json.dumps(wide, ensure_ascii=False)))["error"]
    await still_open(ws)
    # far over the limit aiohttp refuses to read it at all and closes with 1009
    await ws.send_str(json.dumps({"type": "state", "state": {"blob": "x" * 20_000}}))
    code, _ = await closed_with(ws)
    assert code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


# ---- ending, dropping, resuming -----------------------------------------------------------------


async def test_end_frame_ends_the_session_and_closes_its_sockets(client: Client) -> None:
    ws, ready = await open_ws(client, userId="u1")
    sid = ready["sessionId"]
    peer, peer_ready = await open_ws(client, userId="u1", sessionId=sid)
    assert peer_ready["resumed"] is True
    assert await ask(ws, {"type": "end", "id": "bye"}) == {"type": "ack", "id": "bye"}
    assert await closed_with(ws) == (1000, "session ended")
    assert await closed_with(peer) == (1000, "session ended")
    session = await session_of(client, sid)
    assert session["isActive"] is False and session["endedAt"]
    assert not client.app[CONNECTIONS].in_grace(sid)


async def test_reconnect_within_the_grace_resumes(
    aiohttp_client: Callable[..., Awaitable[Client]], make_settings: Callable[..., Settings]
) -> None:
    client = await aiohttp_client(create_app(make_settings(ws_resume_grace=30)))
    hub = client.app[CONNECTIONS]
    ws, ready = await open_ws(client, userId="u1")
    sid = ready["sessionId"]
    assert (await ask(ws, {"type": "interruption", "id": 1, "heard": "Your balance"}))["type"] == (
        "ack"
    )
    await ws.close()  # dropped, not ended
    await eventually(lambda: _true(hub.in_grace(sid)))
    assert (await session_of(client, sid))["isActive"] is True

    again, resumed = await open_ws(client, userId="u1", sessionId=sid)
    assert resumed["resumed"] is True and resumed["sessionId"] == sid
    assert [i["heard"] for i in resumed["interruptions"]] == ["Your balance"]
    assert not hub.in_grace(sid)  # the timer was cancelled by the resume
    await again.close()


async def _true(value: bool) -> bool:
    return value


async def test_a_dropped_session_ends_after_the_grace(short_grace: Client) -> None:
    client = short_grace
    hub = client.app[CONNECTIONS]
    ws, ready = await open_ws(client, userId="u1")
    sid = ready["sessionId"]
    await ws.close()

    async def ended() -> bool:
        return (await session_of(client, sid))["isActive"] is False

    await eventually(ended)
    assert not hub.in_grace(sid)
    again, ready = await open_ws(client, userId="u1", sessionId=sid)
    assert ready["resumed"] is False  # ended: a new start of the same session id
    assert (await session_of(client, sid))["isActive"] is True
    await again.close()


async def test_a_resume_cancels_the_grace_timer(short_grace: Client) -> None:
    client = short_grace
    hub = client.app[CONNECTIONS]
    ws, ready = await open_ws(client, userId="u1")
    sid = ready["sessionId"]
    await ws.close()
    await eventually(lambda: _true(hub.in_grace(sid)))
    again, resumed = await open_ws(client, userId="u1", sessionId=sid)
    assert resumed["resumed"] is True and not hub.in_grace(sid)
    await asyncio.sleep(1.0)  # well past the 0.3 s grace: nothing may end the session now
    assert (await session_of(client, sid))["isActive"] is True
    await still_open(again)
    await again.close()


async def test_the_grace_starts_when_the_last_socket_of_a_session_closes(
    short_grace: Client,
) -> None:
    client = short_grace
    hub = client.app[CONNECTIONS]
    first, ready = await open_ws(client, userId="u1")
    sid = ready["sessionId"]
    second, _ = await open_ws(client, userId="u1", sessionId=sid)
    await first.close()
    await still_open(second)  # the server has seen the first close by now
    assert not hub.in_grace(sid)
    await asyncio.sleep(1.0)  # past the grace: the open second socket keeps it active
    assert (await session_of(client, sid))["isActive"] is True
    await second.close()

    async def ended() -> bool:
        return (await session_of(client, sid))["isActive"] is False

    await eventually(ended)


async def test_heartbeats_drop_a_peer_that_stopped_answering(
    aiohttp_client: Callable[..., Awaitable[Client]], make_settings: Callable[..., Settings]
) -> None:
    client = await aiohttp_client(create_app(make_settings(ws_heartbeat=0.2)))
    hub = client.app[CONNECTIONS]
    alive = await client.ws_connect("/ws", params={"userId": "u1"})  # answers pings
    await alive.receive_json(timeout=WAIT)
    dead = await client.ws_connect("/ws", params={"userId": "u2"}, autoping=False)
    ready = await dead.receive_json(timeout=WAIT)

    async def dropped() -> bool:
        return len(hub) == 1 and hub.in_grace(ready["sessionId"])

    # aiohttp answers pings inside receive(): the live client keeps one waiting
    answer = asyncio.create_task(alive.receive_json())
    await eventually(dropped)  # dropped, not ended: it may still reconnect
    assert (await session_of(client, ready["sessionId"]))["isActive"] is True
    await alive.send_json({"type": "ping", "id": "alive"})
    assert await asyncio.wait_for(answer, WAIT) == {"type": "pong", "id": "alive"}
    await alive.close()
    await dead.close()


# ---- events across devices ----------------------------------------------------------------------


async def test_events_reach_the_users_other_sockets(client: Client) -> None:
    phone, _ = await open_ws(client, userId="u1")
    speaker, _ = await open_ws(client, userId="u1")
    stranger, _ = await open_ws(client, userId="u2")

    # a websocket append: the other socket hears it, the sender only gets its ack
    answer = await ask(phone, {"type": "message", "id": 1, "role": "user", "content": "hi"})
    assert answer == {"type": "ack", "id": 1}
    event = await speaker.receive_json(timeout=WAIT)
    assert event["type"] == "event" and event["event"] == "message"
    assert event["message"]["role"] == "user" and event["message"]["content"] == "hi"
    assert event["message"]["timestamp"].endswith("Z")
    await still_open(phone)  # the next frame is the pong: no echo of its own message

    # a REST append: every socket of the user hears it
    rest = await client.post(f"{API}/u1/history", json={"role": "assistant", "content": "yo"})
    assert rest.status == 200
    for ws in (phone, speaker):
        event = await ws.receive_json(timeout=WAIT)
        assert event["event"] == "message" and event["message"]["content"] == "yo"

    # a state change
    answer = await ask(speaker, {"type": "state", "id": 2, "state": {"volume": 7}})
    assert answer == {"type": "ack", "id": 2}
    event = await phone.receive_json(timeout=WAIT)
    assert event == {"type": "event", "event": "state", "state": {"volume": 7}}
    await client.post(f"{API}/u1/state", json={"volume": 3})
    for ws in (phone, speaker):
        assert (await ws.receive_json(timeout=WAIT))["state"] == {"volume": 3}

    await still_open(stranger)  # another user's socket heard nothing
    for ws in (phone, speaker, stranger):
        await ws.close()


async def test_a_message_appended_while_connecting_is_seen_exactly_once(client: Client) -> None:
    service = client.app[SERVICE]
    connecting = asyncio.create_task(client.ws_connect("/ws", params={"userId": "u1"}))
    # The handler listens before it reads the ready snapshot (a Firestore read for a new
    # user): append in between, as another device could.
    while service.events.listeners("u1") == 0:
        assert not connecting.done()
        await asyncio.sleep(0)
    await service.append_to_user_history("u1", "user", "while connecting")
    ws = await connecting
    ready = await ws.receive_json(timeout=WAIT)
    seen = [m["content"] for m in ready["history"]]
    await ws.send_json({"type": "ping", "id": "after"})
    while (frame := await ws.receive_json(timeout=WAIT))["type"] != "pong":
        seen.append(frame["message"]["content"])
    assert seen == ["while connecting"]  # in the history or as an event, not both
    await ws.close()


async def test_wipe_closes_the_users_sockets(client: Client) -> None:
    phone, ready = await open_ws(client, userId="u1")
    speaker, _ = await open_ws(client, userId="u1")
    stranger, _ = await open_ws(client, userId="u2")
    refreshed = await client.post(f"{API}/refresh", json={"userId": "u1"})
    assert refreshed.status == 200
    for ws in (phone, speaker):
        assert await ws.receive_json(timeout=WAIT) == {"type": "event", "event": "wiped"}
        assert await closed_with(ws) == (4000, "user data wiped")
    assert (await client.get(f"{API}/{ready['sessionId']}")).status == 404
    assert not client.app[CONNECTIONS].in_grace(ready["sessionId"])
    await still_open(stranger)
    await stranger.close()


async def test_a_reader_that_falls_a_queue_behind_is_closed(client: Client) -> None:
    slow, _ = await open_ws(client, userId="u1")
    await still_open(slow)
    service = client.app[SERVICE]
    # Appends that never yield to the loop: the socket's writer cannot send any of them
    # before the queue is full, as with a peer that stopped reading.
    for i in range(SEND_QUEUE_FRAMES + 10):
        await service.append_to_user_history("u1", "user", f"burst {i}")
    events = 0
    while True:
        msg = await slow.receive(timeout=WAIT)
        if msg.type is WSMsgType.CLOSE:
            assert msg.data == aiohttp.WSCloseCode.TRY_AGAIN_LATER
            break
        assert msg.type is WSMsgType.TEXT
        events += 1
    assert events <= SEND_QUEUE_FRAMES
    assert len(client.app[CONNECTIONS]) == 0


# ---- shutdown -----------------------------------------------------------------------------------


@pytest.fixture
async def runner(make_settings: Callable[..., Settings]) -> AsyncIterator[web.AppRunner]:
    # Nothing is flushed before the shutdown: what reaches Firestore is the shutdown's flush.
    settings = make_settings(flush_delay=600, flush_interval=600, sync_interval=0)
    app_runner = web.AppRunner(create_app(settings))
    await app_runner.setup()
    await web.TCPSite(app_runner, "127.0.0.1", 0).start()
    yield app_runner
    await app_runner.cleanup()  # a second cleanup is a no-op


async def test_shutdown_flushes_then_closes_every_socket(
    runner: web.AppRunner,
    settings: Settings,
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    host, port = runner.addresses[0][:2]
    service = runner.app[SERVICE]
    store = FirestoreStore.connect(settings.project, timeout=5.0)
    async with aiohttp.ClientSession() as http:
        url = f"http://{host}:{port}/ws"
        ws = await http.ws_connect(url, params={"userId": "u1", "sessionId": "live"})
        assert (await ws.receive_json(timeout=WAIT))["type"] == "ready"
        dropped = await http.ws_connect(url, params={"userId": "u2", "sessionId": "dropped"})
        await dropped.receive_json(timeout=WAIT)
        await dropped.close()
        for i in range(3):
            frame = {"type": "message", "id": i, "role": "user", "content": f"last words {i}"}
            assert await ask(ws, frame) == {"type": "ack", "id": i}
        assert await ask(ws, {"type": "state", "id": "s", "state": {"k": 1}}) == {
            "type": "ack",
            "id": "s",
        }
        assert await store.get_profile("u1", 100) is None  # all still pending
        hub = runner.app[CONNECTIONS]
        await eventually(lambda: _true(hub.in_grace("dropped")))

        async def watch() -> tuple[aiohttp.WSMessage, int]:
            msg = await ws.receive(timeout=WAIT * 3)
            return msg, service.writer.stats().entries  # what was unflushed at the close

        watcher = asyncio.create_task(watch())
        await runner.cleanup()
        msg, unflushed = await watcher
        assert msg.type is WSMsgType.CLOSE
        assert (msg.data, msg.extra) == (aiohttp.WSCloseCode.GOING_AWAY, "going away")
        assert unflushed == 0
        assert not hub.in_grace("dropped")

    profile = await store.get_profile("u1", 100)
    assert profile is not None
    assert [m.content for m in profile.messages] == [f"last words {i}" for i in range(3)]
    state = await store.get_state("u1")
    assert state is not None and state.data == {"k": 1}
    await store.close()

    fresh = await aiohttp_client(create_app(settings))
    history = (await (await fresh.get(f"{API}/u1/profile")).json())["profile"]
    assert len(history["conversationHistory"]) == 3
    for sid in ("live", "dropped"):  # left active for a reconnect to another instance
        assert (await session_of(fresh, sid))["isActive"] is True
