"""The Flow message proxy: numbers every push and fans it out to the WebSocket pool.

Publishers PUSH to our PULL socket (a PUSH queues before its connection is up, so
nothing is lost to ZeroMQ's slow-joiner). For each message the proxy assigns the
stream's next ``seq``, builds the browser frame once, keeps it in a bounded history
and publishes it on the stream's exact topic through XPUB. A WebSocket server's
subscription is answered with a sync frame telling the stream's current position,
and history is served on a ROUTER control socket for resume (PROTOCOL.md section 4).

History lives in this process's memory: a restart starts a new epoch, so clients
resuming across it are told ``recovered: false`` rather than shown a silent gap.
"""

from __future__ import annotations

import collections
import logging
import secrets
import signal
import time
from dataclasses import dataclass, field
from typing import Deque

import zmq

from flowcore import protocol
from flowcore.runtime import start_process
from flowcore.settings import Settings

log = logging.getLogger("flow.proxy")

# How many pushes to take from the PULL socket before serving subscriptions and
# control requests again: keeps resume answers prompt under a flood.
BATCH = 512
# A plain int: pyzmq's flag enums cost more than the send itself on this path.
NOBLOCK = int(zmq.NOBLOCK)
RCVMORE = int(zmq.RCVMORE)
SWEEP_INTERVAL = 30.0


@dataclass
class Stream:
    seq: int = 0
    history: Deque[tuple[int, float, bytes]] = field(default_factory=collections.deque)


def new_epoch() -> str:
    return f"{int(time.time()):x}-{secrets.token_hex(4)}"


class MessageLog:
    """Per-stream numbering and bounded history. No I/O: the proxy loop drives it."""

    def __init__(self, history_size: int, history_ttl: float, epoch: str | None = None) -> None:
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.epoch = epoch or new_epoch()
        self.streams: dict[str, Stream] = {}

    def append(self, push: protocol.Push, now: float) -> bytes:
        """Number ``push`` and return the frame to publish."""
        stream = self.streams.get(push.stream)
        if stream is None:
            stream = self.streams[push.stream] = Stream()
        stream.seq += 1
        frame = protocol.build_message_frame(push, stream.seq, self.epoch)
        if self.history_size:
            history = stream.history
            history.append((stream.seq, now, frame))
            if len(history) > self.history_size:
                history.popleft()
        # Published already framed for WebSocket: every server writes these bytes as they are.
        return protocol.message_frame(push.stream, stream.seq, self.epoch, protocol.encode_text_frame(frame))

    def position(self, name: str) -> int:
        stream = self.streams.get(name)
        return stream.seq if stream else 0

    def since(self, name: str, seq: int, epoch: str, now: float) -> list[tuple[int, bytes]] | None:
        """Messages after ``seq``, or None when they cannot all be given."""
        if epoch != self.epoch:
            return None
        current = self.position(name)
        if seq > current:
            return None
        if seq == current:
            return []
        history = self.streams[name].history
        if not history or history[0][0] > seq + 1:
            return None
        start = seq + 1 - history[0][0]
        if history[start][1] < now - self.history_ttl:
            return None
        return [(s, frame) for s, _, frame in list(history)[start:]]

    def sweep(self, now: float) -> None:
        """Forget history older than the TTL; keep the counters, so seq never restarts."""
        cutoff = now - self.history_ttl
        for stream in self.streams.values():
            history = stream.history
            while history and history[0][1] < cutoff:
                history.popleft()


