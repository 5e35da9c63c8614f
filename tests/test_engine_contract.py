"""The promises every engine keeps (flowcore/engine.py; PROTOCOL.md sections 4, 6 and 11).

Each test runs once per engine, against that engine's real infrastructure (for zmq: the
real ``message_proxy.py`` process on ephemeral endpoints), with a real publisher
(``flow.Flow`` on the same settings) and a started server engine whose sink records every
call. Another engine is one more entry in INFRASTRUCTURES: a class that starts, kills
(as kill -9 would) and restarts what that engine needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import struct
from pathlib import Path
from typing import Any, AsyncIterator, Callable, TypeVar

import pytest

import flow
from flowcore import protocol
from flowcore.engine import ServerEngine, StreamHistory, server_engine
from flowcore.presence import Ledger, PresenceEvent
from flowcore.settings import Settings, load_settings
from support import PYTHON, Proc, base_env, wait_until

T = TypeVar("T")

# Small, so that a test can push past it and find the oldest messages evicted.
HISTORY_SIZE = 8
TIMEOUT = 15.0


# ---------------------------------------------------------------- infrastructure per engine


class ZmqInfrastructure:
    """The ZeroMQ engine's infrastructure: one message_proxy.py process."""

    def __init__(self, tmp_path: Path, **overrides: object) -> None:
        self.tmp_path = tmp_path
        self.env = base_env(tmp_path, FLOW_ENGINE="zmq", **overrides)
        self.settings: Settings = load_settings(self.env)
        self.starts = 0
        self.proc: Proc | None = None
        self.start()

    def start(self) -> None:
        self.starts += 1
        self.proc = Proc([PYTHON, "message_proxy.py"], self.env, self.tmp_path / f"proxy-{self.starts}.log")

    def kill(self) -> None:
        """As kill -9 does: everything in memory is gone."""
        assert self.proc is not None
        self.proc.signal(signal.SIGKILL)
        self.proc.popen.wait(10)
        self.proc.stop()  # closes its log

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.tmp_path.glob("proxy-*.log")))


class RedisInfrastructure:
    """The Redis engine's infrastructure: one redis-server without persistence, on a unix
    socket in the test's directory (kill -9 loses everything, as it does to the proxy)."""

    def __init__(self, tmp_path: Path, **overrides: object) -> None:
        self.tmp_path = tmp_path
        self.socket = tmp_path / "redis.sock"
        self.env = base_env(tmp_path, FLOW_ENGINE="redis", FLOW_REDIS_URL=f"unix://{self.socket}", **overrides)
        self.settings: Settings = load_settings(self.env)
        self.starts = 0
        self.proc: Proc | None = None
        self.start()

    def start(self) -> None:
        self.starts += 1
        self.proc = Proc(
            ["redis-server", "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", str(self.tmp_path)],
            self.env, self.tmp_path / f"redis-{self.starts}.log",
        )
        import redis as redis_py

        client = redis_py.Redis(unix_socket_path=str(self.socket))
        try:
            wait_until(lambda: _pings(client), message="redis-server to answer")
        finally:
            client.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.signal(signal.SIGKILL)
        self.proc.popen.wait(10)
        self.proc.stop()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.tmp_path.glob("redis-*.log")))


def _pings(client: Any) -> bool:
    import redis as redis_py

    try:
        return bool(client.ping())
    except (redis_py.ConnectionError, OSError):
        return False


INFRASTRUCTURES: dict[str, Callable[..., Any]] = {"zmq": ZmqInfrastructure, "redis": RedisInfrastructure}


