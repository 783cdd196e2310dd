"""An https upstream, as api.openai.com is: the relay verifies it against REQUESTS_CA_BUNDLE or
SSL_CERT_FILE, reads its TLS socket itself, reuses its connections, and closes it when the caller
goes, exactly as over plain TCP. The fake upstream serves TLS with a certificate made per run."""

from __future__ import annotations

import json
import time

import pytest

from conftest import UPSTREAM_KEY
from fake_upstream import sse_answer, stream_script
from test_failures import assert_upstream_closed_within_2s, open_and_abandon, silent_after_first_event
from test_token_stream import TOKENS, assert_arrives_token_by_token, assert_whole_answer, parse_sse


def relay_for(relay_factory, tls_upstream, **settings):
    """A relay whose upstream is the https fake, trusting its certificate."""
    server, certificate = tls_upstream
    return relay_factory(OPENAI_BASE_URL=server.base_url, REQUESTS_CA_BUNDLE=certificate, **settings)


@pytest.fixture(scope="module")
def https_relay(relay_factory, tls_upstream):
    return relay_for(relay_factory, tls_upstream)


@pytest.mark.parametrize("gzip_body", [False, True], ids=["identity", "gzip"])
@pytest.mark.parametrize("sse", [False, True], ids=["text", "sse"])
def test_tokens_from_an_https_upstream_arrive_one_by_one(https_relay, tls_upstream, sse, gzip_body):
    server, _ = tls_upstream
    model = server.script(stream_script(sse_answer(TOKENS), delay=0.15, gzip_body=gzip_body))
    result = https_relay.stream(model, sse=sse)
    assert_whole_answer(result, sse)
    assert_arrives_token_by_token(result, len(TOKENS), 0.15)
    [exchange] = server.seen(model)
    assert exchange.request.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"])
def test_https_upstream_connections_are_verified_and_reused(relay_factory, tls_upstream, variable):
    server, certificate = tls_upstream
    relay = relay_factory(OPENAI_BASE_URL=server.base_url, **{variable: certificate})
    model = server.script(stream_script(sse_answer(["same", " socket"])))
    for _ in range(3):
        result = relay.stream(model)
        assert (result.status, result.text, result.complete) == (200, "same socket", True)
    connections = {exchange.connection for exchange in server.seen(model)}
    assert len(connections) == 1, f"each answer opened a new TLS connection: {connections}"


def test_a_long_answer_in_large_tls_records_arrives_whole_and_in_order(https_relay, tls_upstream):
    """Writes far larger than a TLS record (16 KiB) and a read (16 KiB), so records arrive split
    across TCP segments and reads: every byte, in order."""
    tokens = [f"<{index:05d}>" for index in range(6000)]
    events = sse_answer(tokens)
    server, _ = tls_upstream

    def script(conn):
        conn.start()
        for start in range(0, len(events), 1500):  # ~100 KiB per write
            conn.send(b"".join(events[start : start + 1500]))
        conn.end()

    result = https_relay.stream(server.script(script))
    assert result.complete and result.text == "".join(tokens)


def test_a_record_decrypted_with_the_head_is_relayed_without_waiting_for_more(https_relay, tls_upstream):
    """The head and ~14 KiB of body in one write, so one TLS record, then silence. http.client reads
    the head through an 8 KiB buffer; the rest of the record stays decrypted in the TLS layer while
    the socket has nothing more to read. It must be relayed now, not when the upstream next writes."""
    tokens = [f"<{index:04d}>" for index in range(70)]
    events = b"".join(sse_answer(tokens))
    server, _ = tls_upstream
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    first_write = head + b"%x\r\n%s\r\n" % (len(events), events)
    assert 8192 < len(first_write) <= 16384, "one TLS record, more than http.client's buffer takes"

    def script(conn):
        conn.send_raw(first_write)
        conn.sleep_unless_hangup(3)
        conn.send_raw(b"0\r\n\r\n")
        conn.keep_alive = True

    result = https_relay.stream(server.script(script))
    assert result.complete and result.text == "".join(tokens)
    arrived = next(at for at, piece in result.pieces if piece)
    body_at = sum(len(piece) for at, piece in result.pieces if at < 2.0)
    waited = f"the answer waited for the upstream's next write: first bytes after {arrived:.2f}s"
    assert arrived < 2.0 and body_at == len(result.body), waited


