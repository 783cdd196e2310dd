"""The relay's pipeline: upstream bytes -> SSE lines -> events -> tokens -> the caller's framing.

Pieces, one job each: ``SSEDecoder`` (bytes to events, WHATWG rules, no I/O), the translators
(events to output bytes for the token endpoint or the passthrough), ``UpstreamClient`` (one
``requests`` connection pool, retries before the first byte, error mapping), ``UpstreamBody``
(the body as it arrives, de-chunked) and one stream's lifetime under gevent: ``RelayStream``
(read by the caller's own greenlet) or ``ResumableStream`` (a reader greenlet that records the
answer and may outlive its caller), both under one watch greenlet for heartbeats, hang-ups,
timeouts and the shutdown deadline.
Nothing here imports Flask.
"""

from __future__ import annotations

import email.utils
import errno
import http.client
import ipaddress
import logging
import math
import os
import random
import re
import select
import socket
import ssl
import time
import zlib
from typing import Callable, Iterator

import gevent
import gevent.queue
import orjson
import requests
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions
import urllib3.util.ssl_
from gevent.monkey import get_original
from requests.adapters import HTTPAdapter

from errors import RelayError, register_secret

MAX_LINE_BYTES = 1 << 20  # one SSE line longer than this is a broken upstream, not a long answer
MAX_ERROR_BODY_BYTES = 1 << 16
MAX_JSON_BODY_BYTES = 32 << 20
CLIENT_POLL_SECONDS = 0.5  # how often a silent stream checks that its caller is still there
# After [DONE] the answer is whole; the body's own end may take this long before the relay ends the
# answer anyway and drops the connection (which it would otherwise have kept for the next stream).
DONE_LINGER_SECONDS = 0.5
READ_BYTES = 16384  # per socket read: a chat chunk is far smaller, a firehose read fills it
QUEUE_DEPTH = 256  # reads buffered between upstream and a slow caller before the reader waits
RETRY_BASE_SECONDS = 0.25
RETRY_CAP_SECONDS = 8.0  # a longer Retry-After is the caller's to wait, not a retry here
RETRY_AFTER_MAX_SECONDS = 86_400.0  # an upstream's longer (or infinite) Retry-After is passed on as a day
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})

log = logging.getLogger("chat_relay")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


# --- bytes to events -------------------------------------------------------------------------


class ServerSentEvent:
    """One dispatched event: its type, its data (bytes, lines joined by LF), and its raw field lines."""

    __slots__ = ("event", "data", "id", "lines")

    def __init__(self, event: bytes | None, data: bytes, id: bytes | None, lines: list[bytes]):
        self.event = event
        self.data = data
        self.id = id
        self.lines = lines

    def __repr__(self) -> str:
        return f"ServerSentEvent(event={self.event!r}, data={self.data!r})"


class _FailsLater:
    """A decoder that, meeting damage, first returns what it decoded before it (which may hold the
    answer's end, [DONE]) and raises the damage's error at its next call, or at ``check``."""

    _error: Exception | None = None

    def check(self) -> None:
        """Raises the error of damage an earlier call met, if there was any."""
        if self._error is not None:
            raise self._error


class SSEDecoder(_FailsLater):
    """Turns a byte stream into events as the WHATWG spec says, whatever the network's splits.

    Lines are framed on bytes (CR, LF or CRLF; a CRLF split across reads is one line end), so
    U+2028 inside JSON and multi-byte characters split across reads pass through intact.
    """

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES):
        self._max_line_bytes = max_line_bytes
        self._pending = b""
        self._at_start = True
        self._skip_lf = False
        self._event: bytes | None = None
        self._data: list[bytes] = []
        self._data_size = 0
        self._id: bytes | None = None
        self._lines: list[bytes] = []

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """The events completed by ``chunk``. An over-long line or event ends the stream: the events
        before it are returned (one may be the answer's end, [DONE]), and the next call raises
        ``ValueError`` (a gzip body can hold both in one read)."""
        self.check()
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        data = self._pending + chunk if self._pending else chunk
        if self._at_start:
            if len(data) < len(_BOM) and _BOM.startswith(data):
                self._pending = data
                return []
            self._at_start = False
            if data.startswith(_BOM):
                data = data[len(_BOM):]
        if b"\r" in data:
            self._skip_lf = data.endswith(b"\r")
            lines = _LINE_END.split(data)
        else:
            lines = data.split(b"\n")
        self._pending = lines.pop()
        if len(data) > self._max_line_bytes and max([len(self._pending), *map(len, lines)]) > self._max_line_bytes:
            self._error = ValueError(f"upstream sent a line longer than {self._max_line_bytes} bytes")
            lines = lines[: next((i for i, line in enumerate(lines) if len(line) > self._max_line_bytes), len(lines))]
        events = []
        try:
            for line in lines:
                if line:
                    self._process_field(line)
                else:  # a blank line ends the event
                    event = self._dispatch()
                    if event is not None:
                        events.append(event)
        except ValueError as error:  # an event larger than allowed
            self._error = error
        return events

    def _process_field(self, line: bytes) -> None:
        if line[0] == 0x3A:  # ":" starts a comment
            return
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
            self._data_size += len(value)
            if self._data_size > self._max_line_bytes:
                raise ValueError(f"upstream sent an event larger than {self._max_line_bytes} bytes")
        elif name == b"event":
            self._event = value
        elif name == b"id":
            if b"\0" not in value:
                self._id = value
        elif name != b"retry":
            return  # unknown fields are ignored, and not relayed
        self._lines.append(line)

    def _dispatch(self) -> ServerSentEvent | None:
        event = None
        if self._data:
            event = ServerSentEvent(self._event, b"\n".join(self._data), self._id, self._lines)
        self._event, self._data, self._lines, self._data_size = None, [], [], 0
        return event


