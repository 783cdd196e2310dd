"""The browser side, in a real headless Chromium: the chat page at / and static/relay-client.js.

Playwright drives Debian's chromium (never a downloaded browser) against a real gunicorn relay and the
socket-level fake upstream. Every page is on 127.0.0.1; any other request is refused.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from demo_upstream import demo_answer
from fake_upstream import sse_answer, stream_script

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
PHONE = {"width": 375, "height": 667}
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
TOKENS = ["Stream", "ing ", "one ", "token ", "at ", "a ", "time", "."]
JAPANESE = ["こんにちは", "、世界！", "日本語の", "テキストも", "そのまま", "届きます。", " 👋🏽"]
HANGUP_WITHIN = 2.5  # seconds: the contract's 2 s for the relay to close the upstream, plus polling
UPSTREAM_ERROR = {
    "message": "This model's maximum context length is 8192 tokens.",
    "type": "invalid_request_error",
    "code": "context_length_exceeded",
}
UNAUTHORIZED = {"message": "A valid access token is required.", "type": "authentication_error", "code": "unauthorized"}
SERVER_ERROR = {
    "message": "The server had an error while processing your request.",
    "type": "server_error",
    "code": "server_error",
}


# --- the browser ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: ./test.sh installs it (Debian package chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def new_page(browser, **context_options) -> Page:
    context = browser.new_context(**context_options)
    # Page-level routes that a test adds take precedence; nothing may leave the machine.
    context.route(lambda url: not url.startswith("http://127.0.0.1:"), lambda route: route.abort())
    page = context.new_page()
    page.set_default_timeout(10_000)
    return page


@pytest.fixture
def page(browser):
    page = new_page(browser, viewport={"width": 1000, "height": 700})
    yield page
    page.context.close()


# --- driving the chat page -----------------------------------------------------------------------

RECORD_ANSWER_STATES = """() => {
  window.answerStates = [];
  new MutationObserver(() => {
    const answers = document.querySelectorAll(".message.assistant .text");
    const text = answers.length ? answers[answers.length - 1].textContent : "";
    if (text && text !== window.answerStates.at(-1)) window.answerStates.push(text);
  }).observe(document.getElementById("conversation"), {subtree: true, childList: true, characterData: true});
}"""


def open_chat(page: Page, relay, model: str | None = None) -> None:
    page.goto(relay.url + "/")
    if model is not None:
        page.fill("#model", model)


def ask(page: Page, question: str):
    """Type a question and press Enter; returns the locator of the answer it gets."""
    answers = page.locator(".message.assistant")
    count = answers.count()
    page.fill("#question", question)
    page.press("#question", "Enter")
    expect(answers).to_have_count(count + 1)
    return answers.nth(count)


def wait_answered(answer) -> None:
    expect(answer).to_have_attribute("aria-busy", "false")


def assert_hung_up_soon(upstream, model: str, since: float) -> None:
    exchange = upstream.wait_seen(model)[0]
    assert exchange.finished.wait(HANGUP_WITHIN + 1), "the fake upstream never saw the relay hang up"
    assert exchange.closed_by_peer_at is not None, "the upstream answer ran to its end: nobody cancelled it"
    assert exchange.closed_by_peer_at - since < HANGUP_WITHIN, f"hung up {exchange.closed_by_peer_at - since:.2f}s late"


def slow_endless_answer(upstream) -> str:
    """A model that streams 'word ' ten times a second for ten seconds, unless the relay hangs up."""
    return upstream.script(stream_script(sse_answer(["word "] * 100), delay=0.1))


def chat_page_mid_answer(page: Page, relay, upstream):
    """The chat page, asked for a slow endless answer that has begun: (its model, its answer)."""
    model = slow_endless_answer(upstream)
    open_chat(page, relay, model)
    answer = ask(page, "Talk forever")
    expect(answer.locator(".text")).to_contain_text("word word")
    return model, answer


def failing_mid_answer(tokens: list[str]) -> list[bytes]:
    """Upstream events that start an answer, send ``tokens``, then an error event instead of the end."""
    return sse_answer(tokens, done=False)[:-1] + [b"data: " + json.dumps({"error": SERVER_ERROR}).encode() + b"\n\n"]


def split_every(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


# --- the chat page ---------------------------------------------------------------------------------


def test_answer_streams_into_the_page_token_by_token(page, relay, upstream):
    model = upstream.script(stream_script(sse_answer(TOKENS), delay=0.1))
    open_chat(page, relay, model)
    page.evaluate(RECORD_ANSWER_STATES)
    answer = ask(page, "How do answers arrive?")
    expect(page.locator("#stop")).to_be_visible()
    wait_answered(answer)
    final = "".join(TOKENS)
    expect(answer.locator(".text")).to_have_text(final)
    expect(page.locator("#send")).to_be_visible()
    states = page.evaluate("window.answerStates")
    partial = [state for state in states if state != final]
    assert len(partial) >= len(TOKENS) - 2, f"the answer appeared in too few steps: {states}"
    assert all(final.startswith(state) for state in states), f"a state was not a prefix of the answer: {states}"
    assert partial == sorted(partial, key=len), f"the answer did not only grow: {states}"


def test_japanese_text_renders_intact_in_question_and_answer(page, relay, upstream):
    # Seven-byte pieces split most characters (three bytes each in UTF-8) across network reads.
    pieces = split_every(b"".join(sse_answer(JAPANESE)), 7)
    model = upstream.script(stream_script(pieces, delay=0.005))
    question = "日本語で答えてください 🙏"
    open_chat(page, relay, model)
    answer = ask(page, question)
    wait_answered(answer)
    expect(answer.locator(".text")).to_have_text("".join(JAPANESE))
    expect(page.locator(".message.user .text")).to_have_text(question)
    assert upstream.seen(model)[0].request.json()["messages"] == [{"role": "user", "content": question}]


def test_follow_up_question_sends_the_whole_conversation(page, relay, upstream):
    model = upstream.script(stream_script(sse_answer(["Paris", "."])))
    open_chat(page, relay, model)
    wait_answered(ask(page, "Capital of France?"))
    wait_answered(ask(page, "And its population?"))
    second = upstream.wait_seen(model, count=2)[1].request.json()
    assert second["messages"] == [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And its population?"},
    ]


def test_stop_button_aborts_the_answer_and_the_upstream_connection_closes(page, relay, upstream):
    model, answer = chat_page_mid_answer(page, relay, upstream)
    stopped_at = time.monotonic()
    page.click("#stop")
    expect(answer.locator(".note")).to_have_text("Stopped.")
    assert_hung_up_soon(upstream, model, stopped_at)
    shown = answer.locator(".text").text_content()
    page.wait_for_timeout(300)
    assert answer.locator(".text").text_content() == shown, "text kept arriving after Stop"
    expect(page.locator("#send")).to_be_visible()


@pytest.mark.parametrize(
    "events, shown_text, message",
    [
        pytest.param(None, "", UPSTREAM_ERROR["message"], id="refused-before-the-answer"),
        pytest.param(
            failing_mid_answer(["Half an ", "answer"]), "Half an answer", SERVER_ERROR["message"], id="failed-mid-answer"
        ),
    ],
)
def test_upstream_error_shows_as_a_readable_message(page, relay, upstream, events, shown_text, message):
    if events is None:
        model = upstream.script(lambda conn: conn.json_response(400, {"error": UPSTREAM_ERROR}))
    else:
        model = upstream.script(stream_script(events, delay=0.05))
    open_chat(page, relay, model)
    answer = ask(page, "Anything")
    error = answer.locator(".note.error")
    expect(error).to_contain_text(message)
    expect(error).to_have_attribute("role", "alert")
    expect(answer.locator(".text")).to_have_text(shown_text)


def test_page_asks_for_an_access_token_when_the_relay_requires_one(page, relay, upstream):
    model = upstream.script(stream_script(sse_answer(["Welcome", "."])))
    sent_tokens = []

    def relay_with_access_tokens(route):
        authorization = route.request.headers.get("authorization")
        sent_tokens.append(authorization)
        if authorization == "Bearer letmein":
            route.continue_()
        else:
            route.fulfill(status=401, json={"error": UNAUTHORIZED}, headers={"WWW-Authenticate": "Bearer"})

    # Stands in for RELAY_ACCESS_TOKENS in front of the real relay.
    page.route("**/api/stream_chat_completion", relay_with_access_tokens)
    open_chat(page, relay, model)
    expect(page.locator("#token")).to_be_hidden()
    refused = ask(page, "Hello?")
    expect(refused.locator(".note.error")).to_contain_text("access token is required")
    expect(page.locator("#token")).to_be_focused()
    expect(page.locator("#question")).to_have_value("Hello?")  # the unanswered question, back for a retry
    page.fill("#token", "letmein")
    answer = ask(page, "Hello?")
    wait_answered(answer)
    expect(answer.locator(".text")).to_have_text("Welcome.")
    assert sent_tokens == [None, "Bearer letmein"]


def test_chat_page_is_readable_on_a_phone(browser, relay, upstream):
    unbroken = "https://example.com/" + "a" * 300  # a long URL must wrap, not widen the page
    model = upstream.script(stream_script(sse_answer(["See ", unbroken])))
    phone = new_page(browser, viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    try:
        open_chat(phone, relay, model)
        wait_answered(ask(phone, "Where is it?"))
        width = phone.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], f"the page scrolls sideways on a phone: {width}"
        box = phone.locator("#send").bounding_box()
        on_screen = box and box["x"] + box["width"] <= PHONE["width"] and box["y"] + box["height"] <= PHONE["height"]
        assert on_screen, f"Send is off-screen: {box}"
        assert phone.evaluate("getComputedStyle(document.getElementById('question')).fontSize") == "16px"
    finally:
        phone.context.close()


def test_demo_page_works_out_of_the_box_with_relay_demo(page, relay_factory, tmp_path):
    demo = relay_factory(RELAY_DEMO="1", OPENAI_API_KEY="<unset>", OPENAI_BASE_URL="<unset>")
    open_chat(page, demo)
    expect(page.locator("#demo-badge")).to_be_visible()
    expect(page.locator("#demo-badge")).to_have_text("Demo mode")
    first_question, second_question = "What is Chat Relay?", "How does it stream?"
    first = ask(page, first_question)
    wait_answered(first)
    expect(first.locator(".text")).to_have_text(demo_answer([{"role": "user", "content": first_question}]))

    second = ask(page, second_question)
    expect(second.locator(".text")).to_contain_text("stream: true")
    assert second.get_attribute("aria-busy") == "true", "the demo answer finished before the screenshot"
    screenshot = tmp_path / "demo-page.png"
    page.screenshot(path=screenshot)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(screenshot, ARTIFACTS / "demo-page.png")
    wait_answered(second)
    expect(second.locator(".text")).to_have_text(demo_answer([{"role": "user", "content": second_question}]))


def test_seed_article_fetch_reader_still_reads_the_plain_text_format(page, relay, upstream):
    model = upstream.script(stream_script(sse_answer(TOKENS), delay=0.05))
    page.goto(relay.url + "/healthz")
    reads = page.evaluate(
        """async (model) => {
          const res = await fetch("/api/stream_chat_completion", {
            method: "POST", headers: {"Content-Type": "application/json"},
            body: JSON.stringify({model, messages: [{role: "user", content: "Hello"}]}),
          });
          const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
          const reads = [];
          for (let r; !(r = await reader.read()).done; ) reads.push(r.value);
          return reads;
        }""",
        model,
    )
    assert "".join(reads) == "".join(TOKENS)
    assert len(reads) > 1, f"the plain-text answer arrived in one piece: {reads}"


# --- relay-client.js on its own ------------------------------------------------------------------

RUN_CLIENT = """async ({params, token, abortAfter, breakAfter}) => {
  const {streamChatCompletion} = await import("/static/relay-client.js");
  const stop = new AbortController();
  const tokens = [];
  try {
    for await (const piece of streamChatCompletion(params, {signal: stop.signal, token})) {
      tokens.push(piece);
      if (tokens.length === abortAfter) stop.abort();
      if (tokens.length === breakAfter) break;
    }
    return {tokens, error: null};
  } catch (e) {
    const {name, code = null, type = null, status = null, message} = e;
    return {tokens, error: {name, code, type, status, message}};
  }
}"""


def run_client(page: Page, relay, model: str | None = None, *, messages=None, **options) -> dict:
    """Run streamChatCompletion in the page; returns the tokens it yielded and the error it threw."""
    if not page.url.startswith(relay.url):
        page.goto(relay.url + "/healthz")
    params = {"messages": messages or [{"role": "user", "content": "hi"}]}
    if model is not None:
        params["model"] = model
    return page.evaluate(RUN_CLIENT, {"params": params, **options})


def test_client_yields_each_token_and_ends_cleanly_on_done(page, relay, upstream):
    model = upstream.script(stream_script(sse_answer(JAPANESE, usage={"completion_tokens": 7}), delay=0.02))
    result = run_client(page, relay, model)
    assert result == {"tokens": JAPANESE, "error": None}


def test_client_asks_for_event_stream_json_and_sends_the_bearer_token(page, relay, upstream):
    model = upstream.script(stream_script(sse_answer(TOKENS)))
    page.goto(relay.url + "/healthz")
    with page.expect_request("**/api/stream_chat_completion") as sent:
        result = run_client(page, relay, model, token="secret-token")
    headers = sent.value.headers
    assert headers["accept"] == "text/event-stream"
    assert headers["content-type"] == "application/json"
    assert headers["authorization"] == "Bearer secret-token"
    assert result["tokens"] == TOKENS and result["error"] is None


def test_client_throws_the_relays_error_code_on_an_http_error(page, relay):
    result = run_client(page, relay, "any-model", messages=[{"role": "robot", "content": "hi"}])
    assert result["tokens"] == []
    assert result["error"]["name"] == "RelayError"
    assert result["error"]["code"] == "invalid_request"
    assert result["error"]["type"] == "invalid_request_error"
    assert result["error"]["status"] == 400
    assert "messages[0].role" in result["error"]["message"]


@pytest.mark.parametrize(
    "status, said",
    [
        (502, "HTTP 502"),  # a proxy's error page, not the relay's JSON
        (200, "text/html"),  # a captive portal's page: no event stream, not an answer cut short
    ],
)
def test_client_throws_bad_response_on_a_page_that_is_not_the_relays(page, relay, status, said):
    page.goto(relay.url + "/healthz")
    page.route(
        "**/api/stream_chat_completion",
        lambda route: route.fulfill(status=status, content_type="text/html", body="<h1>Not the relay</h1>"),
    )
    result = run_client(page, relay, "any-model")
    assert result["error"]["code"] == "bad_response" and result["error"]["status"] == status, result["error"]
    assert said in result["error"]["message"]


def test_client_throws_the_event_error_code_after_the_tokens_before_it(page, relay, upstream):
    model = upstream.script(stream_script(failing_mid_answer(["Half an ", "answer"]), delay=0.02))
    result = run_client(page, relay, model)
    assert result["tokens"] == ["Half an ", "answer"]
    assert result["error"]["name"] == "RelayError"
    assert result["error"]["code"] == "upstream_error"  # the upstream's own code is named in the message
    assert result["error"]["status"] is None
    assert SERVER_ERROR["message"] in result["error"]["message"] and "server_error" in result["error"]["message"]


def test_client_throws_when_the_stream_ends_without_done(page, relay):
    truncated = 'event: meta\ndata: {"id": "x", "model": "m", "created": 1}\n\ndata: {"content": "Hi"}\n\n'
    page.goto(relay.url + "/healthz")
    page.route(
        "**/api/stream_chat_completion",
        lambda route: route.fulfill(status=200, content_type="text/event-stream; charset=utf-8", body=truncated),
    )
    result = run_client(page, relay, "any-model")
    assert result["tokens"] == ["Hi"]
    assert result["error"] is not None, "a stream without event: done ended as if complete"
    assert result["error"]["code"] == "incomplete_stream"


# Only a stream built in the page controls where reads split; route.fulfill delivers one body.
PARSE_SPLIT_STREAM = """async ({body, size}) => {
  const bytes = new TextEncoder().encode(body);
  window.fetch = async () => new Response(new ReadableStream({
    start(controller) {
      for (let i = 0; i < bytes.length; i += size) controller.enqueue(bytes.slice(i, i + size));
      controller.close();
    },
  }), {headers: {"Content-Type": "text/event-stream"}});
  const {streamChatCompletion} = await import("/static/relay-client.js");
  const tokens = [];
  for await (const token of streamChatCompletion({model: "m", messages: []})) tokens.push(token);
  return tokens;
}"""


@pytest.mark.parametrize("size", [1, 2, 3, 5, 1 << 20], ids=lambda size: f"{size}-byte-reads")
def test_client_parses_events_split_anywhere_in_the_byte_stream(page, relay, size):
    body = (
        'event: meta\r\ndata: {"id": "x", "model": "m", "created": 1}\r\n\r\n'
        ': ping\r\n\r\n'
        'data:{"content": "日本語"}\r\n\r\n'
        'data: {"content": "é👋🏽"}\r\r'
        'event: future-kind\ndata: {"ignored": true}\n\n'
        'event: nothing-in-it\n\n'
        'data: {"content":\ndata: "two lines"}\n\n'
        'data: {"content": " end\u2028"}\n\n'  # U+2028 is not a line end
        'event: done\ndata: {"finish_reason": "stop", "usage": null}\n\n'
    )  # fmt: skip
    page.goto(relay.url + "/healthz")
    tokens = page.evaluate(PARSE_SPLIT_STREAM, {"body": body, "size": size})
    assert tokens == ["日本語", "é👋🏽", "two lines", " end\u2028"]


@pytest.mark.parametrize("size", [1, 1 << 20], ids=lambda size: f"{size}-byte-reads")
def test_client_takes_a_cr_that_ends_the_body_as_a_line_end(page, relay, size):
    """A CR held back as maybe half a CRLF is a line end once the body ends: the done event counts."""
    body = 'event: meta\rdata: {"id": "x", "model": "m", "created": 1}\r\rdata: {"content": "ok"}\r\r' \
           'event: done\rdata: {"finish_reason": "stop", "usage": null}\r\r'  # fmt: skip
    page.goto(relay.url + "/healthz")
    assert page.evaluate(PARSE_SPLIT_STREAM, {"body": body, "size": size}) == ["ok"]


def test_client_abort_signal_cancels_the_upstream_request(page, relay, upstream):
    model = slow_endless_answer(upstream)
    started = time.monotonic()
    result = run_client(page, relay, model, abortAfter=2)
    assert result["tokens"] == ["word ", "word "]
    assert result["error"]["name"] == "AbortError"
    assert_hung_up_soon(upstream, model, started)


def test_client_leaving_the_loop_early_cancels_the_upstream_request(page, relay, upstream):
    model = slow_endless_answer(upstream)
    started = time.monotonic()
    result = run_client(page, relay, model, breakAfter=2)
    assert result == {"tokens": ["word ", "word "], "error": None}
    assert_hung_up_soon(upstream, model, started)
