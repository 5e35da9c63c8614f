"""The seam between Flow and what carries its messages (PROTOCOL.md section 11).

An engine has two sides:

- the publisher side (:class:`PublisherEngine`), inside ``flow.Flow``: takes the one
  frame of a push (``protocol.encode_push``) without blocking, queues it (bounded) while
  the engine is unreachable, and confirms on request that what it took has reached the
  engine (``flow.flush``, and at exit, where what is not confirmed is reported);
- the server side (:class:`ServerEngine`), inside each WebSocket server: subscribes to
  streams, hands every numbered message and position to the server's hub
  (:class:`EngineSink`), and answers history requests.

Numbering (``seq`` per stream, ``epoch`` per stream), bounded history and exact routing
are the engine's. Detecting gaps and epoch changes in what an engine delivers, and
repairing them from history, is the hub's (``flowcore.hub``), so that every engine gets
the same checks; ``tests/test_engine_contract.py`` holds every engine to the same promises.

Presence and occupancy (PROTOCOL section 9, and the ``online`` of section 10) are the
engine's too: each server counts what it holds in a :class:`flowcore.presence.Ledger`
(its sink's ``ledger``), the engine sums every server's ledger by the rules of
:class:`flowcore.presence.PresenceTable` and delivers the JOIN/LEAVE that result to the
servers subscribed to the channel.

Streams are named by strings: a username for a user's stream, ``protocol.BROADCAST``
(``"*"``) for broadcasts. Channels (PROTOCOL section 9) will take names no username can
take (usernames never hold NUL); how a name maps onto topics or keys is the engine's
business.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol

from .presence import Ledger, PresenceEvent, Snapshot
from .settings import Settings

# The position of a stream: (seq of its last message, epoch). seq 0: no message yet.
Position = tuple[int, str]


class Unavailable(Exception):
    """The engine did not answer in time (a presence query, a confirmed push): nothing is
    known, and for a confirmed push it is unknown whether it was taken. (``flow.Unavailable``.)"""


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a confirmed push became (PROTOCOL section 10): its stream as users name it (a
    username, ``"*"`` or the channel's name), seq, epoch, and the sockets it was dispatched to."""

    stream: str
    seq: int
    epoch: str
    online: int

    def as_dict(self) -> dict[str, object]:
        return {"stream": self.stream, "seq": self.seq, "epoch": self.epoch, "online": self.online}


class QueueFull(Exception):
    """The engine is not taking messages and the outbound queue is full: nothing was sent.
    (``flow.QueueFull`` is this class.)"""


@dataclass(slots=True)
class StreamHistory:
    """A history answer for one stream.

    ``epoch`` and ``seq`` are the stream's current epoch and last seq. ``messages`` are the
    messages after the asked seq, oldest first, contiguous, each ``(seq, wire)`` with
    ``wire`` a complete WebSocket text frame (ready to write); there may be fewer than the
    stream holds (the request's byte limit), never a gap. ``messages`` is None when what
    was asked cannot all be given: another epoch, evicted or expired, a seq beyond the head.
    ``mark`` is the engine's change mark when it answered (see :attr:`ServerEngine.mark`).
    """

    epoch: str
    seq: int
    messages: list[tuple[int, bytes]] | None
    mark: str | None = field(default=None, compare=False)  # of the answer, not of the stream


class EngineSink(Protocol):
    """What a server-side engine reports to (the hub). Called on the event loop."""

    def on_message(self, stream: str, seq: int, epoch: str, wire: bytes) -> None:
        """A numbered message; ``wire`` is its WebSocket text frame, the same for every socket."""

    def on_position(self, stream: str, seq: int, epoch: str) -> None:
        """The stream's position as the engine sees it: the answer to a subscription
        (before any message after it), or a later check. ``seq`` 0: nothing sent yet."""

    def on_command(self, stream: str, command: dict[str, str]) -> None:
        """A command for the sockets of ``stream``'s user (``protocol.check_command``):
        flow.disconnect, flow.unsubscribe. Outside the numbering: no seq, no history."""

    def on_presence(self, event: PresenceEvent) -> None:
        """A JOIN or LEAVE on a channel this server subscribed to; outside the numbering."""

    def on_presence_reset(self) -> None:
        """The engine had lost every server's counts (a restarted proxy, a Redis that lost
        its data) and has this server's again: subscribers' snapshots may be stale (a LEAVE
        that was pending is gone), so the hub sends them fresh ones."""

    @property
    def ledger(self) -> Ledger:
        """This server's counts, which the engine reports (after :meth:`ServerEngine.presence_changed`)."""

    def on_batch_start(self) -> None:
        """Several calls follow at once; the hub writes them when the batch ends."""

    def on_batch_end(self) -> None:
        ...


