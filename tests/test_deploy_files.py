"""The deployment files, checked statically (no Docker engine or Google Cloud here): the image is
small, unprivileged and signal-friendly; the Cloud Run service fits the design; every query the
Firestore store makes has the index it needs."""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
STORE = ROOT / "samvad" / "store" / "firestore.py"

# ---- Dockerfile ---------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def dockerfile_stages() -> tuple[dict[str, str], list[Stage]]:
    text = (ROOT / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", text)  # join continuation lines
    build_args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in logical.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            build_args[name] = default
        elif keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: build_args[m.group(1)], words[0])
            stage_name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, stage_name))
        else:
            stages[-1].instructions.append((keyword, rest))
    return build_args, stages


def test_dockerfile_builds_in_a_builder_and_runs_slim_unprivileged_and_exec_form() -> None:
    _, stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: a builder and a runtime stage"
    builder, final = stages[0], stages[-1]
    for stage in stages:
        assert re.fullmatch(r"python:3\.1[12]-slim(-\w+)?", stage.base), stage.base

    # the runtime stage takes the installed environment from the builder, not the source
    copies = final.args("COPY")
    assert any(c.startswith(f"--from={builder.name}") for c in copies), copies
    assert not any(re.search(r"(^|\s)(\.|samvad|tests)(/|\s|$)", c) for c in copies), copies
    final_runs = " ".join(final.args("RUN"))
    assert "pip install" not in final_runs, "nothing is installed in the runtime stage"
    assert not re.search(r"apt-get install|build-essential|gcc", final_runs)
    builder_runs = " ".join(builder.args("RUN"))
    assert "pip install" in builder_runs
    assert "[dev]" not in builder_runs and "[dev]" not in final_runs, "no dev extras"

    users = final.args("USER")
    assert users, "the runtime stage must switch to a non-root user"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")

    env = " ".join(final.args("ENV"))
    assert "PYTHONUNBUFFERED=1" in env
    entry = (final.args("ENTRYPOINT") or final.args("CMD"))[-1]
    command = json.loads(entry)  # exec form: a JSON array, no shell in between
    assert command in (["python", "-m", "samvad"], ["samvad", "serve"]), command


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    excluded = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip("/")
        regex = ""
        i = 0
        while i < len(body):
            if body.startswith("**", i):
                regex += ".*"
                i += 2
                if body.startswith("/", i):
                    regex += "/?"
                    i += 1
            elif body[i] == "*":
                regex += "[^/]*"
                i += 1
            elif body[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(body[i])
                i += 1
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_context_to_the_package() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_api.py",
        "test-artifacts/dashboard.png",
        "samvad/__pycache__/app.cpython-311.pyc",
        "samvad/api/__pycache__/routes.cpython-311.pyc",
        ".mypy_cache/3.11/x.json",
        ".env",
        "bench/run.py",
    ):
        assert dockerignore_excludes(patterns, path), f"{path} must not reach the image"
    for path in (
        "pyproject.toml",
        "README.md",
        "samvad/app.py",
        "samvad/api/static/dashboard.html",
    ):
        assert not dockerignore_excludes(patterns, path), f"the build needs {path}"


def test_the_dashboard_page_is_package_data() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'samvad = \[[^\]]*"api/static/\*\.html"', pyproject)


# ---- Cloud Run service --------------------------------------------------------------------------


def service() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "service.yaml").read_text())
    return loaded


