"""The record of resumable answers: their events kept for a caller who lost its connection.

A resumable answer's events are appended here as the upstream sends them, numbered 1, 2, 3...,
and kept for ``RELAY_RESUME_SECONDS`` after the answer ends. ``RedisResumeStore`` keeps them in one
Redis Stream per answer, so any worker on any machine can replay them; ``MemoryResumeStore`` keeps
them in this process (gunicorn.conf.py then runs one worker). ``follow`` reads an answer back:
what was missed, then the live events to the end. Nothing here imports Flask.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import secrets
import time
from dataclasses import dataclass
from typing import Iterator

import gevent.event
import redis

log = logging.getLogger("chat_relay")

STREAM_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")  # secrets.token_urlsafe(16): 128 random bits
_LAST_EVENT_ID = re.compile(r"^([A-Za-z0-9_-]{22}):([0-9]{1,9})$")
SWEEP_SECONDS = 1.0  # how often the memory store forgets expired answers, at most
REDIS_BLOCK_SECONDS = 5.0  # one blocking read's wait; a follower re-checks the record after it
WRITE_RETRY_SECONDS = 1.0  # how long failed writes are sent again (their answers' callers wait) before they are lost
WRITE_RETRY_FIRST_PAUSE = 0.05  # doubling after each attempt
WRITE_TIMEOUT_SECONDS = 1.0  # one write's wait for Redis (a Redis that stopped answering costs no more)
DELETE_RETRY_PAUSE_SECONDS = 1.0  # between attempts to delete records while Redis refuses
# A follower whose reads of Redis keep failing this long is hung up on, so that its client resumes
# where Redis can be reached (a writer that cannot reach it gives up on the record after
# WRITE_RETRY_SECONDS, and the resume then gets 404 or 503).
FOLLOWER_OUTAGE_SECONDS = 5.0


def new_stream_id() -> str:
    """An unguessable id: knowing it is what lets a caller without an access token resume."""
    return secrets.token_urlsafe(16)


def parse_last_event_id(value: str | None, stream_id: str) -> int | None:
    """The sequence number in ``<stream id>:<seq>`` (0 when absent); None when it is not one of ours."""
    if not value:
        return 0
    match = _LAST_EVENT_ID.match(value.strip())
    if match is None or match.group(1) != stream_id:
        return None
    return int(match.group(2))


@dataclass(frozen=True)
class RecordInfo:
    owner: str  # the access token's hash, or "" when the relay has no access tokens
    last_seq: int


@dataclass
class Chunk:
    """What one read of a record gave: frames after the asked sequence, and the record's state."""

    frames: list[bytes]
    last_seq: int
    ended: bool
    exists: bool
    reachable: bool = True  # False: the store could not be read (Redis down); exists is then a guess


