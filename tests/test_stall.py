"""One stalled WebSocket server never stalls the pool (PROTOCOL.md section 11).

Server 0 is frozen (SIGSTOP) while a publisher keeps pushing to users on both servers,
more than every buffer between the proxy and the frozen server can hold. Users on server 1
must get everything, in order, while server 0 is still frozen. Once it runs again, each of
its users either has everything exactly once, in order (repaired from history), or was
closed with 1012 and told recovered: false on its resume: never a silent gap.
"""

from __future__ import annotations

import asyncio
import math
import signal
import threading
import time
from pathlib import Path

import pytest

from pipeline import Pipeline
from resuming import ResumingClient

USERS_PER_SERVER = 50
PAD = "p" * 32_000
# Few messages queue for a subscriber before the proxy drops for it; the bytes it holds
# are HWM times the message size, so with big messages a small HWM keeps them few.
HWM = 200
RATE = 2000.0  # pushes a second: high, and bounded so that server 1 keeps up
BROADCAST_EVERY = 100  # a broadcast after every this many user messages
ROUNDS_BEFORE = 2  # rounds delivered before the stall


def kernel_buffer_bytes() -> int:
    """The most a loopback TCP connection can buffer: the receiver's and the sender's
    largest autotuned buffers."""
    total = 0
    for name in ("tcp_rmem", "tcp_wmem"):
        try:
            total += int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
        except (OSError, IndexError, ValueError):
            total += 8 * 1024 * 1024
    return total


def stalled_rounds() -> int:
    """Rounds (one message per user of the frozen server each) that overflow, with a
    margin, every buffer on the way to it: the kernel's, then the proxy's queue (HWM)."""
    message = len(PAD) + 200
    must_exceed = kernel_buffer_bytes() + HWM * message
    return math.ceil(1.5 * must_exceed / (USERS_PER_SERVER * message))


def state_of(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def user(server: int, n: int) -> str:
    return f"s{server}u{n}"


def publish(pipe: Pipeline, rounds: int, gate: threading.Event, stop: threading.Event) -> int:
    """Push ``rounds`` rounds (one message to every user each, a broadcast now and then),
    paced at RATE; after ROUNDS_BEFORE rounds, wait for ``gate``. Returns the broadcasts."""
    publisher = pipe.publisher()
    names = [user(s, n) for n in range(USERS_PER_SERVER) for s in (0, 1)]
    sent = broadcasts = 0
    started = time.monotonic()
    for r in range(rounds):
        if r == ROUNDS_BEFORE:
            if not gate.wait(60):
                raise AssertionError("the stall never began")
            started, sent = time.monotonic(), 0
        for name in names:
            if stop.is_set():
                return broadcasts
            publisher.push(name, "MSG", {"r": r, "pad": PAD})
            sent += 1
            if sent % BROADCAST_EVERY == 0:
                publisher.push_all("BCAST", broadcasts)
                broadcasts += 1
            ahead = started + sent / RATE - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)  # load pacing
    return broadcasts


def stream_data(client: ResumingClient, stream: str) -> list[object]:
    return [m["data"] if m["id"] == "BCAST" else m["data"]["r"] for m in client.ledger.messages
            if m["username"] == stream]


async def wait_for(condition, timeout: float, message: str, detail=lambda: "") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message} {detail()}")
        await asyncio.sleep(0.05)


def describe(client: ResumingClient) -> str:
    ledger = client.ledger
    return (f"{ledger.auth_oks[0]['username']}: positions {client.positions}, {len(ledger.messages)} messages, "
            f"{len(ledger.resyncs)} resyncs, closes {ledger.close_codes[:5]}"
            f"{'...' if len(ledger.close_codes) > 5 else ''} ({len(ledger.close_codes)})")


