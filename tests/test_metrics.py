"""GET /metrics, /healthz and /readyz of every Flow process (PROTOCOL.md section 11), with
real processes and sockets: the WebSocket servers, the proxy, and the app under gunicorn.

Gauges are read from the live state at scrape time: after a client's TCP connection is
cut (no close frame), they must come back to 0 once the server has noticed. No metric
may carry a username or a channel name.
"""

from __future__ import annotations

import asyncio
import html
import http.cookiejar
import json
import re
import socket
import struct
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterable

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect

from flowcore import protocol
import support
from pipeline import Pipeline, authenticate, collect, recv_json
from support import PYTHON, Proc, free_port, port_block, port_open, wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# Never route loopback test traffic through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
DEADLINE = 20.0


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, str]:
    """(status, body, content type) of a GET on 127.0.0.1; HTTP errors are answers too."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with _OPENER.open(request, timeout=10) as reply:
            return reply.status, reply.read(), reply.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def scrape(port: int) -> Samples:
    """Every sample of the process's /metrics, parsed by prometheus-client's own parser."""
    status, body, content_type = get(port, "/metrics")
    assert status == 200, body[:300]
    assert content_type.startswith("text/plain; version=0.0.4"), content_type
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample of ``name`` with exactly ``labels``; 0 when there is none."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def assert_no_names(samples: Samples, names: Iterable[str]) -> None:
    """No label is a person's or a channel's, by key or by value."""
    forbidden = set(names)
    for name, labels in samples:
        for key, label in labels:
            assert key not in ("user", "username", "channel", "stream"), (name, key)
            assert label not in forbidden and not any(n in label for n in forbidden), (name, key, label)


async def cut(ws: ClientConnection) -> None:
    """Kill the client's TCP connection: RST, no close frame (a crashed browser, a cut cable)."""
    sock = ws.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ws.transport.abort()
    await ws.wait_closed()  # the loop closes the socket in a callback: until then it is open


def wait_for(port: int, check: Any, message: str, timeout: float = DEADLINE) -> Samples:
    """Scrape until ``check(samples)`` holds; the samples that passed."""
    found: list[Samples] = []

    def passes() -> bool:
        samples = scrape(port)
        if check(samples):
            found.append(samples)
            return True
        return False

    wait_until(passes, timeout, 0.05, message)
    return found[0]


def connections(samples: Samples) -> tuple[float, float]:
    return (value(samples, "flow_connections", state="connecting"),
            value(samples, "flow_connections", state="authenticated"))


# ---------------------------------------------------------------- WebSocket servers