class MemoryResumeStore:
    """Records in this process's memory: exact for one worker, lost when it restarts."""

    outlives_the_worker = False

    def __init__(self, linger_seconds: float, live_seconds: float):
        self._linger = linger_seconds
        self._live = live_seconds  # how long a record whose writer went quiet is kept
        self._records: dict[str, _MemoryRecord] = {}
        self._swept_at = 0.0

    def create(self, owner: str) -> str | None:
        self._sweep()
        stream_id = new_stream_id()
        self._records[stream_id] = _MemoryRecord(owner, time.monotonic() + self._live)
        return stream_id

    def append(self, stream_id: str, frames: list[bytes], end: bool) -> bool:
        """Store an answer's next frames; returns False once its record is no longer being kept."""
        record = self._records.get(stream_id)
        if record is None:
            return False
        if record.ended or not frames:
            return True
        record.frames.extend(frames)
        record.ended = record.ended or end
        record.expires_at = time.monotonic() + (self._linger if end else self._live)
        changed, record.changed = record.changed, gevent.event.Event()
        changed.set()
        return True

    def info(self, stream_id: str) -> RecordInfo | None:
        record = self._get(stream_id)
        return None if record is None else RecordInfo(record.owner, len(record.frames))

    def read(self, stream_id: str, after: int, wait: float) -> Chunk:
        record = self._get(stream_id)
        if record is None:
            return Chunk([], after, False, False)
        record.seen = time.time()
        if len(record.frames) <= after and not record.ended:
            record.changed.wait(wait)
            if self._records.get(stream_id) is not record:  # discarded meanwhile
                return Chunk([], after, False, False)
        frames = record.frames[after:]
        return Chunk(frames, after + len(frames), record.ended, True)

    def status(self, stream_id: str) -> tuple[float | None, bool]:
        """When a follower last read the answer (wall clock), and whether it is to stop."""
        record = self._records.get(stream_id)
        return (None, True) if record is None else (record.seen, record.cancelled)

    def cancel(self, stream_id: str) -> None:
        record = self._records.get(stream_id)
        if record is not None:
            record.cancelled = True

    def discard(self, stream_id: str) -> None:
        record = self._records.pop(stream_id, None)
        if record is not None:
            record.changed.set()

    def _get(self, stream_id: str):
        record = self._records.get(stream_id)
        if record is not None and record.expires_at <= time.monotonic():
            self.discard(stream_id)
            return None
        return record

    def _sweep(self) -> None:
        now = time.monotonic()
        if now - self._swept_at < SWEEP_SECONDS:
            return
        self._swept_at = now
        for stream_id in [key for key, record in self._records.items() if record.expires_at <= now]:
            self.discard(stream_id)


class _MemoryRecord:
    __slots__ = ("owner", "frames", "ended", "expires_at", "changed", "seen", "cancelled")

    def __init__(self, owner: str, expires_at: float):
        self.owner = owner
        self.frames: list[bytes] = []
        self.ended = False
        self.expires_at = expires_at
        self.changed = gevent.event.Event()  # set, and replaced, whenever frames arrive
        self.seen: float | None = None  # wall-clock time a follower last read
        self.cancelled = False


