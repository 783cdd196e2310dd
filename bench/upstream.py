"""The fake OpenAI-compatible upstream: POST /v1/chat/completions streams the answer its prompt
specifies (see bench.answers), chunked, from pre-encoded events, each token on its own schedule.

It is built to cost far less per token than anything it measures, and streams only well-formed
answers (tests/fake_upstream.py is the one that scripts broken ones). `GET /stats` reports and
resets its counters. Run: `python -m bench.upstream --port 0`; it prints its port once listening.
"""

from __future__ import annotations

import argparse
import json
import resource
import select
import signal
import socket
import time

from bench.answers import LAST_CHUNK, StreamSpec, closing_events, http_chunk, token_chunk
from bench.eventloop import EventLoop

MAX_HEAD_BYTES = 64 << 10
ACCEPTS_PER_WAKE = 512  # bounded, so a connection storm cannot starve the streams already running
READ_BYTES = 65536
_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n"
)


class Stats:
    """What `GET /stats` reports: counts since the last report. ``new_connections`` counts connections
    carrying their first answer, so new_connections/answers shows whether the caller reuses them."""

    def __init__(self):
        self.new_connections = self.answers = self.tokens = self.client_aborts = self.accept_errors = 0

    def report(self, loop: EventLoop) -> bytes:
        body = dict(vars(self), max_timer_late_ms=round(loop.max_timer_late * 1000, 3))
        self.__init__()
        loop.max_timer_late = 0.0
        return json.dumps(body).encode()


class Answer:
    """One answer in flight: token ``i`` is due ``first_ms + i * gap_ms`` after the request, so a
    late tick delays tokens but never stretches the answer (a real model does not slow down either)."""

    __slots__ = ("conn", "spec", "include_usage", "started", "index")

    def __init__(self, conn: Connection, spec: StreamSpec, include_usage: bool):
        self.conn = conn
        self.spec = spec
        self.include_usage = include_usage
        self.started = time.monotonic()
        self.index = 0

    def start(self) -> None:
        if self.spec.first_ms == 0:
            self.step()
        else:
            self.conn.server.loop.call_at(self.started + self.spec.first_ms / 1000, self.step)

    def step(self) -> None:
        conn, spec = self.conn, self.spec
        if conn.closed:
            return
        # a firehose (no gap) writes everything at once, as fast as the socket takes it
        indexes = range(self.index, spec.tokens) if spec.gap_ms == 0 else (self.index,)
        data = b"".join([token_chunk(spec, index) for index in indexes])
        self.index += len(indexes)
        conn.server.stats.tokens += len(indexes)
        if self.index < spec.tokens:
            conn.write(data)
            due = self.started + (spec.first_ms + self.index * spec.gap_ms) / 1000
            conn.server.loop.call_at(due, self.step)
            return
        closing = b"".join([http_chunk(event) for event in closing_events(spec, self.include_usage)])
        conn.write(data + closing + LAST_CHUNK)
        conn.finish_response()


class Connection:
    """One HTTP/1.1 connection: requests one after another (keep-alive), never pipelined."""

    def __init__(self, server: UpstreamServer, sock: socket.socket):
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.closed = False
        self._buffer = b""
        self._unsent: list[bytes] = []
        self._busy = False  # a response is under way; the next request waits in the buffer
        self._keep_alive = True
        self._close_when_sent = False
        self._answered = False
        server.loop.watch(self.fd, select.EPOLLIN, self._on_events)

    def _on_events(self, events: int) -> None:
        if events & select.EPOLLOUT:
            self._send_unsent()
        if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and not self.closed:
            self._read()

    def _read(self) -> None:
        try:
            data = self.sock.recv(READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self._buffer += data
        if not self._busy:
            self._next_request()

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if self._unsent:
            self._unsent.append(data)
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.close()
            return
        if sent < len(data):
            self._unsent.append(data[sent:])
            self.server.loop.modify(self.fd, select.EPOLLIN | select.EPOLLOUT)

    def _send_unsent(self) -> None:
        data = b"".join(self._unsent)
        self._unsent = []
        self.write(data)
        if self.closed or self._unsent:
            return
        self.server.loop.modify(self.fd, select.EPOLLIN)
        if self._close_when_sent:
            self.close()

    def finish_response(self) -> None:
        self._busy = False
        if not self._keep_alive:
            if self._unsent:
                self._close_when_sent = True
            else:
                self.close()
        elif self._buffer:
            self._next_request()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._busy:
            self.server.stats.client_aborts += 1
        self.server.loop.forget(self.fd)
        self.sock.close()

    def _next_request(self) -> None:
        head_end = self._buffer.find(b"\r\n\r\n")
        if head_end < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                self._reply(431, b"{}", close=True)
            return
        lines = self._buffer[:head_end].decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        try:
            method, path, _version = lines[0].split(" ", 2)
            body_end = head_end + 4 + int(headers.get("content-length", "0"))
        except ValueError:
            self._reply(400, b'{"error":{"message":"bad request head","type":"invalid_request_error"}}', close=True)
            return
        if len(self._buffer) < body_end:
            return
        body = self._buffer[head_end + 4 : body_end]
        self._buffer = self._buffer[body_end:]
        self._keep_alive = headers.get("connection", "").lower() != "close" and not self.server.close_after_answer
        self._busy = True
        if method == "POST" and path == "/v1/chat/completions":
            self._start_answer(body)
        elif method == "GET" and path == "/stats":
            self._reply(200, self.server.stats.report(self.server.loop))
        else:
            self._reply(404, b'{"error":{"message":"not found","type":"invalid_request_error"}}')

    def _start_answer(self, body: bytes) -> None:
        try:
            request = json.loads(body)
            spec = StreamSpec.from_prompt(request["messages"][-1]["content"])
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            self._reply(400, json.dumps({"error": {"message": str(exc), "type": "invalid_request_error"}}).encode())
            return
        include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
        stats = self.server.stats
        stats.answers += 1
        if not self._answered:
            self._answered = True
            stats.new_connections += 1
        self.write(_STREAM_HEAD + (b"" if self._keep_alive else b"Connection: close\r\n") + b"\r\n")
        Answer(self, spec, include_usage).start()

    def _reply(self, status: int, body: bytes, close: bool = False) -> None:
        self._keep_alive = self._keep_alive and not close
        head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        if not self._keep_alive:
            head += "Connection: close\r\n"
        self.write(head.encode() + b"\r\n" + body)
        self.finish_response()


class UpstreamServer:
    def __init__(self, host: str, port: int, close_after_answer: bool = False):
        self.close_after_answer = close_after_answer  # every answer then needs a new connection
        self.loop = EventLoop()
        self.stats = Stats()
        self.listener = socket.create_server((host, port), backlog=8192)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.loop.watch(self.listener.fileno(), select.EPOLLIN, self._accept)

    def _accept(self, _events: int) -> None:
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                sock, _address = self.listener.accept()
            except BlockingIOError:
                return
            except OSError:  # out of file descriptors: the client sees a refused stream
                self.stats.accept_errors += 1
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            Connection(self, sock)


def raise_open_file_limit() -> int:
    """Soft limit up to the hard one: thousands of streams need thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def main() -> None:
    parser = argparse.ArgumentParser(description="The benchmark's fake OpenAI-compatible upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--close-after-answer", action="store_true", help="answer with Connection: close")
    args = parser.parse_args()
    raise_open_file_limit()
    server = UpstreamServer(args.host, args.port, args.close_after_answer)
    stopping = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.append(True))
    print(server.port, flush=True)
    server.loop.run(until=lambda: bool(stopping))


if __name__ == "__main__":
    main()