@pytest.mark.timeout(120)
def test_websocket_metrics_follow_connections_and_come_back_after_a_cut(tmp_path: Path, engine: str) -> None:
    pipe = Pipeline(tmp_path, servers=1, engine=engine)
    port = pipe.ports[0]

    async def scenario() -> None:
        wait_until(lambda: get(port, "/readyz")[0] == 200, DEADLINE, 0.05, "the server ready")
        before = scrape(port)
        assert connections(before) == (0, 0)
        assert value(before, "flow_users") == 0
        assert value(before, "flow_build_info", engine=engine, role="websocket",
                     version=next(dict(labels)["version"] for name, labels in before
                                  if name == "flow_build_info")) == 1
        # /readyz and the scrape each look at the link when asked: the same answer, once settled.
        wait_for(port, lambda s: value(s, "flow_engine_up") == 1, "the engine up in the metrics")

        alice, alice_ok = await authenticate(pipe.url(), pipe.token("alice"))
        bob, _ = await authenticate(pipe.url(), pipe.token("bob"))
        waiting = await connect(pipe.url())  # never authenticates
        assert await recv_json(waiting) == {"id": "AUTH REQUEST"}
        samples = wait_for(port, lambda s: connections(s) == (1, 2), "1 connecting, 2 authenticated")
        assert value(samples, "flow_users") == 2
        assert value(samples, "flow_connections_opened_total") == 3
        assert value(samples, "flow_auth_total", result="ok") == 2

        publisher = pipe.publisher()
        publisher.push("alice", "HELLO", {"n": 1})
        publisher.push_all("NEWS", {"n": 2})
        assert publisher.flush(10) == 0
        assert [m["id"] for m in await collect(alice, 2)] == ["HELLO", "NEWS"]
        assert [m["id"] for m in await collect(bob, 1)] == ["NEWS"]
        samples = wait_for(port, lambda s: value(s, "flow_messages_sent_total", kind="broadcast") == 2,
                           "two broadcast deliveries")
        assert value(samples, "flow_messages_sent_total", kind="user") == 1
        assert value(samples, "flow_bytes_sent_total", kind="user") > len("HELLO")
        assert value(samples, "flow_bytes_sent_total", kind="broadcast") > 2 * len("NEWS")
        assert value(samples, "flow_delivery_lag_seconds_count") >= 1
        assert value(samples, "flow_delivery_lag_seconds_bucket", le="+Inf") == \
            value(samples, "flow_delivery_lag_seconds_count")

        # A refused token, then a resume that recovers what alice's first socket got.
        mallory = await connect(pipe.url())
        assert await recv_json(mallory) == {"id": "AUTH REQUEST"}
        await mallory.send("not a token")
        assert (await recv_json(mallory))["id"] == "AUTH FAILED"
        streams = alice_ok["streams"]
        again, ok = await authenticate(pipe.url(), pipe.token("alice"), resume=streams)
        assert ok["recovered"] is True
        assert [m["id"] for m in await collect(again, 2)] == ["HELLO", "NEWS"]
        samples = wait_for(port, lambda s: value(s, "flow_resumes_total", kind="connection",
                                                 result="recovered") == 1, "one recovered resume")
        assert value(samples, "flow_auth_total", result="refused") == 1
        assert value(samples, "flow_messages_sent_total", kind="user") == 2  # + the resumed one

        # Every client's TCP connection cut: no close frame, the gauges still come back to 0.
        for ws in (alice, bob, waiting, mallory, again):
            await cut(ws)
        samples = wait_for(port, lambda s: connections(s) == (0, 0) and value(s, "flow_users") == 0,
                           "every gauge back to 0 after the cuts")
        assert value(samples, "flow_closes_total", code="1006", by="network") == 5
        assert value(samples, "flow_connections_opened_total") == 5
        assert_no_names(samples, ["alice", "bob"])

    try:
        asyncio.run(scenario())
    finally:
        pipe.stop()


@pytest.mark.timeout(120)
def test_channel_subscriptions_are_counted_without_their_names(tmp_path: Path, engine: str) -> None:
    pipe = Pipeline(tmp_path, servers=1, engine=engine)
    port = pipe.ports[0]
    channel = "secret-room:42"

    async def scenario() -> None:
        ws, _ = await authenticate(pipe.url(), pipe.token("carol", extra={"channels": [channel]}))
        await ws.send(json.dumps({"id": "SUBSCRIBE", "channel": channel}))
        reply = await recv_json(ws)
        assert reply["id"] == "SUBSCRIBE OK", reply
        samples = wait_for(port, lambda s: value(s, "flow_channel_subscriptions") == 1, "one subscription")
        assert value(samples, "flow_channels") == 1
        publisher = pipe.publisher()
        publisher.publish(channel, "EDIT", {"line": 7})
        assert publisher.flush(10) == 0
        assert (await recv_json(ws))["id"] == "EDIT"
        samples = wait_for(port, lambda s: value(s, "flow_messages_sent_total", kind="channel") == 1,
                           "one channel delivery")
        assert_no_names(samples, ["carol", channel, "secret-room"])
        await cut(ws)
        wait_for(port, lambda s: value(s, "flow_channel_subscriptions") == 0 and value(s, "flow_channels") == 0
                 and connections(s) == (0, 0), "subscriptions gone with the cut socket")

    try:
        asyncio.run(scenario())
    finally:
        pipe.stop()


@pytest.mark.timeout(120)
def test_readyz_follows_the_engine(tmp_path: Path, engine: str) -> None:
    """503 while the proxy (or redis-server) is down, 200 once it is back; /metrics says
    the same in flow_engine_up; /healthz is 200 throughout."""
    pipe = Pipeline(tmp_path, servers=1, engine=engine)
    port = pipe.ports[0]
    try:
        wait_until(lambda: get(port, "/readyz")[0] == 200, DEADLINE, 0.05, "ready")
        pipe.stop_proxy()
        wait_until(lambda: get(port, "/readyz")[0] == 503, DEADLINE, 0.05, "503 with the engine down")
        status, body, _ = get(port, "/readyz")
        assert json.loads(body)["ready"] is False and "link" in json.loads(body)["reason"]
        assert get(port, "/healthz")[0] == 200
        assert value(scrape(port), "flow_engine_up") == 0
        pipe.start_proxy()
        wait_until(lambda: get(port, "/readyz")[0] == 200, DEADLINE, 0.05, "200 with the engine back")
        assert value(scrape(port), "flow_engine_up") == 1
    finally:
        pipe.stop()


