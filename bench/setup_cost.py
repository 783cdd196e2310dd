"""`python -m bench.setup_cost`: the relay's CPU to set up and tear down one stream, measured alone.

Sends one-token answers (no delay) through a one-worker relay, a fixed number at a time, each on
a fresh client connection as a browser's `fetch` opens, and prints the worker's CPU per stream:
accepting, parsing, checking, the upstream call, the response head, one token, the end, the
access log and the metrics. This is what the chat scenarios spread over 100 tokens and what sets
their added time to first byte (requests arriving together wait for each other's set-up).
``--profile`` also samples the worker with py-spy and prints its hottest functions;
``--new-connections`` has the upstream close after each answer, so every stream also opens one.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

from bench.answers import StreamSpec
from bench.checks import check_stream
from bench.loadgen import Plan, run_streams
from bench.processes import ROOT, Services
from bench.procstats import cpu_seconds
from bench.profile import ATTACH_SECONDS, hot_spots, py_spy
from bench.relay_source import add_source_options, snapshot_in_new_workdir
from bench.run import RESULTS
from bench.scenarios import RELAY_FORMATS, target_for, upstream_stats, warm_up
from bench.upstream import raise_open_file_limit


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.setup_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--format", default="relay-text", choices=RELAY_FORMATS)
    parser.add_argument("--runs", type=int, default=3, help="measurements on the same relay; all are printed")
    parser.add_argument("--profile", action="store_true", help="sample the worker with py-spy meanwhile")
    parser.add_argument("--new-connections", action="store_true", help="the upstream closes after each answer")
    add_source_options(parser)
    args = parser.parse_args()
    raise_open_file_limit()
    workdir, source = snapshot_in_new_workdir(args, "setup")
    print(f"{args.format} of {source['ref']} at {source['commit']}: {args.streams} one-token streams, "
          f"{args.concurrency} at a time, one worker{', a new upstream connection each' * args.new_connections}")  # fmt: skip
    spy, collapsed = None, RESULTS / time.strftime(f"profile-setup-{args.format}-%Y%m%d-%H%M%S.txt")
    try:
        with Services(workdir) as services:
            upstream = services.upstream(close_after_answer=args.new_connections)
            relay = services.relay(upstream.port, worker_connections=6000, workers=1, source=workdir / "relay")
            target = target_for(args.format, relay.port)
            warm_up(target)
            if args.profile:
                RESULTS.mkdir(parents=True, exist_ok=True)
                argv = [py_spy(), "record", "--pid", str(relay.proc.pid), "--subprocesses", "--rate", "250",
                        "--format", "raw", "--output", str(collapsed), "--nonblocking"]  # fmt: skip
                spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(ATTACH_SECONDS)
            for run in range(args.runs):
                upstream_stats(upstream)  # resets its counters
                specs = [StreamSpec(run * 1_000_000 + index, 1, 0, 0) for index in range(args.streams)]
                workers = relay.workers()
                before = cpu_seconds(workers)
                records, _ = run_streams(target, Plan(specs, args.concurrency, None, 120))
                cpu = cpu_seconds(workers) - before
                failed = Counter(v.error for v in (check_stream(r, target) for r in records) if v.error)
                stats = upstream_stats(upstream)
                print(f"  run {run + 1}: {1000 * cpu / args.streams:.3f} ms of worker CPU per stream; "
                      f"new upstream connections {stats['new_connections']}/{stats['answers']}; "
                      f"failed {sum(failed.values())} {dict(failed.most_common(2)) if failed else ''}")  # fmt: skip
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                spy.wait(60)
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.profile:
        print(hot_spots(collapsed, 40) if collapsed.exists() else "py-spy wrote nothing")
        print(f"\ncollapsed stacks: {collapsed.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
