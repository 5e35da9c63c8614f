"""The Redis engine's faults (issue 12), with a real redis-server and real WebSocket servers.

Each test runs resuming clients (tests/resuming.py) for 16 users over two WebSocket servers,
moving to the other server at every reconnect, while one publisher pushes rounds: a message
on every active user's stream and a broadcast. Users 0, 4, 8 and 12 get broadcasts only, so
some clients hold no message on their own stream when a fault comes. A fault lands while
pushes flow, then END goes out on every stream and each test waits for it at every client.

Every test ends with each client holding every message of each of its streams exactly once,
in order, or, where the fault really loses messages, having been told ``recovered: false``
and then holding every message from its fresh position on; never a silent gap (a seq that
skips, or another epoch without being told). Redis runs from tests/redisserver.py: with or
without AOF, with an ACL user and TLS, or with a small pub/sub output-buffer limit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import pytest

from pipeline import Pipeline
from redisserver import RedisServer, make_redis  # noqa: F401  (make_redis is a fixture)
from resuming import ResumingClient
from support import PYTHON, ROOT

USERS = 16
QUIET = 4  # users 0, 4, 8, 12 get broadcasts only
ACTIVE = [u for u in range(USERS) if u % QUIET]
BROADCAST = "*"
# A short probe interval: a deaf or stopped link is noticed (and /readyz says so) in about
# 3 intervals plus a second.
PROBE = "0.2"

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# ------------------------------------------------------------------ the pieces


class RotatingClient(ResumingClient):
    """A resuming client that connects to the next server of the pool at each reconnect,
    as a load balancer may send it: resume works across servers."""

    def __init__(self, pipe: Pipeline, user: int) -> None:
        self.username = f"user{user}"
        self.urls = [pipe.url(i) for i in range(len(pipe.ports))]
        self.turn = user  # users start spread over the servers
        self.visits: list[int] = []  # the server of each session
        super().__init__(self.urls[self.turn % len(self.urls)], lambda: pipe.token(self.username))

    @property
    def server(self) -> int:
        """The server of the current (or last) session."""
        return self.urls.index(self.url)

    async def _session(self) -> None:
        self.url = self.urls[self.turn % len(self.urls)]
        self.turn += 1
        self.visits.append(self.server)
        await super()._session()

    def describe(self) -> str:
        """What a failed assertion needs to know about this client, in full."""
        ledger = self.ledger
        oks = [{k: ok.get(k) for k in ("recovered", "missed", "streams")} for ok in ledger.auth_oks]
        return (f"{self.username}: servers {self.visits}, close codes {ledger.close_codes}, AUTH OKs {oks}, "
                f"resynced at {ledger.resynced_at} of {len(ledger.messages)} messages, gaps {ledger.gaps}, "
                f"duplicates {ledger.duplicates}, problems {ledger.problems}")


class Pusher:
    """One publisher, and a record of what it pushed on each stream, in order."""

    def __init__(self, pipe: Pipeline) -> None:
        self.publisher = pipe.publisher()
        self.pushed: dict[str, list[tuple[str, Any]]] = collections.defaultdict(list)
        self.round = 0

    def push(self, stream: str, message_id: str, data: Any) -> None:
        if stream == BROADCAST:
            self.publisher.push_all(message_id, data)
        else:
            self.publisher.push(stream, message_id, data)
        self.pushed[stream].append((message_id, data))

    def one_round(self) -> None:
        i = self.round
        self.round += 1
        for user in ACTIVE:
            self.push(f"user{user}", "MSG", i)
        self.push(BROADCAST, "BCAST", i)

    async def rounds(self, count: int, pace: float = 0.005) -> None:
        for _ in range(count):
            self.one_round()
            await asyncio.sleep(pace)  # load pacing

    @contextlib.asynccontextmanager
    async def streaming(self, pace: float = 0.01, after: int = 30) -> AsyncIterator[None]:
        """Rounds every ``pace`` seconds while the body runs (the fault lands mid-stream),
        and ``after`` more once it is done."""
        done = asyncio.Event()

        async def stream() -> None:
            while not done.is_set():
                self.one_round()
                await asyncio.sleep(pace)  # load pacing
            await self.rounds(after, pace)

        task = asyncio.ensure_future(stream())
        try:
            yield
        finally:
            done.set()
            await task

    def end(self) -> None:
        for user in ACTIVE:
            self.push(f"user{user}", "END", None)
        self.push(BROADCAST, "END", None)

    def count(self) -> int:
        return sum(map(len, self.pushed.values()))


def held(client: RotatingClient, stream: str, start: int = 0, stop: int | None = None) -> list[tuple[str, Any]]:
    return [(m["id"], m["data"]) for m in client.ledger.messages[start:stop] if m["username"] == stream]


def streams_of(client: RotatingClient) -> tuple[str, str]:
    return client.username, BROADCAST


def holds_everything(client: RotatingClient, pusher: Pusher) -> bool:
    """The client holds the last message pushed on each of its streams."""
    for stream in streams_of(client):
        want = pusher.pushed.get(stream)
        if want:
            got = held(client, stream)
            if not got or got[-1] != want[-1]:
                return False
    return True


def assert_no_silent_gap(client: RotatingClient) -> None:
    ledger = client.ledger
    assert ledger.gaps == [] and ledger.duplicates == 0 and ledger.problems == [], client.describe()


def assert_exactly_once(clients: list[RotatingClient], pusher: Pusher) -> None:
    """Every message of every stream, once, in order, and nobody told recovered: false."""
    for client in clients:
        assert_no_silent_gap(client)
        assert client.ledger.resyncs == [], client.describe()
        for stream in streams_of(client):
            assert held(client, stream) == pusher.pushed.get(stream, []), f"{stream}: {client.describe()}"


def assert_exact_or_told(clients: list[RotatingClient], pusher: Pusher) -> None:
    """Between two resyncs (AUTH OK with recovered: false) a client holds a contiguous run
    of each stream, in order; it starts with the first message, and the last run ends with
    the last one. What is missing falls exactly where the client was told so."""
    for client in clients:
        assert_no_silent_gap(client)
        bounds = [0, *client.ledger.resynced_at, len(client.ledger.messages)]
        for stream in streams_of(client):
            want = pusher.pushed.get(stream, [])
            for n, (start, stop) in enumerate(zip(bounds, bounds[1:])):
                run = held(client, stream, start, stop)
                where = f"{stream}, run {n}: {client.describe()}"
                last_run = n == len(bounds) - 2
                if not run:
                    assert not (last_run and want), f"nothing after the last resync on {where}"
                    continue
                assert run[0] in want, f"{run[0]} never pushed on {where}"
                at = want.index(run[0])
                assert run == want[at:at + len(run)], f"not contiguous on {where}"
                if n == 0:
                    assert at == 0, f"the first run starts at {run[0]} on {where}"
                if last_run:
                    assert at + len(run) == len(want), f"the last run ends at {run[-1]} on {where}"


async def wait_for(condition: Callable[[], object], timeout: float, message: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(0.02)


async def wait_for_async(condition: Callable[[], Awaitable[bool]], timeout: float, message: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(0.05)


def http_status(port: int, path: str) -> int:
    try:
        with _OPENER.open(f"http://127.0.0.1:{port}{path}", timeout=3) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code


async def readyz(pipe: Pipeline, i: int) -> int:
    return await asyncio.get_running_loop().run_in_executor(None, http_status, pipe.ports[i], "/readyz")


async def start_clients(pipe: Pipeline) -> list[RotatingClient]:
    clients = [RotatingClient(pipe, user) for user in range(USERS)]
    for client in clients:
        client.start()
    try:
        await wait_for(lambda: all(c.authenticated.is_set() for c in clients), 30, "every client authenticated")
    except BaseException:
        await stop_clients(clients)
        raise
    assert {c.server for c in clients} == set(range(len(pipe.ports))), "clients on every server"
    return clients


async def stop_clients(clients: list[RotatingClient]) -> None:
    for client in clients:
        await client.stop()


def delivered(clients: list[RotatingClient]) -> int:
    return sum(len(c.ledger.messages) for c in clients)


async def finish(clients: list[RotatingClient], pusher: Pusher, timeout: float = 30) -> None:
    pusher.end()
    await wait_for(lambda: all(holds_everything(c, pusher) for c in clients), timeout, "END at every client")


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """A blocking step (a redis-server restart) off the loop: the clients keep reading."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def logs_of(pipe: Pipeline) -> str:
    return "\n".join(server.log() for server in pipe.servers)


