"""Resumable answers: numbered events, a record that outlives the caller's connection, and resuming.

Each test cuts a real connection to a real gunicorn relay part-way through an answer the socket-level
fake upstream is still pacing out, resumes it with ``GET /api/streams/<id>``, and checks the text
against what the upstream sent and that the upstream was called once. Records live in process
memory, or in a real ``redis-server`` shared by two relays.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import time

import pytest

from fake_upstream import sse_answer, stream_script

RESUMABLE = {"X-Relay-Resumable": "1", "Accept": "text/event-stream", "Content-Type": "application/json"}
TOKENS = [f"word{index} " for index in range(30)]
UPSTREAM_TEXT = "".join(TOKENS)


class Events:
    """A caller's side of one SSE response: reads events one at a time, and can hang up mid-answer."""

    def __init__(self, relay, method: str, path: str, body=None, headers=None):
        self.conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=15)
        self.conn.request(method, path, body=json.dumps(body).encode() if body is not None else None, headers=headers or {})
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.headers = {name.lower(): value for name, value in self.response.getheaders()}
        self.raw = b""
        self._pending = b""

    def next(self) -> dict | None:
        """The next event as {"id", "event", "data"}; None when the body ended."""
        while True:
            block, separator, rest = self._pending.partition(b"\n\n")
            if separator:
                self._pending = rest
                event = _parse(block)
                if event is not None:
                    return event
                continue
            piece = self.response.read1(65536)
            if not piece:
                return None
            self.raw += piece
            self._pending += piece

    def take(self, count: int) -> list[dict]:
        return [self.next() for _ in range(count)]

    def rest(self) -> list[dict]:
        events = []
        while (event := self.next()) is not None:
            events.append(event)
        return events

    def hang_up(self) -> None:
        self.conn.sock.close()
        self.conn.close()


def _parse(block: bytes) -> dict | None:
    event = {"id": None, "event": "message", "data": None}
    for line in block.decode().split("\n"):
        if not line or line.startswith(":"):
            continue
        field, _, value = line.partition(": ")
        event[field] = value
    return event if event["data"] is not None else None


def text_of(events: list[dict]) -> str:
    return "".join(json.loads(event["data"])["content"] for event in events if event["event"] == "message")


def start_answer(relay, model: str, headers=None) -> Events:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return Events(relay, "POST", "/api/stream_chat_completion", body, {**RESUMABLE, **(headers or {})})


def resume(relay, stream_id: str, last_event_id: str | None, headers=None) -> Events:
    headers = {"Accept": "text/event-stream", **(headers or {})}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    return Events(relay, "GET", f"/api/streams/{stream_id}", headers=headers)


def paced(upstream, delay=0.05, tokens=TOKENS) -> str:
    return upstream.script(stream_script(sse_answer(tokens), delay=delay))


def cut_after_tokens(relay, model: str, tokens: int, headers=None) -> tuple[str, list[dict]]:
    """Start a resumable answer, read its meta and ``tokens`` tokens, then drop the connection."""
    answer = start_answer(relay, model, headers)
    assert answer.status == 200, answer.response.read()
    seen = answer.take(1 + tokens)
    answer.hang_up()
    return answer.headers["x-relay-stream-id"], seen


def assert_numbered(stream_id: str, events: list[dict], first: int) -> None:
    assert [event["id"] for event in events] == [f"{stream_id}:{seq}" for seq in range(first, first + len(events))]


@pytest.fixture(scope="module")
def resuming_relay(relay_factory):
    return relay_factory(RELAY_RESUME_SECONDS="30")


@pytest.fixture(scope="module")
def redis_relays(relay_factory, redis_url):
    """Two relay instances (one worker each) sharing one Redis, as two VMs behind a balancer would."""
    relays = [relay_factory(fresh=True, RELAY_RESUME_SECONDS="30", REDIS_URL=redis_url) for _ in range(2)]
    yield relays
    for relay in relays:
        relay.stop()


# --- the numbered stream -----------------------------------------------------------------------------


