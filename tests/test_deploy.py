"""The shipped deployment files work: deploy/nginx.conf in front of a real relay, the systemd unit, HUP.

nginx is Debian's /usr/sbin/nginx, run from a tmp prefix with the site file itself included (only its
ports, relay address and file directories changed); the relays are real gunicorns.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ROOT, Relay, free_port, make_certificate, wait_until_up
from fake_upstream import FakeUpstream, sse_answer, stream_script
from settings import load_settings
from upstream import RETRY_CAP_SECONDS
from test_token_stream import TOKENS, assert_arrives_token_by_token

DEPLOY = ROOT / "deploy"
NGINX = "/usr/sbin/nginx"
DEFAULTS = load_settings({"OPENAI_API_KEY": "sk-defaults"})  # the relay's settings when none are given
# A second loopback address: a caller connecting from it is told apart from nginx (127.0.0.1).
CALLER_ADDRESS = "127.0.0.2"


def site_config(relay_ports: list[int], listen_port: int, files: Path, tls_port: int | None = None) -> str:
    """deploy/nginx.conf with its ports, relay addresses and log (and certificate) directories changed.

    With ``tls_port`` its TLS lines are uncommented as the file tells an operator to, and the
    certificate is read from ``files``.
    """
    text = (DEPLOY / "nginx.conf").read_text()
    substitutions = [
        (r"^(\s*)listen 80;$", rf"\g<1>listen 127.0.0.1:{listen_port};", 1),
        (r"^(\s*)server 127\.0\.0\.1:8000;$", "\n".join(rf"\g<1>server 127.0.0.1:{port};" for port in relay_ports), 1),
        (r"^(\s*)access_log /var/log/nginx/", rf"\g<1>access_log {files}/", 1),
    ]
    if tls_port is not None:
        substitutions = [
            (r"^(\s*)#(?=\S)", r"\g<1>", 6),
            (r"^(\s*)listen 443 ssl http2;$", rf"\g<1>listen 127.0.0.1:{tls_port} ssl http2;", 1),
            (r"/etc/letsencrypt/live/chat\.example\.com/", f"{files}/", 2),
            *substitutions,
        ]
    for pattern, replacement, expected in substitutions:
        text, count = re.subn(pattern, replacement, text, flags=re.M)
        assert count == expected, f"deploy/nginx.conf should match {pattern!r} {expected} times, not {count}"
    return text


class Nginx:
    """Debian's nginx in the foreground, its whole prefix in a tmp dir, serving deploy/nginx.conf."""

    request = Relay.request  # the relay's timed clients, pointed at nginx's port
    post = Relay.post
    stream = Relay.stream

    def __init__(self, relay: Relay | list[Relay], tmp: Path, tls: bool = False):
        relays = relay if isinstance(relay, list) else [relay]
        if not os.access(NGINX, os.X_OK):
            pytest.fail(f"{NGINX} is missing: install Debian's nginx-light (./test.sh does)")
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.tmp = tmp
        if tls:
            make_certificate(tmp / "fullchain.pem", tmp / "privkey.pem")
        (tmp / "chat-relay.conf").write_text(site_config([r.port for r in relays], self.port, tmp, self.tls_port))
        # The `http` block of Debian's nginx.conf (gzip on), plus the gzip_types line many sites add:
        # the site must stream anyway. Every path nginx writes to is in tmp.
        (tmp / "nginx.conf").write_text(f"""
            daemon off;
            pid {tmp}/nginx.pid;
            error_log {tmp}/error.log info;
            worker_processes 1;
            events {{ worker_connections 1024; }}
            http {{
                client_body_temp_path {tmp}/client_body;
                proxy_temp_path {tmp}/proxy;
                fastcgi_temp_path {tmp}/fastcgi;
                uwsgi_temp_path {tmp}/uwsgi;
                scgi_temp_path {tmp}/scgi;
                access_log {tmp}/access.log;
                gzip on;
                gzip_types text/plain text/event-stream application/json;
                include {tmp}/chat-relay.conf;
            }}
        """)
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        def listening() -> bool:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True

        wait_until_up(self.proc, listening, self.error_log, "nginx", timeout=10)

    def error_log(self) -> str:
        path = self.tmp / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def access_log(self) -> str:
        return (self.tmp / "chat-relay.access.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)


def request_from(address: str, port: int, path: str, headers: dict[str, str]) -> http.client.HTTPResponse:
    """A GET to 127.0.0.1:port sent from another loopback ``address``; the body is read."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(address, 0))
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        response.read()
        return response
    finally:
        conn.close()


@pytest.fixture(scope="module")
def proxied_relay(relay_factory):
    """The relay as deploy/chat-relay.service runs it: trusting one proxy hop."""
    return relay_factory(RELAY_TRUSTED_PROXIES="1")


@pytest.fixture(scope="module")
def nginx(proxied_relay, tmp_path_factory):
    server = Nginx(proxied_relay, tmp_path_factory.mktemp("nginx"))
    yield server
    server.stop()


def test_nginx_site_passes_each_token_on_as_it_arrives(nginx, upstream):
    model = upstream.script(stream_script(sse_answer(TOKENS), delay=0.15))
    # Like a browser: it asks for gzip, which must not make nginx hold tokens back.
    result = nginx.stream(model, headers={"Accept-Encoding": "gzip, deflate, br"})
    assert result.status == 200, result.body
    assert "content-encoding" not in result.headers, "nginx compressed (and so buffered) the stream"
    assert result.text == "Hello, world!" and result.complete
    assert_arrives_token_by_token(result, len(TOKENS), 0.15)


def test_nginx_site_passes_each_sse_event_on_as_it_arrives(nginx, upstream):
    model = upstream.script(stream_script(sse_answer(TOKENS), delay=0.15))
    result = nginx.stream(model, sse=True, headers={"Accept-Encoding": "gzip"})
    assert result.status == 200 and result.complete
    assert result.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert_arrives_token_by_token(result, len(TOKENS), 0.15)


def test_the_relays_own_page_behind_nginx_on_any_port_is_its_own_origin(nginx, upstream):
    """Same origin is scheme, host and port: nginx must pass the port the browser used on to the relay."""
    model = upstream.script(stream_script(sse_answer(TOKENS)))
    result = nginx.stream(model, headers={"Origin": f"http://127.0.0.1:{nginx.port}"})
    assert result.status == 200 and result.text == "Hello, world!", result.body
    result = nginx.stream(model, headers={"Origin": "http://127.0.0.1:1"})
    assert result.status == 403 and result.json()["error"]["code"] == "origin_not_allowed"


def test_relay_logs_the_address_nginx_saw_and_ignores_a_forged_x_forwarded_for(nginx, proxied_relay):
    for forged in (None, "203.0.113.7"):
        request_id = f"deploy-caller-{forged or 'plain'}"
        headers = {"X-Request-ID": request_id, **({"X-Forwarded-For": forged} if forged else {})}
        assert request_from(CALLER_ADDRESS, nginx.port, "/healthz", headers).status == 200
        [line] = proxied_relay.wait_access_line("/healthz", request_id=request_id)
        assert line["caller"] == CALLER_ADDRESS, (
            f"with X-Forwarded-For {forged!r} from {CALLER_ADDRESS} the relay logged caller {line['caller']!r}"
        )


def test_nginx_passes_the_callers_request_id_or_makes_one_both_logs_share(nginx, proxied_relay):
    given = nginx.request("GET", "/healthz", headers={"X-Request-ID": "deploy-rid-given"})
    assert given.headers["x-request-id"] == "deploy-rid-given"
    assert proxied_relay.wait_access_line("/healthz", request_id="deploy-rid-given")

    made = nginx.request("GET", "/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made), f"expected nginx's $request_id, got {made!r}"
    assert proxied_relay.wait_access_line("/healthz", request_id=made)
    wait_for(lambda: f"rid={made} " in nginx.access_log(), 5)  # nginx logs once the response is out
    assert f"rid={made} " in nginx.access_log(), "nginx's access log lacks the request ID the relay used"


def test_client_abort_through_nginx_closes_the_upstream_while_silent(nginx, upstream):
    script_done = threading.Event()

    def first_token_then_silence(conn):
        conn.start()
        for event in sse_answer(["first"], done=False)[:2]:  # the role chunk, then one token
            conn.send(event)
        conn.sleep_unless_hangup(8.0)
        script_done.set()

    model = upstream.script(first_token_then_silence)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    conn = http.client.HTTPConnection("127.0.0.1", nginx.port, timeout=10)
    conn.request("POST", "/api/stream_chat_completion", body=body, headers={"Content-Type": "application/json"})
    assert conn.getresponse().read1(100) == b"first"
    aborted_at = time.monotonic()
    conn.close()
    assert script_done.wait(10)
    [exchange] = upstream.seen(model)
    assert exchange.closed_by_peer_at is not None, "the upstream request stayed open after the caller left"
    assert exchange.closed_by_peer_at - aborted_at < 2.0


def test_nginx_site_with_its_tls_lines_uncommented_serves_https_and_redirects_http(
    proxied_relay, upstream, tmp_path
):
    server = Nginx(proxied_relay, tmp_path, tls=True)
    try:
        redirect = server.request("GET", "/api/stream_chat_completion")
        assert redirect.status == 301 and redirect.headers["location"].startswith("https://"), redirect.headers

        model = upstream.script(stream_script(sse_answer(TOKENS)))
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
        tls = ssl.create_default_context(cafile=tmp_path / "fullchain.pem")
        conn = http.client.HTTPSConnection("127.0.0.1", server.tls_port, timeout=10, context=tls)
        conn.request("POST", "/api/stream_chat_completion", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"Hello, world!")
        assert response.getheader("Strict-Transport-Security") == "max-age=31536000"
        assert conn.sock.version() in ("TLSv1.2", "TLSv1.3")
        conn.close()
    finally:
        server.stop()


def test_nginx_site_keeps_metrics_to_loopback(nginx, proxied_relay):
    assert request_from(CALLER_ADDRESS, nginx.port, "/metrics", {}).status == 403
    nginx.request("GET", "/metrics", headers={"X-Request-ID": "deploy-metrics-local"})
    assert proxied_relay.wait_access_line("/metrics", request_id="deploy-metrics-local"), "loopback was refused"


def test_nginx_site_waits_longer_than_the_relay_for_a_silent_upstream():
    """Before the first byte the relay may try the upstream RELAY_RETRIES + 1 times, each up to its
    connect and read timeouts, with up to RETRY_CAP_SECONDS between, then wait a read timeout more for
    the first event: nginx must not give up first."""
    text = (DEPLOY / "nginx.conf").read_text()
    [read_timeout] = re.findall(r"^\s*proxy_read_timeout (\d+)s;", text, flags=re.M)
    tries = DEFAULTS.retries + 1
    relays_longest = (
        tries * (DEFAULTS.connect_timeout + DEFAULTS.read_timeout) + DEFAULTS.retries * RETRY_CAP_SECONDS + DEFAULTS.read_timeout
    )
    assert int(read_timeout) > relays_longest > DEFAULTS.heartbeat_seconds


def test_nginx_refuses_a_body_too_large_for_it_with_the_relays_json(nginx):
    """With CORS headers: a page on another origin would otherwise see a network error, not the 413."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * (3 << 20)}]}).encode()
    for origin in [None, "https://app.example.com"]:
        headers = {"Content-Type": "application/json", "X-Request-ID": "big-body-1", **({"Origin": origin} if origin else {})}
        result = nginx.request("POST", "/api/stream_chat_completion", body=body, headers=headers)
        assert result.status == 413 and result.headers["content-type"].startswith("application/json"), result.text[:200]
        assert result.json()["error"]["code"] == "payload_too_large"
        assert result.headers["x-request-id"] == "big-body-1"
        assert result.headers.get("access-control-allow-origin") == origin, result.headers
        if origin:
            assert "X-Request-ID" in result.headers["access-control-expose-headers"] and result.headers["vary"] == "Origin"


def unit_options(path: Path) -> dict[str, list[str]]:
    """The options of a systemd unit file, each with its values in order."""
    options: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            name, _, value = line.partition("=")
            options.setdefault(name.strip(), []).append(value.strip())
    return options


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    # verify insists that ExecStart's program exists: point the unit at this checkout's venv.
    unit = (DEPLOY / "chat-relay.service").read_text()
    unit = unit.replace("/opt/chat-relay/venv", str(ROOT / ".venv")).replace("/opt/chat-relay/app", str(ROOT))
    (tmp_path / "chat-relay.service").write_text(unit)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "chat-relay.service")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    # verify exits 0 even for unknown options or unparseable values; it only prints them.
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, f"systemd-analyze verify complained:\n{output}"


