"""`python -m bench.syscalls`: the system calls a relay worker makes per stream and per token, by name.

The other side of `bench.calls`: a relayed token costs the kernel a read and a write wherever it
is relayed, and every further system call is cost a relay adds. This runs a one-worker relay,
counts its worker's system calls with ``strace -c`` (which must be installed) while one-token
answers run, then while answers of ``--tokens`` tokens run, each token arriving alone, and prints
the calls per stream and per extra token. strace slows every system call, which changes how many
tokens each of the loop's waits (``epoll_wait``) finds ready; reads and writes are counted exactly.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.calls import add_load_options, one_worker_relay

ATTACH_SECONDS = 0.5


def _summary(path: Path) -> Counter:
    """Calls by system call name, from the table ``strace -c`` writes."""
    counts = Counter()
    for line in path.read_text().splitlines():
        fields = line.split()
        # "% time  seconds  usecs/call  calls  [errors]  syscall"; the errors column may be empty
        if len(fields) in (5, 6) and fields[3].isdigit() and fields[-1] != "total":
            counts[fields[-1]] += int(fields[3])
    return counts


def _syscalls_during(worker: int, out: Path, run) -> Counter:
    tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(worker)], stderr=subprocess.DEVNULL)
    try:
        time.sleep(ATTACH_SECONDS)
        run()
        time.sleep(0.5)  # the last streams' ends (their log lines) are written after the client has all
    finally:
        tracer.send_signal(signal.SIGINT)  # strace detaches and writes its table
        tracer.wait(30)
    return _summary(out)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.syscalls", description=__doc__.splitlines()[0])
    add_load_options(parser)
    args = parser.parse_args()
    if not shutil.which("strace"):
        sys.exit("strace is missing: apt-get install strace")
    with one_worker_relay(args, "syscalls") as relay:
        out = relay.workdir / "strace.txt"
        per_short = _syscalls_during(relay.worker, out, relay.one_token_answers)
        per_long = _syscalls_during(relay.worker, out, relay.long_answers)
    print(relay.described(args))
    print(f"{'system call':<16} {'per stream':>11} {'per further token':>18}")
    tokens = args.streams * (args.tokens - 1)
    for name in sorted(per_short | per_long, key=lambda name: -per_long[name]):
        print(f"{name:<16} {per_short[name] / args.streams:>11.2f} {(per_long[name] - per_short[name]) / tokens:>18.2f}")
    all_short, all_long = sum(per_short.values()), sum(per_long.values())
    print(f"{'all':<16} {all_short / args.streams:>11.2f} {(all_long - all_short) / tokens:>18.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
