"""Two "hosts" on one Redis (issue 12, the first test of "Tests").

Each host is a complete supervised stack (tests/conftest.py's Stack: its own nginx, a pool
of two WebSocket servers, the demo app, its own ports, run and log directories) on
FLOW_ENGINE=redis. Both use the same FLOW_REDIS_URL, a real redis-server with a password
on loopback TCP (tests/redisserver.py), and the same JWT secret, as docs/scale-out.md
says a deployment must. Neither stack runs a proxy or a redis-server of its own.

- A browser on host A sees what host B's app pushes: Playwright logs in to host A's demo
  page; a plain HTTP client logs in to host B's app as the same user (cookie jar, the
  form's CSRF token) and submits the card check there; host B's background task pushes
  progress and the result, and host A's page shows them.
- Load: 200 users x 2 tabs (one through each host's nginx), 5,000 pushes from two
  publisher processes (one with each host's settings) plus broadcasts from both: every
  tab gets exactly its user's messages and every broadcast, each once, in each
  publisher's order, with seq rising by one per stream.

The hosts are module-scoped (one pair for both tests, started in parallel): a stack takes
seconds to start, and the file should stay well under two minutes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import html
import http.cookiejar
import json
import random
import re
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

import flow
from conftest import Stack, _require_nginx, _stop_all
from flowcore.redis_server import find_redis_server
from flowcore.tokens import issue_token
from pipeline import authenticate, recv_json
from redisserver import RedisServer
from support import ROOT

pytestmark = [pytest.mark.stack]

WS_PROCESSES = 2
START_TIMEOUT = 60.0  # two stacks start at once on a small machine

USERS = 200
PUSHES = 5_000  # user messages, over both publishers
BROADCASTS_EACH = 3  # push_all per publisher, spread through its pushes
CONNECT_AT_ONCE = 50  # handshakes in flight at a time
CONNECT_TIMEOUT = 60.0
DELIVERY_TIMEOUT = 60.0  # from the publishers' start to the last tab's last message
PUBLISH_TIMEOUT = 60.0

# A publisher process: the plan (JSON on stdin) pushed in order through flow.Flow with the
# settings of the environment it was given (its host's), flushed, then one JSON line.
PUBLISHER = """
import json, sys, time
import flow
plan = json.load(sys.stdin)
publisher = flow.Flow()
started = time.monotonic()
for target, data in plan:
    if target is None:
        publisher.push_all("LOAD ALL", data)
    else:
        publisher.push(target, "LOAD", data)
