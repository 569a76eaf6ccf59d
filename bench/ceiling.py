"""The ceiling: the same routes and answer shapes as samvad, served by bare aiohttp from dicts.

No validation, no storage, no logging: the least any aiohttp service answering these routes must
do. Run as `python -m bench.ceiling --port N`.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from aiohttp import web


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_app() -> web.Application:
    states: dict[str, dict[str, Any]] = {}
    histories: dict[str, list[dict[str, Any]]] = {}
    routes = web.RouteTableDef()

    @routes.get("/healthz")
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    @routes.post("/api/session/{userId}/state")
    async def save_state(request: web.Request) -> web.Response:
        user_id = request.match_info["userId"]
        states[user_id] = {**await request.json(), "updatedAt": _now(), "isActive": True}
        return web.json_response({"success": True, "userId": user_id})

    @routes.get("/api/session/{userId}/state")
    async def get_state(request: web.Request) -> web.Response:
        user_id = request.match_info["userId"]
        if user_id not in states:
            return web.json_response({"success": False, "error": "not found"}, status=404)
        return web.json_response({"success": True, "userId": user_id, "state": states[user_id]})

    @routes.get("/api/session/{userId}/profile")
    async def get_profile(request: web.Request) -> web.Response:
        user_id = request.match_info["userId"]
        history = histories.get(user_id)
        if history is None:
            return web.json_response({"success": False, "error": "not found"}, status=404)
        profile = {
            "userId": user_id,
            "conversationHistory": history,
            "preferences": {"language": states.get(user_id, {}).get("language", "en")},
            "historyLength": len(history),
            "createdAt": history[0]["timestamp"],
            "lastUpdated": history[-1]["timestamp"],
        }
        return web.json_response({"success": True, "userId": user_id, "profile": profile})

    @routes.post("/api/session/{userId}/history")
    async def append_history(request: web.Request) -> web.Response:
        user_id = request.match_info["userId"]
        body = await request.json()
        now = _now()
        history = histories.setdefault(user_id, [])
        history.append({"role": body["role"], "content": body["content"], "timestamp": now})
        del history[:-100]
        return web.json_response(
            {
                "success": True,
                "message": "Message appended to history",
                "userId": user_id,
                "timestamp": now,
            }
        )

    app = web.Application()
    app.add_routes(routes)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(make_app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