def test_systemd_unit_stops_gracefully_reloads_with_hup_and_runs_unprivileged():
    options = unit_options(DEPLOY / "chat-relay.service")
    assert options["KillSignal"] == ["SIGTERM"] and options["KillMode"] == ["mixed"]
    # gunicorn.conf.py kills workers 5 s after RELAY_GRACEFUL_TIMEOUT; systemd must wait longer.
    assert int(options["TimeoutStopSec"][0]) > DEFAULTS.graceful_timeout + 5
    assert options["ExecReload"] == ["/bin/kill -s HUP $MAINPID"]
    assert options["ExecStart"][0].endswith("gunicorn -c gunicorn.conf.py app:app")
    assert options["User"] != ["root"] and options["EnvironmentFile"] == ["/etc/chat-relay/env"]
    assert int(options["LimitNOFILE"][0]) >= 2 * DEFAULTS.worker_connections * 16 + 64, "too few for 16 workers"
    for sandboxing in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert options[sandboxing] == ["yes"], sandboxing
    assert options["ProtectSystem"] == ["strict"]


@pytest.mark.parametrize("through_nginx", [False, True], ids=["direct", "through_nginx"])
def test_hup_reload_finishes_50_open_streams_exactly_and_keeps_serving(
    relay_factory, upstream, tmp_path, through_nginx
):
    tokens = [f"token{index:02d} " for index in range(16)]  # 16 x 0.15 s: each stream lasts about 2.4 s
    model = upstream.script(stream_script(sse_answer(tokens), delay=0.15))
    quick = upstream.script(stream_script(sse_answer(TOKENS)))
    relay = relay_factory(fresh=True, workers=2)
    front = Nginx(relay, tmp_path) if through_nginx else relay
    try:
        with ThreadPoolExecutor(max_workers=50) as pool:
            # Through nginx, this leaves idle keep-alive connections to the workers about to be replaced.
            list(pool.map(lambda _: front.stream(quick), range(20)))
            streams = [pool.submit(front.stream, model) for _ in range(50)]
            assert len(upstream.wait_seen(model, 50, timeout=10)) == 50, "the 50 streams did not all start"
            os.kill(relay.proc.pid, signal.SIGHUP)
            reloaded_at, during = time.monotonic(), []
            while time.monotonic() < reloaded_at + 2.0:  # new workers boot, old ones stop accepting
                during.append(front.stream(quick))
                time.sleep(0.05)
            results = [stream.result(timeout=30) for stream in streams]

        expected = (200, True, "".join(tokens))
        broken = [(r.status, r.complete, r.text) for r in results if (r.status, r.complete, r.text) != expected]
        assert not broken, f"{len(broken)} of 50 streams broke across the reload, e.g. {broken[0]}"
        failed = [(r.status, r.text) for r in during if (r.status, r.text) != (200, "Hello, world!")]
        assert not failed, f"{len(failed)} of {len(during)} requests failed during the reload: {failed[:3]}"
        assert front.stream(quick).text == "Hello, world!", "the relay stopped serving after the reload"
        # The old workers leave once their streams are done, long before RELAY_GRACEFUL_TIMEOUT (30 s).
        wait_for(lambda: relay.log().count("Worker exiting") >= 2, 15)
        log = relay.log()
        assert "Handling signal: hup" in log and log.count("Booting worker") == 4, f"no reload happened:\n{log}"
        assert log.count("Worker exiting") >= 2 and "graceful timeout" not in log, f"old workers lingered:\n{log}"
    finally:
        if front is not relay:
            front.stop()
        stop_after_reload(relay)