class ServerEngine(Protocol):
    """The WebSocket server's side of an engine."""

    async def start(self, sink: EngineSink) -> None:
        """Connect (without waiting for the far side to be up) and begin delivering to ``sink``."""

    def subscribe(self, stream: str) -> None:
        """Begin receiving ``stream``; the engine answers with ``sink.on_position`` once the
        subscription is in place, so the hub knows where live delivery starts. Idempotent."""

    def unsubscribe(self, stream: str) -> None:
        ...

    async def history(self, wanted: Mapping[str, Position], max_bytes: int) -> dict[str, StreamHistory] | None:
        """Per stream, what came after the given position (see :class:`StreamHistory`),
        at most about ``max_bytes`` of frames per stream (at least one message when any is
        owed and ``max_bytes`` > 0; none when ``max_bytes`` is 0, to ask positions only).
        None when the engine did not answer in time."""

    @property
    def mark(self) -> str | None:
        """The engine's change mark as last heard (a second or so old at most while its
        link is up), or None when the engine keeps none. The mark changes whenever the
        engine numbers a message or starts a stream's epoch, anywhere: while it equals the
        ``mark`` of a :class:`StreamHistory`, that stream's position is still the one that
        answer gave, and an audit of a quiet stream can be decided without asking."""

    def presence_changed(self) -> None:
        """The sink's ledger has changes: report them soon (the engine batches them, renews
        its lease meanwhile, and sends the whole ledger when the far side does not know it)."""

    def presence_retire(self, linger: float) -> None:
        """This server is draining and told its clients to reconnect within ``linger``
        seconds: report no more changes, and at :meth:`close` have the engine keep its
        counts that long, so that clients counted again elsewhere make no LEAVE/JOIN."""

    async def presence(self, stream: str, limit: int | None) -> Snapshot | None:
        """The channel's presence over every server, after this server's pending changes
        are in (so its own sockets are counted); ``users`` None past ``limit``. None when
        the engine did not answer in time."""

    @property
    def live(self) -> bool:
        """Whether the engine's link answered recently (for /readyz)."""

    async def close(self) -> None:
        """Stop delivering; later calls are no-ops. Never raises for a link already gone."""


class PublisherEngine(Protocol):
    """The publisher's side of an engine, inside ``flow.Flow``. Thread-safety is the caller's."""

    def send(self, frame: bytes) -> None:
        """Hand one push frame over without blocking; raise :class:`QueueFull` when the
        engine is unreachable and the queue is full."""

    def flush_marker(self) -> str | None:
        """Mark the point behind every frame sent so far, without blocking (thread-safety
        is the caller's, as for :meth:`send`); a token for :meth:`wait_flushed`. None when
        nothing can be marked now: nothing sent, closed, or the queue is full."""

    def wait_flushed(self, token: str, timeout: float) -> bool:
        """Whether the engine confirms, within ``timeout`` seconds, that it has taken every
        frame sent before the marker ``token``. Safe from many threads at once, without
        the caller's lock (pushes go on meanwhile)."""

    def flush(self, timeout: float) -> bool:
        """:meth:`flush_marker` then :meth:`wait_flushed`, retrying the marker while the
        queue is full; True at once when nothing was sent. Thread-safety is the caller's."""

    def close(self, linger: float | None = None) -> None:
        """Release everything, after waiting up to ``linger`` seconds (default: the
        engine's linger) for queued frames to go out. ``flow.Flow`` flushes first, reports
        what was not confirmed, and closes with linger 0."""

    def forget_after_fork(self) -> None:
        """In a forked child: drop the parent's resources without touching them."""

    def presence(self, stream: str, timeout: float, limit: int | None = None) -> Snapshot:
        """A channel's presence over every server. Raises :class:`Unavailable`."""

    def online(self, stream: str, timeout: float) -> int:
        """Sockets on ``stream`` over every server. Raises :class:`Unavailable`."""

    def send_confirmed(self, frame: bytes, timeout: float) -> str:
        """Hand one push frame over like :meth:`send` (behind every frame sent before it;
        thread-safety is the caller's; raises :class:`QueueFull`), to be numbered only
        within ``timeout`` seconds from now, so that a push whose caller was told
        :class:`Unavailable` is not published later; a token for :meth:`wait_receipt`."""

    def wait_receipt(self, token: str, timeout: float) -> Receipt:
        """The :class:`Receipt` of the confirmed push ``token`` once the engine numbered
        and stored it, waiting up to ``timeout`` seconds; raises :class:`Unavailable`.
        Safe from many threads at once, without the caller's lock."""


def server_engine(settings: Settings) -> ServerEngine:
    """The server side of the engine FLOW_ENGINE names."""
    if settings.engine == "zmq":
        from .engines.zmq import ZmqServerEngine

        return ZmqServerEngine(settings)
    if settings.engine == "redis":
        from .engines.redis import RedisServerEngine

        return RedisServerEngine(settings)
    raise ValueError(f"unknown engine {settings.engine!r}")  # settings refuse it first


def publisher_engine(settings: Settings, **options: object) -> PublisherEngine:
    """The publisher side of the engine FLOW_ENGINE names (options: endpoint, queue_size, linger)."""
    if settings.engine == "zmq":
        from .engines.zmq import ZmqPublisherEngine

        return ZmqPublisherEngine(settings, **options)  # type: ignore[arg-type]
    if settings.engine == "redis":
        from .engines.redis import RedisPublisherEngine

        return RedisPublisherEngine(settings, **options)  # type: ignore[arg-type]
    raise ValueError(f"unknown engine {settings.engine!r}")
