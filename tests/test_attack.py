"""Adversarial tests of channels, commands and the Redis engine on the real stack (real
proxy or redis-server, real WebSocket servers). A failing test here is a bug found by the
review of 2026-12-02 (see /work/notes/attack.md); a passing one is coverage the rest of the
suite lacks.

Races that depend on two client frames being read in one event-loop iteration use a raw
socket that writes them in one sendall: tornado then hands both to on_message before any
task spawned by the first one runs, which makes the race deterministic."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import time
from typing import Any

import pytest
import redis

from pipeline import Pipeline, opened, recv_json
from support import wait_until

CHANNEL_PREFIX = "\0"


# ---------------------------------------------------------------- a raw WebSocket client


class RawSocket:
    """A WebSocket client on a plain socket: several frames in one write, and frames read
    as they come (text, close)."""

    def __init__(self, port: int, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:  # before connect: the window is agreed at the handshake
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (f"GET /websocket HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            assert chunk, "handshake refused"
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        self.close_code: int | None = None

    @staticmethod
    def frame(payload: bytes, opcode: int = 1) -> bytes:
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            header = bytes((0x80 | opcode, 0x80 | length))
        elif length < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

    def send(self, *frames: Any, close: bool = False) -> None:
        """Every frame (a dict, or text) in one write; a close frame after them if asked."""
        wire = b"".join(self.frame((f if isinstance(f, str) else json.dumps(f)).encode()) for f in frames)
        if close:
            wire += self.frame(struct.pack("!H", 1000), opcode=8)
        self.sock.sendall(wire)

    def _read(self, n: int, deadline: float) -> bytes:
        while len(self.buffer) < n:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed without a close frame")
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def recv(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """The next JSON frame (heartbeats skipped); None after a close frame."""
        deadline = time.monotonic() + timeout
        while True:
            b0, b1 = self._read(2, deadline)
            length = b1 & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", self._read(2, deadline))
            elif length == 127:
                (length,) = struct.unpack("!Q", self._read(8, deadline))
            payload = self._read(length, deadline)
            opcode = b0 & 0x0F
            if opcode == 8:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                return None
            if opcode == 1 and payload != b"<3":
                return json.loads(payload)

    def until(self, done, timeout: float = 10.0) -> list[dict[str, Any]]:
        got = []
        deadline = time.monotonic() + timeout
        while True:
            frame = self.recv(max(0.01, deadline - time.monotonic()))
            if frame is None:
                return got
            got.append(frame)
            if done(frame):
                return got

    def close(self) -> None:
        self.sock.close()


def channel_streams(pipe: Pipeline, i: int = 0) -> list[str]:
    return [s[1:] for s in pipe.stats(i)["streams"] if s.startswith(CHANNEL_PREFIX)]


@pytest.fixture
def zpipe(tmp_path):
    pipeline = Pipeline(tmp_path, servers=1)
    yield pipeline
    pipeline.stop()


@pytest.fixture
def rpipe(tmp_path):
    pipeline = Pipeline(tmp_path, servers=1, engine="redis", FLOW_REDIS_PROBE="0.5")
    yield pipeline
    pipeline.stop()


def authed(pipe: Pipeline, user: str, *extra_frames: Any, channels: list[str] | None = None,
           rcvbuf: int | None = None, **auth: Any) -> RawSocket:
    raw = RawSocket(pipe.ports[0], rcvbuf)
    assert raw.recv() == {"id": "AUTH REQUEST"}
    token = pipe.token(user, extra={"channels": channels or []})
    raw.send({"id": "AUTH", "token": token, **auth}, *extra_frames)
    return raw


# ---------------------------------------------------------------- upstream leaks


def test_subscribe_then_unsubscribe_in_one_read_leaves_no_upstream_subscription(zpipe):
    """BUG: the SUBSCRIBE's task runs after the UNSUBSCRIBE dropped the ChannelSub, and
    hub.subscribe_channel attaches the dead sub anyway: the server holds the channel's
    upstream subscription (and the sub, and its session) until it restarts."""
    raw = authed(zpipe, "alice", channels=["room:*"])
    raw.until(lambda f: f["id"] == "AUTH OK")
    raw.send({"id": "SUBSCRIBE", "channel": "room:1"}, {"id": "UNSUBSCRIBE", "channel": "room:1"})
    assert raw.recv()["id"] == "UNSUBSCRIBE OK"
    raw.send({"id": "PING"})
    frames = raw.until(lambda f: f["id"] == "PONG")
    assert [f["id"] for f in frames] == ["PONG"], frames  # nothing of room:1 after UNSUBSCRIBE OK
    raw.close()
    wait_until(lambda: zpipe.stats(0)["authenticated"] == 0, 10, message="the socket gone")
    wait_until(lambda: channel_streams(zpipe) == [], 3, message=f"no channel stream left: {channel_streams(zpipe)}")


def test_a_socket_closed_right_after_subscribe_leaves_no_upstream_subscription(zpipe):
    """BUG: same cause, the commonest case (a tab closed while it subscribes)."""
    raw = authed(zpipe, "bob", channels=["room:*"])
    raw.until(lambda f: f["id"] == "AUTH OK")
    raw.send(*({"id": "SUBSCRIBE", "channel": f"room:{i}"} for i in range(5)), close=True)
    raw.until(lambda f: False)
    raw.close()
    wait_until(lambda: zpipe.stats(0)["sockets"] == 0, 10, message="the socket gone")
    wait_until(lambda: channel_streams(zpipe) == [], 3, message=f"no channel stream left: {channel_streams(zpipe)}")


def test_a_socket_closed_while_auth_subscribe_is_served_leaves_no_upstream_subscription(zpipe):
    """authenticate() decides every pending SUBSCRIBE at once (take_pending), then awaits
    them one by one; a socket that closes meanwhile must leave none of them attached
    upstream. (Found with refusals that spent the rate limit and closed the socket 4029;
    AUTH's own map no longer costs against it, so here the client closes.)"""
    subscribe = {f"room:{i}": {} for i in range(40)}
    raw = authed(zpipe, "carol", channels=["room:*"], subscribe=subscribe)
    raw.until(lambda f: f["id"] == "AUTH OK")
    raw.send(close=True)
    raw.close()
    wait_until(lambda: zpipe.stats(0)["sockets"] == 0, 10, message="the socket gone")
    wait_until(lambda: channel_streams(zpipe) == [], 3, message=f"no channel stream left: {channel_streams(zpipe)}")


def test_refusals_in_auths_subscribe_map_do_not_spend_the_rate_limit(zpipe):
    """A page sends its whole map again at every reconnect: a dozen channels it lost the
    grant to must not close it 4029 (and so again at every reconnect)."""
    subscribe = {f"other:{i}": {} for i in range(30)}
    subscribe["room:1"] = {}
    raw = authed(zpipe, "cy", channels=["room:*"], subscribe=subscribe)
    frames = raw.until(lambda f: f["id"] == "SUBSCRIBE OK")
    refused = [f for f in frames if f["id"] == "SUBSCRIBE FAILED"]
    assert len(refused) == 30 and all(f["reason"] == "forbidden" for f in refused)
    raw.send({"id": "PING"})
    assert raw.until(lambda f: f["id"] == "PONG")[-1] == {"id": "PONG"}
    assert raw.close_code is None
    raw.close()


# ---------------------------------------------------------------- UNSUBSCRIBE before AUTH OK


def test_unsubscribe_before_auth_ok_cancels_the_pending_subscribe(zpipe):
    """BUG: AUTH's `subscribe` entry waits in Session.pending; an UNSUBSCRIBE of it before
    AUTH OK is answered UNSUBSCRIBE OK at once and leaves it there, so SUBSCRIBE OK and the
    channel's messages follow the UNSUBSCRIBE OK (section 9: nothing of c follows it)."""
    # room:2 after it: the pending entries are served in order, so room:2's SUBSCRIBE OK
    # and message say that room:1's turn has passed.
    raw = authed(zpipe, "dan", {"id": "UNSUBSCRIBE", "channel": "room:1", "ref": "u"},
                 channels=["room:*"], subscribe={"room:1": {}, "room:2": {}})
    frames = raw.until(lambda f: f["id"] == "AUTH OK")
    assert any(f["id"] == "UNSUBSCRIBE OK" for f in frames), frames
    frames = raw.until(lambda f: f["id"] == "SUBSCRIBE OK" and f["channel"] == "room:2")
    publisher = zpipe.publisher()
    publisher.publish("room:1", "EDIT", 1)
    publisher.publish("room:2", "EDIT", 2)
    frames += raw.until(lambda f: f.get("channel") == "room:2" and f["id"] == "EDIT")
    raw.close()
    assert [f for f in frames if f.get("channel") == "room:1"] == [], frames


# ---------------------------------------------------------------- commands


def test_unsubscribe_command_reaches_a_subscription_while_its_history_is_served(tmp_path):
    """Passes: flow.unsubscribe while a `since` resume of 4 MB is paced by a client that
    does not read ends the subscription with UNSUBSCRIBED; nothing of the channel follows
    it, and the channel's upstream subscription goes."""
    pipe = Pipeline(tmp_path, servers=1, FLOW_HISTORY_SIZE="1000")
    try:
        publisher = pipe.publisher()
        publisher.publish("room:9", "FIRST", 1)
        raw = authed(pipe, "erin", channels=["room:*"], rcvbuf=4096)
        raw.until(lambda f: f["id"] == "AUTH OK")
        raw.send({"id": "SUBSCRIBE", "channel": "room:9"})
        first = raw.until(lambda f: f["id"] == "SUBSCRIBE OK")[-1]
        raw.send({"id": "UNSUBSCRIBE", "channel": "room:9"})
        raw.until(lambda f: f["id"] == "UNSUBSCRIBE OK")
        for i in range(500):
            publisher.publish("room:9", "EDIT", "x" * 8000)
        assert publisher.flush(10) == 0
        raw.send({"id": "SUBSCRIBE", "channel": "room:9", "since": {"seq": first["seq"], "epoch": first["epoch"]}})
        wait_until(lambda: "subscribed to 'room:9' (recovered=True" in pipe.logs(), 10, message="the resume")
        publisher.unsubscribe("erin", "room:9")
        wait_until(lambda: "unsubscribed from 'room:9': unsubscribed" in pipe.logs(), 10,
                   message="the command handled while the history is held up")
        frames = []
        try:
            frames = raw.until(lambda f: f["id"] == "UNSUBSCRIBED", timeout=20)
        except TimeoutError:
            pass
        assert frames and frames[-1]["id"] == "UNSUBSCRIBED", (
            f"{len(frames)} frames, then nothing for 20 s; the last: {frames[-1:]}")
        assert frames[-1]["reason"] == "unsubscribed" and frames[-1]["resubscribe"] is False
        assert len(frames) < 500, "the whole history went out before the command: no race tested"
        publisher.publish("room:9", "AFTER", 1)
        publisher.push("erin", "MARK", 1)
        after = raw.until(lambda f: f["id"] == "MARK")
        raw.close()
        assert [f for f in after if f.get("channel") == "room:9"] == [], after
        wait_until(lambda: channel_streams(pipe) == [], 5, message="the channel dropped upstream")
    finally:
        pipe.stop()


def test_garbage_commands_on_the_proxy_pull_socket_are_dropped_and_delivery_goes_on(zpipe):
    """Passes: raw X1 frames that break the format reach no server and stop nothing."""
    import zmq

    context = zmq.Context.instance()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(zpipe.settings.publish_endpoint)

    async def run() -> None:
        async with opened(zpipe.url(0), zpipe.token("frank")) as (ws, _):
            for raw in (b"X1\0", b"X1\0frank", b"X1\0frank\0", b"X1\0frank\0{\"op\":\"disconnect\"",
                        b"X1\0frank\0{\"op\":\"unsubscribe\",\"channel\":\"bad name\"}",
                        b"X1\0\0doc:1\0{\"op\":\"disconnect\"}", b"X1\0*\0{\"op\":\"disconnect\"}",
                        b"X1\0frank\0{\"op\":\"disconnect\",\"op\":[1]}", b"X1\0\xff\xfe\0{}",
                        b"X1\0frank\0" + b"{\"a\":" * 3000):
                push.send(raw)
            publisher = zpipe.publisher()
            publisher.push("frank", "STILL HERE", 1)
            frame = await recv_json(ws)
            assert frame["id"] == "STILL HERE", frame

    try:
        asyncio.run(run())
    finally:
        push.close()
    # The garbage came on a connection of its own: STILL HERE, on the publisher's, may
    # have been numbered before the proxy read it.
    wait_until(lambda: "dropped a malformed command" in zpipe.logs(), 10, 0.05, "the drops logged")
    assert "Traceback" not in zpipe.logs()


# ---------------------------------------------------------------- forged messages on Redis


def _forge(pipe: Pipeline, channel: bytes, stream_field: str, value: str, seq: int, epoch: str) -> None:
    frame = b'{"id":"FORGED",%s:%s,"data":1,"seq":%d,"epoch":"%s"}' % (
        json.dumps(stream_field).encode(), json.dumps(value).encode(), seq, epoch.encode())
    client = redis.Redis(unix_socket_path=str(pipe.redis_socket))
    try:
        assert client.publish(channel, b"%d %s " % (seq, epoch.encode()) + frame) >= 1
    finally:
        client.close()


def test_a_forged_broadcast_ahead_of_the_head_does_not_silence_broadcasts(rpipe):
    """BUG (severe): one PUBLISH on flow:msg:* with a seq far ahead makes the hub repair,
    find nothing in history, close every socket 1012 and set the broadcast stream's seq to
    the forged one (hub._repair's LookupError path takes max of what was held). The
    broadcast state is never dropped, so every later real broadcast (seq below) is taken for
    a copy and dropped: silently, on that server, until numbering catches up."""
    publisher = rpipe.publisher()

    async def run() -> None:
        async with opened(rpipe.url(0), rpipe.token("gina")) as (ws, ok):
            position = ok["streams"]["*"]
            _forge(rpipe, b"flow:msg:*", "username", "*", position["seq"] + 1000, position["epoch"])
            publisher.push("gina", "MARK", 1)
            try:
                while (await recv_json(ws, 10))["id"] != "MARK":
                    pass
            except Exception:
                pass  # closed (the bug's first symptom): checked below with a fresh socket
        async with opened(rpipe.url(0), rpipe.token("gina")) as (ws, ok):
            publisher.push_all("REAL BROADCAST", 1)
            try:
                frame = await recv_json(ws, 5)
            except TimeoutError:
                frame = None
            assert frame is not None and frame["id"] == "REAL BROADCAST", (
                f"no real broadcast; the server says broadcasts stand at {ok['streams']['*']}, "
                f"before the forgery at {position}")

    asyncio.run(run())


@pytest.mark.parametrize("kind", ["seq_ahead", "other_epoch"])
def test_a_forged_user_message_is_dropped_and_the_socket_stays(rpipe, kind):
    """BUG: a well-formed forged payload on flow:msg:u:<user> (seq ahead of the head, or
    an epoch Redis does not hold) closes every socket of the user with 1012 on every server;
    it should be dropped (one warning) and delivery go on."""
    publisher = rpipe.publisher()

    async def run() -> None:
        async with opened(rpipe.url(0), rpipe.token("hana")) as (ws, ok):
            position = ok["streams"]["hana"]
            seq, epoch = (position["seq"] + 50, position["epoch"]) if kind == "seq_ahead" else (1, "abcdef-1")
            _forge(rpipe, b"flow:msg:u:hana", "username", "hana", seq, epoch)
            publisher.push("hana", "MARK", 1)
            frame = await recv_json(ws, 10)
            assert frame["id"] == "MARK" and frame["seq"] == position["seq"] + 1, frame
            # The repair the forgery started must not end the socket a moment later.
            publisher.push("hana", "MARK2", 2)
            frame = await recv_json(ws, 10)
            assert frame["id"] == "MARK2" and frame["seq"] == position["seq"] + 2, frame
            await ws.send(json.dumps({"id": "PING"}))
            assert (await recv_json(ws, 10))["id"] == "PONG"

    asyncio.run(run())
