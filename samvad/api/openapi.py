"""`GET /api/openapi.json`: the OpenAPI 3.1 document of the REST API, built from the wire models.

Each route declares here what it takes and answers (its models, by status); schemas come from
pydantic (`models_json_schema`, by alias, into components/schemas), security from the policy
table in samvad.api.security. tests/test_openapi.py fails for a route that is missing here and
runs schemathesis against the document.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from samvad import models as m
from samvad.api.metrics import MetricsSummaryResponse
from samvad.api.middlewares import add_routes
from samvad.api.security import POLICIES, UNLISTED, Policy
from samvad.ids import MAX_ID_BYTES, RESERVED_SESSION_IDS
from samvad.realtime_models import InterruptionIn, InterruptionList, InterruptionPushed

REF = "#/components/schemas/{model}"
JSON = "application/json"


class Health(BaseModel):
    status: Literal["ok"]


@dataclass(frozen=True)
class Raw:
    """A body that is not a model: its schema from pydantic's TypeAdapter, or given as is."""

    schema: Mapping[str, Any]
    media: str = JSON

    @classmethod
    def of(cls, kind: Any, description: str = "") -> Raw:
        schema = TypeAdapter(kind).json_schema()
        return cls({**schema, "description": description} if description else schema)


Body = type[BaseModel] | Raw


@dataclass(frozen=True)
class Param:
    name: str
    schema: Mapping[str, Any]
    where: Literal["query", "path"] = "query"
    required: bool = False
    description: str = ""


@dataclass(frozen=True)
class Operation:
    summary: str
    responses: Mapping[int, Body]  # what the route answers when it works, by status
    errors: tuple[int, ...] = ()  # statuses answered with ErrorResponse (auth ones are added)
    body: Body | None = None
    query: tuple[Param, ...] = ()
    headers: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    tag: str = "sessions"


# ---- parameters ---------------------------------------------------------------------------------

_DOT_SEGMENTS = [".", ".."]  # an HTTP client would resolve them away


def _id_schema(*reserved: str, description: str) -> dict[str, Any]:
    excluded = "|".join(re.escape(word) for word in [*_DOT_SEGMENTS, *reserved])
    return {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_ID_BYTES,
        "pattern": f"^(?!(?:{excluded})$)[^/]+$",
        "description": description,
    }