def test_resumable_answer_numbers_every_event_and_names_its_stream(resuming_relay, upstream):
    answer = start_answer(resuming_relay, paced(upstream, delay=0, tokens=["a", "b"]))
    events = answer.rest()
    stream_id = answer.headers["x-relay-stream-id"]
    assert [event["event"] for event in events] == ["meta", "message", "message", "done"]
    assert_numbered(stream_id, events, first=1)
    assert json.loads(events[0]["data"])["stream_id"] == stream_id
    assert len(stream_id) == 22  # 128 random bits


def test_answers_are_not_resumable_unless_asked_or_in_plain_text(resuming_relay, relay, upstream):
    model = paced(upstream, delay=0, tokens=["a"])
    plain_sse = resuming_relay.stream(model, sse=True)
    assert b"id:" not in plain_sse.body and "x-relay-stream-id" not in plain_sse.headers
    text = resuming_relay.stream(model, headers={"X-Relay-Resumable": "1"})
    assert text.text == "a" and "x-relay-stream-id" not in text.headers
    off = relay.stream(model, sse=True, headers={"X-Relay-Resumable": "1"})  # RELAY_RESUME_SECONDS unset
    assert b"id:" not in off.body and "x-relay-stream-id" not in off.headers
    assert relay.request("GET", "/api/streams/" + "A" * 22).json()["error"]["code"] == "stream_not_found"


# --- resuming ------------------------------------------------------------------------------------------


def test_cut_mid_answer_and_resume_on_the_same_relay(resuming_relay, upstream):
    model = paced(upstream)
    stream_id, seen = cut_after_tokens(resuming_relay, model, tokens=5)
    time.sleep(0.3)  # the relay notices on its next write; the upstream must go on regardless
    follower = resume(resuming_relay, stream_id, seen[-1]["id"])
    assert follower.status == 200
    assert follower.headers["x-relay-stream-id"] == stream_id
    rest = follower.rest()
    assert_numbered(stream_id, seen + rest, first=1)
    assert rest[-1]["event"] == "done"
    assert text_of(seen + rest) == UPSTREAM_TEXT
    assert len(upstream.seen(model)) == 1
    logged = resuming_relay.wait_access_line("/api/stream_chat_completion", stream_id=stream_id)
    assert logged and logged[0]["outcome"] == "client_disconnect"


def test_resume_on_another_relay_sharing_redis(redis_relays, upstream):
    first, second = redis_relays
    model = paced(upstream)
    stream_id, seen = cut_after_tokens(first, model, tokens=4)
    follower = resume(second, stream_id, seen[-1]["id"])
    assert follower.status == 200
    rest = follower.rest()
    assert_numbered(stream_id, seen + rest, first=1)
    assert rest[-1]["event"] == "done"
    assert text_of(seen + rest) == UPSTREAM_TEXT
    assert len(upstream.seen(model)) == 1
    # Cut the follower too, and pick up again on the first relay: still no gap, no duplicate.
    model = paced(upstream)
    stream_id, seen = cut_after_tokens(first, model, tokens=3)
    again = resume(second, stream_id, seen[-1]["id"])
    more = again.take(4)
    again.hang_up()
    rest = resume(first, stream_id, more[-1]["id"]).rest()
    assert_numbered(stream_id, seen + more + rest, first=1)
    assert text_of(seen + more + rest) == UPSTREAM_TEXT
    assert len(upstream.seen(model)) == 1


def test_resume_after_the_upstream_finished_gets_the_whole_remainder(resuming_relay, redis_relays, upstream):
    for writer, reader in ((resuming_relay, resuming_relay), (redis_relays[0], redis_relays[1])):
        model = paced(upstream, delay=0.02)
        stream_id, seen = cut_after_tokens(writer, model, tokens=2)
        exchange = upstream.wait_seen(model)[0]
        assert exchange.finished.wait(10)
        assert exchange.closed_by_peer_at is None  # the relay read the answer to its end
        rest = resume(reader, stream_id, seen[-1]["id"]).rest()
        assert rest[-1]["event"] == "done" and json.loads(rest[-1]["data"])["finish_reason"] == "stop"
        assert text_of(seen + rest) == UPSTREAM_TEXT
        whole = resume(reader, stream_id, None).rest()  # no Last-Event-ID: from the start
        assert_numbered(stream_id, whole, first=1)
        assert whole[0]["event"] == "meta" and text_of(whole) == UPSTREAM_TEXT
        started = time.monotonic()
        assert resume(reader, stream_id, whole[-1]["id"]).rest() == []  # had it all: ends at once
        assert time.monotonic() - started < 2
        assert len(upstream.seen(model)) == 1


