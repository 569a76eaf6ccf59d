"""samvad.client (REST client and agent connection) and the example agent, on the emulator."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import pytest
from aiohttp.test_utils import TestClient

from samvad.client import (
    AgentConnection,
    ConnectionClosed,
    SamvadAPIError,
    SamvadClient,
    SamvadFrameError,
)
from samvad.realtime_models import (
    ContextFrame,
    MessageEvent,
    ReadyFrame,
    StateEvent,
    WipedEvent,
)

Client = TestClient  # type: ignore[type-arg]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def url(client: Client) -> str:
    return str(client.make_url("/")).rstrip("/")


@pytest.fixture
async def api(url: str) -> AsyncIterator[SamvadClient]:
    async with SamvadClient(url) as rest:
        yield rest


async def test_rest_client_covers_every_endpoint(api: SamvadClient) -> None:
    user = "उपयोगकर्ता 1?#%"  # an id that has to be quoted in a path
    assert await api.healthz() is True
    assert (await api.readyz()).ready is True

    created = await api.create_session(user, "s1", language="hi", metadata={"channel": "ivr"})
    assert created.created is True and created.session_id == "s1" and created.user_id == user
    assert (await api.create_session(user, "s1")).created is False
    session = (await api.get_session("s1")).session
    assert session.is_active and session.language == "hi" and session.metadata == {"channel": "ivr"}
    assert [s.id for s in (await api.active_sessions(user)).sessions] == ["s1"]

    assert (await api.save_state(user, {"step": 1})).user_id == user
    assert (await api.get_state(user)).state["step"] == 1
    appended = await api.append_message(user, "user", "namaste", durable=True)
    assert appended.durable is True and appended.timestamp.endswith("Z")
    profile = (await api.get_profile(user)).profile
    assert [(m.role, m.content) for m in profile.conversation_history] == [("user", "namaste")]

    pushed = await api.push_interruption("s1", heard="The rate is", content="stop", score=0.7)
    assert pushed.session_id == "s1" and pushed.interruption.heard == "The rate is"
    assert pushed.interruption.model_extra == {"score": 0.7}
    listed = await api.interruptions("s1")
    assert listed.count == 1 and listed.interruptions[0].content == "stop"
    assert (await api.stats()).stats.total_interruptions == 1

    ended = await api.end_session("s1")
    assert ended.session_id == "s1" and ended.ended_at.endswith("Z")
    assert (await api.get_session("s1")).session.is_active is False
    deleted = await api.delete_session("s1")
    assert deleted.cleared.session is True and deleted.cleared.interruptions == 1
    refreshed = await api.refresh_user(user)
    assert refreshed.cleared.user_state is True and refreshed.cleared.user_profile is True


async def test_rest_client_raises_typed_errors(api: SamvadClient) -> None:
    with pytest.raises(SamvadAPIError) as missing:
        await api.get_state("nobody")
    assert missing.value.status == 404 and missing.value.error == "no state for this user"
    with pytest.raises(SamvadAPIError) as bad_role:
        await api.append_message("u1", "robot", "x")
    assert bad_role.value.status == 400 and "role" in bad_role.value.error
    with pytest.raises(SamvadAPIError) as no_session:
        await api.push_interruption("nope", content="x")
    assert no_session.value.status == 404
    with pytest.raises(SamvadAPIError) as stamped:
        await api.push_interruption("nope", timestamp="now")
    assert stamped.value.status == 400


async def test_agent_connection_requests(url: str, api: SamvadClient) -> None:
    async with AgentConnection(url, "u1", language="ta") as conn:
        ready = conn.ready
        assert isinstance(ready, ReadyFrame)
        assert ready.user_id == "u1" and ready.resumed is False and ready.state is None
        assert conn.session_id == ready.session_id

        await conn.send_message("user", "vanakkam")
        await conn.set_state({"step": 2})
        await conn.interrupt(heard="Your balance is", content="wait", confidence=0.9)
        context = await conn.context()
        assert isinstance(context, ContextFrame)
        assert context.state == {"step": 2}
        assert [m.content for m in context.history] == ["vanakkam"]
        (item,) = context.interruptions
        assert (item.heard, item.content, item.model_extra) == (
            "Your balance is",
            "wait",
            {"confidence": 0.9},
        )
        assert isinstance(await conn.ping(), float)

        with pytest.raises(SamvadFrameError) as refused:
            await conn.send_message("robot", "x")
        assert "role" in refused.value.error
        await conn.ping()  # still open

        await conn.end()
        assert conn.close_code == 1000 and conn.closed
        with pytest.raises(ConnectionClosed):
            await conn.ping()
    session = (await api.get_session(ready.session_id)).session
    assert session.is_active is False and session.language == "ta"
    assert [m.content for m in (await api.get_profile("u1")).profile.conversation_history] == [
        "vanakkam"
    ]


async def test_agent_connection_refused_and_resumed(url: str, api: SamvadClient) -> None:
    with pytest.raises(SamvadAPIError) as refused:
        async with AgentConnection(url, "bad/id"):
            pass
    assert refused.value.status == 400

    async with AgentConnection(url, "u1") as first:
        await first.interrupt(content="hold on")
        session_id = first.ready.session_id
    # left without end(): the session waits for a reconnect
    async with AgentConnection(url, "u1", session_id=session_id) as again:
        assert again.ready.resumed is True
        assert [i.content for i in again.ready.interruptions] == ["hold on"]
        with pytest.raises(SamvadAPIError) as taken:
            async with AgentConnection(url, "u2", session_id=session_id):
                pass
        assert taken.value.status == 409


async def test_agent_events_across_devices_and_a_wipe(url: str, api: SamvadClient) -> None:
    async with AgentConnection(url, "u1") as agent, AgentConnection(url, "u1") as phone:
        await agent.send_message("assistant", "Your balance is 500")
        event = await phone.next_event()
        assert isinstance(event, MessageEvent)
        assert (event.message.role, event.message.content) == ("assistant", "Your balance is 500")

        await api.save_state("u1", {"mood": "calm"})
        for conn in (agent, phone):
            event = await conn.next_event()
            assert isinstance(event, StateEvent) and event.state == {"mood": "calm"}

        await api.refresh_user("u1")
        for conn in (agent, phone):
            assert [event async for event in conn.events()] == [WipedEvent()]
            assert conn.close_code == 4000 and conn.close_reason == "user data wiped"
        with pytest.raises(ConnectionClosed):
            await agent.send_message("user", "hello?")


def load_example() -> ModuleType:
    path = ROOT / "examples" / "voice_agent.py"
    spec = importlib.util.spec_from_file_location("voice_agent", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["voice_agent"] = module
    spec.loader.exec_module(module)
    return module


async def test_the_example_voice_agent(url: str, api: SamvadClient) -> None:
    example = load_example()
    lines: list[str] = []
    session_id = await example.run(url, "caller", say=lines.append, word_delay=0)
    transcript = "\n".join(lines)
    assert "barge-in after 9 of" in transcript
    assert "[phone] assistant: Got it, a car loan" in transcript

    history = (await api.get_profile("caller")).profile.conversation_history
    assert [m.role for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[1].content.endswith("...") and "quarter percent" not in history[1].content
    assert "car loan" in history[3].content
    assert (await api.get_state("caller")).state["topic"] == "car loan"
    (interruption,) = (await api.interruptions(session_id)).interruptions
    assert interruption.reason == "barge-in" and interruption.content == example.CORRECTION
    assert interruption.heard == history[1].content.removesuffix(" ...")
    assert (await api.get_session(session_id)).session.is_active is False
