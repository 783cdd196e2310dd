"""Resumable answers in a real headless Chromium: a dropped connection does not lose the answer.

A TCP forwarder written here sits between Chromium and a real gunicorn relay with
RELAY_RESUME_SECONDS set; cutting every connection it holds mid-answer is a real network failure
(the browser's read rejects, the relay's caller is gone). relay-client.js must pick the answer up
from its last event, and the upstream must still have been asked only once. Everything is on 127.0.0.1.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from playwright.sync_api import Page, expect

from fake_upstream import sse_answer, stream_script
from test_browser import (  # noqa: F401 (browser and page are fixtures)
    RECORD_ANSWER_STATES,
    ask,
    assert_hung_up_soon,
    browser,
    chat_page_mid_answer,
    page,
    slow_endless_answer,
    wait_answered,
)

TOKENS = [f"t{index:02d} " for index in range(30)]  # all different: a repeated or lost one shows
TOKEN_DELAY = 0.08  # seconds between the upstream's events: the answer takes about 2.5 s
RESUMING = "Connection lost — resuming…"
WAIT_MS = 10_000


# --- a network that can fail -------------------------------------------------------------------


class CuttingProxy:
    """Forwards TCP connections from 127.0.0.1:<port> to the relay, until ``cut_all`` resets them all."""

    def __init__(self, target_port: int):
        self._target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def cut_all(self) -> int:
        """Reset every connection held (both sides); returns how many there were."""
        with self._lock:
            pairs, self._pairs = self._pairs, set()
        for pair in pairs:
            _close(pair, reset=True)
        return len(pairs)

    def close(self) -> None:
        self._listener.close()
        self.cut_all()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(("127.0.0.1", self._target_port), timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            pair = (client, server)
            with self._lock:
                self._pairs.add(pair)
            for source, target in (pair, pair[::-1]):
                threading.Thread(target=self._pump, args=(source, target, pair), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, pair) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._pairs.discard(pair)
        _close(pair, reset=False)


def _close(pair, reset: bool) -> None:
    for sock in pair:
        try:
            if reset:  # close with a TCP reset, as a dead network path or a crashed middlebox would
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.shutdown(socket.SHUT_RDWR)  # also wakes the pump thread blocked reading it
        except OSError:
            pass
        sock.close()


@pytest.fixture(scope="module")
def resume_relay(relay_factory):
    return relay_factory(RELAY_RESUME_SECONDS="30")


@pytest.fixture
def proxy_to():
    proxies = []

    def start(relay) -> CuttingProxy:
        proxies.append(CuttingProxy(relay.port))
        return proxies[-1]

    yield start
    for proxy in proxies:
        proxy.close()


def paced_answer(upstream) -> str:
    return upstream.script(stream_script(sse_answer(TOKENS), delay=TOKEN_DELAY))


def record_requests(page: Page) -> list:
    """Every request the page sends from now on, in order."""
    requests = []
    page.on("request", lambda request: requests.append(request))
    return requests


def resume_requests(requests) -> list:
    return [request for request in requests if "/api/streams/" in request.url and request.method == "GET"]


def cancel_requests(requests) -> list:
    return [request for request in requests if "/api/streams/" in request.url and request.method == "DELETE"]


def assert_upstream_asked_once(upstream, model: str) -> None:
    exchanges = upstream.wait_seen(model)
    assert len(exchanges) == 1, f"the upstream was asked {len(exchanges)} times for one answer"
    assert exchanges[0].finished.wait(5), "the upstream answer never ended"
    assert exchanges[0].closed_by_peer_at is None, "the relay hung up on the upstream instead of keeping the answer"


# --- relay-client.js driven in the page, in the background -------------------------------------

START_CLIENT = """async ({model, token, abortDuringWaitMs}) => {
  const {streamChatCompletion} = await import("/static/relay-client.js");
  const run = window.run = {tokens: [], reconnects: [], resumed: [], error: null, finished: false};
  const stop = new AbortController();
  const onReconnect = (attempt) => {
    run.reconnects.push(attempt);
    if (abortDuringWaitMs !== null) setTimeout(() => stop.abort(), abortDuringWaitMs);
  };
  const tokens = streamChatCompletion({model, messages: [{role: "user", content: "hi"}]}, {
    signal: stop.signal, token, onReconnect, onResumed: (resumed) => run.resumed.push(resumed),
  });
  (async () => {
    try {
      for await (const token of tokens) run.tokens.push(token);
    } catch (e) {
      const {name, code = null, message, cause} = e;
      run.error = {name, code, message, causeCode: cause?.code ?? null, causeStatus: cause?.status ?? null};
    }
    run.finished = true;
  })();
}"""


def start_client(page: Page, proxy: CuttingProxy, model: str, token=None, abort_during_wait_ms=None) -> None:
    """Start streamChatCompletion in the page (through the proxy) without waiting for it: see ``window.run``."""
    page.goto(proxy.url + "/healthz")
    page.evaluate(START_CLIENT, {"model": model, "token": token, "abortDuringWaitMs": abort_during_wait_ms})


def wait_tokens(page: Page, count: int) -> None:
    page.wait_for_function(f"window.run.tokens.length >= {count} || window.run.finished", polling=20, timeout=WAIT_MS)


def finished_run(page: Page) -> dict:
    page.wait_for_function("window.run.finished", polling=20, timeout=WAIT_MS)
    return page.evaluate("window.run")


# --- the promises ----------------------------------------------------------------------------------

RECORD_RESUMING_NOTES = """() => {
  window.resumingNotes = [];
  new MutationObserver((changes) => {
    for (const change of changes)
      for (const node of change.addedNodes)
        if (node.classList?.contains("reconnecting")) window.resumingNotes.push(node.textContent);
  }).observe(document.getElementById("conversation"), {subtree: true, childList: true});
}"""


def test_stop_on_a_resumable_answer_cancels_it_so_the_upstream_closes_at_once(page, resume_relay, upstream):
    model, answer = chat_page_mid_answer(page, resume_relay, upstream)
    requests = record_requests(page)  # from here on: the cancellation, and no resume
    stopped_at = time.monotonic()
    page.click("#stop")
    expect(answer.locator(".note")).to_have_text("Stopped.")
    assert_hung_up_soon(upstream, model, stopped_at)  # not RELAY_RESUME_SECONDS (30 s) later
    assert len(cancel_requests(requests)) == 1 and not resume_requests(requests)


def test_reloading_the_page_mid_answer_cancels_it_so_the_upstream_closes_at_once(page, resume_relay, upstream):
    """The reloaded page has lost the answer's id: nobody can resume it, so it must not run on for 30 s."""
    model, _ = chat_page_mid_answer(page, resume_relay, upstream)
    reloaded_at = time.monotonic()
    page.reload()
    assert_hung_up_soon(upstream, model, reloaded_at)
    [asked] = resume_relay.wait_access_line("/api/stream_chat_completion", model=model)
    [cancelled] = resume_relay.wait_access_line(f"/api/streams/{asked['stream_id']}", method="DELETE")
    assert cancelled["status"] in (200, 204), cancelled


