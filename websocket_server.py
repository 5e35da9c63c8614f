"""A Flow WebSocket server: authenticates browsers and relays their users' messages.

Run several (FLOW_WS_PROCESSES) on one port: each binds with SO_REUSEPORT and the
kernel spreads connections over them. Each server subscribes upstream only to the
users it has authenticated sockets for, plus broadcasts (PROTOCOL.md section 6).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import logging
import os
import signal
import socket
import time
from typing import Any, Callable, Iterator

import tornado.httpserver
import tornado.httputil
import tornado.iostream
import tornado.netutil
import tornado.web
import tornado.websocket
import zmq

from flowcore import protocol
from flowcore.runtime import start_process
from flowcore.settings import Settings
from flowcore.tokens import TokenError, TokenVerifier

log = logging.getLogger("flow.websocket")
client_log = logging.getLogger("flow.websocket.client")

# How long AUTH waits for the proxy to confirm a new subscription, and for history.
UPSTREAM_TIMEOUT = 5.0
# Batch size when draining ZeroMQ, so one flood cannot starve the event loop.
ZMQ_BATCH = 1000
# A bad frame costs this many rate-limit tokens; a good one costs one.
ERROR_COST = 5
NOBLOCK = int(zmq.NOBLOCK)  # a plain int: pyzmq's flag enums are slow on the hot path
HEARTBEAT_FRAME = protocol.encode_text_frame(protocol.HEARTBEAT.encode())
# The heartbeat goes out to one of this many groups of sockets at a time, a group every
# FLOW_HEARTBEAT / HEARTBEAT_GROUPS seconds: with many sockets, writing them all at once
# stalls the loop (and every message behind it) for a while every interval.
HEARTBEAT_GROUPS = 32
# Handshake headers are not read again once the socket is open; every open socket shares
# this empty set instead of keeping its own (about 1.5 KiB of dicts and lists each).
NO_HEADERS = tornado.httputil.HTTPHeaders()


class LazyDeque:
    """The part of collections.deque that tornado's IOStream uses for its write queue and
    write futures, holding nothing while empty. An empty deque keeps a 64-slot block
    (about 760 bytes with the object); every IOStream has two, and an idle socket's are
    empty nearly always, since frames go straight to the socket (FlowSocket._write)."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: collections.deque[Any] | None = None

    def append(self, item: Any) -> None:
        if self._items is None:
            self._items = collections.deque()
        self._items.append(item)

    def popleft(self) -> Any:
        if self._items is None:
            raise IndexError("pop from an empty deque")
        item = self._items.popleft()
        if not self._items:
            self._items = None
        return item

    def clear(self) -> None:
        self._items = None

    def __getitem__(self, index: int) -> Any:
        if self._items is None:
            raise IndexError("deque index out of range")
        return self._items[index]

    def __len__(self) -> int:
        return 0 if self._items is None else len(self._items)

    def __bool__(self) -> bool:
        return self._items is not None

    def __iter__(self) -> Iterator[Any]:
        return iter(()) if self._items is None else iter(self._items)


def slim_stream(stream: tornado.iostream.IOStream) -> None:
    """Swap the stream's two (empty) deques for LazyDeques. Tornado 6.6 internals: a
    tornado without them is left as it is (tests/test_server_parts.py checks the swap)."""
    buffer = getattr(stream, "_write_buffer", None)
    if isinstance(getattr(buffer, "_buffers", None), collections.deque) and not buffer._buffers:
        buffer._buffers = LazyDeque()
    if isinstance(getattr(stream, "_write_futures", None), collections.deque) and not stream._write_futures:
        stream._write_futures = LazyDeque()


def _nothing() -> None:
    pass