@pytest.fixture
def pipelines(make_redis: Callable[..., RedisServer]) -> Iterator[Callable[..., Pipeline]]:
    """pipelines(tmp_path, redis_server, **overrides): two WebSocket servers on that Redis;
    stopped at teardown, before the fixture's redis-servers are."""
    made: list[Pipeline] = []

    def make(path: Path, server: RedisServer, servers: int = 2, **overrides: Any) -> Pipeline:
        overrides.setdefault("FLOW_REDIS_PROBE", PROBE)
        overrides.setdefault("FLOW_HISTORY_SIZE", "2000")
        pipe = Pipeline(path, servers=servers, redis_url=server.url, **overrides)
        made.append(pipe)
        return pipe

    yield make
    for pipe in made:
        pipe.stop()


# ------------------------------------------------------------------ the faults


def test_restart_without_persistence_tells_every_client(tmp_path, make_redis, pipelines):
    """redis-server without persistence restarted mid-stream: history and numbering are gone.
    Every stream gets a new epoch, every client is closed 1012 and told recovered: false, and
    what is pushed after that reaches every client exactly once, in order."""
    redis_server = make_redis(persistence="none")
    pipe = pipelines(tmp_path, redis_server)
    pusher = Pusher(pipe)

    async def run() -> list[RotatingClient]:
        clients = await start_clients(pipe)
        try:
            async with pusher.streaming():
                await wait_for(lambda: delivered(clients) >= 300, 20, "300 deliveries")
                await in_thread(redis_server.restart)
            await wait_for(lambda: all(c.resynced and c.authenticated.is_set() for c in clients), 30,
                           "every client told recovered: false")
            after = len(pusher.pushed[BROADCAST])
            await pusher.rounds(40)
            await finish(clients, pusher)
            # Live delivery goes on: everything after the resyncs, at every client.
            for client in clients:
                tail = pusher.pushed[BROADCAST][after:]
                assert held(client, BROADCAST)[-len(tail):] == tail, client.describe()
        finally:
            await stop_clients(clients)
        return clients

    clients = asyncio.run(run())
    assert_exact_or_told(clients, pusher)
    for client in clients:
        assert 1012 in client.ledger.close_codes, client.describe()
        epochs = {m["epoch"] for m in client.ledger.messages if m["username"] == BROADCAST}
        assert len(epochs) == 2, (epochs, client.describe())
    assert "Traceback" not in logs_of(pipe)


