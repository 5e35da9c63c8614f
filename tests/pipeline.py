"""The real proxy and WebSocket servers on ephemeral ports, and a websockets client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import urllib.request
from pathlib import Path
from typing import Any, AsyncIterator

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

import flow
from flowcore.settings import load_settings
from flowcore.tokens import issue_token
from support import PYTHON, Proc, base_env, free_port, port_open, wait_until


# The ways a test can ask for an engine: Pipeline(tmp_path, engine=name), or the `engine`
# fixture (tests/conftest.py), which runs a test once per name.
ENGINES = ("zmq", "redis")


class Pipeline:
    """The engine's infrastructure and ``servers`` WebSocket servers, each on its own port.

    For the ZeroMQ engine (the default) the infrastructure is the proxy; for the Redis
    engine (``engine="redis"``) a redis-server without persistence on a unix socket in the
    test's directory, which the *_proxy methods stop, kill and start the same way: a
    kill -9 of either loses every message and number it held.

    ``redis_url`` (implies the Redis engine): a Redis the test runs itself (tests/redisserver.py,
    for its faults, persistence, ACL and TLS); the pipeline then starts none, ``proxy`` is None
    and the *_proxy methods are not to be used."""

    def __init__(self, tmp_path: Path, servers: int = 2, engine: str = "zmq", redis_url: str | None = None,
                 **overrides: object) -> None:
        self.tmp_path = tmp_path
        self.engine = "redis" if redis_url is not None else engine
        self.redis_socket = tmp_path / "redis.sock"
        if self.engine == "redis":
            url = redis_url if redis_url is not None else f"unix://{self.redis_socket}"
            overrides = {"FLOW_ENGINE": "redis", "FLOW_REDIS_URL": url, **overrides}
        self.env = base_env(tmp_path, **overrides)
        self.settings = load_settings(self.env)
        self.publishers: list[flow.Flow] = []
        self.proxy: Proc | None = self._start_proxy() if redis_url is None else None
        self.ports = [free_port() for _ in range(servers)]
        self.servers = [self._start_server(i) for i in range(servers)]
        for i in range(servers):
            self.wait_ready(i)

    def _start_proxy(self) -> Proc:
        if self.engine == "redis":
            proc = Proc(
                ["redis-server", "--port", "0", "--unixsocket", str(self.redis_socket),
                 "--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir", str(self.tmp_path)],
                self.env, self.tmp_path / "proxy.log",
            )
            wait_until(lambda: self.redis_socket.exists() or not proc.alive(), 15, message="redis-server")
            return proc
        return Proc([PYTHON, "message_proxy.py"], self.env, self.tmp_path / "proxy.log")

    def _start_server(self, i: int) -> Proc:
        return Proc(
            [PYTHON, "websocket_server.py", "--port", str(self.ports[i])],
            self.env,
            self.tmp_path / f"websocket-{i}.log",
        )

    def wait_ready(self, i: int) -> None:
        wait_until(lambda: port_open(self.ports[i]), 15, message=f"server {i} listening")

    def restart_proxy(self) -> None:
        """A graceful restart (SIGTERM): the proxy saves its state and the next one goes on."""
        self.stop_proxy()
        self.start_proxy()

    def stop_proxy(self) -> None:
        assert self.proxy is not None, "this pipeline runs on the test's own Redis (redis_url)"
        self.proxy.stop()

    def kill_proxy(self) -> None:
        """kill -9: its in-memory history and numbering are gone with it."""
        assert self.proxy is not None, "this pipeline runs on the test's own Redis (redis_url)"
        self.proxy.signal(signal.SIGKILL)
        self.proxy.stop()

    def start_proxy(self) -> None:
        self.proxy = self._start_proxy()

    def restart_server(self, i: int) -> None:
        self.servers[i].stop()
        self.servers[i] = self._start_server(i)
        self.wait_ready(i)

    def url(self, i: int = 0) -> str:
        return f"ws://127.0.0.1:{self.ports[i]}/websocket"

    def token(self, username: str, **kwargs: Any) -> str:
        return issue_token(self.settings, username, **kwargs)

    def publisher(self, **kwargs: Any) -> flow.Flow:
        publisher = flow.Flow(settings=self.settings, **kwargs)
        self.publishers.append(publisher)
        return publisher

    def stats(self, i: int) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[i]}/stats", timeout=5) as reply:
            return json.loads(reply.read())

    def logs(self) -> str:
        return "\n".join(p.log() for p in [self.proxy, *self.servers] if p is not None)

    def stop(self) -> list[int]:
        for publisher in self.publishers:
            publisher.close()
        codes = [server.stop() for server in self.servers]
        if self.proxy is not None:
            codes.append(self.proxy.stop())
        return codes


@contextlib.asynccontextmanager
async def opened(url: str, token: str, **connect_kwargs: Any) -> AsyncIterator[tuple[Any, dict[str, Any]]]:
    """An authenticated socket (raw token, as message_flow sends it), closed on the way out
    even when the test fails."""
    async with connect(url, **connect_kwargs) as ws:
        assert await asyncio.wait_for(recv_json(ws), 10) == {"id": "AUTH REQUEST"}
        await ws.send(token)
        ok = await asyncio.wait_for(recv_json(ws), 10)
        assert ok["id"] == "AUTH OK", ok
        yield ws, ok


async def closed_with(ws: ClientConnection, timeout: float = 15.0) -> Any:
    """Read until the server closes the socket; the close frame it sent (code, reason)."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except ConnectionClosed as closed:
        assert closed.rcvd is not None, "connection dropped without a close frame"
        return closed.rcvd


async def recv_json(ws: ClientConnection, timeout: float = 10.0) -> dict[str, Any]:
    """The next JSON frame, skipping heartbeats."""
    while True:
        raw = await asyncio.wait_for(ws.recv(), timeout)
        if raw != "<3":
            return json.loads(raw)


def small_buffer_socket(url: str) -> socket.socket:
    """A connected TCP socket with a tiny receive buffer: a client that stops reading
    then pushes back on the server at once, instead of after megabytes of kernel buffer."""
    host, port = url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    return sock


async def authenticate(
    url: str, token: str, resume: dict[str, Any] | None = None, **connect_kwargs: Any
) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(url, **connect_kwargs)
    first = await recv_json(ws)
    assert first == {"id": "AUTH REQUEST"}
    if resume is None:
        await ws.send(token)
    else:
        await ws.send(json.dumps({"id": "AUTH", "token": token, "resume": resume}))
    reply = await recv_json(ws)
    assert reply["id"] == "AUTH OK", reply
    return ws, reply


async def collect(ws: ClientConnection, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Exactly ``count`` pushed messages (heartbeats skipped), within ``timeout``."""
    out: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(out) < count:
        out.append(await recv_json(ws, max(0.01, deadline - loop.time())))
    return out
