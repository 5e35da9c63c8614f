"""Presence in the hub and the session (PROTOCOL.md section 9) against the in-memory engine
(tests/fakes.py): what each socket counts, the snapshot in SUBSCRIBE OK, JOIN/LEAVE only
after it and only newer than it, diffs that raced the snapshot, a fresh snapshot after
the engine lost presence, PRESENCE queries."""

from __future__ import annotations

import json
import secrets

import pytest

from flowcore.presence import PresenceEvent, PresenceTable
from flowcore.session import PresenceAsk, SubscribeRequest
from flowcore.settings import load_settings
from test_hub import World, channel_session, run, wait

DOC = "\0doc:1"


@pytest.fixture
def settings(tmp_path):
    return load_settings({
        "FLOW_SECRET": secrets.token_hex(32), "FLOW_ENV_FILE": str(tmp_path / "none"),
        "FLOW_SECRET_FILE": str(tmp_path / "none"), "FLOW_PRESENCE_CHANNELS": "doc:*",
    })


async def subscribe(world: World, session, channel: str, **frame) -> tuple:
    """SUBSCRIBE as the server does it: hub, then the snapshot, then SUBSCRIBE OK."""
    request = session.receive(json.dumps({"id": "SUBSCRIBE", "channel": channel, **frame}))
    assert isinstance(request, SubscribeRequest)
    result = await world.hub.subscribe_channel(request.sub, request.since)
    snapshot = await world.hub.presence(request.sub) if request.sub.wants_presence else None
    session.channel_attached(request.sub, result, snapshot)
    world.hub.presence_sent(request.sub)
    session.channel_resumed(request.sub)
    world.hub.flush()
    return request.sub


def test_every_socket_counts_in_the_ledger_and_leaves_it_whole(settings):
    async def test() -> None:
        world = World(settings)
        await world.start()
        alice, _ = await channel_session(world, "alice")
        alice2, _ = await channel_session(world, "alice")
        ledger = world.hub.ledger
        assert (ledger.get("alice"), ledger.get("*")) == (2, 2)
        sub = await subscribe(world, alice, "doc:1")
        await subscribe(world, alice2, "doc:1", presence=False)  # counted all the same
        assert (ledger.get(DOC), ledger.get(DOC, "alice")) == (2, 2)
        alice.drop_channel(sub)
        assert ledger.get(DOC, "alice") == 1
        for session in (alice, alice2):
            session.closed()
            world.hub.leave(session)
        assert ledger.counts == {}

    run(test())


def test_snapshot_in_subscribe_ok_then_only_newer_diffs(settings):
    async def test() -> None:
        world = World(settings)
        await world.start()
        (olga, o), (bob, b) = [await channel_session(world, name) for name in ("olga", "bob")]
        sub = await subscribe(world, olga, "doc:1")
        [ok] = o.take()
        assert ok["presence"]["users"] == {"olga": {"connections": 1}}
        await subscribe(world, bob, "doc:1")
        world.hub.flush()
        [join] = o.take()
        assert (join["id"], join["username"]) == ("JOIN", "bob") and join["version"] > ok["presence"]["version"]
        # A diff not newer than what the socket has is never sent.
        world.hub.on_presence(PresenceEvent(DOC, "LEAVE", "bob", join["version"]))
        world.hub.flush()
        assert o.take() == []
        assert sub.presence_version == join["version"]

    run(test())


def test_diffs_that_arrived_before_subscribe_ok_follow_it_when_newer_than_the_snapshot(settings):
    async def test() -> None:
        world = World(settings)
        await world.start()
        (olga, o), (bob, _) = [await channel_session(world, name) for name in ("olga", "bob")]
        await subscribe(world, bob, "doc:1")
        request = olga.receive(json.dumps({"id": "SUBSCRIBE", "channel": "doc:1"}))
        result = await world.hub.subscribe_channel(request.sub, request.since)
        snapshot = await world.hub.presence(request.sub)
        # While the snapshot travelled: one diff older than it, one newer.
        world.hub.on_presence(PresenceEvent(DOC, "JOIN", "old", snapshot.version - 1))
        world.hub.on_presence(PresenceEvent(DOC, "JOIN", "carl", snapshot.version + 1))
        world.hub.flush()
        assert o.take() == []  # nothing before SUBSCRIBE OK
        olga.channel_attached(request.sub, result, snapshot)
        world.hub.presence_sent(request.sub)
        world.hub.flush()
        frames = o.take()
        assert [f["id"] for f in frames] == ["SUBSCRIBE OK", "JOIN"]
        assert frames[1]["username"] == "carl"

    run(test())


def test_a_lost_presence_sends_every_listening_subscription_a_fresh_snapshot(settings):
    async def test() -> None:
        world = World(settings)
        await world.start()
        (olga, o), (quiet, q) = [await channel_session(world, name) for name in ("olga", "quinn")]
        await subscribe(world, olga, "doc:1")
        await subscribe(world, quiet, "doc:1", presence=False)
        o.take(), q.take()
        # A restarted engine: a new table (its clock's versions), this server's report in full.
        table = world.engine.presence_table = PresenceTable(leave_delay=0, version_base=10**9)
        table.report("fake", world.hub.ledger.full(), 0.0, full=True)
        world.hub.on_presence_reset()
        await wait(lambda: o.texts)
        [fresh] = o.take()
        assert fresh["id"] == "PRESENCE" and "ref" not in fresh and set(fresh["users"]) == {"olga", "quinn"}
        assert q.take() == []  # it asked for no presence

    run(test())


def test_presence_queries_are_answered_for_subscribed_presence_channels_only(settings):
    async def test() -> None:
        world = World(settings)
        await world.start()
        olga, o = await channel_session(world, "olga")
        assert olga.receive(json.dumps({"id": "PRESENCE", "channel": "doc:1"})) is None
        [error] = o.take()
        assert error["id"] == "ERROR" and "not subscribed" in error["reason"]
        sub = await subscribe(world, olga, "doc:1")
        o.take()
        ask = olga.receive(json.dumps({"id": "PRESENCE", "channel": "doc:1", "ref": 3}))
        assert isinstance(ask, PresenceAsk) and ask.sub is sub
        olga.presence_answer(sub, await world.hub.presence(sub), ask.ref)
        [answer] = o.take()
        assert answer == {"id": "PRESENCE", "channel": "doc:1", "ref": 3, "count": 1,
                          "version": answer["version"], "users": {"olga": {"connections": 1}}}
        olga.presence_answer(sub, None, 4)  # the engine did not answer
        [error] = o.take()
        assert error["id"] == "ERROR" and "try again" in error["reason"]

    run(test())


def test_a_flood_of_presence_queries_is_cut_by_the_rate_limit(settings):
    """Each PRESENCE costs the engine a round trip, so it costs 5 frames: a burst of 40
    allows 8, the ninth closes the socket 4029 (and nothing more reaches the engine)."""
    async def test() -> None:
        world = World(settings)
        await world.start()
        olga, o = await channel_session(world, "olga")
        await subscribe(world, olga, "doc:1")
        asks = [olga.receive(json.dumps({"id": "PRESENCE", "channel": "doc:1"})) for _ in range(12)]
        assert all(isinstance(a, PresenceAsk) for a in asks[:7])
        assert asks[-1] is None and o.closed is not None and o.closed[0] == 4029

    run(test())
