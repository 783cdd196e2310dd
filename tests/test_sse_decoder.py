"""Unit tests for ``streaming.SSEDecoder``: WHATWG event-stream parsing, whatever the network's splits.

Most tests go through ``decode``, which feeds the stream whole, split in two at every position and
byte by byte, and checks that every way gives the same events before the test looks at them.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import pytest

from streaming import SSEDecoder

BOM = b"\xef\xbb\xbf"


class Event(NamedTuple):
    event: bytes | None
    data: bytes
    id: bytes | None
    lines: list[bytes]


def feed_pieces(pieces: list[bytes], **decoder_args) -> list[Event]:
    """The events a fresh decoder dispatches when fed ``pieces`` one read at a time."""
    decoder = SSEDecoder(**decoder_args)
    events = []
    for piece in pieces:
        events.extend(Event(e.event, e.data, e.id, e.lines) for e in decoder.feed(piece))
    return events


def decode(stream: bytes, **decoder_args) -> list[Event]:
    """The events in ``stream``, after checking that no way of splitting it into reads changes them."""
    whole = feed_pieces([stream], **decoder_args)
    for at in range(1, len(stream)):
        split = feed_pieces([stream[:at], stream[at:]], **decoder_args)
        assert split == whole, (
            f"split at byte {at} ({stream[:at]!r} | {stream[at:]!r}) gave {split}, fed whole gave {whole}"
        )
    bytewise = feed_pieces([stream[at : at + 1] for at in range(len(stream))], **decoder_args)
    assert bytewise == whole, f"fed byte by byte gave {bytewise}, fed whole gave {whole}"
    return whole


def datas(events: list[Event]) -> list[bytes]:
    return [event.data for event in events]


# --- field values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "value"),
    [
        (b"data:a", b"a"),
        (b"data: a", b"a"),
        (b"data:  a", b" a"),
        (b"data:\ta", b"\ta"),
        (b"data: a ", b"a "),
        (b"data: a:b", b"a:b"),
        (b"data:", b""),
        (b"data", b""),
    ],
)
def test_only_one_space_after_the_colon_is_stripped(line, value):
    events = decode(line + b"\n\n")
    assert datas(events) == [value], f"{line!r} should give the data {value!r}, got {events}"
    assert events[0].lines == [line], f"the raw line {line!r} should be kept unchanged, got {events[0].lines}"


# --- line ends ---------------------------------------------------------------------------------


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_lf_crlf_and_cr_line_ends_frame_the_same_events(line_end):
    stream = line_end.join([b"event: a", b"data: 1", b"data: 2", b"", b"data: 3", b"", b""])
    events = decode(stream)
    assert [(e.event, e.data) for e in events] == [(b"a", b"1\n2"), (None, b"3")], (
        f"with {line_end!r} line ends the stream should give two events, got {events}"
    )


def test_mixed_line_ends_in_one_stream_are_each_one_line_end():
    events = decode(b"data: a\r\ndata: b\rdata: c\n\r\n")
    assert datas(events) == [b"a\nb\nc"], f"CRLF, CR and LF should each end one line, got {events}"


def test_crlf_split_across_reads_is_one_line_end():
    events = feed_pieces([b"data: a\r", b"\n\r\n"])
    assert datas(events) == [b"a"], f"'data: a\\r' + '\\n\\r\\n' should be exactly one event 'a', got {events}"
    events = feed_pieces([b"data: a\r", b"\ndata: b\r\n\r\n"])
    assert datas(events) == [b"a\nb"], (
        f"the LF completing a split CRLF must not count as a blank line that dispatches early, got {events}"
    )


def test_empty_read_between_cr_and_lf_is_still_one_line_end():
    events = feed_pieces([b"data: a\r", b"", b"\ndata: b\n\n"])
    assert datas(events) == [b"a\nb"], f"an empty read must not split the CRLF into two line ends, got {events}"


# --- byte order mark ---------------------------------------------------------------------------


def test_leading_bom_is_ignored_even_when_split_across_reads():
    # decode() also feeds the BOM split after its first and second byte, and byte by byte.
    events = decode(BOM + b"data: a\n\n")
    assert datas(events) == [b"a"], f"a leading BOM should be dropped, got {events}"
    assert events[0].lines == [b"data: a"], f"the BOM must not reach the relayed lines, got {events[0].lines}"


def test_bom_not_at_the_start_is_kept_as_data():
    events = decode(b"data: " + BOM + b"a\n\ndata: b" + BOM + b"\n\n")
    assert datas(events) == [BOM + b"a", b"b" + BOM], f"a BOM inside a value is data, got {events}"


def test_only_the_first_leading_bom_is_stripped():
    events = decode(BOM + BOM + b"data: a\n\ndata: b\n\n")
    assert datas(events) == [b"b"], (
        f"a second BOM makes the first line's field name unknown, so only 'b' should dispatch, got {events}"
    )


def test_partial_bom_prefix_that_is_not_a_bom_is_kept():
    events = decode(b"\xef\xbb" + b"x: 1\ndata: a\n\n")
    assert datas(events) == [b"a"], f"bytes that only start like a BOM must not swallow the stream, got {events}"
    assert events[0].lines == [b"data: a"], f"the unknown first field should not be relayed, got {events[0].lines}"


# --- comments, data, dispatch ------------------------------------------------------------------


def test_comment_lines_are_ignored_and_not_relayed():
    events = decode(b": keep-alive\ndata: a\n:no space\ndata: b\n\n: ping\n\n")
    assert datas(events) == [b"a\nb"], f"comments should not end, add to or dispatch events, got {events}"
    assert events[0].lines == [b"data: a", b"data: b"], f"comment lines must not be relayed, got {events[0].lines}"


def test_data_lines_join_with_lf():
    events = decode(b"data: a\ndata:\ndata: b\n\n")
    assert datas(events) == [b"a\n\nb"], f"three data lines (one empty) should join with LF, got {events}"
    assert events[0].lines == [b"data: a", b"data:", b"data: b"], f"each data line should be kept, got {events}"


@pytest.mark.parametrize(
    "block",
    [b"event: ping\n\n", b"id: 3\n\n", b"retry: 1000\n\n", b"x: 1\n\n", b"\n\n\n"],
    ids=["event", "id", "retry", "unknown", "blank-lines"],
)
def test_block_without_data_lines_dispatches_no_event(block):
    assert decode(block) == [], f"{block!r} has no data line and should dispatch nothing"
    events = decode(block + b"data: a\n\n")
    assert [(e.event, e.data, e.lines) for e in events] == [(None, b"a", [b"data: a"])], (
        f"a data-less block's event type and lines must not leak into the next event, got {events}"
    )


def test_incomplete_event_at_end_of_stream_is_not_dispatched():
    for stream in (b"data: a\n\ndata: b\n", b"data: a\n\ndata: b", b"data: a\n\ndata: b\r"):
        events = decode(stream)
        assert datas(events) == [b"a"], f"{stream!r} ends without a blank line, so only 'a' should dispatch: {events}"


# --- characters --------------------------------------------------------------------------------


def test_events_and_multibyte_characters_split_at_every_position_decode_intact():
    texts = ["日本語", "emoji 🎉👩‍💻", "ä ö ü ß", "mixed 中文 and \U0001f600"]
    stream = b"".join(b"data: " + json.dumps({"content": t}, ensure_ascii=False).encode() + b"\n\n" for t in texts)
    events = decode(stream)
    got = [json.loads(event.data.decode("utf-8"))["content"] for event in events]
    assert got == texts, f"multi-byte characters should survive any split, got {got}"


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
def test_unicode_line_separators_in_json_are_not_line_ends(separator):
    text = f"one{separator}two"
    stream = b"data: " + json.dumps({"content": text}, ensure_ascii=False).encode() + b"\n\n"
    events = decode(stream)
    assert len(events) == 1, f"{separator!r} inside a JSON string must not split the event, got {events}"
    assert json.loads(events[0].data)["content"] == text, f"the JSON should parse back to {text!r}, got {events}"


# --- line length cap ---------------------------------------------------------------------------


def test_line_at_the_cap_is_accepted():
    line = b"data: " + b"x" * 10
    events = decode(line + b"\n\n", max_line_bytes=len(line))
    assert datas(events) == [b"x" * 10], f"a line of exactly max_line_bytes should decode, got {events}"


def test_over_long_line_fails_the_stream_as_soon_as_it_passes_the_cap():
    cap = 16
    decoder = SSEDecoder(max_line_bytes=cap)
    decoder.feed(b"data: ok\n\n")
    fed = 0
    with pytest.raises(ValueError, match="longer than 16 bytes"):
        for _ in range(10 * cap):
            decoder.feed(b"x")
            fed += 1
            decoder.check()
    assert fed == cap + 1, f"the line should fail on its byte {cap + 1}, not {fed}"
    with pytest.raises(ValueError):
        decoder.feed(b"\n\n")


def test_over_long_line_arriving_whole_in_one_read_fails_the_stream():
    decoder = SSEDecoder(max_line_bytes=16)
    assert decoder.feed(b"data: " + b"x" * 100 + b"\n\n") == []
    with pytest.raises(ValueError):
        decoder.check()


@pytest.mark.parametrize("too_long", [b"data: " + b"x" * 100 + b"\n\n", b"x" * 100, b"data: 0123456789\n" * 2])
def test_events_before_an_over_long_line_or_event_in_the_same_read_come_first(too_long):
    """A gzip read can hold the answer's end and more than a line's worth after it."""
    decoder = SSEDecoder(max_line_bytes=16)
    events = decoder.feed(b"data: a\n\ndata: [DONE]\n\n" + too_long)
    assert datas(events) == [b"a", b"[DONE]"]
    with pytest.raises(ValueError):
        decoder.feed(b"data: b\n\n")


# --- event and id fields -----------------------------------------------------------------------


def test_event_and_id_fields_are_captured():
    events = decode(b"event: delta\nid: 7\ndata: a\n\ndata: b\n\n")
    assert [(e.event, e.id) for e in events] == [(b"delta", b"7"), (None, b"7")], (
        f"event should apply to its own event only; id is the last event ID and persists, got {events}"
    )
    assert events[0].lines == [b"event: delta", b"id: 7", b"data: a"], f"field lines should be kept, got {events}"


def test_id_containing_nul_is_ignored():
    events = decode(b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n")
    assert [e.id for e in events] == [b"1", b"1"], f"an id with NUL must not change the last event ID, got {events}"


def test_unknown_fields_are_ignored_and_not_relayed():
    events = decode(b"foo: bar\nDATA: x\nevent : y\nretry: 10\ndata: a\n\n")
    assert [(e.event, e.data) for e in events] == [(None, b"a")], f"unknown fields must change nothing, got {events}"
    assert events[0].lines == [b"retry: 10", b"data: a"], (
        f"only known fields (retry included) should be relayed, got {events[0].lines}"
    )