def test_service_yaml_fits_the_design() -> None:
    svc = service()
    assert svc["apiVersion"] == "serving.knative.dev/v1" and svc["kind"] == "Service"
    template = svc["spec"]["template"]
    notes = template["metadata"]["annotations"]
    assert notes["run.googleapis.com/cpu-throttling"] == "false"  # the writer runs between requests
    assert notes["run.googleapis.com/sessionAffinity"] == "true"
    assert int(notes["autoscaling.knative.dev/minScale"]) >= 1
    assert 1 <= int(notes["autoscaling.knative.dev/maxScale"]) <= 100
    spec = template["spec"]
    assert spec["timeoutSeconds"] == 3600  # websockets live as long as their request
    assert 1 <= spec["containerConcurrency"] <= 1000
    assert spec["serviceAccountName"]
    (container,) = spec["containers"]
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e for e in container["env"]}
    assert "PORT" not in env  # Cloud Run sets it and refuses a service that does
    assert env["GOOGLE_CLOUD_PROJECT"]["value"]
    assert env["SAMVAD_AUTH"]["value"] == "required"
    # Cloud Run kills 10 s after SIGTERM: 1 s for requests + the flush budget must fit
    assert 1 + float(env["SAMVAD_SHUTDOWN_FLUSH_BUDGET"]["value"]) < 10
    for secret in ("SAMVAD_API_KEYS", "SAMVAD_JWT_SECRET"):
        ref = env[secret]["valueFrom"]["secretKeyRef"]
        assert ref["name"] and ref["key"], secret
        assert "value" not in env[secret]
    # every setting it names is one samvad reads
    from samvad.config import Settings

    known = {f"SAMVAD_{name.upper()}" for name in Settings.model_fields}
    assert {n for n in env if n.startswith("SAMVAD_")} <= known