class ZmqReader:
    """Drains a ZeroMQ socket from the asyncio loop, in batches (its FD is edge-triggered,
    so every wake-up reads until the socket says EAGAIN). ``batch`` hooks, if given, run
    before and after each batch: the hub writes what a batch queued when it ends, in the
    same loop iteration, instead of scheduling one more."""

    def __init__(self, sock: zmq.Socket, handle: Callable[[Any], None], multipart: bool = False,
                 batch: tuple[Callable[[], None], Callable[[], None]] | None = None) -> None:
        self.sock = sock
        self.handle = handle
        self.batch_start, self.batch_done = batch or (_nothing, _nothing)
        self.receive = sock.recv_multipart if multipart else sock.recv
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(sock.getsockopt(zmq.FD), self.drain)
        self.loop.call_soon(self.drain)

    def drain(self) -> None:
        self.batch_start()
        try:
            if self._drain_batch():
                self.loop.call_soon(self.drain)
        finally:
            self.batch_done()

    def _drain_batch(self) -> bool:
        """Handle up to ZMQ_BATCH messages; True when there may be more."""
        receive, handle = self.receive, self.handle
        for _ in range(ZMQ_BATCH):
            try:
                message = receive(NOBLOCK)
            except zmq.Again:
                return False
            except zmq.ZMQError:
                if self.sock.closed:
                    return False
                raise
            try:
                handle(message)
            except Exception:
                log.exception("failed handling an upstream message")
        return True

    def close(self) -> None:
        self.loop.remove_reader(self.sock.getsockopt(zmq.FD))


class StreamState:
    """One upstream subscription: a user (or "*") and the sockets that receive it."""

    __slots__ = ("name", "topic", "sockets", "epoch", "seq", "synced", "waiters")

    def __init__(self, name: str, topic: bytes) -> None:
        self.name = name
        self.topic = topic
        # A tuple, rebuilt on join and leave: a user has a few tabs and joins are rare
        # next to deliveries; a tuple of one is half a list of one and a fifth of a set.
        self.sockets: tuple[FlowSocket, ...] = ()
        self.epoch = ""
        self.seq = 0
        self.synced = False
        self.waiters: list[asyncio.Future[None]] | None = None

    def mark_synced(self) -> None:
        self.synced = True
        waiters, self.waiters = self.waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)


class SocketRing:
    """The authenticated sockets, in groups that take turns at the heartbeat. Each socket
    still gets one every interval; a new one joins the group that just had its turn, since
    AUTH OK was just written to it."""

    def __init__(self, groups: int) -> None:
        # Dicts used as ordered sets: at thousands of entries a dict costs about 30 bytes
        # an entry where a set costs about 50.
        self.groups: list[dict[FlowSocket, None]] = [{} for _ in range(groups)]
        self.turn = 0  # the group whose turn is next

    def add(self, sock: "FlowSocket") -> None:
        group = (self.turn - 1) % len(self.groups)
        self.groups[group][sock] = None
        sock.ring_group = group

    def discard(self, sock: "FlowSocket") -> None:
        if sock.ring_group is not None:
            self.groups[sock.ring_group].pop(sock, None)
            sock.ring_group = None

    def take_turn(self) -> list["FlowSocket"]:
        """The sockets whose heartbeat is due now."""
        group = self.groups[self.turn]
        self.turn = (self.turn + 1) % len(self.groups)
        return list(group)

    def __iter__(self) -> Iterator["FlowSocket"]:
        return itertools.chain.from_iterable(self.groups)

    def __len__(self) -> int:
        return sum(map(len, self.groups))


