"""How FirestoreStore lays a history out in documents: messages as JSON text, not indexed,
documents of the layout before it (arrays of maps) still read and written over cleanly, and
every document within Firestore's 1 MiB and every commit within what it always carried,
whatever characters the messages hold."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from itertools import count
from pathlib import Path
from typing import Any

import orjson
import pytest
from google.cloud.firestore_v1 import SERVER_TIMESTAMP, AsyncClient
from google.cloud.firestore_v1.base_query import FieldFilter

from samvad.clock import from_micros
from samvad.service import FLUSH_SLICE_BYTES
from samvad.store.base import CHUNK_BUDGET, TAIL_BUDGET, Message, Snapshot, SnapshotInfo
from samvad.store.firestore import (
    FirestoreStore,
    _chunk_doc,
    _encode_messages,
    _HistoryLayout,
)

INDEXES = Path(__file__).resolve().parent.parent / "deploy" / "firestore.indexes.json"
MAX_DOCUMENT = 1024 * 1024
NEW_LAYOUT = {"user_profiles": "tailJson", "history": "messagesJson", "parts": "messagesJson"}
OLD_LAYOUT = {"user_profiles": "tail", "history": "messages", "parts": "messages"}
# What the store needs to read back exactly, in either layout.
AWKWARD = [
    "namaste 🙏 नमस्ते",
    'she said "yes" \\ or \\"no\\"',
    "two\nlines\tand a tab\r\n",
    "\x00\x01\x1f\x7f control",
    "plain",
    "\u2028 line separator </script>",
]

_clock = count(int(time.time() * 1e6) - 3_600_000_000, 1000)


def message(content: str) -> Message:
    at = next(_clock)
    return Message(id=f"{at:017d}-a", role="user", content=content, at_us=at)


def as_map(m: Message) -> dict[str, Any]:
    """A message as the store wrote it before JSON text."""
    return {"id": m.id, "role": m.role, "content": m.content, "timestamp": from_micros(m.at_us)}


def value_size(value: Any) -> int:
    """Firestore's storage size of a value (cloud.google.com/firestore/docs/storage-size)."""
    if isinstance(value, str):
        return len(value.encode()) + 1
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, list):
        return sum(value_size(v) for v in value)
    if isinstance(value, dict):
        return sum(value_size(k) + value_size(v) for k, v in value.items())
    if value is None or isinstance(value, bool):
        return 1
    assert isinstance(value, int | float | datetime), type(value)
    return 8


def document_size(path: str, fields: dict[str, Any]) -> int:
    name = sum(value_size(part) for part in path.split("/")) + 16
    return name + value_size(fields) + 32


@pytest.fixture
async def db(emulator_host: str, project_id: str) -> AsyncIterator[AsyncClient]:
    client = AsyncClient(project=project_id)
    yield client
    client.close()  # type: ignore[no-untyped-call]


@pytest.fixture
def store(db: AsyncClient) -> FirestoreStore:
    return FirestoreStore(db)


async def history_documents(db: AsyncClient, user_id: str) -> dict[str, dict[str, Any]]:
    """The raw documents of a user's history and snapshots, by path."""
    profile = db.collection("user_profiles").document(user_id)
    refs = [profile, *[r async for r in profile.collection("history").list_documents()]]
    by_user = FieldFilter("userId", "==", user_id)
    async for snapshot in db.collection("snapshots").where(filter=by_user).stream():
        refs.append(snapshot.reference)
        refs.extend([r async for r in snapshot.reference.collection("parts").list_documents()])
    found = {}
    async for snap in db.get_all(refs):
        if snap.exists:
            found[snap.reference.path] = snap.to_dict() or {}
    return found


def stored_messages(group: str, doc: dict[str, Any]) -> list[str]:
    """The contents of a document's messages, in whichever layout it has."""
    if NEW_LAYOUT[group] in doc:
        return [m["content"] for m in orjson.loads(doc[NEW_LAYOUT[group]])]
    return [m["content"] for m in doc.get(OLD_LAYOUT[group], [])]