def test_deploy_script_is_valid_bash_and_fills_every_placeholder() -> None:
    script = DEPLOY / "deploy.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "set -euo pipefail" in text
    placeholders = set(re.findall(r"\$\{(\w+)\}", (DEPLOY / "service.yaml").read_text()))
    filled = set(re.findall(r'-e "s\|\\\$\{(\w+)\}\|', text))
    assert placeholders and placeholders <= filled, placeholders - filled
    for needed in (
        "builds submit",
        "run services replace",
        "firestore databases create",
        "roles/datastore.user",
        "--type=firestore-native",
    ):
        assert needed in text, needed


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_deploy_script_passes_shellcheck() -> None:
    result = subprocess.run(
        ["shellcheck", str(DEPLOY / "deploy.sh")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


def test_firebase_emulator_config_points_at_the_indexes_and_keeps_off_8080() -> None:
    config = json.loads((ROOT / "firebase.json").read_text())
    assert (ROOT / config["firestore"]["indexes"]).resolve() == DEPLOY / "firestore.indexes.json"
    assert (ROOT / config["firestore"]["rules"]).exists()
    assert config["emulators"]["firestore"]["port"] != 8080
    assert config["emulators"]["firestore"]["host"] == "127.0.0.1"


# ---- indexes: what the store's queries need -----------------------------------------------------

EQUALITY = {"==", "in", "array_contains", "array-contains", "array_contains_any"}
TERMINALS = {"stream", "get", "count", "sum", "avg"}
PASS_THROUGH = {"limit", "limit_to_last", "select", "start_after", "start_at", "end_at"}
PASS_THROUGH |= {"end_before", "offset"}


@dataclass(frozen=True)
class Query:
    collection: str
    scope: str  # COLLECTION or COLLECTION_GROUP
    filters: tuple[tuple[str, str], ...] = ()  # (field, operator)
    orders: tuple[tuple[str, str], ...] = ()  # (field, ASCENDING | DESCENDING)
    document: bool = False  # a document reference, not a query
    line: int = 0

    def plus(self, **changes: Any) -> Query:
        values = {**self.__dict__, **changes}
        return Query(**values)

    def describe(self) -> str:
        where = " and ".join(f"{f} {op}" for f, op in self.filters)
        order = ", ".join(f"{f} {d[:4]}" for f, d in self.orders)
        return f"{self.collection} [{where}] order by [{order}] (line {self.line})"


class QueryExtractor:
    """Every query firestore.py builds: `.collection(X)` chains of `.where(filter=FieldFilter(
    field, op, ...))` and `.order_by(field, direction=...)`, followed through local variables,
    `if` branches (either may have run) and loops over literal lists of collection names."""

    def __init__(self, source: str) -> None:
        self.tree = ast.parse(source)
        self.constants: dict[str, str] = {}
        for node in self.tree.body:
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        self.constants[target.id] = node.value.value
        self.queries: set[Query] = set()
        self.seen_filters: set[int] = set()  # ids of FieldFilter / order_by calls accounted for
        self.seen_orders: set[int] = set()

    def run(self) -> set[Query]:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                self._block(node.body, {}, {})
        return self.queries

    # env: name -> possible query values; names: name -> possible collection names
    def _block(
        self, body: list[ast.stmt], env: dict[str, set[Query]], names: dict[str, set[str]]
    ) -> None:
        for stmt in body:
            self._statement(stmt, env, names)

    def _statement(
        self, stmt: ast.stmt, env: dict[str, set[Query]], names: dict[str, set[str]]
    ) -> None:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
            return  # walked on its own (closures see no outer queries: none are shared so)
        if isinstance(stmt, ast.If):
            self._terminals(stmt.test, env, names)
            then_env, else_env = dict(env), dict(env)
            self._block(stmt.body, then_env, names)
            self._block(stmt.orelse, else_env, names)
            for key in set(then_env) | set(else_env):
                env[key] = then_env.get(key, set()) | else_env.get(key, set())
            return
        if isinstance(stmt, ast.For | ast.AsyncFor):
            self._terminals(stmt.iter, env, names)
            self._bind_loop(stmt.target, stmt.iter, names)
            loop_env = dict(env)
            self._block(stmt.body, loop_env, names)
            for key, values in loop_env.items():
                env[key] = env.get(key, set()) | values
            return
        if isinstance(stmt, ast.While):
            loop_env = dict(env)
            self._block(stmt.body, loop_env, names)
            for key, values in loop_env.items():
                env[key] = env.get(key, set()) | values
            return
        if isinstance(stmt, ast.With | ast.AsyncWith):
            self._block(stmt.body, env, names)
            return
        if isinstance(stmt, ast.Try):
            for block in (stmt.body, *[h.body for h in stmt.handlers], stmt.orelse):
                self._block(block, env, names)
            self._block(stmt.finalbody, env, names)
            return
        if isinstance(stmt, ast.Assign | ast.AnnAssign):
            value = stmt.value
            if value is None:
                return
            self._terminals(value, env, names)
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    evaluated = self._eval(value, env, names)
                    if evaluated:
                        env[target.id] = evaluated
                    collections = self._literal_rows(value)
                    if collections:
                        names[target.id + "[]"] = collections
            return
        self._terminals(stmt, env, names)

    def _literal_rows(self, value: ast.expr) -> set[str]:
        """First elements of a literal list of tuples: [(STATES, "state"), ...]."""
        rows: set[str] = set()
        if isinstance(value, ast.List | ast.Tuple):
            for element in value.elts:
                first = element.elts[0] if isinstance(element, ast.Tuple) else element
                name = self._string(first, {})
                if name:
                    rows |= name
        return rows

    def _bind_loop(self, target: ast.expr, iterable: ast.expr, names: dict[str, set[str]]) -> None:
        rows = set()
        if isinstance(iterable, ast.Name):
            rows = names.get(iterable.id + "[]", set())
        else:
            rows = self._literal_rows(iterable)
        first = target.elts[0] if isinstance(target, ast.Tuple) else target
        if rows and isinstance(first, ast.Name):
            names[first.id] = rows

    def _string(self, node: ast.expr, names: dict[str, set[str]]) -> set[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, ast.Name):
            if node.id in self.constants:
                return {self.constants[node.id]}
            return names.get(node.id, set())
        return set()

    def _terminals(
        self, node: ast.AST, env: dict[str, set[Query]], names: dict[str, set[str]]
    ) -> None:
        for sub in ast.walk(node):
            if (
                isinstance(sub, ast.Call)
                and isinstance(sub.func, ast.Attribute)
                and sub.func.attr in TERMINALS
            ):
                for query in self._eval(sub.func.value, env, names):
                    if not query.document:
                        self.queries.add(query.plus(line=sub.lineno))

    def _eval(
        self, node: ast.expr, env: dict[str, set[Query]], names: dict[str, set[str]]
    ) -> set[Query]:
        if isinstance(node, ast.Name):
            return env.get(node.id, set())
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            return set()
        method, receiver = node.func.attr, node.func.value
        if method in ("collection", "collection_group") and node.args:
            scope = "COLLECTION_GROUP" if method == "collection_group" else "COLLECTION"
            return {Query(c, scope) for c in self._string(node.args[0], names)}
        base = self._eval(receiver, env, names)
        if not base:
            return set()
        if method == "document":
            return {q.plus(document=True) for q in base}
        if method == "where":
            fields = self._filter(node)
            if fields is None:
                return set()
            return {q.plus(filters=(*q.filters, fields)) for q in base}
        if method == "order_by":
            self.seen_orders.add(id(node))
            name = self._string(node.args[0], names) if node.args else set()
            direction = "ASCENDING"
            given = [k.value for k in node.keywords if k.arg == "direction"] + node.args[1:]
            if given and "DESC" in ast.unparse(given[0]).upper():
                direction = "DESCENDING"
            return {q.plus(orders=(*q.orders, (n, direction))) for q in base for n in name}
        if method in PASS_THROUGH or method in TERMINALS:
            return base
        return set()

    def _filter(self, node: ast.Call) -> tuple[str, str] | None:
        given = [k.value for k in node.keywords if k.arg == "filter"] + list(node.args[:1])
        if (
            given
            and isinstance(given[0], ast.Call)
            and ast.unparse(given[0].func).endswith("FieldFilter")
        ):
            call = given[0]
            self.seen_filters.add(id(call))
            field_name, op = (self._string(a, {}) for a in call.args[:2])
            if len(field_name) == 1 and len(op) == 1:
                return next(iter(field_name)), next(iter(op))
        return None


def extract_queries() -> tuple[set[Query], QueryExtractor]:
    extractor = QueryExtractor(STORE.read_text())
    return extractor.run(), extractor


def required_index(query: Query) -> tuple[frozenset[str], tuple[tuple[str, str], ...]] | None:
    """(equality fields, then sort fields) of the composite index the query needs, or None when
    single-field indexes serve it (Firestore merges them for equality-only queries)."""
    equality = frozenset(f for f, op in query.filters if op in EQUALITY)
    ranges = [f for f, op in query.filters if op not in EQUALITY]
    sort = [(f, d) for f, d in query.orders if f not in equality]
    for f in ranges:  # Firestore orders by an inequality field first, ascending, if not asked
        if f not in [s for s, _ in sort]:
            sort.insert(0, (f, "ASCENDING"))
    if not sort or len(equality | {f for f, _ in sort}) < 2:
        return None
    return equality, tuple(sort)


def indexes_file() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DEPLOY / "firestore.indexes.json").read_text())
    return loaded


