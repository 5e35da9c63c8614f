"""Nothing lost: the faults production brings, through nginx, with the supervised stack.

Every stream a client receives is checked, its own and the broadcasts, and some users
never get a message of their own (only broadcasts), so that a client holding no message
on one of its streams is always among those that resume. Each test ends with every client
holding every message of each of its streams exactly once, in order, or, where a restart
really loses history (kill -9 of the proxy), having been told recovered: false and having
seen no silent gap.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Callable

import pytest

import flow
from resuming import ResumingClient
from support import PYTHON, ROOT
from flowcore.tokens import issue_token

pytestmark = pytest.mark.stack

# Phase A: user messages only, round by round. Then it waits for a line on stdin (the test
# writes it once the fault is in), so that at the fault no client holds a broadcast
# position. Phase B: user messages with a broadcast after every `every`-th one. Then an
# END on every active user's stream and on the broadcast stream. Users whose number is a
# multiple of `quiet` get no message of their own, ever.
STREAMER = """
import sys, time
import flow
users, per_user, pace, quiet, split, every, gated = sys.argv[1:8]
users, per_user, split, every, quiet = int(users), int(per_user), int(split), int(every), int(quiet)
pace, prefix = float(pace), sys.argv[8]
active = [u for u in range(users) if u % quiet]
for i in range(split):
    for u in active:
        flow.push(f"user{u}", prefix + "MSG", i)
        time.sleep(pace)  # load pacing, so the fault lands mid-stream
if gated == "1":
    sys.stdin.readline()
k = 0
for i in range(split, per_user):
    for n, u in enumerate(active):
        flow.push(f"user{u}", prefix + "MSG", i)
        if n % every == 0:
            flow.push_all(prefix + "BCAST", k)
            k += 1
        time.sleep(pace)
for u in active:
    flow.push(f"user{u}", prefix + "END", None)
flow.push_all(prefix + "END", None)
"""


@dataclass(frozen=True)
class Load:
    users: int = 100
    per_user: int = 10
    split: int = 5  # rounds before broadcasts begin (and before the gate)
    every: int = 15  # a broadcast after every this many user messages, in phase B
    quiet: int = 4  # users 0, 4, 8, ... get broadcasts only
    pace: float = 0.0005
    prefix: str = ""

    def is_quiet(self, user: int) -> bool:
        return user % self.quiet == 0

    @property
    def active(self) -> int:
        return sum(1 for u in range(self.users) if not self.is_quiet(u))

    @property
    def broadcasts(self) -> int:
        return (self.per_user - self.split) * len(range(0, self.active, self.every))

    def args(self, gated: bool) -> list[str]:
        return [str(v) for v in (self.users, self.per_user, self.pace, self.quiet, self.split, self.every,
                                 int(gated), self.prefix)]


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


def user_of(client: ResumingClient) -> int:
    return int(client.ledger.auth_oks[0]["username"].removeprefix("user"))


def stream_ids(client: ResumingClient, stream: str, prefix: str = "") -> list[tuple[str, object]]:
    """(id, data) of the messages of one stream whose id starts with ``prefix``."""
    return [(m["id"], m["data"]) for m in client.ledger.messages
            if m["username"] == stream and m["id"].startswith(prefix)]


def expected(load: Load, user: int) -> dict[str, list[tuple[str, object]]]:
    p = load.prefix
    own = [] if load.is_quiet(user) else [(p + "MSG", i) for i in range(load.per_user)] + [(p + "END", None)]
    return {
        f"user{user}": own,
        "*": [(p + "BCAST", k) for k in range(load.broadcasts)] + [(p + "END", None)],
    }


def has_the_ends(client: ResumingClient, load: Load) -> bool:
    if not client.ledger.auth_oks:
        return False
    ends = {(m["username"], m["id"]) for m in client.ledger.messages if m["id"] == load.prefix + "END"}
    user = user_of(client)
    wanted = {("*", load.prefix + "END")} | (set() if load.is_quiet(user) else {(f"user{user}", load.prefix + "END")})
    return wanted <= ends


def assert_no_silent_gap(client: ResumingClient) -> None:
    ledger = client.ledger
    assert ledger.gaps == [] and ledger.duplicates == 0, ledger
    assert ledger.problems == [], ledger.problems


def assert_exactly_once_in_order(clients: list[ResumingClient], load: Load) -> None:
    for client in clients:
        assert_no_silent_gap(client)
        want = expected(load, user_of(client))
        for stream, ids in want.items():
            assert stream_ids(client, stream, load.prefix) == ids, (stream, client.ledger)
        assert client.ledger.resyncs == [], client.ledger.auth_oks


def streamer(stack, load: Load, gated: bool) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-c", STREAMER, *load.args(gated)], env=stack.env, cwd=ROOT,
                            stdin=subprocess.PIPE if gated else subprocess.DEVNULL)


def end(proc: subprocess.Popen) -> None:
    """Kill a streamer a failed test left running, and close its pipe."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if proc.stdin is not None and not proc.stdin.closed:
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass


