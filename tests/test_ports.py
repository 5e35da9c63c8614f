"""A port in use stops `flow run` and `make` before anything starts, with one line naming it.

Before, nginx on a taken port restarted forever while `make status` said RUNNING, and a
second stack's WebSocket servers on the same FLOW_WS_PORT bound beside the first one's
through SO_REUSEPORT and silently took a share of its sockets. A port held by a plain
socket listening WITH SO_REUSEPORT is what such a second stack's server looks like.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import Stack
from support import ROOT, base_env, port_open

DEADLINE = 60.0


def run_bounded(args: list[str], env: dict[str, str], timeout: float = DEADLINE
                ) -> subprocess.CompletedProcess[str]:
    """Run ``args`` in its own session; past the deadline kill the whole group (a stack the
    old code would have started) and fail."""
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"{args} still ran after {timeout}s:\n{out}\n{err}") from None
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def hold(port: int, reuseport: bool) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = base_env(tmp_path, FLOW_NGINX_WORKERS="1")
    yield env
    # Nothing was started: no supervisord, nothing on the stack's other ports.
    assert not Path(env["FLOW_RUN_DIR"], "supervisord.pid").exists()
    assert not Path(env["FLOW_RUN_DIR"], "supervisor.sock").exists()


def refusal(result: subprocess.CompletedProcess[str], port: str, setting: str) -> None:
    assert result.returncode != 0
    flow_lines = [line for line in result.stderr.splitlines() if line.startswith("flow:")]
    assert flow_lines == [f"flow: port {port} ({setting}) is in use by another process; "
                          "choose another or stop it"], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("setting, reuseport", [
    ("FLOW_HTTP_PORT", False),
    ("FLOW_WS_PORT", True),
    ("FLOW_APP_PORT", False),
])
def test_flow_run_stops_on_a_taken_port(env: dict[str, str], setting: str, reuseport: bool) -> None:
    port = int(env[setting])
    with hold(port, reuseport):
        result = run_bounded([sys.executable, "-m", "flowcore", "run"], env)
    refusal(result, str(port), setting)
    others = [int(env[name]) for name in ("FLOW_HTTP_PORT", "FLOW_WS_PORT", "FLOW_APP_PORT")
              if name != setting]
    assert not any(port_open(p) for p in others)


def test_flow_run_stops_on_a_taken_zeromq_endpoint_port(env: dict[str, str]) -> None:
    port = int(env["FLOW_FANOUT_ENDPOINT"].rsplit(":", 1)[1])
    with hold(port, False):
        result = run_bounded([sys.executable, "-m", "flowcore", "run"], env)
    refusal(result, str(port), "FLOW_FANOUT_ENDPOINT")


def test_make_run_stops_on_a_ws_port_held_with_reuseport(env: dict[str, str]) -> None:
    port = int(env["FLOW_WS_PORT"])
    with hold(port, True):
        result = run_bounded(["make", "-s", "--no-print-directory", "run"], env, timeout=120)
    refusal(result, str(port), "FLOW_WS_PORT")


def test_make_reads_flow_env_for_every_variable(tmp_path: Path) -> None:
    """The old Makefile exported FLOW_RUN_DIR, FLOW_PYTHON and FLOW_SECRET_FILE with its own
    defaults, so flow.env's values for them were ignored."""
    env = base_env(tmp_path)
    for name in ("FLOW_RUN_DIR", "FLOW_SECRET_FILE", "FLOW_PYTHON", "FLOW_NGINX_WORKERS", "FLOW_HTTP_PORT"):
        env.pop(name, None)
    values = {
        "FLOW_RUN_DIR": str(tmp_path / "run-from-env"),
        "FLOW_SECRET_FILE": str(tmp_path / "secret-from-env"),
        "FLOW_PYTHON": sys.executable,
        "FLOW_NGINX_WORKERS": "3",
        "FLOW_HTTP_PORT": "5999",
    }
    Path(env["FLOW_ENV_FILE"]).write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    result = run_bounded(["make", "-s", "--no-print-directory", "config"], env, timeout=120)
    assert result.returncode == 0, result.stderr
    shown = set(result.stdout.splitlines())
    assert {f"{k}={v}" for k, v in values.items()} <= shown, result.stdout


@pytest.mark.stack
def test_a_second_stack_on_the_same_ws_port_is_refused(make_stack: Callable[..., Stack],
                                                       tmp_path: Path) -> None:
    first = make_stack()
    second = base_env(tmp_path / "second", FLOW_WS_PORT=first.settings.ws_port, FLOW_NGINX_WORKERS="1")
    result = run_bounded([sys.executable, "-m", "flowcore", "run"], second)
    refusal(result, str(first.settings.ws_port), "FLOW_WS_PORT")
    assert not Path(second["FLOW_RUN_DIR"], "supervisord.pid").exists()
    assert first.all_running() and first.websocket_greets()


# --- adversarial review (adv_a) ---------------------------------------------------------


def test_check_names_an_ipc_endpoint_in_a_missing_directory_or_set_twice(tmp_path: Path) -> None:
    """The proxy's bind failed only after the stack was up; `flow check --ports` said ok."""
    env = base_env(tmp_path, FLOW_PUBLISH_ENDPOINT=f"ipc://{tmp_path}/no/dir/publish",
                   FLOW_FANOUT_ENDPOINT=f"ipc://{tmp_path}/fanout",
                   FLOW_CONTROL_ENDPOINT=f"ipc://{tmp_path}/fanout")
    result = run_bounded([sys.executable, "-m", "flowcore", "check", "--ports"], env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"flow: ipc://{tmp_path}/no/dir/publish (FLOW_PUBLISH_ENDPOINT): the directory "
        f"{tmp_path}/no/dir does not exist",
        f"flow: ipc://{tmp_path}/fanout is set for both FLOW_FANOUT_ENDPOINT and FLOW_CONTROL_ENDPOINT; "
        "give each its own",
    ]


def test_check_names_unix_socket_paths_too_long_to_bind(tmp_path: Path) -> None:
    """supervisord's socket (FLOW_RUN_DIR) and an ipc:// endpoint past sun_path's 107 bytes
    could not be bound, after `flow check` said ready."""
    deep = tmp_path / ("d" * 110)
    env = base_env(tmp_path, FLOW_RUN_DIR=str(deep), FLOW_PUBLISH_ENDPOINT=f"ipc://{deep}/p")
    ports = run_bounded([sys.executable, "-m", "flowcore", "check", "--ports"], env)
    assert ports.returncode == 1 and "Traceback" not in ports.stderr
    assert ports.stderr.splitlines() == [
        f"flow: ipc://{deep}/p (FLOW_PUBLISH_ENDPOINT): a path of {len(str(deep)) + 2} bytes, "
        "longer than a Unix socket's 107; choose a shorter one"]
    full = run_bounded([sys.executable, "-m", "flowcore", "check"], env)
    assert full.returncode == 1
    assert f"flow: FLOW_RUN_DIR={str(deep)!r} is too deep: {deep}/supervisor.sock is longer than " \
           "a Unix socket path may be (107 bytes); choose a shorter one" in full.stderr.splitlines()
