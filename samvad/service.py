"""SessionPersistenceService: the cache, the write-behind and the history cap, over a Store.

Reads come from what this instance holds (pending writes first, then a TTL cache), then from
the store. Writes are acknowledged once they are pending in memory: visible to every later
read here, and persisted by the WriteBehind. A change feed from the store invalidates cached
entries that other instances changed, so a 30-minute cache never serves another instance's
stale data for longer than about `sync_interval`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import asdict, dataclass, replace
from typing import Any, Generic, Literal, TypeVar

from samvad.cache import ReadCache
from samvad.clock import Clock, MonotonicIds, SystemClock, micros_of, monotonic
from samvad.config import Settings
from samvad.errors import (
    Conflict,
    Gone,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    StoreUnavailable,
)
from samvad.events import Event, EventHub
from samvad.health import StoreHealth
from samvad.ids import check_id, check_session_id, new_session_id
from samvad.interruptions import Interruption, InterruptionContextManager
from samvad.store.base import (
    Change,
    Message,
    Participant,
    Profile,
    SessionRecord,
    Snapshot,
    SnapshotInfo,
    Store,
    StoreCounts,
    UserState,
    after_last_silence,
    newest,
)
from samvad.writebehind import BacklogStats, WriteBehind

log = logging.getLogger(__name__)

T = TypeVar("T")
ROLES = frozenset({"user", "assistant", "system"})
# One history flush commits this much at most, plus the profile's inline tail: well under
# the 4 MiB a gRPC message may carry by default (the emulator refuses more; Firestore 10 MiB).
FLUSH_SLICE_BYTES = 2 * 1024 * 1024
SESSION_PEEK = 0.25
WIPED = 2**62  # no version read before a wipe is new enough to keep
MAX_PARTICIPANTS = 20
# Listing by status filters pages on read: bound the documents one request may scan.
MAX_LISTING_SCAN = 1000
Status = Literal["active", "ended", "abandoned", "archived"]
_MISS: Any = object()


@dataclass(frozen=True)
class Ack(Generic[T]):
    """A write taken. `durable`: None when not asked for, else whether it is in the store."""

    value: T
    durable: bool | None = None


@dataclass(frozen=True)
class ProfileView:
    user_id: str
    messages: tuple[Message, ...]
    preferences: dict[str, Any]
    created_us: int
    updated_us: int
    partial: bool = False  # the store was unreachable: only what this instance holds


@dataclass(frozen=True)
class SessionList:
    sessions: list[SessionRecord]
    partial: bool = False


@dataclass(frozen=True)
class ClearReport:
    user_state: bool
    user_profile: bool
    sessions: int
    interruptions: int
    snapshots: int = 0


@dataclass(frozen=True)
class Stats:
    counts: StoreCounts | None  # None: Firestore unreachable and never counted here
    total_interruptions: int
    backlog: BacklogStats
    firestore_reachable: bool
    age: float | None  # seconds since the store counts were taken


class _LastWriteWins:
    def __init__(self, stamp: Callable[[Any], int]) -> None:
        self._stamp = stamp

    def merge(self, pending: Any, pending_size: int, new: Any) -> tuple[Any, int]:
        return new, self.size(new)

    def remaining(self, pending: Any, flushed: Any) -> Any:
        return None if pending is flushed else pending

    def keep_after(self, pending: Any, at_us: int) -> Any:
        return pending if self._stamp(pending) > at_us else None

    def size(self, value: Any) -> int:
        return int(value.nbytes)


class _HistoryAppends:
    def __init__(self, cap: int) -> None:
        self._cap = cap

    def merge(
        self, pending: tuple[Message, ...] | None, pending_size: int, new: tuple[Message, ...]
    ) -> tuple[tuple[Message, ...], int]:
        if len(new) == 1 and (not pending or pending[-1].id < new[0].id):
            # The usual append, the newest yet: counted, not recounted.
            if not pending or len(pending) < self._cap:
                return (*(pending or ()), *new), pending_size + new[0].nbytes
            dropped = pending[0]  # the oldest falls beyond the cap
            return (*pending[1:], *new), pending_size - dropped.nbytes + new[0].nbytes
        # Appends beyond the newest `cap` could never be served: they need not be written.
        merged = newest((*(pending or ()), *new), self._cap)
        return merged, self.size(merged)

    def remaining(
        self, pending: tuple[Message, ...], flushed: tuple[Message, ...]
    ) -> tuple[Message, ...] | None:
        done = {m.id for m in flushed}
        return tuple(m for m in pending if m.id not in done) or None

    def keep_after(self, pending: tuple[Message, ...], at_us: int) -> tuple[Message, ...] | None:
        return tuple(m for m in pending if m.at_us > at_us) or None

    def size(self, value: tuple[Message, ...]) -> int:
        return sum(m.nbytes for m in value)


@dataclass(frozen=True, slots=True)
class _ViewInputs:
    """The records a profile view was built from."""

    base: Profile | None
    pending: tuple[Message, ...]
    state: UserState | None
    view: ProfileView


def _preferences(state: UserState | None) -> dict[str, Any]:
    """Preferences are read from the user's state: its `preferences` and `language`."""
    if state is None:
        return {}
    prefs = state.data.get("preferences")
    result: dict[str, Any] = dict(prefs) if isinstance(prefs, dict) else {}
    if isinstance(state.data.get("language"), str):
        result.setdefault("language", state.data["language"])
    return result


