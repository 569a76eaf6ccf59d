"""How samvad's answers are built: JSON bodies, with the security headers every response carries.

A JSON answer is made with all of its headers at once, from one prebuilt set (a copy in C),
rather than a header at a time after its handler returned (every request's cost). Other
responses (aiohttp's own errors, the dashboard, streams, websocket upgrades) get the security
headers from the edge (`samvad.api.security.security_headers`).
"""

from __future__ import annotations

from aiohttp import hdrs, web
from multidict import CIMultiDict

from samvad.models import ErrorResponse

SECURITY_HEADERS = {
    hdrs.X_CONTENT_TYPE_OPTIONS: "nosniff",
    hdrs.REFERRER_POLICY: "no-referrer",
    hdrs.X_FRAME_OPTIONS: "DENY",
    # Cloud Run serves over TLS only: browsers should never try plain HTTP.
    hdrs.STRICT_TRANSPORT_SECURITY: "max-age=63072000; includeSubDomains",
    hdrs.CACHE_CONTROL: "no-store",
}
JSON_CSP = "default-src 'none'; frame-ancestors 'none'"
JSON_HEADERS: CIMultiDict[str] = CIMultiDict(
    {
        hdrs.CONTENT_TYPE: "application/json",
        **SECURITY_HEADERS,
        hdrs.CONTENT_SECURITY_POLICY: JSON_CSP,
    }
)


class JsonResponse(web.Response):
    """A JSON answer, made with the security headers: the edge has none left to add."""


def json_response(
    body: bytes, status: int = 200, headers: dict[str, str] | None = None
) -> JsonResponse:
    """An answer with a JSON `body` (bytes, already encoded) and the security headers."""
    if headers:
        all_headers = JSON_HEADERS.copy()
        all_headers.update(headers)
        return JsonResponse(status=status, body=body, headers=all_headers)
    return JsonResponse(status=status, body=body, headers=JSON_HEADERS)  # aiohttp copies it


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JsonResponse:
    """`{"success": false, "error": message}` with `status`."""
    body = ErrorResponse(error=message).model_dump_json(by_alias=True).encode()
    return json_response(body, status, headers)
