"""Hostile input against the real WebSocket server (PROTOCOL.md section 3; COMMON rules on
bad input): unmasked frames, ping floods, deep JSON, clients that never answer a close,
and what the server says when its engine is away.

Some tests speak raw WebSocket over a plain TCP socket, since the `websockets` client
refuses to misbehave (it always masks, always answers a close).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import struct
import time
from typing import Any, Callable

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from pipeline import Pipeline, collect, recv_json, small_buffer_socket, opened, closed_with
from support import wait_until

RECONNECT_WITHIN = re.compile(r"reconnect_within=(\d+(?:\.\d+)?)")
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_TEXT, OP_CLOSE = 0x1, 0x8


# ---- a raw WebSocket client (RFC 6455), just enough to misbehave --------------------------


def encode_frame(opcode: int, payload: bytes, masked: bool = True) -> bytes:
    """One final client frame; ``masked=False`` breaks RFC 6455 section 5.1 on purpose."""
    length = len(payload)
    mask_bit = 0x80 if masked else 0
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, mask_bit | length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, mask_bit | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, mask_bit | 127, length)
    if not masked:
        return header + payload
    key = os.urandom(4)
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawClient:
    """A hand-made handshake on a small-buffer TCP socket, then frames by hand."""

    def __init__(self, url: str) -> None:
        self.sock = small_buffer_socket(url)
        self.buffer = b""
        host = "%s:%d" % self.sock.getpeername()
        key = base64.b64encode(os.urandom(16))
        request = (
            "GET /websocket HTTP/1.1\r\n"
            f"Host: {host}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            # The server's own origin: the default policy allows it (PROTOCOL.md section 3).
            f"Origin: http://{host}\r\n"
            "\r\n"
        )
        self.sock.sendall(request.encode())
        head = self._read_until(b"\r\n\r\n", time.monotonic() + 10)
        status = head.split(b"\r\n", 1)[0]
        assert b" 101 " in status, head
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        assert b"sec-websocket-accept: " + accept.lower() in head.lower(), head

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no data from the server in time")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("no data from the server in time") from None
        if not chunk:
            raise ConnectionError("the server closed the TCP connection")
        self.buffer += chunk

    def _read_until(self, marker: bytes, deadline: float) -> bytes:
        while marker not in self.buffer:
            self._fill(deadline)
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def _read_exact(self, n: int, deadline: float) -> bytes:
        while len(self.buffer) < n:
            self._fill(deadline)
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def read_frame(self, timeout: float = 10.0) -> tuple[int, bytes]:
        """(opcode, payload) of the next server frame (server frames are never masked)."""
        deadline = time.monotonic() + timeout
        first, second = self._read_exact(2, deadline)
        assert not second & 0x80, "a server frame was masked"
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._read_exact(2, deadline))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._read_exact(8, deadline))
        return first & 0x0F, self._read_exact(length, deadline)

    def read_json(self, timeout: float = 10.0) -> dict:
        """The next JSON text frame, skipping heartbeats."""
        while True:
            opcode, payload = self.read_frame(timeout)
            assert opcode == OP_TEXT, (opcode, payload)
            if payload != b"<3":
                return json.loads(payload)

    def read_close(self, timeout: float = 10.0) -> tuple[int, str]:
        """Read until the server's close frame; its (code, reason). Fails on anything else
        but heartbeats, so that an answer where a close was due shows in the failure."""
        while True:
            opcode, payload = self.read_frame(timeout)
            if opcode == OP_CLOSE:
                (code,) = struct.unpack("!H", payload[:2])
                return code, payload[2:].decode()
            assert (opcode, payload) == (OP_TEXT, b"<3"), f"expected a close frame, got {opcode:#x} {payload!r}"

    def send(self, opcode: int, payload: bytes, masked: bool = True) -> None:
        self.sock.sendall(encode_frame(opcode, payload, masked))

    def authenticate(self, token: str) -> dict:
        assert self.read_json() == {"id": "AUTH REQUEST"}
        self.send(OP_TEXT, token.encode())
        reply = self.read_json()
        assert reply["id"] == "AUTH OK", reply
        return reply

    def close(self) -> None:
        self.sock.close()


def warning_lines(log: str, needle: str) -> list[str]:
    return [line for line in log.splitlines() if " WARNING " in line and needle in line]


async def while_bob_is_served(pipe: Pipeline, misbehave: Callable[[], Any]) -> Any:
    """Run ``misbehave`` (blocking, raw sockets) while bob is connected; then bob still
    gets a push, and a new socket authenticates and is answered. What it returned."""
    async with opened(pipe.url(), pipe.token("bob")) as (bob, _):
        result = await asyncio.to_thread(misbehave)
        pipe.publisher().push("bob", "AFTER", 1)
        [message] = await collect(bob, 1)
        assert (message["id"], message["data"]) == ("AFTER", 1)
        async with opened(pipe.url(), pipe.token("carol")) as (carol, _):
            await carol.send('{"id": "PING"}')
            assert await recv_json(carol) == {"id": "PONG"}
    return result


# ---- 1. unmasked client frames ------------------------------------------------------------


@pytest.mark.parametrize("authenticated", [False, True], ids=["before-auth", "after-auth"])
def test_unmasked_client_frame_closes_1002_and_others_are_served(tmp_path, authenticated):
    # Old server: tornado took the unmasked frame as a PING and answered PONG; no close.
    # Later, a warning for every unmasked frame that came before the client's close answer.
    pipe = Pipeline(tmp_path, servers=1)
    try:
        def misbehave() -> tuple[int, str]:
            raw = RawClient(pipe.url())
            try:
                if authenticated:
                    raw.authenticate(pipe.token("mallory"))
                else:
                    assert raw.read_json() == {"id": "AUTH REQUEST"}
                # One unmasked frame, then many more before the close could be read:
                # one close, and one log line for them all.
                raw.sock.sendall(encode_frame(OP_TEXT, b'{"id": "PING"}', masked=False) * 500)
                return raw.read_close()
            finally:
                raw.close()

        # The server goes on: an open socket gets its messages, a new one authenticates.
        code, _ = asyncio.run(while_bob_is_served(pipe, misbehave))
        assert code == 1002
        if authenticated:
            wait_until(lambda: "mallory" not in pipe.stats(0)["streams"], 10, message="mallory's stream released")
        log = pipe.servers[0].log()
        unmasked = warning_lines(log, "unmasked")
        assert len(unmasked) == 1, unmasked
        assert "Traceback" not in log
    finally:
        pipe.stop()


# ---- 2. ping floods -----------------------------------------------------------------------


def test_ping_flood_closes_4029_while_another_user_is_served(tmp_path):
    # Old server: ping control frames cost nothing; the 5,000 pings all went through on an
    # open socket, so the flood ended without a close.
    pipe = Pipeline(tmp_path, servers=1, FLOW_RATE_LIMIT="20", FLOW_RATE_BURST="40")
    flood, batch = 5000, 50
    try:
        async def run() -> int:
            publisher = pipe.publisher()
            async with opened(pipe.url(), pipe.token("bob")) as (bob, _), \
                    opened(pipe.url(), pipe.token("flooder"), ping_interval=None) as (flooder, _):
                closed = asyncio.ensure_future(flooder.wait_closed())
                sent = pushed = 0
                try:
                    while sent < flood and not closed.done():
                        for _ in range(batch):
                            await flooder.ping()  # its pong is never awaited
                            sent += 1
                        for _ in range(20):
                            publisher.push("bob", "TICK", pushed)
                            pushed += 1
                        # Lets the client read what the server sent (a close), a moment at most.
                        await asyncio.wait([closed], timeout=0.05)
                except ConnectionClosed:
                    pass
                assert sent < flood, f"all {sent} pings went through and the socket is still open"
                await asyncio.wait_for(closed, 10)
                assert flooder.close_code == 4029, (flooder.close_code, flooder.close_reason)
                publisher.push("bob", "LAST", pushed)
                got = await collect(bob, pushed + 1)
                assert [m["data"] for m in got] == list(range(pushed + 1))
                assert [m["id"] for m in got] == ["TICK"] * pushed + ["LAST"]
                assert [m["seq"] for m in got] == list(range(got[0]["seq"], got[0]["seq"] + pushed + 1))
                # Exactly once: nothing follows the last one.
                await bob.send('{"id": "PING"}')
                assert await recv_json(bob) == {"id": "PONG"}
                return sent

        sent = asyncio.run(run())
        log = pipe.servers[0].log()
        assert len(warning_lines(log, "4029")) == 1, sent
        assert "Traceback" not in log
    finally:
        pipe.stop()


def raw_fragment(opcode: int, payload: bytes = b"") -> bytes:
    """A masked client frame without FIN: the first of a message, or a continuation (0)."""
    key = os.urandom(4)
    return struct.pack("!BB", opcode, 0x80 | len(payload)) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def test_endless_empty_fragments_close_4029_while_another_user_is_served(tmp_path):
    # Old server: tornado charges a message once it is complete, and one that never
    # completes cost nothing: 20,000 empty continuation frames and the socket stayed open.
    pipe = Pipeline(tmp_path, servers=1, FLOW_RATE_LIMIT="20", FLOW_RATE_BURST="40")
    try:
        def fragments() -> tuple[int, str]:
            raw = RawClient(pipe.url())
            try:
                raw.authenticate(pipe.token("mallory"))
                raw.sock.sendall(raw_fragment(OP_TEXT, b'{"id": '))
                for _ in range(40):  # 20,000 frames at most, in batches, until the server answers
                    raw.sock.sendall(raw_fragment(0) * 500)
                    raw.sock.settimeout(0.05)
                    try:
                        chunk = raw.sock.recv(65536)
                    except socket.timeout:
                        continue
                    finally:
                        raw.sock.settimeout(None)
                    raw.buffer += chunk
                    break
                return raw.read_close()
            finally:
                raw.close()

        assert asyncio.run(while_bob_is_served(pipe, fragments)) == (4029, "rate limit")
        log = pipe.servers[0].log()
        assert len(warning_lines(log, "4029")) == 1
        assert "Traceback" not in log
    finally:
        pipe.stop()


# ---- 3. deep JSON -------------------------------------------------------------------------

DEEP_FRAMES = {
    "deep-array": "[" * 5000 + "]" * 5000,
    "deep-object": '{"a":' * 5000 + "1" + "}" * 5000,
    "deep-auth-resume": '{"id": "AUTH", "token": "x.y.z", "resume": ' + '{"a":' * 5000 + "1" + "}" * 5000 + "}",
}


@pytest.mark.parametrize("frame", list(DEEP_FRAMES.values()), ids=list(DEEP_FRAMES))
def test_deeply_nested_frames_get_error_and_the_socket_stays_open(tmp_path, frame):
    # Old server: json.loads raised RecursionError out of on_message: a traceback in the
    # log, the connection aborted, no answer.
    pipe = Pipeline(tmp_path, servers=1)
    try:
        async def run():
            async with opened(pipe.url(), pipe.token("zed")) as (ws, _):
                await ws.send(frame)
                reply = await recv_json(ws)
                assert reply["id"] == "ERROR" and isinstance(reply["reason"], str) and reply["reason"], reply
                # Still open and served.
                await ws.send('{"id": "PING"}')
                assert await recv_json(ws) == {"id": "PONG"}
                pipe.publisher().push("zed", "STILL HERE", 1)
                [message] = await collect(ws, 1)
                assert message["id"] == "STILL HERE"

        asyncio.run(run())
        log = pipe.servers[0].log()
        assert "Traceback" not in log
        assert len(warning_lines(log, "(zed)")) == 1, log  # one warning for the one bad frame
    finally:
        pipe.stop()


# ---- 4 and 6. SIGTERM: bounded drain, and a reconnect window in every close ----------------

DRAINED = re.compile(r"drained (\d+) sockets: (\d+) answered the close, (\d+) did not and were cut")


def test_sigterm_cuts_sockets_that_never_answer_the_close(tmp_path):
    # Old server: no line saying how many were cut, and no bound of its own on the wait
    # (it exited when tornado's 5 s close timeout had aborted them).
    drain_timeout, margin = 1.0, 4.0
    pipe = Pipeline(tmp_path, servers=1, FLOW_DRAIN_TIMEOUT=str(drain_timeout))
    server = pipe.servers[0]
    silent: list[RawClient] = []

    def open_silent() -> None:
        # Two that never authenticate, one that does; then none of them reads or writes
        # again, so none answers the server's close frame.
        for _ in range(2):
            raw = RawClient(pipe.url())
            silent.append(raw)
            assert raw.read_json() == {"id": "AUTH REQUEST"}
        raw = RawClient(pipe.url())
        silent.append(raw)
        raw.authenticate(pipe.token("mute"))

    try:
        async def run():
            async with opened(pipe.url(), pipe.token("polite")) as (polite, _):
                await asyncio.to_thread(open_silent)
                assert pipe.stats(0)["sockets"] == 4
                server.signal(signal.SIGTERM)
                started = time.monotonic()
                # The polite client answers the close meanwhile: its loop runs during the wait.
                await asyncio.to_thread(wait_until, lambda: not server.alive(), drain_timeout + margin, 0.02,
                                        "server exit after SIGTERM")
                elapsed = time.monotonic() - started
                return elapsed, await closed_with(polite, 1)

        elapsed, closing = asyncio.run(run())
        assert closing.code == 1001
        assert server.popen.returncode == 0
        log = server.log()
        assert [m.groups() for m in DRAINED.finditer(log)] == [("4", "1", "3")], log
        assert "Traceback" not in log and "ZMQError" not in log, log
        assert elapsed >= drain_timeout * 0.9  # the silent ones were given the drain timeout
    finally:
        for raw in silent:
            raw.close()
        pipe.stop()


def test_sigterm_closes_1001_with_a_reconnect_window(tmp_path):
    # Old server: the reason was "server shutting down", with no reconnect_within=.
    pipe = Pipeline(tmp_path, servers=1)
    try:
        async def run():
            async with contextlib.AsyncExitStack() as stack:
                tabs = [(await stack.enter_async_context(opened(pipe.url(), pipe.token(user))))[0]
                        for user in ("ann", "ben", "ann")]
                waiting = await stack.enter_async_context(connect(pipe.url()))  # not authenticated yet
                assert await recv_json(waiting) == {"id": "AUTH REQUEST"}
                pipe.servers[0].signal(signal.SIGTERM)
                return [await closed_with(ws) for ws in [*tabs, waiting]]

        for close in asyncio.run(run()):
            assert close.code == 1001, close
            match = RECONNECT_WITHIN.search(close.reason)
            assert match, close.reason
            assert float(match.group(1)) >= 2.0, close.reason
        wait_until(lambda: not pipe.servers[0].alive(), 10, message="server exit")
        assert pipe.servers[0].popen.returncode == 0
        assert "Traceback" not in pipe.servers[0].log()
    finally:
        pipe.stop()


# ---- 5. the engine is away ----------------------------------------------------------------


def test_auth_without_the_engine_never_says_an_empty_epoch(tmp_path):
    # Old server: after waiting for a sync that never came it still said AUTH OK, with
    # "epoch": "" (and a client that kept it could never resume).
    pipe = Pipeline(tmp_path, servers=1)
    try:
        async def run():
            async with opened(pipe.url(), pipe.token("early")):
                pipe.proxy.stop()
                async with connect(pipe.url()) as ws:
                    assert await recv_json(ws) == {"id": "AUTH REQUEST"}
                    await ws.send(pipe.token("newcomer"))  # never subscribed before
                    try:
                        reply = await recv_json(ws, timeout=15)
                    except ConnectionClosed as closed:
                        assert closed.rcvd is not None, "dropped without a close frame"
                        assert closed.rcvd.code == 1013, closed.rcvd
                        match = RECONNECT_WITHIN.search(closed.rcvd.reason)
                        assert match and float(match.group(1)) > 0, closed.rcvd.reason
                        return
                    assert reply["id"] == "AUTH OK", reply
                    assert reply["epoch"], reply
                    assert set(reply["streams"]) == {"newcomer", "*"}, reply
                    assert all(position["epoch"] for position in reply["streams"].values()), reply

        asyncio.run(run())
        assert "Traceback" not in pipe.servers[0].log()
    finally:
        pipe.stop()


def test_sigterm_while_an_auth_waits_for_the_engine(tmp_path):
    # Not in the old server (it had no such path), a regression check for the new one:
    # SIGTERM while a socket's AUTH waits for the engine (stopped) to confirm its
    # subscription. Both sockets are closed, the server exits 0 within the drain bound, and
    # nothing is logged as our own bug.
    drain_timeout, margin = 1.0, 4.0
    pipe = Pipeline(tmp_path, servers=1, FLOW_DRAIN_TIMEOUT=str(drain_timeout))
    server = pipe.servers[0]
    try:
        async def run():
            async with opened(pipe.url(), pipe.token("early")) as (early, _):
                pipe.proxy.stop()
                async with connect(pipe.url()) as ws:
                    assert await recv_json(ws) == {"id": "AUTH REQUEST"}
                    await ws.send(pipe.token("waiter"))
                    await asyncio.to_thread(wait_until, lambda: "waiter" in pipe.stats(0)["streams"], 10, 0.02,
                                            "the server joining waiter")
                    server.signal(signal.SIGTERM)
                    await asyncio.to_thread(wait_until, lambda: not server.alive(), drain_timeout + margin, 0.02,
                                            "server exit after SIGTERM")
                    return await closed_with(ws, 1), await closed_with(early, 1)

        waiting, early = asyncio.run(run())
        assert early.code == 1001, early
        assert waiting.code in (1001, 1013), waiting
        assert server.popen.returncode == 0
        log = server.log()
        assert "Traceback" not in log and " ERROR " not in log, log
    finally:
        pipe.stop()


def test_auth_and_close_in_one_write_leave_nothing_behind(tmp_path):
    # Old server: on_close ran (tornado reads the close in the same turn) before the task
    # that joins the hub, and the join then kept the closed socket for good: counted in
    # "authenticated", its user's stream subscribed upstream, one more per such tab.
    pipe = Pipeline(tmp_path, servers=1)
    try:
        token = pipe.token("fleeting")
        for _ in range(30):
            raw = RawClient(pipe.url())
            raw.read_json()  # AUTH REQUEST
            raw.sock.sendall(encode_frame(OP_TEXT, token.encode()) + encode_frame(OP_CLOSE, struct.pack("!H", 1000)))
            raw.close()
        wait_until(lambda: pipe.stats(0)["sockets"] == 0, 10, 0.05, "every raw socket gone")

        async def run():
            # A socket opened after them is served; the counts are then its alone.
            async with opened(pipe.url(), pipe.token("steady")):
                stats = pipe.stats(0)
                assert stats["authenticated"] == 1, stats
                assert "fleeting" not in stats["streams"], stats

        asyncio.run(run())
        assert pipe.stats(0)["authenticated"] == 0
        assert "Traceback" not in pipe.servers[0].log()
    finally:
        pipe.stop()
