"""flowcore.hub against an in-memory engine (tests/fakes.py): joins, honest recovery, gap
repair from history, 1012 when history cannot repair, audits, epoch changes, deadlines.

The engine contract itself (that the real engines number, route and keep history as the
hub expects) is tests/test_engine_contract.py; this file checks what the hub does with it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time

import pytest

from fakes import FakeClock, FakeEngine, FakeTransport
from flowcore import hub as hub_module
from flowcore.hub import Hub, Timers
from flowcore.session import JoinRequest, Session
from flowcore.settings import load_settings
from flowcore.tokens import TokenVerifier, issue_token


@pytest.fixture
def settings(tmp_path):
    return load_settings({
        "FLOW_SECRET": secrets.token_hex(32), "FLOW_ENV_FILE": str(tmp_path / "none"),
        "FLOW_SECRET_FILE": str(tmp_path / "none"),
    })


class World:
    def __init__(self, settings) -> None:
        self.settings = settings
        self.engine = FakeEngine(history_size=50)
        self.hub = Hub(settings, self.engine)
        self.verifier = TokenVerifier(settings)

    async def start(self) -> None:
        await self.hub.start()
        await wait(lambda: self.hub.broadcast.synced)

    async def connect(self, username: str, resume=None) -> tuple[Session, FakeTransport, dict]:
        transport = FakeTransport()
        session = Session(transport, self.hub, self.settings, self.verifier)
        session.opened()
        transport.take()
        resume_frame = {name: {"seq": seq, "epoch": epoch} for name, (seq, epoch) in (resume or {}).items()}
        request = session.receive(json.dumps({"id": "AUTH", "token": issue_token(self.settings, username),
                                              "resume": resume_frame}))
        assert request == JoinRequest(username, resume or {})
        result = await self.hub.join(session, request)
        assert result is not None
        session.attached(result)
        if result.recovered:
            for name, after in result.owed.items():
                until, epoch = result.positions[name]
                async for page in self.hub.history_pages(name, after, until, epoch):
                    for seq, wire in page:
                        session.deliver_history(name == "*", seq, wire)
        session.resumed()
        self.hub.flush()
        ok = json.loads(transport.texts.pop(0))  # what follows AUTH OK stays for the test
        assert ok["id"] == "AUTH OK"
        return session, transport, ok


async def wait(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


def seqs(transport: FakeTransport, stream: str | None = None) -> list[int]:
    return [m["seq"] for m in transport.take() if m != "<3" and (stream is None or m["username"] == stream)]


async def alice_and_bob(settings) -> tuple[World, FakeTransport, FakeTransport]:
    """A started world with one socket each for alice and bob."""
    world = World(settings)
    await world.start()
    _, alice, _ = await world.connect("alice")
    _, bob, _ = await world.connect("bob")
    return world, alice, bob


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_join_subscribes_and_auth_ok_names_every_stream(settings):
    async def main():
        world = World(settings)
        await world.start()
        world.engine.publish("alice", 0)
        world.engine.publish("*", 0)
        _, transport, ok = await world.connect("alice")
        assert "alice" in world.engine.subscribed
        assert ok["streams"] == {"alice": {"seq": 1, "epoch": "e-alice"}, "*": {"seq": 1, "epoch": "e-*"}}
        assert ok["recovered"] is False
        world.engine.publish("alice", 1)
        world.engine.publish("bob", 1)
        assert seqs(transport) == [2]

    run(main())


def test_a_session_closed_before_its_join_is_never_attached(settings):
    # Old hub: a tab that sent AUTH and closed in the same read had its leave run before the
    # join task did; join then attached the dead session for good (stream subscribed
    # upstream, heartbeat ring, presence count), one more for every such tab.
    async def main():
        world = World(settings)
        await world.start()
        for _ in range(3):
            transport = FakeTransport()
            session = Session(transport, world.hub, settings, world.verifier)
            session.opened()
            request = session.receive(json.dumps({"id": "AUTH", "token": issue_token(settings, "mallory")}))
            assert isinstance(request, JoinRequest)
            session.closed()
            world.hub.leave(session)  # what the socket's on_close does, before the join runs
            assert await world.hub.join(session, request) is None
        assert "mallory" not in world.hub.streams
        assert "mallory" not in world.engine.subscribed
        assert len(world.hub.ring) == 0
        assert world.hub.ledger.get("mallory") == 0
        # A live tab of the same user afterwards is attached as usual.
        await world.connect("mallory")
        assert len(world.hub.ring) == 1 and world.hub.ledger.get("mallory") == 1

    run(main())


def test_recovered_only_when_every_stream_is_named(settings):
    async def main():
        world = World(settings)
        await world.start()
        _, transport, ok = await world.connect("alice")
        # Published while the resuming tab was away (the first one stays, so this server
        # still receives the stream).
        for i in range(3):
            world.engine.publish("alice", i)
        world.engine.publish("*", "b")
        positions = {name: (p["seq"], p["epoch"]) for name, p in ok["streams"].items()}
        # Only the user's stream named: the broadcast it missed cannot be vouched for.
        _, t1, ok1 = await world.connect("alice", {"alice": positions["alice"]})
        assert (ok1["recovered"], ok1["missed"]) == (False, 0)
        assert seqs(t1) == []
        _, t2, ok2 = await world.connect("alice", {"*": positions["*"]})
        assert ok2["recovered"] is False
        _, t3, ok3 = await world.connect("alice", {})
        assert ok3["recovered"] is False
        # Both named: everything missed, in order.
        _, t4, ok4 = await world.connect("alice", positions)
        assert (ok4["recovered"], ok4["missed"]) == (True, 4)
        assert [(m["username"], m["seq"]) for m in t4.take()] == [("alice", 1), ("alice", 2), ("alice", 3), ("*", 1)]

    run(main())


def test_a_resume_of_many_pages_is_served_whole(settings, monkeypatch):
    monkeypatch.setattr(hub_module, "PAGE_BYTES", 300)
    async def main():
        world = World(settings)
        await world.start()
        _, _, ok = await world.connect("alice")
        for i in range(40):
            world.engine.publish("*", "x" * 100)
        positions = {name: (p["seq"], p["epoch"]) for name, p in ok["streams"].items()}
        _, transport, ok2 = await world.connect("alice", positions)
        assert ok2["recovered"] is True and ok2["missed"] == 40
        assert seqs(transport, "*") == list(range(1, 41))
        pages = [call for call in world.engine.history_calls if call[1] > 0]
        assert len(pages) >= 10  # fetched a page at a time, not all at once

    run(main())


def test_a_gap_on_arrival_is_repaired_from_history_in_order(settings):
    async def main():
        world = World(settings)
        await world.start()
        _, transport, _ = await world.connect("alice")
        world.engine.publish("alice", 1)
        world.engine.publish("alice", 2, deliver=False)  # lost on the way
        world.engine.publish("alice", 3, deliver=False)
        world.engine.publish("alice", 4)  # reveals the gap
        world.engine.publish("alice", 5)  # held while the repair runs
        await wait(lambda: world.hub.streams["alice"].held is None and world.hub.streams["alice"].seq == 5)
        assert seqs(transport) == [1, 2, 3, 4, 5]
        assert world.hub.repairs == 1

    run(main())


def test_a_gap_history_cannot_repair_closes_1012_with_a_reconnect_window(settings):
    async def main():
        world, transport, other = await alice_and_bob(settings)
        world.engine.publish("alice", 1)
        for i in range(60):  # more than the engine's history of 50
            world.engine.publish("alice", i, deliver=False)
        world.engine.publish("alice", "late")
        world.engine.publish("bob", "fine")
        await wait(lambda: transport.closed is not None)
        code, reason = transport.closed
        assert code == 1012 and "reconnect_within=" in reason
        assert seqs(transport) == [1]  # never the message after the gap
        assert other.closed is None and seqs(other) == [1]

    run(main())


def test_a_trailing_gap_is_found_by_the_position_or_the_audit(settings):
    async def main():
        world = World(settings)
        await world.start()
        _, transport, _ = await world.connect("alice")
        world.engine.publish("alice", 1)
        world.engine.publish("alice", 2, deliver=False)  # the last of a burst, lost
        await world.hub.audit()  # sees the head at 2, gives time for it to arrive
        assert world.hub.repairs == 0
        await world.hub.audit()  # still at 1: lost, repair
        await wait(lambda: world.hub.streams["alice"].seq == 2)
        assert seqs(transport) == [1, 2]
        world.engine.publish("alice", 3, deliver=False)
        world.hub.on_position("alice", 3, "e-alice")  # an engine's later position says so too
        await wait(lambda: world.hub.streams["alice"].seq == 3)
        assert seqs(transport) == [3]

    run(main())


def test_an_epoch_change_closes_the_streams_sockets_with_1012(settings):
    async def main():
        world, alice, bob = await alice_and_bob(settings)
        world.engine.publish("alice", 1)
        world.engine.renumber("alice")
        world.engine.publish("alice", "new numbering")
        assert alice.closed is not None and alice.closed[0] == 1012
        assert bob.closed is None

    run(main())


def test_join_is_refused_while_the_engine_does_not_answer(settings, monkeypatch):
    monkeypatch.setattr(hub_module, "UPSTREAM_TIMEOUT", 0.05)
    async def main():
        world = World(settings)
        await world.start()
        world.engine.answer_subscriptions = False
        transport = FakeTransport()
        session = Session(transport, world.hub, settings, world.verifier)
        assert await world.hub.join(session, JoinRequest("carol", {})) is None

    run(main())


def test_the_reconnect_window_grows_with_the_pool(settings):
    hub = Hub(settings, FakeEngine())
    assert hub.reconnect_window(1) == hub_module.MIN_RECONNECT_WINDOW
    small, large = hub.reconnect_window(500), hub.reconnect_window(1500)
    assert large > small and 4 <= large <= 30  # a few seconds for thousands of sockets


def test_leaving_unsubscribes_and_nothing_reaches_the_engine_after_close(settings):
    async def main():
        world = World(settings)
        await world.start()
        session, transport, _ = await world.connect("alice")
        world.hub.leave(session)
        assert "alice" not in world.engine.subscribed and "alice" not in world.hub.streams
        second, _, _ = await world.connect("dave")
        await world.hub.close()
        world.hub.leave(second)  # a socket closing after the drain: no call into a closed engine

    run(main())


def test_timers_tick_due_sessions_once_and_skip_stale_entries(settings):
    clock = FakeClock(time.time())

    class Ticking:
        def __init__(self, at: float) -> None:
            self.at: float | None = at
            self.ticks = 0

        def deadline(self):
            return self.at

        def tick(self):
            self.ticks += 1
            self.at = None

        def __lt__(self, other):
            return id(self) < id(other)

    timers = Timers(clock.monotonic)
    early, late, moved = Ticking(clock.now + 1), Ticking(clock.now + 5), Ticking(clock.now + 2)
    for item in (early, late, moved):
        timers.schedule(item)  # type: ignore[arg-type]
    moved.at = clock.now + 10  # rescheduled: the first entry is stale
    timers.schedule(moved)  # type: ignore[arg-type]
    clock.advance(3)
    timers.due()
    assert (early.ticks, late.ticks, moved.ticks) == (1, 0, 0)
    clock.advance(10)
    timers.due()
    assert (early.ticks, late.ticks, moved.ticks) == (1, 1, 1)
    assert len(timers) == 0


def test_an_audit_asks_only_for_quiet_streams_and_still_finds_a_busy_streams_trailing_loss(settings):
    async def main():
        world, transport, other = await alice_and_bob(settings)
        world.engine.publish("alice", 1)
        world.engine.publish("bob", 1)
        await world.hub.audit()  # the first audit asks for every stream

        def asked() -> set[str]:
            names = {name for wanted, _ in world.engine.history_calls for name in wanted}
            world.engine.history_calls.clear()
            return names

        assert asked() >= {"alice", "bob"}
        world.engine.publish("alice", 2)  # alice is busy, bob quiet
        await world.hub.audit()
        assert "alice" not in asked()
        world.engine.publish("alice", 3)
        world.engine.publish("alice", 4, deliver=False)  # the last of her burst, lost
        await world.hub.audit()  # she moved: not asked yet
        assert "alice" not in asked()
        await world.hub.audit()  # quiet now: asked, sees the head at 4
        assert "alice" in asked() and world.hub.repairs == 0
        await world.hub.audit()  # still at 3: lost, repair
        await wait(lambda: world.hub.streams["alice"].seq == 4)
        assert seqs(transport) == [1, 2, 3, 4]
        assert seqs(other) == [1] and other.closed is None

    run(main())


def test_an_audit_of_many_quiet_streams_asks_in_bounded_requests_and_finds_a_loss_in_the_last(settings):
    # The engine answers each request in one step of its own loop (the ZeroMQ proxy: about
    # 2 us a stream), so one request naming thousands of streams stalls every push: a
    # request names at most 256, half a millisecond of the proxy's time.
    users = 600

    async def main():
        world = World(settings)
        await world.start()
        transports = [(await world.connect(f"user{i:04d}"))[1] for i in range(users)]
        last = f"user{users - 1:04d}"
        world.engine.publish(last, 1)
        world.engine.publish(last, 2, deliver=False)  # lost, and nothing after it
        await world.hub.audit()
        sizes = [len(wanted) for wanted, _ in world.engine.history_calls]
        asked = {name for wanted, _ in world.engine.history_calls for name in wanted}
        assert max(sizes) <= 256 and len(sizes) >= 3
        assert asked >= {f"user{i:04d}" for i in range(users)}
        await world.hub.audit()  # still at 1: repaired
        await wait(lambda: world.hub.streams[last].seq == 2)
        assert seqs(transports[-1]) == [1, 2]

    run(main())


async def alice_with_a_mark(settings) -> tuple[World, FakeTransport]:
    """A started world whose engine keeps a change mark, with one socket for alice, who
    has had one message."""
    world = World(settings)
    await world.start()
    _, transport, _ = await world.connect("alice")
    world.engine.marking = True
    world.engine.publish("alice", 1)
    return world, transport


def test_with_an_unchanged_mark_a_quiet_deployment_audits_without_asking(settings):
    """An engine that keeps a change mark (ServerEngine.mark): while it still reads as it
    did with the last answer, nothing was numbered since, and the audit decides alone."""
    async def main():
        world, transport, other = await alice_and_bob(settings)
        world.engine.marking = True
        world.engine.publish("alice", 1)
        world.engine.publish("bob", 1)
        await world.hub.audit()  # the first audit asks for every stream, and hears the mark
        assert world.engine.history_calls
        world.engine.history_calls.clear()
        for _ in range(3):
            world.engine.ping()
            await world.hub.audit()
        assert world.engine.history_calls == []  # idle: no question at all
        assert world.hub.repairs == 0

        world.engine.publish("carol", 1)  # any stream's message moves the mark
        world.engine.ping()
        await world.hub.audit()
        assert {name for wanted, _ in world.engine.history_calls for name in wanted} >= {"alice", "bob"}
        assert world.hub.repairs == 0
        assert seqs(transport) == [1] and seqs(other) == [1]

    run(main())


def test_a_loss_is_found_from_the_mark_though_the_mark_is_heard_late(settings):
    """The mark a server holds can be older than the engine's (heard at the last ping): a
    message numbered and lost after it is found an audit later than by asking, not never."""
    async def main():
        world, transport = await alice_with_a_mark(settings)
        await world.hub.audit()  # asked: head 1, mark m
        world.engine.publish("alice", 2, deliver=False)  # lost; the server has not heard the new mark
        audits = 0
        while not world.hub.repairs and audits < 6:
            await world.hub.audit()
            audits += 1
            if audits == 2:
                world.engine.ping()  # the new mark arrives
        await wait(lambda: world.hub.streams["alice"].seq == 2)
        assert seqs(transport) == [1, 2]
        assert audits <= 4  # two audits deaf to it, then one to see the head, one to find it behind

    run(main())


def test_a_loss_before_the_answer_is_found_without_asking_again(settings):
    """The head an answer gave is the one to reach: with the mark unchanged since, a stream
    still short of it lost its last message, and is repaired without another question."""
    async def main():
        world, transport = await alice_with_a_mark(settings)
        world.engine.publish("alice", 2, deliver=False)  # lost before the first audit
        await world.hub.audit()  # asked: head 2, which may yet arrive
        assert world.hub.repairs == 0
        world.engine.history_calls.clear()
        await world.hub.audit()  # the mark is the answer's: decided alone, still short
        assert [wanted for wanted, max_bytes in world.engine.history_calls if max_bytes == 0] == []
        await wait(lambda: world.hub.streams["alice"].seq == 2)
        assert seqs(transport) == [1, 2] and world.hub.repairs == 1

    run(main())


def test_the_mark_of_an_engine_gone_away_starts_no_repair_loop(settings):
    """A stream found short from the mark while the engine is away: the repair could only
    fail and close the stream's sockets, again every audit. As when asking, nothing is
    done until the engine answers again; then the loss is repaired."""
    async def main():
        world, transport = await alice_with_a_mark(settings)
        world.engine.publish("alice", 2, deliver=False)  # lost
        await world.hub.audit()  # asked: head 2
        world.engine.live = world.engine.answering = False
        for _ in range(3):
            await world.hub.audit()
        assert world.hub.repairs == 0 and transport.closed is None
        world.engine.live = world.engine.answering = True
        await world.hub.audit()
        await wait(lambda: world.hub.streams["alice"].seq == 2)
        assert seqs(transport) == [1, 2] and transport.closed is None

    run(main())


def test_an_audit_that_does_not_trust_the_mark_asks(settings):
    """Every AUDIT_ASK_EVERY audits the hub asks whatever the mark says: a mark that never
    moves (a publisher that keeps none) delays a finding, never hides it."""
    async def main():
        world, transport = await alice_with_a_mark(settings)
        await world.hub.audit()  # asked: head 1
        world.engine.publish("alice", 2, deliver=False)  # lost...
        world.engine.changes -= 1  # ...by a publisher that left the mark as it was
        world.engine.ping()
        for _ in range(3):
            await world.hub.audit()
        assert world.hub.repairs == 0  # the mark hides it
        world.engine.history_calls.clear()
        await world.hub.audit(trust_mark=False)  # asks: head 2
        assert world.engine.history_calls
        await world.hub.audit()
        await wait(lambda: world.hub.streams["alice"].seq == 2)
        assert seqs(transport) == [1, 2]
        assert hub_module.AUDIT_ASK_EVERY * hub_module.AUDIT_INTERVAL <= 30

    run(main())


def test_after_a_failed_repair_the_stream_goes_on_from_the_engines_head(settings):
    async def main():
        world = World(settings)
        await world.start()
        _, transport, _ = await world.connect("alice")
        world.engine.publish("*", 0)
        for i in range(60):  # lost, and more than the history holds
            world.engine.publish("*", i, deliver=False)
        world.hub.on_position("*", world.engine.heads["*"], "e-*")  # a trailing gap: nothing held
        await wait(lambda: transport.closed is not None)
        assert transport.closed[0] == 1012
        assert world.hub.broadcast.seq == world.engine.heads["*"]  # not stuck at 1
        repairs = world.hub.repairs
        await world.hub.audit()
        await world.hub.audit()
        assert world.hub.repairs == repairs  # no repair loop, no second round of closes
        _, fresh, ok = await world.connect("bob")
        assert ok["streams"]["*"]["seq"] == world.engine.heads["*"]
        world.engine.publish("*", "next")
        assert seqs(fresh, "*") == [world.engine.heads["*"]]

    run(main())


def test_a_client_ahead_of_this_server_is_recovered_and_gets_no_copies(settings):
    async def main():
        world = World(settings)
        await world.start()
        _, first, ok = await world.connect("alice")
        world.engine.publish("alice", 1)
        world.engine.publish("alice", 2, deliver=False)  # numbered, still on its way here
        world.engine.publish("alice", 3, deliver=False)
        # A tab that already has 1..3 (from another server of the pool) moves here.
        _, moved, ok2 = await world.connect("alice", {"alice": (3, "e-alice"), "*": (0, "e-*")})
        assert (ok2["recovered"], ok2["missed"]) == (True, 0)
        assert ok2["streams"]["alice"] == {"seq": 3, "epoch": "e-alice"}
        for seq in (2, 3):  # they arrive here late
            world.hub.on_message("alice", seq, "e-alice", world.engine.log["alice"][seq - 1][1])
        world.engine.publish("alice", 4)
        world.hub.flush()
        assert seqs(moved) == [4]  # never 2 and 3 again
        assert seqs(first) == [1, 2, 3, 4]
        # A position beyond the engine's head is no position: not recovered.
        _, _, ok3 = await world.connect("alice", {"alice": (99, "e-alice"), "*": (0, "e-*")})
        assert ok3["recovered"] is False

    run(main())


def test_the_timers_heap_does_not_keep_closed_sessions(settings):
    clock = FakeClock(time.time())

    class Ticking:
        def __init__(self, at: float) -> None:
            self.at: float | None = at

        def deadline(self):
            return self.at

        def tick(self):
            self.at = None

        def __lt__(self, other):
            return id(self) < id(other)

    timers = Timers(clock.monotonic)
    live = Ticking(clock.now + 3600)
    timers.schedule(live)  # type: ignore[arg-type]
    for _ in range(20 * hub_module.COMPACT_MIN):
        gone = Ticking(clock.now + 3600)  # a socket that closes long before its token expires
        timers.schedule(gone)  # type: ignore[arg-type]
        gone.at = None
        live.at = (live.at or 0) + 1  # and one that refreshes its token again and again
        timers.schedule(live)  # type: ignore[arg-type]
    assert len(timers) <= 2 * hub_module.COMPACT_MIN + 1


# ---------------------------------------------------------------- channels (section 9)


async def subscribed(world: World, session: Session, channel: str, since=None):
    """A granted SUBSCRIBE through the hub, as the server does it (history served)."""
    frame = {"id": "SUBSCRIBE", "channel": channel}
    if since is not None:
        frame["since"] = {"seq": since[0], "epoch": since[1]}
    request = session.receive(json.dumps(frame))
    assert request is not None
    result = await world.hub.subscribe_channel(request.sub, request.since)
    assert result is not None
    session.channel_attached(request.sub, result)
    if result.owed_after is not None and result.position[0] > result.owed_after:
        async for page in world.hub.history_pages(request.sub.stream, result.owed_after, *result.position):
            for seq, wire in page:
                session.channel_history(request.sub, seq, wire)
    session.channel_resumed(request.sub)
    world.hub.flush()
    return request.sub, result


async def channel_session(world: World, username: str):
    transport = FakeTransport()
    session = Session(transport, world.hub, world.settings, world.verifier)
    session.opened()
    token = issue_token(world.settings, username, extra={"channels": ["doc:*"]})
    request = session.receive(json.dumps({"id": "AUTH", "token": token}))
    result = await world.hub.join(session, request)
    session.attached(result)
    session.resumed()
    transport.take()
    return session, transport


def test_a_channel_is_received_by_its_subscriptions_only_and_unsubscribed_upstream_with_the_last(settings):
    async def test() -> None:
        world = World(settings)
        await world.start()
        (alice, a), (bob, b) = [await channel_session(world, name) for name in ("alice", "bob")]
        sub_a, _ = await subscribed(world, alice, "doc:1")
        sub_b, _ = await subscribed(world, bob, "doc:1")
        assert "\0doc:1" in world.engine.subscribed
        world.engine.publish("\0doc:1", "x")
        world.hub.flush()
        assert [f["id"] for f in a.take()] == ["SUBSCRIBE OK", "M"]
        assert [f["id"] for f in b.take()] == ["SUBSCRIBE OK", "M"]
        alice.drop_channel(sub_a)
        assert "\0doc:1" in world.engine.subscribed
        bob.closed()
        world.hub.leave(bob)
        assert "\0doc:1" not in world.engine.subscribed and "\0doc:1" not in world.hub.streams

    run(test())


def test_a_channel_gap_is_repaired_and_an_epoch_change_resets_the_subscriptions_not_the_sockets(settings):
    async def test() -> None:
        world = World(settings)
        await world.start()
        session, transport = await channel_session(world, "alice")
        sub, _ = await subscribed(world, session, "doc:1")
        transport.take()
        world.engine.publish("\0doc:1", 1)
        world.engine.publish("\0doc:1", 2, deliver=False)  # lost upstream
        world.engine.publish("\0doc:1", 3)
        await wait(lambda: world.hub.streams["\0doc:1"].held is None and world.hub.streams["\0doc:1"].seq == 3)
        world.hub.flush()
        assert [f["data"] for f in transport.take()] == [1, 2, 3]
        world.engine.renumber("\0doc:1")
        world.engine.publish("\0doc:1", "new")
        world.hub.flush()
        frames = transport.take()
        assert {"id": "UNSUBSCRIBED", "channel": "doc:1", "reason": "reset", "resubscribe": True} in frames
        assert not transport.closed and session.channels == {}
        # Subscribing again with the old position: not recovered, live from the new numbering.
        _, result = await subscribed(world, session, "doc:1", since=(3, sub.state.epoch if sub.state else "old"))
        assert result.recovered is False

    run(test())


def test_subscribe_with_since_recovers_exactly_what_history_holds(settings):
    async def test() -> None:
        world = World(settings)
        await world.start()
        session, transport = await channel_session(world, "alice")
        for i in range(5):
            world.engine.publish("\0doc:1", i)
        epoch = world.engine.epoch("\0doc:1")
        _, result = await subscribed(world, session, "doc:1", since=(2, epoch))
        frames = transport.take()
        assert frames[0]["recovered"] is True and frames[0]["missed"] == 3
        assert [f["data"] for f in frames[1:]] == [2, 3, 4]
        _, result = await subscribed(world, (await channel_session(world, "bob"))[0], "doc:1", since=(9, epoch))
        assert result.recovered is False  # beyond the head: no position the engine vouches for

    run(test())
