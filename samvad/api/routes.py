"""REST handlers: parse, call the service, render. Paths and shapes follow the design note."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from samvad.api import jsonio
from samvad.api.keys import SERVICE
from samvad.api.responses import json_response
from samvad.clock import iso_us
from samvad.errors import InvalidInput
from samvad.ids import RESERVED_SESSION_IDS
from samvad.models import (
    ActiveSessions,
    AppendMessageRequest,
    BacklogOut,
    CreateSessionRequest,
    MessageAppended,
    MessageOut,
    ParticipantOut,
    ProfileOut,
    ProfileResponse,
    ReadyOut,
    RefreshRequest,
    SessionCleared,
    SessionDeleted,
    SessionEnded,
    SessionOut,
    SessionResponse,
    SessionSaved,
    StateResponse,
    StateSaved,
    StatsOut,
    StatsResponse,
    UserCleared,
    UserRefreshed,
)
from samvad.service import Ack, SessionPersistenceService
from samvad.store.base import SessionRecord
from samvad.writebehind import BacklogStats

M = TypeVar("M", bound=BaseModel)
PARTIAL_HEADER = "X-Samvad-Partial"
# A session id is any document id except the words of the API's own paths.
SESSION_ID = r"{sessionId:(?!(?:" + "|".join(sorted(RESERVED_SESSION_IDS)) + r")(?:/|$))[^/]+}"

routes = web.RouteTableDef()


def to_json(model: BaseModel, keep_nulls: bool = False) -> bytes:
    """JSON of `model`; None fields are left out unless `keep_nulls` (then unset ones are)."""
    # Bytes straight from pydantic's serializer: a str body (model_dump_json) would be decoded
    # only to be re-encoded by aiohttp's payload machinery, a few µs on every response.
    serializer = model.__pydantic_serializer__
    if keep_nulls:
        return serializer.to_json(model, by_alias=True, exclude_unset=True)
    return serializer.to_json(model, by_alias=True, exclude_none=True)


def render(
    model: BaseModel,
    status: int = 200,
    headers: dict[str, str] | None = None,
    keep_nulls: bool = False,
) -> web.Response:
    return json_response(to_json(model, keep_nulls), status, headers)


class RenderedBodies:
    """JSON bodies of the hot reads, kept for as long as the record they were rendered from.

    The service's records are immutable, and a cached read returns the very same object until
    it changes: a body rendered from it is still right, so a cache hit is answered with bytes,
    without building a model or encoding. A body goes when its record is garbage (a weak
    reference's callback): what the service forgot, a wiped user's data included, is not kept
    here either, and no bound beyond the service's own caches is needed.
    """

    def __init__(self) -> None:
        self._bodies: dict[int, tuple[weakref.ref[object], bytes]] = {}

    def body(self, source: object, render: Callable[[], bytes]) -> bytes:
        key = id(source)
        found = self._bodies.get(key)
        if found is not None and found[0]() is source:
            return found[1]
        body = render()
        self._bodies[key] = (weakref.ref(source, partial(self._drop, key)), body)
        return body

    def _drop(self, key: int, ref: weakref.ref[object]) -> None:
        found = self._bodies.get(key)
        if found is not None and found[0] is ref:
            del self._bodies[key]

    def __len__(self) -> int:
        return len(self._bodies)


RENDERED = web.AppKey("rendered_bodies", RenderedBodies)


async def read_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()  # over client_max_size: 413, rendered by the edge
    try:
        data = jsonio.loads(raw)
    except ValueError:
        raise InvalidInput("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidInput("request body must be a JSON object")
    if jsonio.too_deep(raw, data):
        raise InvalidInput(f"request body is nested deeper than {jsonio.MAX_JSON_DEPTH} levels")
    return data


async def parse(request: web.Request, model: type[M]) -> M:
    data = await read_object(request)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidInput(f"{where}: {first['msg']}" if where else first["msg"]) from None


def wants_durable(request: web.Request) -> bool:
    flag = request.query.get("durable") or request.headers.get("X-Samvad-Durable") or ""
    return flag.lower() in ("1", "true", "yes")


def ack_status(ack: Ack[Any], ok: int = 200) -> int:
    """202 when a durable write was taken but is not in Firestore yet (it stays queued)."""
    return 202 if ack.durable is False else ok


def service(request: web.Request) -> SessionPersistenceService:
    return request.app[SERVICE]


def _ts(us: int | None) -> str | None:
    return iso_us(us) if us is not None else None


def session_out(svc: SessionPersistenceService, record: SessionRecord) -> SessionOut:
    status = svc.status_of(record)
    return SessionOut(
        id=record.session_id,
        user_id=record.user_id,
        language=record.language,
        metadata=record.metadata,
        context=record.context,
        status=status,
        is_active=status == "active",
        created_at=iso_us(record.created_us),
        last_activity=iso_us(record.last_activity_us),
        ended_at=_ts(record.ended_us),
        abandoned_at=_ts(svc.abandoned_at(record)),
        participants=[
            ParticipantOut(
                user_id=p.user_id,
                device_id=p.device_id,
                platform=p.platform,
                joined_at=iso_us(p.joined_us),
                last_seen=iso_us(p.last_seen_us),
                left_at=_ts(p.left_us),
            )
            for p in record.participants
        ],
    )


def backlog_out(stats: BacklogStats) -> BacklogOut:
    return BacklogOut(
        entries=stats.entries, bytes=stats.bytes, oldest_age_seconds=round(stats.oldest_age, 3)
    )


def _partial(partial: bool) -> dict[str, str] | None:
    return {PARTIAL_HEADER: "true"} if partial else None


# ---- health -------------------------------------------------------------------------------------


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    svc = service(request)
    accepting = not svc.writer.full and svc.writer.accepting
    body = ReadyOut(
        ready=accepting,
        firestore_reachable=svc.health.reachable,
        backlog=backlog_out(svc.writer.stats()),
        accepting_writes=accepting,
    )
    return render(body, 200 if accepting else 503)


# ---- the API paths that are not ids come first ---------------------------------------------------


@routes.get("/api/session/stats")
async def get_stats(request: web.Request) -> web.Response:
    stats = await service(request).get_stats()
    counts = stats.counts
    out = StatsOut(
        active_users=counts.active_users if counts else None,
        active_sessions=counts.active_sessions if counts else None,
        total_profiles=counts.profiles if counts else None,
        total_interruptions=stats.total_interruptions,
        backlog=backlog_out(stats.backlog),
        firestore_reachable=stats.firestore_reachable,
        age_seconds=round(stats.age, 3) if stats.age is not None else None,
    )
    # nulls are shown: a dashboard must tell "unknown" from "absent"
    return render(StatsResponse(success=True, stats=out), keep_nulls=True)


@routes.post("/api/session/create")
async def create_session(request: web.Request) -> web.Response:
    body = await parse(request, CreateSessionRequest)
    ack, created = await service(request).save_session(
        body.session_id, body.user_id, body.language, body.metadata, wants_durable(request)
    )
    record = ack.value
    out = SessionSaved(
        message="Session created successfully" if created else "Session updated successfully",
        session_id=record.session_id,
        user_id=record.user_id,
        language=record.language,
        metadata=record.metadata,
        created=created,
        durable=ack.durable,
    )
    return render(out, ack_status(ack, 201 if created else 200))


@routes.post("/api/session/refresh")
async def refresh_user(request: web.Request) -> web.Response:
    body = await parse(request, RefreshRequest)
    report = await service(request).clear_user_data(body.user_id)
    cleared = UserCleared(
        user_state=report.user_state,
        user_profile=report.user_profile,
        sessions=report.sessions,
        interruptions=report.interruptions,
        snapshots=report.snapshots,
    )
    out = UserRefreshed(
        message="User data cleared successfully", user_id=body.user_id, cleared=cleared
    )
    return render(out)


@routes.get("/api/session/user/{userId}/active")
async def active_sessions(request: web.Request) -> web.Response:
    user_id = request.match_info["userId"]
    found = await service(request).get_user_active_sessions(user_id)
    out = ActiveSessions(
        user_id=user_id,
        count=len(found.sessions),
        sessions=[session_out(service(request), s) for s in found.sessions],
    )
    return render(out, headers=_partial(found.partial))


# ---- per user ------------------------------------------------------------------------------------


@routes.post("/api/session/{userId}/state")
async def save_state(request: web.Request) -> web.Response:
    user_id = request.match_info["userId"]
    data = await read_object(request)
    ack = await service(request).save_user_state(user_id, data, wants_durable(request))
    out = StateSaved(message="User state saved successfully", user_id=user_id, durable=ack.durable)
    return render(out, ack_status(ack))


@routes.get("/api/session/{userId}/state")
async def get_state(request: web.Request) -> web.Response:
    state = await service(request).get_user_state(request.match_info["userId"])

    def state_json() -> bytes:
        shown = {**state.data, "updatedAt": iso_us(state.updated_us), "isActive": True}
        return to_json(StateResponse(user_id=state.user_id, state=shown))

    return json_response(request.app[RENDERED].body(state, state_json))


@routes.get("/api/session/{userId}/profile")
async def get_profile(request: web.Request) -> web.Response:
    view = await service(request).get_user_profile(request.match_info["userId"])

    def profile_json() -> bytes:
        profile = ProfileOut(
            user_id=view.user_id,
            conversation_history=[
                MessageOut(role=m.role, content=m.content, timestamp=iso_us(m.at_us))
                for m in view.messages
            ],
            preferences=view.preferences,
            history_length=len(view.messages),
            created_at=iso_us(view.created_us),
            last_updated=iso_us(view.updated_us),
        )
        return to_json(ProfileResponse(user_id=view.user_id, profile=profile))

    body = request.app[RENDERED].body(view, profile_json)
    return json_response(body, headers=_partial(view.partial))


@routes.post("/api/session/{userId}/history")
async def append_history(request: web.Request) -> web.Response:
    user_id = request.match_info["userId"]
    body = await parse(request, AppendMessageRequest)
    ack = await service(request).append_to_user_history(
        user_id, body.role, body.content, wants_durable(request)
    )
    out = MessageAppended(
        message="Message appended to history",
        user_id=user_id,
        timestamp=iso_us(ack.value.at_us),
        durable=ack.durable,
    )
    return render(out, ack_status(ack))


# ---- per session ---------------------------------------------------------------------------------


@routes.get("/api/session/" + SESSION_ID)
async def get_session(request: web.Request) -> web.Response:
    record = await service(request).get_session(request.match_info["sessionId"])
    return render(SessionResponse(session=session_out(service(request), record)))


@routes.put("/api/session/" + SESSION_ID + "/end")
async def end_session(request: web.Request) -> web.Response:
    ack = await service(request).end_session(
        request.match_info["sessionId"], wants_durable(request)
    )
    out = SessionEnded(
        message="Session ended successfully",
        session_id=ack.value.session_id,
        ended_at=iso_us(ack.value.ended_us or ack.value.updated_us),
        durable=ack.durable,
    )
    return render(out, ack_status(ack))


@routes.delete("/api/session/" + SESSION_ID)
async def delete_session(request: web.Request) -> web.Response:
    session_id = request.match_info["sessionId"]
    report = await service(request).clear_session(session_id)
    out = SessionDeleted(
        message="Session cleared successfully",
        session_id=session_id,
        cleared=SessionCleared(session=True, interruptions=report.interruptions),
    )
    return render(out)
