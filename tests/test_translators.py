"""Unit tests for ``TokenTranslator`` (plain and SSE token output) and ``PassthroughTranslator``.

Upstream streams are written as the OpenAI chat-completions API sends them and decoded with the
real ``SSEDecoder``, so the translators see the events they would see behind the relay.
"""

from __future__ import annotations

import json

import pytest

from errors import RelayError
from streaming import PassthroughTranslator, SSEDecoder, TokenTranslator

CHUNK_BASE = {
    "id": "chatcmpl-9xYz",
    "object": "chat.completion.chunk",
    "created": 1718000000,
    "model": "gpt-4o-mini-2024-07-18",
    "system_fingerprint": "fp_abc123",
}
USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
TOKENS = ["Hel", "lo", ", ", "wörld", " 🎉"]
SECRET = "sk-abcdefghijklmnop123"


def chunk(delta: dict | None = None, finish_reason: str | None = None, *, choices=None, usage=None) -> dict:
    """One chat.completion.chunk; ``choices`` overrides the single choice built from delta/finish_reason."""
    if choices is None:
        choices = [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}]
    return {**CHUNK_BASE, "choices": choices, "usage": usage}


def sse(*chunks: dict, done: bool = True) -> bytes:
    """The upstream body: one ``data:`` event per chunk, then ``data: [DONE]`` unless ``done`` is False."""
    body = b"".join(b"data: " + json.dumps(c, ensure_ascii=False).encode() + b"\n\n" for c in chunks)
    return body + (b"data: [DONE]\n\n" if done else b"")


def openai_stream(tokens=TOKENS, finish_reason="stop", usage=USAGE, done=True) -> bytes:
    """A realistic stream: role chunk, one chunk per token, finish chunk, usage chunk, [DONE]."""
    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": token}) for token in tokens]
    if finish_reason:
        chunks.append(chunk({}, finish_reason))
    if usage:
        chunks.append(chunk(choices=[], usage=usage))
    return sse(*chunks, done=done)


def feed_all(translator, body: bytes) -> list[bytes]:
    """The translator's output for each event in ``body``."""
    return [translator.feed(event) for event in SSEDecoder().feed(body)]


def translate(translator, body: bytes) -> bytes:
    """Everything the translator writes for ``body``, its ``end()`` included."""
    return b"".join(feed_all(translator, body)) + translator.end()


def frames(output: bytes) -> list[tuple[str | None, object]]:
    """Parse SSE output strictly into (event type or None, parsed JSON data), one per frame."""
    assert output.endswith(b"\n\n"), f"SSE output should end with a blank line: {output!r}"
    parsed = []
    for block in output[:-2].split(b"\n\n"):
        *head, data_line = block.split(b"\n")
        assert data_line.startswith(b"data: "), f"each frame should end with one 'data: ' line: {block!r}"
        assert len(head) <= 1, f"a frame should have at most an event line before its data: {block!r}"
        event = None
        if head:
            assert head[0].startswith(b"event: "), f"the line before data should be 'event: ': {block!r}"
            event = head[0][len(b"event: ") :].decode()
        parsed.append((event, json.loads(data_line[len(b"data: ") :])))
    return parsed


def raised_by(translator, body: bytes) -> RelayError:
    with pytest.raises(RelayError) as caught:
        translate(translator, body)
    return caught.value


ALL_TRANSLATORS = pytest.mark.parametrize(
    "make",
    [lambda: TokenTranslator(sse=False), lambda: TokenTranslator(sse=True), PassthroughTranslator],
    ids=["plain", "sse", "passthrough"],
)


# --- plain format --------------------------------------------------------------------------------


def test_plain_output_is_the_concatenation_of_delta_contents():
    translator = TokenTranslator(sse=False)
    outputs = feed_all(translator, openai_stream())
    assert b"".join(outputs) == "".join(TOKENS).encode(), f"plain output should be the bare tokens, got {outputs}"
    assert outputs[0] == b"", f"the role chunk (content '') should write nothing, wrote {outputs[0]!r}"
    assert translator.end() == b"", "the plain format has no closing output"
    assert (translator.finish_reason, translator.usage, translator.model) == ("stop", USAGE, CHUNK_BASE["model"])


# --- SSE format ----------------------------------------------------------------------------------


def test_sse_output_is_meta_then_one_frame_per_token_then_done():
    translator = TokenTranslator(sse=True)
    outputs = feed_all(translator, openai_stream())
    assert outputs[0].startswith(b"event: meta\ndata: "), f"the first output should be the meta event: {outputs[0]!r}"
    tail = translator.end()
    assert tail.startswith(b"event: done\ndata: "), f"end() should write the done event: {tail!r}"
    expected = [
        ("meta", {"id": CHUNK_BASE["id"], "model": CHUNK_BASE["model"], "created": CHUNK_BASE["created"]}),
        *[(None, {"content": token}) for token in TOKENS],
        ("done", {"finish_reason": "stop", "usage": USAGE}),
    ]
    assert frames(b"".join(outputs) + tail) == expected


