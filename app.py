"""The relay's HTTP surface: the app factory, routes, request checks and error responses.

It decides what a request may ask for and how the answer is framed; moving bytes between the
upstream and the caller is ``streaming.py``'s job. ``python app.py`` serves it for development.
"""

from __future__ import annotations

if __name__ == "__main__":  # the development server: patch before anything imports ssl or socket
    from gevent import monkey

    monkey.patch_all()

import json
import logging
import re
import secrets
import socket
import struct
import sys
import time
from functools import partial
from typing import Callable

import gevent
import orjson
from flask import Flask, Response, g, request
from flask_limiter.errors import RateLimitExceeded
from gunicorn.http.errors import ParseException
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.middleware.proxy_fix import ProxyFix

import metrics
from errors import RedactingFilter, RelayError
from guards import GUARDED_PREFIXES, RESUME_PREFIX, Guards, is_guarded
from resume import (
    STREAM_ID,
    MemoryResumeStore,
    RecordInfo,
    RedisResumeStore,
    StoreUnavailable,
    StreamRecording,
    follow,
    parse_last_event_id,
)
from settings import Settings, SettingsError, load_settings
from streaming import (
    PING,
    ClientGone,
    PassthroughTranslator,
    RelayStream,
    ResumableStream,
    TokenTranslator,
    client_socket_closed,
    is_token_count,
    shutting_down,
    sse_error_frame,
    while_caller_waits,
)
from upstream import UpstreamClient

ROLES = frozenset({"system", "developer", "user", "assistant"})
TOKEN_ENDPOINT_FIELDS = frozenset(
    {
        "model", "messages", "stream", "n",
        "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "presence_penalty",
        "frequency_penalty", "seed", "user", "logit_bias", "response_format", "reasoning_effort",
    }
)  # fmt: skip
STREAM_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
    "X-Content-Type-Options": "nosniff",
}
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}

access_log = logging.getLogger("chat_relay.access")
log = logging.getLogger("chat_relay")


def create_app(settings: Settings | None = None) -> Flask:
    """Build the relay; without ``settings`` they are read from the environment (and ``.env``)."""
    if settings is None:
        settings = load_settings()
    _configure_logging(settings.log_level)

    app = Flask(__name__, static_folder="static", static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.wsgi_app = _closing_when_marked(app.wsgi_app)
    if settings.trusted_proxies:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies, x_proto=settings.trusted_proxies)

    base_url = settings.base_url
    if settings.demo:
        from demo_upstream import start_demo_upstream

        base_url = start_demo_upstream()
        log.warning("DEMO MODE: answers come from a built-in simulated model, not from OpenAI")
    upstream = UpstreamClient(
        base_url,
        settings.api_key,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        retries=settings.retries,
        pool_size=settings.worker_connections,
        ca_bundle=settings.ca_bundle,
    )
    relay = app.extensions["relay"] = _Relay(settings, upstream)
    if settings.resume_seconds:
        live_seconds = settings.read_timeout + 10  # a record nobody appends to for longer lost its writer
        relay.resume_store = (
            RedisResumeStore(settings.redis_url, settings.resume_seconds, live_seconds, settings.worker_connections)
            if settings.redis_url
            else MemoryResumeStore(settings.resume_seconds, live_seconds)
        )
    _register(app, settings)  # first, so its checks run before the rate limiter's
    relay.guards = Guards(app, settings)
    return app


class _Relay:
    """What the routes share: settings, the upstream client, the guards and the resume store."""

    def __init__(self, settings: Settings, upstream: UpstreamClient):
        self.settings = settings
        self.upstream = upstream
        self.guards: Guards | None = None
        self.resume_store: MemoryResumeStore | RedisResumeStore | None = None


