"""Who is calling: API keys for agents and back ends, JWTs for end users (README "Security").

Verification is PyJWT's; this module only decides which key and which algorithm a token may
use. A token's own header never widens that choice: HS256 is checked against the configured
secret only, RS256/ES256 against the configured key set only, anything else is refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import aiohttp
import jwt

from samvad.clock import monotonic
from samvad.config import Settings
from samvad.errors import InvalidId
from samvad.ids import check_id

log = logging.getLogger(__name__)

Role = Literal["user", "agent", "admin"]
KEY_ROLES: frozenset[str] = frozenset({"agent", "admin"})
MIN_KEY_LENGTH = 16
MIN_HS256_SECRET_BYTES = 32  # RFC 7518 §3.2: a key at least as long as the hash output
KEYSET_ALGORITHMS = ("RS256", "ES256")
JWKS_TIMEOUT = 5.0  # seconds one key-set fetch may take
JWKS_DEFAULT_TTL = 3600.0  # seconds keys are kept when the response has no max-age
JWKS_MAX_TTL = 24 * 3600.0
JWKS_FAILED_RETRY = 10.0  # seconds before a failed fetch is tried again
# An unknown kid may mean the issuer rotated its keys, or a forged header: refetch at most this
# often for unknown kids, so that forged tokens cannot make the server hammer the issuer.
JWKS_UNKNOWN_KID_COOLDOWN = 30.0
_MAX_AGE = re.compile(r"max-age\s*=\s*(\d+)", re.IGNORECASE)

NO_CREDENTIALS = (
    "authentication is required but no credentials are configured: set SAMVAD_API_KEYS "
    "(or SAMVAD_API_KEYS_FILE) for agents and back ends, and/or SAMVAD_JWT_SECRET, "
    "SAMVAD_JWT_JWKS_URL or SAMVAD_JWT_JWKS_FILE for end-user tokens; "
    "SAMVAD_AUTH=none turns authentication off (local development only)"
)


class AuthConfigError(ValueError):
    """The security settings cannot be used: the server must not start."""


class InvalidToken(Exception):
    """A credential that proves nothing: 401 with error="invalid_token"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class VerifierUnavailable(Exception):
    """The issuer's key set cannot be had right now: the token can be neither taken nor refused."""


@dataclass(frozen=True)
class Principal:
    role: Role
    user_id: str | None  # the end user a `user` principal is; None for keys
    key: str  # stable and not secret: what rate limits count by

    def __repr__(self) -> str:
        return f"Principal({self.role}, {self.key})"


# ---- API keys -----------------------------------------------------------------------------------


def parse_api_keys(text: str, source: str) -> list[tuple[Role, str]]:
    """`role:key` entries, split by commas or lines; `#` starts a comment line."""
    entries: list[tuple[Role, str]] = []
    for number, raw in enumerate(re.split(r"[,\n]", text), start=1):
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        role, sep, key = entry.partition(":")
        role, key = role.strip(), key.strip()
        if not sep or role not in KEY_ROLES:
            # No part of the entry is shown: it may be a key written without its role.
            raise AuthConfigError(
                f"{source}: entry {number} is not role:key with role agent or admin"
            )
        if len(key) < MIN_KEY_LENGTH:
            raise AuthConfigError(
                f"{source}: a {role} key is shorter than {MIN_KEY_LENGTH} characters; "
                "use a random one: python -c 'import secrets; print(secrets.token_urlsafe())'"
            )
        entries.append((cast(Role, role), key))
    return entries


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class ApiKeys:
    """Keys are kept and looked up by SHA-256 digest: the lookup's timing depends on the digest of
    what was sent, never on how much of a real key it matches, and no key stays in memory."""

    def __init__(self, entries: Iterable[tuple[Role, str]]) -> None:
        self._principals: dict[bytes, Principal] = {}
        for role, key in entries:
            digest = _digest(key)
            known = self._principals.get(digest)
            if known is not None and known.role != role:
                raise AuthConfigError("the same API key is listed with two roles")
            self._principals[digest] = Principal(role, None, f"key:{digest.hex()[:16]}")

    def __len__(self) -> int:
        return len(self._principals)

    def lookup(self, token: str) -> Principal | None:
        return self._principals.get(_digest(token))


# ---- JWKS ---------------------------------------------------------------------------------------


