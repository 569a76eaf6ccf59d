"""The `samvad` command against a real server process on the emulator."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from samvad.emulator import find_free_port
from tests.support import ROOT, ServerProcess, wait_for


class Run:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code, self.stdout, self.stderr = code, stdout, stderr

    def json(self) -> Any:
        return json.loads(self.stdout)


async def samvad(*args: str, stdin: int | None = None, env: dict[str, str] | None = None) -> Run:
    """`samvad ARGS` as a user would run it (python -m samvad.cli is the console script's code)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "samvad.cli",
        *args,
        stdin=stdin if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


@pytest.fixture
async def server(tmp_path: Path, project_id: str, emulator_host: str) -> AsyncIterator[str]:
    process = ServerProcess(project_id, emulator_host, tmp_path, sync_interval=0.5)
    await process.start()
    try:
        yield process.url
    finally:
        await process.kill()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def seed(http: aiohttp.ClientSession, url: str, user: str) -> None:
    api = f"{url}/api/session"
    calls: list[tuple[str, dict[str, Any]]] = [
        (f"{api}/{user}/state", {"language": "hi", "step": 3}),
        (f"{api}/{user}/history", {"role": "user", "content": "namaste"}),
        (f"{api}/{user}/history", {"role": "assistant", "content": "how can I help?"}),
        (f"{api}/create", {"userId": user, "sessionId": f"{user}-session"}),
    ]
    for target, body in calls:
        async with http.post(target + "?durable=true", json=body) as response:
            assert response.status in (200, 201), await response.text()


def test_the_console_script_is_the_cli() -> None:
    (script,) = entry_points(group="console_scripts", name="samvad")
    assert script.value == "samvad.cli:main"


async def test_stats_export_and_wipe_with_yes(server: str, http: aiohttp.ClientSession) -> None:
    await seed(http, server, "meera")

    stats = await samvad("stats", "--url", server)
    assert stats.code == 0, stats.stderr
    body = stats.json()
    assert body["success"] is True and body["stats"]["firestoreReachable"] is True
    assert stats.stderr.startswith("samvad: ")

    exported = await samvad("export", "meera", "--url", server)
    assert exported.code == 0, exported.stderr
    data = exported.json()
    assert data["userId"] == "meera"
    assert data["state"]["language"] == "hi" and data["state"]["step"] == 3
    assert [m["content"] for m in data["history"]] == ["namaste", "how can I help?"]
    assert [s["id"] for s in data["sessions"]] == ["meera-session"]

    wiped = await samvad("wipe", "meera", "--yes", "--url", server)
    assert wiped.code == 0, wiped.stderr
    assert wiped.json()["userId"] == "meera"
    async with http.get(f"{server}/api/session/meera/profile") as response:
        assert response.status == 404
    async with http.get(f"{server}/api/session/meera/state") as response:
        assert response.status == 404


async def test_wipe_asks_on_a_terminal_and_refuses_without_one(
    server: str, http: aiohttp.ClientSession
) -> None:
    await seed(http, server, "ravi")

    refused = await samvad("wipe", "ravi", "--url", server)  # stdin: /dev/null, not a terminal
    assert refused.code == 2
    assert "--yes" in refused.stderr and "Traceback" not in refused.stderr

    async def wipe_on_terminal(answer: str) -> Run:
        controller, terminal = pty.openpty()
        try:
            os.write(controller, answer.encode() + b"\n")
            return await samvad("wipe", "ravi", "--url", server, stdin=terminal)
        finally:
            os.close(controller)
            os.close(terminal)

    declined = await wipe_on_terminal("no")
    assert declined.code == 2
    assert "Type the user id to confirm" in declined.stderr
    assert "nothing was wiped" in declined.stderr
    async with http.get(f"{server}/api/session/ravi/profile") as response:
        assert response.status == 200  # still there

    confirmed = await wipe_on_terminal("ravi")
    assert confirmed.code == 0, confirmed.stderr
    async with http.get(f"{server}/api/session/ravi/profile") as response:
        assert response.status == 404


async def test_errors_are_one_clear_line() -> None:
    closed = f"http://127.0.0.1:{find_free_port()}"
    result = await samvad("stats", "--url", closed)
    assert result.code == 1
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.strip().splitlines() if line.startswith("samvad:")
    ]
    assert "connection refused" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


async def test_token_is_sent_and_http_errors_show_the_servers_message(
    tmp_path: Path, project_id: str, emulator_host: str
) -> None:
    admin_key = "admin-" + secrets.token_urlsafe(24)
    process = ServerProcess(
        project_id, emulator_host, tmp_path, auth="required", api_keys=f"admin:{admin_key}"
    )
    await process.start()
    try:
        ok = await samvad("stats", "--url", process.url, "--token", admin_key)
        assert ok.code == 0, ok.stderr
        assert ok.json()["success"] is True
        from_env = await samvad("stats", "--url", process.url, env={"SAMVAD_TOKEN": admin_key})
        assert from_env.code == 0, from_env.stderr

        for token in (["--token", "not-a-key-0123456789"], []):
            refused = await samvad("stats", "--url", process.url, *token, env={"SAMVAD_TOKEN": ""})
            assert refused.code == 1
            (line,) = refused.stderr.strip().splitlines()[-1:]
            assert line.startswith("samvad: error: GET /api/session/stats: HTTP 401: ")
            assert len(line) > len("samvad: error: GET /api/session/stats: HTTP 401: ")
            assert "Traceback" not in refused.stderr
    finally:
        await process.kill()


async def test_bad_input_shows_the_servers_message(server: str) -> None:
    result = await samvad("export", "__reserved__", "--url", server)
    assert result.code == 1
    assert "HTTP 400" in result.stderr and "reserved" in result.stderr
    assert "Traceback" not in result.stderr


async def test_serve_runs_the_server_and_stops_on_sigterm(
    project_id: str, emulator_host: str
) -> None:
    port = find_free_port()
    env = {
        **os.environ,
        "GOOGLE_CLOUD_PROJECT": project_id,
        "FIRESTORE_EMULATOR_HOST": emulator_host,
        "SAMVAD_AUTH": "none",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "samvad.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with aiohttp.ClientSession() as http:

            async def healthy() -> bool:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_for(healthy, within=30)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_emulator_command_is_the_launcher() -> None:
    helped = await samvad("emulator", "--help")
    assert helped.code == 0
    assert "python -m samvad.emulator" in helped.stdout
    for command in ("run", "start", "check"):
        assert command in helped.stdout
    listed = await samvad("--help")
    assert listed.code == 0
    for command in ("serve", "emulator", "stats", "export", "wipe"):
        assert command in listed.stdout
