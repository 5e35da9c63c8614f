"""flow.push's promises (PROTOCOL.md section 5) on the Redis engine's publisher
(flowcore/engines/redis.py RedisPublisherEngine), against a real redis-server.

Each test has its own redis-server (tests/redisserver.py), its own WebSocket server
process where a browser's view is checked, and flow.Flow with FLOW_ENGINE=redis. Where the
publisher's link must misbehave in a way Redis itself never does (a reply lost after the
script ran, requests held back across a fork), a small TCP forwarder sits between the
publisher and redis-server (Forwarder below); WebSocket servers always talk to Redis
directly.

What is checked: pushes never block and queue while Redis is down or hung, boundedly
(QueueFull); flush counts what Redis has not confirmed; exit delivers, or reports the loss
once and within FLOW_PUSH_LINGER; threads and forks keep every message exactly once; a
publish whose reply is lost is resent and never applied twice (and redis-py itself does not
retry it); Redis refusing writes (OOM, a read-only replica) keeps pushes queued with one
warning; retries back off while Redis is away, whatever the pushes do meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import selectors
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import redis

import flow
from flowcore.settings import load_settings
from flowcore.tokens import issue_token
from pipeline import authenticate, collect
from redisserver import RedisServer
from support import PYTHON, ROOT, Proc, base_env, free_port, port_open, wait_until

REPORT = "could not be handed over"
ENGINE_LOGGER = "flow.engine.redis"
# Deadlines: generous for a loaded machine; the publisher reconnects at most 2 s apart.
DELIVERY = 20.0


# ---------------------------------------------------------------- a TCP forwarder


def _resp_end(buf: bytearray, at: int) -> int | None:
    """Where the RESP2 value starting at ``at`` ends, or None while it is incomplete."""
    line_end = buf.find(b"\r\n", at)
    if line_end < 0:
        return None
    kind = bytes(buf[at : at + 1])
    if kind in (b"+", b"-", b":"):
        return line_end + 2
    count = int(buf[at + 1 : line_end])
    if kind == b"$":
        end = line_end + 2 + max(count, 0) + (2 if count >= 0 else 0)
        return end if len(buf) >= end else None
    if kind == b"*":
        pos = line_end + 2
        for _ in range(max(count, 0)):
            inner = _resp_end(buf, pos)
            if inner is None:
                return None
            pos = inner
        return pos
    raise ValueError(f"not RESP2: {bytes(buf[at:at + 20])!r}")


def _command(buf: bytearray) -> tuple[bytes, int]:
    """The verb of the complete request at the start of buf (an array of bulk strings),
    and its number of arguments."""
    header_end = buf.index(b"\r\n")
    bulk_end = buf.index(b"\r\n", header_end + 2)
    size = int(buf[header_end + 3 : bulk_end])
    return bytes(buf[bulk_end + 2 : bulk_end + 2 + size]).upper(), int(buf[1:header_end]) - 1


class _Pair:
    __slots__ = ("client", "upstream", "requests", "replies", "pending", "held")

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.requests = bytearray()  # client bytes not yet parsed into commands
        self.replies = bytearray()  # Redis bytes not yet parsed into replies
        # (verb, pushes in it if a publish script call) per request awaiting its reply
        self.pending: collections.deque[tuple[bytes, int]] = collections.deque()
        self.held: bytearray | None = None  # requests held back (hold())


class Forwarder:
    """127.0.0.1:port -> redis-server at 127.0.0.1:upstream_port, one thread, RESP-aware.

    ``lose_first_script_reply``: the first reply to an EVALSHA/EVAL that Redis ran (not an
    error such as NOSCRIPT) is never forwarded; the client's connection is closed instead,
    so Redis applied the batch and the publisher does not know. ``hold()``: the connections
    open now stop forwarding requests (kept, unsent, sockets open) until ``release()``;
    connections accepted later pass."""

    def __init__(self, upstream_port: int, *, lose_first_script_reply: bool = False) -> None:
        self.upstream_port = upstream_port
        self.lose_first_script_reply = lose_first_script_reply
        self.lost = 0  # script replies dropped
        self.lost_pushes = 0  # pushes in the script call whose reply was dropped
        self.accepted = 0
        self.refused = 0  # connections closed at once because Redis was not there
        self.script_calls = 0  # EVALSHA/EVAL requests seen
        self._lock = threading.Lock()
        self._pairs: list[_Pair] = []
        self._selector = selectors.DefaultSelector()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-forwarder", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def hold(self) -> None:
        with self._lock:
            for pair in self._pairs:
                if pair.held is None:
                    pair.held = bytearray()

    def release(self) -> None:
        with self._lock:
            for pair in self._pairs:
                held, pair.held = pair.held, None
                if held:
                    pair.upstream.sendall(held)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            for pair in list(self._pairs):
                self._drop(pair)
            self._selector.unregister(self._listener)
            self._listener.close()
            self._selector.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            events = self._selector.select(0.05)
            with self._lock:
                for key, _ in events:
                    if key.data is None:
                        self._accept()
                        continue
                    pair, from_client = key.data
                    if pair not in self._pairs:
                        continue  # dropped by an earlier event of this round
                    try:
                        if from_client:
                            self._on_request(pair)
                        else:
                            self._on_reply(pair)
                    except OSError:
                        self._drop(pair)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
        except OSError:
            self.refused += 1
            client.close()  # Redis away: the client's connection ends before any reply
            return
        client.setblocking(True)
        upstream.settimeout(None)
        pair = _Pair(client, upstream)
        self._pairs.append(pair)
        self.accepted += 1
        self._selector.register(client, selectors.EVENT_READ, (pair, True))
        self._selector.register(upstream, selectors.EVENT_READ, (pair, False))

    def _on_request(self, pair: _Pair) -> None:
        data = pair.client.recv(65536)
        if not data:
            self._drop(pair)
            return
        pair.requests += data
        while True:
            end = _resp_end(pair.requests, 0)
            if end is None:
                break
            verb, args = _command(pair.requests)
            pushes = 0
            if verb in (b"EVALSHA", b"EVAL"):
                self.script_calls += 1
                # script, numkeys 0, eight fixed ARGV, then (stream, head) per push
                pushes = (args - 10) // 2
            pair.pending.append((verb, pushes))
            del pair.requests[:end]
        if pair.held is not None:
            pair.held += data
        else:
            pair.upstream.sendall(data)

    def _on_reply(self, pair: _Pair) -> None:
        data = pair.upstream.recv(65536)
        if not data:
            self._drop(pair)
            return
        pair.replies += data
        out = bytearray()
        while True:
            end = _resp_end(pair.replies, 0)
            if end is None:
                break
            verb, pushes = pair.pending.popleft() if pair.pending else (b"?", 0)
            if (self.lose_first_script_reply and not self.lost and verb in (b"EVALSHA", b"EVAL")
                    and pair.replies[:1] != b"-"):
                self.lost += 1
                self.lost_pushes = pushes
                pair.client.sendall(out)
                self._drop(pair)  # the reply is never sent: the publisher sees the link close
                return
            out += pair.replies[:end]
            del pair.replies[:end]
        if out:
            pair.client.sendall(out)

    def _drop(self, pair: _Pair) -> None:
        if pair in self._pairs:
            self._pairs.remove(pair)
        for sock in (pair.client, pair.upstream):
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


# ---------------------------------------------------------------- per-test infrastructure


class World:
    """What one test started: redis-servers, forwarders, WebSocket servers, publishers.
    Teardown ends them all (publishers first, while Redis may still take their pushes)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.redis_servers: list[RedisServer] = []
        self.forwarders: list[Forwarder] = []
        self.ws_servers: list[Proc] = []
        self.publishers: list[flow.Flow] = []

    def redis_server(self, start: bool = True, **options: Any) -> RedisServer:
        options.setdefault("name", f"redis{len(self.redis_servers)}")
        server = RedisServer(self.tmp_path, **options)
        self.redis_servers.append(server)
        return server.start() if start else server

    def forwarder(self, server: RedisServer, **options: Any) -> Forwarder:
        forwarder = Forwarder(server.port, **options)
        self.forwarders.append(forwarder)
        return forwarder

    def env(self, redis_url: str, **overrides: object) -> dict[str, str]:
        values: dict[str, object] = {
            "FLOW_ENGINE": "redis",
            "FLOW_REDIS_URL": redis_url,
            "FLOW_HISTORY_SIZE": 5000,  # every message of a test stays in the history stream
            "FLOW_PUSH_LINGER": 2,
            **overrides,
        }
        return base_env(self.tmp_path, **values)

    def ws_server(self, env: dict[str, str]) -> str:
        """A WebSocket server process on ``env``; its ws:// URL once it listens."""
        port = int(env["FLOW_WS_PORT"])
        proc = Proc([PYTHON, "websocket_server.py", "--port", str(port)], env,
                    self.tmp_path / f"websocket-{len(self.ws_servers)}.log")
        self.ws_servers.append(proc)
        wait_until(lambda: port_open(port) or not proc.alive(), 15, message="the WebSocket server listening")
        assert proc.alive(), proc.log()
        return f"ws://127.0.0.1:{port}/websocket"

    def publisher(self, env: dict[str, str], **kwargs: Any) -> flow.Flow:
        publisher = flow.Flow(settings=load_settings(env), **kwargs)
        self.publishers.append(publisher)
        return publisher

    def client(self, server: RedisServer) -> redis.Redis:
        return server.client()

    def close(self) -> None:
        steps: list[Callable[[], object]] = [
            *(publisher.close for publisher in self.publishers),
            *(proc.stop for proc in self.ws_servers),
            *(forwarder.close for forwarder in self.forwarders),
            *(server.close for server in self.redis_servers),
        ]
        errors = []
        for step in steps:
            try:
                step()
            except Exception as exc:  # end the rest all the same, then report
                errors.append(exc)
        if errors:
            raise errors[0]
        assert not any(server.alive() for server in self.redis_servers)
        assert not any(proc.alive() for proc in self.ws_servers)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    started = World(tmp_path)
    try:
        yield started
    finally:
        started.close()