async def start_clients(stack, load: Load) -> list[ResumingClient]:
    clients = clients_for(stack, load.users)
    for client in clients:
        client.start()
    await wait_for(lambda: all(c.authenticated.is_set() for c in clients), 30, "all authenticated")
    return clients


def run_fault(stack, load: Load, fault: Callable[[], object], fault_after: int = 200) -> list[ResumingClient]:
    """Stream ``load`` to every user; ``fault`` after ``fault_after`` deliveries (in phase A),
    then broadcasts begin; returns the clients once each holds its streams' ENDs."""
    async def run():
        loop = asyncio.get_running_loop()
        clients = await start_clients(stack, load)
        proc = streamer(stack, load, gated=True)
        try:
            total = lambda: sum(len(c.ledger.messages) for c in clients)  # noqa: E731
            await wait_for(lambda: total() >= fault_after, 60, f"{fault_after} deliveries")
            await loop.run_in_executor(None, fault)
            proc.stdin.write(b"go\n")
            proc.stdin.close()
            await wait_for(lambda: all(has_the_ends(c, load) for c in clients), 90, "every END")
            assert await loop.run_in_executor(None, proc.wait, 60) == 0
        finally:
            end(proc)
            for client in clients:
                await client.stop()
        return clients

    return asyncio.run(run())


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_websocket_server_stopped_mid_stream(make_stack, sig):
    """kill -9: clients see the connection drop; SIGTERM: the server drains with 1001.
    Either way its clients move to the rest of the pool and resume every stream, the ones
    that have no message on a stream yet (no broadcast has been sent; quiet users have
    none of their own) from the position AUTH OK gave them."""
    stack = make_stack(FLOW_WS_PROCESSES=2)
    victim = stack.pids("websocket")[0]
    load = Load()
    clients = run_fault(stack, load, lambda: os.kill(victim, sig))
    assert_exactly_once_in_order(clients, load)
    moved = [c for c in clients if c.ledger.connects > 1]
    assert moved, "no client was on the stopped server"
    assert any(load.is_quiet(user_of(c)) for c in moved), "no quiet user was on the stopped server"
    assert all(c.ledger.auth_oks[-1]["recovered"] for c in moved)
    if sig == signal.SIGTERM:
        assert all(c.ledger.close_codes[0] == 1001 for c in moved)