def test_streams_that_start_after_a_reload_are_not_cut_at_the_old_workers_deadline(
    relay_factory, upstream, tmp_path
):
    tokens = [f"token{index:02d} " for index in range(16)]  # 16 x 0.15 s: each stream lasts about 2.4 s
    model = upstream.script(stream_script(sse_answer(tokens), delay=0.15))
    # Old workers end their streams 4 s after the reload: the first wave ends before that, the second,
    # started as the first ends, after it.
    relay = relay_factory(fresh=True, workers=2, RELAY_GRACEFUL_TIMEOUT="4")
    front = Nginx(relay, tmp_path)
    try:
        with ThreadPoolExecutor(max_workers=20) as pool:
            first = [pool.submit(front.stream, model) for _ in range(20)]
            assert len(upstream.wait_seen(model, 20, timeout=10)) == 20, "the first 20 streams did not all start"
            os.kill(relay.proc.pid, signal.SIGHUP)
            assert all(stream.result(timeout=30).text == "".join(tokens) for stream in first)
            second = [stream.result(timeout=30) for stream in [pool.submit(front.stream, model) for _ in range(20)]]
        cut = [result.text for result in second if (result.complete, result.text) != (True, "".join(tokens))]
        assert not cut, f"{len(cut)} of 20 streams started after the reload were cut, e.g. {cut[0]!r}"
    finally:
        front.stop()
        stop_after_reload(relay)


