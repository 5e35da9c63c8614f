"""What the WebSocket server logs (issue 11), read from the real processes' logs: one INFO
line for every close, with its code, whoever closed; a refused cross-origin handshake names
the origin and the setting that would allow it, without a traceback and rate-limited."""

from __future__ import annotations

import asyncio
import re

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from pipeline import Pipeline, authenticate, closed_with, recv_json
from support import wait_until


@pytest.fixture
def pipe(tmp_path):
    pipeline = Pipeline(tmp_path, servers=1)
    yield pipeline
    pipeline.stop()


def close_lines(log: str, needle: str) -> list[str]:
    """The server's close lines that contain ``needle`` (a user, a code)."""
    return [line for line in log.splitlines() if re.search(r": closed \d+ ", line) and needle in line]


def one_close_line(pipe: Pipeline, needle: str, then: str) -> str:
    """Wait for the close line, then for a later line of the same process (``then``), and
    check there is still exactly one: a second line for the same socket would come with
    the first, from the same close."""
    server = pipe.servers[0]
    wait_until(lambda: close_lines(server.log(), needle), 10, message=f"a close line with {needle!r}")
    wait_until(lambda: then in server.log(), 10, message=f"the later line {then!r}")
    lines = close_lines(server.log(), needle)
    assert len(lines) == 1, lines
    assert " INFO flow.websocket.client[" in lines[0], lines[0]
    return lines[0]


async def witness_close(pipe: Pipeline, username: str) -> None:
    """A second socket that closes after the one under test: its line comes later."""
    ws, _ = await authenticate(pipe.url(), pipe.token(username))
    await ws.close()


def test_a_client_close_is_logged_once_with_its_code(pipe):
    async def run():
        ws, _ = await authenticate(pipe.url(), pipe.token("alice"))
        await ws.close(1000, "tab closed")
        await witness_close(pipe, "later")

    asyncio.run(run())
    line = one_close_line(pipe, "(alice)", "(later): closed 1000")
    assert "closed 1000 'tab closed' by the client" in line


def test_a_dropped_connection_is_logged_once(pipe):
    async def run():
        ws, _ = await authenticate(pipe.url(), pipe.token("bruno"))
        ws.transport.abort()  # no close frame: a tab killed, a network gone
        await witness_close(pipe, "later")

    asyncio.run(run())
    line = one_close_line(pipe, "(bruno)", "(later): closed 1000")
    assert "closed 1006" in line and "no close code" in line


def test_a_bad_token_close_4001_is_logged_once(pipe):
    async def run():
        async with connect(pipe.url()) as ws:
            await recv_json(ws)
            for attempt in range(3):
                await ws.send("bad.token.here")
                assert (await recv_json(ws))["id"] == "AUTH FAILED"
                if attempt < 2:
                    assert await recv_json(ws) == {"id": "AUTH REQUEST"}
            assert (await closed_with(ws)).code == 4001
        await witness_close(pipe, "later")

    asyncio.run(run())
    line = one_close_line(pipe, "closed 4001", "(later): closed 1000")
    assert "closed 4001 'authentication failed' by the server" in line
    assert "Traceback" not in pipe.servers[0].log()


def test_a_close_tornado_sends_by_itself_1009_is_the_servers(pipe):
    """Tornado's protocol closes an oversized frame 1009 without our close(): the line
    still says 1009, by the server, once (not the client's echo of it)."""
    async def run():
        ws, _ = await authenticate(pipe.url(), pipe.token("hugo"), max_size=None)
        await ws.send("x" * (pipe.settings.max_frame + 1))
        assert (await closed_with(ws)).code == 1009
        await witness_close(pipe, "later")

    asyncio.run(run())
    line = one_close_line(pipe, "(hugo)", "(later): closed 1000")
    assert "closed 1009 '' by the server" in line


def test_a_drain_close_1001_is_logged_once_per_socket(pipe):
    async def run():
        sockets = [(await authenticate(pipe.url(), pipe.token(name)))[0] for name in ("dora", "emil")]
        stopping = asyncio.create_task(asyncio.to_thread(pipe.servers[0].stop))
        closes = [await closed_with(ws) for ws in sockets]
        assert await stopping == 0
        return closes

    closes = asyncio.run(run())
    assert [close.code for close in closes] == [1001, 1001]
    log = pipe.servers[0].log()
    assert "drained 2 sockets: 2 answered the close" in log
    for name in ("dora", "emil"):
        lines = close_lines(log, f"({name})")
        assert len(lines) == 1, lines
        assert "closed 1001 'server shutting down" in lines[0] and lines[0].endswith("by the server"), lines
    assert "Traceback" not in log


def test_a_refused_origin_names_the_origin_and_the_setting(pipe):
    server = pipe.servers[0]

    async def refused(origin: str) -> None:
        with pytest.raises(InvalidStatus) as refusal:
            await connect(pipe.url(), origin=origin)
        assert refusal.value.response.status_code == 403

    asyncio.run(refused("https://evil.example"))
    wait_until(lambda: "evil.example" in server.log(), 10, message="the refusal's line")
    [line] = [line for line in server.log().splitlines() if "refused handshake" in line]
    port = pipe.ports[0]
    assert " WARNING " in line
    assert f"refused handshake from origin 'https://evil.example' (Host '127.0.0.1:{port}'): " \
           "add it to FLOW_ALLOWED_ORIGINS to allow it" in line
    assert "Traceback" not in server.log()


def represented(lines: list[str]) -> int:
    """How many refusals the lines stand for (flowcore.proxy.WarningLimiter's wording)."""
    total = 0
    for line in lines:
        held = re.search(r"\(one of (\d+) such lines held back\)", line)
        more = re.search(r"\(and (\d+) more held back since the last such line\)", line)
        total += int(held.group(1)) if held else 1 + int(more.group(1)) if more else 1
    return total


def test_refused_origins_cannot_flood_the_log(pipe):
    server = pipe.servers[0]

    async def flood() -> None:
        for i in range(60):
            with pytest.raises(InvalidStatus):
                await connect(pipe.url(), origin=f"https://evil{i}.example")

    asyncio.run(flood())

    def refusal_lines() -> list[str]:
        return [line for line in server.log().splitlines() if "refused handshake" in line]

    # Every refusal is shown or counted: what was held back is reported within a second or so.
    wait_until(lambda: represented(refusal_lines()) == 60, 10, message="all 60 refusals accounted for")
    lines = refusal_lines()
    assert len(lines) < 20 and any("held back" in line for line in lines), lines
    # The server still answers its own origin.
    asyncio.run(witness_close(pipe, "after-flood"))


def test_a_refused_origin_of_60_kib_logs_a_short_line(pipe):
    # Before: the whole header went into the line (60 KiB), ten lines a second.
    server = pipe.servers[0]

    async def refused(origin: str) -> None:
        with pytest.raises(InvalidStatus) as refusal:
            await connect(pipe.url(), origin=origin)
        assert refusal.value.response.status_code == 403

    asyncio.run(refused("https://" + "a" * 60_000 + ".example"))
    wait_until(lambda: "refused handshake" in server.log(), 10, message="the refusal's line")
    [line] = [line for line in server.log().splitlines() if "refused handshake" in line]
    assert len(line) < 1000, len(line)
    assert "'https://aaaa" in line and "(60016 characters)" in line and "FLOW_ALLOWED_ORIGINS" in line
    assert "Traceback" not in server.log()
