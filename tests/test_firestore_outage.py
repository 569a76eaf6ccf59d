"""How FirestoreStore reports an unreachable Firestore: as unavailability, never contention."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from samvad.errors import StoreUnavailable
from samvad.store.base import Message, UserState
from samvad.store.firestore import FirestoreStore
from tools.firestore_proxy import FirestoreProxy


@pytest.fixture
async def proxied_store(
    emulator_host: str, project_id: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[FirestoreStore, Any]]:
    proxy = FirestoreProxy(emulator_host)
    await proxy.start()
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", proxy.grpc_host)
    store = FirestoreStore.connect(project_id, timeout=2.0)
    yield store, proxy
    await store.close()
    await proxy.stop()


async def test_transactional_writes_report_an_outage_as_unavailable(
    proxied_store: tuple[FirestoreStore, Any],
) -> None:
    store, proxy = proxied_store
    message = Message(id="00000000000000001-a", role="user", content="hi", at_us=1)
    assert await store.append_messages("u1", [message], cap=100) == 1
    proxy.go_down()
    with pytest.raises(StoreUnavailable):
        await store.append_messages("u1", [message], cap=100)
    with pytest.raises(StoreUnavailable):
        await store.put_state(UserState("u1", {"a": 1}, 2))
    with pytest.raises(StoreUnavailable):
        await store.get_state("u1")
    proxy.go_up()
    assert await store.put_state(UserState("u1", {"a": 1}, 2)) == 1