def _register(app: Flask, settings: Settings) -> None:
    relay: _Relay = app.extensions["relay"]

    @app.before_request
    def start_request_log():
        request_id = request.headers.get("X-Request-ID", "")
        g.request_id = request_id if _SANE_REQUEST_ID.match(request_id) else secrets.token_hex(16)
        g.started = time.monotonic()
        g.log = _log_fields(caller=relay.guards.caller())
        if is_guarded():
            relay.guards.check()

    @app.after_request
    def finish_request_log(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.request_id
        if request.path.startswith(GUARDED_PREFIXES) or request.path == "/static/relay-client.js":
            response.vary.add("Origin")  # the origin check, or CORS, makes the answer depend on it
        fields = g.log
        fields.update(request_id=g.request_id, method=request.method, path=request.path, status=response.status_code)
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        started = g.started
        if response.status_code >= 400 and fields["outcome"] == "ok":
            fields["outcome"] = "rejected"
        response.call_on_close(lambda: _request_finished(fields, started, endpoint))
        # A static file is handed to the server as it is, and the server closes only the file: the
        # response's close, which writes this request's log line, would never run.
        response.direct_passthrough = False
        return response

    @app.errorhandler(RelayError)
    def relay_error(error: RelayError):
        g.log["outcome"] = error.outcome
        g.log["error"] = error.code
        response = Response(error.to_json(), error.status, headers=error.headers(), content_type="application/json")
        if error.status == 408:  # the rest of its body may still come: the connection carries nothing more
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(RateLimitExceeded)
    def rate_limited(error: RateLimitExceeded):
        return relay_error(relay.guards.rate_limited(error))

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        code = _ERROR_CODES.get(error.code, "invalid_request")
        message = f"{error.name}: {error.description}" if error.code != 413 else (
            f"The request body is larger than {settings.max_body_bytes} bytes."
        )
        response = relay_error(RelayError(error.code or 500, code, message))
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            response.headers["Allow"] = ", ".join(error.valid_methods)  # a 405 must say what is allowed
        return response

    @app.errorhandler(ClientGone)
    def client_gone(_error):
        g.log["outcome"] = "client_disconnect"
        return Response(b"", 499)

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception):
        log.exception("unexpected error on %s %s", request.method, request.path)
        return relay_error(RelayError(500, "internal_error", "The relay failed unexpectedly; see its log.", outcome="upstream_error"))

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "upstream": settings.upstream_label}

    @app.get("/metrics")
    def prometheus_metrics():
        return Response(metrics.render(settings.metrics_dir), content_type=metrics.CONTENT_TYPE)

    @app.get("/")
    def index():
        return app.send_static_file("index.html")

    @app.post("/api/stream_chat_completion")
    def stream_chat_completion():
        payload = _token_request(_json_body(settings), settings)
        sse = _wants_events()
        recording = _start_recording(relay) if sse and request.headers.get("X-Relay-Resumable") == "1" else None
        translator = TokenTranslator(sse=sse, stream_id=recording.stream_id if recording else None)
        response = _relay_stream(relay, payload, translator, recording)
        response.vary.add("Accept")  # plain text or events: a cache must not hand one caller the other's
        return response

    @app.get("/api/streams/<stream_id>")
    def resume_stream(stream_id: str):
        return _follow_stream(relay, stream_id)

    @app.delete("/api/streams/<stream_id>")
    def cancel_stream(stream_id: str):
        """The caller gave up on its answer (Stop): its upstream call ends now, not after the window."""
        _owned_record(relay, stream_id)
        relay.resume_store.cancel(stream_id)
        return Response(status=204)

    @app.post("/v1/chat/completions")
    def chat_completions():
        payload = _passthrough_request(_json_body(settings), settings)
        if payload.get("stream") is True:
            return _relay_stream(relay, payload, PassthroughTranslator())
        call = partial(relay.upstream.request_json, "POST", "/chat/completions", payload)
        status, body, answer = while_caller_waits(call, _caller_gone_check())
        g.log["completion_tokens"] = _reported_completion_tokens(answer)
        return Response(body, status, content_type="application/json")

    @app.get("/v1/models")
    def models():
        if settings.models:
            data = [{"id": name, "object": "model", "created": 0, "owned_by": "chat-relay"} for name in settings.models]
            return {"object": "list", "data": data}
        status, body, document = relay.upstream.request_json("GET", "/models", list_allowed=True)
        if isinstance(document, list):  # Together AI's is the bare array: put in the shape the SDKs read
            body = orjson.dumps({"object": "list", "data": document})
        return Response(body, status, content_type="application/json")


# --- request checks -------------------------------------------------------------------------


