"""Every environment variable the relay reads, parsed and checked once at start-up.

Nothing else in the relay reads ``os.environ``; a bad value becomes a ``SettingsError`` whose
one-line message names the variable and the accepted form, and start-up stops there.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from dataclasses import dataclass, field
from typing import Mapping
from urllib.parse import parse_qsl, urlsplit

import idna
import limits
from dotenv import load_dotenv

from errors import redact

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# The shortest read timeout or heartbeat: the stream watch ticks at half of it, and a tick of a
# nanosecond would spin the worker (RELAY_HEARTBEAT_SECONDS=1e-9 sent 25,000 pings a second).
MIN_CLOCK_SECONDS = 0.1
_HOST_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# OpenAI's reasoning models refuse max_tokens; Ollama and LM Studio know no other
MAX_TOKENS_FIELDS = ("max_completion_tokens", "max_tokens")


class SettingsError(ValueError):
    """A setting that cannot be used; the message is the one line start-up prints."""


@dataclass(frozen=True)
class Settings:
    api_key: str | None = field(default=None, repr=False)
    base_url: str = DEFAULT_BASE_URL
    ca_bundle: str | None = None
    demo: bool = False
    models: tuple[str, ...] = ()
    default_model: str | None = None
    max_tokens: int | None = None
    max_tokens_field: str = "max_completion_tokens"  # which field carries RELAY_MAX_TOKENS when a request names none
    max_body_bytes: int = 1_048_576
    allowed_origins: tuple[str, ...] = ()
    access_tokens: tuple[str, ...] = field(default=(), repr=False)
    rate_limit: str | None = None
    max_streams_per_caller: int | None = None
    redis_url: str | None = field(default=None, repr=False)
    trusted_proxies: int = 0
    connect_timeout: float = 5.0
    read_timeout: float = 120.0
    retries: int = 2
    heartbeat_seconds: float = 15.0
    body_timeout: float = 30.0
    graceful_timeout: float = 30.0
    resume_seconds: float = 0.0
    log_level: str = "INFO"
    host: str = "0.0.0.0"
    port: int = 8000
    web_concurrency: int = field(default_factory=lambda: os.cpu_count() or 1)
    worker_connections: int = 2000
    metrics_dir: str | None = None

    @property
    def needs_one_process(self) -> bool:
        """State that must be shared (limits' counts, resumable answers) has no Redis to live in."""
        return bool(self.rate_limit or self.max_streams_per_caller or self.resume_seconds) and not self.redis_url

    @property
    def upstream_label(self) -> str:
        """What `/healthz` shows: the upstream's host[:port], or "demo"."""
        return "demo" if self.demo else urlsplit(self.base_url).netloc


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Parse the relay's settings from ``environ``; by default the process environment, to which a
    ``.env`` file in the working directory adds what the environment does not set."""
    if environ is None:
        load_dotenv(".env", override=False)  # the working directory's, not the one beside the code
        environ = os.environ
    env = _Env(environ)
    demo = env.flag("RELAY_DEMO")
    api_key = env.text("OPENAI_API_KEY")
    _check_api_key(None if demo else api_key)  # demo mode never sends it
    base_url_given = env.text("OPENAI_BASE_URL")
    if not demo and not api_key and not base_url_given:
        raise SettingsError(
            "No upstream configured: set OPENAI_API_KEY (live mode, optionally OPENAI_BASE_URL) "
            "or RELAY_DEMO=1 (demo mode, no key needed)"
        )
    try:
        models = env.csv("RELAY_MODELS", "model", "model names, or leave it unset to allow any model")
        return Settings(
            api_key=None if demo else api_key,
            base_url=env.url("OPENAI_BASE_URL", DEFAULT_BASE_URL),
            ca_bundle=env.ca_bundle("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"),
            demo=demo,
            models=models,
            default_model=_allowed_default_model(env.text("RELAY_DEFAULT_MODEL"), models),
            max_tokens=env.integer("RELAY_MAX_TOKENS", None, minimum=1),
            max_tokens_field=env.choice("RELAY_MAX_TOKENS_FIELD", "max_completion_tokens", MAX_TOKENS_FIELDS),
            max_body_bytes=env.integer("RELAY_MAX_BODY_BYTES", 1_048_576, minimum=1024),
            allowed_origins=env.origins("RELAY_ALLOWED_ORIGINS"),
            access_tokens=_check_access_tokens(
                env.csv("RELAY_ACCESS_TOKENS", "token", "tokens, or leave it unset for an open relay", blank_is_unset=False)
            ),
            rate_limit=env.rate_limit("RELAY_RATE_LIMIT"),
            max_streams_per_caller=env.integer("RELAY_MAX_STREAMS_PER_CALLER", None, minimum=1),
            redis_url=env.redis_url("REDIS_URL"),
            trusted_proxies=env.integer("RELAY_TRUSTED_PROXIES", 0, minimum=0),
            connect_timeout=env.seconds("RELAY_CONNECT_TIMEOUT", 5.0),
            read_timeout=env.seconds("RELAY_READ_TIMEOUT", 120.0, minimum=MIN_CLOCK_SECONDS),
            retries=env.integer("RELAY_RETRIES", 2, minimum=0, maximum=10),
            heartbeat_seconds=env.seconds("RELAY_HEARTBEAT_SECONDS", 15.0, minimum=MIN_CLOCK_SECONDS),
            body_timeout=env.seconds("RELAY_BODY_TIMEOUT", 30.0, minimum=MIN_CLOCK_SECONDS),
            graceful_timeout=env.seconds("RELAY_GRACEFUL_TIMEOUT", 30.0),
            resume_seconds=env.seconds("RELAY_RESUME_SECONDS", 0.0, allow_zero=True),
            log_level=env.choice("LOG_LEVEL", "INFO", LOG_LEVELS),
            host=env.host("HOST", "0.0.0.0"),
            port=env.integer("PORT", 8000, minimum=0, maximum=65535),
            web_concurrency=env.integer("WEB_CONCURRENCY", os.cpu_count() or 1, minimum=1),
            worker_connections=env.integer("RELAY_WORKER_CONNECTIONS", 2000, minimum=1),
            metrics_dir=env.writable_dir("PROMETHEUS_MULTIPROC_DIR"),
        )
    except SettingsError as error:  # a value that holds a key (OPENAI_BASE_URL and the key swapped) is not printed
        message = str(error)
        if api_key and len(api_key) >= 8:  # (a dummy key like "x" is no secret)
            message = message.replace(api_key, "[redacted]")
        if redact(message) != str(error):
            raise SettingsError(redact(message)) from None
        raise


def _check_api_key(api_key: str | None) -> None:
    """A key that cannot go in a header line (a line break pasted in the middle, a space, a curly
    quote) would fail every request with a 502: refused here."""
    if api_key is not None:
        _check_one_word("OPENAI_API_KEY", "", api_key, "an API key")


def _check_access_tokens(tokens: tuple[str, ...]) -> tuple[str, ...]:
    """A token no caller can send as one (``Bearer <token>`` is one word) would refuse every caller
    with 401: refused here. The usual cause is a comment after the value in systemd's env file."""
    for number, token in enumerate(tokens, 1):
        _check_one_word("RELAY_ACCESS_TOKENS", f"token {number}: ", token, "a token")
    return tokens


def _check_one_word(name: str, which: str, secret: str, what: str) -> None:
    """Refuses a secret that is not one word of printable ASCII, naming where, never showing it."""
    for position, char in enumerate(secret, 1):
        if not "!" <= char <= "~":
            hint = (
                "a comment after the value? systemd keeps it as part of the value: put it on a line of its own"
                if "#" in secret[position:]
                else "was a line break or a space pasted in?"
            )
            raise SettingsError(
                f"{name}: {which}character {position} of {len(secret)} is {_character_kind(char)}; "
                f"{what} is one word of printable ASCII ({hint})"
            )


def _character_kind(char: str) -> str:
    if char in "\r\n":
        return "a line break"
    if char.isspace():
        return "a space"
    return "a control character" if ord(char) < 0x20 or ord(char) == 0x7F else "not ASCII"


class _Env:
    """Typed readers over the environment; each failure names its variable and accepted form."""

    def __init__(self, environ: Mapping[str, str]):
        self._environ = environ

    def text(self, name: str) -> str | None:
        value = self._environ.get(name, "").strip()
        return value or None

    def flag(self, name: str) -> bool:
        value = (self.text(name) or "0").lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name}={value!r}: expected 1 or 0")

    def csv(self, name: str, item: str, accepted: str, *, blank_is_unset: bool = True) -> tuple[str, ...]:
        """The comma-separated ``item``s in ``name`` (empty ones skipped); () when it is unset, or blank
        unless ``blank_is_unset`` is False."""
        raw = self.text(name)
        if raw is None:
            if name in self._environ and not blank_is_unset:
                # `RELAY_ACCESS_TOKENS=${TOKENS}` with TOKENS unset: an open relay nobody meant
                raise SettingsError(f"{name} is set but empty: give a comma-separated list of {accepted}")
            return ()
        items = tuple(part.strip() for part in raw.split(",") if part.strip())
        if not items:
            # commas alone were typed, not left out: reading them as unset would turn the access
            # tokens or an allow-list off, the opposite of what was meant
            raise SettingsError(f"{name}={raw!r} names no {item}: give a comma-separated list of {accepted}")
        return items

    def integer(self, name, default, *, minimum=None, maximum=None):
        raw = self.text(name)
        if raw is None:
            return default
        bounds = _describe_bounds(minimum, maximum)
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r}: expected a whole number{bounds}") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise SettingsError(f"{name}={raw!r}: expected a whole number{bounds}")
        return value

    def seconds(self, name: str, default: float, *, allow_zero: bool = False, minimum: float = 0.0) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not ((allow_zero and value == 0) or (0 < value < float("inf") and value >= minimum)):
            what = "zero or a positive" if allow_zero else "a positive"
            at_least = f" of at least {minimum:g}" if minimum else ""
            raise SettingsError(f"{name}={raw!r}: expected {what} number of seconds{at_least}, e.g. 5 or 0.5")
        return value

    def host(self, name: str, default: str) -> str:
        value = self.text(name) or default
        if not _is_host(value):
            raise SettingsError(
                f"{name}={value!r}: expected an IP address or host name to listen on, e.g. 127.0.0.1 or 0.0.0.0"
            )
        return value

    def writable_dir(self, name: str) -> str | None:
        path = self.text(name)
        if path is not None and not (os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)):
            raise SettingsError(f"{name}={path!r}: expected an existing directory this user can write to")
        return path

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        """One of ``choices``, however the value is capitalised."""
        value = self.text(name) or default
        for choice in choices:
            if value.lower() == choice.lower():
                return choice
        raise SettingsError(f"{name}={value!r}: expected one of {', '.join(choices)}")

    def url(self, name: str, default: str) -> str:
        raw = self.text(name) or default
        given = f"{name}={raw!r}" if "@" not in raw else name  # user:password@ is not repeated
        refusal = f"{given}: expected an http(s) URL such as {DEFAULT_BASE_URL}"
        parts = _split_url(raw, refusal)
        if parts.scheme not in ("http", "https") or not _is_host(parts.hostname) or parts.query or parts.fragment:
            raise SettingsError(refusal)
        if parts.username is not None or parts.password is not None:
            # requests would send them as Basic auth in place of the key, and /healthz shows the netloc
            raise SettingsError(f"{name}: expected a URL without user:password@ (the key goes in OPENAI_API_KEY)")
        return raw.rstrip("/")

    def ca_bundle(self, *names: str) -> str | None:
        """The first of ``names`` that is set: a PEM file of the CA certificates an https upstream's
        certificate must chain to, instead of the bundled public ones."""
        for name in names:
            path = self.text(name)
            if path is None:
                continue
            expected = f"{name}={path!r}: expected a readable PEM file of CA certificates"
            if os.path.isdir(path):  # accepted by OpenSSL without a look inside, and useless unless hashed
                raise SettingsError(f"{expected}, not a directory (e.g. /etc/ssl/certs/ca-certificates.crt)")
            try:  # load it once here, so a wrong file fails start-up rather than every stream
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
            except (OSError, ssl.SSLError):
                raise SettingsError(expected) from None
            return path
        return None

    def redis_url(self, name: str) -> str | None:
        raw = self.text(name)
        if raw is None:
            return None
        refusal = f"{name}: expected a URL such as redis://host:6379/0"  # without the value: it may hold a password
        parts = _split_url(raw, refusal)
        if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
            raise SettingsError(refusal)
        if parts.scheme != "unix" and not parts.hostname:  # redis-py would take localhost:6379 unasked
            raise SettingsError(f"{refusal} (no host given)")
        # redis-py reads a database it cannot parse as 0, silently: another deployment's counts
        database = parts.path.strip("/") if parts.scheme != "unix" else ""
        databases = [database] if database else []
        databases += [value for key, value in parse_qsl(parts.query, keep_blank_values=True) if key == "db"]
        if any(not value.isdigit() for value in databases):
            raise SettingsError(f"{refusal} (the database is a number: /0, /3...)")
        return raw

    def origins(self, name: str) -> tuple[str, ...]:
        accepted = "origins such as https://app.example.com, or * for any, or leave it unset for same origin only"
        origins = self.csv(name, "origin", accepted)
        normalized = []
        for origin in origins:
            as_browsers_send = "*" if origin == "*" else normalize_origin(origin)
            if as_browsers_send is None:
                raise SettingsError(f"{name}: {origin!r} is not an origin; expected e.g. https://app.example.com or *")
            normalized.append(as_browsers_send)
        return tuple(normalized)

    def rate_limit(self, name: str) -> str | None:
        raw = self.text(name)
        if raw is None:
            return None
        refusal = f"{name}={raw!r}: expected limits like 20/minute;500/day, each allowing at least 1"
        try:
            items = limits.parse_many(raw)  # the parser Flask-Limiter will use, so the two cannot disagree
        except ValueError:
            raise SettingsError(refusal) from None
        if any(item.amount < 1 for item in items):  # 0/minute would refuse every request
            raise SettingsError(refusal)
        return raw


