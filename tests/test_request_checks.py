"""Each request-check rule of the contract, end to end: the JSON error, its status, code and field."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time

import pytest

from fake_upstream import sse_answer, stream_script

PATH = "/api/stream_chat_completion"
MESSAGES = [{"role": "user", "content": "hi"}]


def assert_error(result, status: int, code: str, field: str | None = None):
    assert result.status == status, f"expected {status}, got {result.status}: {result.body!r}"
    assert result.headers["content-type"] == "application/json"
    error = result.json()["error"]
    assert error["code"] == code, error
    assert error["message"] and error["type"], error
    if field is not None:
        assert field in error["message"], f"the message should name {field!r}: {error['message']!r}"


@pytest.fixture(scope="module")
def guarded(relay_factory):
    return relay_factory(RELAY_MODELS="gpt-ok,script-allowed", RELAY_MAX_TOKENS="100", RELAY_MAX_BODY_BYTES="2048")


def test_a_body_that_is_not_json_typed_is_415(relay):
    result = relay.post(PATH, b"model=x", {"Content-Type": "application/x-www-form-urlencoded"})
    assert_error(result, 415, "unsupported_media_type")


def test_a_body_that_is_not_valid_json_is_400_invalid_json(relay):
    assert_error(relay.post(PATH, b"{nope", {"Content-Type": "application/json"}), 400, "invalid_json")


@pytest.mark.parametrize("path", [PATH, "/v1/chat/completions"])
def test_a_message_cut_inside_an_emoji_is_relayed_with_the_half_replaced(relay, upstream, path):
    """JSON.stringify("hi 😀".slice(0, 4)) keeps half the emoji as the escape \\ud83d: valid JSON."""
    model = upstream.script(stream_script(sse_answer(["ok"])))
    body = b'{"model": "%s", "stream": true, "messages": [{"role": "user", "content": "hi \\ud83d"}]}' % model.encode()
    result = relay.post(path, body, {"Content-Type": "application/json"})
    assert result.status == 200, result.body
    assert upstream.seen(model)[0].request.json()["messages"][0]["content"] == "hi \ufffd"


@pytest.mark.parametrize(
    "escaped, relayed",
    [
        (rb"\udc00\ud83d", "\ufffd\ufffd"),  # the halves of a pair, in the wrong order
        (rb"\uD83D\uDE00 \uD83D", "\U0001F600 \ufffd"),  # a whole pair, in capitals, stays
        (rb"\\ud83d \ud83d", "\\ud83d \ufffd"),  # a backslash, then the letters: no escape
        (rb"\\\ud83d", "\\\ufffd"),  # a backslash, then an escape
    ],
)
def test_only_lone_surrogate_escapes_are_replaced_whatever_surrounds_them(relay, upstream, escaped, relayed):
    model = upstream.script(stream_script(sse_answer(["ok"])))
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "%s"}], "user": "\\udfff"}' % (model.encode(), escaped)
    assert relay.post(PATH, body, {"Content-Type": "application/json"}).text == "ok"
    sent = upstream.seen(model)[0].request.json()
    assert sent["messages"][0]["content"] == relayed and sent["user"] == "\ufffd"


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m", "messages": [{"role": "user", "content": "\\ud83d"}], "temperature": NaN}',
        b'{"model": "m", "messages": [{"role": "user", "content": "\\ud83d"}], "temperature": 1e400}',
        b'{"model": "m", "messages": [{"role": "user", "content": "\\ud83d"}], "seed": 123456789012345678901234567890}',
        '{"model": "m", "messages": [{"role": "user", "content": "\\ud83d"}]}'.encode("utf-16"),
        b'{"model": "m", "messages": [{"role": "user", "content": "\xed\xa0\xbd"}]}',  # a surrogate as raw bytes
    ],
    ids=["nan", "too-large-float", "past-64-bits", "utf-16", "raw-surrogate"],
)
def test_a_lone_surrogate_does_not_let_anything_else_that_is_not_json_in(relay, body):
    assert_error(relay.post(PATH, body, {"Content-Type": "application/json"}), 400, "invalid_json")


@pytest.mark.parametrize("path", [PATH, "/v1/chat/completions"])
@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize(
    "extra, words",
    [
        (b'"seed": 123456789012345678901234567890', "64-bit"),
        (b'"seed": -9223372036854775809', "64-bit"),
        (b'"logit_bias": ' + b"[" * 300 + b"]" * 300, "nested"),
        (b'"logit_bias": ' + b"[" * 1023 + b"]" * 1023, "nested"),
    ],
    ids=["past-64-bits", "below-int64", "nested-300", "nested-1023"],
)
def test_json_that_orjson_reads_but_would_not_pass_on_as_it_came_is_400(relay, upstream, path, stream, extra, words):
    """orjson reads big integers as floats and reads deeper nesting than it writes: neither may reach the upstream."""
    model = upstream.script(stream_script(sse_answer(["ok"])))
    body = b'{"model": "%s", "stream": %s, "messages": [{"role": "user", "content": "hi"}], %s}' % (
        model.encode(), b"true" if stream else b"false", extra
    )
    if path == PATH and not stream:
        body = body.replace(b'"stream": false, ', b"")
    assert_error(relay.post(path, body, {"Content-Type": "application/json"}), 400, "invalid_json", words)
    assert upstream.seen(model) == []


def test_long_digit_runs_inside_strings_and_the_largest_64_bit_integers_pass_unchanged(relay, upstream):
    model = upstream.script(stream_script(sse_answer(["ok"])))
    content = "order 123456789012345678901234567890 shipped"
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "%s"}], "seed": 18446744073709551615}' % (
        model.encode(), content.encode()
    )
    assert relay.post(PATH, body, {"Content-Type": "application/json"}).text == "ok"
    sent = upstream.seen(model)[0].request.json()
    assert sent["messages"][0]["content"] == content and sent["seed"] == 18446744073709551615


def test_a_json_body_that_is_not_an_object_is_400_invalid_json(relay):
    assert_error(relay.post(PATH, [1, 2]), 400, "invalid_json")


def test_a_body_over_the_size_limit_is_413(guarded):
    body = {"model": "gpt-ok", "messages": [{"role": "user", "content": "x" * 4096}]}
    assert_error(guarded.post(PATH, body), 413, "payload_too_large")


def test_a_missing_model_without_a_default_is_400_naming_model(relay):
    assert_error(relay.post(PATH, {"messages": MESSAGES}), 400, "invalid_request", "model")


def test_a_model_that_is_not_a_string_is_400_naming_model(relay):
    assert_error(relay.post(PATH, {"model": 5, "messages": MESSAGES}), 400, "invalid_request", "model")


def test_the_default_model_is_used_when_the_request_names_none(relay_factory, upstream):
    model = upstream.script(stream_script(sse_answer(["ok"])))
    relay = relay_factory(RELAY_DEFAULT_MODEL=model)
    result = relay.post(PATH, {"messages": MESSAGES})
    assert result.status == 200 and result.text == "ok"
    assert upstream.seen(model)[0].request.json()["model"] == model


def test_a_model_outside_the_allow_list_is_403_model_not_allowed(guarded):
    assert_error(guarded.post(PATH, {"model": "gpt-other", "messages": MESSAGES}), 403, "model_not_allowed", "gpt-other")


def test_a_model_on_the_allow_list_is_relayed(guarded, upstream):
    upstream.script(stream_script(sse_answer(["fine"])), name="script-allowed")
    result = guarded.post(PATH, {"model": "script-allowed", "messages": MESSAGES})
    assert result.status == 200 and result.text == "fine"


@pytest.mark.parametrize(
    "messages, field",
    [
        (None, "messages"),
        ([], "messages"),
        ("hi", "messages"),
        (["hi"], "messages[0]"),
        ([{"role": "robot", "content": "hi"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": "ok"}, {"role": "user", "content": ["not a part"]}], "messages[1].content"),
    ],
)
def test_malformed_messages_are_400_naming_the_field(relay, messages, field):
    body = {"model": "m", "messages": messages} if messages is not None else {"model": "m"}
    assert_error(relay.post(PATH, body), 400, "invalid_request", field)


def test_content_parts_and_every_role_are_accepted(relay, upstream):
    model = upstream.script(stream_script(sse_answer(["ok"])))
    messages = [
        {"role": "system", "content": "s"},
        {"role": "developer", "content": "d"},
        {"role": "user", "content": [{"type": "text", "text": "u"}]},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "again"},
    ]
    assert relay.post(PATH, {"model": model, "messages": messages}).status == 200


def test_an_unknown_field_is_400_unknown_parameter_naming_it(relay):
    result = relay.post(PATH, {"model": "m", "messages": MESSAGES, "tools": []})
    assert_error(result, 400, "unknown_parameter", "tools")


def test_the_accepted_optional_fields_are_passed_on(relay, upstream):
    model = upstream.script(stream_script(sse_answer(["ok"])))
    options = {
        "temperature": 0.2, "top_p": 0.9, "max_tokens": 50, "stop": ["\n"], "presence_penalty": 0.1,
        "frequency_penalty": 0.1, "seed": 7, "user": "u-1", "logit_bias": {"50256": -100},
        "response_format": {"type": "text"}, "reasoning_effort": "low", "n": 1, "stream": True,
    }  # fmt: skip
    assert relay.post(PATH, {"model": model, "messages": MESSAGES, **options}).status == 200
    sent = upstream.seen(model)[0].request.json()
    for name, value in options.items():
        assert sent[name] == value, name


@pytest.mark.parametrize("stream", [False, "yes", None])
def test_stream_other_than_true_is_400_invalid_request(relay, stream):
    assert_error(relay.post(PATH, {"model": "m", "messages": MESSAGES, "stream": stream}), 400, "invalid_request", "stream")


@pytest.mark.parametrize("n", [2, 0, True, 1.0, "1"])
def test_n_other_than_one_is_400_invalid_request(relay, n):
    assert_error(relay.post(PATH, {"model": "m", "messages": MESSAGES, "n": n}), 400, "invalid_request", "n")


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_above_the_cap_is_400_max_tokens_too_large(guarded, field):
    result = guarded.post(PATH, {"model": "gpt-ok", "messages": MESSAGES, field: 101})
    assert_error(result, 400, "max_tokens_too_large", field)


def test_max_tokens_that_is_not_a_positive_integer_is_400(relay):
    assert_error(relay.post(PATH, {"model": "m", "messages": MESSAGES, "max_tokens": -1}), 400, "invalid_request", "max_tokens")


@pytest.mark.parametrize("named", [{}, {"max_tokens": None}, {"max_completion_tokens": None}], ids=str)
def test_the_cap_is_applied_when_the_request_names_no_max_tokens(guarded, upstream, named):
    upstream.script(stream_script(sse_answer(["ok"])), name="script-allowed")
    guarded.post(PATH, {"model": "script-allowed", "messages": MESSAGES, **named})
    sent = upstream.seen("script-allowed")[-1].request.json()
    assert sent["max_completion_tokens"] == 100
    assert "max_tokens" not in sent, "the cap goes alone, not beside a null max_tokens (models that take only max_completion_tokens)"


@pytest.mark.parametrize("path", [PATH, "/v1/chat/completions"])
@pytest.mark.parametrize("named", [{}, {"max_tokens": None}, {"max_completion_tokens": None}], ids=str)
def test_the_cap_goes_in_max_tokens_for_servers_that_know_no_other(relay_factory, upstream, path, named):
    """Ollama's and LM Studio's OpenAI-compatible endpoints ignore max_completion_tokens: a cap sent
    in it would limit nothing."""
    relay = relay_factory(RELAY_MAX_TOKENS="100", RELAY_MAX_TOKENS_FIELD="Max_Tokens")
    model = upstream.script(stream_script(sse_answer(["ok"])))
    relay.post(path, {"model": model, "messages": MESSAGES, "stream": True, **named})
    sent = upstream.seen(model)[-1].request.json()
    assert sent["max_tokens"] == 100 and "max_completion_tokens" not in sent, sent
    for named in ({"max_completion_tokens": 7}, {"max_completion_tokens": 7, "max_tokens": 9}):
        relay.post(path, {"model": model, "messages": MESSAGES, "stream": True, **named})
        sent = upstream.seen(model)[-1].request.json()
        assert sent["max_tokens"] == 7 and "max_completion_tokens" not in sent, "a limit named in the field it ignores would not hold"
    relay.post(path, {"model": model, "messages": MESSAGES, "stream": True, "max_tokens": 101})
    assert len(upstream.seen(model)) == 3, "over the cap is refused as ever: the upstream is not asked"


def test_unknown_paths_and_methods_get_json_errors(relay):
    assert_error(relay.request("GET", "/nope"), 404, "not_found")
    not_allowed = relay.request("GET", PATH)
    assert_error(not_allowed, 405, "method_not_allowed")
    assert "POST" in not_allowed.headers["allow"].split(", "), "a 405 names the methods allowed (RFC 9110)"


@pytest.mark.parametrize("role", [["user"], {"a": 1}, 5, None])
def test_a_role_of_the_wrong_type_is_400_naming_it(relay, role):
    body = {"model": "m", "messages": [{"role": role, "content": "x"}]}
    assert_error(relay.post(PATH, body), 400, "invalid_request", "messages[0].role")


def post_chunked(relay, pieces: list[bytes]) -> tuple[int, bytes]:
    """A request whose body comes chunked, without a Content-Length, as a streaming fetch sends it."""
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
    try:
        conn.request("POST", PATH, body=iter(pieces), headers={"Content-Type": "application/json"}, encode_chunked=True)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_a_chunked_body_is_read_whole(relay, upstream):
    model = upstream.script(stream_script(sse_answer(["ok"])))
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    assert post_chunked(relay, [body[:10], body[10:]]) == (200, b"ok")


def test_a_chunked_body_over_the_size_limit_is_413_even_when_a_cut_would_be_valid_json(guarded):
    """werkzeug cuts a body of unknown length at the limit; what is left must not be taken as the request."""
    small = json.dumps({"model": "gpt-ok", "messages": [{"role": "user", "content": "hi"}]}).encode()
    long_list = b'{"model": "gpt-ok", "messages": [' + b'{"role": "user", "content": "x"},' * 100
    for pieces in ([small, b" " * 4096], [long_list]):
        status, body = post_chunked(guarded, pieces)
        assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large", (status, body)


def test_a_chunked_body_with_broken_framing_is_400(relay):
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        sock.sendall(
            f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            "Connection: close\r\n\r\nzz\r\nabc\r\n0\r\n\r\n".encode()
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert b"application/json" in head and json.loads(body)["error"]["code"] == "invalid_request"


def raw_exchange(relay, request: bytes) -> tuple[bytes, bytes]:
    """Send raw bytes, read until the relay closes; the answer's head and body."""
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:  # the server closed with some of our bytes unread: its answer came first
            pass
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nCookie: " + b"a" * 9000 + b"\r\n\r\n", 431),  # a header past gunicorn's limit
        (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),  # past the line limit, within one read
        (b"NOT A REQUEST LINE\r\n\r\n", 400),
        (b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}", 400),
        (b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n", 400),
        (b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: foo\r\n\r\n", 501),  # still the caller's
    ],
    ids=["header-too-large", "uri-too-long", "bad-request-line", "length-and-chunked", "bad-length", "unknown-coding"],
)
def test_a_request_the_server_cannot_parse_gets_a_json_error_too(relay, request_bytes, status):
    head, body = raw_exchange(relay, request_bytes)
    assert head.startswith(b"HTTP/1.1 %d" % status), head
    assert b"Content-Type: application/json" in head
    error = json.loads(body)["error"]
    assert error["code"] == "invalid_request" and error["message"] and error["type"] == "invalid_request_error"
    request_id = re.search(rb"\r\nX-Request-ID: ([0-9a-f]{32})\r\n", head)
    assert request_id, f"a refused request has its id too: {head!r}"
    logged = [line for line in relay.wait_access_line(None, request_id=request_id[1].decode())]
    assert logged and logged[0]["status"] == status and logged[0]["outcome"] == "rejected", logged
    assert relay.request("GET", "/healthz").status == 200, "the relay goes on serving"


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_body_that_does_not_arrive_in_time_is_408_and_its_connection_closed(relay_factory, framing):
    """Without a deadline a caller sending a byte now and then held its connection, and a worker's
    slot, for as long as it liked (nginx buffers bodies; a relay reached directly does not)."""
    relay = relay_factory(RELAY_BODY_TIMEOUT="0.5")
    head = f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += "Content-Length: 1000\r\n\r\n" if framing == "length" else "Transfer-Encoding: chunked\r\n\r\n"
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        sock.sendall(head.encode() + (b'{"model": ' if framing == "length" else b'9\r\n{"model":\r\n'))
        started, answer = time.monotonic(), b""
        while chunk := sock.recv(65536):  # ends when the relay closes the connection
            answer += chunk
        waited = time.monotonic() - started
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["error"]["code"] == "request_timeout", answer
    assert b"\r\nConnection: close\r\n" in head and b"keep-alive" not in head, head
    assert json.loads(body)["error"]["type"] == "timeout_error"
    assert 0.4 < waited < 5, waited
    assert relay.request("GET", "/healthz").status == 200
