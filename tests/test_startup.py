"""Starting the relay: modes, bad settings refused with one line, and demo mode end to end."""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import certifi
import pytest

from conftest import ROOT, Relay, free_port, probe_config
from settings import SettingsError, load_settings

BASE = {"OPENAI_API_KEY": "sk-test-key-for-settings"}


def start_gunicorn(env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "HOST": "127.0.0.1",
                "PORT": str(free_port()), **env}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


@pytest.mark.parametrize(
    "name, value",
    [
        ("RELAY_READ_TIMEOUT", "soon"),
        ("RELAY_CONNECT_TIMEOUT", "-1"),
        ("RELAY_RETRIES", "many"),
        ("RELAY_RATE_LIMIT", "lots/minute"),
        ("OPENAI_BASE_URL", "ftp://example"),
        ("RELAY_MAX_BODY_BYTES", "1.5"),
        ("RELAY_ALLOWED_ORIGINS", "example.com"),
        ("REDIS_URL", "http://localhost"),
        ("WEB_CONCURRENCY", "0"),
        ("LOG_LEVEL", "LOUD"),
        ("RELAY_MAX_TOKENS_FIELD", "max_output_tokens"),
        ("RELAY_RESUME_SECONDS", "-5"),
        ("REQUESTS_CA_BUNDLE", "/nonexistent/ca.pem"),
        ("SSL_CERT_FILE", str(ROOT / "README.md")),  # readable, but no certificate in it
        ("REQUESTS_CA_BUNDLE", str(ROOT / "tests")),  # a directory: OpenSSL would take it unread
        ("OPENAI_BASE_URL", "http://[::1/v1"),  # urlsplit raises on the open bracket
        ("OPENAI_BASE_URL", "http://127.0.0.1:99999/v1"),  # urlsplit checks a port only when asked
        ("OPENAI_BASE_URL", "http://127.0.0.1:abc/v1"),
        ("OPENAI_BASE_URL", "http://user:pw@127.0.0.1:8080/v1"),  # Basic auth would replace the key
        ("RELAY_ALLOWED_ORIGINS", "http://["),
        ("REDIS_URL", "redis://["),
        ("REDIS_URL", "redis://127.0.0.1:abc/0"),
        ("REDIS_URL", "redis://127.0.0.1:6379/db3"),  # redis-py reads a database it cannot parse as 0
        ("REDIS_URL", "redis://127.0.0.1:6379/3/extra"),
        ("REDIS_URL", "redis://127.0.0.1:6379?db=x"),  # redis-py raised in every worker: 127 lines of tracebacks
        ("REDIS_URL", "redis://:pw@/0"),  # no host: redis-py would take localhost:6379 unasked
        ("RELAY_RATE_LIMIT", "0/minute"),  # would refuse every request
        ("RELAY_RATE_LIMIT", "5/minute;0/day"),
        ("RELAY_ACCESS_TOKENS", ","),  # names no token: read as unset, the relay would start open
        ("RELAY_ACCESS_TOKENS", " , "),
        ("RELAY_ACCESS_TOKENS", ""),  # `RELAY_ACCESS_TOKENS=${TOKENS}` with TOKENS unset: open, unmeant
        ("RELAY_ACCESS_TOKENS", "  "),
        ("RELAY_MODELS", ","),  # names no model: read as unset, any model would be allowed
        ("RELAY_ALLOWED_ORIGINS", ","),
        ("HOST", "not a host!"),
        ("PROMETHEUS_MULTIPROC_DIR", "/nonexistent/dir"),
        ("OPENAI_BASE_URL", "http://exa mple.com/v1"),
        ("OPENAI_BASE_URL", "http://☃.example/v1"),  # Python's IDNA 2003 codec takes it, requests would not
        ("RELAY_HEARTBEAT_SECONDS", "1e-9"),  # the watch would tick every half nanosecond
        ("RELAY_READ_TIMEOUT", "0.01"),
        ("OPENAI_API_KEY", "sk-one-half\r\nsk-other-half"),  # requests would refuse the header: 502 each time
    ],
)
def test_a_bad_setting_stops_gunicorn_with_one_line_naming_it(name, value):
    result = start_gunicorn({**BASE, name: value})
    assert result.returncode != 0
    output = (result.stdout + result.stderr).strip()
    assert output.count("\n") == 0, f"expected one line, got:\n{output}"
    assert name in output and "Traceback" not in output