def _allowed_default_model(default_model: str | None, models: tuple[str, ...]) -> str | None:
    """``default_model``, when the allow-list has it: outside it every request that names no model
    would be refused with 403 model_not_allowed, so the mistake shows at start-up instead."""
    if default_model is not None and models and default_model not in models:
        allowed = ", ".join(map(repr, models))  # repr keeps the refusal one line, whatever the names hold
        raise SettingsError(
            f"RELAY_DEFAULT_MODEL={default_model!r} is not in RELAY_MODELS ({allowed}): "
            "expected one of those, or add it to RELAY_MODELS"
        )
    return default_model


_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(origin: str) -> str | None:
    """``origin`` as a browser sends it in an ``Origin`` header (scheme and host in lower case, no
    default port, no trailing slash), or None when it is not an http(s) origin."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme.lower() not in _DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        return None
    if parts.query or parts.fragment or parts.username is not None or parts.password is not None:
        return None
    scheme, host = parts.scheme.lower(), parts.hostname  # hostname is already lower case
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" if port in (None, _DEFAULT_PORTS[scheme]) else f"{scheme}://{host}:{port}"


def _is_host(value: str | None) -> bool:
    """An IP address or a host name: no spaces or URL punctuation. Underscores pass (container
    names), as do a final dot (a fully qualified name) and non-ASCII letters (IDNA)."""
    if not value:
        return False
    try:
        ipaddress.ip_address(value.strip("[]"))
        return True
    except ValueError:
        pass
    name = value[:-1] if value.endswith(".") else value
    if not name.isascii():
        try:  # as requests encodes it (IDNA 2008 with UTS 46), so a name it would refuse is refused here
            name = idna.encode(name, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            return False
    return _HOST_NAME.fullmatch(name) is not None


def _split_url(raw: str, refusal: str):
    """``raw``'s parts, or SettingsError(refusal) when it does not parse: a bracket left open, or a
    port that is not a number up to 65535 (``urlsplit`` checks the port only when it is asked for)."""
    try:
        parts = urlsplit(raw)
        parts.port
    except ValueError:
        raise SettingsError(refusal) from None
    return parts


def _describe_bounds(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum} to {maximum}"
    if minimum is not None:
        return f" of at least {minimum}"
    return ""