class Proxy:
    def __init__(self, settings: Settings, context: zmq.Context | None = None) -> None:
        self.settings = settings
        self.context = context or zmq.Context()
        self.log = MessageLog(settings.history_size, settings.history_ttl)
        self.running = True
        self.pending: Deque[bytes] = collections.deque()

        self.pull = self.context.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, settings.zmq_hwm)
        self.pull.bind(settings.publish_endpoint)

        self.xpub = self.context.socket(zmq.XPUB)
        self.xpub.setsockopt(zmq.SNDHWM, settings.zmq_hwm)
        # Never drop at the high-water mark: we hold the message and stop reading
        # publishers instead, so back-pressure reaches flow.push as QueueFull.
        self.xpub.setsockopt(zmq.XPUB_NODROP, 1)
        # Hear every subscription, repeats included: each one is answered with a sync.
        self.xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.xpub.bind(settings.fanout_endpoint)

        self.control = self.context.socket(zmq.ROUTER)
        self.control.bind(settings.control_endpoint)

        for sock in (self.pull, self.xpub, self.control):
            sock.setsockopt(zmq.LINGER, 0)

    def publish(self, frame: bytes) -> None:
        if self.pending:
            self.pending.append(frame)
            return
        try:
            self.xpub.send(frame, NOBLOCK)
        except zmq.Again:
            self.pending.append(frame)

    def flush_pending(self) -> None:
        while self.pending:
            try:
                self.xpub.send(self.pending[0], NOBLOCK)
            except zmq.Again:
                return
            self.pending.popleft()

    def take_pushes(self) -> None:
        now = time.time()
        recv, append, publish = self.pull.recv, self.log.append, self.publish
        for _ in range(BATCH):
            if self.pending:
                return
            try:
                raw = recv(NOBLOCK)
            except zmq.Again:
                return
            if self.pull.getsockopt(RCVMORE):
                parts = 1
                while self.pull.getsockopt(RCVMORE):
                    self.pull.recv()
                    parts += 1
                log.warning("dropped a malformed push: %d frames, expected one", parts)
                continue
            try:
                push = protocol.decode_push(raw)
            except protocol.ProtocolError as exc:
                log.warning("dropped a malformed push (%d bytes): %s", len(raw), exc)
                continue
            publish(append(push, now))

    def take_subscriptions(self) -> None:
        while True:
            try:
                event = self.xpub.recv(NOBLOCK)
            except zmq.Again:
                return
            if not event or event[0] != 1:
                continue  # unsubscriptions need no answer
            try:
                name = protocol.stream_of_topic(event[1:])
            except (protocol.ProtocolError, UnicodeDecodeError):
                log.warning("ignored a subscription to a non-Flow topic %r", event[1:50])
                continue
            self.publish(protocol.sync_frame(name, self.log.position(name), self.log.epoch))

    def take_control(self) -> None:
        while True:
            try:
                frames = self.control.recv_multipart(NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or frames[1] != b"":
                log.warning("ignored a control message of %d frames", len(frames))
                continue
            identity, _, raw = frames
            try:
                request = protocol.parse_history_request(raw)
            except protocol.ProtocolError as exc:
                log.warning("ignored a bad control request: %s", exc)
                continue
            now = time.time()
            answer = {
                name: (self.log.epoch, self.log.position(name), self.log.since(name, seq, epoch, now))
                for name, (seq, epoch) in request.streams.items()
            }
            self.control.send_multipart(
                [identity, b"", protocol.build_history_reply(request.request_id, answer)]
            )

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        poller.register(self.xpub, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        log.info(
            "proxy up: publish %s, fan-out %s, control %s, epoch %s, history %d msgs / %gs",
            self.settings.publish_endpoint,
            self.settings.fanout_endpoint,
            self.settings.control_endpoint,
            self.log.epoch,
            self.settings.history_size,
            self.settings.history_ttl,
        )
        next_sweep = time.monotonic() + SWEEP_INTERVAL
        reading_pushes = True
        while self.running:
            # While held back by a full fan-out pipe, retry often but stop reading pushes.
            if bool(self.pending) == reading_pushes:
                reading_pushes = not reading_pushes
                (poller.register if reading_pushes else poller.unregister)(self.pull)
            # Only the sockets that have something: an empty recv costs an exception, and at a
            # few thousand pushes a second most wake-ups are for one push.
            events = dict(poller.poll(2 if self.pending else 250))
            if self.xpub in events:
                self.take_subscriptions()
            if self.control in events:
                self.take_control()
            if self.pending:
                self.flush_pending()
            if self.pull in events:
                self.take_pushes()
            if time.monotonic() > next_sweep:
                self.log.sweep(time.time())
                next_sweep = time.monotonic() + SWEEP_INTERVAL

    def close(self) -> None:
        for sock in (self.pull, self.xpub, self.control):
            sock.close(linger=0)
        self.context.term()


def main() -> None:
    settings = start_process("message_proxy")
    try:
        proxy = Proxy(settings)
    except zmq.ZMQError as exc:
        log.error("cannot bind: %s", exc)
        raise SystemExit(1) from None

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        proxy.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        proxy.run()
    finally:
        proxy.close()
    log.info("proxy stopped")


if __name__ == "__main__":
    main()
