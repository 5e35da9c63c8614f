"""Shared fixtures: the REAL supervised stack (supervisord + nginx + every Flow process).

    @pytest.mark.stack
    def test_something(stack):                      # FLOW_ defaults, ephemeral ports
        urllib.request.urlopen(stack.base_url + "/")
        ...websocket connect to stack.ws_url with origin=stack.base_url...
        stack.ctl("restart", "app")                 # supervisorctl against this stack
        stack.pids("websocket")                     # [pid, pid] of RUNNING processes

    @pytest.mark.stack
    def test_other(make_stack):
        stack = make_stack(FLOW_WS_PROCESSES=3)     # any FLOW_ overrides

    `shared_stack` is the same, module-scoped, for tests that only observe the stack.

The stack is started from the project's own supervisord.conf and nginx.conf, on fresh
ephemeral ports (tests.support.base_env), with its run dir and log dir under the test's
tmp dir, so several stacks can run at once. It is ready when every program is RUNNING,
nginx serves `/` with 200 and `/websocket` answers a handshake with AUTH REQUEST.
Teardown stops supervisord with SIGTERM and checks it exited 0 and left no process behind.
The only reason to skip is a missing nginx binary.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest

from flowcore.cli import pid_alive
from flowcore.nginx import find_nginx, stack_env
from flowcore.settings import Settings, load_settings
from redisserver import make_redis, redis_server  # noqa: F401  (fixtures for every test module)
from support import ROOT, Proc, base_env, wait_until
from xdist_groups import (  # noqa: F401  (hooks: which tests share an xdist worker)
    pytest_collection_modifyitems, pytest_configure_node, pytest_unconfigure,
    pytest_xdist_make_scheduler)

SUPERVISOR_CONF = ROOT / "supervisord.conf"
START_TIMEOUT = 45.0
# Programs other than the WebSocket pool, each with one process.
SINGLE_PROGRAMS = ("proxy", "app", "nginx")

# Never route loopback test traffic through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None
             ) -> tuple[int, bytes]:
    """(status, body) of a GET; HTTP errors are answers too, not exceptions."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


