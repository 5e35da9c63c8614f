"""flow.aio, the asyncio publisher (PROTOCOL.md sections 5, 9 and 10), on each engine: the real
engine infrastructure and WebSocket servers (tests/pipeline.py), a websockets client, and
the FastAPI example (app/examples/fastapi_app.py) under uvicorn."""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import signal
import subprocess
import threading
from typing import Any, Awaitable, Callable

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

import flow
from pipeline import Pipeline, authenticate, closed_with, collect, recv_json
from support import PYTHON, ROOT, Proc, base_env, free_port, port_open, wait_until


@pytest.fixture
def pipe(tmp_path, engine):
    pipeline = Pipeline(tmp_path, servers=1, engine=engine, FLOW_PRESENCE_CHANNELS="live:*")
    yield pipeline
    pipeline.stop()


@pytest.fixture
def zmq_pipe(tmp_path):
    """For what does not depend on the engine (the loop binding)."""
    pipeline = Pipeline(tmp_path, servers=1)
    yield pipeline
    pipeline.stop()


async def revision2(url: str, token: str) -> ClientConnection:
    ws = await connect(url)
    assert await recv_json(ws) == {"id": "AUTH REQUEST"}
    await ws.send(json.dumps({"id": "AUTH", "token": token}))
    ok = await recv_json(ws)
    assert ok["id"] == "AUTH OK", ok
    return ws


async def frames_until(ws: ClientConnection, done: Callable[[dict[str, Any]], bool],
                       timeout: float = 10.0) -> list[dict[str, Any]]:
    """Frames (heartbeats skipped) until ``done(frame)`` is true for one; all of them."""
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            got.append(await recv_json(ws))
            if done(got[-1]):
                return got


async def subscribe(ws: ClientConnection, channel: str, **options: Any) -> dict[str, Any]:
    await ws.send(json.dumps({"id": "SUBSCRIBE", "channel": channel, **options}))
    *_, ok = await frames_until(ws, lambda f: f["id"] in ("SUBSCRIBE OK", "SUBSCRIBE FAILED"))
    assert ok["id"] == "SUBSCRIBE OK", ok
    return ok


