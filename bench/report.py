"""Turns the runs' raw figures into the comparison issue 7 asks for: every relay figure as a ratio to
the direct and nginx runs of the same repetition, medians over repetitions, and markdown tables.
`python -m bench.report bench/results/FILE.json` prints the tables of a finished run again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import median

# The figures compared with the floors, per repetition, before taking medians.
_RATIOS = {
    "tokens_per_s_vs_direct": ("tokens_per_s", "direct", "ratio"),
    "tokens_per_s_vs_nginx": ("tokens_per_s", "nginx", "ratio"),
    "cpu_vs_nginx": ("cpu_us_per_token", "nginx", "ratio"),
    "mem_vs_nginx": ("mem_kib_per_stream", "nginx", "ratio"),
    "ttfb_added_p50_ms": ("ttfb_p50_ms", "direct", "difference"),
    "ttfb_added_p99_ms": ("ttfb_p99_ms", "direct", "difference"),
    "ttfb_added_p50_vs_nginx_ms": ("ttfb_p50_ms", "nginx", "difference"),
}
_SUMMED = ("errors", "mismatched_bytes", "streams")  # a single failure in any repetition must show


def compare(repetition: dict) -> dict:
    """One repetition's {scenario: {target: figures}} with the ratios to its own floors added."""
    compared = {}
    for scenario, targets in repetition.items():
        compared[scenario] = {}
        for target, figures in targets.items():
            figures = dict(figures)
            for name, (metric, floor, kind) in _RATIOS.items():
                figures[name] = _relate(figures.get(metric), targets.get(floor, {}).get(metric), kind)
            compared[scenario][target] = figures
    return compared


def _relate(value, floor, kind):
    if value is None or floor is None:
        return None
    if kind == "difference":
        return round(value - floor, 2)
    return round(value / floor, 2) if floor else None


def summarize(repetitions: list[dict]) -> dict:
    """Medians over repetitions of every number (errors and bad bytes: totals)."""
    summary: dict = {}
    for repetition in repetitions:
        for scenario, targets in repetition.items():
            for target, figures in targets.items():
                slot = summary.setdefault(scenario, {}).setdefault(target, {})
                for name, value in figures.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        slot.setdefault(name, []).append(value)
    for targets in summary.values():
        for target, values in targets.items():
            targets[target] = {
                name: sum(series) if name in _SUMMED else round(median(series), 2) for name, series in values.items()
            }
    return summary


def _cell(value, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{suffix}"
    return f"{value:,}{suffix}"


def _table(summary: dict, titles: list[str], row) -> str:
    """A markdown table, one row per scenario and target; ``row(f)`` gives the (numeric) cells after those."""
    lines = [
        "| scenario | target | " + " | ".join(titles) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in titles) + " |",
    ]
    for scenario, targets in summary.items():
        for target, f in targets.items():
            lines.append(f"| {scenario} | {target} | " + " | ".join(row(f)) + " |")
    return "\n".join(lines)


def figures_table(summary: dict) -> str:
    """The figures of issue 7: throughput, CPU per token, added first-byte time, memory, correctness."""
    titles = ["tokens/s", "×direct", "×nginx", "CPU µs/token", "×nginx", "TTFB p50 / p99 ms",
              "added p50 / p99 ms", "KiB/stream", "peak open", "errors", "bad bytes"]  # fmt: skip
    return _table(
        summary,
        titles,
        lambda f: [
            _cell(f.get("tokens_per_s"), 0),
            _cell(f.get("tokens_per_s_vs_direct"), 2),
            _cell(f.get("tokens_per_s_vs_nginx"), 2),
            _cell(f.get("cpu_us_per_token")),
            _cell(f.get("cpu_vs_nginx"), 2),
            f"{_cell(f.get('ttfb_p50_ms'))} / {_cell(f.get('ttfb_p99_ms'))}",
            f"{_cell(f.get('ttfb_added_p50_ms'))} / {_cell(f.get('ttfb_added_p99_ms'))}",
            _cell(f.get("mem_kib_per_stream")),
            _cell(f.get("open_streams_peak"), 0),
            _cell(f.get("errors")),
            _cell(f.get("mismatched_bytes")),
        ],
    )


def harness_table(summary: dict) -> str:
    """Evidence that the fake upstream and the load generator are not what limits a run."""
    titles = ["pace", "end late p50 / p99 ms", "upstream timer late max ms", "upstream µs/token",
              "loadgen µs/token", "upstream new conns / answers"]  # fmt: skip
    return _table(
        summary,
        titles,
        lambda f: [
            _cell(f.get("pace"), 2),
            f"{_cell(f.get('end_late_p50_ms'))} / {_cell(f.get('end_late_p99_ms'))}",
            _cell(f.get("upstream_max_timer_late_ms")),
            _cell(f.get("upstream_cpu_us_per_token")),
            _cell(f.get("loadgen_cpu_us_per_token")),
            f"{_cell(f.get('upstream_new_connections'), 0)} / {_cell(f.get('upstream_answers'), 0)}",
        ],
    )


def main(paths: list[str]) -> None:
    for path in paths:
        results = json.loads(Path(path).read_text())
        relay = results["relay"]
        runs = len(results["repetitions"])
        print(f"{path}: {results['date']}, {relay.get('ref')} at {relay.get('commit')}, {runs} run(s)\n")
        print(figures_table(results["medians"]))
        print()
        print(harness_table(results["medians"]))
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
