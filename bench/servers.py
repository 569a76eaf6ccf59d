"""The processes a benchmark runs: samvad, the ceiling, the baseline, the counting proxy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp

from bench.loadgen import cpu_seconds
from samvad.emulator import find_free_port

ROOT = Path(__file__).resolve().parent.parent


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class Process:
    """A child process with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def spawn(self, stdout_pipe: bool = False) -> None:
        log = self.log_path.open("ab")
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            env=self.env,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE if stdout_pipe else log,
            stderr=log,
        )
        log.close()

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def logs(self, tail: int = 4000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-tail:]

    async def stop(self, within: float = 15.0) -> int | None:
        if self.process is None or self.process.returncode is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), within)
        except TimeoutError:
            self.process.kill()
            return await self.process.wait()


class HttpServer(Process):
    """A server answering HTTP on 127.0.0.1:port; ready once GET /healthz answers 200."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log_dir: Path, port: int
    ) -> None:
        super().__init__(name, argv, env, log_dir)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    async def start(self, within: float = 60.0) -> HttpServer:
        await self.spawn()
        assert self.process is not None
        async with aiohttp.ClientSession() as http:
            for _ in range(int(within / 0.05)):
                if self.process.returncode is not None:
                    raise RuntimeError(f"{self.name} exited at start:\n{self.logs()}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{self.url}/healthz") as response:
                        if response.status == 200:
                            return self
                await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start:\n{self.logs()}")


def _python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def samvad(
    name: str,
    project: str,
    firestore_host: str,
    log_dir: Path,
    module: str = "samvad",
    **settings: Any,
) -> HttpServer:
    """`python -m samvad` (or `module`) with SAMVAD_<FIELD> settings (log level INFO unless
    told)."""
    port = find_free_port()
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "GOOGLE_CLOUD_PROJECT": project,
        "FIRESTORE_EMULATOR_HOST": firestore_host,
        "SAMVAD_AUTH": "none",
        **{f"SAMVAD_{key.upper()}": str(value) for key, value in settings.items()},
    }
    return HttpServer(name, _python(module), env, log_dir, port)


def ceiling(log_dir: Path) -> HttpServer:
    port = find_free_port()
    return HttpServer(
        "ceiling", _python("bench.ceiling", "--port", str(port)), {**os.environ}, log_dir, port
    )


def baseline(name: str, project: str, firestore_host: str, log_dir: Path) -> HttpServer:
    port = find_free_port()
    env = {**os.environ, "GOOGLE_CLOUD_PROJECT": project, "FIRESTORE_EMULATOR_HOST": firestore_host}
    return HttpServer(name, _python("bench.baseline", "--port", str(port)), env, log_dir, port)


class ProxyProcess(Process):
    """bench.proxy (FirestoreProxy counting reads too) in a process of its own."""

    grpc_host = ""
    control_url = ""

    def __init__(self, upstream: str, log_dir: Path) -> None:
        super().__init__(
            "proxy", _python("bench.proxy", "--upstream", upstream), {**os.environ}, log_dir
        )

    async def start(self) -> ProxyProcess:
        await self.spawn(stdout_pipe=True)
        assert self.process is not None and self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 30)
        if not line:
            raise RuntimeError(f"proxy did not start:\n{self.logs()}")
        ready = json.loads(line)
        self.grpc_host, self.control_url = ready["grpcHost"], ready["controlUrl"]
        return self

    async def _call(self, method: str, path: str) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, self.control_url + path) as response,
        ):
            response.raise_for_status()
            body: dict[str, Any] = await response.json()
            return body

    async def counts(self) -> dict[str, Any]:
        return await self._call("GET", "/counts")

    async def reset(self) -> None:
        await self._call("POST", "/reset")

    async def down(self) -> None:
        await self._call("POST", "/down")

    async def up(self) -> None:
        await self._call("POST", "/up")
