"""The `samvad` command: serve, run the emulator, and admin calls against a running server.

Admin commands print their result as JSON on stdout (for jq and scripts) and everything else,
progress and errors, on stderr. Exit codes: 0 done, 1 the server or the network said no,
2 bad usage (including a wipe refused for want of confirmation).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

DEFAULT_URL = "http://127.0.0.1:8080"
USER_AGENT = "samvad-cli"


class CliError(Exception):
    """A one-line message for stderr, and the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class NotFound(CliError):
    def __init__(self, message: str) -> None:
        super().__init__(message, 1)


def progress(message: str) -> None:
    print(f"samvad: {message}", file=sys.stderr, flush=True)


class Api:
    def __init__(self, url: str, token: str | None, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        request.add_header("User-Agent", USER_AGENT)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return _json(response.read())
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            message = _server_error(raw) or exc.reason or "no details"
            text = f"{method} {path}: HTTP {exc.code}: {message}"
            if exc.code == 404:
                raise NotFound(text) from None
            raise CliError(text) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            why = (
                "connection refused (is samvad running there?)"
                if isinstance(reason, ConnectionRefusedError)
                else str(getattr(reason, "strerror", None) or reason)
            )
            raise CliError(f"cannot reach {self.url}: {why}") from None
        except TimeoutError:
            raise CliError(f"{method} {path}: no answer within {self.timeout:g} s") from None
        except OSError as exc:
            raise CliError(f"cannot reach {self.url}: {exc.strerror or exc}") from None


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise CliError("the server's answer is not JSON (is --url a samvad server?)") from None


def _server_error(raw: bytes) -> str | None:
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    if isinstance(body, dict):
        for field in ("error", "message"):
            if isinstance(body.get(field), str):
                return str(body[field])
    return None


def _emit(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _user_path(user: str) -> str:
    return "/api/session/" + quote(user, safe="")


# ---- commands -----------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    if args.host:
        os.environ["HOST"] = args.host
    if args.port is not None:
        os.environ["PORT"] = str(args.port)
    from samvad.__main__ import main as serve  # aiohttp and Firestore only for this command

    serve()
    return 0


def cmd_stats(args: argparse.Namespace, api: Api) -> int:
    progress(f"stats of {api.url}")
    _emit(api.call("GET", "/api/session/stats"))
    return 0


def cmd_export(args: argparse.Namespace, api: Api) -> int:
    progress(f"exporting user {args.user!r} from {api.url}")
    _emit(api.call("GET", _user_path(args.user) + "/export"))
    return 0


def cmd_wipe(args: argparse.Namespace, api: Api) -> int:
    user = args.user
    if not args.yes:
        if not sys.stdin.isatty():
            raise CliError(
                "refusing to wipe without confirmation: stdin is not a terminal; pass --yes", 2
            )
        print(
            f"This deletes ALL data of user {user!r} on {api.url}: state, history, sessions, "
            "interruptions. It cannot be undone.",
            file=sys.stderr,
        )
        print(f"Type the user id to confirm ({user}): ", end="", file=sys.stderr, flush=True)
        answer = sys.stdin.readline().strip()
        if answer != user:
            raise CliError("not confirmed: nothing was wiped", 2)
    progress(f"wiping user {user!r} on {api.url}")
    result = api.call("POST", "/api/session/refresh", {"userId": user})
    _emit(result)
    progress("wiped")
    return 0


def cmd_emulator_help(args: argparse.Namespace) -> int:
    from samvad.emulator import main as emulator

    return emulator(["--help"])


# ---- parsing -----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samvad",
        description="samvad: session backend for conversational-AI agents.",
        epilog="`samvad` with no command serves, as `python -m samvad` does. Admin commands "
        "print JSON on stdout; progress and errors go to stderr.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="serve the API (the same as `python -m samvad`)",
        description="Serve the API with settings from the environment (PORT, HOST, "
        "GOOGLE_CLOUD_PROJECT, FIRESTORE_EMULATOR_HOST, SAMVAD_*). SIGTERM flushes the "
        "write-behind within SAMVAD_SHUTDOWN_FLUSH_BUDGET seconds, then exits.",
    )
    serve.add_argument("--host", help="address to listen on (default: $HOST or 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port to listen on (default: $PORT or 8080)")
    serve.set_defaults(func=cmd_serve)

    sub.add_parser(
        "emulator",
        help="run the bundled Firestore emulator launcher (`samvad emulator --help`)",
        add_help=False,
    ).set_defaults(func=cmd_emulator_help)

    admin = argparse.ArgumentParser(add_help=False)
    admin.add_argument(
        "--url",
        default=os.environ.get("SAMVAD_URL", DEFAULT_URL),
        help=f"the samvad server (default: $SAMVAD_URL or {DEFAULT_URL})",
    )
    admin.add_argument(
        "--token",
        default=os.environ.get("SAMVAD_TOKEN"),
        help="admin API key or token, sent as a Bearer token (default: $SAMVAD_TOKEN)",
    )
    admin.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for an answer (default 30)"
    )

    stats = sub.add_parser(
        "stats",
        parents=[admin],
        help="print the server's session statistics",
        description="GET /api/session/stats and print it.",
    )
    stats.set_defaults(func=cmd_stats, admin=True)

    export = sub.add_parser(
        "export",
        parents=[admin],
        help="print everything stored about a user",
        description="GET /api/session/{USER}/export: state, history, every session, snapshots "
        "and the interruptions the server holds, as one JSON document.",
    )
    export.add_argument("user", metavar="USER", help="the user id")
    export.set_defaults(func=cmd_export, admin=True)

    wipe = sub.add_parser(
        "wipe",
        parents=[admin],
        help="delete everything stored about a user",
        description="POST /api/session/refresh: state, history, sessions and interruptions of "
        "USER are deleted on every instance. Asks to type the user id on a terminal; without "
        "one, refuses unless --yes is given.",
    )
    wipe.add_argument("user", metavar="USER", help="the user id")
    wipe.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    wipe.set_defaults(func=cmd_wipe, admin=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "emulator":
        # Every argument, `--` and options included, is the emulator launcher's.
        from samvad.emulator import main as emulator

        return emulator(args_list[1:])
    parser = _parser()
    args = parser.parse_args(args_list)
    if args.command is None:
        args = parser.parse_args(["serve"])  # `samvad` alone serves, as `python -m samvad` does
    try:
        if getattr(args, "admin", False):
            code: int = args.func(args, Api(args.url, args.token, args.timeout))
        else:
            code = args.func(args)
        return code
    except CliError as exc:
        print(f"samvad: error: {exc.message}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("samvad: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
