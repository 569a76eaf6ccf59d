"""Ids that reach Firestore as document ids: checked here, before any store call."""

from __future__ import annotations

import re
import secrets

from samvad.errors import InvalidId

# A document id may be 1500 bytes, but a user id is also a value that queries compare, and
# Firestore refuses 1500-byte query values ("too large to be used in a query": a 500 before).
MAX_ID_BYTES = 1499
_RESERVED_PATTERN = re.compile(r"^__.*__$", re.DOTALL)
_REFUSED_CHARACTER = re.compile("[/\x00-\x1f\ud800-\udfff]")
# Path words of the API that a session id must never be mistaken for.
RESERVED_SESSION_IDS = frozenset({"stats", "create", "refresh", "user"})


def check_id(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidId(f"{field} must be a string")
    if not value:
        raise InvalidId(f"{field} must not be empty")
    # One scan for the characters refused anywhere: every request with an id in it pays this.
    refused = _REFUSED_CHARACTER.search(value)
    if refused is not None:
        if refused.group() == "/":
            raise InvalidId(f"{field} must not contain '/'")
        raise InvalidId(f"{field} must not contain control characters or lone surrogates")
    if value in (".", ".."):
        raise InvalidId(f"{field} must not be '.' or '..'")
    if value.startswith("__") and _RESERVED_PATTERN.match(value):
        raise InvalidId(f"{field} must not look like __name__ (reserved by Firestore)")
    # A character is at most 4 bytes in UTF-8: short ids need no encoding to be measured.
    if len(value) * 4 > MAX_ID_BYTES and len(value.encode("utf-8")) > MAX_ID_BYTES:
        raise InvalidId(f"{field} must be at most {MAX_ID_BYTES} bytes")
    return value


def check_session_id(value: object) -> str:
    session_id = check_id("sessionId", value)
    if session_id in RESERVED_SESSION_IDS:
        raise InvalidId(f"sessionId {session_id!r} is reserved")
    return session_id


def new_session_id() -> str:
    return f"session_{secrets.token_hex(12)}"
