"""Starts what a benchmark run measures — the fake upstream, nginx in front of it, the relay under
test — each in its own session with its output in the run's work folder, and stops every one of
them, on success, failure or Ctrl-C. A child also gets SIGTERM if the harness itself dies.
"""

from __future__ import annotations

import ctypes
import http.client
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import certifi

from bench.procstats import descendants

ROOT = Path(__file__).resolve().parent.parent
START_SECONDS = 30
STOP_SECONDS = 10
_PR_SET_PDEATHSIG = 1


@dataclass
class Service:
    name: str
    port: int
    proc: subprocess.Popen
    log_path: Path

    def workers(self) -> list[int]:
        return descendants(self.proc.pid)

    def tree(self) -> list[int]:
        return [self.proc.pid, *self.workers()]

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends it SIGTERM when the harness dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Services:
    """Owns every process it starts; leaving the ``with`` block stops them all."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self._running: list[Service] = []

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *_exc) -> None:
        for service in reversed(self._running):
            self.stop(service)

    def _spawn(self, name: str, argv: list[str], *, port=0, env=None, pipe_stdout=False, cwd=ROOT) -> Service:
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if pipe_stdout else log,
                stderr=log, start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        service = Service(name, port, proc, log_path)
        self._running.append(service)
        return service

    def _fresh_dir(self, name: str) -> Path:
        path = self.workdir / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
        return path

    def stop(self, service: Service) -> None:
        """SIGTERM to the whole process group, SIGKILL if it has not gone within STOP_SECONDS."""
        if service in self._running:
            self._running.remove(service)
        for signum in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(service.proc.pid, signum)
            except ProcessLookupError:
                pass
            try:
                service.proc.wait(STOP_SECONDS)
                break
            except subprocess.TimeoutExpired:
                continue
        if service.proc.stdout is not None:
            service.proc.stdout.close()

    def upstream(self, close_after_answer: bool = False) -> Service:
        argv = [sys.executable, "-m", "bench.upstream", "--port", "0"]
        service = self._spawn("upstream", argv + ["--close-after-answer"] * close_after_answer, pipe_stdout=True)
        line = _read_line(service, START_SECONDS)
        service.port = int(line)
        return service

    def nginx(self, upstream_port: int) -> Service:
        port = free_port()
        conf = self.workdir / "nginx.conf"
        conf.write_text(nginx_config(self.workdir, port, upstream_port))
        service = self._spawn("nginx", _nginx_argv(self.workdir, conf, "nginx-error.log"), port=port)
        _wait_ready(service, "/healthz")  # proxied: the fake upstream's 404 proves the path works
        return service

    def tls_front(self, upstream_port: int) -> tuple[Service, Path]:
        """nginx serving the fake upstream over https, as api.openai.com is served; returns it and the
        CA bundle a relay must trust: certifi's public CAs, which a relay calling api.openai.com
        loads, plus the front's self-signed certificate for 127.0.0.1."""
        port, folder = free_port(), self._fresh_dir("tls-front")
        certificate, key, bundle = folder / "cert.pem", folder / "key.pem", folder / "ca-bundle.pem"
        make_certificate(certificate, key)
        bundle.write_text(Path(certifi.where()).read_text() + certificate.read_text())
        conf = folder / "nginx.conf"
        conf.write_text(nginx_config(folder, port, upstream_port, tls=(certificate, key)))
        service = self._spawn("tls-front", _nginx_argv(folder, conf, "error.log"), port=port)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:  # listening is enough: the plain nginx has proved the proxying
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return service, bundle
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"the TLS front did not start:\n{service.log_tail()}")

    def redis(self) -> Service:
        port = free_port()
        argv = [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self._fresh_dir("redis"))]  # fmt: skip
        service = self._spawn("redis", argv, port=port)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return service
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start:\n{service.log_tail()}")

    def relay(
        self, upstream_port: int, worker_connections: int, workers: int, source: Path = ROOT, extra_env=None,
        config: str = "gunicorn.conf.py",
    ) -> Service:
        """gunicorn serving the relay whose files are in ``source`` (another checkout, for an A/B)."""
        port = free_port()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "OPENAI_API_KEY": "sk-bench",
            "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "WEB_CONCURRENCY": str(workers),
            "RELAY_WORKER_CONNECTIONS": str(worker_connections),
            "RELAY_READ_TIMEOUT": "300",  # the slow scenario's streams are silent for a second at a time
            "RELAY_GRACEFUL_TIMEOUT": "2",  # stopping between scenarios should not wait on stragglers
            "PROMETHEUS_MULTIPROC_DIR": str(self._fresh_dir("relay-metrics")),  # removed with the work folder
            **(extra_env or {}),
        }
        argv = [sys.executable, "-m", "gunicorn", "-c", config, "app:app"]
        service = self._spawn("relay", argv, env=env, port=port, cwd=source)
        _wait_ready(service, "/healthz")
        deadline = time.monotonic() + START_SECONDS
        while len(service.workers()) < workers and time.monotonic() < deadline:  # /healthz needs only one
            time.sleep(0.1)
        return service


