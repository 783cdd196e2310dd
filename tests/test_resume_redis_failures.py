"""Resumable answers when Redis fails under them: out of memory, unreachable, or not answering.

A blip must leave the record whole (the writer sends failed writes again, and a write sent twice is
stored once). A longer failure must never leave half a record behind: the caller still gets its
whole answer, the record is deleted once Redis takes it, a follower gets an error, and an answer
whose caller left stops reading its upstream. The writing relay reaches Redis through ``RedisLink``,
a loopback TCP link the test can cut or silence; the reading relay talks to Redis directly.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import socket
import threading
import time

import gevent
import pytest
import redis

import resume as resume_store
from fake_upstream import sse_answer, stream_script
from test_resume import TOKENS, UPSTREAM_TEXT, assert_numbered, cut_after_tokens, paced, resume, start_answer, text_of

FAILURES = ["out of memory", "unreachable", "not answering"]


class RedisLink:
    """A TCP link to Redis: ``cut()`` resets its connections and closes new ones at once,
    ``silence()`` holds every byte (Redis seems to hang), ``restore()`` passes bytes again."""

    def __init__(self, redis_port: int):
        self._redis_port = redis_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._pairs: dict[socket.socket, socket.socket] = {}  # each side of a forwarded connection -> the other
        self._held: list[socket.socket] = []  # connections accepted while silent, never forwarded
        self._wanted: tuple[int, str] = (0, "open")  # the latest switch asked for: its number and mode
        self._applied = 0  # the number of the last switch the thread applied
        self._stopping = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def cut(self) -> None:
        self._switch("cut")

    def silence(self) -> None:
        self._switch("silent")

    def restore(self) -> None:
        self._switch("open")

    def close(self) -> None:
        self._stopping = True
        self._thread.join(5)

    def _switch(self, mode: str) -> None:
        """Change mode and return once the link's thread has applied it: no connection straddles."""
        wanted = self._wanted = (self._wanted[0] + 1, mode)  # one assignment: the thread sees both or neither
        deadline = time.monotonic() + 2
        while self._applied != wanted[0] and time.monotonic() < deadline:
            time.sleep(0.005)

    def _run(self) -> None:
        try:
            while not self._stopping:
                changes, mode = self._wanted
                if changes != self._applied:
                    if mode != "silent":  # a cut resets all; a restore drops what a silence left in doubt
                        self._drop_all()
                    self._applied = changes
                watched = [self._listener] + (list(self._pairs) if mode == "open" else [])
                readable, _, _ = select.select(watched, [], [], 0.01)
                for sock in readable:
                    if self._wanted[0] != changes:
                        break  # switched meanwhile: apply it first
                    if sock is self._listener:
                        self._accept(mode)
                    elif sock in self._pairs:
                        self._forward(sock)
        finally:
            self._drop_all()
            self._listener.close()

    def _accept(self, mode: str) -> None:
        client, _ = self._listener.accept()
        client.settimeout(2)  # a send that cannot complete frees the link's thread
        if mode == "cut":
            _reset(client)
        elif mode == "silent":
            self._held.append(client)
        else:
            server = socket.create_connection(("127.0.0.1", self._redis_port), timeout=2)
            self._pairs[client], self._pairs[server] = server, client

    def _forward(self, sock: socket.socket) -> None:
        other = self._pairs[sock]
        try:
            data = sock.recv(65536)
            if data:
                other.sendall(data)
                return
        except OSError:
            pass
        for end in (sock, other):
            self._pairs.pop(end, None)
            end.close()

    def _drop_all(self) -> None:
        for sock in list(self._pairs) + self._held:
            _reset(sock)
        self._pairs.clear()
        self._held.clear()


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST, not FIN
    sock.close()


