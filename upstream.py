"""Talks HTTP to the OpenAI-compatible upstream, and reads its streamed body as it arrives.

``UpstreamClient`` owns one pooled ``requests`` adapter, the retries before the first byte and the
mapping of every upstream failure to a ``RelayError``; ``UpstreamBody`` reads a streaming body
straight from its connection, de-chunked (``ChunkedDecoder``) and inflated. Nothing here parses
events or knows the caller: ``streaming.py`` does both.
"""

from __future__ import annotations

import email.utils
import errno
import http.client
import ipaddress
import math
import os
import random
import re
import socket
import ssl
import time
import zlib

import gevent
import orjson
import requests
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions
import urllib3.util.ssl_
from gevent.monkey import get_original
from requests.adapters import HTTPAdapter

from errors import RelayError, register_secret

MAX_ERROR_BODY_BYTES = 1 << 16
MAX_JSON_BODY_BYTES = 32 << 20
READ_BYTES = 16384  # per socket read: a chat chunk is far smaller, a firehose read fills it
RETRY_BASE_SECONDS = 0.25
RETRY_CAP_SECONDS = 8.0  # a longer Retry-After is the caller's to wait, not a retry here
RETRY_AFTER_MAX_SECONDS = 86_400.0  # an upstream's longer (or infinite) Retry-After is passed on as a day
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})


class FailsLater:
    """A decoder that, meeting damage, first returns what it decoded before it (which may hold the
    answer's end, [DONE]) and raises the damage's error at its next call, or at ``check``."""

    _error: Exception | None = None

    def check(self) -> None:
        """Raises the error of damage an earlier call met, if there was any."""
        if self._error is not None:
            raise self._error


def malformed(reason: str) -> RelayError:
    """The error for an upstream reply the relay cannot read: a failed upstream, so a 502."""
    return RelayError(502, "upstream_error", f"Malformed upstream reply: {reason}.", outcome="upstream_error")


class UpstreamSilent(Exception):
    """Raised into a reader whose upstream said nothing for longer than the read timeout (by
    ``streaming.py``'s watch, which keeps that clock); a 504, as a timeout of the socket's own would be."""


# --- the client --------------------------------------------------------------------------------


