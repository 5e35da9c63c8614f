"""The ZeroMQ engine's own behaviour, beyond the contract (tests/test_engine_contract.py).

Bad input from the proxy's side is made by a stand-in: real XPUB and ROUTER sockets bound
in this process on the engine's ephemeral endpoints, sending what a broken proxy might.
Everything else runs against the real message_proxy.py.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
import zmq

import flow
from flowcore import engine as engine_module
from flowcore import protocol
from flowcore.engine import StreamHistory, server_engine
from flowcore.engines import zmq as zmq_engine
from flowcore.settings import load_settings
from support import base_env, free_port
from test_engine_contract import RecordingSink, ZmqInfrastructure, browser_json, run, until

NOBLOCK = int(zmq.NOBLOCK)


class StandIn:
    """The proxy's sockets, driven by the test: what it sends is up to the test."""

    def __init__(self) -> None:
        # Bound on ports the kernel picks, then named in the settings: no port race.
        self.context = zmq.Context()
        self.xpub = self.context.socket(zmq.XPUB)
        self.xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.xpub.bind("tcp://127.0.0.1:*")
        self.router = self.context.socket(zmq.ROUTER)
        self.router.bind("tcp://127.0.0.1:*")
        self.endpoints = {
            "FLOW_FANOUT_ENDPOINT": self.xpub.getsockopt_string(zmq.LAST_ENDPOINT),
            "FLOW_CONTROL_ENDPOINT": self.router.getsockopt_string(zmq.LAST_ENDPOINT),
        }
        self.subscriptions: list[bytes] = []
        self.requests: list[tuple[bytes, bytes]] = []  # (routing id, request JSON)

    def take(self) -> None:
        """Read what the engine sent, without blocking."""
        while True:
            try:
                self.subscriptions.append(self.xpub.recv(NOBLOCK))
            except zmq.Again:
                break
        while True:
            try:
                identity, _, request = self.router.recv_multipart(NOBLOCK)
            except zmq.Again:
                break
            self.requests.append((identity, request))

    def history_requests(self) -> list[tuple[bytes, protocol.HistoryRequest]]:
        self.take()
        parsed = [(identity, protocol.parse_history_request(raw)) for identity, raw in self.requests
                  if not raw.startswith(protocol.PRESENCE_REQUEST_HEAD)]  # presence reports and leases
        return [(identity, r) for identity, r in parsed if r.op == "history"]

    def subscribed(self, stream: str) -> bool:
        self.take()
        return b"\x01" + protocol.topic(stream) in self.subscriptions

    def close(self) -> None:
        self.xpub.close(0)
        self.router.close(0)
        self.context.term()


@pytest.fixture
def stand_in() -> Any:
    fake = StandIn()
    yield fake
    fake.close()


@pytest.fixture
def settings(tmp_path: Path, stand_in: StandIn) -> Any:
    """Settings whose fan-out and control endpoints are the stand-in's."""
    return load_settings(base_env(tmp_path, **stand_in.endpoints))


def test_malformed_deliveries_are_dropped_with_one_warning(settings, stand_in, caplog):
    topic = protocol.topic("alice")
    garbage = [
        topic + b"M",                   # no header
        topic + b"Mx e1 frame",         # seq not a number
        topic + b"M12 e1",              # no end of epoch
        topic + b"Q1 e1 ",              # unknown kind
        topic + b"M1 \xff\xfe frame",   # epoch not ASCII
    ] * 20

    async def test() -> None:
        sink = RecordingSink()
        engine = server_engine(settings)
        await engine.start(sink)
        engine.subscribe("alice")
        await until(lambda: stand_in.subscribed("alice"), message="the subscription")
        stand_in.xpub.send(protocol.sync_frame("alice", 0, "e1"))
        for raw in garbage:
            stand_in.xpub.send(raw)
        wire = protocol.encode_text_frame(b'{"ok":1}')
        stand_in.xpub.send(protocol.message_frame("alice", 1, "e1", wire))
        await until(lambda: sink.messages("alice"), message="the good message after the garbage")
        assert sink.events == [("position", "alice", 0, "e1"), ("message", "alice", 1, "e1", wire)]
        await engine.close()

    with caplog.at_level(logging.WARNING, logger="flow.engine.zmq"):
        run(test)
    records = [r for r in caplog.records if r.name == "flow.engine.zmq"]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.WARNING and records[0].exc_info is None
    assert "malformed delivery" in records[0].getMessage()


