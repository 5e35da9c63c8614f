"""The ZeroMQ engine (``FLOW_ENGINE=zmq``): one proxy process, everything on one host.

Publishers PUSH to the proxy (``message_proxy.py``), which numbers each message, keeps
its history and fans it out through XPUB; each WebSocket server SUBscribes to the exact
topics of its streams and asks for history on a DEALER. The framing is
:mod:`flowcore.protocol`'s (its module docstring and its history section).

ZeroMQ hands the asyncio loop an edge-triggered file descriptor per socket: a wake-up
means "something changed", so every wake-up reads until the socket says EAGAIN, and
anything that talks to the socket (a send, a (un)subscribe) may consume the edge, so it is
followed by one more read.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import secrets
import threading
import time
from typing import Any, Callable, Mapping

import orjson
import zmq

from .. import compat, protocol
from ..engine import EngineSink, Position, QueueFull, Receipt, StreamHistory, Unavailable
from ..presence import Snapshot, renew_interval
from ..runtime import Throttled
from ..settings import Settings, parse_endpoint

log = logging.getLogger("flow.engine.zmq")

# Messages read per batch, so that one flood cannot starve the event loop.
BATCH = 1000
# How long history() waits for the proxy.
HISTORY_TIMEOUT = 5.0
# The link is pinged this often, and is live while the proxy answered anything within
# LIVE_WINDOW: a dead proxy shows within about three seconds.
PING_INTERVAL = 1.0
LIVE_WINDOW = 3.0
# Bad input from the proxy is warned about at most once per this many seconds.
WARNING_INTERVAL = 30.0

# Plain ints: pyzmq's flag enums cost more than a small send or receive.
NOBLOCK = int(zmq.NOBLOCK)
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)
_SUBSCRIBE = int(zmq.SUBSCRIBE)
_UNSUBSCRIBE = int(zmq.UNSUBSCRIBE)
_KIND_MESSAGE = protocol.KIND_MESSAGE
_KIND_COMMAND = protocol.KIND_COMMAND
_KIND_PRESENCE = protocol.KIND_PRESENCE
# A server reports its ledger's changes this long after the first of them, in requests of
# at most REPORT_CHUNK counts (a full report of 100k sockets would pass the proxy's limit
# on one control request).
REPORT_DELAY = 0.02
REPORT_CHUNK = 20_000
# How long a presence query waits for the proxy.
PRESENCE_TIMEOUT = 5.0
# At close, how long the goodbye (the server's counts go) may take to leave.
BYE_LINGER_MS = 500

# ---- the publisher's fast path (ZeroMQ only) ----------------------------------------------
# flow.Flow.push sends on ZmqPublisherEngine.socket itself, once it is open, with
# FAST_SEND(socket, frame, NOBLOCK): the compiled send under pyzmq's Python wrapper (which
# only adds routing-id/group handling we never use) costs a third of a small send, and
# every Python call saved is about 5% of a push. On FAST_REFUSED it calls send(), which
# tries once more and raises QueueFull.
FAST_SEND = compat.zmq_fast_send()  # a pyzmq internal: flowcore.compat checks it
FAST_REFUSED = zmq.Again


# A flush asks the proxy again this often while it waits (a proxy restarted meanwhile has
# the marker but not the first request), and its reader looks at new requests this often.
FLUSH_ASK_AGAIN = 1.0
FLUSH_SLICE = 0.02


def check_endpoint(endpoint: str, name: str) -> None:
    """Refuse an endpoint FLOW_PUBLISH_ENDPOINT would refuse (ValueError, one line)."""
    try:
        parse_endpoint(endpoint)
    except ValueError as exc:
        raise ValueError(f"{name}={endpoint!r}: {exc}") from None


def control_endpoint_for(endpoint: str, settings: Settings) -> str:
    """Where a publisher on ``endpoint`` asks for its flushes, when not told: the settings'
    control endpoint, or, for another proxy's TCP endpoint (``Flow("tcp://10.0.0.5:5561")``),
    that host at the settings' control port. Asking the settings' own proxy about a marker
    sent to another one would never be answered: every push reported lost at exit."""
    if endpoint == settings.publish_endpoint:
        return settings.control_endpoint
    publish, control = endpoint.rpartition(":"), settings.control_endpoint.rpartition(":")
    if endpoint.startswith("tcp://") and control[0].startswith("tcp://") and publish[1] and control[1]:
        return f"{publish[0]}:{control[2]}"
    return settings.control_endpoint


_context_lock = threading.Lock()


class ZmqPublisherEngine:
    """A PUSH socket to the proxy, opened at the first send, and a DEALER to its control
    socket, opened at the first flush. Thread-safety of send and flush_marker is the
    caller's (flow.Flow's lock); wait_flushed is safe from many threads on its own."""

    def __init__(
        self,
        settings: Settings,
        endpoint: str | None = None,
        queue_size: int | None = None,
        linger: float | None = None,
        control_endpoint: str | None = None,
    ) -> None:
        self.endpoint = endpoint or settings.publish_endpoint
        if endpoint:
            check_endpoint(endpoint, "endpoint")
        if control_endpoint:
            check_endpoint(control_endpoint, "control_endpoint")
        self.control_endpoint = control_endpoint or control_endpoint_for(self.endpoint, settings)
        # Messages ZeroMQ queues while the proxy is unreachable (its high-water mark).
        self.queue_size = queue_size or settings.push_queue
        # Seconds close() waits for the queue to drain.
        self.linger = settings.push_linger if linger is None else linger
        # None until the first send; what flow.Flow's fast path sends on.
        self.socket: zmq.Socket[Any] | None = None
        self._context: zmq.Context[Any] | None = None
        self._closed = False
        self._init_flush()

    def _init_flush(self) -> None:
        # Only the thread that is the reader (_reading) touches the DEALER: ZeroMQ sockets
        # are not thread-safe, and a flusher must not hold a lock while it waits.
        self._control: zmq.Socket[Any] | None = None
        self._flush_cond = threading.Condition(threading.Lock())
        self._reading = False
        self._outbox: list[bytes] = []
        self._waiting: set[str] = set()
        self._flushed: set[str] = set()
        self._request_id = 0
        # Other requests (presence, online, confirmed pushes): rid -> answer, None until it came.
        self._answers: dict[int, dict[str, Any] | None] = {}

    def send(self, frame: bytes) -> None:
        try:
            FAST_SEND(self.socket or self._open(), frame, NOBLOCK)
        except zmq.Again:
            raise QueueFull(
                f"proxy at {self.endpoint} is not taking messages and "
                f"{self.queue_size} are queued; message not sent"
            ) from None

    def _ensure_context(self) -> zmq.Context[Any]:
        # The first push (under flow.Flow's lock) and the first query (a reader, without
        # it) may come at once from two threads.
        with _context_lock:
            if self._context is None:
                self._context = zmq.Context()
            return self._context

    def _open(self) -> zmq.Socket[Any]:
        if self._closed:
            raise RuntimeError("this Flow publisher is closed")
        sock = self._ensure_context().socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, self.queue_size)
        sock.setsockopt(zmq.LINGER, int(self.linger * 1000))
        # A PUSH queues before its connection is up: nothing is lost to a slow joiner.
        sock.connect(self.endpoint)
        self.socket = sock
        return sock

    # ---------------------------------------------------------------- flush

    def flush_marker(self) -> str | None:
        """Queue a flush marker behind every frame sent so far; its token, for
        :meth:`wait_flushed`. None when there is nothing to mark (nothing sent, or closed)
        or the queue is full (try again later)."""
        sock = self.socket
        if sock is None or self._closed:
            return None
        token = secrets.token_hex(protocol.FLUSH_TOKEN_CHARS // 2)
        try:
            FAST_SEND(sock, protocol.flush_marker(token), NOBLOCK)
        except zmq.Again:
            return None
        return token

    def wait_flushed(self, token: str, timeout: float) -> bool:
        """Whether the proxy confirms, within ``timeout`` seconds, that it took everything
        sent before the marker ``token``."""
        deadline = time.monotonic() + timeout
        cond = self._flush_cond
        with cond:
            self._waiting.add(token)
        try:
            ask_at = 0.0
            while True:
                with cond:
                    if token in self._flushed:
                        return True
                    now = time.monotonic()
                    if now >= deadline or self._closed:
                        return False
                    if now >= ask_at:
                        self._request_id += 1
                        self._outbox.append(protocol.build_flush_request(self._request_id, token))
                        ask_at = now + FLUSH_ASK_AGAIN
                    if self._reading:
                        cond.wait(min(deadline, ask_at) - now)
                        continue
                    self._reading = True
                try:
                    if self._control is None:
                        self._control = self._open_control()
                    self._read_replies(self._control, min(deadline, ask_at))
                finally:
                    with cond:
                        self._reading = False
                        cond.notify_all()  # another waiter becomes the reader
        finally:
            with cond:
                self._waiting.discard(token)
                self._flushed.discard(token)

    def ask(self, build: Callable[[int], bytes], timeout: float) -> dict[str, Any] | None:
        """Send the control request ``build(rid)`` once and wait up to ``timeout`` seconds
        for its answer (the decoded JSON header); None when none came. Safe from many
        threads at once, without the caller's lock, like :meth:`wait_flushed`."""
        deadline = time.monotonic() + timeout
        cond = self._flush_cond
        with cond:
            if self._closed:
                return None
            self._request_id += 1
            request_id = self._request_id
            self._answers[request_id] = None
            self._outbox.append(build(request_id))
        try:
            while True:
                with cond:
                    answer = self._answers.get(request_id)
                    if answer is not None:
                        return answer
                    now = time.monotonic()
                    if now >= deadline or self._closed:
                        return None
                    if self._reading:
                        cond.wait(deadline - now)
                        continue
                    self._reading = True
                try:
                    if self._control is None:
                        self._control = self._open_control()
                    self._read_replies(self._control, deadline, request_id)
                finally:
                    with cond:
                        self._reading = False
                        cond.notify_all()
        finally:
            with cond:
                self._answers.pop(request_id, None)

    def _presence_answer(self, build: Callable[[int], bytes], timeout: float) -> tuple[Snapshot | None, int]:
        """:meth:`ask` a presence or online question: (snapshot, online). Raises Unavailable."""
        answer = self.ask(build, timeout)
        if answer is None:
            raise Unavailable(f"the proxy at {self.control_endpoint} did not answer in {timeout:g}s")
        try:
            _, snapshot, online = protocol.parse_presence_reply(answer)
        except protocol.ProtocolError as exc:
            raise Unavailable(f"the proxy's answer was malformed: {exc}") from None
        return snapshot, online

    def presence(self, stream: str, timeout: float, limit: int | None = None) -> Snapshot:
        snapshot, _ = self._presence_answer(
            lambda rid: protocol.build_presence_request(rid, None, {}, query=stream, limit=limit), timeout)
        if snapshot is None:
            raise Unavailable("the proxy's answer held no presence")
        return snapshot

    def online(self, stream: str, timeout: float) -> int:
        return self._presence_answer(lambda rid: protocol.build_online_request(rid, stream), timeout)[1]

    # ---------------------------------------------------------------- confirmed pushes

    def send_confirmed(self, frame: bytes, timeout: float) -> str:
        """Send ``frame`` (a push) on the PUSH socket as a confirmed push, behind every
        frame sent before it, without blocking; the proxy numbers it only within
        ``timeout`` seconds from now. A token for :meth:`wait_receipt`. Raises QueueFull."""
        token = secrets.token_hex(protocol.FLUSH_TOKEN_CHARS // 2)
        deadline_ms = int((time.time() + max(0.0, timeout)) * 1000)
        self.send(protocol.confirmed_push(token, deadline_ms, frame))
        return token

    def wait_receipt(self, token: str, timeout: float) -> Receipt:
        """The receipt of the confirmed push ``token``, waiting up to ``timeout`` seconds.
        Raises Unavailable. Safe from many threads at once, without the caller's lock."""
        answer = self.ask(lambda rid: protocol.build_receipt_request(rid, token), timeout)
        if answer is None:
            raise Unavailable(f"the proxy at {self.control_endpoint} did not confirm the message "
                              f"in {timeout:g}s")
        try:
            answered, stream, seq, epoch, online = protocol.parse_receipt_reply(answer)
        except protocol.ProtocolError as exc:
            raise Unavailable(f"the proxy's receipt was malformed: {exc}") from None
        if answered != token:
            raise Unavailable("the proxy's receipt is for another message")
        return Receipt(protocol.public_stream_name(stream), seq, epoch, online)

    def _open_control(self) -> zmq.Socket[Any]:
        if self._closed:
            raise RuntimeError("this Flow publisher is closed")
        control = self._ensure_context().socket(zmq.DEALER)
        control.setsockopt(zmq.LINGER, 0)
        control.connect(self.control_endpoint)
        return control

    def _read_replies(self, control: zmq.Socket[Any], until: float, request_id: int | None = None) -> None:
        """As the reader: send what waiters asked, and take answers until ``until`` or
        until one is for a waiter (or for ``request_id``), in slices, so that new requests
        go out promptly."""
        cond = self._flush_cond
        while True:
            with cond:
                outbox, self._outbox = self._outbox, []
                if self._closed:
                    return
            for request in outbox:
                try:
                    control.send_multipart([b"", request], NOBLOCK)
                except zmq.Again:
                    pass  # a thousand requests queued for a proxy that is away: asked again later
            left = until - time.monotonic()
            if left <= 0:
                return
            answered = []
            replies: dict[int, dict[str, Any]] = {}
            if control.poll(max(1, int(min(left, FLUSH_SLICE) * 1000))):
                for _ in range(1000):
                    try:
                        frames = control.recv_multipart(NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        if len(frames) != 2 or frames[0] != b"":
                            raise protocol.ProtocolError(f"{len(frames)} frames")
                        try:
                            header = orjson.loads(frames[1])
                        except orjson.JSONDecodeError:
                            raise protocol.ProtocolError("not JSON") from None
                        if isinstance(header, dict) and "flushed" not in header:
                            if type(header.get("rid")) is not int:
                                raise protocol.ProtocolError("no rid")
                            replies[header["rid"]] = header
                            continue
                        answered.append(protocol.parse_flush_reply(frames[1])[1])
                    except protocol.ProtocolError as exc:
                        log.warning("ignored a bad answer from the proxy at %s: %s",
                                    self.control_endpoint, exc)
            if answered or replies:
                with cond:
                    done = [token for token in answered if token in self._waiting]
                    self._flushed.update(done)
                    mine = False
                    for rid, header in replies.items():
                        if rid in self._answers:  # else it came after its asker gave up
                            self._answers[rid] = header
                            mine = mine or rid == request_id
                    if done or mine or replies:
                        cond.notify_all()
                    if done or mine:
                        return

    def flush(self, timeout: float) -> bool:
        """Whether everything sent so far reached the proxy within ``timeout`` seconds
        (True at once when nothing was ever sent). Thread-safety is the caller's, as for send."""
        if self.socket is None:
            return True
        deadline = time.monotonic() + timeout
        while True:
            token = self.flush_marker()
            if token is not None:
                return self.wait_flushed(token, deadline - time.monotonic())
            if self._closed or time.monotonic() >= deadline:
                return False
            time.sleep(FLUSH_SLICE)  # the queue is full: room comes when the proxy does

    # ---------------------------------------------------------------- close, fork

    def close(self, linger: float | None = None) -> None:
        cond = self._flush_cond
        with cond:
            self._closed = True
            cond.notify_all()
            # A reader sees _closed within a slice, then leaves the DEALER alone.
            cond.wait_for(lambda: not self._reading, 1.0)
            control, self._control = self._control, None
        sock, context = self.socket, self._context
        self.socket = self._context = None
        if control is not None:
            control.close(linger=0)
        if sock is not None:
            if linger is None:
                sock.close()  # waits up to LINGER for the queue to drain (in term, below)
            else:
                sock.close(linger=int(linger * 1000))
        if context is not None:
            context.term()

    def forget_after_fork(self) -> None:
        # The parent's sockets and context belong to the parent: never touch or close them
        # here. Keep references, so that their finalizers never run in this child.
        kept = (self.socket, self._context, self._control)
        if any(part is not None for part in kept):
            _abandoned.append(kept)
            _never_finalize(kept)
        self.socket = self._context = None
        # Another thread of the parent may have held the lock or been the reader.
        self._init_flush()


_abandoned: list[tuple[Any, ...]] = []


def _never_finalize(kept: object) -> None:
    # A list is not enough: at interpreter exit the child clears it, and each socket's
    # finalizer then closes it (with a ResourceWarning, an error under -W error). One
    # reference nobody owns keeps them out of that; the child exits without them.
    import ctypes

    ctypes.pythonapi.Py_IncRef(ctypes.py_object(kept))


class _Subscription:
    __slots__ = ("name", "epoch")

    def __init__(self, name: str) -> None:
        self.name = name
        # None until the proxy answered the subscription with a sync.
        self.epoch: str | None = None


class ZmqServerEngine:
    """The WebSocket server's side: a SUB to the proxy's fan-out, a DEALER to its control.

    Deliveries to the sink:

    - ``on_position`` for every sync the proxy sends on a subscribed topic: the answer to
      our subscription, the answers to other servers' subscriptions to the same stream,
      and, after the proxy restarted, the answer to the subscriptions ZeroMQ re-sends by
      itself on reconnecting (with the new epoch).
    - Messages that arrive for a subscription not answered yet are dropped: they were
      published before the position the answer will report (leftovers of an earlier
      subscription, or sent while the proxy was taking the subscription in).
    - A message in an epoch the stream has not been told of (a restarted proxy whose
      messages overtook its sync) is preceded by ``on_position(stream, seq - 1, epoch)``,
      so the sink always learns of a new epoch from a position first.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: EngineSink | None = None
        self._context: zmq.Context[Any] | None = None
        self._sub: zmq.Socket[Any] | None = None
        self._control: zmq.Socket[Any] | None = None
        self._fds: list[int] = []
        # Keyed by topic: a delivery's stream is found by its topic, with no decoding.
        self._subscriptions: dict[bytes, _Subscription] = {}
        self._requests: dict[int, tuple[asyncio.Future[dict[str, StreamHistory] | None], dict[str, Position]]] = {}
        self._next_request = 0
        self._heard = -math.inf  # monotonic time the proxy last sent anything
        self._mark: str | None = None  # the proxy's change mark in its last control reply
        self._fanout_due = False
        self._control_due = False
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # Presence: this process's name in the proxy's table, and the report state.
        self.server_id = secrets.token_hex(8)
        self._presence_requests: dict[int, asyncio.Future[dict[str, Any] | None]] = {}
        self._report_due = False
        self._need_full = True  # the proxy does not know us yet
        self._was_known = False  # a proxy knew us: not knowing us now means it lost the table
        self._lost_us = False
        self._report_lock = asyncio.Lock()
        self._retire_linger: float | None = None  # draining: how long the proxy keeps our counts
        self._bad_delivery = Throttled(log, "dropped a malformed delivery from the proxy", WARNING_INTERVAL)
        self._bad_reply = Throttled(log, "ignored a bad control reply from the proxy", WARNING_INTERVAL)

    # ---------------------------------------------------------------- lifecycle

    async def start(self, sink: EngineSink) -> None:
        if self._closed or self._context is not None:
            raise RuntimeError("a ZmqServerEngine starts once")
        loop = self._loop = asyncio.get_running_loop()
        self._sink = sink
        context = self._context = zmq.Context()
        sub = self._sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, self.settings.zmq_hwm)
        sub.setsockopt(zmq.LINGER, 0)
        for topic in self._subscriptions:  # subscribed before start
            sub.setsockopt(_SUBSCRIBE, topic)
        sub.connect(self.settings.fanout_endpoint)
        control = self._control = context.socket(zmq.DEALER)
        control.setsockopt(zmq.LINGER, 0)
        control.connect(self.settings.control_endpoint)
        self._fds = [int(sub.getsockopt(zmq.FD)), int(control.getsockopt(zmq.FD))]
        loop.add_reader(self._fds[0], self._drain_fanout)
        loop.add_reader(self._fds[1], self._drain_control)
        self._schedule_fanout()
        self._schedule_control()
        self._task = loop.create_task(self._check_link())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._loop is not None and not self._loop.is_closed():
            for fd in self._fds:
                self._loop.remove_reader(fd)
        self._fds = []
        for future, _ in self._requests.values():
            if not future.done():
                future.set_result(None)
        self._requests.clear()
        for presence_future in self._presence_requests.values():
            if not presence_future.done():
                presence_future.set_result(None)
        self._presence_requests.clear()
        if self._control is not None:
            # Our counts go now rather than when the lease runs out (LEAVEs follow after
            # the leave delay, so sockets moving to another server make none).
            try:
                self._next_request += 1
                self._control.send_multipart(
                    [b"", protocol.build_presence_request(self._next_request, self.server_id, {}, bye=True,
                                                          linger=self._retire_linger or 0.0)], NOBLOCK)
                self._control.setsockopt(zmq.LINGER, BYE_LINGER_MS)
            except zmq.ZMQError:
                pass  # the proxy is away: the lease runs out instead
        for sock in (self._sub, self._control):
            if sock is not None:
                try:
                    sock.close(linger=BYE_LINGER_MS if sock is self._control else 0)
                except zmq.ZMQError:
                    pass  # closing anyway
        self._sub = self._control = None
        if self._context is not None:
            # Linger 0 but for the goodbye: term returns at once, or once it is out.
            self._context.term()
            self._context = None

    @property
    def mark(self) -> str | None:
        return self._mark

    @property
    def live(self) -> bool:
        return not self._closed and time.monotonic() - self._heard < LIVE_WINDOW

    # ---------------------------------------------------------------- subscriptions

    def subscribe(self, stream: str) -> None:
        if self._closed:
            return
        topic = protocol.topic(stream)
        if topic in self._subscriptions:
            return
        self._subscriptions[topic] = _Subscription(stream)
        self._set_subscription(_SUBSCRIBE, topic)

    def unsubscribe(self, stream: str) -> None:
        if self._closed:
            return
        topic = protocol.topic(stream)
        if self._subscriptions.pop(topic, None) is not None:
            self._set_subscription(_UNSUBSCRIBE, topic)

    def _set_subscription(self, option: int, topic: bytes) -> None:
        if self._sub is None:
            return  # not started: start() subscribes
        try:
            self._sub.setsockopt(option, topic)
        except zmq.ZMQError as exc:
            log.error("could not change the subscription to %r: %s", topic, exc)
            return
        self._schedule_fanout()  # the setsockopt may have consumed the FD's edge

    # ---------------------------------------------------------------- fan-out

    def _schedule_fanout(self) -> None:
        if not self._fanout_due and self._loop is not None:
            self._fanout_due = True
            self._loop.call_soon(self._drain_fanout)

    def _drain_fanout(self) -> None:
        self._fanout_due = False
        sink = self._sink
        if self._closed or sink is None:
            return
        try:
            sink.on_batch_start()
        except Exception:
            log.exception("the sink failed starting a batch")
        try:
            more = self._fanout_batch(sink)
        finally:
            try:
                sink.on_batch_end()
            except Exception:
                log.exception("the sink failed ending a batch")
        if more:
            self._schedule_fanout()

    def _fanout_batch(self, sink: EngineSink) -> bool:
        """Handle up to BATCH deliveries; True when there may be more."""
        assert self._sub is not None
        recv = self._sub.recv
        events: Callable[[int], int] = self._sub.getsockopt  # type: ignore[assignment]  # an int option
        decode = protocol.decode_delivery
        subscriptions = self._subscriptions
        on_message, on_position = sink.on_message, sink.on_position
        received = 0
        more = True
        for turn in range(BATCH):
            # After the first delivery, ask the socket once before recv'ing until
            # zmq.Again: most wake-ups carry one delivery, and the exception costs more
            # than delivering it; in a burst, one exception per batch costs less than a
            # question per delivery. Reading EVENTS re-arms the FD's edge as a recv does.
            try:
                if turn == 1 and not events(EVENTS) & POLLIN:
                    more = False
                    break
                raw = recv(NOBLOCK)
            except zmq.Again:
                more = False
                break
            except zmq.ZMQError as exc:
                more = False
                if not self._closed:
                    log.error("reading the proxy's fan-out failed: %s", exc)
                break
            received += 1
            try:
                delivery = decode(raw)
            except protocol.ProtocolError as exc:
                self._bad_delivery.warn(exc)
                continue
            subscription = subscriptions.get(delivery.topic)
            if subscription is None:
                continue  # unsubscribed a moment ago
            try:
                if delivery.kind == _KIND_COMMAND:
                    try:
                        command = protocol.check_command(delivery.frame)
                    except protocol.ProtocolError as exc:
                        self._bad_delivery.warn(exc)
                        continue
                    sink.on_command(subscription.name, command)
                elif delivery.kind == _KIND_PRESENCE:
                    if delivery.frame == protocol.PRESENCE_RESET and subscription.name == protocol.BROADCAST:
                        sink.on_presence_reset()
                        continue
                    try:
                        event = protocol.check_presence_event(subscription.name, delivery.frame)
                    except protocol.ProtocolError as exc:
                        self._bad_delivery.warn(exc)
                        continue
                    sink.on_presence(event)
                elif delivery.kind == _KIND_MESSAGE:
                    epoch = delivery.epoch
                    if epoch == subscription.epoch:
                        on_message(subscription.name, delivery.seq, epoch, delivery.frame)
                    elif subscription.epoch is not None:
                        # Renumbered (the proxy restarted) and this overtook the sync.
                        subscription.epoch = epoch
                        on_position(subscription.name, delivery.seq - 1, epoch)
                        on_message(subscription.name, delivery.seq, epoch, delivery.frame)
                    # else: published before the position our subscription's answer reports
                else:
                    subscription.epoch = delivery.epoch
                    on_position(subscription.name, delivery.seq, delivery.epoch)
            except Exception:
                # Our own bug; the rest of the fan-out goes on.
                log.exception("the sink failed handling a delivery for %r", subscription.name)
        if received:
            self._heard = time.monotonic()
        return more

    # ---------------------------------------------------------------- control

    def _schedule_control(self) -> None:
        if not self._control_due and self._loop is not None:
            self._control_due = True
            self._loop.call_soon(self._drain_control)

    def _drain_control(self) -> None:
        self._control_due = False
        if self._closed or self._control is None:
            return
        recv = self._control.recv_multipart
        for _ in range(BATCH):
            try:
                frames = recv(NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                if not self._closed:
                    log.error("reading the proxy's control replies failed: %s", exc)
                return
            try:
                self._on_reply(frames)
            except Exception:
                log.exception("failed handling a control reply")
        self._schedule_control()

    def _on_reply(self, frames: list[bytes]) -> None:
        if len(frames) < 2 or frames[0] != b"":
            self._bad_reply.warn(f"{len(frames)} frames, not the empty delimiter and a header")
            return
        if self._presence_requests and len(frames) == 2:
            try:
                header = orjson.loads(frames[1])
            except orjson.JSONDecodeError:
                header = None
            if isinstance(header, dict) and header.get("rid") in self._presence_requests:
                self._heard = time.monotonic()
                future = self._presence_requests.pop(header["rid"])
                if not future.done():
                    future.set_result(header)
                return
        try:
            request_id, streams, mark = protocol.parse_history_reply(frames[1:])
        except protocol.ProtocolError as exc:
            self._bad_reply.warn(exc)
            return
        self._heard = time.monotonic()
        # Replies come in the order the proxy made them: the last one's mark is its latest.
        self._mark = mark
        pending = self._requests.pop(request_id, None)
        if pending is None:
            if not 0 < request_id <= self._next_request:
                self._bad_reply.warn(f"request id {request_id} was never sent")
            # else a ping's answer, or a history answer that came after its timeout
            return
        future, wanted = pending
        problem = _reply_problem(wanted, streams)
        if problem:
            self._bad_reply.warn(problem)
        if not future.done():
            future.set_result(None if problem else streams)

    def _send_control(self, request: bytes, quiet: bool = False) -> bool:
        if self._control is None or self._closed:
            return False
        try:
            self._control.send_multipart([b"", request], NOBLOCK)
        except zmq.ZMQError as exc:
            # Again: a thousand requests queued for a proxy that is away.
            if not quiet:
                log.warning("could not send a control request to the proxy: %s", exc)
            return False
        self._schedule_control()  # the send may have consumed the FD's edge
        return True

    async def history(self, wanted: Mapping[str, Position], max_bytes: int) -> dict[str, StreamHistory] | None:
        if self._closed or self._loop is None:
            return None
        asked = dict(wanted)
        if not asked:
            return {}
        self._next_request += 1
        request_id = self._next_request
        future: asyncio.Future[dict[str, StreamHistory] | None] = self._loop.create_future()
        self._requests[request_id] = (future, asked)
        try:
            if not self._send_control(protocol.build_history_request(request_id, asked, max_bytes)):
                return None
            return await asyncio.wait_for(future, HISTORY_TIMEOUT)
        except asyncio.TimeoutError:
            if not self._closed:
                log.warning("the proxy did not answer a history request in %gs", HISTORY_TIMEOUT)
            return None
        finally:
            self._requests.pop(request_id, None)

    async def _check_link(self) -> None:
        """Ping the proxy, so that `live` notices it going away and coming back; renew the
        presence lease (a report, empty or not) several times per FLOW_PRESENCE_LEASE."""
        renew_at = 0.0
        while not self._closed:
            try:
                self._next_request += 1
                self._send_control(protocol.build_ping_request(self._next_request), quiet=True)
                if time.monotonic() >= renew_at:
                    renew_at = time.monotonic() + renew_interval(self.settings.presence_lease)
                    self._spawn_report()
            except Exception:
                log.exception("pinging the proxy failed")
            await asyncio.sleep(min(PING_INTERVAL, renew_interval(self.settings.presence_lease)))

    # ---------------------------------------------------------------- presence

    def presence_retire(self, linger: float) -> None:
        self._retire_linger = min(max(0.0, linger), protocol.MAX_PRESENCE_LINGER)

    def presence_changed(self) -> None:
        if self._retire_linger is not None:
            return  # draining: the proxy keeps what it has until the goodbye's linger ends
        if not self._report_due and self._loop is not None and not self._closed:
            self._report_due = True
            self._loop.call_later(REPORT_DELAY, self._spawn_report)

    def _spawn_report(self) -> None:
        self._report_due = False
        if not self._closed and self._loop is not None:
            task = self._loop.create_task(self._report(None, None))
            task.add_done_callback(_quiet_result)

    async def _report(self, query: str | None, limit: int | None) -> Snapshot | None:
        """Send the ledger's changes (all of it when the proxy does not know us), with a
        query; a reply saying the proxy does not know us makes us send everything."""
        sink = self._sink
        if sink is None or self._closed or self._loop is None:
            return None
        # One report at a time: the chunks of a full report, and the counts of two reports,
        # must reach the proxy in the order the ledger gave them.
        async with self._report_lock:
            return await self._report_locked(sink, query, limit)

    async def _report_locked(self, sink: EngineSink, query: str | None, limit: int | None) -> Snapshot | None:
        for _ in range(2):
            full = self._need_full
            if self._retire_linger is not None:
                # Draining: only renew the lease, so that the counts the proxy has stay.
                full, changes = False, {}
            else:
                changes = sink.ledger.full() if full else sink.ledger.take_changes()
            items = list(changes.items())
            header: dict[str, Any] | None = None
            # The first chunk of a full report resets what the proxy has of us; the rest add.
            for start in range(0, max(1, len(items)), REPORT_CHUNK):
                last = start + REPORT_CHUNK >= len(items)
                chunk = dict(items[start:start + REPORT_CHUNK])
                header = await self._request(functools.partial(
                    protocol.build_presence_request, server=self.server_id, changes=chunk,
                    full=full and start == 0, query=query if last else None, limit=limit,
                    again=full and self._lost_us))
                if header is None or header.get("known") is not True:
                    break
            if header is None:
                # Lost or late: the proxy may not have it, so the next report is whole; and
                # it may be a new proxy (with an empty table) that answers the next one.
                self._need_full = True
                self._lost_us = self._lost_us or self._was_known
                return None
            try:
                known, snapshot, _ = protocol.parse_presence_reply(header)
            except protocol.ProtocolError as exc:
                self._bad_reply.warn(exc)
                self._need_full = True
                return None
            if known:
                if full:
                    self._need_full = False
                    if self._lost_us:
                        self._lost_us = False
                        sink.on_presence_reset()
                    self._was_known = True
                return snapshot
            self._need_full = True
            self._lost_us = self._was_known
            if self._retire_linger is not None:
                return None  # the proxy lost us while we drain: nothing of ours to keep
        return None

    async def _request(self, build: Callable[[int], bytes]) -> dict[str, Any] | None:
        """Send the presence request ``build(rid)`` and wait for the reply's header."""
        assert self._loop is not None
        self._next_request += 1
        request_id = self._next_request
        request = build(request_id)
        future: asyncio.Future[dict[str, Any] | None] = self._loop.create_future()
        self._presence_requests[request_id] = future
        try:
            if not self._send_control(request, quiet=True):
                return None
            return await asyncio.wait_for(future, PRESENCE_TIMEOUT)
        except asyncio.TimeoutError:
            return None
        finally:
            self._presence_requests.pop(request_id, None)

    async def presence(self, stream: str, limit: int | None) -> Snapshot | None:
        return await self._report(stream, limit)


def _quiet_result(task: "asyncio.Task[Any]") -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a presence report failed", exc_info=task.exception())


def _reply_problem(wanted: Mapping[str, Position], streams: Mapping[str, StreamHistory]) -> str | None:
    """What is wrong with a history answer to ``wanted``, or None. The hub may then trust
    every StreamHistory promise: the streams asked, in the asked epoch, contiguous."""
    if streams.keys() != wanted.keys():
        return "the reply does not name the streams asked for"
    for name, answer in streams.items():
        if answer.messages is None:
            continue
        seq, epoch = wanted[name]
        if answer.epoch != epoch:
            return f"stream {name!r}: history from epoch {answer.epoch!r}, asked {epoch!r}"
        expected = seq
        for message_seq, _ in answer.messages:
            expected += 1
            if message_seq != expected:
                return f"stream {name!r}: history not contiguous after seq {seq}"
        if expected > answer.seq:
            return f"stream {name!r}: history beyond the head seq {answer.seq}"
    return None
