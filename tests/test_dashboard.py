"""The live dashboard in a real headless Chromium (Debian's, driven by Playwright): it loads
offline, shows the figures, follows writes as they happen, and asks for a key when refused."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from samvad.app import create_app
from samvad.config import Settings

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium: run `make browser`",
)

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def page() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        context = await browser.new_context(viewport={"width": 1280, "height": 1000})
        try:
            yield await context.new_page()
        finally:
            await browser.close()


async def text(page: Any, element_id: str) -> str:
    content: str = await page.text_content(f"#{element_id}")
    return content


async def wait_text(page: Any, element_id: str, expected: str, within_ms: float = 20_000) -> None:
    await page.wait_for_function(
        "([id, want]) => document.getElementById(id).textContent.trim() === want",
        arg=[element_id, expected],
        timeout=within_ms,
    )


async def test_dashboard_shows_live_figures_and_follows_writes(client: Client, page: Any) -> None:
    origin = str(client.make_url("/")).rstrip("/")
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    # polled every 0.5 s instead of 2 s: the same page, sooner
    response = await page.goto(f"{origin}/dashboard?poll=0.5")
    assert response.status == 200
    assert "samvad" in await page.title()
    await page.wait_for_function(
        "() => document.getElementById('firestorePill').textContent === 'Firestore reachable'"
    )
    await wait_text(page, "activeSessions", "0")
    await wait_text(page, "totalProfiles", "0")
    assert await text(page, "readyPill") == "Ready"
    flushes_before = int(await text(page, "flushes"))

    for user in ("asha", "bilal"):
        created = await client.post(
            "/api/session/create?durable=true", json={"userId": user, "sessionId": f"s-{user}"}
        )
        assert created.status == 201
        for i in range(3):
            appended = await client.post(
                f"/api/session/{user}/history?durable=true",
                json={"role": "user", "content": f"hello {i}"},
            )
            assert appended.status == 200

    # the page catches up on its own polling: the figures change without a reload
    await wait_text(page, "activeSessions", "2")
    await wait_text(page, "totalProfiles", "2")
    await page.wait_for_function(
        "(before) => Number(document.getElementById('flushes').textContent) > before",
        arg=flushes_before,
    )
    # the request-rate chart has drawn a line of several polls, the routes table lists the writes
    await page.wait_for_function(
        "() => (document.querySelector('#rpsChart polyline')?.getAttribute('points') || '')"
        ".split(' ').length >= 6"
    )
    await page.wait_for_function(
        "() => document.getElementById('routes').textContent"
        ".includes('/api/session/{userId}/history')"
    )
    assert await page.is_hidden("#banner")

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    # self-contained: nothing but this server was asked for anything
    assert requested and all(url.startswith(origin) for url in requested), requested
    assert not errors, errors


async def test_with_authentication_on_it_asks_for_an_admin_key(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings], page: Any
) -> None:
    admin_key = "admin-" + secrets.token_urlsafe(24)
    settings = make_settings(auth="required", api_keys=f"admin:{admin_key}")
    client: Client = await aiohttp_client(create_app(settings))
    origin = str(client.make_url("/")).rstrip("/")
    sent: list[str | None] = []
    page.on(
        "request",
        lambda request: (
            sent.append(request.headers.get("authorization"))
            if "/api/metrics/summary" in request.url
            else None
        ),
    )

    await page.goto(f"{origin}/dashboard?poll=0.5")  # the page itself needs no key
    await page.wait_for_selector("#banner", state="visible")
    assert "requires an admin key" in await text(page, "banner")
    assert await text(page, "activeSessions") == "—"
    assert sent and sent[0] is None

    await page.fill("#adminKey", "not-the-key-0123456789")
    await page.click("#keyForm button[type=submit]")
    await page.wait_for_function(
        "() => document.getElementById('banner').textContent.includes('was refused')"
    )

    await page.fill("#adminKey", admin_key)
    await page.click("#keyForm button[type=submit]")
    await page.wait_for_selector("#banner", state="hidden")
    await wait_text(page, "activeSessions", "0")
    assert sent[-1] == f"Bearer {admin_key}"
    # kept for this tab only, and never left in the page
    stored = await page.evaluate("() => sessionStorage.getItem('samvad.adminKey')")
    assert stored == admin_key
    assert await page.input_value("#adminKey") == ""
    assert await page.evaluate("() => localStorage.length") == 0


async def test_dashboard_page_is_served_self_contained(client: Client) -> None:
    response = await client.get("/dashboard")
    assert response.status == 200
    assert response.content_type == "text/html"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    html = await response.text()
    assert "<script src" not in html and 'rel="stylesheet"' not in html  # inline, no CDN
    assert "http://" not in html and "https://" not in html
