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
from typing import Any, Mapping

import orjson
import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from .. import protocol
from ..engine import EngineSink, Position, QueueFull, StreamHistory
from ..runtime import Throttled
from ..settings import Settings, redact_url

log = logging.getLogger("flow.engine.redis")

# Pushes per publish script call, and about how many bytes: a call is atomic, so a big one
# holds Redis (and every other client) for its duration.
PUBLISH_BATCH = 256
PUBLISH_BATCH_BYTES = 512 * 1024
# Seconds between reconnect attempts, growing to the cap while Redis stays away.
RECONNECT_FIRST = 0.05
RECONNECT_CAP = 2.0
# Socket timeouts: a command (or connect) that takes longer means the link is gone.
COMMAND_TIMEOUT = 5.0
# How long a publisher's counter is remembered: a retry comes within seconds.
PUBLISHER_TTL = 86400
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
"""

# ARGV: prefix, persistence token, meta ttl (ms), epoch seed, history size, history ttl (ms),
# publisher id, first counter, then (stream, head) pairs; a head is the browser frame up to
# its data. Returns how many pushes were applied (the rest had been, by an earlier call).
PUBLISH_SCRIPT = "#!lua\n" + _PREAMBLE + _NORMALIZE + r"""
local size, ttl = tonumber(ARGV[5]), tonumber(ARGV[6])
local pkey = prefix .. ':pub:' .. ARGV[7]
local first = tonumber(ARGV[8])
local count = (#ARGV - 8) / 2
local done = tonumber(redis.call('GET', pkey) or '0')
local applied = 0
-- Each stream's hash is read once per call and written once at its end (the call is
-- atomic): a batch holds many pushes to the same few streams.
local streams, order = {}, {}
for i = 0, count - 1 do
  local stream, head = ARGV[9 + 2 * i], ARGV[10 + 2 * i]
  if first + i <= done then
    -- applied by an earlier call
  elseif string.byte(head, 1) == 0 then
    -- a command (flow.disconnect): for the sockets open now, outside the numbering
    redis.call('PUBLISH', prefix .. ':msg:' .. stream, 'cmd ' .. string.sub(head, 2))
    applied = applied + 1
  else
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
return applied
"""

# ARGV: prefix, persistence token, meta ttl (ms), epoch seed, max bytes, history ttl (ms),
# then (stream, seq, epoch) triples. Per stream, flat: epoch, head seq, n, then n frames;
# n is -1 when what is owed cannot all be given (another epoch, beyond the head, evicted,
# expired). Streams never written get a hash (seq 0, a new epoch), so that the position a
# server reports is the numbering the first message will carry.
READ_SCRIPT = "#!lua\n" + _PREAMBLE + _NORMALIZE + r"""
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
return out
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
        self._init_state()

    def _init_state(self) -> None:
        # Frames handed over and not yet confirmed, oldest first; the first one is number
        # self._confirmed + 1 of this publisher's counter.
        self._queue: collections.deque[bytes] = collections.deque()
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
        self._down_since: float | None = None
        self._failures = Throttled(log, f"publishing to Redis at {self.endpoint} failed; retrying",
                                   WARNING_INTERVAL)

    # ---------------------------------------------------------------- the caller's side

    def send(self, frame: bytes) -> None:
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

    def forget_after_fork(self) -> None:
        # The parent's connection and queue belong to the parent; its thread is not here.
        # Kept referenced, so that no finalizer closes the parent's socket from the child.
        if self._client is not None:
            _abandoned.append(self._client)
        self._init_state()

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
                    size += len(frame)
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

    def _publish(self, batch: list[bytes]) -> bool:
        """One script call for ``batch`` (the first frames of the queue); False on failure."""
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
                args.extend(frame_parts(frame))
            try:
                self._script(keys=[], args=args)
            except redis.ResponseError as exc:
                if not is_stale(exc):
                    raise
                # Redis restarted under this connection's feet: check again, and retry.
                assert self._client is not None
                args[1] = self._durable = persistence_token(self._client)
                self._script(keys=[], args=args)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._link_failed(exc)
            return False
        except redis.ResponseError as exc:
            # OOM (noeviction, full), READONLY (a replica), LOADING, BUSY, NOPERM: Redis
            # refuses for now; the pushes stay queued and are offered again.
            self._link_failed(exc, reconnect=False)
            return False
        except Exception:
            log.exception("publishing to Redis failed (a bug)")
            self._link_failed(None)
            return False
        if self._down_since is not None:
            log.info("publishing to Redis at %s again after %.1fs", self.endpoint, time.monotonic() - self._down_since)
            self._down_since = None
        return True

    def _connect(self) -> None:
        client = sync_client(self.url)
        self._client = client  # before its first command: close() can cut a connect that hangs
        try:
            # Read at every (re)connect: a restarted Redis may have other persistence.
            self._durable = persistence_token(client)
            self._script = client.register_script(PUBLISH_SCRIPT)
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

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = settings.redis_address()
        self.endpoint = redact_url(self.url)
        prefix = settings.redis_prefix
        self._channel_prefix = f"{prefix}:msg:".encode()
        self._probe_channel = f"{prefix}:probe:{secrets.token_hex(8)}".encode()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: EngineSink | None = None
        self._redis: redis.asyncio.Redis | None = None
        self._read_script: Any = None
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
        self._command_due = asyncio.Event()
        for coro in (self._pubsub_link(), self._probes(), self._touches()):
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
        await self._drop_conn()
        if self._redis is not None:
            try:
                await self._redis.aclose()
            except Exception:
                pass
            self._redis = None

    @property
    def live(self) -> bool:
        return (
            not self._closed
            and self._conn is not None
            and time.monotonic() - self._heard < 3 * self.settings.redis_probe + COMMAND_TIMEOUT / 5
        )

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
        while not self._closed:
            try:
                await self._connect_pubsub()
                delay = RECONNECT_FIRST
                writer = asyncio.ensure_future(self._write_commands())
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
            await asyncio.wait_for(self._redis.publish(self._probe_channel, str(count)), COMMAND_TIMEOUT)
        except (redis.RedisError, OSError, asyncio.TimeoutError) as exc:
            self._read_failed.warn(f"a probe: {type(exc).__name__}: {exc}")

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
            return _parse_read(names, wanted, reply)
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
    for name in names:
        epoch = reply[at].decode("ascii")
        head = int(reply[at + 1])
        count = int(reply[at + 2])
        at += 3
        if count < 0:
            answers[name] = StreamHistory(epoch, head, None)
            continue
        since = wanted[name][0]
        frames = reply[at : at + count]
        at += count
        if len(frames) != count or since + count > head:
            raise ValueError(f"stream {name!r}: a short or overlong answer")
        for i, frame in enumerate(frames):
            check_frame(frame, since + 1 + i, epoch)
        answers[name] = StreamHistory(epoch, head, [(since + 1 + i, encode(f)) for i, f in enumerate(frames)])
    if at != len(reply):
        raise ValueError("more in the answer than was asked")
    return answers

