"""Who may call the relay and how much: access tokens, origins, rate limits and stream caps.

Whoever reaches the relay spends its owner's money, so every check here runs before any upstream
call. Counts live in Redis when ``REDIS_URL`` is set (shared by every worker and machine), else in
process memory; gunicorn.conf.py then runs one worker so a limit means what it says.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
import uuid
from typing import Callable
from urllib.parse import urlsplit

import gevent
import redis
from flask import Flask, request
from flask_cors import CORS
from flask_limiter import Limiter
from flask_limiter.errors import RateLimitExceeded

from errors import RelayError
from settings import Settings, normalize_origin
from streaming import ClientGone

GUARDED_PREFIXES = ("/api/", "/v1/")
RESUME_PREFIX = "/api/streams/"
STREAM_SLOT_SECONDS = 60  # a stream's claim on its caller's cap expires unless refreshed (a dead worker's do)
STREAM_RETRY_AFTER = 5
# A caller at its cap waits this long for a slot before its 429: one that stopped an answer and asks
# again at once (a "regenerate" button) would otherwise be refused, since the relay sees the stop
# within about half a second (or on the Stop's DELETE), not at the instant the caller hangs up.
STREAM_CAP_WAIT_SECONDS = 1.0
STREAM_CAP_POLL_SECONDS = 0.1

log = logging.getLogger("chat_relay")


class _SwallowedErrorsInOneLine(logging.Filter):
    """flask-limiter logs every storage failure it swallows (Redis down) with a full traceback, on
    every request: ~40 lines each, burying the log. Each becomes one line, like the relay's own."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            record.msg = "Redis unavailable: rate limit not enforced for this request (%s: %s)"
            record.args = (type(error).__name__, error)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


logging.getLogger("flask-limiter").addFilter(_SwallowedErrorsInOneLine())


