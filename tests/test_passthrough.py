"""POST /v1/chat/completions and GET /v1/models: the official openai SDKs work against the relay unchanged."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import openai
import pytest

from conftest import UPSTREAM_KEY
from fake_upstream import chunk, sse_answer, stream_script

NODE_DIR = Path(__file__).parent / "node"


def sdk(relay, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=relay.url + "/v1", api_key="caller-key", max_retries=0, timeout=20, **options)


def ask(client: openai.OpenAI, model: str, **extra):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], **extra)


def data_lines(body: bytes) -> list[bytes]:
    return [line for line in body.split(b"\n") if line.startswith(b"data:")]


def test_streaming_text_through_the_python_sdk(relay, upstream):
    model = upstream.script(stream_script(sse_answer(["Hel", "lo", " ✓"]), delay=0.05))
    stream = ask(sdk(relay), model, stream=True)
    text = "".join(part.choices[0].delta.content or "" for part in stream if part.choices)
    assert text == "Hello ✓"


def test_every_data_line_is_byte_identical_and_done_is_included(relay, upstream):
    events = [
        f"data: {chunk(role='assistant', content='')}\n\n".encode(),
        f"data:{chunk('no space after the colon')}\n\n".encode(),
        f"data: {chunk(refusal='I cannot', content=None)}\n\n".encode(),
        b"data: " + chunk("a\u2028b").encode() + b"\r\n\r\n",
        b": an upstream comment\n\n",
        b"event: ping\n\n",
        f"data: {chunk(finish_reason='stop')}\n\n".encode(),
        b"data: [DONE]\n\n",
    ]
    model = upstream.script(stream_script(events))
    result = relay.post("/v1/chat/completions", {"model": model, "messages": [], "stream": True})
    assert result.status == 200 and result.headers["content-type"].startswith("text/event-stream")
    sent = data_lines(b"".join(events).replace(b"\r\n", b"\n"))
    assert data_lines(result.body) == sent
    assert b"ping" not in result.body, "data-less upstream blocks must be dropped"


def test_named_events_pass_through_as_chunks_when_the_sdks_can_read_them_and_are_dropped_when_not(relay, upstream):
    """The SDKs parse every event's data as JSON: `event: ping` with `data: ping` would fail them."""
    readable, unreadable = b'event: progress\ndata: {"done": 0.5}\n\n', b"event: ping\ndata: ping\n\n"
    answer = sse_answer(["Hel", "lo"])
    events = answer[:2] + [unreadable, readable] + answer[2:]
    model = upstream.script(stream_script(events))
    result = relay.post("/v1/chat/completions", {"model": model, "messages": [], "stream": True})
    assert result.status == 200 and result.complete
    assert readable in result.body and b"data: ping" not in result.body, result.body
    assert data_lines(result.body) == data_lines(b"".join(answer[:2] + [readable] + answer[2:]))
    stream = ask(sdk(relay), upstream.script(stream_script(answer[:2] + [unreadable] + answer[2:])), stream=True)
    assert "".join(part.choices[0].delta.content or "" for part in stream if part.choices) == "Hello"


def test_streaming_tool_calls_and_usage_pass_through_exactly(relay, upstream):
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "weather", "arguments": ""}}
    args = {"index": 0, "function": {"arguments": '{"city": "Oslo"}'}}
    events = [
        f"data: {chunk(role='assistant', content=None, tool_calls=[call])}\n\n".encode(),
        f"data: {chunk(tool_calls=[args])}\n\n".encode(),
        f"data: {chunk(finish_reason='tool_calls')}\n\n".encode(),
        f"data: {chunk(usage={'prompt_tokens': 5, 'completion_tokens': 7, 'total_tokens': 12}, choices=False)}\n\n".encode(),
        b"data: [DONE]\n\n",
    ]
    model = upstream.script(stream_script(events))
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    parts = list(ask(sdk(relay), model, stream=True, tools=tools, stream_options={"include_usage": True}))
    assert parts[0].choices[0].delta.tool_calls[0].function.name == "weather"
    assert parts[1].choices[0].delta.tool_calls[0].function.arguments == '{"city": "Oslo"}'
    assert parts[2].choices[0].finish_reason == "tool_calls"
    assert parts[3].usage.completion_tokens == 7 and parts[3].choices == []
    sent = upstream.seen(model)[0].request.json()
    assert sent["tools"] == tools and sent["stream_options"] == {"include_usage": True}, "fields must pass through"


def test_non_streaming_returns_the_upstream_json_and_status(relay, upstream):
    completion = {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }  # fmt: skip
    model = upstream.script(lambda conn: conn.json_response(200, completion))
    result = ask(sdk(relay), model, response_format={"type": "json_object"}, reasoning_effort="low")
    assert result.choices[0].message.content == "Hi there"
    sent = upstream.seen(model)[0].request.json()
    assert sent["response_format"] == {"type": "json_object"} and sent["reasoning_effort"] == "low"
    [line] = relay.wait_access_line("/v1/chat/completions", model=model)
    assert line["completion_tokens"] == 2 and line["outcome"] == "ok", "the log counts what the usage reports"


def test_callers_credentials_and_hop_by_hop_headers_never_reach_the_upstream(relay, upstream):
    model = upstream.script(stream_script(sse_answer(["ok"])))
    headers = {"Authorization": "Bearer caller-secret", "Cookie": "sid=1", "Proxy-Authorization": "x", "TE": "trailers"}
    relay.post("/v1/chat/completions", {"model": model, "messages": [], "stream": True}, headers)
    seen = upstream.seen(model)[0].request.headers
    assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert not {"cookie", "proxy-authorization", "te"} & set(seen)