unsent = publisher.flush(60)
seconds = time.monotonic() - started
publisher.close()
print(json.dumps({"unsent": unsent, "seconds": seconds, "engine": publisher.settings.engine}))
"""


@dataclass
class Hosts:
    redis: RedisServer
    a: Stack
    b: Stack


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    """Two stacks on one password-protected redis-server, both started at once."""
    _require_nginx()
    if find_redis_server() is None:
        pytest.skip("optional dependency missing: redis-server (Debian: apt-get install redis-server)")
    root = tmp_path_factory.mktemp("hosts")
    with RedisServer(root, password=secrets.token_urlsafe(24)) as server:
        shared = {"FLOW_ENGINE": "redis", "FLOW_REDIS_URL": server.url,
                  "FLOW_SECRET": secrets.token_hex(32), "FLOW_WS_PROCESSES": WS_PROCESSES}
        stacks = []
        for name in ("a", "b"):
            (root / name).mkdir()
            stacks.append(Stack(root / name, dict(shared)))
        try:
            # Stack.start stops its own stack when it fails; the other is stopped below.
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                for started in [pool.submit(stack.start, START_TIMEOUT) for stack in stacks]:
                    started.result()
            yield Hosts(server, *stacks)
        finally:
            _stop_all(stacks)
        assert server.alive(), "redis-server died under the hosts:\n" + server.log_tail(40)
    assert not server.alive()


def test_two_hosts_share_one_redis_and_one_secret_and_nothing_else(hosts: Hosts) -> None:
    a, b = hosts.a, hosts.b
    for stack in (a, b):
        assert stack.settings.engine == "redis"
        # No proxy and no redis-server of its own: app, nginx and the pool only.
        assert sorted(name for name in stack.states() if not name.startswith("websocket:")) == [
            "app", "nginx"]
        assert len(stack.pids("websocket")) == WS_PROCESSES
    assert a.settings.redis_url == b.settings.redis_url == hosts.redis.url
    assert hosts.redis.password and f":{hosts.redis.password}@" in hosts.redis.url
    assert a.settings.secret == b.settings.secret
    assert a.http_port != b.http_port and a.run_dir != b.run_dir and a.log_dir != b.log_dir
    assert not set(a.pids("websocket")) & set(b.pids("websocket"))
    # Every WebSocket server of both hosts is connected to the one Redis, with its password.
    names = [client.get("name", "") for client in hosts.redis.client().client_list()]
    assert len(names) >= 2 * WS_PROCESSES, names


# --- a browser on host A, host B's app pushes ---------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
WAIT_MS = 30_000
# Never route loopback test traffic through an http_proxy from the environment.
NO_PROXY = urllib.request.ProxyHandler({})


@pytest.fixture
def browser() -> Iterator[Any]:
    playwright_sync = pytest.importorskip(
        "playwright.sync_api", reason="optional dependency missing: playwright (pip)")
    if not CHROMIUM.exists():
        pytest.skip("optional dependency missing: chromium (Debian: apt-get install chromium)")
    with playwright_sync.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        yield chromium
        chromium.close()


class AppClient:
    """A requests-like HTTP client of one host's demo app: a cookie jar, and the CSRF token
    of the last page it read (Flask-WTF refuses a POST without the session's token)."""

    CSRF_INPUT = re.compile(r'<input type="hidden" name="csrf_token" value="([^"]+)"')

    def __init__(self, stack: Stack) -> None:
        self.base_url = stack.base_url
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(NO_PROXY, urllib.request.HTTPCookieProcessor(self.jar))
        self.csrf = ""

    def request(self, path: str, form: dict[str, str] | None = None,
                accept: str = "text/html") -> tuple[int, str]:
        data = None if form is None else urllib.parse.urlencode(form).encode()
        request = urllib.request.Request(self.base_url + path, data=data, headers={"Accept": accept})
        try:
            with self.opener.open(request, timeout=10) as response:
                status, body = response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:
                status, body = exc.code, exc.read().decode()
        found = self.CSRF_INPUT.search(body)
        if found:
            self.csrf = html.unescape(found.group(1))
        return status, body

    def log_in(self, username: str) -> None:
        status, body = self.request("/")
        assert status == 200 and 'id="login"' in body and self.csrf, body
        # The login redirects to the page, which the opener follows (with the new cookie).
        status, body = self.request("/login", {"csrf_token": self.csrf, "username": username})
        assert status == 200 and f'<strong id="user">{username}</strong>' in body, body

    def check_card(self, number: str) -> dict[str, Any]:
        status, body = self.request("/cards/check", {"csrf_token": self.csrf, "number": number},
                                    accept="application/json")
        assert status == 200, body
        return json.loads(body)


@pytest.mark.browser
def test_a_browser_on_host_a_shows_what_host_b_app_pushes(hosts: Hosts, browser: Any) -> None:
    from playwright.sync_api import expect

    a, b = hosts.a, hosts.b
    page = browser.new_page()
    page.goto(a.base_url + "/")
    page.fill("#username", "crosshost")
    page.click("button[type=submit]")
    expect(page.locator("#user")).to_have_text("crosshost", timeout=WAIT_MS)
    expect(page.locator("#authenticated")).to_have_text("Yes", timeout=WAIT_MS)
    assert page.url.startswith(a.base_url)

    # Host B's app, the same user name, its own session: the browser never talks to B.
    client = AppClient(b)
    client.log_in("crosshost")
    assert client.check_card("4111 1111 1111 1111") == {"status": "OK", "data": {"card": "••••••••••••1111"}}

    # Host B's background task pushes three progress steps and the result (one a second).
    expect(page.locator("#card-result")).to_have_text("••••••••••••1111: valid (Visa)", timeout=WAIT_MS)
    assert page.locator("#card-progress").evaluate("progress => progress.value") == 100
    expect(page.locator("#messages li")).to_have_text([
        'CARD RESULT: {"card":"••••••••••••1111","valid":true,"brand":"Visa"}',
        'CARD PROGRESS: {"card":"••••••••••••1111","percent":75}',
        'CARD PROGRESS: {"card":"••••••••••••1111","percent":50}',
        'CARD PROGRESS: {"card":"••••••••••••1111","percent":25}',
    ])
    assert page.locator("#resync").is_hidden() and page.locator("#error").is_hidden()
    # It was host B's app that did the work: host A's app never saw the card check.
    assert "/cards/check" in app_access_log(b)
    assert "/cards/check" not in app_access_log(a)
    page.close()


def app_access_log(stack: Stack) -> str:
    return "".join(path.read_text(errors="replace") for path in sorted(stack.log_dir.glob("*.log"))
                   if path.name.startswith(("app", "nginx")))


# --- 200 users x 2 tabs over both hosts, 5,000 pushes from both ---------------------------


@dataclass
class Tab:
    user: str
    host: str
    ws: Any
    start: dict[str, tuple[int, str]]  # stream -> (seq, epoch) from AUTH OK
    frames: list[dict[str, Any]]


def plan_for(publisher: str, users: list[str], pushes: int) -> list[tuple[str | None, Any]]:
    """One publisher's pushes in order: (user, data) and (None, data) for a broadcast.
    Users are drawn at random (seeded) from all of them; data says who sent it and its
    place among that publisher's messages to that user (or broadcasts)."""
    rng = random.Random(f"flow-hosts-{publisher}")
    sent: dict[str, int] = {}
    plan: list[tuple[str | None, Any]] = []
    broadcast_at = {pushes * (i + 1) // (BROADCASTS_EACH + 1) for i in range(BROADCASTS_EACH)}
    for k in range(pushes):
        if k in broadcast_at:
            plan.append((None, {"p": publisher, "b": len(plan) - k}))
        user = rng.choice(users)
        plan.append((user, {"p": publisher, "u": user, "n": sent.get(user, 0)}))
        sent[user] = sent.get(user, 0) + 1
    return plan


async def open_tabs(hosts: Hosts, users: list[str]) -> list[Tab]:
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)

    async def open_tab(user: str, host: str, stack: Stack) -> Tab:
        async with gate:
            ws, ok = await authenticate(stack.ws_url, issue_token(stack.settings, user),
                                        proxy=None, open_timeout=20, max_queue=None)
        assert ok["username"] == user and not ok["recovered"], ok
        start = {name: (position["seq"], position["epoch"]) for name, position in ok["streams"].items()}
        assert set(start) == {user, "*"}, ok
        return Tab(user, host, ws, start, [])

    opening = [open_tab(user, host, stack) for user in users
               for host, stack in (("A", hosts.a), ("B", hosts.b))]
    results = await asyncio.wait_for(asyncio.gather(*opening, return_exceptions=True), CONNECT_TIMEOUT)
    tabs = [tab for tab in results if isinstance(tab, Tab)]
    errors = [error for error in results if not isinstance(error, Tab)]
    if errors:
        await asyncio.gather(*(tab.ws.close() for tab in tabs), return_exceptions=True)
        raise AssertionError(f"{len(errors)} of {len(opening)} tabs did not open: {errors[:3]!r}")
    return tabs


async def read_until(tab: Tab, count: int, deadline: float) -> None:
    """Every pushed frame of the tab until it holds ``count`` of them."""
    loop = asyncio.get_running_loop()
    while len(tab.frames) < count:
        frame = await recv_json(tab.ws, max(0.01, deadline - loop.time()))
        if isinstance(frame.get("seq"), int):
            tab.frames.append(frame)


async def extra_frames(tab: Tab) -> list[dict[str, Any]]:
    """Pushed frames that arrive before the answer to a PING sent now: what the server
    still had for the tab after its expected messages (duplicates, strays)."""
    await tab.ws.send(json.dumps({"id": "PING"}))
    extra: list[dict[str, Any]] = []
    while True:
        frame = await recv_json(tab.ws, 10)
        if frame.get("id") == "PONG":
            return extra
        if isinstance(frame.get("seq"), int):
            extra.append(frame)


async def run_publisher(stack: Stack, plan: list[tuple[str | None, Any]]) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PUBLISHER, env=stack.env, cwd=ROOT,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(json.dumps(plan).encode()), PUBLISH_TIMEOUT)
    except BaseException:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, err.decode()
    report = json.loads(out.decode().strip().splitlines()[-1])
    assert report["unsent"] == 0 and report["engine"] == "redis", report
    return report


