"""Guarding the key, end to end: access tokens, origins, rate limits, stream caps, logs, metrics."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import redis

import errors
from conftest import UPSTREAM_KEY, Relay, free_port, probe_config
from guards import STREAM_SLOT_SECONDS, CapReached, RedisStreamSlots
from fake_upstream import sse_answer, stream_script
from test_resume_redis_failures import RedisLink

PATH = "/api/stream_chat_completion"
TOKENS = "tok-alpha-123456,tok-beta-654321"
APP_ORIGIN = "https://app.example.com"


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def quick(upstream, tokens=("ok",)) -> str:
    return upstream.script(stream_script(sse_answer(list(tokens))))


def assert_error(result, status, code):
    assert result.status == status, f"expected {status}, got {result.status}: {result.body!r}"
    assert result.json()["error"]["code"] == code


# --- callers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def locked(relay_factory):
    return relay_factory(RELAY_ACCESS_TOKENS=TOKENS, RELAY_ALLOWED_ORIGINS=APP_ORIGIN)


def test_guarded_paths_need_a_valid_bearer_token(locked, upstream):
    for headers in ({}, {"Authorization": "Basic dG9rLWFscGhhLTEyMzQ1Ng=="}):
        result = locked.stream(quick(upstream), headers=headers)
        assert_error(result, 401, "unauthorized")
        assert result.headers["www-authenticate"] == 'Bearer realm="chat-relay"'  # RFC 6750 3.1: no error code
    result = locked.stream(quick(upstream), headers=bearer("tok-wrong-000000"))
    assert_error(result, 401, "unauthorized")
    assert result.headers["www-authenticate"] == 'Bearer realm="chat-relay", error="invalid_token"'
    assert_error(locked.request("GET", "/v1/models"), 401, "unauthorized")
    assert_error(locked.post("/v1/chat/completions", {"model": "m", "messages": []}), 401, "unauthorized")


def test_a_valid_token_is_served(locked, upstream):
    for token in TOKENS.split(","):
        assert locked.stream(quick(upstream), headers=bearer(token)).text == "ok"


def test_health_metrics_page_and_static_files_stay_open(locked):
    for path in ("/healthz", "/metrics", "/", "/static/relay-client.js"):
        assert locked.request("GET", path).status == 200, path


def test_an_unauthenticated_caller_never_reaches_the_upstream(locked, upstream):
    model = quick(upstream)
    locked.stream(model)
    assert upstream.seen(model) == []


# --- origins -------------------------------------------------------------------------------


def test_cors_preflight_allows_the_configured_origin_and_the_sdk_headers(locked):
    result = locked.request("OPTIONS", "/v1/chat/completions", headers={
        "Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os, x-stainless-retry-count",
    })  # fmt: skip
    assert result.status == 200, result.body
    assert result.headers["access-control-allow-origin"] == APP_ORIGIN
    allowed = result.headers["access-control-allow-headers"].lower()
    assert "x-stainless-os" in allowed and "authorization" in allowed
    assert "origin" in result.headers.get("vary", "").lower()


def test_an_allowed_origin_may_import_the_client_module_from_the_relay(locked):
    """A module script from another origin needs CORS, or the browser refuses to run it."""
    result = locked.request("GET", "/static/relay-client.js", headers={"Origin": APP_ORIGIN})
    assert result.status == 200 and result.headers["access-control-allow-origin"] == APP_ORIGIN
    foreign = locked.request("GET", "/static/relay-client.js", headers={"Origin": "https://evil.example"})
    assert foreign.status == 200 and "access-control-allow-origin" not in foreign.headers
    plain = locked.request("GET", "/static/relay-client.js")
    assert "origin" in plain.headers.get("vary", "").lower(), "a shared cache would serve this copy to every origin"


def test_an_allowed_origin_is_echoed_and_can_read_the_request_id_and_retry_after(locked, upstream):
    result = locked.stream(quick(upstream), headers={"Origin": APP_ORIGIN, **bearer("tok-alpha-123456")})
    assert result.status == 200
    assert result.headers["access-control-allow-origin"] == APP_ORIGIN
    exposed = result.headers["access-control-expose-headers"].lower()
    assert "x-request-id" in exposed and "retry-after" in exposed, "a 429's wait must be readable by the app"
    assert "origin" in result.headers["vary"].lower()


def test_a_foreign_origin_is_403_before_any_upstream_call(locked, upstream):
    model = quick(upstream)
    result = locked.stream(model, headers={"Origin": "https://evil.example", **bearer("tok-alpha-123456")})
    assert_error(result, 403, "origin_not_allowed")
    assert "access-control-allow-origin" not in result.headers
    assert upstream.seen(model) == []


def test_the_relays_own_origin_is_always_allowed(relay, upstream):
    assert relay.stream(quick(upstream), headers={"Origin": relay.url}).status == 200
    assert_error(relay.stream(quick(upstream), headers={"Origin": "http://elsewhere.example"}), 403, "origin_not_allowed")


def test_a_wildcard_allows_any_origin(relay_factory, upstream):
    relay = relay_factory(RELAY_ALLOWED_ORIGINS="*")
    result = relay.stream(quick(upstream), headers={"Origin": "https://anywhere.example"})
    assert result.status == 200 and result.headers["access-control-allow-origin"] in ("*", "https://anywhere.example")


# --- rate limits and stream caps -----------------------------------------------------------------


def test_the_rate_limit_is_per_caller_with_retry_after(relay_factory, upstream):
    relay = relay_factory(RELAY_RATE_LIMIT="3/minute", RELAY_ACCESS_TOKENS=TOKENS)
    alpha, beta = bearer("tok-alpha-123456"), bearer("tok-beta-654321")
    assert [relay.stream(quick(upstream), headers=alpha).status for _ in range(3)] == [200, 200, 200]
    result = relay.stream(quick(upstream), headers=alpha)
    assert_error(result, 429, "rate_limited")
    assert 1 <= int(result.headers["retry-after"]) <= 60
    assert relay.stream(quick(upstream), headers=beta).status == 200, "another caller has its own budget"


def test_the_rate_limit_is_one_budget_over_every_guarded_endpoint(relay_factory, upstream):
    """Per caller, not per route: else each paid endpoint would give the caller the whole budget again."""
    model = upstream.script(stream_script(sse_answer(["ok"])), name="rate-every-endpoint")  # reusable: a script per name
    relay = relay_factory(RELAY_RATE_LIMIT="3/minute", RELAY_ACCESS_TOKENS="tok-every-endpoint", RELAY_MODELS=model)
    token = bearer("tok-every-endpoint")
    question = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    assert relay.request("GET", "/v1/models", headers=token).status == 200
    assert relay.post("/v1/chat/completions", {**question, "stream": True}, token).status == 200
    assert relay.post(PATH, question, token).status == 200
    assert_error(relay.request("GET", "/v1/models", headers=token), 429, "rate_limited")
    assert_error(relay.post("/v1/chat/completions", {**question, "stream": True}, token), 429, "rate_limited")
    assert_error(relay.post(PATH, question, token), 429, "rate_limited")


@pytest.mark.parametrize("setting", ["RELAY_RATE_LIMIT=100/minute", "RELAY_RESUME_SECONDS=30"])
def test_shared_state_without_redis_runs_one_worker_so_it_stays_exact(relay_factory, setting):
    name, _, value = setting.partition("=")
    relay = relay_factory(workers=2, **{name: value})
    children = Path(f"/proc/{relay.proc.pid}/task/{relay.proc.pid}/children").read_text().split()
    assert len(children) == 1
    assert f"{name} without REDIS_URL live in one process: running 1 worker instead of 2" in relay.log()


def worker_pids(relay) -> list[str]:
    return Path(f"/proc/{relay.proc.pid}/task/{relay.proc.pid}/children").read_text().split()


def test_shared_state_without_redis_stays_in_one_worker_however_more_are_asked_for(relay_factory):
    """gunicorn's own `-w` (here through GUNICORN_CMD_ARGS) and a TTIN signal would multiply the limit."""
    relay = relay_factory(fresh=True, RELAY_RATE_LIMIT="100/minute", GUNICORN_CMD_ARGS="--workers 3")
    try:
        assert len(worker_pids(relay)) == 1
        assert "RELAY_RATE_LIMIT without REDIS_URL live in one process: running 1 worker instead of 3" in relay.log()
        first = worker_pids(relay)
        os.kill(relay.proc.pid, signal.SIGTTIN)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and "instead of 2" not in relay.log():
            time.sleep(0.05)
        assert "RELAY_RATE_LIMIT without REDIS_URL live in one process: running 1 worker instead of 2" in relay.log()
        time.sleep(0.5)  # gunicorn's next round of managing workers would have started a second by now
        assert worker_pids(relay) == first
    finally:
        relay.stop()


