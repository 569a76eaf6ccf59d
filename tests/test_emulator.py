"""Tests for samvad.emulator against the real gcloud Firestore emulator."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from samvad.emulator import (
    EmulatorError,
    EmulatorMissing,
    FirestoreEmulator,
    emulator_available,
    find_free_port,
)

needs_emulator = pytest.mark.skipif(
    not emulator_available(), reason="gcloud Firestore emulator is not installed"
)

PROJECT = "samvad-emulator-test"
REPO = Path(__file__).resolve().parent.parent


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _processes_mentioning(needle: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def _live_group_members(pgid: int) -> list[int]:
    """Processes of group *pgid* that are not zombies (an init that reaps orphans
    lazily can leave zombies around for a while; they hold no port or memory)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, _ppid, group = stat[stat.rfind(")") + 2 :].split()[:3]
        if int(group) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def _request(emu: FirestoreEmulator, method: str, path: str, body: object = None) -> object:
    url = f"{emu.url}/v1/projects/{PROJECT}/databases/(default)/documents/{path}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", "Bearer owner")  # bypasses security rules
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"null")


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FIRESTORE_EMULATOR_HOST",)}
    env.pop("GOOGLE_CLOUD_PROJECT", None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def own_emulator() -> Iterator[FirestoreEmulator]:
    with FirestoreEmulator() as emu:
        yield emu


def test_find_free_port_is_bindable() -> None:
    port = find_free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@needs_emulator
def test_start_on_free_port(own_emulator: FirestoreEmulator) -> None:
    assert own_emulator.running
    assert own_emulator.host == f"127.0.0.1:{own_emulator.port}"
    with urllib.request.urlopen(f"http://{own_emulator.host}/", timeout=5) as resp:
        assert resp.read().strip() == b"Ok"


@needs_emulator
def test_clear_deletes_documents(own_emulator: FirestoreEmulator) -> None:
    doc = {"fields": {"text": {"stringValue": "hello"}}}
    _request(own_emulator, "PATCH", "sessions/s1", doc)
    got = _request(own_emulator, "GET", "sessions/s1")
    assert isinstance(got, dict) and got["fields"] == doc["fields"]

    own_emulator.clear(PROJECT)

    with pytest.raises(urllib.error.HTTPError) as excinfo:
        _request(own_emulator, "GET", "sessions/s1")
    assert excinfo.value.code == 404


@needs_emulator
def test_stop_leaves_nothing_behind(tmp_path: Path) -> None:
    log = tmp_path / "emulator.log"
    emu = FirestoreEmulator(find_free_port(), log_path=log)
    emu.start()
    port, pid = emu.port, emu.pid
    assert _listening(port)
    assert _processes_mentioning(f"--port={port}"), "expected the Java emulator process"

    emu.stop()
    emu.stop()  # idempotent

    assert not emu.running
    assert not _listening(port)
    assert _processes_mentioning(f"--port={port}") == []
    assert pid is not None
    assert _live_group_members(pid) == []
    assert "Dev App Server is now running" in log.read_text()


@needs_emulator
def test_start_failure_includes_emulator_output() -> None:
    emu = FirestoreEmulator(extra_args=["--no-such-flag"])
    with pytest.raises(EmulatorError) as excinfo:
        emu.start(timeout=60)
    assert "no-such-flag" in str(excinfo.value)
    assert not emu.running


@needs_emulator
def test_port_in_use_is_refused(own_emulator: FirestoreEmulator) -> None:
    with pytest.raises(EmulatorError, match="already in use"):
        FirestoreEmulator(own_emulator.port).start()


def test_missing_gcloud_explains_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert not emulator_available()
    with pytest.raises(EmulatorMissing) as excinfo:
        FirestoreEmulator().start()
    message = str(excinfo.value)
    assert "sudo apt-get install google-cloud-cli-firestore-emulator" in message
    assert "gcloud components install cloud-firestore-emulator" in message
    assert "firebase emulators:start --only firestore" in message
    assert "FIRESTORE_EMULATOR_HOST" in message


@needs_emulator
def test_cli_run_sets_environment_and_exit_code() -> None:
    script = (
        "import os, sys, urllib.request\n"
        "host = os.environ['FIRESTORE_EMULATOR_HOST']\n"
        "body = urllib.request.urlopen('http://' + host + '/', timeout=5).read()\n"
        "print(host, os.environ['GOOGLE_CLOUD_PROJECT'], body.decode().strip())\n"
        "sys.exit(3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "samvad.emulator", "run", "--", sys.executable, "-c", script],
        cwd=REPO,
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 3, result.stderr
    host, project, body = result.stdout.split()
    assert host.startswith("127.0.0.1:")
    assert project == "samvad-local"
    assert body == "Ok"
    assert not _listening(int(host.rsplit(":", 1)[1]))


def test_cli_run_uses_existing_emulator_host() -> None:
    script = "import os; print(os.environ['FIRESTORE_EMULATOR_HOST'])"
    result = subprocess.run(
        [sys.executable, "-m", "samvad.emulator", "run", "--", sys.executable, "-c", script],
        cwd=REPO,
        env=_child_env(FIRESTORE_EMULATOR_HOST="127.0.0.1:1"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "127.0.0.1:1"
