"""The hub of one WebSocket server: streams to sessions, fan-out, gap repair, heartbeats.

It knows no transport and no engine in particular: an engine (``flowcore.engine``)
feeds it numbered messages and positions (it is the engine's EngineSink), and sessions
(``flowcore.session``) receive from it. PROTOCOL.md section 11 puts gap detection here:
every engine's deliveries are checked the same way. A message whose seq is not the next
one, a position ahead of what arrived, or a periodic audit that finds a stream behind,
starts a repair from history (live messages of that stream are held meanwhile); what
history cannot give closes the stream's sockets with 1012, so clients resume and are told
``recovered: false``. Never a silent gap.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
import time
from typing import Any, AsyncIterator, Callable, Coroutine, Iterator

from . import protocol
from .engine import Position, ServerEngine
from .presence import Ledger, PresenceEvent, Snapshot
from .session import CLOSED, SUB_GONE, ChannelJoin, ChannelSub, JoinRequest, JoinResult, Session
from .runtime import Throttled, spawn
from .settings import Settings

log = logging.getLogger("flow.websocket")

# How long a join waits for the engine to confirm a subscription.
UPSTREAM_TIMEOUT = 5.0
# History is fetched in pages of about this many bytes, so a resume or a repair costs
# bounded memory however much is owed.
PAGE_BYTES = 512 * 1024
# Live messages a repairing stream holds back, at most; past it they are dropped and
# fetched from history instead (they are there too).
REPAIR_HOLD_BYTES = 8 * 1024 * 1024
# Seconds between audits of the streams' positions against the engine: a message lost
# at the end of a burst has no successor to reveal the gap, the audit does (once the
# stream is quiet: a moving stream's next message reveals it, see Hub.audit).
AUDIT_INTERVAL = 2.0
# Streams one audit request names, at most: the engine answers a request in one step of
# its loop (the ZeroMQ proxy takes about 2 us a stream, and every push waits behind it),
# so a server holding thousands of quiet streams asks in several short requests.
AUDIT_CHUNK = 200
# Each stream is audited once an interval, in this many slices spread over it: one request
# naming every stream would stall the proxy and the server for a moment every interval.
AUDIT_SLICES = 10
# Every this many audits a quiet stream is asked about whatever the engine's change mark
# says: a mark that fails to move (a Redis publisher of a version that keeps none, a hand-
# edited key) then delays a finding by at most this many intervals (30 s), never forever.
AUDIT_ASK_EVERY = 15
# Clients told to reconnect spread themselves over a window this many reconnects a second
# of the whole pool would fill (at least MIN_RECONNECT_WINDOW seconds).
RECONNECTS_PER_SECOND = 500.0
MIN_RECONNECT_WINDOW = 2.0
MAX_RECONNECT_WINDOW = 60.0
# JOIN/LEAVE kept per presence channel for subscriptions whose snapshot is on its way.
PRESENCE_RECENT = 256
# Repairs refresh every listening presence subscription's snapshot at most this often.
PRESENCE_REFRESH_MIN = 2.0


class StreamState:
    """One stream this server receives, and the sessions that receive it."""

    __slots__ = ("name", "sessions", "subscribers", "epoch", "seq", "synced", "waiters", "held", "held_bytes",
                 "audit_head", "audit_seq", "audit_mark", "presence_recent")

    def __init__(self, name: str) -> None:
        self.name = name
        # A channel's stream is received by subscriptions (each a socket's), not by sessions.
        self.subscribers: tuple[ChannelSub, ...] | None = () if protocol.is_channel_stream(name) else None
        # A tuple, rebuilt on join and leave: a user has a few tabs and joins are rare
        # next to deliveries; a tuple of one is half a list of one and a fifth of a set.
        self.sessions: tuple[Session, ...] = ()
        self.epoch = ""
        self.seq = 0  # the last seq delivered to the sessions
        self.synced = False
        self.waiters: list[asyncio.Future[None]] | None = None
        # Not None while a repair runs: live messages held back, (seq, epoch, wire).
        self.held: list[tuple[int, str, bytes]] | None = None
        self.held_bytes = 0
        self.audit_head: int | None = None  # the engine's head at the last audit
        self.audit_seq: int | None = None  # ours at the last audit
        self.audit_mark: str | None = None  # the engine's change mark with audit_head
        # A presence channel's last JOIN/LEAVE (event, frame): a subscription whose snapshot
        # was taken before one of them arrived is sent it after its SUBSCRIBE OK.
        self.presence_recent: collections.deque[tuple[PresenceEvent, str]] | None = None

    def mark_synced(self) -> None:
        self.synced = True
        waiters, self.waiters = self.waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)


class SocketRing:
    """The authenticated sessions, in groups that take turns at the heartbeat. Each one
    gets one every interval, whichever group it is in. A new one joins the smallest
    group, of equals the one due last (the one that just had its turn, since AUTH OK was
    just written to it): sockets that arrive together (a page load, a reconnect herd after
    a restart) are spread over the interval instead of all beating in one turn."""

    def __init__(self, groups: int) -> None:
        # Dicts used as ordered sets: at thousands of entries a dict costs about 30 bytes
        # an entry where a set costs about 50.
        self.groups: list[dict[Session, None]] = [{} for _ in range(groups)]
        self.turn = 0  # the group whose turn is next

    def add(self, sock: Session) -> None:
        groups = self.groups
        count = len(groups)
        group = (self.turn - 1) % count
        smallest = len(groups[group])
        if smallest:
            for back in range(2, count + 1):  # due later first, so ties keep the latest
                candidate = (self.turn - back) % count
                size = len(groups[candidate])
                if size < smallest:
                    group, smallest = candidate, size
        groups[group][sock] = None
        sock.ring_group = group

    def discard(self, sock: Session) -> None:
        if sock.ring_group is not None:
            self.groups[sock.ring_group].pop(sock, None)
            sock.ring_group = None

    def take_turn(self) -> list[Session]:
        """The sessions whose heartbeat is due now."""
        group = self.groups[self.turn]
        self.turn = (self.turn + 1) % len(self.groups)
        return list(group)

    def __iter__(self) -> Iterator[Session]:
        return itertools.chain.from_iterable(self.groups)

    def __len__(self) -> int:
        return sum(map(len, self.groups))


HEARTBEAT_GROUPS = 32


class Hub:
    def __init__(self, settings: Settings, engine: ServerEngine) -> None:
        self.settings = settings
        self.engine = engine
        self.streams: dict[str, StreamState] = {}
        self.broadcast = StreamState(protocol.BROADCAST)
        self.streams[protocol.BROADCAST] = self.broadcast
        self.ring = SocketRing(HEARTBEAT_GROUPS)
        self.upstream_messages = 0  # messages received for user streams
        self.repairs = 0
        self.gap_closes = 0
        self.presence_asks = 0  # engine round trips for PRESENCE queries (shared by the queries meanwhile)
        # Messages routed to sockets and their frames' bytes, by stream kind, counted once
        # per fan-out (recipients x message), not per socket; flowcore.metrics reads them.
        self.sent_user = self.sent_broadcast = self.sent_channel = 0
        self.sent_user_bytes = self.sent_broadcast_bytes = self.sent_channel_bytes = 0
        # flowcore.metrics.LagHistogram, observed once per engine batch; None: FLOW_METRICS=0.
        self.lag: Any = None
        self._batch_at = 0.0
        self._batch_sent = 0
        # Sessions with frames queued during this loop iteration; written once per batch.
        self.dirty: list[Session] = []
        # True while a flush is due anyway: scheduled, or an engine batch is running.
        self._flush_due = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.timers: "Timers | None" = None
        self.closed = False
        self.forged = Throttled(log, "dropped messages the engine never numbered")
        # What this server holds, for presence, flow.is_online and receipts (flowcore.presence).
        self.ledger = Ledger()
        self._presence_refresh_after = 0.0  # monotonic: gap-driven refreshes, at most so often
        self._presence_queries: dict[str, asyncio.Future[Snapshot | None]] = {}  # stream -> in flight

    async def start(self) -> None:
        await self.engine.start(self)
        self.engine.subscribe(protocol.BROADCAST)
        self._spawn(self._audits())

    async def close(self) -> None:
        self.closed = True
        for task in list(self.tasks):
            task.cancel()
        await self.engine.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        spawn(coro, self.tasks, log, "a hub task")

    # -- sessions

    def reschedule(self, session: Session) -> None:
        """The session's next deadline changed (a refreshed token)."""
        if self.timers is not None:
            self.timers.schedule(session)

    def position(self, name: str, own: StreamState) -> Position:
        """Where this server's delivery of ``name`` (the user's own stream or "*") stands."""
        state = self.broadcast if name == protocol.BROADCAST else own
        return state.seq, state.epoch

    def positions(self, own: StreamState) -> dict[str, Position]:
        """:meth:`position` of every stream a socket of ``own``'s user receives."""
        return {name: self.position(name, own) for name in (own.name, protocol.BROADCAST)}

    async def join(self, session: Session, request: JoinRequest) -> JoinResult | None:
        """Attach ``session`` to its user's stream and to broadcasts. None when the engine
        could not say where the streams stand (it is away): the caller refuses the socket.
        A session closed before its turn came is not attached (None too): its leave has
        already run and nothing would ever take it out again."""
        if session.stage == CLOSED:
            return None
        name = request.username
        state = self.streams.get(name)
        if state is None:
            state = self.streams[name] = StreamState(name)
            self.engine.subscribe(name)
        state.sessions += (session,)
        self._count(name, 1)
        self.ring.add(session)
        if not (await self._synced(state) and await self._synced(self.broadcast)):
            return None
        positions = self.positions(state)
        wanted = request.resume
        recovered, missed, owed = False, 0, {}
        if set(wanted) == set(positions) and all(wanted[s][1] == positions[s][1] for s in positions):
            # Behind this server: history owes what came after. Ahead of it (the client
            # came from a server further along): the engine's head says whether that
            # position is real; nothing is owed, and delivery here continues after it.
            ask = {s: (min(wanted[s][0], positions[s][0]), positions[s][1])
                   for s in positions if wanted[s][0] != positions[s][0]}
            answer = await self.engine.history(ask, 0) if ask else {}
            if answer is not None and all(
                s in answer and answer[s].epoch == positions[s][1] and answer[s].messages is not None
                and wanted[s][0] <= answer[s].seq for s in ask
            ):
                recovered = True
                owed = {s: wanted[s][0] for s in positions}
                missed = sum(max(0, positions[s][0] - wanted[s][0]) for s in positions)
                positions = {s: (max(p, wanted[s][0]), e) for s, (p, e) in positions.items()}
        return JoinResult(state, positions, recovered, missed, owed)

    async def _synced(self, state: StreamState) -> bool:
        if state.synced:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if state.waiters is None:
            state.waiters = []
        state.waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, UPSTREAM_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("engine did not confirm the subscription to %r in %ss", state.name, UPSTREAM_TIMEOUT)
            return False
        return state.synced  # False when the stream went (its last socket left) meanwhile

    async def history_pages(self, name: str, after: int, until: int, epoch: str
                            ) -> AsyncIterator[list[tuple[int, bytes]]]:
        """The messages (after, until] of a stream, a page at a time. Raises LookupError
        when history cannot give them all (evicted meanwhile, engine away)."""
        cursor = after
        while cursor < until:
            answer = await self.engine.history({name: (cursor, epoch)}, PAGE_BYTES)
            stream = None if answer is None else answer.get(name)
            if stream is None or stream.messages is None or stream.epoch != epoch or not stream.messages:
                raise LookupError(name)
            page = [(seq, wire) for seq, wire in stream.messages if cursor < seq <= until]
            if not page or page[0][0] != cursor + 1:
                raise LookupError(name)
            cursor = page[-1][0]
            yield page

    def leave(self, session: Session) -> None:
        self.ring.discard(session)
        state = session.own
        if state is None and session.username is not None:
            state = self.streams.get(session.username)
        if state is None or session not in state.sessions:
            return
        state.sessions = tuple(s for s in state.sessions if s is not session)
        self._count(state.name, -1)
        if not state.sessions and state is not self.broadcast:
            self._drop_stream(state)

    # -- channels

    async def subscribe_channel(self, sub: ChannelSub, since: Position | None) -> ChannelJoin | None:
        """Attach ``sub`` to its channel's stream; where delivery continues and what a
        ``since`` is owed. None when the engine could not say where the channel stands."""
        if sub.stage == SUB_GONE:
            return None  # unsubscribed or closed before its turn came: nothing to attach
        name = sub.stream
        state = self.streams.get(name)
        if state is None:
            state = self.streams[name] = StreamState(name)
            self.engine.subscribe(name)
        assert state.subscribers is not None
        state.subscribers += (sub,)
        sub.state = state
        self._count_sub(sub, 1)
        if not await self._synced(state):
            return None
        seq, epoch = state.seq, state.epoch
        if since is None or since[1] != epoch:
            return ChannelJoin((seq, epoch), False, 0, None)
        if since[0] == seq:
            return ChannelJoin((seq, epoch), True, 0, seq)
        # Behind this server: history owes the rest; ahead: the engine's head vouches for it.
        answer = await self.engine.history({name: (min(since[0], seq), epoch)}, 0)
        stream = None if answer is None else answer.get(name)
        if stream is None or stream.epoch != epoch or stream.messages is None or since[0] > stream.seq:
            return ChannelJoin((seq, epoch), False, 0, None)
        return ChannelJoin((max(seq, since[0]), epoch), True, max(0, seq - since[0]), since[0])

    def leave_channel(self, sub: ChannelSub) -> None:
        state = sub.state
        if state is None or state.subscribers is None or sub not in state.subscribers:
            return
        sub.state = None
        state.subscribers = tuple(s for s in state.subscribers if s is not sub)
        self._count_sub(sub, -1)
        if not state.subscribers and self.streams.get(state.name) is state:
            self._drop_stream(state)

    # -- presence and occupancy

    def _count(self, username: str, delta: int) -> None:
        ledger = self.ledger
        ledger.add(username, "", delta)
        ledger.add(protocol.BROADCAST, "", delta)
        self.engine.presence_changed()

    def _count_sub(self, sub: ChannelSub, delta: int) -> None:
        ledger = self.ledger
        ledger.add(sub.stream, "", delta)
        if sub.presence:
            ledger.add(sub.stream, sub.session.username or "", delta)
        self.engine.presence_changed()

    async def presence(self, sub: ChannelSub) -> Snapshot | None:
        """The channel's presence over the pool (this server's sockets counted)."""
        return await self.engine.presence(sub.stream, self.settings.presence_max_list)

    async def presence_query(self, sub: ChannelSub) -> Snapshot | None:
        """:meth:`presence` for a PRESENCE query (the socket was counted when it
        subscribed): queries of one channel share the engine's answer while one is on its
        way, so a flood of them costs the engine one round trip, not one per query, and
        does not hold up other sockets' subscriptions behind it."""
        stream = sub.stream
        pending = self._presence_queries.get(stream)
        if pending is None:
            self.presence_asks += 1
            pending = asyncio.ensure_future(self.engine.presence(stream, self.settings.presence_max_list))
            self._presence_queries[stream] = pending

            def forget(done: "asyncio.Future[Snapshot | None]", stream: str = stream) -> None:
                if self._presence_queries.get(stream) is done:
                    del self._presence_queries[stream]

            pending.add_done_callback(forget)
        return await asyncio.shield(pending)

    def presence_sent(self, sub: ChannelSub) -> None:
        """``sub`` has its snapshot: send it what arrived after the snapshot was taken."""
        state = sub.state
        if state is None or not state.presence_recent or sub.presence_version is None:
            return
        for event, text in state.presence_recent:
            sub.session.presence_event(sub, event, text)

    def on_presence_reset(self) -> None:
        for state in list(self.streams.values()):
            if state.subscribers and any(sub.presence_version is not None for sub in state.subscribers):
                self._spawn(self._refresh_presence(state))

    async def _refresh_presence(self, state: StreamState) -> None:
        snapshot = await self.engine.presence(state.name, self.settings.presence_max_list)
        if snapshot is None or self.streams.get(state.name) is not state or state.subscribers is None:
            return
        state.presence_recent = None  # older than this snapshot, every one of them
        for sub in state.subscribers:
            sub.session.presence_refresh(sub, snapshot)
        self.flush()

    def on_presence(self, event: PresenceEvent) -> None:
        state = self.streams.get(event.stream)
        if state is None or not state.subscribers:
            return
        text = protocol.presence_diff(protocol.channel_of_stream(event.stream), event)
        recent = state.presence_recent
        if recent is None:
            recent = state.presence_recent = collections.deque(maxlen=PRESENCE_RECENT)
        recent.append((event, text))
        for sub in state.subscribers:
            if sub.presence_version is not None:
                sub.session.presence_event(sub, event, text)

    def _drop_stream(self, state: StreamState) -> None:
        """The last receiver of ``state`` left: stop receiving it upstream."""
        del self.streams[state.name]
        if not self.closed:
            self.engine.unsubscribe(state.name)
        # Joins still waiting for this stream end (and see their socket closed).
        for waiter in state.waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    # -- fan-out (EngineSink)

    def mark_dirty(self, session: Session) -> None:
        self.dirty.append(session)
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self.flush)

    def on_batch_start(self) -> None:
        self._flush_due = True
        if self.lag is not None:
            self._batch_at = time.perf_counter()
            self._batch_sent = self.sent_user + self.sent_broadcast + self.sent_channel

    def on_batch_end(self) -> None:
        self.flush()
        # A batch that routed nothing (positions, commands, an empty wake-up) is no lag.
        if self.lag is not None and self._batch_sent != self.sent_user + self.sent_broadcast + self.sent_channel:
            self.lag.observe(time.perf_counter() - self._batch_at)

    def flush(self) -> None:
        self._flush_due = False
        if self.dirty:
            dirty, self.dirty = self.dirty, []
            for session in dirty:
                session.flush()

    def on_message(self, stream: str, seq: int, epoch: str, wire: bytes) -> None:
        state = self.streams.get(stream)
        if state is None:
            return  # unsubscribed a moment ago
        if state is not self.broadcast:
            self.upstream_messages += 1
        if seq != state.seq + 1 or epoch != state.epoch or state.held is not None:
            self._irregular(state, seq, epoch, wire)
            return
        state.seq = seq
        self._fan_out(state, seq, wire)

    def on_command(self, stream: str, command: dict[str, str]) -> None:
        """flow.disconnect / flow.unsubscribe, for this server's sockets of the user."""
        state = self.streams.get(stream)
        if state is None or state.subscribers is not None or state is self.broadcast:
            return
        op = command["op"]
        for session in list(state.sessions):
            if op == "disconnect":
                session.close(protocol.CLOSE_DISCONNECTED, "disconnected by the application")
            elif op == "unsubscribe":
                session.cancel_pending(command["channel"])
                sub = session.channels.get(command["channel"])
                if sub is not None:
                    session.drop_channel(sub, "unsubscribed", resubscribe=False)
        if op == "disconnect" and state.sessions:
            log.info("disconnected %d sockets of %r (flow.disconnect)", len(state.sessions), stream)

    def _fan_out(self, state: StreamState, seq: int, wire: bytes) -> None:
        if state is self.broadcast:
            ring = self.ring
            count = len(ring)
            self.sent_broadcast += count
            self.sent_broadcast_bytes += count * len(wire)
            for session in ring:
                session.deliver_all(seq, wire)
        elif state.subscribers is not None:
            subscribers = state.subscribers
            self.sent_channel += len(subscribers)
            self.sent_channel_bytes += len(subscribers) * len(wire)
            for sub in subscribers:
                sub.deliver(seq, wire)
        else:
            sessions = state.sessions
            self.sent_user += len(sessions)
            self.sent_user_bytes += len(sessions) * len(wire)
            for session in sessions:
                session.deliver_own(seq, wire)

    def _irregular(self, state: StreamState, seq: int, epoch: str, wire: bytes) -> None:
        if state.held is not None:  # a repair is running: it delivers this in order
            if epoch == state.epoch:
                self._hold(state, seq, epoch, wire)
            else:
                self.epoch_changed(state, epoch, seq)
            return
        if not state.synced:
            # A message before the subscription's answer: it says where the stream is.
            state.epoch, state.seq = epoch, seq - 1
            state.mark_synced()
            self.on_message(state.name, seq, epoch, wire)
            return
        if epoch != state.epoch:
            # Every socket of the stream is closed: nobody here is owed this message.
            self.epoch_changed(state, epoch, seq)
            return
        if seq <= state.seq:
            return  # a copy of what was delivered (a repair got it from history first)
        log.warning("stream %r: gap, expected seq %d, got %d; repairing from history", state.name,
                    state.seq + 1, seq)
        self._start_repair(state)
        self._hold(state, seq, epoch, wire)

    def on_position(self, stream: str, seq: int, epoch: str) -> None:
        state = self.streams.get(stream)
        if state is None:
            return
        if not state.synced:
            state.epoch, state.seq = epoch, seq
            state.mark_synced()
            return
        if epoch != state.epoch:
            self.epoch_changed(state, epoch, seq)
            return
        if seq > state.seq and state.held is None:
            log.warning("stream %r: the engine is at seq %d, %d arrived; repairing from history",
                        state.name, seq, state.seq)
            self._start_repair(state)

    def _hold(self, state: StreamState, seq: int, epoch: str, wire: bytes) -> None:
        held = state.held
        assert held is not None
        if state.held_bytes + len(wire) > REPAIR_HOLD_BYTES:
            # Dropped here, fetched from history when the repair reaches them.
            held.clear()
            state.held_bytes = 0
            return
        held.append((seq, epoch, wire))
        state.held_bytes += len(wire)

    def epoch_changed(self, state: StreamState, epoch: str, seq: int) -> None:
        """The stream was renumbered (the engine lost its history): its sockets must resume
        and be told recovered: false."""
        log.warning("stream %r: epoch %s -> %s; closing its %d sockets with 1012 so clients resume",
                    state.name, state.epoch, epoch, len(self._sessions_of(state)))
        self._close_all(state, "stream restarted")
        state.epoch, state.seq = epoch, seq
        state.held, state.held_bytes = None, 0
        state.audit_head = None  # a head of the old numbering says nothing of the new

    def _sessions_of(self, state: StreamState) -> list[Session]:
        if state.subscribers is not None:
            return [sub.session for sub in state.subscribers]
        return list(self.ring) if state is self.broadcast else list(state.sessions)

    def reconnect_window(self, closing: int) -> float:
        """Seconds over which ``closing`` clients of this server (and as many of each other
        server of the pool) should spread their reconnects."""
        pool = closing * self.settings.ws_processes
        return min(MAX_RECONNECT_WINDOW, max(MIN_RECONNECT_WINDOW, pool / RECONNECTS_PER_SECOND))

    def _close_all(self, state: StreamState, why: str) -> None:
        if state.subscribers is not None:
            # A channel's reset ends its subscriptions, not the sockets: each page
            # subscribes again with its position and is told recovered: false.
            subscribers = state.subscribers
            self.gap_closes += len(subscribers)
            for sub in subscribers:
                sub.session.drop_channel(sub, "reset", resubscribe=True)
            return
        sessions = self._sessions_of(state)
        reason = protocol.reconnect_reason(why, self.reconnect_window(len(sessions)))
        self.gap_closes += len(sessions)
        for session in sessions:
            session.close(protocol.CLOSE_ENGINE_GAP, reason)

    # -- repair

    def _start_repair(self, state: StreamState) -> None:
        state.held, state.held_bytes = [], 0
        self.repairs += 1
        self._spawn(self._repair(state))
        # What dropped this stream's messages (a full pipe, a lost link) dropped JOIN/LEAVE
        # too, which no history holds: listening subscriptions get fresh snapshots.
        now = time.monotonic()
        if now >= self._presence_refresh_after:
            self._presence_refresh_after = now + PRESENCE_REFRESH_MIN
            self.on_presence_reset()

    async def _repair(self, state: StreamState) -> None:
        """Deliver what the engine lost for ``state`` from history, then what was held."""
        name, epoch = state.name, state.epoch
        engine_head = state.seq
        try:
            while True:
                held = state.held
                if held and held[0][0] <= state.seq + 1:
                    break  # what was held continues from here
                # Held before the question: the engine had numbered them when it answered.
                asked_after = {id(entry) for entry in held or ()}
                answer = await self.engine.history({name: (state.seq, epoch)}, PAGE_BYTES)
                if state.held is None or state.epoch != epoch or self.streams.get(name) is not state:
                    return  # the epoch changed or the stream went meanwhile: handled there
                stream = None if answer is None else answer.get(name)
                if stream is not None and stream.epoch == epoch:
                    engine_head = max(engine_head, stream.seq)
                    self._drop_forged(state, asked_after, stream.seq)
                if stream is None or stream.messages is None or stream.epoch != epoch:
                    raise LookupError(name)
                before = state.seq
                for seq, wire in stream.messages:
                    if seq == state.seq + 1:
                        state.seq = seq
                        self._fan_out(state, seq, wire)
                self.flush()
                if state.seq >= stream.seq and not state.held:
                    break  # at the head, nothing held
                if state.seq == before:
                    # Held messages were numbered before this request was sent, so the
                    # answer covers them: what it lacks is gone.
                    raise LookupError(name)
        except LookupError:
            log.warning("stream %r: messages after seq %d are not in history; closing its sockets with 1012",
                        name, state.seq)
            # Numbering goes on from the engine's head: the sockets that missed the rest
            # are closed, and sockets that join later start from there.
            # Never from what was held: a message beyond every head the engine reported did not
            # come from it, and would make every real message after it look like a copy.
            head = max(state.seq, engine_head)
            state.held, state.held_bytes = None, 0
            self._close_all(state, "messages lost")
            state.seq = head
            return
        held, state.held, state.held_bytes = state.held, None, 0
        for seq, held_epoch, wire in held or ():
            self.on_message(name, seq, held_epoch, wire)
        self.flush()

    def _drop_forged(self, state: StreamState, asked_after: set[int], head: int) -> None:
        """Held messages that were here before a history question, numbered beyond the head
        its answer reports: the engine never numbered them (a forged or corrupt delivery,
        from whoever else can write to a shared Redis). Dropped, with one warning."""
        held = state.held
        if not held or not asked_after:
            return
        kept = [entry for entry in held if entry[0] <= head or id(entry) not in asked_after]
        if len(kept) != len(held):
            self.forged.warn(f"stream {state.name!r}: {len(held) - len(kept)} beyond the engine's head {head}")
            state.held = kept
            state.held_bytes = sum(len(wire) for _, _, wire in kept)

    async def _audits(self) -> None:
        cycle = 0
        while True:
            states = list(self.streams.values())
            trust_mark = cycle % AUDIT_ASK_EVERY != 0
            cycle += 1
            for part in range(AUDIT_SLICES):
                await asyncio.sleep(AUDIT_INTERVAL / AUDIT_SLICES)
                try:
                    await self.audit(states[part::AUDIT_SLICES], trust_mark)
                except Exception:
                    log.exception("stream audit failed")

    async def audit(self, streams: list[StreamState] | None = None, trust_mark: bool = True) -> None:
        """Compare the positions of ``streams`` (default: all) that were quiet since the last
        audit with the engine's. A stream still short of the head the previous audit saw
        lost messages that no later one revealed: repair. ``trust_mark``: decide without
        asking where the engine's change mark says nothing was numbered."""
        candidates = self.streams.values() if streams is None else streams
        states = []
        # Only from a live engine: one that went away answers nothing, so a repair started
        # from the mark it left would fail, close the stream's sockets, and start again.
        mark = self.engine.mark if trust_mark and self.engine.live else None
        for s in candidates:
            if not s.synced or s.held is not None or self.streams.get(s.name) is not s:
                continue
            if s.audit_seq is not None and s.seq != s.audit_seq:
                # It moved since the last audit, so nothing before its last message is
                # missing unseen (a gap shows in the seq). A trailing loss after it shows
                # in the next message, or in the audits once the stream is quiet: asking
                # now would cost the engine and us a question per busy stream per interval.
                s.audit_seq, s.audit_head = s.seq, None
                continue
            if mark is not None and s.audit_mark == mark and s.audit_head is not None:
                # Nothing was numbered anywhere since the engine gave audit_head: asking
                # would get the same head back. An idle deployment audits for nothing.
                # (The mark may be a second old: what was numbered since shows in the
                # next mark, so its loss is found an audit later than by asking.)
                if s.seq < s.audit_head:
                    self._lost_since_audit(s, s.audit_head)
                continue
            states.append(s)
        for start in range(0, len(states), AUDIT_CHUNK):
            chunk = states[start:start + AUDIT_CHUNK]
            answer = await self.engine.history({s.name: (s.seq, s.epoch) for s in chunk}, 0)
            if answer is None:
                return
            for state in chunk:
                stream = answer.get(state.name)
                if stream is None or self.streams.get(state.name) is not state or state.held is not None:
                    continue
                if stream.epoch != state.epoch:
                    self.epoch_changed(state, stream.epoch, stream.seq)
                    continue
                previous, state.audit_head = state.audit_head, stream.seq
                state.audit_seq, state.audit_mark = state.seq, stream.mark
                if previous is not None and state.seq < previous:
                    self._lost_since_audit(state, previous)

    def _lost_since_audit(self, state: StreamState, head: int) -> None:
        log.warning("stream %r: at seq %d, the engine was at %d an audit ago; repairing",
                    state.name, state.seq, head)
        self._start_repair(state)