def problems_of(tab: Tab, expected: dict[str, list[Any]], broadcasts: list[Any],
                extra: list[dict[str, Any]]) -> list[str]:
    """What is wrong with one tab's frames; [] when exact, ordered and isolated."""
    where = f"{tab.user} on host {tab.host}"
    problems = [f"{where}: extra after the last message: {frame}" for frame in extra]
    mine = [frame for frame in tab.frames if frame["username"] == tab.user]
    everyone = [frame for frame in tab.frames if frame["username"] == "*"]
    strays = [frame for frame in tab.frames if frame["username"] not in (tab.user, "*")]
    problems += [f"{where}: another user's message: {frame}" for frame in strays[:3]]
    for stream, frames in ((tab.user, mine), ("*", everyone)):
        seq, epoch = tab.start[stream]
        if [frame["seq"] for frame in frames] != list(range(seq + 1, seq + 1 + len(frames))):
            problems.append(f"{where}: seq of {stream!r} not rising by one from {seq}: "
                            f"{[frame['seq'] for frame in frames]}")
        if {frame["epoch"] for frame in frames} - {epoch}:
            problems.append(f"{where}: epoch of {stream!r} changed from {epoch}")
    for publisher in ("A", "B"):
        got = [frame["data"] for frame in mine if frame["id"] == "LOAD" and frame["data"]["p"] == publisher]
        if got != expected[publisher]:
            problems.append(f"{where}: from publisher {publisher} expected n=0..{len(expected[publisher]) - 1}"
                            f" in order, got {[data.get('n') for data in got]}")
        got_all = [frame["data"] for frame in everyone if frame["data"]["p"] == publisher]
        wanted_all = [data for data in broadcasts if data["p"] == publisher]
        if got_all != wanted_all or any(frame["id"] != "LOAD ALL" for frame in everyone):
            problems.append(f"{where}: broadcasts of {publisher}: expected {wanted_all}, got {got_all}")
    return problems