def test_nginx_retries_a_post_once_when_a_kept_alive_relay_connection_closes_under_it(tmp_path):
    """The reload race, made certain: an old worker closes a kept-alive connection just as nginx sends
    the next stream on it. nginx must send that POST again on a new connection, not answer 502;
    one that fails there too gets the 502, and one whose answer had begun is never sent again."""
    relay = FakeUpstream()  # stands in for the relay, so the test decides what each connection does
    answered: set[int] = set()

    def answer_once_per_connection(conn):
        if conn.exchange.connection in answered:
            conn.keep_alive = False  # read the request, then close: what an exiting worker does
            return
        answered.add(conn.exchange.connection)
        conn.start(content_type="text/plain; charset=utf-8")
        conn.send(b"answered")
        conn.end()

    def never_answer(conn):
        conn.keep_alive = False

    def start_then_hang_up(conn):
        conn.start(content_type="text/plain; charset=utf-8", keep_alive=False)
        conn.send(b"half")

    model = relay.script(answer_once_per_connection)
    broken = relay.script(never_answer)
    started = relay.script(start_then_hang_up)
    front = Nginx(relay, tmp_path)  # type: ignore[arg-type]  # it only needs the port
    try:
        first, second = front.stream(model), front.stream(model)
        assert (first.status, first.text) == (200, "answered")
        assert (second.status, second.text) == (200, "answered"), "nginx answered a closed keep-alive with an error"
        exchanges = relay.seen(model)
        assert [e.connection for e in exchanges][:2] == [exchanges[0].connection] * 2, "nginx did not reuse"
        assert len(exchanges) == 3 and exchanges[2].connection != exchanges[0].connection, "not sent again"

        failed = front.stream(broken)
        assert failed.status == 502
        assert len(relay.seen(broken)) == 2, "a POST failing on a kept-alive and then a new connection"

        cut = front.stream(started)  # once the relay's answer has begun, never again
        assert (cut.status, cut.text, cut.complete) == (200, "half", False)
        assert len(relay.seen(started)) == 1, "a POST was sent again after its answer had started"
    finally:
        front.stop()
        relay.close()


