"""The heartbeat (PROTOCOL.md section 3): `<3` every FLOW_HEARTBEAT seconds to every
authenticated socket, whatever it sends; a client `<3` is never answered, `PING` is."""

from __future__ import annotations

import asyncio
import statistics
import time


from pipeline import Pipeline, recv_json, opened


def test_heartbeats_come_at_the_configured_interval(tmp_path):
    # A functional check of FLOW_HEARTBEAT=1 (not a speed test): the bounds are wide, and
    # the whole measurement has a deadline.
    pipe = Pipeline(tmp_path, servers=1, FLOW_HEARTBEAT="1")
    try:
        async def run():
            async with opened(pipe.url(), pipe.token("carol")) as (ws, ok):
                assert ok["heartbeat"] == 1
                beats: list[float] = []
                async with asyncio.timeout(10):
                    while len(beats) < 6:
                        frame = await ws.recv()
                        assert frame == "<3", frame  # nothing else is sent to this socket
                        beats.append(time.monotonic())
            return [b - a for a, b in zip(beats, beats[1:])]

        intervals = asyncio.run(run())
        assert len(intervals) == 5
        assert all(0.5 <= i <= 1.6 for i in intervals), intervals
        assert 0.8 <= statistics.mean(intervals) <= 1.2, intervals
    finally:
        pipe.stop()


def test_a_socket_that_sends_nothing_still_gets_heartbeats(tmp_path):
    # Neither the auth timeout nor anything else closes an authenticated socket that is
    # silent; the server keeps it alive through proxies (nginx's read timeout).
    pipe = Pipeline(tmp_path, servers=1, FLOW_HEARTBEAT="0.3", FLOW_AUTH_TIMEOUT="0.5")
    try:
        async def run():
            async with opened(pipe.url(), pipe.token("dan")) as (ws, _):
                frames: list[str | bytes] = []
                async with asyncio.timeout(10):
                    while len(frames) < 8:  # eight heartbeats: well past the auth timeout
                        frames.append(await ws.recv())
                assert frames == ["<3"] * 8
                # Still open: it answers.
                await ws.send('{"id": "PING"}')
                assert await recv_json(ws) == {"id": "PONG"}

        asyncio.run(run())
    finally:
        pipe.stop()


def test_client_heartbeat_gets_no_answer_and_ping_gets_pong(tmp_path):
    # A long interval: no server heartbeat is due during the test, so any `<3` that came
    # back would be an answer. Frames are answered in order, so whatever answered the `<3`s
    # would arrive before the PONG.
    pipe = Pipeline(tmp_path, servers=1, FLOW_HEARTBEAT="60")
    try:
        async def run():
            async with opened(pipe.url(), pipe.token("eve")) as (ws, _):
                for _ in range(3):
                    await ws.send("<3")
                await ws.send('{"id": "PING"}')
                assert await asyncio.wait_for(ws.recv(), 10) == '{"id":"PONG"}'
                await ws.send('{"id": "PING"}')
                assert await asyncio.wait_for(ws.recv(), 10) == '{"id":"PONG"}'

        asyncio.run(run())
        assert "Traceback" not in pipe.servers[0].log()
    finally:
        pipe.stop()