def test_a_failed_answer_resumes_to_its_error(resuming_relay, upstream):
    events = sse_answer(TOKENS[:6], done=False)[:-1]  # cut off before its finish_reason
    model = upstream.script(stream_script(events, delay=0.05))
    stream_id, seen = cut_after_tokens(resuming_relay, model, tokens=2)
    rest = resume(resuming_relay, stream_id, seen[-1]["id"]).rest()
    assert rest[-1]["event"] == "error"
    assert json.loads(rest[-1]["data"])["error"]["code"] == "upstream_error"
    assert text_of(seen + rest) == "".join(TOKENS[:6])
    assert_numbered(stream_id, seen + rest, first=1)


# --- refusals --------------------------------------------------------------------------------------------


def test_unknown_expired_garbage_and_foreign_resumes_are_refused(relay_factory, upstream):
    relay = relay_factory(RELAY_RESUME_SECONDS="1", RELAY_ACCESS_TOKENS="token-a,token-b")
    alice, bob = {"Authorization": "Bearer token-a"}, {"Authorization": "Bearer token-b"}
    answer = start_answer(relay, paced(upstream, delay=0, tokens=["x"]), alice)
    events = answer.rest()
    stream_id = answer.headers["x-relay-stream-id"]

    def refusal(last_event_id, headers, stream=stream_id):
        follower = resume(relay, stream, last_event_id, headers)
        if follower.status == 200:
            return 200, text_of(follower.rest())
        return follower.status, json.loads(follower.response.read())["error"]["code"]

    assert refusal(None, bob) == (404, "stream_not_found")  # another caller's answer
    assert relay.request("DELETE", f"/api/streams/{stream_id}", headers=bob).status == 404
    assert refusal(None, alice) == (200, "x")
    assert refusal(None, {}) == (401, "unauthorized")
    assert refusal(events[0]["id"], alice, stream="B" * 22) == (404, "stream_not_found")  # unknown id
    assert refusal(None, alice, stream="not-an-id") == (404, "stream_not_found")
    for garbage in ("garbage", f"{stream_id}:", f"{stream_id}:-1", f"{'C' * 22}:1", f"{stream_id}:999"):
        assert refusal(garbage, alice) == (400, "invalid_last_event_id"), garbage
    query = Events(relay, "GET", f"/api/streams/{stream_id}?last_event_id={stream_id}:2", headers=alice)
    assert text_of(query.rest()) == ""  # the query form (for EventSource) works too: only `done` is left
    time.sleep(1.5)  # past RELAY_RESUME_SECONDS after the end
    assert refusal(None, alice) == (404, "stream_not_found")


# --- the upstream's lifetime ---------------------------------------------------------------------------


def test_nobody_resumes_then_the_upstream_is_closed_after_the_window(relay_factory, upstream):
    relay = relay_factory(RELAY_RESUME_SECONDS="2")
    model = upstream.script(stream_script(sse_answer(TOKENS * 5), delay=0.1))  # 15 s of answer
    stream_id, seen = cut_after_tokens(relay, model, tokens=2)
    cut_at = time.monotonic()
    exchange = upstream.wait_seen(model)[0]
    assert not exchange.finished.wait(1.5), "the upstream was closed although the answer was resumable"
    assert exchange.finished.wait(5), "nobody resumed, yet the upstream call went on"
    assert exchange.closed_by_peer_at is not None
    assert exchange.closed_by_peer_at - cut_at < 2 + 2.5  # the window, then the usual 2 s promise
    follower = resume(relay, stream_id, seen[-1]["id"])
    assert follower.status == 404


def test_a_follower_keeps_the_answer_going_past_the_window(relay_factory, upstream):
    relay = relay_factory(RELAY_RESUME_SECONDS="1")
    model = paced(upstream, delay=0.12)  # 3.6 s of answer: three windows
    stream_id, seen = cut_after_tokens(relay, model, tokens=2)
    time.sleep(0.5)
    rest = resume(relay, stream_id, seen[-1]["id"]).rest()
    assert rest[-1]["event"] == "done"
    assert text_of(seen + rest) == UPSTREAM_TEXT
    assert upstream.seen(model)[0].closed_by_peer_at is None


