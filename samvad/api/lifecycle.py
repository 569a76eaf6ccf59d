"""Lifecycle routes: listing, context, snapshots and the GDPR export."""

from __future__ import annotations

import base64
import json
from typing import Any

from aiohttp import web

from samvad.api.middlewares import prepare
from samvad.api.routes import SESSION_ID, parse, render, service, session_out
from samvad.clock import iso, iso_us
from samvad.errors import InvalidInput, NotFound
from samvad.models import (
    PatchSessionRequest,
    SessionPage,
    SessionResponse,
    Shared,
    ShareRequest,
    SnapshotCreated,
    SnapshotDeleted,
    SnapshotList,
    SnapshotOut,
    SnapshotRequest,
    SnapshotRestored,
)
from samvad.service import Status
from samvad.store.base import Message, SnapshotInfo

STATUSES: tuple[Status, ...] = ("active", "ended", "abandoned", "archived")
MAX_PAGE = 100

lifecycle_routes = web.RouteTableDef()


def encode_cursor(key: tuple[int, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at_us, session_id = json.loads(raw)
    except (ValueError, TypeError):
        raise InvalidInput("cursor is not one this server gave out") from None
    if not isinstance(at_us, int) or not isinstance(session_id, str):
        raise InvalidInput("cursor is not one this server gave out")
    return at_us, session_id


def snapshot_out(info: SnapshotInfo) -> SnapshotOut:
    return SnapshotOut(
        id=info.snapshot_id,
        name=info.name,
        created_at=iso_us(info.created_us),
        size=info.size,
    )


@lifecycle_routes.get("/api/session/user/{userId}/sessions")
async def list_sessions(request: web.Request) -> web.Response:
    user_id = request.match_info["userId"]
    status = request.query.get("status") or None
    if status is not None and status not in STATUSES:
        raise InvalidInput(f"status must be one of: {', '.join(STATUSES)}")
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        raise InvalidInput("limit must be an integer") from None
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}")
    cursor = request.query.get("cursor")
    svc = service(request)
    found, next_key = await svc.list_user_sessions(
        user_id,
        status,
        limit,
        decode_cursor(cursor) if cursor else None,
    )
    page = SessionPage(
        user_id=user_id,
        sessions=[session_out(svc, r) for r in found],
        next_cursor=encode_cursor(next_key) if next_key else None,
    )
    return render(page)


@lifecycle_routes.patch("/api/session/" + SESSION_ID)
async def patch_session(request: web.Request) -> web.Response:
    body = await parse(request, PatchSessionRequest)
    svc = service(request)
    record = await svc.update_session(request.match_info["sessionId"], body.metadata, body.context)
    return render(SessionResponse(session=session_out(svc, record)))


@lifecycle_routes.post("/api/session/user/{userId}/share")
async def share(request: web.Request) -> web.Response:
    user_id = request.match_info["userId"]
    body = await parse(request, ShareRequest)
    shared = await service(request).share_context(user_id, body.key, body.value)
    return render(Shared(user_id=user_id, key=body.key, session_ids=shared))


@lifecycle_routes.post("/api/session/{userId}/snapshots")
async def create_snapshot(request: web.Request) -> web.Response:
    user_id = request.match_info["userId"]
    body = await parse(request, SnapshotRequest)
    info = await service(request).create_snapshot(user_id, body.name)
    return render(SnapshotCreated(user_id=user_id, snapshot=snapshot_out(info)), 201)


@lifecycle_routes.get("/api/session/{userId}/snapshots")
async def list_snapshots(request: web.Request) -> web.Response:
    user_id = request.match_info["userId"]
    infos = await service(request).list_snapshots(user_id)
    out = SnapshotList(
        user_id=user_id, count=len(infos), snapshots=[snapshot_out(i) for i in infos]
    )
    return render(out)


@lifecycle_routes.post("/api/session/{userId}/snapshots/{snapshotId}/restore")
async def restore_snapshot(request: web.Request) -> web.Response:
    user_id = request.match_info["userId"]
    restored, undo = await service(request).restore_snapshot(
        user_id, request.match_info["snapshotId"]
    )
    out = SnapshotRestored(
        message="Snapshot restored",
        user_id=user_id,
        restored=snapshot_out(restored),
        undo_snapshot=snapshot_out(undo) if undo else None,
    )
    return render(out)


@lifecycle_routes.delete("/api/session/{userId}/snapshots/{snapshotId}")
async def delete_snapshot(request: web.Request) -> web.Response:
    user_id = request.match_info["userId"]
    snapshot_id = request.match_info["snapshotId"]
    await service(request).delete_snapshot(user_id, snapshot_id)
    return render(SnapshotDeleted(user_id=user_id, snapshot_id=snapshot_id))


def _messages(messages: tuple[Message, ...]) -> list[dict[str, Any]]:
    return [{"role": m.role, "content": m.content, "timestamp": iso_us(m.at_us)} for m in messages]


@lifecycle_routes.get("/api/session/{userId}/export")
async def export_user(request: web.Request) -> web.StreamResponse:
    """Everything samvad holds about a user, as one JSON document written piece by piece:
    sessions and snapshots are fetched page by page, never all held in memory at once."""
    user_id = request.match_info["userId"]
    svc = service(request)
    try:
        state: dict[str, Any] | None = (await svc.get_user_state(user_id)).data
    except NotFound:
        state = None
    try:
        profile = await svc.get_user_profile(user_id)
        history = _messages(profile.messages)
    except NotFound:
        history = []
    first_page, cursor = await svc.list_user_sessions(user_id, None, MAX_PAGE, None)
    snapshots = await svc.list_snapshots(user_id)

    response = web.StreamResponse(
        headers={
            "Content-Type": "application/json",
            "Content-Disposition": 'attachment; filename="samvad-export.json"',
        }
    )
    await prepare(request, response)

    async def put(text: str) -> None:
        await response.write(text.encode())

    def dump(value: Any) -> str:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)

    def session_json(record: Any) -> str:
        return session_out(svc, record).model_dump_json(by_alias=True, exclude_none=True)

    await put(
        '{"success":true,"userId":'
        + dump(user_id)
        + ',"exportedAt":'
        + dump(iso(svc.clock.now()))
        + ',"state":'
        + dump(state)
        + ',"history":'
        + dump(history)
        + ',"sessions":['
    )
    page, first = first_page, True
    while True:
        for record in page:
            await put(("" if first else ",") + session_json(record))
            first = False
        if cursor is None:
            break
        page, cursor = await svc.list_user_sessions(user_id, None, MAX_PAGE, cursor)
    await put('],"snapshots":[')
    for i, info in enumerate(snapshots):
        snapshot = await svc.get_snapshot(user_id, info.snapshot_id)
        entry = {
            **snapshot_out(info).model_dump(by_alias=True),
            "state": snapshot.state,
            "history": _messages(snapshot.messages),
        }
        await put(("," if i else "") + dump(entry))
    interruptions = {
        sid: [{**item.data, "timestamp": iso_us(item.at_us)} for item in items]
        for sid, items in svc.interruptions_of(user_id).items()
    }
    await put('],"interruptions":' + dump(interruptions) + "}")
    await response.write_eof()
    return response
