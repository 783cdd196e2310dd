"""What one benchmark answer is: the stream spec a client asks for, the bytes the fake upstream
sends for it, and the bytes each output format must deliver. Shared by both ends; no I/O here.

The spec travels inside the prompt, the one field every relay endpoint passes on unchanged.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from itertools import accumulate

MODEL = "bench-model"
CREATED = 1700000000
# Tokens chosen to make a careless relay fail the byte check: multi-byte characters (split across
# reads), U+2028/U+2029 (line ends in JavaScript, not in JSON), JSON escapes, and SSE-like text.
VOCAB = (
    " the", " relay", " streams", " tokens", ",", ".", " and", " a", " to", " of",
    " é", " naïve", " 你好", " 世界", " 🙂", " 👩‍💻", "\u2028", "\u2029", " \"quoted\"", " back\\slash",
    "\n", "\n\n", "\r\n", "\t", " data: not-an-event", " : comment?", " [DONE]", " €100", " ½", " ß",
    " Ωmega", " ∑", " -->", " </script>", " {\"json\":1}", " a\u0000b", " \u001b[0m", " ok", " yes", " no",
    " streaming", " latency", " throughput", " percentile", " gevent", " nginx", " Flask", "!", "?",
)  # fmt: skip
_SPEC = re.compile(r"^bench seed=(\d+) tokens=(\d+) first_ms=(\d+) gap_ms=(\d+)$")


@dataclass(frozen=True)
class StreamSpec:
    """One answer: ``tokens`` contents, the first after ``first_ms``, the rest ``gap_ms`` apart."""

    seed: int
    tokens: int
    first_ms: int
    gap_ms: int

    def prompt(self) -> str:
        return f"bench seed={self.seed} tokens={self.tokens} first_ms={self.first_ms} gap_ms={self.gap_ms}"

    @classmethod
    def from_prompt(cls, text: str) -> StreamSpec:
        match = _SPEC.match(text)
        if match is None:
            raise ValueError(f"not a bench prompt: {text[:80]!r}")
        return cls(*(int(group) for group in match.groups()))

    @property
    def ideal_seconds(self) -> float:
        """How long the answer takes when nothing in the path adds delay."""
        return (self.first_ms + max(0, self.tokens - 1) * self.gap_ms) / 1000

    def token(self, index: int) -> str:
        """The first token names the stream, so a relay that crosses two streams fails the check."""
        if index == 0:
            return f"«{self.seed}»"
        return VOCAB[(self.seed + 7 * index) % len(VOCAB)]


def request_body(spec: StreamSpec, include_usage: bool = False) -> bytes:
    body = {"model": MODEL, "messages": [{"role": "user", "content": spec.prompt()}], "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


# --- the upstream's events -------------------------------------------------------------------------


def _chunk_event(choices: str, extra: str = "") -> bytes:
    head = f'{{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":{CREATED},"model":"{MODEL}"'
    return f"data: {head},\"choices\":{choices}{extra}}}\n\n".encode()


def _content_event(text: str, role: bool = False) -> bytes:
    role_field = '"role":"assistant",' if role else ""
    content = json.dumps(text, ensure_ascii=False)
    return _chunk_event(f'[{{"index":0,"delta":{{{role_field}"content":{content}}},"finish_reason":null}}]')


def http_chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


ROLE_EVENT = _content_event("", role=True)
FINISH_EVENT = _chunk_event('[{"index":0,"delta":{},"finish_reason":"stop"}]')
DONE_EVENT = b"data: [DONE]\n\n"
_VOCAB_EVENTS = tuple(_content_event(text) for text in VOCAB)
_VOCAB_CHUNKS = tuple(http_chunk(event) for event in _VOCAB_EVENTS)
LAST_CHUNK = b"0\r\n\r\n"


def _usage_event(spec: StreamSpec) -> bytes:
    usage = f'{{"prompt_tokens":9,"completion_tokens":{spec.tokens},"total_tokens":{spec.tokens + 9}}}'
    return _chunk_event("[]", f',"usage":{usage}')


def token_event(spec: StreamSpec, index: int) -> bytes:
    if index == 0:
        return _content_event(spec.token(0))
    return _VOCAB_EVENTS[(spec.seed + 7 * index) % len(VOCAB)]


def token_chunk(spec: StreamSpec, index: int) -> bytes:
    """Token ``index`` as the upstream writes it: one HTTP chunk holding one SSE event."""
    if index == 0:
        return http_chunk(ROLE_EVENT) + http_chunk(token_event(spec, 0))
    return _VOCAB_CHUNKS[(spec.seed + 7 * index) % len(VOCAB)]


def closing_events(spec: StreamSpec, include_usage: bool) -> list[bytes]:
    events = [FINISH_EVENT]
    if include_usage:
        events.append(_usage_event(spec))
    events.append(DONE_EVENT)
    return events


# --- what each format must deliver --------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """The exact bytes a format delivers for a spec, and where each token's bytes end in them."""

    body: bytes
    token_ends: tuple[int, ...]


def expected_events(spec: StreamSpec, include_usage: bool) -> Expected:
    """The upstream's event stream, byte for byte: what the direct, nginx and passthrough runs get."""
    tokens = [token_event(spec, index) for index in range(spec.tokens)]
    parts = [ROLE_EVENT, *tokens, *closing_events(spec, include_usage)]
    ends = tuple(accumulate((len(event) for event in tokens), initial=len(ROLE_EVENT)))[1:]
    return Expected(b"".join(parts), ends)


def expected_text(spec: StreamSpec) -> Expected:
    """The token endpoint's plain text; its SSE format is checked on the same concatenated contents."""
    tokens = [spec.token(index).encode() for index in range(spec.tokens)]
    return Expected(b"".join(tokens), tuple(accumulate(len(token) for token in tokens)))
