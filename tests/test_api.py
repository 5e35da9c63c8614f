"""The HTTP publish API (PROTOCOL.md section 10) and confirmed pushes (the receipts of
section 5), on each engine: the real API process (``python -m flowcore api``), the engine's
real infrastructure and WebSocket servers (tests/pipeline.py), websockets clients, and
curl driven by tests/api_curl.sh as a PHP or Go backend would."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import secrets
import signal
import threading
from dataclasses import dataclass
from email.message import Message as Headers
from pathlib import Path
from typing import Any, Iterator

import pytest
from websockets.asyncio.client import ClientConnection, connect

import flow
from conftest import Stack, http_get
from flowcore import protocol
from flowcore.api import MAX_BATCH, MemoryIdempotency
from flowcore.settings import SettingsError, load_settings
from pipeline import ENGINES, Pipeline, authenticate, collect, recv_json
from support import PYTHON, ROOT, Proc, base_env, free_port, wait_until

CURL_SCRIPT = ROOT / "tests" / "api_curl.sh"
MAX_MESSAGE = 4096  # small, so that the size limits are quick to reach


def unique(prefix: str) -> str:
    """A fresh stream name: the module's tests share one pipeline per engine."""
    return f"{prefix}{secrets.token_hex(4)}"


@dataclass
class Answer:
    status: int
    headers: Headers
    body: Any


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, chunked: bool = False) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        if chunked:
            assert body is not None
            pieces = [body[i : i + 16384] for i in range(0, len(body), 16384)]
            conn.request(method, path, body=iter(pieces), headers=headers or {}, encode_chunked=True)
        else:
            conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        parsed = json.loads(data) if data and response.headers.get_content_type() == "application/json" else data
        return Answer(response.status, response.headers, parsed)
    finally:
        conn.close()


class Api:
    """A pipeline (the engine and two WebSocket servers) and an API process on it."""

    def __init__(self, tmp_path: Path, engine: str, **overrides: object) -> None:
        self.key = secrets.token_hex(24)
        self.port = free_port()
        self.pipe = Pipeline(tmp_path, servers=2, engine=engine, FLOW_API_KEY=self.key,
                             FLOW_API_PORT=str(self.port), FLOW_API_TIMEOUT="1",
                             FLOW_MAX_MESSAGE=str(MAX_MESSAGE), **overrides)
        self.tmp_path = tmp_path
        self.procs: list[Proc] = []
        self.proc = self.start(self.port)
        self._counter: flow.Flow | None = None

    def start(self, port: int) -> Proc:
        env = {**self.pipe.env, "FLOW_API_PORT": str(port)}
        proc = Proc([PYTHON, "-m", "flowcore", "api"], env, self.tmp_path / f"api-{port}.log")
        self.procs.append(proc)
        wait_until(lambda: self.ready(port) or not proc.alive(), 20, 0.05, f"the API on {port} ready")
        assert proc.alive(), proc.log()
        return proc

    def ready(self, port: int | None = None) -> bool:
        try:
            return request(port or self.port, "GET", "/readyz").status == 200
        except OSError:
            return False

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json", **extra}

    def post(self, path: str, body: Any, port: int | None = None, **headers: str) -> Answer:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return request(port or self.port, "POST", path, raw, self.headers(**headers))

    def publish(self, **message: Any) -> Answer:
        return self.post("/api/publish", message)

    def online(self, stream: str) -> int:
        """Sockets on ``stream`` as the engine counts them (what a receipt's online says)."""
        if self._counter is None:
            self._counter = self.pipe.publisher()
        # The engine's own count: flow.is_online only says whether it is above 0.
        return self._counter._engine.online(stream, 5.0)

    def wait_online(self, stream: str, count: int) -> None:
        wait_until(lambda: self.online(stream) == count, 15, 0.02, f"{count} sockets on {stream!r}")

    def logs(self) -> str:
        return "\n".join(proc.log() for proc in self.procs)

    def stop(self) -> list[int]:
        codes = [proc.stop() for proc in self.procs]
        self.pipe.stop()
        return codes


