"""Nothing lost: the faults production brings, through nginx, with the supervised stack.

Each test ends with every client holding every message exactly once, in order, or
(for a proxy restart, whose history is in memory) having been told recovered: false.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from resuming import ResumingClient
from support import PYTHON, ROOT
from flowcore.tokens import issue_token

pytestmark = pytest.mark.stack

STREAMER = """
import sys, time
import flow
users, per_user, pace = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
for i in range(per_user):
    for u in range(users):
        flow.push(f"user{u}", "MSG", i)
        time.sleep(pace)  # load pacing, so the fault lands mid-stream
for u in range(users):
    flow.push(f"user{u}", "END", None)
"""


async def wait_for(condition, timeout: float, message: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(0.02)


def clients_for(stack, users: int, **kwargs) -> list[ResumingClient]:
    return [
        ResumingClient(stack.ws_url, lambda u=u: issue_token(stack.settings, f"user{u}"),
                       origin=stack.base_url, **kwargs)
        for u in range(users)
    ]


def assert_exactly_once_in_order(clients: list[ResumingClient], per_user: int) -> None:
    for client in clients:
        assert client.ids("MSG") == list(range(per_user)), client.ledger
        assert client.ids("END") == [None]
        assert client.ledger.gaps == [] and client.ledger.duplicates == 0
        assert all(ok["recovered"] for ok in client.ledger.auth_oks[1:]), client.ledger.auth_oks


def streamer(stack, users: int, per_user: int, pace: float) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-c", STREAMER, str(users), str(per_user), str(pace)],
                            env=stack.env, cwd=ROOT)


def run_fault(stack, users: int, per_user: int, fault, pace: float = 0.0005,
              fault_after: int = 300) -> list[ResumingClient]:
    async def run():
        clients = clients_for(stack, users)
        for client in clients:
            client.start()
        await wait_for(lambda: all(c.authenticated.is_set() for c in clients), 30, "all authenticated")
        proc = streamer(stack, users, per_user, pace)
        total = lambda: sum(len(c.ledger.messages) for c in clients)  # noqa: E731
        await wait_for(lambda: total() >= fault_after, 60, f"{fault_after} deliveries")
        fault()
        await wait_for(lambda: all(c.ids("END") for c in clients), 90, "every END")
        assert await asyncio.get_running_loop().run_in_executor(None, proc.wait, 60) == 0
        for client in clients:
            await client.stop()
        return clients

    return asyncio.run(run())


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_websocket_server_stopped_mid_stream(make_stack, sig):
    """kill -9: clients see the connection drop; SIGTERM: the server drains with 1001.
    Either way its clients move to the rest of the pool and resume."""
    stack = make_stack(FLOW_WS_PROCESSES=2)
    victim = stack.pids("websocket")[0]
    clients = run_fault(stack, 100, 10, lambda: os.kill(victim, sig))
    assert_exactly_once_in_order(clients, 10)
    moved = [c for c in clients if c.ledger.connects > 1]
    assert moved, "no client was on the stopped server"
    assert all(c.ledger.auth_oks[-1]["recovered"] for c in moved)
    if sig == signal.SIGTERM:
        assert all(c.ledger.close_codes[0] == 1001 for c in moved)


def test_slow_consumer_closed_4008_comes_back_and_resumes(make_stack):
    COUNT = 800  # noqa: N806
    stack = make_stack(FLOW_SEND_BACKLOG="65536", FLOW_HISTORY_SIZE=str(COUNT + 10))

    async def run():
        pause = asyncio.Event()
        slow = ResumingClient(stack.ws_url, lambda: issue_token(stack.settings, "slow"),
                              origin=stack.base_url, pause=pause)
        slow.start()
        await wait_for(slow.authenticated.is_set, 30, "authenticated")
        publisher_env = dict(stack.env)
        pause.set()
        # Enough to fill every buffer between the server and the frozen tab: the kernel's
        # on both sides of nginx (autotuned to megabytes) and nginx's own.
        script = (
            "import flow\n"
            "for i in range(COUNT):\n"
            "    flow.push('slow', 'MSG', {'i': i, 'pad': 'p' * 32000})\n"
            "flow.push('slow', 'END', None)\n"
        ).replace("COUNT", str(COUNT))
        proc = subprocess.run([PYTHON, "-c", script], env=publisher_env, cwd=ROOT, timeout=60)
        assert proc.returncode == 0
        # The frozen tab cannot see the close frame behind its backlog: watch the server.
        logs = lambda: "".join(p.read_text() for p in stack.log_dir.glob("websocket*.log"))  # noqa: E731
        await wait_for(lambda: "closing 4008" in logs(), 60, "the server's 4008")
        pause.clear()
        await wait_for(lambda: slow.ledger.connects > 1, 60, "the reconnect")
        await wait_for(lambda: slow.ids("END"), 60, "END after resuming")
        await slow.stop()
        return slow

    slow = asyncio.run(run())
    assert 4008 in slow.ledger.close_codes
    assert [d["i"] for d in slow.ids("MSG")] == list(range(COUNT))
    assert slow.ledger.gaps == [] and slow.ledger.duplicates == 0
    assert slow.ledger.auth_oks[-1]["recovered"] is True


def test_proxy_restart_tells_every_client(make_stack):
    stack = make_stack()

    async def run():
        clients = clients_for(stack, 20)
        for client in clients:
            client.start()
        await wait_for(lambda: all(c.authenticated.is_set() for c in clients), 30, "all authenticated")
        proc = streamer(stack, 20, 5, 0)
        assert await asyncio.get_running_loop().run_in_executor(None, proc.wait, 60) == 0
        await wait_for(lambda: all(c.ids("END") for c in clients), 60, "every END")
        stack.ctl("restart", "proxy")
        # Every client is closed (1001) and comes back told recovered: false.
        await wait_for(lambda: all(len(c.ledger.auth_oks) >= 2 for c in clients), 60, "re-auth")
        proc = streamer(stack, 20, 3, 0)
        assert await asyncio.get_running_loop().run_in_executor(None, proc.wait, 60) == 0
        await wait_for(lambda: all(len(c.ids("END")) == 2 for c in clients), 60, "second END")
        for client in clients:
            await client.stop()
        return clients

    for client in asyncio.run(run()):
        assert 1001 in client.ledger.close_codes
        assert client.ledger.auth_oks[-1]["recovered"] is False
        assert client.ledger.gaps == [] and client.ledger.duplicates == 0
        assert client.ids("MSG") == [0, 1, 2, 3, 4, 0, 1, 2]


def test_app_workers_restarted_mid_stream(make_stack):
    """Pushes come from gunicorn's forked workers; reload and restart them mid-stream."""
    stack = make_stack()
    cookies = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPCookieProcessor(cookies))

    def call(path: str, form: dict | None = None) -> bytes:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        deadline = time.monotonic() + 30
        while True:  # bounded retries across the restart window (502 / refused)
            try:
                with opener.open(stack.base_url + path, data=data, timeout=10) as reply:
                    return reply.read()
            except (urllib.error.HTTPError, urllib.error.URLError, ConnectionError) as exc:
                if isinstance(exc, urllib.error.HTTPError) and exc.code not in (502, 503, 504):
                    raise
                if time.monotonic() > deadline:
                    raise

    call("/login", {"username": "worker-test"})

    async def run():
        loop = asyncio.get_running_loop()
        client = ResumingClient(stack.ws_url, lambda: call("/socket_auth_token").decode(),
                                origin=stack.base_url)
        client.start()
        await wait_for(client.authenticated.is_set, 30, "authenticated")

        async def send(n: int) -> None:
            reply = await loop.run_in_executor(None, call, "/send", {"message": f"m{n}"})
            assert json.loads(reply) == {"status": "OK", "data": f"m{n}"}

        for n in range(10):
            await send(n)
        master = stack.pids("app")[0]
        os.kill(master, signal.SIGHUP)  # gunicorn: new workers, old ones finish gracefully
        for n in range(10, 20):
            await send(n)
        await loop.run_in_executor(None, stack.ctl, "restart", "app")
        for n in range(20, 30):
            await send(n)
        await wait_for(lambda: len(client.ids("TASK DONE")) >= 30, 60, "30 TASK DONE")
        await client.stop()
        return client

    client = asyncio.run(run())
    assert sorted(client.ids("TASK DONE"), key=lambda m: int(m[1:])) == [f"m{n}" for n in range(30)]
    assert client.ledger.duplicates == 0 and client.ledger.gaps == []