# --- events to output --------------------------------------------------------------------------


def _sse(data: bytes, event: bytes | None = None) -> bytes:
    if event is None:
        return b"data: " + data + b"\n\n"
    return b"event: " + event + b"\ndata: " + data + b"\n\n"


PING = b": ping\n\n"


def sse_error_frame(error: RelayError) -> bytes:
    """An ``error`` event that belongs to no answer's numbering (a follower's own failure)."""
    return _sse(error.to_json(), b"error")


def _upstream_event_error(error) -> RelayError:
    """An error the upstream reported in its event stream: a failed upstream, so ``upstream_error``
    (an upstream's own code is no code a caller of the relay knows; the message names it)."""
    error = _error_object(error)
    code = error.get("code")
    message = error["message"] or "The upstream reported an error mid-stream."
    if isinstance(code, (str, int)) and not isinstance(code, bool) and str(code):
        message = f"{message} (upstream code {code})"
    return RelayError(
        502,
        "upstream_error",
        "Upstream error: " + message,
        error_type=error.get("type") if isinstance(error.get("type"), str) else None,
        outcome="upstream_error",
    )


def _malformed(reason: str) -> RelayError:
    return RelayError(502, "upstream_error", f"Malformed upstream reply: {reason}.", outcome="upstream_error")


def _truncated() -> RelayError:
    return RelayError(
        502,
        "upstream_error",
        "The upstream stream ended before the answer was complete.",
        outcome="upstream_error",
    )


def _writable(value) -> bool:
    """Whether orjson can write ``value`` again: it reads JSON nested deeper than it writes (254)."""
    try:
        orjson.dumps(value)
    except TypeError:
        return False
    return True