@pytest.fixture(scope="module", params=ENGINES)
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One API per engine for the module's tests that change nothing but their own streams."""
    service = Api(tmp_path_factory.mktemp(f"api-{request.param}"), str(request.param))
    yield service
    assert service.stop()[0] == 0, service.logs()


@pytest.fixture
def own_api(tmp_path: Path, engine: str) -> Iterator[Api]:
    """An API of the test's own, for tests that stop the engine or start more API processes."""
    service = Api(tmp_path, engine)
    yield service
    service.stop()


def is_error(answer: Answer, status: int, code: str) -> bool:
    body = answer.body
    return (answer.status == status and isinstance(body, dict) and set(body) == {"error"}
            and body["error"]["code"] == code and isinstance(body["error"]["message"], str)
            and body["error"]["message"] != "")


async def subscribed(url: str, token: str, channel: str) -> ClientConnection:
    """A revision-2 socket subscribed to ``channel``."""
    ws = await connect(url)
    assert await recv_json(ws) == {"id": "AUTH REQUEST"}
    await ws.send(json.dumps({"id": "AUTH", "token": token}))
    assert (await recv_json(ws))["id"] == "AUTH OK"
    await ws.send(json.dumps({"id": "SUBSCRIBE", "channel": channel}))
    while True:
        frame = await recv_json(ws)
        if frame["id"] == "SUBSCRIBE OK":
            return ws
        assert frame["id"] not in ("SUBSCRIBE FAILED", "ERROR"), frame


# ---------------------------------------------------------------- publishing


def test_a_message_reaches_every_socket_and_its_receipt_counts_them(api: Api) -> None:
    user, offline = unique("u"), unique("nobody")

    async def run() -> None:
        ws0, ok = await authenticate(api.pipe.url(0), api.pipe.token(user))
        ws1, _ = await authenticate(api.pipe.url(1), api.pipe.token(user))
        try:
            await asyncio.to_thread(api.wait_online, user, 2)
            data = {"big": 2**64 + 1, "text": "é ☃", "list": [1.5, None, True]}
            answer = await asyncio.to_thread(api.publish, user=user, id="HELLO", data=data)
            assert answer.status == 200, answer.body
            assert answer.body == {"stream": user, "seq": 1, "epoch": ok["epoch"], "online": 2}
            for ws in (ws0, ws1):
                [message] = await collect(ws, 1)
                # Integers past 64 bits come through exact, as the backend sent them.
                assert message == {"id": "HELLO", "username": user, "data": data, "seq": 1, "epoch": ok["epoch"]}
        finally:
            await ws0.close()
            await ws1.close()

    asyncio.run(run())
    answer = api.publish(user=offline, id="HELLO")
    assert answer.status == 200
    assert answer.body["online"] == 0 and answer.body["seq"] == 1 and answer.body["stream"] == offline


def test_curl_publishes_as_a_php_or_go_backend_would(api: Api) -> None:
    user = unique("curl")
    env = {**os.environ, "FLOW_API_URL": f"http://127.0.0.1:{api.port}", "FLOW_API_KEY": api.key}

    async def script(*args: str, key: str | None = None) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            "sh", str(CURL_SCRIPT), *args, env={**env, "FLOW_API_KEY": key or api.key},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def run() -> None:
        ws, ok = await authenticate(api.pipe.url(1), api.pipe.token(user))
        try:
            await asyncio.to_thread(api.wait_online, user, 1)
            code, out, err = await script(user, "TASK DONE", '{"card": "ok", "quote": "say \\"hi\\""}')
            assert code == 0, (out, err)
            receipt = json.loads(out)
            assert receipt == {"stream": user, "seq": 1, "epoch": ok["epoch"], "online": 1}
            [message] = await collect(ws, 1)
            assert message["id"] == "TASK DONE" and message["data"] == {"card": "ok", "quote": 'say "hi"'}
            # The same idempotency key again: the first receipt, nothing published.
            code, out, _ = await script(user, "TASK DONE", "1", "order-17")
            assert code == 0 and json.loads(out)["seq"] == 2
            code, again, _ = await script(user, "TASK DONE", "1", "order-17")
            assert code == 0 and json.loads(again) == json.loads(out)
            code, out, _ = await script(user, "WRONG KEY", "1", key="k" * 40)
            assert code == 22 and json.loads(out)["error"]["code"] == "unauthorized"
            code, out, _ = await script(user, "AUTH OK", "1")
            assert code == 22 and json.loads(out)["error"]["code"] == "invalid"
            assert [m["seq"] for m in await collect(ws, 1)] == [2]
            await ws.send(json.dumps({"id": "PING"}))
            assert (await recv_json(ws))["id"] == "PONG"  # nothing else came before it
        finally:
            await ws.close()

    asyncio.run(run())


