"""Exact routing and isolation through the real proxy and two WebSocket servers."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess

import pytest
import zmq

from flowcore import protocol
from pipeline import Pipeline, authenticate, collect
from support import PYTHON, ROOT, wait_until


@pytest.fixture
def pipe(tmp_path, engine):
    pipeline = Pipeline(tmp_path, engine=engine)
    yield pipeline
    pipeline.stop()


@pytest.fixture
def zmq_pipe(tmp_path):
    """For what only the ZeroMQ engine has (its topics, its PULL socket)."""
    pipeline = Pipeline(tmp_path, engine="zmq")
    yield pipeline
    pipeline.stop()


def test_every_tab_of_the_user_on_any_server_and_no_one_else(pipe):
    async def run():
        tabs = [await authenticate(pipe.url(i % 2), pipe.token("alice")) for i in range(3)]
        bob, _ = await authenticate(pipe.url(0), pipe.token("bob"))
        publisher = pipe.publisher()
        publisher.push("alice", "FOR ALICE", {"n": 1})
        publisher.push("bob", "FOR BOB", {"n": 2})
        publisher.push_all("NEWS", "hello")
        for ws, _ in tabs:
            got = await collect(ws, 2)
            assert [(m["id"], m["username"]) for m in got] == [("FOR ALICE", "alice"), ("NEWS", "*")]
        got = await collect(bob, 2)
        assert [(m["id"], m["username"]) for m in got] == [("FOR BOB", "bob"), ("NEWS", "*")]
        for ws, _ in tabs:
            await ws.close()
        await bob.close()

    asyncio.run(run())


def test_server_subscribes_only_for_its_users(pipe):
    async def run():
        one, _ = await authenticate(pipe.url(0), pipe.token("1"))
        twelve, _ = await authenticate(pipe.url(1), pipe.token("12"))
        assert pipe.stats(0)["streams"] == ["*", "1"]
        assert pipe.stats(1)["streams"] == ["*", "12"]
        publisher = pipe.publisher()
        for i in range(100):
            publisher.push("12", "N", i)
        publisher.push("1", "N", "one")
        got = await collect(twelve, 100)
        assert [m["data"] for m in got] == list(range(100))
        [only] = await collect(one, 1)
        assert only["data"] == "one"
        # Server 0 never received user 12's traffic from upstream.
        assert pipe.stats(0)["upstream_messages"] == 1
        assert pipe.stats(1)["upstream_messages"] == 100
        await twelve.close()
        wait_until(lambda: pipe.stats(1)["streams"] == ["*"], 10, message="unsubscribe of 12")
        await one.close()

    asyncio.run(run())


def test_topics_are_exact_at_the_zeromq_level(zmq_pipe):
    """A raw SUB for user "1" gets nothing of user "12" (prefix matching made exact)."""
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.connect(zmq_pipe.settings.fanout_endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, protocol.topic("1"))
    try:
        # The proxy answers a subscription with a sync frame: wait for it.
        assert sub.poll(10000), "no sync from the proxy"
        sync = protocol.decode_delivery(sub.recv())
        assert (sync.stream, sync.kind) == ("1", protocol.KIND_SYNC)
        publisher = zmq_pipe.publisher()
        publisher.push("12", "X", 1)
        publisher.push("1", "Y", 2)
        assert sub.poll(10000)
        delivery = protocol.decode_delivery(sub.recv())
        assert (delivery.stream, delivery.seq) == ("1", 1)
        # Published as a ready WebSocket text frame (FIN + text, short length, unmasked).
        assert delivery.frame[0] == 0x81 and delivery.frame[1] == len(delivery.frame) - 2
        assert json.loads(delivery.frame[2:])["data"] == 2
        assert not sub.poll(0)
    finally:
        sub.close(0)
        context.term()


PUSHER = """
import random, sys
import flow
rng = random.Random(int(sys.argv[1]))
users, count = int(sys.argv[2]), int(sys.argv[3])
for i in range(count):
    flow.push(f"user{rng.randrange(users)}", "MSG", {"i": i})
for u in range(users):
    flow.push(f"user{u}", "END", None)
"""


def test_isolation_at_scale(pipe):
    """200 users x 2 tabs over two servers; 5,000 pushes from another process."""
    users, count, seed = 200, 5000, 20261124
    rng = random.Random(seed)
    expected: dict[str, list[int]] = {f"user{u}": [] for u in range(users)}
    for i in range(count):
        expected[f"user{rng.randrange(users)}"].append(i)

    async def tab(name: str, server: int):
        ws, ok = await authenticate(pipe.url(server), pipe.token(name), max_queue=None)
        return name, ws, ok

    async def drain(name, ws):
        got = []
        async with asyncio.timeout(120):
            while True:
                message = await collect(ws, 1)
                message = message[0]
                assert message["username"] == name, f"{name} received {message}"
                if message["id"] == "END":
                    got.append(message["seq"])
                    break
                got.append(message)
        await ws.close()
        return name, got

    async def run():
        tabs = []
        for u in range(users):
            for t in range(2):
                tabs.append(await tab(f"user{u}", (u + t) % 2))
        proc = subprocess.run(
            [PYTHON, "-c", PUSHER, str(seed), str(users), str(count)],
            env=pipe.env, cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        return await asyncio.gather(*(drain(name, ws) for name, ws, _ in tabs))

    results = asyncio.run(run())
    assert len(results) == 2 * users
    for name, got in results:
        *messages, end_seq = got
        assert [m["data"]["i"] for m in messages] == expected[name], name
        seqs = [m["seq"] for m in messages] + [end_seq]
        assert seqs == list(range(1, len(expected[name]) + 2)), name
    assert "Traceback" not in pipe.logs()


def test_malformed_push_is_logged_and_others_still_flow(zmq_pipe):
    async def run():
        ws, _ = await authenticate(zmq_pipe.url(), zmq_pipe.token("zoe"))
        context = zmq.Context()
        raw = context.socket(zmq.PUSH)
        raw.connect(zmq_pipe.settings.publish_endpoint)
        raw.send(b"garbage")
        raw.send(b'P1\0\xff\xfe\0"X"\n1')
        raw.send(b"P1\0zoe\0no newline")
        raw.send_multipart([b"P1\0zoe\0", b'"X"\n1'])
        raw.close(linger=5000)
        context.term()
        zmq_pipe.publisher().push("zoe", "AFTER", 1)
        [message] = await collect(ws, 1)
        assert (message["id"], message["seq"]) == ("AFTER", 1)
        await ws.close()

    asyncio.run(run())
    wait_until(lambda: zmq_pipe.proxy.log().count("dropped a malformed push") == 4, 5,
               message="four warnings")
    assert "Traceback" not in zmq_pipe.proxy.log()
    assert zmq_pipe.proxy.alive()
