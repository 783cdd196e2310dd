"""Gunicorn settings for Chat Relay in production: `gunicorn -c gunicorn.conf.py app:app`.

Values come from the relay's own settings (environment and `.env`), so one bad variable stops the
server here with one line, before any worker starts.
"""

import atexit
import functools
import gc
import glob
import math
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
import time

import gevent
import gevent.server
import gevent.socket
import gunicorn.util
import gunicorn.workers.ggevent

from errors import RelayError
from settings import SettingsError, load_settings

try:
    _settings = load_settings()
except SettingsError as exc:
    sys.exit(f"chat-relay: {exc}")

# prometheus_client's multiprocess mode: every worker writes its metrics to files in this directory
# and /metrics sums them. It must be set before any worker imports prometheus_client; a directory
# given in the environment (e.g. by systemd's RuntimeDirectory) is used as it is.
_own_metrics_dir = None
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _own_metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="chat-relay-metrics-")
_master_pid = os.getpid()  # on_starting sets it again: `gunicorn -D` forks before it


def _remove_own_metrics_dir() -> None:
    """The master removes the metrics directory this config made (one given in the environment is
    kept), however it exits: on_exit does not run when gunicorn fails to start (a port in use)."""
    if _own_metrics_dir and os.getpid() == _master_pid:  # workers exit through atexit too
        shutil.rmtree(_own_metrics_dir, ignore_errors=True)


atexit.register(_remove_own_metrics_dir)

# Workers resolve host names with resolver.Resolver: an address (OPENAI_BASE_URL at an IP, Redis on
# 127.0.0.1) is parsed in place instead of being handed to a thread, and a name's addresses are
# reused for 30 s, so new upstream connections under load do not queue for the resolver thread.
os.environ.setdefault("GEVENT_RESOLVER", "resolver.Resolver")

# Where to listen. Behind nginx on the same VM, HOST=127.0.0.1 keeps the relay off the network.
bind = f"{_settings.host}:{_settings.port}"

# gevent workers: each holds thousands of open streams, since a stream mostly waits on sockets.
# Never add `preload_app = True`: the app would import ssl before gevent patches it.
worker_class = "gevent"

# One worker per CPU (WEB_CONCURRENCY) is enough: the work is I/O, and more processes only
# multiply memory and upstream connection pools. Rate limits and stream caps without REDIS_URL are
# counted in process memory, where N workers would silently allow N times the limit, and resumable
# answers (RELAY_RESUME_SECONDS) are kept there, where a resume reaching another worker would not
# find them: then one worker serves (it holds RELAY_WORKER_CONNECTIONS streams; set REDIS_URL to
# use more), however many were asked for: `nworkers_changed` below holds it at one.
workers = _settings.web_concurrency

# Open streams one worker may hold at once (RELAY_WORKER_CONNECTIONS). The relay's upstream
# connection pool is sized to match, so a busy worker never queues for an upstream socket.
worker_connections = _settings.worker_connections

# Seconds a worker may go without telling the master it is alive. Long streams do not count
# against it: gevent workers report from their own loop, not per request.
timeout = 30

# On SIGTERM or HUP, in-flight streams get RELAY_GRACEFUL_TIMEOUT to finish while new connections
# are refused. The relay itself ends the streams still open at that deadline, as failures the
# caller can see (see post_worker_init); gunicorn's own kill comes a few seconds later, as a backstop.
graceful_timeout = math.ceil(_settings.graceful_timeout) + 5

# Connections waiting to be accepted. A burst of new streams (a reconnect storm after a deploy)
# would otherwise overflow gunicorn's 2048 and be reset by the kernel; net.core.somaxconn caps it.
backlog = 8192

