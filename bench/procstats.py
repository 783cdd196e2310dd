"""What processes cost: CPU seconds (from each process's CPU clock) and proportional memory (PSS,
from /proc) of a process and its descendants, so a window's cost is the difference of two readings.
Linux only; no psutil.
"""

from __future__ import annotations

import os
import time


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as file:
        return file.read().rsplit(")", 1)[1].split()  # after the name, which may hold spaces


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (gunicorn's workers, nginx's workers)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(_stat_fields(int(entry))[1])
            except (OSError, IndexError, ValueError):
                continue  # gone between the listing and the read
            parents.setdefault(parent, []).append(int(entry))
    found, frontier = [], [pid]
    while frontier:
        children = parents.get(frontier.pop(), [])
        found.extend(children)
        frontier.extend(children)
    return found


def _process_cpu_clock(pid: int) -> int:
    """The clock id of ``pid``'s CPU time, all its threads, live and ended: what glibc's
    ``clock_getcpuclockid`` returns (Linux's MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)), which
    Python does not wrap."""
    return (~pid << 3) | 2


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time the processes have used so far, to the nanosecond.

    Not /proc's utime and stime: those come in 10 ms ticks, too coarse for nginx, whose whole
    run at 100 chat streams can take less than ten of them on a fast machine.
    """
    return sum(time.clock_gettime_ns(_process_cpu_clock(pid)) for pid in pids) / 1e9


def pss_kib(pids: list[int]) -> int:
    """Proportional set size: shared pages split between their sharers, so forked workers add up."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/smaps_rollup") as file:
            for line in file:
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
    return total