def test_slow_consumer_closed_4008_comes_back_and_resumes(make_stack):
    """Two frozen tabs: one receives its own messages and broadcasts, one only broadcasts.
    Each is closed 4008, comes back and resumes both of its streams."""
    COUNT = 800  # noqa: N806
    stack = make_stack(FLOW_SEND_BACKLOG="65536", FLOW_HISTORY_SIZE=str(COUNT + 10))

    async def run():
        pause = asyncio.Event()
        tabs = [ResumingClient(stack.ws_url, lambda u=u: issue_token(stack.settings, u),
                               origin=stack.base_url, pause=pause) for u in ("slow", "hush")]
        for tab in tabs:
            tab.start()
        await wait_for(lambda: all(t.authenticated.is_set() for t in tabs), 30, "authenticated")
        pause.set()
        # Enough to fill every buffer between the server and each frozen tab: the kernel's
        # on both sides of nginx (autotuned to megabytes) and nginx's own.
        script = (
            "import flow\n"
            "pad = 'p' * 32000\n"
            "for i in range(COUNT):\n"
            "    flow.push('slow', 'MSG', {'i': i, 'pad': pad})\n"
            "    flow.push_all('BCAST', {'i': i, 'pad': pad})\n"
            "flow.push('slow', 'END', None)\n"
            "flow.push_all('END', None)\n"
        ).replace("COUNT", str(COUNT))
        proc = subprocess.run([PYTHON, "-c", script], env=stack.env, cwd=ROOT, timeout=60)
        assert proc.returncode == 0

        # A frozen tab cannot see the close frame behind its backlog: watch the server.
        def closed_4008(name: str) -> bool:
            text = "".join(p.read_text() for p in stack.log_dir.glob("websocket*.log"))
            return any(f"({name}):" in line and "closing 4008" in line for line in text.splitlines())

        await wait_for(lambda: closed_4008("slow") and closed_4008("hush"), 60, "the server's 4008s")
        pause.clear()
        await wait_for(lambda: all(t.ledger.connects > 1 for t in tabs), 60, "the reconnects")
        slow = tabs[0]
        await wait_for(lambda: slow.ids("END", "slow") and all(t.ids("END", "*") for t in tabs), 60,
                       "END after resuming")
        for tab in tabs:
            await tab.stop()
        return tabs

    slow, hush = asyncio.run(run())
    for tab in (slow, hush):
        assert 4008 in tab.ledger.close_codes, tab.ledger.close_codes
        assert_no_silent_gap(tab)
        assert tab.ledger.resyncs == [] and tab.ledger.auth_oks[-1]["recovered"] is True
        assert [d["i"] for d in tab.ids("BCAST", "*")] == list(range(COUNT))
        assert tab.ids("END", "*") == [None]
    assert [d["i"] for d in slow.ids("MSG", "slow")] == list(range(COUNT))
    assert slow.ids("END", "slow") == [None]
    assert hush.ids("MSG") == []


def test_app_workers_restarted_mid_stream(make_stack):
    """Pushes come from gunicorn's forked workers; reload and restart them mid-stream.
    Broadcasts come in between, and a second user gets only those."""
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

    def csrf_token() -> str:
        # The demo's POSTs are CSRF-protected: a form post carries the page's token.
        match = re.search(rb'name="csrf-token" content="([^"]+)"', call("/"))
        assert match, "the page carries a CSRF token"
        return match.group(1).decode()

    call("/login", {"username": "worker-test", "csrf_token": csrf_token()})
    token = csrf_token()  # logging in starts a new session, with a new token
    broadcaster = flow.Flow(settings=stack.settings)

    async def run():
        loop = asyncio.get_running_loop()
        client = ResumingClient(stack.ws_url, lambda: call("/socket_auth_token").decode(),
                                origin=stack.base_url)
        watcher = ResumingClient(stack.ws_url, lambda: issue_token(stack.settings, "watcher"),
                                 origin=stack.base_url)
        for c in (client, watcher):
            c.start()
        await wait_for(lambda: client.authenticated.is_set() and watcher.authenticated.is_set(), 30,
                       "authenticated")

        async def send(n: int) -> None:
            reply = await loop.run_in_executor(None, call, "/send", {"message": f"m{n}", "csrf_token": token})
            assert json.loads(reply) == {"status": "OK", "data": f"m{n}"}
            broadcaster.push_all("BCAST", n)

        for n in range(10):
            await send(n)
        master = stack.pids("app")[0]
        os.kill(master, signal.SIGHUP)  # gunicorn: new workers, old ones finish gracefully
        for n in range(10, 20):
            await send(n)
        await loop.run_in_executor(None, stack.ctl, "restart", "app")
        for n in range(20, 30):
            await send(n)
        broadcaster.push_all("END", None)
        await wait_for(lambda: len(client.ids("TASK DONE")) >= 30 and client.ids("END", "*")
                       and watcher.ids("END", "*"), 60, "30 TASK DONE and both ENDs")
        for c in (client, watcher):
            await c.stop()
        return client, watcher

    try:
        client, watcher = asyncio.run(run())
    finally:
        broadcaster.close()
    assert sorted(client.ids("TASK DONE"), key=lambda m: int(m[1:])) == [f"m{n}" for n in range(30)]
    for c in (client, watcher):
        assert_no_silent_gap(c)
        assert c.ids("BCAST", "*") == list(range(30)) and c.ids("END", "*") == [None]
    assert [m for m in watcher.ledger.messages if m["username"] != "*"] == []


def test_proxy_graceful_restart_loses_nothing(make_stack):
    """supervisorctl restart (SIGTERM) while publishers are quiet (the streamer waits at its
    gate once phase A is out): the proxy keeps its numbering and history across the restart;
    what is pushed after it reaches the open sockets, nobody is closed. (A stop while pushes
    still flow starts new epochs instead: tests/test_proxy.py.)"""
    stack = make_stack()
    load = Load()
    clients = run_fault(stack, load, lambda: stack.ctl("restart", "proxy"),
                        fault_after=load.active * load.split)
    assert_exactly_once_in_order(clients, load)
    for client in clients:
        assert client.ledger.connects == 1 and client.ledger.close_codes == [], client.ledger
        first = client.ledger.auth_oks[0]["streams"]
        assert all(m["epoch"] == first[m["username"]]["epoch"] for m in client.ledger.messages)


def test_proxy_killed_tells_every_client(make_stack):
    """kill -9: the proxy's history and numbering are gone. Every client is closed 1012,
    told recovered: false on its resume, and sees no silent gap; what is pushed once the
    pool is on the new epochs arrives exactly once, in order."""
    stack = make_stack()
    load = Load(users=40)
    after = Load(users=40, per_user=4, split=0, every=10, prefix="N")

    async def run():
        loop = asyncio.get_running_loop()
        clients = await start_clients(stack, load)
        proc = streamer(stack, load, gated=True)
        try:
            total = lambda: sum(len(c.ledger.messages) for c in clients)  # noqa: E731
            await wait_for(lambda: total() >= 60, 60, "60 deliveries")
            os.kill(stack.pids("proxy")[0], signal.SIGKILL)
            proc.stdin.write(b"go\n")
            proc.stdin.close()
            # What was in the dead proxy is lost, END included: wait for the streamer to end.
            assert await loop.run_in_executor(None, proc.wait, 60) == 0

            def on_new_epochs(c: ResumingClient) -> bool:
                oks = c.ledger.auth_oks
                return (c.authenticated.is_set() and c.resynced
                        and oks[-1]["streams"]["*"]["epoch"] != oks[0]["streams"]["*"]["epoch"])

            await wait_for(lambda: all(on_new_epochs(c) for c in clients), 60, "every client on the new epochs")
            proc = streamer(stack, after, gated=False)
            await wait_for(lambda: all(has_the_ends(c, after) for c in clients), 60, "every NEND")
            assert await loop.run_in_executor(None, proc.wait, 60) == 0
        finally:
            end(proc)
            for client in clients:
                await client.stop()
        return clients

    for client in asyncio.run(run()):
        assert 1012 in client.ledger.close_codes, client.ledger.close_codes
        assert client.resynced and client.ledger.auth_oks[-1]["recovered"] is False
        assert_no_silent_gap(client)
        for stream, ids in expected(after, user_of(client)).items():
            assert stream_ids(client, stream, "N") == ids
        for stream in {m["username"] for m in client.ledger.messages}:
            before = [d for i, d in stream_ids(client, stream) if i in ("MSG", "BCAST")]
            assert before == sorted(set(before)), before  # what arrived, once and in order
