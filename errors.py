"""The relay's one exception type and the contract's JSON error shape.

Every refusal, from a bad request to a failed upstream, is a ``RelayError``; ``app.py`` renders it
once. This module also redacts secrets from upstream messages; it knows nothing of HTTP servers.
"""

from __future__ import annotations

import logging
import re

import orjson

_KEY_LIKE = re.compile(r"\b(sk|rk|pk)-[A-Za-z0-9_\-*]{8,}")

# The OpenAI error "type" that goes with each HTTP status, so the SDKs map them as usual.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    504: "timeout_error",
}


class RelayError(Exception):
    """A failure with the HTTP status, machine-readable code and human message the caller gets.

    Every text field is redacted as it is made: an upstream's ``code``, ``type`` or ``param`` is
    passed on as well as its message, logged too, and a server may echo the key in any of them.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        error_type: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
        outcome: str = "rejected",
        bearer_error: str | None = None,
    ):
        message = redact(message)
        super().__init__(message)
        self.status = status
        self.code = redact(code)
        self.message = message
        self.error_type = redact(error_type or _TYPE_BY_STATUS.get(status, "api_error"))
        self.param = None if param is None else redact(param)
        self.retry_after = retry_after
        self.outcome = outcome
        self.bearer_error = bearer_error  # RFC 6750's error code for a 401's challenge, when a token was sent

    def to_dict(self) -> dict:
        error = {"message": self.message, "type": self.error_type, "code": self.code}
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        if self.status == 401:
            challenge = 'Bearer realm="chat-relay"'
            if self.bearer_error:
                challenge += f', error="{self.bearer_error}"'
            headers["WWW-Authenticate"] = challenge
        return headers


# A run of this many characters of a secret, in any letter case, is redacted too: an upstream may echo
# a key cut short, broken over lines or upper-cased. (OpenAI's own echo shows 4, which is no leak.)
FRAGMENT_CHARS = 16
_BLOCK = FRAGMENT_CHARS // 2  # every such run holds one of the secret's blocks this long, whole
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")  # keeps every index

_secrets: dict[str, list[tuple[str, int]]] = {}  # each secret, lower-cased: its aligned blocks and where they start


def register_secret(secret: str | None) -> None:
    """Make every later ``redact`` remove ``secret`` (the upstream key, whatever its shape), and any
    run of FRAGMENT_CHARS of its characters."""
    if secret:
        lower = secret.translate(_ASCII_LOWER)
        blocks = [(lower[at : at + _BLOCK], at) for at in range(0, len(lower) - _BLOCK + 1, _BLOCK)]
        _secrets[lower] = blocks or [(lower, 0)]  # a secret shorter than a block is its own


def redact(text: str) -> str:
    """``text`` with each registered secret, or a long enough run of one, and anything shaped like an
    API key replaced by ``[redacted]``."""
    if _secrets:
        spans = sorted(span for secret, blocks in _secrets.items() for span in _runs_of(secret, blocks, text))
        for start, end in reversed(_merged(spans)):
            text = text[:start] + "[redacted]" + text[end:]
    return _KEY_LIKE.sub("[redacted]", text)


def _runs_of(secret: str, blocks: list[tuple[str, int]], text: str) -> list[tuple[int, int]]:
    """Where ``text`` holds FRAGMENT_CHARS or more of ``secret`` in a row, whatever their case: found
    from its blocks with ``str.find`` (cheap when there are none, as in nearly every text), then grown."""
    lower, runs = text.translate(_ASCII_LOWER), []
    for block, at in blocks:
        found = lower.find(block)
        while found >= 0:
            start, end, secret_start, secret_end = found, found + _BLOCK, at, at + _BLOCK
            while start and secret_start and lower[start - 1] == secret[secret_start - 1]:
                start, secret_start = start - 1, secret_start - 1
            while end < len(lower) and secret_end < len(secret) and lower[end] == secret[secret_end]:
                end, secret_end = end + 1, secret_end + 1
            if end - start >= min(FRAGMENT_CHARS, len(secret)):
                runs.append((start, end))
            found = lower.find(block, found + 1)
    return runs


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted spans, those that overlap or touch made one."""
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


# Loggers whose tracebacks are the relay's own code failing, kept (redacted): gunicorn's error log
# holds those of a request that failed outside the app's error handlers.
_TRACEBACKS_KEPT = ("chat_relay", "gunicorn.error")


class RedactingFilter(logging.Filter):
    """Redacts every record a handler writes, other libraries' too: urllib3 logs a malformed upstream
    header line as it came, and an upstream may echo the key in one. A library's traceback is
    dropped (its message says what happened); the relay's own is kept, redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format call: the handler reports it as a logging error, as it would unfiltered
            return True
        if redact(message) != message:
            record.msg, record.args = redact(message), ()
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.exc_info = None
        if record.exc_text:  # (also when an earlier handler's formatter wrote it)
            record.exc_text = redact(record.exc_text) if record.name.startswith(_TRACEBACKS_KEPT) else None
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True
