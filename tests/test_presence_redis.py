"""Presence and occupancy on the Redis engine (PROTOCOL.md sections 9 and 10), against a
real redis-server (tests/redisserver.py): server engines play "hosts", each with its own
ledger (as the hub keeps one), and what the engines make of them is checked against
flowcore.presence.PresenceTable's rules: one JOIN per user over every server, a reload
within FLOW_PRESENCE_LEAVE_DELAY making neither LEAVE nor JOIN, LEAVE after it, a killed
server's users leaving once its lease runs out, versions rising, and a Redis that lost its
data being told everything again. The engine-neutral promises are the contract tests'.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from typing import Any, AsyncIterator

import pytest

from flowcore import protocol
from flowcore.engine import Unavailable
from flowcore.engines import redis as redis_engine
from flowcore.presence import Ledger, PresenceEvent, PresenceTable, Snapshot
from flowcore.settings import Settings, load_settings
from support import PYTHON, Proc, base_env, free_port, wait_until
from test_engine_contract import RecordingSink, run, until

LEAVE_DELAY = 0.3
# Short leases, so that a killed server's users go within a test's patience.
LEASE_INTERVAL = 0.2
LEASE_TTL = 1.0
DOC = protocol.channel_stream("doc:1")


def settings_for(tmp_path: Any, server: Any, **overrides: object) -> Settings:
    overrides.setdefault("FLOW_PRESENCE_LEAVE_DELAY", LEAVE_DELAY)
    return load_settings(base_env(tmp_path, FLOW_ENGINE="redis", FLOW_REDIS_URL=server.url,
                                  FLOW_PRESENCE_CHANNELS="doc:*", **overrides))


class HostSink(RecordingSink):
    """A server's sink as the hub is one: it owns the ledger, and records presence."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger()
        self.presence: list[PresenceEvent] = []

    def on_presence(self, event: PresenceEvent) -> None:
        if not self.in_batch:
            self.faults.append(f"presence for {event.stream!r} outside a batch")
        self.presence.append(event)

    def kinds(self, user: str | None = None) -> list[str]:
        return [e.kind for e in self.presence if user is None or e.user == user]


class Host:
    """One WebSocket server: an engine, its sink, and a socket's worth of ledger counts."""

    def __init__(self, engine: redis_engine.RedisServerEngine, sink: HostSink) -> None:
        self.engine = engine
        self.sink = sink

    def connect(self, user: str, channel: str = DOC, delta: int = 1) -> None:
        """A socket of ``user`` (or its close, delta -1) subscribed to ``channel``."""
        ledger = self.sink.ledger
        ledger.add(user, "", delta)
        ledger.add(protocol.BROADCAST, "", delta)
        if channel:
            ledger.add(channel, "", delta)
            ledger.add(channel, user, delta)
        self.engine.presence_changed()

    async def snapshot(self, channel: str = DOC, limit: int | None = None) -> Snapshot:
        snapshot = await self.engine.presence(channel, limit)
        assert snapshot is not None
        return snapshot


@contextlib.asynccontextmanager
async def hosts(settings: Settings, count: int = 2, *streams: str) -> AsyncIterator[list[Host]]:
    started: list[Host] = []
    try:
        for _ in range(count):
            sink = HostSink()
            engine = redis_engine.RedisServerEngine(settings, lease_interval=LEASE_INTERVAL, lease_ttl=LEASE_TTL)
            await engine.start(sink)
            started.append(Host(engine, sink))
            for stream in streams or (DOC,):
                engine.subscribe(stream)
        for host in started:
            for stream in streams or (DOC,):
                await until(lambda: host.sink.position(stream), message=f"the subscription to {stream!r}")
        yield started
        for host in started:
            assert host.sink.faults == []
    finally:
        for host in started:
            await host.engine.close()


async def barrier(on: Host, watchers: list[Host], user: str) -> None:
    """A new ``user`` connects ``on`` a server and its JOIN is seen by every watcher: every
    event published before it on the channel has been delivered (pub/sub keeps one
    channel's order)."""
    on.connect(user)
    for host in watchers:
        await until(lambda: user in [e.user for e in host.sink.presence], message=f"{user}'s JOIN")