async def test_an_old_layout_history_is_read_appended_to_and_trimmed(
    db: AsyncClient, store: FirestoreStore
) -> None:
    old = [message(text) for text in AWKWARD]
    chunked, inline = old[:3], old[3:]
    profile_ref = db.collection("user_profiles").document("u1")
    chunk_ref = profile_ref.collection("history").document("0000000000")
    expire_at = from_micros(old[-1].at_us) + timedelta(days=30)
    await chunk_ref.set(
        {
            "messages": [as_map(m) for m in chunked],
            "count": len(chunked),
            "minId": chunked[0].id,
            "maxId": chunked[-1].id,
            "expireAt": expire_at,
        }
    )
    await profile_ref.set(
        {
            "userId": "u1",
            "createdAt": from_micros(old[0].at_us),
            "lastUpdated": from_micros(old[-1].at_us),
            "expireAt": expire_at,
            "resetAt": None,
            "version": 7,
            "committedAt": SERVER_TIMESTAMP,
            "tail": [as_map(m) for m in inline],
            "chunks": [
                {
                    "id": "0000000000",
                    "count": len(chunked),
                    "minId": chunked[0].id,
                    "maxId": chunked[-1].id,
                    "bytes": sum(m.nbytes for m in chunked),
                    "expireAt": expire_at,
                }
            ],
            "nextChunk": 1,
        }
    )

    profile = await store.get_profile("u1", cap=100)
    assert profile is not None
    assert list(profile.messages) == old and profile.version == 7

    newer = [message(f"new {i}") for i in range(3)]
    # A retried flush repeats a message stored in the old layout: merged by id, not doubled.
    assert await store.append_messages("u1", [old[-1], *newer], cap=100) == 8
    profile = await store.get_profile("u1", cap=100)
    assert profile is not None
    assert list(profile.messages) == [*old, *newer]
    assert profile.created_us == old[0].at_us and profile.updated_us == newer[-1].at_us

    raw = (await profile_ref.get()).to_dict() or {}
    assert "tail" not in raw, "the profile is written whole: no old tail left behind"
    assert stored_messages("user_profiles", raw) == [m.content for m in [*inline, *newer]]
    assert [c["id"] for c in raw["chunks"]] == ["0000000000"]
    assert stored_messages("history", (await chunk_ref.get()).to_dict() or {}) == AWKWARD[:3]

    # The cap trims across both layouts: the old chunk goes once it is provably older.
    assert await store.append_messages("u1", [message("last")], cap=4) == 9
    profile = await store.get_profile("u1", cap=4)
    assert profile is not None
    assert [m.content for m in profile.messages] == ["new 0", "new 1", "new 2", "last"]
    assert not (await chunk_ref.get()).exists


async def test_an_old_layout_snapshot_is_read(db: AsyncClient, store: FirestoreStore) -> None:
    messages = [message(text) for text in AWKWARD]
    created = from_micros(messages[-1].at_us)
    ref = db.collection("snapshots").document("snap-1")
    await (
        ref.collection("parts")
        .document("000000")
        .set(
            {
                "messages": [as_map(m) for m in messages],
                "count": len(messages),
                "minId": messages[0].id,
                "maxId": messages[-1].id,
                "expireAt": created + timedelta(days=30),
            }
        )
    )
    await ref.set(
        {
            "snapshotId": "snap-1",
            "userId": "u1",
            "name": "before the move",
            "createdAt": created,
            "size": 100,
            "stateJson": '{"language":"hi"}',
            "parts": 1,
            "expireAt": created + timedelta(days=30),
        }
    )
    snapshot = await store.get_snapshot("u1", "snap-1")
    assert snapshot is not None
    assert list(snapshot.messages) == messages and snapshot.state == {"language": "hi"}


async def test_messages_are_stored_as_json_text_that_is_not_indexed(
    db: AsyncClient, store: FirestoreStore
) -> None:
    big = [message(f"{i:03d}" + "x" * (60 * 1024)) for i in range(12)]  # spills: 720 KiB
    small = [message(text) for text in AWKWARD]
    await store.append_messages("u1", big, cap=100)
    await store.append_messages("u1", small, cap=100)
    info = SnapshotInfo("snap-1", "u1", "s", next(_clock), 1)
    await store.put_snapshot(Snapshot(info, None, (*big, *small)), keep=5)

    docs = await history_documents(db, "u1")
    groups = {path: path.split("/")[-2] for path in docs}
    assert sorted(set(groups.values())) == ["history", "parts", "snapshots", "user_profiles"]
    for path, doc in docs.items():
        group = groups[path]
        if group in OLD_LAYOUT:
            assert OLD_LAYOUT[group] not in doc and isinstance(doc[NEW_LAYOUT[group]], str), path
    profile_path = "user_profiles/u1"
    chunk_paths = sorted(p for p in docs if groups[p] == "history")
    stored = [c for p in chunk_paths for c in stored_messages("history", docs[p])]
    stored += stored_messages("user_profiles", docs[profile_path])
    assert stored == [m.content for m in (*big, *small)]
    profile = await store.get_profile("u1", cap=100)
    snapshot = await store.get_snapshot("u1", "snap-1")
    assert profile is not None and snapshot is not None
    assert list(profile.messages) == list(snapshot.messages) == [*big, *small]

    # Every text field the store writes is exempt from indexing: a long string is truncated
    # in an index anyway, and an index entry costs every write.
    exempt = {
        (o["collectionGroup"], o["fieldPath"])
        for o in json.loads(INDEXES.read_text())["fieldOverrides"]
        if o["indexes"] == []
    }
    written = {
        (groups[path], name)
        for path, doc in docs.items()
        for name, value in doc.items()
        if isinstance(value, str) and name.endswith("Json")
    }
    assert {("user_profiles", "tailJson"), ("history", "messagesJson")} <= written
    assert written <= exempt, written - exempt
    assert set(NEW_LAYOUT.items()) | set(OLD_LAYOUT.items()) <= exempt