@pytest.mark.parametrize(
    "status, body, error_class, relay_status",
    [
        (400, {"error": {"message": "bad temperature", "type": "invalid_request_error", "code": "bad_temp"}},
         openai.BadRequestError, 400),
        (404, {"error": {"message": "no such model", "type": "invalid_request_error", "code": "model_not_found"}},
         openai.NotFoundError, 404),
        (422, {"error": {"message": "unprocessable", "code": None}}, openai.UnprocessableEntityError, 422),
        (401, {"error": {"message": f"Incorrect API key provided: {UPSTREAM_KEY}"}}, openai.InternalServerError, 502),
        (429, {"error": {"message": "slow down"}}, openai.RateLimitError, 429),
        (500, {"error": {"message": "boom"}}, openai.InternalServerError, 502),
    ],
)  # fmt: skip
def test_upstream_errors_raise_the_sdks_usual_exception_classes(relay_factory, upstream, status, body, error_class, relay_status):
    relay = relay_factory(RELAY_RETRIES="0")
    headers = [("Retry-After", "1")] if status == 429 else []
    model = upstream.script(lambda conn: conn.json_response(status, body, headers))
    for stream in (True, False):
        with pytest.raises(error_class) as caught:
            ask(sdk(relay), model, stream=stream)
        assert caught.value.status_code == relay_status
        assert UPSTREAM_KEY not in str(caught.value.body) and UPSTREAM_KEY not in caught.value.response.text


def test_a_mid_stream_failure_ends_with_a_data_error_event_the_sdk_raises(relay, upstream):
    events = sse_answer(["a", "b"], done=False)[:2]  # truncated: no finish_reason, no [DONE]
    model = upstream.script(stream_script(events))
    with pytest.raises(openai.APIError, match="ended before the answer was complete"):
        list(ask(sdk(relay), model, stream=True))


def test_the_upstreams_own_mid_stream_error_event_is_passed_on_as_it_came_but_for_the_key(relay, upstream):
    """Its code (rate_limit_exceeded) is one an SDK user can act on; the key, if echoed, is not passed on."""
    error = {"message": f"Rate limit reached for {UPSTREAM_KEY}", "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}
    failure = b"data: " + json.dumps({"error": error}).encode()
    model = upstream.script(stream_script(sse_answer(["a"], done=False)[:2] + [failure + b"\n\n"]))
    result = relay.post("/v1/chat/completions", {"model": model, "messages": [], "stream": True})
    assert result.status == 200
    assert data_lines(result.body)[-1] == failure.replace(UPSTREAM_KEY.encode(), b"[redacted]")
    assert UPSTREAM_KEY.encode() not in result.body
    with pytest.raises(openai.APIError, match="Rate limit reached for \\[redacted\\]") as caught:
        list(ask(sdk(relay), model, stream=True))
    assert caught.value.code == "rate_limit_exceeded"
    named = upstream.script(stream_script(sse_answer(["a"], done=False)[:2] + [b'event: error\ndata: {"detail": "overloaded"}\n\n']))
    with pytest.raises(openai.APIError, match="Upstream error"):  # the relay's own: the SDK would not raise on it as it came
        list(ask(sdk(relay), named, stream=True))


def test_guard_checks_apply_but_unknown_fields_pass(relay_factory, upstream):
    relay = relay_factory(RELAY_MODELS="gpt-a", RELAY_MAX_TOKENS="10")
    with pytest.raises(openai.PermissionDeniedError):
        ask(sdk(relay), "gpt-b")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        ask(sdk(relay), "gpt-a", max_tokens=11)
    with pytest.raises(openai.BadRequestError, match="'n'"):
        ask(sdk(relay), "gpt-a", n=2)


def test_models_list_is_the_allow_list_when_set(relay_factory):
    relay = relay_factory(RELAY_MODELS="gpt-a,gpt-b")
    assert [model.id for model in sdk(relay).models.list()] == ["gpt-a", "gpt-b"]


@pytest.mark.parametrize("bare", [False, True], ids=["openai-shape", "bare-array"])
def test_models_list_is_the_upstreams_otherwise(relay, upstream, bare):
    """Together AI answers with the bare array of models: the relay gives it the list shape the SDKs read."""
    models = [{"id": "up-1", "object": "model", "created": 0, "owned_by": "x"}]
    listing = models if bare else {"object": "list", "data": models}
    upstream.default_script = lambda conn: conn.json_response(200, listing)
    try:
        assert [model.id for model in sdk(relay).models.list()] == ["up-1"]
        assert relay.request("GET", "/v1/models").json() == {"object": "list", "data": models}
    finally:
        upstream.default_script = None


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_streaming_through_the_node_sdk(relay, upstream):
    assert (NODE_DIR / "node_modules" / "openai").exists(), "run ./test.sh: it installs the npm SDK"
    model = upstream.script(stream_script(sse_answer(["Node", " says", " hi"]), delay=0.02))
    result = subprocess.run(
        ["node", "sdk_stream.mjs", relay.url + "/v1", model], cwd=NODE_DIR, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"text": "Node says hi", "chunks": 5}


@pytest.mark.parametrize("body", [0, [], "a string", None])
def test_a_non_streaming_answer_that_is_not_a_json_object_is_a_malformed_reply(relay, upstream, body):
    """A completion is an object; `0` is what a body cut by a broken header section can read as."""
    model = upstream.script(lambda conn: conn.json_response(200, body))
    result = relay.post("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}]})
    assert result.status == 502 and result.json()["error"]["code"] == "upstream_error", result.body
