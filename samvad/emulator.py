"""Start and stop Google's Cloud Firestore emulator for local runs and tests.

Standard library only (no ``google.cloud`` imports), and synchronous: it is meant
for pytest fixtures and the command line, not for use inside an event loop.

The emulator is started with ``gcloud emulators firestore start``. The gcloud
wrapper spawns a shell script, which spawns a Java process, so the whole tree is
started in its own session / process group and stopped by signalling the group
(SIGTERM, then SIGKILL after a grace period). No Java process is left behind.

Library use::

    with FirestoreEmulator() as emu:
        os.environ["FIRESTORE_EMULATOR_HOST"] = emu.host
        ...
        emu.clear("samvad-test")

Command line::

    python -m samvad.emulator run -- CMD [ARGS...]   # run CMD against a fresh emulator
    python -m samvad.emulator start [--port N]       # foreground emulator until Ctrl-C
    python -m samvad.emulator check                  # exit 1 with instructions if missing

Keep this module free of samvad imports: the Makefile runs it as a plain script
(``python3 -P samvad/emulator.py check``) before the virtualenv exists.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

__all__ = [
    "DEFAULT_PROJECT",
    "EMULATOR_HOST_ENV",
    "EmulatorError",
    "EmulatorMissing",
    "FirestoreEmulator",
    "emulator_available",
    "find_free_port",
    "main",
]

logger = logging.getLogger(__name__)

EMULATOR_HOST_ENV = "FIRESTORE_EMULATOR_HOST"
PROJECT_ENV = "GOOGLE_CLOUD_PROJECT"
DEFAULT_PROJECT = "samvad-local"

# Path of the emulator launcher inside a Cloud SDK installation.
_COMPONENT_PATH = Path("platform", "cloud-firestore-emulator", "cloud_firestore_emulator")

INSTALL_INSTRUCTIONS = """\
The Google Cloud Firestore emulator is not installed (it needs `gcloud` and its
`cloud-firestore-emulator` component, plus a Java runtime).

Install it with one of:

  * Debian/Ubuntu, from Google's Cloud SDK apt repository
    (https://cloud.google.com/sdk/docs/install#deb):
        sudo apt-get install google-cloud-cli-firestore-emulator

  * an existing gcloud installation (not installed via apt):
        gcloud components install cloud-firestore-emulator

Alternatively, with firebase-tools (needs Java 21), start an emulator yourself
and point samvad at it; nothing is started for you when the variable is set:
        firebase emulators:start --only firestore
        export FIRESTORE_EMULATOR_HOST=127.0.0.1:8080
"""


class EmulatorError(RuntimeError):
    """The emulator failed to start, stop or answer."""


class EmulatorMissing(EmulatorError):
    """gcloud or its Firestore emulator component is not installed."""

    def __init__(self, detail: str = "") -> None:
        message = INSTALL_INSTRUCTIONS
        if detail:
            message = f"{detail}\n\n{message}"
        super().__init__(message)


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on *host* that is free right now (it may be taken later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _find_gcloud() -> str | None:
    return shutil.which("gcloud")


def _sdk_root(gcloud: str) -> Path | None:
    """Locate the Cloud SDK root for the *gcloud* executable (``<root>/bin/gcloud``)."""
    root = Path(os.path.realpath(gcloud)).parent.parent
    if (root / _COMPONENT_PATH).exists():
        return root
    # Unusual layouts (wrappers, snaps): ask gcloud itself. Slower (~0.5 s).
    try:
        out = subprocess.run(
            [gcloud, "info", "--format=value(installation.sdk_root)"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out) if out else None


def _missing_reason() -> str | None:
    """Why the emulator cannot be started, or ``None`` if it can."""
    gcloud = _find_gcloud()
    if gcloud is None:
        return "`gcloud` was not found on PATH."
    root = _sdk_root(gcloud)
    if root is None or not (root / _COMPONENT_PATH).exists():
        return f"`{gcloud}` has no cloud-firestore-emulator component."
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        return "No Java runtime found (`java` is not on PATH and JAVA_HOME is unset)."
    return None


def emulator_available() -> bool:
    """True if ``gcloud emulators firestore start`` can be expected to work."""
    return _missing_reason() is None


def _tail(path: Path, max_chars: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<could not read emulator log {path}: {exc}>"
    if len(text) > max_chars:
        text = "...\n" + text[-max_chars:]
    return text.rstrip() or "<no output>"


def _group_alive(pgid: int) -> bool:
    """True while any non-zombie process is left in process group *pgid*."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    # killpg(…, 0) also succeeds for unreaped zombies (e.g. when PID 1 does not
    # reap orphans in a container); those are harmless, so look closer.
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Format: "pid (comm) state ppid pgrp ..." where comm may contain spaces.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _signal_group(proc: subprocess.Popen[bytes], sig: int, wait: float) -> bool:
    """Send *sig* to the process group led by *proc*; True once the group is gone."""
    pgid = proc.pid  # started with start_new_session=True: the leader's pid is the pgid
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        proc.poll()
        return True
    except PermissionError:  # pragma: no cover - the group id now belongs to someone else
        logger.warning("not allowed to signal emulator process group %d", pgid)
        return True
    end = time.monotonic() + wait
    while True:
        proc.poll()  # reap the leader so it does not linger as a zombie
        if not _group_alive(pgid):
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.05)


