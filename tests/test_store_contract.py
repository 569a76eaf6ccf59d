"""One contract for every Store: the in-memory one and Firestore (through the real emulator)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from itertools import count

import pytest

from samvad.store.base import Message, SessionRecord, Store, UserState
from samvad.store.firestore import FirestoreStore
from samvad.store.memory import MemoryStore

_clock = count(1_750_000_000_000_000, 1000)


def stamp() -> int:
    return next(_clock)


def message(content: str, at_us: int | None = None, writer: str = "a") -> Message:
    at = at_us if at_us is not None else stamp()
    return Message(id=f"{at:017d}-{writer}", role="user", content=content, at_us=at)


def session(
    session_id: str, user_id: str, active: bool = True, at: int | None = None
) -> SessionRecord:
    at = at if at is not None else stamp()
    return SessionRecord(
        session_id=session_id,
        user_id=user_id,
        language="en",
        metadata={"platform": "web"},
        is_active=active,
        created_us=at,
        last_activity_us=at,
        ended_us=None if active else at,
        updated_us=at,
    )


@pytest.fixture(params=["memory", "firestore"])
async def store(request: pytest.FixtureRequest, project_id: str) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    request.getfixturevalue("emulator_host")
    firestore = FirestoreStore.connect(project_id)
    yield firestore
    await firestore.close()


async def test_state_round_trip_and_last_writer_wins(store: Store) -> None:
    assert await store.get_state("u1") is None
    first = UserState("u1", {"language": "en", "nested": [[1, 2], {"__x__": None}]}, stamp())
    newer = UserState("u1", {"language": "hi"}, stamp())
    v1 = await store.put_state(first)
    v2 = await store.put_state(newer)
    assert v1 == 1 and v2 == 2
    # A late flush of an older write (another instance, a retry) must not win.
    assert await store.put_state(first) is None
    stored = await store.get_state("u1")
    assert stored is not None and stored.data == {"language": "hi"} and stored.version == 2


async def test_history_keeps_newest_cap_oldest_first(store: Store) -> None:
    sent = [message(f"m{i}") for i in range(130)]
    for start in range(0, 130, 25):
        await store.append_messages("u1", sent[start : start + 25], cap=100)
    profile = await store.get_profile("u1", cap=100)
    assert profile is not None
    assert [m.content for m in profile.messages] == [f"m{i}" for i in range(30, 130)]
    assert profile.created_us == sent[0].at_us
    assert profile.updated_us == sent[-1].at_us


async def test_append_is_idempotent_and_orders_across_writers(store: Store) -> None:
    a1, b1, a2, b2 = (
        message("a1", writer="a"),
        message("b1", writer="b"),
        message("a2", writer="a"),
        message("b2", writer="b"),
    )
    # Writer a flushes a1+a2 before writer b flushes b1+b2; a retry repeats a's batch.
    await store.append_messages("u1", [a1, a2], cap=100)
    await store.append_messages("u1", [b1, b2], cap=100)
    await store.append_messages("u1", [a1, a2], cap=100)
    profile = await store.get_profile("u1", cap=100)
    assert profile is not None
    assert [m.content for m in profile.messages] == ["a1", "b1", "a2", "b2"]


async def test_concurrent_appends_lose_nothing(store: Store) -> None:
    # Three writers at once: as many instances flushing one user's history together.
    batches = [[message(f"w{w}-{i}", writer=f"w{w}") for i in range(3)] for w in range(3)]
    await asyncio.gather(*(store.append_messages("u1", b, cap=100) for b in batches))
    profile = await store.get_profile("u1", cap=100)
    assert profile is not None
    assert sorted(m.content for m in profile.messages) == sorted(
        m.content for b in batches for m in b
    )


async def test_large_history_beyond_one_document(store: Store) -> None:
    # 100 x 60 KiB is about 6 MB: far beyond Firestore's 1 MiB per document.
    big = [message(f"{i:03d}" + "x" * (60 * 1024)) for i in range(100)]
    for start in range(0, 100, 10):
        await store.append_messages("u1", big[start : start + 10], cap=100)
    profile = await store.get_profile("u1", cap=100)
    assert profile is not None
    assert [m.content[:3] for m in profile.messages] == [f"{i:03d}" for i in range(100)]
    assert all(len(m.content) == 3 + 60 * 1024 for m in profile.messages)
    # and trimming still works once the cap is passed
    more = [message(f"n{i}") for i in range(5)]
    await store.append_messages("u1", more, cap=100)
    profile = await store.get_profile("u1", cap=100)
    assert profile is not None
    assert [m.content[:3] for m in profile.messages[:2]] == ["005", "006"]
    assert [m.content for m in profile.messages[-5:]] == [f"n{i}" for i in range(5)]


async def test_sessions_upsert_keeps_first_creation_and_lists_active(store: Store) -> None:
    created = session("s1", "u1")
    await store.put_session(created)
    later = session("s1", "u1")
    await store.put_session(later)
    await store.put_session(session("s2", "u1"))
    await store.put_session(session("s3", "u2"))
    await store.put_session(session("s4", "u1", active=False))
    got = await store.get_session("s1")
    assert got is not None
    assert got.created_us == created.created_us
    assert got.last_activity_us == later.last_activity_us
    assert got.metadata == {"platform": "web"}
    assert sorted(s.session_id for s in await store.active_sessions("u1")) == ["s1", "s2"]
    counts = await store.counts(stamp(), 0)
    assert (counts.active_sessions, counts.active_users) == (3, 2)


async def test_a_session_never_moves_to_another_user(store: Store) -> None:
    await store.put_session(session("s1", "u1"))
    assert await store.put_session(session("s1", "intruder")) is None
    got = await store.get_session("s1")
    assert got is not None and got.user_id == "u1"


async def test_ending_a_session_updates_active_counts(store: Store) -> None:
    await store.put_session(session("s1", "u1"))
    await store.put_session(session("s2", "u1"))
    await store.put_session(session("s1", "u1", active=False))
    counts = await store.counts(stamp(), 0)
    assert (counts.active_sessions, counts.active_users) == (1, 1)
    await store.put_session(session("s2", "u1", active=False))
    counts = await store.counts(stamp(), 0)
    assert (counts.active_sessions, counts.active_users) == (0, 0)


async def test_wipe_is_final_against_late_writes(store: Store) -> None:
    before = stamp()
    await store.put_state(UserState("u1", {"a": 1}, before))
    await store.append_messages("u1", [message("old")], cap=100)
    await store.put_session(session("s1", "u1"))
    await store.append_messages("u2", [message("other user")], cap=100)
    pending_elsewhere = message("acknowledged before the wipe, flushed after it")
    late_state = UserState("u1", {"late": True}, stamp())
    late_session = session("s9", "u1")
    wiped_at = stamp()
    report = await store.wipe_user("u1", wiped_at)
    assert report.user_state and report.user_profile and report.session_ids == ["s1"]
    # Writes stamped before the wipe arrive late (another instance's backlog): all dropped.
    assert await store.append_messages("u1", [pending_elsewhere], cap=100) is None
    assert await store.put_state(late_state) is None
    assert await store.put_session(late_session) is None
    assert await store.get_state("u1") is None
    assert await store.get_profile("u1", cap=100) is None
    assert await store.get_session("s1") is None and await store.get_session("s9") is None
    counts = await store.counts(stamp(), 0)
    assert (counts.active_sessions, counts.active_users, counts.profiles) == (0, 0, 1)
    # What is written after the wipe is a fresh start.
    await store.append_messages("u1", [message("new")], cap=100)
    profile = await store.get_profile("u1", cap=100)
    assert profile is not None and [m.content for m in profile.messages] == ["new"]


async def test_delete_session_is_final(store: Store) -> None:
    await store.put_session(session("s1", "u1"))
    stale = session("s1", "u1")
    removed = await store.delete_session("s1", stamp())
    assert removed is not None and removed.session_id == "s1"
    assert await store.put_session(stale) is None
    assert await store.get_session("s1") is None
    assert (await store.counts(stamp(), 0)).active_sessions == 0
    assert await store.delete_session("missing", stamp()) is None


async def test_change_feed_reports_other_writers(store: Store) -> None:
    start = await store.changes_since(None)
    await store.put_state(UserState("u1", {"a": 1}, stamp()))
    await store.append_messages("u1", [message("hi")], cap=100)
    await store.put_session(session("s1", "u1"))
    await store.delete_session("s1", stamp())
    wipe_at = stamp()
    await store.wipe_user("u2", wipe_at)
    batch = await store.changes_since(start.cursor)
    seen = {(c.kind, c.key) for c in batch.changes}
    assert {
        ("state", "u1"),
        ("profile", "u1"),
        ("session_deleted", "s1"),
        ("user_wiped", "u2"),
    } <= seen
    wipes = [c for c in batch.changes if c.kind == "user_wiped"]
    assert wipes[0].version == wipe_at
    versions = {c.key: c.version for c in batch.changes if c.kind == "state"}
    assert versions["u1"] == 1


async def test_expired_data_does_not_return_with_a_new_write(store: Store) -> None:
    month = 31 * 86400 * 1_000_000  # past the default 30-day profile, 7-day session retention
    old = stamp()
    await store.append_messages("u1", [message("old", at_us=old)], cap=100)
    await store.put_session(session("s1", "u1", at=old))
    later = old + month
    await store.append_messages("u1", [message("new", at_us=later)], cap=100)
    revived = session("s1", "u1", at=later)
    await store.put_session(revived)
    profile = await store.get_profile("u1", cap=100)
    assert profile is not None and [m.content for m in profile.messages] == ["new"]
    assert profile.created_us == later
    got = await store.get_session("s1")
    assert got is not None and got.created_us == later
