"""`python -m bench.profile`: where the relay's workers spend their time. Runs one scenario against one
relay format while py-spy samples every worker, then prints the hottest functions, by own time and
with their callees, and keeps the collapsed stacks (flamegraph input) in bench/results/.

py-spy is not one of the relay's requirements: `.venv/bin/pip install py-spy==0.4.3` first. Under
gevent, py-spy follows greenlet frames loosely, so trust own-time figures more than the stacks above.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.loadgen import run_streams
from bench.processes import ROOT, Services
from bench.relay_source import add_source_options, snapshot_in_new_workdir
from bench.run import RESULTS
from bench.scenarios import RELAY_FORMATS, scenarios, target_for, warm_up
from bench.upstream import raise_open_file_limit

ATTACH_SECONDS = 1.5  # py-spy needs a moment to find the workers before the load starts
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*?):\d+\)$")


def py_spy() -> str:
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not found:
        sys.exit("py-spy is missing: .venv/bin/pip install py-spy==0.4.3")
    return found


def _short(path: str) -> str:
    return path.split("site-packages/")[-1].replace(str(ROOT) + "/", "")


def hot_spots(collapsed: Path, top: int) -> str:
    """Own time and time with callees per function, as shares of the samples of busy workers."""
    own, inclusive, total = Counter(), Counter(), 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [_FRAME.match(frame) for frame in stack.split(";")]
        functions = [f"{match['function']} ({_short(match['file'])})" for match in frames if match]
        if not functions:
            continue
        samples = int(count)
        total += samples
        own[functions[-1]] += samples
        for function in set(functions):
            inclusive[function] += samples
    lines = [f"{total} samples of busy worker time"]
    for title, counter in (("own time", own), ("with callees", inclusive)):
        lines.append(f"\n{title}:")
        lines.extend(f"{100 * samples / total:5.1f}%  {name}" for name, samples in counter.most_common(top))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="chat-1000")
    parser.add_argument("--format", default="relay-text", choices=RELAY_FORMATS)
    parser.add_argument("--quick", action="store_true", help="the --quick sizes of the scenarios")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    add_source_options(parser)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    scenario = {scenario.name: scenario for scenario in scenarios(args.quick)}.get(args.scenario)
    if scenario is None:
        sys.exit(f"unknown scenario {args.scenario!r}")
    spy_binary = py_spy()
    raise_open_file_limit()
    RESULTS.mkdir(parents=True, exist_ok=True)
    collapsed = RESULTS / time.strftime(f"profile-{scenario.name}-{args.format}-%Y%m%d-%H%M%S.txt")
    workdir, source = snapshot_in_new_workdir(args, "profile")
    with Services(workdir) as services:
        upstream = services.upstream()
        relay = services.relay(upstream.port, worker_connections=6000, workers=2, source=workdir / "relay")
        target = target_for(args.format, relay.port)
        warm_up(target)
        argv = [spy_binary, "record", "--pid", str(relay.proc.pid), "--subprocesses", "--rate", str(args.rate),
                "--format", "raw", "--output", str(collapsed), "--nonblocking"]  # fmt: skip
        with open(workdir / "py-spy.log", "wb") as log:
            spy = subprocess.Popen(argv, stdout=log, stderr=log)
        try:
            time.sleep(ATTACH_SECONDS)
            run_streams(target, scenario.plan(0))
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            spy.wait(60)
        finally:
            if spy.poll() is None:
                spy.kill()
                spy.wait()
    if not collapsed.exists():
        sys.exit(f"py-spy wrote nothing; see {workdir / 'py-spy.log'}")
    print(f"{scenario.name} against {args.format} of {source['ref']} at {source['commit']}\n")
    print(hot_spots(collapsed, args.top))
    print(f"\ncollapsed stacks: {collapsed.relative_to(ROOT)} (flamegraph.pl or speedscope read them)")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