def token(env: dict[str, str], username: str = "alice") -> str:
    return issue_token(load_settings(env), username)


def history(client: redis.Redis, user: str = "alice", prefix: str = "flow") -> list[tuple[int, dict[str, Any]]]:
    """The user's history stream as (seq from the entry id, browser frame)."""
    key = "*" if user == "*" else f"u:{user}"  # the engine's stream_key
    entries: Any = client.xrange(f"{prefix}:hist:{key}".encode())
    return [(int(entry_id.split(b"-")[0]), json.loads(fields[b"f"])) for entry_id, fields in entries]


def engine_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == ENGINE_LOGGER and r.levelno >= logging.WARNING]


def run_script(script: str, env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-W", "error", "-c", script, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- 1. queued while Redis is away


def test_pushes_while_redis_is_down_return_at_once_and_arrive_in_order_once_it_starts(world):
    # AOF with fsync always: the restarted redis-server keeps the stream's epoch, so the
    # socket opened before the outage is owed every push made during it.
    server = world.redis_server(persistence="aof")
    env = world.env(server.url)
    url = world.ws_server(env)
    count = 200

    async def run() -> None:
        ws, ok = await authenticate(url, token(env), max_queue=None)
        try:
            server.stop()
            publisher = world.publisher(env)
            slowest = 0.0
            started = time.monotonic()
            for i in range(count):
                before = time.monotonic()
                publisher.push("alice", "N", i)
                slowest = max(slowest, time.monotonic() - before)
            elapsed = time.monotonic() - started
            assert slowest < 0.1 and elapsed < 1.0, (slowest, elapsed)  # never waits on the network
            assert publisher.flush(0.2) == count  # nothing went anywhere
            server.start()
            assert await asyncio.to_thread(publisher.flush, DELIVERY) == 0
            got = await collect(ws, count, DELIVERY)
            assert [m["data"] for m in got] == list(range(count))
            assert [m["seq"] for m in got] == list(range(1, count + 1))
            assert {m["epoch"] for m in got} == {ok["epoch"]}
        finally:
            await ws.close()
        assert [seq for seq, _ in history(world.client(server))] == list(range(1, count + 1))

    asyncio.run(run())


def test_pushes_to_a_hung_redis_return_at_once_and_arrive_once_it_answers(world):
    # SIGSTOP: the kernel still accepts connections and requests, nothing answers; a push
    # that touched the network would wait for the 5 s command timeout.
    server = world.redis_server()
    env = world.env(server.url)
    url = world.ws_server(env)
    count = 100

    async def run() -> None:
        ws, _ = await authenticate(url, token(env))
        try:
            server.pause()
            try:
                publisher = world.publisher(env)
                started = time.monotonic()
                for i in range(count):
                    publisher.push("alice", "N", i)
                elapsed = time.monotonic() - started
                assert elapsed < 1.0, elapsed
                assert publisher.flush(0.2) == count
            finally:
                server.resume()
            assert await asyncio.to_thread(publisher.flush, DELIVERY) == 0
            got = await collect(ws, count, DELIVERY)
        finally:
            await ws.close()
        assert [(m["seq"], m["data"]) for m in got] == [(i + 1, i) for i in range(count)]

    asyncio.run(run())


def test_a_full_queue_raises_queue_full_without_the_password_and_loses_nothing_queued(world, caplog):
    caplog.set_level(logging.INFO)
    password = "s3cret-Pa55word"
    server = world.redis_server(start=False, password=password)
    env = world.env(server.url, FLOW_PUSH_QUEUE=5)
    publisher = world.publisher(env)
    sent = 0
    with pytest.raises(flow.QueueFull) as refused:
        for _ in range(100):
            publisher.push("alice", "N", sent)
            sent += 1
    assert sent == 5  # Redis confirmed nothing: the queue holds exactly FLOW_PUSH_QUEUE
    message = str(refused.value)
    assert "Redis" in message and "5 are queued" in message, message
    assert f"127.0.0.1:{server.port}" in message, message
    assert password not in message, message
    wait_until(lambda: engine_warnings(caplog), DELIVERY, message="a warning that Redis is away")
    assert not [r.getMessage() for r in caplog.records if password in r.getMessage()]
    with pytest.raises(flow.QueueFull):  # still full: refused again, nothing dropped to make room
        publisher.push("alice", "N", "refused")
    server.start()
    assert publisher.flush(DELIVERY) == 0
    publisher.push("alice", "N", 5)  # room again
    assert publisher.flush(DELIVERY) == 0
    assert [(seq, frame["data"]) for seq, frame in history(world.client(server))] == [
        (i + 1, i) for i in range(6)
    ]


# ---------------------------------------------------------------- 2. flush and exit


def test_flush_returns_0_only_once_redis_holds_everything(world):
    server = world.redis_server()
    publisher = world.publisher(world.env(server.url))
    client = world.client(server)
    for round_ in range(3):
        for i in range(300):  # more than one script call's batch
            publisher.push("alice", "N", [round_, i])
        assert publisher.flush(DELIVERY) == 0
        # Confirmed means Redis has it: the history stream holds it at once, no waiting.
        assert client.xlen(b"flow:hist:u:alice") == 300 * (round_ + 1)
    assert [frame["data"] for _, frame in history(client)] == [[r, i] for r in range(3) for i in range(300)]


def test_flush_counts_only_what_redis_has_not_confirmed(world):
    server = world.redis_server()
    publisher = world.publisher(world.env(server.url))
    for i in range(3):
        publisher.push("alice", "N", i)
    assert publisher.flush(DELIVERY) == 0
    server.stop()
    for i in range(3, 7):
        publisher.push("alice", "N", i)
    started = time.monotonic()
    assert publisher.flush(0.3) == 4  # the 3 confirmed earlier are not counted again
    assert time.monotonic() - started >= 0.3
    assert publisher.flush(0) == 4
    server.start()  # no persistence: the first three are gone with the old process
    assert publisher.flush(DELIVERY) == 0
    assert [frame["data"] for _, frame in history(world.client(server))] == [3, 4, 5, 6]


PUSH_AND_EXIT = """
import sys
import flow
for i in range(int(sys.argv[1])):
    flow.push("alice", "N", i)
flow.push_all("ALL", "bye")
"""


def test_a_script_that_exits_right_after_pushing_delivers_everything(world):
    server = world.redis_server()
    proc = run_script(PUSH_AND_EXIT, world.env(server.url), "500")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    client = world.client(server)
    # Flushed before the process ended: in Redis already when it has exited.
    assert [frame["data"] for _, frame in history(client)] == list(range(500))
    assert [frame["data"] for _, frame in history(client, "*")] == ["bye"]


def test_a_script_exiting_while_redis_is_down_reports_its_loss_once(world):
    password = "s3cret-Pa55word"
    server = world.redis_server(start=False, password=password)
    started = time.monotonic()
    proc = run_script(PUSH_AND_EXIT, world.env(server.url, FLOW_PUSH_LINGER="0.5"), "3")
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if REPORT in line]
    assert line.startswith("flow: 4 messages pushed by this process"), line
    assert "0.5s" in line and "Redis unreachable" in line and f"127.0.0.1:{server.port}" in line, line
    assert password not in proc.stderr, proc.stderr
    # Besides the report, at most the engine's one warning that Redis is away (logging's
    # last-resort handler prints it when the script configured no logging): no traceback,
    # no repeat.
    others = [other for other in proc.stderr.splitlines() if other != line]
    assert len(others) <= 1 and all(
        other.startswith(f"publishing to Redis at redis://:***@127.0.0.1:{server.port}/0 failed; retrying")
        for other in others
    ), proc.stderr
    assert elapsed < 15


