"""flow.push in the caller's process (PROTOCOL.md section 5), against the real pipeline."""

from __future__ import annotations

import asyncio
import datetime
import math
import subprocess
import threading

import pytest
import zmq

import flow
from flowcore import protocol
from flowcore.settings import load_settings
from pipeline import Pipeline, authenticate, collect
from support import PYTHON, ROOT, base_env, free_port


@pytest.fixture
def pipe(tmp_path):
    pipeline = Pipeline(tmp_path, servers=1)
    yield pipeline
    pipeline.stop()


@pytest.mark.parametrize(
    "args, message",
    [
        (("", "ID", 1), "empty"),
        ((None, "ID", 1), "string"),
        ((7, "ID", 1), "string"),
        (("*", "ID", 1), "reserved"),
        (("a\0b", "ID", 1), "NUL"),
        (("alice", "", 1), "empty"),
        (("alice", 5, 1), "string"),
        (("alice", "ID", {1, 2}), "JSON"),
        (("alice", "ID", object()), "JSON"),
        (("alice", "ID", math.nan), "JSON"),
        (("alice", "ID", "x" * 2048), "limit"),
    ],
)
def test_bad_input_refused_in_caller_and_nothing_sent(pipe, args, message):
    publisher = pipe.publisher(max_message=1024)

    async def run():
        ws, _ = await authenticate(pipe.url(), pipe.token("alice"))
        with pytest.raises(flow.InvalidMessage, match=message):
            publisher.push(*args)
        publisher.push("alice", "OK", 1)
        [first] = await collect(ws, 1)
        # Nothing of the refused push reached the proxy: the good one is seq 1.
        assert (first["id"], first["seq"]) == ("OK", 1)
        await ws.close()

    asyncio.run(run())


@pytest.fixture
def pull(tmp_path):
    """A publisher and the PULL socket it sends to, for checking frames byte for byte."""
    context = zmq.Context()
    sock = context.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)  # a deadline for each receive
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    settings = load_settings({"FLOW_SECRET": "s" * 32, "FLOW_ENV_FILE": str(tmp_path / "none")})
    publisher = flow.Flow(f"tcp://127.0.0.1:{port}", settings=settings, max_message=1024, linger=0)
    yield publisher, sock
    publisher.close()
    sock.close(linger=0)
    context.term()


FRAME_CASES = [
    ("alice", "ID", {"a": 1}),
    ("alice", "ID", {"a": 1}),  # the second time from the caches
    ("alice", "OTHER", [1, 2.5, "three"]),
    ("bob", "ID", None),
    ("bob", "ID", {"text": "null", "x": None}),  # "null" in the output: the strict encoder
    ("ünïcødé ✓", "ÏD \"quoted\"", "✓" * 10),
    ("u" * 200, "x", "a" * 1018),  # id + data exactly 1024 bytes; the username is not counted
]


def test_push_sends_exactly_what_encode_push_builds(pull):
    publisher, sock = pull
    for user, message_id, data in FRAME_CASES:
        publisher.push(user, message_id, data)
        assert sock.recv() == protocol.encode_push(user, message_id, data, 1024)
    publisher.push_all("NEWS", {"n": 1})
    assert sock.recv() == protocol.encode_push("*", "NEWS", {"n": 1}, 1024)


@pytest.mark.parametrize(
    "args, message",
    [
        (("*", "NEWS", 1), "reserved"),  # even with the broadcast head and this id cached
        ((["alice"], "ID", 1), "string"),
        (({"a": 1}, "ID", 1), "string"),
        (("alice", ["ID"], 1), "string"),
        (("alice", "ID", datetime.datetime(2026, 1, 1)), "JSON"),
        (("alice", "ID", math.inf), "JSON"),
        (("u" * 200, "x", "a" * 1019), "1025 bytes, over the 1024-byte limit"),
    ],
)
def test_bad_input_on_the_fast_path_refused_and_nothing_sent(pull, args, message):
    publisher, sock = pull
    # Warm the head and id caches, so that refusals are checked on the cached path too.
    publisher.push_all("NEWS", 0)
    publisher.push("u" * 200, "x", 0)
    publisher.push("alice", "ID", 0)
    with pytest.raises(flow.InvalidMessage, match=message):
        publisher.push(*args)
    publisher.push("alice", "OK", 1)
    frames = [sock.recv() for _ in range(4)]
    assert frames[-1] == protocol.encode_push("alice", "OK", 1, 1024)


