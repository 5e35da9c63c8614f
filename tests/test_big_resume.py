"""A resume of any size within history, to a client that reads promptly, is never a 4008
(PROTOCOL.md section 4): history is written under back-pressure, a page at a time."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest

from websockets.asyncio.client import connect

from pipeline import Pipeline, authenticate, recv_json

COUNT = 100
PAD = "x" * 300_000  # 100 of them: 30 MB of broadcast history, the send backlog is 4 MiB


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def reset_peak(pid: int) -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS; False where Linux refuses."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakSampler:
    """The largest VmRSS seen while running: where VmHWM cannot be reset."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = status_kib(pid, "VmRSS")
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.wait(0.005):  # a sampling period, not synchronisation
            self.peak = max(self.peak, status_kib(self.pid, "VmRSS"))

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(5)


@pytest.fixture
def pipe(tmp_path):
    pipeline = Pipeline(tmp_path, servers=1, FLOW_HISTORY_SIZE=str(COUNT), FLOW_MAX_MESSAGE=str(1 << 20))
    yield pipeline
    pipeline.stop()


def test_a_resume_of_30_mb_is_written_under_back_pressure(pipe):
    publisher = pipe.publisher()
    server = pipe.servers[0].pid

    async def run():
        ws, ok = await authenticate(pipe.url(), pipe.token("big"))
        await ws.close()
        # A witness connected throughout: once the last push reaches it, the proxy holds
        # all of them (one publisher's pushes are taken in order). It reads promptly (into
        # an unbounded queue), and the pushes are paced so that it can.
        witness, _ = await authenticate(pipe.url(), pipe.token("witness"), max_size=2**20, max_queue=None)
        for i in range(COUNT):
            publisher.push_all("BIG", {"i": i, "pad": PAD})
            await asyncio.sleep(0.01)  # load pacing: about 30 MB/s
        publisher.push("witness", "WITNESS", None)
        while (await recv_json(witness, 30))["id"] != "WITNESS":
            pass
        await witness.close()

        baseline = status_kib(server, "VmRSS")
        exact = reset_peak(server)
        with PeakSampler(server) as sampler:
            ws, ok2 = await authenticate(pipe.url(), pipe.token("big"), resume=ok["streams"], max_size=2**20)
            assert (ok2["recovered"], ok2["missed"]) == (True, COUNT), ok2
            got = [await recv_json(ws, 30) for _ in range(COUNT)]
        peak = status_kib(server, "VmHWM") if exact else sampler.peak
        start = ok["streams"]["*"]["seq"]
        assert [(m["id"], m["data"]["i"], m["seq"]) for m in got] == [
            ("BIG", i, start + 1 + i) for i in range(COUNT)
        ]
        # Still open: the server did not close it (a 4008 would end the socket here).
        await ws.send(json.dumps({"id": "PING"}))
        assert await recv_json(ws, 10) == {"id": "PONG"}
        await ws.close()
        return baseline, peak

    baseline, peak = asyncio.run(run())
    assert "closing 4008" not in pipe.logs()
    # The server held about a page of the 30 MB at a time, not all of it.
    grown_mib = (peak - baseline) / 1024
    assert grown_mib < 8, f"the server's RSS grew by {grown_mib:.1f} MiB during the resume"


CHANNELS = 14
PER_CHANNEL = 3  # of PAD each: 0.9 MB a channel, two pages


def test_many_channel_resumes_at_once_are_written_under_back_pressure(tmp_path):
    # Old server: each SUBSCRIBE's task wrote a whole page before waiting for the socket,
    # so fourteen resumes put about 4 MB into tornado's buffer (bounded at 1 MiB here) in
    # one turn of the loop, before any client could read it: a prompt reader was closed
    # 4008 for its own resume.
    pipe = Pipeline(tmp_path, servers=1, FLOW_HISTORY_SIZE=str(COUNT), FLOW_MAX_MESSAGE=str(1 << 20),
                    FLOW_MAX_CHANNELS=str(CHANNELS), FLOW_SEND_BACKLOG=str(1 << 20))
    names = [f"doc:{i}" for i in range(CHANNELS)]
    token = pipe.token("reader", extra={"channels": ["doc:*"]})

    async def auth(**fields):
        ws = await connect(pipe.url(), max_size=2**20, max_queue=None)
        assert await recv_json(ws) == {"id": "AUTH REQUEST"}
        await ws.send(json.dumps({"id": "AUTH", "token": token, **fields}))
        ok = await recv_json(ws)
        assert ok["id"] == "AUTH OK", ok
        return ws

    async def run():
        publisher = pipe.publisher()
        ws = await auth(subscribe={name: {} for name in names})
        since = {}
        while len(since) < CHANNELS:
            frame = await recv_json(ws)
            assert frame["id"] == "SUBSCRIBE OK", frame
            since[frame["channel"]] = {"seq": frame["seq"], "epoch": frame["epoch"]}
        await ws.close()
        for i in range(PER_CHANNEL):
            for name in names:
                publisher.publish(name, "BIG", {"i": i, "pad": PAD})
                await asyncio.sleep(0.005)  # load pacing
        assert publisher.flush(10) == 0
        ws = await auth()
        for name in names:  # separate frames: separate tasks, all at once
            await ws.send(json.dumps({"id": "SUBSCRIBE", "channel": name, "since": since[name]}))
        got: dict[str, list[int]] = {name: [] for name in names}
        oks = 0
        while oks < CHANNELS or sum(map(len, got.values())) < CHANNELS * PER_CHANNEL:
            frame = await recv_json(ws, 30)
            if frame["id"] == "SUBSCRIBE OK":
                assert (frame["recovered"], frame["missed"]) == (True, PER_CHANNEL), frame
                oks += 1
            else:
                assert frame["id"] == "BIG", frame
                got[frame["channel"]].append(frame["data"]["i"])
        assert all(v == list(range(PER_CHANNEL)) for v in got.values()), got
        await ws.send(json.dumps({"id": "PING"}))
        assert await recv_json(ws, 10) == {"id": "PONG"}
        await ws.close()

    try:
        asyncio.run(run())
        assert "closing 4008" not in pipe.logs()
    finally:
        pipe.stop()