class RedisResumeStore:
    """Records in Redis, one Stream per answer, so a resume may land on any worker or machine.

    Entry ids are ``0-<seq>``, so "the events after seq N" is Redis's own ``XREAD ... 0-N``; the
    last entry of a finished answer carries an ``end`` field. The owner and when a follower last
    read live in a hash beside it. Both keys expire: ``RELAY_RESUME_SECONDS`` after the end, or a
    while after the last append if the writing relay died.

    Appends are group-committed: one greenlet per worker sends everything the worker's answers
    appended meanwhile as one pipeline, and each ``append`` returns once its events are stored. So a
    caller never receives an event before it is in the record, and under load one round-trip
    carries the events of many answers. Each answer's part of a pipeline is one script that stores
    only the frames its record lacks, so a pipeline that failed, wholly or in part, is simply sent
    again; if Redis still fails after ``WRITE_RETRY_SECONDS``, the answers waiting on it go on
    unrecorded and their records are deleted as soon as Redis takes it (resumes then get 404,
    followers the lost frame).
    """

    outlives_the_worker = True

    def __init__(self, url: str, linger_seconds: float, live_seconds: float, max_connections: int = 100):
        # Each pool holds as many connections as streams may use at once (a follower holds one for
        # its blocking read): redis-py refuses the one past the pool's size, which would read as
        # Redis down.
        self._redis = redis.Redis.from_url(
            url, socket_timeout=REDIS_BLOCK_SECONDS + 5, socket_connect_timeout=2, max_connections=max_connections
        )
        # Writes have their own connections, with a short timeout: a write can be sent again safely,
        # and an answer's caller waits for it (followers' blocking reads need the long one).
        self._writer = redis.Redis.from_url(
            url,
            socket_timeout=WRITE_TIMEOUT_SECONDS,
            socket_connect_timeout=WRITE_TIMEOUT_SECONDS,
            max_connections=max_connections,
        )
        self._linger = max(1, round(linger_seconds))
        self._live = max(1, round(live_seconds))
        self._seqs: dict[str, int] = {}  # the next sequence number of each answer this process writes
        self._renewed: dict[str, float] = {}  # when each answer's keys last had their expiry pushed back
        self._waiting: dict[str, _Batch] = {}  # an answer's write that was in flight when its wait was interrupted
        self._doomed: dict[str, float] = {}  # records to delete, until when (after that they have expired anyway)
        self._batch = _Batch()
        self._committer = None
        self._wake = gevent.event.Event()  # wakes a committer waiting to send deletions again
        self._failing_since: float | None = None  # when writes started failing; None while they succeed
        self._failed_at = 0.0  # the last failed attempt
        self._deletions_refused = False  # the last attempt left deletions undone: wait before the next
        self._script_loaded = False
        self._touch = self._redis.register_script(_TOUCH)

    @staticmethod
    def _keys(stream_id: str) -> tuple[str, str]:
        return f"chat-relay:resume:{stream_id}", f"chat-relay:resume:{stream_id}:info"

    def create(self, owner: str) -> str | None:
        stream_id = new_stream_id()
        _, info = self._keys(stream_id)
        try:
            with self._writer.pipeline(transaction=True) as pipe:  # never a key without its expiry
                pipe.hset(info, mapping={"owner": owner})
                pipe.expire(info, self._live)
                pipe.execute()
        except redis.RedisError:
            log.warning("Redis unavailable: this answer is not resumable")
            return None
        self._seqs[stream_id] = 1
        self._renewed[stream_id] = -math.inf  # the first append sets the events' expiry
        return stream_id

    def append(self, stream_id: str, frames: list[bytes], end: bool) -> bool:
        """Store an answer's next frames; returns False once its record is no longer being kept."""
        interrupted = self._waiting.get(stream_id)
        if interrupted is not None and not self._settled(stream_id, interrupted):
            return False  # a stop landed while the answer waited: its frames are not delivered unstored
        if not frames:
            return True
        seq = self._seqs.get(stream_id)
        if seq is None:
            return False  # ended, discarded, or lost
        events, info = self._keys(stream_id)
        ttl = 0  # leave the keys' expiry as it is
        now = time.monotonic()
        if end or now - self._renewed[stream_id] > self._live / 4:  # not every event: an answer lasts minutes
            self._renewed[stream_id] = now
            ttl = self._linger if end else self._live
        command = ("EVALSHA", _APPEND_SHA, 2, events, info, seq, 1 if end else 0, ttl, *frames)
        self._batch.writes.append((stream_id, command))
        self._seqs[stream_id] = seq + len(frames)
        if end:
            self._forget(stream_id)
        return self._settled(stream_id, self._commit_soon())

    def _settled(self, stream_id: str, batch: _Batch) -> bool:
        """Wait until ``batch`` is sent; whether this answer's write in it was stored."""
        self._waiting[stream_id] = batch
        batch.done.wait()  # a stop raised here leaves the entry: the answer's next append waits again
        self._waiting.pop(stream_id, None)
        if stream_id in batch.lost:
            log.warning("Redis unavailable: stopped recording a resumable answer, and dropped its record")
            self.discard(stream_id)  # a record with a hole would refuse or stall resumes: none is clearer
            return False
        return True

    def discard(self, stream_id: str) -> None:
        """Delete the record: with the next batch, after any of its writes still waiting, and again
        until Redis takes it (or the record has expired by itself)."""
        self._forget(stream_id)
        self._doomed[stream_id] = time.monotonic() + max(self._live, self._linger)
        self._commit_soon()

    def _forget(self, stream_id: str) -> None:
        self._seqs.pop(stream_id, None)
        self._renewed.pop(stream_id, None)
        self._waiting.pop(stream_id, None)

    def _commit_soon(self) -> _Batch:
        """Make sure the committer will send the batch being filled; returns that batch."""
        if self._committer is None or self._committer.dead:
            self._committer = gevent.spawn(self._commit_forever)
        else:
            self._wake.set()
        return self._batch

    def _commit_forever(self) -> None:
        """Send batches, and the deletions Redis has not taken yet, until none is left.

        A batch that fails is sent again until ``WRITE_RETRY_SECONDS`` after writes started failing,
        so a Redis blip leaves every record whole; the answers still unstored then are lost. While
        writes keep failing, each later batch gets one attempt, so no caller waits a second window.
        Deletions Redis refused are tried again every ``DELETE_RETRY_PAUSE_SECONDS``, or sooner
        with the next batch.
        """
        try:
            while True:
                if not self._batch.writes and self._deletions_refused:
                    self._wake.wait(DELETE_RETRY_PAUSE_SECONDS)  # set by any write or discard since the last send
                now = time.monotonic()
                for stream_id in [key for key, until in self._doomed.items() if until <= now]:
                    del self._doomed[stream_id]  # expired by itself meanwhile
                if not self._batch.writes and not self._doomed:
                    return
                self._wake.clear()
                batch, self._batch = self._batch, _Batch()
                unsent: list[tuple[str, tuple]] = batch.writes
                try:
                    unsent = self._send_until_stored(batch)
                except Exception:
                    log.exception("recording resumable answers failed")
                    self._deletions_refused = True  # pause before the next attempt, rather than spin
                finally:
                    batch.lost.update(stream_id for stream_id, command in unsent if not _deletes(command))
                    batch.done.set()
        finally:
            self._failing_since = None  # an episode is judged afresh by the next committer
            self._deletions_refused = False

    def _send_until_stored(self, batch: _Batch) -> list[tuple[str, tuple]]:
        """Send the batch and the pending deletions, again while Redis fails and time allows; returns
        the writes never stored."""
        doomed = list(self._doomed)
        writes = batch.writes + [(stream_id, ("DEL", *self._keys(stream_id))) for stream_id in doomed]
        now = time.monotonic()
        if self._failing_since is not None and now - self._failed_at > WRITE_RETRY_SECONDS + DELETE_RETRY_PAUSE_SECONDS:
            self._failing_since = None  # nothing failed for a while: that episode is over
        give_up_at = (now if self._failing_since is None else self._failing_since) + WRITE_RETRY_SECONDS
        pause = WRITE_RETRY_FIRST_PAUSE
        while True:
            attempted_at = time.monotonic()
            writes = self._send(writes, batch.lost)
            now = time.monotonic()
            if not writes:
                self._failing_since = None
                break
            self._failed_at = now
            if self._failing_since is None:
                self._failing_since = attempted_at
            if now >= give_up_at:
                break
            gevent.sleep(min(pause, give_up_at - now))
            pause *= 2
        undeleted = {stream_id for stream_id, command in writes if _deletes(command)}
        for stream_id in doomed:
            if stream_id not in undeleted:
                self._doomed.pop(stream_id, None)
        self._deletions_refused = bool(undeleted)
        return writes

    def _send(self, writes: list[tuple[str, tuple]], lost: set[str], reloaded: bool = False) -> list[tuple[str, tuple]]:
        """Send ``writes`` as one pipeline; returns those to send again. Answers whose record is
        gone, or would have a hole, go into ``lost``. Sending a write twice stores it once."""
        try:
            if not self._script_loaded:
                self._writer.script_load(_APPEND)
                self._script_loaded = True
            with self._writer.pipeline(transaction=False) as pipe:
                for _, command in writes:
                    pipe.execute_command(*command)
                replies = pipe.execute(raise_on_error=False)
        except redis.RedisError:
            return writes
        unsent, unscripted = [], []
        for write, reply in zip(writes, replies):
            if isinstance(reply, redis.exceptions.NoScriptError):  # Redis restarted, or its scripts were flushed
                unscripted.append(write)
            elif isinstance(reply, Exception):
                unsent.append(write)
            elif not _deletes(write[1]) and reply != 1:
                lost.add(write[0])
        if unscripted:
            self._script_loaded = False
            unsent += unscripted if reloaded else self._send(unscripted, lost, reloaded=True)  # not a failure
        return unsent

    def info(self, stream_id: str) -> RecordInfo | None:
        events, info = self._keys(stream_id)
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                pipe.hget(info, "owner")
                pipe.xrevrange(events, count=1)
                owner, last = pipe.execute()
        except redis.RedisError:
            log.warning("Redis unavailable: cannot resume an answer")
            raise StoreUnavailable() from None
        if owner is None:
            return None
        return RecordInfo(owner.decode(), _seq_of(last[0][0]) if last else 0)

    def read(self, stream_id: str, after: int, wait: float) -> Chunk:
        events, info = self._keys(stream_id)
        try:
            exists, ended = self._touch(keys=[info], args=["seen", time.time()])
            if not exists:
                return Chunk([], after, False, False)
            # An ended answer's events are all there: wait for nothing (the caller may have them all).
            block = None if ended else max(1, int(min(wait, REDIS_BLOCK_SECONDS) * 1000))
            reply = self._redis.xread({events: f"0-{after}"}, block=block)
            if ended and not reply and not self._redis.exists(events):
                # The events expired between the two reads (both keys expire at the same second):
                # the record is gone, and a clean end here would be one without `done` or `error`.
                return Chunk([], after, False, False)
        except redis.RedisError:
            log.warning("Redis unavailable while following a resumed answer")
            gevent.sleep(min(wait, 1.0))  # often enough to notice FOLLOWER_OUTAGE_SECONDS on time
            return Chunk([], after, False, True, reachable=False)  # try again: the record may still be there
        entries = reply[0][1] if reply else []
        frames = [fields[b"f"] for _, fields in entries]
        ended = bool(ended) or (bool(entries) and b"end" in entries[-1][1])
        return Chunk(frames, _seq_of(entries[-1][0]) if entries else after, ended, True)

    def status(self, stream_id: str) -> tuple[float | None, bool]:
        """When a follower last read the answer (wall clock), and whether it is to stop."""
        _, info = self._keys(stream_id)
        try:
            owner, seen, cancelled = self._redis.hmget(info, ["owner", "seen", "cancelled"])
        except redis.RedisError:
            return time.time(), False  # cannot tell: keep the answer going rather than cancel it
        if owner is None:
            return None, True  # the record is gone (expired, or discarded by another relay)
        return (float(seen) if seen else None), bool(cancelled)

    def cancel(self, stream_id: str) -> None:
        _, info = self._keys(stream_id)
        try:
            self._touch(keys=[info], args=["cancelled", 1])
        except redis.RedisError:
            log.warning("Redis unavailable: could not cancel a resumable answer")