def test_restart_with_aof_keeps_epochs_and_history(tmp_path, make_redis, pipelines):
    """redis-server with appendonly yes and appendfsync always, restarted twice: mid-stream
    while a quarter of the clients are away, then while every client is away and nothing is
    pushed (a maintenance restart at night). Epochs stay, history survives, the clients that
    come back resume (on the other server) recovered: true, and nobody misses anything."""
    redis_server = make_redis(persistence="aof")
    pipe = pipelines(tmp_path, redis_server)
    pusher = Pusher(pipe)

    def only_broadcasts() -> bool:
        return all(pipe.stats(i)["streams"] == [BROADCAST] for i in range(2))

    async def run() -> list[RotatingClient]:
        clients = await start_clients(pipe)
        away = clients[::4]
        try:
            async with pusher.streaming(after=50):
                await wait_for(lambda: delivered(clients) >= 300, 20, "300 deliveries")
                for client in away:
                    await client.go_offline()
                await in_thread(redis_server.restart)
                pushed = pusher.round
                await wait_for(lambda: pusher.round >= pushed + 20, 20, "pushes after the restart")
                for client in away:
                    client.go_online()
            await wait_for(lambda: all(holds_everything(c, pusher) for c in clients), 20, "everything so far")

            # Everyone away, nothing pushed; the servers keep only the broadcast stream.
            for client in clients:
                await client.go_offline()
            await wait_for_async(lambda: in_thread(only_broadcasts), 10, "the users' streams dropped")
            oks = [len(c.ledger.auth_oks) for c in clients]
            await in_thread(redis_server.restart)
            for client in clients:
                client.go_online()
            await wait_for(lambda: all(len(c.ledger.auth_oks) > n and c.authenticated.is_set()
                                       for c, n in zip(clients, oks)), 20, "every client back")
            await pusher.rounds(20)
            await finish(clients, pusher)
        finally:
            await stop_clients(clients)
        return clients

    clients = asyncio.run(run())
    assert_exactly_once(clients, pusher)
    for client in clients:
        first = client.ledger.auth_oks[0]["streams"]
        for ok in client.ledger.auth_oks[1:]:
            assert ok["recovered"] is True, client.describe()
            assert {s: p["epoch"] for s, p in ok["streams"].items()} == {s: p["epoch"] for s, p in first.items()}, \
                client.describe()
        assert all(m["epoch"] == first[m["username"]]["epoch"] for m in client.ledger.messages), client.describe()
    for client in clients[::4]:
        assert client.ledger.auth_oks[1]["missed"] > 0, client.describe()


