"""History and resume (PROTOCOL.md section 4) against the real proxy and servers.

"A gap is never silent" (revision 2): AUTH OK gives a position for every stream the socket
receives, and ``recovered: true`` only when the resume named every one of them and history
held everything after each.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
from websockets.exceptions import ConnectionClosed

from pipeline import Pipeline, authenticate, collect, recv_json
from resuming import ResumingClient

_witnesses = itertools.count()


@pytest.fixture
def pipe(tmp_path, engine):
    pipeline = Pipeline(tmp_path, engine=engine, FLOW_HISTORY_SIZE="20")
    yield pipeline
    pipeline.stop()


@pytest.fixture
def zmq_pipe(tmp_path):
    """For the proxy's own graceful restart (the Redis engine's restarts: test_redis_faults)."""
    pipeline = Pipeline(tmp_path, engine="zmq", FLOW_HISTORY_SIZE="20")
    yield pipeline
    pipeline.stop()


def position(messages):
    last = messages[-1]
    return {"seq": last["seq"], "epoch": last["epoch"]}


async def until_id(ws, message_id, timeout=10.0):
    """Messages up to and including the first with this id (broadcasts come to every socket)."""
    out = []
    while not out or out[-1]["id"] != message_id:
        out.append(await recv_json(ws, timeout))
    return out


async def numbered(pipe, publisher):
    """Return once the proxy has numbered (and kept) everything ``publisher`` pushed so far:
    pushes from one publisher are taken in order, so a later one reaching a socket says so."""
    name = f"witness{next(_witnesses)}"
    ws, _ = await authenticate(pipe.url(0), pipe.token(name))
    publisher.push(name, "WITNESS", None)
    await until_id(ws, "WITNESS")
    await ws.close()


async def until(condition, interval=0.02):
    """Poll a condition; callers bound it with asyncio.wait_for."""
    while not condition():
        await asyncio.sleep(interval)


def test_auth_ok_gives_a_position_for_every_stream(pipe):
    publisher = pipe.publisher()

    async def run():
        ws, ok = await authenticate(pipe.url(0), pipe.token("ann"))
        assert set(ok["streams"]) == {"ann", "*"}
        assert ok["streams"]["ann"] == {"seq": 0, "epoch": ok["epoch"]}
        publisher.push("ann", "M", 1)
        publisher.push_all("B", 1)
        got = await collect(ws, 2)
        await ws.close()
        ws, ok2 = await authenticate(pipe.url(1), pipe.token("ann"))
        by_stream = {m["username"]: m for m in got}
        assert ok2["streams"] == {s: {"seq": m["seq"], "epoch": m["epoch"]} for s, m in by_stream.items()}
        await ws.close()

    asyncio.run(run())


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
        ws, ok2 = await authenticate(pipe.url(), pipe.token("carol"), resume=ok["streams"])
        assert (ok2["recovered"], ok2["missed"]) == (True, 0)
        assert ok2["streams"] == ok["streams"]
        await ws.close()

    asyncio.run(run())


@pytest.mark.parametrize("case", ["epoch", "overflow", "future"])
def test_unrecoverable_resume_says_so_and_sends_no_history(pipe, case):
    publisher = pipe.publisher()

    async def run():
        ws, ok = await authenticate(pipe.url(), pipe.token("dan"))
        publisher.push("dan", "M", 0)
        [first] = await collect(ws, 1)
        await ws.close()
        if case == "overflow":
            for i in range(1, 30):  # more than the history of 20
                publisher.push("dan", "M", i)
        await numbered(pipe, publisher)
        own = {
            "epoch": {"seq": 1, "epoch": "some-other-epoch"},
            "overflow": {"seq": 1, "epoch": first["epoch"]},
            "future": {"seq": 99, "epoch": first["epoch"]},
        }[case]
        # The broadcast stream's position is good: only the case makes it unrecoverable.
        ws, ok = await authenticate(pipe.url(), pipe.token("dan"), resume={"dan": own, "*": ok["streams"]["*"]})
        assert (ok["recovered"], ok["missed"]) == (False, 0)
        publisher.push("dan", "LIVE", "live")
        [message] = await collect(ws, 1)
        assert message["id"] == "LIVE"  # no history came first
        await ws.close()

    asyncio.run(run())


def test_resume_naming_only_broadcasts_is_not_recovered_when_a_push_was_missed(pipe):
    """Seen on the old server: a tab that had a broadcast but no message of its own
    resumed with {"*": pos} and was told recovered: true, missed: 0; the push made to its
    user while it was away was lost without a word."""
    publisher = pipe.publisher()

    async def run():
        ws, ok = await authenticate(pipe.url(0), pipe.token("amy"))
        publisher.push_all("NEWS", 1)
        [news] = await collect(ws, 1)
        await ws.close()
        publisher.push("amy", "MISSED", 1)
        await numbered(pipe, publisher)
        ws, ok2 = await authenticate(pipe.url(1), pipe.token("amy"), resume={"*": position([news])})
        assert (ok2["recovered"], ok2["missed"]) == (False, 0), ok2
        # It now holds a position for both streams: its own continues after the missed push.
        assert ok2["streams"]["amy"]["seq"] == 1
        assert ok2["streams"]["*"] == position([news])
        publisher.push("amy", "LIVE", 2)
        [message] = await collect(ws, 1)
        assert (message["id"], message["seq"]) == ("LIVE", 2)  # no history was sent
        await ws.close()

    asyncio.run(run())


def test_resume_naming_only_the_user_is_not_recovered_when_a_broadcast_was_missed(pipe):
    publisher = pipe.publisher()

    async def run():
        ws, ok = await authenticate(pipe.url(0), pipe.token("ben"))
        publisher.push("ben", "M", 1)
        [mine] = await collect(ws, 1)
        await ws.close()
        publisher.push_all("MISSED", 1)
        await numbered(pipe, publisher)
        ws, ok2 = await authenticate(pipe.url(1), pipe.token("ben"), resume={"ben": position([mine])})
        assert (ok2["recovered"], ok2["missed"]) == (False, 0), ok2
        assert ok2["streams"]["*"]["seq"] == ok["streams"]["*"]["seq"] + 1
        publisher.push_all("LIVE", 2)
        [message] = await collect(ws, 1)
        assert message["id"] == "LIVE"
        await ws.close()

    asyncio.run(run())


def test_a_tab_that_blinks_before_any_message_recovers_both_streams(pipe):
    """Its positions come from AUTH OK's streams, so it holds one for each stream before
    any message arrived, and resumes both. Resuming with nothing is not recovered."""
    publisher = pipe.publisher()

    async def run():
        client = ResumingClient(pipe.url(0), lambda: pipe.token("fresh"))
        client.start()
        await asyncio.wait_for(client.authenticated.wait(), 10)
        first = client.ledger.auth_oks[0]
        await client.go_offline()
        for i in range(3):
            publisher.push("fresh", "M", i)
            publisher.push_all("B", i)
        await numbered(pipe, publisher)
        client.go_online()
        await asyncio.wait_for(until(lambda: len(client.ledger.auth_oks) == 2), 10)
        assert client.ledger.auth_oks[1]["recovered"] is True, client.ledger
        await asyncio.wait_for(until(lambda: len(client.ledger.messages) >= 6), 10)
        await client.stop()
        ledger = client.ledger
        assert [ok["recovered"] for ok in ledger.auth_oks] == [False, True]
        assert ledger.auth_oks[1]["missed"] == 6
        assert client.ids("M", "fresh") == [0, 1, 2]
        assert client.ids("B", "*") == [0, 1, 2]
        assert ledger.gaps == [] and ledger.duplicates == 0 and ledger.problems == []
        assert ledger.resyncs == []

        ws, ok = await authenticate(pipe.url(1), pipe.token("fresh"), resume={})
        assert (ok["recovered"], ok["missed"]) == (False, 0)
        assert ok["streams"]["fresh"]["seq"] == first["streams"]["fresh"]["seq"] + 3
        await ws.close()

    asyncio.run(run())


def test_resume_of_both_streams_sends_all_of_history_in_order_before_live(pipe):
    """Several pages of history on both streams, and live pushes while it is written."""
    publisher = pipe.publisher()
    pad = "x" * 64_000

    async def run():
        ws, ok = await authenticate(pipe.url(0), pipe.token("dora"))
        await ws.close()
        for i in range(15):  # within the history of 20; about 2 MB
            publisher.push("dora", "M", {"i": i, "pad": pad})
            publisher.push_all("B", {"i": i, "pad": pad})
        await numbered(pipe, publisher)
        ws, ok2 = await authenticate(pipe.url(1), pipe.token("dora"), resume=ok["streams"],
                                     max_size=2**20)
        for i in range(5):
            publisher.push("dora", "LIVE", i)
        assert (ok2["recovered"], ok2["missed"]) == (True, 30), ok2
        assert ok2["epoch"] == ok["epoch"]
        start = ok["streams"]
        # Where delivery continues after the resumed history: the head of each stream.
        assert ok2["streams"] == {
            "dora": {"seq": start["dora"]["seq"] + 15, "epoch": start["dora"]["epoch"]},
            "*": {"seq": start["*"]["seq"] + 15, "epoch": start["*"]["epoch"]},
        }
        got = await collect(ws, 35)
        assert [m["id"] for m in got[30:]] == ["LIVE"] * 5  # history first
        for stream, ids in (("dora", ["M"] * 15 + ["LIVE"] * 5), ("*", ["B"] * 15)):
            mine = [m for m in got if m["username"] == stream]
            assert [m["id"] for m in mine] == ids
            assert [m["seq"] for m in mine] == list(range(start[stream]["seq"] + 1,
                                                          start[stream]["seq"] + 1 + len(ids)))
        await ws.close()

    asyncio.run(run())


def test_history_expires_after_ttl(tmp_path):
    pipe = Pipeline(tmp_path, servers=1, FLOW_HISTORY_TTL="0")
    try:
        async def run():
            publisher = pipe.publisher()
            ws, ok = await authenticate(pipe.url(), pipe.token("eve"))
            publisher.push("eve", "M", 1)
            [first] = await collect(ws, 1)
            await ws.close()
            publisher.push("eve", "M", 2)
            await numbered(pipe, publisher)
            resume = {"eve": position([first]), "*": ok["streams"]["*"]}
            ws, ok = await authenticate(pipe.url(), pipe.token("eve"), resume=resume)
            assert ok["recovered"] is False
            await ws.close()

        asyncio.run(run())
    finally:
        pipe.stop()


async def closed_code(ws, timeout=20.0):
    """The close code the server sends, reading (and dropping) anything before it."""
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    return closed.value.rcvd.code if closed.value.rcvd else None


def test_proxy_graceful_restart_loses_nothing_and_keeps_epochs(zmq_pipe):
    """SIGTERM: the proxy keeps its numbering and history; what was pushed while it was
    down is delivered on the open sockets, nobody is closed."""
    publisher = zmq_pipe.publisher()

    async def run():
        loop = asyncio.get_running_loop()
        clients = [ResumingClient(zmq_pipe.url(i), lambda u=u: zmq_pipe.token(u))
                   for i, u in enumerate(["fay", "gil"])]  # gil only ever gets broadcasts
        for client in clients:
            client.start()
        for client in clients:
            await asyncio.wait_for(client.authenticated.wait(), 10)
        publisher.push("fay", "M", 0)
        publisher.push_all("B", 0)
        await asyncio.wait_for(until(lambda: len(clients[0].ledger.messages) == 2), 10)
        await loop.run_in_executor(None, zmq_pipe.stop_proxy)
        for i in range(1, 4):  # queued by the publisher until the proxy is back
            publisher.push("fay", "M", i)
            publisher.push_all("B", i)
        zmq_pipe.start_proxy()
        await asyncio.wait_for(until(lambda: clients[0].ids("B") == [0, 1, 2, 3]
                                     and clients[1].ids("B") == [0, 1, 2, 3]), 30)
        for client in clients:
            await client.stop()
        return clients

    fay, gil = asyncio.run(run())
    assert fay.ids("M") == [0, 1, 2, 3]
    for client in (fay, gil):
        ledger = client.ledger
        assert ledger.connects == 1 and ledger.close_codes == [], ledger
        assert ledger.gaps == [] and ledger.duplicates == 0 and ledger.problems == []
        first = ledger.auth_oks[0]["streams"]
        assert all(m["epoch"] == first[m["username"]]["epoch"] for m in ledger.messages)


def test_proxy_killed_is_never_a_silent_gap(pipe):
    """kill -9: history and numbering are gone. The servers see the new epochs, close with
    1012, and the resume is told recovered: false."""
    publisher = pipe.publisher()

    async def run():
        ws, ok = await authenticate(pipe.url(), pipe.token("hal"))
        publisher.push("hal", "M", 1)
        [first] = await collect(ws, 1)
        await asyncio.get_running_loop().run_in_executor(None, pipe.kill_proxy)
        pipe.start_proxy()
        assert await closed_code(ws) == 1012
        resume = {"hal": position([first]), "*": ok["streams"]["*"]}
        ws, ok2 = await authenticate(pipe.url(), pipe.token("hal"), resume=resume)
        assert ok2["recovered"] is False and ok2["epoch"] != ok["epoch"]
        assert ok2["streams"]["*"]["epoch"] != ok["streams"]["*"]["epoch"]
        publisher.push("hal", "AFTER", 2)
        [message] = await collect(ws, 1)
        assert (message["id"], message["seq"], message["epoch"]) == ("AFTER", 1, ok2["epoch"])
        await ws.close()

    asyncio.run(run())
