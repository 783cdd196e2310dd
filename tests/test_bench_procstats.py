"""The benchmark's CPU reading (bench/procstats.py): another process's CPU to well under a 10 ms tick,
the time of its threads that have ended included, as a relay's or nginx's CPU per token needs."""

from __future__ import annotations

import subprocess
import sys
import time

from bench.procstats import cpu_seconds

# Spends CPU in a thread that ends and then in the main thread, reports its own CPU time, and waits.
_BUSY_CHILD = """
import sys, threading, time

def spin(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass

worker = threading.Thread(target=spin, args=(0.15,))
worker.start()
worker.join()
spin(0.1)
print(time.process_time(), flush=True)
sys.stdin.readline()
"""


def test_cpu_seconds_reads_another_process_exactly_with_its_ended_threads():
    child = subprocess.Popen([sys.executable, "-c", _BUSY_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        reported = float(child.stdout.readline())
        time.sleep(0.05)  # the child now only waits on its stdin
        read = cpu_seconds([child.pid])
        assert reported >= 0.25  # the ended thread's 0.15 s and the main thread's 0.1 s
        assert 0 <= read - reported < 0.003  # what the child spent between its report and its wait
    finally:
        child.stdin.close()
        child.wait(timeout=10)
