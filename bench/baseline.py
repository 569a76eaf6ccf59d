"""BASELINE, for comparison only: the session service as the design note's peers build it.

Not samvad, and not how to build it. Every request awaits Firestore through AsyncClient; an append
reads the user's profile document, adds the message, trims to 100 and writes the whole document
back (one read and one write per message, no transaction); interruptions are kept in memory, as
the design note says. Run as `python -m bench.baseline --port N` with FIRESTORE_EMULATOR_HOST and
GOOGLE_CLOUD_PROJECT set.
"""

from __future__ import annotations

import argparse
import os
from collections import deque
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from google.cloud.firestore_v1 import AsyncClient

HISTORY_CAP = 100
CLIENT: web.AppKey[AsyncClient] = web.AppKey("client", AsyncClient)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_app(project: str) -> web.Application:
    interruptions: dict[str, deque[dict[str, Any]]] = {}
    routes = web.RouteTableDef()

    def db(request: web.Request) -> AsyncClient:
        return request.app[CLIENT]

    @routes.get("/healthz")
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    @routes.post("/api/session/create")
    async def create_session(request: web.Request) -> web.Response:
        body = await request.json()
        session_id, user_id = body["sessionId"], body["userId"]
        await (
            db(request)
            .collection("sessions")
            .document(session_id)
            .set(
                {
                    "userId": user_id,
                    "language": body.get("language"),
                    "metadata": body.get("metadata") or {},
                    "isActive": True,
                    "lastActivity": _now(),
                },
                merge=True,
            )
        )
        return web.json_response(
            {"success": True, "sessionId": session_id, "userId": user_id}, status=201
        )

    @routes.put("/api/session/{sessionId}/end")
    async def end_session(request: web.Request) -> web.Response:
        session_id = request.match_info["sessionId"]
        ref = db(request).collection("sessions").document(session_id)
        await ref.update({"isActive": False, "lastActivity": _now()})
        return web.json_response({"success": True, "sessionId": session_id})

    @routes.post("/api/session/{sessionId}/interruptions")
    async def push_interruption(request: web.Request) -> web.Response:
        session_id = request.match_info["sessionId"]
        item = {**await request.json(), "timestamp": _now()}
        interruptions.setdefault(session_id, deque(maxlen=3)).append(item)
        return web.json_response(
            {"success": True, "sessionId": session_id, "interruption": item}, status=201
        )

    @routes.post("/api/session/{userId}/state")
    async def save_state(request: web.Request) -> web.Response:
        user_id = request.match_info["userId"]
        state = {**await request.json(), "updatedAt": _now(), "isActive": True}
        await db(request).collection("user_states").document(user_id).set(state)
        return web.json_response({"success": True, "userId": user_id})

    @routes.get("/api/session/{userId}/state")
    async def get_state(request: web.Request) -> web.Response:
        user_id = request.match_info["userId"]
        snap = await db(request).collection("user_states").document(user_id).get()
        if not snap.exists:
            return web.json_response({"success": False, "error": "not found"}, status=404)
        return web.json_response({"success": True, "userId": user_id, "state": snap.to_dict()})

    @routes.get("/api/session/{userId}/profile")
    async def get_profile(request: web.Request) -> web.Response:
        user_id = request.match_info["userId"]
        snap = await db(request).collection("user_profiles").document(user_id).get()
        if not snap.exists:
            return web.json_response({"success": False, "error": "not found"}, status=404)
        profile = snap.to_dict() or {}
        profile["historyLength"] = len(profile.get("conversationHistory", []))
        return web.json_response({"success": True, "userId": user_id, "profile": profile})

    @routes.post("/api/session/{userId}/history")
    async def append_history(request: web.Request) -> web.Response:
        user_id = request.match_info["userId"]
        body = await request.json()
        ref = db(request).collection("user_profiles").document(user_id)
        snap = await ref.get()
        now = _now()
        profile = snap.to_dict() if snap.exists else None
        if profile is None:
            profile = {"userId": user_id, "conversationHistory": [], "createdAt": now}
        history = profile["conversationHistory"]
        history.append({"role": body["role"], "content": body["content"], "timestamp": now})
        profile["conversationHistory"] = history[-HISTORY_CAP:]
        profile["lastUpdated"] = now
        await ref.set(profile)
        return web.json_response(
            {
                "success": True,
                "message": "Message appended to history",
                "userId": user_id,
                "timestamp": now,
            }
        )

    async def client_ctx(app: web.Application) -> Any:
        app[CLIENT] = AsyncClient(project=project)
        yield
        app[CLIENT].close()  # type: ignore[no-untyped-call]

    app = web.Application()
    app.cleanup_ctx.append(client_ctx)
    app.add_routes(routes)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="the naive baseline (for comparison only)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    project = os.environ.get("GOOGLE_CLOUD_PROJECT", "bench-baseline")
    web.run_app(make_app(project), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
