"""The relay's own reading of upstream connections, without a server: de-chunking at every split point, and the pool's check."""

from __future__ import annotations

import gc
import gzip
import json
import subprocess
import sys
import socket
import ssl
import time
import weakref
import zlib
from pathlib import Path

import gevent
import pytest
import urllib3
from gevent import socket as gevent_socket

from fake_upstream import sse_answer, stream_script
from resume import MemoryResumeStore, StreamRecording
from streaming import RelayStream, ResumableStream, TokenTranslator
from upstream import ChunkedDecoder, UpstreamBody, UpstreamClient, _HTTPConnection, _Inflater

PAYLOAD = [b"data: {\"a\": 1}\n\n", b"data: \xe6\x97\xa5\xe6\x9c\xac\n\n", b"x" * 300, b"data: [DONE]\n\n"]


def chunked(parts, trailer=b"") -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts)
    return body + b"0\r\n" + trailer + b"\r\n"


def decode_split(body: bytes, at: int) -> tuple[bytes, bool]:
    decoder = ChunkedDecoder()
    out = decoder.feed(body[:at]) + decoder.feed(body[at:])
    return out, decoder.done


def test_chunked_body_decodes_identically_at_every_split_point():
    body = chunked(PAYLOAD)
    for at in range(len(body) + 1):
        out, done = decode_split(body, at)
        assert out == b"".join(PAYLOAD), f"split at {at}"
        assert done, f"split at {at}: the terminal chunk was not recognised"


def test_chunked_body_decodes_byte_by_byte():
    decoder = ChunkedDecoder()
    out = b"".join(decoder.feed(bytes([byte])) for byte in chunked(PAYLOAD))
    assert out == b"".join(PAYLOAD) and decoder.done


def test_chunk_extensions_and_trailers_are_consumed():
    body = b"5;name=value\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n"
    decoder = ChunkedDecoder()
    assert decoder.feed(body) == b"hello" and decoder.done


def test_done_only_after_the_trailer_section_ends():
    decoder = ChunkedDecoder()
    decoder.feed(b"3\r\nabc\r\n0\r\n")
    assert not decoder.done, "the final CRLF has not arrived yet"
    decoder.feed(b"\r\n")
    assert decoder.done


@pytest.mark.parametrize(
    "bad",
    [
        b"zz\r\nabc\r\n",
        b"3\r\nabcXY0\r\n\r\n",
        b"9" * 5000,
        b"5\r\nhello\r\n-5\r\nworld\r\n",  # a negative size once sent the decoder back over its own line, forever
        b"+5\r\nhello\r\n",
        b"0x5\r\nhello\r\n",
        b"1_0\r\n0123456789abcdef\r\n",
        b" 5\r\nhello\r\n",
        b"\r\nhello\r\n",
        b"fffffffffffffffff\r\n",  # past 64 bits
    ],
)
def test_malformed_chunking_raises_a_protocol_error(bad):
    decoder = ChunkedDecoder()
    with pytest.raises(urllib3.exceptions.ProtocolError):
        decoder.feed(bad)
        decoder.feed(b"")  # the payload decoded before the error comes first


def test_payload_before_bad_framing_in_the_same_read_comes_first_then_the_error():
    """The payload may hold the answer's [DONE]: dropping it with the read would fail a finished answer."""
    decoder = ChunkedDecoder()
    assert decoder.feed(b"e\r\ndata: [DONE]\n\n\r\nzzz\r\n") == b"data: [DONE]\n\n"
    for _ in range(2):
        with pytest.raises(urllib3.exceptions.ProtocolError):
            decoder.feed(b"0\r\n\r\n")


def test_gzip_damage_after_some_payload_returns_that_payload_first_then_the_error():
    body = bytearray(gzip.compress(b"data: [DONE]\n\n" * 200))
    body[-8] ^= 0xFF  # the trailer's CRC
    inflater = _Inflater(16 + zlib.MAX_WBITS)
    assert inflater.decompress(bytes(body), final=True) == b"data: [DONE]\n\n" * 200
    with pytest.raises(zlib.error):
        inflater.decompress(b"", final=True)


def test_whitespace_before_a_chunk_extension_is_allowed():
    assert ChunkedDecoder().feed(b"5 ;ext=1\r\nhello\r\n") == b"hello"


def test_gzip_inside_chunks_is_what_the_relay_inflates():
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    pieces = [compressor.compress(part) + compressor.flush(zlib.Z_SYNC_FLUSH) for part in PAYLOAD]
    pieces.append(compressor.flush())
    decoder, inflate = ChunkedDecoder(), zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = b"".join(inflate.decompress(decoder.feed(chunk)) for chunk in [chunked(pieces)])
    assert out + inflate.flush() == b"".join(PAYLOAD)


