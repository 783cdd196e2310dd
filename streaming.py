"""The relay's pipeline: upstream bytes -> SSE lines -> events -> tokens -> the caller's framing.

Pieces, one job each: ``SSEDecoder`` (bytes to events, WHATWG rules, no I/O), the translators
(events to output bytes for the token endpoint or the passthrough), and one stream's lifetime under
gevent: ``RelayStream`` (read by the caller's own greenlet) or ``ResumableStream`` (a reader
greenlet that records the answer and may outlive its caller), both under one watch greenlet for
heartbeats, hang-ups, timeouts and the shutdown deadline. The HTTP side, calling the upstream and
reading its body, is ``upstream.py``'s. Nothing here imports Flask.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import select
import time
import zlib
from typing import Callable, Iterator

import gevent
import gevent.queue
import orjson
import requests
import urllib3.exceptions
from gevent.monkey import get_original

from errors import RelayError, redact
from upstream import (
    BadFraming,
    FailsLater,
    UpstreamBody,
    UpstreamSilent,
    error_object,
    malformed,
    peek_socket,
    transport_error,
)

MAX_LINE_BYTES = 1 << 20  # one SSE line longer than this is a broken upstream, not a long answer
CLIENT_POLL_SECONDS = 0.5  # how often a silent stream checks that its caller is still there
# After [DONE] the answer is whole; the body's own end may take this long before the relay ends the
# answer anyway and drops the connection (which it would otherwise have kept for the next stream).
DONE_LINGER_SECONDS = 0.5
QUEUE_DEPTH = 256  # reads buffered between upstream and a slow caller before the reader waits

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


class SSEDecoder(FailsLater):
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


class UpstreamEventError(RelayError):
    """An error the upstream reported in its event stream. ``event`` is that event when its data
    holds an ``error``, which the SDKs raise on: the passthrough relays such an event as it came."""

    event: ServerSentEvent | None = None


def _upstream_event_error(error, event: ServerSentEvent | None = None) -> UpstreamEventError:
    """An error the upstream reported in its event stream: a failed upstream, so ``upstream_error``
    (an upstream's own code is no code a caller of the token endpoint knows; the message names it)."""
    error = error_object(error)
    code = error.get("code")
    message = error["message"] or "The upstream reported an error mid-stream."
    if isinstance(code, (str, int)) and not isinstance(code, bool) and str(code):
        message = f"{message} (upstream code {code})"
    failure = UpstreamEventError(
        502,
        "upstream_error",
        "Upstream error: " + message,
        error_type=error.get("type") if isinstance(error.get("type"), str) else None,
        outcome="upstream_error",
    )
    failure.event = event
    return failure


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


def _parse_chunk(event: ServerSentEvent) -> dict:
    data = event.data
    try:
        chunk = orjson.loads(data)  # (called here, not through _json_or_none: one call less per token)
    except orjson.JSONDecodeError:
        chunk = _json_read_leniently(data)
        if chunk is None:
            raise malformed("an event's data is not JSON") from None
    if not isinstance(chunk, dict):
        raise malformed("an event's data is not a JSON object")
    if chunk.get("error"):  # servers that write every field send "error": null on good chunks
        raise _upstream_event_error(chunk["error"], event)
    return chunk


def _json_or_none(data: bytes):
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return _json_read_leniently(data)


def _json_read_leniently(data: bytes):
    """JSON orjson refused, read from UTF-8 as the WHATWG decoder reads the stream: bytes that are
    not UTF-8, and escaped lone surrogates (a string cut inside an emoji), become U+FFFD rather than
    failing the answer; None if it is not JSON even so."""
    try:
        value = json.loads(data.decode("utf-8", "replace"), parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return None
    value = _without_lone_surrogates(value)
    return value if _writable(value) else None  # (a number orjson cannot write again, too deep a value)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity: the stdlib would take them


def _without_lone_surrogates(value):
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [_without_lone_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_without_lone_surrogates(key): _without_lone_surrogates(item) for key, item in value.items()}
    return value


def _named_event_error(event: ServerSentEvent, data) -> RelayError | None:
    """The failure a named event reports: ``event: error``, or any with an ``error`` in its JSON ``data``."""
    if isinstance(data, dict) and data.get("error"):
        return _upstream_event_error(data["error"], event)
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
        self.first_token_at: float | None = None  # when the first text came, not the first event (a role)
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
            return self._chunk(_parse_chunk(event), event)
        except (AttributeError, TypeError, KeyError, IndexError):
            raise malformed("a chunk does not have the chat.completion.chunk shape") from None

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
        if not self.token_count:
            self.first_token_at = time.monotonic()
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
    raise malformed("a chunk's delta.content is neither a string nor a list of content parts")


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
                if not self.token_count:
                    self.first_token_at = time.monotonic()
                self.token_count += 1
        return b"\n".join(event.lines) + b"\n\n"

    def end(self) -> bytes:
        self._check_complete()
        return b""

    def error(self, error: RelayError) -> bytes:
        """The upstream's own error event as it came (redacted of the key), which the SDKs raise with
        the upstream's code, when its data holds an ``error`` they raise on; else the relay's own."""
        if isinstance(error, UpstreamEventError) and error.event is not None:
            lines = b"\n".join(error.event.lines).decode("utf-8", "surrogateescape")
            return redact(lines).encode("utf-8", "surrogateescape") + b"\n\n"
        return _sse(error.to_json())


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
        peeked = peek_socket(raw)
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
                raise malformed("the upstream sent no events")
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
            self._interrupt(UpstreamSilent())
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
                raise malformed("the upstream sent no events")
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
            self._reader.throw(UpstreamSilent())

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
        except (_Stop, UpstreamSilent) as stop:
            landed = stop


def _stop_socket_timeouts(response: requests.Response) -> None:
    """Let body reads wait without a per-read timer (the stream watch owns the read timeout)."""
    connection = response.raw.connection
    sock = getattr(connection, "sock", None)
    if sock is not None:
        sock.settimeout(None)


def _stream_transport_error(exc: Exception) -> RelayError:
    error = transport_error(exc)
    if error.status == 504:
        error.message = "The upstream went silent for longer than the read timeout."
    else:
        error.message = "The upstream connection failed mid-stream."
    return error


_TRANSPORT_ERRORS = (
    UpstreamSilent,
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
        return malformed(str(exc))
    if isinstance(exc, zlib.error):
        return malformed("the body's gzip or deflate encoding is corrupt")
    if isinstance(exc, BadFraming):
        return malformed(f"the body's chunked framing is broken ({exc})")
    if isinstance(exc, _TRANSPORT_ERRORS):
        return _stream_transport_error(exc) if started else transport_error(exc)
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
