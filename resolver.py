"""How a worker turns host names into addresses: an address needs no lookup, and a name's is kept briefly.

gevent's default resolver hands every lookup to a thread, even one for "127.0.0.1": about 80 µs of
CPU and two GIL hand-offs for each new upstream connection, and under load the hand-off waits on
the busy worker. ``gunicorn.conf.py`` installs this one in the workers (``GEVENT_RESOLVER``).
"""

from __future__ import annotations

import _socket
import socket
import time

from gevent.resolver.thread import Resolver as ThreadResolver

NAME_TTL_SECONDS = 30.0  # how long a name's addresses are reused: a DNS change takes this long to be seen
MAX_NAMES = 256


class Resolver(ThreadResolver):
    """gevent's thread resolver, except that addresses are parsed in place and names' answers kept."""

    def __init__(self, hub=None):
        super().__init__(hub)
        self._names: dict[tuple, tuple[float, list]] = {}

    def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):
        query = (host, port, family, type, proto, flags)
        if isinstance(host, (str, bytes)):
            try:  # an address: the C library parses it, without any I/O
                return _socket.getaddrinfo(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
            except _socket.gaierror:
                pass  # a name: look it up
        now = time.monotonic()
        kept = self._names.get(query)
        if kept is not None and kept[0] > now:
            return kept[1]
        answer = super().getaddrinfo(host, port, family, type, proto, flags)
        if len(self._names) >= MAX_NAMES:
            self._names.clear()
        self._names[query] = (now + NAME_TTL_SECONDS, answer)
        return answer