async def messages(ws: ClientConnection, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The next ``count`` numbered frames (messages), skipping any other."""
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while len(got) < count:
            frame = await recv_json(ws)
            if "seq" in frame:
                got.append(frame)
    return got


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    """Await ``condition()`` until it is true; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        assert loop.time() < deadline, f"timed out after {timeout}s"
        await asyncio.sleep(0.05)


async def _count_is(publisher: flow.aio.Flow, channel: str, count: int) -> bool:
    return bool((await publisher.presence(channel, timeout=5))["count"] == count)


async def ticks_while(task: asyncio.Task[Any], limit: float = 15.0) -> int:
    """How many 10 ms timers fired on this loop while ``task`` ran: 0 or 1 when the task
    held the loop (a blocking call), about its duration / 10 ms when it did not."""
    ticks = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not task.done():
        assert loop.time() < deadline, "the task did not end"
        await asyncio.sleep(0.01)
        ticks += 1
    return ticks


# --------------------------------------------------------------------------- the module


def test_flow_aio_is_loaded_on_first_use_and_is_flowcore_aio():
    script = (
        "import sys, flow\n"
        "assert 'flowcore.aio' not in sys.modules, 'import flow loaded flow.aio'\n"
        "from flow import aio\n"
        "assert flow.aio is aio is sys.modules['flowcore.aio']\n"
        "assert (aio.InvalidMessage, aio.QueueFull, aio.Unavailable) == "
        "(flow.InvalidMessage, flow.QueueFull, flow.Unavailable)\n"
        "try:\n"
        "    flow.aoi\n"
        "except AttributeError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([PYTHON, "-W", "error", "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "module 'flow' has no attribute 'aoi'\n"


def test_options_are_flow_flows():
    mine = inspect.signature(flow.aio.Flow.__init__).parameters
    theirs = inspect.signature(flow.Flow.__init__).parameters
    assert [(p.name, p.kind, p.default) for p in mine.values()] == \
        [(p.name, p.kind, p.default) for p in theirs.values()]
    with pytest.raises(ValueError, match="^linger must be"):
        flow.aio.Flow(f"tcp://127.0.0.1:{free_port()}", linger=-1)


# --------------------------------------------------------------------------- delivery


def test_push_push_all_publish_unsubscribe_and_disconnect_reach_a_real_client(pipe):
    async def run() -> None:
        ws = await revision2(pipe.url(), pipe.token("alice", extra={"channels": ["doc:*"]}))
        other = await revision2(pipe.url(), pipe.token("bob"))
        try:
            await subscribe(ws, "doc:1")
            async with flow.aio.Flow(settings=pipe.settings) as publisher:
                await publisher.push("alice", "MINE", {"n": 1})
                await publisher.push("bob", "BOBS", {"n": 2})
                await publisher.push_all("ALL", {"n": 3})
                await publisher.publish("doc:1", "EDIT", {"n": 4})
                got = await messages(ws, 3)
                assert sorted((f["id"], f["data"]["n"]) for f in got) == [("ALL", 3), ("EDIT", 4), ("MINE", 1)]
                [edit] = [f for f in got if f["id"] == "EDIT"]
                assert (edit["channel"], edit["seq"]) == ("doc:1", 1)
                [mine] = [f for f in got if f["id"] == "MINE"]
                assert (mine["username"], mine["seq"]) == ("alice", 1)
                assert sorted(f["id"] for f in await collect(other, 2)) == ["ALL", "BOBS"]

                await publisher.unsubscribe("alice", "doc:1")
                *_, ended = await frames_until(ws, lambda f: f["id"] == "UNSUBSCRIBED")
                assert ended == {"id": "UNSUBSCRIBED", "channel": "doc:1", "reason": "unsubscribed",
                                 "resubscribe": False}
                await publisher.disconnect("alice")
                assert (await closed_with(ws)).code == 4004
        finally:
            await ws.close()
            await other.close()

    asyncio.run(run())


def test_many_coroutines_share_one_publisher_and_concurrent_closes_wait_for_the_flush(pipe):
    async def run() -> None:
        ws, _ = await authenticate(pipe.url(), pipe.token("carol"), max_queue=None)
        publisher = flow.aio.Flow(settings=pipe.settings)

        async def work(t: int) -> None:
            for i in range(100):
                await publisher.push("carol", "T", [t, i])
                if i % 10 == 0:
                    await asyncio.sleep(0)  # let the others interleave

        await asyncio.gather(*(work(t) for t in range(8)))
        # Both return only once the one close (and its flush) is over.
        await asyncio.gather(publisher.close(), publisher.close())
        assert publisher.sync.flush(0) == 0
        got = await collect(ws, 800)
        assert [m["seq"] for m in got] == list(range(1, 801))
        for t in range(8):  # each coroutine's own order is kept
            assert [m["data"][1] for m in got if m["data"][0] == t] == list(range(100))
        with pytest.raises(RuntimeError, match="closed"):
            await publisher.push("carol", "AFTER", 1)
        await ws.close()

    asyncio.run(run())


def test_messages_pushed_right_before_close_are_delivered(pipe):
    async def run() -> None:
        ws, _ = await authenticate(pipe.url(), pipe.token("dave"), max_queue=None)
        for round_ in range(3):
            # A fresh publisher each time: its link is not even up when close() begins.
            async with flow.aio.Flow(settings=pipe.settings) as publisher:
                for i in range(50):
                    await publisher.push("dave", "LAST", [round_, i])
            got = await collect(ws, 50)
            assert [m["data"] for m in got] == [[round_, i] for i in range(50)]
        await ws.close()

    asyncio.run(run())


def test_a_process_that_pushes_and_returns_from_asyncio_run_delivers(pipe):
    script = (
        "import asyncio, flow\n"
        "async def main():\n"
        "    async with flow.aio.Flow() as publisher:\n"
        "        await publisher.push('erin', 'BYE', {'last': True})\n"
        "asyncio.run(main())\n"
    )

    async def run() -> None:
        ws, _ = await authenticate(pipe.url(), pipe.token("erin"))
        result = await asyncio.to_thread(
            subprocess.run, [PYTHON, "-W", "error", "-c", script], cwd=ROOT, env=pipe.env,
            capture_output=True, text=True, timeout=60)
        assert (result.returncode, result.stderr) == (0, "")
        [bye] = await collect(ws, 1)
        assert (bye["id"], bye["data"]) == ("BYE", {"last": True})
        await ws.close()

    asyncio.run(run())


# --------------------------------------------------------------------------- refusals

BAD_CALLS: list[tuple[str, tuple[Any, ...], str]] = [
    ("push", ("", "ID", 1), "empty"),
    ("push", (None, "ID", 1), "string"),
    ("push", ("*", "ID", 1), "reserved"),
    ("push", ("a\0b", "ID", 1), "NUL"),
    ("push", ("alice", "", 1), "empty"),
    ("push", ("alice", 5, 1), "string"),
    ("push", ("alice", "AUTH OK", 1), "reserved"),
    ("push", ("alice", "SUBSCRIBE OK", 1), "reserved"),
    ("push", ("alice", "ID", {1, 2}), "JSON"),
    ("push", ("alice", "ID", math.nan), "JSON"),
    ("push", ("alice", "ID", "x" * 2048), "limit"),
    ("push_all", ("PONG", 1), "reserved"),
    ("push_all", ("ID", object()), "JSON"),
    ("publish", ("not a channel", "ID", 1), "channel"),
    ("publish", ("doc:1", "ID", math.inf), "JSON"),
    ("disconnect", ("",), "empty"),
    ("unsubscribe", ("alice", "doc:"), "channel"),
]


def test_bad_input_is_refused_in_the_caller_with_flows_exceptions_and_nothing_sent(pipe):
    async def run() -> None:
        ws = await revision2(pipe.url(), pipe.token("alice", extra={"channels": ["doc:*"]}))
        try:
            await subscribe(ws, "doc:1")
            async with flow.aio.Flow(settings=pipe.settings, max_message=1024) as publisher:
                for method, args, message in BAD_CALLS:
                    with pytest.raises(flow.InvalidMessage, match=message) as refused:
                        await getattr(publisher, method)(*args)
                    assert type(refused.value) is flow.InvalidMessage, (method, args)
                await publisher.push("alice", "OK", 1)
                await publisher.publish("doc:1", "OK", 2)
                got = await messages(ws, 2)
            # Nothing of a refused call reached the engine: the good ones are seq 1, and the
            # socket was neither disconnected nor unsubscribed.
            assert sorted((f["id"], f["data"], f["seq"]) for f in got) == [("OK", 1, 1), ("OK", 2, 1)]
            await ws.send(json.dumps({"id": "PING"}))
            assert [f["id"] for f in await frames_until(ws, lambda f: f["id"] == "PONG")] == ["PONG"]
        finally:
            await ws.close()

    asyncio.run(run())


def test_queue_full_then_flush_and_close_wait_in_the_executor_not_the_loop(tmp_path, capfd):
    # ZeroMQ to a port nobody listens on: pushes queue until the queue is full, and nothing
    # is ever confirmed, so flush and close wait their whole timeout.
    publisher = flow.aio.Flow.from_env(base_env(tmp_path), endpoint=f"tcp://127.0.0.1:{free_port()}",
                                       queue_size=10, linger=1.0)

    async def run() -> None:
        sent = 0
        with pytest.raises(flow.QueueFull, match="not taking messages"):
            for _ in range(1000):
                await publisher.push("alice", "ID", sent)
                sent += 1
        assert 10 <= sent < 1000
        flushing = asyncio.create_task(publisher.flush(1.0))
        assert await ticks_while(flushing) >= 20
        assert flushing.result() == sent
        closing = asyncio.create_task(publisher.close())
        assert await ticks_while(closing) >= 20
        closing.result()

    asyncio.run(run())
    err = capfd.readouterr().err
    assert "could not be handed over" in err and err.count("\n") == 1, err


# --------------------------------------------------------------------------- event loops


def test_a_publisher_used_on_a_second_event_loop_says_so_and_sends_nothing(zmq_pipe):
    pipe = zmq_pipe
    publisher = flow.aio.Flow(settings=pipe.settings)
    errors: list[BaseException] = []

    def other_loop() -> None:
        async def attempts() -> None:
            for call in (lambda: publisher.push("frank", "OTHER LOOP", 1),
                         lambda: publisher.push_all("OTHER LOOP", 1),
                         lambda: publisher.publish("doc:1", "OTHER LOOP", 1),
                         lambda: publisher.disconnect("frank"),
                         lambda: publisher.flush(0),
                         lambda: publisher.close(),
                         lambda: publisher.__aenter__()):
                try:
                    await call()
                except RuntimeError as exc:
                    errors.append(exc)

        asyncio.run(attempts())

    async def run() -> None:
        ws, _ = await authenticate(pipe.url(), pipe.token("frank"))
        await publisher.push("frank", "FIRST", 1)
        thread = threading.Thread(target=other_loop)
        thread.start()
        await asyncio.to_thread(thread.join, 30)
        assert len(errors) == 7, errors
        for exc in errors:
            assert "first used on event loop <" in str(exc)
            assert "cannot be used on another one (<" in str(exc)
        await publisher.push("frank", "SECOND", 2)
        await publisher.close()
        got = await collect(ws, 2)
        assert [(m["id"], m["seq"]) for m in got] == [("FIRST", 1), ("SECOND", 2)]
        await ws.close()

    asyncio.run(run())
    # A later asyncio.run is another loop too, even with the first one closed.
    with pytest.raises(RuntimeError, match="first used on event loop .*closed=True"):
        asyncio.run(publisher.push("frank", "LATER", 3))


def test_module_functions_use_the_default_publisher_on_any_loop(zmq_pipe, monkeypatch):
    pipe = zmq_pipe
    monkeypatch.setattr(flow, "_default", None)
    default = flow.configure(settings=pipe.settings)

    async def run() -> None:
        ws, _ = await authenticate(pipe.url(), pipe.token("gina"))
        done = threading.Event()

        async def elsewhere() -> None:
            await flow.aio.push("gina", "FROM ANOTHER LOOP", 2)
            await flow.aio.push_all("ALL", 3)
            assert await flow.aio.flush(10) == 0
            done.set()

        await flow.aio.push("gina", "HERE", 1)
        await asyncio.to_thread(asyncio.run, elsewhere())
        assert done.is_set()
        with pytest.raises(flow.InvalidMessage, match="reserved"):
            await flow.aio.push("*", "ID", 1)
        with pytest.raises(flow.InvalidMessage, match="channel"):
            await flow.aio.publish("no channel", "ID", 1)
        got = await collect(ws, 3)
        assert [(m["id"], m["seq"]) for m in got] == [("HERE", 1), ("FROM ANOTHER LOOP", 2), ("ALL", 1)]
        await ws.close()

    try:
        asyncio.run(run())
    finally:
        default.close()


# --------------------------------------------------------------------------- presence, receipts


def _lead_api(what: str, present: bool) -> None:
    """presence, is_online and push(confirm=True) are flow.Flow's (PROTOCOL.md sections 9,
    10) and flow.aio runs them in the executor: fail, saying so, while flow.Flow lacks them."""
    if not present:
        pytest.fail(f"flow.Flow has no {what} yet: flow.aio wraps it, so this test waits for "
                    f"the synchronous publisher to have it")


def test_presence_and_is_online_in_the_executor(pipe, monkeypatch):
    _lead_api("presence() and is_online()", hasattr(flow.Flow, "presence") and hasattr(flow.Flow, "is_online"))
    monkeypatch.setattr(flow, "_default", None)
    default = flow.configure(settings=pipe.settings)  # for flow.aio.presence and is_online

    async def run() -> None:
        ws = await revision2(pipe.url(), pipe.token("hana", extra={"channels": ["live:*"]}))
        try:
            await subscribe(ws, "live:7", presence=True)
            async with flow.aio.Flow(settings=pipe.settings) as publisher:
                # Servers report their counts to the engine soon, not at once.
                await until(lambda: _count_is(publisher, "live:7", 1))
                snapshot = await publisher.presence("live:7", timeout=5)
                assert snapshot["count"] == 1 and set(snapshot["users"]) == {"hana"}, snapshot
                assert isinstance(snapshot["version"], int)
                assert await publisher.is_online("hana", timeout=5) is True
                assert await publisher.is_online("nobody", timeout=5) is False
                assert (await publisher.presence("live:8", timeout=5))["count"] == 0
                assert (await flow.aio.presence("live:7", timeout=5))["count"] == 1
                assert await flow.aio.is_online("hana", timeout=5) is True
                with pytest.raises(flow.InvalidMessage):
                    await publisher.presence("not a channel")
        finally:
            await ws.close()

    try:
        asyncio.run(run())
    finally:
        default.close()


def test_confirmed_pushes_return_their_receipts(pipe, monkeypatch):
    _lead_api("push(..., confirm=True)", "confirm" in inspect.signature(flow.Flow.push).parameters)
    monkeypatch.setattr(flow, "_default", None)
    default = flow.configure(settings=pipe.settings)  # for flow.aio.push(..., confirm=True)

    async def run() -> None:
        ws = await revision2(pipe.url(), pipe.token("ivan", extra={"channels": ["live:*"]}))
        try:
            await subscribe(ws, "live:3")
            async with flow.aio.Flow(settings=pipe.settings) as publisher:
                # A receipt's online comes from the counts servers report to the engine,
                # soon rather than at once: wait until they are in.
                await until(lambda: publisher.is_online("ivan"))
                await until(lambda: _count_is(publisher, "live:3", 1))
                await publisher.push("ivan", "PLAIN", 1)
                receipt = await publisher.push("ivan", "CONFIRMED", 2, confirm=True)
                assert set(receipt) == {"stream", "seq", "epoch", "online"}
                broadcast = await publisher.push_all("ALL", 3, confirm=True, timeout=5)
                edit = await publisher.publish("live:3", "EDIT", 4, confirm=True)
                module = await flow.aio.push("ivan", "MODULE", 5, confirm=True)
                with pytest.raises(flow.InvalidMessage, match="reserved"):
                    await publisher.push("ivan", "AUTH OK", 6, confirm=True)
                got = {f["id"]: f for f in await messages(ws, 5)}
            for frame, seen in ((receipt, got["CONFIRMED"]), (broadcast, got["ALL"]),
                                (edit, got["EDIT"]), (module, got["MODULE"])):
                assert (frame["seq"], frame["epoch"], frame["online"]) == (seen["seq"], seen["epoch"], 1), frame
            assert [r["stream"] for r in (receipt, broadcast, edit, module)] == ["ivan", "*", "live:3", "ivan"]
            assert (receipt["seq"], module["seq"]) == (2, 3)
        finally:
            await ws.close()

    try:
        asyncio.run(run())
    finally:
        default.close()


# --------------------------------------------------------------------------- the FastAPI example


def test_the_fastapi_example_pushes_to_a_connected_client(pipe, tmp_path):
    port = free_port()
    env = {**pipe.env, "SHOP_SECRET_KEY": "k" * 32, "PYTHONWARNINGS": "error"}
    app = Proc([PYTHON, "-m", "uvicorn", "app.examples.fastapi_app:app", "--host", "127.0.0.1",
                "--port", str(port), "--no-access-log"], env, tmp_path / "uvicorn.log")
    try:
        wait_until(lambda: port_open(port) or not app.alive(), 30, message="uvicorn listening")
        assert app.alive(), app.log()

        async def run() -> None:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False,
                                         timeout=10) as http:
                assert (await http.post("/orders/7/ship")).status_code == 401
                bad = await http.post("/login", json={"username": "a\0b"})
                assert bad.status_code == 400 and "NUL" in bad.text
                assert (await http.post("/login", json={"username": "jill"})).json() == {"status": "OK"}
                reply = await http.get("/socket_auth_token")
                assert reply.status_code == 200 and reply.headers["cache-control"] == "no-store"
                ws, _ = await authenticate(pipe.url(), reply.text)
                try:
                    assert (await http.post("/orders/7/ship")).json() == {"status": "OK"}
                    [shipped] = await collect(ws, 1)
                    assert (shipped["id"], shipped["username"], shipped["data"]) == \
                        ("ORDER SHIPPED", "jill", {"order": 7})
                    # The last push before uvicorn stops: the lifespan's close flushes it.
                    assert (await http.post("/orders/8/ship")).json() == {"status": "OK"}
                    # After its graceful shutdown uvicorn raises the signal it caught again,
                    # so its status is SIGTERM's; the log below says the shutdown completed.
                    assert await asyncio.to_thread(app.stop) == -signal.SIGTERM
                    [last] = await collect(ws, 1)
                    assert last["data"] == {"order": 8}
                finally:
                    await ws.close()

        asyncio.run(run())
        log = app.log()
        assert "Application shutdown complete" in log and "Traceback" not in log, log
    finally:
        app.stop()


def test_the_fastapi_code_in_the_docs_is_the_tested_example():
    doc = (ROOT / "docs" / "asyncio.md").read_text()
    snippet = doc.split("## FastAPI", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    example = (ROOT / "app" / "examples" / "fastapi_app.py").read_text().splitlines()
    missing = [line for line in snippet.splitlines() if line.strip() and line not in example]
    assert not missing, f"docs/asyncio.md shows lines app/examples/fastapi_app.py does not have: {missing}"