def test_a_new_epoch_is_told_by_a_position_even_before_its_sync(settings, stand_in):
    """A restarted proxy's first messages may overtake the sync that answers the
    re-sent subscription; the sink still learns of the epoch from a position first."""
    async def test() -> None:
        sink = RecordingSink()
        engine = server_engine(settings)
        await engine.start(sink)
        engine.subscribe("alice")
        await until(lambda: stand_in.subscribed("alice"), message="the subscription")
        wire = protocol.encode_text_frame(b"{}")
        stand_in.xpub.send(protocol.message_frame("alice", 3, "early", wire))  # before any answer: dropped
        stand_in.xpub.send(protocol.sync_frame("alice", 3, "e1"))
        stand_in.xpub.send(protocol.message_frame("alice", 4, "e1", wire))
        stand_in.xpub.send(protocol.message_frame("alice", 1, "e2", wire))  # renumbered
        stand_in.xpub.send(protocol.sync_frame("alice", 1, "e2"))
        await until(lambda: len(sink.events) == 5, message="every delivery")
        assert [e[:4] for e in sink.events] == [
            ("position", "alice", 3, "e1"),
            ("message", "alice", 4, "e1"),
            ("position", "alice", 0, "e2"),
            ("message", "alice", 1, "e2"),
            ("position", "alice", 1, "e2"),
        ]
        await engine.close()

    run(test)


def test_bad_history_replies_are_warned_about_and_answer_none(settings, stand_in, caplog, monkeypatch):
    monkeypatch.setattr(zmq_engine, "HISTORY_TIMEOUT", 1.0)
    # Each case warns on its own, not folded into the last case's warning.
    monkeypatch.setattr(zmq_engine, "WARNING_INTERVAL", 0.0)
    wire = protocol.encode_text_frame(b'{"id":"X"}')

    def good(rid: int) -> list[bytes]:
        return protocol.build_history_reply(rid, {"alice": ("e1", 2, [(2, wire)])})

    bad_replies = {
        "not JSON": lambda rid: [b"{nope"],
        "frames missing": lambda rid: good(rid)[:1],
        "other streams": lambda rid: protocol.build_history_reply(rid, {"bob": ("e1", 2, [])}),
        "a gap": lambda rid: protocol.build_history_reply(rid, {"alice": ("e1", 3, [(3, wire)])}),
        "another epoch": lambda rid: protocol.build_history_reply(rid, {"alice": ("e2", 2, [(2, wire)])}),
    }

    async def ask(engine: Any, reply: Any) -> Any:
        task = asyncio.ensure_future(engine.history({"alice": (1, "e1")}, 1000))
        seen = len(stand_in.history_requests())
        await until(lambda: len(stand_in.history_requests()) > seen, message="the request")
        identity, request = stand_in.history_requests()[-1]
        assert (request.streams, request.max_bytes) == ({"alice": (1, "e1")}, 1000)
        # An answer to a request never sent comes first: ignored, with a warning.
        stand_in.router.send_multipart([identity, b"", *protocol.build_history_reply(10**6, {})])
        stand_in.router.send_multipart([identity, b"", *reply(request.request_id)])
        return await task

    async def test() -> None:
        engine = server_engine(settings)
        await engine.start(RecordingSink())
        for case, reply in bad_replies.items():
            caplog.clear()
            assert await ask(engine, reply) is None, case
            warnings = [r for r in caplog.records if r.name == "flow.engine.zmq"]
            assert warnings and all(r.levelno == logging.WARNING and not r.exc_info for r in warnings), case
        assert await ask(engine, good) == {"alice": StreamHistory("e1", 2, [(2, wire)])}
        await engine.close()

    with caplog.at_level(logging.WARNING, logger="flow.engine.zmq"):
        run(test)


def test_live_follows_ping_answers(settings, stand_in):
    async def test() -> None:
        engine = server_engine(settings)
        await engine.start(RecordingSink())
        pings = lambda: [r for r in stand_in.requests if not r[1].startswith(protocol.PRESENCE_REQUEST_HEAD)]
        await until(lambda: stand_in.take() or pings(), message="a ping")
        assert not engine.live  # the stand-in has not answered
        identity, raw = pings()[-1]
        request = protocol.parse_history_request(raw)
        assert request.op == "ping"
        stand_in.router.send_multipart([identity, b"", *protocol.build_history_reply(request.request_id, {})])
        await until(lambda: engine.live, message="live after the answer")
        await engine.close()

    run(test)


def test_a_failing_sink_is_logged_and_fan_out_goes_on(tmp_path, caplog):
    infra = ZmqInfrastructure(tmp_path)
    publisher = flow.Flow(settings=infra.settings, linger=1)

    class FailingOnce(RecordingSink):
        failed = False

        def on_message(self, stream: str, seq: int, epoch: str, wire: bytes) -> None:
            if not self.failed:
                self.failed = True
                raise RuntimeError("a bug in the hub")
            super().on_message(stream, seq, epoch, wire)

    async def test() -> None:
        sink = FailingOnce()
        engine = server_engine(infra.settings)
        await engine.start(sink)
        engine.subscribe("alice")
        await until(lambda: sink.position("alice"), message="the position")
        publisher.push("alice", "FIRST", 1)
        publisher.push("alice", "SECOND", 2)
        await until(lambda: sink.messages("alice"), message="the second message")
        assert [browser_json(m[4])["id"] for m in sink.messages("alice")] == ["SECOND"]
        await engine.close()

    try:
        with caplog.at_level(logging.WARNING):
            run(test)
    finally:
        publisher.close()
        infra.stop()
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.exc_info and "a bug in the hub" in str(record.exc_info[1])


