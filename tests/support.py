"""Test helpers: ephemeral ports, waiting on conditions, real processes with logs."""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, TypeVar

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
T = TypeVar("T")


_handed_out: set[int] = set()


def _port_share() -> tuple[int, int]:
    """(index, count) of this pytest-xdist worker, (0, 1) outside xdist. Children such as
    bench/run.py inherit the variables, so they stay in their worker's share."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")
    if worker.startswith("gw") and worker[2:].isdigit() and count.isdigit() and int(count) > 1:
        return int(worker[2:]) % int(count), int(count)
    return 0, 1


def free_port() -> int:
    """An ephemeral loopback port that was free a moment ago, and that this process has
    not handed out before: the kernel may offer a just-closed port again, and two parts of
    one stack on the same port fail in confusing ways (nginx talking to a ZeroMQ socket).

    Under pytest-xdist each worker takes only its share of the ports (port // 2 modulo the
    worker count: Linux hands out even ports first), so two workers never hand out the same
    port in the moment between this check and their servers binding it."""
    index, count = _port_share()
    for _ in range(100 * count):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if (port // 2) % count == index and port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no fresh ephemeral port in {100 * count} tries")


def _ephemeral_floor() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_block(count: int) -> int:
    """The first of ``count`` consecutive loopback ports, free now and never handed out by
    free_port, for settings that derive ports from one (FLOW_METRICS_PORT + 1 + index).

    Taken below the kernel's ephemeral range: there, between this check and the server's
    bind, a client connection anywhere on the machine may take one as its source port and
    the server fails with EADDRINUSE. Each pytest-xdist worker draws from its own slice."""
    index, workers = _port_share()
    floor, ceiling = 10000, _ephemeral_floor()
    if ceiling - floor < 100 * workers:
        floor, ceiling = 1024, max(ceiling, 1024 + 100 * workers)
    span = (ceiling - floor) // workers
    start = floor + index * span
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(start, start + span - count)
        ports = range(base, base + count)
        if any(port in _handed_out for port in ports):
            continue
        try:
            with contextlib.ExitStack() as held:
                for port in ports:
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        _handed_out.update(ports)
        return base
    raise RuntimeError(f"no {count} consecutive free ports below {ceiling} in 200 tries")


def wait_until(condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.02,
               message: str = "condition") -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def base_env(tmp_path: Path, **overrides: object) -> dict[str, str]:
    """A FLOW_ environment on fresh ephemeral ports, isolated from any flow.env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOW_")}
    env.update(
        FLOW_ENV_FILE=str(tmp_path / "no-flow.env"),
        FLOW_SECRET_FILE=str(tmp_path / "no-secret"),
        FLOW_SECRET=secrets.token_hex(32),
        FLOW_APP_SECRET=secrets.token_hex(32),
        FLOW_PUBLISH_ENDPOINT=f"tcp://127.0.0.1:{free_port()}",
        FLOW_FANOUT_ENDPOINT=f"tcp://127.0.0.1:{free_port()}",
        FLOW_CONTROL_ENDPOINT=f"tcp://127.0.0.1:{free_port()}",
        FLOW_HTTP_PORT=str(free_port()),
        FLOW_WS_PORT=str(free_port()),
        FLOW_APP_PORT=str(free_port()),
        FLOW_LOG_DIR=str(tmp_path / "log"),
        FLOW_RUN_DIR=str(tmp_path / "run"),
        PYTHONUNBUFFERED="1",
    )
    env.update({k: str(v) for k, v in overrides.items()})
    return env


class Proc:
    """A real child process whose output goes to a log file under the test's tmp dir."""

    def __init__(self, args: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(
            args, env=dict(env), cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode
