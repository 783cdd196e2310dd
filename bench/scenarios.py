"""The scenarios of issue 7, the targets each runs against, and the measurement of one scenario
against one target: throughput, time to first byte, CPU per token, memory per open stream, and
the byte check of every stream. Comparing targets with each other is bench.report's job.
"""

from __future__ import annotations

import http.client
import json
import math
import time
from collections import Counter
from dataclasses import dataclass

from bench.answers import StreamSpec
from bench.checks import check_stream
from bench.loadgen import Plan, StreamRecord, Target, run_streams
from bench.processes import Service
from bench.procstats import cpu_seconds, pss_kib

FLOORS = ("direct", "nginx")
RELAY_FORMATS = ("relay-text", "relay-sse", "relay-v1")
# relay-sse again, every answer resumable (X-Relay-Resumable: 1): the cost of recording its events
RESUME_FORMATS = ("relay-resume-memory", "relay-resume-redis")
DEADLINE_SLACK_SECONDS = 60
WARM_UP_STREAMS = 20
# A heap grows in steps: below this, a per-stream memory figure would be mostly rounding, so none is given.
MIN_OPEN_STREAMS = 50
SETTLE_SECONDS = 0.3  # after the warm-up, before the memory baseline


@dataclass(frozen=True)
class Scenario:
    name: str
    streams: int
    tokens: int
    first_ms: int
    gap_ms: int
    concurrency: int | None = None  # None: every stream at once
    opens_per_second: float | None = None  # None: as fast as the load generator connects
    relay_formats: tuple[str, ...] = RELAY_FORMATS
    warm_up_streams: int = WARM_UP_STREAMS  # answers sent together before the measured run...
    warm_up_first_ms: int = 0  # ...each held open this long before its first token

    @property
    def targets(self) -> tuple[str, ...]:
        return FLOORS + self.relay_formats

    def specs(self, repetition: int) -> list[StreamSpec]:
        # a seed per stream, so no stream's answer can pass for another's; new ones each repetition
        base = repetition * 1_000_000
        return [StreamSpec(base + index, self.tokens, self.first_ms, self.gap_ms) for index in range(self.streams)]

    @property
    def ideal_seconds(self) -> float:
        """The run's length if nothing between the upstream and the client added any delay."""
        answer = StreamSpec(0, self.tokens, self.first_ms, self.gap_ms).ideal_seconds
        waves = math.ceil(self.streams / (self.concurrency or self.streams))
        opening = (self.streams - 1) / self.opens_per_second if self.opens_per_second else 0.0
        return max(waves * answer, opening + answer)

    def plan(self, repetition: int) -> Plan:
        return Plan(
            self.specs(repetition),
            self.concurrency or self.streams,
            self.opens_per_second,
            self.ideal_seconds + DEADLINE_SLACK_SECONDS,
        )


# chat-100 opens its 100 streams in the same instant: the worst case for the first byte, as every
# stream's set-up queues behind the others'. Here the same answers arrive as a steady load of ~100
# open streams would bring them (50 a second, each lasting ~2.2 s): what a user usually sees.
CHAT_100_ARRIVING = Scenario("chat-100-arriving", 100, 100, 200, 20, opens_per_second=50, relay_formats=("relay-text", "relay-sse"))
# chat-100 again after a warm-up of 100 answers open together, so the relay's upstream pool starts
# full, as nginx's keep-alive pool is after its first run (the relay is started fresh for every
# measurement, nginx is not; the relay's two workers may split the burst unlike the warm-up, so some
# requests still connect). A request that finds no idle upstream connection waits for its connect,
# which is seen only once every request ready in the same instant has been set up (docs/BENCHMARKS.md).
CHAT_100_WARM = Scenario("chat-100-warm", 100, 100, 200, 20, relay_formats=("relay-text", "relay-sse"), warm_up_streams=100, warm_up_first_ms=100)