def test_200_users_2_tabs_5000_pushes_over_two_hosts_exact_ordered_isolated(hosts: Hosts) -> None:
    users = [f"load-{i:03d}" for i in range(USERS)]
    plans = {"A": plan_for("A", users, PUSHES // 2), "B": plan_for("B", users, PUSHES - PUSHES // 2)}
    expected = {user: {p: [data for target, data in plan if target == user] for p, plan in plans.items()}
                for user in users}
    broadcasts = [data for plan in plans.values() for target, data in plan if target is None]
    assert sum(len(v) for per in expected.values() for v in per.values()) == PUSHES
    assert len(broadcasts) == 2 * BROADCASTS_EACH
    assert all(per["A"] and per["B"] for per in expected.values())  # every user hears both

    async def scenario() -> tuple[list[Tab], dict[str, float], dict[str, Any]]:
        loop = asyncio.get_running_loop()
        began = loop.time()
        tabs = await open_tabs(hosts, users)
        timings = {"connect": loop.time() - began}
        try:
            # Each user has one socket on each host: one subscription per host, on the one Redis.
            numsub = dict(hosts.redis.client().pubsub_numsub(*[f"flow:msg:u:{user}" for user in users[:5]]))
            started = loop.time()
            deadline = started + DELIVERY_TIMEOUT
            readers = [asyncio.create_task(read_until(
                tab, len(expected[tab.user]["A"]) + len(expected[tab.user]["B"]) + len(broadcasts), deadline))
                for tab in tabs]
            reports = await asyncio.gather(run_publisher(hosts.a, plans["A"]),
                                           run_publisher(hosts.b, plans["B"]))
            timings["publish"] = loop.time() - started
            done, pending = await asyncio.wait(readers, timeout=max(0.1, deadline - loop.time()))
            for reader in pending:
                reader.cancel()
            timings["deliver"] = loop.time() - started
            late = [tab for tab, reader in zip(tabs, readers) if reader in pending or reader.exception()]
            if late:
                short = [(t.user, t.host, len(t.frames)) for t in late[:5]]
                raise AssertionError(f"{len(late)} of {len(tabs)} tabs short of their messages "
                                     f"after {DELIVERY_TIMEOUT}s (user, host, got): {short}")
            extras = await asyncio.gather(*(extra_frames(tab) for tab in tabs))
            return tabs, timings, {"numsub": numsub, "reports": reports, "extras": extras}
        finally:
            await asyncio.gather(*(tab.ws.close() for tab in tabs), return_exceptions=True)

    tabs, timings, seen = asyncio.run(scenario())
    assert len(tabs) == 2 * USERS
    assert {tab.host for tab in tabs} == {"A", "B"}
    assert all(count == 2 for count in seen["numsub"].values()), seen["numsub"]
    problems = [problem for tab, extra in zip(tabs, seen["extras"])
                for problem in problems_of(tab, expected[tab.user], broadcasts, extra)]
    assert not problems, f"{len(problems)} problems, the first ones:\n" + "\n".join(problems[:20])
    # Both tabs of a user hold the same stream: the same messages under the same numbers.
    by_user: dict[str, list[list[Any]]] = {}
    for tab in tabs:
        by_user.setdefault(tab.user, []).append([(f["seq"], f["data"]) for f in tab.frames
                                                 if f["username"] == tab.user])
    assert all(first == second for first, second in by_user.values())
    total = sum(len(tab.frames) for tab in tabs)
    assert total == 2 * PUSHES + 2 * USERS * len(broadcasts)
    print(f"\nhosts load: {len(tabs)} tabs, {total} deliveries; connect {timings['connect']:.1f}s, "
          f"publish {timings['publish']:.1f}s, all delivered {timings['deliver']:.1f}s; "
          f"publishers {[round(r['seconds'], 2) for r in seen['reports']]}s")


def test_a_tab_that_moves_from_host_a_to_host_b_resumes_there(hosts: Hosts) -> None:
    """History lives in Redis: a socket closed on host A resumes on host B with what was
    pushed (by host A's publisher) while it was away, then hears host B's pushes live."""
    user = "traveller"

    async def scenario() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        ws, ok = await authenticate(hosts.a.ws_url, issue_token(hosts.a.settings, user), proxy=None)
        position = dict(ok["streams"])
        publisher_a = flow.Flow(settings=hosts.a.settings)
        try:
            publisher_a.push(user, "BEFORE", 1)
            assert publisher_a.flush(10) == 0
            before = await recv_json(ws)
            assert (before["id"], before["seq"]) == ("BEFORE", position[user]["seq"] + 1), before
            position[user] = {"seq": before["seq"], "epoch": before["epoch"]}
            await ws.close()
            for n in range(2, 5):
                publisher_a.push(user, "AWAY", n)
            assert publisher_a.flush(10) == 0
        finally:
            publisher_a.close()
        ws, ok = await authenticate(hosts.b.ws_url, issue_token(hosts.b.settings, user),
                                    resume=position, proxy=None)
        try:
            frames = [await recv_json(ws) for _ in range(ok["missed"])]
            publisher_b = flow.Flow(settings=hosts.b.settings)
            try:
                publisher_b.push(user, "LIVE", 5)
                assert publisher_b.flush(10) == 0
            finally:
                publisher_b.close()
            frames.append(await recv_json(ws))
        finally:
            await ws.close()
        return ok, frames

    ok, frames = asyncio.run(scenario())
    assert ok["recovered"] is True and ok["missed"] == 3, ok
    assert [(f["id"], f["data"]) for f in frames] == [("AWAY", 2), ("AWAY", 3), ("AWAY", 4), ("LIVE", 5)]
    first = frames[0]["seq"]
    assert [f["seq"] for f in frames] == list(range(first, first + 4))
    assert ok["streams"][user] == {"seq": first + 2, "epoch": frames[0]["epoch"]}
    assert {f["epoch"] for f in frames} == {frames[0]["epoch"]}