COMPACT_MIN = 1024


class Timers:
    """Session deadlines (auth timeout, token expiry, end of grace) on one task: a heap
    of (when, session) instead of a timer per socket. Whoever changes a session's deadline
    calls :meth:`schedule`; an entry whose time is no longer the session's deadline is stale
    and skipped."""

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self.monotonic = monotonic
        # (when, session): sessions order among themselves (Session.__lt__), so no
        # tie-breaking counter: a heap entry a socket is two words and a float.
        self._heap: list[tuple[float, Session]] = []
        # Entries of closed or rescheduled sessions stay until their time comes; past
        # this size the heap is rebuilt from the live ones, so neither closed sockets
        # (held until their token's exp, an hour by default) nor repeated refreshes grow it.
        self._compact_at = COMPACT_MIN
        self._wake: asyncio.Event | None = None
        self._next: float | None = None

    def schedule(self, session: Session) -> None:
        when = session.deadline()
        if when is None:
            return
        heap = self._heap
        if len(heap) >= self._compact_at:
            self._compact()
        heapq.heappush(heap, (when, session))
        if self._wake is not None and (self._next is None or when < self._next):
            self._wake.set()

    def _compact(self) -> None:
        live = {}
        for when, session in self._heap:
            if session.deadline() == when:
                live[session] = when
        self._heap = [(when, session) for session, when in live.items()]
        heapq.heapify(self._heap)
        self._compact_at = max(COMPACT_MIN, 2 * len(self._heap))

    def due(self) -> None:
        """Tick every session whose deadline has passed."""
        heap, now = self._heap, self.monotonic()
        while heap and heap[0][0] <= now:
            when, session = heapq.heappop(heap)
            if session.deadline() != when:
                continue
            try:
                session.tick()
            except Exception:
                log.exception("session deadline failed")
                continue
            later = session.deadline()
            if later is not None and later > when:
                heapq.heappush(heap, (later, session))

    def __len__(self) -> int:
        return len(self._heap)

    async def run(self) -> None:
        self._wake = asyncio.Event()
        while True:
            self.due()
            self._next = self._heap[0][0] if self._heap else None
            self._wake.clear()
            timeout = None if self._next is None else max(0.0, self._next - self.monotonic())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass
