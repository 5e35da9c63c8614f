"""The stack on the Redis engine (FLOW_ENGINE=redis): its own redis-server under supervisord.

With no FLOW_REDIS_URL, `flow run` starts Debian's redis-server (flowcore.redis_server) on
an owner-only Unix socket in the run dir, with the settings the engine relies on, and no
message proxy; `flow stop` ends it. With a URL the stack starts neither. A push made with
the Redis engine's settings reaches a browser's socket through nginx.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import redis

from conftest import Stack, pid_alive
from flowcore import cli
from flowcore.nginx import find_nginx, stack_env
from flowcore.redis_server import find_redis_server
from flowcore.settings import load_settings
from support import ROOT, base_env, port_open, wait_until

FLOW = [sys.executable, "-m", "flowcore"]


def flow(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FLOW, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def require_binaries() -> None:
    if find_nginx() is None:
        pytest.skip("optional dependency missing: nginx (Debian: apt-get install nginx)")
    if find_redis_server() is None:
        pytest.skip("optional dependency missing: redis-server (Debian: apt-get install redis-server)")


# --- configuration, no stack ----------------------------------------------------------------


@pytest.mark.parametrize("overrides, proxy, redis_server", [
    ({}, "1", "0"),
    ({"FLOW_ENGINE": "redis"}, "0", "1"),
    ({"FLOW_ENGINE": "redis", "FLOW_REDIS_URL": "redis://:pw@10.0.0.5:6379/2"}, "0", "0"),
])
def test_the_engine_decides_which_process_supervisord_starts(
        tmp_path: Path, overrides: dict[str, str], proxy: str, redis_server: str) -> None:
    env = stack_env(load_settings(environ=base_env(tmp_path, **overrides)))
    assert (env["FLOW_PROXY_PROCESSES"], env["FLOW_REDIS_PROCESSES"]) == (proxy, redis_server)


def test_rendered_redis_conf_holds_what_the_engine_relies_on(tmp_path: Path) -> None:
    run_dir = tmp_path / "run with space"
    (run_dir / "redis").mkdir(parents=True)
    (run_dir / "redis").chmod(0o755)  # left so by someone: tightened, it holds every history
    env = base_env(tmp_path, FLOW_ENGINE="redis", FLOW_RUN_DIR=run_dir)
    result = flow("redis", "--render", env=env)
    assert result.returncode == 0, result.stderr
    conf = Path(result.stdout.strip())
    assert conf == run_dir / "redis.conf"
    directives = [line for line in conf.read_text().splitlines() if line and not line.startswith("#")]
    assert directives == [
        "port 0",
        f'unixsocket "{run_dir}/redis.sock"',
        "unixsocketperm 700",
        "protected-mode yes",
        f'dir "{run_dir}/redis"',
        "daemonize no",
        "supervised no",
        'logfile ""',
        "appendonly yes",
        "appendfsync everysec",
        'save ""',
        "maxmemory-policy noeviction",
        "client-output-buffer-limit pubsub 64mb 16mb 60",
    ]
    assert stat.S_IMODE((run_dir / "redis").stat().st_mode) == 0o700


@pytest.mark.parametrize("overrides, expected", [
    ({"FLOW_ENGINE": "redis", "FLOW_REDIS_URL": "redis://:secret-pw@127.0.0.1:1/0"},
     "FLOW_REDIS_URL is set: Flow uses that Redis and runs no redis-server of its own"),
    ({}, "FLOW_ENGINE=zmq: the stack runs no redis-server"),
])
def test_flowcore_redis_refuses_when_the_stack_runs_no_redis_server(
        tmp_path: Path, overrides: dict[str, str], expected: str) -> None:
    result = flow("redis", env=base_env(tmp_path, **overrides))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"flow: bad configuration: {expected}"]
    assert "secret-pw" not in result.stderr
    assert not (tmp_path / "run" / "redis.conf").exists()


def test_check_says_in_one_line_that_redis_server_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flowcore.redis_server

    monkeypatch.setattr(flowcore.redis_server, "find_redis_server", lambda environ=None: None)
    settings = load_settings(environ=base_env(tmp_path, FLOW_ENGINE="redis"))
    problems = cli.problems_of(settings, stack_env(settings), running=False)
    assert [line for line in problems if "redis" in line] == [
        "redis-server is not installed, and FLOW_ENGINE=redis without FLOW_REDIS_URL runs its own "
        "(Debian: apt-get install redis-server; or set FLOW_REDIS_URL)"]
    # An existing Redis needs no local server, but must answer before the stack starts
    # (said in one line, without its password); the ZeroMQ engine needs none at all.
    settings = load_settings(environ=base_env(tmp_path, FLOW_ENGINE="redis",
                                              FLOW_REDIS_URL="redis://:pw@127.0.0.1:1"))
    problems = [line for line in cli.problems_of(settings, stack_env(settings), running=False) if "edis" in line]
    assert len(problems) == 1 and problems[0].startswith("Redis at redis://:***@127.0.0.1:1 is not reachable")
    settings = load_settings(environ=base_env(tmp_path))
    assert not [line for line in cli.problems_of(settings, stack_env(settings), running=False) if "redis" in line]


def test_check_ports_on_the_redis_engine(tmp_path: Path) -> None:
    """The ZeroMQ endpoints are nobody's to bind; the redis socket of the run dir is."""
    env = base_env(tmp_path, FLOW_ENGINE="redis")
    run_dir = Path(env["FLOW_RUN_DIR"])
    run_dir.mkdir()
    publish_port = int(env["FLOW_PUBLISH_ENDPOINT"].rsplit(":", 1)[1])
    with socket.socket() as tcp, socket.socket(socket.AF_UNIX) as unix:
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("127.0.0.1", publish_port))
        tcp.listen()
        free = flow("check", "--ports", env=env)
        assert free.returncode == 0, free.stderr
        unix.bind(str(run_dir / "redis.sock"))
        unix.listen()
        taken = flow("check", "--ports", env=env)
    assert taken.returncode == 1
    assert taken.stderr.splitlines() == [
        f"flow: {run_dir}/redis.sock (the stack's redis-server) is in use by another process; "
        "stop it, or choose another FLOW_RUN_DIR"]