PATH_SCHEMAS: dict[str, dict[str, Any]] = {
    "userId": _id_schema(description="the user: any Firestore document id"),
    "sessionId": _id_schema(
        *sorted(RESERVED_SESSION_IDS), description="the session (words of the API's paths excluded)"
    ),
    "snapshotId": _id_schema(description="a snapshot of the user"),
}
DURABLE = Param(
    "durable",
    {"type": "boolean"},
    description="true: answer once the write is in Firestore (202 if it is not yet)",
)
WS_QUERY = (
    Param("userId", PATH_SCHEMAS["userId"], required=True),
    Param("sessionId", PATH_SCHEMAS["sessionId"], description="resume this session"),
    Param("language", {"type": "string", "maxLength": 64}),
    Param("token", {"type": "string"}, description="instead of Authorization (browsers)"),
)
LIST_QUERY = (
    Param("status", {"type": "string", "enum": ["active", "ended", "abandoned", "archived"]}),
    Param("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}),
    Param("cursor", {"type": "string"}, description="nextCursor of the page before"),
)

ANY_OBJECT = Raw.of(dict[str, Any])
SAVED = (200, 202)

# ---- THE OPERATIONS: one line per route, keyed as the policy table (HEAD follows GET) ----------

OPERATIONS: dict[tuple[str, str], Operation] = {
    ("GET", "/healthz"): Operation("Liveness", {200: Health}, tag="health"),
    ("GET", "/readyz"): Operation(
        "Readiness: Firestore reachable and the backlog taking writes",
        {200: m.ReadyOut, 503: m.ReadyOut},
        tag="health",
    ),
    ("GET", "/api/openapi.json"): Operation("This document", {200: ANY_OBJECT}, tag="meta"),
    ("GET", "/dashboard"): Operation(
        "Operator dashboard (HTML)", {200: Raw({"type": "string"}, "text/html")}, tag="meta"
    ),
    ("GET", "/metrics"): Operation(
        "Prometheus metrics", {200: Raw({"type": "string"}, "text/plain")}, tag="meta"
    ),
    ("GET", "/api/metrics/summary"): Operation(
        "Metrics summary (JSON)", {200: MetricsSummaryResponse}, tag="meta"
    ),
    ("GET", "/api/session/stats"): Operation("Counts and backlog", {200: m.StatsResponse}),
    ("POST", "/api/session/create"): Operation(
        "Create or update a session",
        {200: m.SessionSaved, 201: m.SessionSaved, 202: m.SessionSaved},
        errors=(409, 503),
        body=m.CreateSessionRequest,
        query=(DURABLE,),
    ),
    ("POST", "/api/session/refresh"): Operation(
        "Erase everything of a user", {200: m.UserRefreshed}, errors=(503,), body=m.RefreshRequest
    ),
    ("GET", "/api/session/user/{userId}/active"): Operation(
        "Active sessions of a user",
        {200: m.ActiveSessions},
        errors=(503,),
        headers={200: ("X-Samvad-Partial",)},
    ),
    ("GET", "/api/session/user/{userId}/sessions"): Operation(
        "Sessions of a user, a page at a time",
        {200: m.SessionPage},
        errors=(503,),
        query=LIST_QUERY,
    ),
    ("POST", "/api/session/user/{userId}/share"): Operation(
        "Share a context value with the user's active sessions",
        {200: m.Shared},
        errors=(404, 503),
        body=m.ShareRequest,
    ),
    ("POST", "/api/session/{userId}/state"): Operation(
        "Replace the user's state",
        dict.fromkeys(SAVED, m.StateSaved),
        errors=(503,),
        body=Raw.of(dict[str, Any], "any JSON object"),
        query=(DURABLE,),
    ),
    ("GET", "/api/session/{userId}/state"): Operation(
        "The user's state", {200: m.StateResponse}, errors=(404, 503)
    ),
    ("GET", "/api/session/{userId}/profile"): Operation(
        "The user's profile and newest history",
        {200: m.ProfileResponse},
        errors=(404, 503),
        headers={200: ("X-Samvad-Partial",)},
    ),
    ("POST", "/api/session/{userId}/history"): Operation(
        "Append a message to the user's history",
        dict.fromkeys(SAVED, m.MessageAppended),
        errors=(503,),
        body=m.AppendMessageRequest,
        query=(DURABLE,),
    ),
    ("POST", "/api/session/{userId}/snapshots"): Operation(
        "Snapshot the user's state and history",
        {201: m.SnapshotCreated},
        errors=(404, 503),
        body=m.SnapshotRequest,
        tag="snapshots",
    ),
    ("GET", "/api/session/{userId}/snapshots"): Operation(
        "The user's snapshots", {200: m.SnapshotList}, errors=(503,), tag="snapshots"
    ),
    ("POST", "/api/session/{userId}/snapshots/{snapshotId}/restore"): Operation(
        "Restore a snapshot (the current state is snapshotted first)",
        {200: m.SnapshotRestored},
        errors=(404, 503),
        tag="snapshots",
    ),
    ("DELETE", "/api/session/{userId}/snapshots/{snapshotId}"): Operation(
        "Delete a snapshot", {200: m.SnapshotDeleted}, errors=(404, 503), tag="snapshots"
    ),
    ("GET", "/api/session/{userId}/export"): Operation(
        "Everything held about the user (data portability)",
        {200: Raw.of(dict[str, Any], "state, history, sessions, snapshots, interruptions")},
        errors=(503,),
    ),
    ("GET", "/api/session/{sessionId}"): Operation(
        "A session", {200: m.SessionResponse}, errors=(404, 410, 503)
    ),
    ("PATCH", "/api/session/{sessionId}"): Operation(
        "Merge-patch a session's metadata and context",
        {200: m.SessionResponse},
        errors=(404, 410, 503),
        body=m.PatchSessionRequest,
    ),
    ("PUT", "/api/session/{sessionId}/end"): Operation(
        "End a session",
        dict.fromkeys(SAVED, m.SessionEnded),
        errors=(404, 410, 503),
        query=(DURABLE,),
    ),
    ("DELETE", "/api/session/{sessionId}"): Operation(
        "Delete a session and its interruptions",
        {200: m.SessionDeleted},
        errors=(404, 410, 503),
    ),
    ("POST", "/api/session/{sessionId}/interruptions"): Operation(
        "Record an interruption (barge-in)",
        {201: InterruptionPushed},
        errors=(404, 410, 503),
        body=InterruptionIn,
        tag="realtime",
    ),
    ("GET", "/api/session/{sessionId}/interruptions"): Operation(
        "The session's newest interruptions",
        {200: InterruptionList},
        errors=(404, 410, 503),
        tag="realtime",
    ),
    ("GET", "/ws"): Operation(
        "Agent websocket (upgrade only; frames in samvad/realtime_models.py)",
        {101: Raw({}, "")},
        errors=(409, 410, 503),
        query=WS_QUERY,
        tag="realtime",
    ),
}

SECURITY_SCHEMES = {
    "apiKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "a key of SAMVAD_API_KEYS (role agent or admin)",
    },
    "userToken": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "an end user's JWT (HS256, RS256 or ES256); its sub is the userId",
    },
    "queryToken": {
        "type": "apiKey",
        "in": "query",
        "name": "token",
        "description": "either token as ?token=, for websocket handshakes only",
    },
}
ERROR_HEADERS: dict[int, tuple[str, ...]] = {
    401: ("WWW-Authenticate",),
    429: ("Retry-After",),
    503: ("Retry-After",),
}
HEADER_SCHEMAS = {
    "WWW-Authenticate": {"type": "string"},
    "Retry-After": {"type": "string", "pattern": "^[0-9]+$"},
    "X-Samvad-Partial": {"type": "string", "enum": ["true"]},
}
ERROR_TEXT = {
    400: "invalid input",
    401: "missing or invalid credentials",
    403: "the credential may not do this",
    404: "not found",
    409: "conflict",
    410: "expired",
    413: "too large",
    429: "rate limited",
    503: "unavailable for now",
}