def has_composite(query: Query, need: tuple[frozenset[str], tuple[tuple[str, str], ...]]) -> bool:
    equality, sort = need
    for index in indexes_file()["indexes"]:
        if index["collectionGroup"] != query.collection or index["queryScope"] != query.scope:
            continue
        fields = [(f["fieldPath"], f.get("order")) for f in index["fields"]]
        if fields and fields[-1][0] == "__name__":
            fields = fields[:-1]
        head, tail = fields[: len(equality)], fields[len(equality) :]
        if {f for f, _ in head} == equality and tuple(tail) == sort:
            return True
    return False


def single_field_ok(query: Query) -> list[str]:
    """Fields the query uses whose single-field index a fieldOverride switched off."""
    needed: dict[str, str] = {f: "ASCENDING" for f, _ in query.filters}
    needed.update(dict(query.orders))
    missing = []
    for override in indexes_file()["fieldOverrides"]:
        if override["collectionGroup"] != query.collection:
            continue
        field_name = override["fieldPath"]
        if field_name in needed:
            orders = {i.get("order") for i in override["indexes"]}
            if needed[field_name] not in orders:
                missing.append(f"{field_name} {needed[field_name]}")
    return missing


def test_the_extractor_accounts_for_every_filter_and_order_in_the_store() -> None:
    queries, extractor = extract_queries()
    tree = extractor.tree
    filters = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and ast.unparse(n.func).endswith("FieldFilter")
    ]
    orders = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr == "order_by"
    ]
    unseen = [ast.unparse(n) for n in filters if id(n) not in extractor.seen_filters]
    assert not unseen, f"queries the extractor cannot follow: {unseen}"
    unseen = [ast.unparse(n) for n in orders if id(n) not in extractor.seen_orders]
    assert not unseen, f"orderings the extractor cannot follow: {unseen}"
    # and it finds the queries known to be there
    described = {(q.collection, q.filters, q.orders) for q in queries}
    assert ("sessions", (("userId", "=="), ("isActive", "==")), ()) in described
    assert ("sessions", (("userId", "=="),), ()) in described
    for feed in ("user_states", "user_profiles", "sessions", "wiped_users", "deleted_sessions"):
        assert (feed, (("committedAt", ">"),), (("committedAt", "ASCENDING"),)) in described