def scenarios(quick: bool) -> list[Scenario]:
    """Chat pace is the issue's: first token after 200 ms, then one every 20 ms (100 tokens)."""
    if quick:
        return [
            Scenario("chat-1", 1, 100, 200, 20, concurrency=1),
            Scenario("chat-100", 100, 100, 200, 20, relay_formats=RELAY_FORMATS + RESUME_FORMATS),
            CHAT_100_ARRIVING,
            CHAT_100_WARM,
            Scenario("chat-1000", 1000, 100, 200, 20),
            Scenario("firehose-50", 50, 1000, 0, 0),
            Scenario("slow-2000", 2000, 8, 200, 1000, opens_per_second=1000, relay_formats=("relay-text",)),
        ]
    return [
        Scenario("chat-1", 2, 100, 200, 20, concurrency=1),
        Scenario("chat-100", 100, 100, 200, 20, relay_formats=RELAY_FORMATS + RESUME_FORMATS),
        CHAT_100_ARRIVING,
        CHAT_100_WARM,
        Scenario("chat-1000", 1000, 100, 200, 20),
        Scenario("firehose-50", 50, 5000, 0, 0),
        # The same slow answers at 100 and 1,000 streams: whether cost stays flat as streams grow is
        # judged on one answer shape (chat-100's 100-token answers spread the set-up thinner).
        *(
            Scenario(f"slow-{streams}", streams, 15, 200, 1000, opens_per_second=1000, relay_formats=("relay-text",))
            for streams in (100, 1000)
        ),
        # 10,000 open at once: opened over 10 s, each answer lasts 14 s, so all are open from 10 s to 14 s
        Scenario("slow-10000", 10000, 15, 200, 1000, opens_per_second=1000, relay_formats=("relay-text",)),
    ]


def target_for(name: str, port: int) -> Target:
    if name in FLOORS:
        return Target(name, port, "/v1/chat/completions", "events")
    if name == "relay-text":
        return Target(name, port, "/api/stream_chat_completion", "text", include_usage=True)
    if name == "relay-sse":
        return Target(name, port, "/api/stream_chat_completion", "sse", accept="text/event-stream", include_usage=True)
    if name == "relay-v1":
        return Target(name, port, "/v1/chat/completions", "events")
    if name in RESUME_FORMATS:
        return Target(
            name, port, "/api/stream_chat_completion", "sse", accept="text/event-stream", include_usage=True,
            extra_headers="X-Relay-Resumable: 1\r\n",
        )  # fmt: skip
    raise ValueError(f"unknown target {name!r}")


def upstream_stats(upstream: Service) -> dict:
    """The fake upstream's counters since the last call (the call resets them)."""
    conn = http.client.HTTPConnection("127.0.0.1", upstream.port, timeout=10)
    try:
        conn.request("GET", "/stats", headers={"Connection": "close"})
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def warm_up(target: Target, streams: int = WARM_UP_STREAMS, first_ms: int = 0) -> None:
    """Short answers sent together first, so imports, pools and lazy set-up are not measured.

    With ``first_ms``, all of them are open at once, and leave as many upstream connections in a pool.
    """
    specs = [StreamSpec(900_000_000 + index, 5, first_ms, 0) for index in range(streams)]
    records, _ = run_streams(target, Plan(specs, streams, None, 30))
    failed = [verdict.error for verdict in (check_stream(record, target) for record in records) if verdict.error]
    if failed:
        raise RuntimeError(f"{target.name} failed its warm-up: {Counter(failed).most_common(3)}")
    time.sleep(SETTLE_SECONDS)


