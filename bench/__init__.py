"""Chat Relay's benchmark harness: a fake upstream, a load generator, and the scenarios of issue 7.

`python -m bench.run` runs it all; docs/BENCHMARKS.md has the figures and how to read them.
"""