def _read_line(service: Service, timeout: float) -> str:
    """The first line a child prints (the upstream's port), or an error with the child's log."""
    os.set_blocking(service.proc.stdout.fileno(), False)
    deadline = time.monotonic() + timeout
    buffered = b""
    while time.monotonic() < deadline and b"\n" not in buffered:
        if service.proc.poll() is not None:
            break
        buffered += service.proc.stdout.read() or b""
        time.sleep(0.05)
    if b"\n" not in buffered:
        raise RuntimeError(f"{service.name} did not start:\n{service.log_tail()}")
    return buffered.split(b"\n", 1)[0].decode()


def _wait_ready(service: Service, path: str) -> None:
    """Until the service answers ``path`` over HTTP (any status: it is up and proxying)."""
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            raise RuntimeError(f"{service.name} exited with {service.proc.returncode}:\n{service.log_tail()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=2)
            conn.request("GET", path)
            conn.getresponse().read()
            conn.close()
            return
        except (OSError, http.client.HTTPException):
            time.sleep(0.1)
    raise RuntimeError(f"{service.name} did not answer {path} within {START_SECONDS}s:\n{service.log_tail()}")


def make_certificate(cert: Path, key: Path) -> None:
    """A self-signed certificate for 127.0.0.1, valid for a day, with the openssl command."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip


def _nginx_argv(prefix: Path, conf: Path, error_log: str) -> list[str]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return [nginx, "-p", str(prefix), "-e", str(prefix / error_log), "-c", str(conf), "-g", "daemon off;"]


def nginx_config(workdir: Path, port: int, upstream_port: int, tls: tuple[Path, Path] | None = None) -> str:
    """nginx as a plain streaming proxy: the floor any relay is measured against.

    Two workers, like the relay's two gunicorn workers on this 2-core machine, with `reuseport` so the
    kernel splits connections evenly between them; each worker's connection count covers its share of
    10,000 streams (two connections each) within the open-file hard limit. With ``tls`` (certificate,
    key) it serves https instead.
    """
    listen_tls, certificate = "", ""
    if tls is not None:
        listen_tls = " ssl"
        certificate = f"ssl_certificate {tls[0]};\n        ssl_certificate_key {tls[1]};"
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    files = hard if hard != resource.RLIM_INFINITY else 65536
    temp = {name: workdir / f"nginx-{name}" for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    return f"""
worker_processes 2;
worker_rlimit_nofile {files};
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{
    worker_connections {files - 64};
}}
http {{
    access_log off;
    client_body_temp_path {temp['body']};
    proxy_temp_path {temp['proxy']};
    fastcgi_temp_path {temp['fastcgi']};
    uwsgi_temp_path {temp['uwsgi']};
    scgi_temp_path {temp['scgi']};
    upstream fake_upstream {{
        server 127.0.0.1:{upstream_port};
        keepalive 1024;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port}{listen_tls} backlog=4096 reuseport;
        {certificate}
        location / {{
            proxy_pass http://fake_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""
