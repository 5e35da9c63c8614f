"""The `flow` command (flowcore.cli), run as a real process: `python -m flowcore ...`.

Against real stacks: `flow listen` and an independent WebSocket client receive what
`flow push` sends through nginx; `flow run` starts the stack with the app sized by
FLOW_APP_WORKERS, gunicorn's control socket in the run dir and the app log in Flow's
format, refuses a second start, and `flow stop` ends it with nothing left running.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import Stack, http_get, pid_alive
from flowcore.runtime import LOG_FORMAT
from flowcore.settings import load_settings
from flowcore.tokens import TokenVerifier, issue_token
from support import ROOT, base_env, port_open, wait_until

FLOW = [sys.executable, "-m", "flowcore"]


def flow(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FLOW, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("flow: "), lines
    return lines[0]


# --- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    ([], "required: COMMAND"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["push", "alice", "HELLO"], "push takes USER ID JSON"),
    (["push", "--all", "NEWS"], "push --all takes ID JSON"),
    (["push", "alice", "HELLO", "{not json"], "JSON: not valid JSON"),
    (["push", "alice", "AUTH OK", "{}"], "reserved"),
    (["push", "", "HELLO", "{}"], "username must not be empty"),
    (["push", "alice", "HELLO", "1", "--timeout", "soon"], "invalid float value: 'soon'"),
    (["token"], "required: USER"),
    (["token", "*"], "reserved for broadcasts"),
    (["token", "alice", "--ttl", "0"], "--ttl must be at least 1"),
    (["listen", ""], "username must not be empty"),
    (["listen", "alice", "--count", "x"], "invalid int value: 'x'"),
    (["check", "--everything"], "unrecognized arguments: --everything"),
    # adv_a: a traceback before (RecursionError; KeyError/ValueError from Tornado), and for
    # --timeout a process that never ended (a negative linger waits forever).
    (["push", "alice", "HELLO", "[" * 50000 + "]" * 50000], "JSON: nested too deeply"),
    (["push", "alice", "HELLO", "1", "--timeout=-1"], "argument --timeout: must be a number of seconds"),
    (["push", "alice", "HELLO", "1", "--timeout", "nan"], "argument --timeout: must be a number of seconds"),
    (["push", "alice", "HELLO", "1", "--timeout", "inf"], "argument --timeout: must be a number of seconds"),
    (["push", "alice", "HELLO", "1", "--timeout", "1e308"], "argument --timeout: must be a number of seconds"),
    (["token", "alice", "--ttl", "99999999999999999999"], "--ttl must be at most"),
    (["listen", "alice", "--url", "notaurl"], "--url 'notaurl': must be ws://"),
    (["listen", "alice", "--url", "http://127.0.0.1:1/websocket"], "must be ws://"),
    (["listen", "alice", "--url", "ws://[::1/websocket"], "Invalid IPv6 URL"),
    (["listen", "alice", "--url", "ws://127.0.0.1:99999/websocket"], "Port out of range"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], expected: str) -> None:
    result = flow(*args, env=base_env(tmp_path), timeout=30)
    assert result.returncode == 2, result
    assert expected in one_line(result)


@pytest.mark.parametrize("command", [["config"], ["run"], ["token", "alice"], ["push", "a", "B", "1"]])
def test_a_bad_setting_is_one_line_naming_it(tmp_path: Path, command: list[str]) -> None:
    result = flow(*command, env=base_env(tmp_path, FLOW_WS_PORT="abc"))
    assert result.returncode == 2
    assert "FLOW_WS_PORT='abc'" in one_line(result)


# --- without a stack -------------------------------------------------------------------


def test_config_prints_the_resolved_settings_with_secrets_masked(tmp_path: Path) -> None:
    env = base_env(tmp_path, FLOW_APP="mysite.wsgi:application", FLOW_APP_WORKERS="5")
    result = flow("config", env=env)
    assert result.returncode == 0, result.stderr
    lines = set(result.stdout.splitlines())
    assert {"FLOW_APP=mysite.wsgi:application", "FLOW_APP_WORKERS=5", "FLOW_SECRET=(set)",
            f"FLOW_HTTP_PORT={env['FLOW_HTTP_PORT']}"} <= lines
    assert env["FLOW_SECRET"] not in result.stdout and env["FLOW_APP_SECRET"] not in result.stdout


def test_check_passes_on_a_good_configuration(tmp_path: Path) -> None:
    result = flow("check", env=base_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "flow: ok (ready to run)"


def test_check_gives_one_line_per_problem(tmp_path: Path) -> None:
    import socket

    env = base_env(tmp_path, FLOW_HTTP_PROT="8080", FLOW_APP="no_such_module:app",
                   GUNICORN_CMD_ARGS="--workers 3 --bind 0.0.0.0:80")
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", int(env["FLOW_APP_PORT"])))
        held.listen()
        result = flow("check", env=env)
        ports_only = flow("check", "--ports", env=env)
    lines = result.stderr.splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(lines) == 4, lines
    assert all(line.startswith("flow: ") for line in lines)
    text = "\n".join(lines)
    assert "FLOW_HTTP_PROT" in text and "FLOW_HTTP_PORT" in text  # the typo, and the guess
    assert f"port {env['FLOW_APP_PORT']} (FLOW_APP_PORT) is in use" in text
    assert "FLOW_APP='no_such_module:app'" in text and "No module named 'no_such_module'" in text
    assert "GUNICORN_CMD_ARGS sets --bind" in text
    assert ports_only.returncode == 1
    assert ports_only.stderr.splitlines() == [line for line in lines if "(FLOW_APP_PORT) is in use" in line]


def test_check_tells_two_settings_on_one_port(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    env["FLOW_APP_PORT"] = env["FLOW_WS_PORT"]
    result = flow("check", "--ports", env=env)
    assert result.returncode == 1
    assert f"port {env['FLOW_WS_PORT']} is set for both FLOW_WS_PORT and FLOW_APP_PORT" in one_line(result)


def test_token_is_verified_by_the_servers_verifier(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    result = flow("token", "alice", "--ttl", "60", env=env)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    verified = TokenVerifier(load_settings(environ=env)).verify_claims(token)
    assert verified.username == "alice"
    assert verified.claims["exp"] - verified.claims["iat"] == 60


def test_secret_generates_both_files_once(tmp_path: Path) -> None:
    env = base_env(tmp_path, FLOW_SECRET_FILE=str(tmp_path / "s" / "jwt"),
                   FLOW_APP_SECRET_FILE=str(tmp_path / "s" / "app"))
    del env["FLOW_SECRET"], env["FLOW_APP_SECRET"]
    first = flow("secret", env=env)
    assert first.returncode == 0, first.stderr
    secrets = {name: (tmp_path / "s" / name).read_text() for name in ("jwt", "app")}
    assert all(len(value.strip()) == 64 for value in secrets.values())
    assert secrets["jwt"] != secrets["app"]
    assert all((tmp_path / "s" / name).stat().st_mode & 0o077 == 0 for name in secrets)
    again = flow("secret", env=env)
    assert again.returncode == 0
    assert {name: (tmp_path / "s" / name).read_text() for name in secrets} == secrets


def test_push_to_a_dead_proxy_is_reported_with_exit_1(tmp_path: Path) -> None:
    started = time.monotonic()
    result = flow("push", "alice", "HELLO", '{"n": 1}', "--timeout", "0.5", env=base_env(tmp_path))
    assert result.returncode == 1
    line = one_line(result)
    assert "1 message" in line and "could not be handed over" in line
    assert time.monotonic() - started < 20


def test_listen_without_a_server_says_so(tmp_path: Path) -> None:
    result = flow("listen", "alice", env=base_env(tmp_path))
    assert result.returncode == 1
    assert "cannot open ws://127.0.0.1:" in one_line(result)


# --- against a running stack -----------------------------------------------------------


def stack_env(stack: Stack) -> dict[str, str]:
    return dict(stack.env)


@pytest.mark.stack
def test_status_check_and_run_on_a_running_stack(shared_stack: Stack) -> None:
    env = stack_env(shared_stack)
    status = flow("status", env=env)
    assert status.returncode == 0, status.stderr
    assert len([line for line in status.stdout.splitlines() if " RUNNING " in line]) == 5
    check = flow("check", env=env)
    assert check.returncode == 0, check.stderr
    assert "engine answers" in check.stdout
    again = flow("run", env=env)
    assert again.returncode == 1
    assert "already running" in one_line(again)
    assert shared_stack.all_running()


@pytest.mark.stack
def test_push_reaches_a_real_socket_through_nginx(shared_stack: Stack) -> None:
    from websockets.sync.client import connect
    from websockets.typing import Origin

    env = stack_env(shared_stack)
    token = issue_token(shared_stack.settings, "pushed-user")
    with connect(shared_stack.ws_url, origin=Origin(shared_stack.base_url), proxy=None,
                 open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10)) == {"id": "AUTH REQUEST"}
        ws.send(json.dumps({"id": "AUTH", "token": token}))
        assert json.loads(ws.recv(timeout=10))["id"] == "AUTH OK"
        result = flow("push", "pushed-user", "ORDER SHIPPED", '{"order": 7}', env=env)
        assert result.returncode == 0, result.stderr
        broadcast = flow("push", "--all", "NEWS", '"hello"', env=env)
        assert broadcast.returncode == 0, broadcast.stderr
        got: list[dict[str, object]] = []
        while len(got) < 2:
            frame = ws.recv(timeout=10)
            if frame != "<3":
                got.append(json.loads(frame))
    assert [(m["id"], m["username"], m["data"]) for m in got] == [
        ("ORDER SHIPPED", "pushed-user", {"order": 7}), ("NEWS", "*", "hello")]


@pytest.mark.stack
def test_listen_prints_what_the_user_receives(shared_stack: Stack, tmp_path: Path) -> None:
    import flow as flow_module

    env = stack_env(shared_stack)
    err_path = tmp_path / "listen.err"
    with open(err_path, "w") as err:
        listener = subprocess.Popen([*FLOW, "listen", "listener", "--count", "2"], env=env, cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        wait_until(lambda: "listening as listener" in err_path.read_text() or listener.poll() is not None,
                   20, 0.05, "flow listen to authenticate")
        assert listener.poll() is None, err_path.read_text()
        publisher = flow_module.Flow(settings=shared_stack.settings)
        try:
            publisher.push("someone-else", "NOT MINE", 0)
            publisher.push("listener", "HELLO", {"n": 1})
            publisher.push("listener", "HELLO", {"n": 2})
        finally:
            publisher.close()
        out, _ = listener.communicate(timeout=20)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait(5)
    assert listener.returncode == 0, err_path.read_text()
    messages = [json.loads(line) for line in out.splitlines()]
    assert [(m["id"], m["username"], m["data"]) for m in messages] == [
        ("HELLO", "listener", {"n": 1}), ("HELLO", "listener", {"n": 2})]
    assert messages[1]["seq"] == messages[0]["seq"] + 1


# --- flow run / flow stop ----------------------------------------------------------------

# LOG_FORMAT as a pattern: "2026-12-02 00:49:52,238 INFO gunicorn.error[10698] ..."
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
                      r"[\w.]+\[\d+\] ")


def workers_of(master: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == master:
            children.append(int(entry.name))
    return children


@pytest.mark.stack
def test_flow_run_serves_the_app_sized_by_the_setting_and_flow_stop_ends_it(tmp_path: Path) -> None:
    from flowcore.nginx import find_nginx

    if find_nginx() is None:
        pytest.skip("optional dependency missing: nginx (Debian: apt-get install nginx)")
    assert "%(asctime)s %(levelname)s %(name)s[%(process)d]" in LOG_FORMAT  # LOG_LINE's shape
    env = base_env(tmp_path, FLOW_APP_WORKERS="3", FLOW_NGINX_WORKERS="1",
                   FLOW_SECRET_FILE=str(tmp_path / "jwt-secret"))
    del env["FLOW_SECRET"]  # flow run generates it
    run_dir, log_dir = Path(env["FLOW_RUN_DIR"]), Path(env["FLOW_LOG_DIR"])
    out = tmp_path / "flow-run.out"
    with open(out, "wb") as sink:
        proc = subprocess.Popen([*FLOW, "run"], env=env, cwd=ROOT, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
    seen: set[int] = set()

    def running() -> bool:
        assert proc.poll() is None, out.read_text()
        lines = flow("status", env=env).stdout.splitlines()
        for line in lines:
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "RUNNING":
                seen.add(int(parts[3].rstrip(",")))
        return len(lines) == 5 and all(" RUNNING " in line for line in lines)

    try:
        wait_until(running, 60, 0.2, "every program RUNNING")
        base_url = f"http://127.0.0.1:{env['FLOW_HTTP_PORT']}"
        wait_until(lambda: port_open(int(env["FLOW_HTTP_PORT"])) and http_get(base_url + "/")[0] == 200,
                   30, 0.1, "the app through nginx")
        assert (tmp_path / "jwt-secret").stat().st_mode & 0o077 == 0
        # gunicorn: FLOW_APP_WORKERS workers (the old command line fixed 2), its control
        # socket in this stack's run dir (not ~/.gunicorn, shared by every stack).
        master = next(pid for pid in seen if "gunicorn" in Path(f"/proc/{pid}/cmdline").read_text())
        wait_until(lambda: len(workers_of(master)) == 3, 30, 0.1, "3 gunicorn workers")
        assert (run_dir / "gunicorn.ctl").is_socket()
        # gunicorn logs the request after answering it, and supervisord copies it to the file.
        wait_until(lambda: '"GET / HTTP/1.1" 200' in (log_dir / "app.log").read_text(), 10, 0.05,
                   "the request in the app's access log")
        app_log = (log_dir / "app.log").read_text().splitlines()
        bad = [line for line in app_log if line.strip() and not LOG_LINE.match(line)]
        assert not bad, bad
        again = flow("run", env=env)
        assert again.returncode == 1 and "already running" in one_line(again)

        stopped = flow("stop", env=env)
        assert stopped.returncode == 0, stopped.stderr
        assert proc.wait(30) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    wait_until(lambda: not [pid for pid in seen if pid_alive(pid)], 15, 0.05, "the stack to exit")
    assert flow("status", env=env).returncode == 3
    assert not (run_dir / "supervisord.pid").exists()


# --- adversarial review (adv_a) ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["empty", "dangling symlink", "directory"])
def test_secret_names_a_secret_file_it_will_not_replace(tmp_path: Path, kind: str) -> None:
    """`flow secret` said "the secrets exist already" while flow check said to run it."""
    path = tmp_path / "jwt"
    if kind == "empty":
        path.write_text("")
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(tmp_path / "nowhere")
    env = base_env(tmp_path, FLOW_SECRET_FILE=str(path))
    del env["FLOW_SECRET"]
    result = flow("secret", env=env)
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith(f"flow: FLOW_SECRET_FILE={str(path)!r} ")
    assert line.endswith("Flow never overwrites it: remove it and run `flow secret`")
    check = flow("check", env=env)
    assert check.returncode == 1 and line in check.stderr.splitlines()


def test_a_good_secret_file_is_not_reported(tmp_path: Path) -> None:
    path = tmp_path / "jwt"
    path.write_text("k" * 40)
    env = base_env(tmp_path, FLOW_SECRET_FILE=str(path))
    del env["FLOW_SECRET"]
    result = flow("secret", env=env)
    assert result.returncode == 0
    assert "exist already" in one_line(result)


def test_check_says_each_problem_once(tmp_path: Path) -> None:
    """The demo app's check includes the issuer's: the same line came twice."""
    env = base_env(tmp_path, FLOW_JWT_ALGORITHMS="RS256")
    del env["FLOW_SECRET"]
    result = flow("check", env=env)
    lines = result.stderr.splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(lines) == len(set(lines)), lines
    assert "flow: FLOW_JWT_PRIVATE_KEY: required to issue RS256 tokens" in lines


@pytest.mark.parametrize("app, why", [
    ("app:create_app(", "is neither a name nor a call of a factory"),
    ("app:create_app(x)", "the factory's arguments must be literal values"),
    ("os:path.join", "is neither a name nor a call of a factory"),
    ("app:__name__", "is not callable"),
])
def test_check_refuses_a_flow_app_gunicorn_would_refuse(tmp_path: Path, app: str, why: str) -> None:
    """flow check said "ready to run", then gunicorn exited at once under supervisord."""
    result = flow("check", env=base_env(tmp_path, FLOW_APP=app))
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith(f"flow: FLOW_APP={app!r} cannot be loaded") and why in line, line


@pytest.mark.parametrize("args, option", [
    ("--bi 0.0.0.0:80", "--bind"),  # gunicorn's argparse takes unambiguous prefixes
    ("--bind=0.0.0.0:80", "--bind"),
    ("-b0.0.0.0:80", "--bind"),
    ("--conf x.py", "--config"),
    ("-D", "--daemon"),
    ("--daemon", "--daemon"),
])
def test_check_refuses_gunicorn_args_that_break_the_stack(tmp_path: Path, args: str, option: str) -> None:
    result = flow("check", env=base_env(tmp_path, GUNICORN_CMD_ARGS=args))
    assert result.returncode == 1
    assert one_line(result).startswith(f"flow: GUNICORN_CMD_ARGS sets {option}:")


def test_check_lets_gunicorn_args_that_do_not_break_the_stack(tmp_path: Path) -> None:
    result = flow("check", env=base_env(tmp_path, GUNICORN_CMD_ARGS="--workers 3 --backlog 64 --timeout 5"))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("reply, says", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", "Non-websocket response"),  # the app's port
    (b"\0" * 100_000, "not found within"),  # no HTTP at all
])
def test_listen_to_a_peer_that_is_no_websocket_server_says_so(tmp_path: Path, reply: bytes, says: str) -> None:
    """Both raised out of `flow listen` with a traceback."""
    import socket
    import threading

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(reply)

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        url = f"ws://127.0.0.1:{server.getsockname()[1]}/websocket"
        result = flow("listen", "alice", "--url", url, env=base_env(tmp_path), timeout=30)
        thread.join(timeout=10)
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith(f"flow: cannot open {url}: ") and says in line, line


def test_check_refuses_a_python_path_with_spaces(tmp_path: Path) -> None:
    """supervisord splits `command = %(ENV_FLOW_PYTHON)s -u -m ...` on spaces: every program
    failed to spawn while flow check said ready to run."""
    venv = tmp_path / "my venv"
    venv.mkdir()
    (venv / "python").symlink_to(sys.executable)
    result = flow("check", env=base_env(tmp_path, FLOW_PYTHON=str(venv / "python")))
    assert result.returncode == 1
    assert one_line(result).startswith(f"flow: FLOW_PYTHON={str(venv / 'python')!r}: supervisord cannot start")
