"""`python -m bench.calls`: how many Python calls a relay worker makes per stream and per token.

CPU figures on a shared 2-core machine move by 10-30 % between runs, so a change that saves a few
per cent cannot be seen in them. The number of calls the worker makes can: it is the same from run
to run for the same code and load. This runs a one-worker relay with cProfile switched on in the
worker only while the load runs, sends one-token answers (a stream's set-up and end) and then
answers of ``--tokens`` tokens, each arriving alone, and prints calls per stream and per extra token.
A call into C (orjson, a socket) counts one like any other: compare versions with it (``--relay-ref``),
do not read it as time.
"""

from __future__ import annotations

import argparse
import os
import pstats
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.answers import StreamSpec
from bench.checks import check_stream
from bench.loadgen import Plan, run_streams
from bench.processes import Services
from bench.relay_source import add_source_options, snapshot_in_new_workdir
from bench.scenarios import RELAY_FORMATS, target_for, warm_up
from bench.upstream import raise_open_file_limit

CONFIG = "gunicorn.calls.py"
# The relay's own gunicorn.conf.py, plus a worker that turns cProfile on at one SIGUSR2 and off (writing
# its figures to calls.prof in the run's working directory) at the next.
_CONFIG_TEXT = '''
exec(compile(open("gunicorn.conf.py").read(), "gunicorn.conf.py", "exec"))

import cProfile as _cProfile
import signal as _signal

_relay_post_worker_init = post_worker_init
_profile = None


def post_worker_init(worker):
    _relay_post_worker_init(worker)

    def toggle(*_args):
        global _profile
        if _profile is None:
            _profile = _cProfile.Profile()
            _profile.enable()
        else:
            _profile.disable()
            _profile.dump_stats({workdir} + "/calls.prof")
            _profile = None

    _signal.signal(_signal.SIGUSR2, toggle)
'''


def _calls_during(worker: int, out: Path, run) -> int:
    """Python calls the worker made while ``run()`` ran."""
    out.unlink(missing_ok=True)
    os.kill(worker, signal.SIGUSR2)
    time.sleep(0.2)
    run()
    time.sleep(0.5)  # the last streams' ends (their log lines) are written after the client has all
    os.kill(worker, signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.2)  # written whole
    return pstats.Stats(str(out)).total_calls


def _answers_load(target, specs: list[StreamSpec], concurrency: int):
    """A function that sends ``specs`` to ``target``, ``concurrency`` at a time, and fails if any stream does."""

    def run() -> None:
        records, _ = run_streams(target, Plan(specs, concurrency, None, 120))
        failed = Counter(v.error for v in (check_stream(r, target) for r in records) if v.error)
        if failed:
            raise RuntimeError(f"streams failed: {dict(failed.most_common(3))}")

    return run


def add_load_options(parser: argparse.ArgumentParser) -> None:
    """The options of a one-worker count: which format, how many streams, how long their answers."""
    parser.add_argument("--format", default="relay-text", choices=RELAY_FORMATS)
    parser.add_argument("--streams", type=int, default=200, help="streams of each kind")
    parser.add_argument("--tokens", type=int, default=50, help="tokens of each long answer")
    parser.add_argument("--gap-ms", type=int, default=10, help="between a long answer's tokens")
    add_source_options(parser)


@dataclass
class OneWorkerRelay:
    """A warmed-up one-worker relay and the two loads a count compares: one-token answers (a stream's
    set-up and end), then answers of ``--tokens`` tokens, each token arriving alone."""

    worker: int
    workdir: Path
    source: dict
    one_token_answers: Callable[[], None]
    long_answers: Callable[[], None]

    def described(self, args: argparse.Namespace) -> str:
        changed = f" (changed: {', '.join(self.source['modified_files'])})" if self.source["modified_files"] else ""
        return f"{args.format} of {self.source['ref']} at {self.source['commit']}{changed}"


@contextmanager
def one_worker_relay(args: argparse.Namespace, name: str, config_text: str | None = None) -> Iterator[OneWorkerRelay]:
    """A relay with one worker, started from a snapshot of the chosen source; with ``config_text``,
    under that gunicorn config (in which ``{workdir}`` is the run's working directory)."""
    raise_open_file_limit()
    workdir, source = snapshot_in_new_workdir(args, name)
    config = "gunicorn.conf.py"
    if config_text is not None:
        config = CONFIG
        (workdir / "relay" / CONFIG).write_text(config_text.replace("{workdir}", repr(str(workdir))))
    try:
        with Services(workdir) as services:
            upstream = services.upstream()
            relay = services.relay(upstream.port, worker_connections=6000, workers=1, source=workdir / "relay", config=config)
            target = target_for(args.format, relay.port)
            warm_up(target)
            short = [StreamSpec(index, 1, 0, 0) for index in range(args.streams)]
            long = [StreamSpec(10_000 + index, args.tokens, args.gap_ms, args.gap_ms) for index in range(args.streams)]
            yield OneWorkerRelay(
                relay.workers()[0], workdir, source, _answers_load(target, short, 10), _answers_load(target, long, 10)
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.calls", description=__doc__.splitlines()[0])
    add_load_options(parser)
    args = parser.parse_args()
    with one_worker_relay(args, "calls", _CONFIG_TEXT) as relay:
        out = relay.workdir / "calls.prof"
        per_stream = _calls_during(relay.worker, out, relay.one_token_answers) / args.streams
        per_long = _calls_during(relay.worker, out, relay.long_answers) / args.streams
    per_token = (per_long - per_stream) / (args.tokens - 1)
    print(relay.described(args))
    print(f"  Python calls per stream (one-token answers, set-up to end): {per_stream:,.0f}")
    print(f"  Python calls per further token ({args.tokens}-token answers, {args.gap_ms} ms apart): {per_token:,.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