def test_invalid_message_is_a_value_error():
    assert issubclass(flow.InvalidMessage, ValueError)


def test_queue_full_when_proxy_unreachable(tmp_path):
    settings = load_settings({"FLOW_SECRET": "s" * 32, "FLOW_ENV_FILE": str(tmp_path / "none")})
    publisher = flow.Flow(f"tcp://127.0.0.1:{free_port()}", settings=settings, queue_size=10, linger=0)
    sent = 0
    with pytest.raises(flow.QueueFull, match="not taking messages"):
        for _ in range(1000):
            publisher.push("alice", "ID", sent)
            sent += 1
    assert 10 <= sent < 1000
    publisher.close()


def test_many_threads_share_one_publisher(pipe):
    publisher = pipe.publisher()

    async def run():
        ws, _ = await authenticate(pipe.url(), pipe.token("alice"), max_queue=None)

        def work(t: int) -> None:
            for i in range(250):
                publisher.push("alice", "T", [t, i])

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        got = await collect(ws, 2000)
        assert sorted(tuple(m["data"]) for m in got) == [(t, i) for t in range(8) for i in range(250)]
        assert [m["seq"] for m in got] == list(range(1, 2001))
        for t in range(8):  # each thread's own order is kept
            mine = [m["data"][1] for m in got if m["data"][0] == t]
            assert mine == list(range(250))
        await ws.close()

    asyncio.run(run())


FORKER = """
import os, sys
import flow
flow.push("alice", "PARENT", 1)        # first use opens the socket before the fork
pid = os.fork()
if pid == 0:
    flow.push("alice", "CHILD", 2)
    flow.push_all("CHILD ALL", 3)
    sys.exit(0)                        # atexit flushes the child's own socket
_, status = os.waitpid(pid, 0)
flow.push("alice", "PARENT AGAIN", 4)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_fork_after_first_use(pipe):
    async def run():
        ws, _ = await authenticate(pipe.url(), pipe.token("alice"))
        proc = subprocess.run([PYTHON, "-W", "error", "-c", FORKER], env=pipe.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        got = await collect(ws, 4)
        assert sorted(m["id"] for m in got) == ["CHILD", "CHILD ALL", "PARENT", "PARENT AGAIN"]
        await ws.close()

    asyncio.run(run())


def test_push_at_start_and_exit_of_twenty_processes(pipe):
    """Each process pushes once right after import and exits at once: no slow-joiner loss."""
    async def run():
        ws, _ = await authenticate(pipe.url(), pipe.token("alice"))
        procs = [
            subprocess.Popen([PYTHON, "-c", f"import flow; flow.push('alice', 'HI', {n})"],
                             env=pipe.env, cwd=ROOT)
            for n in range(20)
        ]
        assert [p.wait(60) for p in procs] == [0] * 20
        got = await collect(ws, 20)
        assert sorted(m["data"] for m in got) == list(range(20))
        await ws.close()

    asyncio.run(run())


def test_custom_serializer_and_explicit_endpoint(pipe):
    publisher = flow.Flow(pipe.settings.publish_endpoint, settings=pipe.settings,
                          serializer=lambda data: b'{"pre":"encoded"}')
    pipe.publishers.append(publisher)

    async def run():
        ws, _ = await authenticate(pipe.url(), pipe.token("alice"))
        publisher.push("alice", "S", object())
        [message] = await collect(ws, 1)
        assert message["data"] == {"pre": "encoded"}
        await ws.close()

    asyncio.run(run())


def test_bad_settings_stop_every_process_with_one_line(tmp_path):
    env = base_env(tmp_path, FLOW_HEARTBEAT="often")
    for script in ("message_proxy.py", "websocket_server.py"):
        proc = subprocess.run([PYTHON, script], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "FLOW_HEARTBEAT" in lines[0], proc.stderr
    env = base_env(tmp_path, FLOW_HEARTBEAT="often")
    proc = subprocess.run([PYTHON, "-c", "import flow; flow.push('a', 'b', 1)"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "FLOW_HEARTBEAT" in proc.stderr