def test_a_channel_message_reaches_its_subscribers_and_counts_them(api: Api) -> None:
    channel = unique("doc:")
    user = unique("reader")

    async def run() -> None:
        token = api.pipe.token(user, extra={"channels": ["doc:*"]})
        ws = await subscribed(api.pipe.url(0), token, channel)
        try:
            await asyncio.to_thread(api.wait_online, protocol.channel_stream(channel), 1)
            answer = await asyncio.to_thread(api.publish, channel=channel, id="EDIT", data={"line": 7})
            assert answer.status == 200, answer.body
            assert answer.body["stream"] == channel and answer.body["seq"] == 1
            [message] = await collect(ws, 1)
            assert message == {"id": "EDIT", "channel": channel, "data": {"line": 7}, "seq": 1,
                               "epoch": answer.body["epoch"]}
            # The sockets the message was dispatched to: one subscription.
            assert answer.body["online"] == 1
        finally:
            await ws.close()

    asyncio.run(run())


def test_a_broadcast_reaches_every_socket_and_counts_them(api: Api) -> None:
    async def run() -> None:
        ws0, _ = await authenticate(api.pipe.url(0), api.pipe.token(unique("a")))
        ws1, _ = await authenticate(api.pipe.url(1), api.pipe.token(unique("b")))
        try:
            # Exactly these two: the sockets of earlier tests are gone.
            await asyncio.to_thread(api.wait_online, protocol.BROADCAST, 2)
            answer = await asyncio.to_thread(api.publish, broadcast=True, id="NEWS", data="x")
            assert answer.status == 200, answer.body
            assert answer.body["stream"] == "*" and answer.body["online"] == 2
            for ws in (ws0, ws1):
                [message] = await collect(ws, 1)
                assert (message["id"], message["username"], message["seq"]) == ("NEWS", "*", answer.body["seq"])
        finally:
            await ws0.close()
            await ws1.close()

    asyncio.run(run())


# ---------------------------------------------------------------- refusals