class Hub:
    """Upstream side of one server: subscriptions, fan-out, history requests."""

    def __init__(self, settings: Settings, context: zmq.Context) -> None:
        self.settings = settings
        # Keyed by topic only: deliveries look up by topic, and joins derive it (cached).
        self.streams: dict[bytes, StreamState] = {}
        self.authenticated = SocketRing(HEARTBEAT_GROUPS)
        self.sub = context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, settings.zmq_hwm)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.connect(settings.fanout_endpoint)
        self.control = context.socket(zmq.DEALER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.connect(settings.control_endpoint)
        self._requests: dict[int, asyncio.Future[dict[str, protocol.StreamHistory]]] = {}
        self._next_request = 0
        self.readers: list[ZmqReader] = []
        self.upstream_messages = 0  # message frames received for user streams
        # Sockets with frames queued during this loop iteration; written once per batch.
        self.dirty: list[FlowSocket] = []
        # True while a flush is due anyway: scheduled, or the fan-out reader's batch is
        # running (it flushes when the batch ends).
        self._flush_due = False

    def start(self) -> None:
        self.readers = [
            ZmqReader(self.sub, self.on_delivery, batch=(self.begin_batch, self.flush)),
            ZmqReader(self.control, self.on_reply, multipart=True),
        ]
        self.broadcast = self._subscribe(protocol.BROADCAST)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()
        self.sub.close(0)
        self.control.close(0)

    # -- subscriptions

    def _subscribe(self, name: str) -> StreamState:
        topic = protocol.topic(name)
        state = self.streams[topic] = StreamState(name, topic)
        self.sub.setsockopt(zmq.SUBSCRIBE, state.topic)
        # Changing subscriptions can consume the FD's edge: look again.
        asyncio.get_running_loop().call_soon(self.readers[0].drain)
        return state

    async def join(self, sock: "FlowSocket", username: str) -> StreamState:
        """Register ``sock`` for ``username``; wait (bounded) until the stream is synced."""
        state = self.streams.get(protocol.topic(username)) or self._subscribe(username)
        if sock not in state.sockets:
            state.sockets += (sock,)
        await self.wait_synced(state)
        return state

    async def wait_synced(self, state: StreamState) -> None:
        if not state.synced:
            waiter = asyncio.get_running_loop().create_future()
            if state.waiters is None:
                state.waiters = []
            state.waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, UPSTREAM_TIMEOUT)
            except asyncio.TimeoutError:
                log.error("proxy did not confirm the subscription to %r in %ss", state.name, UPSTREAM_TIMEOUT)

    def leave(self, sock: "FlowSocket", username: str) -> None:
        self.authenticated.discard(sock)
        state = self.streams.get(protocol.topic(username))
        if state is None:
            return
        state.sockets = tuple(s for s in state.sockets if s is not sock)
        if not state.sockets:
            del self.streams[state.topic]
            self.sub.setsockopt(zmq.UNSUBSCRIBE, state.topic)
            asyncio.get_running_loop().call_soon(self.readers[0].drain)

    # -- fan-out

    def mark_dirty(self, sock: "FlowSocket") -> None:
        self.dirty.append(sock)
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self.flush)

    def begin_batch(self) -> None:
        self._flush_due = True

    def flush(self) -> None:
        self._flush_due = False
        if self.dirty:
            dirty, self.dirty = self.dirty, []
            for sock in dirty:
                sock.flush_outbox()

    def on_delivery(self, raw: bytes) -> None:
        try:
            delivery = protocol.decode_delivery(raw)
        except protocol.ProtocolError as exc:
            log.error("malformed message from the proxy: %s", exc)
            return
        state = self.streams.get(delivery.topic)
        is_message = delivery.kind == protocol.KIND_MESSAGE
        if is_message and state is not self.broadcast:
            self.upstream_messages += 1
        if state is None:
            return  # unsubscribed a moment ago
        if state.synced and delivery.epoch != state.epoch:
            self.on_epoch_change(state, delivery.epoch)
            # Renumbered from here: neither a sync nor the next message is a gap.
            state.seq = delivery.seq - is_message
        if not is_message:
            if not state.synced:
                state.epoch, state.seq = delivery.epoch, delivery.seq
                state.mark_synced()
            elif delivery.seq > state.seq:
                log.error("stream %r: proxy is at seq %d, we saw %d: messages were lost upstream",
                          state.name, delivery.seq, state.seq)
                state.seq = delivery.seq
            return
        seq = delivery.seq
        if state.synced and seq > state.seq + 1:
            log.error("stream %r: gap from seq %d to %d", state.name, state.seq, seq)
        state.epoch = delivery.epoch
        if seq > state.seq:
            state.seq = seq
        if not state.synced:
            state.mark_synced()
        wire = delivery.frame  # the proxy framed it for WebSocket once, for every server
        if state is self.broadcast:
            for sock in self.authenticated:
                sock.deliver(True, seq, wire)
        else:
            for sock in state.sockets:
                sock.deliver(False, seq, wire)

    def on_epoch_change(self, state: StreamState, epoch: str) -> None:
        """The proxy restarted and its history is gone: make the clients resume, honestly."""
        log.warning("stream %r: epoch %s -> %s (proxy restarted); closing its sockets so clients resume",
                    state.name, state.epoch, epoch)
        state.epoch = epoch
        targets = self.authenticated if state.name == protocol.BROADCAST else state.sockets
        for sock in list(targets):
            sock.close(protocol.CLOSE_GOING_AWAY, "stream restarted")

    # -- history

    async def history(
        self, streams: dict[str, tuple[int, str]]
    ) -> dict[str, protocol.StreamHistory] | None:
        self._next_request += 1
        request_id = self._next_request
        future: asyncio.Future[dict[str, protocol.StreamHistory]] = asyncio.get_running_loop().create_future()
        self._requests[request_id] = future
        try:
            self.control.send_multipart([b"", protocol.build_history_request(request_id, streams)], zmq.NOBLOCK)
            asyncio.get_running_loop().call_soon(self.readers[1].drain)
            return await asyncio.wait_for(future, UPSTREAM_TIMEOUT)
        except (asyncio.TimeoutError, zmq.Again):
            log.error("proxy did not answer a history request in %ss", UPSTREAM_TIMEOUT)
            return None
        finally:
            self._requests.pop(request_id, None)

    def on_reply(self, frames: list[bytes]) -> None:
        try:
            request_id, streams = protocol.parse_history_reply(frames[-1])
        except protocol.ProtocolError as exc:
            log.error("malformed control reply from the proxy: %s", exc)
            return
        future = self._requests.get(request_id)
        if future is not None and not future.done():
            future.set_result(streams)