@pytest.mark.parametrize(
    "name, attribute, with_empty_items, parsed",
    [
        ("RELAY_ACCESS_TOKENS", "access_tokens", "tok-a,,tok-b,", ("tok-a", "tok-b")),
        ("RELAY_MODELS", "models", " a , ,b", ("a", "b")),
        ("RELAY_ALLOWED_ORIGINS", "allowed_origins", ",https://app.example.com,,", ("https://app.example.com",)),
    ],
)
def test_a_list_setting_that_names_no_item_is_refused_but_unset_or_blank_keeps_the_default_but_for_tokens(
    name, attribute, with_empty_items, parsed
):
    """Commas alone are a value someone typed, not an unset variable: reading them as unset would turn
    the access tokens or an allow-list off, the opposite of what was meant."""
    for value in [",", " , ", ",,"]:
        with pytest.raises(SettingsError) as refused:
            load_settings({**BASE, name: value})
        message = str(refused.value)
        assert name in message and "comma-separated" in message and "unset" in message, message
    for value in ["", "   "]:  # empty or blank is unset, as for every other variable, except the tokens
        if name == "RELAY_ACCESS_TOKENS":  # `RELAY_ACCESS_TOKENS=${TOKENS}`, TOKENS unset: an open relay unmeant
            with pytest.raises(SettingsError, match="set but empty"):
                load_settings({**BASE, name: value})
        else:
            assert getattr(load_settings({**BASE, name: value}), attribute) == ()
    assert getattr(load_settings({**BASE, name: with_empty_items}), attribute) == parsed, "empty items are skipped"


def test_a_default_model_outside_the_allow_list_refuses_to_start():
    """Every request naming no model would otherwise get 403 model_not_allowed."""
    with pytest.raises(SettingsError) as refused:
        load_settings({**BASE, "RELAY_MODELS": "a,c", "RELAY_DEFAULT_MODEL": "b"})
    message = str(refused.value)
    assert "RELAY_DEFAULT_MODEL" in message and "'b'" in message and "RELAY_MODELS" in message, message
    assert load_settings({**BASE, "RELAY_MODELS": "a,b", "RELAY_DEFAULT_MODEL": "b"}).default_model == "b"
    assert load_settings({**BASE, "RELAY_DEFAULT_MODEL": "b"}).default_model == "b", "no allow-list: any model"
    result = start_gunicorn({**BASE, "RELAY_MODELS": "a", "RELAY_DEFAULT_MODEL": "b"})
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0 and output.count("\n") == 0, f"expected one line, got:\n{output}"
    assert "RELAY_DEFAULT_MODEL" in output and "Traceback" not in output


def test_a_refusal_never_repeats_a_password_given_in_a_url():
    for name, value in [
        ("OPENAI_BASE_URL", "http://user:hunter2@127.0.0.1/v1"),
        ("OPENAI_BASE_URL", "http://user:hunter2@[/v1"),
        ("REDIS_URL", "redis://:hunter2@["),
    ]:
        result = start_gunicorn({**BASE, name: value})
        assert result.returncode != 0 and name in result.stderr
        assert "hunter2" not in result.stdout + result.stderr


def test_a_dot_env_file_in_the_working_directory_is_read_and_the_environment_wins(tmp_path, upstream):
    """The contract's `.env` is the working directory's, also when the code lives elsewhere."""
    (tmp_path / ".env").write_text(f"OPENAI_API_KEY=sk-from-dot-env\nOPENAI_BASE_URL={upstream.base_url}\nRELAY_MODELS=from-file\n")
    port = free_port()
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "PYTHONPATH": str(ROOT),
           "HOST": "127.0.0.1", "PORT": str(port), "WEB_CONCURRENCY": "1", "RELAY_MODELS": "from-environment"}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), "app:app"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        body = None
        for _ in range(100):  # up to ~10 s for the worker to boot
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as response:
                    body = json.loads(response.read())
                break
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
    assert body is not None, f"the relay did not start from the .env's settings:\n{stderr.decode()}"
    assert [model["id"] for model in body["data"]] == ["from-environment"], "the environment wins over .env"


def test_neither_key_nor_demo_refuses_to_start_naming_both_options():
    result = start_gunicorn({})
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0 and output.count("\n") == 0
    assert "OPENAI_API_KEY" in output and "RELAY_DEMO" in output


def test_python_app_py_refuses_a_bad_setting_with_one_line():
    env = {"PATH": os.environ["PATH"], **BASE, "RELAY_HEARTBEAT_SECONDS": "0"}
    result = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0 and output.count("\n") == 0 and "RELAY_HEARTBEAT_SECONDS" in output


def test_python_app_py_serves_with_one_json_log_line_per_request_and_stops_quietly_on_ctrl_c(tmp_path):
    port = free_port()
    env = {"PATH": os.environ["PATH"], "RELAY_DEMO": "1", "HOST": "127.0.0.1", "PORT": str(port),
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}  # fmt: skip
    log_path = tmp_path / "dev.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                    assert json.loads(response.read())["upstream"] == "demo"
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()
                time.sleep(0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/static/relay-client.js", timeout=5) as response:
            assert response.status == 200
        deadline = time.monotonic() + 5
        while log_path.read_text().count('"path":') < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # the line is written when the server closes the response
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        proc.wait(10)
    text = log_path.read_text()
    assert proc.returncode == 0 and "Traceback" not in text and "KeyboardInterrupt" not in text, text[-2000:]
    lines = [line for line in text.splitlines() if line.strip() and "development server" not in line
             and "DEMO" not in line.upper() and line != "chat-relay: stopped"]  # fmt: skip
    paths = [json.loads(line)["path"] for line in lines if line.startswith("{")]
    assert paths[-2:] == ["/healthz", "/static/relay-client.js"]
    assert all(line.startswith("{") for line in lines), f"a line that is not the relay's JSON: {lines}"


def test_settings_defaults_match_the_contract():
    settings = load_settings(BASE)
    assert settings.base_url == "https://api.openai.com/v1"
    assert (settings.connect_timeout, settings.read_timeout, settings.retries) == (5, 120, 2)
    assert (settings.heartbeat_seconds, settings.graceful_timeout, settings.max_body_bytes) == (15, 30, 1_048_576)
    assert settings.worker_connections == 2000 and settings.trusted_proxies == 0
    assert settings.resume_seconds == 0, "resumable answers are off unless asked for"
    assert load_settings({**BASE, "RELAY_RESUME_SECONDS": "0"}).resume_seconds == 0
    assert load_settings({**BASE, "RELAY_RESUME_SECONDS": "90"}).resume_seconds == 90
    assert "sk-test" not in repr(settings), "the key must not appear in the settings' repr"


def test_requests_ca_bundle_is_the_ca_file_when_both_variables_are_set():
    bundle = certifi.where()
    assert load_settings({**BASE, "REQUESTS_CA_BUNDLE": bundle, "SSL_CERT_FILE": "/nonexistent"}).ca_bundle == bundle
    assert load_settings({**BASE, "SSL_CERT_FILE": bundle}).ca_bundle == bundle
    assert load_settings(BASE).ca_bundle is None


@pytest.mark.parametrize(
    "url", ["http://api.openai.com./v1", "http://vllm.ns.svc.cluster.local.:8000/v1", "http://llm_server:8000/v1",
            "https://bücher.example/v1", "http://[::1]:11434/v1", "http://10.0.0.5:8000/v1"],
)  # fmt: skip
def test_every_kind_of_host_name_is_accepted_in_the_base_url(url):
    assert load_settings({**BASE, "OPENAI_BASE_URL": url}).base_url == url.rstrip("/")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "127.0.0.1", "relay.internal", "relay.internal."])
def test_every_kind_of_address_is_accepted_as_host(host):
    assert load_settings({**BASE, "HOST": host}).host == host


def test_a_keyless_upstream_is_allowed_when_the_base_url_is_explicit():
    settings = load_settings({"OPENAI_BASE_URL": "http://127.0.0.1:11434/v1"})
    assert settings.api_key is None and settings.upstream_label == "127.0.0.1:11434"
    with pytest.raises(SettingsError):
        load_settings({})


