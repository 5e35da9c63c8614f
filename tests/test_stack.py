"""The supervised stack, started from the project's own supervisord.conf and nginx.conf."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from flowcore.nginx import find_nginx
from conftest import Stack, http_get
from support import ROOT, base_env, wait_until


async def first_frame(url: str, origin: str) -> object:
    async with connect(url, origin=origin, proxy=None, open_timeout=5, close_timeout=1) as ws:
        return json.loads(await asyncio.wait_for(ws.recv(), 5))


# --- the running stack ----------------------------------------------------------------------


@pytest.mark.stack
def test_stack_boots_from_the_config_files_on_ephemeral_ports(shared_stack: Stack) -> None:
    stack = shared_stack
    assert stack.settings.http_port not in (5000, 5001, 5002)
    rendered = (stack.run_dir / "nginx.conf").read_text()
    assert f"listen 127.0.0.1:{stack.settings.http_port};" in rendered
    assert f"server 127.0.0.1:{stack.settings.ws_port};" in rendered
    assert f"server 127.0.0.1:{stack.settings.app_port};" in rendered
    assert "${" not in rendered
    states = stack.states()
    assert sorted(states) == ["app", "nginx", "proxy", "websocket:websocket-0",
                              "websocket:websocket-1"]
    assert all(state == "RUNNING" for state, _ in states.values())
    assert (stack.run_dir / "supervisor.sock").exists()


@pytest.mark.stack
def test_index_through_nginx(shared_stack: Stack) -> None:
    stack = shared_stack
    status, body = http_get(stack.base_url + "/")
    assert status == 200
    assert body


@pytest.mark.stack
def test_websocket_through_nginx_asks_for_auth_first(shared_stack: Stack) -> None:
    stack = shared_stack
    assert asyncio.run(first_frame(stack.ws_url, stack.base_url)) == {"id": "AUTH REQUEST"}


@pytest.mark.stack
def test_websocket_from_another_origin_is_refused(shared_stack: Stack) -> None:
    stack = shared_stack
    with pytest.raises(InvalidStatus) as refused:
        asyncio.run(first_frame(stack.ws_url, "http://evil.example"))
    assert refused.value.response.status_code == 403
    # Same host, another port: not the site nginx serves either.
    with pytest.raises(InvalidStatus) as refused:
        asyncio.run(first_frame(stack.ws_url, f"http://127.0.0.1:{stack.settings.app_port}"))
    assert refused.value.response.status_code == 403


@pytest.mark.stack
def test_one_log_file_per_process(shared_stack: Stack) -> None:
    stack = shared_stack
    expected = {"proxy.log", "websocket-0.log", "websocket-1.log", "app.log", "nginx.log"}
    wait_until(lambda: expected <= {p.name for p in stack.log_dir.glob("*.log")}, 10,
               message=f"{sorted(expected)} in {stack.log_dir}")
    # nginx's own logs sit beside them; supervisord's own log is in the run dir.
    assert (stack.log_dir / "nginx-error.log").exists()
    assert (stack.log_dir / "nginx-access.log").exists()
    assert (stack.run_dir / "supervisord.log").exists()
    # Output arrives unbuffered: nginx's launcher line is already there.
    wait_until(lambda: "flow: exec" in (stack.log_dir / "nginx.log").read_text(), 10,
               message="the nginx launcher's line in nginx.log")
    # ...after the capacity it sized nginx for (FLOW_MAX_CONNECTIONS, open-file limits).
    assert "flow: nginx capacity: " in (stack.log_dir / "nginx.log").read_text()


@pytest.mark.stack
def test_app_access_log_is_in_flows_format_with_the_clients_address(shared_stack: Stack) -> None:
    stack = shared_stack
    # A client's own X-Real-IP is replaced by nginx: the log shows where it came from.
    status, _ = http_get(stack.base_url + "/?probe=access-log", headers={"X-Real-IP": "6.6.6.6"})
    assert status == 200
    app_log = stack.log_dir / "app.log"

    def access_line() -> str | None:
        return next((line for line in app_log.read_text().splitlines()
                     if "/?probe=access-log" in line), None)

    wait_until(lambda: access_line() is not None, 10, message="the request in app.log")
    line = access_line()
    assert line is not None and " INFO gunicorn.access[" in line, line
    assert '] 127.0.0.1 "GET /?probe=access-log HTTP/1.0" 200 ' in line or \
        '] 127.0.0.1 "GET /?probe=access-log HTTP/1.1" 200 ' in line, line
    assert "6.6.6.6" not in line


@pytest.mark.stack
def test_pool_size_comes_from_the_settings(make_stack) -> None:
    stack = make_stack(FLOW_WS_PROCESSES=3)
    assert len(stack.pids("websocket")) == 3
    assert {f"websocket-{n}.log" for n in range(3)} <= {p.name for p in stack.log_dir.iterdir()}
    # One upstream address in nginx, whatever the pool size.
    assert (stack.run_dir / "nginx.conf").read_text().count(f":{stack.settings.ws_port};") == 1
    assert asyncio.run(first_frame(stack.ws_url, stack.base_url)) == {"id": "AUTH REQUEST"}


@pytest.mark.stack
def test_a_killed_websocket_server_is_restarted(stack: Stack) -> None:
    before = stack.pids("websocket")
    assert len(before) == 2
    os.kill(before[0], signal.SIGKILL)

    def replaced() -> list[int] | None:
        pids = stack.pids("websocket")
        return pids if len(pids) == 2 and before[0] not in pids else None

    after = wait_until(replaced, 20, 0.1, "supervisord to restart the killed server")
    assert before[1] in after
    wait_until(stack.websocket_greets, 10, 0.1, "the pool to answer again")


@pytest.mark.stack
def test_ctl_restarts_a_program(stack: Stack) -> None:
    [before] = stack.pids("app")
    stack.ctl("restart", "app")
    [after] = wait_until(lambda: stack.pids("app"), 20, 0.1, "the app to run again")
    assert after != before
    wait_until(stack.serves_index, 20, 0.1, "GET / after the restart")


@pytest.mark.stack
def test_make_status_and_stop_drive_the_same_stack(stack: Stack) -> None:
    if shutil.which("make") is None:
        pytest.skip("optional dependency missing: make")
    status = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "status"],
                            env=stack.env, capture_output=True, text=True, timeout=60)
    assert "websocket:websocket-1" in status.stdout, status.stdout + status.stderr
    assert "RUNNING" in status.stdout
    stop = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "stop"],
                          env=stack.env, capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert stack.supervisord is not None
    assert stack.supervisord.popen.wait(30) == 0
    wait_until(lambda: not stack.leftover_pids(), 10, 0.05, "every supervised process to exit")


# --- configuration, no stack ----------------------------------------------------------------


def test_rendered_nginx_conf_passes_nginx_t(tmp_path: Path) -> None:
    nginx = find_nginx()
    if nginx is None:
        pytest.skip("optional dependency missing: nginx (Debian: apt-get install nginx)")
    run_dir = tmp_path / "run"
    env = base_env(tmp_path, FLOW_RUN_DIR=run_dir, FLOW_HEARTBEAT=100)
    rendered = subprocess.run([sys.executable, "-m", "flowcore.nginx", "--render"], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert rendered.returncode == 0, rendered.stderr
    conf = Path(rendered.stdout.strip())
    assert conf == run_dir / "nginx.conf"
    text = conf.read_text()
    assert "${" not in text
    assert f"listen 127.0.0.1:{env['FLOW_HTTP_PORT']};" in text
    assert "proxy_read_timeout 201s;" in text  # above a 100 s heartbeat
    assert "client_header_timeout 10s;" in text  # slow and half-open requests are cut
    assert "worker_connections 4096;" not in text  # sized from FLOW_MAX_CONNECTIONS now
    log_dir = Path(env["FLOW_LOG_DIR"])
    checked = subprocess.run(
        [nginx, "-t", "-c", str(conf), "-p", str(run_dir), "-e", str(log_dir / "nginx-error.log")],
        capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    assert "test is successful" in checked.stderr
    # The same check through the helper.
    helper = subprocess.run([sys.executable, "-m", "flowcore.nginx", "--test"], env=env,
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert helper.returncode == 0, helper.stderr


def test_print_env_gives_the_shell_the_resolved_values(tmp_path: Path) -> None:
    env = base_env(tmp_path, FLOW_WS_PROCESSES=4, FLOW_RUN_DIR=tmp_path / "run")
    shell = subprocess.run(
        ["bash", "-c", f'eval "$("{sys.executable}" -m flowcore.nginx --print-env)" && '
                       'echo "$FLOW_HTTP_PORT $FLOW_WS_PROCESSES $FLOW_RUN_DIR $FLOW_LOG_DIR"'],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.split() == [env["FLOW_HTTP_PORT"], "4", str(tmp_path / "run"),
                                    env["FLOW_LOG_DIR"]]
    assert env["FLOW_SECRET"] not in shell.stdout


@pytest.mark.parametrize("module", [["flowcore", "config"], ["flowcore.nginx", "--print-env"]])
def test_a_bad_value_stops_with_one_line_naming_the_variable(tmp_path: Path, module) -> None:
    env = base_env(tmp_path, FLOW_HTTP_PORT="abc")
    result = subprocess.run([sys.executable, "-m", *module], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "FLOW_HTTP_PORT" in lines[0]
    assert result.stdout == ""
