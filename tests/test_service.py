"""Service behaviour that needs a read held in flight: a store whose reads wait on a gate."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from samvad.clock import from_micros, iso, iso_us
from samvad.config import Settings
from samvad.errors import NotFound
from samvad.service import SessionPersistenceService, _HistoryAppends
from samvad.store.base import Change, Message, Profile, UserState
from samvad.store.memory import MemoryStore


def now() -> int:
    return int(time.time() * 1_000_000)


class GatedStore(MemoryStore):
    """Reads take their value at once and hand it back only when the gate opens."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.read_taken = asyncio.Event()

    async def get_state(self, user_id: str) -> UserState | None:
        value = await super().get_state(user_id)
        self.read_taken.set()
        await self.gate.wait()
        return value


async def test_a_change_that_overtakes_a_cold_read_is_not_cached_away() -> None:
    store = GatedStore()
    await store.put_state(UserState("u1", {"v": 1}, updated_us=now()))
    service = SessionPersistenceService(store, Settings(auth="none", sync_interval=0))
    store.gate.clear()
    cold_read = asyncio.create_task(service.get_user_state("u1"))
    await store.read_taken.wait()  # the read has taken v1 and waits
    # meanwhile another instance writes v2, and this instance's change feed reports it
    version = await store.put_state(UserState("u1", {"v": 2}, updated_us=now()))
    assert version is not None
    service.apply_change(Change("state", "u1", version))
    store.gate.set()
    assert (await cold_read).data == {"v": 1}  # read before the write: fair for that request
    assert (await service.get_user_state("u1")).data == {"v": 2}  # ...but not kept


async def test_a_remote_wipe_during_a_cold_read_is_not_undone_by_it() -> None:
    store = GatedStore()
    await store.put_state(UserState("u1", {"v": 1}, updated_us=now()))
    service = SessionPersistenceService(store, Settings(auth="none", sync_interval=0))
    store.gate.clear()
    cold_read = asyncio.create_task(service.get_user_state("u1"))
    await store.read_taken.wait()
    wiped_at = now()
    await store.wipe_user("u1", at_us=wiped_at)
    service.apply_change(Change("user_wiped", "u1", wiped_at))
    store.gate.set()
    await cold_read
    assert await store.get_state("u1") is None
    with pytest.raises(NotFound):  # not the pre-wipe state from the overtaken read
        await service.get_user_state("u1")


class GatedProfiles(MemoryStore):
    """Profile reads take their value at once and hand it back when the gate opens."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.read_taken = asyncio.Event()

    async def get_profile(self, user_id: str, cap: int) -> Profile | None:
        value = await super().get_profile(user_id, cap)
        self.read_taken.set()
        await self.gate.wait()
        return value


async def test_a_flush_of_this_instance_that_overtakes_a_cold_read_is_not_cached_away() -> None:
    """An append is pending; a read of the profile starts (and finds nothing stored yet); the
    append's flush lands while that read is in flight. The read must not leave "no profile"
    cached: the append is no longer pending, and the user would get 404s."""
    store = GatedProfiles()
    service = SessionPersistenceService(store, Settings(auth="none", sync_interval=0))
    await service.start()
    try:
        await service.append_to_user_history("u1", "user", "hello")
        cold_read = asyncio.create_task(service.get_user_profile("u1"))
        await store.read_taken.wait()  # the read took "nothing stored" and waits
        assert await service.drain()  # the append lands meanwhile
        store.gate.set()
        assert [m.content for m in (await cold_read).messages] == ["hello"]  # from pending
        profile = await service.get_user_profile("u1")
        assert [m.content for m in profile.messages] == ["hello"]
    finally:
        await service.close()


class OneAtATimeUnlessConcurrent(MemoryStore):
    """A profile read that answers only once a state read has started: a service that reads
    the two one after the other never gets its profile."""

    def __init__(self) -> None:
        super().__init__()
        self.state_read_started = asyncio.Event()

    async def get_state(self, user_id: str) -> UserState | None:
        self.state_read_started.set()
        return await super().get_state(user_id)

    async def get_profile(self, user_id: str, cap: int) -> Profile | None:
        await self.state_read_started.wait()
        return await super().get_profile(user_id, cap)


async def test_a_cold_profile_reads_its_state_at_the_same_time() -> None:
    store = OneAtATimeUnlessConcurrent()
    await store.put_state(UserState("u1", {"language": "hi"}, updated_us=now()))
    await store.append_messages("u1", [Message("m1", "user", "namaste", now())], cap=100)
    service = SessionPersistenceService(store, Settings(auth="none", sync_interval=0))
    view = await asyncio.wait_for(service.get_user_profile("u1"), 5)
    assert [m.content for m in view.messages] == ["namaste"]
    assert view.preferences == {"language": "hi"}


def test_iso_us_is_iso_of_the_datetime() -> None:
    rng = random.Random(7)
    stamps = [0, 999, 1_000_000, 1795323244645693, 4102444799999999]
    stamps += [rng.randrange(0, 4102444800000000) for _ in range(20_000)]
    for us in stamps:
        assert iso_us(us) == iso(from_micros(us)), us


def test_pending_appends_keep_the_newest_and_count_their_bytes() -> None:
    """The write-behind's byte bound counts appends without recounting: the count must
    stay the size of what is pending, in order, past the cap and out of order too."""
    appends = _HistoryAppends(cap=5)
    pending: tuple[Message, ...] | None = None
    size = 0
    stamps = [*range(1, 9), 3, 20, 4]  # in order, past the cap, then late and duplicate ones
    for n in stamps:
        message = Message(id=f"{n:017d}-i", role="user", content="é" * n, at_us=n)
        pending, size = appends.merge(pending, size, (message,))
        assert size == appends.size(pending)
    assert pending is not None
    assert [m.at_us for m in pending] == [5, 6, 7, 8, 20]