class FirestoreEmulator:
    """A Firestore emulator process started with ``gcloud emulators firestore start``.

    *port* defaults to a free port chosen at :meth:`start`. The emulator's output
    goes to *log_path* if given (kept afterwards), else to a temporary file that
    is removed by :meth:`stop`; either way it is included in start errors.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        bind_host: str = "127.0.0.1",
        log_path: str | os.PathLike[str] | None = None,
        gcloud: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self._requested_port = port
        self._port: int | None = port
        self._bind_host = bind_host
        self._log_path_arg = Path(log_path) if log_path is not None else None
        self._log_path: Path | None = None
        self._log_file: IO[bytes] | None = None
        self._owns_log = False
        self._gcloud = gcloud
        self._extra_args = tuple(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None

    # -- properties ---------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise EmulatorError("emulator has no port yet; call start() first")
        return self._port

    @property
    def host(self) -> str:
        """``"127.0.0.1:PORT"``, the value for FIRESTORE_EMULATOR_HOST."""
        return f"{self._bind_host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def log_path(self) -> Path | None:
        """Where the emulator's output goes (``None`` before start)."""
        return self._log_path

    @property
    def pid(self) -> int | None:
        """PID of the gcloud process (also the process group id)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def environ(self, project: str | None = None) -> dict[str, str]:
        """Environment variables that point a client at this emulator."""
        env = {EMULATOR_HOST_ENV: self.host}
        if project is not None:
            env[PROJECT_ENV] = project
        return env

    # -- lifecycle ----------------------------------------------------------

    def start(self, timeout: float = 60) -> FirestoreEmulator:
        """Start the emulator and wait until it answers ``Ok`` on ``GET /``.

        Raises :class:`EmulatorMissing` if gcloud or the component is missing and
        :class:`EmulatorError` (with the emulator's output) if it fails to start.
        """
        if self._proc is not None:
            raise EmulatorError("emulator already started")
        reason = _missing_reason() if self._gcloud is None else None
        if reason is not None:
            raise EmulatorMissing(reason)
        gcloud = self._gcloud or _find_gcloud()
        assert gcloud is not None  # checked by _missing_reason()

        deadline = time.monotonic() + timeout
        attempts = 1 if self._requested_port is not None else 3
        for attempt in range(1, attempts + 1):
            try:
                self._spawn(gcloud)
                self._wait_ready(deadline)
                return self
            except _PortRace:
                self.stop()
                if attempt == attempts:
                    raise EmulatorError("could not bind a free port for the emulator") from None
                logger.info("emulator port was taken, retrying on another port")
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _spawn(self, gcloud: str) -> None:
        if self._requested_port is None:
            self._port = find_free_port(self._bind_host)
        elif _port_in_use(self._bind_host, self.port):
            raise EmulatorError(f"port {self.host} is already in use")

        if self._log_path_arg is not None:
            self._log_path_arg.parent.mkdir(parents=True, exist_ok=True)
            self._log_path = self._log_path_arg
            self._log_file = open(self._log_path, "wb")  # noqa: SIM115 - closed in stop()
            self._owns_log = False
        else:
            fd, name = tempfile.mkstemp(prefix=f"firestore-emulator-{self.port}-", suffix=".log")
            self._log_path = Path(name)
            self._log_file = os.fdopen(fd, "wb")
            self._owns_log = True

        cmd = [
            gcloud,
            "--quiet",
            "emulators",
            "firestore",
            "start",
            f"--host-port={self.host}",
            *self._extra_args,
        ]
        env = dict(os.environ)
        env.setdefault("CLOUDSDK_CORE_DISABLE_PROMPTS", "1")
        env.setdefault("CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK", "1")
        # A variable pointing at some other emulator must not confuse gcloud.
        env.pop(EMULATOR_HOST_ENV, None)
        logger.info("starting Firestore emulator on %s (log: %s)", self.host, self._log_path)
        logger.debug("emulator command: %s", cmd)
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        atexit.register(self.stop)

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None and self._log_path is not None
        started = time.monotonic()
        while True:
            code = self._proc.poll()
            if code is not None:
                output = _tail(self._log_path)
                if self._requested_port is None and (
                    "Address already in use" in output or "BindException" in output
                ):
                    raise _PortRace
                raise EmulatorError(
                    f"Firestore emulator exited with code {code} before it was ready.\n"
                    f"Emulator output ({self._log_path}):\n{output}"
                )
            # Require our own banner as well as the HTTP answer, so a foreign
            # server on the same port is never mistaken for our emulator.
            if self._banner_seen() and self._answers_ok():
                logger.info(
                    "Firestore emulator ready on %s after %.1fs",
                    self.host,
                    time.monotonic() - started,
                )
                return
            if time.monotonic() >= deadline:
                output = _tail(self._log_path)
                raise EmulatorError(
                    f"Firestore emulator on {self.host} was not ready after "
                    f"{time.monotonic() - started:.0f}s.\n"
                    f"Emulator output ({self._log_path}):\n{output}"
                )
            time.sleep(0.1)

    def _banner_seen(self) -> bool:
        assert self._log_path is not None
        try:
            return b"Dev App Server is now running" in self._log_path.read_bytes()
        except OSError:
            return False

    def _answers_ok(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/", timeout=2) as resp:
                body: bytes = resp.read()
        except (OSError, urllib.error.URLError):
            return False
        return body.strip() == b"Ok"

    def stop(self, grace: float = 5.0) -> None:
        """Stop the emulator's whole process group; safe to call more than once."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is not None:
            logger.info("stopping Firestore emulator on %s", self.host)
            if not _signal_group(proc, signal.SIGTERM, grace):
                logger.warning("emulator did not exit %.0fs after SIGTERM; sending SIGKILL", grace)
                if not _signal_group(proc, signal.SIGKILL, 5.0):
                    logger.error("emulator process group %d survived SIGKILL", proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._owns_log and self._log_path is not None:
            with contextlib.suppress(OSError):
                self._log_path.unlink()
            self._owns_log = False

    def clear(self, project: str, database: str = "(default)") -> None:
        """Delete every document of *project*'s database in the emulator."""
        url = f"{self.url}/emulator/v1/projects/{project}/databases/{database}/documents"
        request = urllib.request.Request(url, method="DELETE")
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise EmulatorError(f"DELETE {url} failed: HTTP {exc.code}: {detail}") from exc
        except OSError as exc:
            raise EmulatorError(f"DELETE {url} failed: {exc}") from exc
        logger.debug("cleared Firestore emulator data for project %s", project)

    # -- context manager ----------------------------------------------------

    def __enter__(self) -> FirestoreEmulator:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        port = self._port if self._port is not None else "?"
        return f"<FirestoreEmulator {self._bind_host}:{port} {state}>"


class _PortRace(Exception):
    """The automatically chosen port was taken before the emulator bound it."""


# -- command line -------------------------------------------------------------

_FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _exit_code(returncode: int) -> int:
    # A child killed by signal N reports -N; shells report that as 128 + N.
    return 128 - returncode if returncode < 0 else returncode


def _in_terminal_foreground() -> bool:
    """True if our process group owns the controlling terminal's foreground.

    Then a Ctrl-C from the terminal has already reached the child (it is in our
    process group), and forwarding SIGINT would deliver it twice.
    """
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        try:
            return os.tcgetpgrp(stream.fileno()) == os.getpgrp()
        except (OSError, ValueError, AttributeError):
            continue
    return False


def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _cmd_run(args: argparse.Namespace) -> int:
    cmd: list[str] = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("samvad.emulator run: missing command (usage: run -- CMD [ARGS...])", file=sys.stderr)
        return 2
    if shutil.which(cmd[0]) is None:
        print(f"samvad.emulator run: command not found: {cmd[0]}", file=sys.stderr)
        return 127

    if os.environ.get(EMULATOR_HOST_ENV):
        logger.info("%s is set; not starting an emulator", EMULATOR_HOST_ENV)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvp(cmd[0], cmd)

    env = dict(os.environ)
    env.setdefault(PROJECT_ENV, DEFAULT_PROJECT)

    # Until the child runs, turn SIGTERM/SIGHUP into SystemExit so the emulator
    # (in its own session, out of reach of the terminal) is always stopped.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)

    emulator = _started(args)
    if isinstance(emulator, int):
        return emulator

    try:
        env[EMULATOR_HOST_ENV] = emulator.host
        print(
            f"samvad.emulator: Firestore emulator on {emulator.host} "
            f"(project {env[PROJECT_ENV]}); running: {' '.join(cmd)}",
            file=sys.stderr,
            flush=True,
        )
        child: subprocess.Popen[bytes] | None = None

        def forward(signum: int, frame: FrameType | None) -> None:
            if child is None:  # not started yet: give up, the emulator is stopped below
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                _raise_exit(signum, frame)
            elif signum == signal.SIGINT and _in_terminal_foreground():
                return  # a Ctrl-C from the terminal has reached the child already
            else:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signum)

        for sig in _FORWARDED_SIGNALS:
            signal.signal(sig, forward)
        try:
            child = subprocess.Popen(cmd, env=env)
        except OSError as exc:
            print(f"samvad.emulator run: cannot run {cmd[0]}: {exc}", file=sys.stderr)
            return 126
        returncode = child.wait()
        # Ignore further signals while cleaning up, so the emulator is stopped.
        for sig in _FORWARDED_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        return _exit_code(returncode)
    finally:
        emulator.stop()


def _started(args: argparse.Namespace) -> FirestoreEmulator | int:
    """A running emulator, or the exit code that says why there is none."""
    emulator = FirestoreEmulator(args.port, log_path=args.log_file)
    try:
        emulator.start(timeout=args.timeout)
    except EmulatorError as exc:
        print(f"samvad.emulator: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return emulator


def _cmd_start(args: argparse.Namespace) -> int:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)
    emulator = _started(args)
    if isinstance(emulator, int):
        return emulator
    try:
        print(f"export {EMULATOR_HOST_ENV}={emulator.host}", flush=True)
        print("Firestore emulator running; press Ctrl-C to stop.", file=sys.stderr, flush=True)
        offset = 0
        while emulator.running:
            if args.verbose and emulator.log_path is not None:
                with contextlib.suppress(OSError), emulator.log_path.open("rb") as log:
                    log.seek(offset)
                    chunk = log.read()
                    offset += len(chunk)
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.flush()
            time.sleep(0.5)
        print("samvad.emulator: the emulator exited unexpectedly", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        emulator.stop()


def _cmd_check(_args: argparse.Namespace) -> int:
    if os.environ.get(EMULATOR_HOST_ENV):
        print(f"{EMULATOR_HOST_ENV}={os.environ[EMULATOR_HOST_ENV]} is set; using that emulator.")
        return 0
    reason = _missing_reason()
    if reason is not None:
        print(f"{reason}\n\n{INSTALL_INSTRUCTIONS}", file=sys.stderr, end="")
        return 1
    print("Firestore emulator is available.")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m samvad.emulator",
        description="Run Google's Cloud Firestore emulator for samvad.",
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--port", type=int, default=None, help="port (default: a free one)")
        p.add_argument("--timeout", type=float, default=60, help="start timeout in seconds")
        p.add_argument("--log-file", default=None, help="keep the emulator's output in this file")

    run = sub.add_parser(
        "run",
        help="run CMD with FIRESTORE_EMULATOR_HOST pointing at a fresh emulator",
        description=(
            "Start an emulator, run CMD with FIRESTORE_EMULATOR_HOST (and "
            f"GOOGLE_CLOUD_PROJECT, default {DEFAULT_PROJECT}) set, stop the emulator "
            "when CMD exits and exit with CMD's code. If FIRESTORE_EMULATOR_HOST is "
            "already set, CMD is executed as is."
        ),
    )
    common(run)
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    run.set_defaults(func=_cmd_run)

    start = sub.add_parser("start", help="run an emulator in the foreground until Ctrl-C")
    common(start)
    start.add_argument("-v", "--verbose", action="store_true", help="echo the emulator's output")
    start.set_defaults(func=_cmd_start)

    check = sub.add_parser("check", help="exit 1 with install instructions if unavailable")
    check.set_defaults(func=_cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=str(args.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
