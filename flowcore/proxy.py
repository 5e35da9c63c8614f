"""The ZeroMQ engine's proxy: numbers every push, keeps history, fans out (PROTOCOL.md 4, 6, 11).

Publishers PUSH to our PULL socket. For each message the proxy assigns the stream's next
``seq``, builds the browser frame once (a complete WebSocket text frame), keeps it in the
stream's bounded history and publishes it on the stream's exact topic through XPUB. A
WebSocket server's subscription is answered with a sync frame telling the stream's
position; history, pings and stats are served on a ROUTER control socket. The framing is
:mod:`flowcore.protocol`'s.

:class:`MessageLog` is the numbering and history, with no I/O: every method takes the
time as an argument. :class:`Proxy` is the ZeroMQ loop around it.

Epochs are per stream (``<run epoch>-<counter>``), given when a stream is created by its
first push, subscription or history request. A stream that has no history left, no
subscriber and no activity for FLOW_HISTORY_TTL is forgotten, so memory follows the
streams in use, not every user ever pushed to; a client resuming a forgotten stream sees
another epoch and is told ``recovered: false``.

A full subscriber pipe drops messages for that subscriber only: one stalled WebSocket
server never holds back the rest of the pool (it sees the seq gap and repairs it).

SIGTERM is a graceful stop: the PULL endpoint is unbound (publishers queue and reconnect
to the next proxy), what is already queued is numbered and published, the fan-out is
flushed, and every stream's position and unexpired history is saved to
``<FLOW_RUN_DIR>/proxy-state``, which the next start loads and deletes: epochs and seqs
carry on, and pushes wait (briefly) until the streams that had subscribers have them
again, so that the WebSocket servers miss nothing live. A kill -9 leaves no file behind,
so the next start has new epochs.
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
import math
import operator
import os
import secrets
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import zmq

from . import compat, protocol
from .presence import PresenceEvent, PresenceTable
from .settings import Settings

log = logging.getLogger("flow.proxy")

# How many pushes to take from the PULL socket before serving subscriptions and
# control requests again: keeps resume answers prompt under a flood.
BATCH = 512
# Streams looked at per loop turn by the sweep, so 200k streams never stall the loop.
SWEEP_BATCH = 5000
# A control request bigger than this is dropped unread: a history request names a few
# streams, a positions check at most some tens of thousands.
MAX_CONTROL_REQUEST = 8 * 1024 * 1024
# After a graceful restart, pushes wait (queued in the publishers and in our PULL pipe)
# until the streams that had subscribers have them again, at most this long: WebSocket
# servers reconnect within ZeroMQ's reconnect interval, and should not have to repair
# from history what was numbered while they were away.
RESUBSCRIBE_GRACE = 2.0
# Graceful stop: how long to keep taking what publishers had already sent once the PULL
# endpoint is unbound (until this long passes without a push, within the limit), and how
# long the fan-out may take to write what is queued for the WebSocket servers.
# All within supervisord's stopwaitsecs (15).
STOP_QUIET = 0.2
STOP_LIMIT = 8.0
# A stop keeps the epochs only when publishers were quiet this long before the PULL endpoint
# was unbound (waiting at most QUIET_LIMIT for it): PUSH/PULL has no acknowledgement, so
# what is inside a publisher's TCP connection at the unbind is lost without a trace. When
# pushes were still flowing, the next proxy starts new epochs and resuming clients are told
# recovered: false, as after a crash, instead of carrying on over a loss nobody can see.
QUIET_BEFORE_UNBIND = 0.1
QUIET_LIMIT = 1.0
FANOUT_LINGER_MS = 2000

STATE_FILE = "proxy-state"
# /readyz answers 503 when the loop has not turned for this long (a stuck loop, e.g. a
# huge control request being answered).
LOOP_STALE = 3.0
# Due LEAVEs are looked for this often while any is pending; expired server leases at
# least every IDLE_POLL (and four times a lease).
PRESENCE_TICK = 0.1
# The longest the loop sleeps when nothing is due: an idle proxy wakes for the servers'
# pings and this, not ten times a second. Well within LOOP_STALE.
IDLE_POLL = 1.0

# A plain int: pyzmq's flag enums cost more than the send itself on this path.
NOBLOCK = int(zmq.NOBLOCK)
RCVMORE = int(zmq.RCVMORE)
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)
_backend_send = compat.zmq_fast_send()  # a pyzmq internal: flowcore.compat checks it
_at = operator.itemgetter(0)


def new_run_epoch() -> str:
    """Unique per proxy start: the time, for people reading logs, and randomness."""
    return f"{int(time.time()):x}-{secrets.token_hex(4)}"


def choose_cpu(setting: str, allowed: set[int], current: int | None) -> int | None:
    """The CPU to keep the proxy's threads on for FLOW_PROXY_CPU ``setting``, or None
    to leave them where the kernel puts them. ``allowed`` is the process's CPU set,
    ``current`` the CPU it runs on now. Raises ValueError for a CPU outside ``allowed``."""
    if setting == "off":
        return None
    if setting == "auto":
        # Where the kernel just put us: several proxies on one host spread as their
        # starts did, instead of piling onto one fixed CPU.
        cpu = current if current in allowed else min(allowed)
    else:
        cpu = int(setting)
        if cpu not in allowed:
            raise ValueError(f"FLOW_PROXY_CPU={cpu} is not one of the CPUs this process may use "
                             f"({cpu_list(allowed)})")
    return cpu if len(allowed) > 1 else None  # one CPU: nothing to choose


def cpu_list(cpus: set[int]) -> str:
    """``cpus`` as the kernel writes a CPU list: "0-3,8,10-11"."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in runs)


def current_cpu() -> int | None:
    """The CPU the calling thread runs on (field 39 of its /proc stat line). Called while
    the process has one thread, so /proc/self stands in where /proc/thread-self is missing."""
    for path in ("/proc/thread-self/stat", "/proc/self/stat"):
        try:
            with open(path, "rb") as f:
                stat = f.read()
            return int(stat[stat.rindex(b")") + 2 :].split()[36])
        except (OSError, ValueError, IndexError):
            continue
    return None


def keep_on_one_cpu(setting: str) -> tuple[int, CpuKeeper | None] | None:
    """Pin the calling thread, and so every thread it starts later (ZeroMQ's I/O thread
    among them: call this before the first socket), to the CPU FLOW_PROXY_CPU chooses.
    None when left to the kernel; else the CPU and, for "auto", the CpuKeeper that lets
    the threads spread while the loop is busy or starved (a CPU number stays fixed). Raises
    ValueError for a CPU number that cannot be used; "auto" that cannot pin warns and
    leaves the threads to the kernel (a tuning default must not keep the proxy down)."""
    if not hasattr(os, "sched_setaffinity"):
        if setting not in ("auto", "off"):
            log.warning("FLOW_PROXY_CPU=%s ignored: this system cannot pin a process to a CPU", setting)
        return None
    allowed = set(os.sched_getaffinity(0))
    cpu = choose_cpu(setting, allowed, current_cpu())
    if cpu is None:
        return None
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if setting != "auto":
            raise ValueError(f"FLOW_PROXY_CPU={setting}: cannot keep the proxy on CPU {cpu}: {reason}") from None
        log.warning("FLOW_PROXY_CPU=auto: cannot keep the proxy on CPU %d (%s); "
                    "leaving its threads to the kernel", cpu, reason)
        return None
    return cpu, (CpuKeeper(cpu, allowed, time.monotonic()) if setting == "auto" else None)