def test_a_script_exiting_while_redis_hangs_ends_within_its_linger(world):
    # SIGSTOP: the publisher's call in flight would end only at the 5 s command timeout;
    # exit must not wait for it past FLOW_PUSH_LINGER (the loss is reported either way).
    server = world.redis_server()
    server.pause()
    try:
        started = time.monotonic()
        proc = run_script(PUSH_AND_EXIT, world.env(server.url, FLOW_PUSH_LINGER="0.5"), "3")
        elapsed = time.monotonic() - started
    finally:
        server.resume()
    assert proc.returncode == 0, proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if REPORT in line]
    assert line.startswith("flow: 4 messages pushed by this process"), line
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    # 0.5 s of linger, plus the interpreter's start (imports) and end.
    assert elapsed < 3.0, f"exit took {elapsed:.1f}s with FLOW_PUSH_LINGER=0.5"


DROPPED = """
import gc
import flow
def job():
    flow.Flow().push("alice", "N", 1)  # never closed, never kept
job()
gc.collect()
print("after", flush=True)
"""


def test_a_publisher_dropped_without_close_hands_its_pushes_over(world):
    server = world.redis_server()
    proc = run_script(DROPPED, world.env(server.url))
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout, proc.stderr) == ("after\n", "")
    assert [frame["data"] for _, frame in history(world.client(server))] == [1]


