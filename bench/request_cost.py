"""`python -m bench.request_cost`: the relay's CPU for one upstream request, measured alone.

Sends one-token streaming requests through ``upstream.UpstreamClient`` to the fake upstream
(bench.upstream) over a reused connection, one at a time, and prints the client's CPU per request:
preparing it, sending it, parsing the reply's head and reading its body. This is the part of a
stream's set-up that the chat benchmarks cannot separate from the rest.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()  # as under gunicorn's gevent worker

import argparse  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import orjson  # noqa: E402

from bench.answers import StreamSpec, request_body  # noqa: E402
from bench.processes import ROOT  # noqa: E402

sys.path.insert(0, str(ROOT))
from upstream import UpstreamBody, UpstreamClient  # noqa: E402

WARM_UP = 200


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.request_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    # Not bench.processes.Services: its child handling blocks under the gevent patching this needs.
    upstream = subprocess.Popen([sys.executable, "-m", "bench.upstream", "--port", "0"], stdout=subprocess.PIPE, cwd=ROOT)
    try:
        port = int(upstream.stdout.readline())
        client = UpstreamClient(
            f"http://127.0.0.1:{port}/v1", "sk-bench", connect_timeout=5, read_timeout=30, retries=0, pool_size=10
        )
        payloads = [orjson.loads(request_body(StreamSpec(seed, 1, 0, 0))) for seed in range(WARM_UP + args.requests)]

        def one(payload: dict) -> None:
            response = client.open_stream("/chat/completions", payload)
            body = UpstreamBody(response)
            while body.read():
                pass
            body.finish()
            body.close()
            response.close()

        for payload in payloads[:WARM_UP]:
            one(payload)
        started = time.process_time()
        for payload in payloads[WARM_UP:]:
            one(payload)
        cpu_ms = (time.process_time() - started) / args.requests * 1000
        print(f"{cpu_ms:.3f} ms of client CPU per upstream request ({args.requests} requests)")
    finally:
        upstream.terminate()
        upstream.wait(10)


if __name__ == "__main__":
    main()