def test_a_resumable_relay_still_closes_other_answers_within_two_seconds(resuming_relay, upstream):
    model = upstream.script(stream_script(sse_answer(TOKENS * 5), delay=0.1))
    answer = start_answer(resuming_relay, model, {"X-Relay-Resumable": "0"})
    answer.take(3)
    answer.hang_up()
    cut_at = time.monotonic()
    exchange = upstream.wait_seen(model)[0]
    assert exchange.finished.wait(5)
    assert exchange.closed_by_peer_at is not None and exchange.closed_by_peer_at - cut_at < 2.0


def test_an_answer_left_running_when_its_relay_stops_records_that_it_failed(relay_factory, redis_url, upstream):
    stopping, staying = (
        relay_factory(fresh=True, RELAY_RESUME_SECONDS="30", REDIS_URL=redis_url, RELAY_GRACEFUL_TIMEOUT="1")
        for _ in range(2)
    )
    try:
        model = upstream.script(stream_script(sse_answer(TOKENS * 5), delay=0.1))
        stream_id, seen = cut_after_tokens(stopping, model, tokens=2)
        time.sleep(0.5)  # the relay has seen its caller go and detached the answer
        stopping.stop()  # SIGTERM: the answer gets RELAY_GRACEFUL_TIMEOUT, like open requests, then ends
        rest = resume(staying, stream_id, seen[-1]["id"]).rest()
        assert rest[-1]["event"] == "error"
        assert json.loads(rest[-1]["data"])["error"]["code"] == "shutting_down"
        assert_numbered(stream_id, seen + rest, first=1)
        text = text_of(seen + rest)
        assert "".join(TOKENS * 5).startswith(text) and len(text) > len(text_of(seen))  # no gap before the cut
    finally:
        stopping.stop()
        staying.stop()


def test_without_redis_a_stopping_worker_ends_left_answers_nobody_follows_at_once(relay_factory, upstream):
    """Their records go with the worker, and no new resume can reach it: going on would only pay for tokens."""
    relay = relay_factory(fresh=True, RELAY_RESUME_SECONDS="30", RELAY_GRACEFUL_TIMEOUT="15")
    try:
        model = upstream.script(stream_script(sse_answer(TOKENS * 20), delay=0.1))
        cut_after_tokens(relay, model, tokens=2)
        [line] = relay.wait_access_line("/api/stream_chat_completion", model=model)  # the answer is detached now
        assert line["outcome"] == "client_disconnect"
        exchange = upstream.wait_seen(model)[0]
        assert not exchange.finished.is_set(), "the answer was still being read when the stop came"
        os.killpg(relay.proc.pid, signal.SIGTERM)
        stopped_at = time.monotonic()
        assert exchange.finished.wait(5) and exchange.closed_by_peer_at is not None, "the upstream answered to its end"
        assert exchange.closed_by_peer_at - stopped_at < 2.0
        relay.proc.wait(10)
        assert time.monotonic() - stopped_at < 5, "the worker waited for an answer nobody could resume"
    finally:
        relay.stop()


def test_without_redis_a_stopping_worker_lets_a_followed_answer_finish(relay_factory, upstream):
    """Its follower is a request in flight on this worker: it gets the whole answer, as the caller would."""
    relay = relay_factory(fresh=True, RELAY_RESUME_SECONDS="30", RELAY_GRACEFUL_TIMEOUT="15")
    try:
        model = upstream.script(stream_script(sse_answer(TOKENS * 2), delay=0.05))  # 3 s long
        answer = start_answer(relay, model)
        seen = answer.take(3)
        stream_id = answer.headers["x-relay-stream-id"]
        follower = resume(relay, stream_id, seen[-1]["id"])  # a client that reconnected before the old
        first = follower.take(1)  # connection was seen to drop: both read the answer for a moment
        os.killpg(relay.proc.pid, signal.SIGTERM)
        time.sleep(0.3)
        answer.hang_up()  # the stopping worker lets the answer go on for its follower
        rest = first + follower.rest()
        assert rest[-1]["event"] == "done", rest[-3:]
        assert text_of(seen + rest) == "".join(TOKENS * 2)
        relay.proc.wait(10)  # and the worker leaves once the answer is done, not at its deadline
    finally:
        relay.stop()