# --- flow run / flow stop -------------------------------------------------------------------


def supervised(env: dict[str, str]) -> dict[str, tuple[str, int | None]]:
    """`flow status` as {name: (state, pid)}."""
    states: dict[str, tuple[str, int | None]] = {}
    for line in flow("status", env=env).stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isupper():
            pid = int(parts[3].rstrip(",")) if parts[1] == "RUNNING" and len(parts) >= 4 else None
            states[parts[0]] = (parts[1], pid)
    return states


@pytest.mark.stack
def test_flow_run_starts_its_own_redis_server_and_flow_stop_ends_it(tmp_path: Path) -> None:
    require_binaries()
    env = base_env(tmp_path, FLOW_ENGINE="redis", FLOW_NGINX_WORKERS="1")
    run_dir, log_dir = Path(env["FLOW_RUN_DIR"]), Path(env["FLOW_LOG_DIR"])
    sock = run_dir / "redis.sock"
    out = tmp_path / "flow-run.out"
    with open(out, "wb") as sink:
        proc = subprocess.Popen([*FLOW, "run"], env=env, cwd=ROOT, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
    pid: int | None = None
    try:
        def redis_running() -> int | None:
            assert proc.poll() is None, out.read_text()
            state, running_pid = supervised(env).get("redis", ("", None))
            return running_pid if state == "RUNNING" and sock.exists() else None

        pid = wait_until(redis_running, 60, 0.1, "redis RUNNING in flow status, its socket in the run dir")
        # Owner-only: the socket and the directory of the append-only file.
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o700
        assert stat.S_IMODE((run_dir / "redis").stat().st_mode) == 0o700
        with redis.Redis(unix_socket_path=str(sock)) as client:
            assert client.ping()
            # The supervised process is redis-server itself (exec'd), so SIGTERM reaches it.
            assert client.info("server")["process_id"] == pid
            config = {name: client.config_get(name)[name] for name in (
                "port", "appendonly", "appendfsync", "save", "maxmemory-policy",
                "client-output-buffer-limit", "protected-mode")}
        assert config["port"] == "0"  # no TCP listener
        assert config["appendonly"] == "yes" and config["appendfsync"] == "everysec"
        assert config["save"] == "" and config["maxmemory-policy"] == "noeviction"
        assert "pubsub 67108864 16777216 60" in config["client-output-buffer-limit"]
        assert config["protected-mode"] == "yes"
        # No proxy: not supervised at all (so `flow status` lists only what runs), nothing
        # on the ZeroMQ endpoint.
        assert "proxy" not in supervised(env)
        assert not port_open(int(env["FLOW_PUBLISH_ENDPOINT"].rsplit(":", 1)[1]))
        wait_until(lambda: f"ready to accept connections at {sock}" in (log_dir / "redis.log").read_text(),
                   10, 0.05, "redis-server's log in FLOW_LOG_DIR/redis.log")
        assert "flow: exec " in (log_dir / "redis.log").read_text()

        stopped = flow("stop", env=env)
        assert stopped.returncode == 0, stopped.stderr
        assert proc.wait(30) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    assert pid is not None
    wait_until(lambda: not pid_alive(pid), 15, 0.05, "redis-server to exit")
    assert not sock.exists()  # redis-server removes it at a clean shutdown
    assert (run_dir / "redis" / "appendonlydir").is_dir()
    assert flow("status", env=env).returncode == 3


# --- a push through the Redis engine --------------------------------------------------------


@pytest.mark.stack
def test_a_push_on_the_redis_engine_reaches_a_socket_through_nginx(
        make_stack: Callable[..., Stack]) -> None:
    from websockets.sync.client import connect
    from websockets.typing import Origin

    import flow as flow_module
    from flowcore.tokens import issue_token

    require_binaries()
    stack = make_stack(FLOW_ENGINE="redis")
    assert sorted(name for name in stack.states() if not name.startswith("websocket:")) == [
        "app", "nginx", "redis"]
    assert stack.settings.engine == "redis" and stack.settings.redis_url == ""
    check = flow("check", env=stack.env)  # reaches the engine at the run dir's socket
    assert check.returncode == 0 and "engine answers" in check.stdout, check.stderr
    token = issue_token(stack.settings, "redis-user")
    with connect(stack.ws_url, origin=Origin(stack.base_url), proxy=None, open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10)) == {"id": "AUTH REQUEST"}
        ws.send(json.dumps({"id": "AUTH", "token": token}))
        assert json.loads(ws.recv(timeout=10))["id"] == "AUTH OK"
        publisher = flow_module.Flow(settings=stack.settings)
        try:
            publisher.push("someone-else", "NOT MINE", 0)
            publisher.push("redis-user", "ORDER SHIPPED", {"order": 7})
            assert publisher.flush(10) == 0
        finally:
            publisher.close()
        frame = ws.recv(timeout=10)
        while frame == "<3":
            frame = ws.recv(timeout=10)
    message = json.loads(frame)
    assert (message["id"], message["username"], message["data"]) == (
        "ORDER SHIPPED", "redis-user", {"order": 7})
