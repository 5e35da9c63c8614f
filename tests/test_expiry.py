"""Token expiry on open sockets (PROTOCOL.md section 3), against the real processes.

Tokens here live two or three seconds (``issue_token`` rounds ``iat`` down to the second,
so a ttl of 2 leaves between one and two) and FLOW_EXPIRE_GRACE is 2 s. Waits are on frames
with deadlines (``recv_json``'s timeout is per frame and heartbeats keep coming, so a wait
for one particular frame is bounded as a whole with ``asyncio.wait_for``); where the test
must see that nothing happens for a while (a socket that outlives the grace), it reads the
socket until a deadline and checks what came.
"""

from __future__ import annotations

import asyncio
import time

import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from pipeline import Pipeline, collect, recv_json, opened
from support import wait_until

GRACE = 2.0
EXPIRED_REQUEST = {"id": "AUTH REQUEST", "reason": "expired"}


@pytest.fixture
def pipe(tmp_path):
    pipeline = Pipeline(tmp_path, servers=1, FLOW_EXPIRE_GRACE=str(GRACE), FLOW_HEARTBEAT="0.5")
    yield pipeline
    pipeline.stop()


async def next_json(ws, timeout: float = 10.0) -> dict:
    """The next JSON frame, within ``timeout`` however many heartbeats come first."""
    return await asyncio.wait_for(recv_json(ws), timeout)


async def frames_until(ws, deadline: float) -> list[str | bytes]:
    """Every frame (heartbeats included) that arrives before ``deadline`` (monotonic);
    fails if the socket closes meanwhile."""
    frames: list[str | bytes] = []
    while (left := deadline - time.monotonic()) > 0:
        try:
            frames.append(await asyncio.wait_for(ws.recv(), left))
        except asyncio.TimeoutError:
            break
        except ConnectionClosed as closed:
            raise AssertionError(f"closed while it should have stayed open: {closed}") from None
    return frames


async def close_of(ws, timeout: float):
    """Read until the server closes the socket: (close frame, the JSON frames before it)."""
    before = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                raw = await ws.recv()
                if raw != "<3":
                    before.append(raw)
    except ConnectionClosed as closed:
        assert closed.rcvd is not None, "connection dropped without a close frame"
        return closed.rcvd, before


def test_auth_ok_carries_expiry_and_stream_positions(pipe):
    # Old server: AUTH OK had neither expires_in nor streams.
    async def run():
        publisher = pipe.publisher()
        publisher.push("alice", "BEFORE", 0)
        publisher.push_all("NEWS", 0)
        # Another tab makes sure both pushes were numbered before the one under test joins.
        async with opened(pipe.url(), pipe.token("alice")) as (first, _):
            publisher.push("alice", "MARK", 1)
            await collect(first, 1)
        async with opened(pipe.url(), pipe.token("alice", ttl=120)) as (ws, ok):
            assert 110 <= ok["expires_in"] <= 120, ok
            assert set(ok["streams"]) == {"alice", "*"}, ok
            own, everyone = ok["streams"]["alice"], ok["streams"]["*"]
            assert own["epoch"] == ok["epoch"] and own["epoch"] and everyone["epoch"], ok
            assert type(own["seq"]) is int and type(everyone["seq"]) is int, ok
            assert own["seq"] >= 2 and everyone["seq"] >= 1, ok  # what came before this AUTH OK
            publisher.push("alice", "NEXT", 2)
            publisher.push_all("NEWS", 1)
            got = await collect(ws, 2)
            assert [(m["id"], m["seq"], m["epoch"]) for m in got] == [
                ("NEXT", own["seq"] + 1, own["epoch"]),
                ("NEWS", everyone["seq"] + 1, everyone["epoch"]),
            ]

    asyncio.run(run())


def test_expired_token_asks_again_delivers_through_the_grace_then_closes_4003(pipe):
    # Old server: a token was checked once, at AUTH; a socket outlived it for good.
    async def run():
        publisher = pipe.publisher()
        async with opened(pipe.url(), pipe.token("bob")) as (witness, _):
            async with opened(pipe.url(), pipe.token("alice", ttl=2)) as (ws, ok):
                assert 0 <= ok["expires_in"] <= 2, ok
                assert await next_json(ws, 5) == EXPIRED_REQUEST
                asked = time.monotonic()
                # The grace: still delivering.
                publisher.push("alice", "IN GRACE", 1)
                [message] = await collect(ws, 1, timeout=GRACE)
                assert message["data"] == 1
                close, before = await close_of(ws, GRACE + 5)
                assert close.code == 4003, close
                assert before == [], before
                assert time.monotonic() - asked >= GRACE * 0.8, "closed before the grace was over"
            # The server let go of alice's stream; bob's socket goes on.
            await asyncio.to_thread(wait_until, lambda: "alice" not in pipe.stats(0)["streams"], 10, 0.02,
                                    "alice unsubscribed")
            publisher.push("alice", "AFTER", 2)
            publisher.push("bob", "STILL", 3)
            [message] = await collect(witness, 1)
            assert message["data"] == 3

    asyncio.run(run())
    log = pipe.servers[0].log()
    assert "closing 4003" in log
    assert "Traceback" not in log


