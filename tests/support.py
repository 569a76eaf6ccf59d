"""Helpers for tests that run samvad as a real process: start, kill, signal, query."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp

from samvad.emulator import find_free_port

ROOT = Path(__file__).resolve().parent.parent


class ServerProcess:
    """`python -m samvad` on a free port, with its JSON logs kept for inspection."""

    def __init__(self, project: str, firestore_host: str, log_dir: Path, **settings: Any) -> None:
        self.port = find_free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"samvad-{self.port}.log"
        self.env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "GOOGLE_CLOUD_PROJECT": project,
            "FIRESTORE_EMULATOR_HOST": firestore_host,
            "SAMVAD_AUTH": "none",
            **{f"SAMVAD_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, within: float = 30.0) -> ServerProcess:
        log = self.log_path.open("ab")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "samvad", env=self.env, cwd=ROOT, stdout=log, stderr=log
        )
        log.close()
        async with aiohttp.ClientSession() as http:
            for _ in range(int(within / 0.05)):
                if self.process.returncode is not None:
                    raise RuntimeError(f"samvad exited at start: {self.logs()}")
                try:
                    async with http.get(f"{self.url}/healthz") as response:
                        if response.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError(f"samvad did not start: {self.logs()}")

    async def terminate(self, within: float = 15.0) -> int:
        """SIGTERM, as Cloud Run sends it; returns the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), within)

    async def kill(self) -> None:
        """SIGKILL: no flush, no goodbye; what it acknowledged must already be in Firestore."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


async def request(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, dict[str, Any], aiohttp.typedefs.LooseHeaders]:
    async with http.request(method, url, **kwargs) as response:
        return response.status, await response.json(), response.headers


async def wait_for(condition: Any, within: float, interval: float = 0.1) -> Any:
    """Poll an async condition until it returns something truthy, or fail after `within` s."""
    deadline = asyncio.get_running_loop().time() + within
    last: Any = None
    while asyncio.get_running_loop().time() < deadline:
        last = await condition()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {within}s (last: {last!r})")
