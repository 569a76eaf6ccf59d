"""The Store over Google Cloud Firestore (AsyncClient). The only module that imports google.cloud.

Layout (collections as in the design note, plus two for correctness):
- user_states/{userId}         {userId, stateJson, updatedAt, isActive, version, committedAt}
- user_profiles/{userId}       {userId, createdAt, lastUpdated, version, committedAt,
                                tailJson, chunks: [{id, count, minId, maxId, bytes}],
                                nextChunk}
- user_profiles/{userId}/history/{chunkId}   {messagesJson, count, minId, maxId}
- sessions/{sessionId}         {sessionId, userId, language, metadataJson, isActive, createdAt,
                                lastActivity, endedAt, updatedAt, version, committedAt}
- active_users/{userId}        {userId, sessionIds}: one document per user with an active
                                session, so that activeUsers is a count() and not a scan
- wiped_users/{userId}, deleted_sessions/{sessionId}   {at, committedAt}: tombstones that every
                                transactional write reads, so no late write resurrects a wipe

State and metadata are stored as JSON text: arbitrary client JSON (nested arrays, "__x__" keys,
huge integers) is not always a valid Firestore value, and it is opaque to queries anyway.
The newest messages live inline in the profile document, so a coalesced flush is one document
write; when the tail outgrows TAIL_BUDGET its oldest messages spill into a chunk document.
Messages are stored as JSON text too (tailJson, messagesJson: [{id, role, content, atUs}]):
the client library encodes and decodes an array of maps field by field, on the event loop,
at about 50 us a message. Documents written before that hold arrays of maps (tail, messages)
and are read as they are; the next write of a profile replaces its tail. A chunk whose text
is dense with characters JSON escapes is still written as maps (see _chunk_doc).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any, TypeVar

import orjson
from google.api_core import exceptions as gexc
from google.api_core.retry import AsyncRetry, if_exception_type
from google.cloud.firestore_v1 import SERVER_TIMESTAMP, AsyncClient
from google.cloud.firestore_v1.async_transaction import AsyncTransaction, async_transactional
from google.cloud.firestore_v1.base_query import FieldFilter

from samvad.clock import from_micros, to_micros
from samvad.errors import StoreContention, StoreError, StoreUnavailable
from samvad.store.base import (
    CHUNK_BUDGET,
    TAIL_BUDGET,
    Change,
    ChangeBatch,
    ChangeKind,
    Message,
    Participant,
    Profile,
    Retention,
    SessionRecord,
    Snapshot,
    SnapshotInfo,
    StoreCounts,
    UserState,
    WipeReport,
    after_last_silence,
    newest,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

STATES = "user_states"
PROFILES = "user_profiles"
HISTORY = "history"
SESSIONS = "sessions"
ACTIVE_USERS = "active_users"
WIPED_USERS = "wiped_users"
DELETED_SESSIONS = "deleted_sessions"
SNAPSHOTS = "snapshots"
PARTS = "parts"
TAIL_JSON = "tailJson"
MESSAGES_JSON = "messagesJson"
# The layout before messages became JSON text: arrays of maps, still read.
LEGACY_TAIL = "tail"
LEGACY_MESSAGES = "messages"
MAX_SNAPSHOT_LISTING = 100
TOMBSTONE_RETENTION = timedelta(days=30)
CHUNK_TTL_SLACK = timedelta(days=7)
ACTIVE_USERS_REFRESH = timedelta(hours=1)
BATCH_LIMIT = 400
CHANGE_PAGE = 1000
CHANGE_OVERLAP = timedelta(seconds=1)

# Reads retry a blip briefly; a longer outage is the circuit breaker's business, not a request's.
READ_RETRY = AsyncRetry(
    predicate=if_exception_type(gexc.ServiceUnavailable, gexc.InternalServerError),
    initial=0.05,
    maximum=0.4,
    multiplier=2.0,
    timeout=1.5,
)

_RETRYABLE = (
    gexc.ServiceUnavailable,
    gexc.DeadlineExceeded,
    gexc.InternalServerError,
    gexc.Aborted,
    gexc.ResourceExhausted,
    gexc.Unknown,
    gexc.RetryError,
    gexc.GatewayTimeout,
    TimeoutError,
    ConnectionError,
)


class FirestoreStore:
    def __init__(
        self, client: AsyncClient, timeout: float = 5.0, retention: Retention | None = None
    ) -> None:
        self._db = client
        self._timeout = timeout
        self._retention = retention or Retention()

    @classmethod
    def connect(
        cls, project: str, timeout: float = 5.0, retention: Retention | None = None
    ) -> FirestoreStore:
        """A client for `project`; FIRESTORE_EMULATOR_HOST, if set, selects an emulator."""
        return cls(AsyncClient(project=project), timeout=timeout, retention=retention)

    @asynccontextmanager
    async def _guard(self, what: str, deadline: float | None = None) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(deadline or self._timeout):
                yield
        except _RETRYABLE as exc:
            raise StoreUnavailable(f"firestore {what}: {type(exc).__name__}") from exc
        except gexc.GoogleAPICallError as exc:
            raise StoreError(f"firestore {what}: {exc}") from exc

    async def _transaction(self, what: str, body: Callable[[AsyncTransaction], Awaitable[T]]) -> T:
        # Writers of one document queue on its lock: give a transaction room for a few turns.
        async with self._guard(what, deadline=self._timeout * 3):
            try:
                return await async_transactional(body)(self._db.transaction(max_attempts=10))
            except ValueError as exc:
                raise _classify_transaction_error(what, exc) from exc

    async def _get_all(self, tx: AsyncTransaction, *refs: Any) -> list[dict[str, Any] | None]:
        """Read documents inside a transaction (which locks them), in the order asked."""
        found: dict[str, dict[str, Any] | None] = {}
        async for snap in self._db.get_all(list(refs), transaction=tx):
            found[snap.reference.path] = (snap.to_dict() or {}) if snap.exists else None
        return [found.get(ref.path) for ref in refs]

    # ---- state ------------------------------------------------------------------------------

    async def get_state(self, user_id: str) -> UserState | None:
        async with self._guard("get state"):
            snap = await self._db.collection(STATES).document(user_id).get(retry=READ_RETRY)
        return _state_from(user_id, snap.to_dict()) if snap.exists else None

    async def put_state(self, state: UserState) -> int | None:
        ref = self._db.collection(STATES).document(state.user_id)
        fence_ref = self._db.collection(WIPED_USERS).document(state.user_id)

        async def body(tx: AsyncTransaction) -> int | None:
            snap, fence = await self._get_all(tx, ref, fence_ref)
            current = _state_from(state.user_id, snap) if snap else None
            if state.updated_us <= _fence_us(fence) or (
                current is not None and current.updated_us >= state.updated_us
            ):
                return None
            version = (current.version if current else 0) + 1
            tx.set(
                ref,
                {
                    "userId": state.user_id,
                    "stateJson": json.dumps(state.data, separators=(",", ":")),
                    "updatedAt": from_micros(state.updated_us),
                    "expireAt": self._expire_at("state", state.updated_us),
                    "isActive": True,
                    "version": version,
                    "committedAt": SERVER_TIMESTAMP,
                },
            )
            return version

        return await self._transaction("put state", body)

    # ---- history ----------------------------------------------------------------------------

    async def get_profile(self, user_id: str, cap: int) -> Profile | None:
        ref = self._db.collection(PROFILES).document(user_id)
        async with self._guard("get profile"):
            snap = await ref.get(retry=READ_RETRY)
            if not snap.exists:
                return None
            doc = snap.to_dict() or {}
            chunk_refs = [ref.collection(HISTORY).document(c["id"]) for c in doc.get("chunks", [])]
            messages = _stored_messages(doc, TAIL_JSON, LEGACY_TAIL)
            if chunk_refs:
                async for chunk in self._db.get_all(chunk_refs, retry=READ_RETRY):
                    if not chunk.exists:
                        # Listed but gone: only TTL deleting a long-idle profile's chunk should
                        # do this; anything else is data loss to hear about.
                        log.error(
                            "history chunk missing", extra={"json_fields": {"chunk": chunk.id}}
                        )
                        continue
                    messages.extend(_chunk_messages(chunk.to_dict() or {}))
        return Profile(
            user_id=user_id,
            created_us=to_micros(doc["createdAt"]),
            updated_us=to_micros(doc["lastUpdated"]),
            messages=newest(messages, cap),
            version=int(doc.get("version", 0)),
        )

    async def append_messages(
        self, user_id: str, messages: Sequence[Message], cap: int
    ) -> int | None:
        ref = self._db.collection(PROFILES).document(user_id)
        fence_ref = self._db.collection(WIPED_USERS).document(user_id)

        async def body(tx: AsyncTransaction) -> int | None:
            snap, fence = await self._get_all(tx, ref, fence_ref)
            doc = snap or {}
            reset_us = to_micros(doc["resetAt"]) if doc.get("resetAt") else -1
            fence_us = max(_fence_us(fence), reset_us)
            silence = int(self._retention.profile * 1_000_000)
            fresh = after_last_silence([m for m in messages if m.at_us > fence_us], silence)
            if not fresh:
                return None
            first = min(m.at_us for m in fresh)
            last = max(m.at_us for m in fresh)
            layout = _HistoryLayout.load(doc)
            if snap and self._retention.expired("profile", to_micros(doc["lastUpdated"]), first):
                # Expired but not yet deleted by TTL: it must not come back with this append.
                layout.dropped_chunks = [c["id"] for c in layout.chunks]
                layout.chunks, layout.tail, snap, doc = [], [], None, {}
            layout.merge(fresh, cap)
            created = min(to_micros(doc["createdAt"]), first) if snap else first
            updated = max(to_micros(doc["lastUpdated"]), last) if snap else last
            version = int(doc.get("version", 0)) + 1
            self._write_history(tx, ref, layout, created, updated, version, reset_us)
            return version

        return await self._transaction("append", body)

    async def replace_history(
        self, user_id: str, messages: Sequence[Message], at_us: int, cap: int
    ) -> int | None:
        ref = self._db.collection(PROFILES).document(user_id)
        fence_ref = self._db.collection(WIPED_USERS).document(user_id)
        # A whole history can be several MB: more than one commit may carry. The chunks go
        # first, under ids of their own; the transaction then only swaps the profile's index
        # over to them. Should it fail, they are unreferenced (a wipe still finds them).
        layout = _HistoryLayout([], [], 0)
        layout.merge(messages, cap)
        expire_at = self._expire_at("profile", at_us)
        renamed = {
            old_id: f"r{at_us:017d}-{n:04d}" for n, (old_id, _) in enumerate(layout.new_chunks)
        }
        async with self._guard("replace history", deadline=self._timeout * 3):
            for old_id, chunk_messages in layout.new_chunks:
                chunk_ref = ref.collection(HISTORY).document(renamed[old_id])
                await chunk_ref.set(_chunk_doc(chunk_messages, expire_at))
        for chunk in layout.chunks:
            chunk["id"], chunk["expireAt"] = renamed[chunk["id"]], expire_at
        layout.new_chunks = []

        async def body(tx: AsyncTransaction) -> int | None:
            snap, fence = await self._get_all(tx, ref, fence_ref)
            if at_us <= _fence_us(fence):
                return None
            doc = snap or {}
            old = _HistoryLayout.load(doc)
            layout.next_chunk = old.next_chunk
            layout.dropped_chunks = [c["id"] for c in old.chunks]
            stamps = [m.at_us for m in messages] or [at_us]
            created = min([*stamps, to_micros(doc["createdAt"])] if snap else stamps)
            version = int(doc.get("version", 0)) + 1
            self._write_history(tx, ref, layout, created, at_us, version, at_us)
            return version

        return await self._transaction("replace history", body)

    def _write_history(
        self,
        tx: AsyncTransaction,
        ref: Any,
        layout: _HistoryLayout,
        created_us: int,
        updated_us: int,
        version: int,
        reset_us: int,
    ) -> None:
        expire_at = self._expire_at("profile", updated_us)
        new_ids = {chunk_id for chunk_id, _ in layout.new_chunks}
        for chunk_id, chunk_messages in layout.new_chunks:
            doc = _chunk_doc(chunk_messages, expire_at)
            tx.set(ref.collection(HISTORY).document(chunk_id), doc)
        for chunk_id in layout.dropped_chunks:
            tx.delete(ref.collection(HISTORY).document(chunk_id))
        # A chunk lives as long as its profile only if its TTL moves along: push its expiry
        # when it falls more than CHUNK_TTL_SLACK behind (a write a week, not one a flush).
        for chunk in layout.chunks:
            current = chunk.get("expireAt")
            if chunk["id"] in new_ids:
                chunk["expireAt"] = expire_at
            elif current is None or current < expire_at - CHUNK_TTL_SLACK:
                chunk["expireAt"] = expire_at
                tx.update(ref.collection(HISTORY).document(chunk["id"]), {"expireAt": expire_at})
        tx.set(
            ref,
            {
                "userId": ref.id,
                "createdAt": from_micros(created_us),
                "lastUpdated": from_micros(updated_us),
                "expireAt": expire_at,
                "resetAt": from_micros(reset_us) if reset_us >= 0 else None,
                "version": version,
                "committedAt": SERVER_TIMESTAMP,
                TAIL_JSON: _encode_messages(layout.tail).decode(),
                "chunks": layout.chunks,
                "nextChunk": layout.next_chunk,
            },
        )

    def _expire_at(self, kind: str, last_us: int) -> datetime:
        return from_micros(last_us) + timedelta(seconds=getattr(self._retention, kind))

    # ---- sessions ---------------------------------------------------------------------------

    async def get_session(self, session_id: str) -> SessionRecord | None:
        async with self._guard("get session"):
            snap = await self._db.collection(SESSIONS).document(session_id).get(retry=READ_RETRY)
        return _session_from(snap.to_dict() or {}) if snap.exists else None

    async def put_session(self, session: SessionRecord) -> int | None:
        ref = self._db.collection(SESSIONS).document(session.session_id)
        active_ref = self._db.collection(ACTIVE_USERS).document(session.user_id)
        user_fence_ref = self._db.collection(WIPED_USERS).document(session.user_id)
        session_fence_ref = self._db.collection(DELETED_SESSIONS).document(session.session_id)

        async def body(tx: AsyncTransaction) -> int | None:
            snap, active, user_fence, session_fence = await self._get_all(
                tx, ref, active_ref, user_fence_ref, session_fence_ref
            )
            current = _session_from(snap) if snap else None
            if current is not None and self._retention.expired(
                "session", current.last_activity_us, session.updated_us
            ):
                current = None  # expired, awaiting TTL: this write starts it afresh
            fence = max(_fence_us(user_fence), _fence_us(session_fence))
            if session.updated_us <= fence or (
                current is not None
                and (current.updated_us >= session.updated_us or current.user_id != session.user_id)
            ):
                return None
            version = (current.version if current else 0) + 1
            created = min(current.created_us, session.created_us) if current else session.created_us
            tx.set(ref, _session_doc(session, created, version, self._retention))
            _track_active(tx, active_ref, active, session, current, self._retention)
            return version

        return await self._transaction("put session", body)

    async def list_sessions(
        self, user_id: str, limit: int, after: tuple[int, str] | None = None
    ) -> list[SessionRecord]:
        query = (
            self._db.collection(SESSIONS)
            .where(filter=FieldFilter("userId", "==", user_id))
            .order_by("lastActivity", direction="DESCENDING")
            .order_by("sessionId", direction="DESCENDING")
        )
        if after is not None:
            query = query.start_after(
                {"lastActivity": from_micros(after[0]), "sessionId": after[1]}
            )
        async with self._guard("list sessions"):
            return [
                _session_from(snap.to_dict() or {})
                async for snap in query.limit(limit).stream(retry=READ_RETRY)
            ]

    # ---- snapshots --------------------------------------------------------------------------

    async def put_snapshot(self, snapshot: Snapshot, keep: int) -> list[str]:
        info = snapshot.info
        ref = self._db.collection(SNAPSHOTS).document(info.snapshot_id)
        expire_at = self._expire_at("snapshot", info.created_us)
        parts = _pack(snapshot.messages)
        async with self._guard("snapshot", deadline=self._timeout * 3):
            # Parts first, the listed document last: a snapshot is never seen half-written.
            for number, messages in enumerate(parts):
                doc = _chunk_doc(messages, expire_at)
                await ref.collection(PARTS).document(f"{number:06d}").set(doc)
            await ref.set(
                {
                    "snapshotId": info.snapshot_id,
                    "userId": info.user_id,
                    "name": info.name,
                    "createdAt": from_micros(info.created_us),
                    "size": info.size,
                    "stateJson": json.dumps(snapshot.state) if snapshot.state is not None else None,
                    "parts": len(parts),
                    "expireAt": expire_at,
                }
            )
            infos = await self._snapshot_infos(info.user_id)
            dropped = [i.snapshot_id for i in infos[keep:]]
            for snapshot_id in dropped:
                await self._delete_snapshot_docs(snapshot_id)
        return dropped

    async def list_snapshots(self, user_id: str) -> list[SnapshotInfo]:
        async with self._guard("list snapshots"):
            return await self._snapshot_infos(user_id)

    async def _snapshot_infos(self, user_id: str) -> list[SnapshotInfo]:
        query = (
            self._db.collection(SNAPSHOTS)
            .where(filter=FieldFilter("userId", "==", user_id))
            .order_by("createdAt", direction="DESCENDING")
            .select(["snapshotId", "userId", "name", "createdAt", "size"])
            .limit(MAX_SNAPSHOT_LISTING)
        )
        return [_snapshot_info(snap.to_dict() or {}) async for snap in query.stream()]

    async def get_snapshot(self, user_id: str, snapshot_id: str) -> Snapshot | None:
        ref = self._db.collection(SNAPSHOTS).document(snapshot_id)
        async with self._guard("get snapshot"):
            snap = await ref.get(retry=READ_RETRY)
            doc = snap.to_dict() or {}
            if not snap.exists or doc.get("userId") != user_id:
                return None
            part_refs = [
                ref.collection(PARTS).document(f"{n:06d}") for n in range(int(doc["parts"]))
            ]
            messages: list[Message] = []
            if part_refs:
                async for part in self._db.get_all(part_refs, retry=READ_RETRY):
                    if not part.exists:
                        return None  # TTL took part of it: a partial snapshot is no snapshot
                    messages.extend(_chunk_messages(part.to_dict() or {}))
        state = json.loads(doc["stateJson"]) if doc.get("stateJson") else None
        return Snapshot(_snapshot_info(doc), state, newest(messages, len(messages)))

    async def delete_snapshot(self, user_id: str, snapshot_id: str) -> bool:
        ref = self._db.collection(SNAPSHOTS).document(snapshot_id)
        async with self._guard("delete snapshot"):
            snap = await ref.get(retry=READ_RETRY)
            if not snap.exists or (snap.to_dict() or {}).get("userId") != user_id:
                return False
            await self._delete_snapshot_docs(snapshot_id)
        return True

    async def _delete_snapshot_docs(self, snapshot_id: str) -> None:
        ref = self._db.collection(SNAPSHOTS).document(snapshot_id)
        doomed = [r async for r in ref.collection(PARTS).list_documents()]
        await self._delete_all([ref, *doomed])

    async def _delete_all(self, refs: Sequence[Any]) -> None:
        for start in range(0, len(refs), BATCH_LIMIT):
            batch = self._db.batch()
            for doc_ref in refs[start : start + BATCH_LIMIT]:
                batch.delete(doc_ref)
            await batch.commit()

    async def active_sessions(self, user_id: str) -> list[SessionRecord]:
        query = (
            self._db.collection(SESSIONS)
            .where(filter=FieldFilter("userId", "==", user_id))
            .where(filter=FieldFilter("isActive", "==", True))
        )
        async with self._guard("list sessions"):
            return [
                _session_from(snap.to_dict() or {}) async for snap in query.stream(retry=READ_RETRY)
            ]

    async def delete_session(self, session_id: str, at_us: int) -> SessionRecord | None:
        ref = self._db.collection(SESSIONS).document(session_id)
        fence_ref = self._db.collection(DELETED_SESSIONS).document(session_id)

        async def body(tx: AsyncTransaction) -> SessionRecord | None:
            snap, fence = await self._get_all(tx, ref, fence_ref)
            current = _session_from(snap) if snap else None
            active_ref = active = None
            if current is not None and current.is_active:
                active_ref = self._db.collection(ACTIVE_USERS).document(current.user_id)
                (active,) = await self._get_all(tx, active_ref)
            tx.set(fence_ref, _tombstone(max(at_us, _fence_us(fence))))
            if current is not None:
                tx.delete(ref)
            if active_ref is not None:
                _track_active(tx, active_ref, active, None, current, self._retention)
            return current

        return await self._transaction("delete session", body)

    # ---- wipe -------------------------------------------------------------------------------

    async def wipe_user(self, user_id: str, at_us: int) -> WipeReport:
        fence_ref = self._db.collection(WIPED_USERS).document(user_id)
        state_ref = self._db.collection(STATES).document(user_id)
        profile_ref = self._db.collection(PROFILES).document(user_id)

        # The tombstone goes first and in its own transaction: from then on every write path,
        # on every instance, drops what was stamped before the wipe, so the deletes below are final.
        async def fence(tx: AsyncTransaction) -> None:
            (current,) = await self._get_all(tx, fence_ref)
            tx.set(fence_ref, _tombstone(max(at_us, _fence_us(current))))

        await self._transaction("wipe fence", fence)
        async with self._guard("wipe"):
            state_snap, profile_snap = await asyncio.gather(state_ref.get(), profile_ref.get())
            sessions_query = self._db.collection(SESSIONS).where(
                filter=FieldFilter("userId", "==", user_id)
            )
            session_refs = [snap.reference async for snap in sessions_query.stream()]
            chunk_refs = [r async for r in profile_ref.collection(HISTORY).list_documents()]
            doomed = [state_ref, profile_ref, *chunk_refs, *session_refs]
            doomed.append(self._db.collection(ACTIVE_USERS).document(user_id))
            await self._delete_all(doomed)
            snapshots = await self._snapshot_infos(user_id)
            for info in snapshots:
                await self._delete_snapshot_docs(info.snapshot_id)
        return WipeReport(
            user_state=state_snap.exists,
            user_profile=profile_snap.exists,
            session_ids=[r.id for r in session_refs],
            snapshots=len(snapshots),
        )

    # ---- stats, change feed, health ---------------------------------------------------------

    async def counts(self, now_us: int, active_since_us: int) -> StoreCounts:
        since = from_micros(active_since_us)
        queries: list[Any] = [
            self._db.collection(SESSIONS)
            .where(filter=FieldFilter("isActive", "==", True))
            .where(filter=FieldFilter("lastActivity", ">=", since))
            .count(),
            self._db.collection(ACTIVE_USERS)
            .where(filter=FieldFilter("lastActivity", ">=", since))
            .count(),
            self._db.collection(PROFILES)
            .where(filter=FieldFilter("expireAt", ">", from_micros(now_us)))
            .count(),
        ]
        async with self._guard("count"):
            results = await asyncio.gather(*(q.get(retry=READ_RETRY) for q in queries))
        sessions, users, profiles = (int(r[0][0].value) for r in results)
        return StoreCounts(active_sessions=sessions, active_users=users, profiles=profiles)

    async def changes_since(self, cursor: Any) -> ChangeBatch:
        feeds: list[tuple[str, ChangeKind]] = [
            (STATES, "state"),
            (PROFILES, "profile"),
            (SESSIONS, "session"),
            (WIPED_USERS, "user_wiped"),
            (DELETED_SESSIONS, "session_deleted"),
        ]
        start: dict[str, datetime] = dict(cursor) if cursor else {}
        if not start:
            async with self._guard("server time"):
                now = await self._server_now()
            return ChangeBatch(cursor={name: now for name, _ in feeds})

        async def read(name: str, kind: ChangeKind, stream: Any) -> list[Change]:
            found = []
            async for snap in stream:
                doc = snap.to_dict() or {}
                version = to_micros(doc["at"]) if "at" in doc else int(doc.get("version", 0))
                found.append(Change(kind, snap.id, version))
                start[name] = max(start[name], doc["committedAt"])
            return found

        reads = []
        for name, kind in feeds:
            query = (
                self._db.collection(name)
                .where(filter=FieldFilter("committedAt", ">", start[name] - CHANGE_OVERLAP))
                .order_by("committedAt")
                .select(["version", "at", "committedAt"])
                .limit(CHANGE_PAGE)
            )
            reads.append(read(name, kind, query.stream()))  # runs when iterated
        # At once, not one after the other: a poll takes one round trip instead of five.
        changes: list[Change] = []
        async with self._guard("change feed"):
            batches = await asyncio.gather(*reads, return_exceptions=True)
            for batch in batches:
                if isinstance(batch, BaseException):
                    raise batch  # each one ran to its end: none is left unretrieved
                changes += batch
        return ChangeBatch(changes=changes, cursor=start)

    async def _server_now(self) -> datetime:
        # One tiny write gives the database's clock; the feed must not depend on ours.
        ref = self._db.collection("_samvad").document("clock")
        result = await ref.set({"at": SERVER_TIMESTAMP})
        return result.update_time  # type: ignore[no-any-return]

    async def ping(self) -> None:
        async with self._guard("ping"):
            await self._db.collection("_samvad").document("ping").get(retry=READ_RETRY)

    async def close(self) -> None:
        self._db.close()  # type: ignore[no-untyped-call]


class _HistoryLayout:
    """The inline tail and the chunk index of one profile document, merged and trimmed in memory."""

    def __init__(self, tail: list[Message], chunks: list[dict[str, Any]], next_chunk: int) -> None:
        self.tail = tail
        self.chunks = chunks
        self.next_chunk = next_chunk
        self.new_chunks: list[tuple[str, list[Message]]] = []
        self.dropped_chunks: list[str] = []

    @classmethod
    def load(cls, doc: dict[str, Any]) -> _HistoryLayout:
        return cls(
            tail=_stored_messages(doc, TAIL_JSON, LEGACY_TAIL),
            chunks=list(doc.get("chunks", [])),
            next_chunk=int(doc.get("nextChunk", 0)),
        )

    def merge(self, fresh: Sequence[Message], cap: int) -> None:
        self.tail = list(newest([*self.tail, *fresh], len(self.tail) + len(fresh)))
        self._spill()
        self._trim(cap)

    def _spill(self) -> None:
        # The budgets hold the stored JSON text, escapes included. JSON writes a byte of content
        # in at most six (a control character as \u00XX) and the rest of a message within its
        # MESSAGE_OVERHEAD: a usual tail is provably within budget without encoding it here (the
        # write encodes it once). Else one encoding of the whole tail tells, before measuring
        # message by message.
        if 6 * sum(m.nbytes for m in self.tail) <= TAIL_BUDGET:
            return
        if len(_encode_messages(self.tail)) <= TAIL_BUDGET:
            return
        sizes = [_json_size(m) for m in self.tail]
        while 1 + sum(sizes) > TAIL_BUDGET:
            size, cut = 1, 0  # "[": each message brings its "," or "]"
            while cut < len(sizes) and size + sizes[cut] <= CHUNK_BUDGET:
                size += sizes[cut]
                cut += 1
            if cut == 0:  # one message over the chunk budget: a chunk of its own (_chunk_doc)
                size, cut = 1 + sizes[0], 1
            spilled, self.tail, sizes = self.tail[:cut], self.tail[cut:], sizes[cut:]
            chunk_id = f"{self.next_chunk:010d}"
            self.next_chunk += 1
            self.new_chunks.append((chunk_id, spilled))
            self.chunks.append(
                {
                    "id": chunk_id,
                    "count": len(spilled),
                    "minId": spilled[0].id,
                    "maxId": spilled[-1].id,
                    "bytes": size,
                }
            )

    def _newer_in_chunks(self, message_id: str) -> int:
        return sum(int(c["count"]) for c in self.chunks if c["minId"] > message_id)

    def _newer_than(self, message_id: str) -> int:
        """How many stored messages are certainly newer than `message_id`."""
        in_tail = sum(1 for m in self.tail if m.id > message_id)
        return in_tail + self._newer_in_chunks(message_id)

    def _trim(self, cap: int) -> None:
        # Keep everything that might be among the newest `cap`; drop only what provably is not.
        # The tail is sorted and unique (merge): its i-th message has len - i - 1 newer in it.
        last = len(self.tail) - 1
        self.tail = [
            m for i, m in enumerate(self.tail) if last - i + self._newer_in_chunks(m.id) < cap
        ]
        kept = []
        for chunk in self.chunks:
            if self._newer_than(chunk["maxId"]) >= cap:
                if not any(chunk["id"] == new_id for new_id, _ in self.new_chunks):
                    self.dropped_chunks.append(chunk["id"])
                self.new_chunks = [(i, ms) for i, ms in self.new_chunks if i != chunk["id"]]
            else:
                kept.append(chunk)
        self.chunks = kept


def _fence_us(doc: dict[str, Any] | None) -> int:
    return to_micros(doc["at"]) if doc else -1


def _tombstone(at_us: int) -> dict[str, Any]:
    at = from_micros(at_us)
    return {"at": at, "expireAt": at + TOMBSTONE_RETENTION, "committedAt": SERVER_TIMESTAMP}


def _state_from(user_id: str, doc: dict[str, Any] | None) -> UserState:
    doc = doc or {}
    return UserState(
        user_id=user_id,
        data=json.loads(doc.get("stateJson") or "{}"),
        updated_us=to_micros(doc["updatedAt"]),
        version=int(doc.get("version", 0)),
    )


def _message_json(m: Message) -> dict[str, Any]:
    return {"id": m.id, "role": m.role, "content": m.content, "atUs": m.at_us}


def _encode_messages(messages: Sequence[Message]) -> bytes:
    """The JSON text of a tail or a chunk: what Firestore stores, byte for byte (UTF-8)."""
    return orjson.dumps([_message_json(m) for m in messages])


def _json_size(m: Message) -> int:
    """Bytes `m` adds to a JSON array of messages: its encoding and one separator."""
    return len(orjson.dumps(_message_json(m))) + 1


def _messages_from_json(text: str) -> list[Message]:
    return [
        Message(id=m["id"], role=m["role"], content=m["content"], at_us=m["atUs"])
        for m in orjson.loads(text)
    ]


def _stored_messages(doc: dict[str, Any], json_field: str, legacy_field: str) -> list[Message]:
    """The messages of a profile's tail or of a chunk, in either layout."""
    text = doc.get(json_field)
    if text is not None:
        return _messages_from_json(text)
    return [_message_from(m) for m in doc.get(legacy_field, [])]