REFUSED = [
    pytest.param({}, "/api/publish", {"Authorization": None}, 401, "unauthorized", id="no-key"),
    pytest.param({}, "/api/publish", {"Authorization": "Bearer " + "x" * 48}, 401, "unauthorized", id="wrong-key"),
    pytest.param({}, "/api/publish", {"Authorization": "Basic KEY"}, 401, "unauthorized", id="basic-scheme"),
    pytest.param({}, "/api/publish", {"Authorization": "KEY"}, 401, "unauthorized", id="no-scheme"),
    pytest.param({}, "/api/publish?api_key=KEY", {"Authorization": None}, 400, "invalid", id="key-in-query"),
    pytest.param({}, "/api/publish?x=1", {}, 400, "invalid", id="any-query"),
    pytest.param(b'{"user": ', "/api/publish", {}, 400, "invalid", id="bad-json"),
    pytest.param(b'{"user": "u", "id": "X", "data": NaN}', "/api/publish", {}, 400, "invalid", id="nan"),
    pytest.param(b"\xff\xfe", "/api/publish", {}, 400, "invalid", id="not-utf8"),
    pytest.param([1], "/api/publish", {}, 400, "invalid", id="not-an-object"),
    pytest.param({"id": "X"}, "/api/publish", {}, 400, "invalid", id="no-target"),
    pytest.param({"user": "USER", "channel": "doc:1", "id": "X"}, "/api/publish", {}, 400, "invalid",
                 id="two-targets"),
    pytest.param({"user": "USER", "broadcast": True, "id": "X"}, "/api/publish", {}, 400, "invalid",
                 id="user-and-broadcast"),
    pytest.param({"broadcast": False, "id": "X"}, "/api/publish", {}, 400, "invalid", id="broadcast-false"),
    pytest.param({"user": "", "id": "X"}, "/api/publish", {}, 400, "invalid", id="empty-user"),
    pytest.param({"user": "a\u0000b", "id": "X"}, "/api/publish", {}, 400, "invalid", id="nul-in-user"),
    pytest.param({"user": "*", "id": "X"}, "/api/publish", {}, 400, "invalid", id="star-user"),
    pytest.param({"user": 7, "id": "X"}, "/api/publish", {}, 400, "invalid", id="user-not-a-string"),
    pytest.param({"channel": "bad name!", "id": "X"}, "/api/publish", {}, 400, "invalid", id="bad-channel"),
    pytest.param({"user": "USER", "id": "AUTH OK"}, "/api/publish", {}, 400, "invalid", id="reserved-id"),
    pytest.param({"user": "USER", "id": "SUBSCRIBE"}, "/api/publish", {}, 400, "invalid", id="reserved-id-rev2"),
    pytest.param({"user": "USER"}, "/api/publish", {}, 400, "invalid", id="no-id"),
    # Old API: accepted (Python's json reads it), then the proxy dropped it: 503 for ever.
    pytest.param(b'{"user": "USER", "id": "X", "data": 1' + b"0" * 400 + b"}", "/api/publish", {}, 400, "invalid",
                 id="number-beyond-a-double"),
    pytest.param({"user": "USER", "id": ""}, "/api/publish", {}, 400, "invalid", id="empty-id"),
    pytest.param({"user": "USER", "id": "X", "usr": 1}, "/api/publish", {}, 400, "invalid", id="unknown-field"),
    pytest.param({"user": "USER", "id": "X", "idempotency_key": 5}, "/api/publish", {}, 400, "invalid",
                 id="bad-idempotency-key"),
    pytest.param({"user": "USER", "id": "X", "data": "x" * MAX_MESSAGE}, "/api/publish", {}, 413, "too_large",
                 id="message-over-the-limit"),
    pytest.param(b"{" + b" " * (MAX_MESSAGE + 70 * 1024) + b"}", "/api/publish", {}, 413, "too_large",
                 id="body-over-the-limit"),
    pytest.param({}, "/api/publish", {"Content-Type": "text/plain"}, 415, "unsupported_media_type", id="text"),
    pytest.param({}, "/api/publish", {"Content-Type": None}, 415, "unsupported_media_type", id="no-type"),
    pytest.param({}, "/api/publish", {"Content-Type": "application/json; charset=latin-1"}, 415,
                 "unsupported_media_type", id="latin-1"),
    pytest.param({}, "/api/publish", {"Content-Type": "application/x-www-form-urlencoded"}, 415,
                 "unsupported_media_type", id="form"),
    pytest.param({"messages": []}, "/api/batch", {}, 400, "invalid", id="empty-batch"),
    pytest.param({"messages": [{"user": "USER", "id": "X"}] * (MAX_BATCH + 1)}, "/api/batch", {}, 400, "invalid",
                 id="batch-over-100"),
    pytest.param({"messages": {"user": "USER"}}, "/api/batch", {}, 400, "invalid", id="batch-not-a-list"),
    pytest.param({"user": "USER", "id": "X"}, "/api/batch", {}, 400, "invalid", id="batch-without-messages"),
    pytest.param({}, "/api/nothing", {}, 404, "not_found", id="unknown-path"),
]


