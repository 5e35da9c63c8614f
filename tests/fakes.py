"""Plain-value stand-ins for unit tests of the session and the hub (no sockets, no
processes). Integration tests use the real engine, servers and clients instead."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Mapping

from flowcore import protocol
from flowcore.engine import Position, StreamHistory
from flowcore.presence import PresenceTable, Snapshot


def decode_frames(wire: bytes) -> list[str]:
    """The texts of unmasked WebSocket text frames written back to back."""
    out = []
    at = 0
    while at < len(wire):
        assert wire[at] == 0x81, wire[at:at + 10]
        length = wire[at + 1]
        at += 2
        if length == 126:
            length = int.from_bytes(wire[at:at + 2], "big")
            at += 2
        elif length == 127:
            length = int.from_bytes(wire[at:at + 8], "big")
            at += 8
        out.append(wire[at:at + length].decode("utf-8"))
        at += length
    return out


class FakeClock:
    def __init__(self, wall: float) -> None:
        self.now = 1000.0
        self.wall = wall

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall += seconds


class FakeTransport:
    """Records what a session writes; frames decoded to text (JSON parsed)."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.closed: tuple[int, str] | None = None
        self.writes = 0

    def send_frames(self, wire: bytes) -> None:
        assert self.closed is None, "written after close"
        self.writes += 1
        self.texts.extend(decode_frames(wire))

    def close(self, code: int, reason: str) -> None:
        assert self.closed is None, "closed twice"
        self.closed = (code, reason)

    def frames(self) -> list[Any]:
        return [t if t == "<3" else json.loads(t) for t in self.texts]

    def take(self) -> list[Any]:
        frames = self.frames()
        self.texts.clear()
        self.writes = 0
        return frames


class FakeEngine:
    """An in-memory engine: numbers, keeps history, delivers to the sink unless told to
    drop (a lost message), answers history as ServerEngine.history promises."""

    def __init__(self, history_size: int = 100) -> None:
        self.sink: Any = None
        self.subscribed: set[str] = set()
        self.log: dict[str, list[tuple[int, bytes]]] = {}
        self.heads: dict[str, int] = {}
        self.epochs: dict[str, str] = {}
        self.history_size = history_size
        self.answer_subscriptions = True
        self.answering = True
        self.history_calls: list[tuple[dict[str, Position], int]] = []
        self.live = True
        self.closed = False
        # A change mark (ServerEngine.mark), when ``marking``: counted in ``changes``, and
        # heard as the proxy's is, with every history answer and at each ``ping()``.
        self.marking = False
        self.changes = 0
        self.heard: str | None = None
        # Presence as one engine-side table over this one server (flowcore.presence).
        self.presence_table = PresenceTable(leave_delay=0.0, version_base=100)

    async def start(self, sink: Any) -> None:
        self.sink = sink

    @property
    def mark(self) -> str | None:
        return self.heard if self.marking else None

    def current_mark(self) -> str | None:
        return f"m{self.changes}" if self.marking else None

    def ping(self) -> None:
        self.heard = self.current_mark()

    def presence_changed(self) -> None:
        self.report_presence()

    def report_presence(self) -> None:
        events = self.presence_table.report("fake", self.sink.ledger.take_changes(), 0.0)
        for event in events:
            if event.stream in self.subscribed:
                self.sink.on_presence(event)

    async def presence(self, stream: str, limit: int | None) -> Snapshot | None:
        await asyncio.sleep(0)  # an answer comes later than the question
        if not self.answering:
            return None
        self.report_presence()
        return self.presence_table.snapshot(stream, limit)

    def epoch(self, stream: str) -> str:
        return self.epochs.setdefault(stream, "e-" + stream)

    def subscribe(self, stream: str) -> None:
        assert not self.closed
        self.subscribed.add(stream)
        if self.answer_subscriptions:
            asyncio.get_running_loop().call_soon(self.sync, stream)

    def sync(self, stream: str) -> None:
        if stream in self.subscribed:
            self.sink.on_position(stream, self.heads.get(stream, 0), self.epoch(stream))

    def unsubscribe(self, stream: str) -> None:
        assert not self.closed
        self.subscribed.discard(stream)

    def publish(self, stream: str, data: Any, deliver: bool = True) -> int:
        seq = self.heads.get(stream, 0) + 1
        self.heads[stream] = seq
        self.changes += 1
        body = json.dumps({"id": "M", "username": stream, "data": data, "seq": seq,
                           "epoch": self.epoch(stream)}).encode()
        wire = protocol.encode_text_frame(body)
        history = self.log.setdefault(stream, [])
        history.append((seq, wire))
        del history[:-self.history_size]
        if deliver and stream in self.subscribed:
            self.sink.on_batch_start()
            self.sink.on_message(stream, seq, self.epoch(stream), wire)
            self.sink.on_batch_end()
        return seq

    def renumber(self, stream: str) -> None:
        """The engine lost the stream (a restart): new epoch, numbering from 0."""
        self.epochs[stream] = self.epoch(stream) + "'"
        self.heads[stream] = 0
        self.log[stream] = []
        self.changes += 1

    async def history(self, wanted: Mapping[str, Position], max_bytes: int) -> dict[str, StreamHistory] | None:
        self.history_calls.append((dict(wanted), max_bytes))
        await asyncio.sleep(0)  # an answer comes later than the question
        if not self.answering:
            return None
        out = {}
        self.heard = mark = self.current_mark()
        for stream, (seq, epoch) in wanted.items():
            head, current = self.heads.get(stream, 0), self.epoch(stream)
            history = self.log.get(stream, [])
            messages: list[tuple[int, bytes]] | None
            if epoch != current or seq > head:
                messages = None
            elif seq == head:
                messages = []
            elif not history or history[0][0] > seq + 1:
                messages = None
            else:
                owed = [m for m in history if m[0] > seq]
                messages = []
                size = 0
                for message in owed:
                    if max_bytes == 0 or (messages and size >= max_bytes):
                        break
                    messages.append(message)
                    size += len(message[1])
            out[stream] = StreamHistory(current, head, messages, mark)
        return out

    async def close(self) -> None:
        self.closed = True
