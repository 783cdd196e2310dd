"""A scriptable OpenAI-compatible upstream, written at the socket level, for the relay's tests.

Each test registers a script under a unique model name and sends that model through the relay;
the script then controls every byte, split and delay of the upstream's answer and can watch for
the relay hanging up. Threads, not gevent: the test process is not monkey-patched.
"""

from __future__ import annotations

import gzip
import itertools
import json
import select
import socket
import ssl
import threading
import time
import zlib
from dataclasses import dataclass, field

_ids = itertools.count(1)


@dataclass
class UpstreamRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class Exchange:
    """One request's life as the upstream saw it."""

    request: UpstreamRequest
    started: float
    connection: int = 0  # which TCP connection carried it (the same number: a reused connection)
    closed_by_peer_at: float | None = None
    finished: threading.Event = field(default_factory=threading.Event)


class Conn:
    """The socket a script writes to, with helpers for the framings a test needs."""

    def __init__(self, sock: socket.socket, exchange: Exchange):
        self.sock = sock
        self.exchange = exchange
        self.keep_alive = False
        self._chunked = False
        self._gzip = None

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def start(self, status=200, content_type="text/event-stream", headers=(), chunked=True, gzip_body=False,
              keep_alive=True):  # fmt: skip
        # Open for the next request after a chunked answer, as real upstreams are (so the relay reads
        # the socket itself); keep_alive=False answers with Connection: close.
        self.keep_alive = keep_alive and chunked
        lines = [f"HTTP/1.1 {status} X", f"Content-Type: {content_type}"]
        if not self.keep_alive:
            lines.append("Connection: close")
        if chunked:
            lines.append("Transfer-Encoding: chunked")
        if gzip_body:
            lines.append(f"Content-Encoding: {gzip_body if isinstance(gzip_body, str) else 'gzip'}")
            self._gzip = zlib.compressobj(9, zlib.DEFLATED, 31)
        lines.extend(f"{name}: {value}" for name, value in headers)
        self.send_raw(("\r\n".join(lines) + "\r\n\r\n").encode())
        self._chunked = chunked

    def send(self, data: bytes) -> None:
        """Body bytes, as one chunk (or raw when not chunked), compressed if the body is gzip."""
        if self._gzip is not None:
            data = self._gzip.compress(data) + self._gzip.flush(zlib.Z_SYNC_FLUSH)
        if self._chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data) if data else b""
        if data:
            self.send_raw(data)

    def end(self) -> None:
        if self._gzip is not None:
            tail = self._gzip.flush()
            self._gzip = None
            if tail:
                self.send(tail) if not self._chunked else self.send_raw(b"%x\r\n%s\r\n" % (len(tail), tail))
        if self._chunked:
            self.send_raw(b"0\r\n\r\n")

    def json_response(self, status: int, body, headers=()) -> None:
        payload = json.dumps(body).encode() if not isinstance(body, bytes) else body
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
        self.send_raw(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(payload)}\r\n{extra}\r\n".encode()
            + payload
        )

    def wait_for_hangup(self, timeout: float) -> float | None:
        """Block until the relay closes this connection; returns when, or None on timeout."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.sock], [], [], min(left, 0.05))
            if readable:
                try:
                    if self.sock.recv(4096) == b"":
                        return time.monotonic()
                except OSError:
                    return time.monotonic()
        return None

    def sleep_unless_hangup(self, seconds: float) -> bool:
        """Sleep; True if the relay hung up meanwhile (recorded on the exchange)."""
        when = self.wait_for_hangup(seconds)
        if when is not None:
            self.exchange.closed_by_peer_at = when
            return True
        return False


def chunk(content=None, *, finish_reason=None, role=None, model="fake-model", usage=None, choices=True, **delta_extra):
    """One chat.completion.chunk as JSON text."""
    delta = dict(delta_extra)
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    body = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000, "model": model}
    body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason}] if choices else []
    if usage is not None:
        body["usage"] = usage
    return json.dumps(body, ensure_ascii=False)


def sse_answer(tokens, *, finish_reason="stop", usage=None, done=True) -> list[bytes]:
    """The upstream events of a whole answer, one bytes item per event."""
    events = [chunk(role="assistant", content="")]
    events += [chunk(token) for token in tokens]
    events.append(chunk(finish_reason=finish_reason))
    if usage is not None:
        events.append(chunk(usage=usage, choices=False))
    out = [f"data: {event}\n\n".encode() for event in events]
    if done:
        out.append(b"data: [DONE]\n\n")
    return out


def stream_script(events, *, delay=0.0, first_delay=0.0, **start):
    """A script that answers 200 with ``events`` (bytes), each its own chunk, ``delay`` apart."""

    def script(conn: Conn):
        conn.start(**start)
        if first_delay and conn.sleep_unless_hangup(first_delay):
            return
        for index, event in enumerate(events):
            conn.send(event)
            if delay and index < len(events) - 1 and conn.sleep_unless_hangup(delay):
                return
        conn.end()

    return script


class FakeUpstream:
    """The server: one thread per connection. After a chunked answer the connection stays open for
    the next request, as real upstreams' do, unless the script starts with keep_alive=False
    (Connection: close) or sets ``conn.keep_alive = False``: a script that cuts its answer short by
    closing the connection must do one of the two."""

    def __init__(self, tls: ssl.SSLContext | None = None):
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.port = self._listener.getsockname()[1]
        self._tls = tls  # serve https with this server context (a certificate for 127.0.0.1)
        self.failed_handshakes = 0
        self.base_url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}/v1"
        self._scripts: dict[str, object] = {}
        self.exchanges: dict[str, list[Exchange]] = {}
        self.default_script = None
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def script(self, script, name: str | None = None) -> str:
        """Register ``script``; returns the model name that selects it."""
        model = name or f"script-{next(_ids)}"
        with self._lock:
            self._scripts[model] = script
            self.exchanges[model] = []
        return model

    def seen(self, model: str) -> list[Exchange]:
        return self.exchanges.get(model, [])

    def wait_seen(self, model: str, count: int = 1, timeout: float = 5.0) -> list[Exchange]:
        deadline = time.monotonic() + timeout
        while len(self.seen(model)) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.seen(model)

    def close(self) -> None:
        self._stopping = True
        self._listener.close()

    def _accept_loop(self):
        while not self._stopping:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = next(_ids)
        try:
            if self._tls is not None:
                sock.settimeout(10)  # a client that never finishes its handshake frees the thread
                try:
                    sock = self._tls.wrap_socket(sock, server_side=True)
                except OSError:  # e.g. a client that does not trust the certificate
                    self.failed_handshakes += 1
                    return
                sock.settimeout(None)
            while self._serve_one(sock, connection):
                pass
        finally:
            try:
                sock.close()
            except OSError:
                pass

    def _serve_one(self, sock: socket.socket, connection: int) -> bool:
        """Serve one request; True when the connection stays open for another."""
        try:
            request = _read_request(sock)
        except OSError:
            return False
        if request is None:
            return False
        model = None
        if request.body:
            try:
                model = json.loads(request.body).get("model")
            except (ValueError, AttributeError):
                model = None
        exchange = Exchange(request, time.monotonic(), connection)
        with self._lock:
            script = self._scripts.get(model) or self.default_script
            self.exchanges.setdefault(model, []).append(exchange)
        conn = Conn(sock, exchange)
        try:
            if script is None:
                conn.json_response(404, {"error": {"message": f"no script for model {model!r}", "code": None}})
            else:
                script(conn)
        except OSError:
            exchange.closed_by_peer_at = exchange.closed_by_peer_at or time.monotonic()
            return False
        finally:
            exchange.finished.set()
        return conn.keep_alive


def _read_request(sock: socket.socket) -> UpstreamRequest | None:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            return None
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while not body.endswith(b"0\r\n\r\n"):
            body += sock.recv(65536)
        body = _unchunk(body)
    else:
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            body += sock.recv(65536)
    return UpstreamRequest(method, path, headers, body)


def _unchunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out += rest[:size]
        data = rest[size + 2 :]


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data)