# ---------------------------------------------------------------- plain values


@pytest.mark.parametrize("payload", [
    b"prs JOIN", b"prs JOIN 12", b"prs HELLO 3 alice", b"prs JOIN x alice", b"prs JOIN -3 alice",
    b"prs JOIN 0 alice", b"prs LEAVE 3 ", b"prs LEAVE 3 a\0b", b"prs LEAVE 3 \xff", b"prs JOIN 3 *",
])
def test_presence_events_flow_did_not_make_are_refused(payload):
    with pytest.raises(ValueError):
        redis_engine.parse_presence_event(DOC, payload)


def test_presence_events_parse_and_belong_to_channels_only():
    assert redis_engine.parse_presence_event(DOC, b"prs LEAVE 17 al ice") == PresenceEvent(DOC, "LEAVE", "al ice", 17)
    with pytest.raises(ValueError):
        redis_engine.parse_presence_event("alice", b"prs JOIN 3 bob")


# ---------------------------------------------------------------- against a real Redis


def test_one_join_for_tabs_on_two_servers_a_reload_makes_nothing_and_leave_follows_the_delay(
        tmp_path, redis_server):
    settings = settings_for(tmp_path, redis_server, FLOW_PRESENCE_LEAVE_DELAY=1.0)

    async def test() -> None:
        async with hosts(settings) as (a, b):
            a.connect("alice")
            for host in (a, b):
                await until(lambda: host.sink.kinds("alice") == ["JOIN"], message="alice's JOIN")
            b.connect("alice")  # her second tab, on the other server
            snapshot = await b.snapshot()
            assert snapshot.users == {"alice": 2} and snapshot.count == 1
            await barrier(a, [a, b], "bob")
            assert a.sink.kinds("alice") == b.sink.kinds("alice") == ["JOIN"]

            # Both tabs reload: gone from both servers, back (on server b) within the delay.
            a.connect("alice", delta=-1)
            b.connect("alice", delta=-1)
            await b.snapshot()
            assert (await a.snapshot()).users == {"alice": 0, "bob": 1}  # present, LEAVE pending
            a.connect("bob", delta=-1)  # bob leaves for good, after her: his LEAVE is due later
            assert (await a.snapshot()).users == {"alice": 0, "bob": 0}
            b.connect("alice")
            assert (await b.snapshot()).users == {"alice": 1, "bob": 0}
            await until(lambda: "LEAVE" in a.sink.kinds("bob"), timeout=5, message="bob's LEAVE")
            assert a.sink.kinds("alice") == ["JOIN"]  # her LEAVE would have come before his

            # The last tab closes for good: LEAVE, no sooner than the delay.
            closed_at = time.monotonic()
            b.connect("alice", delta=-1)
            await until(lambda: "LEAVE" in a.sink.kinds("alice"), timeout=5, message="alice's LEAVE")
            assert time.monotonic() - closed_at >= 1.0 - 0.01
            await until(lambda: b.sink.kinds("alice") == ["JOIN", "LEAVE"], message="alice's LEAVE on b")
            assert (await a.snapshot()).users == {}

            versions = [e.version for e in a.sink.presence]
            assert versions == sorted(versions) and len(set(versions)) == len(versions)
            assert [e for e in a.sink.presence] == [e for e in b.sink.presence]

    run(test)