# Connections a worker accepts each time its loop finds the listener ready. With several workers,
# gunicorn's gevent worker accepts one (so that one worker does not take a burst another could
# serve), and a busy worker's loop comes round only every few milliseconds: at 10,000 slow streams
# opening 1,000 a second, the two workers accepted fewer than that, and the queue grew (first bytes
# 1-2 s late, never all 10,000 open; 16: all open, +0.1-0.9 s; docs/BENCHMARKS.md). The other worker
# wakes for the same listener, though a burst of 100 may still split as unevenly as 84/16; evening
# it out (1 or 4 at a time, TCP_DEFER_ACCEPT) left the burst's first bytes as late, as its set-ups'
# CPU on shared cores decides them ("Who takes a burst's connections" in docs/BENCHMARKS.md).
ACCEPTS_PER_WAKE = 16

# Idle keep-alive, in seconds. Longer than the 60 s idle timeout of common load balancers, so the
# balancer, not the relay, closes idle connections and never reuses one the relay just closed.
keepalive = 75

# The relay writes its own JSON line per request (with model, outcome and timings), so gunicorn's
# access log stays off; gunicorn's own messages go to stderr.
accesslog = None
errorlog = "-"
loglevel = _settings.log_level.lower()

# The control socket lives at one path per user; two relays on one machine (tests, blue/green
# deploys) would fight over it, and the relay does not use `gunicornc`.
control_socket_disable = True

# Request line and header limits stay at gunicorn's defaults; bodies are capped by the relay
# (RELAY_MAX_BODY_BYTES).

# Young-generation size for Python's cyclic garbage collector in each worker (Python's default: 700).
# A full pass scans every object of every open stream and stops the worker meanwhile: with 4,000 slow
# streams on one worker, the defaults made 7 full passes of ~300 ms in 30 s, 15 % of its CPU. With
# 10,000, and the app's import-time objects frozen out of all passes, the same run needs no full
# pass and pauses at most ~60 ms (`python -m bench.gc_cost`, docs/BENCHMARKS.md). The relay's
# streams leave almost no reference cycles, so collecting less often holds little garbage longer.
GC_YOUNG_THRESHOLD = 10_000


def post_worker_init(worker):
    """Tune the garbage collector; when this worker is told to stop (SIGTERM, HUP's restart, or
    gunicorn retiring it), start the relay's own shutdown clock, stop accepting and close idle
    connections at once. Runs in the worker after it has imported the app, and before gunicorn
    starts its listeners."""
    import streaming

    gunicorn.util.write_error = _write_json_error  # the worker's refusals of requests it cannot parse
    _connections.track()

    gc.freeze()  # modules, routes, settings: alive for the worker's life, no pass need look at them
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])

    stop_worker = worker.handle_exit

    def handle_exit(sig, frame):
        streaming.begin_shutdown(_settings.graceful_timeout)
        stop_worker(sig, frame)
        # From the loop, not from inside whatever this signal interrupted.
        gevent.get_hub().loop.run_callback(_connections.stop_accepting_and_close_idle)

    def stop_when_retired():
        """gunicorn also retires a worker without a signal, after `max_requests`: it only stops its
        loop, and streams were cut at gunicorn's deadline, unannounced."""
        while worker.alive:
            gevent.sleep(1.0)  # as often as gunicorn's own loop looks
        streaming.begin_shutdown(_settings.graceful_timeout)  # a SIGTERM's deadline, if earlier, stands
        _connections.stop_accepting_and_close_idle()

    signal.signal(signal.SIGTERM, handle_exit)
    gevent.spawn(stop_when_retired)


