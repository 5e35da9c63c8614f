"""History and resume (PROTOCOL.md section 4) against the real proxy and servers."""

from __future__ import annotations

import asyncio

import pytest
from websockets.exceptions import ConnectionClosed

from pipeline import Pipeline, authenticate, collect


@pytest.fixture
def pipe(tmp_path):
    pipeline = Pipeline(tmp_path, FLOW_HISTORY_SIZE="20")
    yield pipeline
    pipeline.stop()


def position(messages):
    last = messages[-1]
    return {"seq": last["seq"], "epoch": last["epoch"]}


def test_resume_sends_missed_messages_in_order_then_live(pipe):
    publisher = pipe.publisher()

    async def run():
        ws, ok = await authenticate(pipe.url(0), pipe.token("alice"))
        for i in range(5):
            publisher.push("alice", "M", i)
        publisher.push_all("B", "b0")
        seen = await collect(ws, 6)
        mine = [m for m in seen if m["username"] == "alice"]
        everyone = [m for m in seen if m["username"] == "*"]
        await ws.close()

        # Missed while away: 5 for alice, 2 broadcasts, 1 for bob (never shown to alice).
        other, _ = await authenticate(pipe.url(1), pipe.token("bob"))
        for i in range(5, 10):
            publisher.push("alice", "M", i)
        publisher.push_all("B", "b1")
        publisher.push_all("B", "b2")
        publisher.push("bob", "M", "bob's")
        await collect(other, 3)

        resume = {"alice": position(mine), "*": position(everyone), "bob": {"seq": 0, "epoch": ok["epoch"]}}
        ws, ok2 = await authenticate(pipe.url(1), pipe.token("alice"), resume=resume)
        assert ok2["recovered"] is True and ok2["missed"] == 7
        assert ok2["epoch"] == ok["epoch"]
        publisher.push("alice", "LIVE", 10)
        got = await collect(ws, 8)
        assert [(m["username"], m["data"]) for m in got if m["username"] == "alice"] == [
            ("alice", i) for i in range(5, 11)
        ]
        assert [m["data"] for m in got if m["username"] == "*"] == ["b1", "b2"]
        assert got[-1]["id"] == "LIVE"  # history before any live message
        await ws.close()
        await other.close()

    asyncio.run(run())


def test_resume_at_the_head_recovers_nothing_missed(pipe):
    async def run():
        ws, ok = await authenticate(pipe.url(), pipe.token("carol"))
        await ws.close()
        resume = {"carol": {"seq": 0, "epoch": ok["epoch"]}}
        ws, ok = await authenticate(pipe.url(), pipe.token("carol"), resume=resume)
        assert (ok["recovered"], ok["missed"]) == (True, 0)
        await ws.close()

    asyncio.run(run())


@pytest.mark.parametrize("case", ["epoch", "overflow", "future"])
def test_unrecoverable_resume_says_so_and_sends_no_history(pipe, case):
    publisher = pipe.publisher()

    async def run():
        ws, ok = await authenticate(pipe.url(), pipe.token("dan"))
        sentinel, _ = await authenticate(pipe.url(), pipe.token("sentinel"))
        publisher.push("dan", "M", 0)
        [first] = await collect(ws, 1)
        await ws.close()
        if case == "overflow":
            for i in range(1, 30):  # more than the history of 20
                publisher.push("dan", "M", i)
        # Pushes from one publisher are taken in order: once this one is delivered,
        # the proxy has numbered all of dan's.
        publisher.push("sentinel", "S", None)
        await collect(sentinel, 1)
        await sentinel.close()
        resume = {
            "epoch": {"dan": {"seq": 1, "epoch": "some-other-epoch"}},
            "overflow": {"dan": {"seq": 1, "epoch": first["epoch"]}},
            "future": {"dan": {"seq": 99, "epoch": first["epoch"]}},
        }[case]
        ws, ok = await authenticate(pipe.url(), pipe.token("dan"), resume=resume)
        assert (ok["recovered"], ok["missed"]) == (False, 0)
        publisher.push("dan", "LIVE", "live")
        [message] = await collect(ws, 1)
        assert message["id"] == "LIVE"  # no history came first
        await ws.close()

    asyncio.run(run())


def test_history_expires_after_ttl(tmp_path):
    pipe = Pipeline(tmp_path, servers=1, FLOW_HISTORY_TTL="0")
    try:
        async def run():
            publisher = pipe.publisher()
            ws, _ = await authenticate(pipe.url(), pipe.token("eve"))
            sentinel, _ = await authenticate(pipe.url(), pipe.token("sentinel"))
            publisher.push("eve", "M", 1)
            [first] = await collect(ws, 1)
            await ws.close()
            publisher.push("eve", "M", 2)
            publisher.push("sentinel", "S", None)  # once here, eve's 2 is in history
            await collect(sentinel, 1)
            await sentinel.close()
            ws, ok = await authenticate(pipe.url(), pipe.token("eve"), resume={"eve": position([first])})
            assert ok["recovered"] is False
            await ws.close()

        asyncio.run(run())
    finally:
        pipe.stop()


def test_proxy_restart_is_never_a_silent_gap(pipe):
    publisher = pipe.publisher()

    async def run():
        ws, ok = await authenticate(pipe.url(), pipe.token("fay"))
        publisher.push("fay", "M", 1)
        [first] = await collect(ws, 1)
        pipe.restart_proxy()
        # The server notices the new epoch and closes the socket so the client resumes.
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(20):
                while True:
                    await ws.recv()
        assert closed.value.rcvd.code == 1001
        ws, ok2 = await authenticate(pipe.url(), pipe.token("fay"), resume={"fay": position([first])})
        assert ok2["recovered"] is False and ok2["epoch"] != ok["epoch"]
        publisher.push("fay", "AFTER", 2)
        [message] = await collect(ws, 1)
        assert (message["id"], message["seq"], message["epoch"]) == ("AFTER", 1, ok2["epoch"])
        await ws.close()

    asyncio.run(run())