def test_redis_stopped_longer_than_the_probe(tmp_path, make_redis, pipelines, caplog):
    """SIGSTOP of redis-server for longer than the probe interval, and than the command
    timeout: /readyz on each server says 503 while it is stopped and 200 again after SIGCONT.
    Meanwhile both servers replace their deaf pub/sub links, and this process's publisher
    gives up on a publish Redis holds unread and sends it again: Redis runs both once it
    continues, and the second adds nothing (no duplicate). No silent gap after."""
    redis_server = make_redis()
    pipe = pipelines(tmp_path, redis_server)
    pusher = Pusher(pipe)

    def replaced(i: int) -> bool:
        return "carried no probe" in pipe.servers[i].log()

    async def run() -> list[RotatingClient]:
        clients = await start_clients(pipe)
        try:
            assert [await readyz(pipe, i) for i in range(2)] == [200, 200]
            async with pusher.streaming():
                await wait_for(lambda: delivered(clients) >= 300, 20, "300 deliveries")
                redis_server.pause()
                try:
                    for i in range(2):
                        await readyz_becomes(pipe, i, 503, 10)
                    await wait_for(lambda: all(replaced(i) for i in range(2)), 20, "both deaf links replaced")
                    await wait_for(lambda: "TimeoutError" in caplog.text, 20, "the publisher's timeout")
                    assert [await readyz(pipe, i) for i in range(2)] == [503, 503]
                finally:
                    redis_server.resume()
                for i in range(2):
                    await readyz_becomes(pipe, i, 200, 20)
            await finish(clients, pusher)
        finally:
            await stop_clients(clients)
        return clients

    clients = asyncio.run(run())
    assert_exact_or_told(clients, pusher)
    assert "Traceback" not in logs_of(pipe)


async def readyz_becomes(pipe: Pipeline, i: int, status: int, timeout: float) -> None:
    async def now() -> bool:
        return await readyz(pipe, i) == status

    await wait_for_async(now, timeout, f"/readyz {status} on server {i}")