class FlowSocket(tornado.websocket.WebSocketHandler):
    """One browser tab."""

    # Our state lives in slots, not in the instance dict: tornado already puts 27
    # attributes there, and past 30 CPython stops sharing the dict's keys between
    # instances, which costs ~1.5 KiB per connection.
    __slots__ = (
        "server", "settings_", "username", "attempts", "authenticating", "resuming",
        "seq_own", "seq_all", "outbox", "outbox_bytes", "allowance_at", "closing", "ring_group",
    )

    def initialize(self, server: "Server") -> None:
        self.server = server
        self.settings_ = server.settings
        self.username: str | None = None
        self.attempts = 0
        self.authenticating = False
        self.resuming: list[tuple[bool, int, bytes]] | None = None
        # Last seq written on the user's own stream and on broadcasts: later copies are dropped.
        self.seq_own = 0
        self.seq_all = 0
        # Message frames waiting for this iteration's flush; None (not an empty list) while
        # idle, which is most of a socket's life.
        self.outbox: list[bytes] | None = None
        self.outbox_bytes = 0
        # Rate limit as one timestamp (the generic cell rate algorithm): the time at which
        # the bucket would be full again. A token bucket needs two floats per socket.
        self.allowance_at = 0.0
        self.closing = False
        self.ring_group: int | None = None  # see SocketRing

    # -- handshake

    def check_origin(self, origin: str) -> bool:
        if origin in self.server.allowed_origins:
            return True
        if super().check_origin(origin):
            return True
        client_log.warning("refused handshake from origin %r (host %r)", origin, self.request.host)
        return False

    def get_compression_options(self) -> None:
        return None  # frames are encoded once and written to every socket as they are

    def open(self) -> None:
        self.server.sockets[self] = None
        self.request.headers = self._headers = NO_HEADERS
        stream = self.ws_connection.stream  # type: ignore[union-attr]
        stream.set_nodelay(True)
        slim_stream(stream)
        # Tornado's write buffer has no bound of its own; past this, the tab is closed 4008.
        stream.max_write_buffer_size = self.settings_.send_backlog
        self._send(protocol.auth_request())
        # One sweep for all sockets instead of a timer each: see Server._auth_deadlines.
        self.server.awaiting_auth[self] = time.monotonic() + self.settings_.auth_timeout

    def auth_timed_out(self) -> None:
        client_log.warning("%s: no valid token within %ss", self.peer, self.settings_.auth_timeout)
        self.close(protocol.CLOSE_AUTH_TIMEOUT, "authentication timeout")

    @property
    def peer(self) -> str:
        # The server runs with xheaders: remote_ip already honours nginx's X-Real-IP.
        return self.request.remote_ip or "?"

    # -- client frames

    def _charge(self, cost: float) -> bool:
        """Spend ``cost`` frames of the allowance: FLOW_RATE_LIMIT a second, bursts of
        FLOW_RATE_BURST. False (and the socket closed 4029) when it is spent."""
        settings = self.settings_
        now = time.monotonic()
        self.allowance_at = max(self.allowance_at, now) + cost / settings.rate_limit
        # The slack absorbs rounding in the sum of many 1/rate steps.
        if self.allowance_at - now > (settings.rate_burst + 1e-6) / settings.rate_limit:
            client_log.warning("%s (%s): too many frames, closing 4029", self.peer, self.username)
            self.close(protocol.CLOSE_RATE_LIMITED, "rate limit")
            return False
        return True

    async def on_message(self, message: str | bytes) -> None:
        if self.closing or not self._charge(1):
            return
        if isinstance(message, bytes):
            self._refuse("binary frames are not part of the protocol")
            return
        try:
            frame = protocol.parse_client_frame(message)
        except protocol.ProtocolError as exc:
            self._refuse(str(exc))
            return
        if isinstance(frame, protocol.Ping):
            if not frame.heartbeat:
                self._send(protocol.pong())
            return
        if self.username is not None or self.authenticating:
            self._refuse("already authenticated" if self.username else "authentication in progress")
            return
        await self._authenticate(frame)

    def _refuse(self, reason: str) -> None:
        client_log.warning("%s (%s): %s", self.peer, self.username, reason)
        if self._charge(ERROR_COST - 1):
            self._send(protocol.error(reason))

    async def _authenticate(self, frame: protocol.Authenticate) -> None:
        try:
            username = self.server.verifier.verify(frame.token)
        except TokenError as exc:
            self.attempts += 1
            client_log.warning("%s: token refused (%s), attempt %d of %d",
                               self.peer, exc, self.attempts, self.settings_.auth_attempts)
            self._send(protocol.auth_failed(exc.reason))
            if self.attempts >= self.settings_.auth_attempts:
                self.close(protocol.CLOSE_AUTH_FAILED, "authentication failed")
            else:
                self._send(protocol.auth_request())
            return
        self.authenticating = True
        # Until AUTH OK (and any history) is out, live messages wait here.
        self.resuming = []
        hub = self.server.hub
        wanted = {k: v for k, v in frame.resume.items() if k in (username, protocol.BROADCAST)}
        state = await hub.join(self, username)
        if self.closing:
            hub.leave(self, username)
            return
        self.server.awaiting_auth.pop(self, None)
        self.username = username
        hub.authenticated.add(self)
        recovered, backlog = False, []
        if wanted:
            await hub.wait_synced(hub.broadcast)
            reply = await hub.history(wanted)
            if reply is not None and all(
                name in reply and reply[name].messages is not None for name in wanted
            ):
                recovered = True
                for name in wanted:
                    broadcast = name == protocol.BROADCAST
                    for seq, body in reply[name].messages or ():
                        backlog.append((broadcast, seq, protocol.encode_text_frame(body)))
        self._send(protocol.auth_ok(username, state.epoch, self.settings_.heartbeat, recovered, len(backlog)))
        client_log.info("%s authenticated as %r (recovered=%s, missed=%d)",
                        self.peer, username, recovered, len(backlog))
        buffered, self.resuming = self.resuming, None
        for broadcast, seq, wire in backlog + buffered:
            self.deliver(broadcast, seq, wire)
        self.authenticating = False

    # -- server frames

    def _send(self, text: str) -> None:
        self._write(protocol.encode_text_frame(text.encode("utf-8")))

    def deliver(self, broadcast: bool, seq: int, wire: bytes) -> None:
        """Queue one pre-encoded message frame, unless this socket already has it."""
        if self.resuming is not None:
            self.resuming.append((broadcast, seq, wire))
            return
        if broadcast:
            if seq <= self.seq_all:
                return
            self.seq_all = seq
        else:
            if seq <= self.seq_own:
                return
            self.seq_own = seq
        if self.closing:
            return
        if self.outbox is None:
            self.outbox = [wire]
            self.server.hub.mark_dirty(self)
        else:
            self.outbox.append(wire)
        self.outbox_bytes += len(wire)
        if self.outbox_bytes > self.settings_.send_backlog:
            self.flush_outbox()  # keeps one write, and so the backlog, under the bound

    def flush_outbox(self) -> None:
        """Write everything queued by this loop iteration in one call (one syscall)."""
        outbox = self.outbox
        if outbox is not None:
            self.outbox = None
            self.outbox_bytes = 0
            self._write(outbox[0] if len(outbox) == 1 else b"".join(outbox))

    def _write(self, wire: bytes) -> None:
        # Frames are already WebSocket-encoded: tornado's write_message would make a task
        # per frame. When nothing is buffered, one send() straight to the socket; the rest,
        # and any frame behind buffered bytes, goes through the stream's (bounded) buffer.
        conn = self.ws_connection
        if self.closing or conn is None or conn.is_closing():
            return
        stream = conn.stream  # type: ignore[attr-defined]
        if not stream.writing():
            try:
                sent = stream.socket.send(wire)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # let the stream's own write hit the error and close cleanly
            if sent == len(wire):
                return
            if sent:
                # The rest of a frame already begun must follow it, even past the bound
                # (by less than a bound and a frame): a cut frame would corrupt the stream.
                limit, stream.max_write_buffer_size = stream.max_write_buffer_size, None
                try:
                    stream.write(wire[sent:])
                except tornado.iostream.StreamClosedError:
                    return
                finally:
                    stream.max_write_buffer_size = limit
                if limit is not None and len(wire) - sent > limit:
                    self._slow_consumer()
                return
        try:
            stream.write(wire)
        except tornado.iostream.StreamBufferFullError:
            self._slow_consumer()
        except tornado.iostream.StreamClosedError:
            pass

    def send_heartbeat(self) -> None:
        self._write(HEARTBEAT_FRAME)

    def _slow_consumer(self) -> None:
        client_log.warning("%s (%s): send backlog over %d bytes, closing 4008",
                           self.peer, self.username, self.settings_.send_backlog)
        conn = self.ws_connection
        if conn is not None:
            conn.stream.max_write_buffer_size = None  # type: ignore[attr-defined]
        self.close(protocol.CLOSE_SLOW_CONSUMER, "slow consumer")

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        self.flush_outbox()  # what was already routed here goes out before the close frame
        self.closing = True
        super().close(code, reason)

    def on_close(self) -> None:
        self.closing = True
        self.server.awaiting_auth.pop(self, None)
        self.server.sockets.pop(self, None)
        if self.username is not None:
            self.server.hub.leave(self, self.username)
        elif self.authenticating:
            pass  # join() is still waiting; _authenticate leaves when it resumes

    def get_websocket_protocol(self) -> Any:
        proto = super().get_websocket_protocol()
        if proto is None:
            return None
        # Built anew with the same parameters rather than by swapping __class__, which
        # unshares the instance dict and costs ~300 bytes per connection.
        return DrainingProtocol(self, False, proto.params)


