"""End to end: POST /api/stream_chat_completion through a real gunicorn and the socket-level upstream."""

from __future__ import annotations

import json
import socket
import threading
import time
import zlib

import pytest

from conftest import UPSTREAM_KEY
from fake_upstream import chunk, gzip_bytes, sse_answer, stream_script

TOKENS = ["Hel", "lo", ", ", "wor", "ld", "!"]


def parse_sse(body: bytes) -> list[tuple[str | None, str]]:
    """(event type, data) pairs of an SSE body, comments skipped."""
    events = []
    for block in body.decode().split("\n\n"):
        if not block.strip():
            continue
        kind, data = None, []
        for line in block.split("\n"):
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            if name == "event":
                kind = value
            elif name == "data":
                data.append(value)
        if data:
            events.append((kind, "\n".join(data)))
    return events


def assert_arrives_token_by_token(result, expected_pieces: int, spacing: float):
    """Tokens ``spacing`` seconds apart upstream must reach the client spread out the same way.

    A buffering relay delivers everything in one late piece. One coalesced pair is tolerated: a
    loaded 2-core machine can deschedule the relay for longer than a gap.
    """
    times = [t for t, piece in result.pieces if piece]
    assert len(times) >= expected_pieces - 1, f"expected {expected_pieces} separate pieces, got {result.pieces!r}"
    spread = times[-1] - times[0]
    assert spread >= 0.6 * (expected_pieces - 1) * spacing, f"tokens were buffered: arrival times {times}"
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    assert sum(gap > spacing * 0.5 for gap in gaps) >= len(gaps) - 1, f"tokens were buffered: gaps {gaps}"


def assert_whole_answer(result, sse: bool) -> None:
    """TOKENS, complete: as token events between `meta` and `done`, or as the plain text."""
    assert result.status == 200 and result.complete, result.body
    if sse:
        events = parse_sse(result.body)
        assert [json.loads(data)["content"] for _, data in events[1:-1]] == TOKENS and events[-1][0] == "done"
    else:
        assert result.text == "".join(TOKENS)


def test_plain_text_body_is_the_concatenated_tokens_with_the_express_headers(relay, upstream):
    model = upstream.script(stream_script(sse_answer(TOKENS, usage={"completion_tokens": 6})))
    result = relay.stream(model)
    assert result.status == 200, result.body
    assert result.text == "Hello, world!"
    assert result.complete
    assert result.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert result.headers["cache-control"] == "no-cache, no-transform"
    assert result.headers["x-accel-buffering"] == "no"
    assert result.headers["x-content-type-options"] == "nosniff"
    assert result.headers["transfer-encoding"] == "chunked"
    assert "accept" in result.headers["vary"].lower(), "the format follows Accept"