def _chunk_messages(doc: dict[str, Any]) -> list[Message]:
    return _stored_messages(doc, MESSAGES_JSON, LEGACY_MESSAGES)


def _message_doc(m: Message) -> dict[str, Any]:
    """A message as a Firestore map: the layout before JSON text, kept for escape-dense
    chunks (_chunk_doc)."""
    return {"id": m.id, "role": m.role, "content": m.content, "timestamp": from_micros(m.at_us)}


def _message_from(doc: dict[str, Any]) -> Message:
    return Message(
        id=doc["id"], role=doc["role"], content=doc["content"], at_us=to_micros(doc["timestamp"])
    )


def _classify_transaction_error(what: str, exc: ValueError) -> Exception:
    """The library reports a transaction's end as a ValueError: "failed to commit in N
    attempts" (contention), or, when the rollback after a failed call finds no transaction to
    roll back, one that hides that failure in its context. Find out which it was."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, gexc.Aborted):
            return StoreContention(f"firestore {what}: contention")
        if isinstance(cause, _RETRYABLE):
            return StoreUnavailable(f"firestore {what}: {type(cause).__name__}")
        cause = cause.__cause__ or cause.__context__
    return StoreError(f"firestore {what}: {exc}")


def _pack(messages: Sequence[Message]) -> list[list[Message]]:
    """Messages in documents of at most CHUNK_BUDGET bytes of JSON text each."""
    parts: list[list[Message]] = []
    size = CHUNK_BUDGET
    for message in messages:
        message_size = _json_size(message)
        if size + message_size > CHUNK_BUDGET:
            parts.append([])
            size = 1  # "[": each message brings its "," or "]"
        parts[-1].append(message)
        size += message_size
    return parts


def _snapshot_info(doc: dict[str, Any]) -> SnapshotInfo:
    return SnapshotInfo(
        snapshot_id=doc["snapshotId"],
        user_id=doc["userId"],
        name=doc["name"],
        created_us=to_micros(doc["createdAt"]),
        size=int(doc["size"]),
    )


def _chunk_doc(messages: Sequence[Message], expire_at: datetime) -> dict[str, Any]:
    encoded = _encode_messages(messages)
    # JSON escapes a quote in two bytes and a control character in six: text dense with them
    # can outgrow Message.nbytes, by which the service sizes a flush's commit and a message
    # is admitted at all. Such chunks keep the map layout, which stores text unescaped and
    # never exceeds nbytes, so a commit or a one-message chunk is no larger than it ever was.
    if len(encoded) <= sum(m.nbytes for m in messages):
        stored: dict[str, Any] = {MESSAGES_JSON: encoded.decode()}
    else:
        stored = {LEGACY_MESSAGES: [_message_doc(m) for m in messages]}
    return {
        **stored,
        "count": len(messages),
        "minId": messages[0].id,
        "maxId": messages[-1].id,
        "expireAt": expire_at,
    }


def _session_doc(
    s: SessionRecord, created_us: int, version: int, retention: Retention
) -> dict[str, Any]:
    return {
        "sessionId": s.session_id,
        "userId": s.user_id,
        "language": s.language,
        "metadataJson": json.dumps(s.metadata, separators=(",", ":")),
        "contextJson": json.dumps(s.context, separators=(",", ":")),
        "participants": [_participant_doc(p) for p in s.participants],
        "isActive": s.is_active,
        "status": "active" if s.is_active else "ended",
        "createdAt": from_micros(created_us),
        "lastActivity": from_micros(s.last_activity_us),
        "endedAt": from_micros(s.ended_us) if s.ended_us is not None else None,
        "updatedAt": from_micros(s.updated_us),
        "expireAt": from_micros(s.last_activity_us) + timedelta(seconds=retention.session),
        "version": version,
        "committedAt": SERVER_TIMESTAMP,
    }


def _session_from(doc: dict[str, Any]) -> SessionRecord:
    ended = doc.get("endedAt")
    return SessionRecord(
        session_id=doc["sessionId"],
        user_id=doc["userId"],
        language=doc.get("language"),
        metadata=json.loads(doc.get("metadataJson") or "{}"),
        is_active=bool(doc.get("isActive")),
        created_us=to_micros(doc["createdAt"]),
        last_activity_us=to_micros(doc["lastActivity"]),
        ended_us=to_micros(ended) if ended is not None else None,
        updated_us=to_micros(doc["updatedAt"]),
        version=int(doc.get("version", 0)),
        context=json.loads(doc.get("contextJson") or "{}"),
        participants=tuple(_participant_from(p) for p in doc.get("participants", [])),
    )


def _participant_doc(p: Participant) -> dict[str, Any]:
    return {
        "connectionId": p.connection_id,
        "userId": p.user_id,
        "deviceId": p.device_id,
        "platform": p.platform,
        "joinedAt": from_micros(p.joined_us),
        "lastSeen": from_micros(p.last_seen_us),
        "leftAt": from_micros(p.left_us) if p.left_us is not None else None,
    }


def _participant_from(doc: dict[str, Any]) -> Participant:
    left = doc.get("leftAt")
    return Participant(
        connection_id=doc["connectionId"],
        user_id=doc["userId"],
        device_id=doc.get("deviceId"),
        platform=doc.get("platform"),
        joined_us=to_micros(doc["joinedAt"]),
        last_seen_us=to_micros(doc["lastSeen"]),
        left_us=to_micros(left) if left is not None else None,
    )


def _track_active(
    tx: AsyncTransaction,
    ref: Any,
    doc: dict[str, Any] | None,
    session: SessionRecord | None,
    previous: SessionRecord | None,
    retention: Retention,
) -> None:
    """Keep active_users/{userId} listing the user's active sessions with their last activity,
    so that "users with a session active since T" is one count() query."""
    sessions: dict[str, Any] = dict((doc or {}).get("sessions", {}))
    before = dict(sessions)
    if previous is not None:
        sessions.pop(previous.session_id, None)
    if session is not None and session.is_active:
        stored = before.get(session.session_id)
        active_at = from_micros(session.last_activity_us)
        # Counted against a 24 h abandonment cut-off: an hour's lag is no error worth a write
        # on every session update.
        fresh_enough = stored is not None and active_at - stored < ACTIVE_USERS_REFRESH
        sessions[session.session_id] = stored if fresh_enough else active_at
    if sessions == before:
        return
    if not sessions:
        tx.delete(ref)
        return
    last = max(sessions.values())
    user_id = session.user_id if session else previous.user_id  # type: ignore[union-attr]
    tx.set(
        ref,
        {
            "userId": user_id,
            "sessions": sessions,
            "lastActivity": last,
            "expireAt": last + timedelta(seconds=retention.session),
        },
    )