class Stack:
    """A running supervisord stack. Build it with the `make_stack` / `stack` fixtures."""

    def __init__(self, tmp_path: Path, overrides: dict[str, object]) -> None:
        env = base_env(tmp_path, **overrides)
        env.setdefault("FLOW_RUN_DIR", str(tmp_path / "run"))
        env.setdefault("FLOW_NGINX_WORKERS", "1")
        env["FLOW_ROOT"] = str(ROOT)
        env["FLOW_PYTHON"] = sys.executable
        self.settings: Settings = load_settings(environ=env)
        # The same resolution the Makefile does with `python -m flowcore.nginx --print-env`.
        env.update(stack_env(self.settings, env))
        self.env: dict[str, str] = env
        self.tmp_path = tmp_path
        self.run_dir = Path(env["FLOW_RUN_DIR"])
        self.log_dir = Path(env["FLOW_LOG_DIR"])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.http_port = self.settings.http_port
        self.base_url = f"http://127.0.0.1:{self.http_port}"
        self.ws_url = f"ws://127.0.0.1:{self.http_port}/websocket"
        self.supervisord: Proc | None = None
        self._seen_pids: set[int] = set()

    # --- control ---------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> "Stack":
        self.supervisord = Proc(
            [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(SUPERVISOR_CONF)],
            self.env, self.tmp_path / "supervisord.out",
        )
        try:
            self.wait_ready(timeout)
        except Exception as exc:
            report = self.diagnostics()
            self.stop()
            raise AssertionError(f"the stack did not start: {exc}\n{report}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def ctl(self, *args: str, check: bool = True, timeout: float = 30.0) -> str:
        """Run supervisorctl against this stack; its output. Non-zero exit fails if check."""
        result = subprocess.run(
            [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(SUPERVISOR_CONF), *args],
            env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        )
        output = result.stdout + result.stderr
        if check and result.returncode != 0:
            raise AssertionError(f"supervisorctl {' '.join(args)} exited {result.returncode}:\n{output}")
        return output

    def states(self) -> dict[str, tuple[str, int | None]]:
        """{"websocket:websocket-0": ("RUNNING", pid), "app": ("STARTING", None), ...}"""
        states: dict[str, tuple[str, int | None]] = {}
        for line in self.ctl("status", check=False).splitlines():
            parts = line.split()
            if len(parts) < 2 or not parts[1].isupper():
                continue
            pid = None
            if parts[1] == "RUNNING" and len(parts) >= 4 and parts[2] == "pid":
                pid = int(parts[3].rstrip(","))
                self._seen_pids.add(pid)
            states[parts[0]] = (parts[1], pid)
        return states

    def pids(self, program: str) -> list[int]:
        """Pids of the RUNNING processes of one program ("websocket", "app", "proxy", "nginx")."""
        return [
            pid for name, (state, pid) in sorted(self.states().items())
            if name.split(":", 1)[0] == program and state == "RUNNING" and pid is not None
        ]

    def all_running(self) -> bool:
        states = self.states()
        # proxy, redis and api have one process or none (FLOW_PROXY_PROCESSES, FLOW_REDIS_PROCESSES,
        # FLOW_API_PROCESSES).
        expected = (len(SINGLE_PROGRAMS) - 1 + int(self.env["FLOW_PROXY_PROCESSES"])
                    + int(self.env["FLOW_REDIS_PROCESSES"]) + int(self.env.get("FLOW_API_PROCESSES", "0"))
                    + self.settings.ws_processes)
        return len(states) == expected and all(s == "RUNNING" for s, _ in states.values())

    # --- readiness -------------------------------------------------------------------

    def serves_index(self) -> bool:
        try:
            return http_get(self.base_url + "/", timeout=2)[0] == 200
        except OSError:
            return False

    def websocket_greets(self) -> bool:
        from websockets.exceptions import WebSocketException
        from websockets.sync.client import connect

        try:
            with connect(self.ws_url, origin=self.base_url, proxy=None, open_timeout=2,
                         close_timeout=1) as ws:
                return json.loads(ws.recv(timeout=2)) == {"id": "AUTH REQUEST"}
        except (OSError, TimeoutError, WebSocketException, ValueError):
            return False

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout

        def remaining() -> float:
            return max(0.1, deadline - time.monotonic())

        def supervised_and_running() -> bool:
            assert self.supervisord is not None
            if not self.supervisord.alive():
                raise AssertionError(f"supervisord exited with {self.supervisord.popen.returncode}")
            fatal = [name for name, (state, _) in self.states().items() if state == "FATAL"]
            if fatal:
                raise AssertionError(f"supervisord gave up on {', '.join(fatal)} (FATAL)")
            return self.all_running()

        wait_until(supervised_and_running, remaining(), 0.1, "every program RUNNING")
        wait_until(self.serves_index, remaining(), 0.1, f"GET {self.base_url}/ -> 200")
        wait_until(self.websocket_greets, remaining(), 0.1, f"AUTH REQUEST from {self.ws_url}")

    def diagnostics(self) -> str:
        """supervisord's output and the tail of every log, for failure messages."""
        chunks = []
        paths = [self.tmp_path / "supervisord.out", self.run_dir / "supervisord.log",
                 *sorted(self.log_dir.glob("*.log"))]
        for path in paths:
            if path.is_file():
                lines = path.read_text(errors="replace").splitlines()[-25:]
                chunks.append(f"--- {path}\n" + "\n".join(lines))
        return "\n".join(chunks)

    # --- teardown --------------------------------------------------------------------

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM supervisord (it stops every program); its exit status."""
        if self.supervisord is None:
            return None
        if self.supervisord.alive():
            try:
                self.states()  # remember the current pids, to check they are gone
            except (OSError, subprocess.SubprocessError, AssertionError):
                pass
        self.supervisord.signal(signal.SIGTERM)
        try:
            self.supervisord.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        status = self.supervisord.stop(timeout=5)  # kills it if it still runs; closes the log
        self.supervisord = None
        return status

    def leftover_pids(self) -> list[int]:
        return [pid for pid in sorted(self._seen_pids) if pid_alive(pid)]


def _require_nginx() -> None:
    if find_nginx() is None:
        pytest.skip("optional dependency missing: nginx (Debian: apt-get install nginx)")


def _stop_all(stacks: list[Stack]) -> None:
    """Stop every stack still running; fail if one exits badly or leaves a process."""
    problems = []
    for stack in stacks:
        if stack.supervisord is None:
            continue  # already stopped (by a test, or by a failed start)
        status = stack.stop()
        if status != 0:
            problems.append(f"supervisord exited {status}:\n{stack.diagnostics()}")
        try:
            wait_until(lambda: not stack.leftover_pids(), 10, 0.05, "supervised processes to exit")
        except AssertionError:
            problems.append(f"processes left running: {stack.leftover_pids()}")
    if problems:
        pytest.fail("stack teardown: " + "\n".join(problems))


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """A factory: make_stack(**FLOW_overrides) starts a stack and returns it when ready."""
    _require_nginx()
    stacks: list[Stack] = []

    def factory(**overrides: object) -> Stack:
        path = tmp_path / f"stack{len(stacks)}"
        path.mkdir()
        stack = Stack(path, overrides)
        stacks.append(stack)
        return stack.start()

    yield factory
    _stop_all(stacks)


@pytest.fixture
def stack(make_stack: Callable[..., Stack]) -> Stack:
    """One ready stack with the default settings (2 WebSocket servers) on ephemeral ports."""
    return make_stack()


@pytest.fixture(scope="module")
def shared_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One default stack for a whole test module: for tests that only look, never change it."""
    _require_nginx()
    stack = Stack(tmp_path_factory.mktemp("shared_stack"), {})
    try:
        yield stack.start()
    finally:
        _stop_all([stack])


@pytest.fixture(params=["zmq", "redis"])
def engine(request: pytest.FixtureRequest) -> str:
    """A test that takes this fixture runs once per engine (tests/pipeline.py ENGINES)."""
    return str(request.param)