# ---------------------------------------------------------------- 3. threads and forks


def test_many_threads_pushing_at_once_deliver_each_message_once_in_thread_order(world):
    server = world.redis_server()
    env = world.env(server.url)
    url = world.ws_server(env)
    publisher = world.publisher(env)
    threads_, each = 8, 250

    async def run() -> None:
        ws, _ = await authenticate(url, token(env), max_queue=None)
        try:
            barrier = threading.Barrier(threads_)

            def work(t: int) -> None:
                barrier.wait(10)
                for i in range(each):
                    publisher.push("alice", "T", [t, i])

            workers = [threading.Thread(target=work, args=(t,)) for t in range(threads_)]
            for worker in workers:
                worker.start()
            for worker in workers:
                await asyncio.to_thread(worker.join, DELIVERY)
            assert not any(worker.is_alive() for worker in workers)
            got = await collect(ws, threads_ * each, DELIVERY)
        finally:
            await ws.close()
        assert [m["seq"] for m in got] == list(range(1, threads_ * each + 1))
        assert sorted(tuple(m["data"]) for m in got) == [(t, i) for t in range(threads_) for i in range(each)]
        for t in range(threads_):
            assert [m["data"][1] for m in got if m["data"][0] == t] == list(range(each))
        assert publisher.flush(DELIVERY) == 0
        assert world.client(server).xlen(b"flow:hist:u:alice") == threads_ * each

    asyncio.run(run())