def test_heartbeats_interrupt_a_waiting_tls_read_and_the_answer_goes_on(relay_factory, tls_upstream):
    relay = relay_for(relay_factory, tls_upstream, RELAY_HEARTBEAT_SECONDS="0.3")
    server, _ = tls_upstream
    result = relay.stream(server.script(stream_script(sse_answer(["a", "b", "c"]), delay=0.8)), sse=True)
    events = parse_sse(result.body)
    assert [kind for kind, _ in events] == ["meta", None, None, None, "done"], events
    assert "".join(json.loads(data)["content"] for kind, data in events if kind is None) == "abc"
    assert result.body.count(b": ping\n\n") >= 2 and result.complete  # one or two in each 0.8 s gap


@pytest.mark.parametrize("sse", [False, True], ids=["text", "sse"])
def test_an_https_upstream_closing_mid_answer_is_a_failed_answer(https_relay, tls_upstream, sse):
    """Closed without TLS's close_notify and without the last chunk: not a finished answer."""
    server, _ = tls_upstream

    def cut_short(conn):
        conn.start(keep_alive=False)  # so the fake closes the connection when the script returns
        conn.send(b"".join(sse_answer(["cut"], done=False)[:2]))

    result = https_relay.stream(server.script(cut_short), sse=sse)
    if sse:
        assert parse_sse(result.body)[-1][0] == "error", result.body
    else:
        assert not result.complete and result.text == "cut"


def test_silence_from_an_https_upstream_between_tokens_ends_the_answer_as_a_timeout(relay_factory, tls_upstream):
    relay = relay_for(relay_factory, tls_upstream, RELAY_READ_TIMEOUT="1")
    server, _ = tls_upstream

    def first_token_then_silence(conn):
        conn.start()
        conn.send(b"".join(sse_answer(["first"])[:2]))
        conn.sleep_unless_hangup(5)

    result = relay.stream(server.script(first_token_then_silence), sse=True)
    events = parse_sse(result.body)
    assert json.loads(events[1][1])["content"] == "first"
    assert events[-1][0] == "error" and json.loads(events[-1][1])["error"]["code"] == "upstream_timeout", events


def test_client_abort_closes_an_https_upstream_while_silent(https_relay, tls_upstream):
    server, _ = tls_upstream
    relay = https_relay
    model = server.script(silent_after_first_event())
    gone_at = open_and_abandon(relay, model)
    exchange = server.wait_seen(model)[0]
    assert_upstream_closed_within_2s(exchange, gone_at)


@pytest.mark.parametrize("why", ["untrusted", "other_name"])
def test_an_https_upstream_the_relay_cannot_verify_gets_nothing_and_the_caller_a_502(relay_factory, tls_upstream, why):
    """Not signed by a CA the relay trusts, or a certificate for another name (it is for 127.0.0.1
    only, and the relay calls "localhost"): the handshake fails, so the key and the question stay."""
    server, certificate = tls_upstream
    if why == "untrusted":
        relay = relay_factory(OPENAI_BASE_URL=server.base_url, RELAY_RETRIES="0")  # public CAs only
    else:
        base_url = server.base_url.replace("127.0.0.1", "localhost")
        relay = relay_factory(OPENAI_BASE_URL=base_url, REQUESTS_CA_BUNDLE=certificate, RELAY_RETRIES="0")
    model = server.script(stream_script(sse_answer(TOKENS)))
    refused = server.failed_handshakes
    result = relay.stream(model)
    assert result.status == 502 and result.json()["error"]["code"] == "upstream_error", result.body
    deadline = time.monotonic() + 5  # the fake counts in its own thread, maybe after the relay answered
    while server.failed_handshakes == refused and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.failed_handshakes > refused, "the relay never reached the upstream: this tests nothing"
    assert server.seen(model) == [], "the question went to an upstream the relay could not verify"
    assert UPSTREAM_KEY.encode() not in result.body and UPSTREAM_KEY not in relay.log()
