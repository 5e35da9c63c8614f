"""A resume of any size within history, to a client that reads promptly, is never a 4008
(PROTOCOL.md section 4): history is written under back-pressure, a page at a time."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest

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