def test_versions_rise_and_snapshots_are_not_behind_their_events(tmp_path, redis_server):
    settings = settings_for(tmp_path, redis_server)

    async def test() -> None:
        async with hosts(settings) as (a, b):
            before = await a.snapshot()
            assert before.count == 0 and before.users == {}
            assert before.version >= int(time.time() * 1000) - 60_000  # from the clock, as version_base is
            seen = [before.version]
            for i in range(5):
                host = a if i % 2 else b
                host.connect(f"u{i}")
                snapshot = await host.snapshot()  # its own changes are in
                assert snapshot.count == i + 1
                seen.append(snapshot.version)
            await until(lambda: len(a.sink.presence) == 5, message="five JOINs")
            joins = [e.version for e in a.sink.presence]
            assert seen == sorted(seen) and len(set(seen)) == len(seen)
            assert joins == sorted(joins) and joins[0] > before.version
            assert snapshot.version >= joins[-1]
            # A user's second connection is a change too: the version rises, no event.
            a.connect("u0")
            again = await a.snapshot()
            assert again.version > snapshot.version and again.users is not None and again.users["u0"] == 2
            # Another channel's versions come from the same counter.
            a.connect("u0", channel=protocol.channel_stream("doc:2"))
            other = await a.snapshot(protocol.channel_stream("doc:2"))
            assert other.version > again.version and other.users == {"u0": 1}

    run(test)


def test_the_list_limit_gives_the_count_only_and_online_counts_every_kind_of_stream(tmp_path, redis_server):
    settings = settings_for(tmp_path, redis_server)
    publisher = redis_engine.RedisPublisherEngine(settings)

    async def test() -> None:
        async with hosts(settings) as (a, b):
            for i in range(3):
                a.connect(f"u{i}")
            b.connect("u0")
            b.connect("solo", channel="")  # a socket on no channel
            await a.snapshot()  # a's changes are in
            assert (await b.snapshot(limit=3)).users == {"u0": 2, "u1": 1, "u2": 1}
            limited = await b.snapshot(limit=2)
            assert limited.count == 3 and limited.users is None

            def ask(stream: str) -> int:
                return publisher.online(stream, 2.0)

            assert await asyncio.to_thread(ask, "u0") == 2
            assert await asyncio.to_thread(ask, "solo") == 1
            assert await asyncio.to_thread(ask, "nobody") == 0
            assert await asyncio.to_thread(ask, DOC) == 4
            assert await asyncio.to_thread(ask, protocol.BROADCAST) == 5
            snapshot = await asyncio.to_thread(publisher.presence, DOC, 2.0)
            assert snapshot.users == {"u0": 2, "u1": 1, "u2": 1} and snapshot.count == 3
            assert (await asyncio.to_thread(publisher.presence, DOC, 2.0, 1)).users is None
            # A user's stream and "*" have counts, never members.
            assert (await asyncio.to_thread(publisher.presence, "u0", 2.0)).count == 0

    try:
        run(test)
    finally:
        publisher.close()


def test_a_graceful_stop_leaves_after_the_delay_and_a_move_to_another_server_makes_nothing(
        tmp_path, redis_server):
    settings = settings_for(tmp_path, redis_server)

    async def test() -> None:
        async with hosts(settings, 1) as (c,):
            async with hosts(settings) as (a, b):
                a.connect("alice")
                a.connect("bob")
                await barrier(b, [a, b, c], "carol")
                await a.engine.close()  # its goodbye: alice and bob pending, not gone
                assert (await b.snapshot()).users == {"alice": 0, "bob": 0, "carol": 1}
                b.connect("alice")  # her socket reconnects to b within the delay
                await until(lambda: "LEAVE" in c.sink.kinds("bob"), timeout=5, message="bob's LEAVE")
                await barrier(b, [b, c], "dave")
                assert c.sink.kinds("alice") == ["JOIN"] and c.sink.kinds("bob") == ["JOIN", "LEAVE"]
                assert (await b.snapshot()).users == {"alice": 1, "carol": 1, "dave": 1}
                # alice's, carol's and dave's streams, "*" and doc:1, all b's; nothing of a
                assert redis_server.client().hlen(b"flow:pres:online") == 5
                assert not redis_server.client().exists(f"flow:pres:srv:{a.engine.server_id}".encode())

    run(test)