def test_demo_mode_streams_a_paced_answer_and_shows_it(relay_factory):
    relay = relay_factory(RELAY_DEMO="1", OPENAI_API_KEY="<unset>", OPENAI_BASE_URL="<unset>")
    assert relay.request("GET", "/healthz").json()["upstream"] == "demo"
    assert "DEMO MODE" in relay.log()
    result = relay.stream("demo")
    assert result.status == 200 and result.complete
    assert result.text.startswith("This is Chat Relay in demo mode") or len(result.text) > 100
    first_byte = result.pieces[0][0]
    assert 0.2 < first_byte < 1.5, f"first token after {first_byte:.2f}s; expected about 0.3s"
    assert len(result.pieces) > 20, "the demo answer should arrive token by token"
    spread = result.pieces[-1][0] - first_byte
    assert len(result.pieces) / spread < 60, "demo pacing should be around 30 tokens/s"
    page = relay.request("GET", "/")
    assert page.status == 200 and b"relay" in page.body.lower()


def test_each_worker_tunes_the_garbage_collector_after_importing_the_app(tmp_path, upstream):
    """gunicorn.conf.py's post_worker_init freezes the app's objects out of every collection and
    collects young objects less often (the probe wraps the real config and reports from the worker)."""
    probe = tmp_path / "gc.json"
    config = probe_config(
        tmp_path,
        "_tuned = post_worker_init\n"
        "def post_worker_init(worker):\n"
        "    _tuned(worker)\n"
        "    import gc, json, pathlib, sys\n"
        "    flask_app = sys.modules['app'].app\n"
        "    frozen_app = all(obj is not flask_app for obj in gc.get_objects())  # frozen objects are not listed\n"
        "    state = [gc.get_threshold(), gc.get_freeze_count(), frozen_app]\n"
        f"    pathlib.Path({str(probe)!r}).write_text(json.dumps(state))\n",
    )
    relay = Relay({"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": upstream.base_url}, tmp_path, config=config)
    try:
        threshold, frozen, frozen_app = json.loads(probe.read_text())
    finally:
        relay.stop()
    assert frozen_app, "frozen after the app was imported, so the app's own objects are among the frozen"
    assert frozen > 10_000, f"only {frozen} objects frozen"
    assert threshold == [10_000, *gc.get_threshold()[1:]], "young passes every 10,000 allocations, older as Python has them"


@pytest.mark.parametrize(
    "api_key, base_url",
    [
        ("https://api.openai.com/v1", "{key}"),  # the two swapped
        ("{key}", "https://api.example.com/v1?key={key}"),  # the key pasted into the URL as well
        ("not-a-key-shape-0123456789", "https://x/v1?token=not-a-key-shape-0123456789"),
        ("{key}", "ftp://{key}@x/v1"),
    ],
)
def test_a_refused_setting_that_holds_the_key_does_not_print_it(api_key, base_url):
    """The line goes to the journal."""
    key = "sk-startup-SECRET-0123456789"
    environ = {**BASE, "OPENAI_API_KEY": api_key.format(key=key), "OPENAI_BASE_URL": base_url.format(key=key)}
    with pytest.raises(SettingsError) as refused:
        load_settings(environ)
    message = str(refused.value)
    assert "OPENAI_BASE_URL" in message and key not in message and "not-a-key-shape" not in message, message


@pytest.mark.parametrize("pasted", ["\n", "\r\n", " ", "\t", "\x00", "\u201d", "\u00a0"])
def test_a_key_that_cannot_go_in_a_header_is_refused_without_showing_it(pasted):
    """requests refuses such a header value, so every request would fail with 502 upstream_error; and
    its exception repeats the value, key and all."""
    key = f"sk-first-part-0123456789{pasted}second-part-abcdef"
    with pytest.raises(SettingsError) as refused:
        load_settings({**BASE, "OPENAI_API_KEY": key})
    message = str(refused.value)
    assert "OPENAI_API_KEY" in message and "character 25 of" in message, message
    assert "first-part" not in message and "second-part" not in message, message
    assert load_settings({**BASE, "OPENAI_API_KEY": f" {key.replace(pasted, '-')}\n"}).api_key == key.replace(pasted, "-")
    assert load_settings({"RELAY_DEMO": "1", "OPENAI_API_KEY": key}).demo, "demo mode sends no key"