def set_thread_cpus(cpus: set[int]) -> None:
    """Let every thread of this process run on ``cpus`` only (a thread that ends meanwhile
    is skipped)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (OSError, ValueError):
            pass


def thread_wait_seconds() -> float:
    """Seconds this process's threads have spent runnable but waiting for a CPU, in all
    (the second field of each thread's /proc schedstat; 0 where the kernel keeps none)."""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


class CpuKeeper:
    """Keeps the proxy's threads on one CPU while its loop is mostly idle, and lets them
    spread while it is busy or its CPU is crowded. Idle, a push's two hand-overs (ZeroMQ's
    I/O thread to the loop and back) are cheap wake-ups on one CPU with warm caches; in
    a flood both threads run flat out and one CPU would cap the proxy at less than the
    two give it; and a thread kept on a CPU that other processes crowd waits there
    while another CPU may be free. Fed how long each loop turn worked; says when to
    move. Its two probes (time the threads waited for a CPU, the CPU the loop is on) are
    passed in, so it is tested with plain values."""

    WINDOW = 0.05  # seconds over which the loop's busy share is judged
    SPREAD_ABOVE = 0.5  # busy share of a window that lets the threads spread
    # Share of a window the threads waited for their CPU that lets them spread too. Kept
    # on one CPU in W4 (2 CPUs, 3,000 pushes/s) they waited 1% of a window at the median,
    # 22% at the 99th percentile and 37% at most: sharing, not starving.
    WAITED_ABOVE = 0.5
    GATHER_BELOW = 0.2  # busy share under which, for GATHER_AFTER seconds, they gather again
    GATHER_AFTER = 1.0

    def __init__(self, cpu: int, allowed: set[int], now: float,
                 waited: Callable[[], float] = thread_wait_seconds,
                 where: Callable[[], int | None] = current_cpu) -> None:
        self.cpu = cpu  # where they are kept while gathered
        self.allowed = allowed
        self.gathered = True
        self.spreads = 0  # times the threads were let spread
        self._waited, self._where = waited, where
        self._window_start = now
        self._busy = 0.0
        self._waited_at = waited()
        self._quiet_since: float | None = None

    def turned(self, busy: float, now: float) -> set[int] | None:
        """One loop turn worked ``busy`` seconds; the CPUs to move every thread to now,
        or None to stay."""
        self._busy += busy
        elapsed = now - self._window_start
        if elapsed < self.WINDOW:
            return None
        waited_total = self._waited()
        share = self._busy / elapsed
        waited = (waited_total - self._waited_at) / elapsed
        self._window_start, self._busy, self._waited_at = now, 0.0, waited_total
        if self.gathered:
            if share > self.SPREAD_ABOVE or waited > self.WAITED_ABOVE:
                self.gathered, self._quiet_since = False, None
                self.spreads += 1
                return self.allowed
            return None
        if share >= self.GATHER_BELOW or waited > self.WAITED_ABOVE / 2:
            self._quiet_since = None
            return None
        if self._quiet_since is None:
            self._quiet_since = now
            return None
        if now - self._quiet_since < self.GATHER_AFTER:
            return None
        self.gathered = True
        here = self._where()
        if here in self.allowed:
            self.cpu = here  # where the kernel has the loop now: its caches are there
        return {self.cpu}


def sweep_interval(history_ttl: float) -> float:
    """Sweep often enough that a forgettable stream goes within about 1.5 TTL."""
    return min(30.0, max(1.0, history_ttl / 2))


class Stream:
    """One stream's numbering. ``history`` holds ``(time, wire)`` of the messages up to
    ``seq``, newest last, contiguous: entry ``i`` is seq ``seq - len(history) + 1 + i``.
    It may hold a few entries beyond the history size (trimmed in batches); those count
    as evicted."""

    __slots__ = ("epoch", "seq", "history", "active_at", "subscribers")

    def __init__(self, epoch: str, seq: int, active_at: float) -> None:
        self.epoch = epoch
        self.seq = seq
        self.history: list[tuple[float, bytes]] = []
        # The last message, unsubscription or creation: a stream idle past the TTL with
        # nothing to give and nobody subscribed is forgotten.
        self.active_at = active_at
        self.subscribers = 0


class SavedStream(NamedTuple):
    name: str
    epoch: str
    seq: int
    active_at: float
    subscribers: int  # when it was saved
    history: list[tuple[float, bytes]]  # (time, wire), the last one is seq


# (epoch, head seq, [(seq, wire), ...] or None): one stream of a history answer.
HistoryAnswer = tuple[str, int, list[tuple[int, bytes]] | None]


class MessageLog:
    """Per-stream numbering, epochs, bounded history, subscriber counts. No I/O."""

    def __init__(self, history_size: int, history_ttl: float, run_epoch: str | None = None) -> None:
        self.history_size = history_size
        self.history_ttl = history_ttl
        # Trimming in batches keeps append O(1) whatever FLOW_HISTORY_SIZE is.
        self._trim_at = history_size + 16 + history_size // 8
        self.run_epoch = run_epoch or new_run_epoch()
        self.streams: dict[str, Stream] = {}
        self._created = 0
        # Messages numbered and streams started: what can move a position (see mark).
        self.changes = 0
        self._sweep_queue: list[str] = []

    # ---------------------------------------------------------------- numbering

    def stream(self, name: str, now: float) -> Stream:
        """The stream named ``name``, created (seq 0, a fresh epoch) if unknown."""
        stream = self.streams.get(name)
        if stream is None:
            self._created += 1
            self.changes += 1
            stream = self.streams[name] = Stream(f"{self.run_epoch}-{self._created:x}", 0, now)
        return stream

    @property
    def mark(self) -> str:
        """The change mark servers compare to skip asking about quiet streams: another
        value whenever a message was numbered or a stream started, in this run or another."""
        return f"{self.run_epoch}.{self.changes:x}"

    def append(self, push: protocol.Push, now: float) -> bytes:
        """Number ``push``, keep it in history, and return the fan-out frame to publish."""
        name = push.stream
        stream = self.streams.get(name) or self.stream(name, now)
        seq = stream.seq + 1
        stream.seq = seq
        stream.active_at = now
        self.changes += 1
        epoch = stream.epoch
        wire = protocol.encode_text_frame(protocol.build_message_frame(push, seq, epoch))
        if self.history_size:
            history = stream.history
            history.append((now, wire))
            if len(history) > self._trim_at:
                del history[: len(history) - self.history_size]
        return protocol.message_frame(name, seq, epoch, wire)

    def position(self, name: str) -> tuple[int, str] | None:
        stream = self.streams.get(name)
        return None if stream is None else (stream.seq, stream.epoch)

    def since(self, name: str, seq: int, epoch: str, now: float, max_bytes: int) -> HistoryAnswer:
        """``(epoch, head seq, messages)`` of stream ``name`` for a client at ``(seq, epoch)``.

        ``messages`` are ``(seq, wire)`` after ``seq``, contiguous: at least one when any
        is owed and ``max_bytes`` > 0, and no more once their frames reach ``max_bytes``;
        none (``[]``) when ``max_bytes`` is 0. None when what is owed cannot all be given:
        another epoch, a seq beyond the head, the next message evicted or expired.
        """
        stream = self.stream(name, now)
        head = stream.seq
        if epoch != stream.epoch or seq > head:
            return stream.epoch, head, None
        if seq == head:
            return stream.epoch, head, []
        history = stream.history
        owed = head - seq
        if owed > min(len(history), self.history_size):
            return stream.epoch, head, None
        start = len(history) - owed
        if history[start][0] < now - self.history_ttl:
            return stream.epoch, head, None
        messages: list[tuple[int, bytes]] = []
        if max_bytes > 0:
            total = 0
            for index in range(start, len(history)):
                wire = history[index][1]
                seq += 1
                messages.append((seq, wire))
                total += len(wire)
                if total >= max_bytes:
                    break
        return stream.epoch, head, messages

    # ---------------------------------------------------------------- subscriptions

    def subscribe(self, name: str, now: float) -> Stream:
        stream = self.stream(name, now)
        stream.subscribers += 1
        return stream

    def unsubscribe(self, name: str, now: float) -> None:
        stream = self.streams.get(name)
        if stream is not None and stream.subscribers > 0:
            stream.subscribers -= 1
            stream.active_at = now

    # ---------------------------------------------------------------- forgetting

    @property
    def sweeping(self) -> bool:
        return bool(self._sweep_queue)

    def start_sweep(self) -> None:
        """Queue every stream for :meth:`sweep_step`; streams created meanwhile wait for the next sweep."""
        self._sweep_queue = list(self.streams)

    def sweep_step(self, now: float, budget: int = SWEEP_BATCH) -> bool:
        """Look at up to ``budget`` queued streams: drop expired history, forget the streams
        left with nothing. True when the sweep is done."""
        queue = self._sweep_queue
        streams = self.streams
        cutoff = now - self.history_ttl
        size = self.history_size
        for _ in range(min(budget, len(queue))):
            name = queue.pop()
            stream = streams.get(name)
            if stream is None:
                continue
            history = stream.history
            if history:
                if history[0][0] < cutoff:
                    del history[: bisect.bisect_left(history, cutoff, key=_at)]
                if len(history) > size:
                    del history[: len(history) - size]
            if not history and not stream.subscribers and stream.active_at < cutoff:
                del streams[name]
        return not queue

    def sweep(self, now: float) -> None:
        """A whole sweep at once (for tests: the loop goes in steps)."""
        self.start_sweep()
        while not self.sweep_step(now, len(self._sweep_queue) or 1):
            pass

    # ---------------------------------------------------------------- stats and state

    def stats(self) -> dict[str, int]:
        """Costs one pass over the streams: for diagnostics, not for every message."""
        subscribed = history = 0
        size = self.history_size
        for stream in self.streams.values():
            if stream.subscribers:
                subscribed += 1
            history += min(len(stream.history), size)
        return {"streams": len(self.streams), "subscribed": subscribed, "history_messages": history}

    def export(self, now: float) -> Iterator[tuple[str, Stream, list[tuple[float, bytes]]]]:
        """Every stream with its unexpired history (within the size), for the state file."""
        cutoff = now - self.history_ttl
        for name, stream in self.streams.items():
            history = stream.history[-self.history_size :] if self.history_size else []
            if history and history[0][0] < cutoff:
                history = history[bisect.bisect_left(history, cutoff, key=_at) :]
            yield name, stream, history

    def restore(self, saved: SavedStream, now: float) -> None:
        """Take over a stream saved by a previous proxy: its epoch, seq and the history
        still within the TTL and the size. Subscriptions come back as servers reconnect."""
        cutoff = now - self.history_ttl
        kept = saved.history[-self.history_size :] if self.history_size else []
        if kept and kept[0][0] < cutoff:
            kept = kept[bisect.bisect_left(kept, cutoff, key=_at) :]
        # A stream that had subscribers is expected back: not forgotten before they return.
        active_at = max(saved.active_at, now) if saved.subscribers else saved.active_at
        stream = self.streams[saved.name] = Stream(saved.epoch, saved.seq, active_at)
        stream.history = list(kept)


# ---------------------------------------------------------------- state file
#
# Version 1, binary, all integers big-endian:
#     magic b"FLOW-PROXY-STATE" (16 bytes), u32 version (1), u32 n, n bytes of JSON meta:
#         {"saved_at": unix time, "identity": {"publish": e, "fanout": e, "control": e},
#          "streams": count}
#     per stream: u32 name length, name (UTF-8), u32 epoch length, epoch (ASCII),
#         u64 seq, f64 active_at, u32 subscribers, u32 entries, then per entry (oldest
#         first, the last one is seq): f64 time, u32 length, the message's WebSocket
#         frame (raw bytes)
#     u32 CRC-32 of everything before it.
# A file whose identity (the endpoints) is not ours belongs to another proxy sharing the
# run dir (tests, benchmarks): it is left alone and we start fresh.

STATE_MAGIC = b"FLOW-PROXY-STATE"
STATE_VERSION = 1
_HEAD = struct.Struct("!16sII")
_STREAM_HEAD = struct.Struct("!QdII")
_ENTRY = struct.Struct("!dI")
_U32 = struct.Struct("!I")


class StateError(ValueError):
    """A state file we cannot use."""


def state_identity(settings: Settings) -> dict[str, str]:
    return {
        "publish": settings.publish_endpoint,
        "fanout": settings.fanout_endpoint,
        "control": settings.control_endpoint,
    }


def encode_state(message_log: MessageLog, identity: dict[str, str], now: float) -> tuple[bytes, int, int]:
    """The state file's bytes, the number of streams and of history messages in it."""
    parts: list[bytes] = []
    count = messages = 0
    u32 = _U32.pack
    for name, stream, history in message_log.export(now):
        name_bytes = name.encode("utf-8")
        epoch_bytes = stream.epoch.encode("ascii")
        parts += (u32(len(name_bytes)), name_bytes, u32(len(epoch_bytes)), epoch_bytes)
        parts.append(_STREAM_HEAD.pack(stream.seq, stream.active_at, stream.subscribers, len(history)))
        for at, wire in history:
            parts += (_ENTRY.pack(at, len(wire)), wire)
        count += 1
        messages += len(history)
    meta = json.dumps({"saved_at": now, "identity": identity, "streams": count}).encode("utf-8")
    body = b"".join((_HEAD.pack(STATE_MAGIC, STATE_VERSION, len(meta)), meta, *parts))
    return body + u32(zlib.crc32(body)), count, messages


def decode_state(data: bytes) -> tuple[dict[str, Any], list[SavedStream]]:
    """The meta data and the streams of a state file. Raises StateError."""
    try:
        if len(data) < _HEAD.size + _U32.size:
            raise StateError("too short")
        body = memoryview(data)[: -_U32.size]
        if _U32.unpack_from(data, len(body))[0] != zlib.crc32(body):
            raise StateError("checksum mismatch")
        magic, version, meta_size = _HEAD.unpack_from(body, 0)
        if magic != STATE_MAGIC:
            raise StateError("not a Flow proxy state file")
        if version != STATE_VERSION:
            raise StateError(f"version {version}, this proxy reads version {STATE_VERSION}")
        at = _HEAD.size
        meta = json.loads(bytes(body[at : at + meta_size]))
        at += meta_size
        if not isinstance(meta, dict) or type(meta.get("streams")) is not int:
            raise StateError("bad meta data")
        streams = []
        for _ in range(meta["streams"]):
            (size,) = _U32.unpack_from(body, at)
            name = bytes(body[at + 4 : at + 4 + size]).decode("utf-8")
            at += 4 + size
            (size,) = _U32.unpack_from(body, at)
            epoch = bytes(body[at + 4 : at + 4 + size]).decode("ascii")
            at += 4 + size
            seq, active_at, subscribers, entries = _STREAM_HEAD.unpack_from(body, at)
            at += _STREAM_HEAD.size
            protocol.check_stream(name)
            if not epoch or " " in epoch or entries > seq or not math.isfinite(active_at):
                raise StateError(f"stream {name!r}: bad position")
            history = []
            for _ in range(entries):
                when, size = _ENTRY.unpack_from(body, at)
                at += _ENTRY.size
                if at + size > len(body) or not math.isfinite(when):
                    raise StateError(f"stream {name!r}: bad history entry")
                history.append((when, bytes(body[at : at + size])))
                at += size
            streams.append(SavedStream(name, epoch, seq, active_at, subscribers, history))
        if at != len(body):
            raise StateError(f"{len(body) - at} bytes after the last stream")
        return meta, streams
    except StateError:
        raise
    except (struct.error, ValueError, TypeError, KeyError, RecursionError) as exc:
        raise StateError(str(exc)) from None


def write_atomically(path: Path, data: bytes) -> None:
    """Whole or not at all: a reader never sees a half-written state file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        directory = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    except OSError:
        pass  # not every file system syncs directories; the rename is done
    finally:
        os.close(directory)


# ---------------------------------------------------------------- warnings


class WarningLimiter:
    """Warnings about what other processes send, rate-limited per kind, so a flood of bad
    input cannot fill the disk: up to ``burst`` lines at once, then one per ``interval``;
    what is held back is counted and reported by the next line or by :meth:`flush`."""

    def __init__(self, logger: logging.Logger, burst: int = 10, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self.clock = clock
        # kind -> [tokens, refilled at, held back, the last held-back (message, args)]
        self._kinds: dict[str, list[Any]] = {}
        self._holding: set[str] = set()
        self.counts: dict[str, int] = {}

    def _take(self, kind: str, now: float) -> list[Any] | None:
        state = self._kinds.get(kind)
        if state is None:
            state = self._kinds[kind] = [float(self.burst), now, 0, None]
        else:
            state[0] = min(float(self.burst), state[0] + (now - state[1]) / self.interval)
            state[1] = now
        if state[0] >= 1:
            state[0] -= 1
            return state
        return None

    def warn(self, kind: str, message: str, *args: object) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        now = self.clock()
        state = self._take(kind, now)
        if state is None:
            held = self._kinds[kind]
            held[2] += 1
            held[3] = (message, args)
            self._holding.add(kind)
            return
        if state[2]:
            self.logger.warning(message + " (and %d more held back since the last such line)",
                                *args, state[2])
            state[2] = 0
            self._holding.discard(kind)
        else:
            self.logger.warning(message, *args)

    def flush(self) -> None:
        """Report what is held back, once the rate allows; cheap when nothing is."""
        if not self._holding:
            return
        now = self.clock()
        for kind in list(self._holding):
            state = self._take(kind, now)
            if state is None:
                continue
            message, args = state[3]
            self.logger.warning(message + " (one of %d such lines held back)", *args, state[2])
            state[2] = 0
            self._holding.discard(kind)


def _short(exc: object, limit: int = 200) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------- publishers' flushes

FLUSH_PREFIX = protocol.FLUSH_PREFIX
# How long, and how many, halves of a flush (a marker or a request) wait for the other.
FLUSH_WAIT = 60.0
FLUSH_KEPT = 10_000


class HalfPairs:
    """Pairs the two halves of an exchange that share a token, whichever comes first: what
    the PULL socket carried (a flush marker, a confirmed push once numbered) and the
    publisher's request on the control socket. No I/O. What waits is bounded in time and
    number, so that halves that never pair (a publisher gone, a proxy restarted, anyone
    sending junk) cost nothing for long."""

    def __init__(self, warnings: WarningLimiter, what: str, wait: float = FLUSH_WAIT, kept: int = FLUSH_KEPT) -> None:
        self.warnings = warnings
        self.what = what  # for the warning: "flush", "receipt"
        self.wait = wait
        self.kept = kept
        # token -> (when it came, what it carries); oldest first (dicts keep insertion order).
        self._arrived: dict[str, tuple[float, Any]] = {}
        # token -> (when it came, routing id, rid)
        self._requests: dict[str, tuple[float, bytes, int]] = {}

    def _half_arrived(self, token: str, value: Any, now: float) -> tuple[bytes, int] | None:
        """The PULL half came: the request to answer now (routing id, rid), if it came first."""
        waiting = self._requests.pop(token, None)
        if waiting is not None:
            return waiting[1], waiting[2]
        self._arrived.pop(token, None)
        self._arrived[token] = (now, value)
        self._forget(self._arrived, now)
        return None

    def _half_asked(self, token: str, identity: bytes, request_id: int, now: float) -> tuple[float, Any] | None:
        """The request came: the PULL half (when, value), when it came first (answer now)."""
        arrived = self._arrived.pop(token, None)
        if arrived is not None:
            return arrived
        self._requests.pop(token, None)
        self._requests[token] = (now, identity, request_id)
        self._forget(self._requests, now)
        return None

    def _forget(self, table: dict[str, Any], now: float) -> None:
        cutoff = now - self.wait
        crowded = 0
        while table:
            oldest = next(iter(table))
            if table[oldest][0] >= cutoff and len(table) <= self.kept:
                break
            if len(table) > self.kept:
                crowded += 1
            del table[oldest]
        if crowded:
            self.warnings.warn(self.what, "forgot %d unanswered %s halves: more than %d wait", crowded,
                               self.what, self.kept)

    def __len__(self) -> int:
        return len(self._arrived) + len(self._requests)


class FlushMatcher(HalfPairs):
    """A publisher's flush marker (taken on PULL) and its request (protocol.py, the flush section)."""

    def __init__(self, warnings: WarningLimiter, wait: float = FLUSH_WAIT, kept: int = FLUSH_KEPT) -> None:
        super().__init__(warnings, "flush", wait, kept)

    @property
    def _markers(self) -> dict[str, tuple[float, Any]]:
        return self._arrived

    def marker(self, token: str, now: float) -> tuple[bytes, int] | None:
        """The marker came: the request to answer now (routing id, rid), if it came first."""
        return self._half_arrived(token, None, now)

    def request(self, token: str, identity: bytes, request_id: int, now: float) -> bool:
        """The request came: True when its marker came first, so it is answered now."""
        return self._half_asked(token, identity, request_id, now) is not None


class ReceiptMatcher(HalfPairs):
    """A confirmed push, numbered from PULL, and its receipt request (protocol.py, the
    confirmed pushes section)."""

    def __init__(self, warnings: WarningLimiter, wait: float = FLUSH_WAIT, kept: int = FLUSH_KEPT) -> None:
        super().__init__(warnings, "receipt", wait, kept)

    def numbered(self, token: str, receipt: tuple[str, int, str, int], now: float) -> tuple[bytes, int] | None:
        """The push was numbered: the request to answer now (routing id, rid), if it came first."""
        return self._half_arrived(token, receipt, now)

    def asked(self, token: str, identity: bytes, request_id: int, now: float) -> tuple[str, int, str, int] | None:
        """The request came: the receipt, when its push was numbered first (answer now)."""
        arrived = self._half_asked(token, identity, request_id, now)
        return None if arrived is None else arrived[1]


class Proxy:
    """The proxy's sockets and loop. Build it (binds, then loads the state file), then
    :meth:`run` until :meth:`request_stop`, then :meth:`stop` (graceful) or :meth:`close`."""

    def __init__(self, settings: Settings, context: zmq.Context[Any] | None = None) -> None:
        self.settings = settings
        self.state_path = settings.path(settings.run_dir) / STATE_FILE
        self.identity = state_identity(settings)
        self.log = MessageLog(settings.history_size, settings.history_ttl)
        self.warnings = WarningLimiter(log)
        self.cpu_keeper: CpuKeeper | None = None  # FLOW_PROXY_CPU=auto: set by proxy_main
        self.stop_requested = False
        # request_stop writes here, so that a loop asleep in its poll wakes at once.
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        # When the loop last turned (monotonic): /readyz and flow_engine_up say whether it still does.
        self.turned_at = time.monotonic()
        self.numbered = 0
        self.flushes = FlushMatcher(self.warnings)
        self.flushed = 0  # flush requests answered
        # Confirmed pushes (flow.push(..., confirm=True)) and their receipt requests.
        self.receipts = ReceiptMatcher(self.warnings)
        # Restored streams -> subscriptions still to come back before we take pushes.
        self.awaited: dict[str, int] = {}
        # The longest push a publisher with our settings may send, plus its head.
        # (A confirmed push adds protocol.RECEIPT_HEAD_BYTES before the push.)
        self.max_push = (settings.max_message + len(protocol.PUSH_PREFIX) + protocol.MAX_USERNAME_BYTES + 2
                         + protocol.RECEIPT_HEAD_BYTES)
        # Presence and occupancy of the pool (flowcore.presence); not kept across a restart:
        # every server reports in full to a proxy that does not know it.
        self.presence = PresenceTable(settings.presence_leave_delay, version_base=int(time.time() * 1e6),
                                      lease_ttl=settings.presence_lease, started=time.monotonic())

        self.context = context or zmq.Context()
        self.pull = self.context.socket(zmq.PULL)
        self.xpub = self.context.socket(zmq.XPUB)
        self.control = self.context.socket(zmq.ROUTER)
        for sock in (self.pull, self.xpub, self.control):
            sock.setsockopt(zmq.LINGER, 0)
        try:
            self.pull.setsockopt(zmq.RCVHWM, settings.zmq_hwm)
            self.pull.bind(settings.publish_endpoint)
            # What unbind needs, even for a wildcard address.
            self.pull_endpoint = self.pull.getsockopt_string(zmq.LAST_ENDPOINT)
            # A full pipe drops for its subscriber only (no XPUB_NODROP): a stalled server
            # must not hold back the pool; it sees the seq gap and repairs it from history.
            self.xpub.setsockopt(zmq.SNDHWM, settings.zmq_hwm)
            # Every subscription and unsubscription, repeats included, also those of a
            # subscriber whose connection died: each subscription is answered with a sync,
            # and the counts say which streams nobody holds.
            self.xpub.setsockopt(zmq.XPUB_VERBOSER, 1)
            self.xpub.bind(settings.fanout_endpoint)
            self.control.bind(settings.control_endpoint)
        except zmq.ZMQError:
            self.close()
            raise
        self.restored = self.load_state()

    # ---------------------------------------------------------------- state file

    def load_state(self) -> int:
        """Continue a gracefully stopped proxy's streams; the number of streams taken over."""
        path = self.state_path
        # What a save cut short (kill -9 while writing) left behind; not what a live
        # proxy sharing the run dir is writing.
        for stale in path.parent.glob(f"{path.name}.*.tmp"):
            pid = stale.name[len(path.name) + 1 : -len(".tmp")]
            try:
                if pid.isdigit() and int(pid) != os.getpid():
                    try:
                        os.kill(int(pid), 0)
                        continue
                    except ProcessLookupError:
                        pass
                stale.unlink()
            except OSError:
                pass
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.warning("cannot read the state file %s (%s): starting with new epochs", path, exc)
            return 0
        now = time.time()
        try:
            meta, streams = decode_state(data)
        except StateError as exc:
            log.warning("unusable state file %s (%s): removed, starting with new epochs", path, _short(exc))
            try:
                path.unlink(missing_ok=True)
            except OSError as unlink_error:
                log.error("cannot remove %s: %s", path, unlink_error)
            return 0
        if meta.get("identity") != self.identity:
            log.warning("the state file %s is another proxy's (%s): left alone, starting with new epochs",
                        path, meta.get("identity"))
            return 0
        # Taken once: a later kill -9 must not bring these epochs back with a stale history.
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.error("cannot remove the state file %s (%s): starting with new epochs", path, exc)
            return 0
        for saved in streams:
            self.log.restore(saved, now)
            if saved.subscribers:
                self.awaited[saved.name] = saved.subscribers
        saved_at = meta.get("saved_at")
        age = now - saved_at if isinstance(saved_at, (int, float)) else float("nan")
        log.info("continuing %d streams (%d messages of history) saved %.1fs ago in %s",
                 len(streams), self.log.stats()["history_messages"], age, path)
        return len(streams)

    def save_state(self) -> tuple[int, int]:
        data, streams, messages = encode_state(self.log, self.identity, time.time())
        write_atomically(self.state_path, data)
        return streams, messages

    # ---------------------------------------------------------------- sockets

    def take_pushes(self) -> int:
        """Number and publish up to BATCH pushes; how many were numbered."""
        now = time.time()
        pull = self.pull
        recv = pull.recv
        more: Callable[[int], int] = pull.getsockopt  # type: ignore[assignment]  # int options
        append, decode = self.log.append, protocol.decode_push
        xpub, limit = self.xpub, self.max_push
        numbered = 0
        for turn in range(BATCH):
            # The first recv mostly finds the push the poller saw (zmq.Again when not).
            # Then ask the socket once before recv'ing until zmq.Again: at a few thousand
            # pushes a second most wake-ups carry one push, and the exception costs more
            # than numbering it; in a burst, one exception per batch costs less than a
            # question per push.
            if turn == 1 and not more(EVENTS) & POLLIN:
                break
            try:
                raw = recv(NOBLOCK)
            except zmq.Again:
                break
            if more(RCVMORE):
                parts = 1
                while more(RCVMORE):
                    pull.recv()
                    parts += 1
                self.warnings.warn("push", "dropped a malformed push: %d frames, expected one", parts)
                continue
            if len(raw) > limit:
                self.warnings.warn("push", "dropped a malformed push (%d bytes): over FLOW_MAX_MESSAGE",
                                   len(raw))
                continue
            try:
                push = decode(raw)
            except protocol.ProtocolError as exc:
                # Only here, off the hot path: a publisher's flush marker is no push, nor
                # is a command (flow.disconnect), which is passed on outside the numbering.
                if raw.startswith(FLUSH_PREFIX):
                    self.take_flush_marker(raw)
                elif raw.startswith(protocol.COMMAND_PREFIX):
                    self.take_command(raw)
                elif raw.startswith(protocol.RECEIPT_PREFIX):
                    numbered += self.take_confirmed(raw, now)
                else:
                    self.warnings.warn("push", "dropped a malformed push (%d bytes): %s", len(raw), _short(exc))
                continue
            _backend_send(xpub, append(push, now), NOBLOCK)
            numbered += 1
        self.numbered += numbered
        return numbered

    def take_confirmed(self, raw: bytes, now: float) -> int:
        """A confirmed push: numbered and fanned out exactly like a push (same append, same
        send), then its receipt kept for the publisher's request. 1 when it was numbered."""
        try:
            token, deadline_ms, push = protocol.decode_confirmed_push(raw)
        except protocol.ProtocolError as exc:
            self.warnings.warn("push", "dropped a malformed confirmed push (%d bytes): %s", len(raw), _short(exc))
            return 0
        if now * 1000 > deadline_ms:
            # Its publisher has raised flow.Unavailable (we were away or behind): numbering
            # it now would make a retry a duplicate. Same host, same clock (loopback only).
            self.warnings.warn("expired", "dropped a confirmed push that came %.0f ms after its deadline "
                               "(its publisher was told the engine is unavailable)", now * 1000 - deadline_ms)
            return 0
        _backend_send(self.xpub, self.log.append(push, now), NOBLOCK)
        stream = push.stream
        position = self.log.position(stream)
        assert position is not None  # append made it
        # The sockets it was dispatched to, as the servers last reported them.
        receipt = (stream, position[0], position[1], self.presence.online(stream))
        waiting = self.receipts.numbered(token, receipt, time.monotonic())
        if waiting is not None:
            self._answer_receipt(waiting[0], waiting[1], token, receipt)
        return 1

    def take_receipt_request(self, identity: bytes, raw: bytes) -> None:
        try:
            request_id, token = protocol.parse_receipt_request(raw)
        except protocol.ProtocolError as exc:
            self.warnings.warn("control", "dropped a receipt request (%d bytes): %s", len(raw), _short(exc))
            return
        receipt = self.receipts.asked(token, identity, request_id, time.monotonic())
        if receipt is not None:
            self._answer_receipt(identity, request_id, token, receipt)

    def _answer_receipt(self, identity: bytes, request_id: int, token: str,
                        receipt: tuple[str, int, str, int]) -> None:
        try:
            self.control.send_multipart(
                [identity, b"", protocol.build_receipt_reply(request_id, token, *receipt)], NOBLOCK)
        except zmq.Again:
            pass  # a ROUTER drops for a requester that does not read: its own loss

    def take_command(self, raw: bytes) -> None:
        try:
            stream, command_json = protocol.decode_command(raw)
        except protocol.ProtocolError as exc:
            self.warnings.warn("push", "dropped a malformed command (%d bytes): %s", len(raw), _short(exc))
            return
        _backend_send(self.xpub, protocol.command_frame(stream, command_json), NOBLOCK)

    def take_subscriptions(self) -> None:
        xpub = self.xpub
        now = time.time()
        while True:
            try:
                event = xpub.recv(NOBLOCK)
            except zmq.Again:
                return
            if xpub.getsockopt(RCVMORE):
                while xpub.getsockopt(RCVMORE):
                    xpub.recv()
                self.warnings.warn("subscription", "dropped a multipart message on the fan-out socket")
                continue
            if not event or event[0] > 1:
                self.warnings.warn("subscription", "dropped a message on the fan-out socket that is no "
                                   "subscription (%d bytes)", len(event))
                continue
            subscribe = event[0] == 1
            try:
                name = protocol.stream_of_topic(event[1:])
            except protocol.ProtocolError as exc:
                if subscribe:  # its unsubscription needs no second line
                    self.warnings.warn("subscription", "ignored a subscription to %r: %s", event[1:64], exc)
                continue
            if subscribe:
                stream = self.log.subscribe(name, now)
                xpub.send(protocol.sync_frame(name, stream.seq, stream.epoch), NOBLOCK)
                if self.awaited:
                    self._resubscribed(name)
            else:
                self.log.unsubscribe(name, now)

    def take_control(self) -> None:
        control = self.control
        # Bounded like take_pushes: a flood of requests (flushes are cheap to forge) must not
        # keep the loop from the pushes and markers it is waiting for.
        for _ in range(BATCH):
            try:
                frames = control.recv_multipart(NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or frames[1] != b"":
                self.warnings.warn("control", "dropped a control message of %d frames: expected a routing "
                                   "id, an empty delimiter and one request", len(frames))
                continue
            identity, _, raw = frames
            if len(raw) > MAX_CONTROL_REQUEST:
                self.warnings.warn("control", "dropped a control request of %d bytes (at most %d)",
                                   len(raw), MAX_CONTROL_REQUEST)
                continue
            if raw.startswith(protocol.PRESENCE_REQUEST_HEAD) or raw.startswith(protocol.ONLINE_REQUEST_HEAD):
                self.take_presence(identity, raw)
                continue
            if raw.startswith(protocol.RECEIPT_REQUEST_HEAD):
                self.take_receipt_request(identity, raw)
                continue
            try:
                request = protocol.parse_history_request(raw)
            except protocol.ProtocolError as exc:
                try:
                    request_id, token = protocol.parse_flush_request(raw)
                except protocol.ProtocolError:
                    self.warnings.warn("control", "dropped a control request (%d bytes): %s",
                                       len(raw), _short(exc))
                    continue
                if self.flushes.request(token, identity, request_id, time.monotonic()):
                    self._answer_flush(identity, request_id, token)
                continue
            try:
                control.send_multipart([identity, b"", *self.answer(request)], NOBLOCK)
            except zmq.Again:
                pass  # a ROUTER drops for a requester that does not read: its own loss

    def take_presence(self, identity: bytes, raw: bytes) -> None:
        """A server's report (and maybe a query), or a publisher's query (PROTOCOL.md 9, 10)."""
        try:
            request = protocol.parse_presence_request(raw)
        except protocol.ProtocolError as exc:
            self.warnings.warn("control", "dropped a presence request (%d bytes): %s", len(raw), _short(exc))
            return
        table, now = self.presence, time.monotonic()
        known = True
        if request.op == "online":
            assert request.query is not None
            reply = protocol.build_presence_reply(request.request_id, True, None, table.online(request.query))
        else:
            server = request.server
            if server is not None:
                if request.bye:
                    self.publish_presence(table.retire(server, now, request.linger))
                elif request.full or table.known(server):
                    self.publish_presence(table.report(server, request.changes, now, request.full, request.again))
                else:
                    known = False  # a restarted proxy, or a lease that ran out: nothing applied
            snapshot = None if request.query is None else table.snapshot(request.query, request.limit)
            reply = protocol.build_presence_reply(request.request_id, known, snapshot)
        try:
            self.control.send_multipart([identity, b"", reply], NOBLOCK)
        except zmq.Again:
            pass  # a ROUTER drops for a requester that does not read: its own loss

    def presence_tick(self) -> None:
        now = time.monotonic()
        self.publish_presence(self.presence.tick(now))
        if self.presence.end_rebuild(now):
            log.info("presence rebuilt from the servers' reports: they refresh their pages")
            _backend_send(self.xpub, protocol.presence_reset_frame(), NOBLOCK)

    def publish_presence(self, events: list[PresenceEvent]) -> None:
        for event in events:
            _backend_send(self.xpub, protocol.presence_event_frame(event), NOBLOCK)

    def answer(self, request: protocol.HistoryRequest) -> list[bytes]:
        """The frames of the reply (after the routing id and the delimiter)."""
        if request.op == "ping":
            return protocol.build_history_reply(request.request_id, {}, self.log.mark)
        if request.op == "stats":
            stats: dict[str, Any] = {
                **self.log.stats(),
                **self.presence.stats(),
                "numbered": self.numbered,
                # FLOW_PROXY_CPU=auto: times the threads spread (the loop busy, or starved).
                "cpu_spreads": self.cpu_keeper.spreads if self.cpu_keeper is not None else 0,
                "flushed": self.flushed,
                "dropped": dict(self.warnings.counts),
                "run_epoch": self.log.run_epoch,
            }
            return [protocol.dumps({"rid": request.request_id, "streams": {}, "stats": stats})]
        now = time.time()
        since, max_bytes = self.log.since, request.max_bytes
        return protocol.build_history_reply(
            request.request_id,
            {name: since(name, seq, epoch, now, max_bytes) for name, (seq, epoch) in request.streams.items()},
            self.log.mark,  # after since(), which may have started a stream
        )

    def take_flush_marker(self, raw: bytes) -> None:
        """A publisher's flush marker: everything its PUSH socket sent before is taken."""
        try:
            token = protocol.parse_flush_marker(raw)
        except protocol.ProtocolError as exc:
            self.warnings.warn("flush", "dropped a malformed flush marker (%d bytes): %s", len(raw), _short(exc))
            return
        waiting = self.flushes.marker(token, time.monotonic())
        if waiting is not None:
            self._answer_flush(waiting[0], waiting[1], token)

    def _answer_flush(self, identity: bytes, request_id: int, token: str) -> None:
        self.flushed += 1
        try:
            self.control.send_multipart([identity, b"", protocol.build_flush_reply(request_id, token)], NOBLOCK)
        except zmq.Again:
            pass  # a ROUTER drops for a requester that does not read: its own loss

    def _resubscribed(self, name: str) -> None:
        left = self.awaited.get(name)
        if left is not None:
            if left > 1:
                self.awaited[name] = left - 1
            else:
                del self.awaited[name]

    # ---------------------------------------------------------------- loop

    def request_stop(self) -> None:
        """From a signal handler or another thread: the loop wakes and ends."""
        self.stop_requested = True
        try:
            os.write(self._wake_write, b"s")
        except OSError:
            pass  # full (a wake-up is pending anyway) or closed (the proxy is gone)

    # ---------------------------------------------------------------- health and metrics

    @property
    def live(self) -> bool:
        """The loop turned within LOOP_STALE seconds (it polls at least every 250 ms)."""
        return time.monotonic() - self.turned_at < LOOP_STALE

    def problem(self) -> str | None:
        """Why /readyz answers 503, or None (read from the health listener's thread)."""
        if self.stop_requested:
            return "stopping"
        if not self.live:
            return f"the proxy's loop has not turned for {time.monotonic() - self.turned_at:.1f}s"
        return None

    def listen_health(self, port: int) -> Any:
        """/healthz, /readyz and (FLOW_METRICS) /metrics on 127.0.0.1:``port``, from a thread
        of their own (flowcore.health.HealthListener). Raises OSError when the port is taken."""
        from .health import HealthListener

        render = None
        if self.settings.metrics:
            try:
                from . import metrics
            except ImportError as exc:  # prometheus-client is the server extra's: the proxy needs none
                log.warning("no /metrics: %s is missing (pip install 'flow-push[server]')", exc.name or exc)
            else:
                registry = metrics.registry("proxy", "zmq", metrics.ProxyCollector(self))
                render = functools.partial(metrics.render, registry)
        return HealthListener(port, self.problem, render).start()

    def _guarded(self, step: Callable[[], object], what: str) -> None:
        try:
            step()
        except Exception:
            # Our bug, not bad input (that is refused above): log it, keep serving the rest.
            log.exception("proxy error while handling %s", what)

    def run(self) -> None:
        poller = zmq.Poller()
        awaiting = sum(self.awaited.values())
        holding = awaiting > 0
        if not holding:
            poller.register(self.pull, zmq.POLLIN)
        poller.register(self.xpub, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        log.info(
            "proxy up: publish %s, fan-out %s, control %s, run epoch %s, %d streams continued, "
            "history %d msgs / %gs",
            self.settings.publish_endpoint,
            self.settings.fanout_endpoint,
            self.settings.control_endpoint,
            self.log.run_epoch,
            self.restored,
            self.settings.history_size,
            self.settings.history_ttl,
        )
        interval = sweep_interval(self.settings.history_ttl)
        started = time.monotonic()
        next_sweep = started + interval
        presence_idle_tick = min(IDLE_POLL, self.settings.presence_lease / 4)
        last_presence_tick = started
        message_log, guarded, presence = self.log, self._guarded, self.presence
        keeper = self.cpu_keeper
        worked_from = time.monotonic()
        while not self.stop_requested:
            self.turned_at = now = time.monotonic()
            if keeper is not None:
                move = keeper.turned(now - worked_from, now)
                if move is not None:
                    set_thread_cpus(move)
                    log.debug("threads %s: CPUs %s", "gathered" if keeper.gathered else "spread", cpu_list(move))
            if holding and (not self.awaited or time.monotonic() - started >= RESUBSCRIBE_GRACE):
                holding = False
                poller.register(self.pull, zmq.POLLIN)
                log.info("%d of %d subscriptions back after %.2fs: taking pushes",
                         awaiting - sum(self.awaited.values()), awaiting, time.monotonic() - started)
                self.awaited.clear()
            sweeping = message_log.sweeping
            next_presence_tick = last_presence_tick + (PRESENCE_TICK if presence.pending else presence_idle_tick)
            if sweeping:
                timeout = 0
            elif holding:
                timeout = 20
            else:
                timeout = max(1, min(int(IDLE_POLL * 1000), math.ceil((min(next_sweep, next_presence_tick) - now) * 1000)))
            # Only the sockets that have something: an empty recv costs an exception, and
            # at a few thousand pushes a second most wake-ups are for one push.
            events = dict(poller.poll(timeout))
            worked_from = time.monotonic()
            if self._wake_read in events:
                self._take_wake()
            if self.xpub in events:
                guarded(self.take_subscriptions, "subscriptions")
            if self.control in events:
                guarded(self.take_control, "control requests")
            if self.pull in events:
                guarded(self.take_pushes, "pushes")
            if sweeping:
                guarded(lambda: message_log.sweep_step(time.time()), "the sweep")
            elif time.monotonic() >= next_sweep:
                message_log.start_sweep()
                next_sweep = time.monotonic() + interval
            if time.monotonic() >= next_presence_tick:
                guarded(self.presence_tick, "presence")
                last_presence_tick = time.monotonic()
            self.warnings.flush()

    def _take_wake(self) -> None:
        try:
            os.read(self._wake_read, 64)
        except OSError:
            pass

    def _wait_for_quiet(self, limit: float) -> bool:
        """Go on serving until no push came for QUIET_BEFORE_UNBIND seconds (True), or
        ``limit`` passes (False)."""
        quiet_since = time.monotonic()
        while True:
            now = time.monotonic()
            if now - quiet_since >= QUIET_BEFORE_UNBIND:
                return True
            if now >= limit:
                return False
            self._guarded(self.take_subscriptions, "subscriptions")
            self._guarded(self.take_control, "control requests")
            taken = self.numbered
            self._guarded(self.take_pushes, "pushes")
            if self.numbered > taken:
                quiet_since = time.monotonic()
            else:
                self.pull.poll(max(1, int(1000 * (QUIET_BEFORE_UNBIND - (now - quiet_since)))))

    def _discard_state(self) -> None:
        try:
            self.state_path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("could not remove %s: %s", self.state_path, exc)

    def stop(self) -> int:
        """The graceful stop: take what publishers already sent, publish it, flush the
        fan-out, save the state. 0 when the state was saved, else 1."""
        started = time.monotonic()
        quiet = self._wait_for_quiet(started + QUIET_LIMIT)
        before = self.numbered
        try:
            # Publishers now queue in their own sockets and reconnect to the next proxy.
            self.pull.unbind(self.pull_endpoint)
        except zmq.ZMQError as exc:
            log.error("could not unbind %s: %s", self.pull_endpoint, exc)
        limit = started + STOP_LIMIT
        quiet_until = time.monotonic() + STOP_QUIET
        while True:
            now = time.monotonic()
            if now >= quiet_until:
                break
            if now >= limit:
                log.error("still taking pushes after %gs: what is left in the queue is lost", STOP_LIMIT)
                break
            self._guarded(self.take_subscriptions, "subscriptions")
            self._guarded(self.take_control, "control requests")
            taken = self.numbered
            self._guarded(self.take_pushes, "pushes")
            if self.numbered > taken:
                quiet_until = time.monotonic() + STOP_QUIET
            else:
                self.pull.poll(max(1, int(1000 * (min(limit, quiet_until) - now))))
        taken = self.numbered - before
        # Pushes taken after the unbind were in flight at it: others may have been lost.
        quiet = quiet and taken == 0
        self.warnings.flush()
        # The fan-out writes what is queued while the state is saved; term() waits for it.
        self.xpub.close(linger=FANOUT_LINGER_MS)
        self.pull.close(linger=0)
        self.control.close(linger=0)
        code = 0
        streams = messages = 0
        if not quiet:
            log.warning("pushes were still arriving at the stop: what was in flight may be lost, so the "
                        "state is not saved and the next proxy starts new epochs (clients resuming are "
                        "told recovered: false)")
            self._discard_state()
        else:
            try:
                streams, messages = self.save_state()
            except (OSError, ValueError) as exc:
                log.error("could not save the state to %s: %s; the next start has new epochs",
                          self.state_path, exc)
                code = 1
        self.context.term()
        self._close_wake()
        log.info("stopped: %d messages taken during the stop, %d streams (%d messages of history) "
                 "saved to %s in %.2fs",
                 taken, streams, messages, self.state_path, time.monotonic() - started)
        return code

    def close(self) -> None:
        """Stop at once: nothing saved, nothing flushed."""
        for sock in (self.pull, self.xpub, self.control):
            if not sock.closed:
                sock.close(linger=0)
        self.context.term()
        self._close_wake()

    def _close_wake(self) -> None:
        # Once only: a second os.close could hit a descriptor the number was reused for.
        fds, (self._wake_read, self._wake_write) = (self._wake_read, self._wake_write), (-1, -1)
        for fd in fds:
            if fd >= 0:
                os.close(fd)