def test_without_redis_a_caller_leaving_a_stopping_worker_ends_its_answer_at_once(relay_factory, upstream):
    relay = relay_factory(fresh=True, RELAY_RESUME_SECONDS="30", RELAY_GRACEFUL_TIMEOUT="15")
    try:
        model = upstream.script(stream_script(sse_answer(TOKENS * 20), delay=0.1))
        answer = start_answer(relay, model)
        answer.take(2)
        os.killpg(relay.proc.pid, signal.SIGTERM)  # the answer is in flight: it may go on, to its caller
        time.sleep(0.3)
        answer.hang_up()
        left_at = time.monotonic()
        exchange = upstream.wait_seen(model)[0]
        assert exchange.finished.wait(5) and exchange.closed_by_peer_at is not None, "the upstream answered to its end"
        assert exchange.closed_by_peer_at - left_at < 2.0
    finally:
        relay.stop()


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_cancelling_a_left_answer_closes_its_upstream_at_once(store, resuming_relay, redis_relays, upstream):
    writer, canceller = (resuming_relay, resuming_relay) if store == "memory" else redis_relays
    model = upstream.script(stream_script(sse_answer(TOKENS * 5), delay=0.1))  # 15 s of answer
    stream_id, seen = cut_after_tokens(writer, model, tokens=2)
    cancelled = canceller.request("DELETE", f"/api/streams/{stream_id}")
    cancelled_at = time.monotonic()
    assert cancelled.status == 204
    exchange = upstream.wait_seen(model)[0]
    assert exchange.finished.wait(5)
    assert exchange.closed_by_peer_at is not None and exchange.closed_by_peer_at - cancelled_at < 2.0
    assert resume(canceller, stream_id, seen[-1]["id"]).status == 404


def test_resuming_and_cancelling_do_not_spend_the_rate_limit(relay_factory, upstream):
    relay = relay_factory(RELAY_RESUME_SECONDS="30", RELAY_RATE_LIMIT="2/minute")
    answer = start_answer(relay, paced(upstream, delay=0, tokens=["x"]))
    stream_id = answer.headers["x-relay-stream-id"]
    answer.rest()
    for _ in range(3):
        assert text_of(resume(relay, stream_id, None).rest()) == "x"
    assert relay.request("DELETE", f"/api/streams/{stream_id}").status == 204
    assert relay.stream(paced(upstream, delay=0, tokens=["y"])).status == 200  # the second of two
    assert relay.stream(paced(upstream, delay=0, tokens=["z"])).status == 429