def _json_body(settings: Settings) -> dict:
    if request.mimetype != "application/json":
        raise RelayError(415, "unsupported_media_type", "The request body must be JSON (Content-Type: application/json).")
    raw = _read_body(request.max_content_length, settings.body_timeout)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "surrogate" in str(exc):
            raw = _lone_surrogates_replaced(raw)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise RelayError(400, "invalid_json", f"The request body is not valid JSON: {exc}.") from None
    _refuse_what_orjson_cannot_carry(raw, body)
    if not isinstance(body, dict):
        raise RelayError(400, "invalid_json", "The request body must be a JSON object.")
    return body


def _read_body(limit: int, timeout: float) -> bytes:
    """The request body, or 413 when it is longer than ``limit``, whether or not it came with a length.

    werkzeug checks a Content-Length, but cuts a chunked body at the limit without a word, and a cut
    body can still be valid JSON. So a body of unknown length is read one byte past the limit here.
    """
    environ = request.environ
    try:
        with gevent.Timeout(timeout):
            if request.content_length is not None or not environ.get("wsgi.input_terminated"):
                return request.get_data(cache=False)
            raw = environ["wsgi.input"].read(limit + 1)
    except gevent.Timeout:
        # gunicorn would go on reading the rest of the body, for the connection's next request, for
        # as long as bytes trickle in: a caller would hold the connection (and its slot) for good.
        try:
            environ["gunicorn.socket"].shutdown(socket.SHUT_RD)
        except (KeyError, OSError):  # another server; or the caller has gone already
            pass
        raise RelayError(408, "request_timeout", f"The request body did not arrive within {timeout:g} s.") from None
    except (OSError, ParseException) as exc:  # gunicorn refused the chunk framing, or the caller left mid-body
        raise RelayError(400, "invalid_request", f"The request body could not be read: {exc}.") from None
    if len(raw) > limit:
        raise RelayError(413, "payload_too_large", f"The request body is larger than {limit} bytes.")
    return raw


_DIGITS_ONLY = bytes(0x30 if byte in b"0123456789" else 0x20 for byte in range(256))  # each digit "0", the rest " "
_LONG_DIGIT_RUN = b"0" * 19  # translated: 19 digits in a row, where integers leave the 64-bit range


def _refuse_what_orjson_cannot_carry(raw: bytes, body) -> None:
    """400 for JSON that orjson reads but would not pass on as it came.

    orjson reads an integer past 64 bits as a float (the upstream would get a changed number), and
    reads 1,024 levels of nesting but writes only 254 (the upstream call would fail as the relay's
    own error). Both checks are a small part of reading the body: a table lookup over its bytes and
    one write.
    """
    if _LONG_DIGIT_RUN in raw.translate(_DIGITS_ONLY):  # most likely inside a string: look closer
        try:
            json.loads(raw, parse_int=_int64, parse_constant=_not_json, parse_float=float)
        except RecursionError:
            pass  # nesting: refused below
        except ValueError as exc:
            raise RelayError(400, "invalid_json", f"The request body has {exc}.") from None
    try:
        orjson.dumps(body)
    except orjson.JSONEncodeError:
        raise RelayError(400, "invalid_json", "The request body is nested too deeply (254 levels at most).") from None


def _int64(text: str) -> int:
    number = int(text)
    if not -(2**63) <= number < 2**64:
        raise ValueError(f"an integer outside the 64-bit range ({text[:24]}...)")
    return number