class UpstreamClient:
    """Calls the OpenAI-compatible upstream through one pooled ``requests`` adapter; maps its failures.

    Retries happen here and only here, before anything has reached the caller.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        connect_timeout: float,
        read_timeout: float,
        retries: int,
        pool_size: int,
        ca_bundle: str | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        register_secret(api_key)  # every RelayError, however much upstream text it carries, is redacted of it
        self._timeout = (connect_timeout, read_timeout)
        self._retries = retries
        self._session = requests.Session()  # only prepares requests; the adapter sends them
        self._session.trust_env = False  # a .netrc in the environment would replace the key
        self._adapter = _UpstreamAdapter(ca_bundle, pool_connections=2, pool_maxsize=pool_size, max_retries=0)
        self._adapter.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
        self._templates: dict[tuple[str, str, str], requests.PreparedRequest] = {}

    def _headers(self, accept: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": accept, "User-Agent": "chat-relay/1"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def open_stream(self, path: str, payload: dict) -> requests.Response:
        """POST a streaming request; the response is a 200 event stream, or a RelayError is raised."""
        response = self._send("POST", path, orjson.dumps(payload), "text/event-stream", stream=True)
        content_type = response.headers.get("Content-Type", "")
        if not content_type.lower().startswith("text/event-stream"):
            response.close()
            raise malformed(f"expected an event stream, got {content_type or 'no content type'!r}")
        return response

    def request_json(
        self, method: str, path: str, payload: dict | None = None, *, list_allowed: bool = False
    ) -> tuple[int, bytes, object]:
        """A non-streaming call: the upstream's 2xx status, its JSON body as sent and as parsed; or a
        RelayError. The body must be a JSON object, or with ``list_allowed`` also an array."""
        body = orjson.dumps(payload) if payload is not None else None
        response = self._send(method, path, body, "application/json", stream=True)
        try:
            content = _read_at_most(response, MAX_JSON_BODY_BYTES)
        finally:
            response.close()
        try:
            document = orjson.loads(content)
        except orjson.JSONDecodeError:
            raise malformed("the body is not JSON") from None
        if not isinstance(document, dict) and not (list_allowed and isinstance(document, list)):
            raise malformed("the body is not a JSON object")  # a completion, a list of models: not `0`
        return response.status_code, content, document

    def _prepare(self, method: str, path: str, body: bytes | None, accept: str) -> requests.PreparedRequest:
        """The request, from a template prepared once per endpoint: preparing one costs more than sending it.

        It goes straight to the adapter, without the session's per-request merging, cookie jar and
        redirects: the upstream's cookies are nobody's business, and a redirect is an error here.
        """
        key = (method, path, accept)
        template = self._templates.get(key)
        if template is None:
            request = requests.Request(method, self.base_url + path, headers=self._headers(accept))
            template = self._templates[key] = self._session.prepare_request(request)
        prepared = template.copy()
        if body is not None:
            prepared.body = body
            prepared.headers["Content-Length"] = str(len(body))
        return prepared

    def _send(self, method: str, path: str, body, accept: str, *, stream: bool) -> requests.Response:
        attempt = 0
        while True:
            try:
                prepared = self._prepare(method, path, body, accept)
                response = self._adapter.send(prepared, stream=stream, timeout=self._timeout)
            except requests.RequestException as exc:
                if _not_an_http_reply(exc):  # it reached the upstream, which answered: not retried
                    raise malformed("its status line or headers are not HTTP") from None
                error = transport_error(exc)
                # Connect errors, and a connection that broke before any reply (reset, closed): the
                # official SDKs retry both. Timeouts waiting for the reply (ReadTimeout) are not retried.
                retryable = isinstance(exc, requests.ConnectionError)
                delay = _backoff(attempt)
            else:
                if response.status_code < 300:
                    return response
                error = self._status_error(response)
                retryable = response.status_code in RETRYABLE_STATUSES
                delay = _retry_after(response.headers.get("Retry-After"))
                delay = _backoff(attempt) if delay is None else delay
            if not retryable or attempt >= self._retries or delay > RETRY_CAP_SECONDS:
                raise error
            attempt += 1
            time.sleep(delay)

    def _status_error(self, response: requests.Response) -> RelayError:
        try:
            body = _read_at_most(response, MAX_ERROR_BODY_BYTES)
        except RelayError:  # too long, stalled or cut: the status still says what happened
            body = b""
        finally:
            response.close()
        status = response.status_code
        upstream = _error_fields(body)
        message = upstream.get("message") or f"The upstream answered {status}."
        retry_after = response.headers.get("Retry-After")
        if status in (401, 403):
            return RelayError(
                502,
                "upstream_auth_failed",
                "The upstream rejected the relay's credentials; check OPENAI_API_KEY.",
                outcome="upstream_error",
            )
        if status == 429:
            seconds = _retry_after(retry_after)
            return RelayError(
                429,
                "upstream_rate_limited",
                "The upstream is rate limiting the relay: " + message,
                retry_after=max(1, round(seconds)) if seconds is not None else 1,
                outcome="upstream_error",
            )
        if status >= 500:
            return RelayError(502, "upstream_error", f"The upstream failed ({status}): {message}", outcome="upstream_error")
        if status < 400:  # never followed: the key and the question would go wherever it points
            return RelayError(
                502,
                "upstream_error",
                f"The upstream redirected ({status}); set OPENAI_BASE_URL to the address it redirects to.",
                outcome="upstream_error",
            )
        code = upstream.get("code")
        return RelayError(
            status,
            code if isinstance(code, str) and code else "upstream_error",
            message,
            error_type=upstream.get("type") if isinstance(upstream.get("type"), str) else None,
            param=upstream.get("param") if isinstance(upstream.get("param"), str) else None,
            outcome="upstream_error",
        )


class _UpstreamAdapter(HTTPAdapter):
    """requests' adapter, with one TLS context, its CA certificates loaded once, for every connection.

    Left to itself, urllib3 builds a context for each new https connection and loads the CA bundle
    into it: for certifi's ~150 public CAs that is ~16 ms of CPU per connection, and ~680 KiB the
    connection keeps for as long as it is open, which at thousands of open streams is gigabytes.
    """

    def __init__(self, ca_bundle: str | None, **kwargs):
        self._tls = urllib3.util.ssl_.create_urllib3_context()  # urllib3's defaults; verification required
        self._tls.load_verify_locations(cafile=ca_bundle or requests.utils.DEFAULT_CA_BUNDLE_PATH)  # else certifi's
        self._pools: dict[str, urllib3.connectionpool.HTTPConnectionPool] = {}
        super().__init__(**kwargs)

    def build_connection_pool_key_attributes(self, request, verify, cert=None):
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        if host_params["scheme"] == "https":
            pool_kwargs["ssl_context"] = self._tls
        return host_params, pool_kwargs

    def cert_verify(self, conn, url, verify, cert) -> None:
        super().cert_verify(conn, url, verify, cert)  # CERT_REQUIRED, and certifi's path...
        conn.ca_certs = conn.ca_cert_dir = None  # ...which urllib3 would load into the shared context again

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        """The connection pool for a request's URL, looked up once per URL.

        requests finds it anew for every request (proxy lookup, URL parsing, the pool key), a
        measurable share of a stream's set-up. The relay calls one upstream, with no proxies and
        the same TLS settings every time, so the answer for a URL never changes.
        """
        pool = self._pools.get(request.url)
        if pool is None or pool.pool is None:  # (a pool the pool manager has closed is looked up again)
            pool = self._pools[request.url] = super().get_connection_with_tls_context(request, verify, proxies, cert)
        return pool

    def build_response(self, req, resp) -> requests.Response:
        """requests' response, without reading the upstream's cookies into a jar nobody reads."""
        response = requests.Response()
        response.status_code = resp.status
        response.headers = requests.structures.CaseInsensitiveDict(resp.headers)
        response.encoding = requests.utils.get_encoding_from_headers(response.headers)
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url
        response.request = req
        response.connection = self
        return response


def peek_socket(raw_sock) -> bytes | None:
    """A byte of what a raw socket holds, left unread and without waiting; b"" once the peer closed
    it, None while it is open with nothing to read. Raises OSError when it was reset."""
    try:
        return raw_sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None


class _PeekedLiveness:
    """Answers urllib3's "is this pooled connection still usable?" with one non-blocking peek.

    urllib3 asks before reusing a connection, through ``select.poll``; under gevent that builds
    and tears down a watcher per call, a measurable share of a stream's set-up. A peek at the raw
    socket answers the same question, for TLS too (it sees the bytes under the encryption).
    """

    sock: socket.socket | None

    @property
    def is_connected(self) -> bool:
        if self.sock is None:
            return False
        raw = getattr(self.sock, "_sock", None)  # gevent's wrapper would wait on a would-block
        if raw is None:  # not a gevent socket (no workers' patching, or TLS through a proxy): ask urllib3
            return super().is_connected
        try:
            return peek_socket(raw) is None  # closed, or holding something unasked: either way, not reusable
        except OSError:
            return False


class _ConnectsWithoutWaiting:
    """Opens a connection to an upstream named by its IP address without waiting for gevent's loop
    when the kernel makes it at once.

    gevent waits for its loop after a non-blocking ``connect`` says EINPROGRESS, though to a server
    on this machine (a local model server, a sidecar) the handshake is done before ``connect``
    returns. The wait queues the request behind every other that became ready in the same turn of
    the loop: in a burst of 100 requests on two workers, no new connection was made before ~35 ms.
    Asking the kernel once more finds it made; a remote one (EALREADY) is left to gevent as before.
    Names are resolved and connected by urllib3 as before.
    """

    _dns_host: str
    port: int
    timeout: float | None
    source_address: tuple[str, int] | None
    socket_options: list | None

    def _new_conn(self) -> socket.socket:
        family = _ip_family(self._dns_host)
        if family is None or self.source_address or socket.socket is _UNPATCHED_SOCKET:
            return super()._new_conn()  # (without gevent's patching, as in a plain script, connecting blocks)
        address, sock = (self._dns_host.strip("[]"), self.port), None
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
            raw = sock._sock  # the non-blocking socket under gevent's wrapper
            for option in self.socket_options or ():
                sock.setsockopt(*option)
            if isinstance(self.timeout, (int, float)):
                sock.settimeout(self.timeout)
            result = raw.connect_ex(address)
            if result == errno.EINPROGRESS:
                result = raw.connect_ex(address)  # 0 (or EISCONN) if the handshake is already done
            if result in (errno.EALREADY, errno.EINPROGRESS):
                sock.connect(address)  # still going: gevent waits for it on the loop
            elif result not in (0, errno.EISCONN):
                raise OSError(result, os.strerror(result))
        except socket.timeout as exc:
            sock.close()
            message = f"Connection to {self.host} timed out. (connect timeout={self.timeout})"
            raise urllib3.exceptions.ConnectTimeoutError(self, message) from exc
        except OSError as exc:
            if sock is not None:
                sock.close()
            raise urllib3.exceptions.NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc
        return sock


_UNPATCHED_SOCKET = get_original("socket", "socket")


def _ip_family(host: str) -> int | None:
    """AF_INET or AF_INET6 for an IP address (bracketed or not), None for a name."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host.strip("[]")).version == 6 else socket.AF_INET
    except ValueError:
        return None