@pytest.mark.parametrize("fails", [False, True], ids=["runs-to-its-end", "fails-after-the-caller-left"])
def test_what_an_answer_does_after_its_caller_left_is_counted_and_logged(relay_factory, upstream, fails):
    """Its request's line was written when the caller left; the tokens paid for since, or its failure, count too."""
    from test_guards import metric

    relay = relay_factory(fresh=True, RELAY_RESUME_SECONDS="30")
    events = sse_answer(TOKENS, usage={"prompt_tokens": 5, "completion_tokens": 30, "total_tokens": 35})
    if fails:
        events = events[:20] + [b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n']
    model = upstream.script(stream_script(events, delay=0.03))
    stream_id, _ = cut_after_tokens(relay, model, tokens=3)
    assert upstream.wait_seen(model)[0].finished.wait(5)
    expected = f"answer {stream_id} ended after its caller left: outcome " + ("upstream_error" if fails else "ok")
    deadline = time.monotonic() + 5
    while expected not in relay.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert expected in relay.log()
    for _ in range(2):  # replaying the failure is no new failure
        assert resume(relay, stream_id, f"{stream_id}:0").rest()[-1]["event"] == ("error" if fails else "done")
    time.sleep(0.3)  # the resumes' lines are written as their responses close
    metrics = relay.request("GET", "/metrics").text
    assert metric(metrics, "relay_tokens_total") == (19 if fails else 30)  # counted when there is no usage
    assert metric(metrics, "relay_upstream_errors_total", kind="upstream_error") == (1 if fails else 0)
    relay.stop()


def test_a_cancelled_answer_whose_caller_left_is_logged_as_a_disconnect(relay_factory, upstream):
    relay = relay_factory(fresh=True, RELAY_RESUME_SECONDS="30")
    stream_id, _ = cut_after_tokens(relay, paced(upstream, delay=0.2), tokens=2)
    assert relay.request("DELETE", f"/api/streams/{stream_id}").status == 204
    expected = f"answer {stream_id} ended after its caller left: outcome client_disconnect"
    deadline = time.monotonic() + 5
    while expected not in relay.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert expected in relay.log(), relay.log()[-2000:]
    relay.stop()


def test_a_resumes_log_line_says_how_it_ended(relay_factory, upstream):
    relay = relay_factory(RELAY_RESUME_SECONDS="30")

    def resumed_line(stream_id: str) -> dict:
        [line] = relay.wait_access_line(f"/api/streams/{stream_id}", method="GET")
        return line

    stream_id, seen = cut_after_tokens(relay, paced(upstream, delay=0.01), tokens=2)
    assert resume(relay, stream_id, seen[-1]["id"]).rest()[-1]["event"] == "done"
    assert (resumed_line(stream_id)["outcome"], resumed_line(stream_id)["error"]) == ("ok", None)

    failing = sse_answer(TOKENS[:5], done=False)[:6] + [b'data: {"error": {"message": "overloaded; data: none"}}\n\n']
    stream_id, seen = cut_after_tokens(relay, upstream.script(stream_script(failing, delay=0.01)), tokens=2)
    assert resume(relay, stream_id, seen[-1]["id"]).rest()[-1]["event"] == "error"
    assert (resumed_line(stream_id)["outcome"], resumed_line(stream_id)["error"]) == ("upstream_error", "upstream_error")

    stream_id, seen = cut_after_tokens(relay, paced(upstream, delay=0.2), tokens=2)
    follower = resume(relay, stream_id, seen[-1]["id"])
    follower.take(1)
    follower.hang_up()
    assert resumed_line(stream_id)["outcome"] == "client_disconnect"


def _heads_of_requests_sent_at_once(relay, requests: list[bytes]) -> list[bytes]:
    """Each request on its own connection, all sent before any is read; the response heads, all
    connections held open until every head has come."""
    socks = [socket.create_connection(("127.0.0.1", relay.port), timeout=15) for _ in requests]
    try:
        for sock, request in zip(socks, requests):
            sock.sendall(request)
        heads = []
        for sock in socks:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                piece = sock.recv(65536)
                if not piece:
                    break
                head += piece
            heads.append(head.partition(b"\r\n\r\n")[0])
        return heads
    finally:
        for sock in socks:
            sock.close()


def test_more_resumable_answers_and_resumes_at_once_than_a_redis_pool_once_held(redis_relays, upstream):
    """redis-py's pools hold 100 connections unless told otherwise: the 101st answer at once was
    not resumable, and the 101st resume got 503, as if Redis were down."""
    relay, count = redis_relays[0], 150
    model = upstream.script(stream_script(sse_answer(["a", "b"]), delay=2))
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    start = (b"POST /api/stream_chat_completion HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
             b"Accept: text/event-stream\r\nX-Relay-Resumable: 1\r\nContent-Length: %d\r\n\r\n%s") % (len(body), body)  # fmt: skip
    heads = _heads_of_requests_sent_at_once(relay, [start] * count)
    ids = [re.search(rb"(?i)^x-relay-stream-id: (\S+)", head, re.MULTILINE) for head in heads]
    assert all(head.startswith(b"HTTP/1.1 200") for head in heads)
    assert sum(found is not None for found in ids) == count, "some answers were not resumable"
    resumes = [b"GET /api/streams/%s HTTP/1.1\r\nHost: relay\r\nAccept: text/event-stream\r\n\r\n" % found.group(1)
               for found in ids]  # fmt: skip
    statuses = [head.split(b" ", 2)[1] for head in _heads_of_requests_sent_at_once(redis_relays[1], resumes)]
    assert statuses == [b"200"] * count, sorted(set(statuses))
