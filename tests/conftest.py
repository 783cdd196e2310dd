"""Shared fixtures: the socket-level fake upstream and real gunicorn relays started against it."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import bench.processes
from fake_upstream import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_KEY = "sk-relaytest-UPSTREAMSECRET-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe_config(tmp_path: Path, code: str) -> str:
    """A gunicorn config that is the real one, then ``code``, which may wrap its hooks to look inside a worker."""
    config = tmp_path / "probe.conf.py"
    config.write_text(f"exec(compile(open({str(ROOT / 'gunicorn.conf.py')!r}).read(), 'gunicorn.conf.py', 'exec'))\n{code}")
    return str(config)


def wait_until_up(proc: subprocess.Popen, probe, log, what: str, timeout: float) -> None:
    """Poll ``probe`` until it returns true; fail with ``log()`` if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log()}")
        try:
            if probe():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not become ready:\n{log()}")


def make_certificate(cert: Path, key: Path) -> None:
    """A self-signed certificate for 127.0.0.1: certbot's stand-in for the nginx site, and the https upstream's."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is missing (Debian package openssl): it makes the TLS tests' certificates")
    bench.processes.make_certificate(cert, key)


@dataclass
class StreamResult:
    status: int
    headers: dict[str, str]
    body: bytes
    pieces: list[tuple[float, bytes]]  # (seconds since the request was sent, bytes read)
    complete: bool  # the body ended with its final chunk (False: the connection was cut)

    def json(self):
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


class Relay:
    """A real gunicorn serving the relay in a subprocess, its stderr captured to a file."""

    def __init__(self, env: dict[str, str], tmp: Path, workers: int = 1, config: str = "gunicorn.conf.py"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"relay-{self.port}.log"
        full_env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", "/tmp"),
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "WEB_CONCURRENCY": str(workers),
            **env,
        }
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", config, "app:app"],
            cwd=ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        def healthy() -> bool:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            conn.request("GET", "/healthz")
            return conn.getresponse().status == 200

        wait_until_up(self.proc, healthy, self.log, "relay", timeout=20)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def access_lines(self) -> list[dict]:
        lines = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    pass
        return lines

    def wait_access_line(self, path: str, count: int = 1, timeout: float = 5.0, **match) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            found = [
                line for line in self.access_lines()
                if line.get("path") == path and all(line.get(k) == v for k, v in match.items())
            ]  # fmt: skip
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self._log.close()

    # -- clients --

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 30.0) -> StreamResult:
        """Send a request and read the answer piece by piece as it arrives, timing each piece."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        headers = dict(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        started = time.monotonic()
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        pieces, complete = [], True
        try:
            while True:
                piece = response.read1(65536)
                if not piece:
                    break
                pieces.append((time.monotonic() - started, piece))
        except (http.client.IncompleteRead, ConnectionError) as exc:
            if isinstance(exc, http.client.IncompleteRead) and exc.partial:
                pieces.append((time.monotonic() - started, exc.partial))
            complete = False
        finally:
            conn.close()
        result_headers = {name.lower(): value for name, value in response.getheaders()}
        return StreamResult(response.status, result_headers, b"".join(p for _, p in pieces), pieces, complete)

    def post(self, path: str, body, headers=None, **kwargs) -> StreamResult:
        return self.request("POST", path, body, headers, **kwargs)

    def stream(self, model: str, *, sse: bool = False, headers=None, **extra) -> StreamResult:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
        headers = dict(headers or {})
        if sse:
            headers["Accept"] = "text/event-stream"
        return self.post("/api/stream_chat_completion", body, headers)


@pytest.fixture(scope="session")
def upstream():
    server = FakeUpstream()
    yield server
    server.close()


@pytest.fixture(scope="session")
def tls_upstream(tmp_path_factory):
    """The fake upstream over https, with a self-signed certificate for 127.0.0.1; yields it and the
    certificate's path, for the relay's REQUESTS_CA_BUNDLE."""
    files = tmp_path_factory.mktemp("tls-upstream")
    make_certificate(files / "cert.pem", files / "key.pem")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files / "cert.pem", files / "key.pem")
    server = FakeUpstream(tls=context)
    yield server, files / "cert.pem"
    server.close()


@pytest.fixture(scope="session")
def relay_factory(tmp_path_factory, upstream):
    """Start (or reuse) a relay with the given settings; all are stopped at the end of the session,
    ``fresh`` ones too, so a test that fails (or forgets) before stopping its own leaves no gunicorn behind."""
    started: dict[tuple, Relay] = {}
    fresh_ones: list[Relay] = []
    tmp = tmp_path_factory.mktemp("relays")

    def start(workers: int = 1, fresh: bool = False, **env) -> Relay:
        settings = {
            "OPENAI_API_KEY": UPSTREAM_KEY,
            "OPENAI_BASE_URL": upstream.base_url,
            "RELAY_CONNECT_TIMEOUT": "2",
            "RELAY_READ_TIMEOUT": "10",
            **{name: str(value) for name, value in env.items()},
        }
        settings = {name: value for name, value in settings.items() if value != "<unset>"}
        key = (workers, tuple(sorted(settings.items())))
        if fresh or key not in started:
            relay = Relay(settings, tmp, workers=workers)
            if fresh:
                fresh_ones.append(relay)
                return relay
            started[key] = relay
        return started[key]

    yield start
    for relay in [*started.values(), *fresh_ones]:
        relay.stop()


@pytest.fixture(scope="session")
def relay(relay_factory) -> Relay:
    """The default relay: live mode against the fake upstream, one gevent worker."""
    return relay_factory()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed: ./test.sh installs it")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)