class _UpstreamHTTPResponse(http.client.HTTPResponse):
    """http.client's response, skipping each interim (1xx) response that comes before the answer.

    http.client skips only 100 Continue, as many as come. RFC 9110 (15.2) has a client ignore the
    interim responses it did not ask for, such as 103 Early Hints, which some servers and proxies
    send first; taken for the answer, one failed the request (an empty 103 is no event stream).
    """

    MAX_INTERIM = 16  # skipped; one more is a broken upstream, not one slow to begin

    def _read_status(self):
        for _ in range(self.MAX_INTERIM + 1):  # the interim responses, and the answer's status line
            version, status, reason = super()._read_status()
            if not 100 <= status < 200 or status == 101:  # 101 would switch protocols: no answer of ours
                return version, status, reason
            http.client._read_headers(self.fp)  # the interim response's headers, ignored
        raise http.client.HTTPException(f"more than {self.MAX_INTERIM} interim responses")


class _HTTPConnection(_ConnectsWithoutWaiting, _PeekedLiveness, urllib3.connection.HTTPConnection):
    response_class = _UpstreamHTTPResponse


class _HTTPSConnection(_ConnectsWithoutWaiting, _PeekedLiveness, urllib3.connection.HTTPSConnection):
    response_class = _UpstreamHTTPResponse


