"""The Redis engine (``FLOW_ENGINE=redis``): publishers and WebSocket servers on any hosts.

There is no proxy process: Redis numbers, keeps and fans out every message. Per stream
(``P`` is FLOW_REDIS_PREFIX; a stream is a username or ``*``):

- ``P:meta:<stream>``, a hash: ``seq`` (the last number given), ``epoch``, and ``rid``, the
  run id of the Redis server that last wrote it;
- ``P:hist:<stream>``, a Redis Stream: the history, one entry per message with id
  ``<seq>-0`` and fields ``t`` (Redis time, ms) and ``f`` (the browser frame's JSON),
  capped at FLOW_HISTORY_SIZE entries, expiring FLOW_HISTORY_TTL after the last message;
- ``P:msg:<stream>``, a pub/sub channel: ``<seq> <epoch> <frame JSON>`` for every message.

Every publish is one script call (PUBLISH_SCRIPT) for a batch of pushes: each is numbered,
appended and published atomically, so a WebSocket server that reads a position and then
hears the channel sees every later message exactly once.

Epochs change exactly when numbering may have been lost or rolled back: when the stream's
hash is missing (never written, expired, or lost with Redis's data), or when Redis's run
id differs from the one that wrote it and Redis does not fsync every write (a restart
restored an older snapshot, or lost the last second of an ``everysec`` AOF). A Redis with
``appendonly yes`` and ``appendfsync always`` keeps epochs across its restarts; the engine
checks that with CONFIG GET when it connects and tells the scripts the run id it checked.

Pushes are never applied twice: each publisher numbers its pushes under a random id, and
the script skips what that publisher's counter (``P:pub:<id>``) says is already applied, so
a batch resent after a lost reply adds nothing.

Redis pub/sub is at-most-once. The server side never trusts it alone: it reads each
stream's position after its subscription is confirmed, the hub checks every seq and audits
positions, and a pub/sub link that stops carrying this server's own probes is replaced,
after which every stream's position is read again (the hub repairs from history what was
missed). One Redis (or a primary with replicas) only: the scripts touch several streams'
keys, which Redis Cluster does not allow.

Presence and occupancy (``P:pres:...``, JOIN/LEAVE on the channels above) are a third
script's, PRESENCE_SCRIPT: see the presence section at the end of this file.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import math
import random
import re
import secrets
import threading
import time
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import orjson
import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from .. import protocol
from ..engine import EngineSink, Position, QueueFull, Receipt, StreamHistory, Unavailable
from ..presence import Key, Ledger, PresenceEvent, Snapshot, renew_interval
from ..runtime import Throttled
from ..settings import Settings, redact_url

log = logging.getLogger("flow.engine.redis")

# Pushes per publish script call, and about how many bytes: a call is atomic, so a big one
# holds Redis (and every other client) for its duration.
PUBLISH_BATCH = 256
PUBLISH_BATCH_BYTES = 512 * 1024
# Seconds between reconnect attempts, growing to the cap while Redis stays away.
RECONNECT_FIRST = 0.05
# After a reconnect, how long presence waits for the channels to be subscribed again.
RESUBSCRIBED_WAIT = 5.0
RECONNECT_CAP = 2.0
# Socket timeouts: a command (or connect) that takes longer means the link is gone.
COMMAND_TIMEOUT = 5.0
# How long a publisher's counter is remembered: a retry comes within seconds.
PUBLISHER_TTL = 86400
# How long a confirmed push's receipt is kept (P:rcpt:<publisher>:<counter>), for a call
# resent after its reply was lost: the resend finds the receipt of what it had applied.
RECEIPT_TTL = 120
# A stream's hash outlives its history (and is refreshed while any server receives the
# stream), so that a user idle longer than FLOW_HISTORY_TTL keeps the epoch its open
# sockets hold; a stream nobody receives nor pushes to is forgotten after this.
META_TTL = 7 * 86400
TOUCH_INTERVAL = 3600.0
# Channels per SUBSCRIBE command, and streams per read script call.
SUBSCRIBE_CHUNK = 500
READ_CHUNK = 500
# Messages handled per turn of the event loop.
BATCH = 1000
# Live messages a subscription holds while its position is read, at most: past it they
# are dropped, and the hub finds the gap (the next seq, or its audit) and repairs it.
HOLD_MAX = 10_000
# Seconds before asking again for positions Redis did not give.
POSITIONS_RETRY = 0.5
# Bad input from Redis is warned about at most once per this many seconds.
WARNING_INTERVAL = 30.0

# The part of both scripts that finds a stream's epoch, starting a new one when its
# numbering may have been lost (see the module docstring). ``rid``, ``durable``, ``seed``.
_NORMALIZE = r"""
local function normalize(mkey, hkey, fresh)
  local m = redis.call('HMGET', mkey, 'seq', 'epoch', 'rid')
  local seq, epoch = tonumber(m[1]), m[2]
  if seq == nil or not epoch or (m[3] ~= rid and not durable) then
    seq, epoch = 0, fresh
    changes = changes + 1
    redis.call('DEL', hkey)
    redis.call('HSET', mkey, 'seq', 0, 'epoch', epoch, 'rid', rid)
  elseif m[3] ~= rid then
    redis.call('HSET', mkey, 'rid', rid)
  end
  redis.call('PEXPIRE', mkey, meta_ttl)
  return seq, epoch
end
"""

_PREAMBLE = r"""
local prefix = ARGV[1]
local rid = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
-- ARGV[2] is "<run id>:<1 if it fsyncs every write, else 0>" as the caller checked it; a
-- check of another run (Redis restarted since) must be made again before anything is done.
local checked, fsyncs = string.match(ARGV[2], '^(%x+):([01])$')
if checked ~= rid then
  return redis.error_reply('FLOWSTALE the persistence check is for another Redis run')
end
local durable = (fsyncs == '1')
local meta_ttl = tonumber(ARGV[3])
local seed = ARGV[4]
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
-- The change mark (ServerEngine.mark): P:mark counts messages numbered and epochs started;
-- with the run id (a restart) and the hash's own id (a flush), a value never seen twice.
local changes = 0
local function bump_mark()
  if changes > 0 and redis.call('HINCRBY', prefix .. ':mark', 'n', changes) == changes then
    redis.call('HSET', prefix .. ':mark', 'id', seed)
  end
  changes = 0
end
"""

# current_mark(run id, key prefix): the change mark as the scripts leave it, read at the
# end of the read script and by the server's probe.
_MARK = r"""
local function current_mark(run_id, key_prefix)
  local m = redis.call('HMGET', key_prefix .. ':mark', 'id', 'n')
  return run_id .. ':' .. (m[1] or '-') .. ':' .. (m[2] or '0')
