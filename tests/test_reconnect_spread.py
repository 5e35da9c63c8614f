"""Two thousand real browser clients (static/js/websocket.js in Node, on the `ws` package)
against a real proxy and two WebSocket servers: when a kill -9 of the proxy makes the
servers close every socket (1012, PROTOCOL.md sections 3 and 11), the clients come back
spread over seconds, not in one half-second burst."""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import threading
from pathlib import Path
from typing import IO, Any, Iterator

import pytest

from pipeline import Pipeline
from support import ROOT, wait_until

CLIENTS = 2000
BENCH = ROOT / "bench"
NODE = shutil.which("node")
NPM = shutil.which("npm")


@pytest.fixture(scope="module")
def ws_package() -> Path:
    """bench/node_modules with the `ws` package bench/package.json pins, installed if missing."""
    if NODE is None:
        pytest.skip("optional dependency missing: node (Node.js >= 20)")
    installed = BENCH / "node_modules" / "ws" / "package.json"
    if not installed.exists():
        if NPM is None:
            pytest.skip("optional dependency missing: npm (to install the ws package into bench/)")
        result = subprocess.run([NPM, "ci", "--prefix", str(BENCH)], cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and installed.exists(), (
            f"npm ci --prefix bench exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return installed.parent


class Herd:
    """tests/js/herd.js running, its JSON-line events collected by a reader thread."""

    def __init__(self, config: Path, stderr_path: Path) -> None:
        assert NODE is not None
        self._stderr = open(stderr_path, "wb")
        self.stderr_path = stderr_path
        self.popen = subprocess.Popen(
            [NODE, str(ROOT / "tests" / "js" / "herd.js"), str(config)], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
        )
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        assert self.popen.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.popen.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            event = json.loads(line)
            with self._lock:
                self.events.append(event)

    def snapshot(self) -> list[dict[str, Any]]:
        if self.popen.poll() is not None:
            raise AssertionError(f"herd.js exited {self.popen.returncode}:\n{self.stderr()}")
        with self._lock:
            return list(self.events)

    def authenticated(self, times: int) -> int:
        """How many instances authenticated at least ``times`` times."""
        return sum(1 for e in self.snapshot() if e["event"] == "auth" and e["n"] == times)

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.popen.poll() is None:
            assert self.popen.stdin is not None
            self.popen.stdin.close()  # herd.js closes every client and exits
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._reader.join(5)
        assert self.popen.stdout is not None
        self.popen.stdout.close()
        self._stderr.close()


def wait_for(herd: Herd, pipeline: Pipeline, times: int, timeout: float, since: int = 0) -> None:
    """Until every client has authenticated ``times`` times; on timeout, say what happened."""
    try:
        wait_until(lambda: herd.authenticated(times) == CLIENTS, timeout, 0.1,
                   f"{CLIENTS} clients authenticated {times} time(s)")
    except AssertionError as exc:
        events = herd.snapshot()[since:]
        codes = collections.Counter((e["code"], e["reason"]) for e in events if e["event"] == "close")
        raise AssertionError(
            f"{exc}: {herd.authenticated(times)} did; closes: {codes.most_common(5)}\n"
            f"--- herd.js stderr\n{herd.stderr()}\n--- server logs (tail)\n{pipeline.logs()[-4000:]}"
        ) from None


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[Pipeline]:
    pipe = Pipeline(tmp_path, servers=2)
    try:
        yield pipe
    finally:
        pipe.stop()


def test_clients_spread_their_reconnects_after_the_pool_closes_them(
        ws_package: Path, pipeline: Pipeline, tmp_path: Path) -> None:
    config = tmp_path / "herd.json"
    config.write_text(json.dumps({
        "urls": [pipeline.url(0), pipeline.url(1)],
        "tokens": [pipeline.token(f"herd{i}") for i in range(CLIENTS)],
    }))
    herd = Herd(config, tmp_path / "herd.err")
    try:
        wait_for(herd, pipeline, 1, 120)
        before = len(herd.snapshot())

        # kill -9: the proxy's in-memory history and numbering are gone with it.
        pipeline.kill_proxy()
        pipeline.start_proxy()

        wait_for(herd, pipeline, 2, 180, since=before)

        events = herd.snapshot()[before:]
        closes = [e for e in events if e["event"] == "close"]
        first_closes: dict[int, dict[str, Any]] = {}
        for event in closes:
            first_closes.setdefault(event["i"], event)
        codes = collections.Counter(e["code"] for e in first_closes.values())
        assert codes == {1012: CLIENTS}, (
            f"how the servers closed the clients after the kill: {codes}, "
            f"reasons {collections.Counter(e['reason'] for e in first_closes.values()).most_common(3)}")

        assert len([e for e in events if e["event"] == "auth" and e["n"] == 2]) == CLIENTS
        # The herd is of reconnects (handshakes, token fetches): when each client opened its
        # next socket. (AUTH OK may bunch up behind it: sockets that reconnect before the new
        # proxy is up wait for it, and are all answered once it is.)
        first_open: dict[int, int] = {}
        for event in events:
            if event["event"] == "open":
                first_open.setdefault(event["i"], event["t"])
        back = sorted(first_open.values())
        assert len(back) == CLIENTS
        spread_ms = back[-1] - back[0]
        buckets = collections.Counter((t - back[0]) // 500 for t in back)
        busiest = max(buckets.values())
        histogram = [buckets.get(b, 0) for b in range(max(buckets) + 1)]
        assert spread_ms > 2000, f"every client came back within {spread_ms} ms: {histogram}"
        assert busiest <= CLIENTS * 0.25, (
            f"{busiest} of {CLIENTS} clients came back in the same 0.5 s: {histogram}")

        # Nothing was replayed (the history died with the proxy): every page reloads.
        resynced = {e["i"] for e in events if e["event"] == "resync"}
        assert len(resynced) == CLIENTS, f"{len(resynced)} of {CLIENTS} pages were told to resync"
    finally:
        herd.stop()