def test_chat_page_answer_survives_a_dropped_connection(page, resume_relay, upstream, proxy_to):
    model = paced_answer(upstream)
    proxy = proxy_to(resume_relay)
    page.goto(proxy.url + "/")
    page.fill("#model", model)
    page.evaluate(RECORD_ANSWER_STATES)
    page.evaluate(RECORD_RESUMING_NOTES)
    requests = record_requests(page)
    answer = ask(page, "Tell me something long")
    expect(answer.locator(".text")).to_contain_text(TOKENS[4])
    assert proxy.cut_all() >= 1, "the page held no connection to cut"
    wait_answered(answer)
    final = "".join(TOKENS)
    expect(answer.locator(".text")).to_have_text(final)
    expect(answer.locator(".note")).to_have_count(0)  # no error, and the resuming note is gone
    assert page.evaluate("window.resumingNotes") == [RESUMING]
    states = page.evaluate("window.answerStates")
    assert all(final.startswith(state) for state in states), f"a token was repeated or lost on the way: {states}"
    assert len(resume_requests(requests)) == 1, [request.url for request in requests]
    assert_upstream_asked_once(upstream, model)


def test_client_resumes_twice_in_one_answer_and_yields_every_token_once(page, resume_relay, upstream, proxy_to):
    model = paced_answer(upstream)
    proxy = proxy_to(resume_relay)
    requests = record_requests(page)
    with page.expect_response("**/api/stream_chat_completion") as posted:
        start_client(page, proxy, model)
    stream_id = posted.value.headers.get("x-relay-stream-id")
    assert stream_id, "the relay did not make the answer resumable"
    assert posted.value.request.headers.get("x-relay-resumable") == "1"
    wait_tokens(page, 5)
    proxy.cut_all()
    wait_tokens(page, 15)
    proxy.cut_all()
    run = finished_run(page)
    assert run["error"] is None, run["error"]
    assert run["tokens"] == TOKENS
    assert [reconnect["attempt"] for reconnect in run["reconnects"]] == [1, 1]
    assert run["resumed"] == [{"attempt": 1}, {"attempt": 1}]
    resumes = resume_requests(requests)
    assert [request.url.split("?")[0] for request in resumes] == [f"{proxy.url}/api/streams/{stream_id}"] * 2
    given = [request.headers.get("last-event-id", "") for request in resumes]
    assert all(value.startswith(f"{stream_id}:") for value in given), given
    seqs = [int(value.rpartition(":")[2]) for value in given]
    assert 6 <= seqs[0] and 16 <= seqs[1], f"a resume asked for events already received: {given}"  # meta is 1
    assert_upstream_asked_once(upstream, model)