def is_token_count(value) -> bool:
    """A token count an upstream reported that the relay can log and count: a whole number, not negative."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_chunk(data: bytes) -> dict:
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise _malformed("an event's data is not JSON") from None
    if not isinstance(chunk, dict):
        raise _malformed("an event's data is not a JSON object")
    if chunk.get("error"):  # servers that write every field send "error": null on good chunks
        raise _upstream_event_error(chunk["error"])
    return chunk


def _json_or_none(data: bytes):
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _named_event_error(event: ServerSentEvent, data) -> RelayError | None:
    """The failure a named event reports: ``event: error``, or any with an ``error`` in its JSON ``data``."""
    if isinstance(data, dict) and data.get("error"):
        return _upstream_event_error(data["error"])
    if event.event == b"error":
        return _upstream_event_error(event.data.decode("utf-8", "replace") if data is None else data)
    return None


class _Translator:
    """What both translators track of an answer, and the one rule for how it may end.

    ``feed`` turns one event into output bytes; ``[DONE]`` and chunks of the wrong shape are handled
    here, the rest by each subclass's ``_chunk``.
    """

    sse = True

    def __init__(self):
        self.model: str | None = None
        self.token_count = 0
        self.usage: dict | None = None
        self.finish_reason: str | None = None
        self.done = False  # [DONE] came: the answer is whole, whatever the upstream's body does next

    @property
    def completion_tokens(self) -> int:
        reported = (self.usage or {}).get("completion_tokens")
        return reported if is_token_count(reported) else self.token_count

    def _note_usage(self, chunk: dict) -> None:
        usage = chunk.get("usage")
        if usage and isinstance(usage, dict) and _writable({"usage": usage}):  # as the done event holds it
            self.usage = usage

    def _note_finish(self, choice: dict) -> None:
        reason = choice.get("finish_reason")
        if reason and isinstance(reason, str):  # anything else ends nothing (the contract's is a string)
            self.finish_reason = reason

    def feed(self, event: ServerSentEvent) -> bytes:
        if event.data == b"[DONE]":
            self.done = True
            return self._done(event)
        try:
            if event.event not in (None, b"", b"message"):  # an empty type is the default, per the SSE spec
                # A named event (`event: ping` with data) fails the answer only if it reports an error.
                data = _json_or_none(event.data)
                error = _named_event_error(event, data)
                if error is not None:
                    raise error
                return self._named(event, data)
            if not event.data:  # `data:` alone: an event with nothing in it (the SDKs would fail on it)
                return b""
            return self._chunk(_parse_chunk(event.data), event)
        except (AttributeError, TypeError, KeyError, IndexError):
            raise _malformed("a chunk does not have the chat.completion.chunk shape") from None

    def _check_complete(self) -> None:
        """An answer without a finish_reason and without [DONE] was cut short."""
        if self.finish_reason is None and not self.done:
            raise _truncated()

    def _done(self, event: ServerSentEvent) -> bytes:
        raise NotImplementedError

    def _chunk(self, chunk: dict, event: ServerSentEvent) -> bytes:
        raise NotImplementedError

    def _named(self, event: ServerSentEvent, data) -> bytes:
        """The output for a named event that reports no error; ``data`` is its JSON, or None."""
        raise NotImplementedError


class TokenTranslator(_Translator):
    """Turns upstream chat-completion events into the token endpoint's output.

    ``sse=False`` is the plain-text format: the bare concatenation of ``delta.content``.
    ``sse=True`` is the relay's own events: ``meta``, one per token, and ``done``. With a
    ``stream_id`` (a resumable answer) each event also carries ``id: <stream id>:<seq>`` and is kept
    until ``take_frames`` hands it to the answer's record.
    """

    def __init__(self, sse: bool, stream_id: str | None = None):
        super().__init__()
        self.sse = sse
        self.stream_id = stream_id if sse else None
        self._id_prefix = b"id: " + stream_id.encode() + b":" if self.stream_id else None
        self._seq = 0
        self._frames: list[bytes] = []
        self._first_chunk: dict | None = None  # while no chunk has named the model

    def _frame(self, data: bytes, event: bytes | None = None) -> bytes:
        if self._id_prefix is None:
            return _sse(data, event)
        self._seq += 1
        frame = self._id_prefix + str(self._seq).encode() + b"\n" + _sse(data, event)
        self._frames.append(frame)
        return frame

    def take_frames(self) -> list[bytes]:
        """The numbered events made since the last call, for the answer's record."""
        frames, self._frames = self._frames, []
        return frames

    def _done(self, event: ServerSentEvent) -> bytes:
        return b""

    def _named(self, event: ServerSentEvent, data) -> bytes:
        return b""  # no chat chunk: not the answer's meta, not a token

    def _chunk(self, chunk: dict, event: ServerSentEvent) -> bytes:
        out = b""
        # The answer's meta: from its first chunk that names the model or carries a choice. Azure's
        # first has neither (its prompt filter results, id and model empty).
        if self.model is None:
            if chunk.get("model") or chunk.get("choices"):
                out = self._meta(chunk)
            elif self._first_chunk is None:
                self._first_chunk = chunk
        if chunk.get("usage"):  # (the checks are calls of their own: most chunks carry neither)
            self._note_usage(chunk)
        choices = chunk.get("choices")
        if not choices:
            return out
        choice = choices[0]
        if choice.get("finish_reason"):
            self._note_finish(choice)
        content = (choice.get("delta") or {}).get("content")
        if type(content) is not str:
            content = _content_text(content)
        if not content:
            return out
        self.token_count += 1
        if self.sse:
            return out + self._frame(orjson.dumps({"content": content}))
        return out + content.encode()

    def _meta(self, chunk: dict) -> bytes:
        self.model = chunk.get("model") if isinstance(chunk.get("model"), str) else ""
        if not self.sse:
            return b""
        meta = {"id": chunk.get("id"), "model": chunk.get("model"), "created": chunk.get("created")}
        if self.stream_id:
            meta["stream_id"] = self.stream_id
        return self._frame(orjson.dumps(meta), b"meta")

    def _meta_if_none_yet(self) -> bytes:
        """An answer's events open with its meta even when no chunk named the model: from its first
        chunk then, or all null when it had none."""
        return self._meta(self._first_chunk or {}) if self.model is None else b""

    def end(self) -> bytes:
        """The closing output once the upstream body ended; raises if it ended too soon."""
        self._check_complete()
        if not self.sse:
            return b""
        meta = self._meta_if_none_yet()  # first: its number comes before done's
        return meta + self._frame(orjson.dumps({"finish_reason": self.finish_reason, "usage": self.usage}), b"done")

    def error(self, error: RelayError) -> bytes | None:
        """The output that tells the caller the stream failed; None means: abort the connection."""
        if not self.sse:
            return None
        meta = self._meta_if_none_yet()
        return meta + self._frame(error.to_json(), b"error")


def _content_text(content) -> str | None:
    """A delta's ``content`` as the answer's text: a string, or the text parts of a list of content
    parts, as Mistral's reasoning models send (their ``thinking`` parts are not the answer)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        return "".join(part["text"] for part in content if part.get("type") == "text" and isinstance(part.get("text"), str))
    raise _malformed("a chunk's delta.content is neither a string nor a list of content parts")


class PassthroughTranslator(_Translator):
    """Relays the upstream's events unchanged (each field line byte-identical), for /v1 callers."""

    def _done(self, event: ServerSentEvent) -> bytes:
        return b"\n".join(event.lines) + b"\n\n"

    def _named(self, event: ServerSentEvent, data) -> bytes:
        """Passed on as a chunk when its data is a JSON object, as the SDKs read every event; dropped
        when it is not, as a block without data is: they would fail on it."""
        return self._chunk(data, event) if isinstance(data, dict) else b""

    def _chunk(self, chunk: dict, event: ServerSentEvent) -> bytes:
        if self.model is None and isinstance(chunk.get("model"), str) and chunk["model"]:
            self.model = chunk["model"]
        self._note_usage(chunk)
        for choice in chunk.get("choices") or ():
            self._note_finish(choice)
            if (choice.get("delta") or {}).get("content"):
                self.token_count += 1
        return b"\n".join(event.lines) + b"\n\n"

    def end(self) -> bytes:
        self._check_complete()
        return b""

    def error(self, error: RelayError) -> bytes:
        return _sse(error.to_json())