def _back_count(pipe: Pipeline, i: int) -> int:
    """How many times server i's pub/sub link came back after failing."""
    return sum(1 for line in pipe.servers[i].log().splitlines()
               if "pub/sub link to Redis" in line and "is back" in line)


def test_client_kill_pubsub(tmp_path, make_redis, pipelines):
    """CLIENT KILL TYPE pubsub, twice, while pushes flow: both servers reconnect and repair
    from history what their links missed (or close with 1012); nothing is silent."""
    redis_server = make_redis()
    pipe = pipelines(tmp_path, redis_server)
    pusher = Pusher(pipe)
    admin = redis_server.client()

    async def run() -> list[RotatingClient]:
        clients = await start_clients(pipe)
        try:
            async with pusher.streaming():
                for kill in range(2):
                    await wait_for(lambda: delivered(clients) >= 300 * (kill + 1), 20, "deliveries")
                    killed = admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
                    assert killed >= 2, killed  # one pub/sub link per server
                    await wait_for(lambda: all(_back_count(pipe, i) > kill for i in range(2)), 20,
                                   "both servers' links back")
            await finish(clients, pusher)
        finally:
            await stop_clients(clients)
        return clients

    clients = asyncio.run(run())
    assert_exact_or_told(clients, pusher)
    assert "Traceback" not in logs_of(pipe)


def test_stalled_server_cut_by_the_pubsub_buffer_limit(tmp_path, make_redis, pipelines):
    """One WebSocket server stops reading (SIGSTOP) while big messages flow to its users:
    Redis cuts its pub/sub connection at the output-buffer limit. The other server's users
    keep receiving throughout; after SIGCONT the stalled server's users end with everything
    exactly once (repaired from history), or told recovered: false."""
    redis_server = make_redis(pubsub_buffer_limit="256kb 0 0")
    pipe = pipelines(tmp_path, redis_server, FLOW_HISTORY_SIZE="5000")
    pusher = Pusher(pipe)
    pad = "p" * 16000
    stalled = 1

    def cut() -> bool:
        return "overcoming of output buffer limits" in redis_server.log()

    async def run() -> list[RotatingClient]:
        clients = await start_clients(pipe)
        others = [c for c in clients if c.server != stalled]
        victims = [u for u in ACTIVE if clients[u].server == stalled]
        assert victims
        try:
            await pusher.rounds(20)
            pipe.servers[stalled].signal(signal.SIGSTOP)
            try:
                # Big messages for the stalled server's users, a megabyte at a time, until
                # Redis's output buffer for that link passes the limit (kernel buffers first).
                for _ in range(60):
                    for k in range(64):
                        pusher.push(f"user{victims[k % len(victims)]}", "PAD", {"n": pusher.count(), "pad": pad})
                    await pusher.rounds(2)
                    try:
                        await wait_for(cut, 0.5, "the cut")
                        break
                    except AssertionError:
                        continue
                assert cut(), redis_server.log_tail()
                await pusher.rounds(20)
                # Meanwhile the other server's users have everything pushed so far.
                await wait_for(lambda: all(holds_everything(c, pusher) for c in others), 20,
                               "the other server's users up to date while one server is stopped")
            finally:
                pipe.servers[stalled].signal(signal.SIGCONT)
            await pusher.rounds(50)
            await finish(clients, pusher, timeout=45)
        finally:
            await stop_clients(clients)
        return clients

    clients = asyncio.run(run())
    assert_exact_or_told(clients, pusher)
    log = pipe.servers[stalled].log()
    assert "pub/sub link to Redis" in log and "Traceback" not in log