# ---- building the document ----------------------------------------------------------------------


def _error_statuses(op: Operation, template: str, policy: Policy) -> list[int]:
    statuses = set(op.errors)
    if op.body is not None or op.query or "{" in template:
        statuses.add(400)
    if op.body is not None:
        statuses.add(413)
    if not policy.public:
        statuses |= {401, 403, 503}  # 503: a key set that cannot be fetched
    if policy.owner == "body":
        statuses.add(400)
    if policy.limit is not None:
        statuses.add(429)
    return sorted(statuses)


def _security(policy: Policy) -> list[dict[str, list[str]]]:
    if policy.public:
        return []
    schemes: list[dict[str, list[str]]] = [{"apiKey": []}]
    if "user" in policy.roles:
        schemes.append({"userToken": []})
    if policy.query_token:
        schemes.append({"queryToken": []})
    return schemes


class _Schemas:
    """Models met while building, turned into components/schemas in one pydantic call."""

    def __init__(self) -> None:
        self.wanted: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {}

    def ref(self, body: Body, mode: JsonSchemaMode) -> tuple[str, Any]:
        if isinstance(body, Raw):
            return body.media, dict(body.schema)
        self.wanted[(body, mode)] = None
        return JSON, (body, mode)  # resolved in `components`

    def resolve(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if isinstance(value, tuple):
            return self.refs[value]
        return value

    def components(self) -> dict[str, Any]:
        refs, top = models_json_schema(list(self.wanted), by_alias=True, ref_template=REF)
        self.refs = refs
        return dict(top.get("$defs", {}))


def _content(schemas: _Schemas, body: Body, mode: JsonSchemaMode) -> dict[str, Any]:
    media, schema = schemas.ref(body, mode)
    return {media: {"schema": schema}}


def _response(
    schemas: _Schemas, status: int, body: Body | None, headers: tuple[str, ...], summary: str
) -> dict[str, Any]:
    out: dict[str, Any] = {"description": summary}
    if status == 101:
        out["description"] = "switching to the websocket protocol"
    elif body is not None:
        out["content"] = _content(schemas, body, "serialization")
    if headers:
        out["headers"] = {name: {"schema": HEADER_SCHEMAS[name]} for name in headers}
    return out


def _operation(
    schemas: _Schemas, method: str, template: str, op: Operation, policy: Policy
) -> dict[str, Any]:
    params: list[dict[str, Any]] = []
    for name in _path_names(template):
        params.append({"name": name, "in": "path", "required": True, "schema": PATH_SCHEMAS[name]})
    for param in op.query:
        entry: dict[str, Any] = {
            "name": param.name,
            "in": param.where,
            "required": param.required,
            "schema": dict(param.schema),
        }
        if param.description:
            entry["description"] = param.description
        params.append(entry)
    responses: dict[str, Any] = {}
    for status, body in op.responses.items():
        responses[str(status)] = _response(
            schemas, status, body, op.headers.get(status, ()), op.summary
        )
    for status in _error_statuses(op, template, policy):
        if str(status) in responses:
            continue
        responses[str(status)] = _response(
            schemas, status, m.ErrorResponse, ERROR_HEADERS.get(status, ()), ERROR_TEXT[status]
        )
    out: dict[str, Any] = {
        "operationId": _operation_id(method, template),
        "summary": op.summary,
        "tags": [op.tag],
        "security": _security(policy),
        "x-samvad-roles": sorted(policy.roles) if not policy.public else ["anyone"],
        "responses": responses,
    }
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {
            "required": True,
            "content": _content(schemas, op.body, "validation"),
        }
    return out


def _path_names(template: str) -> list[str]:
    return [part[1:-1] for part in template.split("/") if part.startswith("{")]


def _operation_id(method: str, template: str) -> str:
    words = [p.strip("{}") for p in template.split("/") if p and p not in ("api", "session")]
    return method.lower() + "".join(w[:1].upper() + w[1:] for w in words)


def build_document() -> dict[str, Any]:
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for (method, template), op in OPERATIONS.items():
        policy = POLICIES.get((method, template), UNLISTED)
        paths.setdefault(template, {})[method.lower()] = _operation(
            schemas, method, template, op, policy
        )
    components = schemas.components()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "samvad",
            "version": "0.1.0",
            "description": "Session state, message history and session lifecycle for "
            "conversational-AI agents. Authentication: README, section Security.",
        },
        "paths": schemas.resolve(paths),
        "components": {"schemas": components, "securitySchemes": SECURITY_SCHEMES},
    }


@dataclass
class _Document:
    body: bytes | None = None


OPENAPI = web.AppKey("openapi", _Document)


async def openapi_json(request: web.Request) -> web.Response:
    document = request.app[OPENAPI]
    if document.body is None:  # built on first use: most app instances never serve it
        document.body = json.dumps(build_document()).encode()
    return web.Response(body=document.body, content_type=JSON)


def setup_openapi(app: web.Application) -> None:
    app[OPENAPI] = _Document()
    add_routes(app, [web.get("/api/openapi.json", openapi_json)])
