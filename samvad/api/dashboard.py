"""`GET /dashboard`: one self-contained page (no CDN, works offline) that polls the JSON
endpoints the service already has and draws them; its data calls carry the admin key it asks
for, the page itself holds nothing secret."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from samvad.api.middlewares import add_routes

# The page may run only its own inline script and talk only to this origin.
_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


def dashboard_html() -> bytes:
    return resources.files("samvad.api").joinpath("static/dashboard.html").read_bytes()


def setup_dashboard(app: web.Application) -> None:
    page = dashboard_html()  # read once: a missing package data file fails at start, not later

    async def dashboard(request: web.Request) -> web.Response:
        return web.Response(
            body=page,
            content_type="text/html",
            charset="utf-8",
            headers={
                "Cache-Control": "no-cache",
                "Content-Security-Policy": _CSP,
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
            },
        )

    add_routes(app, [web.get("/dashboard", dashboard)])
