"""`python -m bench.run`: the whole benchmark of issue 7 in one command. Starts the fake upstream and
nginx once, a fresh relay (gunicorn + gevent, as deployed) for every relay measurement, runs each
scenario against the upstream directly, through nginx and through the relay, repeats, then prints
the tables and writes every figure to bench/results/. Everything it starts, it stops.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import report
from bench.processes import ROOT, Service, Services
from bench.relay_source import add_source_options, snapshot_in_new_workdir
from bench.scenarios import RELAY_FORMATS, RESUME_FORMATS, Scenario, measure, scenarios, target_for
from bench.upstream import raise_open_file_limit

RESULTS = ROOT / "bench" / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description="Chat Relay's benchmark (issue 7).")
    add = parser.add_argument
    add("--quick", action="store_true", help="smaller scenarios, one repetition (about 2 minutes)")
    add("--repetitions", type=int, help="runs of every scenario (default 3; 1 with --quick)")
    add("--scenarios", help="comma-separated subset, e.g. chat-100,firehose-50")
    add("--relay-formats", help=f"comma-separated subset of {','.join(RELAY_FORMATS + RESUME_FORMATS)}")
    add_source_options(parser)
    add("--workers", type=int, default=2, help="the relay's WEB_CONCURRENCY (default 2)")
    add("--worker-connections", type=int, default=6000, help="the relay's RELAY_WORKER_CONNECTIONS (default 6000)")
    add("--tls-upstream", action="store_true",
        help="relays call the upstream over https (nginx in front of it, as a TLS server), trusting a CA "
             "bundle as large as certifi's; the direct and nginx runs do not")
    add("--keep-logs", action="store_true", help="keep the services' logs even when all went well")
    args = parser.parse_args(argv)
    if args.repetitions is None:
        args.repetitions = 1 if args.quick else 3
    if args.repetitions < 1:
        parser.error("--repetitions must be at least 1")
    return args


def selected_scenarios(args: argparse.Namespace) -> list[Scenario]:
    chosen = scenarios(args.quick)
    if args.scenarios:
        names = set(args.scenarios.split(","))
        unknown = names - {scenario.name for scenario in chosen}
        if unknown:
            sys.exit(f"unknown scenario(s) {', '.join(sorted(unknown))}; known: {', '.join(s.name for s in chosen)}")
        chosen = [scenario for scenario in chosen if scenario.name in names]
    return chosen


def machine() -> dict:
    """What the figures depend on, recorded with them."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu_model = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), "unknown")
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": nginx,
        "open_files_hard_limit": raise_open_file_limit(),
        "load_average_at_start": os.getloadavg(),
    }


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _one_line(figures: dict) -> str:
    if "failed" in figures:
        return figures["failed"]
    cpu = figures.get("cpu_us_per_token")
    line = (
        f"{figures['tokens_per_s']:>9,.0f} tokens/s  TTFB p50 {figures['ttfb_p50_ms']} ms"
        f"  CPU {cpu if cpu is not None else '—'} µs/token  errors {figures['errors']}"
        f"  bad bytes {figures['mismatched_bytes']}  ({figures['seconds']:.1f} s)"
    )
    if figures["errors"]:
        line += f"  {figures['error_kinds']}"
    if figures["workers_replaced"]:
        line += "  A WORKER DIED: its CPU is missing from the figure"
    return line


@dataclass
class Bench:
    """What stays up for the whole run, and how each relay is started."""

    services: Services
    upstream: Service
    nginx: Service
    relay_copy: Path
    args: argparse.Namespace
    redis: Service | None = None  # started for the first relay-resume-redis run
    upstream_env: dict | None = None  # how relays reach the upstream, when not at its plain http port

    def measure_target(self, scenario: Scenario, name: str, repetition: int) -> dict:
        relay = redis = None
        if name == "direct":
            service = None
        elif name == "nginx":
            service = self.nginx
        else:
            args, env = self.args, dict(self.upstream_env or {})
            if name in RESUME_FORMATS:
                env["RELAY_RESUME_SECONDS"] = "60"  # without Redis, gunicorn runs one worker
            if name == "relay-resume-redis":
                if self.redis is None:
                    self.redis = self.services.redis()
                redis = self.redis
                env["REDIS_URL"] = f"redis://127.0.0.1:{redis.port}/0"
            relay = self.services.relay(self.upstream.port, args.worker_connections, args.workers, self.relay_copy, env)
            service = relay
        port = service.port if service else self.upstream.port
        try:
            return measure(scenario, target_for(name, port), service, self.upstream, repetition, redis)
        except RuntimeError as exc:
            return {"failed": str(exc)}
        finally:
            if relay is not None:
                self.services.stop(relay)

    def repetition(self, chosen: list[Scenario], repetition: int) -> dict:
        every = RELAY_FORMATS + RESUME_FORMATS
        formats = set(self.args.relay_formats.split(",")) if self.args.relay_formats else set(every)
        figures: dict = {}
        for scenario in chosen:
            figures[scenario.name] = {}
            for name in scenario.targets:
                if name in every and name not in formats:
                    continue
                result = self.measure_target(scenario, name, repetition)
                figures[scenario.name][name] = result
                run = f"{repetition + 1}/{self.args.repetitions}"
                _progress(f"  run {run} {scenario.name:<12} {name:<11} {_one_line(result)}")
        return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = selected_scenarios(args)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill cleans up like Ctrl-C does
    started = time.time()
    info = machine()
    workdir, relay = snapshot_in_new_workdir(args, "bench")
    modified = f", modified: {' '.join(relay['modified_files'])}" if relay["modified_files"] else ""
    _progress(f"benchmark of {relay['ref']} at {relay['commit']}{modified}")
    _progress(f"{len(chosen)} scenarios x {args.repetitions} runs; logs in {workdir}")
    repetitions = []
    try:
        with Services(workdir) as services:
            upstream = services.upstream()
            bench = Bench(services, upstream, services.nginx(upstream.port), workdir / "relay", args)
            if args.tls_upstream:
                front, ca_bundle = services.tls_front(upstream.port)
                bench.upstream_env = {"OPENAI_BASE_URL": f"https://127.0.0.1:{front.port}/v1",
                                      "REQUESTS_CA_BUNDLE": str(ca_bundle)}  # fmt: skip
            for repetition in range(args.repetitions):
                repetitions.append(report.compare(bench.repetition(chosen, repetition)))
    except KeyboardInterrupt:
        _progress(f"interrupted; everything started is stopped; logs in {workdir}")
        raise
    info["load_average_at_end"] = os.getloadavg()
    summary = report.summarize(repetitions)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "command": " ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])]),
        "duration_s": round(time.time() - started, 1),
        "machine": info,
        "relay": {"workers": args.workers, "worker_connections": args.worker_connections, **relay},
        "scenarios": [vars(scenario) for scenario in chosen],
        "medians": summary,
        "repetitions": repetitions,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / time.strftime("bench-%Y%m%d-%H%M%S.json", time.localtime(started))
    out.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    print(f"\nMedians of {args.repetitions} run(s); errors and bad bytes are totals. {results['date']}\n")
    print(report.figures_table(summary))
    print("\nThe harness itself (pace 1.00 = the upstream's full rate):\n")
    print(report.harness_table(summary))
    failed = any("failed" in figures for rep in repetitions for targets in rep.values() for figures in targets.values())
    if failed or args.keep_logs:
        print(f"\nlogs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"results: {out.relative_to(ROOT)}  ({results['duration_s']} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