class DrainingProtocol(tornado.websocket.WebSocketProtocol13):
    """Tornado aborts the TCP connection right after refusing an oversized frame, so the
    client, still sending, gets a reset instead of the 1009 close frame. Instead, read and
    discard what the client is still sending for a moment, then close."""

    draining = False
    sent_code: int | None = None

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        if not self.server_terminated:
            self.sent_code = code
        super().close(code, reason)

    def _abort(self) -> None:
        if self.sent_code == protocol.CLOSE_TOO_BIG and not self.client_terminated \
                and not self.draining and self.stream is not None and not self.stream.closed():
            self.draining = True
            self.client_terminated = True
            asyncio.ensure_future(self._drain_then_close())
            return
        super()._abort()

    async def _drain_then_close(self) -> None:
        stream = self.stream
        deadline = time.monotonic() + 5
        try:
            while time.monotonic() < deadline:
                await asyncio.wait_for(stream.read_bytes(65536, partial=True), 1.0)
        except (asyncio.TimeoutError, tornado.iostream.StreamClosedError):
            pass
        finally:
            super()._abort()


class StatsHandler(tornado.web.RequestHandler):
    """Counters for operators and tests; nginx does not route here."""

    def initialize(self, server: "Server") -> None:
        self.server = server

    def get(self) -> None:
        hub = self.server.hub
        self.write(
            {
                "sockets": len(self.server.sockets),
                "authenticated": len(hub.authenticated),
                "streams": sorted(state.name for state in hub.streams.values()),
                "upstream_messages": hub.upstream_messages,
                "pid": os.getpid(),
            }
        )