class _HTTPPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def _read_at_most(response: requests.Response, limit: int) -> bytes:
    """A whole non-streamed body; RelayError when it is too long, stalls or is cut short."""
    try:
        content = response.raw.read(limit + 1, decode_content=True)
    except urllib3.exceptions.DecodeError:
        raise malformed("the body's gzip or deflate encoding is corrupt") from None
    except urllib3.exceptions.ProtocolError:  # the head came: a body cut short, or badly framed
        raise malformed("the body was cut short or badly framed") from None
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise transport_error(exc) from None
    if len(content) > limit:
        raise malformed(f"the body is larger than {limit} bytes")
    return content


def _error_fields(body: bytes) -> dict:
    """The upstream's error object, its ``message`` a string whatever shape the server gave it.

    OpenAI sends ``{"error": {"message": ...}}``; compatible servers also send a bare string, a
    message that is an object, a FastAPI-style ``{"detail": ...}``, the error object itself (vLLM,
    Mistral: ``{"object": "error", "message": ...}``), or OpenAI's shape in a one-item list (Gemini).
    """
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    if isinstance(parsed, list) and len(parsed) == 1:
        parsed = parsed[0]
    if not isinstance(parsed, dict):
        return {}
    if "error" in parsed or "detail" in parsed:
        return error_object(parsed.get("error", parsed.get("detail")))
    return error_object(parsed) if "message" in parsed else {}