def _percentile(values: list[float], percent: float) -> float | None:
    """Nearest rank: a value some stream really saw."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(percent / 100 * len(ordered)) - 1)]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


class _MemorySampler:
    """Proportional memory of the target's workers over the run, with how many streams were open."""

    def __init__(self, workers: list[int]):
        self.workers = workers
        self.baseline = pss_kib(workers)
        self.peak_open = 0
        self.peak_kib = self.baseline

    def __call__(self, open_streams: int) -> None:
        try:
            kib = pss_kib(self.workers)
        except OSError:
            return  # a worker died; the run reports it
        if (open_streams, kib) > (self.peak_open, self.peak_kib):
            self.peak_open, self.peak_kib = open_streams, kib

    @property
    def per_stream_kib(self) -> float | None:
        if self.peak_open < MIN_OPEN_STREAMS:
            return None
        return round((self.peak_kib - self.baseline) / self.peak_open, 2)


def measure(
    scenario: Scenario, target: Target, service: Service | None, upstream: Service, repetition: int,
    redis: Service | None = None,
) -> dict:
    """Run ``scenario`` once against ``target`` (served by ``service``; None for the upstream itself).

    With ``redis``, the Redis server's CPU per token is reported too (``redis_cpu_us_per_token``).
    """
    warm_up(target, scenario.warm_up_streams, scenario.warm_up_first_ms)
    workers = service.workers() if service else []
    tree = service.tree() if service else []
    sampler = _MemorySampler(workers) if workers else None
    upstream_stats(upstream)
    redis_pids = [redis.proc.pid] if redis else []
    before = (cpu_seconds(tree), cpu_seconds([upstream.proc.pid]), time.process_time(), cpu_seconds(redis_pids))
    started = time.monotonic()
    records, open_peak = run_streams(target, scenario.plan(repetition), sampler)
    seconds = time.monotonic() - started
    after = (cpu_seconds(tree), cpu_seconds([upstream.proc.pid]), time.process_time(), cpu_seconds(redis_pids))
    stats = upstream_stats(upstream)
    result = _judge(records, target, scenario, seconds)
    per_token = [_per_token(end - start, result["tokens"]) for start, end in zip(before, after)]
    result.update(
        cpu_us_per_token=per_token[0] if service else None,
        upstream_cpu_us_per_token=per_token[1],
        loadgen_cpu_us_per_token=per_token[2],
        redis_cpu_us_per_token=per_token[3] if redis else None,
        mem_kib_per_stream=sampler.per_stream_kib if sampler else None,
        mem_baseline_kib=sampler.baseline if sampler else None,
        open_streams_peak=open_peak,
        workers_replaced=bool(service) and sorted(service.workers()) != sorted(workers),
        **{f"upstream_{name}": value for name, value in stats.items()},
    )
    return result


def _per_token(cpu: float, tokens: int) -> float | None:
    if not tokens:
        return None
    return round(cpu / tokens * 1e6, 1)


def _judge(records: list[StreamRecord], target: Target, scenario: Scenario, seconds: float) -> dict:
    verdicts = [check_stream(record, target) for record in records]
    errors = Counter(verdict.error for verdict in verdicts if verdict.error)
    tokens = sum(verdict.tokens for verdict in verdicts)
    first_bytes = [record.first_body_at - record.started for record in records if record.first_body_at]
    lateness = [
        record.ended - record.started - record.spec.ideal_seconds
        for record, verdict in zip(records, verdicts)
        if verdict.error is None
    ]
    ideal_seconds = scenario.ideal_seconds
    # 1.0: the upstream's full rate was reached; none for a firehose, which has no set rate
    pace = tokens * ideal_seconds / seconds / (scenario.streams * scenario.tokens) if ideal_seconds else None
    return {
        "streams": len(records),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors.most_common(5)),
        "mismatched_bytes": sum(verdict.mismatched_bytes for verdict in verdicts),
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "pace": round(pace, 3) if pace is not None else None,
        "ttfb_p50_ms": _ms(_percentile(first_bytes, 50)),
        "ttfb_p99_ms": _ms(_percentile(first_bytes, 99)),
        "end_late_p50_ms": _ms(_percentile(lateness, 50)),
        "end_late_p99_ms": _ms(_percentile(lateness, 99)),
    }
