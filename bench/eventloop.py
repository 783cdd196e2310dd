"""The smallest event loop that serves the benchmark's two ends: epoll, one heap of timers, and
callbacks run inline. No futures, tasks or transports: asyncio's machinery cost about as much per
token as the kernel's socket work here, and the ends must stay far cheaper than what they measure.
"""

from __future__ import annotations

import heapq
import itertools
import select
import time
from typing import Callable

POLL_CAP_SECONDS = 0.5  # wake at least this often, so a stop condition is never missed for long


class EventLoop:
    def __init__(self):
        self._epoll = select.epoll()
        self._handlers: dict[int, Callable[[int], None]] = {}
        self._timers: list = []
        self._order = itertools.count()  # keeps the heap from comparing callbacks of equal due times
        self.max_timer_late = 0.0  # seconds: how far behind its schedule the loop has run a timer

    def watch(self, fd: int, events: int, handler: Callable[[int], None]) -> None:
        self._handlers[fd] = handler
        self._epoll.register(fd, events)

    def modify(self, fd: int, events: int) -> None:
        self._epoll.modify(fd, events)

    def forget(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` at ``when`` (time.monotonic seconds), or as soon after as the loop can."""
        heapq.heappush(self._timers, (when, next(self._order), callback))

    def run(self, until: Callable[[], bool], deadline: float = float("inf")) -> bool:
        """Dispatch events and timers until ``until()`` is true (True) or ``deadline`` passes (False)."""
        timers, handlers, poll, pop, now = self._timers, self._handlers, self._epoll.poll, heapq.heappop, time.monotonic
        while True:
            current = now()
            while timers and timers[0][0] <= current:
                when, _, callback = pop(timers)
                callback()
                self.max_timer_late = max(self.max_timer_late, now() - when)
            if until():
                return True
            if current >= deadline:
                return False
            wait = min(POLL_CAP_SECONDS, deadline - current)
            if timers:
                wait = min(wait, max(0.0, timers[0][0] - now()))
            for fd, events in poll(wait):
                handler = handlers.get(fd)
                if handler is not None:  # an earlier handler of this batch may have closed it
                    handler(events)

    def close(self) -> None:
        self._epoll.close()