# The parent's link is open and its pushes are in flight (held by the forwarder) or queued
# when it forks: the child must leave both alone and publish its own on a link of its own.
FORK_WHILE_IN_FLIGHT = """
import os, sys
import flow
def wait_for(word):
    line = sys.stdin.readline().strip()
    assert line == word, line
flow.push("alice", "PARENT", 0)
print("connected", flow.flush(10), flush=True)
wait_for("held")
for i in range(1, 6):
    flow.push("alice", "PARENT", i)
pid = os.fork()
if pid == 0:
    for i in range(3):
        flow.push("alice", "CHILD", i)
    flow.push_all("CHILD ALL", 0)
    print("child", flow.flush(10), flush=True)
    sys.exit(0)
_, status = os.waitpid(pid, 0)
print("child exited", os.waitstatus_to_exitcode(status), flush=True)
wait_for("released")
print("parent", flow.flush(10), flush=True)
flow.push("alice", "PARENT AGAIN", 6)
"""


def test_a_forked_child_publishes_its_own_pushes_and_never_the_parents(world):
    server = world.redis_server()
    env = world.env(server.url)
    url = world.ws_server(env)
    forwarder = world.forwarder(server)
    script_env = {**env, "FLOW_REDIS_URL": forwarder.url}

    async def run() -> None:
        ws, _ = await authenticate(url, token(env), max_queue=None)
        proc = subprocess.Popen([PYTHON, "-W", "error", "-c", FORK_WHILE_IN_FLIGHT], env=script_env, cwd=ROOT,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdin is not None and proc.stdout is not None
            stdout = proc.stdout

            async def line() -> str:
                return (await asyncio.wait_for(asyncio.to_thread(stdout.readline), DELIVERY)).strip()

            assert await line() == "connected 0"
            forwarder.hold()  # the parent's connection: requests kept back, socket open
            proc.stdin.write("held\n")
            proc.stdin.flush()
            assert await line() == "child 0"  # on its own connection, past the held one
            assert await line() == "child exited 0"
            forwarder.release()
            proc.stdin.write("released\n")
            proc.stdin.flush()
            assert await line() == "parent 0"
            out, err = await asyncio.to_thread(proc.communicate, timeout=DELIVERY)
            assert proc.returncode == 0, err
            assert err == "", err
            got = await collect(ws, 11, DELIVERY)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
            await ws.close()
        mine = [(m["id"], m["data"]) for m in got if m["username"] == "alice"]
        assert [d for i, d in mine if i.startswith("PARENT")] == list(range(7))
        assert [d for i, d in mine if i == "CHILD"] == [0, 1, 2]
        assert [(m["id"], m["username"]) for m in got if m["username"] == "*"] == [("CHILD ALL", "*")]
        assert [m["seq"] for m in got if m["username"] == "alice"] == list(range(1, 11))
        client = world.client(server)
        assert client.xlen(b"flow:hist:u:alice") == 10  # nothing of the parent's sent twice
        assert client.xlen(b"flow:hist:*") == 1

    asyncio.run(run())


IN_A_MULTIPROCESSING_CHILD = """
import multiprocessing
import flow
def work():
    flow.push("alice", "CHILD", 1)
    flow.push("alice", "CHILD", 2)
if __name__ == "__main__":
    multiprocessing.set_start_method("fork")
    flow.push("alice", "PARENT", 0)
    assert flow.flush(10) == 0          # the parent's link is open before the fork
    child = multiprocessing.Process(target=work)
    child.start()
    child.join(30)
    print("child", child.exitcode, flush=True)
    flow.push("alice", "PARENT", 3)
"""


def test_a_multiprocessing_fork_child_hands_its_pushes_over_before_it_ends(world):
    server = world.redis_server()
    env = world.env(server.url)
    url = world.ws_server(env)

    async def run() -> None:
        ws, _ = await authenticate(url, token(env))
        try:
            proc = await asyncio.to_thread(run_script, IN_A_MULTIPROCESSING_CHILD, env)
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.split() == ["child", "0"], proc.stdout + proc.stderr
            assert proc.stderr == "", proc.stderr
            got = await collect(ws, 4, DELIVERY)
        finally:
            await ws.close()
        assert [(m["id"], m["data"]) for m in got if m["id"] == "PARENT"] == [("PARENT", 0), ("PARENT", 3)]
        assert [m["data"] for m in got if m["id"] == "CHILD"] == [1, 2]
        assert [m["seq"] for m in got] == [1, 2, 3, 4]
        assert world.client(server).xlen(b"flow:hist:u:alice") == 4

    asyncio.run(run())


# ---------------------------------------------------------------- 4. a lost reply


@pytest.mark.parametrize("pushing", ["one first", "all at once"])
def test_a_publish_whose_reply_is_lost_is_resent_and_applied_once(world, caplog, pushing):
    caplog.set_level(logging.WARNING, logger=ENGINE_LOGGER)
    server = world.redis_server()
    env = world.env(server.url)
    url = world.ws_server(env)
    forwarder = world.forwarder(server, lose_first_script_reply=True)
    publisher = world.publisher({**env, "FLOW_REDIS_URL": forwarder.url})
    count = 600

    async def run() -> None:
        ws, _ = await authenticate(url, token(env), max_queue=None)
        try:
            if pushing == "one first":
                publisher.push("alice", "N", 0)
                # The lost call carried this one only; the resend carries more.
                await asyncio.to_thread(wait_until, lambda: forwarder.lost, DELIVERY, 0.005,
                                        "the forwarder to drop a script reply")
                assert forwarder.lost_pushes == 1
                for i in range(1, count):
                    publisher.push("alice", "N", i)
            else:
                # Queued while Redis does not answer: the lost call is a full batch.
                server.pause()
                try:
                    for i in range(count):
                        publisher.push("alice", "N", i)
                finally:
                    server.resume()
            assert await asyncio.to_thread(publisher.flush, DELIVERY) == 0
            if pushing != "one first":
                assert forwarder.lost_pushes > 100, forwarder.lost_pushes
            got = await collect(ws, count, DELIVERY)
        finally:
            await ws.close()
        assert [m["data"] for m in got] == list(range(count))
        assert [m["seq"] for m in got] == list(range(1, count + 1))
        assert world.client(server).xlen(b"flow:hist:u:alice") == count
        assert forwarder.lost == 1 and forwarder.accepted >= 2, (forwarder.lost, forwarder.accepted)
        # The engine saw the lost reply (redis-py did not retry the script by itself: a
        # retry would have hidden it) and said so once, without a traceback.
        warnings = [w.getMessage() for w in engine_warnings(caplog)]
        assert len(warnings) == 1 and "ConnectionError" in warnings[0], warnings
        assert engine_warnings(caplog)[0].exc_info is None

    asyncio.run(run())


# ---------------------------------------------------------------- 5. Redis refusing writes


def _refuse_writes(client: redis.Redis, refusal: str) -> None:
    if refusal == "out of memory":
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", "1")
    else:  # a replica of a primary that is not there: reads only, data kept
        client.replicaof("127.0.0.1", str(free_port()))


def _take_writes(client: redis.Redis, refusal: str) -> None:
    if refusal == "out of memory":
        client.config_set("maxmemory", "0")
    else:
        client.replicaof("NO", "ONE")


@pytest.mark.parametrize("refusal, says", [("out of memory", "maxmemory"), ("read-only replica", "read only")])
def test_pushes_redis_refuses_to_write_stay_queued_with_one_warning(world, caplog, refusal, says):
    caplog.set_level(logging.WARNING, logger=ENGINE_LOGGER)
    server = world.redis_server()
    env = world.env(server.url)
    url = world.ws_server(env)
    publisher = world.publisher(env)
    client = world.client(server)
    count = 50

    def rejected_scripts() -> int:
        stats = client.info("commandstats").get("cmdstat_evalsha", {})
        return int(stats.get("rejected_calls", 0))

    async def run() -> None:
        ws, _ = await authenticate(url, token(env), max_queue=None)
        try:
            publisher.push("alice", "N", 0)
            assert publisher.flush(DELIVERY) == 0  # connected, the script loaded
            assert (await collect(ws, 1))[0]["seq"] == 1
            _refuse_writes(client, refusal)
            for i in range(1, count + 1):
                publisher.push("alice", "N", i)
            # Refused again and again (the publisher retries), and still one warning.
            await asyncio.to_thread(wait_until, lambda: rejected_scripts() >= 4, DELIVERY, 0.02,
                                    "Redis to refuse several script calls")
            assert publisher.flush(0) == count
            assert client.xlen(b"flow:hist:u:alice") == 1
            warnings = engine_warnings(caplog)
            assert len(warnings) == 1, [w.getMessage() for w in warnings]
            assert says in warnings[0].getMessage(), warnings[0].getMessage()
            assert warnings[0].exc_info is None
            _take_writes(client, refusal)
            assert await asyncio.to_thread(publisher.flush, DELIVERY) == 0
            got = await collect(ws, count, DELIVERY)
        finally:
            await ws.close()
        assert [m["data"] for m in got] == list(range(1, count + 1))
        assert [m["seq"] for m in got] == list(range(2, count + 2))
        assert client.xlen(b"flow:hist:u:alice") == count + 1
        assert len(engine_warnings(caplog)) == 1  # coming back is not a warning

    asyncio.run(run())


# ---------------------------------------------------------------- backing off while Redis is away


@pytest.mark.parametrize("outage", ["down", "out of memory"])
def test_while_redis_is_away_pushes_do_not_turn_the_retries_into_a_busy_loop(world, outage):
    # Attempts are RECONNECT_FIRST (0.05 s) apart, doubling to RECONNECT_CAP (2 s): about 5
    # in the first second of an outage. A push made meanwhile must not cut the wait short
    # (at a steady rate of pushes that would be one attempt per push, or worse).
    server = world.redis_server(start=(outage != "down"))
    forwarder = world.forwarder(server)
    publisher = world.publisher(world.env(forwarder.url))
    client = world.client(server) if outage != "down" else None

    def attempts() -> int:
        if client is None:
            return forwarder.refused
        stats = client.info("commandstats").get("cmdstat_evalsha", {})
        return int(stats.get("rejected_calls", 0))

    if client is not None:
        publisher.push("alice", "N", -1)
        assert publisher.flush(DELIVERY) == 0
        client.config_set("maxmemory", "1")
    publisher.push("alice", "N", 0)
    wait_until(lambda: attempts() >= 1, DELIVERY, message="a first failed attempt")
    first = attempts()
    started = time.monotonic()
    for i in range(1, 51):  # a push every 20 ms for about a second (pacing, not waiting)
        publisher.push("alice", "N", i)
        time.sleep(0.02)
    made = attempts() - first
    seconds = time.monotonic() - started
    assert made <= 12, f"{made} attempts in {seconds:.1f}s of outage with 50 pushes"
    if client is not None:
        client.config_set("maxmemory", "0")
    else:
        server.start()
    assert publisher.flush(DELIVERY) == 0
    assert [frame["data"] for _, frame in history(world.client(server))][-51:] == list(range(51))