@pytest.mark.parametrize("body, path, headers, status, code", REFUSED)
def test_a_refused_request_gets_its_status_and_publishes_nothing(api: Api, body: Any, path: str,
                                                                 headers: dict[str, str | None], status: int,
                                                                 code: str) -> None:
    user = unique("r")
    if isinstance(body, (dict, list)):
        body = json.loads(json.dumps(body).replace("USER", user))
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = {name: value for name, value in api.headers().items()}
    for name, value in headers.items():
        if value is None:
            sent.pop(name, None)
        else:
            sent[name] = value.replace("KEY", api.key)
    answer = request(api.port, "POST", path.replace("KEY", api.key), raw, sent)
    assert is_error(answer, status, code), (answer.status, answer.body)
    assert answer.headers["Content-Type"] == "application/json"
    if status == 401:
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    # Nothing of it was numbered: the user's first message is seq 1.
    after = api.publish(user=user, id="AFTER")
    assert after.status == 200 and after.body["seq"] == 1
    assert api.key not in api.logs()  # not even the one sent in a query string


def test_a_chunked_body_over_the_limit_is_413(api: Api) -> None:
    body = b'{"user": "u", "id": "X", "data": "' + b"x" * (MAX_MESSAGE + 80 * 1024) + b'"}'
    answer = request(api.port, "POST", "/api/publish", body, api.headers(), chunked=True)
    assert is_error(answer, 413, "too_large"), answer.body
    # Far past the limit: answered at once, the connection closed; a new one works.
    huge = b"[" + b" " * (MAX_MESSAGE + 5 * 1024 * 1024) + b"]"
    try:
        answer = request(api.port, "POST", "/api/publish", huge, api.headers())
        assert is_error(answer, 413, "too_large"), answer.body
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server closed while this client still sent: what it promises past the discard limit
    assert api.publish(user=unique("c"), id="AFTER").status == 200


def test_methods_and_health(api: Api) -> None:
    answer = request(api.port, "GET", "/api/publish", headers=api.headers())
    assert is_error(answer, 405, "method_not_allowed") and answer.headers["Allow"] == "POST"
    assert request(api.port, "GET", "/healthz").body == {"alive": True}
    assert request(api.port, "GET", "/readyz").body == {"ready": True}
    metrics = request(api.port, "GET", "/metrics")
    assert metrics.status == 200 and b"flow_api_published_total" in metrics.body
    # The publisher underneath: its pushes by kind and whether it reaches the engine.
    assert b"flow_publishes_total" in metrics.body and b"flow_engine_up 1.0" in metrics.body


# ---------------------------------------------------------------- batches


def test_a_batch_keeps_its_order_and_answers_per_message(api: Api) -> None:
    user = unique("b")

    async def run() -> None:
        ws, ok = await authenticate(api.pipe.url(0), api.pipe.token(user))
        try:
            await asyncio.to_thread(api.wait_online, user, 1)
            messages: list[Any] = [{"user": user, "id": "N", "data": i} for i in range(40)]
            messages[3] = {"user": user, "id": "AUTH FAILED"}
            messages[7] = {"user": user, "id": "N", "data": "x" * MAX_MESSAGE}
            messages[9] = "not an object"
            answer = await asyncio.to_thread(api.post, "/api/batch", {"messages": messages})
            assert answer.status == 200, answer.body
            results = answer.body["results"]
            assert len(results) == 40
            assert results[3]["error"]["code"] == "invalid" and results[9]["error"]["code"] == "invalid"
            assert results[7]["error"]["code"] == "too_large"
            good = [r for i, r in enumerate(results) if i not in (3, 7, 9)]
            assert [r["seq"] for r in good] == list(range(1, 38))
            assert all(r["stream"] == user and r["epoch"] == ok["epoch"] and r["online"] == 1 for r in good)
            got = await collect(ws, 37)
            assert [m["data"] for m in got] == [i for i in range(40) if i not in (3, 7, 9)]
        finally:
            await ws.close()

    asyncio.run(run())


# ---------------------------------------------------------------- idempotency