def test_every_query_has_the_index_it_needs() -> None:
    queries, _ = extract_queries()
    problems = []
    for query in sorted(queries, key=lambda q: q.line):
        need = required_index(query)
        if need is not None and not has_composite(query, need):
            equality, sort = need
            wanted = [*(f"{f} ASCENDING" for f in sorted(equality)), *(f"{f} {d}" for f, d in sort)]
            problems.append(f"{query.describe()}: needs a composite index ({', '.join(wanted)})")
        elif need is None and (missing := single_field_ok(query)):
            problems.append(f"{query.describe()}: single-field index switched off: {missing}")
    assert not problems, "\n".join(problems)


def test_indexes_for_listing_a_users_sessions_by_status_and_recency() -> None:
    wanted = [
        [("userId", "ASCENDING"), ("status", "ASCENDING"), ("lastActivity", "DESCENDING")],
        [("userId", "ASCENDING"), ("lastActivity", "DESCENDING")],
    ]
    present = [
        [(f["fieldPath"], f["order"]) for f in i["fields"]]
        for i in indexes_file()["indexes"]
        if i["collectionGroup"] == "sessions"
    ]
    for fields in wanted:
        assert fields in present, fields


def test_big_opaque_fields_are_not_indexed_and_ttl_matches_the_script() -> None:
    overrides = {
        (o["collectionGroup"], o["fieldPath"]): o for o in indexes_file()["fieldOverrides"]
    }
    for key in (
        ("user_profiles", "tail"),
        ("history", "messages"),
        ("user_states", "stateJson"),
        ("sessions", "metadataJson"),
    ):
        assert overrides[key]["indexes"] == [], key
    ttl_groups = {group for (group, f), o in overrides.items() if f == "expireAt" and o["ttl"]}
    assert {
        "sessions",
        "user_states",
        "user_profiles",
        "wiped_users",
        "deleted_sessions",
        "snapshots",
    } <= ttl_groups
    script = (DEPLOY / "deploy.sh").read_text()
    listed = re.search(r"TTL_COLLECTION_GROUPS=\(([^)]*)\)", script)
    assert listed is not None
    assert set(shlex.split(listed.group(1))) == ttl_groups
    assert "fields ttls update expireAt" in script and "--enable-ttl" in script