class _Connections:
    """A worker's listening servers and client connections, so that it can stop without waiting.

    gunicorn's gevent worker closes its listeners only at its next one-second tick, and a kept-alive
    connection waiting for its next request (nginx keeps some open to the relay) holds the worker
    for up to `keepalive` seconds, past RELAY_GRACEFUL_TIMEOUT, until gunicorn kills it. gunicorn
    keeps both in locals of its run loop, so ``track`` swaps its StreamServer, before that loop
    starts, for a subclass that records them here.

    Once the worker is stopping, a connection is closed when it is idle: not inside a request, no
    request bytes waiting in it, and either it has carried a request before or it has been open
    for NEW_CONNECTION_GRACE_SECONDS (a new one's first request may be on its way: closing it would
    fail that request, as Go's http.Server.Shutdown also reasons). Passes repeat every second.
    """

    NEW_CONNECTION_GRACE_SECONDS = 5.0

    def __init__(self):
        self.servers: list = []
        self.clients: dict = {}  # handler greenlet -> (its client socket, when it was accepted)
        self.in_request: set = set()  # handler greenlets between gunicorn's pre_ and post_request
        self.served: set = set()  # handler greenlets whose connection has carried a whole request
        self.stopping = False

    def track(self) -> None:
        connections = self

        class TrackedStreamServer(gevent.server.StreamServer):
            def __init__(self, listener, handle, **kwargs):
                if isinstance(handle, functools.partial) and handle.args:  # gunicorn's: handle(listener, ...)
                    handle = functools.partial(handle.func, _NamedListener(handle.args[0]), *handle.args[1:])

                def tracked_handle(client, address):
                    handler = gevent.getcurrent()
                    connections.clients[handler] = (client, time.monotonic())
                    try:
                        handle(client, address)
                    finally:
                        del connections.clients[handler]
                        connections.served.discard(handler)

                super().__init__(listener, handle=tracked_handle, **kwargs)

            def start(self):
                self.max_accept = ACCEPTS_PER_WAKE  # after gunicorn's own choice (1 with several workers)
                super().start()
                connections.servers.append(self)

            def do_read(self):  # gevent's own, with the client socket made a _ClientSocket
                listener = self.socket
                try:
                    fd, address = listener._accept()
                except BlockingIOError:
                    if not listener.timeout:
                        return None
                    raise
                return _ClientSocket(listener.family, listener.type, listener.proto, fileno=fd), address

        gunicorn.workers.ggevent.StreamServer = TrackedStreamServer

    def stop_accepting_and_close_idle(self) -> None:
        if self.stopping:
            return  # both a SIGTERM and the retirement it causes ask
        self.stopping = True
        for server in self.servers:
            server.close()  # only this worker's copy: after a HUP the new workers go on accepting
        self._close_idle()

    def _close_idle(self) -> None:
        now, waiting = time.monotonic(), False
        for handler, (client, accepted_at) in list(self.clients.items()):
            if handler in self.in_request:
                waiting = True  # its answer is going on; it may wait for another request after it
                continue
            if handler not in self.served and now - accepted_at < self.NEW_CONNECTION_GRACE_SECONDS:
                waiting = True
                continue
            # The socket under gevent's wrapper: the wrapper's shutdown would throw an error into the
            # greenlet reading it (logged with a traceback), the kernel's gives that reader a clean end.
            raw = getattr(client, "_sock", client)
            try:
                raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                waiting = True  # a request is arriving (or the caller closed): gunicorn reads it first
            except BlockingIOError:
                try:
                    raw.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            except OSError:
                pass
        if waiting:
            gevent.spawn_later(1.0, self._close_idle)


_connections = _Connections()  # filled in each worker, for that worker


class _NamedListener:
    """gunicorn's listening socket as its connection handlers see it, with its address read once.

    A stopping worker closes its listener at once; a connection accepted just before may have its
    handler start after that, and gunicorn's handler begins by asking the listener for its address:
    EBADF, a traceback, and the connection dropped. Everything else is the listener's own.
    """

    def __init__(self, listener):
        self._listener = listener
        self._name = listener.getsockname()

    def getsockname(self):
        return self._name

    def __getattr__(self, name):
        return getattr(self._listener, name)


class _ClientSocket(gevent.socket.socket):
    """A caller's connection whose ``sendall`` first tries one plain ``send``.

    gunicorn writes each relayed token with ``sendall``, and gevent's asks the kernel for the send
    buffer's size (a ``getsockopt``) on every call to size its loop. A token is far smaller than
    any send buffer, so one ``send`` nearly always takes it whole; gevent's loop sends whatever is
    left, waiting for the socket as it always does (a slow reader, a full buffer).
    """

    __slots__ = ()

    def sendall(self, data, flags=0):
        try:
            sent = self._sock.send(data, flags)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            super().sendall(memoryview(data)[sent:], flags)