@pytest.fixture(params=sorted(INFRASTRUCTURES))
def infra(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    started = INFRASTRUCTURES[request.param](tmp_path, FLOW_HISTORY_SIZE=HISTORY_SIZE)
    yield started
    started.stop()


@pytest.fixture
def publisher(infra: Any) -> Any:
    publisher = flow.Flow(settings=infra.settings, linger=1)
    yield publisher
    publisher.close()


# ---------------------------------------------------------------- a recording sink


class RecordingSink:
    """Every call an engine makes, in order: ("position", stream, seq, epoch) and
    ("message", stream, seq, epoch, wire). Calls outside a batch are recorded as faults."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.in_batch = False
        self.faults: list[str] = []
        # What a hub owns and engines report (flowcore.presence): empty here unless a test fills it.
        self.ledger = Ledger()
        self.presence_events: list[PresenceEvent] = []
        self.presence_resets = 0

    def on_presence(self, event: PresenceEvent) -> None:
        self.presence_events.append(event)

    def on_presence_reset(self) -> None:
        self.presence_resets += 1

    def on_batch_start(self) -> None:
        if self.in_batch:
            self.faults.append("batch started inside a batch")
        self.in_batch = True

    def on_batch_end(self) -> None:
        if not self.in_batch:
            self.faults.append("batch ended outside a batch")
        self.in_batch = False

    def on_message(self, stream: str, seq: int, epoch: str, wire: bytes) -> None:
        if not self.in_batch:
            self.faults.append(f"message for {stream!r} outside a batch")
        self.events.append(("message", stream, seq, epoch, wire))

    def on_position(self, stream: str, seq: int, epoch: str) -> None:
        self.events.append(("position", stream, seq, epoch))

    def on_command(self, stream: str, command: dict[str, str]) -> None:
        self.events.append(("command", stream, command))

    def of(self, stream: str, since: int = 0) -> list[tuple[Any, ...]]:
        return [e for e in self.events[since:] if e[1] == stream]

    def messages(self, stream: str, since: int = 0) -> list[tuple[Any, ...]]:
        return [e for e in self.of(stream, since) if e[0] == "message"]

    def commands(self, stream: str) -> list[dict[str, str]]:
        return [e[2] for e in self.of(stream) if e[0] == "command"]

    def head(self, stream: str, since: int = 0) -> int:
        """The highest seq reported for ``stream``, by a position or a message."""
        return max((e[2] for e in self.of(stream, since) if e[0] != "command"), default=-1)

    def position(self, stream: str, since: int = 0) -> tuple[int, str] | None:
        """The last position reported for ``stream``, as (seq, epoch)."""
        positions = [e for e in self.of(stream, since) if e[0] == "position"]
        return (positions[-1][2], positions[-1][3]) if positions else None


async def until(condition: Callable[[], T], timeout: float = TIMEOUT, message: str = "condition") -> T:
    """Poll ``condition`` on the running loop (letting the engine work) until it is truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def started(settings: Settings, *streams: str) -> AsyncIterator[tuple[ServerEngine, RecordingSink]]:
    """A started server engine subscribed to ``streams``, each answered with a position."""
    sink = RecordingSink()
    engine = server_engine(settings)
    await engine.start(sink)
    try:
        for stream in streams:
            engine.subscribe(stream)
        for stream in streams:
            await until(lambda: sink.position(stream), message=f"the position of {stream!r}")
        yield engine, sink
        assert sink.faults == []
    finally:
        await engine.close()


async def until_head(engine: ServerEngine, stream: str, seq: int) -> None:
    """Wait until the engine has numbered ``seq`` messages of ``stream`` (a history answer
    reports the head whatever the epoch asked)."""
    async def head() -> int:
        answer = await engine.history({stream: (0, "any")}, 0)
        return -1 if answer is None else answer[stream].seq

    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while await head() != seq:
        assert loop.time() < deadline, f"timed out waiting for {stream!r} to reach seq {seq}"
        await asyncio.sleep(0.01)


def run(test: Callable[[], Any]) -> None:
    asyncio.run(asyncio.wait_for(test(), 120))


def browser_json(wire: bytes) -> dict[str, Any]:
    """The payload of one unmasked server-to-browser WebSocket text frame, parsed."""
    assert wire[0] == 0x81, "a final, unfragmented text frame"
    length, at = wire[1], 2
    assert length & 0x80 == 0, "server frames are never masked"
    if length == 126:
        (length,), at = struct.unpack("!H", wire[2:4]), 4
    elif length == 127:
        (length,), at = struct.unpack("!Q", wire[2:10]), 10
    assert len(wire) == at + length
    return json.loads(wire[at:].decode("utf-8"))


def assert_contiguous(messages: list[tuple[Any, ...]], after: int) -> None:
    assert [m[2] for m in messages] == list(range(after + 1, after + 1 + len(messages)))


# ---------------------------------------------------------------- the promises


def test_a_subscription_is_answered_with_a_position_before_any_message(infra, publisher):
    async def test() -> None:
        for i in range(30):
            publisher.push("alice", "BEFORE", i)
        async with started(infra.settings) as (engine, sink):
            await until_head(engine, "alice", 30)  # numbered before the subscription
            engine.subscribe("alice")
            for i in range(30):  # in flight while the subscription is taken in
                publisher.push("alice", "AFTER", i)
            await until(lambda: sink.position("alice"), message="alice's position")
            await until(lambda: sink.head("alice") == 60, message="alice's seq 60")
            events = sink.of("alice")
            assert events[0][0] == "position"
            seq, epoch = events[0][2], events[0][3]
            assert 30 <= seq <= 60  # what was published before the answer is before the position
            messages = sink.messages("alice")
            assert_contiguous(messages, seq)
            assert seq + len(messages) == 60
            assert {m[3] for m in messages} <= {epoch}

    run(test)


def test_subscribing_twice_is_one_subscription(infra, publisher):
    async def test() -> None:
        async with started(infra.settings, "alice") as (engine, sink):
            engine.subscribe("alice")
            publisher.push("alice", "ONCE", 1)
            await until(lambda: sink.messages("alice"), message="the message")
            publisher.push("alice", "TWICE", 2)
            await until(lambda: len(sink.messages("alice")) == 2, message="the second message")
            assert [browser_json(m[4])["id"] for m in sink.messages("alice")] == ["ONCE", "TWICE"]

    run(test)


def test_routing_is_by_exact_name_and_broadcasts_reach_everyone(infra, publisher):
    async def test() -> None:
        async with started(infra.settings, "1", protocol.BROADCAST) as (one, one_sink), \
                started(infra.settings, "12", protocol.BROADCAST) as (twelve, twelve_sink):
            for i in range(3):
                publisher.push("1", "FOR 1", i)
                publisher.push("12", "FOR 12", i)
                publisher.push("123", "FOR NOBODY", i)
            publisher.push_all("NEWS", "all")
            # Pushed last: once it arrives, anything misrouted before it would have too.
            publisher.push("1", "LAST", "marker")
            publisher.push("12", "LAST", "marker")
            for sink in (one_sink, twelve_sink):
                await until(lambda: any(browser_json(m[4])["id"] == "LAST" for m in sink.messages("1") +
                                        sink.messages("12")), message="the last message")
            await until(lambda: one_sink.messages("*") and twelve_sink.messages("*"), message="the broadcast")
            for sink, own in ((one_sink, "1"), (twelve_sink, "12")):
                names = {e[1] for e in sink.events}
                assert names == {own, protocol.BROADCAST}
                frames = [browser_json(m[4]) for m in sink.messages(own)]
                assert [f["id"] for f in frames] == [f"FOR {own}"] * 3 + ["LAST"]
                assert {f["username"] for f in frames} == {own}
                [news] = [browser_json(m[4]) for m in sink.messages(protocol.BROADCAST)]
                assert (news["id"], news["username"], news["data"]) == ("NEWS", "*", "all")

    run(test)


def test_seq_rises_by_one_per_message_per_stream_in_publish_order(infra, publisher):
    async def test() -> None:
        streams = ("alice", "bob", protocol.BROADCAST)
        async with started(infra.settings, *streams) as (engine, sink):
            start = {s: sink.position(s) for s in streams}
            sent: dict[str, list[int]] = {s: [] for s in streams}
            for i in range(300):
                if i % 10 == 0:
                    publisher.push_all("N", i)
                    sent[protocol.BROADCAST].append(i)
                else:
                    user = "alice" if i % 3 else "bob"
                    publisher.push(user, "N", i)
                    sent[user].append(i)
            for s in streams:
                await until(lambda: len(sink.messages(s)) == len(sent[s]), message=f"every message of {s!r}")
            for s in streams:
                messages = sink.messages(s)
                seq, epoch = start[s]
                assert_contiguous(messages, seq)
                assert {m[3] for m in messages} == {epoch}
                frames = [browser_json(m[4]) for m in messages]
                assert [f["data"] for f in frames] == sent[s]
                assert [(f["seq"], f["epoch"]) for f in frames] == [(m[2], m[3]) for m in messages]

    run(test)


def test_the_wire_is_the_browser_frame_already_framed(infra, publisher):
    async def test() -> None:
        async with started(infra.settings, "ünï", protocol.BROADCAST) as (engine, sink):
            sizes = ("small", "m" * 300, "l" * 70_000)  # 7-bit, 16-bit and 64-bit lengths
            for data in sizes:
                publisher.push("ünï", "SIZE", {"text": data, "n": None})
            publisher.push_all("ALL", [1, 2.5])
            await until(lambda: len(sink.messages("ünï")) == 3 and sink.messages("*"), message="the messages")
            for (_, _, seq, epoch, wire), data in zip(sink.messages("ünï"), sizes):
                assert browser_json(wire) == {"id": "SIZE", "username": "ünï", "data": {"text": data, "n": None},
                                              "seq": seq, "epoch": epoch}
            [(_, _, seq, epoch, wire)] = sink.messages("*")
            assert browser_json(wire) == {"id": "ALL", "username": "*", "data": [1, 2.5], "seq": seq,
                                          "epoch": epoch}

    run(test)


async def pushed(publisher: Any, sink: RecordingSink, stream: str, count: int) -> list[tuple[Any, ...]]:
    """Push ``count`` messages to ``stream`` and wait for them live; all its messages."""
    have = len(sink.messages(stream))
    for i in range(count):
        publisher.push(stream, "H", {"i": i, "pad": "p" * 200})
    await until(lambda: len(sink.messages(stream)) == have + count, message=f"{count} messages of {stream!r}")
    return sink.messages(stream)


def test_history_after_a_position_is_complete_and_contiguous(infra, publisher):
    async def test() -> None:
        async with started(infra.settings, "alice", "bob") as (engine, sink):
            live = await pushed(publisher, sink, "alice", 6)
            await pushed(publisher, sink, "bob", 2)
            epoch = live[0][3]
            answer = await engine.history({"alice": (2, epoch), "bob": (0, sink.position("bob")[1])}, 1 << 20)
            assert answer is not None and answer.keys() == {"alice", "bob"}
            alice = answer["alice"]
            assert (alice.epoch, alice.seq) == (epoch, 6)
            assert alice.messages == [(m[2], m[4]) for m in live[2:]]  # the very bytes sent live
            assert [s for s, _ in answer["bob"].messages or []] == [1, 2]
            # Nothing owed: an empty list, not None.
            assert await engine.history({"alice": (6, epoch)}, 1 << 20) == {"alice": StreamHistory(epoch, 6, [])}

    run(test)


def test_history_pages_by_max_bytes(infra, publisher):
    async def test() -> None:
        async with started(infra.settings, "alice") as (engine, sink):
            live = await pushed(publisher, sink, "alice", HISTORY_SIZE)
            epoch = live[0][3]
            whole = [(m[2], m[4]) for m in live]
            for max_bytes in (1, len(live[0][4]) * 3 - 1):
                got: list[tuple[int, bytes]] = []
                calls = 0
                while len(got) < len(whole) and calls < len(whole):  # every page holds one at least
                    calls += 1
                    answer = await engine.history({"alice": (len(got), epoch)}, max_bytes)
                    assert answer is not None
                    page = answer["alice"].messages
                    assert page, "a page holds at least one message while any is owed"
                    # About max_bytes: it goes past it by one message at most.
                    assert sum(len(w) for _, w in page[:-1]) < max_bytes
                    got += page
                assert calls > 1
                assert got == whole

    run(test)


def test_max_bytes_zero_asks_positions_only(infra, publisher):
    async def test() -> None:
        async with started(infra.settings, "alice", "nobody") as (engine, sink):
            live = await pushed(publisher, sink, "alice", 3)
            epoch = live[0][3]
            answer = await engine.history({"alice": (0, epoch), "nobody": (0, sink.position("nobody")[1])}, 0)
            assert answer == {
                "alice": StreamHistory(epoch, 3, []),
                "nobody": StreamHistory(sink.position("nobody")[1], 0, []),
            }

    run(test)


def test_history_that_cannot_be_given_whole_is_none(infra, publisher):
    async def test() -> None:
        async with started(infra.settings, "alice") as (engine, sink):
            live = await pushed(publisher, sink, "alice", HISTORY_SIZE + 3)
            epoch, head = live[0][3], HISTORY_SIZE + 3
            cases = {
                "another epoch": (5, "not-" + epoch),
                "beyond the head": (head + 1, epoch),
                "evicted": (2, epoch),  # seq 3 is gone: the history holds 4..11
            }
            for case, position in cases.items():
                answer = await engine.history({"alice": position}, 1 << 20)
                assert answer == {"alice": StreamHistory(epoch, head, None)}, case
            # The oldest message still held is given.
            answer = await engine.history({"alice": (3, epoch)}, 1 << 20)
            assert answer is not None
            assert [s for s, _ in answer["alice"].messages or []] == list(range(4, head + 1))

    run(test)


def test_unsubscribe_stops_delivery(infra, publisher):
    async def test() -> None:
        async with started(infra.settings, "alice", "bob") as (engine, sink):
            await pushed(publisher, sink, "alice", 2)
            engine.unsubscribe("alice")
            engine.unsubscribe("alice")  # idempotent
            mark = len(sink.events)
            for i in range(50):
                publisher.push("alice", "GONE", i)
            publisher.push("bob", "MARKER", 0)
            await until(lambda: sink.messages("bob"), message="bob's marker")
            assert sink.of("alice", mark) == []

    run(test)


def test_subscribing_again_starts_from_a_new_position(infra, publisher):
    async def test() -> None:
        async with started(infra.settings, "alice") as (engine, sink):
            for i in range(200):
                publisher.push("alice", "FLOOD", i)
            engine.unsubscribe("alice")
            mark = len(sink.events)
            engine.subscribe("alice")  # while the flood may still be arriving
            for i in range(20):
                publisher.push("alice", "AFTER", i)
            await until(lambda: sink.position("alice", mark), message="the new position")
            await until(lambda: sink.head("alice", mark) == 220, message="seq 220")
            events = sink.of("alice", mark)
            assert events[0][0] == "position"
            assert_contiguous(sink.messages("alice", mark), events[0][2])

    run(test)


def test_the_change_mark_moves_with_every_numbering_and_only_then(infra, publisher):
    """What lets a hub decide the audit of a quiet stream without asking (ServerEngine.mark):
    an answer's mark is the engine's; it holds while nothing is numbered, whoever asks what,
    and moves when any stream, heard or not, gets a message. An engine may keep none."""
    async def test() -> None:
        async with started(infra.settings, "alice", "bob") as (engine, sink):
            await pushed(publisher, sink, "alice", 2)
            wanted = {s: sink.position(s) or (0, "") for s in ("alice", "bob")}
            answer = await engine.history(wanted, 0)
            assert answer is not None
            first = answer["alice"].mark
            if first is None:
                assert engine.mark is None and answer["bob"].mark is None
                return
            assert answer["bob"].mark == first == engine.mark
            again = await engine.history({"bob": wanted["bob"]}, 1 << 20)
            assert again is not None and again["bob"].mark == first
            publisher.push("carol", "M", 1)  # a stream this server does not receive
            await until(lambda: engine.mark != first, message="the mark to move on another stream's message")
            moved = engine.mark
            answer = await engine.history(wanted, 0)
            assert answer is not None and answer["alice"].mark == moved == engine.mark
            await pushed(publisher, sink, "bob", 1)
            await until(lambda: engine.mark != moved, message="the mark to move on a heard stream's message")

    run(test)


def test_restart_of_the_infrastructure_changes_every_epoch(infra, publisher):
    async def test() -> None:
        streams = ("alice", protocol.BROADCAST)
        async with started(infra.settings, *streams) as (engine, sink):
            await until(lambda: engine.live, message="live")
            await pushed(publisher, sink, "alice", 2)
            before = {s: sink.position(s)[1] for s in streams}
            heard = await engine.history({"alice": (2, before["alice"])}, 0)
            assert heard is not None
            mark_before = heard["alice"].mark
            infra.kill()
            await until(lambda: not engine.live, message="live to turn False")
            mark = len(sink.events)
            infra.start()
            await until(lambda: engine.live, message="live again")
            # No subscribe call: the engine re-subscribes by itself, answered in the new epoch.
            for s in streams:
                await until(lambda: sink.position(s, mark), message=f"a new position for {s!r}")
            after = {s: sink.position(s, mark) for s in streams}
            for s in streams:
                assert after[s][1] != before[s]
                assert after[s][0] == 0  # an in-memory engine restarts its numbering
            publisher.push("alice", "NEW", 1)
            await until(lambda: sink.messages("alice", mark), message="a message after the restart")
            [(_, _, seq, epoch, wire)] = sink.messages("alice", mark)
            assert (seq, epoch) == (1, after["alice"][1])
            answer = await engine.history({"alice": (1, before["alice"])}, 1 << 20)
            assert answer == {"alice": StreamHistory(after["alice"][1], 1, None)}
            if mark_before is not None:  # a mark of the old run never matches one of the new
                assert answer["alice"].mark not in (None, mark_before)

    run(test)


def test_live_and_close(infra, caplog):
    async def test() -> None:
        sink = RecordingSink()
        engine = server_engine(infra.settings)
        assert not engine.live  # not started
        await engine.start(sink)
        engine.subscribe("alice")
        await until(lambda: engine.live, message="live")
        await engine.close()
        assert not engine.live
        # After close: nothing raises, nothing is delivered, nothing is logged as an error.
        engine.subscribe("bob")
        engine.unsubscribe("alice")
        assert await engine.history({"alice": (0, "e")}, 0) is None
        await engine.close()

    with caplog.at_level(logging.WARNING):
        run(test)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []


def test_channels_are_streams_of_their_own_routed_numbered_and_kept(infra, publisher):
    """A channel (PROTOCOL.md section 9) is a stream like any other: exact routing (never
    the user of the same name), its own seq and epoch, history."""
    channel = protocol.channel_stream("doc:42")

    async def test() -> None:
        async with started(infra.settings, channel, "doc:42") as (engine, sink):
            for i in range(3):
                publisher.publish("doc:42", "EDIT", {"i": i})
            publisher.push("doc:42", "FOR THE USER", 1)
            publisher.publish("doc:4", "OTHER", 1)
            await until(lambda: len(sink.messages(channel)) == 3 and sink.messages("doc:42"),
                        message="the channel's three messages and the user's one")
            messages = sink.messages(channel)
            assert_contiguous(messages, sink.position(channel)[0])
            assert [browser_json(m[4]) for m in messages] == [
                {"id": "EDIT", "channel": "doc:42", "data": {"i": i}, "seq": m[2], "epoch": m[3]}
                for i, m in zip(range(3), messages)]
            assert browser_json(sink.messages("doc:42")[0][4])["username"] == "doc:42"
            seq, epoch = messages[-1][2], messages[-1][3]
            answer = await engine.history({channel: (seq - 2, epoch)}, 1 << 20)
            assert answer is not None
            assert [s for s, _ in answer[channel].messages or []] == [seq - 1, seq]

    run(test)


def test_commands_reach_the_users_subscribers_in_order_outside_the_numbering(infra, publisher):
    """flow.disconnect / flow.unsubscribe: to the servers holding the user, after what the
    same publisher pushed before, with no seq and nothing in history."""

    async def test() -> None:
        async with started(infra.settings, "alice") as (engine, sink), \
                started(infra.settings, "bob") as (_, bob_sink):
            publisher.push("alice", "BEFORE", 1)
            publisher.unsubscribe("alice", "doc:1")
            publisher.disconnect("alice")
            publisher.push("alice", "AFTER", 2)
            await until(lambda: len(sink.messages("alice")) == 2, message="alice's two messages")
            kinds = [e[0] if e[0] == "command" else browser_json(e[4])["id"]
                     for e in sink.of("alice") if e[0] != "position"]
            assert kinds == ["BEFORE", "command", "command", "AFTER"]
            assert sink.commands("alice") == [{"op": "unsubscribe", "channel": "doc:1"}, {"op": "disconnect"}]
            before, after = sink.messages("alice")
            assert after[2] == before[2] + 1  # the commands took no seq
            assert bob_sink.commands("bob") == []
            answer = await engine.history({"alice": (before[2] - 1, before[3])}, 1 << 20)
            assert answer is not None and [s for s, _ in answer["alice"].messages or []] == [before[2], after[2]]

    run(test)
