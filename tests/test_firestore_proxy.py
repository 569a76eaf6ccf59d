"""Tests for tools/firestore_proxy.py against a real Firestore emulator.

The emulator is started once for this module (own fixture, independent of conftest.py); each
test runs its own in-process proxy and points a real AsyncClient at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio
import pytest
import pytest_asyncio
from google.api_core import exceptions as gexc
from google.cloud import firestore_v1
from google.cloud.firestore_v1.types import (
    BatchWriteRequest,
    BatchWriteResponse,
    CommitRequest,
    CommitResponse,
    Document,
    DocumentTransform,
    ListenRequest,
    ListenResponse,
    Precondition,
    Target,
    Value,
    Write,
)

ROOT = Path(__file__).resolve().parent.parent
PROXY_PATH = ROOT / "tools" / "firestore_proxy.py"


import tools.firestore_proxy as fp  # noqa: E402
from tests.support import wait_for  # noqa: E402

FirestoreProxy = fp.FirestoreProxy

pytestmark = [
    pytest.mark.skipif(
        shutil.which("gcloud") is None, reason="gcloud (Firestore emulator) missing"
    ),
    pytest.mark.asyncio,
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def proxy_test_emulator() -> Iterator[str]:
    """A Firestore emulator of this module's own: yields "127.0.0.1:PORT"."""
    port = _free_port()
    host = f"127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            ["gcloud", "emulators", "firestore", "start", f"--host-port={host}"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"emulator exited early: {log.read().decode(errors='replace')}")
                try:
                    with urllib.request.urlopen(f"http://{host}/", timeout=1) as resp:
                        if resp.read().strip() == b"Ok":
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail("emulator did not become ready within 60 s")
                time.sleep(0.1)
            yield host
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            # The Java child can outlive the wrapper briefly: make sure the group is gone.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


@pytest_asyncio.fixture
async def proxy(proxy_test_emulator: str) -> AsyncIterator[Any]:
    p = FirestoreProxy(proxy_test_emulator)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


@pytest.fixture
def project_id() -> str:
    return f"proxy-test-{uuid.uuid4().hex[:12]}"


