"""Service behaviour that needs a read held in flight: a store whose reads wait on a gate."""

from __future__ import annotations

import asyncio
import time

import pytest

from samvad.config import Settings
from samvad.errors import NotFound
from samvad.service import SessionPersistenceService
from samvad.store.base import Change, UserState
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