def test_client_resumes_with_its_access_token_on_a_relay_that_requires_one(page, relay_factory, upstream, proxy_to):
    guarded = relay_factory(RELAY_RESUME_SECONDS="30", RELAY_ACCESS_TOKENS="token-a,token-b")
    model = paced_answer(upstream)
    proxy = proxy_to(guarded)
    requests = record_requests(page)
    start_client(page, proxy, model, token="token-a")
    wait_tokens(page, 5)
    proxy.cut_all()
    run = finished_run(page)
    assert run["error"] is None, run["error"]
    assert run["tokens"] == TOKENS
    [resumed] = resume_requests(requests)
    assert resumed.headers.get("authorization") == "Bearer token-a"  # another token's caller would get 404
    assert_upstream_asked_once(upstream, model)


def test_client_without_resume_on_the_relay_fails_on_a_drop_as_before(page, relay, upstream, proxy_to):
    model = slow_endless_answer(upstream)
    proxy = proxy_to(relay)
    requests = record_requests(page)
    with page.expect_response("**/api/stream_chat_completion") as posted:
        start_client(page, proxy, model)
    assert "x-relay-stream-id" not in posted.value.headers
    wait_tokens(page, 3)
    cut_at = time.monotonic()
    proxy.cut_all()
    run = finished_run(page)
    assert run["error"] is not None and run["error"]["code"] == "connection_failed", run["error"]
    assert run["reconnects"] == [] and not resume_requests(requests)
    assert_hung_up_soon(upstream, model, cut_at)  # the relay stopped the upstream, as it always did


def test_client_abort_while_waiting_to_resume_stops_without_another_request(page, resume_relay, upstream, proxy_to):
    model = paced_answer(upstream)
    proxy = proxy_to(resume_relay)
    requests = record_requests(page)
    start_client(page, proxy, model, abort_during_wait_ms=50)
    wait_tokens(page, 3)
    proxy.cut_all()
    run = finished_run(page)
    assert run["error"] is not None and run["error"]["name"] == "AbortError", run["error"]
    assert len(run["reconnects"]) == 1 and run["reconnects"][0]["delayMs"] >= 150, run["reconnects"]
    page.wait_for_timeout(800)  # longer than the first wait could have been
    assert not resume_requests(requests), "a resume was sent after the abort"
    assert len(cancel_requests(requests)) == 1, "the abort did not cancel the answer on the relay"
    assert len(run["tokens"]) < len(TOKENS)


def test_client_gives_up_with_connection_failed_when_the_relay_cannot_resume(page, resume_relay, upstream, proxy_to):
    model = paced_answer(upstream)
    proxy = proxy_to(resume_relay)
    expired = {"message": "No resumable answer with this id.", "type": "not_found_error", "code": "stream_not_found"}
    page.route("**/api/streams/**", lambda route: route.fulfill(status=404, json={"error": expired}))
    start_client(page, proxy, model)
    wait_tokens(page, 3)
    proxy.cut_all()
    run = finished_run(page)
    assert run["error"] is not None, "an answer that could not be resumed ended as if complete"
    assert run["error"]["code"] == "connection_failed"
    assert (run["error"]["causeCode"], run["error"]["causeStatus"]) == ("stream_not_found", 404)
    assert expired["message"] in run["error"]["message"]
    assert len(run["reconnects"]) == 1, "a 404 was retried"
    assert run["tokens"] == TOKENS[: len(run["tokens"])]


def test_client_resumes_a_body_that_ends_without_done_from_the_last_event_id(page, relay):
    # Scripted in the page: a body cut at an event boundary, and the relay's rest of it.
    cut_short = (
        'id: S:1\nevent: meta\ndata: {"id": "x", "model": "m", "created": 1, "stream_id": "S"}\n\n'
        'id: S:2\ndata: {"content": "Hel"}\n\n'
        'id: S:3\nid: S:\0bad\ndata: {"content": "lo"}\n\n'  # an id with NUL is ignored: this one is S:3
        'id: S:4\ndata: {"content": " wor'  # unfinished: not received, so not counted
    )  # fmt: skip
    rest = 'id: S:4\ndata: {"content": " world"}\n\nid: S:5\nevent: done\ndata: {}\n\n'
    resumes = []

    def rest_of_answer(route):
        resumes.append(route.request)
        route.fulfill(status=200, content_type="text/event-stream", body=rest)

    page.goto(relay.url + "/healthz")
    page.route(
        "**/api/stream_chat_completion",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=cut_short),
    )
    page.route("**/api/streams/**", rest_of_answer)
    result = page.evaluate(
        """async () => {
          const {streamChatCompletion} = await import("/static/relay-client.js");
          const tokens = [];
          for await (const token of streamChatCompletion({model: "m", messages: []})) tokens.push(token);
          return tokens;
        }"""
    )
    assert result == ["Hel", "lo", " world"]
    assert [request.url for request in resumes] == [relay.url + "/api/streams/S"]
    assert resumes[0].headers.get("last-event-id") == "S:3"