def test_metrics_off(tmp_path: Path) -> None:
    """FLOW_METRICS=0 (the bench's comparison): no /metrics, the health checks stay."""
    pipe = Pipeline(tmp_path, servers=1, FLOW_METRICS="0")
    try:
        port = pipe.ports[0]
        assert get(port, "/metrics")[0] == 404
        assert get(port, "/healthz")[0] == 200
        wait_until(lambda: get(port, "/readyz")[0] == 200, DEADLINE, 0.05, "ready")
    finally:
        pipe.stop()


# ---------------------------------------------------------------- the pool's own ports, the proxy


@pytest.mark.timeout(120)
def test_each_server_of_a_pool_and_the_proxy_answer_on_their_own_port(tmp_path: Path) -> None:
    """Under supervisord the pool shares FLOW_WS_PORT (a scrape there reaches any server):
    with FLOW_METRICS_PORT=P, server N answers on P+1+N and the proxy on P."""
    base = port_block(3)
    pipe = Pipeline(tmp_path, servers=0, FLOW_METRICS_PORT=str(base))
    shared = free_port()
    servers = [Proc([PYTHON, "websocket_server.py", "--port", str(shared), "--index", str(i)], pipe.env,
                    tmp_path / f"pool-{i}.log") for i in range(2)]
    try:
        for i in range(2):
            wait_until(lambda: port_open(base + 1 + i), 15, message=f"server {i}'s own port")
        pids = {json.loads(get(base + 1 + i, "/stats")[1])["pid"] for i in range(2)}
        assert pids == {s.pid for s in servers}
        for i in range(2):
            assert get(base + 1 + i, "/healthz")[0] == 200
            assert get(base + 1 + i, "/websocket")[0] == 404  # only what the host's checks ask
            wait_until(lambda: get(base + 1 + i, "/readyz")[0] == 200, DEADLINE, 0.05, "server ready")
            assert value(scrape(base + 1 + i), "flow_connections", state="authenticated") == 0
        # The proxy.
        assert get(base, "/healthz")[0] == 200
        assert get(base, "/readyz")[0] == 200
        samples = scrape(base)
        assert value(samples, "flow_engine_up") == 1
        assert value(samples, "flow_build_info", engine="zmq", role="proxy",
                     version=next(dict(labels)["version"] for name, labels in samples
                                  if name == "flow_build_info")) == 1
        assert value(samples, "process_open_fds") > 0
    finally:
        for server in servers:
            server.stop()
        pipe.stop()
    assert "Traceback" not in "".join(s.log() for s in servers) + pipe.logs()


def test_readyz_is_503_draining_while_a_server_drains(tmp_path: Path) -> None:
    """PROTOCOL section 11: /readyz answers 503 while the server drains. SIGTERM, with one
    socket whose client never answers the close: the drain waits FLOW_DRAIN_TIMEOUT for it,
    and the server's own port says "draining" until the server is gone."""
    import signal

    from test_attack import RawSocket

    base = port_block(2)
    pipe = Pipeline(tmp_path, servers=0, FLOW_METRICS_PORT=str(base), FLOW_DRAIN_TIMEOUT="5")
    shared = free_port()
    server = Proc([PYTHON, "websocket_server.py", "--port", str(shared), "--index", "0"], pipe.env,
                  tmp_path / "drain.log")
    raw = None
    try:
        own = base + 1
        wait_until(lambda: port_open(own) and get(own, "/readyz")[0] == 200, DEADLINE, 0.05, "server ready")
        raw = RawSocket(shared)  # never reads nor answers the close: the drain waits for it
        server.signal(signal.SIGTERM)
        wait_until(lambda: get(own, "/readyz")[0] == 503, DEADLINE, 0.05, "503 while draining")
        status, body, _ = get(own, "/readyz")
        assert status == 503 and json.loads(body) == {"ready": False, "reason": "draining"}
        assert get(own, "/healthz")[0] == 200  # alive, not ready
        assert value(scrape(own), "flow_draining") == 1
    finally:
        if raw is not None:
            raw.close()
        server.stop()
        pipe.stop()