class StoreUnavailable(Exception):
    """The resume store cannot be reached: whether the answer exists is unknown."""


# Set a field of an answer's info hash only if the answer still exists (HSET alone would recreate
# an expired one, without expiry); returns whether it exists and whether it has ended.
_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return {1, redis.call('HEXISTS', KEYS[1], 'ended')}
"""


# Append one answer's frames from sequence ARGV[1] on, only those its record lacks, so sending the
# same append twice (after a reply was lost) stores it once. ARGV[2] is 1 when the last frame ends
# the answer, ARGV[3] the keys' new expiry (0: unchanged). Returns 1, or 0 when the record is gone
# or would get a hole: the writer then stops recording that answer.
_APPEND = """
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
local first = tonumber(ARGV[1])
local count = #ARGV - 3
local stored = 0
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if top then stored = tonumber(string.match(top[1], '%d+$')) end
if stored < first - 1 then return 0 end
for index = stored - first + 2, count do
    if index == count and ARGV[2] == '1' then
        redis.call('XADD', KEYS[1], '0-' .. (first + index - 1), 'f', ARGV[3 + index], 'end', '1')
    else
        redis.call('XADD', KEYS[1], '0-' .. (first + index - 1), 'f', ARGV[3 + index])
    end
end
local ttl = tonumber(ARGV[3])
if ttl > 0 then
    redis.call('EXPIRE', KEYS[1], ttl)
    redis.call('EXPIRE', KEYS[2], ttl)