def test_two_relays_sharing_redis_enforce_one_rate_limit(relay_factory, upstream, redis_url):
    settings = {"RELAY_RATE_LIMIT": "4/minute", "REDIS_URL": redis_url, "RELAY_ACCESS_TOKENS": "tok-shared-rate-1"}
    first, second = relay_factory(workers=2, **settings), relay_factory(workers=2, fresh=True, **settings)
    try:
        token = bearer("tok-shared-rate-1")
        statuses = [relay.stream(quick(upstream), headers=token).status for relay in (first, second, first, second, first, second)]
        assert statuses == [200, 200, 200, 200, 429, 429]
    finally:
        second.stop()


def hold_stream(relay, upstream, headers, seconds=3.0):
    """Start a stream that stays open for ``seconds``; returns the thread reading it."""
    model = upstream.script(stream_script(sse_answer(["x"]), first_delay=0.05, delay=seconds / 4))
    results = []
    thread = threading.Thread(target=lambda: results.append(relay.stream(model, headers=headers)))
    thread.start()
    upstream.wait_seen(model)
    time.sleep(0.1)
    return thread, results


def test_open_streams_per_caller_are_capped(relay_factory, upstream):
    relay = relay_factory(RELAY_MAX_STREAMS_PER_CALLER="2")
    held = [hold_stream(relay, upstream, {}) for _ in range(2)]
    result = relay.stream(quick(upstream))
    assert_error(result, 429, "too_many_streams")
    assert int(result.headers["retry-after"]) >= 1
    for thread, results in held:
        thread.join(10)
        assert results[0].text == "x"
    assert relay.stream(quick(upstream)).status == 200, "finished streams give their slots back"