@pytest.mark.timeout(120)
def test_proxy_metrics_count_numbered_dropped_and_history(tmp_path: Path) -> None:
    metrics_port = free_port()
    pipe = Pipeline(tmp_path, servers=1, FLOW_METRICS_PORT=str(metrics_port))
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    try:
        wait_until(lambda: port_open(metrics_port), 15, message="the proxy's metrics port")
        before = scrape(metrics_port)
        assert value(before, "flow_proxy_numbered_total") == 0
        assert value(before, "flow_proxy_dropped_total", reason="push") == 0
        publisher = pipe.publisher()
        for n in range(10):
            publisher.push("dave", "N", {"n": n, "pad": "x" * 100})
        publisher.publish("ops:room", "E", 1)
        assert publisher.flush(10) == 0
        push.connect(pipe.settings.publish_endpoint)
        push.send(b"garbage that is no push")
        samples = wait_for(metrics_port, lambda s: value(s, "flow_proxy_dropped_total", reason="push") == 1,
                           "the garbage dropped")
        assert value(samples, "flow_proxy_numbered_total") == 11
        assert value(samples, "flow_proxy_flushes_total") >= 1
        assert value(samples, "flow_proxy_streams") >= 2
        assert value(samples, "flow_proxy_history_messages") == 11
        assert value(samples, "flow_proxy_history_bytes") > 10 * 100
        assert value(samples, "flow_proxy_subscribed_streams") >= 1  # the server's broadcasts
        assert value(samples, "flow_draining") == 0
        assert_no_names(samples, ["dave", "ops:room", "ops"])
        # Stopping: 503 "stopping" while it saves its state, then the port is gone.
        pipe.stop_proxy()
        assert not port_open(metrics_port)
    finally:
        push.close()
        context.term()
        pipe.stop()


# ---------------------------------------------------------------- the app, under gunicorn


def settled(port: int, status: int, times: int = 8) -> None:
    """/readyz answers ``status`` ``times`` in a row: every worker has seen the change."""
    row = [0]

    def steady() -> bool:
        row[0] = row[0] + 1 if get(port, "/readyz")[0] == status else 0
        return row[0] >= times

    wait_until(steady, DEADLINE, 0.05, f"/readyz {status} from every worker")


class Browser:
    """Cookies and the page's CSRF token, as the demo's page sends them."""

    META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                  urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def post(self, path: str, **form: str) -> int:
        page = self.opener.open(self.base + "/", timeout=10).read().decode()
        match = self.META.search(page)
        assert match, page[:300]
        data = urllib.parse.urlencode({"csrf_token": html.unescape(match.group(1)), **form}).encode()
        try:
            with self.opener.open(urllib.request.Request(self.base + path, data=data), timeout=10) as reply:
                return reply.status
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code