@pytest.mark.parametrize(
    "name, value, where",
    [
        # what systemd hands over for `RELAY_ACCESS_TOKENS=tok-secret-1   # comment` (it keeps inline comments)
        ("RELAY_ACCESS_TOKENS", "tok-secret-0,tok-secret-1   # or keep the site private", "token 2: character 13 of"),
        ("RELAY_ACCESS_TOKENS", "tok-secret-1 tok-secret-2", "token 1: character 13 of"),
        ("OPENAI_API_KEY", "sk-secret-1   # the key", "character 12 of"),
    ],
)
def test_a_comment_left_after_a_secret_in_an_env_file_is_refused_without_showing_the_secret(name, value, where):
    """Every caller would get 401 for a token nobody can send, and every answer 502 for such a key."""
    result = start_gunicorn({**BASE, name: value})
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0 and output.count("\n") == 0, f"expected one line, got:\n{output}"
    assert name in output and where in output, output
    assert ("on a line of its own" in output) == ("#" in value), "a comment is named as the likely cause"
    assert "secret" not in output, output


def test_the_metrics_directory_the_config_makes_is_removed_however_gunicorn_exits_and_only_then(relay_factory, tmp_path):
    """It is made in TMPDIR when PROMETHEUS_MULTIPROC_DIR is unset (./demo.sh, the README's gunicorn
    line). on_exit does not run when gunicorn cannot bind; a worker's exit must not remove it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "TMPDIR": str(tmp_path),
               "RELAY_DEMO": "1", "HOST": "127.0.0.1", "PORT": str(taken.getsockname()[1])}  # fmt: skip
        result = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode != 0 and "in use" in result.stderr, result.stderr[-500:]
    assert list(tmp_path.iterdir()) == [], "a failed start left its metrics directory"
    relay = relay_factory(workers=2, fresh=True, TMPDIR=str(tmp_path), RELAY_DEMO="1")
    [metrics_dir] = list(tmp_path.iterdir())
    master = relay.proc.pid
    first = [int(pid) for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split()]
    os.kill(first[0], signal.SIGTERM)  # the worker exits as gunicorn's do, through sys.exit
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = [int(pid) for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split()]
        # replaced, and the new worker has loaded the app: a signal it got before setting its own
        # handlers (gunicorn's, in its first moments) would be lost, and the master wait for it
        if first[0] not in now and len(now) == 2 and relay.log().count("DEMO MODE") == 3:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the worker was not replaced")
    assert metrics_dir.is_dir(), "a worker's exit removed the directory the others write in"
    relay.stop()
    assert not metrics_dir.exists()


def test_the_metrics_directory_is_removed_when_a_daemonised_gunicorn_exits(tmp_path):
    """`gunicorn -D` forks after loading the config: the master that must remove it has a new pid."""
    pidfile, tmpdir = tmp_path / "gunicorn.pid", tmp_path / "tmp"
    tmpdir.mkdir()
    port = free_port()
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "TMPDIR": str(tmpdir),
           "RELAY_DEMO": "1", "HOST": "127.0.0.1", "PORT": str(port)}  # fmt: skip
    subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-D", "--pid", str(pidfile), "app:app"],
                   cwd=ROOT, env=env, check=True, timeout=30)  # fmt: skip
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # serving, so that the signal finds the workers booted
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as answer:
                if answer.status == 200 and pidfile.exists() and pidfile.read_text().strip():
                    break
        except OSError:
            time.sleep(0.05)
    master = int(pidfile.read_text())
    [metrics_dir] = list(tmpdir.iterdir())
    os.kill(master, signal.SIGTERM)
    while running(master) and time.monotonic() < deadline + 15:
        time.sleep(0.05)
    assert not running(master), "the daemon did not stop"
    assert not metrics_dir.exists()


def running(pid: int) -> bool:
    """Whether ``pid`` is alive: a daemon's exit leaves a zombie where nothing reaps orphans."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