def test_the_stream_cap_is_shared_through_redis(relay_factory, upstream, redis_url):
    settings = {"RELAY_MAX_STREAMS_PER_CALLER": "2", "REDIS_URL": redis_url, "RELAY_ACCESS_TOKENS": "tok-shared-cap-1"}
    first, second = relay_factory(workers=2, **settings), relay_factory(workers=2, fresh=True, **settings)
    try:
        token = bearer("tok-shared-cap-1")
        held = [hold_stream(first, upstream, token), hold_stream(second, upstream, token)]
        assert_error(first.stream(quick(upstream), headers=token), 429, "too_many_streams")
        assert_error(second.stream(quick(upstream), headers=token), 429, "too_many_streams")
        for thread, _ in held:
            thread.join(10)
        assert second.stream(quick(upstream), headers=token).status == 200
    finally:
        second.stop()


def test_a_caller_that_stops_an_answer_and_asks_again_at_once_gets_a_slot(relay_factory, upstream):
    """A "regenerate" button: the relay sees the stop within half a second, not when the caller hangs up."""
    relay = relay_factory(RELAY_MAX_STREAMS_PER_CALLER="1")
    model = upstream.script(stream_script(sse_answer(["a", "b", "c"]), delay=5))
    sock = socket.create_connection(("127.0.0.1", relay.port))
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    sock.sendall(b"POST /api/stream_chat_completion HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
    upstream.wait_seen(model)
    sock.close()
    assert relay.stream(quick(upstream)).status == 200


def test_a_caller_that_leaves_while_waiting_at_its_cap_never_reaches_the_upstream(relay_factory, upstream):
    """A slot freed after the waiting caller hung up would otherwise buy an answer nobody reads."""
    relay = relay_factory(RELAY_MAX_STREAMS_PER_CALLER="1", fresh=True)  # its log holds this test's lines only
    thread, _ = hold_stream(relay, upstream, {}, seconds=0.8)  # frees its slot inside the waiter's wait
    waiter = quick(upstream)
    body = json.dumps({"model": waiter, "messages": [{"role": "user", "content": "hi"}]}).encode()
    sock = socket.create_connection(("127.0.0.1", relay.port))
    sock.sendall(b"POST /api/stream_chat_completion HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
    time.sleep(0.15)
    sock.close()
    thread.join(10)
    [line] = relay.wait_access_line("/api/stream_chat_completion", outcome="client_disconnect", timeout=3)
    assert line["status"] == 499
    time.sleep(1.2)  # past the end of the cap wait
    assert upstream.seen(waiter) == []


def test_an_unreachable_redis_leaves_streams_uncapped_rather_than_refused(relay_factory, upstream):
    """A Redis outage must not turn every stream into the caller's 429, on every relay at once."""
    relay = relay_factory(RELAY_MAX_STREAMS_PER_CALLER="1", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    held = hold_stream(relay, upstream, {})
    assert relay.stream(quick(upstream)).status == 200
    held[0].join(10)
    assert held[1][0].text == "x"
    assert "Redis unavailable: stream cap not enforced" in relay.log()


def test_an_unreachable_redis_leaves_rate_limits_unenforced_with_one_log_line_per_request(relay_factory, upstream):
    relay = relay_factory(RELAY_RATE_LIMIT="1/minute", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    for _ in range(3):
        assert relay.stream(quick(upstream)).status == 200
    log = relay.log()
    assert log.count("Redis unavailable: rate limit not enforced for this request (ConnectionError") >= 3
    assert "Traceback" not in log


def test_stream_slots_renew_their_sets_expiry_so_long_streams_stay_counted(redis_url):
    client = redis.Redis.from_url(redis_url)
    slots = RedisStreamSlots(redis_url)
    caller = f"renew-{time.monotonic_ns()}"
    slots.acquire(caller, 2)
    key = f"chat-relay:streams:{caller}"
    client.expire(key, 1)  # as it would stand two minutes after the last slot was granted
    slots.renew()
    assert client.ttl(key) > STREAM_SLOT_SECONDS, "the set would vanish, taking the open streams' claims with it"
    slots.acquire(caller, 2)
    with pytest.raises(CapReached):
        slots.acquire(caller, 2)


def test_claims_that_a_redis_restarted_empty_lost_are_made_again(redis_url):
    client = redis.Redis.from_url(redis_url)
    slots = RedisStreamSlots(redis_url)
    caller = f"restart-{time.monotonic_ns()}"
    slots.acquire(caller, 2)
    slots.acquire(caller, 2)
    client.delete(f"chat-relay:streams:{caller}")  # as a Redis that restarted without its data
    slots.renew()
    with pytest.raises(CapReached):
        slots.acquire(caller, 2)


def test_a_redis_that_hangs_holds_a_rate_limited_request_about_a_second(relay_factory, upstream, redis_url):
    """Not redis-py's default of 5 s: the limit goes unenforced while it hangs, the request is served."""
    link = RedisLink(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    relay = relay_factory(fresh=True, RELAY_RATE_LIMIT="100/minute", REDIS_URL=f"redis://127.0.0.1:{link.port}/0")
    try:
        model = upstream.script(stream_script(sse_answer(["ok"])), name="rate-hung-redis")
        assert relay.stream(model).text == "ok"
        link.silence()
        started = time.monotonic()
        assert relay.stream(model).text == "ok"
        assert time.monotonic() - started < 2.5, "the limiter waited on a silent Redis for longer than its 1 s"
    finally:
        relay.stop()
        link.close()


def test_a_slot_granted_while_redis_was_unreachable_counts_once_redis_is_back(redis_url):
    link = RedisLink(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    try:
        slots = RedisStreamSlots(f"redis://127.0.0.1:{link.port}/0")
        caller = f"outage-{time.monotonic_ns()}"
        link.cut()
        slot = slots.acquire(caller, 1)  # not enforced: granted unclaimed
        link.restore()
        slots.renew()
        with pytest.raises(CapReached):
            slots.acquire(caller, 1)
        slots.release(slot)
        slots.acquire(caller, 1)
    finally:
        link.close()


def test_a_slot_granted_while_redis_was_unreachable_is_released_without_asking_redis(redis_url, caplog):
    """It is in no Redis set to remove it from, and a Redis that hangs would hold the stream's end."""
    link = RedisLink(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    try:
        slots = RedisStreamSlots(f"redis://127.0.0.1:{link.port}/0")
        link.cut()
        slot = slots.acquire(f"outage-{time.monotonic_ns()}", 1)
        caplog.clear()
        slots.release(slot)
        assert "expire instead of being released" not in caplog.text
    finally:
        link.close()


class _ClientWhoseNextPipelineWaits:
    """The stream slots' own Redis client, but its next pipeline runs ``meanwhile`` just before it
    sends its first batch: what another greenlet does while a renewal waits on Redis, in the order
    that matters (a stream's end reaches Redis before the renewal's ZADDs)."""

    def __init__(self, client: redis.Redis, meanwhile):
        self._client, self._meanwhile = client, meanwhile

    def pipeline(self, *args, **kwargs):
        pipe = self._client.pipeline(*args, **kwargs)
        send, meanwhile, self._meanwhile = pipe.execute, self._meanwhile, None
        if meanwhile is not None:

            def execute(*args, **kwargs):
                pipe.execute = send  # once: the later batches of the same pipeline go as they are
                meanwhile()
                return send(*args, **kwargs)

            pipe.execute = execute
        return pipe

    def __getattr__(self, name):
        return getattr(self._client, name)


@pytest.mark.parametrize("granted", ["claimed", "unclaimed"])
def test_a_slot_released_while_a_renewal_is_on_its_way_is_not_claimed_again_by_that_renewal(redis_url, granted):
    """The renewal re-adds every claim it saw held, as one Redis lost. A stream that ends meanwhile
    has its ZREM (or, granted while Redis was unreachable, nothing) reach Redis first: the renewal's
    ZADD would bring its claim back, counted against its caller for a minute after the stream ended."""
    link = RedisLink(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    try:
        client = redis.Redis.from_url(redis_url)
        slots = RedisStreamSlots(f"redis://127.0.0.1:{link.port}/0")
        caller = f"renewal-race-{granted}-{time.monotonic_ns()}"
        key = f"chat-relay:streams:{caller}"
        kept = slots.acquire(caller, 2)
        if granted == "unclaimed":
            link.cut()
        ending = slots.acquire(caller, 2)
        link.restore()
        assert (client.zscore(key, ending) is None) == (granted == "unclaimed")
        client.persist(key)  # so that the set's expiry, once back, shows the renewal reached Redis
        slots._redis = _ClientWhoseNextPipelineWaits(slots._redis, lambda: slots.release(ending))
        slots.renew()
        assert client.ttl(key) > STREAM_SLOT_SECONDS, "the renewal did not reach Redis: nothing was tested"
        assert client.zscore(key, kept) is not None, "the open stream's claim must stay"
        assert client.zscore(key, ending) is None, "the renewal claimed a stream that had ended"
        slots.acquire(caller, 2)  # the ended stream's slot is free
        with pytest.raises(CapReached):
            slots.acquire(caller, 2)
    finally:
        link.close()


def burst(relay, model: str, count: int, token: str) -> list[int]:
    """``count`` requests sent at once on their own connections, all held open until each has its status."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = (b"POST /api/stream_chat_completion HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
               b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s") % (token.encode(), len(body), body)  # fmt: skip
    socks = [socket.create_connection(("127.0.0.1", relay.port), timeout=15) for _ in range(count)]
    try:
        for sock in socks:
            sock.sendall(request)
        return [int(sock.recv(64).split(b" ", 2)[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("limit", ["cap", "rate"])
def test_a_burst_of_more_requests_than_a_redis_pool_once_held_is_still_limited(relay_factory, upstream, redis_url, limit):
    """redis-py's pools hold 100 connections unless told otherwise; the 101st request at once was
    refused a connection, which read as Redis down, so the burst went through unlimited."""
    token = f"tok-burst-{limit}-0123456789"
    setting = {"cap": {"RELAY_MAX_STREAMS_PER_CALLER": "3"}, "rate": {"RELAY_RATE_LIMIT": "20/minute"}}[limit]
    relay = relay_factory(workers=1, fresh=True, REDIS_URL=redis_url, RELAY_ACCESS_TOKENS=token, **setting)
    try:
        model = upstream.script(stream_script(sse_answer(["x"]), delay=1.5))  # each answer holds its slot ~4.5 s
        statuses = burst(relay, model, 200, token)
        admitted = {"cap": 3, "rate": 20}[limit]
        assert statuses.count(200) == admitted and statuses.count(429) == 200 - admitted, sorted(set(statuses))
        assert "Redis unavailable" not in relay.log()
    finally:
        relay.stop()


def test_allowed_origins_match_as_browsers_send_them(relay_factory, upstream):
    relay = relay_factory(RELAY_ALLOWED_ORIGINS="https://App.Example.com:443/,http://localhost:5173,http://[::1]:5173")
    # (no browser writes a default port, but the origin check lets one through: CORS must agree)
    for origin in ("https://app.example.com", "http://localhost:5173", "http://[::1]:5173", "https://app.example.com:443"):
        result = relay.stream(quick(upstream), headers={"Origin": origin})
        assert result.status == 200, (origin, result.body)
        assert result.headers.get("access-control-allow-origin") == origin, "the browser would drop the answer"
        preflight = relay.request("OPTIONS", PATH, headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
        assert preflight.headers.get("access-control-allow-origin") == origin
    for origin in ("https://app.example.com:8443", "http://[", "null", "http://1:5173"):  # [::1] is no regex class
        assert_error(relay.stream(quick(upstream), headers={"Origin": origin}), 403, "origin_not_allowed")
        preflight = relay.request("OPTIONS", PATH, headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in preflight.headers, origin


def test_an_allowed_origin_with_a_port_of_its_own_matches_only_that_port_and_a_default_port_only_its_scheme(relay_factory, upstream):
    """A port is part of the origin: a dev server on :8080 is not the site on :80, whoever runs it.
    Only a scheme's own default port may be written or left out (a browser leaves it out), and
    both checks (the relay's 403 and the CORS headers) must say the same."""
    relay = relay_factory(RELAY_ALLOWED_ORIGINS="http://app.example.com:8080,https://secure.example.com")
    for origin in ("http://app.example.com:8080", "https://secure.example.com", "https://secure.example.com:443"):
        result = relay.stream(quick(upstream), headers={"Origin": origin})
        assert result.status == 200, (origin, result.body)
        assert result.headers.get("access-control-allow-origin") == origin, origin
        preflight = relay.request("OPTIONS", PATH, headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
        assert preflight.headers.get("access-control-allow-origin") == origin, origin
    refused = (
        "http://app.example.com", "http://app.example.com:80", "http://app.example.com:8081", "http://app.example.com:808",
        "https://app.example.com:8080", "http://app.example.com:80800", "http://app.example.com:8080:80",
        "https://secure.example.com:80", "https://secure.example.com:8443", "http://secure.example.com",
        "http://secure.example.com:443",
    )  # fmt: skip
    for origin in refused:
        assert_error(relay.stream(quick(upstream), headers={"Origin": origin}), 403, "origin_not_allowed")
        preflight = relay.request("OPTIONS", PATH, headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in preflight.headers, origin


# --- logs and secrets ----------------------------------------------------------------------------


def test_the_redacting_log_filter_leaves_a_bad_format_call_to_the_handler_to_report():
    """A filter runs outside the handler's own guard: raising there would break the code that logged."""
    import io
    import logging

    from errors import RedactingFilter, register_secret

    register_secret("sk-filter-SECRET-0123456789")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test.redacting_filter")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("%s %s", 1)  # one argument short: logging prints its own error, and goes on
        logger.warning("echoed: %s", "sk-filter-SECRET-0123456789")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "echoed: [redacted]\n"


def test_the_redacting_log_filter_keeps_gunicorns_tracebacks_redacted_and_drops_a_librarys_however_formatted():
    """gunicorn's error log holds the traceback of a request that failed outside the app's handlers:
    the relay's own code, worth keeping, but its exception may quote the key. A library's traceback
    is dropped, also when another handler's formatter wrote it on the record first."""
    import io
    import logging

    from errors import RedactingFilter, register_secret

    secret = "sk-filter-SECRET-9876543210"
    register_secret(secret)

    def log_failure(name: str, earlier_handler: bool) -> str:
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.addFilter(RedactingFilter())
        logger = logging.getLogger(name)
        logger.propagate = False
        handlers = [logging.StreamHandler(io.StringIO())] if earlier_handler else []
        for each in [*handlers, handler]:
            logger.addHandler(each)
        try:
            try:
                raise ValueError(f"Invalid header value 'Bearer {secret}'")
            except ValueError:
                logger.exception("Error handling request", stack_info=True)
        finally:
            for each in [*handlers, handler]:
                logger.removeHandler(each)
        return stream.getvalue()

    for earlier in (False, True):
        kept = log_failure("gunicorn.error", earlier)
        assert "Traceback" in kept and "ValueError: Invalid header value 'Bearer [redacted]'" in kept, kept
        assert "Stack (most recent call last)" in kept and secret not in kept, kept
        dropped = log_failure("urllib3.connectionpool", earlier)
        assert dropped.startswith("Error handling request") and "Traceback" not in dropped and secret not in dropped, dropped


def test_a_traceback_in_gunicorns_error_log_is_kept_with_the_key_redacted(tmp_path, upstream):
    """A request that fails outside the app's error handlers is logged by gunicorn, traceback and
    all, through its own handlers: the probe wraps the real config and logs such a failure, whose
    exception quotes the key, from a worker once the app is loaded."""
    config = probe_config(
        tmp_path,
        "_tuned = post_worker_init\n"
        "def post_worker_init(worker):\n"
        "    _tuned(worker)\n"
        "    try:\n"
        f"        raise ValueError('Invalid header value ' + repr('Bearer {UPSTREAM_KEY}'))\n"
        "    except ValueError:\n"
        "        worker.log.exception('Error handling request')\n",
    )
    relay = Relay({"OPENAI_API_KEY": UPSTREAM_KEY, "OPENAI_BASE_URL": upstream.base_url}, tmp_path, config=config)
    relay.stop()
    log = relay.log()
    assert "Error handling request" in log and "Traceback" in log, log[-2000:]
    assert "ValueError: Invalid header value 'Bearer [redacted]'" in log and UPSTREAM_KEY not in log, log[-2000:]


def test_the_key_and_tokens_appear_in_no_response_and_no_log(relay_factory, upstream):
    relay = relay_factory(fresh=True, RELAY_ACCESS_TOKENS=TOKENS, RELAY_RETRIES="1", LOG_LEVEL="DEBUG")
    try:
        token = bearer("tok-alpha-123456")
        echo_key = {"error": {"message": f"Incorrect API key provided: {UPSTREAM_KEY}", "code": "invalid_api_key"}}
        scripts = [
            stream_script(sse_answer(["fine"])),
            lambda conn: conn.json_response(401, echo_key),
            lambda conn: conn.json_response(400, {"error": {"message": f"key {UPSTREAM_KEY} bad"}}),
            # parts of it: without its prefix, broken over two lines, upper-cased
            lambda conn: conn.json_response(400, {"error": {"message": f"key ...{UPSTREAM_KEY[13:]} is not allowed"}}),
            lambda conn: conn.json_response(404, {"error": {"message": f"key={UPSTREAM_KEY[:20]}\n{UPSTREAM_KEY[20:]}"}}),
            stream_script([sse_answer(["a"])[0], f'data: {{"error": {{"message": "{UPSTREAM_KEY[-20:].upper()}"}}}}\n\n'.encode()]),
            lambda conn: conn.json_response(500, echo_key),
            stream_script([sse_answer(["a"])[0], f'data: {{"error": {{"message": "{UPSTREAM_KEY}"}}}}\n\n'.encode()]),
            stream_script(sse_answer(["cut"], done=False)[:2]),
            lambda conn: conn.send_raw(  # a header line without a colon, which urllib3 logs as it came
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nBad Header " + UPSTREAM_KEY.encode()
                + b"\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
        ]
        bodies = []
        for script in scripts:
            model = upstream.script(script)
            for sse in (False, True):
                headers = {**token, **({"Accept": "text/event-stream"} if sse else {})}
                result = relay.stream(model, headers=headers)
                bodies.append(result.body + repr(result.headers).encode())
            passthrough = relay.post("/v1/chat/completions", {"model": model, "messages": [], "stream": True}, token)
            bodies.append(passthrough.body + repr(passthrough.headers).encode())
        bodies.append(relay.stream("m", headers=bearer("tok-wrong-000000")).body)
        bodies.append(relay.request("GET", "/metrics").body)
        relay.stop()
        log = relay.log()
        fragments = (UPSTREAM_KEY[-16:], UPSTREAM_KEY[13:29], UPSTREAM_KEY[4:20], UPSTREAM_KEY[-16:].upper())
        secrets = (UPSTREAM_KEY, *fragments, "tok-alpha-123456", "tok-wrong-000000")
        for secret in secrets:
            assert not any(secret.encode() in body for body in bodies), f"{secret!r} leaked into a response"
            assert secret not in log, f"{secret!r} leaked into the log"
        assert log.count('"path":"/api/stream_chat_completion"') >= 12, "every request should have its log line"
        callers = {line["caller"] for line in relay.access_lines() if line["path"] == PATH}
        assert any(re.fullmatch(r"token:[0-9a-f]{16}", caller) for caller in callers), callers
    finally:
        relay.stop()


# --- metrics -----------------------------------------------------------------------------------


def metric(text: str, name: str, **labels) -> float:
    """The sum of a metric's samples matching ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_resumable_answer_whose_caller_left_counts_as_active_until_it_ends(relay_factory, upstream):
    """It still reads, and pays for, the upstream's answer."""
    relay = relay_factory(RELAY_RESUME_SECONDS="30")
    model = upstream.script(stream_script(sse_answer(list("abcdef")), delay=0.5))
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    sock.sendall(b"POST /api/stream_chat_completion HTTP/1.1\r\nHost: relay\r\nAccept: text/event-stream\r\n"
                 b"X-Relay-Resumable: 1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))  # fmt: skip
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    sock.close()
    [line] = relay.wait_access_line(PATH, model=model)  # written once the relay has let the caller go
    assert line["outcome"] == "client_disconnect"
    assert metric(relay.request("GET", "/metrics").text, "relay_active_streams") == 1
    upstream.wait_seen(model)[0].finished.wait(10)
    deadline = time.monotonic() + 3
    while metric(relay.request("GET", "/metrics").text, "relay_active_streams") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(relay.request("GET", "/metrics").text, "relay_active_streams") == 0


def test_an_upstreams_own_error_codes_are_no_error_codes_of_the_relay_nor_metric_kinds(relay_factory, upstream):
    """Whatever code an upstream makes up would otherwise reach callers as the relay's, and /metrics as a new series."""
    relay = relay_factory(fresh=True, RELAY_RETRIES="0")
    try:
        made_up = {"message": "boom", "type": "server_error", "code": "oops"}
        first = upstream.script(stream_script([b"data: " + json.dumps({"error": made_up}).encode() + b"\n\n"]))
        result = relay.stream(first)
        assert result.status == 502 and result.json()["error"]["code"] == "upstream_error", result.body
        assert "boom" in result.json()["error"]["message"] and "oops" in result.json()["error"]["message"]
        mid = upstream.script(stream_script([sse_answer(["a"])[0], b"data: " + json.dumps({"error": made_up}).encode() + b"\n\n"]))
        last = relay.stream(mid, sse=True).body.decode().rstrip().rsplit("\n", 1)[1]
        assert json.loads(last.removeprefix("data: "))["error"]["code"] == "upstream_error", last
        for code in ("bad_param", "upstream_timeout"):  # a 4xx keeps the upstream's code, even one of the relay's
            refused = upstream.script(lambda conn, code=code: conn.json_response(400, {"error": {"message": "no", "code": code}}))
            assert relay.stream(refused).json()["error"]["code"] == code
        relay.wait_access_line(PATH, count=4, outcome="upstream_error")
        text = relay.request("GET", "/metrics").text
        assert metric(text, "relay_upstream_errors_total", kind="upstream_error") == 2
        assert metric(text, "relay_upstream_errors_total", kind="upstream_rejected") == 2
        assert metric(text, "relay_upstream_errors_total", kind="upstream_timeout") == 0
        assert 'kind="oops"' not in text and 'kind="bad_param"' not in text
    finally:
        relay.stop()


def test_a_stream_cut_by_the_relays_own_shutdown_is_no_upstream_error():
    import metrics
    from prometheus_client import REGISTRY

    def count(kind):
        return REGISTRY.get_sample_value("relay_upstream_errors_total", {"kind": kind}) or 0.0

    before = {kind: count(kind) for kind in ("shutting_down", "upstream_timeout", "upstream_rejected")}
    metrics.record_request({"endpoint": PATH, "status": 200, "outcome": "timeout", "error": "shutting_down"})
    metrics.record_detached_end(0, "timeout", "shutting_down")
    assert {kind: count(kind) for kind in before} == before


def test_metrics_add_up_across_two_workers_and_active_streams_return_to_zero(relay_factory, upstream, tmp_path):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    relay = relay_factory(workers=2, fresh=True, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir), RELAY_READ_TIMEOUT="0.5")
    try:
        for _ in range(20):
            assert relay.stream(quick(upstream, ["a", "b", "c"])).text == "abc"
        thread, _ = hold_stream(relay, upstream, {}, seconds=1.2)
        during = relay.request("GET", "/metrics").text
        # the relay's own error kinds are series from the start, so an alert on them sees 0, not "no data"
        assert 'relay_upstream_errors_total{kind="upstream_auth_failed"} 0.0' in during.splitlines()
        assert metric(during, "relay_active_streams") == 1
        thread.join(10)
        assert relay.stream(upstream.script(lambda conn: conn.sleep_unless_hangup(3))).status == 504
        deadline = time.monotonic() + 3  # a request is counted as its response closes, just after the client has it
        while True:
            text = relay.request("GET", "/metrics").text
            if metric(text, "relay_upstream_errors_total", kind="upstream_timeout") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert metric(text, "relay_requests_total", endpoint=PATH, status="200") == 21
        assert metric(text, "relay_tokens_total") == 61
        assert metric(text, "relay_time_to_first_token_seconds_count") == 21
        assert metric(text, "relay_upstream_errors_total", kind="upstream_timeout") == 1
        assert metric(text, "relay_active_streams") == 0
        assert "relay_client_disconnects_total" in text
        workers_with_counts = {path.name.split("_")[-1] for path in metrics_dir.glob("counter_*.db")}
        assert len(workers_with_counts) == 2, f"both workers should have served: {workers_with_counts}"
    finally:
        relay.stop()


@pytest.mark.parametrize("secret", ["ollama", "sk-short12345", "sk-relaytest-ANOTHERSECRET-fedcba9876543210"])
def test_redaction_finds_a_secret_of_any_length_and_its_long_runs_in_any_case(secret):
    """A self-hosted server's key may be a short word; a long key's runs of 16 characters are secret too."""
    errors.register_secret(secret)
    try:
        for text in (f"key {secret} bad", f"key {secret.upper()}!", f"[{secret[-16:]}]", f"{secret[:20]}\n{secret[20:]}"):
            assert secret[-min(16, len(secret)):].lower() not in errors.redact(text).lower(), text
        if len(secret) > 16:
            assert errors.redact(f"[{secret[-15:]}]") == f"[{secret[-15:]}]", "15 characters of a long key are no secret"
    finally:
        errors._secrets.pop(secret.lower())