def test_sse_done_has_null_usage_without_a_usage_chunk():
    translator = TokenTranslator(sse=True)
    events = frames(translate(translator, openai_stream(usage=None)))
    assert events[-1] == ("done", {"finish_reason": "stop", "usage": None}), f"got {events[-1]}"


def test_sse_token_frames_keep_newlines_and_line_separators_inside_the_json():
    tokens = ["line one\nline two", "a\u2028b", "c\r\nd"]
    events = frames(translate(TokenTranslator(sse=True), openai_stream(tokens=tokens)))
    assert [data["content"] for event, data in events if event is None] == tokens, f"got {events}"


# --- skipped content -----------------------------------------------------------------------------


@pytest.mark.parametrize("sse_format", [False, True], ids=["plain", "sse"])
def test_null_or_missing_delta_content_emits_no_token(sse_format):
    body = sse(
        chunk({"role": "assistant", "content": None}),
        chunk({"content": "a"}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
        chunk({"content": None}),
        chunk({}),
        chunk(choices=[{"index": 0, "finish_reason": None}]),
        chunk({"content": "b"}),
        chunk({}, "stop"),
    )
    translator = TokenTranslator(sse=sse_format)
    output = translate(translator, body)
    if sse_format:
        tokens = [data["content"] for event, data in frames(output) if event is None]
        assert tokens == ["a", "b"], f"only the two real tokens should be framed, got {tokens}"
    else:
        assert output == b"ab", f"only the two real tokens should be written, got {output!r}"
    assert translator.token_count == 2, f"null/missing content must not count as tokens: {translator.token_count}"


# --- upstream errors and malformed data ----------------------------------------------------------


@ALL_TRANSLATORS
def test_upstream_error_event_raises_502_with_its_message_redacted(make):
    message = f"Incorrect API key provided: {SECRET}. You can find your API key at platform."
    upstream_error = {"error": {"message": message, "type": "server_error", "code": None}}
    body = sse(chunk({"content": "a"}), done=False) + b"data: " + json.dumps(upstream_error).encode() + b"\n\n"
    error = raised_by(make(), body)
    assert error.status == 502, f"an upstream error event should be a 502, got {error.status}"
    assert "Incorrect API key provided" in error.message, f"the upstream message should be kept: {error.message!r}"
    assert SECRET not in error.message, f"the key-shaped string should be redacted: {error.message!r}"
    assert SECRET.encode() not in error.to_json(), "the key-shaped string should not reach the error JSON"


@ALL_TRANSLATORS
@pytest.mark.parametrize("data", [b"not json", b'{"choices": [', b"[1, 2]", b'"text"'])
def test_data_that_is_not_a_json_object_raises_upstream_error(make, data):
    error = raised_by(make(), b"data: " + data + b"\n\n")
    assert (error.status, error.code) == (502, "upstream_error"), f"{data!r} gave {error.status} {error.code}"


@ALL_TRANSLATORS
@pytest.mark.parametrize(
    "data",
    [b'{"choices": [null]}', b'{"choices": [{"delta": "x"}]}'],
)
def test_json_object_of_the_wrong_shape_raises_upstream_error(make, data):
    with pytest.raises(RelayError) as caught:
        translate(make(), b"data: " + data + b"\n\n")
    assert (caught.value.status, caught.value.code) == (502, "upstream_error"), f"{data!r}: {caught.value!r}"


# --- end of stream -------------------------------------------------------------------------------


@ALL_TRANSLATORS
def test_stream_without_finish_reason_or_done_is_truncated(make):
    error = raised_by(make(), openai_stream(finish_reason=None, usage=None, done=False))
    assert (error.status, error.code) == (502, "upstream_error"), f"got {error.status} {error.code}"
    assert "ended before" in error.message, f"the message should say the stream was cut short: {error.message!r}"


@ALL_TRANSLATORS
def test_finish_reason_without_done_ends_cleanly(make):
    translator = make()
    translate(translator, openai_stream(done=False))
    assert translator.finish_reason == "stop", f"finish_reason should be recorded, got {translator.finish_reason!r}"


@ALL_TRANSLATORS
def test_done_without_finish_reason_ends_cleanly(make):
    translator = make()
    translate(translator, openai_stream(finish_reason=None, usage=None))
    assert translator.finish_reason is None, f"no finish_reason was sent, got {translator.finish_reason!r}"


def test_sse_done_without_finish_reason_reports_null():
    events = frames(translate(TokenTranslator(sse=True), openai_stream(finish_reason=None, usage=None)))
    assert events[-1] == ("done", {"finish_reason": None, "usage": None}), f"got {events[-1]}"


# --- completion tokens ---------------------------------------------------------------------------


@ALL_TRANSLATORS
def test_completion_tokens_come_from_usage_when_reported(make):
    translator = make()
    translate(translator, openai_stream(usage={**USAGE, "completion_tokens": 42}))
    assert translator.completion_tokens == 42, f"usage.completion_tokens should win, got {translator.completion_tokens}"


@ALL_TRANSLATORS
def test_completion_tokens_count_token_events_without_usage(make):
    translator = make()
    translate(translator, openai_stream(usage=None))
    assert translator.completion_tokens == len(TOKENS), (
        f"without usage, the {len(TOKENS)} non-empty token events should be counted, got {translator.completion_tokens}"
    )


# --- passthrough ---------------------------------------------------------------------------------


def test_passthrough_relays_every_field_line_byte_identical_and_drops_comments():
    role = json.dumps(chunk({"role": "assistant", "content": None}), separators=(",", ":")).encode()
    tool_call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
    tool_start = json.dumps(chunk({"tool_calls": [tool_call]})).encode()
    tool_args = chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"q": "日本"}'}}]})
    tool_args = json.dumps(tool_args, ensure_ascii=False).encode()
    finish = json.dumps(chunk({}, "tool_calls")).encode()
    relayed = [
        b"data:" + role + b"\n\n",
        b"data: " + tool_start + b"\n\n",
        b"id: 7\ndata:  " + tool_args + b"\n\n",
        b"data: " + finish + b"\n\n",
        b"data: [DONE]\n\n",
    ]
    comments = [b": OPENROUTER PROCESSING\n\n", b":ping\n", b"", b"", b""]
    body = b"".join(comment + event for comment, event in zip(comments, relayed))
    outputs = feed_all(PassthroughTranslator(), body)
    assert outputs == relayed, "each event should be relayed byte for byte, comments dropped"