def test_every_websocket_server_restarted_mid_stream(tmp_path, make_redis, pipelines):
    """Both WebSocket servers of the host stopped (SIGTERM: 1001) and started again while
    pushes flow: history is in Redis, so every client resumes recovered: true and misses
    nothing."""
    redis_server = make_redis()
    pipe = pipelines(tmp_path, redis_server)
    pusher = Pusher(pipe)

    def restart_all() -> None:
        for server in pipe.servers:
            server.stop()
        for i in range(len(pipe.servers)):
            pipe.servers[i] = pipe._start_server(i)
        for i in range(len(pipe.servers)):
            pipe.wait_ready(i)

    async def run() -> list[RotatingClient]:
        clients = await start_clients(pipe)
        try:
            async with pusher.streaming():
                await wait_for(lambda: delivered(clients) >= 300, 20, "300 deliveries")
                await in_thread(restart_all)
            await finish(clients, pusher)
        finally:
            await stop_clients(clients)
        return clients

    clients = asyncio.run(run())
    assert_exactly_once(clients, pusher)
    for client in clients:
        assert client.ledger.connects >= 2 and 1001 in client.ledger.close_codes, client.describe()
        assert all(ok["recovered"] for ok in client.ledger.auth_oks[1:]), client.describe()
    assert sum(ok["missed"] for c in clients for ok in c.ledger.auth_oks[1:]) > 0, "nothing was pushed while down"


def test_acl_user_and_tls(tmp_path, make_redis, pipelines):
    """An ACL user (the default user off) over TLS (rediss://...?ssl_ca_certs=...): a
    publisher in this process and one in another (the URL from FLOW_REDIS_URL) reach users on
    both servers. A server given a wrong password says so in one line, without a traceback,
    however often it retries, and its /readyz says 503."""
    redis_server = make_redis(username="flow", tls=True)
    assert redis_server.url.startswith("rediss://flow:")
    pipe = pipelines(tmp_path, redis_server)
    pusher = Pusher(pipe)

    async def run() -> list[RotatingClient]:
        clients = await start_clients(pipe)
        try:
            await pusher.rounds(30)
            script = "import flow\nfor i in range(10):\n    flow.push_all('OTHER', i)\n"
            proc = await in_thread(lambda: subprocess.run([PYTHON, "-c", script], env=pipe.env, cwd=ROOT,
                                                          timeout=30, capture_output=True, text=True))
            assert proc.returncode == 0, proc.stderr
            pusher.pushed[BROADCAST] += [("OTHER", i) for i in range(10)]
            await finish(clients, pusher)
        finally:
            await stop_clients(clients)
        return clients

    clients = asyncio.run(run())
    assert_exactly_once(clients, pusher)
    users = {entry.get("user") for entry in redis_server.client().client_list()}
    assert users == {"flow"}, users
    assert [http_status(port, "/readyz") for port in pipe.ports] == [200, 200]

    bad_url = redis_server.url.replace(f":{redis_server.password}@", ":wrong-password@")
    assert bad_url != redis_server.url
    wrong = Pipeline(tmp_path / "wrong", servers=1, redis_url=bad_url, FLOW_REDIS_PROBE=PROBE)
    try:
        admin = redis_server.client()

        def failed_auths() -> int:
            return sum(int(entry.get("count", 0)) for entry in admin.acl_log()
                       if entry.get("reason") == "auth" and entry.get("username") == "flow")

        before = failed_auths()
        deadline = time.monotonic() + 20
        while failed_auths() < before + 4:  # it retried at least four times
            assert time.monotonic() < deadline, "the server did not retry its connection"
            time.sleep(0.05)
        assert http_status(wrong.ports[0], "/readyz") == 503
        assert http_status(wrong.ports[0], "/healthz") == 200
        log = wrong.servers[0].log()
        lines = [line for line in log.splitlines() if "Redis" in line and ("WARNING" in line or "ERROR" in line)]
        assert len(lines) == 1, log
        assert "Traceback" not in log, log
        assert "wrong-password" not in log and redis_server.password not in log  # never the password
        assert "WRONGPASS" in lines[0] or "uthentication" in lines[0], lines[0]
    finally:
        wrong.stop()
