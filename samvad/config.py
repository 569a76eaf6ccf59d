"""One settings object, read from the environment once, in the app factory's caller."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)

from samvad.store.base import Retention

# Largest message content a single history chunk document can always hold with room to spare
# (Firestore's document limit is 1 MiB; chunks are filled to about 800 KB).
MAX_MESSAGE_BYTES_LIMIT = 512 * 1024


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)
    project: str = "samvad-local"
    emulator_host: str | None = None
    log_level: str = "INFO"
    # Cloud Run's request log already has a line per request (status, latency, trace): one of
    # our own for every answered request would double the logging bill and cost each request
    # more CPU than its handler. `errors` writes the lines worth reading.
    access_log: Literal["all", "errors", "off"] = Field(
        default="errors", description="all | errors (4xx, 5xx and slow requests) | off"
    )
    slow_request: float = Field(default=1.0, gt=0, description="seconds: logged as slow")

    cache_ttl: float = Field(default=1800.0, gt=0, description="seconds an entry stays cached")
    cache_size: int = Field(default=50_000, ge=1, description="entries per cache")
    history_cap: int = Field(default=100, ge=1, le=10_000)
    max_message_bytes: int = Field(default=64 * 1024, ge=1, le=MAX_MESSAGE_BYTES_LIMIT)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_state_bytes: int = Field(default=256 * 1024, ge=1024, le=MAX_MESSAGE_BYTES_LIMIT)
    interruptions_per_session: int = Field(default=3, ge=1)

    # write-behind
    flush_delay: float = Field(default=0.2, ge=0, description="wait before a first flush")
    flush_interval: float = Field(default=1.0, ge=0, description="least time between flushes")
    flush_concurrency: int = Field(default=16, ge=1)
    backlog_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    retry_base: float = Field(default=0.2, gt=0)
    retry_max: float = Field(default=10.0, gt=0)
    shutdown_flush_budget: float = Field(default=8.0, gt=0)
    durable_timeout: float = Field(default=5.0, gt=0)
    store_timeout: float = Field(default=5.0, gt=0, description="deadline of one store call")

    # lifecycle and retention (seconds)
    abandon_after: float = Field(default=86400.0, gt=0, description="idle → abandoned")
    archive_after: float = Field(default=7 * 86400.0, gt=0, description="ended → archived")
    session_retention: float = Field(default=7 * 86400.0, gt=0)
    state_retention: float = Field(default=30 * 86400.0, gt=0)
    profile_retention: float = Field(default=30 * 86400.0, gt=0)
    snapshot_retention: float = Field(default=30 * 86400.0, gt=0)
    max_snapshots: int = Field(default=10, ge=1, le=100)

    # cross-instance freshness
    sync_interval: float = Field(default=1.0, ge=0, description="0 turns the change feed off")
    stats_ttl: float = Field(default=2.0, ge=0)

    # agent websockets (/ws)
    ws_max_frame_bytes: int = Field(default=256 * 1024, ge=1024, description="largest frame taken")
    ws_resume_grace: float = Field(
        default=600.0, ge=0, description="seconds a dropped session stays active for a reconnect"
    )
    ws_heartbeat: float = Field(default=20.0, gt=0, description="seconds between pings")

    # security (README "Security"); secrets are SecretStr so that no repr or dump shows them
    auth: Literal["none", "required"] = "required"
    api_keys: SecretStr | None = Field(default=None, description="comma-separated role:key")
    api_keys_file: str | None = Field(default=None, description="one role:key a line")
    jwt_secret: SecretStr | None = Field(default=None, description="HS256 key of user tokens")
    jwt_jwks_url: str | None = None
    jwt_jwks_file: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway: float = Field(default=30.0, ge=0, le=300, description="seconds of clock skew")
    cors_origins: str | None = Field(default=None, description="comma-separated origins")
    rate_refresh_per_minute: float = Field(default=10.0, ge=0, description="0: no limit")
    rate_append_per_second: float = Field(default=50.0, ge=0, description="0: no limit")
    rate_principals: int = Field(default=100_000, ge=1, description="buckets kept per limit")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.retry_max < self.retry_base:
            raise ValueError("SAMVAD_RETRY_MAX must be at least SAMVAD_RETRY_BASE")
        return self

    def retention(self) -> Retention:
        return Retention(
            session=self.session_retention,
            state=self.state_retention,
            profile=self.profile_retention,
            snapshot=self.snapshot_retention,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        plain = {"HOST": "host", "PORT": "port", "FIRESTORE_EMULATOR_HOST": "emulator_host"}
        for var, field in plain.items():
            if env.get(var):
                values[field] = env[var]
        project = env.get("GOOGLE_CLOUD_PROJECT") or env.get("GCLOUD_PROJECT")
        if project:
            values["project"] = project
        for field in cls.model_fields:
            var = f"SAMVAD_{field.upper()}"
            if var in env:
                values[field] = env[var]
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{_env_name(str(err['loc'][0]) if err['loc'] else '')}: {err['msg']}"
                for err in exc.errors()
            )
            raise ValueError(f"invalid configuration: {problems}") from None


def _env_name(field: str) -> str:
    return {
        "host": "HOST",
        "port": "PORT",
        "project": "GOOGLE_CLOUD_PROJECT",
        "emulator_host": "FIRESTORE_EMULATOR_HOST",
    }.get(field, f"SAMVAD_{field.upper()}")