def test_a_retry_with_the_same_key_gets_the_first_result_and_publishes_nothing(api: Api) -> None:
    user, key = unique("i"), secrets.token_hex(8)

    async def run() -> None:
        ws, _ = await authenticate(api.pipe.url(0), api.pipe.token(user))
        try:
            first = await asyncio.to_thread(api.publish, user=user, id="ORDER", data=1, idempotency_key=key)
            again = await asyncio.to_thread(api.publish, user=user, id="ORDER", data=2, idempotency_key=key)
            assert first.status == again.status == 200 and again.body == first.body
            # In a batch too, and for another user's message with the same key.
            batch = await asyncio.to_thread(api.post, "/api/batch", {"messages": [
                {"user": user, "id": "ORDER", "idempotency_key": key},
                {"user": user, "id": "FRESH", "data": 3}]})
            assert batch.body["results"][0] == first.body and batch.body["results"][1]["seq"] == 2
            got = await collect(ws, 2)
            assert [(m["id"], m["data"], m["seq"]) for m in got] == [("ORDER", 1, 1), ("FRESH", 3, 2)]
        finally:
            await ws.close()

    asyncio.run(run())


def concurrent_posts(api: Api, body: dict[str, Any], ports: list[int], count: int) -> list[Answer]:
    """``count`` identical requests at once (a barrier), spread over the API processes."""
    barrier = threading.Barrier(count)
    answers: list[Answer | None] = [None] * count

    def post(i: int) -> None:
        barrier.wait(10)
        answers[i] = api.post("/api/publish", body, port=ports[i % len(ports)])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert all(answer is not None for answer in answers)
    return [answer for answer in answers if answer is not None]


def test_concurrent_duplicates_publish_once(api: Api) -> None:
    user, key = unique("c"), secrets.token_hex(8)
    answers = concurrent_posts(api, {"user": user, "id": "ONCE", "idempotency_key": key}, [api.port], 12)
    assert [a.status for a in answers] == [200] * 12, [a.body for a in answers]
    assert all(a.body == answers[0].body for a in answers)
    # One message numbered: the next is seq 2.
    assert api.publish(user=user, id="NEXT").body["seq"] == answers[0].body["seq"] + 1 == 2


def test_api_processes_on_several_hosts_share_the_keys(tmp_path: Path) -> None:
    """Redis: the keys live in Redis, so two API processes (two hosts) publish a message
    once, whichever of them the duplicates reach."""
    service = Api(tmp_path, "redis")
    try:
        second = free_port()
        service.start(second)
        for _ in range(3):
            user, key = unique("h"), secrets.token_hex(8)
            body = {"user": user, "id": "ONCE", "idempotency_key": key}
            answers = concurrent_posts(service, body, [service.port, second], 10)
            assert [a.status for a in answers] == [200] * 10, [a.body for a in answers]
            assert all(a.body == answers[0].body for a in answers)
            assert service.publish(user=user, id="NEXT").body["seq"] == 2
    finally:
        codes = service.stop()
    assert codes[:2] == [0, 0]


def test_memory_keys_expire_after_five_minutes() -> None:
    now = [1000.0]
    store = MemoryIdempotency(clock=lambda: now[0])

    async def run() -> None:
        claim = await store.claim("k", 1.0)
        assert claim.result is None
        await store.complete(claim, {"seq": 1})
        now[0] += 299.0
        assert (await store.claim("k", 1.0)).result == {"seq": 1}
        now[0] += 2.0
        assert (await store.claim("k", 1.0)).result is None  # expired: this one publishes
        # A released claim (the publish failed) keeps nothing.
        other = await store.claim("other", 1.0)
        await store.release(other)
        assert (await store.claim("other", 1.0)).result is None

    asyncio.run(run())


# ---------------------------------------------------------------- the engine away


