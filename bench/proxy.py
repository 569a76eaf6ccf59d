"""tools/firestore_proxy.py's FirestoreProxy, counting the documents read as well as the writes.

Firestore bills one read per document returned, and at least one read per query even when it
returns nothing. FirestoreProxy counts writes and calls; this subclass also looks at the answers
of BatchGetDocuments (found / missing), RunQuery (documents per query) and RunAggregationQuery,
and adds `reads` to counts(). Run as its own process, like the original:

    python -m bench.proxy --upstream 127.0.0.1:8080
    -> {"grpcHost": "127.0.0.1:N", "controlUrl": "http://127.0.0.1:M"}
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from google.cloud.firestore_v1.types import BatchGetDocumentsResponse, RunQueryResponse

from tools.firestore_proxy import FirestoreProxy, serve

ROOT = Path(__file__).resolve().parent.parent
_SERVICE = "/google.firestore.v1.Firestore/"
BATCH_GET = _SERVICE + "BatchGetDocuments"
RUN_QUERY = _SERVICE + "RunQuery"
RUN_AGGREGATION = _SERVICE + "RunAggregationQuery"


@dataclass
class ReadCounts:
    found: int = 0  # documents returned by gets (BatchGetDocuments)
    missing: int = 0  # gets of documents that do not exist
    query_documents: int = 0  # documents returned by queries
    queries: int = 0
    empty_queries: int = 0  # queries that returned nothing: still one billed read each
    aggregations: int = 0  # count() queries: one billed read each at this data size

    @property
    def billed(self) -> int:
        """Reads as Firestore bills them (a get of a missing document counted as one read)."""
        return (
            self.found
            + self.missing
            + self.query_documents
            + self.empty_queries
            + self.aggregations
        )


class ReadCountingProxy(FirestoreProxy):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads = ReadCounts()

    def reset(self) -> None:
        super().reset()
        self.reads = ReadCounts()

    def counts(self) -> dict[str, Any]:
        counts: dict[str, Any] = super().counts()
        counts["reads"] = {**asdict(self.reads), "billed": self.reads.billed}
        return counts

    def _make_behavior(self, method: str) -> Any:
        behavior = super()._make_behavior(method)
        if method not in (BATCH_GET, RUN_QUERY, RUN_AGGREGATION):
            return behavior

        async def counted(request_iterator: AsyncIterator[bytes], context: Any) -> Any:
            documents = 0
            async for response in behavior(request_iterator, context):
                documents += self._count(method, response)
                yield response
            # Only calls that completed: a failed one bills nothing.
            if method == RUN_QUERY:
                self.reads.queries += 1
                if documents == 0:
                    self.reads.empty_queries += 1
            elif method == RUN_AGGREGATION:
                self.reads.aggregations += 1

        return counted

    def _count(self, method: str, response: bytes) -> int:
        try:
            if method == BATCH_GET:
                result = BatchGetDocumentsResponse.pb(
                    BatchGetDocumentsResponse.deserialize(response)
                ).WhichOneof("result")
                if result == "found":
                    self.reads.found += 1
                elif result == "missing":
                    self.reads.missing += 1
                return 0
            if method == RUN_QUERY:
                pb = RunQueryResponse.pb(RunQueryResponse.deserialize(response))
                if pb.HasField("document"):
                    self.reads.query_documents += 1
                    return 1
        except Exception:  # counting must never break the proxied call
            logging.getLogger("bench.proxy").exception("could not decode %s", method)
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="counting Firestore proxy (reads and writes)")
    parser.add_argument("--upstream", required=True, help="emulator host:port")
    args = parser.parse_args()
    logging.basicConfig(level="WARNING", stream=sys.stderr)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(ReadCountingProxy(args.upstream)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
