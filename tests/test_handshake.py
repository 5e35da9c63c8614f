"""Browser <-> WebSocket server (PROTOCOL.md section 3) against the real processes."""

from __future__ import annotations

import asyncio
import base64
import json
import signal

import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pipeline import Pipeline, authenticate, closed_with, collect, recv_json, small_buffer_socket
from support import wait_until


@pytest.fixture
def pipe(tmp_path):
    pipeline = Pipeline(tmp_path, FLOW_HEARTBEAT="0.3", FLOW_AUTH_TIMEOUT="1")
    yield pipeline
    pipeline.stop()


async def closed_code(ws, timeout: float = 10.0) -> int:
    """Read until the server closes; the close code the client received."""
    return (await closed_with(ws, timeout)).code


def test_message_flow_handshake_with_raw_token(pipe):
    async def run():
        ws, ok = await authenticate(pipe.url(), pipe.token("alice"))
        assert set(ok) == {"id", "username", "epoch", "heartbeat", "recovered", "missed", "streams",
                           "expires_in"}
        assert ok["username"] == "alice"
        assert ok["streams"]["alice"] == {"seq": 0, "epoch": ok["epoch"]} and set(ok["streams"]) == {"alice", "*"}
        assert 0 < ok["expires_in"] <= pipe.settings.token_ttl
        assert ok["heartbeat"] == 0.3
        assert ok["recovered"] is False and ok["missed"] == 0
        assert isinstance(ok["epoch"], str) and ok["epoch"]
        pipe.publisher().push("alice", "TASK DONE", {"card": "ok"})
        [message] = await collect(ws, 1)
        assert message == {"id": "TASK DONE", "username": "alice", "data": {"card": "ok"},
                           "seq": 1, "epoch": ok["epoch"]}
        await ws.close()

    asyncio.run(run())


def test_json_auth_frame_and_ping(pipe):
    async def run():
        ws, ok = await authenticate(pipe.url(1), pipe.token("bob"), resume={})
        assert ok["username"] == "bob"
        await ws.send('{"id": "PING"}')
        assert await recv_json(ws) == {"id": "PONG"}
        await ws.send("<3")  # a client heartbeat gets no answer, and is no error
        await ws.send('{"id": "PING"}')
        assert await recv_json(ws) == {"id": "PONG"}
        await ws.close()

    asyncio.run(run())


def test_heartbeat_frames_arrive_every_interval(pipe):
    async def run():
        ws, _ = await authenticate(pipe.url(), pipe.token("carol"))
        beats = 0
        async with asyncio.timeout(5):
            while beats < 3:
                if await ws.recv() == "<3":
                    beats += 1
        assert beats == 3
        await ws.close()

    asyncio.run(run())


@pytest.mark.parametrize(
    "make_token, reason",
    [
        (lambda p: p.token("alice", ttl=-60), "expired"),
        (lambda p: jwt.encode({"username": "alice", "exp": 2**40}, "x" * 40, "HS256"), "invalid"),
        (lambda p: "not-a-token", "malformed"),
        (
            lambda p: ".".join(
                base64.urlsafe_b64encode(json.dumps(part).encode()).decode().rstrip("=")
                for part in ({"alg": "none", "typ": "JWT"}, {"username": "alice", "exp": 2**40})
            ) + ".",
            "invalid",
        ),
        (lambda p: jwt.encode({"username": "alice", "exp": 2**40}, p.settings.secret, "HS512"), "invalid"),
        (lambda p: jwt.encode({"username": "alice"}, p.settings.secret, "HS256"), "invalid"),
    ],
    ids=["expired", "wrong-secret", "garbage", "alg-none", "unlisted-alg", "no-exp"],
)
def test_bad_tokens_fail_with_reason(pipe, make_token, reason):
    async def run():
        async with connect(pipe.url()) as ws:
            assert await recv_json(ws) == {"id": "AUTH REQUEST"}
            await ws.send(make_token(pipe))
            assert await recv_json(ws) == {"id": "AUTH FAILED", "reason": reason}
            assert await recv_json(ws) == {"id": "AUTH REQUEST"}
            # A good token still works on the same socket.
            await ws.send(pipe.token("alice"))
            assert (await recv_json(ws))["id"] == "AUTH OK"

    asyncio.run(run())
    assert "token refused" in pipe.logs()
    assert "Traceback" not in pipe.logs()


def test_last_failed_attempt_closes_4001(pipe):
    async def run():
        async with connect(pipe.url()) as ws:
            await recv_json(ws)
            for attempt in range(3):
                await ws.send("bad.token.here")
                assert (await recv_json(ws))["id"] == "AUTH FAILED"
                if attempt < 2:
                    assert await recv_json(ws) == {"id": "AUTH REQUEST"}
            return await closed_code(ws)

    assert asyncio.run(run()) == 4001


def test_auth_timeout_closes_4002(pipe):
    async def run():
        async with connect(pipe.url()) as ws:
            await recv_json(ws)
            return await closed_code(ws)

    assert asyncio.run(run()) == 4002