def test_engine_away_is_503_with_retry_after_and_nothing_published_late(own_api: Api) -> None:
    api = own_api
    user, key = unique("away"), secrets.token_hex(8)
    before = api.publish(user=user, id="BEFORE")
    assert before.status == 200
    api.pipe.stop_proxy()
    wait_until(lambda: not api.ready(), 15, 0.1, "/readyz 503")
    answer = request(api.port, "GET", "/readyz")
    assert answer.status == 503 and answer.headers["Retry-After"] and answer.body["ready"] is False
    down = api.publish(user=user, id="LOST", idempotency_key=key)
    assert is_error(down, 503, "unavailable"), down.body
    assert int(down.headers["Retry-After"]) >= 1
    batch = api.post("/api/batch", {"messages": [{"user": user, "id": "LOST"}] * 3})
    assert batch.status == 200
    assert [r["error"]["code"] for r in batch.body["results"]] == ["unavailable"] * 3
    api.pipe.start_proxy()
    wait_until(api.ready, 20, 0.1, "/readyz 200 again")

    def retried() -> Answer | None:
        answer = api.publish(user=user, id="LATER", idempotency_key=key)
        return answer if answer.status == 200 else None

    # The retry with the key of the failed attempt publishes (that attempt kept nothing).
    after = wait_until(retried, 20, 0.2, "a publish after the engine came back")
    if api.pipe.engine == "zmq":
        # A graceful restart keeps the numbering: the messages refused while the proxy was
        # away were dropped when it came back (past their deadline), never numbered.
        assert after.body["epoch"] == before.body["epoch"]
        assert after.body["seq"] == before.body["seq"] + 1
    else:
        # This Redis keeps nothing across its restart: the stream starts over, and the
        # refused messages did not come first.
        assert after.body["seq"] == 1


def test_sigterm_finishes_and_exits_0(own_api: Api) -> None:
    api = own_api
    assert api.publish(user=unique("t"), id="X").status == 200
    api.proc.signal(signal.SIGTERM)
    assert api.proc.popen.wait(20) == 0
    assert "stopped" in api.proc.log()


# ---------------------------------------------------------------- flow.push(..., confirm=True)


@pytest.fixture
def pipe(tmp_path: Path, engine: str) -> Iterator[Pipeline]:
    pipeline = Pipeline(tmp_path, servers=1, engine=engine)
    yield pipeline
    pipeline.stop()