@pytest.mark.timeout(180)
def test_app_metrics_sum_every_worker_and_readyz_follows_the_engine(tmp_path: Path, engine: str) -> None:
    pipe = Pipeline(tmp_path, servers=0, engine=engine, FLOW_APP_WORKERS="2", FLOW_APP_THREADS="2")
    port = pipe.settings.app_port
    app = Proc([PYTHON, "-m", "gunicorn", "--config", "python:flowcore.gunicorn_conf"], pipe.env,
               tmp_path / "app.log")
    try:
        wait_until(lambda: port_open(port), 30, message="gunicorn listening")
        wait_until(lambda: get(port, "/readyz")[0] == 200, DEADLINE, 0.05, "the app ready")
        assert get(port, "/healthz")[0] == 200
        before = scrape(port)
        assert value(before, "flow_engine_up") == 1
        assert value(before, "flow_build_info", engine=engine, role="app",
                     version=next(dict(labels)["version"] for name, labels in before
                                  if name == "flow_build_info")) == 1
        assert not any(name.startswith("process_") for name, _ in before)  # a random worker's
        # Each request is a new connection: gunicorn's two workers take them as they come.
        sends = logouts = 0
        for n in range(6):
            browser = Browser(port)
            assert browser.post("/login", username=f"erin{n}") == 200  # the redirect, followed
            assert browser.post("/send", message=f"hello {n}") == 200
            sends += 1
            assert browser.post("/logout") == 200
            logouts += 1
        # Whichever worker answers, the totals are every worker's (the sends push after 1 s).
        for _ in range(6):
            wait_for(port, lambda s: value(s, "flow_publishes_total", kind="user") == sends
                     and value(s, "flow_publishes_total", kind="command") == logouts,
                     f"{sends} pushes and {logouts} commands over both workers")
        assert app.log().count("Booting worker") == 2
        samples = scrape(port)
        assert value(samples, "flow_publish_rejections_total", reason="queue_full") == 0
        assert_no_names(samples, [f"erin{n}" for n in range(6)])
        # Through nginx (which sets X-Real-IP), /metrics is not there.
        assert get(port, "/metrics", {"X-Real-IP": "203.0.113.9"})[0] == 404
        # The engine away: 503 once each worker's probe (cached a second) has asked again,
        # 200 once it is back.
        pipe.stop_proxy()
        settled(port, 503)
        body = json.loads(get(port, "/readyz")[1])
        assert body["ready"] is False and body["reason"], body
        assert get(port, "/healthz")[0] == 200
        # Each worker's probe is cached for a second: the scrape's worker catches up.
        wait_for(port, lambda s: value(s, "flow_engine_up") == 0, "the engine down in the metrics")
        pipe.start_proxy()
        settled(port, 200)
        wait_for(port, lambda s: value(s, "flow_engine_up") == 1, "the engine up in the metrics")
    finally:
        app.stop()
        pipe.stop()
    assert "Traceback" not in app.log(), app.log()[-3000:]


# ---------------------------------------------------------------- pieces


def test_lag_histogram_buckets_are_cumulative() -> None:
    from flowcore.metrics import LagHistogram

    lag = LagHistogram((0.001, 0.01))
    for seconds in (0.0005, 0.001, 0.005, 2.0):
        lag.observe(seconds)
    family = lag.family("x_seconds", "doc")
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == "x_seconds_bucket"}
    assert buckets == {"0.001": 2, "0.01": 3, "+Inf": 4}
    assert [s.value for s in family.samples if s.name == "x_seconds_count"] == [4]


def test_close_codes_a_client_may_choose_are_bounded() -> None:
    from flowcore.metrics import close_label

    assert close_label(protocol.CLOSE_SLOW_CONSUMER) == "4008"
    assert close_label(None) == "1005"
    assert {close_label(code) for code in range(3000, 5000)} - {str(c) for c in range(4000, 4100)} == {"other"}


# ---------------------------------------------------------------- the supervised stack


@pytest.mark.stack
@pytest.mark.timeout(240)
def test_the_stack_serves_each_process_on_its_own_metrics_port(make_stack: Any, engine: str) -> None:
    """supervisord passes each WebSocket server its index: FLOW_METRICS_PORT=P gives the
    proxy P (the ZeroMQ engine only: with Redis there is none, and the stack still starts)
    and server N P+1+N; the app answers on FLOW_APP_PORT; nginx routes none of /metrics."""
    base = port_block(3)
    stack = make_stack(FLOW_METRICS_PORT=str(base), FLOW_ENGINE=engine)
    pids = set(stack.pids("websocket"))
    assert len(pids) == 2, stack.diagnostics()
    seen = set()
    for index in range(2):
        wait_until(lambda: get(base + 1 + index, "/readyz")[0] == 200, DEADLINE, 0.05, f"websocket-{index} ready")
        seen.add(json.loads(get(base + 1 + index, "/stats")[1])["pid"])
        assert value(scrape(base + 1 + index), "flow_engine_up") == 1
    assert seen == pids
    if engine == "zmq":
        assert value(scrape(base), "flow_engine_up") == 1
        assert get(base, "/readyz")[0] == 200
    else:
        assert not port_open(base)
    wait_until(lambda: get(stack.settings.app_port, "/readyz")[0] == 200, DEADLINE, 0.05, "the app ready")
    assert value(scrape(stack.settings.app_port), "flow_engine_up") == 1
    assert get(stack.http_port, "/metrics")[0] == 404  # through nginx: the app refuses it