def stop_after_reload(relay: Relay) -> None:
    """Stop a relay once its reload is over: the master handles signals only after the old workers have
    gone, and a stop sent earlier makes it start fresh workers and then wait out their graceful timeout."""
    wait_for(lambda: relay.log().count("Worker exiting") >= 2, 15)
    relay.stop()


def wait_for(condition, timeout: float) -> None:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; the caller asserts."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)


def test_two_relays_behind_nginx_share_one_rate_limit_through_redis(relay_factory, upstream, redis_url, tmp_path):
    settings = {"RELAY_RATE_LIMIT": "6/minute", "REDIS_URL": redis_url, "RELAY_TRUSTED_PROXIES": "1"}
    first, second = relay_factory(fresh=True, **settings), relay_factory(fresh=True, **settings)
    front = Nginx([first, second], tmp_path)
    try:
        model = upstream.script(stream_script(sse_answer(["ok"])))
        statuses = [front.stream(model).status for _ in range(8)]
        assert statuses == [200] * 6 + [429] * 2, statuses
        served = [len(relay.wait_access_line("/api/stream_chat_completion", model=model)) for relay in (first, second)]
        assert all(served), f"nginx should have spread the requests over both relays: {served}"
    finally:
        front.stop()
        first.stop()
        second.stop()