def test_a_confirmed_push_never_overtakes_the_pushes_before_it(pipe: Pipeline) -> None:
    publisher = pipe.publisher()
    user, channel = unique("o"), unique("doc:")
    for i in range(3000):
        publisher.push(user, "N", i)
        publisher.push_all("N", i)
        publisher.publish(channel, "N", i)
    receipt = publisher.push(user, "LAST", confirm=True)
    assert receipt["stream"] == user and receipt["seq"] == 3001 and receipt["online"] == 0
    assert publisher.push_all("LAST", confirm=True)["seq"] == 3001
    on_channel = publisher.publish(channel, "LAST", confirm=True)
    assert (on_channel["stream"], on_channel["seq"], on_channel["online"]) == (channel, 3001, 0)
    # From many threads at once, each receipt its own, none lost.
    seqs: list[int] = []
    lock = threading.Lock()

    def confirm_some() -> None:
        for _ in range(50):
            got = publisher.push(user, "T", None, confirm=True)["seq"]
            with lock:
                seqs.append(got)

    threads = [threading.Thread(target=confirm_some) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(seqs) == list(range(3002, 3002 + 400))


def test_a_confirmed_push_is_checked_like_a_push(pipe: Pipeline) -> None:
    publisher = pipe.publisher(max_message=1024)
    user = unique("v")
    for args in (("", "ID"), (user, "AUTH OK"), (user, "ID", float("nan")), (user, "ID", "x" * 2000)):
        with pytest.raises(flow.InvalidMessage):
            publisher.push(*args, confirm=True)
    with pytest.raises(flow.InvalidMessage):
        publisher.publish("bad name!", "ID", confirm=True)
    with pytest.raises(ValueError):
        publisher.push(user, "ID", confirm=True, timeout=0)
    assert publisher.push(user, "OK", 1, confirm=True)["seq"] == 1  # nothing of the refused ones
    assert flow.Unavailable.__name__ == "Unavailable" and "Unavailable" in flow.__all__


def test_unavailable_when_the_engine_is_away_and_never_published_late(pipe: Pipeline) -> None:
    publisher = pipe.publisher(queue_size=2)
    user = unique("late")
    first = publisher.push(user, "FIRST", confirm=True)
    pipe.stop_proxy()
    with pytest.raises(flow.Unavailable):
        publisher.push(user, "LOST", confirm=True, timeout=0.3)
    with pytest.raises(flow.Unavailable):
        publisher.push(user, "LOST", confirm=True, timeout=0.3)
    with pytest.raises(flow.QueueFull):  # the two refused ones fill the queue of 2
        publisher.push(user, "LOST", confirm=True, timeout=0.3)
    pipe.start_proxy()
    after = wait_until(lambda: _confirmed(publisher, user), 20, 0.1, "a confirmed push once the engine is back")
    if pipe.engine == "zmq":
        assert (after["epoch"], after["seq"]) == (first["epoch"], first["seq"] + 1)
    else:
        assert after["seq"] == 1  # a fresh Redis: the refused ones did not come first


def _confirmed(publisher: flow.Flow, user: str) -> dict[str, Any] | None:
    try:
        return publisher.push(user, "AFTER", confirm=True, timeout=0.5)
    except (flow.Unavailable, flow.QueueFull):
        return None


def test_the_default_publisher_confirms_too(tmp_path: Path, engine: str) -> None:
    pipeline = Pipeline(tmp_path, servers=1, engine=engine)
    try:
        flow.configure(settings=pipeline.settings)
        user = unique("d")
        assert flow.push(user, "A", confirm=True)["seq"] == 1
        assert flow.push(user, "B") is None
        assert flow.push(user, "C", confirm=True, timeout=2)["seq"] == 3
        assert flow.publish(unique("doc:"), "E", 1, confirm=True)["seq"] == 1
        assert flow.push_all("ALL", confirm=True)["stream"] == "*"
    finally:
        flow.configure(settings=load_settings(base_env(tmp_path)))
        pipeline.stop()


# ---------------------------------------------------------------- settings and the stack


@pytest.mark.parametrize("variable, value, words", [
    ("FLOW_API_KEY", "short", "32 characters"),
    ("FLOW_API_KEY", "a b" + "x" * 40, "visible ASCII"),
    ("FLOW_API_BIND", "example.com", "IP address"),
    ("FLOW_API_PORT", "70000", "TCP port"),
    ("FLOW_API_TIMEOUT", "0", "number"),
])
def test_bad_api_settings_are_one_line_naming_the_variable(tmp_path: Path, variable: str, value: str,
                                                           words: str) -> None:
    with pytest.raises(SettingsError, match=words) as raised:
        load_settings(base_env(tmp_path, **{variable: value}))
    assert str(raised.value).startswith(variable) and "\n" not in str(raised.value)
    if variable == "FLOW_API_KEY":
        assert value not in str(raised.value)  # a key is never echoed


def test_the_api_is_off_without_a_key(tmp_path: Path) -> None:
    settings = load_settings(base_env(tmp_path))
    assert settings.api_key == "" and settings.api_bind == "127.0.0.1"
    proc = Proc([PYTHON, "-m", "flowcore", "api"], base_env(tmp_path), tmp_path / "api.log")
    assert proc.popen.wait(20) == 2
    assert "FLOW_API_KEY is not set" in proc.log()
    proc.stop()


@pytest.mark.stack
def test_the_stack_runs_the_api_only_on_its_own_port_never_behind_nginx(make_stack: Any) -> None:
    key, port = secrets.token_hex(24), free_port()
    stack: Stack = make_stack(FLOW_API_KEY=key, FLOW_API_PORT=port)
    assert len(stack.pids("api")) == 1
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    body = json.dumps({"user": "alice", "id": "HELLO"}).encode()
    for path in ("/api/publish", "/api/batch"):
        public = request(stack.http_port, "POST", path, body, headers)
        assert public.status == 404, public.body
    assert http_get(stack.base_url + "/api/publish")[0] == 404
    wait_until(lambda: request(port, "GET", "/readyz").status == 200, 20, 0.1, "the API ready")
    answer = request(port, "POST", "/api/publish", body, headers)
    assert answer.status == 200 and answer.body["stream"] == "alice"
