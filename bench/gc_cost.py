"""`python -m bench.gc_cost`: what Python's cyclic garbage collector costs a worker holding many open streams.

Opens slow answers (15 tokens, one a second, 1,000 new streams a second) through a one-worker
relay and prints the worker's CPU per token and its collections by generation: how many, their
total time and the longest (a collection stops every stream of the worker). The relay runs with
gunicorn.conf.py as it is; ``--python-defaults`` undoes its collector tuning (nothing frozen,
young threshold 700) to show what the tuning saves.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time

from bench.answers import StreamSpec
from bench.loadgen import Plan, run_streams
from bench.processes import Services
from bench.procstats import cpu_seconds
from bench.relay_source import add_source_options, snapshot_in_new_workdir
from bench.scenarios import target_for, warm_up
from bench.upstream import raise_open_file_limit

# The relay's own config, then a hook that times every collection and writes the totals on SIGUSR2.
PROBE_CONFIG = """
exec(compile(open("gunicorn.conf.py").read(), "gunicorn.conf.py", "exec"))
_relay_post_worker_init = post_worker_init


def post_worker_init(worker):
    import gc, json, os, signal, time

    _relay_post_worker_init(worker)
    if os.environ.get("BENCH_GC_PYTHON_DEFAULTS"):
        gc.unfreeze()
        gc.set_threshold(700, 10, 10)
    passes = {generation: {"count": 0, "seconds": 0.0, "longest": 0.0} for generation in range(3)}
    started = [0.0]

    def timed(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
            return
        took, totals = time.perf_counter() - started[0], passes[info["generation"]]
        totals["count"] += 1
        totals["seconds"] += took
        totals["longest"] = max(totals["longest"], took)

    def report(*_):
        path = os.environ["BENCH_GC_REPORT"]
        with open(path + ".partial", "w") as file:
            json.dump(passes, file)
        os.replace(path + ".partial", path)  # whole, or not there yet

    gc.callbacks.append(timed)
    signal.signal(signal.SIGUSR2, report)
"""


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gc_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=4000, help="slow answers, all open together at the end")
    parser.add_argument("--python-defaults", action="store_true", help="undo gunicorn.conf.py's collector tuning")
    add_source_options(parser)
    args = parser.parse_args()
    raise_open_file_limit()
    workdir, source = snapshot_in_new_workdir(args, "gc")
    (workdir / "relay" / "gc_probe.conf.py").write_text(PROBE_CONFIG)
    report = workdir / "gc.json"
    env = {"BENCH_GC_REPORT": str(report), **({"BENCH_GC_PYTHON_DEFAULTS": "1"} if args.python_defaults else {})}
    tuning = "Python's defaults" if args.python_defaults else "gunicorn.conf.py's tuning"
    print(f"{source['ref']} at {source['commit']}, {tuning}: {args.streams} slow streams on one worker")
    try:
        with Services(workdir) as services:
            upstream = services.upstream()
            relay = services.relay(upstream.port, worker_connections=args.streams + 1000, workers=1,
                                   source=workdir / "relay", extra_env=env, config="gc_probe.conf.py")  # fmt: skip
            target = target_for("relay-text", relay.port)
            warm_up(target)
            specs = [StreamSpec(index, 15, 200, 1000) for index in range(args.streams)]
            workers = relay.workers()
            before = cpu_seconds(workers)
            records, peak = run_streams(target, Plan(specs, args.streams, 1000, 120))
            cpu = cpu_seconds(workers) - before
            for pid in workers:
                os.kill(pid, signal.SIGUSR2)
            deadline = time.monotonic() + 10
            while not report.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            passes = json.loads(report.read_text())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    failed = sum(1 for record in records if record.error)
    print(f"  {1e6 * cpu / (15 * args.streams):.1f} us of worker CPU per token ({cpu:.2f} s); "
          f"peak open {peak}; failed {failed}")  # fmt: skip
    for generation, totals in passes.items():
        print(f"  generation {generation}: {totals['count']} collections, {totals['seconds']:.2f} s in all "
              f"({100 * totals['seconds'] / cpu:.0f} % of the CPU), longest {1000 * totals['longest']:.0f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