end
if ARGV[2] == '1' then redis.call('HSET', KEYS[2], 'ended', 1) end
return 1
"""
_APPEND_SHA = hashlib.sha1(_APPEND.encode()).hexdigest()


class _Batch:
    """Writes waiting for the next pipeline, each with its answer's id, and which answers it lost."""

    __slots__ = ("writes", "done", "lost")

    def __init__(self):
        self.writes: list[tuple[str, tuple]] = []
        self.done = gevent.event.Event()
        self.lost: set[str] = set()


def _deletes(command: tuple) -> bool:
    """Whether a write is a record's deletion (the others are appends)."""
    return command[0] == "DEL"


def _seq_of(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[1])


class StreamRecording:
    """One answer's handle on the store, as its ``RelayStream`` uses it."""

    def __init__(self, store, stream_id: str, linger_seconds: float, follower_poll_seconds: float):
        self.store = store
        self.stream_id = stream_id
        self.linger_seconds = linger_seconds
        self.follower_poll_seconds = follower_poll_seconds  # a following resume reads at least this often
        self.lost = False  # the store stopped keeping the record (Redis failed): nobody can resume it

    def append(self, frames: list[bytes], end: bool = False) -> None:
        if not self.lost and not self.store.append(self.stream_id, frames, end):
            self.lost = True

    def status(self) -> tuple[float | None, bool]:
        """When a follower last read the answer, and whether it is to stop (as the store says)."""
        if self.lost:
            return None, True  # a detached answer nobody can resume has nobody to go on for
        return self.store.status(self.stream_id)

    def is_followed(self, seen: float | None) -> bool:
        """Whether a resume is following the answer now, given when one last read it (``status()``)."""
        return seen is not None and time.time() - seen < self.follower_poll_seconds + 1.0

    @property
    def outlives_the_worker(self) -> bool:
        """Whether a resume can still find the record once this worker has exited."""
        return self.store.outlives_the_worker

    def discard(self) -> None:
        self.store.discard(self.stream_id)


