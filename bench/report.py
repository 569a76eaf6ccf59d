"""BENCHMARKS.md and bench/plots/*.png, made from bench/results/latest.json only.

Every figure in the document comes from the results file, so the two never disagree. Prose that
does not depend on a run lives here too: edit this file, not BENCHMARKS.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = ROOT / "BENCHMARKS.md"
PLOTS = ROOT / "bench" / "plots"
BEFORE = ROOT / "bench" / "results" / "before.json"
EXPERIMENTS = ROOT / "bench" / "results" / "experiments.json"

# The design note's prices ("Cost Estimation") and assumptions.
PRICE_WRITE = 0.18 / 100_000
PRICE_READ = 0.06 / 100_000
PRICE_DELETE = 0.02 / 100_000
STORAGE_MONTH = 0.18  # the note's 1 GB of storage
DAU = 1000
DAYS = 30
NOTE_TOTAL = 1.67
NOTE_WRITES_MONTH = 810_000
NOTE_READS_MONTH = 45_000
SECONDS_PER_MONTH = DAYS * 86_400

OPS = {
    "state": "GET /api/session/{userId}/state (cache hit)",
    "profile": "GET /api/session/{userId}/profile (cache hit, 20 messages)",
    "append": "POST /api/session/{userId}/history",
}
GOALS = {"state": 0.8, "profile": 0.8, "append": 0.6}
NAMES = ("ceiling", "samvad", "baseline")
COLORS = {"ceiling": "#7f7f7f", "samvad": "#1f77b4", "baseline": "#d62728"}


def dig(data: Any, *keys: Any, default: Any = None) -> Any:
    for key in keys:
        in_dict = isinstance(data, dict) and key in data
        in_list = isinstance(data, list) and isinstance(key, int) and -len(data) <= key < len(data)
        if in_dict or in_list:
            data = data[key]
        else:
            return default
    return data


def num(value: Any, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float | int):
        text = f"{value:,.{digits}f}"
        return text + unit
    return str(value)


def money(value: float) -> str:
    return f"${value:,.2f}"


def mib(value: Any) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.1f} MiB"


def met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def ratio(http: dict[str, Any], op: str, name: str, connections: int) -> float | None:
    mine = dig(http, "results", op, name, str(connections), "throughput")
    top = dig(http, "results", op, "ceiling", str(connections), "throughput")
    return mine / top if mine and top else None


# ---- sections ------------------------------------------------------------------------------------


def main_run(doc: dict[str, Any]) -> dict[str, Any]:
    """The run that measured the most workloads (`--only` runs add to it)."""
    runs: dict[str, dict[str, Any]] = doc.get("runs", {})
    by_date: dict[str, list[str]] = {}
    for name, info in runs.items():
        by_date.setdefault(str(info.get("date")), []).append(name)
    if not by_date:
        return dict(doc.get("run", {}))
    date = max(by_date, key=lambda d: len(by_date[d]))
    return dict(runs[by_date[date][0]])


def section_run(doc: dict[str, Any]) -> list[str]:
    run = main_run(doc)
    m = run.get("machine", {})
    lines = [
        "## The run",
        "",
        f"- **Date**: {run.get('date')}; wall time {num(run.get('wall_seconds'), 0)} s"
        + (" (**quick** smoke run: small and short, not for quoting)" if run.get("quick") else ""),
        f"- **Commit**: `{run.get('commit')}`"
        + (" plus uncommitted changes in the work tree" if run.get("dirty") else ""),
        f"- **Command**: `{run.get('command')}` (`make bench` runs `python -m bench`; "
        "`--no-report` leaves the document alone, written afterwards with `--report-only`)",
        f"- **Machine**: {m.get('nproc')} CPUs (`nproc`), {m.get('cpu_model')} "
        f"(/proc/cpuinfo), {num((m.get('ram_bytes') or 0) / 2**30, 1)} GiB RAM; "
        f"Linux {m.get('kernel')}; Python {m.get('python')}; aiohttp {m.get('aiohttp')}",
        "- **Load average** (1, 5, 15 min) before the run: "
        + ", ".join(num(x, 2) for x in run.get("load_average_before", []))
        + "; after: "
        + ", ".join(num(x, 2) for x in run.get("load_average_after", []))
        + ". The machine (2 cores) is shared with other work, which the load average shows: "
        "absolute figures move from run to run; the ratios between servers measured side by "
        "side in one run are what to read.",
        "- **Firestore**: Google's emulator (`samvad.emulator.FirestoreEmulator`, a Java process) "
        "on the same machine. It is far slower than Firestore for transactions and it shares the "
        "two cores, so everything that waits on it is pessimistic here.",
    ]
    later: dict[str, list[str]] = {}  # a later run's date -> the workloads it gave
    infos = doc.get("runs", {})
    for name, info in infos.items():
        if info.get("date") != run.get("date"):
            later.setdefault(info.get("date"), []).append(name)
    for date, names in sorted(later.items()):
        info = infos[names[0]]
        lines.append(
            f"- **{', '.join(names)}** from a later run: {date}, commit "
            f"`{str(info.get('commit'))[:12]}`, `{info.get('command')}`, load average before "
            + ", ".join(num(x, 2) for x in info.get("load_average_before", []))
        )
    return [*lines, ""]


def section_goals(w: dict[str, Any]) -> list[str]:
    http = w.get("http", {})
    rows = []
    for op, goal in GOALS.items():
        r = ratio(http, op, "samvad", 32)
        mine = cpu_us(dig(http, "results", op, "samvad", "32"))
        top = cpu_us(dig(http, "results", op, "ceiling", "32"))
        cost = f" (by CPU per request: {num(top / mine, 2)})" if (mine and top) else ""
        rows.append(
            (
                f"{OPS[op].split(' (')[0]}: throughput at 32 connections vs the ceiling",
                f">= {goal}",
                num(r, 3) + cost,  # 3 places: 0.798 is not 0.8
                met(None if r is None else r >= goal),
            )
        )
    chatty = dig(w, "voice", "samvad", "chatty", default={})
    wpm = chatty.get("writes_per_message")
    rows.append(
        (
            "Chatty voice: Firestore writes per message",
            "<= 0.5",
            num(wpm, 3),
            met(None if wpm is None else wpm <= 0.5),
        )
    )
    mx = chatty.get("max_writes_per_doc_per_second")
    rows.append(
        (
            "Chatty voice: most writes to one document in one second",
            "<= 3",
            num(mx),
            met(None if mx is None else mx <= 3),
        )
    )
    ws = w.get("websockets", {})
    if ws.get("measured"):
        ok = ws["open_after_heartbeats"] >= 10_000 and ws["rss_after_bytes"] < 2**30
        rows.append(
            (
                "Idle websockets in one process, with heartbeats",
                "10,000 under 1 GiB RSS",
                f"{ws['open_after_heartbeats']:,} open, {mib(ws['rss_after_bytes'])} RSS",
                met(ok if ws["count"] >= 10_000 else None),
            )
        )
    else:
        rows.append(
            ("Idle websockets in one process", "10,000 under 1 GiB RSS", "not measured yet", "n/a")
        )
    p99 = dig(w, "interruptions", "in_process", "p99_us")
    rows.append(
        (
            "Interruption push, p99 in process",
            "< 1 ms",
            num(p99, 1, " µs"),
            met(None if p99 is None else p99 < 1000),
        )
    )
    rec = w.get("recovery", {})
    rows.append(
        (
            f"Recovery: {num(rec.get('pending'))} pending writes drained after Firestore is back",
            "(no target)",
            num(rec.get("empty_after_s"), 1, " s"),
            "",
        )
    )
    lines = ["## Goals at a glance", "", "| goal | target | measured | met |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    missed = [op for op, goal in GOALS.items() if (ratio(http, op, "samvad", 32) or 0) < goal]
    layers = dig(w, "layers", "results", default={})
    bare = dig(layers, LAYERS_ALL_OUT, "throughput")
    top = dig(layers, "ceiling", "throughput")
    if missed:
        summary = (
            f"Not met: {', '.join(OPS[op].split(' (')[0] for op in missed)}. A cached GET state "
            f"costs samvad {num(cpu_us(dig(http, 'results', 'state', 'samvad', '32')))} µs of "
            "server CPU against the ceiling's "
            f"{num(cpu_us(dig(http, 'results', 'state', 'ceiling', '32')))} µs."
        )
        if bare and top:
            summary += (
                " What is left of the difference is in what every request of a production "
                "service pays and the ceiling does not: with the edge (request id, trace, "
                "metrics, JSON errors) and the change feed taken "
                f'out, samvad reached {num(bare / top, 2)} of the ceiling ("Where a cached '
                "GET's time goes\")."
            )
        lines += ["", summary]
    else:
        lines += ["", "Every goal is met in this run."]
    return [*lines, ""]


def section_method(w: dict[str, Any]) -> list[str]:
    gen = dig(w, "generator", "runs", default={})
    best = max(gen.values(), key=lambda r: r["throughput"]) if gen else None
    lines = [
        "## How it is measured",
        "",
        "- **Three servers, side by side, in one run**, each a process of its own on 127.0.0.1, "
        "driven in turn with the same requests (the order rotates with each connection count):",
        "  - **ceiling** (`bench/ceiling.py`): bare aiohttp answering the same routes with the "
        "same JSON shapes from a dict, no validation, no logging: the least any aiohttp service "
        "must do;",
        "  - **samvad** (`python -m samvad`, `SAMVAD_AUTH=none`, default settings: the change "
        "feed on, access lines for errors and slow requests only (`SAMVAD_ACCESS_LOG=errors`), "
        "logs written to a file);",
        "  - **baseline** (`bench/baseline.py`, for comparison only): the service as the design "
        "note's peers build it: every request awaits Firestore through `AsyncClient`, and an "
        "append reads the history document, adds the message and writes it back.",
        "- **Load** comes from a second process (`bench/loadgen.py`): N keep-alive connections "
        "in a closed loop, one request in flight each, on a bare `asyncio.Protocol` (an "
        "aiohttp client costs as much CPU per request as the server it measures). Every figure "
        "is taken over the measured window after a warm-up; p50/p99 are per request, "
        "client-side.",
        "- 128 users, each with a state and 20 history messages, are written through each "
        "server's own API first; connection i reads or appends for user i.",
        "- **CPU**: `server CPU` is the server process's CPU time over the window per wall "
        "second (1.0 = one core; a single Python process cannot use more). When it is near "
        "1.0 the server is the bottleneck, which is what a throughput figure should measure.",
    ]
    if best:
        per_core = best["throughput"] / best["client_cpu"] if best.get("client_cpu") else None
        lines.append(
            f"- **The generator's own ceiling**: against a server that answers with canned "
            f"bytes (`python -m bench.loadgen --null-server`) it reached "
            f"{num(best['throughput'])} requests/s at {best['connections']} connections using "
            f"{num(best['client_cpu'], 2)} of a core: about {num(per_core)} requests/s per "
            "core of client CPU. Every row below gives the client's CPU too."
        )
        rows = [
            "| connections | requests/s | p50 ms | p99 ms | client CPU |",
            "|---|---|---|---|---|",
        ]
        for c, r in sorted(gen.items(), key=lambda kv: int(kv[0])):
            rows.append(
                f"| {c} | {num(r['throughput'])} | {num(r['p50_ms'], 2)} "
                f"| {num(r['p99_ms'], 2)} | {num(r['client_cpu'], 2)} |"
            )
        lines += ["", "Load generator against the null server:", "", *rows]
    return [*lines, ""]


def cpu_us(run: dict[str, Any] | None) -> float | None:
    """Server CPU microseconds per request (recorded, or worked out from a single run)."""
    if not run:
        return None
    if run.get("cpu_us_per_request") is not None:
        return float(run["cpu_us_per_request"])
    if run.get("server_cpu") and run.get("throughput"):
        return float(run["server_cpu"] / run["throughput"] * 1e6)
    return None


def section_http(w: dict[str, Any]) -> list[str]:
    http = w.get("http")
    if not http or "results" not in http:
        return ["## HTTP throughput and latency", "", "Not measured in this run.", ""]
    rounds = http.get("rounds", 1)
    lines = [
        "## HTTP throughput and latency",
        "",
        f"Each cell: {num(http['duration'], 1)} s measured after {num(http['warmup'], 1)} s "
        f"of warm-up, {rounds} round(s) with the servers taking turns; the round with the most "
        "throughput is shown (other work on the machine only ever slows a run down). "
        "`x ceiling` is throughput as a fraction of the ceiling's at the same connection count. "
        "`CPU µs/req` is the server's CPU time per request, the least of the rounds: the cost "
        "of a request, which interference inflates far less than it cuts throughput.",
        "",
        "![throughput](bench/plots/throughput.png)",
        "",
        "![p99 latency](bench/plots/p99.png)",
        "",
    ]
    for op, title in OPS.items():
        res = http["results"].get(op)
        if not res:
            continue
        lines += [
            f"### {title}",
            "",
            "| connections | server | requests/s | x ceiling | p50 ms | p99 ms | server CPU "
            "| CPU µs/req | client CPU | non-2xx |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in http["levels"]:
            for name in NAMES:
                r = dig(res, name, str(c))
                if not r:
                    continue
                bad = r["requests"] - r["ok"]
                lines.append(
                    f"| {c} | {name} | {num(r['throughput'])} | {num(ratio(http, op, name, c), 2)} "
                    f"| {num(r['p50_ms'], 2)} | {num(r['p99_ms'], 2)} | {num(r['server_cpu'], 2)} "
                    f"| {num(cpu_us(r), 0)} | {num(r['client_cpu'], 2)} | {bad} |"
                )
        lines.append("")
    return lines


LAYERS_ALL_OUT = "without edge and feed"


def section_layers(w: dict[str, Any]) -> list[str]:
    layers = w.get("layers")
    if not layers or "results" not in layers:
        return []
    res = layers["results"]
    ceiling = res.get("ceiling", {})
    lines = [
        "## Where a cached GET's time goes: the cross-cutting layers",
        "",
        "samvad with one layer changed at a time (`bench/layers.py` and settings: the same app), "
        f"GET state at 32 connections, side by side with the ceiling, {layers['rounds']} rounds "
        "each, servers taking turns; requests/s is the best round, CPU µs/req the least server "
        "CPU per request of any round, and `saved` samvad's minus the variant's (negative: the "
        "variant costs more). On a machine shared with other work each difference carries an "
        "error of several µs.",
        "",
        "| variant | requests/s | x ceiling | CPU µs/req | saved µs/req |",
        "|---|---|---|---|---|",
    ]
    for name, r in res.items():
        share = r["throughput"] / ceiling["throughput"] if ceiling.get("throughput") else None
        saved = layers["saved_us_per_request"].get(name)
        lines.append(
            f"| {name} | {num(r['throughput'])} | {num(share, 2)} | "
            f"{num(r['cpu_us_per_request'], 0)} | {num(saved, 0) if saved is not None else ''} |"
        )
    lines += [
        "",
        "The variants: an access line for every request (`SAMVAD_ACCESS_LOG=all`; the default "
        "writes lines for 4xx, 5xx and slow requests only, as Cloud Run already logs every "
        "request); the change feed off (`SAMVAD_SYNC_INTERVAL=0`: five Firestore queries a "
        "second, whatever the load); the edge out (samvad/api/middlewares.py, the wrapper "
        "around every route's handler: request id and trace for the logs, the latency "
        "histogram, JSON error answers; a JSON answer still carries the security headers it is "
        "made with); and the last two together. Authentication and CORS are off here "
        "(`SAMVAD_AUTH=none`): the edge checks no credential. Without the edge, errors would be "
        "aiohttp's text pages: the variant exists to measure, not to run.",
        "",
    ]
    return lines


def section_cold(w: dict[str, Any]) -> list[str]:
    c = w.get("cold")
    if not c or "direct_get" not in c:
        return []
    rows = [
        ("samvad GET state, cold (1 document read)", c["samvad_state"]),
        ("direct AsyncClient get of the same document", c["direct_get"]),
        ("samvad GET profile, cold (profile and state documents)", c["samvad_profile"]),
        (
            "direct AsyncClient gets of the same two documents, one after the other",
            c["direct_two_gets"],
        ),
        ("samvad GET state again (now cached)", c["samvad_state_cached"]),
    ]
    if "direct_two_gets_at_once" in c:
        rows.insert(
            4,
            (
                "direct AsyncClient gets of the same two documents, at once",
                c["direct_two_gets_at_once"],
            ),
        )
    lines = [
        "## Cold reads",
        "",
        f"{c['users']} users for each kind of read, written straight to Firestore with samvad's "
        "own store code beforehand, then read once each through samvad, one request at a time. "
        "The emulator's own round trip is a direct `AsyncClient` get of the same documents from "
        "the bench process.",
        "",
        "| read | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {num(s['p50_ms'], 2)} | {num(s['p90_ms'], 2)} | {num(s['p99_ms'], 2)} "
        f"| {num(s['max_ms'], 2)} |"
        for name, s in rows
    ]
    extra = c["samvad_state"]["p50_ms"] - c["direct_get"]["p50_ms"]
    lines += [
        "",
        f"A cold GET state costs the emulator's round trip plus {num(extra, 2)} ms at the median "
        "(HTTP, routing, the edge, the cache fill). A cold profile reads its two documents at "
        "once (`get_user_profile` starts the state read before it awaits the profile), so it "
        "compares with the two gets at once.",
        "",
    ]
    return lines


def _voice_rows(v: dict[str, Any], kind: str) -> list[str]:
    rows = []
    for name in ("samvad", "baseline"):
        r = dig(v, name, kind)
        if not r:
            continue
        reads = r["reads"]
        rows.append(
            f"| {name} | {r['messages']} | {r['writes']} | {num(r['writes_per_message'], 3)} "
            f"| {r['max_writes_per_doc_per_second']} | {r['deletes']} | {reads['billed']} "
            f"| {', '.join(f'{k} {n}' for k, n in r['writes_by_collection'].items())} |"
        )
    return rows


def section_voice(w: dict[str, Any]) -> list[str]:
    v = w.get("voice")
    if not v or "samvad" not in v:
        return []
    chatty = dig(v, "samvad", "chatty", default={})
    head = [
        "| server | messages | writes | writes/message | max writes/doc/s | deletes "
        "| billed reads | writes by collection |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines = [
        "## Chatty voice workload: Firestore writes",
        "",
        f"10 users, each sending 5 messages a second (user and assistant alternating) for "
        f"{num(v['chatty_seconds'], 0)} s"
        + (
            ", with a barge-in over REST (`POST /api/session/{sessionId}/interruptions`) every "
            "10th message"
            if chatty.get("interruptions")
            else " (interruptions were not sent: see the notes)"
        )
        + ". Every Firestore call is counted at the proxy (`bench/proxy.py`: "
        "tools/firestore_proxy.py's FirestoreProxy, which counts the writes of every successful "
        "Commit, plus a count of the documents each get and query returns): the server's "
        "`FIRESTORE_EMULATOR_HOST` points at it. Counted from the first message until everything "
        "acknowledged has landed.",
        "",
        *head,
        *_voice_rows(v, "chatty"),
        "",
        "![writes per message](bench/plots/writes.png)",
        "",
    ]
    lat = dig(v, "samvad", "chatty", "latency", default={})
    if lat:
        lines += [
            "Request latency during the chatty workload (samvad, client-side): "
            + "; ".join(
                f"{kind} p50 {num(s['p50_ms'], 2)} ms, p99 {num(s['p99_ms'], 2)} ms"
                for kind, s in lat.items()
            )
            + ".",
            "",
        ]
    lines += [
        "### Paced sessions (the design note's session)",
        "",
        f"10 users at once, each: read state and profile on connect, create the session, "
        f"{v['paced_turns']} turns (a user message, the assistant's reply 1.2 s later, a turn "
        "every 2.4 s), 5 session updates, end the session. At this pace no two messages of one "
        "user fall into one flush window, so this is samvad's worst case for writes per "
        "message: the write-behind has nothing to coalesce.",
        "",
        *head,
        *_voice_rows(v, "paced"),
        "",
    ]
    return lines


def _per_session(r: dict[str, Any], sessions: int, idle_reads_per_s: float) -> dict[str, float]:
    reads = r["reads"]
    # Queries that found nothing are the change feed's polls: an instance pays those whether or
    # not anyone talks (priced per instance below), so they are not charged to sessions.
    feed_floor = reads["empty_queries"] if idle_reads_per_s else 0
    return {
        "writes": (r["writes"] - r["deletes"]) / sessions,
        "deletes": r["deletes"] / sessions,
        "reads": (reads["billed"] - feed_floor) / sessions,
    }


def section_cost(w: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    v = w.get("voice")
    if not v or not dig(v, "samvad", "paced"):
        return [], {}
    turns = v["paced_turns"]
    idle = dig(v, "samvad", "idle", default={})
    idle_reads_per_s = idle["reads"]["billed"] / idle["seconds"] if idle else 0.0
    rows = []
    model: dict[str, Any] = {}
    for name in ("samvad", "baseline"):
        r = dig(v, name, "paced")
        if not r:
            continue
        s = _per_session(r, r.get("sessions", 10), idle_reads_per_s if name == "samvad" else 0.0)
        month = {k: x * DAU * DAYS for k, x in s.items()}
        cost = (
            month["writes"] * PRICE_WRITE
            + month["reads"] * PRICE_READ
            + month["deletes"] * PRICE_DELETE
            + STORAGE_MONTH
        )
        model[name] = {"per_session": s, "month": month, "cost": cost}
        rows.append(
            f"| {name} (measured) | {num(s['writes'] / turns, 2)} | {num(s['reads'] / turns, 2)} "
            f"| {num(s['deletes'] / turns, 2)} | {num(month['writes'])} | {num(month['reads'])} "
            f"| {num(month['deletes'])} | {money(cost)} |"
        )
    note_turn_w = NOTE_WRITES_MONTH / (DAU * DAYS * 10)
    note_turn_r = NOTE_READS_MONTH / (DAU * DAYS * 10)
    rows.append(
        f"| design note's estimate | {num(note_turn_w, 2)} | {num(note_turn_r, 2)} | 0 "
        f"| {num(NOTE_WRITES_MONTH)} | {num(NOTE_READS_MONTH)} | 0 | {money(NOTE_TOTAL)} |"
    )
    feed_month = idle_reads_per_s * SECONDS_PER_MONTH
    lines = [
        "## Cost model",
        "",
        'The design note\'s assumptions ("Cost Estimation"): 1,000 daily active users, one '
        "session each a day, 10 turns a session (a turn = one user message + one assistant "
        "message), a session created, updated 5 times and ended, 30 days; its prices: writes "
        "$0.18, reads $0.06, deletes $0.02 per 100,000; storage $0.18 (1 GB). Per-turn figures "
        "are the paced workload's measured counts per session divided by its turns, so they "
        "carry the session's own writes and the reads the workload causes (state and history on "
        "connect, the reads inside each write transaction, the change feed re-reading what was "
        "written). A get of a missing document is counted as a billed read.",
        "",
        "| | writes/turn | reads/turn | deletes/turn | writes/month | reads/month "
        "| deletes/month | $/month (1,000 DAU, with storage) |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    if "samvad" in model:
        s = dig(v, "samvad", "paced")
        lines += [
            f"samvad's reads per turn come from: the reads inside each write transaction "
            f"(the document and its wipe tombstone: {s['reads']['found'] + s['reads']['missing']} "
            f"reads by get in the run, {s['reads']['missing']} of them of tombstones that do not "
            f"exist) and the change feed returning the documents this instance itself wrote "
            f"({s['reads']['query_documents']} documents). Writes per turn are higher than one "
            "per message because a session write also keeps `active_users/{userId}` (the "
            "`activeUsers` count) and the history is flushed once per message at this pace.",
            "",
        ]
    if idle:
        cost = feed_month * PRICE_READ
        lines += [
            "### The change feed's idle cost",
            "",
            f"Each samvad instance polls Firestore every `SAMVAD_SYNC_INTERVAL` (default 1 s): "
            f"5 queries a poll, each billed at least one read even when it finds nothing. Counted "
            f"at the proxy over an idle {num(idle['seconds'], 0)} s: {idle['reads']['billed']} "
            f"billed reads ({num(idle_reads_per_s, 2)}/s), {num(feed_month)} reads per "
            f"instance-month: **{money(cost)} per instance-month**, whether or not anyone talks. "
            "That is more than the design note's whole estimate for 1,000 DAU, per instance that "
            "stays up (Cloud Run `min-instances`, or an instance kept warm by traffic). It "
            "scales with 1/`SAMVAD_SYNC_INTERVAL` (10 s: a tenth of it, with other instances' "
            "writes seen up to 10 s late) and stops with the instance (scaled to zero).",
            "",
        ]
        model["feed"] = {"reads_per_s": idle_reads_per_s, "reads_month": feed_month, "cost": cost}
    return lines, model


def section_ws(w: dict[str, Any]) -> list[str]:
    ws = w.get("websockets")
    if not ws:
        return []
    if not ws.get("measured"):
        return [
            "## Idle websockets",
            "",
            f"Not measured yet: {ws.get('reason') or ws.get('error')}",
            "",
        ]
    per = ws["bytes_per_connection"]
    projected = (2**30 - ws["rss_before_bytes"]) / per if per > 0 else None
    return [
        "## Idle websockets",
        "",
        f"One samvad process; {num(ws['count'])} agent sockets (`GET /ws?userId=…&sessionId=…`, "
        "a distinct user and session each) opened from one asyncio client process "
        f"(`bench/wsclient.py`), each waiting for its ready frame; then left idle with the "
        f"server's heartbeat at {num(ws['heartbeat_s'], 0)} s (the default is 20 s: shorter "
        "here so that every socket is pinged at least twice in the window). RSS is the server's "
        "`VmRSS` from /proc/<pid>/status, after a warm-up of 50 sockets and once the "
        "session writes had landed. Both processes raise `RLIMIT_NOFILE` to its hard limit "
        f"({num(ws['open_files_limit'])}).",
        "",
        "| figure | value |",
        "|---|---|",
        f"| sockets opened (not opened after {5} tries) | {num(ws['opened'])} "
        f"({num(ws['failed'])}) |",
        f"| opens refused and tried again | {_refusals(ws.get('refusals'))} |",
        f"| time to open them all | {num(ws['open_seconds'], 1)} s |",
        f"| still open after the heartbeats | {num(ws['open_after_heartbeats'])} |",
        f"| server RSS before | {mib(ws['rss_before_bytes'])} |",
        f"| server RSS with all open | {mib(ws['rss_after_bytes'])} |",
        f"| per connection | {num(per / 1024, 1)} KiB |",
        f"| server CPU while idle (heartbeats) | {num(ws['idle_cpu'], 3)} of a core |",
        f"| projected at 1 GiB RSS | about {num(projected)} sockets |",
        "",
        "Per connection includes everything a real idle agent costs the process: the socket, "
        "its writer task and queue, its session record and the cache entries of its user.",
        "",
    ]


def _refusals(refusals: dict[str, int] | None) -> str:
    if not refusals:
        return "none"
    return ", ".join(f"{reason}: {n:,}" for reason, n in refusals.items())


def section_interruptions(w: dict[str, Any]) -> list[str]:
    i = w.get("interruptions")
    if not i or "in_process" not in i:
        return []
    p = i["in_process"]
    lines = [
        "## Interruption push",
        "",
        f"`service.push_interruption` timed call by call in one process ({num(p['pushes'])} "
        f"pushes over {num(p['sessions'])} sessions, garbage collector on): p50 "
        f"{num(p['p50_us'], 2)} µs, p99 {num(p['p99_us'], 2)} µs, p99.9 {num(p['p999_us'], 2)} "
        f"µs, max {num(p['max_us'], 1)} µs.",
        "",
    ]
    other = i.get("interruption_push_py")
    if other:
        lines += [
            "`bench/interruption_push.py` (written separately; its output as it printed it):",
            "",
            "```",
            other["output"].rstrip(),
            "```",
            "",
        ]
    return lines


def section_recovery(w: dict[str, Any]) -> list[str]:
    r = w.get("recovery")
    if not r or "series" not in r:
        return []
    rate = r["pending"] / r["drain_after_reachable_s"] if r.get("drain_after_reachable_s") else None
    return [
        "## Recovery after an outage",
        "",
        f"samvad behind the proxy; the proxy goes down (every call fails UNAVAILABLE); "
        f"{num(r['pending'])} appends of {num(r['pending'])} distinct users are acknowledged "
        f"(statuses: {r['statuses']}) in {num(r['acknowledged_seconds'], 1)} s; `/readyz` "
        f"shows Firestore unreachable {num(r['outage_noticed_after_s'], 2)} s after the outage "
        "began (the first failed store call opens the circuit) and the backlog holds "
        f"{num(dig(r, 'backlog_before', 'entries'))} entries "
        f"({mib(dig(r, 'backlog_before', 'bytes'))}). Then the proxy comes back and `/readyz` is "
        "polled every 100 ms.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| Firestore seen reachable again | {num(r['reachable_after_s'], 2)} s after it came "
        "back (the prober's backoff, capped at `SAMVAD_RETRY_MAX` = "
        f"{num(r['retry_max_s'], 0)} s) |",
        f"| backlog empty | {num(r['empty_after_s'], 1)} s after it came back |",
        f"| drain rate | {num(rate)} entries/s with `SAMVAD_FLUSH_CONCURRENCY` = "
        f"{r.get('flush_concurrency')} |",
        "| the same flushes from samvad's store code called in the bench process, 16 at "
        f"once: straight to the emulator | {num(r.get('emulator_direct_flushes_per_s'))} "
        "flushes/s |",
        "| the same, through the proxy | "
        f"{num(r.get('emulator_proxied_flushes_per_s'))} flushes/s |",
        f"| writes counted at the proxy during the drain | {num(r['writes_during_drain'])} |",
        "",
        "![backlog drain](bench/plots/backlog.png)",
        "",
        "Each flush is one transaction (begin; read the document and the user's wipe tombstone; "
        "commit), so the drain is bound by how many transactions a second Firestore takes, here "
        "the emulator (and the Python proxy in front of it: the last two rows); on Firestore "
        "itself, with its own latency, `SAMVAD_FLUSH_CONCURRENCY` sets the pace.",
        "",
    ]


def section_profile(
    w: dict[str, Any], before: dict[str, Any] | None, experiments: dict[str, Any] | None
) -> list[str]:
    lines = ["## Profiles and hot-path changes", ""]
    p = w.get("profile", {})
    if p.get("measured"):
        lines += [
            "`py-spy record --nonblocking --rate 200 --format raw` against the samvad process "
            "while the load generator runs 32 connections; the raw stacks are in "
            "bench/results/profiles/. Share of samples in which a frame is on the stack "
            "(inclusive), for the frames that matter:",
            "",
        ]
        keep = (
            "samvad/",
            "logging/",
            "json/",
            "pydantic",
            "orjson",
            "web_protocol",
            "selector_events",
            "prometheus",
            "web_app",
            "web_response",
        )
        for op in ("state", "append"):
            prof = p.get(op)
            if not prof:
                continue
            lines += [
                f"**{OPS[op]}** ({prof['samples']} samples, {num(prof['throughput'])} requests/s "
                "while profiled):",
                "",
                "| frame | inclusive % |",
                "|---|---|",
            ]
            shown = 0
            for frame, share in prof["inclusive"]:
                if any(k in frame for k in keep) and "__main__" not in frame and shown < 22:
                    lines.append(f"| `{frame}` | {share} |")
                    shown += 1
            lines.append("")
    lines += section_changes(experiments)
    if before:
        lines += _before_after(w, before)
    return lines


def _before_after(w: dict[str, Any], before: dict[str, Any]) -> list[str]:
    after_http = w.get("http", {})
    before_http = dig(before, "workloads", "http", default={})
    rows = []
    for op in OPS:
        for c in (1, 32, 128):
            b = ratio(before_http, op, "samvad", c)
            a = ratio(after_http, op, "samvad", c)
            if b is None or a is None:
                continue
            was = dig(before_http, "results", op, "samvad", str(c))
            now = dig(after_http, "results", op, "samvad", str(c))
            rows.append(
                f"| {op} | {c} | {num(was['throughput'])} | {num(b, 2)} | {num(cpu_us(was), 0)} "
                f"| {num(now['throughput'])} | {num(a, 2)} | {num(cpu_us(now), 0)} |"
            )
    lines = [
        "### Before and after",
        "",
        f"bench/results/before.json is the HTTP run of {dig(before, 'run', 'date')} (commit "
        f"`{str(dig(before, 'run', 'commit'))[:12]}`), before the changes of this round and "
        "the round before, listed above; the after figures are this run's. The runs were at "
        "different times on a shared machine, so compare the ratios to the ceiling, each "
        "measured side by side within its own run, and the CPU per request.",
        "",
        "| op | connections | samvad req/s before | x ceiling before | CPU µs/req before "
        "| samvad req/s after | x ceiling after | CPU µs/req after |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    return lines


# What each round of hot-path work changed, newest first; the round before these is in
# bench/results/experiments.json, with its before/after timings.
CHANGES_BY_ROUND: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "What was changed in this round",
        (
            "**The edge wraps each route's handler** (samvad/api/middlewares.py `Edge`) instead "
            "of sitting in aiohttp's middleware chain: with any middleware installed, aiohttp "
            "builds every request's handler from cached partials and adds a middleware of its own "
            "(`_fix_request_current_app`, a coroutine frame per request). Authentication moved "
            "into the same wrapper (`Guard.authorize`, the route's policy found once, when the "
            "route is registered); a catch-all route, the router's last resort, answers 404, 405 "
            "(with `Allow`) and CORS preflights; and an app with a route registered around the "
            "edge refuses to start.",
            "**A cold profile reads its two documents at once**: `get_user_profile` starts the "
            "state read (for the preferences) before it awaits the profile, instead of after.",
        ),
    ),
    (
        "The round before",
        (
            "**JSON answers made with their security headers**: one copy of a prebuilt header set "
            "(samvad/api/responses.py `json_response`) instead of seven lookups per response "
            "after the handler returned; the edge adds them only to other responses.",
            "**The request's log context left in its task**: aiohttp runs every request in a task "
            "of its own, so the edge sets the context and never resets it, and the access line "
            "reads it there (with the route, found once per request for the metrics and the "
            "line). Request ids come from a counter without a Python frame.",
            "**A read cache whose hit is one dict lookup** (samvad/cache.py `ReadCache`) in place "
            "of cachetools' TTLCache for the service's state, profile, session and view caches: a "
            "TTLCache hit is four Python calls. A cached read no longer starts a coroutine or "
            "builds a lambda, and retention is compared in microseconds precomputed per kind.",
        ),
    ),
    (
        "Two rounds before",
        (
            "**Access lines only where they are read**: `SAMVAD_ACCESS_LOG=errors` (the default) "
            "writes the line for 4xx and 5xx answers and for requests slower than "
            "`SAMVAD_SLOW_REQUEST`; Cloud Run's request log has every request already. `all` and "
            "`off` remain; `make run` uses `all`.",
            "**One edge middleware** instead of three middlewares and two response signals "
            "(samvad/api/middlewares.py): request context, latency, JSON errors and the response "
            "headers in one frame. Security headers no longer parse `Content-Type` per response.",
            "**A latency histogram without locks** (samvad/api/metrics.py `RequestLatency`): "
            "prometheus_client's `Histogram` takes a lock and walks its buckets per observation.",
            "**Rendered bodies kept with their records** (samvad/api/routes.py `RenderedBodies`): "
            "a cached GET state or profile answers with the bytes rendered for the very record "
            "the service holds; the body goes with the record (a weak reference), a wiped user's "
            "included. Profile views are reused while their records are (samvad/service.py).",
            "**Messages stored as JSON text** (`tailJson`, `messagesJson`; "
            "samvad/store/firestore.py), not as arrays of Firestore maps: the micro table below "
            "has the encoding cost of both. Old documents are still read. The tail's trim is "
            "linear.",
            "**Appends counted, not recounted**, in the write-behind's byte bound; message sizes "
            "computed once; timestamps formatted without building datetimes; wall-clock "
            "microseconds without a datetime; the id check in one regex scan.",
        ),
    ),
)


def section_changes(experiments: dict[str, Any] | None) -> list[str]:
    lines = []
    for title, changes in CHANGES_BY_ROUND:
        lines += [f"### {title}", "", *[f"- {change}" for change in changes], ""]
    if not experiments:
        return lines
    us = experiments["us_per_call"]
    rows = [
        f"| {name} | {experiments['pieces'][name].split(': ', 1)[-1]} "
        f"| {num(us['before'][name], 1)} | {num(us['after'][name], 1)} |"
        for name in us["after"]
    ]
    return [
        *lines,
        "### Three rounds before",
        "",
        *[f"- {c}" for c in experiments["changes"]],
        "",
        f"Each piece timed call by call in one process, before and after "
        f"(bench/results/experiments.json, {experiments['date']}: a one-off measurement, the "
        "old code is gone from the tree):",
        "",
        "| piece | what | µs before | µs after |",
        "|---|---|---|---|",
        *rows,
        "",
        "In a tight loop every piece runs hot in the CPU's caches; inside a server handling "
        "requests the same code costs several times more, so these are lower bounds of the "
        "saving per request.",
        "",
    ]


def section_micro(w: dict[str, Any]) -> list[str]:
    m = w.get("micro")
    if not m or "flush_encoding" not in m:
        return []
    enc = m["flush_encoding"]
    pieces = m["request_pieces"]
    lines = [
        "## Hot-path pieces, one at a time",
        "",
        "`python -m bench --only micro`: pieces of the request path and of the write-behind "
        "timed alone in one process (best of 5). Lower bounds: see the note above.",
        "",
        "**A history flush, encoded by the Firestore client** (the profile document with its "
        "inline tail of messages; this runs on the event loop, so every other request waits "
        "meanwhile). The first two columns are the layout before this round, the tail as an "
        "array of Firestore maps; the last is the layout now, one JSON text field (`tailJson`):",
        "",
        "| messages in the tail | maps: encode µs | maps: decode µs (a cold read) "
        "| JSON text: encode µs |",
        "|---|---|---|---|",
    ]
    for length, r in enc.items():
        lines.append(
            f"| {length} | {num(r['encode_us'])} | {num(r['decode_us'])} "
            f"| {num(r['encode_tail_as_text_us'])} |"
        )
    labels = {
        "render_state_response": "render() of a GET state answer",
        "read_object_append_body": "read_object() of an append body",
        "access_line": "the access line (AccessLogger.log and JsonFormatter, to a file)",
        "request_log_context_no_trace": "request_log_context() with no trace header",
        "uuid4_hex": "uuid.uuid4().hex (the request id it makes)",
        "prefix_and_counter_id": "a request id from an instance prefix and a counter instead",
        "request_latency_observe": "RequestLatency.observe (the lock-free histogram)",
        "response_with_security_headers_setdefault": (
            "a web.Response with the security headers set by 6 setdefault calls (as before)"
        ),
        "response_with_security_headers_prebuilt": (
            "json_response(): the same headers copied from one prebuilt set (as now)"
        ),
    }
    lines += [
        "",
        "**Per-request pieces:**",
        "",
        "| piece | µs |",
        "|---|---|",
        *[f"| {labels.get(k, k)} | {num(v, 2)} |" for k, v in pieces.items()],
        "",
    ]
    return lines


def section_suggestions(w: dict[str, Any]) -> list[str]:
    """What is left: measured, not applied."""
    items: list[str] = []
    saved = dig(w, "layers", "saved_us_per_request", default={})

    def cost(variant: str) -> str:
        us = saved.get(variant)
        return "within the noise" if us is None or us < 5 else f"~{num(us)} µs"

    if saved:
        items.append(
            "**What a cached GET still pays that the ceiling does not** (the layer table): the "
            f"edge {cost('without the edge')} (the request id and trace context, the histogram, "
            "the error mapping, one coroutine frame) and the change feed "
            f"{cost('without the change feed')} (a fixed five queries a second, spread over the "
            "requests of that second). Each is something the service must do (request ids and "
            "traces in the logs, metrics, JSON errors, freshness across instances). A listener "
            "(`on_snapshot`) in place of the polls would move the feed's cost from a fixed rate "
            "to one per change delivered."
        )
    paced = dig(w, "voice", "samvad", "paced")
    if paced:
        by = paced["writes_by_collection"]
    if paced and by.get("active_users", 0) >= 0.8 * by.get("sessions", 1):
        items.append(
            "**Every session write also writes `active_users/{userId}`** (samvad/store/"
            "firestore.py `_track_active` now stores each session's lastActivity there): in the "
            f"paced workload {by.get('sessions', 0)} session writes came with "
            f"{by.get('active_users', 0)} active_users writes. Refreshing that document only "
            "when the set of active sessions changes, or when its lastActivity is more than a "
            "few minutes old, would nearly halve the session writes."
        )
    if paced:
        reads = paced["reads"]
        items.append(
            "**Reads per turn are dominated by bookkeeping**: of the paced workload's "
            f"{reads['billed']} billed reads, {reads['missing']} are gets of wipe tombstones that "
            "do not exist (every write transaction reads `wiped_users/{userId}` and, for "
            "sessions, `deleted_sessions/{sessionId}`) and "
            f"{reads['query_documents']} are the change feed returning documents this instance "
            "wrote itself (`CHANGE_OVERLAP` of 1 s against a 1 s poll returns most documents "
            "twice). Reads are the cheapest operation, but they outnumber writes here."
        )
    feed = dig(w, "voice", "samvad", "idle")
    if feed:
        items.append(
            "**The change feed's polling has a floor cost per instance** (see the cost model): "
            "a Firestore listener (`on_snapshot`) is billed per change delivered rather than "
            "per poll, and a longer `SAMVAD_SYNC_INTERVAL` divides the floor."
        )
    items.append(
        "**At conversational pace the write-behind has nothing to coalesce**: a user message "
        "and the reply a second later are two flushes (`SAMVAD_FLUSH_DELAY` 0.2 s, "
        "`SAMVAD_FLUSH_INTERVAL` 1 s), so the paced workload writes one history document per "
        "message. A flush delay of a few seconds would write a turn once, at the price of a "
        "longer window in which an acknowledged message lives only in memory (not measured "
        "here)."
    )
    return [
        "## What is left, and what the figures point at",
        "",
        "Each with the figure behind it; not changed in this round.",
        "",
        *[f"{i}. {text}" for i, text in enumerate(items, 1)],
        "",
    ]


def section_notes(doc: dict[str, Any]) -> list[str]:
    notes = []
    for name, result in doc.get("workloads", {}).items():
        for note in result.get("notes", []) if isinstance(result, dict) else []:
            notes.append(f"- {name}: {note}")
        if isinstance(result, dict) and "error" in result:
            first = result["error"].strip().splitlines()[-1]
            notes.append(f"- {name}: **failed in this run**: `{first}`")
    return ["## Notes from the run", "", *notes, ""] if notes else []


# ---- plots ---------------------------------------------------------------------------------------


def plots(w: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOTS.mkdir(parents=True, exist_ok=True)
    http = w.get("http", {})
    if "results" in http:
        for metric, label, name, logy in (
            ("throughput", "requests/s", "throughput.png", False),
            ("p99_ms", "p99 latency (ms, log scale)", "p99.png", True),
        ):
            fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
            for ax, op in zip(axes, OPS, strict=True):
                for server in NAMES:
                    runs = dig(http, "results", op, server, default={})
                    xs = [c for c in http["levels"] if str(c) in runs]
                    ys = [runs[str(c)][metric] for c in xs]
                    if xs:
                        ax.plot(xs, ys, marker="o", label=server, color=COLORS[server], linewidth=2)
                ax.set_xscale("log", base=2)
                ax.set_xticks(http["levels"], [str(c) for c in http["levels"]])
                if logy:
                    ax.set_yscale("log")
                ax.set_title(OPS[op].replace(" (", "\n("), fontsize=10)
                ax.set_xlabel("connections")
                ax.set_ylabel(label)
                ax.grid(True, alpha=0.3)
                ax.legend()
            fig.suptitle(
                f"{'Throughput' if metric == 'throughput' else 'p99 latency'} against connections"
            )
            fig.tight_layout()
            fig.savefig(PLOTS / name, dpi=90)
            plt.close(fig)
    v = w.get("voice", {})
    if dig(v, "samvad", "chatty"):
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        groups = ("chatty", "paced")
        width = 0.35
        for i, server in enumerate(("samvad", "baseline")):
            wpm = [dig(v, server, g, "writes_per_message") or 0 for g in groups]
            mx = [dig(v, server, g, "max_writes_per_doc_per_second") or 0 for g in groups]
            xs = [j + (i - 0.5) * width for j in range(len(groups))]
            bars = left.bar(xs, wpm, width, label=server, color=COLORS[server])
            left.bar_label(bars, fmt="%.2f")
            bars = right.bar(xs, mx, width, label=server, color=COLORS[server])
            right.bar_label(bars, fmt="%d")
        left.axhline(0.5, color="green", linestyle="--", label="goal (chatty): 0.5")
        right.axhline(3, color="green", linestyle="--", label="goal: 3")
        for ax, title in (
            (left, "Firestore writes per message\n(all writes, sessions included)"),
            (right, "Most writes to one document in one second"),
        ):
            ax.set_xticks(range(len(groups)), ["chatty (5 msg/s/user)", "paced sessions"])
            ax.set_title(title, fontsize=10)
            ax.legend()
            ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(PLOTS / "writes.png", dpi=90)
        plt.close(fig)
    r = w.get("recovery", {})
    if r.get("series"):
        fig, ax = plt.subplots(figsize=(8, 4.2))
        ts = [p[0] for p in r["series"]]
        ax.plot(
            ts,
            [p[1] for p in r["series"]],
            color=COLORS["samvad"],
            linewidth=2,
            label="backlog entries",
        )
        if r.get("reachable_after_s") is not None:
            ax.axvline(
                r["reachable_after_s"],
                color="green",
                linestyle="--",
                label="Firestore seen reachable",
            )
        ax.set_xlabel("seconds since Firestore came back")
        ax.set_ylabel("pending entries (one per user)")
        ax.set_title(f"Backlog drain: {r['pending']:,} pending writes")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(PLOTS / "backlog.png", dpi=90)
        plt.close(fig)


# ---- the document --------------------------------------------------------------------------------


def render(
    doc: dict[str, Any], before: dict[str, Any] | None, experiments: dict[str, Any] | None
) -> str:
    w = doc.get("workloads", {})
    cost_lines, _ = section_cost(w)
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m bench` (`make bench`) from bench/results/latest.json, with the "
        "plots in bench/plots/. Do not edit by hand: change bench/report.py and run "
        "`python -m bench --report-only`. To reproduce: `make bench` (about 10-15 minutes; it "
        "starts its own Firestore emulator), `python -m bench --quick` for a smoke run, "
        "`python -m bench --only http,cold` for some workloads.",
        "",
        *section_run(doc),
        *section_goals(w),
        *section_method(w),
        *section_http(w),
        *section_layers(w),
        *section_cold(w),
        *section_voice(w),
        *cost_lines,
        *section_ws(w),
        *section_interruptions(w),
        *section_recovery(w),
        *section_profile(w, before, experiments),
        *section_micro(w),
        *section_suggestions(w),
        *section_notes(doc),
    ]
    return "\n".join(lines).rstrip() + "\n"


def write_report(results: Path) -> None:
    doc = json.loads(results.read_text())
    before = json.loads(BEFORE.read_text()) if BEFORE.exists() else None
    experiments = json.loads(EXPERIMENTS.read_text()) if EXPERIMENTS.exists() else None
    DOCUMENT.write_text(render(doc, before, experiments))
    plots(doc.get("workloads", {}))