# --- the upstream ------------------------------------------------------------------------------


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
            raise _malformed(f"expected an event stream, got {content_type or 'no content type'!r}")
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
            raise _malformed("the body is not JSON") from None
        if not isinstance(document, dict) and not (list_allowed and isinstance(document, list)):
            raise _malformed("the body is not a JSON object")  # a completion, a list of models: not `0`
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
                error = _transport_error(exc)
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


def _peek(raw_sock) -> bytes | None:
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
            return _peek(raw) is None  # closed, or holding something unasked: either way, not reusable
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
        raise _malformed("the body's gzip or deflate encoding is corrupt") from None
    except urllib3.exceptions.ProtocolError:  # the head came: a body cut short, or badly framed
        raise _malformed("the body was cut short or badly framed") from None
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise _transport_error(exc) from None
    if len(content) > limit:
        raise _malformed(f"the body is larger than {limit} bytes")
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
        return _error_object(parsed.get("error", parsed.get("detail")))
    return _error_object(parsed) if "message" in parsed else {}


def _error_object(error) -> dict:
    """An upstream's error value as an object whose ``message`` is a string (or None): a bare value
    becomes the message, and a message that is not a string is passed on as its JSON."""
    if not isinstance(error, dict):
        error = {"message": error}
    message = error.get("message")
    if message is not None and not isinstance(message, str):
        message = orjson.dumps(message).decode()
    return {**error, "message": message}


def _transport_error(exc: Exception) -> RelayError:
    if isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError, socket.timeout, _UpstreamSilent)):
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


class ChunkedDecoder(_FailsLater):
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


class _Inflater(_FailsLater):
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


# --- one stream's lifetime -----------------------------------------------------------------------


_shutdown_deadline = float("inf")


def begin_shutdown(grace_seconds: float) -> None:
    """The server is stopping: streams still open ``grace_seconds`` from now end as failures."""
    global _shutdown_deadline
    _shutdown_deadline = min(_shutdown_deadline, time.monotonic() + grace_seconds)


def wait_for_detached() -> None:
    """At worker exit: answers whose caller left get the same grace as the others, and their end recorded.

    gunicorn's worker exits once no request is open, which says nothing of these; the watch ends
    them at the shutdown deadline, and this waits for that.
    """
    readers = [stream._reader for stream in list(_watch._streams) if isinstance(stream, ResumableStream) and stream.detached]
    left = _shutdown_deadline - time.monotonic()
    gevent.joinall(readers, timeout=(max(0.0, left) if left != float("inf") else 0.0) + 2.0)


def _shutdown_begun() -> bool:
    return _shutdown_deadline != float("inf")


def shutting_down() -> bool:
    """True once this worker's shutdown deadline has passed."""
    return time.monotonic() >= _shutdown_deadline


def _shutdown_error() -> RelayError:
    return RelayError(
        503,
        "shutting_down",
        "The relay restarted before the answer was complete; ask again.",
        retry_after=1,
        outcome="timeout",
    )


class ClientGone(Exception):
    """The caller closed its connection."""


class _UpstreamSilent(Exception):
    """Raised into a reader whose upstream said nothing for longer than the read timeout."""


class _Heartbeat(Exception):
    """Raised into a caller's wait on a silent upstream: time to send its client a ping."""


class _Stop(Exception):
    """Raised into a reader to end its answer with ``error`` (the relay is shutting down)."""

    def __init__(self, error: RelayError):
        super().__init__(error.code)
        self.error = error


class _Finished:
    __slots__ = ("error", "tail")

    def __init__(self, error: RelayError | None, tail: bytes | None = None):
        self.error = error
        self.tail = tail  # the failure's frame for the caller; None: abort the connection


_GONE = object()  # queued by the watch when the caller has hung up


def client_socket_closed(sock) -> bool:
    """True when the caller's socket has been closed or reset; never blocks, never consumes data."""
    raw = getattr(sock, "_sock", sock)  # gevent's wrapper would wait on a would-block; the raw one does not
    try:
        peeked = _peek(raw)
    except OSError:
        return True
    if peeked:  # bytes sent after the request (a pipelined one) hide a close behind them from a peek
        return _peer_hung_up(raw)
    return peeked == b""


_kernel_poll = get_original("select", "poll")  # gevent's replacement has no RDHUP


def _peer_hung_up(raw_sock) -> bool:
    """Whether the peer closed its side, whatever unread bytes come before the close (Linux's RDHUP)."""
    poller = _kernel_poll()  # asked without waiting, so it never blocks the worker
    poller.register(raw_sock.fileno(), select.POLLRDHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))


class _StreamWatch:
    """One greenlet per worker keeping every open stream's clocks.

    Read timeouts, heartbeats, the check that a silent stream's caller is still there (and a
    non-streaming answer's, see ``while_caller_waits``), how long a resumable answer whose caller
    left may wait for it, and the shutdown deadline are all decided here, a few times a second, so
    that the hot path (a socket read, a queue wait) never arms a timer of its own.
    """

    def __init__(self):
        self._streams: set[RelayStream] = set()
        self._tick = CLIENT_POLL_SECONDS
        self._greenlet = None

    def add(self, stream: RelayStream, tick: float) -> None:
        self._streams.add(stream)
        self._tick = min(self._tick, tick)
        if self._greenlet is None or self._greenlet.dead:
            self._greenlet = gevent.spawn(self._run)

    def discard(self, stream: RelayStream) -> None:
        self._streams.discard(stream)

    def _run(self) -> None:
        while self._streams:
            gevent.sleep(self._tick)
            self._check_all(time.monotonic())

    def _check_all(self, now: float) -> None:
        # A frame of its own: its loop variable must not hold the last stream while the watch sleeps.
        for stream in list(self._streams):
            try:
                stream._on_tick(now)
            except Exception:
                log.exception("checking an open stream failed")