@pytest.mark.parametrize("history", ["deep", "shallow"])
def test_a_stalled_server_does_not_stall_the_pool(tmp_path, history):
    """deep: history holds everything, so server 0 repairs every gap and nobody is closed;
    shallow: history holds almost nothing, so server 0 closes what it cannot repair with
    1012 and those clients are told recovered: false."""
    rounds = ROUNDS_BEFORE + stalled_rounds()
    history_size = rounds + 50 if history == "deep" else 2
    pipe = Pipeline(tmp_path, servers=2, FLOW_ZMQ_HWM=str(HWM), FLOW_HISTORY_SIZE=str(history_size))
    frozen = pipe.servers[0]
    try:
        async def run():
            loop = asyncio.get_running_loop()
            clients = {s: [ResumingClient(pipe.url(s), lambda s=s, n=n: pipe.token(user(s, n)))
                           for n in range(USERS_PER_SERVER)] for s in (0, 1)}
            everyone = clients[0] + clients[1]
            for client in everyone:
                client.start()
            await wait_for(lambda: all(c.authenticated.is_set() for c in everyone), 30, "all authenticated")
            gate, stop = threading.Event(), threading.Event()
            publishing = loop.run_in_executor(None, publish, pipe, rounds, gate, stop)
            try:
                await wait_for(lambda: all(len(c.ids("MSG")) >= ROUNDS_BEFORE for c in everyone), 30,
                               "the first rounds")
                frozen.signal(signal.SIGSTOP)
                gate.set()
                broadcasts = await asyncio.wait_for(publishing, 120)

                def complete(c: ResumingClient) -> bool:
                    name = c.ledger.auth_oks[0]["username"]
                    return (stream_data(c, name) == list(range(rounds))
                            and stream_data(c, "*") == list(range(broadcasts)))

                await wait_for(lambda: all(complete(c) for c in clients[1]), 60,
                               "every message on server 1 while server 0 is frozen",
                               lambda: "; ".join(describe(c) for c in clients[1] if not complete(c))[:2000])
                assert state_of(frozen.pid) == "T"
            finally:
                stop.set()
                frozen.signal(signal.SIGCONT)
                await asyncio.gather(publishing, return_exceptions=True)

            heads = {"*": broadcasts}

            def settled(c: ResumingClient) -> bool:
                """Holds everything, or was told to reload and is at the head of each stream."""
                if complete(c):
                    return True
                name = c.ledger.auth_oks[0]["username"]
                want = {name: rounds, **heads}
                return (c.resynced and c.authenticated.is_set()
                        and all(c.positions.get(s, {}).get("seq") == seq for s, seq in want.items()))

            await wait_for(lambda: all(settled(c) for c in clients[0]), 60, "server 0's users to settle",
                           lambda: f"(heads {rounds} and '*' {broadcasts}) "
                                   + "; ".join(describe(c) for c in clients[0] if not settled(c))[:2000])
            for client in everyone:
                await client.stop()
            return clients, complete

        clients, complete = asyncio.run(run())
        stats = pipe.stats(0)
    finally:
        frozen.signal(signal.SIGCONT)
        pipe.stop()

    for client in clients[1]:
        ledger = client.ledger
        assert ledger.connects == 1 and ledger.close_codes == [] and ledger.resyncs == [], ledger.auth_oks
        assert ledger.gaps == [] and ledger.duplicates == 0 and ledger.problems == []
    for client in clients[0]:
        ledger = client.ledger
        assert ledger.gaps == [] and ledger.duplicates == 0 and ledger.problems == [], ledger
        if ledger.resyncs:
            assert 1012 in ledger.close_codes, ledger.close_codes
            assert ledger.auth_oks[-1]["recovered"] is False
        else:
            assert complete(client) and ledger.close_codes == [], ledger.close_codes
        for stream in {m["username"] for m in ledger.messages}:
            seen = stream_data(client, stream)
            assert seen == sorted(set(seen))  # once each, in order
    resynced = [c for c in clients[0] if c.ledger.resyncs]
    if history == "deep":
        # The proxy dropped for the frozen server and it repaired every gap.
        assert stats["repairs"] >= 1, stats
        assert resynced == [] and stats["gap_closes"] == 0, stats
    else:
        assert stats["gap_closes"] >= 1 and resynced, stats