def test_passthrough_error_is_a_data_event_with_the_error_json():
    error = RelayError(502, "upstream_error", "The upstream connection failed mid-stream.")
    output = PassthroughTranslator().error(error)
    assert output == b"data: " + error.to_json() + b"\n\n", f"got {output!r}"
    assert frames(output) == [(None, error.to_dict())]


# --- error frames --------------------------------------------------------------------------------


def test_plain_error_returns_none_to_abort_the_connection():
    error = RelayError(504, "upstream_timeout", "The upstream went silent.")
    assert TokenTranslator(sse=False).error(error) is None, "the plain format cannot frame an error: abort instead"


def test_sse_error_is_an_error_event_with_message_type_and_code():
    error = RelayError(504, "upstream_timeout", "The upstream went silent.")
    translator = TokenTranslator(sse=True)
    feed_all(translator, sse(chunk({"content": "a"}), done=False))
    output = translator.error(error)
    assert output.startswith(b"event: error\ndata: "), f"got {output!r}"
    expected = {"error": {"message": "The upstream went silent.", "type": "timeout_error", "code": "upstream_timeout"}}
    assert frames(output) == [("error", expected)]


def test_an_sse_error_before_any_chunk_named_the_model_comes_after_a_meta():
    """The events always open with meta, also when the answer fails before a chunk named its model."""
    for stream_id in (None, "s1"):
        translator = TokenTranslator(sse=True, stream_id=stream_id)
        assert feed_all(translator, sse({"choices": [], "id": "", "model": "", "created": 0}, done=False)) == [b""]
        output = translator.error(RelayError(504, "upstream_timeout", "The upstream went silent."))
        if stream_id is None:
            assert [kind for kind, _ in frames(output)] == ["meta", "error"]
        else:  # numbered in that order
            assert output.startswith(b"id: s1:1\nevent: meta\n") and b"\n\nid: s1:2\nevent: error\n" in output


# --- what the upstream may put in odd places ---------------------------------------------------


@ALL_TRANSLATORS
@pytest.mark.parametrize("reason", [1, True, {"type": "stop"}, ["stop"]])
def test_a_finish_reason_that_is_not_a_string_ends_nothing(make, reason):
    """The contract's finish_reason is a string: another value is no end the relay can pass on."""
    truncated = sse(chunk({"content": "a"}), chunk({}, reason), done=False)
    assert "ended before" in raised_by(make(), truncated).message
    translator = make()
    translate(translator, sse(chunk({"content": "a"}), chunk({}, reason)))  # [DONE] still ends it
    assert translator.finish_reason is None


@ALL_TRANSLATORS
@pytest.mark.parametrize("depth", [253, 254, 300])
def test_a_usage_nested_deeper_than_orjson_writes_is_no_usage(make, depth):
    """orjson reads 1024 levels and writes 254: the done event, one level above the usage, could not be written."""
    deep = json.loads("[" * depth + "]" * depth)
    translator = make()
    output = translate(translator, sse(chunk({"content": "a"}, "stop"), chunk(choices=[], usage={"deep": deep})))
    assert translator.usage is None
    if isinstance(translator, TokenTranslator) and translator.sse:
        assert frames(output)[-1] == ("done", {"finish_reason": "stop", "usage": None})


@ALL_TRANSLATORS
def test_an_event_with_empty_data_is_skipped(make):
    """`data:` alone is an event with nothing in it; the SDKs fail on one, so the passthrough drops it too."""
    body = openai_stream()
    with_empty = body.replace(b"\n\n", b"\n\ndata:\n\n", 2)
    assert translate(make(), with_empty) == translate(make(), body)



@ALL_TRANSLATORS
def test_an_error_event_with_empty_data_still_fails_the_answer(make):
    with pytest.raises(RelayError):
        translate(make(), sse(chunk({"content": "a"}), done=False) + b"event: error\ndata:\n\n" + sse(chunk({}, "stop")))