class SessionPersistenceService:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        clock: Clock | None = None,
        instance_id: str | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock or SystemClock()
        self.instance_id = instance_id or secrets.token_hex(4)
        self._stamps = MonotonicIds(self.clock)
        self._wall_us = micros_of(self.clock)
        self.retention = settings.retention()
        # Checked on every read: in microseconds, looked up by kind.
        self._retention_us = {
            kind: int(seconds * 1_000_000) for kind, seconds in asdict(self.retention).items()
        }
        self.health = StoreHealth(store.ping, settings.retry_base, settings.retry_max)
        self.writer = WriteBehind(
            self.health,
            flush_delay=settings.flush_delay,
            flush_interval=settings.flush_interval,
            concurrency=settings.flush_concurrency,
            max_bytes=settings.backlog_max_bytes,
        )
        self.writer.register("state", _LastWriteWins(lambda s: s.updated_us), self._flush_state)
        self.writer.register("history", _HistoryAppends(settings.history_cap), self._flush_history)
        self.writer.register("session", _LastWriteWins(lambda s: s.updated_us), self._flush_session)
        self.interruptions = InterruptionContextManager(settings.interruptions_per_session)
        self.events = EventHub()
        size, ttl = settings.cache_size, settings.cache_ttl
        self._states: ReadCache[str, UserState | None] = ReadCache(size, ttl)
        self._profiles: ReadCache[str, Profile | None] = ReadCache(size, ttl)
        self._sessions: ReadCache[str, SessionRecord | None] = ReadCache(size, ttl)
        self._views: ReadCache[str, _ViewInputs] = ReadCache(size, ttl)
        self._loads: dict[Hashable, asyncio.Task[Any]] = {}
        # in-flight loads that a change overtook: the version their result must reach to be kept
        self._outdated_loads: dict[tuple[int, str], int] = {}
        self._counts: StoreCounts | None = None
        self._counts_at = 0.0
        self._counts_task: asyncio.Task[StoreCounts] | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._drain: asyncio.Task[bool] | None = None
        self.cache_hits = 0
        self.cache_misses = 0

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self.writer.start()
        if self.settings.sync_interval > 0:
            self._sync_task = asyncio.get_running_loop().create_task(
                self._sync_loop(), name="change-feed"
            )

    async def drain(self) -> bool:
        """Stop taking writes and flush them within the shutdown budget, once.
        True if nothing acknowledged was lost."""
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_task(
                self.writer.drain(self.settings.shutdown_flush_budget)
            )
        return await asyncio.shield(self._drain)

    async def close(self) -> bool:
        flushed = await self.drain()
        if self._sync_task is not None:
            self._sync_task.cancel()
        await self.writer.close()
        await self.health.close()
        await self.store.close()
        return flushed

    def now_us(self) -> int:
        """A unique, increasing stamp for a write of this instance."""
        return self._stamps.next_micros()

    def wall_us(self) -> int:
        return self._wall_us()

    def _expired(self, kind: str, last_us: int) -> bool:
        return self._wall_us() >= last_us + self._retention_us[kind]

    def status_of(self, record: SessionRecord) -> Status:
        """The lifecycle status, judged now: idleness needs no sweeper to become visible."""
        now = self.wall_us()
        abandon = int(self.settings.abandon_after * 1_000_000)
        archive = int(self.settings.archive_after * 1_000_000)
        if record.is_active:
            if now - record.last_activity_us < abandon:
                return "active"
            return "abandoned" if now - record.last_activity_us - abandon < archive else "archived"
        ended = record.ended_us if record.ended_us is not None else record.last_activity_us
        return "ended" if now - ended < archive else "archived"

    def abandoned_at(self, record: SessionRecord) -> int | None:
        if not record.is_active or self.status_of(record) == "active":
            return None
        return record.last_activity_us + int(self.settings.abandon_after * 1_000_000)

    # ---- user state ---------------------------------------------------------------------------

    async def save_user_state(
        self, user_id: str, data: dict[str, Any], durable: bool = False, origin: str | None = None
    ) -> Ack[UserState]:
        check_id("userId", user_id)
        state = UserState(user_id=user_id, data=data, updated_us=self.now_us())
        if state.nbytes > self.settings.max_state_bytes:
            raise PayloadTooLarge(f"state is over {self.settings.max_state_bytes} bytes")
        waiter = self.writer.submit(("state", user_id), state, durable)
        self.events.publish(
            Event(user_id, "state", {"updatedUs": state.updated_us, "state": data}, origin)
        )
        return Ack(state, await self._settle(waiter))

    async def get_user_state(self, user_id: str) -> UserState:
        check_id("userId", user_id)
        state = self.writer.pending(("state", user_id))
        if state is None:
            state = self._cache_hit(self._states, user_id)
        if state is _MISS:
            state = await self._load_shared(
                self._states, user_id, lambda: self.store.get_state(user_id)
            )
        if state is None or self._expired("state", state.updated_us):
            raise NotFound("no state for this user")
        return state  # type: ignore[no-any-return]

    # ---- history ------------------------------------------------------------------------------

    async def append_to_user_history(
        self,
        user_id: str,
        role: str,
        content: str,
        durable: bool = False,
        origin: str | None = None,
    ) -> Ack[Message]:
        check_id("userId", user_id)
        if role not in ROLES:
            raise InvalidInput("role must be one of: user, assistant, system")
        if not content.strip():
            raise InvalidInput("content must not be empty")
        if len(content.encode()) > self.settings.max_message_bytes:
            raise PayloadTooLarge(f"content is over {self.settings.max_message_bytes} bytes")
        at_us = self.now_us()
        message = Message(
            id=f"{at_us:017d}-{self.instance_id}", role=role, content=content, at_us=at_us
        )
        waiter = self.writer.submit(("history", user_id), (message,), durable)
        if self.events.listened(user_id):  # an event is built only for someone to hear it
            self.events.publish(Event(user_id, "message", {"message": message}, origin))
        return Ack(message, None if waiter is None else await self._settle(waiter))

    async def get_user_profile(self, user_id: str) -> ProfileView:
        check_id("userId", user_id)
        pending: tuple[Message, ...] = self.writer.pending(("history", user_id)) or ()
        partial = False
        state_read: asyncio.Task[UserState | None] | None = None
        try:
            base: Profile | None = self._cache_hit(self._profiles, user_id)
            if base is _MISS:
                # The view needs the state as well: a cold profile reads both documents at once
                # (one round trip to Firestore, not two).
                state_read = asyncio.get_running_loop().create_task(self._live_state(user_id))
                try:
                    base = await self._load_shared(
                        self._profiles,
                        user_id,
                        lambda: self.store.get_profile(user_id, self.settings.history_cap),
                    )
                except StoreUnavailable:
                    if not pending:
                        raise
                    base, partial = None, True
            if base is not None and self._expired("profile", base.updated_us):
                base = None
            if base is None and not pending:
                raise NotFound("no profile for this user")
        except BaseException:
            if state_read is not None:
                state_read.cancel()  # the answer is an error: no view needs the state
            raise
        state = await (state_read if state_read is not None else self._live_state(user_id))
        # A view is a pure function of these records, which are immutable: while they are the
        # very objects it was built from, it is still right (and so is its rendered JSON).
        memo = self._views.get(user_id, None)
        if (
            memo is not None
            and memo.base is base
            and memo.pending is pending
            and memo.state is state
            and memo.view.partial == partial
        ):
            view = memo.view
        else:
            view = self._profile_view(user_id, base, pending, state, partial)
            self._views[user_id] = _ViewInputs(base, pending, state, view)
        if self._expired("profile", view.updated_us):
            raise NotFound("no profile for this user")
        return view

    def _profile_view(
        self,
        user_id: str,
        base: Profile | None,
        pending: tuple[Message, ...],
        state: UserState | None,
        partial: bool,
    ) -> ProfileView:
        stored = base.messages if base else ()
        kept = after_last_silence((*stored, *pending), self._retention_us["profile"])
        if base is not None and kept and kept[0].at_us > base.updated_us:
            base = None  # everything stored came before the silence
        pending = tuple(m for m in pending if not kept or m.id >= kept[0].id)
        stamps = [m.at_us for m in pending]
        if base is not None:
            stamps += [base.created_us, base.updated_us]
        return ProfileView(
            user_id=user_id,
            messages=newest(kept, self.settings.history_cap),
            preferences=_preferences(state),
            created_us=min(stamps),
            updated_us=max(stamps),
            partial=partial,
        )

    async def _live_state(self, user_id: str) -> UserState | None:
        try:
            return await self.get_user_state(user_id)
        except (NotFound, StoreUnavailable):
            return None

    # ---- sessions -----------------------------------------------------------------------------

    async def save_session(
        self,
        session_id: str | None,
        user_id: str,
        language: str | None = None,
        metadata: dict[str, Any] | None = None,
        durable: bool = False,
    ) -> tuple[Ack[SessionRecord], bool]:
        """Create or update a session. Returns the ack and whether the session is new."""
        session_id = check_session_id(session_id) if session_id is not None else new_session_id()
        check_id("userId", user_id)
        existing = await self._peek_session(session_id)
        if existing is not None and existing.user_id != user_id:
            raise Conflict("this sessionId belongs to another user")
        now = self.now_us()
        record = SessionRecord(
            session_id=session_id,
            user_id=user_id,
            language=language
            if language is not None
            else (existing.language if existing else None),
            metadata=metadata if metadata is not None else (existing.metadata if existing else {}),
            is_active=True,
            created_us=existing.created_us if existing else now,
            last_activity_us=now,
            ended_us=None,
            updated_us=now,
            context=existing.context if existing else {},
            participants=existing.participants if existing else (),
        )
        waiter = self.writer.submit(("session", session_id), record, durable)
        return Ack(record, await self._settle(waiter)), existing is None

    async def get_session(self, session_id: str) -> SessionRecord:
        check_session_id(session_id)
        record = self.writer.pending(("session", session_id))
        if record is None:
            record = self._cache_hit(self._sessions, session_id)
        if record is _MISS:
            record = await self._load_shared(
                self._sessions, session_id, lambda: self.store.get_session(session_id)
            )
        if record is None:
            raise NotFound("no such session")
        if self._expired("session", record.last_activity_us):
            raise Gone("this session has expired")
        return record  # type: ignore[no-any-return]

    async def _peek_session(self, session_id: str) -> SessionRecord | None:
        """The session if it is known to exist. A create must not wait on a failing or slow
        store: after SESSION_PEEK seconds it goes ahead as new (the store still keeps the first
        createdAt and refuses to move a session to another user when the write lands)."""
        try:
            async with asyncio.timeout(SESSION_PEEK):
                return await self.get_session(session_id)
        except (NotFound, Gone, StoreUnavailable, TimeoutError):
            return None

    async def end_session(self, session_id: str, durable: bool = False) -> Ack[SessionRecord]:
        record = await self.get_session(session_id)
        if not record.is_active:
            return Ack(record, True if durable else None)
        now = self.now_us()
        ended = replace(record, is_active=False, ended_us=now, last_activity_us=now, updated_us=now)
        waiter = self.writer.submit(("session", session_id), ended, durable)
        return Ack(ended, await self._settle(waiter))

    async def get_user_active_sessions(self, user_id: str) -> SessionList:
        check_id("userId", user_id)
        pending = {
            sid: rec for sid, rec in self.writer.pending_of("session") if rec.user_id == user_id
        }
        partial = False
        try:
            stored = await self._store_call(lambda: self.store.active_sessions(user_id))
        except StoreUnavailable:
            if not pending:
                raise
            stored, partial = [], True
        merged = {s.session_id: s for s in stored}
        merged.update(pending)
        active = sorted(
            (s for s in merged.values() if self.status_of(s) == "active"),
            key=lambda s: s.last_activity_us,
            reverse=True,
        )
        return SessionList(active, partial)

    # ---- wipes --------------------------------------------------------------------------------

    async def clear_user_data(self, user_id: str) -> ClearReport:
        """Wipe everything of a user, in the store first: acknowledged only once it is final."""
        check_id("userId", user_id)
        self.health.check()
        pending_sessions = [
            sid for sid, rec in self.writer.pending_of("session") if rec.user_id == user_id
        ]
        keys = [("state", user_id), ("history", user_id)]
        keys += [("session", sid) for sid in pending_sessions]
        had_state = self.writer.pending(("state", user_id)) is not None
        had_history = self.writer.pending(("history", user_id)) is not None
        at_us = self.now_us()
        async with self.writer.hold(keys):
            report = await self._store_call(lambda: self.store.wipe_user(user_id, at_us))
            for key in keys:
                self.writer.discard_before(key, at_us)
        self._states[user_id] = None
        self._profiles[user_id] = None
        self._views.pop(user_id, None)
        sessions = set(report.session_ids) | set(pending_sessions)
        for sid in sessions:
            self._sessions[sid] = None
        interruptions = self.interruptions.clear_user(user_id)
        interruptions += sum(self.interruptions.clear_session(sid) for sid in sessions)
        self._counts_at = 0.0  # the dashboard should see a wipe at once
        self.events.publish(Event(user_id, "wiped"))
        return ClearReport(
            user_state=report.user_state or had_state,
            user_profile=report.user_profile or had_history,
            sessions=len(sessions),
            interruptions=interruptions,
            snapshots=report.snapshots,
        )

    async def clear_session(self, session_id: str) -> ClearReport:
        await self.get_session(session_id)  # 404 before any write
        key = ("session", session_id)
        at_us = self.now_us()
        async with self.writer.hold([key]):
            await self._store_call(lambda: self.store.delete_session(session_id, at_us))
            self.writer.discard_before(key, at_us)
        self._sessions[session_id] = None
        self._counts_at = 0.0
        return ClearReport(
            user_state=False,
            user_profile=False,
            sessions=1,
            interruptions=self.interruptions.clear_session(session_id),
        )

    # ---- lifecycle: listing, context, participants -------------------------------------------

    async def list_user_sessions(
        self, user_id: str, status: Status | None, limit: int, after: tuple[int, str] | None
    ) -> tuple[list[SessionRecord], tuple[int, str] | None]:
        """A page of the user's sessions, newest lastActivity first, and the cursor of the
        next page (None on the last). Statuses are judged on read, so a filtered page scans
        at most MAX_LISTING_SCAN documents and may come back short with a cursor."""
        check_id("userId", user_id)
        pending = {
            sid: rec for sid, rec in self.writer.pending_of("session") if rec.user_id == user_id
        }
        found: list[SessionRecord] = []
        cursor, scanned, exhausted = after, 0, False
        batch = min(max(limit * 2, 20), 200)
        while len(found) < limit and scanned < MAX_LISTING_SCAN and not exhausted:
            page = await self._store_call(
                functools.partial(self.store.list_sessions, user_id, batch, cursor)
            )
            scanned += len(page)
            exhausted = len(page) < batch
            floor = _key(page[-1]) if page and not exhausted else None
            candidates = [r for r in page if r.session_id not in pending]
            # this instance's unflushed sessions, placed by their own order key
            candidates += [
                r
                for r in pending.values()
                if (cursor is None or _key(r) < cursor) and (floor is None or _key(r) >= floor)
            ]
            for record in sorted(candidates, key=_key, reverse=True):
                if self._expired("session", record.last_activity_us):
                    continue
                if status is None or self.status_of(record) == status:
                    found.append(record)
            if page:
                cursor = _key(page[-1])
            pending = {k: v for k, v in pending.items() if floor is None or _key(v) < floor}
        found.sort(key=_key, reverse=True)
        if len(found) > limit:
            found = found[:limit]
            return found, _key(found[-1])
        return found, (None if exhausted else cursor)

    async def update_session(
        self,
        session_id: str,
        metadata: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
    ) -> SessionRecord:
        """Merge-patch (RFC 7386, top level: null removes a key) metadata and context."""
        record = await self.get_session(session_id)
        now = self.now_us()
        updated = replace(
            record,
            metadata=_merge_patch(record.metadata, metadata),
            context=_merge_patch(record.context, context),
            last_activity_us=now,
            updated_us=now,
        )
        self.writer.submit(("session", session_id), updated)
        return updated

    async def share_context(self, user_id: str, key: str, value: Any) -> list[str]:
        """Set one context key on every active session of the user; returns their ids."""
        listing = await self.get_user_active_sessions(user_id)
        contexts = {}
        for record in listing.sessions:
            updated = await self.update_session(record.session_id, context={key: value})
            contexts[record.session_id] = updated.context
        shared = list(contexts)
        self.events.publish(
            Event(
                user_id,
                "context",
                {"key": key, "value": value, "sessionIds": shared, "contexts": contexts},
            )
        )
        return shared

    async def join_session(
        self,
        session_id: str,
        connection_id: str,
        device_id: str | None = None,
        platform: str | None = None,
    ) -> SessionRecord:
        record = await self.get_session(session_id)
        now = self.now_us()
        joined = Participant(connection_id, record.user_id, device_id, platform, now, now)
        kept = [p for p in record.participants if p.connection_id != connection_id]
        return self._put_participants(record, [*kept, joined][-MAX_PARTICIPANTS:], now)

    async def leave_session(self, session_id: str, connection_id: str) -> SessionRecord | None:
        try:
            record = await self.get_session(session_id)
        except (NotFound, Gone):
            return None  # wiped or expired while connected: nothing to record
        now = self.now_us()
        participants = [
            replace(p, left_us=now, last_seen_us=now) if p.connection_id == connection_id else p
            for p in record.participants
        ]
        # Leaving is not activity: a dropped session must still end when its grace runs out.
        return self._put_participants(record, participants, now, activity=False)

    def _put_participants(
        self,
        record: SessionRecord,
        participants: list[Participant],
        now: int,
        activity: bool = True,
    ) -> SessionRecord:
        updated = replace(
            record,
            participants=tuple(participants),
            last_activity_us=now if activity else record.last_activity_us,
            updated_us=now,
        )
        self.writer.submit(("session", record.session_id), updated)
        return updated

    # ---- snapshots ----------------------------------------------------------------------------

    async def create_snapshot(self, user_id: str, name: str) -> SnapshotInfo:
        """Capture the user's state and history as they are served now (pending included)."""
        check_id("userId", user_id)
        try:
            state: dict[str, Any] | None = (await self.get_user_state(user_id)).data
        except NotFound:
            state = None
        try:
            messages = (await self.get_user_profile(user_id)).messages
        except NotFound:
            messages = ()
        if state is None and not messages:
            raise NotFound("nothing to snapshot for this user")
        created = self.now_us()
        size = len(json.dumps(state)) if state is not None else 0
        info = SnapshotInfo(
            snapshot_id=f"snap_{created:017d}_{secrets.token_hex(4)}",
            user_id=user_id,
            name=name,
            created_us=created,
            size=size + sum(len(m.content.encode()) for m in messages),
        )
        await self._store_call(
            lambda: self.store.put_snapshot(
                Snapshot(info, state, messages), self.settings.max_snapshots
            )
        )
        return info

    async def list_snapshots(self, user_id: str) -> list[SnapshotInfo]:
        check_id("userId", user_id)
        infos = await self._store_call(lambda: self.store.list_snapshots(user_id))
        return [i for i in infos if not self._expired("snapshot", i.created_us)]

    async def get_snapshot(self, user_id: str, snapshot_id: str) -> Snapshot:
        check_id("userId", user_id)
        check_id("snapshotId", snapshot_id)
        snapshot = await self._store_call(lambda: self.store.get_snapshot(user_id, snapshot_id))
        if snapshot is None or self._expired("snapshot", snapshot.info.created_us):
            raise NotFound("no such snapshot")
        return snapshot

    async def delete_snapshot(self, user_id: str, snapshot_id: str) -> None:
        check_id("userId", user_id)
        check_id("snapshotId", snapshot_id)
        if not await self._store_call(lambda: self.store.delete_snapshot(user_id, snapshot_id)):
            raise NotFound("no such snapshot")

    async def restore_snapshot(
        self, user_id: str, snapshot_id: str
    ) -> tuple[SnapshotInfo, SnapshotInfo | None]:
        """Put a snapshot back as the current state and history. What was current is
        snapshotted first, so the restore itself can be undone. Returns (restored, undo)."""
        snapshot = await self.get_snapshot(user_id, snapshot_id)
        try:
            undo: SnapshotInfo | None = await self.create_snapshot(
                user_id, f"before restoring {snapshot.info.name}"[:200]
            )
        except NotFound:
            undo = None  # nothing current to keep
        keys = [("state", user_id), ("history", user_id)]
        async with self.writer.hold(keys):
            at_us = self.now_us()
            await self._store_call(
                lambda: self.store.replace_history(
                    user_id, snapshot.messages, at_us, self.settings.history_cap
                )
            )
            self.writer.discard_before(("history", user_id), at_us)
            self._profiles.pop(user_id, None)
            if snapshot.state is not None:
                self.writer.discard_before(("state", user_id), at_us)
                state = UserState(user_id=user_id, data=snapshot.state, updated_us=self.now_us())
                self.writer.submit(("state", user_id), state)
        self.events.publish(Event(user_id, "restored", {"snapshotId": snapshot_id}))
        return snapshot.info, undo

    def interruptions_of(self, user_id: str) -> dict[str, list[Interruption]]:
        return self.interruptions.of_user(user_id)

    # ---- interruptions ------------------------------------------------------------------------

    def push_interruption(
        self, session_id: str, user_id: str, data: dict[str, Any]
    ) -> Interruption:
        return self.interruptions.push(session_id, user_id, data, self.now_us())

    # ---- stats --------------------------------------------------------------------------------

    async def get_stats(self) -> Stats:
        """Served even while Firestore is down: the backlog is what a dashboard needs then."""
        counts = await self._store_counts()
        return Stats(
            counts=counts,
            total_interruptions=self.interruptions.total,
            backlog=self.writer.stats(),
            firestore_reachable=self.health.reachable,
            age=monotonic() - self._counts_at if counts is not None else None,
        )

    async def _store_counts(self) -> StoreCounts | None:
        """Counts at most `stats_ttl` old; one count query at a time however many pollers ask;
        the last known counts (their age says how old) when Firestore is unreachable."""
        fresh = monotonic() - self._counts_at < self.settings.stats_ttl
        if self._counts is not None and fresh:
            return self._counts
        if self._counts_task is None or self._counts_task.done():
            now = self.wall_us()
            active_since = now - int(self.settings.abandon_after * 1_000_000)
            self._counts_task = asyncio.get_running_loop().create_task(
                self._store_call(lambda: self.store.counts(now, active_since))
            )
        try:
            counts = await asyncio.shield(self._counts_task)
        except StoreUnavailable:
            return self._counts
        self._counts, self._counts_at = counts, monotonic()
        return counts

    # ---- store access -------------------------------------------------------------------------

    async def _store_call(self, call: Callable[[], Awaitable[T]]) -> T:
        self.health.check()
        try:
            result = await call()
        except StoreUnavailable as exc:
            self.health.record_failure(exc)
            raise
        self.health.record_success()
        return result

    def _cache_hit(self, cache: ReadCache[str, Any], key: str) -> Any:
        """What `cache` holds for `key` (None: known absent), or _MISS. Every cached read passes
        here."""
        try:
            value = cache[key]
        except KeyError:
            self.cache_misses += 1
            return _MISS
        self.cache_hits += 1
        return value

    async def _load_shared(
        self, cache: ReadCache[str, Any], key: str, fetch: Callable[[], Awaitable[Any]]
    ) -> Any:
        """One store read of what `cache` misses, shared by every concurrent caller; cached
        unless a write overtook it."""
        load_key = (id(cache), key)
        task = self._loads.get(load_key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(cache, key, load_key, fetch))
            self._loads[load_key] = task
            task.add_done_callback(lambda _: self._loads.pop(load_key, None))
        return await asyncio.shield(task)

    async def _load(
        self,
        cache: ReadCache[str, Any],
        key: str,
        load_key: tuple[int, str],
        fetch: Callable[[], Awaitable[Any]],
    ) -> Any:
        try:
            value = await self._store_call(fetch)
        finally:
            newer = self._outdated_loads.pop(load_key, None)
        if newer is not None and (value is None or value.version < newer):
            # Another writer's change arrived while we read: what we read may predate it, and
            # the feed will not report it again. Answer with it, but do not keep it.
            return value
        current = cache.get(key, _MISS)
        if (
            current is not _MISS
            and current is not None
            and (value is None or current.version >= value.version)
        ):
            return current  # a flush cached something at least as new while we read
        cache[key] = value
        return value

    async def _settle(self, waiter: asyncio.Future[None] | None) -> bool | None:
        if waiter is None:
            return None
        try:
            async with asyncio.timeout(self.settings.durable_timeout):
                await asyncio.shield(waiter)
        except TimeoutError:
            return False
        return True

    # ---- flushes (called by the WriteBehind) --------------------------------------------------

    async def _flush_state(self, user_id: str, state: UserState) -> UserState:
        version = await self.store.put_state(state)
        self._outdate_load(self._states, user_id, WIPED if version is None else version)
        if version is None:
            self._states.pop(user_id, None)  # a newer write or a wipe won: read it again
        else:
            self._states[user_id] = replace(state, version=version)
        return state

    async def _flush_history(
        self, user_id: str, pending: tuple[Message, ...]
    ) -> tuple[Message, ...]:
        batch, size = pending, 0
        for i, message in enumerate(pending):
            size += message.nbytes
            if size > FLUSH_SLICE_BYTES and i > 0:
                batch = pending[:i]
                break
        cap = self.settings.history_cap
        version = await self.store.append_messages(user_id, batch, cap)
        self._outdate_load(self._profiles, user_id, WIPED if version is None else version)
        base = self._profiles.get(user_id, _MISS)
        if version is not None and base is None and version == 1:
            self._profiles[user_id] = Profile(
                user_id, batch[0].at_us, batch[-1].at_us, newest(batch, cap), version
            )
        elif version is not None and isinstance(base, Profile) and base.version == version - 1:
            self._profiles[user_id] = Profile(
                user_id,
                min(base.created_us, batch[0].at_us),
                max(base.updated_us, batch[-1].at_us),
                newest((*base.messages, *batch), cap),
                version,
            )
        else:
            self._profiles.pop(user_id, None)  # someone else wrote too: read it again
        return batch

    async def _flush_session(self, session_id: str, record: SessionRecord) -> SessionRecord:
        version = await self.store.put_session(record)
        self._outdate_load(self._sessions, session_id, WIPED if version is None else version)
        if version is None:
            self._sessions.pop(session_id, None)
        else:
            self._sessions[session_id] = replace(record, version=version)
        return record

    # ---- the change feed ----------------------------------------------------------------------

    async def _sync_loop(self) -> None:
        cursor: Any = None
        while True:
            await asyncio.sleep(self.settings.sync_interval)
            if not self.health.reachable:
                continue
            try:
                batch = await self.store.changes_since(cursor)
            except StoreUnavailable as exc:
                self.health.record_failure(exc)
                continue
            except Exception:
                log.exception("change feed failed")
                continue
            cursor = batch.cursor
            for change in batch.changes:
                self.apply_change(change)

    def _outdate_load(self, cache: ReadCache[str, Any], key: str, version: int) -> None:
        """A read of `key` in flight may predate a write of `version` (another instance's, from
        the change feed, or this one's own flush): its result is then not to be cached."""
        load_key = (id(cache), key)
        if load_key in self._loads:
            self._outdated_loads[load_key] = max(version, self._outdated_loads.get(load_key, 0))

    def apply_change(self, change: Change) -> None:
        """Forget what another writer made stale. Our own writes carry versions we hold."""
        caches: dict[str, ReadCache[str, Any]] = {
            "state": self._states,
            "profile": self._profiles,
            "session": self._sessions,
        }
        if change.kind in caches:
            cache = caches[change.kind]
            cached = cache.get(change.key, _MISS)
            if cached is not _MISS and (cached is None or cached.version < change.version):
                del cache[change.key]
            self._outdate_load(cache, change.key, change.version)
        elif change.kind == "user_wiped":
            for cache in (self._states, self._profiles):
                cache.pop(change.key, None)
                self._outdate_load(cache, change.key, WIPED)
            self._views.pop(change.key, None)
            for sid, rec in list(self._sessions.items()):
                if rec is not None and rec.user_id == change.key:
                    self._sessions.pop(sid, None)
            self.interruptions.clear_user(change.key, before_us=change.version)
        elif change.kind == "session_deleted":
            self._sessions.pop(change.key, None)
            self._outdate_load(self._sessions, change.key, WIPED)
            self.interruptions.clear_session(change.key, before_us=change.version)


def _key(record: SessionRecord) -> tuple[int, str]:
    return (record.last_activity_us, record.session_id)


def _merge_patch(current: dict[str, Any], patch: dict[str, Any] | None) -> dict[str, Any]:
    if patch is None:
        return current
    merged = dict(current)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged
