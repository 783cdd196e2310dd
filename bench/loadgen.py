"""The load generator: opens streams against one target, each on a fresh HTTP/1.1 connection as a
browser's fetch would, and records when its first body byte and its end arrived, and every byte.

It only measures; bench.checks judges the bytes afterwards, so the hot path is one recv and an
append. It runs on bench.eventloop, in the calling process, and never longer than the plan's deadline.
"""

from __future__ import annotations

import errno
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from bench.answers import StreamSpec, request_body
from bench.eventloop import EventLoop

SAMPLE_SECONDS = 0.5
READ_BYTES = 65536
OPENS_PER_BATCH = 50  # then the loop sends the requests of the streams it just connected


@dataclass(frozen=True)
class Target:
    """Where streams go and how they ask: the endpoint, the Accept header, and the body's shape."""

    name: str
    port: int
    path: str
    fmt: str  # "events": the upstream's event stream; "text": plain tokens; "sse": the relay's events
    accept: str = "*/*"
    include_usage: bool = False  # what the upstream is asked: the token endpoint always asks for usage
    extra_headers: str = ""  # more header lines, each ending in CRLF

    def request(self, spec: StreamSpec) -> bytes:
        body = request_body(spec)
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: application/json\r\n"
            f"Accept: {self.accept}\r\n{self.extra_headers}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        return head.encode() + body


@dataclass(frozen=True)
class Plan:
    """How many streams, how many open at once, how fast they open, and when to give up."""

    specs: Sequence[StreamSpec]
    concurrency: int
    opens_per_second: float | None  # None: as fast as the loop can connect
    deadline_seconds: float


@dataclass
class StreamRecord:
    spec: StreamSpec
    started: float | None = None
    first_body_at: float | None = None
    ended: float | None = None
    error: str | None = None
    chunks: list[bytes] = field(default_factory=list)

    @property
    def raw(self) -> bytes:
        return b"".join(self.chunks)


class _Stream:
    """One stream's connection: connect, send the request, collect the answer until the close."""

    __slots__ = ("run", "record", "sock", "fd", "connected", "head_seen")

    def __init__(self, run: _Run, record: StreamRecord):
        self.run = run
        self.record = record
        self.connected = False
        self.head_seen = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        record.started = time.monotonic()
        status = self.sock.connect_ex(("127.0.0.1", run.target.port))
        if status not in (0, errno.EINPROGRESS):
            self.end(f"connect: {errno.errorcode.get(status, status)}")
            return
        run.loop.watch(self.fd, select.EPOLLOUT, self._on_events)

    def _on_events(self, _events: int) -> None:
        if not self.connected:
            self._send_request()
            return
        try:
            data = self.sock.recv(READ_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self.end(f"connection lost: {exc.__class__.__name__}")
            return
        if not data:
            self.end(None)
            return
        record = self.record
        record.chunks.append(data)
        if record.first_body_at is None:
            self._watch_for_body(record)

    def _send_request(self) -> None:
        status = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if status:
            self.end(f"connect: {errno.errorcode.get(status, status)}")
            return
        self.connected = True
        request = self.run.target.request(self.record.spec)
        try:
            sent = self.sock.send(request)
        except OSError as exc:
            self.end(f"request not sent: {exc.__class__.__name__}")
            return
        if sent != len(request):  # a fresh socket takes a request this small whole; a failure otherwise
            self.end("request not sent whole")
            return
        self.run.loop.modify(self.fd, select.EPOLLIN)

    def _watch_for_body(self, record: StreamRecord) -> None:
        if not self.head_seen:
            received = record.raw
            head_end = received.find(b"\r\n\r\n")
            if head_end < 0:
                return
            self.head_seen = True
            if len(received) == head_end + 4:
                return
        record.first_body_at = time.monotonic()
        self.run.answering()

    def end(self, error: str | None) -> None:
        record = self.record
        record.ended = time.monotonic()
        if error is not None and record.error is None:
            record.error = error
        self.run.loop.forget(self.fd)
        self.sock.close()
        self.run.ended(self)


class _Run:
    """Opens streams as the plan allows (concurrency cap, opening rate) until all have ended."""

    def __init__(self, target: Target, plan: Plan, sampler: Callable[[int], None] | None):
        self.target = target
        self.plan = plan
        self.sampler = sampler
        self.loop = EventLoop()
        self.records = [StreamRecord(spec) for spec in plan.specs]
        self.active: set[_Stream] = set()
        # Streams whose answer has begun and not ended: surely held by the target (a connection the
        # kernel completed may still wait in its accept queue). Memory per open stream divides by this.
        self.open_now = 0
        self.open_peak = 0
        self._next = 0
        self._ended = 0
        self._started_at = 0.0
        self._wake_pending = False
        self._stopped = False  # past the deadline or interrupted: open nothing more

    def execute(self) -> None:
        self._started_at = time.monotonic()
        self._open_more()
        if self.sampler is not None:
            self._sample()
        try:
            deadline = self._started_at + self.plan.deadline_seconds
            finished = self.loop.run(lambda: self._ended == len(self.records), deadline)
            self._stopped = True
            if not finished:
                for stream in list(self.active):
                    stream.end("timeout")
                for record in self.records[self._next :]:
                    record.error = "not started before the deadline"
        finally:
            self._stopped = True
            for stream in list(self.active):
                stream.end("interrupted")
            self.loop.close()

    def _open_more(self) -> None:
        rate = self.plan.opens_per_second
        opened = 0
        while not self._stopped and self._next < len(self.records) and len(self.active) < self.plan.concurrency:
            now = time.monotonic()
            due = self._started_at + self._next / rate if rate else now
            if due > now or opened == OPENS_PER_BATCH:
                self._wake_at(max(due, now))
                return
            record = self.records[self._next]
            self._next += 1
            opened += 1
            stream = _Stream(self, record)
            if record.ended is None:
                self.active.add(stream)

    def _wake_at(self, when: float) -> None:
        """One pending wake-up at a time, however many streams end while it waits."""
        if not self._wake_pending:
            self._wake_pending = True
            self.loop.call_at(when, self._on_wake)

    def _on_wake(self) -> None:
        self._wake_pending = False
        self._open_more()

    def answering(self) -> None:
        self.open_now += 1
        self.open_peak = max(self.open_peak, self.open_now)

    def ended(self, stream: _Stream) -> None:
        self._ended += 1
        if stream.record.first_body_at is not None:
            self.open_now -= 1
        if stream in self.active:
            self.active.discard(stream)
            self._open_more()

    def _sample(self) -> None:
        self.sampler(self.open_now)
        self.loop.call_at(time.monotonic() + SAMPLE_SECONDS, self._sample)


def run_streams(target: Target, plan: Plan, sampler: Callable[[int], None] | None = None):
    """Run ``plan`` against ``target``: the records of every stream, and the peak of open streams.

    ``sampler(open_streams)`` is called every half second while streams run. A stream counts as open
    from its first body byte to its end.
    """
    run = _Run(target, plan, sampler)
    run.execute()
    return run.records, run.open_peak
