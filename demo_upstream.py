"""A simulated OpenAI-compatible model for demo mode, served over HTTP on a loopback port.

Demo mode points the relay's ordinary upstream client at this server, so a demo answer travels the
same HTTP and SSE-parsing path as a live one. It answers deterministically, at a chat-like pace;
it is not a model and does not pretend to understand the question.
"""

from __future__ import annotations

import hashlib
import re
import time

import orjson
from gevent.pywsgi import WSGIServer

FIRST_TOKEN_SECONDS = 0.3
SECONDS_PER_TOKEN = 1 / 30
MODEL = "demo"

_ANSWERS = (
    "This is Chat Relay in demo mode. No API key is set, so a simulated model is answering: every "
    "word you see travelled from a small upstream server, through the relay's streaming parser, to "
    "your browser, one token at a time — exactly as a real answer would.",
    "Streaming works like this: the relay posts your messages upstream with stream: true, reads the "
    "server-sent events as they arrive, and passes each token on the moment it lands. Your API key "
    "stays on the server; the browser only ever talks to the relay.",
    "To go live, set OPENAI_API_KEY (and OPENAI_BASE_URL for any OpenAI-compatible server such as "
    "vLLM, Ollama or OpenRouter), unset RELAY_DEMO, and restart. Nothing else changes: same "
    "endpoints, same events, same page. Ünïcödé and 日本語 travel intact too.",
)
_TOKEN = re.compile(r"\S+\s*|\s+")


def demo_answer(messages: list) -> str:
    """The deterministic answer to a conversation: chosen by the last user message's text."""
    last = next((m.get("content") for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), "")
    digest = hashlib.sha256(orjson.dumps(last)).digest()
    return _ANSWERS[digest[0] % len(_ANSWERS)]


def _chunk(completion_id: str, created: int, delta: dict, finish_reason=None, usage=None) -> bytes:
    body = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}] if usage is None else [],
    }
    if usage is not None:
        body["usage"] = usage
    return b"data: " + orjson.dumps(body) + b"\n\n"


def _stream(answer: str, include_usage: bool):
    completion_id = "chatcmpl-demo" + hashlib.sha256(answer.encode()).hexdigest()[:12]
    created = int(time.time())
    tokens = _TOKEN.findall(answer)
    time.sleep(FIRST_TOKEN_SECONDS)
    yield _chunk(completion_id, created, {"role": "assistant", "content": ""})
    for token in tokens:
        yield _chunk(completion_id, created, {"content": token})
        time.sleep(SECONDS_PER_TOKEN)
    yield _chunk(completion_id, created, {}, finish_reason="stop")
    if include_usage:
        usage = {"prompt_tokens": 10, "completion_tokens": len(tokens), "total_tokens": 10 + len(tokens)}
        yield _chunk(completion_id, created, {}, usage=usage)
    yield b"data: [DONE]\n\n"


def _completion(answer: str) -> bytes:
    tokens = len(_TOKEN.findall(answer))
    return orjson.dumps(
        {
            "id": "chatcmpl-demo",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": tokens, "total_tokens": 10 + tokens},
        }
    )


def demo_app(environ, start_response):
    """The simulated upstream as a WSGI app: /v1/chat/completions and /v1/models."""
    path = environ.get("PATH_INFO", "")
    if path == "/v1/models":
        start_response("200 OK", [("Content-Type", "application/json")])
        return [orjson.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "chat-relay"}]})]
    if path != "/v1/chat/completions" or environ["REQUEST_METHOD"] != "POST":
        start_response("404 Not Found", [("Content-Type", "application/json")])
        return [b'{"error": {"message": "not found", "type": "invalid_request_error", "code": null}}']
    try:
        request = orjson.loads(environ["wsgi.input"].read())
        messages = request["messages"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        start_response("400 Bad Request", [("Content-Type", "application/json")])
        return [b'{"error": {"message": "bad request", "type": "invalid_request_error", "code": null}}']
    answer = demo_answer(messages)
    if not request.get("stream"):
        start_response("200 OK", [("Content-Type", "application/json")])
        return [_completion(answer)]
    include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
    start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])
    return _stream(answer, include_usage)


def start_demo_upstream() -> str:
    """Serve the simulated model on an ephemeral loopback port; returns its base URL."""
    server = WSGIServer(("127.0.0.1", 0), demo_app, log=None, error_log=None)
    server.start()
    return f"http://127.0.0.1:{server.server_port}/v1"