end
"""

# ARGV: prefix, persistence token, meta ttl (ms), epoch seed, history size, history ttl (ms),
# publisher id, first counter, then (stream, head) pairs; a head is the browser frame up to
# its data, or for a confirmed push (flow.push(..., confirm=True)) \1, its deadline in
# Redis's clock (ms), a space and that (past the deadline when the script runs: not
# published, receipt seq -1), or \2 alone for a confirmed push that missed its deadline
# before the call (a no-op that keeps the counters in step).
# Returns {how many pushes were applied (the rest had been, by an earlier call), then per
# confirmed push in order: seq, epoch, online} (seq 0: an earlier call applied it and its
# receipt is gone). ``online``: the stream's sockets over every server (P:pres:online,
# kept by PRESENCE_SCRIPT), when it was dispatched.
PUBLISH_SCRIPT = "#!lua\n" + _PREAMBLE + _NORMALIZE + r"""
local size, ttl = tonumber(ARGV[5]), tonumber(ARGV[6])
local pkey = prefix .. ':pub:' .. ARGV[7]
local rkey = prefix .. ':rcpt:' .. ARGV[7] .. ':'
local first = tonumber(ARGV[8])
local count = (#ARGV - 8) / 2
local done = tonumber(redis.call('GET', pkey) or '0')
local applied = 0
local receipts = {0}
-- Each stream's hash is read once per call and written once at its end (the call is
-- atomic): a batch holds many pushes to the same few streams.
local streams, order = {}, {}
for i = 0, count - 1 do
  local stream, head = ARGV[9 + 2 * i], ARGV[10 + 2 * i]
  local kind = string.byte(head, 1)
  if first + i <= done then
    -- applied by an earlier call; a confirmed push's receipt was kept for this
    if kind == 1 then
      local kept = redis.call('GET', rkey .. (first + i))
      if kept then
        local seq, epoch, online = string.match(kept, '^(%d+) (%S+) (%d+)$')
        receipts[#receipts + 1] = tonumber(seq)
        receipts[#receipts + 1] = epoch
        receipts[#receipts + 1] = tonumber(online)
      else
        receipts[#receipts + 1] = 0
        receipts[#receipts + 1] = ''
        receipts[#receipts + 1] = 0
      end
    end
  elseif kind == 2 then
    applied = applied + 1
  elseif kind == 1 and now_ms > tonumber(string.sub(head, 2, string.find(head, ' ', 2, true) - 1)) then
    -- a confirmed push run after its deadline (Redis stalled): its caller was told it is
    -- unavailable, so it is not published; kept in the counters like a no-op
    applied = applied + 1
    receipts[#receipts + 1] = -1
    receipts[#receipts + 1] = ''
    receipts[#receipts + 1] = 0
  elseif kind == 0 then
    -- a command (flow.disconnect): for the sockets open now, outside the numbering
    redis.call('PUBLISH', prefix .. ':msg:' .. stream, 'cmd ' .. string.sub(head, 2))
    applied = applied + 1
  else
    if kind == 1 then head = string.sub(head, string.find(head, ' ', 2, true) + 1) end
    local s = streams[stream]
    if s == nil then
      local mkey, hkey = prefix .. ':meta:' .. stream, prefix .. ':hist:' .. stream
      local seq, epoch = normalize(mkey, hkey, seed .. string.format('%x', first + i))
      s = {seq = seq, epoch = epoch, mkey = mkey, hkey = hkey, channel = prefix .. ':msg:' .. stream}
      streams[stream] = s
      order[#order + 1] = s
    end
    local seq = s.seq + 1
    s.seq = seq
    local frame = head .. ',"seq":' .. seq .. ',"epoch":"' .. s.epoch .. '"}'
    if size > 0 and ttl > 0 then
      redis.call('XADD', s.hkey, 'MAXLEN', size, seq .. '-0', 't', now_ms, 'f', frame)
    end
    redis.call('PUBLISH', s.channel, seq .. ' ' .. s.epoch .. ' ' .. frame)
    applied = applied + 1
    changes = changes + 1
    if kind == 1 then
      local online = tonumber(redis.call('HGET', prefix .. ':pres:online', stream) or '0')
      redis.call('SET', rkey .. (first + i), seq .. ' ' .. s.epoch .. ' ' .. online, 'EX', """ + str(RECEIPT_TTL) + r""")
      receipts[#receipts + 1] = seq
      receipts[#receipts + 1] = s.epoch
      receipts[#receipts + 1] = online
    end
  end
end
for _, s in ipairs(order) do
  redis.call('HSET', s.mkey, 'seq', s.seq)
  if size > 0 and ttl > 0 then
    redis.call('PEXPIRE', s.hkey, ttl)
  end
end
if first + count - 1 > done then
  redis.call('SET', pkey, first + count - 1, 'EX', """ + str(PUBLISHER_TTL) + r""")
end
bump_mark()
receipts[1] = applied
return receipts
"""

# ARGV: prefix, persistence token, meta ttl (ms), epoch seed, max bytes, history ttl (ms),
# then (stream, seq, epoch) triples. Per stream, flat: epoch, head seq, n, then n frames;
# n is -1 when what is owed cannot all be given (another epoch, beyond the head, evicted,
# expired). Streams never written get a hash (seq 0, a new epoch), so that the position a
# server reports is the numbering the first message will carry. Last, the change mark.
READ_SCRIPT = "#!lua\n" + _PREAMBLE + _NORMALIZE + _MARK + r"""
local max_bytes, ttl = tonumber(ARGV[5]), tonumber(ARGV[6])
local out = {}
for i = 7, #ARGV, 3 do
  local stream, since, want = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local mkey, hkey = prefix .. ':meta:' .. stream, prefix .. ':hist:' .. stream
  local head, epoch = normalize(mkey, hkey, seed .. string.format('%x', i))
  out[#out + 1] = epoch
  out[#out + 1] = head
  if epoch ~= want or since > head then
    out[#out + 1] = -1
  elseif since == head then
    out[#out + 1] = 0
  else
    local first = redis.call('XRANGE', hkey, (since + 1) .. '-0', (since + 1) .. '-0')
    if #first == 0 or tonumber(first[1][2][2]) < now_ms - ttl then
      out[#out + 1] = -1
    elseif max_bytes <= 0 then
      out[#out + 1] = 0
    else
      local at = #out + 1
      out[at] = 0
      local total, n, cursor = 0, 0, since + 1
      while total < max_bytes and cursor <= head do
        local entries = redis.call('XRANGE', hkey, cursor .. '-0', '+', 'COUNT', 64)
        if #entries == 0 then break end
        for _, entry in ipairs(entries) do
          if entry[1] ~= cursor .. '-0' then total = max_bytes break end
          local frame = entry[2][4]
          out[#out + 1] = frame
          n = n + 1
          -- counted as the WebSocket frame the server makes of it, as max_bytes is
          local size = #frame
          if size < 126 then size = size + 2 elseif size < 65536 then size = size + 4 else size = size + 10 end
          total = total + size
          cursor = cursor + 1
          if total >= max_bytes then break end
        end
      end
      out[at] = n
    end
  end
end
bump_mark()
out[#out + 1] = current_mark(rid, prefix)
return out
"""

# The server's probe: publish to its own channel (that the link carries it back says the
# link hears), and answer the change mark. ARGV: prefix, probe channel, probe payload.
# allow-oom, allow-stale: Redis runs it while it refuses writes (full under noeviction) and
# on a stale replica, as it ran the plain PUBLISH this replaces; the probe must not fail
# the link then. (Not no-writes: a read-only script may not PUBLISH.)
PROBE_SCRIPT = "#!lua flags=allow-oom,allow-stale\n" + _MARK + r"""
local rid = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
redis.call('PUBLISH', ARGV[2], ARGV[3])
return current_mark(rid, ARGV[1])
"""


def _epoch_seed() -> str:
    # Hex only: epochs are spliced into JSON unescaped and end at a space on the channel.
    return secrets.token_hex(5) + "-"


def persistence_token(client: redis.Redis) -> str:
    """``"<run id>:1"`` if the Redis behind ``client`` fsyncs every write (AOF with
    ``appendfsync always``), else ``"<run id>:0"``: the scripts' ARGV[2]. CONFIG may be
    renamed away or refused (a managed Redis): then not durable, which is the safe side."""
    run_id = str(client.info("server")["run_id"])
    try:
        durable = bool(client.info("persistence").get("aof_enabled")) and (
            client.config_get("appendfsync").get("appendfsync") == "always")
    except redis.ResponseError:
        durable = False
    return f"{run_id}:{int(durable)}"


async def async_persistence_token(client: redis.asyncio.Redis) -> str:
    """:func:`persistence_token` for the asyncio client."""
    run_id = str((await client.info("server"))["run_id"])
    try:
        durable = bool((await client.info("persistence")).get("aof_enabled")) and (
            (await client.config_get("appendfsync")).get("appendfsync") == "always")
    except redis.ResponseError:
        durable = False
    return f"{run_id}:{int(durable)}"


def is_stale(exc: redis.ResponseError) -> bool:
    """Whether a script refused because Redis restarted since the persistence check."""
    return str(exc).startswith("FLOWSTALE")


_CLIENT_OPTIONS: dict[str, Any] = {
    "socket_timeout": COMMAND_TIMEOUT,
    "socket_connect_timeout": COMMAND_TIMEOUT,
    "protocol": 2,
    "decode_responses": False,
}


def sync_client(url: str, timeout: float = COMMAND_TIMEOUT) -> redis.Redis:
    """A client that never retries by itself: a retried publish is the engine's decision
    (with its idempotency counter), never redis-py's."""
    options = {**_CLIENT_OPTIONS, "socket_timeout": timeout, "socket_connect_timeout": timeout}
    return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **options)


def async_client(url: str, retries: int = 1) -> redis.asyncio.Redis:
    return redis.asyncio.Redis.from_url(url, retry=AsyncRetry(NoBackoff(), retries), **_CLIENT_OPTIONS)


def link_problem(url: str, timeout: float = 2.0) -> str | None:
    """What stops the engine from using the Redis at ``url`` (connect, TLS, AUTH, PING,
    a refused script), in one line without the password; None when it works."""
    client = sync_client(url, timeout)
    try:
        client.ping()
        client.register_script(READ_SCRIPT)(keys=[], args=["flow-check", persistence_token(client), 1000, "x", 0, 0])
        try:
            policy = client.config_get("maxmemory-policy").get("maxmemory-policy", "noeviction")
        except redis.ResponseError:
            policy = "noeviction"  # CONFIG refused (a managed Redis): not ours to check
        if policy != "noeviction":
            return (f"Redis at {redact_url(url)} may evict keys (maxmemory-policy {policy}): an "
                    "evicted stream would be renumbered; set maxmemory-policy noeviction")
    except redis.ResponseError as exc:
        return f"Redis at {redact_url(url)} refuses the engine: {exc}"
    except (redis.RedisError, OSError, ValueError) as exc:
        return f"Redis at {redact_url(url)} is not reachable: {type(exc).__name__}: {exc}"
    finally:
        client.close()
    return None


# ============================================================== the publisher's side


@functools.lru_cache(maxsize=4096)
def _frame_head(stream: bytes) -> bytes:
    return b',"username":' + protocol.dumps(stream.decode("utf-8")) + b',"data":'


@functools.lru_cache(maxsize=4096)
def stream_key(stream: str) -> bytes:
    """How a stream is named in Redis keys and channels: ``u:<username>``, ``*`` for
    broadcasts; other kinds of stream (channels) get other prefixes, so no name can take
    another kind's keys."""
    if stream == protocol.BROADCAST:
        return b"*"
    if protocol.is_channel_stream(stream):
        return b"ch:" + stream[1:].encode("ascii")
    return b"u:" + stream.encode("utf-8")


def frame_parts(frame: bytes) -> tuple[bytes, bytes]:
    """A push frame (``protocol.encode_push``, made by this process and so trusted) as
    (stream key, head): the browser frame up to and including its data, without seq and
    epoch. A command (``protocol.encode_command``) is (its user's key, NUL + its JSON)."""
    if frame.startswith(protocol.COMMAND_PREFIX):
        end = frame.index(b"\0", 3)
        return b"u:" + frame[3:end], b"\0" + frame[end + 1 :]
    if frame[3:4] == b"\0":  # a channel: its name is ASCII without quotes (protocol.check_channel)
        end = frame.index(b"\0", 4)
        name = frame[4:end]
        id_json, _, data_json = frame[end + 1 :].partition(b"\n")
        return b"ch:" + name, b'{"id":' + id_json + b',"channel":"' + name + b'","data":' + data_json
    end = frame.index(b"\0", 3)
    stream = frame[3:end]
    id_json, _, data_json = frame[end + 1 :].partition(b"\n")
    key = b"*" if stream == b"*" else b"u:" + stream
    return key, b'{"id":' + id_json + _frame_head(stream) + data_json


class _Confirmed:
    """A confirmed push in the publisher's queue (flow.push(..., confirm=True)): its frame,
    the moment after which it must not be published (monotonic), and what became of it."""

    __slots__ = ("frame", "deadline", "key", "head", "done", "receipt")

    def __init__(self, frame: bytes, deadline: float) -> None:
        self.frame = frame
        self.deadline = deadline
        self.key, self.head = frame_parts(frame)
        self.done = False
        self.receipt: tuple[int, str, int] | None = None  # (seq, epoch, online)

    def parts(self, clock_offset_ms: float) -> tuple[bytes, bytes]:
        """Its (stream key, head) for the script: \1, its deadline in Redis's clock (ms)
        and a space, then the push's head; or, once its deadline passed, \2: a no-op in its
        place that keeps the counters. A call resent after a lost reply may so carry a
        no-op where the lost call carried the push: either that call applied it (the
        script skips the position) or nothing did, and nothing will: its caller was told
        it is unavailable. The script drops a push whose deadline passed by the time it
        runs (a Redis that stalled), answering seq -1."""
        left = self.deadline - time.monotonic()
        if left < 0:
            return self.key, b"\2"
        deadline_ms = int((time.time() + left) * 1000 + clock_offset_ms)
        return self.key, b"\1" + str(deadline_ms).encode("ascii") + b" " + self.head


def _stream_of_key(key: bytes) -> str:
    """The stream a stream_key names (inverse of :func:`stream_key`)."""
    if key == b"*":
        return protocol.BROADCAST
    if key.startswith(b"ch:"):
        return key[3:].decode("ascii")  # as users name it
    return key[2:].decode("utf-8")


class RedisPublisherEngine:
    """Pushes queue in this process (bounded) and a thread publishes them in batches, one
    script call each, reconnecting and resending (never duplicating) while Redis is away.
    ``send`` and ``flush_marker`` are the caller's to serialize (flow.Flow's lock)."""

    def __init__(
        self,
        settings: Settings,
        endpoint: str | None = None,
        queue_size: int | None = None,
        linger: float | None = None,
        control_endpoint: str | None = None,
    ) -> None:
        del control_endpoint  # a ZeroMQ notion: Redis confirms each publish itself
        self.settings = settings
        self.url = endpoint or settings.redis_address()
        self.endpoint = redact_url(self.url)  # for messages: never the password
        self.queue_size = queue_size or settings.push_queue
        self.linger = settings.push_linger if linger is None else linger
        self._presence_queries = _PresenceQueries(settings, self.url, self.endpoint)
        self._init_state()

    def _init_state(self) -> None:
        # Frames handed over and not yet confirmed, oldest first; the first one is number
        # self._confirmed + 1 of this publisher's counter.
        self._queue: collections.deque[bytes | _Confirmed] = collections.deque()
        # Confirmed pushes whose caller waits (wait_receipt), by token.
        self._awaiting: dict[str, _Confirmed] = {}
        self._sent = 0
        self._confirmed = 0
        self._cond = threading.Condition(threading.Lock())
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stop = False
        # A fresh id per process: a forked child numbers its own pushes from 1.
        self._publisher_id = secrets.token_hex(12)
        self._client: redis.Redis | None = None
        self._script: Any = None
        self._durable = ""
        self._clock_offset_ms = 0.0  # Redis's clock minus ours, measured at each connect
        self._down_since: float | None = None
        self._failures = Throttled(log, f"publishing to Redis at {self.endpoint} failed; retrying",
                                   WARNING_INTERVAL)

    # ---------------------------------------------------------------- the caller's side

    def send(self, frame: bytes | _Confirmed) -> None:
        if self._closed:
            raise RuntimeError("this Flow publisher is closed")
        if len(self._queue) >= self.queue_size:
            raise QueueFull(
                f"Redis at {self.endpoint} is not taking messages and "
                f"{self.queue_size} are queued; message not sent"
            )
        self._queue.append(frame)
        self._sent += 1
        if self._thread is None:
            self._start()
        if not self._wake.is_set():
            self._wake.set()

    def _start(self) -> None:
        thread = threading.Thread(target=self._run, name="flow-redis-publisher", daemon=True)
        self._thread = thread
        thread.start()

    def flush_marker(self) -> str | None:
        if self._closed or self._sent == 0:
            return None
        return str(self._sent)

    def wait_flushed(self, token: str, timeout: float) -> bool:
        mark = int(token)
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._confirmed < mark:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop:
                    return self._confirmed >= mark
                self._cond.wait(left)
            return True

    def flush(self, timeout: float) -> bool:
        token = self.flush_marker()
        return True if token is None else self.wait_flushed(token, timeout)

    def close(self, linger: float | None = None) -> None:
        linger = self.linger if linger is None else linger
        self._closed = True
        if self._sent and linger > 0:
            self.wait_flushed(str(self._sent), linger)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(0.1)
            if thread.is_alive():
                # In a call to a Redis that hangs (stopped, or a dead network): cut it, rather
                # than make the exit wait for COMMAND_TIMEOUT. What it held is reported lost.
                client = self._client
                if client is not None:
                    try:
                        client.connection_pool.disconnect()
                    except Exception:
                        pass
                thread.join(1.0)
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a link that is gone
                pass
        self._presence_queries.close()

    def forget_after_fork(self) -> None:
        # The parent's connection and queue belong to the parent; its thread is not here.
        # Kept referenced, so that no finalizer closes the parent's socket from the child.
        if self._client is not None:
            _abandoned.append(self._client)
        self._presence_queries.forget()
        self._init_state()

    # ---------------------------------------------------------------- presence queries

    def presence(self, stream: str, timeout: float, limit: int | None = None) -> Snapshot:
        if self._closed:
            raise RuntimeError("this Flow publisher is closed")
        return self._presence_queries.ask(timeout, snapshot=stream, limit=limit).snapshot

    def online(self, stream: str, timeout: float) -> int:
        if self._closed:
            raise RuntimeError("this Flow publisher is closed")
        return self._presence_queries.ask(timeout, online=stream).online

    # ---------------------------------------------------------------- confirmed pushes

    def send_confirmed(self, frame: bytes, timeout: float) -> str:
        """Queue ``frame`` behind everything sent before it, to be published only if Redis
        is first asked within ``timeout`` seconds; a token for :meth:`wait_receipt`."""
        entry = _Confirmed(frame, time.monotonic() + max(0.0, timeout))
        token = secrets.token_hex(8)
        with self._cond:
            self._awaiting[token] = entry
        try:
            self.send(entry)
        except BaseException:
            with self._cond:
                self._awaiting.pop(token, None)
            raise
        return token

    def wait_receipt(self, token: str, timeout: float) -> Receipt:
        deadline = time.monotonic() + timeout
        with self._cond:
            entry = self._awaiting.get(token)
            try:
                while entry is not None and not entry.done:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._stop:
                        break
                    self._cond.wait(left)
            finally:
                self._awaiting.pop(token, None)
        if entry is None or not entry.done:
            raise Unavailable(f"Redis at {self.endpoint} did not confirm the message in {timeout:g}s")
        if entry.receipt is None:
            raise Unavailable(f"Redis at {self.endpoint} did not take the message in {timeout:g}s")
        seq, epoch, online = entry.receipt
        if seq == -1:
            raise Unavailable(f"Redis at {self.endpoint} ran the publish after the message's deadline: "
                              "not published")
        if seq < 1:
            raise Unavailable("the message was published, but its receipt was lost with a reply from Redis")
        return Receipt(_stream_of_key(entry.key), seq, epoch, online)

    # ---------------------------------------------------------------- the thread

    def _run(self) -> None:
        delay = RECONNECT_FIRST
        while True:
            self._wake.wait(1.0)
            self._wake.clear()
            while self._queue and not self._stop:
                batch = list(itertools.islice(self._queue, PUBLISH_BATCH))
                size, count = 0, 0
                for frame in batch:
                    size += len(frame.frame) if isinstance(frame, _Confirmed) else len(frame)
                    count += 1
                    if size >= PUBLISH_BATCH_BYTES:
                        break
                del batch[count:]
                if self._publish(batch):
                    delay = RECONNECT_FIRST
                    with self._cond:
                        for _ in range(count):
                            self._queue.popleft()
                        self._confirmed += count
                        self._cond.notify_all()
                else:
                    # On the condition, not on _wake, which every push sets: only close()
                    # cuts the backoff short (and then reports what is left).
                    with self._cond:
                        if not self._stop:
                            self._cond.wait(delay * (0.5 + random.random()))
                    delay = min(RECONNECT_CAP, delay * 2)
            if self._stop:
                return

    def _publish(self, batch: list[bytes | _Confirmed]) -> bool:
        """One script call for ``batch`` (the first frames of the queue); False on failure."""
        confirmed: list[_Confirmed] = []
        try:
            if self._client is None:
                self._connect()
            args: list[Any] = [
                self.settings.redis_prefix,
                self._durable,
                META_TTL * 1000,
                _epoch_seed(),
                self.settings.history_size,
                int(self.settings.history_ttl * 1000),
                self._publisher_id,
                self._confirmed + 1,
            ]
            for frame in batch:
                if type(frame) is bytes:
                    args.extend(frame_parts(frame))
                else:
                    assert isinstance(frame, _Confirmed)
                    parts = frame.parts(self._clock_offset_ms)
                    args.extend(parts)
                    if parts[1] != b"\2":
                        confirmed.append(frame)
                    else:
                        frame.done = True  # too late: not published, its caller is told
            try:
                reply = self._script(keys=[], args=args)
            except redis.ResponseError as exc:
                if not is_stale(exc):
                    raise
                # Redis restarted under this connection's feet: check again, and retry.
                assert self._client is not None
                args[1] = self._durable = persistence_token(self._client)
                reply = self._script(keys=[], args=args)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._link_failed(exc)
            return False
        except redis.ResponseError as exc:
            # OOM (noeviction, full), READONLY (a replica), LOADING, BUSY, NOPERM: Redis
            # refuses for now, before the script ran; the pushes stay queued and are offered
            # again (a confirmed push past its deadline as a no-op).
            self._link_failed(exc, reconnect=False)
            return False
        except Exception:
            log.exception("publishing to Redis failed (a bug)")
            self._link_failed(None)
            return False
        if self._down_since is not None:
            log.info("publishing to Redis at %s again after %.1fs", self.endpoint, time.monotonic() - self._down_since)
            self._down_since = None
        if confirmed:
            self._take_receipts(confirmed, reply)
        return True

    def _take_receipts(self, confirmed: list[_Confirmed], reply: Any) -> None:
        """The receipts the script returned, in order, for the confirmed pushes of the call."""
        with self._cond:
            for i, entry in enumerate(confirmed):
                try:
                    seq, epoch = int(reply[1 + 3 * i]), reply[2 + 3 * i]
                    epoch = epoch.decode("ascii") if isinstance(epoch, bytes) else str(epoch)
                    entry.receipt = (seq, epoch, int(reply[3 + 3 * i]))
                except (IndexError, TypeError, ValueError, UnicodeDecodeError) as exc:
                    log.error("Redis answered a publish without the receipts asked for: %s", exc)
                entry.done = True

    def _connect(self) -> None:
        client = sync_client(self.url)
        self._client = client  # before its first command: close() can cut a connect that hangs
        try:
            # Read at every (re)connect: a restarted Redis may have other persistence.
            self._durable = persistence_token(client)
            self._script = client.register_script(PUBLISH_SCRIPT)
            # Redis's clock against ours (ms), so that a confirmed push carries its deadline
            # in Redis's time: a call that a stalled Redis runs late drops it there.
            before = time.time()
            seconds, micros = client.time()
            self._clock_offset_ms = seconds * 1000 + micros / 1000 - (before + time.time()) * 500
        except Exception:
            self._client = None
            client.close()
            raise

    def _link_failed(self, exc: BaseException | None, reconnect: bool = True) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
        if exc is not None and not self._stop:  # a call close() cut is no news
            self._failures.warn(f"{type(exc).__name__}: {exc}")
        if reconnect:
            client, self._client = self._client, None
            if client is not None:
                try:
                    client.close()
                except Exception:
                    pass


_abandoned: list[object] = []


# ============================================================== the server's side


# A subscription's states: SUBSCRIBING until Redis confirms it (messages dropped: they
# belong to an earlier subscription), POSITIONING until its position is read (messages
# held: they may be before or after it), then LIVE.
SUBSCRIBING, POSITIONING, LIVE = 0, 1, 2


class _Subscription:
    __slots__ = ("name", "state", "epoch", "held")

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = SUBSCRIBING
        self.epoch: str | None = None
        self.held: list[tuple[int, str, bytes]] = []


class RedisServerEngine:
    """A WebSocket server's side: one pub/sub connection, subscribed per stream, and a
    command connection for positions, history and probes.

    Deliveries to the sink follow the ZeroMQ engine's rules: a subscription is answered
    with ``on_position`` (read after Redis confirmed the subscription, so nothing falls
    between), messages held until then are delivered after it if they are newer; a message
    in an epoch the stream has not been told of is preceded by ``on_position(seq - 1)``.
    After the pub/sub link is replaced (it failed, or stopped carrying probes) every
    stream's position is read and reported again, and the hub repairs what was missed.
    """

    def __init__(self, settings: Settings, *, lease_interval: float | None = None,
                 lease_ttl: float | None = None) -> None:
        self.settings = settings
        self.url = settings.redis_address()
        self.endpoint = redact_url(self.url)
        # The lease's timings are flowcore.presence's; tests give shorter ones.
        self._presence = _PresenceReporter(settings, self.endpoint,
                                           renew_interval(settings.presence_lease)
                                           if lease_interval is None else lease_interval,
                                           settings.presence_lease if lease_ttl is None else lease_ttl,
                                           link_down=lambda: self._conn is None or self._outage_since is not None)
        prefix = settings.redis_prefix
        self._channel_prefix = f"{prefix}:msg:".encode()
        self._probe_channel = f"{prefix}:probe:{secrets.token_hex(8)}".encode()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: EngineSink | None = None
        self._redis: redis.asyncio.Redis | None = None
        self._read_script: Any = None
        self._probe_script: Any = None
        self._mark: str | None = None  # the change mark in the last answer from Redis
        self._durable = ""  # persistence_token, read again after any failure
        self._subscriptions: dict[bytes, _Subscription] = {}
        # Subscribe/unsubscribe replies still due per channel: a subscription is confirmed
        # by the last of them, not by the answer to an earlier (un)subscribe of the channel.
        self._replies_due: dict[bytes, int] = {}
        self._commands: list[tuple[bytes, list[bytes]]] = []  # (verb, channels) to send
        self._command_due = asyncio.Event()
        self._positions_due: list[bytes] = []
        self._positions_task: asyncio.Task[None] | None = None
        self._conn: Any = None  # the pub/sub connection (redis.asyncio.Connection)
        self._conn_since = -math.inf
        self._heard = -math.inf  # monotonic time a probe last came back
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._outage_since: float | None = None
        self._policy_checked = False
        self._bad_message = Throttled(log, "dropped a malformed message from Redis", WARNING_INTERVAL)
        self._read_failed = Throttled(log, f"reading from Redis at {self.endpoint} failed", WARNING_INTERVAL)

    # ---------------------------------------------------------------- lifecycle

    async def start(self, sink: EngineSink) -> None:
        if self._closed or self._loop is not None:
            raise RuntimeError("a RedisServerEngine starts once")
        loop = self._loop = asyncio.get_running_loop()
        self._sink = sink
        self._redis = async_client(self.url)
        self._read_script = self._redis.register_script(READ_SCRIPT)
        self._probe_script = self._redis.register_script(PROBE_SCRIPT)
        self._command_due = asyncio.Event()
        self._presence.start(self._redis, sink)
        for coro in (self._pubsub_link(), self._probes(), self._touches(), self._presence.run()):
            self._tasks.append(loop.create_task(coro))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks, self._tasks = self._tasks, []
        if self._positions_task is not None:
            tasks.append(self._positions_task)
        current = asyncio.current_task()
        for task in tasks:
            if task is not current:
                task.cancel()
        for task in tasks:
            if task is not current:
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        await self._presence.goodbye()  # after its task is cancelled: nothing reports after it
        await self._drop_conn()
        if self._redis is not None:
            try:
                await self._redis.aclose()
            except Exception:
                pass
            self._redis = None

    @property
    def mark(self) -> str | None:
        return self._mark

    @property
    def live(self) -> bool:
        return (
            not self._closed
            and self._conn is not None
            and time.monotonic() - self._heard < 3 * self.settings.redis_probe + COMMAND_TIMEOUT / 5
        )

    # ---------------------------------------------------------------- presence

    def presence_changed(self) -> None:
        self._presence.changed()

    def presence_retire(self, linger: float) -> None:
        self._presence.retire(linger)

    async def presence(self, stream: str, limit: int | None) -> Snapshot | None:
        if self._closed:
            return None
        return await self._presence.snapshot(stream, limit)

    @property
    def server_id(self) -> str:
        """This server's presence id in Redis (a new one whenever Redis forgot the old)."""
        return self._presence.server_id

    # ---------------------------------------------------------------- subscriptions

    def _channel(self, stream: str) -> bytes:
        return self._channel_prefix + stream_key(stream)

    def subscribe(self, stream: str) -> None:
        if self._closed:
            return
        channel = self._channel(stream)
        if channel in self._subscriptions:
            return
        self._subscriptions[channel] = _Subscription(stream)
        self._queue_command(b"SUBSCRIBE", channel)

    def unsubscribe(self, stream: str) -> None:
        if self._closed:
            return
        channel = self._channel(stream)
        if self._subscriptions.pop(channel, None) is not None:
            self._queue_command(b"UNSUBSCRIBE", channel)

    def _queue_command(self, verb: bytes, channel: bytes) -> None:
        if self._conn is None:
            return  # not connected: the link subscribes to everything when it is
        commands = self._commands
        if commands and commands[-1][0] == verb and len(commands[-1][1]) < SUBSCRIBE_CHUNK:
            commands[-1][1].append(channel)
        else:
            commands.append((verb, [channel]))
        self._replies_due[channel] = self._replies_due.get(channel, 0) + 1
        self._command_due.set()

    # ---------------------------------------------------------------- the pub/sub link

    async def _pubsub_link(self) -> None:
        """Connect, subscribe to everything, read until the link fails, and again."""
        delay = RECONNECT_FIRST
        connected_before = False
        while not self._closed:
            try:
                await self._connect_pubsub()
                delay = RECONNECT_FIRST
                writer = asyncio.ensure_future(self._write_commands())
                if connected_before:
                    # JOIN/LEAVE published while the link was down are gone for good (they
                    # are in no history): once the channels are subscribed again, listening
                    # subscriptions get fresh snapshots.
                    self._tasks.append(asyncio.ensure_future(self._refresh_presence_when_subscribed()))
                connected_before = True
                try:
                    await self._read_pubsub()
                finally:
                    writer.cancel()
                    try:
                        await writer
                    except (asyncio.CancelledError, Exception):
                        pass
            except asyncio.CancelledError:
                raise
            except (redis.RedisError, OSError) as exc:
                if self._outage_since is None:
                    self._outage_since = time.monotonic()
                    log.warning("the pub/sub link to Redis at %s failed: %s: %s; reconnecting",
                                self.endpoint, type(exc).__name__, exc)
            except Exception:
                log.exception("the pub/sub link to Redis failed (a bug); reconnecting")
            await self._drop_conn()
            if self._closed:
                return
            # Jittered: every server of every host reconnects after a Redis restart.
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(RECONNECT_CAP, delay * 2)

    async def _refresh_presence_when_subscribed(self) -> None:
        deadline = time.monotonic() + RESUBSCRIBED_WAIT
        while self._replies_due and time.monotonic() < deadline and not self._closed:
            await asyncio.sleep(0.05)  # polling our own state, bounded by the deadline
        if not self._closed and self._sink is not None:
            self._sink.on_presence_reset()

    async def _connect_pubsub(self) -> None:
        assert self._redis is not None
        conn = self._redis.connection_pool.make_connection()
        await conn.connect()
        # Every subscription starts over on the new link; what it missed meanwhile, the
        # positions read after its confirmation reveal (the hub repairs from history).
        self._commands = []
        self._replies_due = {}
        for subscription in self._subscriptions.values():
            subscription.state = SUBSCRIBING
            subscription.held = []
        self._conn = conn
        self._conn_since = time.monotonic()
        channels = [self._probe_channel, *self._subscriptions]
        for start in range(0, len(channels), SUBSCRIBE_CHUNK):
            chunk = channels[start : start + SUBSCRIBE_CHUNK]
            for channel in chunk:
                self._replies_due[channel] = self._replies_due.get(channel, 0) + 1
            await conn.send_command(b"SUBSCRIBE", *chunk)
        if not self._policy_checked:
            self._policy_checked = True
            await self._check_policy()

    async def _check_policy(self) -> None:
        assert self._redis is not None
        try:
            policy = (await self._redis.config_get("maxmemory-policy")).get("maxmemory-policy", "noeviction")
        except (redis.RedisError, OSError):
            return  # CONFIG refused (a managed Redis), or the link failed: not ours to check
        if policy != "noeviction":
            log.warning("Redis at %s has maxmemory-policy %s: an evicted stream is renumbered "
                        "(its clients are told recovered: false); set maxmemory-policy noeviction",
                        self.endpoint, policy)

    async def _drop_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.disconnect(nowait=True)
            except Exception:
                pass

    async def _write_commands(self) -> None:
        while True:
            await self._command_due.wait()
            self._command_due.clear()
            commands, self._commands = self._commands, []
            conn = self._conn
            if conn is None:
                return
            for verb, channels in commands:
                await conn.send_command(verb, *channels)

    async def _read_pubsub(self) -> None:
        conn = self._conn
        sink = self._sink
        assert conn is not None and sink is not None
        while not self._closed:
            reply = await conn.read_response(timeout=math.inf)
            sink.on_batch_start()
            try:
                self._on_reply(reply, sink)
                for _ in range(BATCH):
                    if not await conn.can_read():
                        break
                    self._on_reply(await conn.read_response(timeout=math.inf), sink)
            finally:
                sink.on_batch_end()
            await asyncio.sleep(0)  # let the loop write what the batch queued

    def _on_reply(self, reply: Any, sink: EngineSink) -> None:
        if not isinstance(reply, list) or len(reply) < 3:
            self._bad_message.warn(f"an unexpected reply: {str(reply)[:80]}")
            return
        kind, channel, payload = reply[0], reply[1], reply[2]
        if kind == b"message":
            subscription = self._subscriptions.get(channel)
            if subscription is not None:
                try:
                    self._on_message(subscription, channel, payload, sink)
                except Exception:
                    log.exception("the sink failed handling a message for %r", subscription.name)
            elif channel == self._probe_channel:
                self._heard = time.monotonic()
        elif kind == b"subscribe" or kind == b"unsubscribe":
            due = self._replies_due.get(channel, 0) - 1
            if due > 0:
                self._replies_due[channel] = due
                return
            self._replies_due.pop(channel, None)
            subscription = self._subscriptions.get(channel)
            if kind == b"subscribe" and subscription is not None and subscription.state == SUBSCRIBING:
                subscription.state = POSITIONING
                self._want_position(channel)
            elif channel == self._probe_channel:
                # Redis answered on the new link: it is back (connecting alone says little:
                # a stopped Redis's kernel still accepts connections).
                self._heard = time.monotonic()
                if self._outage_since is not None:
                    log.info("the pub/sub link to Redis at %s is back after %.1fs",
                             self.endpoint, self._heard - self._outage_since)
                    self._outage_since = None

    def _want_position(self, channel: bytes) -> None:
        self._positions_due.append(channel)
        if self._positions_task is None or self._positions_task.done():
            assert self._loop is not None
            self._positions_task = self._loop.create_task(self._read_positions())

    def _on_message(self, subscription: _Subscription, channel: bytes, payload: bytes, sink: EngineSink) -> None:
        if payload.startswith(b"prs "):
            try:
                event = parse_presence_event(subscription.name, payload)
            except ValueError as exc:  # ProtocolError and UnicodeDecodeError are ValueErrors
                self._bad_message.warn(f"on {subscription.name!r}: {exc}")
                return
            if subscription.state != SUBSCRIBING:  # as commands: for a confirmed subscription
                try:
                    sink.on_presence(event)
                except Exception:
                    log.exception("the sink failed handling presence on %r", subscription.name)
            return
        if payload.startswith(b"cmd "):
            try:
                command = protocol.check_command(payload[4:])
            except protocol.ProtocolError as exc:
                self._bad_message.warn(f"on {subscription.name!r}: {exc}")
                return
            if subscription.state != SUBSCRIBING:  # for the sockets of a confirmed subscription
                sink.on_command(subscription.name, command)
            return
        try:
            seq_text, epoch_bytes, frame = payload.split(b" ", 2)
            seq = int(seq_text)
            epoch = epoch_bytes.decode("ascii")
            check_frame(frame, seq, epoch)
        except (ValueError, UnicodeDecodeError) as exc:
            self._bad_message.warn(f"on {subscription.name!r}: {exc}: {payload[:80]!r}")
            return
        state = subscription.state
        if state == LIVE:
            if epoch == subscription.epoch:
                sink.on_message(subscription.name, seq, epoch, protocol.encode_text_frame(frame))
                return
            # Another epoch on a live subscription: a Redis that lost its data closes the link,
            # so this is likely not Redis's numbering (anyone who can write to Redis can
            # publish on the channel). Held while the stream's position is read again: that
            # says which epoch is real (_go_live).
            subscription.state = POSITIONING
            subscription.held = [(seq, epoch, frame)]
            self._want_position(channel)
        elif state == POSITIONING:
            if len(subscription.held) < HOLD_MAX:
                subscription.held.append((seq, epoch, frame))
        # SUBSCRIBING: an earlier subscription's message; the position will cover it

    async def _read_positions(self) -> None:
        """Read the position of every subscription Redis confirmed, and report it."""
        while self._positions_due and not self._closed:
            due, self._positions_due = self._positions_due[:READ_CHUNK], self._positions_due[READ_CHUNK:]
            wanted = {}
            for channel in due:
                subscription = self._subscriptions.get(channel)
                if subscription is not None and subscription.state == POSITIONING:
                    wanted[subscription.name] = (0, "")
            if not wanted:
                continue
            answer = await self.history(wanted, 0)
            if answer is None:
                # Redis did not answer: asked again (a replaced link starts these over).
                self._positions_due[:0] = due
                await asyncio.sleep(POSITIONS_RETRY)
                continue
            sink = self._sink
            assert sink is not None
            sink.on_batch_start()
            try:
                for channel in due:
                    subscription = self._subscriptions.get(channel)
                    if subscription is None or subscription.state != POSITIONING:
                        continue  # unsubscribed, or the link was replaced meanwhile
                    position = answer.get(subscription.name)
                    if position is None:
                        continue
                    self._go_live(subscription, position, sink)
            finally:
                sink.on_batch_end()

    def _go_live(self, subscription: _Subscription, position: StreamHistory, sink: EngineSink) -> None:
        held, subscription.held = subscription.held, []
        subscription.state = LIVE
        subscription.epoch = position.epoch
        name = subscription.name
        try:
            sink.on_position(name, position.seq, position.epoch)
            dropped = 0
            for seq, epoch, frame in held:
                if epoch != subscription.epoch:
                    # Not the epoch Redis holds for the stream: not its numbering. (A real
                    # renumbering after the read shows in the next message or audit.)
                    dropped += 1
                elif seq > position.seq:
                    sink.on_message(name, seq, epoch, protocol.encode_text_frame(frame))
            if dropped:
                self._bad_message.warn(f"on {name!r}: {dropped} in an epoch Redis does not hold for it")
        except Exception:
            log.exception("the sink failed handling the position of %r", name)

    # ---------------------------------------------------------------- probes

    async def _probes(self) -> None:
        """Publish to our own probe channel: a link that stops carrying it back is deaf
        (open, yet receiving nothing), and is replaced. The check does not wait for the
        probe's own publish, which hangs as long as Redis does."""
        interval = self.settings.redis_probe
        count = 0
        sending: asyncio.Task[None] | None = None
        try:
            while not self._closed:
                await asyncio.sleep(interval)
                if self._redis is None or self._conn is None:
                    continue
                if sending is None or sending.done():
                    count += 1
                    sending = asyncio.ensure_future(self._probe(count))
                deaf_for = time.monotonic() - max(self._heard, self._conn_since)
                if self._conn is not None and deaf_for > 3 * interval + 1.0:
                    log.warning("the pub/sub link to Redis at %s carried no probe for %.1fs; replacing it",
                                self.endpoint, deaf_for)
                    self._heard = -math.inf
                    if self._outage_since is None:
                        self._outage_since = time.monotonic()
                    await self._drop_conn()  # the reader fails, and the link reconnects
        finally:
            if sending is not None:
                sending.cancel()

    async def _probe(self, count: int) -> None:
        assert self._redis is not None
        try:
            mark = await asyncio.wait_for(
                self._probe_script(keys=[], args=[self.settings.redis_prefix, self._probe_channel, str(count)]),
                COMMAND_TIMEOUT)
        except (redis.RedisError, OSError, asyncio.TimeoutError) as exc:
            self._read_failed.warn(f"a probe: {type(exc).__name__}: {exc}")
            return
        try:
            self._mark = _mark_text(mark)
        except ValueError as exc:
            self._bad_message.warn(f"a probe's answer: {exc}")

    async def _touches(self) -> None:
        """Keep the hashes of the streams this server receives from expiring."""
        while not self._closed:
            await asyncio.sleep(TOUCH_INTERVAL)
            names = [s.name for s in self._subscriptions.values()]
            for start in range(0, len(names), READ_CHUNK):
                await self.history({name: (0, "") for name in names[start : start + READ_CHUNK]}, 0)

    # ---------------------------------------------------------------- history

    async def history(self, wanted: Mapping[str, Position], max_bytes: int) -> dict[str, StreamHistory] | None:
        if self._closed or self._redis is None:
            return None
        if not wanted:
            return {}
        try:
            if not self._durable:
                self._durable = await async_persistence_token(self._redis)
            args: list[Any] = [
                self.settings.redis_prefix,
                self._durable,
                META_TTL * 1000,
                _epoch_seed(),
                max(0, int(max_bytes)),
                int(self.settings.history_ttl * 1000),
            ]
            names = list(wanted)
            for name in names:
                seq, epoch = wanted[name]
                args.extend((stream_key(name), int(seq), epoch))
            try:
                reply = await asyncio.wait_for(self._read_script(keys=[], args=args), COMMAND_TIMEOUT)
            except redis.ResponseError as exc:
                if not is_stale(exc):
                    raise
                args[1] = self._durable = await async_persistence_token(self._redis)
                reply = await asyncio.wait_for(self._read_script(keys=[], args=args), COMMAND_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except (redis.RedisError, OSError, asyncio.TimeoutError) as exc:
            self._durable = ""
            self._read_failed.warn(f"{type(exc).__name__}: {exc}")
            return None
        try:
            answers = _parse_read(names, wanted, reply)
            # Answers may come back out of order over the pool's connections: an older mark
            # heard last is a mark heard late, which delays what an audit finds (Hub.audit).
            self._mark = answers[names[0]].mark
            return answers
        except (ValueError, IndexError, TypeError, UnicodeDecodeError, AttributeError) as exc:
            self._bad_message.warn(f"a history answer: {exc}")
            return None


_EPOCH = re.compile(r"[0-9a-f-]{1,64}")


def check_frame(frame: bytes, seq: int, epoch: str) -> None:
    """Raise ValueError unless ``frame`` is a browser frame our scripts made for ``seq`` in
    ``epoch``: one JSON object in UTF-8, ending with that seq and epoch. Whoever can write to
    Redis can forge a message, but not break a browser's frame parsing or a stream's order."""
    if not _EPOCH.fullmatch(epoch) or seq < 1:
        raise ValueError("not a seq and epoch Flow makes")
    if not frame.startswith(b'{"id":') or not frame.endswith(b',"seq":%d,"epoch":"%s"}' % (seq, epoch.encode())):
        raise ValueError("not a frame Flow makes")
    try:
        value = orjson.loads(frame)
    except (orjson.JSONDecodeError, RecursionError):
        raise ValueError("the frame is not one UTF-8 JSON value") from None
    if type(value) is not dict or value.get("seq") != seq or value.get("epoch") != epoch:
        raise ValueError("the frame's seq or epoch is not its own")


def _parse_read(names: list[str], wanted: Mapping[str, Position], reply: list[Any]) -> dict[str, StreamHistory]:
    answers: dict[str, StreamHistory] = {}
    at = 0
    encode = protocol.encode_text_frame
    if not reply:
        raise ValueError("no change mark")
    mark = _mark_text(reply[-1])
    reply = reply[:-1]
    for name in names:
        epoch = reply[at].decode("ascii")
        head = int(reply[at + 1])
        count = int(reply[at + 2])
        at += 3
        if count < 0:
            answers[name] = StreamHistory(epoch, head, None, mark)
            continue
        since = wanted[name][0]
        frames = reply[at : at + count]
        at += count
        if len(frames) != count or since + count > head:
            raise ValueError(f"stream {name!r}: a short or overlong answer")
        for i, frame in enumerate(frames):
            check_frame(frame, since + 1 + i, epoch)
        answers[name] = StreamHistory(epoch, head, [(since + 1 + i, encode(f)) for i, f in enumerate(frames)], mark)
    if at != len(reply):
        raise ValueError("more in the answer than was asked")
    return answers


_MARK_SHAPE = re.compile(r"[0-9a-f]{1,64}:[0-9a-f-]{1,64}:[0-9]{1,20}")


def _mark_text(value: Any) -> str | None:
    """A change mark as the scripts make it (run id, the hash's id, the count); None
    while P:mark does not exist (its id "-"): a missing hash reads the same each time it
    is deleted, so it says nothing of what was numbered meanwhile."""
    text = value.decode("ascii") if isinstance(value, bytes) else value
    if not isinstance(text, str) or not _MARK_SHAPE.fullmatch(text):
        raise ValueError("not a change mark")
    return None if text.split(":")[1] == "-" else text



# ============================================================== presence
#
# Presence and occupancy (PROTOCOL sections 9 and 10) by the rules of
# flowcore.presence.PresenceTable, kept in Redis by PRESENCE_SCRIPT (``P`` as above; a
# ``skey`` is a stream's stream_key, e.g. ``ch:doc:42``; Redis's clock, in ms):
#
# - ``P:pres:srv:<server>``, a hash: ``<skey>\0<user>`` -> that server's count (user "" for
#   the stream's sockets), the counts it reported (absolute, never deltas);
# - ``P:pres:leases``, a sorted set: server -> when its lease runs out;
#   ``P:pres:reports``, a hash: server -> ``<Redis run id> <number of its last report>``;
# - ``P:pres:online``, a hash: skey -> sockets on the stream over every server;
# - ``P:pres:members:<channel skey>``, a hash: user -> connections over every server (0
#   while its LEAVE is pending); ``P:pres:versions``, a hash: channel skey -> the version of
#   its last change; ``P:pres:leaving``, a sorted set: ``<skey>\0<user>`` -> when LEAVE is due;
# - ``P:pres:version``: the one counter every channel's versions come from.
#
# JOIN and LEAVE are published on the channel's ``P:msg:`` channel as
# ``prs <JOIN|LEAVE> <version> <user>``. Every call first sweeps (bounded): servers whose
# lease ran out lose their counts, due LEAVEs are made; every server calls at least once
# per lease interval, and sooner when the script says something falls due, so no process
# of its own is needed and concurrent sweeps are safe (each call is atomic).
#
# A server Redis does not know (a flushed or restarted Redis, a lease that ran out while
# the server was frozen) takes a new id and reports its whole ledger, in chunks; what Redis
# may still hold under the old id is swept when that lease runs out. Reports are numbered
# per server, and one that arrives after a later one (a timed-out call Redis ran late) is
# not applied.

# Counts per report call (a full report of a big server is several calls).
PRESENCE_CHUNK = 1000
# Counts the sweep may change per call, and a goodbye per call: bounded, as a call holds Redis.
SWEEP_BUDGET = 1000
GOODBYE_BUDGET = 5000
# Changes gather this long before a report (one script call in flight at a time).
REPORT_DELAY = 0.02
# The sweep runs at most this often per server, however many LEAVEs fall due.
SWEEP_MIN = 0.1
# Seconds before reporting again after a failed call; how long close() tries its goodbye.
PRESENCE_RETRY = 0.5
GOODBYE_TIMEOUT = 1.0
# Distinct timeouts a publisher keeps a query client for (a client's socket timeout is its own).
QUERY_CLIENTS = 4

# ARGV: prefix, server id, report number, lease ttl (ms), leave delay (ms), mode, snapshot
# skey (or ""), list limit (-1: none), online skey (or ""), then (skey, user, count) triples.
# mode: "full" (a server Redis need not know: its first call), "report" (applied only if
# Redis knows the server), "bye" (drop the server's counts), "q" (a publisher's query).
# Returns {known, version, count, users (flat user, count list; -1 past the limit), online,
# ms until the next sweep is due (-1: nothing pending)}; "bye": {1 when every count is gone}.
PRESENCE_SCRIPT = "#!lua\n" + r"""
local prefix = ARGV[1]
local P = prefix .. ':pres:'
local sid, number = ARGV[2], tonumber(ARGV[3])
local lease_ttl, delay = tonumber(ARGV[4]), tonumber(ARGV[5])
local mode, snap, limit, online_of = ARGV[6], ARGV[7], tonumber(ARGV[8]), ARGV[9]
local LEASES, REPORTS, ONLINE = P .. 'leases', P .. 'reports', P .. 'online'
local LEAVING, VERSIONS, COUNTER = P .. 'leaving', P .. 'versions', P .. 'version'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Versions never fall below Redis's clock (ms): they keep rising across a flushed or
-- restored Redis as they do across a restarted ZeroMQ proxy (version_base).
local function at_least_now(v)
  if v < now then
    redis.call('SET', COUNTER, now)
    return now
  end
  return v
end

local function current_version()
  return at_least_now(tonumber(redis.call('GET', COUNTER) or '0'))
end

local function next_version()
  return at_least_now(redis.call('INCR', COUNTER))
end

local function publish(skey, kind, v, user)
  redis.call('PUBLISH', prefix .. ':msg:' .. skey, 'prs ' .. kind .. ' ' .. string.format('%d', v) .. ' ' .. user)
end

-- A channel's version after a change: gone with its last member.
local function changed(skey, mkey, v)
  if redis.call('EXISTS', mkey) == 1 then
    redis.call('HSET', VERSIONS, skey, v)
  else
    redis.call('HDEL', VERSIONS, skey)
  end
end

-- PresenceTable._set and _member_changed: one server's count of (skey, user).
local function set_count(own, skey, user, count)
  local field = skey .. '\0' .. user
  local before = tonumber(redis.call('HGET', own, field) or '0')
  if count == before then return end
  if count > 0 then
    redis.call('HSET', own, field, count)
  else
    redis.call('HDEL', own, field)
  end
  if user == '' then
    if redis.call('HINCRBY', ONLINE, skey, count - before) <= 0 then
      redis.call('HDEL', ONLINE, skey)
    end
    return
  end
  if string.sub(skey, 1, 3) ~= 'ch:' then return end  -- only channels have members
  local mkey = P .. 'members:' .. skey
  local present = redis.call('HGET', mkey, user)
  local total = (tonumber(present) or 0) + count - before
  if total < 0 then total = 0 end
  local v = next_version()
  if total > 0 then
    redis.call('HSET', mkey, user, total)
    local was_leaving = redis.call('ZREM', LEAVING, field) == 1
    if not was_leaving and not present then publish(skey, 'JOIN', v, user) end
  elseif delay <= 0 then
    redis.call('HDEL', mkey, user)
    publish(skey, 'LEAVE', v, user)
  else
    redis.call('HSET', mkey, user, 0)
    redis.call('ZADD', LEAVING, now + delay, field)
  end
  changed(skey, mkey, v)
end

-- PresenceTable.drop_server, at most ``budget`` counts; returns the budget left and
-- whether the server is gone.
local function drop_some(id, budget)
  local own = P .. 'srv:' .. id
  while budget > 0 do
    local fields = redis.call('HRANDFIELD', own, math.min(budget, 500))
    if #fields == 0 then break end
    for _, field in ipairs(fields) do
      local at = string.find(field, '\0', 1, true)
      if at then
        set_count(own, string.sub(field, 1, at - 1), string.sub(field, at + 1), 0)
      else
        redis.call('HDEL', own, field)
      end
      budget = budget - 1
    end
  end
  if redis.call('EXISTS', own) == 1 then return budget, false end
  redis.call('ZREM', LEASES, id)
  redis.call('HDEL', REPORTS, id)
  return budget, true
end

-- PresenceTable.tick: expired leases, then due LEAVEs.
local budget = """ + str(SWEEP_BUDGET) + r"""
for _, id in ipairs(redis.call('ZRANGEBYSCORE', LEASES, '-inf', now, 'LIMIT', 0, 16)) do
  if budget <= 0 then break end
  budget = drop_some(id, budget)
end
if budget > 0 then
  for _, field in ipairs(redis.call('ZRANGEBYSCORE', LEAVING, '-inf', now, 'LIMIT', 0, budget)) do
    redis.call('ZREM', LEAVING, field)
    local at = string.find(field, '\0', 1, true)
    if at then
      local skey, user = string.sub(field, 1, at - 1), string.sub(field, at + 1)
      local mkey = P .. 'members:' .. skey
      if redis.call('HGET', mkey, user) == '0' then
        redis.call('HDEL', mkey, user)
        local v = next_version()
        publish(skey, 'LEAVE', v, user)
        changed(skey, mkey, v)
      end
    end
  end
end

if mode == 'bye' then
  local _, done = drop_some(sid, """ + str(GOODBYE_BUDGET) + r""")
  return {done and 1 or 0}
end

local known = 1
if mode ~= 'q' then
  -- Known: a lease that has not run out, from this run of Redis (a restarted one may have
  -- restored counts older than what the server reported since).
  local rid = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
  local score = redis.call('ZSCORE', LEASES, sid)
  local last_rid, last = string.match(redis.call('HGET', REPORTS, sid) or '', '^(%x+) (%d+)$')
  last = tonumber(last) or 0
  if score and tonumber(score) > now and last_rid == rid then known = 1 else known = 0 end
  if known == 1 or mode == 'full' then
    if number > last then
      local own = P .. 'srv:' .. sid
      for i = 10, #ARGV, 3 do
        set_count(own, ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]))
      end
      redis.call('HSET', REPORTS, sid, rid .. ' ' .. number)
    end
    redis.call('ZADD', LEASES, now + lease_ttl, sid)
  end
end

local version, count, users, online = 0, 0, {}, 0
if snap ~= '' then
  local mkey = P .. 'members:' .. snap
  count = redis.call('HLEN', mkey)
  if limit < 0 or count <= limit then users = redis.call('HGETALL', mkey) else users = -1 end
  version = tonumber(redis.call('HGET', VERSIONS, snap) or '0')
  if version == 0 then version = current_version() end
end
if online_of ~= '' then
  online = tonumber(redis.call('HGET', ONLINE, online_of) or '0')
end

local wait = -1
for _, key in ipairs({LEAVING, LEASES}) do
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #first > 0 then
    local due = math.max(0, tonumber(first[2]) - now)
    if wait < 0 or due < wait then wait = due end
  end
end
return {known, version, count, users, online, wait}
"""


def presence_args(prefix: str, server: str, number: int, lease_ttl: float, leave_delay: float, mode: str,
                  snapshot: str | None = None, limit: int | None = None, online: str | None = None,
                  counts: Iterable[tuple[Key, int]] = ()) -> list[Any]:
    """PRESENCE_SCRIPT's ARGV."""
    args: list[Any] = [
        prefix, server, number, int(lease_ttl * 1000), int(leave_delay * 1000), mode,
        b"" if snapshot is None else stream_key(snapshot),
        -1 if limit is None else max(0, int(limit)),
        b"" if online is None else stream_key(online),
    ]
    for (stream, user), count in counts:
        args.extend((stream_key(stream), user.encode("utf-8"), max(0, int(count))))
    return args


class PresenceAnswer(NamedTuple):
    known: bool
    snapshot: Snapshot
    online: int
    wait: float | None  # seconds until a sweep is due; None: nothing pending


def parse_presence(reply: Any) -> PresenceAnswer:
    """PRESENCE_SCRIPT's answer; ValueError (or TypeError, UnicodeDecodeError) when it is not one."""
    known, version, count, flat, online, wait = reply
    users: dict[str, int] | None
    if isinstance(flat, list):
        if len(flat) % 2:
            raise ValueError("an odd list of users")
        users = {flat[i].decode("utf-8"): int(flat[i + 1]) for i in range(0, len(flat), 2)}
    elif int(flat) == -1:
        users = None
    else:
        raise ValueError(f"not a list of users: {flat!r}")
    wait = int(wait)
    return PresenceAnswer(int(known) == 1, Snapshot(int(version), int(count), users), int(online),
                          None if wait < 0 else wait / 1000)


def parse_presence_event(stream: str, payload: bytes) -> PresenceEvent:
    """A ``prs <JOIN|LEAVE> <version> <user>`` message of ``stream``'s channel; ValueError
    (ProtocolError, UnicodeDecodeError) for anything the script does not make."""
    if not protocol.is_channel_stream(stream):
        raise ValueError("presence on a stream that is not a channel")
    parts = payload.split(b" ", 3)
    if len(parts) != 4 or parts[1] not in (b"JOIN", b"LEAVE") or not parts[2].isdigit():
        raise ValueError(f"not a presence event: {payload[:80]!r}")
    version = int(parts[2])
    if version < 1:
        raise ValueError("not a version")
    user = protocol.check_username(parts[3].decode("utf-8"))
    return PresenceEvent(stream, parts[1].decode("ascii"), user, version)


class _PresenceReporter:
    """A server's presence: reports its sink's ledger (batched, one call in flight), renews
    its lease, sweeps, answers snapshots, and says goodbye at close."""

    def __init__(self, settings: Settings, endpoint: str, lease_interval: float, lease_ttl: float,
                 link_down: Callable[[], bool] = lambda: False) -> None:
        self.settings = settings
        self._link_down = link_down
        self.lease_interval = lease_interval
        self.lease_ttl = lease_ttl
        self.server_id = secrets.token_hex(8)
        self.full_reports = 0  # times this server reported its whole ledger (tests read it)
        self._number = 0
        self._full = True  # Redis does not know this id: the next report is the whole ledger
        self._full_started = False  # its first chunk is in
        self._lost = False  # Redis forgot this server: listening pages need fresh snapshots
        self._retire_linger: float | None = None  # draining: keep the counts this long at the goodbye
        self._pending: dict[Key, int] = {}  # taken from the ledger, not yet in Redis
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._client: redis.asyncio.Redis | None = None
        self._script: Any = None
        self._sink: EngineSink | None = None
        self._empty = Ledger()
        self._ok = False  # the last call answered
        self._closed = False
        self._failed = Throttled(log, f"presence at Redis at {endpoint} failed", WARNING_INTERVAL)

    def start(self, client: redis.asyncio.Redis, sink: EngineSink) -> None:
        self._client = client
        self._script = client.register_script(PRESENCE_SCRIPT)
        self._sink = sink
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()

    def _ledger(self) -> Ledger:
        ledger = getattr(self._sink, "ledger", None)
        return ledger if isinstance(ledger, Ledger) else self._empty

    def changed(self) -> None:
        if not self._closed and self._retire_linger is None:
            self._wake.set()

    def retire(self, linger: float) -> None:
        """Draining (see ServerEngine.presence_retire): renewals only, and a goodbye that
        leaves the counts to a lease of ``linger`` seconds instead of dropping them."""
        self._retire_linger = max(0.0, linger)

    async def run(self) -> None:
        """Report changes soon after they are made; renew and sweep meanwhile."""
        next_call = 0.0  # monotonic; at once: a new server reports in full
        while not self._closed:
            wait = next_call - time.monotonic()
            if wait > 0 and not self._wake.is_set():
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except asyncio.TimeoutError:
                    pass
            if self._wake.is_set():
                await asyncio.sleep(REPORT_DELAY)  # let a burst of changes gather
                self._wake.clear()
                if (time.monotonic() < next_call and not self._full and not self._pending
                        and not self._ledger().changed):
                    continue  # a snapshot took the changes
            answer = await self.report()
            if answer is None:
                next_call = time.monotonic() + PRESENCE_RETRY
            else:
                due = self.lease_interval if answer.wait is None else min(self.lease_interval, answer.wait)
                # Jittered: every server of the pool sees the same due time.
                next_call = time.monotonic() + max(SWEEP_MIN, due) + random.random() * 0.02

    async def report(self, snapshot: str | None = None, limit: int | None = None) -> PresenceAnswer | None:
        """Send what the ledger changed (all of it when Redis does not know this server),
        with the snapshot of ``snapshot`` in the last call. None when Redis did not answer."""
        async with self._lock:
            if self._closed:
                return None
            if self._retire_linger is not None:
                # Draining: the lease is renewed, the counts Redis has stay as they are.
                return None if self._full else await self._call("report", [], snapshot, limit)
            ledger = self._ledger()
            for _ in range(3):  # a Redis that forgets this server again and again: give up
                if self._full and not self._full_started:
                    self._pending = ledger.full()
                    self.full_reports += 1
                else:
                    self._pending.update(ledger.take_changes())
                items = list(self._pending.items())
                chunks = [items[at : at + PRESENCE_CHUNK] for at in range(0, len(items), PRESENCE_CHUNK)] or [[]]
                answer: PresenceAnswer | None = None
                for index, chunk in enumerate(chunks):
                    first_full = self._full and not self._full_started
                    last = index == len(chunks) - 1
                    answer = await self._call("full" if first_full else "report", chunk,
                                              snapshot if last else None, limit)
                    if answer is None:
                        return None
                    if not answer.known and not first_full:
                        break  # Redis lost this server (flushed, restarted, lease ran out)
                    self._full_started = self._full_started or first_full
                    for key, _ in chunk:
                        del self._pending[key]
                else:
                    self._full = self._full_started = False
                    if self._lost and self._sink is not None:
                        # A LEAVE pending in what Redis lost will never come: fresh snapshots.
                        self._lost = False
                        self._sink.on_presence_reset()
                    return answer
                self._lost = True
                log.info("Redis at %s does not know this server's presence (restarted, flushed, or "
                         "its lease ran out); reporting it in full", redact_url(self.settings.redis_address()))
                self.server_id = secrets.token_hex(8)
                self._full, self._full_started = True, False
            return None

    async def _call(self, mode: str, counts: Iterable[tuple[Key, int]], snapshot: str | None = None,
                    limit: int | None = None) -> PresenceAnswer | None:
        if self._script is None:
            return None
        self._number += 1
        args = presence_args(self.settings.redis_prefix, self.server_id, self._number, self.lease_ttl,
                             self.settings.presence_leave_delay, mode, snapshot, limit, None, counts)
        try:
            reply = await asyncio.wait_for(self._script(keys=[], args=args), COMMAND_TIMEOUT)
            answer = parse_presence(reply)
        except asyncio.CancelledError:
            raise
        except (redis.RedisError, OSError, asyncio.TimeoutError) as exc:
            self._ok = False
            if isinstance(exc, redis.ResponseError) or not self._link_down():
                self._failed.warn(f"{type(exc).__name__}: {exc}")
            else:  # the pub/sub link has said Redis is away, once per outage
                log.debug("presence at Redis failed: %s: %s", type(exc).__name__, exc)
            return None
        except (ValueError, TypeError, UnicodeDecodeError, AttributeError) as exc:
            self._ok = False
            self._failed.warn(f"a malformed answer: {exc}")
            return None
        self._ok = True
        return answer

    async def snapshot(self, stream: str, limit: int | None) -> Snapshot | None:
        try:
            answer = await asyncio.wait_for(self.report(stream, limit), COMMAND_TIMEOUT)
        except asyncio.TimeoutError:
            return None
        return None if answer is None else answer.snapshot

    async def goodbye(self) -> None:
        """Drop this server's counts (a graceful stop: its users LEAVE after the delay,
        unless they come back on another server meanwhile). Once; nothing after it."""
        if self._closed:
            return
        self._closed = True
        if not self._ok or self._script is None or self._link_down():
            return  # Redis is not answering: the lease runs out instead
        if self._retire_linger:
            # A drain told the clients to come back within this: the counts stay that long
            # (a lease that nobody renews), then go as a killed server's do.
            self.lease_ttl = self._retire_linger
            self._closed = False
            try:
                await asyncio.wait_for(self._call("report", []), GOODBYE_TIMEOUT)
            except asyncio.TimeoutError:
                pass  # the lease it had runs out instead
            finally:
                self._closed = True
            return
        deadline = time.monotonic() + GOODBYE_TIMEOUT
        try:
            await asyncio.wait_for(self._lock.acquire(), GOODBYE_TIMEOUT)
        except asyncio.TimeoutError:
            return
        try:
            for _ in range(1000):  # a goodbye drops GOODBYE_BUDGET counts per call
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._number += 1
                args = presence_args(self.settings.redis_prefix, self.server_id, self._number, self.lease_ttl,
                                     self.settings.presence_leave_delay, "bye")
                reply = await asyncio.wait_for(self._script(keys=[], args=args), left)
                if int(reply[0]) == 1:
                    break
        except asyncio.CancelledError:
            raise
        except (redis.RedisError, OSError, asyncio.TimeoutError, ValueError, TypeError, IndexError) as exc:
            # Not a warning: the lease runs out instead, and the stop goes on.
            log.info("presence: no goodbye to Redis (its lease runs out instead): %s: %s",
                     type(exc).__name__, exc)
        finally:
            self._lock.release()


class _PresenceQueries:
    """A publisher's presence and online queries: synchronous, in the caller's thread, on
    clients of their own (the publishing thread's client retries and reconnects on its own
    schedule). One client per timeout, as a redis-py client's socket timeout is its own."""

    def __init__(self, settings: Settings, url: str, endpoint: str) -> None:
        self.settings = settings
        self.url = url
        self.endpoint = endpoint
        self._clients: dict[float, tuple[redis.Redis, Any]] = {}
        self._lock = threading.Lock()

    def ask(self, timeout: float, snapshot: str | None = None, limit: int | None = None,
            online: str | None = None) -> PresenceAnswer:
        if timeout <= 0:
            raise Unavailable("the timeout must be more than 0 seconds")
        client, script = self._client(timeout)
        args = presence_args(self.settings.redis_prefix, "", 0, 0, self.settings.presence_leave_delay, "q",
                             snapshot, limit, online)
        try:
            return parse_presence(script(keys=[], args=args, client=client))
        except (redis.RedisError, OSError) as exc:
            raise Unavailable(f"Redis at {self.endpoint} did not answer: {type(exc).__name__}: {exc}") from None
        except (ValueError, TypeError, UnicodeDecodeError, AttributeError) as exc:
            raise Unavailable(f"Redis at {self.endpoint} gave a malformed presence answer: {exc}") from None

    def _client(self, timeout: float) -> tuple[redis.Redis, Any]:
        with self._lock:
            entry = self._clients.get(timeout)
            if entry is None:
                if len(self._clients) >= QUERY_CLIENTS:
                    oldest = next(iter(self._clients))
                    _close_quietly(self._clients.pop(oldest)[0])
                client = sync_client(self.url, timeout)
                entry = self._clients[timeout] = (client, client.register_script(PRESENCE_SCRIPT))
            return entry

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, {}
        for client, _ in clients.values():
            _close_quietly(client)

    def forget(self) -> None:
        """In a forked child: the parent's clients are kept referenced, never closed here."""
        _abandoned.extend(client for client, _ in self._clients.values())
        self._clients = {}
        self._lock = threading.Lock()


def _close_quietly(client: redis.Redis) -> None:
    try:
        client.close()
    except Exception:  # closing a link that is gone
        pass