def keys_from_jwks(data: Any, source: str) -> dict[str | None, jwt.PyJWK]:
    """Signing keys of a JWK set by kid; keys of other kinds or algorithms are skipped."""
    raw_keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(raw_keys, list):
        raise ValueError(f"{source} is not a JWK set (no 'keys' list)")
    keys: dict[str | None, jwt.PyJWK] = {}
    for raw in raw_keys:
        if not isinstance(raw, dict) or raw.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(raw)
        except (jwt.PyJWTError, ValueError, TypeError):
            continue
        if key.algorithm_name in KEYSET_ALGORITHMS:
            kid = raw.get("kid")
            keys[kid if isinstance(kid, str) else None] = key
    return keys


def _max_age(cache_control: str | None) -> float:
    found = _MAX_AGE.search(cache_control or "")
    if found is None:
        return JWKS_DEFAULT_TTL
    return min(float(found.group(1)), JWKS_MAX_TTL)


class KeySet:
    """The issuer's public keys: from a file (read once, at start) or from a URL (fetched with
    aiohttp, kept for the response's max-age, fetched again early for an unknown kid)."""

    def __init__(
        self, url: str | None = None, keys: dict[str | None, jwt.PyJWK] | None = None
    ) -> None:
        self.url = url
        self._keys: dict[str | None, jwt.PyJWK] = keys or {}
        self._expires = float("inf") if url is None else 0.0
        self._last_unknown_refetch = -JWKS_UNKNOWN_KID_COOLDOWN
        self._version = 0  # counts fetches, so that waiters on one fetch do not fetch again
        self._lock = asyncio.Lock()
        self._http: aiohttp.ClientSession | None = None

    @classmethod
    def from_file(cls, path: str) -> KeySet:
        try:
            data = json.loads(Path(path).read_text())
            keys = keys_from_jwks(data, "SAMVAD_JWT_JWKS_FILE")
        except (OSError, ValueError) as exc:
            raise AuthConfigError(f"SAMVAD_JWT_JWKS_FILE: cannot use {path}: {exc}") from None
        if not keys:
            raise AuthConfigError(f"SAMVAD_JWT_JWKS_FILE: {path} has no RS256 or ES256 signing key")
        return cls(keys=keys)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def find(self, kid: str | None, algorithm: str) -> jwt.PyJWK:
        if self.url is not None and monotonic() >= self._expires:
            await self._refresh(self._version)
        key = self._pick(kid, algorithm)
        if key is None and self.url is not None:
            now = monotonic()
            if now - self._last_unknown_refetch >= JWKS_UNKNOWN_KID_COOLDOWN:
                self._last_unknown_refetch = now
                await self._refresh(self._version)
                key = self._pick(kid, algorithm)
        if key is None:
            if not self._keys and self.url is not None:
                raise VerifierUnavailable()
            raise InvalidToken("unknown signing key")
        if key.algorithm_name != algorithm:
            raise InvalidToken("unexpected algorithm for this key")
        return key

    def _pick(self, kid: str | None, algorithm: str) -> jwt.PyJWK | None:
        if kid is not None:
            return self._keys.get(kid)
        fitting = [k for k in self._keys.values() if k.algorithm_name == algorithm]
        return fitting[0] if len(fitting) == 1 else None  # no kid: only an unambiguous key

    async def _refresh(self, seen_version: int) -> None:
        """One fetch for all the requests waiting on it; on failure the known keys stay."""
        async with self._lock:
            if self._version != seen_version:
                return  # fetched (or failed) while this request waited: use that outcome
            self._version += 1
            try:
                keys, ttl = await self._fetch()
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.warning(
                    "could not fetch the JWT key set",
                    extra={"json_fields": {"error": type(exc).__name__}},
                )
                self._expires = monotonic() + JWKS_FAILED_RETRY
                return
            self._keys = keys
            self._expires = monotonic() + ttl
            log.info("JWT key set fetched", extra={"json_fields": {"keys": len(keys)}})

    async def _fetch(self) -> tuple[dict[str | None, jwt.PyJWK], float]:
        assert self.url is not None
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=JWKS_TIMEOUT))
        async with self._http.get(self.url) as response:
            response.raise_for_status()
            data = await response.json(content_type=None)
            ttl = _max_age(response.headers.get("Cache-Control"))
        return keys_from_jwks(data, "the JWKS URL"), ttl


# ---- JWT ----------------------------------------------------------------------------------------