def test_event_stream_format_sends_meta_tokens_and_done_with_usage(relay, upstream):
    usage = {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    model = upstream.script(stream_script(sse_answer(TOKENS, usage=usage)))
    result = relay.stream(model, sse=True)
    assert result.status == 200
    assert result.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = parse_sse(result.body)
    assert events[0][0] == "meta"
    assert json.loads(events[0][1]) == {"id": "chatcmpl-fake", "model": "fake-model", "created": 1700000000}
    assert [json.loads(data)["content"] for kind, data in events[1:-1]] == TOKENS
    assert all(kind is None for kind, _ in events[1:-1])
    assert events[-1][0] == "done"
    assert json.loads(events[-1][1]) == {"finish_reason": "stop", "usage": usage}


def test_each_token_reaches_the_client_as_it_arrives(relay, upstream):
    model = upstream.script(stream_script(sse_answer(TOKENS), delay=0.15))
    result = relay.stream(model)
    assert result.text == "Hello, world!"
    assert_arrives_token_by_token(result, len(TOKENS), 0.15)


def test_each_event_reaches_the_client_as_it_arrives_in_sse_format(relay, upstream):
    model = upstream.script(stream_script(sse_answer(TOKENS), delay=0.15))
    result = relay.stream(model, sse=True)
    assert_arrives_token_by_token(result, len(TOKENS), 0.15)


def test_non_chunked_upstream_body_is_still_relayed_token_by_token(relay, upstream):
    model = upstream.script(stream_script(sse_answer(TOKENS), delay=0.15, chunked=False))
    result = relay.stream(model)
    assert result.text == "Hello, world!"
    assert_arrives_token_by_token(result, len(TOKENS), 0.15)


def test_gzip_upstream_body_is_decoded_and_relayed_token_by_token(relay, upstream):
    model = upstream.script(stream_script(sse_answer(TOKENS), delay=0.15, gzip_body=True))
    result = relay.stream(model)
    assert result.text == "Hello, world!"
    assert_arrives_token_by_token(result, len(TOKENS), 0.15)


@pytest.mark.parametrize("wbits", [zlib.MAX_WBITS, -zlib.MAX_WBITS], ids=["zlib-wrapped", "raw"])
def test_a_deflate_body_with_or_without_its_zlib_wrapper_is_relayed_token_by_token(relay, upstream, wbits):
    """HTTP's deflate is the zlib format, but some servers send the bare RFC 1951 stream; urllib3
    reads both, and the relay asks for deflate."""
    def script(conn):
        conn.start(headers=[("Content-Encoding", "deflate")])
        deflate = zlib.compressobj(9, zlib.DEFLATED, wbits)
        for index, event in enumerate(sse_answer(TOKENS)):
            conn.send(deflate.compress(event) + deflate.flush(zlib.Z_SYNC_FLUSH))
            if index < len(TOKENS) and conn.sleep_unless_hangup(0.15):
                return
        conn.send(deflate.flush())
        conn.end()

    result = relay.stream(upstream.script(script))
    assert result.text == "Hello, world!" and result.complete
    assert_arrives_token_by_token(result, len(TOKENS), 0.15)


@pytest.mark.parametrize("gzip_body", [False, True], ids=["identity", "gzip"])
@pytest.mark.parametrize("sse", [False, True], ids=["text", "sse"])
def test_an_upstream_that_closes_after_each_answer_is_relayed_alike(relay, upstream, sse, gzip_body):
    """The fake upstream keeps connections open, as real ones do, so the relay reads their sockets
    itself; one that closes leaves its socket to http.client, whose buffered reader the relay reads
    instead (as over TLS). Same tokens, same pacing, same end."""
    script = stream_script(sse_answer(TOKENS), delay=0.15, keep_alive=False, gzip_body=gzip_body)
    result = relay.stream(upstream.script(script), sse=sse)
    assert_whole_answer(result, sse)
    assert_arrives_token_by_token(result, len(TOKENS), 0.15)


def test_multibyte_characters_split_across_network_reads_arrive_intact(relay, upstream):
    text = ["日本語", "の", "テキスト", " 🎉"]
    body = b"".join(sse_answer(text))
    pieces = [body[i : i + 7] for i in range(0, len(body), 7)]  # cuts inside characters and lines

    def script(conn):
        conn.start()
        for piece in pieces:
            conn.send(piece)
            time.sleep(0.002)
        conn.end()

    result = relay.stream(upstream.script(script))
    assert result.text == "日本語のテキスト 🎉"


def test_cr_and_crlf_line_ends_and_a_crlf_split_across_reads(relay, upstream):
    events = [chunk(role="assistant", content=""), chunk("a"), chunk("b"), chunk(finish_reason="stop")]

    def script(conn):
        conn.start()
        conn.send(f"data: {events[0]}\r\n\r\n".encode())
        conn.send(f"data:{events[1]}\r".encode())  # CRLF split across two reads
        time.sleep(0.05)
        conn.send(b"\n\r\n")
        conn.send(f"data: {events[2]}\r\r".encode())  # bare CR line ends
        conn.send(f"data: {events[3]}\n\ndata: [DONE]\n\n".encode())
        conn.end()

    assert relay.stream(upstream.script(script)).text == "ab"


def test_bom_comments_and_blocks_without_data_are_handled(relay, upstream):
    answer = sse_answer(["x", "y"])

    def script(conn):
        conn.start()
        conn.send(b"\xef\xbb\xbf: keep-alive comment\n\n" + answer[0])
        conn.send(b"event: ping\n\n")  # no data: no event
        conn.send(b"".join(answer[1:]))
        conn.end()

    result = relay.stream(upstream.script(script), sse=True)
    assert [kind for kind, _ in parse_sse(result.body)] == ["meta", None, None, "done"]


def test_line_and_paragraph_separators_inside_json_are_not_line_ends(relay, upstream):
    model = upstream.script(stream_script(sse_answer(["a\u2028b", "c\u2029d", "e\u0085f"])))
    assert relay.stream(model).text == "a\u2028bc\u2029de\u0085f"


def test_upstream_charset_is_ignored_and_utf8_is_used(relay, upstream):
    model = upstream.script(stream_script(sse_answer(["café"]), content_type="text/event-stream; charset=iso-8859-1"))
    assert relay.stream(model).text == "café"


@pytest.mark.parametrize("endpoint", ["text", "sse", "passthrough"])
def test_bytes_that_are_not_utf8_and_lone_surrogates_become_replacement_characters(relay, upstream, endpoint):
    """As the WHATWG decoder reads a stream: U+FFFD, not a failed answer. A latin-1 byte, a sequence cut
    short, and an emoji whose surrogate pair a server split between two chunks (JSON accepts each half)."""
    contents = [b"caf\xe9", b"\xf0\x9f", b"\\ud83d", b"ok"]
    events = [b"data: " + chunk("~").encode().replace(b"~", content) + b"\n\n" for content in contents]
    answer = sse_answer([])
    model = upstream.script(stream_script(answer[:1] + events + answer[1:]))
    if endpoint == "passthrough":
        result = relay.post("/v1/chat/completions", {"model": model, "messages": [], "stream": True})
        assert result.status == 200 and result.complete
        assert [line for line in result.body.split(b"\n") if line.startswith(b"data:")] == [
            line for line in b"".join(answer[:1] + events + answer[1:]).split(b"\n") if line.startswith(b"data:")
        ], "each data line is passed on as it came, the bytes that are not UTF-8 too"
        return
    result = relay.stream(model, sse=endpoint == "sse")
    assert result.status == 200 and result.complete, result.body
    expected = ["caf\ufffd", "\ufffd", "\ufffd", "ok"]
    if endpoint == "sse":
        events = parse_sse(result.body)
        assert [json.loads(data)["content"] for _, data in events[1:-1]] == expected and events[-1][0] == "done"
    else:
        assert result.text == "".join(expected)


def test_usage_chunk_and_null_content_produce_no_tokens(relay, upstream):
    events = [
        f"data: {chunk(role='assistant', content=None)}\n\n".encode(),
        f"data: {chunk('only')}\n\n".encode(),
        f"data: {chunk(finish_reason='stop')}\n\n".encode(),
        f"data: {chunk(usage={'completion_tokens': 1}, choices=False)}\n\n".encode(),
        b"data: [DONE]\n\n",
    ]
    result = relay.stream(upstream.script(stream_script(events)), sse=True)
    parsed = parse_sse(result.body)
    assert [json.loads(data) for kind, data in parsed if kind is None] == [{"content": "only"}]
    assert json.loads(parsed[-1][1])["usage"] == {"completion_tokens": 1}


def test_upstream_request_carries_the_key_stream_true_and_not_the_callers_credentials(relay, upstream):
    model = upstream.script(stream_script(sse_answer(["ok"])))
    relay.stream(model, headers={"Authorization": "Bearer caller-token", "Cookie": "session=1"})
    request = upstream.seen(model)[0].request
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "cookie" not in request.headers
    sent = request.json()
    assert sent["stream"] is True
    assert sent["messages"] == [{"role": "user", "content": "hi"}]


def test_mid_stream_error_event_ends_sse_with_event_error(relay, upstream):
    events = sse_answer(["a", "b"], done=False)[:3] + [b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n']
    result = relay.stream(upstream.script(stream_script(events)), sse=True)
    parsed = parse_sse(result.body)
    assert parsed and parsed[-1][0] == "error", (result.status, result.body)
    assert "overloaded" in json.loads(parsed[-1][1])["error"]["message"]
    assert not any(kind == "done" for kind, _ in parsed)


@pytest.mark.parametrize(
    "error, message",
    [
        ({"message": {"detail": "nested"}}, 'Upstream error: {"detail":"nested"}'),  # passed on as JSON, as before the first byte
        ("a bare string", "Upstream error: a bare string"),
        ({"message": None, "code": "overloaded"}, "Upstream error: The upstream reported an error mid-stream. (upstream code overloaded)"),
        ({"message": "busy", "code": 503}, "Upstream error: busy (upstream code 503)"),
    ],
)
def test_a_mid_stream_error_of_any_shape_is_passed_on_as_text(relay, upstream, error, message):
    events = sse_answer(["a"], done=False)[:2] + [f"data: {json.dumps({'error': error})}\n\n".encode()]
    parsed = parse_sse(relay.stream(upstream.script(stream_script(events)), sse=True).body)
    assert parsed[-1][0] == "error"
    assert json.loads(parsed[-1][1])["error"]["message"] == message
    assert json.loads(parsed[-1][1])["error"]["code"] == "upstream_error"


def test_truncated_upstream_aborts_the_plain_text_answer(relay, upstream):
    events = sse_answer(["a", "b", "c"], done=False)[:3]  # no finish_reason, no [DONE]
    result = relay.stream(upstream.script(stream_script(events)))
    assert result.status == 200
    assert result.text == "ab"
    assert not result.complete, "a truncated answer must not end with the final chunk"


def test_truncated_upstream_ends_sse_with_event_error(relay, upstream):
    events = sse_answer(["a", "b", "c"], done=False)[:3]
    parsed = parse_sse(relay.stream(upstream.script(stream_script(events)), sse=True).body)
    assert parsed[-1][0] == "error"
    assert json.loads(parsed[-1][1])["error"]["code"] == "upstream_error"


def test_one_json_log_line_per_request_with_the_contract_fields(relay, upstream):
    model = upstream.script(stream_script(sse_answer(TOKENS, usage={"completion_tokens": 6})))
    result = relay.stream(model, headers={"X-Request-ID": "req-abc.123"})
    assert result.headers["x-request-id"] == "req-abc.123"
    [line] = relay.wait_access_line("/api/stream_chat_completion", request_id="req-abc.123")
    assert set(line) >= {
        "ts", "request_id", "method", "path", "status", "model", "caller",
        "ttft_s", "duration_s", "completion_tokens", "outcome",
    }  # fmt: skip
    assert line["status"] == 200 and line["outcome"] == "ok" and line["model"] == model
    assert line["completion_tokens"] == 6
    assert "hi" not in json.dumps(line["model"])


@pytest.mark.parametrize("endpoint", ["text", "sse", "passthrough"])
def test_ttft_is_the_time_to_the_first_token_not_to_the_first_event(relay, upstream, endpoint):
    """A reasoning model sends its role chunk at once and its first token after thinking: the wait
    the metric is for is the second."""
    role, *rest = sse_answer(["late"])

    def script(conn):
        conn.start()
        conn.send(role)
        if conn.sleep_unless_hangup(0.6):
            return
        for event in rest:
            conn.send(event)
        conn.end()

    model = upstream.script(script)
    request_id = f"ttft-{endpoint}"
    if endpoint == "passthrough":
        body = {"model": model, "messages": [], "stream": True}
        result = relay.post("/v1/chat/completions", body, {"X-Request-ID": request_id})
        path = "/v1/chat/completions"
    else:
        result = relay.stream(model, sse=endpoint == "sse", headers={"X-Request-ID": request_id})
        path = "/api/stream_chat_completion"
    [line] = relay.wait_access_line(path, request_id=request_id)
    assert result.status == 200 and result.complete, line
    assert 0.55 <= line["ttft_s"] <= line["duration_s"], line


def test_the_page_and_static_files_get_their_log_line_too(relay):
    """Flask hands a file to the server as it is; the line written when the response closes must still come."""
    for path in ("/", "/static/relay-client.js"):
        result = relay.request("GET", path)
        assert result.status == 200 and len(result.body) > 500
        [line] = relay.wait_access_line(path, request_id=result.headers["x-request-id"])
        assert line["status"] == 200 and line["outcome"] == "ok"


def test_an_insane_request_id_is_replaced(relay):
    result = relay.request("GET", "/healthz", headers={"X-Request-ID": "bad id\twith spaces" + "x" * 200})
    assert result.headers["x-request-id"] and " " not in result.headers["x-request-id"]


def test_healthz_names_the_upstream_without_calling_it(relay, upstream):
    result = relay.request("GET", "/healthz")
    assert result.status == 200
    assert result.json() == {"status": "ok", "upstream": f"127.0.0.1:{upstream.port}"}


def test_tokens_arriving_in_the_same_read_as_an_error_are_kept(relay, upstream):
    events = sse_answer(["a", "b"], done=False)[:3] + [b'data: {"error": {"message": "overloaded"}}\n\n']

    def script(conn):
        conn.start()
        conn.send(b"".join(events))  # one chunk: the relay reads it all at once

    parsed = parse_sse(relay.stream(upstream.script(script), sse=True).body)
    assert [kind for kind, _ in parsed] == ["meta", None, None, "error"], parsed
    assert [json.loads(data)["content"] for kind, data in parsed if kind is None] == ["a", "b"]


def test_upstream_connections_are_reused_after_a_complete_answer(relay, upstream):
    model = upstream.script(stream_script(sse_answer(["same", " socket"]), keep_alive=True))
    for _ in range(3):
        assert relay.stream(model).text == "same socket"
    connections = {exchange.connection for exchange in upstream.seen(model)}
    assert len(connections) == 1, f"each answer opened a new upstream connection: {connections}"


@pytest.mark.parametrize("farewell", [b"", b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n"])
def test_a_pooled_connection_the_upstream_closed_while_idle_is_not_reused(relay_factory, upstream, farewell):
    relay = relay_factory(RELAY_RETRIES="0")  # only the pool's own check can save the next answer
    closed = threading.Event()

    def script(conn):
        conn.start(keep_alive=True)
        for event in sse_answer(["first"]):
            conn.send(event)
        conn.end()
        time.sleep(0.1)
        conn.send_raw(farewell)  # as servers do at their idle timeout: some send a 408 first
        conn.keep_alive = False  # then close it
        closed.set()

    model = upstream.script(script)
    assert relay.stream(model).text == "first"
    assert closed.wait(5)
    time.sleep(0.2)  # the close reaches the relay's pooled socket
    upstream.script(stream_script(sse_answer(["second"])), name=model + "-2")
    result = relay.stream(model + "-2")
    assert result.text == "second" and result.complete
    assert upstream.seen(model)[0].connection != upstream.seen(model + "-2")[0].connection


@pytest.mark.parametrize("framing", ["chunked", "length"])
def test_a_body_sent_in_the_same_write_as_the_head_is_relayed_whole_and_the_connection_reused(relay, upstream, framing):
    events = b"".join(sse_answer(TOKENS))
    if framing == "chunked":
        head, body = b"Transfer-Encoding: chunked\r\n", b"%x\r\n%s\r\n0\r\n\r\n" % (len(events), events)
    else:
        head, body = b"Content-Length: %d\r\n" % len(events), events

    def script(conn):
        conn.send_raw(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + head + b"\r\n" + body)
        conn.keep_alive = True

    model = upstream.script(script)
    for _ in range(2):
        result = relay.stream(model)
        assert result.text == "Hello, world!" and result.complete
    first, second = upstream.seen(model)
    assert first.connection == second.connection


def test_a_keep_alive_answer_cut_short_is_not_reused(relay, upstream):
    answers = iter([sse_answer(["cut"], done=False)[:2], sse_answer(["whole"])])

    def script(conn):
        conn.start(keep_alive=True)
        for event in next(answers):
            conn.send(event)
        conn.keep_alive = False  # then hang up mid-body, without the last chunk

    model = upstream.script(script)
    assert not relay.stream(model).complete
    assert relay.stream(model).text == "whole"
    first, second = upstream.seen(model)
    assert first.connection != second.connection


def test_a_content_length_upstream_body_is_relayed_token_by_token(relay, upstream):
    events = sse_answer(TOKENS)
    length = sum(map(len, events))

    def script(conn):
        conn.send_raw(f"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: {length}\r\n\r\n".encode())
        for event in events:
            conn.send_raw(event)
            time.sleep(0.15)

    result = relay.stream(upstream.script(script))
    assert result.text == "Hello, world!" and result.complete
    assert_arrives_token_by_token(result, len(TOKENS), 0.15)


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    """The payload of a chunked body, and whether its last chunk came."""
    out, pos = [], 0
    while True:
        line_end = data.index(b"\r\n", pos)
        size = int(data[pos:line_end], 16)
        if size == 0:
            return b"".join(out), True
        out.append(data[line_end + 2 : line_end + 2 + size])
        pos = line_end + 2 + size + 2
        if pos >= len(data):
            return b"".join(out), False


def test_a_caller_reading_slower_than_the_upstream_writes_gets_every_byte_in_order(relay, upstream):
    """A reader that stalls fills its socket: the relay's writes then wait for it and lose nothing."""
    # 10 MB: more than the relay's send buffer (loopback autotuning grows it to 4 MB) and the caller's hold
    tokens = [f"<{index:05d}:{'x' * 4000}>" for index in range(2_500)]
    model = upstream.script(stream_script(sse_answer(tokens)))
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(20)
    sock.connect(("127.0.0.1", relay.port))
    try:
        sock.sendall(b"POST /api/stream_chat_completion HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        time.sleep(1.5)  # read nothing while the upstream sends
        received = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            received.append(data)
    finally:
        sock.close()
    head, _, chunked = b"".join(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    text, complete = _dechunk(chunked)
    assert complete and text.decode() == "".join(tokens)


# --- what comes after [DONE], and chunks of odd shapes -----------------------------------------

FORMATS = ["text", "sse", "sse-resumable", "passthrough"]


def relay_for(fmt: str, relay, relay_factory):
    return relay_factory(RELAY_RESUME_SECONDS="30") if fmt == "sse-resumable" else relay


def ask(relay, fmt: str, model: str):
    if fmt == "passthrough":
        body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        return relay.post("/v1/chat/completions", body)
    headers = {"X-Relay-Resumable": "1"} if fmt == "sse-resumable" else None
    return relay.stream(model, sse=fmt != "text", headers=headers)


def assert_whole(result, fmt: str, text: str) -> None:
    """The answer ``text``, ended as a finished answer ends in ``fmt``."""
    assert result.status == 200 and result.complete, result.body
    if fmt == "text":
        assert result.text == text
    elif fmt == "passthrough":
        events = [data for _, data in parse_sse(result.body)]
        assert events[-1] == "[DONE]" and not any("error" in data for data in events), result.body
        assert "".join(json.loads(data)["choices"][0]["delta"].get("content") or "" for data in events[:-1]
                       if json.loads(data)["choices"]) == text  # fmt: skip
    else:
        events = parse_sse(result.body)
        assert [kind for kind, _ in events][:1] == ["meta"] and events[-1][0] == "done", result.body
        assert "".join(json.loads(data)["content"] for kind, data in events if kind is None) == text


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "after_done",
    [b"", b"zzz\r\n", b"%x\r\n%s\r\n" % (15, b"data: garbage\n\n"), b"%x\r\n%s\r\n" % (21, b'data: {"error": {}}\n\n')],
    ids=["cut-before-the-last-chunk", "bad-framing", "garbage-event", "error-event"],
)
@pytest.mark.parametrize("same_read", [False, True], ids=["later-read", "same-read"])
def test_an_answer_is_whole_at_done_whatever_its_body_does_next(relay, relay_factory, upstream, fmt, after_done, same_read):
    def script(conn):
        conn.start()
        answer = b"".join(b"%x\r\n%s\r\n" % (len(event), event) for event in sse_answer(["a", "b", "c"]))
        if same_read:
            conn.send_raw(answer + after_done)
        else:
            conn.send_raw(answer)
            time.sleep(0.2)  # the relay has read [DONE]
            conn.send_raw(after_done)
        conn.sock.close()

    assert_whole(ask(relay_for(fmt, relay, relay_factory), fmt, upstream.script(script)), fmt, "abc")


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_gzip_body_damaged_after_done_in_the_same_read_is_still_whole(relay, relay_factory, upstream, fmt):
    """zlib drops a whole call's output on an error: the [DONE] decoded before the damage must not go with it."""
    body = bytearray(gzip_bytes(b"".join(sse_answer(["a", "b"]))))
    body[-8:-4] = bytes(byte ^ 0xFF for byte in body[-8:-4])  # the trailer's CRC, after every payload byte

    def script(conn):
        conn.start(headers=[("Content-Encoding", "gzip")])
        conn.send_raw(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), bytes(body)))

    assert_whole(ask(relay_for(fmt, relay, relay_factory), fmt, upstream.script(script)), fmt, "ab")


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_upstream_that_keeps_sending_after_done_does_not_hold_the_answer_open(relay, relay_factory, upstream, fmt):
    """The body's end is awaited for half a second after [DONE], not after the upstream's last byte."""

    def script(conn):
        conn.start()
        for event in sse_answer(["a", "b"]):
            conn.send(event)
        for _ in range(50):  # 5 s of comments, never the body's end
            if conn.sleep_unless_hangup(0.1):
                return
            conn.send(b": keep\n\n")

    started = time.monotonic()
    result = ask(relay_for(fmt, relay, relay_factory), fmt, upstream.script(script))
    assert time.monotonic() - started < 3, "the answer was held open by bytes after [DONE]"
    assert_whole(result, fmt, "ab")


@pytest.mark.parametrize("fmt", FORMATS)
def test_events_after_done_in_the_same_read_are_not_relayed(relay, relay_factory, upstream, fmt):
    events = b"".join(sse_answer(["a", "b"])) + b"".join(sse_answer(["EXTRA"]))
    model = upstream.script(stream_script([events]))
    assert_whole(ask(relay_for(fmt, relay, relay_factory), fmt, model), fmt, "ab")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("usage", ["lots", [1, 2], 7, {"completion_tokens": -3}, {"completion_tokens": True}])
def test_a_usage_that_is_not_an_object_does_not_break_a_finished_answer(relay, relay_factory, upstream, fmt, usage):
    events = sse_answer(["a", "b"], done=False) + [f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode(),
                                                  b"data: [DONE]\n\n"]  # fmt: skip
    target = relay_for(fmt, relay, relay_factory)
    result = ask(target, fmt, upstream.script(stream_script(events)))
    assert_whole(result, fmt, "ab")
    if fmt.startswith("sse"):
        expected = usage if isinstance(usage, dict) else None  # passed on as sent; only counted when sane
        assert json.loads(parse_sse(result.body)[-1][1])["usage"] == expected
    path = "/v1/chat/completions" if fmt == "passthrough" else "/api/stream_chat_completion"
    [line] = target.wait_access_line(path, request_id=result.headers["x-request-id"])
    assert line["outcome"] == "ok" and line["completion_tokens"] == 2


def test_an_empty_event_type_is_the_default_message_type(relay, upstream):
    events = [b"event:\n" + event if event.startswith(b"data: {") else event for event in sse_answer(["a", "b"])]
    assert relay.stream(upstream.script(stream_script(events))).text == "ab"


@pytest.mark.parametrize("sse", [False, True], ids=["text", "sse"])
def test_named_events_mid_answer_are_skipped_whatever_their_data(relay, upstream, sse):
    answer = sse_answer(TOKENS)
    named = [b"event: ping\ndata: ping\n\n", b'event: progress\ndata: {"choices": [{"delta": {"content": "X"}}]}\n\n']
    result = relay.stream(upstream.script(stream_script(answer[:3] + named + answer[3:])), sse=sse)
    assert_whole_answer(result, sse)


@pytest.mark.parametrize("data", [b"overloaded", b'{"message": "overloaded", "code": "server_busy"}'])
def test_a_named_error_event_fails_the_answer_whatever_its_data(relay, upstream, data):
    answer = sse_answer(TOKENS)
    events = answer[:3] + [b"event: error\ndata: " + data + b"\n\n"] + answer[3:]
    result = relay.stream(upstream.script(stream_script(events)), sse=True)
    received = parse_sse(result.body)
    assert [json.loads(data)["content"] for _, data in received[1:-1]] == TOKENS[:2]
    kind, payload = received[-1]
    assert kind == "error" and "overloaded" in json.loads(payload)["error"]["message"], result.body


@pytest.mark.parametrize("sse", [False, True], ids=["text", "sse"])
def test_chunks_that_carry_a_null_error_are_ordinary_chunks(relay, upstream, sse):
    """Some servers write every field of a chunk, an "error": null included."""
    events = [event.replace(b'"object":', b'"error": null, "object":') for event in sse_answer(TOKENS)]
    assert events[1].count(b'"error": null') == 1
    assert_whole_answer(relay.stream(upstream.script(stream_script(events)), sse=sse), sse)


@pytest.mark.parametrize("sse", [False, True], ids=["text", "sse"])
def test_an_over_long_line_after_done_in_the_same_gzip_read_changes_nothing(relay, upstream, sse):
    """1 MB of one byte compresses to a few: one read can hold the answer's end and an over-long line."""

    def script(conn):
        conn.start(gzip_body=True)
        conn.send(b"".join(sse_answer(TOKENS)) + b"x" * ((1 << 20) + 1))
        conn.end()

    assert_whole_answer(relay.stream(upstream.script(script), sse=sse), sse)


def test_an_over_long_line_fails_the_answer_at_once_though_the_upstream_then_goes_quiet(relay, upstream):
    def script(conn):
        conn.start()
        conn.send(sse_answer(TOKENS)[0] + b"data: " + b"x" * (1 << 20) + b"\n")
        conn.sleep_unless_hangup(10)

    started = time.monotonic()
    result = relay.stream(upstream.script(script), sse=True)
    kind, data = parse_sse(result.body)[-1]
    assert kind == "error" and "longer than" in json.loads(data)["error"]["message"], result.body[-300:]
    assert time.monotonic() - started < 5, "it waited for a read that never came"


def test_an_accept_with_a_parameter_still_asks_for_the_event_format(relay, upstream):
    result = relay.stream(upstream.script(stream_script(sse_answer(TOKENS))), headers={"Accept": "text/event-stream; charset=utf-8"})
    assert_whole_answer(result, sse=True)


@pytest.mark.parametrize("content", [5, ["a"], {"text": "a"}, True, [{"type": "text", "text": "a"}, "b"]])
def test_a_content_that_is_neither_a_string_nor_content_parts_is_a_malformed_reply(relay, upstream, content):
    events = sse_answer(TOKENS)
    events.insert(2, b"data: " + json.dumps({"id": "x", "choices": [{"index": 0, "delta": {"content": content}}]}).encode() + b"\n\n")
    result = relay.stream(upstream.script(stream_script(events)), sse=True)
    kind, data = parse_sse(result.body)[-1]
    assert kind == "error" and "neither a string nor" in json.loads(data)["error"]["message"], result.body


@pytest.mark.parametrize("sse", [False, True])
def test_content_parts_are_relayed_as_their_text_and_thinking_parts_are_not(relay, upstream, sse):
    """Mistral's reasoning models (magistral) send the thinking as a list of parts, then the answer."""
    def chunk(content):
        return b"data: " + json.dumps({"id": "m", "model": "magistral", "choices": [{"index": 0, "delta": {"content": content}}]}).encode() + b"\n\n"

    events = sse_answer(["Hello", "!"])
    events[1:1] = [
        chunk([{"type": "thinking", "thinking": [{"type": "text", "text": "The user greets me."}]}]),
        chunk([{"type": "text", "text": "Hi"}, {"type": "reference", "reference_ids": [1]}, {"type": "text", "text": " there. "}]),
        chunk([]),
    ]
    result = relay.stream(upstream.script(stream_script(events)), sse=sse)
    if not sse:
        assert result.status == 200 and result.body == b"Hi there. Hello!" and result.complete, result.body
        return
    tokens = [json.loads(data)["content"] for kind, data in parse_sse(result.body) if kind is None]
    assert tokens == ["Hi there. ", "Hello", "!"] and parse_sse(result.body)[-1][0] == "done", result.body


def test_azures_opening_chunk_of_prompt_filter_results_is_not_the_answers_meta(relay, upstream):
    """Azure OpenAI opens with a chunk whose choices, id and model are empty: the meta comes from the
    first chunk that names the model."""
    azure = {"choices": [], "created": 0, "id": "", "model": "", "object": "",
             "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]}  # fmt: skip
    events = [b"data: " + json.dumps(azure).encode() + b"\n\n", *sse_answer(TOKENS)]
    model = upstream.script(stream_script(events))
    result = relay.stream(model, sse=True)
    kind, data = parse_sse(result.body)[0]
    assert kind == "meta" and json.loads(data)["id"] == "chatcmpl-fake" and json.loads(data)["model"] == "fake-model"
    assert_whole_answer(result, sse=True)


@pytest.mark.parametrize("opening", ["azure", "none"])
def test_events_open_with_a_meta_even_when_no_chunk_names_the_model(relay, upstream, opening):
    """An answer that is only Azure's opening chunk, or only [DONE]: meta from the first chunk, else null."""
    azure = {"choices": [], "created": 0, "id": "", "model": "", "prompt_filter_results": []}
    events = ([b"data: " + json.dumps(azure).encode() + b"\n\n"] if opening == "azure" else []) + [b"data: [DONE]\n\n"]
    result = relay.stream(upstream.script(stream_script(events)), sse=True)
    parsed = parse_sse(result.body)
    assert [kind for kind, _ in parsed] == ["meta", "done"], result.body
    assert json.loads(parsed[0][1]) == ({"id": "", "model": "", "created": 0} if opening == "azure" else {"id": None, "model": None, "created": None})


def test_a_named_event_with_data_before_the_first_chunk_is_not_its_meta(relay, upstream):
    events = [b'event: ping\ndata: {"type": "ping"}\n\n', *sse_answer(["a"])]
    result = relay.stream(upstream.script(stream_script(events)), sse=True)
    kind, data = parse_sse(result.body)[0]
    assert kind == "meta" and json.loads(data)["id"] == "chatcmpl-fake" and json.loads(data)["model"] == "fake-model"