def _write_json_error(sock, status_int, reason, mesg):
    """gunicorn's own answer to a request it cannot parse (a bad request line, headers too large,
    broken framing), in the contract's JSON error shape instead of its HTML page."""
    refused = status_int != 500  # 501 too: a Transfer-Encoding the server does not know is the caller's
    error = RelayError(
        status_int, "invalid_request" if refused else "internal_error", f"{reason}: {mesg}" if mesg else reason,
        error_type="invalid_request_error" if refused else None,
    )  # fmt: skip
    body = error.to_json()
    head = f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
    if refused:  # a 500 is gunicorn's own failure (mostly a request the app saw and logged), in its error log
        import app

        head += f"X-Request-ID: {app.log_refused_before_parsing(status_int, error.code, sock)}\r\n"
    gunicorn.util.write_nonblock(sock, head.encode("latin1") + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


def pre_request(worker, req):
    _connections.in_request.add(gevent.getcurrent())


def post_request(worker, req, environ, resp):
    """A stopping worker (HUP or SIGTERM) closes each keep-alive connection once its answer is done.

    Otherwise gunicorn's gevent worker keeps serving new requests on connections it already holds,
    nginx reuses them first, and streams started after a reload are cut at the old worker's deadline.
    """
    handler = gevent.getcurrent()
    _connections.in_request.discard(handler)
    _connections.served.add(handler)
    # (A connection gunicorn closes anyway is left to it: an HTTP/1.0 answer that failed is ended by
    # that close with a reset, which an end of ours sent first would make look whole.)
    if not worker.alive and resp is not None and not resp.should_close():
        try:
            environ["gunicorn.socket"].shutdown(socket.SHUT_WR)
        except (KeyError, OSError):
            pass


def worker_exit(server, worker):
    """Answers whose caller left (resumable ones) get the same grace as open requests, then end recorded."""
    import streaming

    streaming.wait_for_detached()


def child_exit(server, worker):
    """A dead worker's live gauges (open streams) must stop counting in /metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    _remove_own_metrics_dir()


def on_starting(server):
    """Start clean, and raise the open-file limit to the hard limit (each stream holds two sockets)."""
    global _master_pid
    _master_pid = os.getpid()
    for stale in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db")):
        os.remove(stale)  # counts from a previous run would be summed into this one's
    _raise_file_limit(server)


def nworkers_changed(server, new_value, old_value):
    """Hold the worker count at one while limits' counts and resumable answers live in process
    memory, however more were asked for: WEB_CONCURRENCY, `-w`, GUNICORN_CMD_ARGS, a TTIN signal."""
    if new_value > 1 and _settings.needs_one_process:
        named = {
            "RELAY_RATE_LIMIT": _settings.rate_limit,
            "RELAY_MAX_STREAMS_PER_CALLER": _settings.max_streams_per_caller,
            "RELAY_RESUME_SECONDS": _settings.resume_seconds,
        }
        server.log.warning(
            "%s without REDIS_URL live in one process: running 1 worker instead of %s",
            " and ".join(name for name, value in named.items() if value),
            new_value,
        )
        server.num_workers = 1  # (gunicorn calls this hook again, with 1)


def _raise_file_limit(server):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            server.log.warning("could not raise the open-file limit above %s", soft)
    # per worker process: caller and upstream sockets, and at the busiest moment as many Redis
    # connections in each pool the settings use (rate limit, cap, an answer's record: reads and writes)
    redis_pools = (bool(_settings.rate_limit) + bool(_settings.max_streams_per_caller) + 2 * bool(_settings.resume_seconds)
                   if _settings.redis_url else 0)  # fmt: skip
    needed = (2 + redis_pools) * _settings.worker_connections + 64
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < needed:
        server.log.warning(
            "open-file limit %s is below the %s that %s streams per worker need; raise LimitNOFILE",
            soft, needed, _settings.worker_connections,
        )  # fmt: skip
