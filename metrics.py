"""Prometheus metrics for the relay, summed over every gunicorn worker.

Under gunicorn, prometheus_client's multiprocess mode shares counts through files in the directory
gunicorn.conf.py prepares; a single development process uses the ordinary registry. Metrics are
recorded once per request, when it ends, never per token.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUESTS = Counter("relay_requests_total", "Requests answered, by endpoint and HTTP status.", ["endpoint", "status"])
ACTIVE_STREAMS = Gauge(
    "relay_active_streams",
    "Answers being relayed from the upstream right now (a resumable one whose caller left included).",
    multiprocess_mode="livesum",
)
TIME_TO_FIRST_TOKEN = Histogram(
    "relay_time_to_first_token_seconds",
    "From the request's arrival to the upstream's first event.",
    buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 60),
)
TOKENS = Counter("relay_tokens_total", "Completion tokens relayed.")
UPSTREAM_ERRORS = Counter("relay_upstream_errors_total", "Upstream failures, by kind.", ["kind"])
CLIENT_DISCONNECTS = Counter("relay_client_disconnects_total", "Streams whose caller went away before the end.")

# The kinds: the relay's codes for a failed upstream; "upstream_rejected" for an upstream that refused
# the request (its other 4xx, passed on with whatever code it names: as a label, each code an
# upstream makes up would be a new series); "internal_error" for the relay's own failure. Each is
# shown at 0 from the start, so an alert on it sees a series, not "no data".
UPSTREAM_ERROR_KINDS = (
    "upstream_error", "upstream_timeout", "upstream_auth_failed", "upstream_rate_limited", "upstream_rejected",
    "internal_error",
)  # fmt: skip
for _kind in UPSTREAM_ERROR_KINDS:
    UPSTREAM_ERRORS.labels(_kind)


def record_detached_end(more_tokens: int, outcome: str, error: str | None) -> None:
    """Count what a resumable answer did after its caller left (its request was counted then)."""
    if more_tokens > 0:
        TOKENS.inc(more_tokens)
    _count_upstream_error(outcome, error)


def record_request(fields: dict, upstream_errors: bool = True) -> None:
    """Count one finished request from its access-log fields (its failure as an upstream error, unless
    ``upstream_errors`` is False: a replay of one counted already)."""
    REQUESTS.labels(fields["endpoint"], str(fields["status"])).inc()
    if fields.get("ttft_s") is not None:
        TIME_TO_FIRST_TOKEN.observe(fields["ttft_s"])
    if fields.get("completion_tokens"):
        TOKENS.inc(fields["completion_tokens"])
    if upstream_errors:
        _count_upstream_error(fields["outcome"], fields.get("error"), fields["status"])
    if fields["outcome"] == "client_disconnect":
        CLIENT_DISCONNECTS.inc()


def _count_upstream_error(outcome: str, error: str | None, status: int | None = None) -> None:
    if outcome not in ("upstream_error", "timeout") or not error or error == "shutting_down":  # a stop is the relay's
        return
    if status is not None and 400 <= status < 500 and status != 429:
        kind = "upstream_rejected"  # whatever code the upstream named, or none
    elif error in UPSTREAM_ERROR_KINDS:
        kind = error
    else:
        kind = "upstream_error"
    UPSTREAM_ERRORS.labels(kind).inc()


def render(multiprocess_dir: str | None) -> bytes:
    """The text exposition, summed over workers when there is a multiprocess directory."""
    if multiprocess_dir:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=multiprocess_dir)
        return generate_latest(registry)
    return generate_latest()


CONTENT_TYPE = CONTENT_TYPE_LATEST
