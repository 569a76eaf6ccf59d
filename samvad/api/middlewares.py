"""The one place where errors become HTTP answers: JSON bodies, never a traceback."""

from __future__ import annotations

import logging
import math

from aiohttp import web
from aiohttp.typedefs import Handler

from samvad.errors import BacklogFull, SamvadError, ShuttingDown, StoreUnavailable
from samvad.models import ErrorResponse

log = logging.getLogger(__name__)


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=ErrorResponse(error=message).model_dump_json(by_alias=True),
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except SamvadError as exc:
        headers = {}
        if isinstance(exc, BacklogFull | StoreUnavailable | ShuttingDown):
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        return error_response(exc.status, exc.message, headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        message = {
            404: "not found",
            405: "method not allowed",
            413: "request body too large",
        }.get(exc.status, exc.reason.lower())
        return error_response(exc.status, message, headers)
    except Exception:
        log.exception("unhandled error", extra={"json_fields": {"route": _route(request)}})
        return error_response(500, "internal error")


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"