@pytest.fixture(scope="module")
def link(redis_url):
    link = RedisLink(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    yield link
    link.close()


@pytest.fixture(scope="module")
def writer(relay_factory, link):
    relay = relay_factory(fresh=True, RELAY_RESUME_SECONDS="30", REDIS_URL=f"redis://127.0.0.1:{link.port}/0")
    yield relay
    relay.stop()


@pytest.fixture(scope="module")
def reader(relay_factory, redis_url):
    relay = relay_factory(fresh=True, RELAY_RESUME_SECONDS="30", REDIS_URL=redis_url)
    yield relay
    relay.stop()


@contextlib.contextmanager
def redis_failing(how: str, link: RedisLink, redis_url: str):
    """Redis fails for the writing relay while the block runs, and recovers after it."""
    if how == "out of memory":  # maxmemory 1, no eviction: every write that could grow it is refused
        client = redis.Redis.from_url(redis_url)
        client.config_set("maxmemory", 1)
        try:
            yield
        finally:
            client.config_set("maxmemory", 0)
            client.close()
        return
    link.cut() if how == "unreachable" else link.silence()
    try:
        yield
    finally:
        link.restore()


def eventually(check, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        gevent.sleep(0.1)  # lets the store's committer send the deletion
    return True


def eventually_not_found(reader, redis_url: str, stream_id: str, timeout: float = 5.0) -> bool:
    """Whether the record is deleted within ``timeout`` (once Redis takes the deletion), and then
    resuming gets 404. (Polling with resumes instead would race: a resume that finds the record
    just before it goes waits out one blocking read before its follower learns it is gone.)"""
    client = redis.Redis.from_url(redis_url)
    keys = resume_store.RedisResumeStore._keys(stream_id)
    try:
        gone = eventually(lambda: not client.exists(*keys), timeout)
    finally:
        client.close()
    return gone and resume(reader, stream_id, None).status == 404


def test_an_append_sent_again_is_stored_once_and_one_that_would_leave_a_hole_is_refused(redis_url):
    """The script each append is sent as: what makes sending a failed pipeline again safe."""
    client = redis.Redis.from_url(redis_url)
    client.script_load(resume_store._APPEND)
    events, info = resume_store.RedisResumeStore._keys(resume_store.new_stream_id())
    client.hset(info, "owner", "")

    def append(first: int, frames: list[bytes], end: int = 0, ttl: int = 0) -> int:
        return client.evalsha(resume_store._APPEND_SHA, 2, events, info, first, end, ttl, *frames)

    binary = bytes(range(256)) + b"\r\n\r\n"
    try:
        assert append(1, [b"a", b"b"], ttl=30) == 1
        assert append(1, [b"a", b"b"]) == 1  # its reply was lost: stored already
        assert append(2, [b"b", b"c"]) == 1  # overlaps what is stored: only the new frame is added
        assert append(5, [b"e"]) == 0  # event 4 is missing: the record would have a hole
        assert append(4, [binary], end=1) == 1
        assert append(4, [binary], end=1) == 1  # the last write sent again: still one end
        entries = client.xrange(events)
        assert [entry_id for entry_id, _ in entries] == [b"0-1", b"0-2", b"0-3", b"0-4"]
        assert [fields[b"f"] for _, fields in entries] == [b"a", b"b", b"c", binary]
        assert b"end" in entries[-1][1] and b"end" not in entries[-2][1]
        assert client.hget(info, "ended") == b"1" and 0 < client.ttl(events) <= 30 and 0 < client.ttl(info) <= 30
        client.delete(info)
        assert append(5, [b"e"]) == 0  # the record was dropped: not recreated
        assert client.xlen(events) == 4
    finally:
        client.delete(events, info)
        client.close()


@pytest.mark.parametrize("how", ["out of memory", "unreachable"])
def test_a_redis_blip_mid_answer_leaves_its_record_whole(how, writer, reader, link, redis_url, upstream):
    answer = start_answer(writer, paced(upstream))
    stream_id = answer.headers["x-relay-stream-id"]
    seen = answer.take(1 + 5)
    with redis_failing(how, link, redis_url):
        time.sleep(0.3)  # several writes fail meanwhile; the writer sends them again
    seen += answer.take(10)
    answer.hang_up()
    follower = resume(reader, stream_id, seen[-1]["id"])
    assert follower.status == 200, follower.response.read()
    rest = follower.rest()
    assert_numbered(stream_id, seen + rest, first=1)
    assert rest[-1]["event"] == "done"
    assert text_of(seen + rest) == UPSTREAM_TEXT


@pytest.mark.parametrize("how", FAILURES)
def test_an_answer_redis_cannot_record_goes_on_whole_and_is_not_resumable(how, writer, reader, link, redis_url, upstream):
    answer = start_answer(writer, paced(upstream))
    stream_id = answer.headers["x-relay-stream-id"]
    seen = answer.take(1 + 5)
    arrivals = [time.monotonic()]
    with redis_failing(how, link, redis_url):
        while len(seen) < 1 + 15 and (event := answer.next()) is not None:  # through the failure
            seen.append(event)
            arrivals.append(time.monotonic())
        time.sleep(max(0.0, arrivals[0] + 2.0 - time.monotonic()))  # past the writer's retries
    rest = answer.rest()
    assert_numbered(stream_id, seen + rest, first=1)
    assert rest[-1]["event"] == "done"
    assert text_of(seen + rest) == UPSTREAM_TEXT
    pauses = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
    assert max(pauses) < 2.5, f"the caller waited {max(pauses):.1f} s for Redis"  # 1 s of retries, 1 s per write
    assert eventually_not_found(reader, redis_url, stream_id)  # a record with a hole is deleted, not half kept


@pytest.mark.parametrize("how", ["out of memory", "unreachable"])
def test_a_left_answer_redis_cannot_record_ends_its_follower_and_its_upstream(how, writer, reader, link, redis_url, upstream):
    model = upstream.script(stream_script(sse_answer(TOKENS * 5), delay=0.1))  # 15 s of answer
    stream_id, seen = cut_after_tokens(writer, model, tokens=2)
    follower = resume(reader, stream_id, seen[-1]["id"])
    assert follower.status == 200
    seen += follower.take(2)
    exchange = upstream.wait_seen(model)[0]
    with redis_failing(how, link, redis_url):
        failed_at = time.monotonic()
        assert exchange.finished.wait(3.0), "the answer nobody can resume went on reading its upstream"
        time.sleep(2.5)  # the record's deletion is refused (unreachable) more than once meanwhile
    assert exchange.closed_by_peer_at is not None
    assert eventually_not_found(reader, redis_url, stream_id, timeout=2.5)  # deleted once Redis is back, not at its expiry
    rest = follower.rest()
    assert rest and rest[-1]["event"] == "error" and "done" not in [event["event"] for event in rest]
    assert json.loads(rest[-1]["data"])["error"]["code"] == "upstream_error"
    assert "".join(TOKENS * 5).startswith(text_of(seen + rest))
    assert exchange.closed_by_peer_at - failed_at < 3.0  # 1 s of retries, then the next watch tick


def test_a_follower_that_cannot_reach_redis_is_hung_up_on_not_pinged_forever(writer, relay_factory, link, redis_url, upstream):
    """Hung up on, so that its client resumes where Redis can be reached (the audit saw 177 s of pings)."""
    own_link = RedisLink(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    follower_relay = relay_factory(fresh=True, RELAY_RESUME_SECONDS="30", REDIS_URL=f"redis://127.0.0.1:{own_link.port}/0")
    try:
        model = upstream.script(stream_script(sse_answer(TOKENS * 5), delay=0.1))  # 15 s of answer
        stream_id, seen = cut_after_tokens(writer, model, tokens=2)
        follower = resume(follower_relay, stream_id, seen[-1]["id"])
        seen += follower.take(2)
        link.cut()
        own_link.cut()
        cut_at = time.monotonic()
        rest, hung_up = [], False
        try:
            while (event := follower.next()) is not None:
                rest.append(event)
        except (http.client.HTTPException, OSError):
            hung_up = True  # the body ended without its last chunk: a cut, which the client resumes from
        assert time.monotonic() - cut_at < resume_store.FOLLOWER_OUTAGE_SECONDS + 4
        assert hung_up and all(event["event"] == "message" for event in rest), rest
        assert "".join(TOKENS * 5).startswith(text_of(seen + rest))
        [line] = follower_relay.wait_access_line(f"/api/streams/{stream_id}")
        assert (line["outcome"], line["error"]) == ("upstream_error", "resume_unavailable")
    finally:
        link.restore()
        own_link.close()
        follower_relay.stop()


# --- the store itself, in this process (gevent without monkey-patching: redis-py's sockets block,
# which is fine for one writer) ----------------------------------------------------------------------


def test_the_first_write_of_an_answer_sets_its_events_expiry(redis_url):
    # A live window longer than this host has been up: the first write must still set an expiry.
    store = resume_store.RedisResumeStore(redis_url, linger_seconds=30, live_seconds=10**9)
    stream_id = store.create("")
    assert store.append(stream_id, [b"a"], end=False)
    client = redis.Redis.from_url(redis_url)
    try:
        events, info = store._keys(stream_id)
        assert client.ttl(events) > 0 and client.ttl(info) > 0
    finally:
        client.delete(*store._keys(stream_id))
        client.close()


def test_a_record_whose_events_expired_just_before_its_info_reads_as_gone_not_as_ended(redis_url):
    """Both keys expire at the same second; a resume between the two expiries got a clean, empty end."""
    store = resume_store.RedisResumeStore(redis_url, linger_seconds=30, live_seconds=60)
    stream_id = store.create("")
    assert store.append(stream_id, [b"a", b"b"], end=True)
    events, info = store._keys(stream_id)
    client = redis.Redis.from_url(redis_url)
    try:
        assert store.read(stream_id, 1, 0.1).ended  # the record as it stands: the rest, then its end
        client.delete(events)  # as the events key's expiry lands first
        chunk = store.read(stream_id, 1, 0.1)
        assert not chunk.exists and not chunk.ended, chunk
    finally:
        client.delete(events, info)
        client.close()


def test_an_answer_interrupted_while_its_write_is_in_flight_waits_for_that_write_again(link, redis_url):
    store = resume_store.RedisResumeStore(f"redis://127.0.0.1:{link.port}/0", linger_seconds=30, live_seconds=60)
    stream_id = store.create("")
    assert store.append(stream_id, [b"a"], end=False)
    link.cut()
    try:
        waiting = gevent.spawn(store.append, stream_id, [b"b"], False)
        gevent.sleep(0.2)  # its write fails and is being sent again
        waiting.kill(RuntimeError("a stop raised into the wait"), block=True)
        started = time.monotonic()
        stored = store.append(stream_id, [], end=False)  # what the relay does next: frames already taken
        assert stored is False, "frames whose write never landed would reach the caller unstored"
        assert time.monotonic() - started > 0.3  # it waited for the write, to its failure
    finally:
        link.restore()
    assert eventually(lambda: resume_store.RedisResumeStore(redis_url, 30, 60).info(stream_id) is None)


def test_a_write_queued_while_deletions_wait_to_be_retried_is_sent_at_once(link):
    store = resume_store.RedisResumeStore(f"redis://127.0.0.1:{link.port}/0", linger_seconds=30, live_seconds=60)
    gone, kept = store.create(""), store.create("")
    link.cut()
    try:
        store.discard(gone)
        gevent.sleep(1.2)  # its deletion was refused for a second: the committer waits a second to try again
    finally:
        link.restore()
    started = time.monotonic()
    assert store.append(kept, [b"a"], end=False)
    assert time.monotonic() - started < 0.5, "the write waited for the deletions' pause"
    assert eventually(lambda: store.info(gone) is None)


def test_scripts_lost_with_a_redis_restart_are_loaded_again_without_losing_answers(link, redis_url):
    store = resume_store.RedisResumeStore(f"redis://127.0.0.1:{link.port}/0", linger_seconds=30, live_seconds=60)
    gone, kept = store.create(""), store.create("")
    assert store.append(kept, [b"a"], end=False)
    link.cut()
    try:
        store.discard(gone)
        gevent.sleep(1.2)  # refused, and refused again: writes have been failing for over a second
        client = redis.Redis.from_url(redis_url)
        client.script_flush()  # as after a restart or a failover
        client.close()
    finally:
        link.restore()
    assert store.append(kept, [b"b"], end=False), "a healthy answer was given up for a script Redis had lost"
    assert store.info(kept).last_seq == 2
    store.discard(kept)


def test_a_blip_long_after_an_outage_gets_its_whole_retry_window(link):
    # Records live 2 s here, so the outage outlasts the deletion it leaves pending.
    store = resume_store.RedisResumeStore(f"redis://127.0.0.1:{link.port}/0", linger_seconds=2, live_seconds=2)
    gone = store.create("")
    link.cut()
    try:
        store.discard(gone)
        gevent.sleep(3.0)  # every deletion attempt refused, until the record would have expired anyway
    finally:
        link.restore()
    gevent.sleep(0.5)  # healthy again; nothing written meanwhile
    kept = store.create("")
    link.cut()
    blip = gevent.spawn_later(0.3, link.restore)
    try:
        assert store.append(kept, [b"a"], end=False), "a blip after the outage was judged part of it"
    finally:
        blip.join()
    assert store.info(kept).last_seq == 1