class Guards:
    """The checks every guarded request passes, in order: token, origin, rate limit."""

    def __init__(self, app: Flask, settings: Settings):
        self.settings = settings
        self._tokens = tuple(token.encode() for token in settings.access_tokens)
        if settings.allowed_origins:
            CORS(
                app,
                # the client module too: a page on an allowed origin may import it from the relay
                resources={r"/api/*": {}, r"/v1/*": {}, "/static/relay-client.js": {}},
                origins=[_exactly(origin) for origin in settings.allowed_origins],
                allow_headers="*",  # echoes what the preflight asks for: the npm SDK sends X-Stainless-*
                # Retry-After is not one of the headers a cross-origin page may read unasked: a 429's
                # wait would be hidden from the app that should honour it
                expose_headers=["X-Request-ID", "X-Relay-Stream-Id", "Retry-After"],
                max_age=600,
            )
        self.limiter = Limiter(
            key_func=self.caller,
            app=app,
            # one budget per caller over every endpoint (default limits would give each route its own)
            application_limits=[settings.rate_limit] if settings.rate_limit else [],
            # a resume or cancel calls no upstream: a flaky network must not spend the caller's budget
            application_limits_exempt_when=lambda: not is_guarded() or request.path.startswith(RESUME_PREFIX),
            storage_uri=_limits_storage_uri(settings.redis_url),
            # as many Redis connections as streams may check at once (redis-py's default of 100 refused
            # the 101st, which the limiter took for Redis down: a burst went unlimited); a Redis that
            # hangs holds each request a second, not redis-py's default of 5
            storage_options=(
                {"max_connections": settings.worker_connections, "socket_timeout": 1, "socket_connect_timeout": 1}
                if settings.redis_url else {}
            ),  # fmt: skip
            strategy="moving-window",
            swallow_errors=True,  # Redis down: serve unlimited rather than fail every request
            key_prefix="chat-relay",
            enabled=bool(settings.rate_limit),  # no limit set: no per-request check at all
        )
        self.stream_slots = (
            RedisStreamSlots(settings.redis_url, settings.worker_connections) if settings.redis_url else MemoryStreamSlots()
        ) if settings.max_streams_per_caller else None  # fmt: skip

    def check(self) -> None:
        """Refuse a guarded request that lacks a valid token or comes from a foreign origin."""
        if self._tokens:
            presented = bearer_token()
            if presented is None:
                raise RelayError(401, "unauthorized", "A valid 'Authorization: Bearer <token>' header is required.")
            if not self._is_known(presented):
                # RFC 6750: a token that was sent and refused is named in the challenge; a missing one is not
                raise RelayError(401, "unauthorized", "The bearer token is not valid.", bearer_error="invalid_token")
        origin = request.headers.get("Origin")
        if origin and not self._origin_allowed(origin):
            raise RelayError(403, "origin_not_allowed", f"Requests from origin {origin!r} are not allowed.")

    def _is_known(self, presented: str) -> bool:
        matches = [hmac.compare_digest(presented.encode(), known) for known in self._tokens]  # no early exit
        return any(matches)

    def _origin_allowed(self, origin: str) -> bool:
        allowed = self.settings.allowed_origins
        if "*" in allowed:
            return True
        normalized = normalize_origin(origin)
        if normalized is None:  # "null" (a sandboxed page, a file:) or not an origin at all
            return False
        return normalized in allowed or urlsplit(normalized).netloc == request.host.lower()  # the relay's own page

    def caller(self) -> str:
        """Who is calling: a hash of the access token when tokens are in use, else the client IP."""
        token = bearer_token() if self._tokens else None
        if token:
            return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]
        return request.remote_addr or "unknown"

    def owner(self) -> str:
        """Whose resumable answer this is: the access token's hash, or "" (whoever has its id) without tokens."""
        return self.caller() if self._tokens else ""

    def rate_limited(self, error: RateLimitExceeded) -> RelayError:
        current = self.limiter.current_limit
        retry_after = max(1, int(current.reset_at - time.time())) if current else 1
        return RelayError(429, "rate_limited", f"Rate limit exceeded ({error.description}).", retry_after=retry_after)

    def acquire_stream(self, caller: str, caller_gone: Callable[[], bool] = lambda: False):
        """Claim one of the caller's open-stream slots, waiting up to STREAM_CAP_WAIT_SECONDS for one
        to free up; call ``release_stream`` on what it returns. Raises the 429 when none does, and
        ClientGone when the caller leaves while it waits (a slot freed then would pay for an answer
        nobody reads)."""
        if self.stream_slots is None:
            return None
        deadline = time.monotonic() + STREAM_CAP_WAIT_SECONDS
        cap = self.settings.max_streams_per_caller
        while True:
            try:
                return self.stream_slots.acquire(caller, cap)
            except CapReached:
                if time.monotonic() >= deadline:
                    raise RelayError(
                        429,
                        "too_many_streams",
                        f"At most {cap} open stream{'s' if cap != 1 else ''} per caller.",
                        retry_after=STREAM_RETRY_AFTER,
                    ) from None
            gevent.sleep(STREAM_CAP_POLL_SECONDS)
            if caller_gone():
                raise ClientGone()

    def release_stream(self, slot) -> None:
        if slot is not None:
            self.stream_slots.release(slot)


def bearer_token() -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def is_guarded() -> bool:
    return request.path.startswith(GUARDED_PREFIXES) and request.method != "OPTIONS"


class CapReached(Exception):
    """The caller already holds as many open streams as the cap allows."""


class MemoryStreamSlots:
    """Open streams per caller, counted in this process (exact when there is one worker)."""

    def __init__(self):
        self._open: dict[str, int] = {}

    def acquire(self, caller: str, cap: int) -> str:
        """A slot to ``release`` later; raises CapReached."""
        if self._open.get(caller, 0) >= cap:
            raise CapReached
        self._open[caller] = self._open.get(caller, 0) + 1
        return caller

    def release(self, caller: str) -> None:
        left = self._open.get(caller, 0) - 1
        if left > 0:
            self._open[caller] = left
        else:
            self._open.pop(caller, None)


# Atomically: forget expired claims, then claim a slot if fewer than the cap are held.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


