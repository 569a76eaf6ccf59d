"""The Store protocol: what the service needs from durable storage, and the records it trades in.

Every write method is idempotent and safe to race with the same write from another instance:
- state and session writes are last-writer-wins on the writer's timestamp, never older over newer;
- message appends merge by message id, so a retried or concurrent append neither duplicates
  nor drops;
- a wipe leaves a tombstone; any later-arriving write stamped at or before the wipe is dropped,
  so a background write that was pending anywhere cannot resurrect wiped data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

# Firestore's document limit is 1 MiB. The profile document keeps the newest messages inline
# (one write per flush); older ones spill into chunk documents filled to CHUNK_BUDGET.
TAIL_BUDGET = 600_000
CHUNK_BUDGET = 800_000
MESSAGE_OVERHEAD = 96


@dataclass(frozen=True, slots=True)
class Message:
    id: str  # "<17-digit microseconds>-<instance>": sorts by time, unique across instances
    role: str
    content: str
    at_us: int
    # Counted once: the write-behind sums it over a user's pending messages on every append.
    nbytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        size = len(self.content.encode()) + len(self.role) + len(self.id) + MESSAGE_OVERHEAD
        object.__setattr__(self, "nbytes", size)


@dataclass(frozen=True, slots=True, weakref_slot=True)  # weakly referenced by rendered bodies
class UserState:
    user_id: str
    data: dict[str, Any]
    updated_us: int
    version: int = 0

    @property
    def nbytes(self) -> int:
        return len(repr(self.data)) + len(self.user_id) + MESSAGE_OVERHEAD


@dataclass(frozen=True, slots=True)
class Participant:
    """Someone who joined a session over the websocket."""

    connection_id: str
    user_id: str
    device_id: str | None
    platform: str | None
    joined_us: int
    last_seen_us: int
    left_us: int | None = None


@dataclass(frozen=True, slots=True)
class SessionRecord:
    session_id: str
    user_id: str
    language: str | None
    metadata: dict[str, Any]
    is_active: bool  # as written: "ended" is stored, idleness is judged on read
    created_us: int
    last_activity_us: int
    ended_us: int | None
    updated_us: int  # when this version was written; orders competing writers
    version: int = 0
    context: dict[str, Any] = field(default_factory=dict)
    participants: tuple[Participant, ...] = ()

    @property
    def nbytes(self) -> int:
        extra = len(repr(self.metadata)) + len(repr(self.context)) + 160 * len(self.participants)
        return extra + len(self.session_id) + len(self.user_id) + 256


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    snapshot_id: str
    user_id: str
    name: str
    created_us: int
    size: int  # bytes of state and messages captured


@dataclass(frozen=True, slots=True)
class Snapshot:
    info: SnapshotInfo
    state: dict[str, Any] | None
    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class Retention:
    """How long data lives after its last activity (Firestore's TTL policy deletes it)."""

    session: float = 7 * 86400.0
    state: float = 30 * 86400.0
    profile: float = 30 * 86400.0
    snapshot: float = 30 * 86400.0

    def expired(self, kind: str, last_us: int, now_us: int) -> bool:
        return now_us >= last_us + int(getattr(self, kind) * 1_000_000)


@dataclass(frozen=True, slots=True)
class Profile:
    user_id: str
    created_us: int
    updated_us: int
    messages: tuple[Message, ...]  # oldest first, at most the cap asked for
    version: int = 0


@dataclass(frozen=True, slots=True)
class WipeReport:
    user_state: bool
    user_profile: bool
    session_ids: list[str]
    snapshots: int = 0


@dataclass(frozen=True, slots=True)
class StoreCounts:
    active_sessions: int
    active_users: int
    profiles: int


ChangeKind = Literal["state", "profile", "session", "user_wiped", "session_deleted"]


@dataclass(frozen=True, slots=True)
class Change:
    kind: ChangeKind
    key: str
    version: int = 0  # the document's version; for a wipe or delete, its time in microseconds


@dataclass
class ChangeBatch:
    changes: list[Change] = field(default_factory=list)
    cursor: Any = None


class Store(Protocol):
    async def get_state(self, user_id: str) -> UserState | None: ...

    async def put_state(self, state: UserState) -> int | None:
        """Write unless a newer state or a later wipe is stored: the new version, or None."""
        ...

    async def get_profile(self, user_id: str, cap: int) -> Profile | None: ...

    async def append_messages(
        self, user_id: str, messages: Sequence[Message], cap: int
    ) -> int | None:
        """Merge into the history, keeping at least the newest `cap`: the new version, or None
        when a wipe stamped after every message dropped them all."""
        ...

    async def get_session(self, session_id: str) -> SessionRecord | None: ...

    async def put_session(self, session: SessionRecord) -> int | None:
        """Upsert unless a newer write or a later wipe is stored, or the session belongs to
        another user (then None); keeps the first createdAt and the active_users index in step."""
        ...

    async def active_sessions(self, user_id: str) -> list[SessionRecord]: ...

    async def list_sessions(
        self, user_id: str, limit: int, after: tuple[int, str] | None = None
    ) -> list[SessionRecord]:
        """A page of the user's sessions, newest lastActivity first; `after` is the
        (lastActivity, sessionId) of the previous page's last one."""
        ...

    async def replace_history(
        self, user_id: str, messages: Sequence[Message], at_us: int, cap: int
    ) -> int | None:
        """Make the history exactly `messages`; appends stamped at or before `at_us` that
        arrive later are dropped (they belonged to the history this replaced)."""
        ...

    async def put_snapshot(self, snapshot: Snapshot, keep: int) -> list[str]:
        """Store a snapshot; drop the user's oldest beyond `keep`. Returns the dropped ids."""
        ...

    async def list_snapshots(self, user_id: str) -> list[SnapshotInfo]:
        """Newest first."""
        ...

    async def get_snapshot(self, user_id: str, snapshot_id: str) -> Snapshot | None: ...

    async def delete_snapshot(self, user_id: str, snapshot_id: str) -> bool: ...

    async def wipe_user(self, user_id: str, at_us: int) -> WipeReport: ...

    async def delete_session(self, session_id: str, at_us: int) -> SessionRecord | None: ...

    async def counts(self, now_us: int, active_since_us: int) -> StoreCounts:
        """Sessions active since `active_since_us`, their users, and unexpired profiles."""
        ...

    async def changes_since(self, cursor: Any) -> ChangeBatch:
        """What other writers changed since `cursor` (None: from now on)."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def newest(messages: Sequence[Message], cap: int) -> tuple[Message, ...]:
    """The newest `cap` messages, oldest first, without duplicates."""
    unique = {m.id: m for m in messages}
    ordered = sorted(unique.values(), key=lambda m: m.id)
    return tuple(ordered[-cap:]) if cap > 0 else ()


def after_last_silence(messages: Sequence[Message], silence_us: int) -> list[Message]:
    """Messages (oldest first) after the last gap of `silence_us` or more between two of them:
    a profile idle that long expired, and what came before it must not come back."""
    ordered = sorted(messages, key=lambda m: m.id)
    start = 0
    for i in range(1, len(ordered)):
        if ordered[i].at_us - ordered[i - 1].at_us >= silence_us:
            start = i
    return ordered[start:]