def follow(
    store, stream_id: str, after: int, *, poll_seconds: float, heartbeat: float, lost_frame: bytes, ping: bytes
) -> Iterator[bytes]:
    """An answer's events after sequence ``after``, then its live ones, until its last event.

    Each read waits at most ``poll_seconds`` and marks the answer as followed, so the relay writing
    it keeps it going. Yields ``ping`` when nothing arrived for ``heartbeat`` seconds (which is
    also how a follower whose caller left finds out: the write fails), and ``lost_frame`` if the
    record disappears before its end (the relay writing it died, or gave up on it). Raises
    StoreUnavailable when the store's reads keep failing for FOLLOWER_OUTAGE_SECONDS.
    """
    quiet_since = time.monotonic()
    unreachable_since = None
    while True:
        chunk = store.read(stream_id, after, poll_seconds)
        if chunk.reachable:
            unreachable_since = None
        elif unreachable_since is None:
            unreachable_since = time.monotonic()
        elif time.monotonic() - unreachable_since >= FOLLOWER_OUTAGE_SECONDS:
            raise StoreUnavailable()  # the answer may go on where the store is reachable: hang up, not fail
        if chunk.frames:
            after = chunk.last_seq
            quiet_since = time.monotonic()
            yield b"".join(chunk.frames)
        if chunk.ended:
            return
        if not chunk.exists:
            yield lost_frame
            return
        if time.monotonic() - quiet_since >= heartbeat:
            quiet_since = time.monotonic()
            yield ping
