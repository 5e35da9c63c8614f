"""Presence on a running pool (PROTOCOL.md section 9), on each engine: real WebSocket
servers, the engine's real infrastructure, websockets clients, and flow.presence /
flow.is_online from a publisher process.

The failures other push services shipped are each a test here: a second tab making a
second JOIN, a reload making LEAVE+JOIN, a killed server's users online forever, a diff
applied before the snapshot."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from pipeline import Pipeline, closed_with
from support import wait_until
from test_channels_live import frames_until, nothing_more
from test_channels_live import revision2 as _revision2

LEAVE_DELAY = 0.6


@pytest.fixture
def pipe(tmp_path, engine):
    pipeline = Pipeline(tmp_path, engine=engine, FLOW_PRESENCE_CHANNELS="doc:*,room",
                        FLOW_PRESENCE_LEAVE_DELAY=str(LEAVE_DELAY), FLOW_PRESENCE_LEASE="2",
                        FLOW_PRESENCE_MAX_LIST="3")
    yield pipeline
    pipeline.stop()


# Every socket a test opens, closed when its scenario ends however it ends: a failing test
# must not leave open connections for the garbage collector to find in the next test.
# (Only inside run_scenario: other modules use viewer with sockets they close themselves.)
_opened: list[ClientConnection] | None = None


async def revision2(url: str, token: str, **auth: Any) -> tuple[ClientConnection, dict[str, Any]]:
    ws, ok = await _revision2(url, token, **auth)
    if _opened is not None:
        _opened.append(ws)
    return ws, ok


def run_scenario(scenario) -> None:
    async def tracked() -> None:
        global _opened
        _opened = []
        try:
            await scenario()
        finally:
            opened, _opened = _opened, None
            for ws in opened:
                await ws.close()

    asyncio.run(tracked())


def grant(pipe: Pipeline, user: str) -> str:
    return pipe.token(user, extra={"channels": ["doc:*", "room", "plain"]})


async def viewer(pipe: Pipeline, user: str, channel: str, server: int = 0, **subscribe: Any
                 ) -> tuple[ClientConnection, dict[str, Any]]:
    """A socket of ``user`` subscribed to ``channel``: (socket, its SUBSCRIBE OK)."""
    ws, _ = await revision2(pipe.url(server), grant(pipe, user))
    await ws.send(json.dumps({"id": "SUBSCRIBE", "channel": channel, **subscribe}))
    got = await frames_until(ws, lambda f: f["id"] in ("SUBSCRIBE OK", "SUBSCRIBE FAILED"))
    assert got[-1]["id"] == "SUBSCRIBE OK", got
    return ws, got[-1]


async def diffs_until(ws: ClientConnection, done, timeout: float = 15.0) -> list[dict[str, Any]]:
    frames = await frames_until(ws, done, timeout)
    return [f for f in frames if f["id"] in ("JOIN", "LEAVE")]


def joined(kind: str, user: str):
    return lambda f: f["id"] == kind and f.get("username") == user


def test_snapshot_then_one_join_per_user_whatever_the_tabs(pipe):
    async def run() -> None:
        observer, ok = await viewer(pipe, "olga", "doc:1")
        assert ok["presence"]["users"] == {"olga": {"connections": 1}}
        assert ok["presence"]["count"] == 1
        base = ok["presence"]["version"]
        tab1, first = await viewer(pipe, "alice", "doc:1", server=1)
        [join] = await diffs_until(observer, joined("JOIN", "alice"))
        assert join == {"id": "JOIN", "channel": "doc:1", "username": "alice", "version": join["version"]}
        assert join["version"] > base
        assert first["presence"]["users"] == {"olga": {"connections": 1}, "alice": {"connections": 1}}
        # A second tab, on the other server: counted, but no second JOIN.
        tab2, second = await viewer(pipe, "alice", "doc:1", server=0)
        assert second["presence"]["users"]["alice"] == {"connections": 2}
        assert second["presence"]["version"] > join["version"]
        assert [f for f in await nothing_more(observer) if f["id"] in ("JOIN", "LEAVE")] == []
        publisher = pipe.publisher()
        state = publisher.presence("doc:1")
        assert state["users"] == {"olga": {"connections": 1}, "alice": {"connections": 2}}
        assert state["count"] == 2 and state["version"] >= second["presence"]["version"]
        for ws in (observer, tab1, tab2):
            await ws.close()

    run_scenario(run)


def test_a_reload_makes_neither_leave_nor_join_and_leaving_makes_leave_after_the_delay(pipe):
    async def run() -> None:
        observer, _ = await viewer(pipe, "olga", "room")
        tab, _ = await viewer(pipe, "bob", "room", server=1)
        await diffs_until(observer, joined("JOIN", "bob"))
        await tab.close()  # a reload: gone, and back within the delay
        tab, again = await viewer(pipe, "bob", "room", server=0)
        assert "bob" in again["presence"]["users"]
        # Well past the delay: still nothing for bob.
        deadline = time.monotonic() + 2 * LEAVE_DELAY
        while time.monotonic() < deadline:
            assert [f for f in await nothing_more(observer) if f["id"] in ("JOIN", "LEAVE")] == []
            await asyncio.sleep(0.1)  # pacing the polls, not synchronisation: each poll is a PING round trip
        left_at = time.monotonic()
        await tab.close()
        [leave] = await diffs_until(observer, joined("LEAVE", "bob"))
        assert time.monotonic() - left_at >= LEAVE_DELAY * 0.9
        assert leave["channel"] == "room"
        assert pipe.publisher().presence("room")["users"] == {"olga": {"connections": 1}}
        await observer.close()

    run_scenario(run)


def test_a_killed_servers_users_leave_once_its_lease_runs_out(pipe):
    async def run() -> None:
        observer, _ = await viewer(pipe, "olga", "doc:2", server=0)
        doomed, _ = await viewer(pipe, "carol", "doc:2", server=1)
        await diffs_until(observer, joined("JOIN", "carol"))
        publisher = pipe.publisher()
        assert publisher.is_online("carol")
        pipe.servers[1].signal(signal.SIGKILL)
        pipe.servers[1].stop()
        # Lease 2 s, then the leave delay.
        [leave] = await diffs_until(observer, joined("LEAVE", "carol"), timeout=15)
        assert leave["channel"] == "doc:2"
        assert not publisher.is_online("carol")
        assert publisher.is_online("olga")
        assert publisher.presence("doc:2")["users"] == {"olga": {"connections": 1}}
        await observer.close()
        await doomed.close()

    run_scenario(run)


def test_diffs_racing_the_snapshot_are_reconciled_by_version(pipe):
    """Users join and leave while an observer subscribes: its snapshot, plus the diffs
    newer than it, ends at what the engine says, with no diff older than the snapshot."""
    async def run() -> None:
        sockets: list[ClientConnection] = []

        async def churn() -> None:
            for i in range(12):
                ws, _ = await revision2(pipe.url(i % 2), grant(pipe, f"u{i % 6}"))
                await ws.send(json.dumps({"id": "SUBSCRIBE", "channel": "doc:race", "presence": False}))
                sockets.append(ws)
                if i % 3 == 2:
                    await sockets.pop(0).close()

        task = asyncio.ensure_future(churn())
        observer, ok = await viewer(pipe, "olga", "doc:race", server=1)
        await task
        users = set(ok["presence"].get("users", {}))
        version = ok["presence"]["version"]
        # Everything settles (no pending LEAVE) before the final comparison.
        deadline = time.monotonic() + 10
        while True:
            await asyncio.sleep(LEAVE_DELAY)  # pacing: let pending LEAVEs come due
            for frame in await nothing_more(observer):
                if frame["id"] in ("JOIN", "LEAVE"):
                    assert frame["version"] > version, (frame, version)
                    version = frame["version"]
                    (users.add if frame["id"] == "JOIN" else users.discard)(frame["username"])
            truth = pipe.publisher().presence("doc:race")
            if set(truth["users"]) == users and all(u["connections"] for u in truth["users"].values()):
                break
            assert time.monotonic() < deadline, (users, truth)
        for ws in [observer, *sockets]:
            await ws.close()

    run_scenario(run)


def test_presence_false_is_counted_but_sent_nothing_and_big_lists_give_the_count(pipe):
    async def run() -> None:
        quiet, ok = await viewer(pipe, "quinn", "doc:3", presence=False)
        assert "presence" not in ok
        others = [await viewer(pipe, f"v{i}", "doc:3", server=i % 2) for i in range(3)]
        assert [f for f in await nothing_more(quiet) if f["id"] in ("JOIN", "LEAVE")] == []
        # Four users, over FLOW_PRESENCE_MAX_LIST=3: the last one sees the count only.
        last = others[-1][1]["presence"]
        assert last["count"] == 4 and "users" not in last
        await quiet.send(json.dumps({"id": "PRESENCE", "channel": "doc:3", "ref": "p"}))
        [answer] = await frames_until(quiet, lambda f: f["id"] == "PRESENCE")
        assert answer["count"] == 4 and answer["ref"] == "p" and answer["channel"] == "doc:3"
        assert pipe.publisher().presence("doc:3")["count"] == 4
        for ws in [quiet, *(ws for ws, _ in others)]:
            await ws.close()

    run_scenario(run)


def test_channels_without_presence_have_none_and_presence_needs_a_subscription(pipe):
    async def run() -> None:
        ws, ok = await viewer(pipe, "pat", "plain")
        assert "presence" not in ok
        await ws.send(json.dumps({"id": "PRESENCE", "channel": "plain"}))
        [error] = await frames_until(ws, lambda f: f["id"] == "ERROR")
        assert "no presence" in error["reason"]
        await ws.send(json.dumps({"id": "PRESENCE", "channel": "doc:9"}))
        [error] = await frames_until(ws, lambda f: f["id"] == "ERROR")
        assert "not subscribed" in error["reason"]
        assert pipe.publisher().presence("plain")["count"] == 0
        with pytest.raises(Exception) as caught:
            pipe.publisher().presence("not a channel!")
        assert type(caught.value).__name__ == "ProtocolError"  # flow.InvalidMessage
        await ws.close()

    run_scenario(run)


def test_is_online_follows_every_socket_of_the_user(pipe):
    async def run() -> None:
        publisher = pipe.publisher()
        assert publisher.is_online("dora") is False
        a, _ = await revision2(pipe.url(0), grant(pipe, "dora"))
        b, _ = await revision2(pipe.url(1), grant(pipe, "dora"))
        wait_until(lambda: publisher.is_online("dora"), 10, message="dora online")
        await a.close()
        assert publisher.is_online("dora")
        await b.close()
        wait_until(lambda: not publisher.is_online("dora"), 10, message="dora offline")

    run_scenario(run)


def test_after_an_engine_restart_the_servers_report_again_and_pages_get_a_fresh_snapshot(pipe):
    async def run() -> None:
        ws, ok = await viewer(pipe, "erin", "doc:4")
        leaving, _ = await viewer(pipe, "fred", "doc:4", server=1)
        await diffs_until(ws, joined("JOIN", "fred"))
        publisher = pipe.publisher()
        assert publisher.presence("doc:4")["count"] == 2
        await leaving.close()  # fred's LEAVE is pending when the engine goes
        pipe.restart_proxy()
        if pipe.engine == "redis":
            # A Redis that lost its data renumbers every stream: the page is told to
            # reconnect (1012), and its new subscription's snapshot is the truth.
            assert (await closed_with(ws)).code == 1012
            ws, ok = await viewer(pipe, "erin", "doc:4")
            assert set(ok["presence"]["users"]) == {"erin"}
        # The new proxy (or the new Redis) learns the pool's counts again...
        wait_until(lambda: _count(publisher, "doc:4") == 1, 20, message="presence re-reported")
        assert publisher.is_online("erin") and not publisher.is_online("fred")
        if pipe.engine == "zmq":
            # ...and the page, which kept its socket, is not left with fred forever: a
            # LEAVE, or a fresh snapshot (PRESENCE with no ref) from a higher version.
            frames = await frames_until(ws, lambda f: f["id"] == "LEAVE" or (
                f["id"] == "PRESENCE" and "ref" not in f and "fred" not in f["users"]), timeout=20)
            assert frames[-1]["version"] > ok["presence"]["version"]
        await ws.close()

    run_scenario(run)


def _count(publisher: Any, channel: str) -> int | None:
    try:
        return publisher.presence(channel, timeout=1)["count"]
    except Exception as exc:  # the engine is still coming back
        if type(exc).__name__ != "Unavailable":
            raise
        return None