class JwtVerifier:
    def __init__(
        self,
        secret: str | None,
        keyset: KeySet | None,
        audience: str | None,
        issuer: str | None,
        leeway: float,
    ) -> None:
        self.secret = secret
        self.keyset = keyset
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway

    async def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("malformed token") from None
        algorithm = header.get("alg")
        key: Any
        if algorithm == "HS256" and self.secret is not None:
            key = self.secret
        elif algorithm in KEYSET_ALGORITHMS and self.keyset is not None:
            kid = header.get("kid")
            key = (await self.keyset.find(kid if isinstance(kid, str) else None, algorithm)).key
        else:
            raise InvalidToken("unexpected algorithm")
        required = ["exp", "sub"]
        required += ["aud"] if self.audience is not None else []
        required += ["iss"] if self.issuer is not None else []
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": required, "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("token expired") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("wrong issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"missing claim {exc.claim}") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("bad signature") from None
        except jwt.PyJWTError:
            raise InvalidToken("invalid token") from None
        sub = claims.get("sub")
        try:
            user_id = check_id("sub", sub)
        except InvalidId:
            raise InvalidToken("sub is not a usable user id") from None
        return Principal("user", user_id, f"user:{user_id}")


# ---- together -----------------------------------------------------------------------------------


class Authenticator:
    def __init__(self, api_keys: ApiKeys, jwt_verifier: JwtVerifier | None) -> None:
        self.api_keys = api_keys
        self.jwt = jwt_verifier

    async def authenticate(self, token: str) -> Principal:
        principal = self.api_keys.lookup(token)
        if principal is not None:
            return principal
        if self.jwt is not None and token.count(".") == 2:
            return await self.jwt.verify(token)
        raise InvalidToken("unknown credential")

    async def close(self) -> None:
        if self.jwt is not None and self.jwt.keyset is not None:
            await self.jwt.keyset.close()


def _secret(value: Any) -> str | None:
    text = value.get_secret_value() if value is not None else None
    return text or None


def _check_jwks_url(url: str) -> None:
    parts = urlsplit(url)
    loopback = parts.hostname in ("localhost", "127.0.0.1", "::1")
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        raise AuthConfigError("SAMVAD_JWT_JWKS_URL must be an https:// URL")


def build_authenticator(settings: Settings) -> Authenticator | None:
    """None when authentication is off; raises AuthConfigError when it cannot be on."""
    if settings.auth == "none":
        return None
    entries: list[tuple[Role, str]] = []
    keys_text = _secret(settings.api_keys)
    if keys_text:
        entries += parse_api_keys(keys_text, "SAMVAD_API_KEYS")
    if settings.api_keys_file:
        try:
            text = Path(settings.api_keys_file).read_text()
        except OSError as exc:
            raise AuthConfigError(f"SAMVAD_API_KEYS_FILE: {exc.strerror}") from None
        entries += parse_api_keys(text, "SAMVAD_API_KEYS_FILE")

    secret = _secret(settings.jwt_secret)
    if secret is not None and len(secret.encode()) < MIN_HS256_SECRET_BYTES:
        raise AuthConfigError(
            f"SAMVAD_JWT_SECRET must be at least {MIN_HS256_SECRET_BYTES} bytes for HS256"
        )
    if settings.jwt_jwks_url and settings.jwt_jwks_file:
        raise AuthConfigError("set SAMVAD_JWT_JWKS_URL or SAMVAD_JWT_JWKS_FILE, not both")
    keyset: KeySet | None = None
    if settings.jwt_jwks_url:
        _check_jwks_url(settings.jwt_jwks_url)
        keyset = KeySet(url=settings.jwt_jwks_url)
    elif settings.jwt_jwks_file:
        keyset = KeySet.from_file(settings.jwt_jwks_file)
    if keyset is not None and not settings.jwt_audience:
        # A public key set (Google's, say) signs tokens for every project that uses it.
        raise AuthConfigError(
            "SAMVAD_JWT_AUDIENCE must be set with a JWT key set: the same keys sign tokens "
            "meant for other services (for Firebase: the project id)"
        )
    verifier = None
    if secret is not None or keyset is not None:
        verifier = JwtVerifier(
            secret,
            keyset,
            settings.jwt_audience or None,
            settings.jwt_issuer or None,
            settings.jwt_leeway,
        )
    if not entries and verifier is None:
        raise AuthConfigError(NO_CREDENTIALS)
    return Authenticator(ApiKeys(entries), verifier)