_watch = _StreamWatch()


class _InterruptibleWait:
    """A greenlet's waits on the upstream, into which the watch may raise an exception, the way
    ``gevent.Timeout`` raises into a wait: from the loop, once, and only into the wait it was meant for."""

    _caller = None  # the greenlet waiting on the upstream, while one is
    _wait_number = 0  # which wait: an interruption meant for an earlier one is dropped
    _interrupting = False

    def _wait(self, step: Callable[[], object]):
        """Run ``step``, which waits on the upstream, where the watch may interrupt it."""
        self._wait_number += 1
        self._caller = gevent.getcurrent()
        try:
            return step()
        finally:
            self._caller = None

    def _interrupt(self, exc: Exception) -> None:
        self._interrupting = True
        gevent.get_hub().loop.run_callback(self._raise_in_wait, self._wait_number, exc)

    def _raise_in_wait(self, wait_number: int, exc: Exception) -> None:
        self._interrupting = False
        caller = self._caller
        if caller is not None and wait_number == self._wait_number:  # still in the same wait
            self._caller = None  # one interruption per wait
            caller.throw(exc)


class _WatchedCall(_InterruptibleWait):
    """A call to the upstream that answers all at once, kept only while its caller is still there."""

    def __init__(self, client_gone: Callable[[], bool]):
        self._client_gone = client_gone

    def run(self, call: Callable[[], object]):
        _watch.add(self, CLIENT_POLL_SECONDS)
        try:
            return self._wait(call)
        finally:
            _watch.discard(self)

    def _on_tick(self, now: float) -> None:
        if self._caller is not None and not self._interrupting and self._client_gone():
            self._interrupt(ClientGone())


def while_caller_waits(call: Callable[[], object], client_gone: Callable[[], bool]):
    """``call()``, or ClientGone raised into it once the caller has gone away (checked twice a second).

    A non-streaming answer can take minutes to write; when nobody will read it, the upstream request
    is closed (urllib3 drops a connection an exception leaves mid-answer) so that no more is paid for.
    """
    return _WatchedCall(client_gone).run(call)


class _Answer:
    """What both kinds of stream share: the caller-facing outcome and the clocks the watch keeps."""

    def __init__(
        self,
        translator,
        *,
        read_timeout: float,
        client_gone: Callable[[], bool] = lambda: False,
        heartbeat_seconds: float | None = None,
    ):
        self.translator = translator
        self.error: RelayError | None = None
        self.outcome = "ok"
        self.first_event_at: float | None = None
        self._client_gone = client_gone
        self._heartbeat = heartbeat_seconds if translator.sse else None
        self._read_timeout = read_timeout
        self._committed = False  # the caller has its first output: heartbeats may flow
        self._done_at: float | None = None  # when [DONE] came: the body's end is awaited from then on
        # The watch first looks at this stream after the caller's next wait, when the subclass is set up.
        _watch.add(self, min(CLIENT_POLL_SECONDS, read_timeout / 2, (self._heartbeat or CLIENT_POLL_SECONDS) / 2))

    def _fail(self, error: RelayError) -> None:
        self.error = _without_traceback(error)
        self.outcome = error.outcome

    def _silence_allowed(self) -> float:
        """How long the upstream may say nothing now: after [DONE], only a moment for its body's end."""
        return DONE_LINGER_SECONDS if self.translator.done else self._read_timeout