class Server:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.verifier = TokenVerifier(settings)
        self.allowed_origins = set(settings.allowed_origins)
        self.context = zmq.Context()
        self.hub = Hub(settings, self.context)
        self.sockets: dict[FlowSocket, None] = {}  # every open socket (an ordered set)
        self.awaiting_auth: dict[FlowSocket, float] = {}  # socket -> auth deadline
        self.http: tornado.httpserver.HTTPServer | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def make_app(self) -> tornado.web.Application:
        return tornado.web.Application(
            [
                (r"/websocket", FlowSocket, {"server": self}),
                (r"/stats", StatsHandler, {"server": self}),
            ],
            websocket_max_message_size=self.settings.max_frame,
        )

    async def start(self, port: int) -> None:
        self.hub.start()
        sockets = tornado.netutil.bind_sockets(port, "127.0.0.1", family=socket.AF_INET, reuse_port=True)
        self.http = tornado.httpserver.HTTPServer(self.make_app(), xheaders=True)
        self.http.add_sockets(sockets)
        self.tasks = [asyncio.ensure_future(self._heartbeats()), asyncio.ensure_future(self._auth_deadlines())]
        log.info("websocket server up on 127.0.0.1:%d (fan-out %s)", port, self.settings.fanout_endpoint)

    async def _heartbeats(self) -> None:
        ring = self.hub.authenticated
        tick = self.settings.heartbeat / len(ring.groups)
        due = time.monotonic()
        while True:
            # Paced from a fixed start, so a group's interval does not creep past FLOW_HEARTBEAT.
            due += tick
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            for sock in ring.take_turn():
                sock.send_heartbeat()

    async def _auth_deadlines(self) -> None:
        period = min(1.0, self.settings.auth_timeout / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for sock, deadline in list(self.awaiting_auth.items()):
                if deadline <= now and sock.username is None and not sock.authenticating:
                    del self.awaiting_auth[sock]
                    sock.auth_timed_out()

    async def drain(self) -> None:
        """Stop accepting, close every socket with 1001, wait (bounded) for them to go."""
        if self.http is not None:
            self.http.stop()
        for task in self.tasks:
            task.cancel()
        for sock in list(self.sockets):
            sock.close(protocol.CLOSE_GOING_AWAY, "server shutting down")
        deadline = time.monotonic() + self.settings.drain_timeout
        while self.sockets and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.http is not None:
            await self.http.close_all_connections()
        self.hub.close()
        self.context.term()


async def serve(settings: Settings, port: int) -> None:
    server = Server(settings)
    await server.start(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining %d sockets", len(server.sockets))
    await server.drain()
    log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Flow WebSocket server")
    parser.add_argument("--port", type=int, help="listen port (default FLOW_WS_PORT)")
    args = parser.parse_args(argv)
    settings = start_process("websocket_server")
    asyncio.run(serve(settings, args.port or settings.ws_port))


if __name__ == "__main__":
    main()