def test_closing_mid_flood_raises_and_logs_nothing(tmp_path, caplog):
    infra = ZmqInfrastructure(tmp_path)
    publisher = flow.Flow(settings=infra.settings, linger=1)

    async def test() -> None:
        sink = RecordingSink()
        engine = server_engine(infra.settings)
        await engine.start(sink)
        for name in ("alice", "bob", "*"):
            engine.subscribe(name)
        await until(lambda: sink.position("alice") and sink.position("*"), message="the positions")
        pending = asyncio.ensure_future(engine.history({"alice": (0, sink.position("alice")[1])}, 1 << 20))
        for i in range(2000):
            publisher.push("alice", "FLOOD", i)
            publisher.push_all("FLOOD", i)
        await until(lambda: sink.messages("alice"), message="the flood arriving")
        closing = asyncio.ensure_future(engine.close())
        engine.unsubscribe("bob")  # while closing
        await closing
        answer = await pending  # answered before the close, or None
        assert answer is None or answer.keys() == {"alice"}
        count = len(sink.events)
        engine.unsubscribe("alice")
        engine.subscribe("carol")
        assert await engine.history({"alice": (0, "e")}, 0) is None
        await engine.close()
        publisher.push("alice", "AFTER", 0)
        assert len(sink.events) == count

    try:
        with caplog.at_level(logging.DEBUG):
            run(test)
    finally:
        publisher.close()
        infra.stop()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info] == []


def test_close_before_start_is_fine(settings):
    async def test() -> None:
        engine = server_engine(settings)
        engine.subscribe("alice")
        await engine.close()
        await engine.close()
        assert not engine.live
        assert await engine.history({"alice": (0, "e")}, 0) is None

    run(test)


# ---------------------------------------------------------------- the publisher side


def test_queue_full_is_one_class_and_carries_no_zmq_chain(settings):
    assert flow.QueueFull is engine_module.QueueFull
    publisher = engine_module.publisher_engine(settings, endpoint=f"tcp://127.0.0.1:{free_port()}",
                                               queue_size=3, linger=0)
    assert isinstance(publisher, zmq_engine.ZmqPublisherEngine)
    frame = protocol.encode_push("alice", "ID", 1, 1024)
    with pytest.raises(flow.QueueFull, match="not taking messages and 3 are queued") as refused:
        for _ in range(100):
            publisher.send(frame)
    assert refused.value.__cause__ is None and refused.value.__suppress_context__
    publisher.close()
    with pytest.raises(RuntimeError, match="closed"):
        publisher.send(frame)


def test_flow_after_close_refuses_and_close_is_idempotent(settings):
    publisher = flow.Flow(f"tcp://127.0.0.1:{free_port()}", settings=settings, linger=0)
    publisher.push("alice", "ID", 1)
    publisher.close()
    publisher.close()
    for call in (lambda: publisher.push("alice", "ID", 2), lambda: publisher.push_all("ID", 2)):
        with pytest.raises(RuntimeError, match="closed"):
            call()


def test_forget_after_fork_keeps_the_parents_socket_alive(settings):
    publisher = zmq_engine.ZmqPublisherEngine(settings, endpoint=f"tcp://127.0.0.1:{free_port()}", linger=0)
    publisher.send(protocol.encode_push("alice", "ID", 1, 1024))
    sock = publisher.socket
    publisher.forget_after_fork()
    assert publisher.socket is None
    assert any(kept[0] is sock for kept in zmq_engine._abandoned)  # never finalized here
    assert not sock.closed
    # What a forked child does next: open its own socket.
    publisher.send(protocol.encode_push("alice", "ID", 2, 1024))
    assert publisher.socket is not None and publisher.socket is not sock
    publisher.close()
    kept = next(k for k in zmq_engine._abandoned if k[0] is sock)
    zmq_engine._abandoned.remove(kept)
    sock.close(0)
    kept[1].term()


def test_publisher_flush_confirms_with_the_proxy_and_times_out_without_one(tmp_path, settings):
    import time

    absent = zmq_engine.ZmqPublisherEngine(settings, endpoint=f"tcp://127.0.0.1:{free_port()}", linger=5)
    assert absent.flush_marker() is None  # nothing sent: nothing to mark
    assert absent.flush(5) is True  # at once
    absent.send(protocol.encode_push("alice", "ID", 1, 1024))
    started = time.monotonic()
    assert absent.flush(0.3) is False
    assert 0.25 <= time.monotonic() - started < 2
    started = time.monotonic()
    absent.close(linger=0)  # its own linger is 5s: not waited for
    assert time.monotonic() - started < 1
    assert absent.flush_marker() is None

    infra = ZmqInfrastructure(tmp_path / "live")
    live = engine_module.publisher_engine(infra.settings, linger=1)
    try:
        for i in range(100):
            live.send(protocol.encode_push("alice", "ID", i, 1024))
        assert live.flush(15) is True
        token = live.flush_marker()
        assert token is not None and live.wait_flushed(token, 15) is True
    finally:
        live.close()
        infra.stop()