def test_message_flow_client_refreshes_after_its_cached_token_fails(pipe):
    # message_flow's websocket.js: AUTH REQUEST -> send the cached token; AUTH FAILED ->
    # forget it; AUTH REQUEST -> fetch a fresh one and send it raw.
    # Old server: no AUTH REQUEST at expiry, and a second token was "already authenticated".
    async def run():
        publisher = pipe.publisher()
        cached = pipe.token("alice", ttl=2)
        async with opened(pipe.url(), cached) as (ws, _):
            assert await next_json(ws, 5) == EXPIRED_REQUEST
            grace_over = time.monotonic() + GRACE
            await ws.send(cached)
            assert await next_json(ws) == {"id": "AUTH FAILED", "reason": "expired"}
            assert await next_json(ws) == EXPIRED_REQUEST
            await ws.send(pipe.token("alice", ttl=60))
            ok = await next_json(ws)
            assert ok["id"] == "AUTH OK" and ok["refreshed"] is True and ok["username"] == "alice", ok
            assert 50 <= ok["expires_in"] <= 60, ok
            # Past the end of the first grace: no close, no new AUTH REQUEST, still delivering.
            frames = await frames_until(ws, grace_over + 1.5)
            assert set(frames) <= {"<3"}, frames
            publisher.push("alice", "LATER", 1)
            [message] = await collect(ws, 1)
            assert message["data"] == 1

    asyncio.run(run())
    assert "Traceback" not in pipe.servers[0].log()


def test_fresh_token_before_expiry_is_accepted(pipe):
    # Old server: a token on an authenticated socket was an ERROR ("already authenticated").
    async def run():
        publisher = pipe.publisher()
        async with opened(pipe.url(), pipe.token("alice", ttl=3)) as (ws, ok):
            old_expiry = time.monotonic() + ok["expires_in"]
            await ws.send('{"id": "AUTH", "token": "%s"}' % pipe.token("alice", ttl=90))
            refreshed = await next_json(ws)
            assert refreshed["id"] == "AUTH OK" and refreshed["refreshed"] is True, refreshed
            assert refreshed["username"] == "alice" and refreshed["missed"] == 0, refreshed
            assert 80 <= refreshed["expires_in"] <= 90, refreshed
            assert set(refreshed["streams"]) == {"alice", "*"}, refreshed
            # The old token's expiry and grace pass without a word.
            frames = await frames_until(ws, old_expiry + 1 + GRACE + 1)
            assert set(frames) <= {"<3"}, frames
            publisher.push("alice", "LATER", 1)
            [message] = await collect(ws, 1)
            assert message["data"] == 1

    asyncio.run(run())


def test_token_of_another_user_during_the_grace_closes_4001(pipe):
    # Old server: no grace (no AUTH REQUEST at expiry) at all.
    async def run():
        async with opened(pipe.url(), pipe.token("alice", ttl=2)) as (ws, _):
            assert await next_json(ws, 5) == EXPIRED_REQUEST
            await ws.send(pipe.token("mallory", ttl=60))
            close, before = await close_of(ws, 5)
            assert close.code == 4001, close
            assert before == [], before

    asyncio.run(run())
    assert "Traceback" not in pipe.servers[0].log()


def test_token_with_a_string_exp_is_refused(pipe):
    # Old server: PyJWT turned "9999999999" into a number and said AUTH OK.
    stringy = jwt.encode({"username": "u", "exp": "9999999999"}, pipe.settings.secret, algorithm="HS256")

    async def run():
        async with connect(pipe.url()) as ws:
            assert await next_json(ws) == {"id": "AUTH REQUEST"}
            await ws.send(stringy)
            assert await next_json(ws) == {"id": "AUTH FAILED", "reason": "invalid"}
            assert await next_json(ws) == {"id": "AUTH REQUEST"}
        # As a refresh on an open socket: refused too, and the socket goes on.
        async with opened(pipe.url(), pipe.token("u")) as (ws, _):
            await ws.send(stringy)
            assert await next_json(ws) == {"id": "AUTH FAILED", "reason": "invalid"}
            pipe.publisher().push("u", "STILL", 1)
            [message] = await collect(ws, 1)
            assert message["data"] == 1

    asyncio.run(run())
    assert "Traceback" not in pipe.servers[0].log()