@pytest.mark.parametrize("wrapped", [True, False])
def test_a_pooled_connection_is_usable_only_while_open_and_silent(wrapped):
    """The pool's check: a peek at gevent's raw socket, or urllib3's own check for any other socket."""
    ours, theirs = socket.socketpair()
    connection = _HTTPConnection("127.0.0.1", 80)
    connection.sock = gevent_socket.socket(fileno=ours.detach()) if wrapped else ours
    assert hasattr(connection.sock, "_sock") == wrapped
    try:
        assert connection.is_connected, "an open, silent connection is usable"
        theirs.sendall(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        assert not connection.is_connected, "bytes nobody asked for make it unusable"
        theirs.close()
        assert not connection.is_connected, "a closed connection is unusable"
    finally:
        connection.sock.close()


@pytest.fixture
def collector_off():
    """No cyclic garbage collection during the test: what a reference cycle holds stays held."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def open_answer(upstream, script, ca_bundle=None):
    """Call the fake upstream as the relay does; returns a function that opens ``script``'s answer."""
    client = UpstreamClient(
        upstream.base_url, "sk-test", connect_timeout=5, read_timeout=5, retries=0, pool_size=2, ca_bundle=ca_bundle
    )
    payload = {"model": upstream.script(script), "messages": [{"role": "user", "content": "hi"}], "stream": True}
    return lambda: client.open_stream("/chat/completions", payload)


def test_a_finished_body_goes_without_waiting_for_the_garbage_collector(upstream, collector_off):
    """No reference cycle: the response and all urllib3 hangs on it go when the stream does.

    A cycle would leave them to the collector, whose full passes over thousands of open streams
    stall a worker for hundreds of milliseconds; a body reading its socket directly once made one.
    """
    response = open_answer(upstream, stream_script(sse_answer(["one", "two"])))()
    body = UpstreamBody(response)
    assert body.direct, "this is the body that reads the socket itself"
    received = b""
    while chunk := body.read():
        received += chunk
    assert b"one" in received and b"[DONE]" in received
    body.finish()
    body.close()
    response_gone, raw_gone = weakref.ref(response), weakref.ref(response.raw)
    del response, body
    assert response_gone() is None and raw_gone() is None, "held by a reference cycle"


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_kept_alive_body_reads_its_socket_not_http_clients_buffer(scheme, upstream, tls_upstream):
    """Plain or TLS, the body is read from the connection's socket and http.client's 8 KiB buffer is
    freed as soon as the head is parsed (what a waiting stream holds is in docs/BENCHMARKS.md)."""
    server, ca_bundle = (upstream, None) if scheme == "http" else tls_upstream
    events = sse_answer([f"token{index} " for index in range(50)])
    open_one = open_answer(server, stream_script(events, delay=0.01), ca_bundle=ca_bundle and str(ca_bundle))
    connections = set()
    for _ in range(2):
        response = open_one()
        body = UpstreamBody(response)
        assert body._socket is not None and body._http.fp is None, "read through http.client's buffer"
        received = b""
        while chunk := body.read():
            received += chunk
        assert received == b"".join(events)
        body.finish()
        body.close()
        connections.update(e.connection for e in server.seen(json.loads(response.request.body)["model"]))
    assert len(connections) == 1, "the connection was not given back for reuse"


def test_every_https_connection_shares_one_tls_context(tls_upstream):
    """urllib3 alone would give each connection a context of its own, with the CA bundle loaded into it
    again: ~16 ms and ~680 KiB per connection for certifi's bundle."""
    server, ca_bundle = tls_upstream
    open_one = open_answer(server, stream_script(sse_answer(["a"]), first_delay=0.5), ca_bundle=str(ca_bundle))
    first, second = open_one(), open_one()  # both open at once: two connections
    try:
        sockets = [response.raw.connection.sock for response in (first, second)]
        assert sockets[0] is not sockets[1]
        assert sockets[0].context is sockets[1].context, "each connection built its own TLS context"
        assert sockets[0].context.verify_mode == ssl.CERT_REQUIRED and sockets[0].context.check_hostname
        assert first.raw.connection.ca_certs is None, "urllib3 would load the CA bundle again per connection"
    finally:
        first.close()
        second.close()


PACE = 0.3  # seconds between events: over the answer, longer than the stream watch's tick (0.5 s)


def cut_after(events):
    """A script that sends ``events`` and closes the connection without ending the body."""

    def script(conn):
        conn.start(keep_alive=False)
        for event in events:
            conn.send(event)
            time.sleep(PACE)

    return script


def relay_stream(open_upstream):
    return RelayStream(open_upstream, TokenTranslator(sse=True), read_timeout=5)


def resumable_stream(open_upstream):
    store = MemoryResumeStore(linger_seconds=30, live_seconds=60)
    stream_id = store.create("")
    recording = StreamRecording(store, stream_id, 30, 10)
    return ResumableStream(open_upstream, TokenTranslator(sse=True, stream_id=stream_id), recording=recording, read_timeout=5)


@pytest.mark.parametrize("make_stream", [relay_stream, resumable_stream])
@pytest.mark.parametrize("ending", ["complete", "error_event", "cut_short"])
def test_a_finished_stream_goes_without_waiting_for_the_garbage_collector(upstream, ending, make_stream, collector_off):
    """However the answer ends, the stream and its upstream response go when the caller lets go of
    them: a failure the stream keeps (for the access log) must not keep them through its traceback."""
    answer = sse_answer(["one", "two"])
    script = {  # paced so that the stream watch checks the stream at least once meanwhile
        "complete": stream_script(answer, delay=PACE),
        "error_event": stream_script(answer[:2] + [b'data: {"error": {"message": "overloaded"}}\n\n'], delay=PACE),
        "cut_short": cut_after(answer[:2]),
    }[ending]
    open_response, opened = open_answer(upstream, script), []

    def open_upstream():
        response = open_response()
        opened.append(weakref.ref(response))
        return response

    stream = make_stream(open_upstream)
    output = stream.first() + b"".join(stream.rest())
    stream.close()
    gevent.sleep(0.05)  # a resumable answer's reader greenlet finishes its cleanup
    assert (stream.error is None) == (ending == "complete"), output
    assert (b"event: error" in output) == (ending != "complete"), output
    stream_gone = weakref.ref(stream)
    del stream
    assert stream_gone() is None and opened[0]() is None, "held by a reference cycle"


# Run under gevent's patching, as in a worker: the pytest process itself is not patched.
_CONNECT_UNDER_GEVENT = r"""
from gevent import monkey; monkey.patch_all()
import json, socket, sys
import gevent
sys.path.insert(0, sys.argv[1])
from upstream import _HTTPConnection

listener = socket.socket(socket.AF_INET)
listener.bind(("127.0.0.1", 0))
listener.listen(8)
closed = socket.socket(socket.AF_INET)
closed.bind(("127.0.0.1", 0))
closed_port = closed.getsockname()[1]
closed.close()
results = {}
attempts = [("ip", "127.0.0.1", listener.getsockname()[1])] * 5  # the kernel may defer a handshake now and then
for name, host, port in attempts + [("name", "localhost", listener.getsockname()[1]), ("refused", "127.0.0.1", closed_port)]:
    turns = []
    gevent.spawn(turns.append, "the loop ran")  # runs only if connecting waits for gevent's loop
    connection = _HTTPConnection(host, port, timeout=5)
    try:
        connection.connect()
        results[name] = {"peer": connection.sock.getpeername()[1], "waited": bool(turns) and results.get(name, {}).get("waited", True)}
        connection.close()
    except Exception as exc:
        results[name] = {"error": type(exc).__name__, "message": str(exc)}
    gevent.sleep(0)
print(json.dumps(results))
"""


def test_a_connection_to_an_ip_the_kernel_connects_at_once_does_not_wait_for_the_loop():
    """In a burst, a connect that waits for gevent's loop waits for every other ready request's set-up."""
    root = str(Path(__file__).resolve().parent.parent)
    run = subprocess.run([sys.executable, "-c", _CONNECT_UNDER_GEVENT, root], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout)
    port = results["ip"]["peer"]
    assert results["ip"] == {"peer": port, "waited": False}
    assert results["name"]["peer"] == port, "a name is resolved (and waited for) as urllib3 does"
    assert results["refused"]["error"] == "NewConnectionError", results["refused"]
    assert "Connection refused" in results["refused"]["message"]


def test_a_gzip_body_of_several_members_decodes_whole_at_every_split():
    """RFC 1952 lets a gzip body be members one after another; the rest was dropped after the first."""
    plain = [b"data: a\n\n", b"data: b\n\ndata: [DONE]\n\n"]
    body = gzip.compress(plain[0]) + gzip.compress(plain[1])
    for at in range(len(body) + 1):
        inflater = _Inflater(16 + zlib.MAX_WBITS)
        out = inflater.decompress(body[:at], final=False) + inflater.decompress(body[at:], final=True)
        assert out == b"".join(plain), at



def test_bytes_after_the_last_gzip_member_that_start_no_member_are_ignored():
    inflater = _Inflater(16 + zlib.MAX_WBITS)
    assert inflater.decompress(gzip.compress(b"data: [DONE]\n\n") + b"\0" * 8, final=True) == b"data: [DONE]\n\n"
    inflater.check()