def error_object(error) -> dict:
    """An upstream's error value as an object whose ``message`` is a string (or None): a bare value
    becomes the message, and a message that is not a string is passed on as its JSON."""
    if not isinstance(error, dict):
        error = {"message": error}
    message = error.get("message")
    if message is not None and not isinstance(message, str):
        message = orjson.dumps(message).decode()
    return {**error, "message": message}


def transport_error(exc: Exception) -> RelayError:
    if isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError, socket.timeout, UpstreamSilent)):
        return RelayError(504, "upstream_timeout", "The upstream did not answer in time.", outcome="timeout")
    if _never_reached(exc):
        return RelayError(502, "upstream_error", "Could not reach the upstream.", outcome="upstream_error")
    return RelayError(
        502, "upstream_error", "The upstream connection failed before its answer began.", outcome="upstream_error"
    )


def _never_reached(exc: Exception) -> bool:
    """Whether the request failed before any connection to the upstream was made (so it was not sent)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    if not isinstance(exc, requests.ConnectionError):
        return False
    cause = exc.args[0] if exc.args else None  # urllib3's MaxRetryError, whose reason is the failure
    return isinstance(getattr(cause, "reason", None), urllib3.exceptions.NewConnectionError)


def _not_an_http_reply(exc: requests.RequestException) -> bool:
    """Whether the upstream answered with something other than an HTTP response head (a bad status
    line, a header line too long), as against closing the connection without a word."""
    cause = exc.args[0] if exc.args else None  # urllib3's ProtocolError("Connection aborted.", <why>)
    reason = cause.args[-1] if isinstance(cause, urllib3.exceptions.ProtocolError) and cause.args else None
    return isinstance(reason, http.client.HTTPException) and not isinstance(reason, http.client.RemoteDisconnected)


def _backoff(attempt: int) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(RETRY_CAP_SECONDS, RETRY_BASE_SECONDS * 2**attempt))


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), at most a day; or None."""
    if not value:
        return None
    try:
        seconds = float(value)  # "inf" too, which a careless server may send: a day
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    if math.isnan(seconds):
        return None
    return min(max(0.0, seconds), RETRY_AFTER_MAX_SECONDS)


# --- the upstream body, de-chunked ------------------------------------------------------------


_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


class BadFraming(urllib3.exceptions.ProtocolError):
    """The upstream's chunked body is malformed: a broken reply, not a broken connection."""


