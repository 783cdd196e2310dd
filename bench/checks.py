"""Judges each stream after the run: the HTTP framing, and every byte received against the bytes
the upstream sent (bench.answers), in order, with nothing lost, added or crossed between streams.

A stream is an error when it failed as a whole (no connection, not a 200, cut short, timed out);
bytes that arrived in a complete 200 but differ from the expected ones are counted as mismatched.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from dataclasses import dataclass

from bench.answers import Expected, StreamSpec, expected_events, expected_text
from bench.loadgen import StreamRecord, Target


@dataclass(frozen=True)
class Verdict:
    error: str | None
    tokens: int  # tokens delivered intact, in order, before the first wrong or missing byte
    mismatched_bytes: int


CUT_SHORT = "cut short (no last chunk)"


class FramingError(ValueError):
    pass


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """The body of a chunked transfer, and whether its last chunk arrived."""
    parts, position = [], 0
    while True:
        line_end = data.find(b"\r\n", position)
        if line_end < 0:
            return b"".join(parts), False
        try:
            size = int(data[position:line_end].split(b";", 1)[0], 16)
        except ValueError:
            raise FramingError("bad chunk size line") from None
        if size == 0:
            return b"".join(parts), data.endswith(b"\r\n\r\n", line_end)
        start = line_end + 2
        parts.append(data[start : start + size])
        if start + size + 2 > len(data):
            return b"".join(parts), False
        position = start + size + 2


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes, bool]:
    """Status, headers, body and completeness of one HTTP/1.1 response."""
    head_end = raw.find(b"\r\n\r\n")
    if head_end < 0:
        raise FramingError("no complete response head")
    lines = raw[:head_end].decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    rest = raw[head_end + 4 :]
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body, complete = dechunk(rest)
    elif "content-length" in headers:
        body = rest
        complete = len(rest) == int(headers["content-length"])
    else:
        body, complete = rest, True  # delimited by the close
    return status, headers, body, complete


def relay_event_contents(body: bytes, complete: bool) -> list[bytes]:
    """The contents of the token endpoint's SSE format, checking its meta-tokens-done shape."""
    blocks = body.split(b"\n\n")
    blocks.pop()  # what follows the last blank line: nothing, or an event cut short
    blocks = [block for block in blocks if not block.startswith(b":")]  # heartbeats
    if blocks and blocks[0].startswith(b"id: "):  # a resumable answer: every event numbered 1, 2, 3...
        ids = [block.split(b"\n", 1)[0] for block in blocks]
        stream_id = ids[0][4:].rpartition(b":")[0]
        if ids != [b"id: %s:%d" % (stream_id, seq) for seq in range(1, len(blocks) + 1)]:
            raise FramingError("event ids are not the stream's 1, 2, 3...")
        blocks = [block.split(b"\n", 1)[1] for block in blocks]
    if not blocks or not blocks[0].startswith(b"event: meta\n"):
        raise FramingError("the first event is not meta")
    if complete:
        if not blocks[-1].startswith(b"event: done\n"):
            raise FramingError(f"the last event is not done but {blocks[-1][:80]!r}")
        blocks.pop()
    contents = []
    for block in blocks[1:]:
        if not block.startswith(b"data: "):
            raise FramingError(f"unexpected event {block[:80]!r}")
        contents.append(json.loads(block[6:])["content"].encode())
    return contents


def _common_prefix(a: bytes, b: bytes) -> int:
    if a == b:
        return len(a)
    low, high = 0, min(len(a), len(b))
    while low < high:  # the longest equal prefix, by halving: cheap even for long bodies
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _compare(received: bytes, expected: Expected, complete: bool) -> Verdict:
    prefix = _common_prefix(received, expected.body)
    tokens = bisect_right(expected.token_ends, prefix)
    if not complete:
        return Verdict(CUT_SHORT, tokens, 0)
    mismatched = max(len(received), len(expected.body)) - prefix
    return Verdict(None, tokens, mismatched)


def check_stream(record: StreamRecord, target: Target) -> Verdict:
    verdict = _check_body(record, target)
    if verdict.error == CUT_SHORT and record.error is not None:
        return Verdict(record.error, verdict.tokens, verdict.mismatched_bytes)  # why it was cut: reset, timeout
    return verdict


def _check_body(record: StreamRecord, target: Target) -> Verdict:
    if record.error is not None and record.first_body_at is None:
        return Verdict(record.error, 0, 0)
    spec: StreamSpec = record.spec
    try:
        status, _headers, body, complete = split_response(record.raw)
        if status != 200:
            return Verdict(f"HTTP {status}", 0, 0)
        if target.fmt == "events":
            return _compare(body, expected_events(spec, target.include_usage), complete)
        if target.fmt == "text":
            return _compare(body, expected_text(spec), complete)
        contents = relay_event_contents(body, complete)
    except (FramingError, ValueError, KeyError) as exc:
        return Verdict(f"bad framing: {exc}", 0, 0)
    verdict = _compare(b"".join(contents), expected_text(spec), complete)
    if verdict.error is None and len(contents) != spec.tokens:
        return Verdict("tokens merged or split across events", verdict.tokens, verdict.mismatched_bytes)
    return verdict