def test_no_message_before_auth_ok(pipe):
    async def run():
        publisher = pipe.publisher()
        async with connect(pipe.url()) as ws:
            await recv_json(ws)
            # Another tab of the same user is authenticated, so the stream is live.
            other, _ = await authenticate(pipe.url(), pipe.token("dave"))
            publisher.push("dave", "EARLY", 1)
            await collect(other, 1)
            await ws.send(pipe.token("dave"))
            assert (await recv_json(ws))["id"] == "AUTH OK"
            publisher.push("dave", "LATE", 2)
            [message] = await collect(ws, 1)
            assert message["id"] == "LATE"
            await other.close()

    asyncio.run(run())


def test_unknown_frames_get_error(pipe):
    async def run():
        ws, _ = await authenticate(pipe.url(), pipe.token("erin"))
        for frame in ['{"id": "SUBSCRIBE"}', "[1, 2]", "{not json", '{"no": "id"}']:
            await ws.send(frame)
            reply = await recv_json(ws)
            assert reply["id"] == "ERROR" and reply["reason"], frame
        await ws.send(b"\x00\x01")
        assert (await recv_json(ws))["id"] == "ERROR"
        await ws.close()

    asyncio.run(run())
    assert "Traceback" not in pipe.logs()


@pytest.mark.parametrize("size", [65537, 3 * 1024 * 1024])
def test_oversized_frame_gets_a_1009_close_frame(pipe, size):
    async def run():
        async with connect(pipe.url(), max_size=None) as ws:
            await recv_json(ws)
            try:
                await ws.send("x" * size)
            except ConnectionClosed as closed:  # closed while still sending
                assert closed.rcvd is not None, "connection dropped without a close frame"
                return closed.rcvd.code
            return await closed_code(ws)

    assert asyncio.run(run()) == 1009
    # The server survives and serves others.
    async def again():
        ws, _ = await authenticate(pipe.url(), pipe.token("frank"))
        await ws.close()

    asyncio.run(again())


def test_frame_flood_closes_4029(pipe):
    async def run():
        ws, _ = await authenticate(pipe.url(), pipe.token("gina"))
        for _ in range(200):
            try:
                await ws.send("<3")
            except ConnectionClosed:
                break
        return await closed_code(ws)

    assert asyncio.run(run()) == 4029


def test_rate_limit_allows_exactly_the_burst(tmp_path):
    # A refill too slow to matter here: the auth frame and four pings spend a burst of
    # five; the sixth frame is one too many.
    pipe = Pipeline(tmp_path, servers=1, FLOW_RATE_BURST="5", FLOW_RATE_LIMIT="0.01")
    try:
        async def run():
            ws, _ = await authenticate(pipe.url(), pipe.token("hugo"))
            for _ in range(4):
                await ws.send('{"id": "PING"}')
                assert await recv_json(ws) == {"id": "PONG"}
            await ws.send('{"id": "PING"}')
            return await closed_code(ws)

        assert asyncio.run(run()) == 4029
    finally:
        pipe.stop()


def test_origin_checked_at_handshake(tmp_path):
    pipe = Pipeline(tmp_path, servers=1, FLOW_ALLOWED_ORIGINS="https://app.example")
    try:
        port = pipe.ports[0]

        async def run():
            with pytest.raises(InvalidStatus) as refused:
                await connect(pipe.url(), origin="http://evil.example")
            assert refused.value.response.status_code == 403
            for origin in (f"http://127.0.0.1:{port}", "https://app.example"):
                ws, _ = await authenticate(pipe.url(), pipe.token("hal"), origin=origin)
                await ws.close()

        asyncio.run(run())
        assert "refused handshake from origin 'http://evil.example'" in pipe.logs()
    finally:
        pipe.stop()


def test_slow_consumer_closed_4008_without_delaying_others(tmp_path):
    pipe = Pipeline(tmp_path, servers=1, FLOW_SEND_BACKLOG="65536")
    try:
        async def run():
            publisher = pipe.publisher()
            # max_queue=1 and a small read buffer: this client stops reading at once.
            slow, _ = await authenticate(pipe.url(), pipe.token("slow"), max_queue=1, max_size=None,
                                         sock=small_buffer_socket(pipe.url()))
            fast, _ = await authenticate(pipe.url(), pipe.token("fast"))
            blob = "y" * 20000
            for i in range(400):
                publisher.push("slow", "BIG", {"i": i, "blob": blob})
                if i % 50 == 0:
                    publisher.push("fast", "TICK", i)
            publisher.push("fast", "TICK", "end")
            ticks = await collect(fast, 9)
            assert [t["data"] for t in ticks] == [0, 50, 100, 150, 200, 250, 300, 350, "end"]
            code = await closed_code(slow, 30)
            await fast.close()
            return code

        assert asyncio.run(run()) == 4008
        assert "closing 4008" in pipe.logs()
    finally:
        pipe.stop()


def test_sigterm_closes_sockets_1001_and_exits_cleanly(pipe):
    async def run():
        ws, _ = await authenticate(pipe.url(), pipe.token("ivan"))
        pipe.servers[0].signal(signal.SIGTERM)
        return await closed_code(ws)

    assert asyncio.run(run()) == 1001
    wait_until(lambda: not pipe.servers[0].alive(), 10, message="server exit")
    assert pipe.servers[0].popen.returncode == 0
    assert pipe.stop()[-1] == 0  # the proxy too
