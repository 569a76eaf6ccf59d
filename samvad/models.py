"""Request and response bodies: pydantic models, camelCase on the wire (the design note's API)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class WireModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", strict=True
    )


# ---- requests ---------------------------------------------------------------------------------


class AppendMessageRequest(WireModel):
    role: Literal["user", "assistant", "system"]
    content: str = Field(min_length=1)


class CreateSessionRequest(WireModel):
    session_id: str | None = None
    user_id: str
    language: str | None = Field(default=None, max_length=64)
    metadata: dict[str, Any] | None = None


class RefreshRequest(WireModel):
    user_id: str


# ---- responses --------------------------------------------------------------------------------


class Ok(WireModel):
    success: Literal[True] = True
    message: str | None = None
    durable: bool | None = Field(
        default=None, description="present when ?durable=true was asked: false if not yet stored"
    )


class ErrorResponse(WireModel):
    success: Literal[False] = False
    error: str


class StateSaved(Ok):
    user_id: str


class StateResponse(Ok):
    user_id: str
    state: dict[str, Any] = Field(
        description="the stored object, plus the server-set updatedAt and isActive"
    )


class MessageOut(WireModel):
    role: str
    content: str
    timestamp: str


class ProfileOut(WireModel):
    user_id: str
    conversation_history: list[MessageOut]
    preferences: dict[str, Any]
    history_length: int
    created_at: str
    last_updated: str


class ProfileResponse(Ok):
    user_id: str
    profile: ProfileOut


class MessageAppended(Ok):
    user_id: str
    timestamp: str


class ParticipantOut(WireModel):
    user_id: str
    device_id: str | None = None
    platform: str | None = None
    joined_at: str
    last_seen: str
    left_at: str | None = None


class SessionOut(WireModel):
    id: str
    user_id: str
    language: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    context: dict[str, Any] = Field(default_factory=dict)
    status: Literal["active", "ended", "abandoned", "archived"]
    is_active: bool = Field(description="status == active (the design note's field)")
    created_at: str
    last_activity: str
    ended_at: str | None = None
    abandoned_at: str | None = None
    participants: list[ParticipantOut] = Field(default_factory=list)


class SessionSaved(Ok):
    session_id: str
    user_id: str
    language: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    created: bool


class SessionResponse(Ok):
    session: SessionOut


class SessionEnded(Ok):
    session_id: str
    ended_at: str


class ActiveSessions(Ok):
    user_id: str
    count: int
    sessions: list[SessionOut]


class UserCleared(WireModel):
    user_state: bool
    user_profile: bool
    sessions: int
    interruptions: int
    snapshots: int = 0


class UserRefreshed(Ok):
    user_id: str
    cleared: UserCleared


class SessionCleared(WireModel):
    session: bool
    interruptions: int


class SessionDeleted(Ok):
    session_id: str
    cleared: SessionCleared


class BacklogOut(WireModel):
    entries: int
    bytes: int
    oldest_age_seconds: float


class StatsOut(WireModel):
    active_users: int | None = Field(description="null: Firestore unreachable, never counted")
    active_sessions: int | None
    total_profiles: int | None
    total_interruptions: int = Field(description="held in memory on this instance")
    backlog: BacklogOut
    firestore_reachable: bool
    age_seconds: float | None = Field(description="how old the Firestore counts are")


class StatsResponse(Ok):
    stats: StatsOut


class ReadyOut(WireModel):
    ready: bool
    firestore_reachable: bool
    backlog: BacklogOut
    accepting_writes: bool


# ---- lifecycle ----------------------------------------------------------------------------------


class SessionPage(Ok):
    user_id: str
    sessions: list[SessionOut]
    next_cursor: str | None = Field(default=None, description="absent on the last page")


class PatchSessionRequest(WireModel):
    metadata: dict[str, Any] | None = Field(default=None, description="merge patch: null removes")
    context: dict[str, Any] | None = Field(default=None, description="merge patch: null removes")


class ShareRequest(WireModel):
    key: str = Field(min_length=1, max_length=256)
    value: Any


class Shared(Ok):
    user_id: str
    key: str
    session_ids: list[str]


class SnapshotRequest(WireModel):
    name: str = Field(min_length=1, max_length=200)


class SnapshotOut(WireModel):
    id: str
    name: str
    created_at: str
    size: int


class SnapshotCreated(Ok):
    user_id: str
    snapshot: SnapshotOut


class SnapshotList(Ok):
    user_id: str
    count: int
    snapshots: list[SnapshotOut]


class SnapshotRestored(Ok):
    user_id: str
    restored: SnapshotOut
    undo_snapshot: SnapshotOut | None = Field(
        default=None, description="what was current before: restore it to undo"
    )


class SnapshotDeleted(Ok):
    user_id: str
    snapshot_id: str