class RedisStreamSlots:
    """Open streams per caller, shared through Redis by every worker and machine.

    Each open stream is a member of its caller's sorted set, scored by when its claim expires; a
    greenlet renews this process's claims (and the set's own expiry), so a crashed worker's streams
    free up within a minute while a live one's hold for as long as they run. With Redis down the cap
    is not enforced, as the rate limit is not: an outage must not refuse every stream as the caller's.
    """

    def __init__(self, url: str, max_connections: int = 100):
        # as many connections as streams may claim at once: redis-py refuses the one past its pool's
        # size, which would read as Redis down and let a burst through uncapped
        self._redis = redis.Redis.from_url(
            url, socket_timeout=2, socket_connect_timeout=2, max_connections=max_connections
        )
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._held: dict[str, tuple[str, str]] = {}
        self._unclaimed: set[str] = set()  # held slots granted while Redis was unreachable, not yet in it
        self._renewer = None

    def acquire(self, caller: str, cap: int) -> str:
        """A slot to ``release`` later; raises CapReached.

        With Redis unreachable the slot is granted unclaimed, and claimed by the next renewal that
        reaches Redis, so that it counts against the caller's cap once Redis is back.
        """
        key, member, now = f"chat-relay:streams:{caller}", uuid.uuid4().hex, time.time()
        try:
            claimed = self._acquire(keys=[key], args=[now, cap, now + STREAM_SLOT_SECONDS, member, STREAM_SLOT_SECONDS * 2])
        except redis.RedisError:
            log.warning("Redis unavailable: stream cap not enforced for this request")
            self._unclaimed.add(member)
            claimed = True
        if not claimed:
            raise CapReached
        self._held[member] = (key, member)
        if self._renewer is None:
            self._renewer = gevent.spawn(self._renew_forever)
        return member

    def release(self, member: str) -> None:
        key, _ = self._held.pop(member, (None, None))
        if member in self._unclaimed:  # nothing in Redis to remove (a renewal on its way removes its own)
            self._unclaimed.discard(member)
        elif key is not None:
            try:
                self._redis.zrem(key, member)
            except redis.RedisError:
                log.warning("Redis unavailable: a stream slot will expire instead of being released")

    def _renew_forever(self) -> None:
        while True:
            gevent.sleep(STREAM_SLOT_SECONDS / 3)
            self.renew()

    def renew(self) -> None:
        """Extend this process's claims, and their sets' expiry: else a set vanishes under long streams.

        A claim Redis lacks is made again: one granted while Redis was unreachable, or lost with a
        Redis that restarted empty. (This may put a stream over its caller's cap until it ends: the
        cap counts the streams that are open, and those are.)
        """
        expires, held = time.time() + STREAM_SLOT_SECONDS, list(self._held.values())
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                for key, member in held:
                    pipe.zadd(key, {member: expires})
                    pipe.expire(key, STREAM_SLOT_SECONDS * 2)
                pipe.execute()
                self._unclaimed.difference_update(member for _, member in held)
                released = [(key, member) for key, member in held if member not in self._held]
                if released:  # released while the renewal was on its way: its claim must not come back
                    for key, member in released:
                        pipe.zrem(key, member)
                    pipe.execute()
        except redis.RedisError:
            log.warning("Redis unavailable: could not renew stream slots")


def _limits_storage_uri(redis_url: str | None) -> str:
    """Flask-Limiter's name for ``REDIS_URL``: the same, but ``redis+unix://`` for a socket path,
    which redis-py (the stream caps, resumable answers) spells ``unix://``."""
    if redis_url is None:
        return "memory://"
    return "redis+" + redis_url if redis_url.startswith("unix://") else redis_url


def _exactly(origin: str):
    """An allowed origin for flask-cors, which would read one with brackets (an IPv6 host) as a regex;
    with its scheme's default port written out or not, as the relay's own origin check matches it."""
    if origin == "*":
        return origin
    default_port = {"http": ":80", "https": ":443"}.get(origin.partition(":")[0].lower(), "")
    if urlsplit(origin).port is not None:  # a port of its own, so not the default (settings drop that)
        default_port = ""
    return re.compile(re.escape(origin) + f"(?:{re.escape(default_port)})?" + r"\Z", re.IGNORECASE)