# Content at its worst for JSON: each kind fills documents with as much text as escaping
# allows. 30 messages of 64 KiB (the default message limit) make one flush slice of ~2 MiB.
WORST_CONTENT = {
    "non-ASCII": "é" * (32 * 1024),  # raw UTF-8 in JSON: two bytes a character, as in a map
    "emoji": "🙏" * (16 * 1024),
    "quotes and backslashes": '"\\' * (32 * 1024),  # two bytes each in JSON
    "control characters": "\x01" * (64 * 1024),  # six bytes each in JSON
    "newlines": "line\n" * (13 * 1024),
}


@pytest.mark.parametrize("kind", list(WORST_CONTENT))
async def test_worst_case_content_fits_documents_and_commits(
    db: AsyncClient, store: FirestoreStore, kind: str
) -> None:
    content = WORST_CONTENT[kind]
    sent = [message(f"{i:03d}{content}") for i in range(30)]
    assert sum(m.nbytes for m in sent) <= FLUSH_SLICE_BYTES  # the most one flush carries
    # One append is one commit, which the emulator refuses above 4 MiB (Firestore: 10 MiB).
    await store.append_messages("u1", sent, cap=100)
    sent.append(message("and one more"))
    await store.append_messages("u1", sent[-1:], cap=100)
    info = SnapshotInfo("snap-1", "u1", "s", next(_clock), 1)
    await store.put_snapshot(Snapshot(info, None, tuple(sent)), keep=5)

    profile = await store.get_profile("u1", cap=100)
    snapshot = await store.get_snapshot("u1", "snap-1")
    assert profile is not None and snapshot is not None
    assert list(profile.messages) == list(snapshot.messages) == sent
    for path, doc in (await history_documents(db, "u1")).items():
        assert document_size(path, doc) <= MAX_DOCUMENT, path
        group = path.split("/")[-2]
        text = doc.get(NEW_LAYOUT.get(group, ""))
        if text is not None:
            budget = TAIL_BUDGET if group == "user_profiles" else CHUNK_BUDGET
            assert len(text.encode()) <= budget, path


async def test_a_message_too_escaped_for_any_json_document_is_still_stored(
    db: AsyncClient, store: FirestoreStore
) -> None:
    # 300 KiB of control characters (SAMVAD_MAX_MESSAGE_BYTES goes up to 512 KiB) is 1.8 MB
    # of JSON: more than any document holds.
    huge = message("\x02" * (300 * 1024))
    after = message("after")
    await store.append_messages("u1", [huge, after], cap=100)
    profile = await store.get_profile("u1", cap=100)
    assert profile is not None and list(profile.messages) == [huge, after]
    for path, doc in (await history_documents(db, "u1")).items():
        assert document_size(path, doc) <= MAX_DOCUMENT, path


@pytest.mark.parametrize("content", ["hi", "é", '"', "\x01" * 8, "🙏 " * 40])
def test_a_spilled_tail_and_its_chunks_stay_within_budget(content: str) -> None:
    # Many short messages (SAMVAD_HISTORY_CAP goes up to 10000): per-message overhead counts.
    messages = [message(content) for _ in range(10_000)]
    layout = _HistoryLayout(list(messages), [], 0)
    layout._spill()
    assert [*(m for _, chunk in layout.new_chunks for m in chunk), *layout.tail] == messages
    assert layout.new_chunks and len(_encode_messages(layout.tail)) <= TAIL_BUDGET
    expire_at = from_micros(messages[-1].at_us)
    for chunk_id, chunk in layout.new_chunks:
        doc = _chunk_doc(chunk, expire_at)
        assert document_size(f"user_profiles/u1/history/{chunk_id}", doc) <= MAX_DOCUMENT
        stored = doc["messagesJson"] if "messagesJson" in doc else doc["messages"]
        # never more than Message.nbytes, by which the service sizes a flush's commit
        assert value_size(stored) <= sum(m.nbytes for m in chunk) + 1
        if "messagesJson" in doc:
            assert len(doc["messagesJson"].encode()) <= CHUNK_BUDGET