class RelayStream(_Answer, _InterruptibleWait):
    """One relayed answer, read by the caller's own greenlet: the upstream call, then every read's output.

    ``first()`` calls the upstream and returns the output of its first event; ``rest()`` yields the
    output of each later read as it arrives, so tokens that arrived together leave together. There
    is no second greenlet and no queue: while the caller waits on the upstream, the worker's
    ``_StreamWatch`` may raise into that wait a heartbeat (the caller gets a ping and waits on), a
    hang-up, the read timeout or the shutdown deadline, the way ``gevent.Timeout`` raises into a
    wait. ``close()`` is the one cleanup: it closes the upstream response, or returns its connection
    to the pool after a clean end.
    """

    def __init__(self, open_upstream: Callable[[], requests.Response], translator, **clocks):
        super().__init__(translator, **clocks)
        self._open_upstream = open_upstream
        self._heard_at: float | None = None  # when the upstream body last sent bytes (None: no body yet)
        self._quiet_since = 0.0  # since when the caller has had nothing from us: hang-up checks and pings
        self._pings_may_interrupt = False  # a ping raised into urllib3's own reader would end the body
        self._outputs = self._produce()

    def first(self) -> bytes:
        """Call the upstream and wait for its first event; its output, or RelayError/ClientGone."""
        try:
            first = next(self._outputs)
        except RelayError as error:
            self._fail(error)
            raise
        self._committed = True
        return first

    def rest(self) -> Iterator[bytes]:
        """The output of every later read; the failure's frame last if it fails (or RelayError: abort)."""
        try:
            yield from self._outputs
        except RelayError as error:
            self._fail(error)
            tail = self.translator.error(error)
            if tail is None:
                raise
            yield tail

    def close(self) -> None:
        """Stop reading and close the upstream request; safe to call more than once."""
        _watch.discard(self)
        self._outputs.close()

    def detach(self, on_retired: Callable[[], None]) -> bool:
        """Nothing records this answer, so nothing can go on without its caller: ``close()`` it."""
        return False

    def _produce(self) -> Iterator[bytes]:
        translator = self.translator
        decoder = SSEDecoder()
        response = body = None
        self._quiet_since = time.monotonic()
        try:
            response = self._wait(self._open_upstream)  # connect and header timeouts are the adapter's
            _stop_socket_timeouts(response)  # from here on the watch enforces the read timeout
            body = UpstreamBody(response)
            self._pings_may_interrupt = body.direct
            self._heard_at = time.monotonic()
            while True:
                if self._heard_at >= _shutdown_deadline and not translator.done:  # a busy stream is never caught waiting
                    raise _Stop(_shutdown_error())
                try:
                    chunk = self._wait(body.read)
                except _Heartbeat:
                    yield PING
                    self._quiet_since = time.monotonic()
                    continue
                except ClientGone:
                    raise
                except Exception:
                    if not translator.done:
                        raise
                    chunk = None  # the body's end did not come, or came broken: the answer is whole anyway
                now = time.monotonic()
                self._heard_at = self._done_at or now  # after [DONE], bytes that are not the body's end extend nothing
                if not chunk:
                    break
                if translator.done:
                    continue  # only the body's end is awaited: the connection may then be reused
                events = decoder.feed(chunk)
                if events:
                    out, error = _translate(translator, events)
                    if translator.done:
                        self._done_at = now
                    if out is not None and (out or self.first_event_at is None):
                        if self.first_event_at is None:
                            self.first_event_at = now  # the first output commits the response, even empty
                        yield out
                        self._quiet_since = time.monotonic()
                    if error is not None:
                        raise error
                if not translator.done:
                    decoder.check()  # an over-long line after this read's events, unless they ended the answer
            if chunk is not None:
                body.finish()  # the body was read to its end: the connection can be reused
            if self.first_event_at is None:
                raise _malformed("the upstream sent no events")
            tail = translator.end()
            if tail:
                yield tail
        except ClientGone:
            self.outcome = "client_disconnect"
            raise
        except Exception as exc:
            raise _reading_error(exc, started=self.first_event_at is not None) from None
        finally:
            _watch.discard(self)
            if body is not None:
                body.close()
            if response is not None:
                response.close()

    def _on_tick(self, now: float) -> None:
        if self._caller is None or self._interrupting:
            return  # the caller is writing to its client, or an interruption is on its way
        heard_at, quiet = self._heard_at, now - self._quiet_since
        if now >= _shutdown_deadline:
            self._interrupt(_Stop(_shutdown_error()))
        elif heard_at is not None and now - heard_at >= self._silence_allowed():
            self._interrupt(_UpstreamSilent())
        elif quiet >= CLIENT_POLL_SECONDS and self._client_gone():
            self._interrupt(ClientGone())
        elif self._committed and self._heartbeat and quiet >= self._heartbeat and self._pings_may_interrupt \
                and not self.translator.done:  # the answer is whole: nothing more to keep alive
            self._interrupt(_Heartbeat())