KILLED_HOST = r"""
import asyncio, os, sys
from flowcore import protocol
from flowcore.engines.redis import RedisServerEngine
from flowcore.presence import Ledger
from flowcore.settings import load_settings

class Sink:
    def __init__(self):
        self.ledger = Ledger()
    def __getattr__(self, name):
        return lambda *args: None

async def main():
    engine = RedisServerEngine(load_settings(os.environ), lease_interval=0.2, lease_ttl=1.0)
    sink = Sink()
    await engine.start(sink)
    doc = protocol.channel_stream("doc:1")
    for stream, user in ((doc, "zed"), (doc, ""), ("zed", ""), ("*", "")):
        sink.ledger.add(stream, user)
    engine.presence_changed()
    for _ in range(200):
        if await engine.presence(doc, None) is not None:
            break
        await asyncio.sleep(0.05)
    print("ready", engine.server_id, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_a_killed_servers_users_leave_once_its_lease_runs_out(tmp_path, redis_server):
    env = base_env(tmp_path, FLOW_ENGINE="redis", FLOW_REDIS_URL=redis_server.url,
                   FLOW_PRESENCE_LEAVE_DELAY=LEAVE_DELAY, FLOW_PRESENCE_CHANNELS="doc:*")
    settings = load_settings(env)
    publisher = redis_engine.RedisPublisherEngine(settings)
    proc = Proc([PYTHON, "-c", KILLED_HOST], env, tmp_path / "killed-host.log")

    async def test() -> None:
        async with hosts(settings) as (a, b):
            b.connect("yan")
            await until(lambda: "ready" in proc.log() or not proc.alive(), timeout=30, message="the host")
            assert proc.alive(), proc.log()
            await until(lambda: a.sink.kinds("zed") == ["JOIN"], message="zed's JOIN")
            assert await asyncio.to_thread(publisher.online, "zed", 2.0) == 1
            proc.signal(signal.SIGKILL)  # no goodbye: only the lease tells
            proc.popen.wait(10)
            killed_at = time.monotonic()
            await until(lambda: "LEAVE" in a.sink.kinds("zed"), timeout=LEASE_TTL + LEAVE_DELAY + 5,
                        message="zed's LEAVE")
            took = time.monotonic() - killed_at
            assert took < LEASE_TTL + LEAVE_DELAY + 2.0, took  # (a margin for a loaded machine)
            assert await asyncio.to_thread(publisher.online, "zed", 2.0) == 0
            assert await asyncio.to_thread(publisher.online, protocol.BROADCAST, 2.0) == 1  # yan's
            assert (await a.snapshot()).users == {"yan": 1}
            assert b.sink.kinds("yan") == ["JOIN"]
            assert redis_server.client().zcard(b"flow:pres:leases") == 2  # a and b only

    try:
        run(test)
    finally:
        proc.stop()
        publisher.close()


def test_a_flushed_redis_is_told_everything_again(tmp_path, redis_server):
    settings = settings_for(tmp_path, redis_server)
    publisher = redis_engine.RedisPublisherEngine(settings)
    users = 2 * redis_engine.PRESENCE_CHUNK + 10  # a full report of several calls

    async def test() -> None:
        async with hosts(settings) as (a, b):
            for i in range(users):
                a.sink.ledger.add(f"user{i}")
            a.connect("alice")
            b.connect("bob")
            await b.snapshot()
            first = await a.snapshot()
            assert first.users == {"alice": 1, "bob": 1}
            old_ids = {a.engine.server_id, b.engine.server_id}
            full_before = [h.engine._presence.full_reports for h in (a, b)]
            redis_server.client().flushall()
            # Nobody changes anything: the lease renewals find Redis forgot them.
            await until(lambda: all(h.engine._presence.full_reports > n for h, n in zip((a, b), full_before)),
                        timeout=10, message="full reports")
            await until(lambda: redis_server.client().hlen(b"flow:pres:online") == users + 4, timeout=10,
                        message="every count back")
            assert {a.engine.server_id, b.engine.server_id}.isdisjoint(old_ids)
            again = await b.snapshot()
            assert again.users == {"alice": 1, "bob": 1} and again.version > first.version
            assert await asyncio.to_thread(publisher.online, f"user{users - 1}", 2.0) == 1
            assert await asyncio.to_thread(publisher.online, protocol.BROADCAST, 2.0) == 2
            # Redis had forgotten them: they JOIN again, with versions above the old ones.
            await until(lambda: a.sink.kinds("alice") == ["JOIN", "JOIN"], message="alice's JOIN again")
            versions = [e.version for e in a.sink.presence]
            assert versions == sorted(versions) and len(set(versions)) == len(versions)

    try:
        run(test)
    finally:
        publisher.close()


def test_a_report_older_than_one_applied_is_not_applied(tmp_path, redis_server):
    # A timed-out call that Redis runs late (after the retry that followed it) changes nothing.
    settings = settings_for(tmp_path, redis_server)
    client = redis_server.client()
    script = client.register_script(redis_engine.PRESENCE_SCRIPT)

    def call(number: int, mode: str, count: int) -> redis_engine.PresenceAnswer:
        args = redis_engine.presence_args(settings.redis_prefix, "s1", number, 10.0, 0.3, mode, online="alice",
                                          counts=[(("alice", ""), count)])
        return redis_engine.parse_presence(script(keys=[], args=args))

    assert call(1, "full", 1).online == 1
    assert call(3, "report", 3).online == 3
    assert call(2, "report", 2).online == 3  # older than the one applied
    assert call(4, "report", 0).online == 0
    assert call(5, "report", 1).known  # its lease is live
    # A server Redis does not know is refused until it reports in full.
    unknown = redis_engine.parse_presence(script(keys=[], args=redis_engine.presence_args(
        settings.redis_prefix, "s2", 1, 10.0, 0.3, "report", online="bob", counts=[(("bob", ""), 1)])))
    assert not unknown.known and unknown.online == 0


def test_hostile_presence_messages_are_dropped_with_one_warning(tmp_path, redis_server, caplog):
    settings = settings_for(tmp_path, redis_server)

    async def test() -> None:
        async with hosts(settings, 1) as (a,):
            client = redis_server.client()
            for payload in (b"prs JOIN", b"prs JOIN x mallory", b"prs JOIN 5 \xff", b"prs KICK 5 alice"):
                client.publish(b"flow:msg:ch:doc:1", payload)
            a.connect("alice")
            await until(lambda: a.sink.kinds() == ["JOIN"], message="the real JOIN")

    with caplog.at_level(logging.WARNING, logger="flow.engine.redis"):
        run(test)
    warnings = [r for r in caplog.records if "dropped a malformed message" in r.getMessage()]
    assert len(warnings) == 1 and not any(r.exc_info for r in caplog.records)


def test_a_publisher_query_raises_unavailable_when_redis_does_not_answer(tmp_path, redis_server):
    settings = settings_for(tmp_path, redis_server)
    nowhere = redis_engine.RedisPublisherEngine(settings, endpoint=f"redis://127.0.0.1:{free_port()}/0")
    publisher = redis_engine.RedisPublisherEngine(settings)
    try:
        with pytest.raises(Unavailable, match="did not answer"):
            nowhere.online("alice", 1.0)
        assert publisher.online("alice", 1.0) == 0
        redis_server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(Unavailable, match="did not answer"):
                publisher.presence(DOC, 0.3)
            assert time.monotonic() - started < 2.0
        finally:
            redis_server.resume()
        wait_until(lambda: publisher.presence(DOC, 1.0).count == 0, message="an answer again")
    finally:
        nowhere.close()
        publisher.close()


def test_a_restarted_redis_that_kept_its_data_is_told_everything_again_and_nobody_leaves(
        tmp_path, make_redis):
    # Restored counts may be older than what servers reported since (an RDB snapshot): a
    # server Redis knows from another run reports in full under a new id, and its old id's
    # counts go when that lease runs out, with no LEAVE for anyone still there.
    redis_server = make_redis(persistence="aof")
    settings = settings_for(tmp_path, redis_server)

    async def test() -> None:
        async with hosts(settings) as (a, b):
            a.connect("alice")
            b.connect("bob")
            await until(lambda: a.sink.kinds() == ["JOIN", "JOIN"], message="two JOINs")
            old_ids = {a.engine.server_id, b.engine.server_id}
            await asyncio.to_thread(redis_server.restart)
            await until(lambda: {a.engine.server_id, b.engine.server_id}.isdisjoint(old_ids), timeout=10,
                        message="new ids")
            client = redis_server.client()
            await until(lambda: client.zcard(b"flow:pres:leases") == 2, timeout=LEASE_TTL + 5,
                        message="the old ids swept")
            assert (await a.snapshot()).users == {"alice": 1, "bob": 1}
            assert client.hget(b"flow:pres:online", b"*") == b"2"
            await barrier(b, [a, b], "carol")
            assert a.sink.kinds() == ["JOIN", "JOIN", "JOIN"]  # carol's; nobody left or joined again

    run(test)


@pytest.mark.parametrize("delay", [0.0, 1000.0])
def test_the_script_keeps_presence_tables_rules(tmp_path, redis_server, delay):
    # The same random reports, from several servers, to PRESENCE_SCRIPT and to a
    # PresenceTable: the same JOINs and LEAVEs in the same order, the same snapshots and
    # counts. (LEAVEs that fall due are the integration tests' above: Redis keeps the time.)
    rng = random.Random(7)
    client = redis_server.client()
    script = client.register_script(redis_engine.PRESENCE_SCRIPT)
    pubsub = client.pubsub()
    pubsub.psubscribe(b"flow:msg:ch:*")
    wait_until(lambda: pubsub.get_message(timeout=0.1) is not None, message="the psubscribe")
    table = PresenceTable(delay, 0)
    streams = [protocol.channel_stream("doc:a"), protocol.channel_stream("doc:b"), "u1", "u2", "*"]
    users = ["", "u1", "u2", "u3"]
    servers: dict[str, dict[tuple[str, str], int]] = {}
    numbers: dict[str, int] = {}
    expected: list[tuple[str, str, str]] = []
    for step in range(400):
        if servers and rng.random() < 0.05:  # a graceful stop
            server = rng.choice(list(servers))
            del servers[server]
            expected += [(e.stream, e.kind, e.user) for e in table.drop_server(server, 0)]
            args = redis_engine.presence_args("flow", server, numbers[server] + 1, 100.0, delay, "bye")
            assert script(keys=[], args=args) == [1]
            continue
        if not servers or rng.random() < 0.1:
            server = f"s{step}"
            servers[server], numbers[server] = {}, 0
        server = rng.choice(list(servers))
        changes: dict[tuple[str, str], int] = {}
        for _ in range(rng.randint(1, 4)):
            stream = rng.choice(streams)
            user = rng.choice(users) if protocol.is_channel_stream(stream) else ""
            changes[(stream, user)] = rng.choice([0, 0, 1, 2, 3])
        mode = "full" if numbers[server] == 0 else "report"
        numbers[server] += 1
        servers[server].update(changes)
        expected += [(e.stream, e.kind, e.user) for e in table.report(server, changes, 0)]
        asked = rng.choice(streams)
        args = redis_engine.presence_args("flow", server, numbers[server], 100.0, delay, mode,
                                          snapshot=streams[step % 2], online=asked, counts=changes.items())
        answer = redis_engine.parse_presence(script(keys=[], args=args))
        assert answer.known == (mode == "report")
        want = table.snapshot(streams[step % 2])
        assert (answer.snapshot.count, answer.snapshot.users) == (want.count, want.users), step
        assert answer.online == table.online(asked), step
    for stream in streams:
        got = redis_engine.parse_presence(script(keys=[], args=redis_engine.presence_args(
            "flow", "", 0, 0, delay, "q", online=stream)))
        assert got.online == table.online(stream), stream
    events: list[tuple[str, str, str]] = []
    while len(events) < len(expected):
        message = pubsub.get_message(timeout=2.0)
        assert message is not None, f"{len(events)} of {len(expected)} events"
        if message["type"] == "pmessage":
            skey = message["channel"][len(b"flow:msg:"):].decode()
            event = redis_engine.parse_presence_event(protocol.channel_stream(skey[3:]), message["data"])
            events.append((event.stream, event.kind, event.user))
    assert events == expected
    assert len(expected) > 5
    pubsub.close()