class ChunkedDecoder(FailsLater):
    """Decodes an HTTP/1.1 chunked body incrementally: bytes in, payload bytes out (RFC 9112 7.1).

    ``done`` turns true once the last chunk and its trailer section have been consumed exactly,
    so the connection can carry the next request.
    """

    def __init__(self):
        self.done = False
        self._pending = b""
        self._left = 0  # payload bytes still due in the current chunk
        self._state = "size"  # size, data, crlf, trailer

    def feed(self, data: bytes) -> bytes:
        """The payload in ``data``. Bad framing raises BadFraming, but only once the payload decoded
        before it has been returned: it may hold the answer's end ([DONE])."""
        self.check()
        out: list[bytes] = []
        try:
            return self._decode(data, out)
        except BadFraming as error:
            if not out:
                raise
            self._error = error
            return b"".join(out)

    def _decode(self, data: bytes, out: list[bytes]) -> bytes:
        buf = self._pending + data if self._pending else data
        pos, end = 0, len(buf)
        while pos < end and not self.done:
            state = self._state
            if state == "data":
                take = min(self._left, end - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._left -= take
                if not self._left:
                    self._state = "crlf"
                continue
            line_end = buf.find(b"\n", pos)
            if line_end < 0:
                if end - pos > 4096:
                    raise BadFraming("chunk header line too long")
                break
            line = buf[pos:line_end].rstrip(b"\r")
            pos = line_end + 1
            if state == "crlf":
                if line:
                    raise BadFraming("chunk not followed by CRLF")
                self._state = "size"
            elif state == "size":
                size = line.split(b";", 1)[0].rstrip(b" \t")  # whitespace may come before an extension
                if not _CHUNK_SIZE.fullmatch(size):  # int() would also take "-5", "+5", "0x5" and "1_0"
                    raise BadFraming(f"bad chunk size line {line[:40]!r}")
                self._left = int(size, 16)
                self._state = "data" if self._left else "trailer"
            elif not line:  # the empty line that ends the trailer section
                self.done = True
        self._pending = buf[pos:]
        return b"".join(out)


class _Inflater(FailsLater):
    """gzip or deflate decoding that returns what it decoded before damaged bytes and raises later:
    zlib drops a whole call's output on an error. Only compressed bodies pay for the copy this needs."""

    def __init__(self, wbits: int):
        self._wbits = wbits
        self._zlib = zlib.decompressobj(wbits)
        self._first = True

    def decompress(self, data: bytes, final: bool) -> bytes:
        self.check()
        if self._first and data:
            self._first = False
            if self._wbits == zlib.MAX_WBITS and not _zlib_header(data):
                # deflate as some servers send it, without the zlib wrapper (RFC 1951 alone), as urllib3 also reads it
                self._wbits = -zlib.MAX_WBITS
                self._zlib = zlib.decompressobj(self._wbits)
        before = self._zlib.copy()
        try:
            return self._members(data) + (self._zlib.flush() if final else b"")
        except zlib.error:
            self._zlib = before
        out = []
        try:  # again, a byte at a time (a rare path): everything before the damaged byte comes out
            for start in range(len(data)):
                out.append(self._members(data[start : start + 1]))
            if final:
                out.append(self._zlib.flush())
        except zlib.error as error:
            if not any(out):
                raise
            self._error = error
        return b"".join(out)

    def _members(self, data: bytes) -> bytes:
        """Decoded ``data``; a gzip body may be several members one after another (RFC 1952)."""
        out = self._zlib.decompress(data)
        while self._zlib.eof and self._zlib.unused_data[:2] == b"\x1f\x8b" and self._wbits & 16:
            rest, self._zlib = self._zlib.unused_data, zlib.decompressobj(self._wbits)
            out += self._zlib.decompress(rest)
        return out  # bytes after the last member that start none (padding) are ignored, as before


def _zlib_header(data: bytes) -> bool:
    """Whether a deflate body starts with the zlib wrapper's header (RFC 1950): method 8, checksum."""
    if data[0] & 0x0F != 8 or data[0] >> 4 > 7:
        return False
    return len(data) < 2 or (data[0] << 8 | data[1]) % 31 == 0


class _WaitingSocket:
    """A gevent socket read by ``read1``, which waits for readability only after a read that emptied it.

    At chat pace every token finds the socket empty: a plain read would first fail with EAGAIN (a
    system call and an exception) before gevent waits for the same event. (A class of its own, not a
    method of UpstreamBody kept in an attribute: that would be a reference cycle, and the finished
    response would wait for the garbage collector instead of going when its stream does.)

    A TLS socket may hold bytes already decrypted while its file descriptor has nothing to read (the
    rest of a record that a read did not empty): those are read without waiting. Readable, it may
    still hold only part of a record; gevent's ``recv`` then waits for the rest itself.
    """

    __slots__ = ("_recv", "_decrypted", "_hub", "_readable", "_drained")

    def __init__(self, sock):
        self._decrypted = getattr(sock, "pending", None)  # TLS only: bytes decrypted above the descriptor
        raw = getattr(sock, "_sock", None)  # the non-blocking socket under gevent's wrapper
        # Once readable, a plain socket is read straight from the kernel: gevent's recv would only
        # add a layer of Python per token around the same call.
        self._recv = raw.recv if raw is not None and self._decrypted is None else sock.recv
        self._hub = gevent.get_hub()
        self._readable = self._hub.loop.io(sock.fileno(), 1)
        self._drained = False

    def read1(self, limit: int) -> bytes:
        if self._drained and not (self._decrypted is not None and self._decrypted()):
            self._hub.wait(self._readable)
        while True:
            try:
                data = self._recv(limit)
                break
            except BlockingIOError:  # nothing after all (a first read; a spurious wake-up): wait, then read
                self._hub.wait(self._readable)
        self._drained = len(data) < limit
        return data

    def close(self) -> None:
        self._readable.close()


class UpstreamBody:
    """Reads a streaming upstream body as it arrives, as cheaply as Python allows.

    urllib3 and http.client run several layers of Python per network read; at chat pace that is per
    token. For the common shapes (chunked or length-delimited or read-to-close; identity, gzip,
    x-gzip or deflate) this reads the connection directly, once per read, and decodes with
    ``ChunkedDecoder`` and zlib. Anything else goes through urllib3 unchanged.

    On a connection that stays open for reuse (a chunked or length-delimited body), plain or TLS,
    it reads the socket itself: a stream waiting for its next token then holds no read buffer (a
    buffered reader's ``read1`` holds one of the size asked for the whole wait) and http.client's
    own 8 KiB buffer is freed, 24 KiB less per open stream. A read-to-close body, whose socket
    http.client keeps to itself, is read through http.client's buffered file object.
    """

    def __init__(self, response: requests.Response):
        self._response = response
        self.complete = False
        self._socket = None  # the connection's socket, when the body reads it directly
        raw = response.raw
        self._http = getattr(raw, "_fp", None)  # http.client.HTTPResponse, headers already parsed
        source = getattr(self._http, "fp", None)
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if source is None or encoding not in ("identity", "gzip", "x-gzip", "deflate") or not hasattr(source, "read1"):
            self.read = lambda: raw.read1(decode_content=True)
            self.direct = False  # urllib3 reads: any exception raised into a read closes the response
            return
        self.direct = True
        self._chunked = ChunkedDecoder() if self._http.chunked else None
        self._left = self._http.length  # None: read to close
        self._early = b""  # body bytes that arrived with the head
        sock = getattr(getattr(raw, "connection", None), "sock", None)
        if sock is None:
            self._recv = source.read1
        else:
            self._early = self._take_socket(source, sock)
            self._socket = _WaitingSocket(sock)
            self._recv = self._socket.read1
        self._inflate = None
        if encoding in ("gzip", "x-gzip"):
            self._inflate = _Inflater(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._inflate = _Inflater(zlib.MAX_WBITS)

    def _take_socket(self, source, sock) -> bytes:
        """Stop reading through http.client's buffer; returns what it holds of the body already."""
        sock.settimeout(0.0)  # what came with the head is buffered, or in the socket now: no waiting
        try:
            early = source.peek()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):  # TLS's "nothing yet"; plain gives b""
            early = b""
        finally:
            sock.settimeout(None)  # the stream watch owns the read timeout
        self._http._close_conn()  # frees its buffer; the socket stays open, for the pool
        if self._left is not None and self._chunked is None:
            early = early[: self._left]
        return early

    def read(self) -> bytes:
        """The next decoded payload bytes; b"" at the end of the body. Blocks until some arrive."""
        for decoder in (self._chunked, self._inflate):
            if decoder is not None:
                decoder.check()  # damage found after the payload last returned
        while not self.complete:
            if self._early:
                data, self._early = self._early, b""
            else:
                limit = READ_BYTES if self._left is None or self._chunked else min(READ_BYTES, self._left)
                data = self._recv(limit) if limit else b""
            if not data:
                return self._at_eof()
            if self._chunked is not None:
                data = self._chunked.feed(data)
                if self._chunked.done:
                    self.complete = True
            elif self._left is not None:
                self._left -= len(data)
                self.complete = self._left == 0
            if self._inflate is not None:
                data = self._inflate.decompress(data, final=self.complete)
            if data:
                return data
        return b""

    def _at_eof(self) -> bytes:
        if self._chunked is not None or self._left:
            raise urllib3.exceptions.ProtocolError("the upstream closed the connection mid-body")
        self.complete = True
        return self._inflate.decompress(b"", final=True) if self._inflate is not None else b""

    def close(self) -> None:
        """Release the readiness watcher; the response itself is the caller's to close or finish."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def finish(self) -> None:
        """After a complete body: give the connection back to the pool, as urllib3 would."""
        if self.direct:
            if not self.complete:
                return
            if self._http.fp is not None:
                self._http._close_conn()  # closes only http.client's file object; the socket stays open
        self._response.raw.release_conn()