class ResumableStream(_Answer):
    """A resumable answer: it is recorded, and may go on after its caller leaves.

    A reader greenlet makes the upstream call (retries included), reads the body as bytes arrive,
    appends every event to the answer's record and puts the output on a queue; the caller's side
    waits on that queue. The worker's ``_StreamWatch`` adds heartbeats and hang-up notices to the
    queue and stops a reader whose upstream went silent. ``close()`` stops the reader, whose
    ``finally`` closes the upstream response (or returns its connection to the pool after a clean
    end). When the caller leaves, ``detach()`` replaces ``close()``: the reader goes on recording,
    and is stopped only if no follower has read the record for ``recording.linger_seconds``.
    (``RelayStream`` is the same answer without a record, and without the second greenlet.)
    """

    def __init__(self, open_upstream: Callable[[], requests.Response], translator, *, recording, **clocks):
        super().__init__(translator, **clocks)
        self._recording = recording
        self._queue: gevent.queue.Queue = gevent.queue.Queue(QUEUE_DEPTH)
        self._finished = False
        self._ending = False  # the reader is recording and queueing the answer's end: leave it be
        self._waiting_since: float | None = None  # when the caller started waiting on the queue, if it is
        self._reading_since: float | None = None  # when the reader started waiting on the body, if it is
        self._read_number = 0  # which wait on the body: a silence notice for an earlier one is dropped
        self._detached_at: float | None = None  # when a resumable answer's caller left (wall clock)
        self._checking_followers = False
        self._on_retired: Callable[[], None] | None = None
        self.ended = False  # the reader came to the answer's end (False also when it was stopped)
        self.ended_with: RelayError | None = None  # the reader's failure, once it has ended with one
        self._reader = gevent.spawn(self._read, open_upstream)

    @property
    def detached(self) -> bool:
        return self._detached_at is not None

    # The reader greenlet.

    def _read(self, open_upstream: Callable[[], requests.Response]) -> None:
        translator = self.translator
        decoder = SSEDecoder()
        response = body = None
        try:
            response = open_upstream()  # connect and header timeouts are the adapter's
            _stop_socket_timeouts(response)  # from here on the watch enforces the read timeout
            body = UpstreamBody(response)
            read = body.read
            while True:
                self._reading_since = self._done_at or time.monotonic()  # after [DONE]: from [DONE] on
                try:
                    chunk = read()
                except Exception:
                    if not translator.done:
                        raise
                    chunk = None  # the body's end did not come, or came broken: the answer is whole anyway
                finally:
                    self._reading_since = None
                    self._read_number += 1  # a silence notice meant for this read is stale from here
                if not chunk:
                    break
                if translator.done:
                    continue  # only the body's end is awaited: the connection may then be reused
                events = decoder.feed(chunk)
                if events:
                    self._translate(events)
                    if translator.done:
                        self._done_at = time.monotonic()
                if not translator.done:
                    decoder.check()  # an over-long line after this read's events, unless they ended the answer
            if chunk is not None:
                body.finish()  # the body was read to its end: the connection can be reused
            if self.first_event_at is None:
                raise _malformed("the upstream sent no events")
            self._end(None, translator.end())
        except Exception as exc:
            self._end(_reading_error(exc, started=self.first_event_at is not None))
        finally:
            self._reading_since = None
            if body is not None:
                body.close()
            if response is not None:
                response.close()
            if self.detached:
                self._retire()

    def _translate(self, events: list[ServerSentEvent]) -> None:
        """Record and queue the output of one read's events; what came before a failing event is kept."""
        out, error = _translate(self.translator, events)
        stopped = None
        if out is not None:
            stopped = _unstoppable(self._record)
            if self.first_event_at is None:
                self.first_event_at = time.monotonic()
                stopped = _unstoppable(lambda: self._put(out)) or stopped  # even empty: it commits the response
            elif out:
                stopped = _unstoppable(lambda: self._put(out)) or stopped
        if stopped is not None and self.translator.done:
            stopped = None  # the answer is whole: a stop landing now (the shutdown deadline) is too late
        if error is not None or stopped is not None:
            raise error or stopped

    def _end(self, error: RelayError | None, tail: bytes = b"") -> None:
        """Record and queue how the answer ended: its closing output, or its failure."""
        self._ending = True
        if error is not None:
            error = _without_traceback(error)  # it waits in the queue, perhaps for a caller long gone
            tail = self.translator.error(error)
        self.ended, self.ended_with = True, error  # for a detached answer's accounting: nobody reads the queue
        _unstoppable(lambda: self._record(end=True))  # a stop landing now is too late: this is the end
        if error is None:
            if tail:
                _unstoppable(lambda: self._put(tail))
            tail = None
        _unstoppable(lambda: self._put(_Finished(error, tail)))

    def _record(self, end: bool = False) -> None:
        if self._recording is not None:
            self._recording.append(self.translator.take_frames(), end)

    def _put(self, item) -> None:
        if not self.detached:  # nobody reads the queue of a detached answer: its record is what counts
            self._queue.put(item)

    # The watch's view, a few times a second.

    def _on_tick(self, now: float) -> None:
        if now >= _shutdown_deadline:
            self._stop(_shutdown_error())
        reading_since = self._reading_since
        if reading_since is not None and now - reading_since >= self._silence_allowed() and not self._ending:
            self._reading_since = None
            gevent.get_hub().loop.run_callback(self._silence_reader, self._read_number)
        if self.detached:
            if not self._checking_followers:
                self._checking_followers = True
                gevent.spawn(self._stop_unless_followed)
            return
        waiting_since = self._waiting_since
        if waiting_since is None or not self._queue.empty():
            return
        if now - waiting_since >= CLIENT_POLL_SECONDS and self._client_gone():
            self._notify(_GONE)
        elif self._committed and self._heartbeat and now - waiting_since >= self._heartbeat and not self.translator.done:
            self._notify(PING)

    def _silence_reader(self, read_number: int) -> None:
        """End the answer of a reader whose upstream went silent, if it is still in that read: bytes
        that arrived meanwhile (the body's end after [DONE]) may have let it go on."""
        if read_number == self._read_number and not self._ending and not self._reader.dead:
            self._reader.throw(_UpstreamSilent())

    def _notify(self, item) -> None:
        self._waiting_since = None  # one notice per wait
        self._queue.put_nowait(item)

    def _stop(self, error: RelayError) -> None:
        """Make the reader end the answer with ``error`` (recorded and sent like any failure)."""
        if not self._ending and not self._reader.dead:
            self._ending = True
            self._reader.kill(_Stop(error), block=False)

    def _unreachable_once_stopped(self, seen: float | None) -> bool:
        """Whether this worker is stopping with the record (no Redis) and no resume follows it: its
        listeners are closed, so none can come, and going on would only pay for tokens."""
        return _shutdown_begun() and not self._recording.outlives_the_worker and not self._recording.is_followed(seen)

    def _stop_unless_followed(self) -> None:
        """Stop a detached answer that was cancelled, or that no follower read within the grace."""
        try:
            seen, cancelled = self._recording.status()
            quiet = time.time() - max(self._detached_at, seen or 0.0)
            if cancelled or self._unreachable_once_stopped(seen) or quiet >= self._recording.linger_seconds:
                self._reader.kill(block=True, timeout=2)
                self._recording.discard()
        finally:
            self._checking_followers = False

    # The caller's side.

    def first(self) -> bytes:
        """Wait for the upstream's first event; returns its output or raises RelayError/ClientGone."""
        item = self._next()
        self._committed = True
        if isinstance(item, _Finished):
            self._finished = True
            if item.error is not None:
                self._fail(item.error)
                raise item.error
            return b""
        return item

    def rest(self) -> Iterator[bytes]:
        """Everything after the first event, coalesced per wake-up; the failure frame if it fails."""
        queue = self._queue
        while not self._finished:
            item = self._next()
            parts = []
            while True:
                if isinstance(item, _Finished):
                    self._finished = True
                    if item.error is not None:
                        self._fail(item.error)
                        if item.tail is None:
                            if parts:
                                yield b"".join(parts)
                            raise item.error
                        parts.append(item.tail)
                    break
                parts.append(item)
                if queue.empty():
                    break
                item = queue.get_nowait()
            yield b"".join(parts)

    def _next(self):
        """The next queued item; raises ClientGone when the watch saw the caller hang up."""
        queue = self._queue
        if queue.empty():
            self._waiting_since = time.monotonic()
        item = queue.get()
        self._waiting_since = None
        if item is _GONE:
            self.outcome = "client_disconnect"
            raise ClientGone()
        return item

    def close(self) -> None:
        """Stop reading and close the upstream request; safe to call more than once."""
        _watch.discard(self)
        if not self._reader.dead:
            self._reader.kill(block=True, timeout=2)
            if self._recording is not None:
                self._recording.discard()  # cut short before anyone could resume it

    def detach(self, on_retired: Callable[[], None]) -> bool:
        """The caller of a resumable answer left: keep reading and recording it instead of closing.

        Returns False (call ``close()`` instead) when there is nothing to keep going: no record
        anyone could resume from, or a finished reader. Otherwise ``on_retired`` runs once the
        reader has stopped, however it stopped.
        """
        recording = self._recording
        if recording is None or recording.lost or self._reader.dead:
            return False
        if self._unreachable_once_stopped(recording.status()[0]):
            return False
        if self._reader.dead:  # it ended while status() waited on Redis: its end saw no detached answer
            return False
        self._on_retired = on_retired
        self._detached_at = time.time()  # wall clock, as followers' reads are (they may be on other machines)
        while not self._queue.empty():  # frees a reader waiting for room on a full queue
            self._queue.get_nowait()
        return True

    def _retire(self) -> None:
        _watch.discard(self)
        on_retired, self._on_retired = self._on_retired, None
        if on_retired is not None:
            on_retired()


