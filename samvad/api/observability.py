"""Per-request context for Cloud Logging: the trace from the load balancer and a request id.

Cloud Run's front end sends `X-Cloud-Trace-Context: TRACE_ID/SPAN_ID;o=1` (span id in decimal);
W3C clients send `traceparent: 00-<trace>-<span>-<flags>` (span id in hex). Either becomes
`logging.googleapis.com/trace` = `projects/<project>/traces/<trace>` on every log line of the
request, so Cloud Logging shows a request's lines together, under its trace.
"""

from __future__ import annotations

import itertools
import re
import uuid
from collections.abc import Iterator

from multidict import CIMultiDictProxy, istr

from samvad.logs import UNMATCHED, RequestLogContext

# istr: looked up in every request's headers, without case-folding the name each time
REQUEST_ID_HEADER = istr("X-Request-Id")
TRACEPARENT_HEADER = istr("traceparent")
CLOUD_TRACE_HEADER = istr("X-Cloud-Trace-Context")
# What a request id from a client or a proxy may look like to be taken as is: short, and nothing
# that could forge a log field or carry a sentence of personal data.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+/=-]{0,127}")
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_CLOUD_TRACE = re.compile(r"([0-9a-fA-F]{32})(?:/([0-9]{1,20}))?(?:;o=([0-9]+))?")
_MAX_SPAN = 2**64 - 1


def parse_traceparent(value: str) -> tuple[str, str, bool] | None:
    """(trace id, span id in hex, sampled) of a W3C `traceparent`, or None if it is not one."""
    match = _TRACEPARENT.fullmatch(value.strip().lower())
    if match is None:
        return None
    version, trace_id, span_id, flags = match.groups()
    if version == "ff" or trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


def parse_cloud_trace(value: str) -> tuple[str, str | None, bool | None] | None:
    """(trace id, span id in hex, sampled) of an `X-Cloud-Trace-Context`, or None."""
    match = _CLOUD_TRACE.fullmatch(value.strip())
    if match is None:
        return None
    trace_id, span, option = match.groups()
    trace_id = trace_id.lower()
    if trace_id == "0" * 32:
        return None
    span_id = None
    if span is not None and 0 < int(span) <= _MAX_SPAN:
        span_id = f"{int(span):016x}"  # Cloud Logging wants the span id as 16 hex digits
    sampled = None if option is None else option == "1"
    return trace_id, span_id, sampled


def request_ids() -> Iterator[str]:
    """Unique ids (a random prefix per app, then a counter), without uuid4's cost per request."""
    prefix = uuid.uuid4().hex[:16]
    return map(f"{prefix}{{:016x}}".format, itertools.count(1))  # C all the way: no frame


def request_log_context(
    headers: CIMultiDictProxy[str],
    project: str,
    ids: Iterator[str] | None = None,
    route: str = UNMATCHED,
) -> RequestLogContext:
    # Every request passes here: a header that is absent costs one lookup, no regex.
    offered = headers.get(REQUEST_ID_HEADER)
    if offered is not None and _SANE_REQUEST_ID.fullmatch(offered):
        request_id = offered
    else:
        request_id = next(ids) if ids is not None else uuid.uuid4().hex
    trace: tuple[str, str | None, bool | None] | None = None
    traceparent = headers.get(TRACEPARENT_HEADER)
    if traceparent is not None:
        trace = parse_traceparent(traceparent)
    if trace is None:
        cloud_trace = headers.get(CLOUD_TRACE_HEADER)
        if cloud_trace is not None:
            trace = parse_cloud_trace(cloud_trace)
    if trace is None:
        return RequestLogContext(request_id, None, None, None, route)
    trace_id, span_id, sampled = trace
    return RequestLogContext(
        request_id, f"projects/{project}/traces/{trace_id}", span_id, sampled, route
    )
