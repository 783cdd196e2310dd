"""How workers resolve host names (resolver.py): addresses in place, names through the thread, kept briefly."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import resolver
from fake_upstream import sse_answer, stream_script


class RecordingPool:
    """gevent's thread pool, noting every call handed to a thread."""

    def __init__(self, pool):
        self._pool = pool
        self.calls = []

    def apply(self, function, args=None, kwds=None):
        self.calls.append(args)
        return self._pool.apply(function, args, kwds)


def recording_resolver() -> tuple[resolver.Resolver, RecordingPool]:
    instance = resolver.Resolver()
    pool = instance.pool = RecordingPool(instance.pool)
    return instance, pool


def test_an_address_is_parsed_in_place_without_the_thread():
    instance, pool = recording_resolver()
    for host, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6), (b"127.0.0.1", 0)):
        answer = instance.getaddrinfo(host, 8080, family, socket.SOCK_STREAM)
        assert answer == socket.getaddrinfo(host, 8080, family, socket.SOCK_STREAM)
    assert pool.calls == []


def test_a_name_goes_through_the_thread_once_per_ttl(monkeypatch):
    monkeypatch.setattr(resolver, "NAME_TTL_SECONDS", 0.3)
    instance, pool = recording_resolver()
    expected = socket.getaddrinfo("localhost", 80, socket.AF_INET, socket.SOCK_STREAM)  # /etc/hosts, no network
    for _ in range(3):
        assert instance.getaddrinfo("localhost", 80, socket.AF_INET, socket.SOCK_STREAM) == expected
    assert len(pool.calls) == 1, "a name's answer is kept"
    instance.getaddrinfo("localhost", 81, socket.AF_INET, socket.SOCK_STREAM)
    assert len(pool.calls) == 2, "another port is another question"
    time.sleep(0.35)
    instance.getaddrinfo("localhost", 80, socket.AF_INET, socket.SOCK_STREAM)
    assert len(pool.calls) == 3, "an expired answer is asked again"


def test_workers_use_it_and_start_no_resolver_thread_for_an_upstream_address(relay_factory, upstream):
    relay = relay_factory(fresh=True)  # its upstream is http://127.0.0.1:port: every connection is new
    model = upstream.script(stream_script(sse_answer(["one"]), keep_alive=False))  # so each answer connects
    try:
        for _ in range(5):
            assert relay.stream(model).text == "one"
        master = relay.proc.pid
        (worker,) = [int(pid) for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split()]
        threads = os.listdir(f"/proc/{worker}/task")
    finally:
        relay.stop()
    assert len(threads) == 1, f"gevent's thread resolver woke up: {len(threads)} threads in the worker"