# A backslash pair (skipped, so that what follows it is never read as an escape), a surrogate pair,
# or a lone half: only the lone halves are replaced.
_SURROGATE_ESCAPES = re.compile(
    rb"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}(?:\\u[dD][c-fC-F][0-9a-fA-F]{2})?|\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)
_LONE_HALF_LENGTH = len(rb"\ud83d")


def _lone_surrogates_replaced(raw: bytes) -> bytes:
    """The body with each lone surrogate escape made ``\\ufffd``.

    JavaScript strings are UTF-16: one cut inside an emoji (a message truncated by length) keeps half
    of it, and JSON.stringify writes that half as an escape such as \\ud83d. That is valid JSON, but
    no UTF-8 text, so neither orjson nor the upstream could take it as it is. Replacing the escapes
    in the bytes keeps the body orjson's to read, with every check it gets otherwise.
    """
    return _SURROGATE_ESCAPES.sub(_replaced_if_lone, raw)


def _replaced_if_lone(match: re.Match) -> bytes:
    escape = match.group()
    return b"\\ufffd" if len(escape) == _LONE_HALF_LENGTH else escape


def _not_json(name: str):
    raise ValueError(f"{name} is not JSON")  # Python's parser takes NaN and Infinity; orjson and JSON do not


def _wants_events() -> bool:
    """Whether the caller asked for the relay's events: ``text/event-stream`` with a quality above 0."""
    if "event-stream" not in request.headers.get("Accept", "").lower():
        return False  # most callers: werkzeug's full parse is a measurable share of a stream's set-up
    return any(  # a parameter (`; charset=utf-8`) stays in werkzeug's value
        kind.partition(";")[0].strip().lower() == "text/event-stream" and quality > 0
        for kind, quality in request.accept_mimetypes
    )


def _invalid(field: str, message: str, code: str = "invalid_request") -> RelayError:
    return RelayError(400, code, message, param=field)


def _check_model(body: dict, settings: Settings) -> None:
    if "model" not in body:
        if not settings.default_model:
            raise _invalid("model", "'model' is required (this relay sets no RELAY_DEFAULT_MODEL).")
        body["model"] = settings.default_model
    model = body["model"]
    if not isinstance(model, str) or not model:
        raise _invalid("model", "'model' must be a non-empty string.")
    if settings.models and model not in settings.models:
        raise RelayError(
            403, "model_not_allowed", f"Model {model!r} is not allowed here; allowed: {', '.join(settings.models)}.",
            param="model",
        )  # fmt: skip
    g.log["model"] = model


def _check_max_tokens(body: dict, settings: Settings) -> None:
    named = []
    for field in ("max_tokens", "max_completion_tokens"):
        if field not in body or body[field] is None:
            continue
        value = body[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _invalid(field, f"'{field}' must be a positive whole number.")
        if settings.max_tokens is not None and value > settings.max_tokens:
            raise _invalid(
                field, f"'{field}' is {value}; this relay allows at most {settings.max_tokens}.", "max_tokens_too_large"
            )
        named.append(value)
    if settings.max_tokens is None or (named and settings.max_tokens_field == "max_completion_tokens"):
        return  # (OpenAI reads either field; its reasoning models refuse max_tokens, which is then the caller's to send)
    # The cap alone names a limit; or the caller's goes where the upstream reads one (servers that
    # know only max_tokens ignore max_completion_tokens: the cap would not hold).
    for field in ("max_tokens", "max_completion_tokens"):
        body.pop(field, None)
    body[settings.max_tokens_field] = min(named, default=settings.max_tokens)


def _check_n(body: dict) -> None:
    if "n" in body and (type(body["n"]) is not int or body["n"] != 1):  # not true, not 1.0
        raise _invalid("n", "'n' may only be 1: the relay streams one answer.")


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "'messages' must be a non-empty list.")
    for index, message in enumerate(messages):
        field = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _invalid(field, f"'{field}' must be an object with 'role' and 'content'.")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise _invalid(f"{field}.role", f"'{field}.role' must be one of {', '.join(sorted(ROLES))}.")
        content = message.get("content")
        is_parts = isinstance(content, list) and all(isinstance(part, dict) for part in content)
        if not isinstance(content, str) and not is_parts:
            raise _invalid(f"{field}.content", f"'{field}.content' must be a string or a list of content parts.")


def _token_request(body: dict, settings: Settings) -> dict:
    """The upstream payload for a valid token-endpoint request; raises RelayError naming the field."""
    for field in body:
        if field not in TOKEN_ENDPOINT_FIELDS:
            raise _invalid(field, f"Unknown parameter '{field}'.", "unknown_parameter")
    _check_model(body, settings)
    _check_messages(body.get("messages"))
    if "stream" in body and body["stream"] is not True:
        raise _invalid("stream", "'stream' may only be true: this endpoint always streams.")
    _check_n(body)
    _check_max_tokens(body, settings)
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    return body


def _passthrough_request(body: dict, settings: Settings) -> dict:
    """The guard checks of the token endpoint; every other field passes through untouched."""
    _check_model(body, settings)
    _check_n(body)
    _check_max_tokens(body, settings)
    return body


# --- relaying a stream --------------------------------------------------------------------------


def _relay_stream(relay: _Relay, payload: dict, translator, recording: StreamRecording | None = None) -> Response:
    """Call the upstream, wait for its first event, then commit to a 200 and stream the rest."""
    settings, guards, fields, started = relay.settings, relay.guards, g.log, g.started  # (no g once streaming)
    abort_connection = _connection_aborter()
    client_gone = _caller_gone_check()
    try:
        slot = guards.acquire_stream(fields["caller"], client_gone)
    except (RelayError, ClientGone):
        if recording is not None:
            recording.discard()
        raise
    metrics.ACTIVE_STREAMS.inc()
    options = {"read_timeout": settings.read_timeout, "client_gone": client_gone, "heartbeat_seconds": settings.heartbeat_seconds}
    open_upstream = partial(relay.upstream.open_stream, "/chat/completions", payload)
    if recording is None:
        stream = RelayStream(open_upstream, translator, **options)
    else:
        stream = ResumableStream(open_upstream, translator, recording=recording, **options)
    headers = STREAM_HEADERS if recording is None else {**STREAM_HEADERS, "X-Relay-Stream-Id": recording.stream_id}

    def retire() -> None:
        metrics.ACTIVE_STREAMS.dec()  # first: releasing a slot may wait on Redis, where a kill can land
        guards.release_stream(slot)

    def retire_detached() -> None:
        """The end of an answer that went on without its caller: its request's line is long written,
        so what it did since (tokens paid for, a failure) is counted, and logged, now."""
        try:
            more = translator.completion_tokens - (fields.get("completion_tokens") or 0)
            failure = stream.ended_with
            if not stream.ended:  # stopped: cancelled, or nobody resumed it in time
                ended, code = "client_disconnect", None
            else:
                ended, code = (failure.outcome, failure.code) if failure is not None else ("ok", None)
            metrics.record_detached_end(more, ended, code)
            log.info(
                "answer %s ended after its caller left: outcome %s, error %s, completion_tokens %s",
                fields.get("stream_id"), ended, code, translator.completion_tokens,
            )  # fmt: skip
        finally:
            retire()

    def finish(outcome: str, resumable: bool = False) -> None:
        # A resumable answer whose caller left goes on (recorded): it keeps its slot, and counts as
        # open, until it ends.
        kept_going = resumable and outcome == "client_disconnect" and stream.detach(retire_detached)
        if not kept_going:
            try:
                stream.close()
            finally:
                retire()
        fields["outcome"] = outcome
        fields["completion_tokens"] = translator.completion_tokens
        first_at = translator.first_token_at or stream.first_event_at  # an answer without text: its first event
        fields["ttft_s"] = round(first_at - started, 4) if first_at else None
        if stream.error is not None:
            fields["error"] = stream.error.code
        if translator.model and not fields.get("model"):
            fields["model"] = translator.model

    try:
        first = stream.first()
    except BaseException:
        finish(stream.outcome)  # the caller never got the stream's id: nothing to resume
        raise

    def body():
        outcome = "client_disconnect"  # unless the stream runs to its end: gunicorn closed us early
        try:
            yield first
            yield from stream.rest()
            outcome = stream.outcome
        except (RelayError, ClientGone):
            outcome = stream.outcome
            abort_connection()
        finally:
            finish(outcome, resumable=True)

    return _StreamedResponse(body(), 200, headers=headers)


class _StreamedResponse(Response):
    """A streamed answer that the server iterates by its own generator.

    werkzeug hands a server every chunk through two more layers of Python (an encoding generator and
    a closing iterator): at chat pace that is per relayed token. The body's generator yields bytes
    already, so here the server gets it as it is; closing still closes the generator and runs the
    response's close callbacks (the request's log line), as werkzeug's closing iterator would.
    """

    def get_app_iter(self, environ):
        if environ["REQUEST_METHOD"] == "HEAD" or self.status_code != 200:
            return super().get_app_iter(environ)
        return _ServerIterated(self.response, self.close)


class _ServerIterated:
    """An app iterator that is its body's own iterator, with a ``close`` of its own (WSGI's)."""

    __slots__ = ("_chunks", "close")

    def __init__(self, chunks, close: Callable[[], None]):
        self._chunks = chunks
        self.close = close

    def __iter__(self):
        return iter(self._chunks)


def _closing_when_marked(wsgi_app):
    """WSGI middleware: a response marked ``Connection: close`` closes its connection under gunicorn.

    gunicorn drops an application's hop-by-hop headers and says keep-alive on its own, so it would
    announce a connection it is about to close as kept alive; its ``start_response`` belongs to
    its response, which can be told to close.
    """

    def closing_when_marked(environ, start_response):
        def start(status, headers, exc_info=None):
            if ("Connection", "close") in headers:
                force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
                if force_close is not None:
                    force_close()
            return start_response(status, headers, exc_info)

        return wsgi_app(environ, start)

    return closing_when_marked


def _caller_gone_check() -> Callable[[], bool]:
    """Whether this request's caller has closed its connection (never true under the development server)."""
    client_socket = request.environ.get("gunicorn.socket")
    if client_socket is None:
        return lambda: False
    return lambda: client_socket_closed(client_socket)


def _reported_completion_tokens(answer) -> int | None:
    """The completion tokens a non-streaming answer's usage reports, if it reports them."""
    usage = answer.get("usage") if isinstance(answer, dict) else None
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return tokens if is_token_count(tokens) else None


def _start_recording(relay: _Relay) -> StreamRecording | None:
    """A record for a resumable answer; None when the relay keeps none (or its store is down)."""
    store = relay.resume_store
    if store is None:
        return None
    stream_id = store.create(relay.guards.owner())
    if stream_id is None:
        return None
    g.log["stream_id"] = stream_id
    return StreamRecording(store, stream_id, relay.settings.resume_seconds, _follower_poll_seconds(relay.settings))


def _owned_record(relay: _Relay, stream_id: str) -> RecordInfo:
    """The caller's own resumable answer, or 404: another caller's looks exactly like an unknown one."""
    store = relay.resume_store
    not_found = RelayError(404, "stream_not_found", "No resumable answer with this id (it may have expired).")
    if store is None or not STREAM_ID.match(stream_id):
        raise not_found
    g.log["stream_id"] = stream_id
    try:
        info = store.info(stream_id)
    except StoreUnavailable:
        raise RelayError(503, "resume_unavailable", "Resumable answers are unreachable right now; try again.", retry_after=1) from None
    if info is None or (info.owner and info.owner != relay.guards.owner()):
        raise not_found
    return info


def _follow_stream(relay: _Relay, stream_id: str) -> Response:
    """Replay a resumable answer after the caller's Last-Event-ID, then follow it live to its end."""
    store, settings = relay.resume_store, relay.settings
    info = _owned_record(relay, stream_id)
    given = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    after = parse_last_event_id(given, stream_id)
    if after is None:
        raise RelayError(
            400, "invalid_last_event_id", f"Last-Event-ID must be '{stream_id}:<sequence>', as this answer's events carry.",
            param="Last-Event-ID",
        )  # fmt: skip
    if after > info.last_seq:
        raise RelayError(
            400, "invalid_last_event_id", f"This answer has no event {after} yet; its last is {info.last_seq}.",
            param="Last-Event-ID",
        )  # fmt: skip
    lost = RelayError(502, "upstream_error", "The answer's record ended before the answer did; ask again.", outcome="upstream_error")
    abort_connection = _connection_aborter()
    poll_seconds = _follower_poll_seconds(settings)
    events = follow(
        store, stream_id, after,
        poll_seconds=poll_seconds, heartbeat=settings.heartbeat_seconds, lost_frame=sse_error_frame(lost), ping=PING,
    )  # fmt: skip

    fields = g.log

    def body():
        fields["outcome"] = "client_disconnect"  # unless the replay runs to the answer's end
        last = b""
        try:
            for part in events:
                if shutting_down():  # the answer goes on elsewhere: hang up so the caller resumes there
                    abort_connection()
                    fields.update(outcome="timeout", error="shutting_down")  # as a stream cut by the stop is
                    return
                yield part
                last = part if part != PING else last
        except StoreUnavailable:  # Redis stayed unreachable from here: hang up so the caller resumes elsewhere
            abort_connection()
            fields.update(outcome="upstream_error", error="resume_unavailable")
            return
        fields["outcome"], fields["error"] = _how_the_replay_ended(last)

    return _StreamedResponse(body(), 200, headers={**STREAM_HEADERS, "X-Relay-Stream-Id": stream_id})


def _how_the_replay_ended(last: bytes) -> tuple[str, str | None]:
    """A resume's outcome and error code, from the last event it replayed: `done`, or an `error`."""
    final = last.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    if not final.startswith(b"event: error\n") and b"\nevent: error\n" not in final:
        return "ok", None
    data = next((line[6:] for line in final.split(b"\n") if line.startswith(b"data: ")), b"")
    try:
        code = orjson.loads(data)["error"]["code"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        code = None
    code = code if isinstance(code, str) else None
    return ("timeout" if code in ("upstream_timeout", "shutting_down") else "upstream_error"), code


def _follower_poll_seconds(settings: Settings) -> float:
    """How often a following resume reads (each read marks the answer as followed): often enough to
    show up before a detached answer's linger runs out, and to send its heartbeats."""
    return min(settings.heartbeat_seconds, settings.resume_seconds / 3)


def _connection_aborter() -> Callable[[], None]:
    """How to end this request's response so that the caller's reader fails instead of finishing.

    A chunked body (HTTP/1.1) ends without its final chunk. A body that is not chunked (an HTTP/1.0
    caller) has no end of its own but the connection's, so a plain close would look like the whole
    answer: the connection is reset instead, and what the caller had not yet received is lost with it.
    """
    client_socket = request.environ.get("gunicorn.socket")
    if client_socket is None:  # a WSGI server that does not say (neither gunicorn nor `python app.py`)
        return lambda: None
    chunked = request.environ.get("SERVER_PROTOCOL") != "HTTP/1.0"

    def abort_connection() -> None:
        try:
            if chunked:
                client_socket.shutdown(socket.SHUT_RDWR)
            else:  # gunicorn closes the connection after this response, with the reset SO_LINGER 0 makes
                client_socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass

    return abort_connection


# --- logging -----------------------------------------------------------------------------------


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    for handler in logging.getLogger().handlers + logging.getLogger("gunicorn.error").handlers:
        if not any(isinstance(existing, RedactingFilter) for existing in handler.filters):
            handler.addFilter(RedactingFilter())
    if not access_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(handler)
        access_log.propagate = False
        access_log.setLevel(logging.INFO)


def log_refused_before_parsing(status: int, error_code: str, client_socket) -> str:
    """Account for a request gunicorn refused before the app saw it (a bad request line, headers too
    large): its JSON log line and metrics, as for any other request. Returns its new request id."""
    try:
        caller = client_socket.getpeername()[0]
    except (OSError, IndexError, TypeError):
        caller = "unknown"
    request_id = secrets.token_hex(16)
    fields = _log_fields(
        caller=caller, outcome="rejected", error=error_code, request_id=request_id, method=None, path=None, status=status
    )
    _request_finished(fields, time.monotonic(), "unparsed")
    return request_id


def _log_fields(**known) -> dict:
    """A request's log fields, those not known yet at their empty values (the route fills them in)."""
    return {"model": None, "ttft_s": None, "completion_tokens": None, "outcome": "ok", "error": None, **known}


def _request_finished(fields: dict, started: float, endpoint: str) -> None:
    """The one place a finished request is accounted for: its JSON log line and its metrics."""
    record = {"ts": round(time.time(), 3), **fields, "duration_s": round(time.monotonic() - started, 4)}
    access_log.info(orjson.dumps(record).decode())
    # a resume replays its answer's failure, which was counted where it happened
    metrics.record_request({**record, "endpoint": endpoint}, upstream_errors=not endpoint.startswith(RESUME_PREFIX))


if __name__ == "__main__":
    from gevent.pywsgi import WSGIHandler, WSGIServer

    class _Handler(WSGIHandler):
        def get_environ(self):
            environ = super().get_environ()
            environ["gunicorn.socket"] = self.socket  # lets the relay watch the caller, as under gunicorn
            return environ

    try:
        dev_settings = load_settings()
    except SettingsError as exc:
        sys.exit(f"chat-relay: {exc}")
    server = WSGIServer(  # no access log of gevent's: the relay writes its own JSON line per request
        (dev_settings.host, dev_settings.port), create_app(dev_settings), handler_class=_Handler, log=None
    )
    print(f"chat-relay (development server) on http://{dev_settings.host}:{dev_settings.port}", file=sys.stderr)
    gevent.get_hub().NOT_ERROR += (KeyboardInterrupt,)  # Ctrl-C is how it stops: gevent need not print it
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("chat-relay: stopped", file=sys.stderr)
else:
    try:
        app = create_app()
    except SettingsError as exc:
        sys.exit(f"chat-relay: {exc}")