@pytest_asyncio.fixture
async def client(
    proxy: Any, project_id: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[firestore_v1.AsyncClient]:
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", proxy.grpc_host)
    c = firestore_v1.AsyncClient(project=project_id)
    try:
        yield c
    finally:
        with contextlib.suppress(Exception):
            await c._firestore_api.transport.close()


@pytest_asyncio.fixture
async def raw_channel(proxy: Any) -> AsyncIterator[grpc.aio.Channel]:
    channel = grpc.aio.insecure_channel(proxy.grpc_host)
    try:
        yield channel
    finally:
        await channel.close()


AUTH_MD = (("authorization", "Bearer owner"),)


def _db(project_id: str) -> str:
    return f"projects/{project_id}/databases/(default)"


def _doc_name(project_id: str, path: str) -> str:
    return f"{_db(project_id)}/documents/{path}"


async def test_set_get_query_transaction(
    proxy: Any, client: firestore_v1.AsyncClient, project_id: str
) -> None:
    col = client.collection("things")
    await col.document("a").set({"n": 1, "kind": "x"})
    await col.document("b").set({"n": 2, "kind": "y"})
    await col.document("c").set({"n": 3, "kind": "x"})

    snap = await col.document("a").get()
    assert snap.exists and snap.to_dict() == {"n": 1, "kind": "x"}
    assert not (await col.document("missing").get()).exists

    found = [
        d.id async for d in col.where(filter=firestore_v1.FieldFilter("kind", "==", "x")).stream()
    ]
    assert sorted(found) == ["a", "c"]
    agg = await col.count().get()
    assert agg[0][0].value == 3

    transaction = client.transaction()

    @firestore_v1.async_transactional
    async def bump(tx: firestore_v1.AsyncTransaction) -> int:
        ref = col.document("b")
        current = await ref.get(transaction=tx)
        value = int(current.get("n")) + 10
        tx.update(ref, {"n": value})
        return value

    assert await bump(transaction) == 12
    assert (await col.document("b").get()).get("n") == 12

    counts = proxy.counts()
    calls = counts["calls"]
    assert calls["Commit"] == 4
    assert calls["BeginTransaction"] == 1
    assert calls["BatchGetDocuments"] >= 4
    assert calls["RunQuery"] == 1
    assert calls["RunAggregationQuery"] == 1
    assert counts["commits"] == 4
    assert counts["writes"] == counts["updates"] == 4
    assert counts["errors"] == {}
    assert counts["perDocument"][_doc_name(project_id, "things/b")] == 2


async def test_counts_batch_of_sets_and_delete(
    proxy: Any, client: firestore_v1.AsyncClient, project_id: str
) -> None:
    col = client.collection("batch")
    await col.document("gone").set({"x": 0})
    proxy.reset()
    assert proxy.counts()["writes"] == 0

    batch = client.batch()
    for name in ("d1", "d2", "d3"):
        batch.set(col.document(name), {"v": name})
    batch.delete(col.document("gone"))
    await batch.commit()

    counts = proxy.counts()
    assert counts["writes"] == 4
    assert counts["updates"] == 3
    assert counts["deletes"] == 1
    assert counts["transforms"] == 0
    assert counts["commits"] == 1
    assert counts["calls"] == {"Commit": 1}
    assert counts["maxWritesPerDocPerSecond"] == 1
    assert counts["perDocument"] == {
        _doc_name(project_id, f"batch/{name}"): 1 for name in ("d1", "d2", "d3", "gone")
    }
    assert not (await col.document("gone").get()).exists


async def test_max_writes_per_doc_per_second(
    proxy: Any, client: firestore_v1.AsyncClient, project_id: str
) -> None:
    ref = client.collection("hot").document("doc")
    await client.collection("hot").document("other").set({"i": 0})
    # Start right after a wall-clock second boundary so the 4 writes share one second.
    await asyncio.sleep(1.02 - (time.time() % 1.0))
    started = time.time()
    for i in range(4):
        await ref.set({"i": i})
    assert int(time.time()) == int(started), "writes straddled a second boundary (slow host?)"

    counts = proxy.counts()
    assert counts["maxWritesPerDocPerSecond"] == 4
    assert counts["maxWritesPerDocPerSecondDocument"] == _doc_name(project_id, "hot/doc")
    assert counts["perDocument"][_doc_name(project_id, "hot/doc")] == 4
    assert counts["writes"] == 5


async def test_down_fails_fast_and_up_recovers(
    proxy: Any, client: firestore_v1.AsyncClient
) -> None:
    ref = client.collection("c").document("d")
    await ref.set({"ok": True})

    proxy.go_down()
    assert proxy.is_down
    started = time.monotonic()
    with pytest.raises(gexc.ServiceUnavailable, match="injected outage"):
        await ref.get(retry=None, timeout=1.5)
    assert time.monotonic() - started < 2.0
    with pytest.raises(gexc.ServiceUnavailable):
        await ref.set({"ok": False}, retry=None, timeout=1.5)
    counts = proxy.counts()
    assert counts["injected"] == 2
    assert counts["errors"] == {"BatchGetDocuments": 1, "Commit": 1}
    assert counts["commits"] == 1  # the failed set was not counted

    proxy.go_up()
    snap = await ref.get(retry=None, timeout=5)
    assert snap.to_dict() == {"ok": True}


async def test_down_cancels_in_flight_listen_stream(
    proxy: Any, raw_channel: grpc.aio.Channel, project_id: str
) -> None:
    """Bidi streaming passes through, and going down kills an open stream with UNAVAILABLE."""
    listen = raw_channel.stream_stream(
        "/google.firestore.v1.Firestore/Listen",
        request_serializer=ListenRequest.serialize,
        response_deserializer=ListenResponse.deserialize,
    )
    request = ListenRequest(
        database=_db(project_id),
        add_target=Target(
            target_id=1,
            documents=Target.DocumentsTarget(documents=[_doc_name(project_id, "l/x")]),
        ),
    )
    call = listen(metadata=(*AUTH_MD, ("google-cloud-resource-prefix", _db(project_id))))
    await call.write(request)
    first = await asyncio.wait_for(call.read(), 5)
    assert first is not grpc.aio.EOF
    assert ListenResponse.pb(first).WhichOneof("response_type") == "target_change"
    assert proxy.counts()["inFlight"] == 1

    assert proxy.go_down() == 1
    with pytest.raises(grpc.aio.AioRpcError) as info:
        for _ in range(20):
            if await asyncio.wait_for(call.read(), 2) is grpc.aio.EOF:
                break
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info.value.details() == "injected outage"

    # The abort reaches the client before the proxy's handler unwinds (its `finally`).
    async def released() -> bool:
        return bool(proxy.counts()["inFlight"] == 0)

    await wait_for(released, within=5)


async def test_client_cancel_releases_upstream_stream(
    proxy: Any, raw_channel: grpc.aio.Channel, project_id: str
) -> None:
    listen = raw_channel.stream_stream(
        "/google.firestore.v1.Firestore/Listen",
        request_serializer=ListenRequest.serialize,
        response_deserializer=ListenResponse.deserialize,
    )
    # The emulator answers Listen with a bare UNKNOWN without the resource-prefix header.
    call = listen(metadata=(*AUTH_MD, ("google-cloud-resource-prefix", _db(project_id))))
    await call.write(
        ListenRequest(
            database=_db(project_id),
            add_target=Target(
                target_id=7,
                documents=Target.DocumentsTarget(documents=[_doc_name(project_id, "l/y")]),
            ),
        )
    )
    assert await asyncio.wait_for(call.read(), 5) is not grpc.aio.EOF
    assert proxy.counts()["inFlight"] == 1
    call.cancel()
    for _ in range(250):
        if proxy.counts()["inFlight"] == 0:
            break
        await asyncio.sleep(0.02)
    assert proxy.counts()["inFlight"] == 0
    assert proxy.counts()["injected"] == 0


async def test_raw_unary_commit_with_transform_and_error_passthrough(
    proxy: Any, raw_channel: grpc.aio.Channel, project_id: str
) -> None:
    """A unary client call works through the stream-stream handler; errors pass through."""
    commit = raw_channel.unary_unary(
        "/google.firestore.v1.Firestore/Commit",
        request_serializer=CommitRequest.serialize,
        response_deserializer=CommitResponse.deserialize,
    )
    name = _doc_name(project_id, "raw/t")
    request = CommitRequest(
        database=_db(project_id),
        writes=[
            Write(update=Document(name=name, fields={"n": Value(integer_value=1)})),
            Write(
                transform=DocumentTransform(
                    document=name,
                    field_transforms=[
                        DocumentTransform.FieldTransform(
                            field_path="n", increment=Value(integer_value=5)
                        )
                    ],
                )
            ),
        ],
    )
    response = await commit(request, metadata=AUTH_MD, timeout=5)
    assert len(response.write_results) == 2

    # create() of an existing document: ALREADY_EXISTS must reach the client, and not be counted.
    create = CommitRequest(
        database=_db(project_id),
        writes=[Write(update=Document(name=name), current_document=Precondition(exists=False))],
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await commit(create, metadata=AUTH_MD, timeout=5)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert info.value.details()

    counts = proxy.counts()
    assert counts["writes"] == 2
    assert counts["updates"] == 1
    assert counts["transforms"] == 1
    assert counts["commits"] == 1
    assert counts["calls"] == {"Commit": 2}
    assert counts["errors"] == {"Commit": 1}
    assert counts["perDocument"] == {name: 2}
    assert counts["maxWritesPerDocPerSecond"] == 2


async def test_batch_write_counts_only_successful_writes(
    proxy: Any, raw_channel: grpc.aio.Channel, project_id: str
) -> None:
    batch_write = raw_channel.unary_unary(
        "/google.firestore.v1.Firestore/BatchWrite",
        request_serializer=BatchWriteRequest.serialize,
        response_deserializer=BatchWriteResponse.deserialize,
    )
    ok_name = _doc_name(project_id, "bw/ok")
    bad_name = _doc_name(project_id, "bw/missing")
    request = BatchWriteRequest(
        database=_db(project_id),
        writes=[
            Write(update=Document(name=ok_name, fields={"a": Value(string_value="b")})),
            Write(delete=bad_name, current_document=Precondition(exists=True)),
        ],
    )
    response = await batch_write(request, metadata=AUTH_MD, timeout=5)
    assert response.status[0].code == 0
    assert response.status[1].code != 0

    counts = proxy.counts()
    assert counts["calls"] == {"BatchWrite": 1}
    assert counts["batchWrites"] == 1
    assert counts["writes"] == 1
    assert counts["perDocument"] == {ok_name: 1}


async def test_http_control(proxy: Any, client: firestore_v1.AsyncClient) -> None:
    url = proxy.control_url
    assert url is not None
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/healthz") as resp:
            assert resp.status == 200
            assert (await resp.json())["ok"] is True
        await client.collection("h").document("1").set({"a": 1})
        async with http.get(f"{url}/counts") as resp:
            body = await resp.json()
        assert body["writes"] == 1 and body["calls"] == {"Commit": 1}
        for key in ("deletes", "transforms", "commits", "maxWritesPerDocPerSecond", "perDocument"):
            assert key in body

        async with http.post(f"{url}/down") as resp:
            assert (await resp.json())["down"] is True
        with pytest.raises(gexc.ServiceUnavailable):
            await client.collection("h").document("1").get(retry=None, timeout=1.5)
        async with http.post(f"{url}/up") as resp:
            assert (await resp.json())["down"] is False
        assert (await client.collection("h").document("1").get(retry=None, timeout=5)).exists

        async with http.post(f"{url}/reset") as resp:
            assert resp.status == 200
        async with http.get(f"{url}/counts") as resp:
            body = await resp.json()
        assert body["writes"] == 0 and body["calls"] == {}


async def test_process_mode(
    proxy_test_emulator: str, project_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PROXY_PATH),
        "--upstream",
        proxy_test_emulator,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        ready = json.loads(line)
        assert set(ready) == {"grpcHost", "controlUrl"}

        monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", ready["grpcHost"])
        c = firestore_v1.AsyncClient(project=project_id)
        await c.collection("p").document("q").set({"v": 1})
        assert (await c.collection("p").document("q").get()).get("v") == 1
        with contextlib.suppress(Exception):
            await c._firestore_api.transport.close()

        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{ready['controlUrl']}/counts") as resp,
        ):
            body = await resp.json()
        assert body["writes"] == 1
        assert body["calls"]["Commit"] == 1

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