def _unstoppable(step: Callable[[], None]) -> BaseException | None:
    """Run ``step`` to its end even if a stop is raised into the reader meanwhile; returns that stop.

    A stop lands at the reader's next wait, which may be a record's write or a full queue rather
    than the upstream read: the events already taken must still be recorded and queued, in order.
    """
    landed = None
    while True:
        try:
            step()
            return landed
        except (_Stop, _UpstreamSilent) as stop:
            landed = stop


def _stop_socket_timeouts(response: requests.Response) -> None:
    """Let body reads wait without a per-read timer (the stream watch owns the read timeout)."""
    connection = response.raw.connection
    sock = getattr(connection, "sock", None)
    if sock is not None:
        sock.settimeout(None)


def _stream_transport_error(exc: Exception) -> RelayError:
    error = _transport_error(exc)
    if error.status == 504:
        error.message = "The upstream went silent for longer than the read timeout."
    else:
        error.message = "The upstream connection failed mid-stream."
    return error


_TRANSPORT_ERRORS = (
    _UpstreamSilent,
    urllib3.exceptions.HTTPError,
    requests.RequestException,
    http.client.HTTPException,
    OSError,
)


def _without_traceback(error: RelayError) -> RelayError:
    """``error`` as a stream keeps it (its code goes in the access log): without the traceback and the
    exceptions it was raised from, whose frames hold the stream and its upstream response. Kept, they
    would make a reference cycle that only a full garbage collection frees."""
    error.__traceback__ = error.__context__ = error.__cause__ = None
    return error


def _reading_error(exc: Exception, *, started: bool) -> RelayError:
    """What a failure while calling or reading the upstream means for the caller."""
    if isinstance(exc, RelayError):
        return exc
    if isinstance(exc, _Stop):
        return exc.error
    if isinstance(exc, ValueError):  # an over-long line
        return _malformed(str(exc))
    if isinstance(exc, zlib.error):
        return _malformed("the body's gzip or deflate encoding is corrupt")
    if isinstance(exc, BadFraming):
        return _malformed(f"the body's chunked framing is broken ({exc})")
    if isinstance(exc, _TRANSPORT_ERRORS):
        return _stream_transport_error(exc) if started else _transport_error(exc)
    log.exception("reading the upstream failed unexpectedly", exc_info=exc)
    return RelayError(502, "internal_error", "The relay failed reading the upstream.", outcome="upstream_error")


def _translate(translator, events: list[ServerSentEvent]) -> tuple[bytes | None, RelayError | None]:
    """One read's events as output, and the failure that stopped them; what came before it is kept.

    The output is None when not one event was translated (the first one failed).
    """
    parts = []
    for event in events:
        if translator.done:
            break  # the answer is whole at [DONE]: what follows it is not part of it
        try:
            parts.append(translator.feed(event))
        except RelayError as error:
            return (b"".join(parts) if parts else None), error
    return b"".join(parts), None
