"""A message is delivered or someone is told (PROTOCOL.md section 5): flow.flush and the
report at exit, against the real proxy (message_proxy.py) and against nobody.

A flush sends a marker frame behind the pushes on the publisher's PUSH socket and asks
the proxy's control socket about it (the flush section of flowcore/protocol.py); the
proxy answers once it has taken both. The wire is built here by hand where the test is
about the proxy, so that the test checks the wire, not our own helpers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import subprocess
import threading
import time
from pathlib import Path

import pytest
import zmq

import flow
from flowcore.settings import load_settings
from pipeline import Pipeline, authenticate, collect
from support import PYTHON, ROOT, base_env, free_port, wait_until
from test_proxy import Control, ProxyProcess, Subscriber, represented, warning_lines, ws_json

REPORT = "could not be handed over"


@pytest.fixture
def pipe(tmp_path):
    pipeline = Pipeline(tmp_path, servers=1)
    yield pipeline
    pipeline.stop()


@pytest.fixture
def proxy(tmp_path):
    process = ProxyProcess(tmp_path)
    yield process
    process.stop()


def nobody_env(tmp_path: Path, **overrides: object) -> dict[str, str]:
    """Settings whose publish and control endpoints nobody listens on."""
    return base_env(tmp_path, **overrides)


def report_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if REPORT in line]


# ---------------------------------------------------------------- flush, in this process


def test_flush_after_pushes_to_a_live_proxy_returns_0_and_they_are_delivered(pipe):
    publisher = pipe.publisher()

    async def run():
        ws, _ = await authenticate(pipe.url(), pipe.token("alice"))
        for i in range(50):
            publisher.push("alice", "N", i)
        publisher.push_all("ALL", 50)
        assert publisher.flush(10) == 0
        started = time.monotonic()
        assert publisher.flush(10) == 0  # nothing new: no round trip
        assert time.monotonic() - started < 0.05
        got = await collect(ws, 51)
        assert [m["data"] for m in got] == list(range(51))
        assert [m["seq"] for m in got if m["id"] == "N"] == list(range(1, 51))
        await ws.close()

    asyncio.run(run())


def test_flush_with_no_proxy_returns_exactly_what_was_pushed(tmp_path):
    settings = load_settings(nobody_env(tmp_path))
    publisher = flow.Flow(settings=settings, linger=0)
    try:
        assert publisher.flush(1) == 0  # nothing pushed: at once
        for i in range(7):
            publisher.push("alice", "N", i)
        started = time.monotonic()
        assert publisher.flush(0.3) == 7
        elapsed = time.monotonic() - started
        assert 0.25 <= elapsed < 2, elapsed
        publisher.push_all("ALL", 1)
        publisher.push("bob", "N", 2)
        assert publisher.flush(0.2) == 9
        assert publisher.flush(0) == 9  # no wait at all
    finally:
        publisher.close()


def test_flush_counts_what_a_killed_proxy_did_not_take_and_clears_when_it_is_back(tmp_path):
    proxy = ProxyProcess(tmp_path)
    publisher = flow.Flow(settings=proxy.settings, linger=0)
    try:
        publisher.push("alice", "BEFORE", 0)
        assert publisher.flush(10) == 0
        # Pushes written into the dying connection would be lost in TCP, which no
        # PUSH socket can tell: push only once the publisher has seen the proxy go.
        sock = publisher._engine.socket
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            proxy.kill()
            assert monitor.poll(10_000), "the publisher never saw the proxy go"
        finally:
            sock.disable_monitor()
            monitor.close(0)
        for i in range(5):
            publisher.push("alice", "WHILE DOWN", i)
        assert publisher.flush(0.5) == 5
        proxy.start()
        # Queued in the publisher, handed over on reconnecting: confirmed now.
        assert publisher.flush(15) == 0
        control = Control(proxy.settings)
        try:
            assert control.stats()["numbered"] == 5
        finally:
            control.close()
    finally:
        publisher.close()
        proxy.stop()


def test_close_reports_the_unconfirmed_count_once_on_stderr_and_in_the_log(tmp_path, capsys, caplog):
    settings = load_settings(nobody_env(tmp_path))
    publisher = flow.Flow(settings=settings, linger=0.2)
    for i in range(4):
        publisher.push("alice", "N", i)
    with caplog.at_level(logging.WARNING, logger="flow.publisher"):
        started = time.monotonic()
        publisher.close()
        publisher.close()
        elapsed = time.monotonic() - started
    assert elapsed < 2, "close waited a second time, after the flush"
    [line] = report_lines(capsys.readouterr().err)
    assert line.startswith("flow: 4 messages ") and settings.publish_endpoint in line, line
    [record] = [r for r in caplog.records if r.name == "flow.publisher"]
    assert record.levelno == logging.WARNING and "4 messages" in record.getMessage()
    assert publisher.flush(1) == 4  # closed: what was lost, without waiting
    with pytest.raises(RuntimeError, match="closed"):
        publisher.push("alice", "N", 5)


def test_flush_from_many_threads_at_once(pipe):
    publisher = pipe.publisher()
    threads_count, per_thread = 8, 100
    barrier = threading.Barrier(threads_count)
    results: list[int] = []

    def work(t: int) -> None:
        for i in range(per_thread):
            publisher.push("alice", "T", [t, i])
        barrier.wait(30)  # every push made: each flush covers them all
        results.append(publisher.flush(15))

    async def run():
        ws, _ = await authenticate(pipe.url(), pipe.token("alice"), max_queue=None)
        threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert results == [0] * threads_count
        got = await collect(ws, threads_count * per_thread)
        assert [m["seq"] for m in got] == list(range(1, threads_count * per_thread + 1))
        await ws.close()

    asyncio.run(run())


def test_flushes_from_many_threads_to_no_proxy_wait_together_not_in_turn(tmp_path):
    settings = load_settings(nobody_env(tmp_path))
    publisher = flow.Flow(settings=settings, linger=0)
    for i in range(6):
        publisher.push("alice", "N", i)
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(publisher.flush(0.5))) for _ in range(8)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    elapsed = time.monotonic() - started
    publisher.close()
    assert results == [6] * 8
    assert elapsed < 2.5, f"8 flushes of 0.5s took {elapsed:.2f}s"


def test_module_flush_without_a_default_publisher_is_0(tmp_path):
    script = "import flow, time; t = time.monotonic(); print(flow.flush(5), time.monotonic() - t < 1)"
    proc = subprocess.run([PYTHON, "-W", "error", "-c", script], env=nobody_env(tmp_path), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "True"]


# ---------------------------------------------------------------- at exit, in a script

PUSH_THREE = """
import sys
import flow
for i in range(3):
    flow.push("alice", "N", i)
if sys.argv[1:] == ["flush"]:
    print(flow.flush(10))
    flow.push("alice", "N", 3)
    flow.push_all("ALL", 4)
"""


def test_a_script_pushing_to_nobody_reports_its_count_once_at_exit(tmp_path):
    env = nobody_env(tmp_path, FLOW_PUSH_LINGER="0.5")
    started = time.monotonic()
    proc = subprocess.run([PYTHON, "-W", "error", "-c", PUSH_THREE], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    [line] = report_lines(proc.stderr)
    assert line.startswith("flow: 3 messages pushed by this process"), line
    assert "0.5s" in line and env["FLOW_PUBLISH_ENDPOINT"] in line
    assert proc.stderr.strip() == line, proc.stderr  # nothing else: no traceback, no repeat
    assert elapsed < 15


def test_a_script_with_logging_reports_in_its_log_too(tmp_path):
    log_file = tmp_path / "app.log"
    script = (
        "import logging, flow\n"
        f"logging.basicConfig(filename={str(log_file)!r}, level=logging.INFO)\n"
        "flow.push('alice', 'N', 1)\n"
        "flow.push_all('ALL', 2)\n"
    )
    proc = subprocess.run([PYTHON, "-W", "error", "-c", script], env=nobody_env(tmp_path, FLOW_PUSH_LINGER="0.3"),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    [line] = report_lines(proc.stderr)
    assert "flow: 2 messages" in line
    [logged] = report_lines(log_file.read_text())
    assert logged.startswith("WARNING:flow.publisher:2 messages"), logged


def test_a_script_pushing_to_a_live_proxy_reports_nothing(pipe):
    async def run():
        ws, _ = await authenticate(pipe.url(), pipe.token("alice"))
        proc = subprocess.run([PYTHON, "-W", "error", "-c", PUSH_THREE, "flush"], env=pipe.env,
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "0\n" and proc.stderr == "", proc.stderr
        got = await collect(ws, 5)
        assert [m["data"] for m in got] == [0, 1, 2, 3, 4]
        await ws.close()

    asyncio.run(run())


FORK_TO_NOBODY = """
import os, sys
import flow
for i in range(3):
    flow.push("alice", "PARENT", i)
pid = os.fork()
if pid == 0:
    flow.push("alice", "CHILD", 1)
    flow.push_all("CHILD", 2)
    print("child", flow.flush(0.2), flush=True)
    sys.exit(0)                          # the child's own report: 2
_, status = os.waitpid(pid, 0)
print("parent", flow.flush(0.2), flush=True)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_after_fork_a_child_counts_and_reports_only_its_own_pushes(tmp_path):
    proc = subprocess.run([PYTHON, "-W", "error", "-c", FORK_TO_NOBODY],
                          env=nobody_env(tmp_path, FLOW_PUSH_LINGER="0.2"), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["child 2", "parent 3"], proc.stdout
    lines = report_lines(proc.stderr)
    assert sorted(line.split()[1] for line in lines) == ["2", "3"], proc.stderr


FORK_TO_PROXY = """
import os, sys
import flow
flow.push("alice", "PARENT", 1)
assert flow.flush(10) == 0               # the parent's control link is open before the fork
pid = os.fork()
if pid == 0:
    flow.push("alice", "CHILD", 2)
    print("child", flow.flush(10), flush=True)   # on a link of its own
    sys.exit(0)
_, status = os.waitpid(pid, 0)
flow.push("alice", "PARENT AGAIN", 3)
print("parent", flow.flush(10), flush=True)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_after_fork_a_child_flushes_on_its_own_link(pipe):
    async def run():
        ws, _ = await authenticate(pipe.url(), pipe.token("alice"))
        proc = subprocess.run([PYTHON, "-W", "error", "-c", FORK_TO_PROXY], env=pipe.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split("\n")[:2] == ["child 0", "parent 0"], proc.stdout
        assert proc.stderr == ""
        got = await collect(ws, 3)
        assert sorted(m["id"] for m in got) == ["CHILD", "PARENT", "PARENT AGAIN"]
        await ws.close()

    asyncio.run(run())


# ---------------------------------------------------------------- the proxy's side, on the wire


def marker(token: str) -> bytes:
    return b"F1\0" + token.encode()


def flush_request(rid: int, token: str) -> bytes:
    return json.dumps({"op": "flush", "rid": rid, "token": token}).encode()


def test_a_marker_is_never_numbered_or_fanned_out(proxy):
    sub = Subscriber(proxy.settings, ["alice", "*"])
    control = Control(proxy.settings)
    publisher = flow.Flow(settings=proxy.settings)
    context = zmq.Context()
    raw = context.socket(zmq.PUSH)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(proxy.settings.publish_endpoint)
    try:
        for round_ in range(3):
            publisher.push("alice", "N", round_)
            publisher.push_all("ALL", round_)
            assert publisher.flush(10) == 0
        # Markers nobody asks about, and one asked about on the wire by hand.
        for _ in range(5):
            raw.send(marker(secrets.token_hex(16)))
        token = secrets.token_hex(16)
        raw.send(marker(token))
        raw.send(b'P1\0alice\0"N"\n3')
        answer = json.loads(control.ask({"op": "flush", "token": token})[0])
        assert answer == {"rid": control.rid, "streams": {}, "flushed": token}
        publisher.push("alice", "N", 4)
        assert publisher.flush(10) == 0
        got = sub.messages(8)
        alice = [(seq, ws_json(wire)["data"]) for stream, seq, _, wire in got if stream == "alice"]
        broadcast = [seq for stream, seq, _, _ in got if stream == "*"]
        assert alice == [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4)]
        assert broadcast == [1, 2, 3]
        assert not sub.sock.poll(200)  # nothing more: no marker went out
        stats = control.stats()
        assert stats["numbered"] == 8 and stats["flushed"] == 5
        assert stats["dropped"] == {}
        assert "Traceback" not in proxy.log() and not warning_lines(proxy.log())
    finally:
        publisher.close()
        raw.close(0)
        context.term()
        sub.close()
        control.close()


def test_a_request_that_comes_before_its_marker_is_answered_when_the_marker_comes(proxy):
    control = Control(proxy.settings)
    context = zmq.Context()
    raw = context.socket(zmq.PUSH)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(proxy.settings.publish_endpoint)
    try:
        token = secrets.token_hex(16)
        control.sock.send_multipart([b"", flush_request(77, token)])
        assert not control.sock.poll(200)  # no marker yet: no answer yet
        raw.send(marker(token))
        assert control.sock.poll(10_000)
        frames = control.sock.recv_multipart()
        assert json.loads(frames[1]) == {"rid": 77, "streams": {}, "flushed": token}
    finally:
        raw.close(0)
        context.term()
        control.close()


def test_hostile_markers_and_flush_requests_are_dropped_and_logged(proxy):
    settings = proxy.settings
    sub = Subscriber(settings, ["alice"])
    control = Control(settings)
    context = zmq.Context()
    context.setsockopt(zmq.LINGER, 0)
    try:
        raw = context.socket(zmq.PUSH)
        raw.connect(settings.publish_endpoint)
        bad_markers = [
            b"F1\0",  # truncated: no token
            b"F1\0" + b"a" * 31,  # truncated token
            b"F1\0" + b"a" * 33,
            b"F1\0" + b"A" * 32,  # not lowercase hex
            b"F1\0" + b"g" * 32,
            b"F1\0" + b"\xff" * 32,
            b"F1\0" + b"a" * 32 + b"\0",
            b"F1\0" + b"a" * 1000,  # long, within FLOW_MAX_MESSAGE
        ]
        for frame in bad_markers:
            raw.send(frame)
        huge = b"F1\0" + b"a" * (settings.max_message + 1000)  # dropped as an oversized push
        raw.send(huge)
        raw.send_multipart([b"F1\0", secrets.token_hex(16).encode()])  # two frames
        dealer = context.socket(zmq.DEALER)
        dealer.connect(settings.control_endpoint)
        bad_requests = [
            {"op": "flush", "rid": "1", "token": "a" * 32},
            {"op": "flush", "rid": 1, "token": "zz"},
            {"op": "flush", "rid": 1, "token": "A" * 32},
            {"op": "flush", "rid": 1, "token": 5},
            {"op": "flush", "rid": 1},
            {"op": "flush", "rid": 1, "token": "\u00e9" * 32},
            {"op": "flush", "rid": 1, "token": "a" * 100_000},
        ]
        for request in bad_requests:
            dealer.send_multipart([b"", json.dumps(request).encode()])
        dealer.send_multipart([b"", b'{"op":"flush","rid":1,"token":"\\ud800' + b"a" * 26 + b'"}'])

        expected = {"flush": len(bad_markers), "push": 2, "control": len(bad_requests) + 1}
        wait_until(lambda: control.stats()["dropped"] == expected, 30, 0.1, f"dropped {expected}")
        assert not dealer.poll(100)  # no answer to any of them

        # Served as before: a push is numbered 1, a real flush is answered.
        publisher = flow.Flow(settings=settings)
        publisher.push("alice", "AFTER", 1)
        assert publisher.flush(10) == 0
        [(_, seq, _, _)] = sub.messages(1)
        assert seq == 1
        publisher.close()

        def logged() -> int:
            return represented([line for line in warning_lines(proxy.log()) if "flush marker" in line])

        wait_until(lambda: logged() == len(bad_markers), 10, 0.1, "a warning for each bad marker")
        log = proxy.log()
        assert "Traceback" not in log and " ERROR " not in log
        assert all(len(line) < 600 for line in warning_lines(log))
        assert proxy.proc.alive()
    finally:
        sub.close()
        control.close()
        context.destroy(0)


def test_a_flood_of_bad_markers_logs_a_few_lines(proxy):
    control = Control(proxy.settings)
    context = zmq.Context()
    raw = context.socket(zmq.PUSH)
    raw.connect(proxy.settings.publish_endpoint)
    started = time.monotonic()

    def lines() -> list[str]:
        return [line for line in warning_lines(proxy.log()) if "flush marker" in line]

    try:
        for i in range(5000):
            raw.send(b"F1\0bad %d" % i)
        wait_until(lambda: control.stats()["dropped"].get("flush") == 5000, 30, 0.1, "5,000 drops counted")
        wait_until(lambda: represented(lines()) == 5000, 10, 0.1, "the held-back count")
        assert len(lines()) <= 10 + (time.monotonic() - started) + 2
        assert proxy.proc.alive()
    finally:
        raw.close(0)
        context.destroy(0)
        control.close()


def test_unpaired_halves_do_not_pile_up(proxy):
    """Markers and requests whose other half never comes are kept boundedly."""
    control = Control(proxy.settings)
    context = zmq.Context()
    raw = context.socket(zmq.PUSH)
    raw.connect(proxy.settings.publish_endpoint)
    dealer = context.socket(zmq.DEALER)
    dealer.connect(proxy.settings.control_endpoint)
    try:
        for i in range(12_000):
            raw.send(marker(secrets.token_hex(16)))
            dealer.send_multipart([b"", flush_request(i, secrets.token_hex(16))])
        wait_until(lambda: "unanswered flush halves" in proxy.log(), 30, 0.1, "a warning about the halves")
        # Still pairing new flushes at once.
        publisher = flow.Flow(settings=proxy.settings)
        publisher.push("alice", "N", 1)
        assert publisher.flush(10) == 0
        publisher.close()
        assert proxy.proc.alive() and "Traceback" not in proxy.log()
    finally:
        context.destroy(0)
        control.close()


# ---------------------------------------------------------------- adversarial review (adv_b)


def test_close_covers_what_other_threads_push_during_its_flush(tmp_path, capsys):
    # Before: close() flushed once while pushes went on, then counted every later push as
    # lost and closed with linger 0: a false report (and a real loss with a backlog).
    proxy = ProxyProcess(tmp_path)
    publisher = flow.Flow(settings=proxy.settings)
    try:
        publisher.push("alice", "N", 0)
        assert publisher.flush(10) == 0
        pushed = [1]
        closed = threading.Event()

        def pusher() -> None:
            for _ in range(5_000_000):  # bounded: ends at close, long before this
                try:
                    publisher.push("alice", "N", 1)
                except RuntimeError:  # closed: what came before is close()'s to hand over
                    closed.set()
                    return
                pushed[0] += 1

        thread = threading.Thread(target=pusher)
        thread.start()
        wait_until(lambda: pushed[0] > 1000, 10, 0.001, "pushes under way")
        publisher.close()
        thread.join(30)
        assert closed.is_set()
        assert REPORT not in capsys.readouterr().err
        control = Control(proxy.settings)
        try:
            wait_until(lambda: control.stats()["numbered"] == pushed[0], 20, 0.05, "every push numbered")
        finally:
            control.close()
    finally:
        publisher.close()
        proxy.stop()


CONFIGURE_WHILE_PUSHING = """
import threading
import flow
inside, go = threading.Event(), threading.Event()
def slow(data):
    inside.set()
    go.wait(10)  # past flow.push's choice of the default, before its hand-over
    return b"1"
flow.configure(serializer=slow, linger=0)
errors = []
def pusher():
    try:
        flow.push("alice", "N", 1)
    except Exception as exc:
        errors.append(repr(exc))
thread = threading.Thread(target=pusher)
thread.start()
assert inside.wait(10)
flow.configure(linger=0)  # closes the default the pusher picked
go.set()
thread.join(10)
print(errors or flow.flush(0))
"""


def test_a_push_racing_configure_goes_to_the_new_default(tmp_path):
    proc = subprocess.run([PYTHON, "-W", "error", "-c", CONFIGURE_WHILE_PUSHING], env=nobody_env(tmp_path),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # Before: RuntimeError('this Flow publisher is closed') in the pusher.
    assert proc.stdout.strip() == "1", proc.stdout + proc.stderr


def test_an_explicit_endpoint_flushes_with_that_proxy(tmp_path, capsys):
    # README's explicit form, Flow("tcp://host:port"): flush used to ask the settings'
    # control endpoint, another proxy or nobody, so every push was reported lost at exit.
    proxy = ProxyProcess(tmp_path / "p")
    publishers = []
    try:
        host, control_port = proxy.settings.control_endpoint.rsplit(":", 1)
        elsewhere = load_settings(nobody_env(
            tmp_path, FLOW_CONTROL_ENDPOINT=f"tcp://127.0.0.2:{control_port}"))  # nobody there
        guessed = flow.Flow(proxy.settings.publish_endpoint, settings=elsewhere, linger=5)
        publishers.append(guessed)
        publishers.append(flow.Flow(proxy.settings.publish_endpoint, settings=load_settings(nobody_env(tmp_path)),
                                    control_endpoint=proxy.settings.control_endpoint, linger=5))
        for publisher in publishers:
            publisher.push("alice", "N", 1)
            assert publisher.flush(5) == 0
        assert guessed._engine.control_endpoint == proxy.settings.control_endpoint
    finally:
        for publisher in publishers:
            publisher.close()
        proxy.stop()
    assert REPORT not in capsys.readouterr().err


def test_the_control_endpoint_guess_keeps_to_tcp(tmp_path):
    from flowcore.engines.zmq import control_endpoint_for

    settings = load_settings(nobody_env(tmp_path, FLOW_PUBLISH_ENDPOINT="tcp://127.0.0.1:5561",
                                        FLOW_CONTROL_ENDPOINT="tcp://127.0.0.1:5563"))
    assert control_endpoint_for("tcp://127.0.0.1:5561", settings) == "tcp://127.0.0.1:5563"
    assert control_endpoint_for("tcp://10.0.0.5:6001", settings) == "tcp://10.0.0.5:5563"
    assert control_endpoint_for("ipc:///tmp/flow-pub", settings) == "tcp://127.0.0.1:5563"


DROPPED = """
import gc
import flow
def job():
    flow.Flow().push("alice", "N", 1)  # never closed, never kept
job()
gc.collect()
print("after")
"""

IN_A_CHILD = """
import multiprocessing
import sys
import flow
def work():
    flow.push("alice", "N", 1)
    flow.push("alice", "N", 2)
if __name__ == "__main__":
    multiprocessing.set_start_method(sys.argv[1])
    child = multiprocessing.Process(target=work)
    child.start()
    child.join(30)
    print("child", child.exitcode)
"""


def test_a_publisher_dropped_without_close_is_flushed_and_reported(tmp_path):
    # Before: only the zmq socket's ResourceWarning (nothing without -W error); the push
    # went with the garbage, unreported.
    proc = subprocess.run([PYTHON, "-W", "error", "-c", DROPPED], env=nobody_env(tmp_path, FLOW_PUSH_LINGER="0.3"),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    [line] = report_lines(proc.stderr)
    assert line.startswith("flow: 1 message pushed"), line
    assert proc.stderr.strip() == line, proc.stderr
    assert proc.stdout.strip() == "after"  # reported when dropped, not at exit


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_multiprocessing_child_reports_what_it_could_not_hand_over(tmp_path, method):
    # Before: a multiprocessing child ends in os._exit, past atexit: its pushes were lost
    # in silence.
    script = tmp_path / "child.py"  # forkserver imports the main module by path
    script.write_text(IN_A_CHILD)
    env = nobody_env(tmp_path, FLOW_PUSH_LINGER="0.3", PYTHONPATH=ROOT)
    proc = subprocess.run([PYTHON, "-W", "error", str(script), method], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["child", "0"], proc.stdout + proc.stderr
    [line] = report_lines(proc.stderr)
    assert line.startswith("flow: 2 messages pushed"), line


def test_a_multiprocessing_child_hands_its_pushes_over_before_it_ends(proxy):
    env = {**proxy.env, "PYTHONPATH": str(ROOT)}
    script = proxy.tmp_path / "child.py"
    script.write_text(IN_A_CHILD)
    proc = subprocess.run([PYTHON, "-W", "error", str(script), "fork"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert REPORT not in proc.stderr
    control = Control(proxy.settings)
    try:
        assert control.stats()["numbered"] == 2
    finally:
        control.close()


def test_a_flood_of_forged_flush_requests_does_not_hold_up_a_real_flush(proxy):
    # Before: the proxy read control requests until none was left, so a steady flood kept
    # it from the PUSH socket (and pushed the real request out of the bounded table):
    # a flush took about 7 s here, and at exit its pushes were reported lost.
    publisher = flow.Flow(settings=proxy.settings, linger=0)
    stop = threading.Event()
    sent = [0]

    def flood() -> None:
        context = zmq.Context()
        socks = []
        try:
            for _ in range(4):
                sock = context.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDHWM, 100_000)
                sock.connect(proxy.settings.control_endpoint)
                socks.append(sock)
            for rid in range(10_000_000):  # bounded: stops when the test says so
                if stop.is_set():
                    return
                request = flush_request(rid, secrets.token_hex(16))
                for sock in socks:
                    try:
                        sock.send_multipart([b"", request], zmq.NOBLOCK)
                        sent[0] += 1
                    except zmq.Again:
                        pass
        finally:
            for sock in socks:
                sock.close()
            context.term()

    thread = threading.Thread(target=flood)
    try:
        publisher.push("alice", "N", 0)
        assert publisher.flush(10) == 0
        thread.start()
        wait_until(lambda: sent[0] > 50_000, 20, 0.01, "the flood under way")
        for i in range(100):
            publisher.push("alice", "N", i)
        assert publisher.flush(3) == 0
        assert thread.is_alive()  # the flood was still on
    finally:
        stop.set()
        thread.join(30)
        publisher.close()
    control = Control(proxy.settings)
    try:
        assert control.stats()["numbered"] == 101
    finally:
        control.close()
    assert "Traceback" not in proxy.log()


def test_with_logging_on_stderr_the_report_is_one_line_there(tmp_path):
    # Before: logging.basicConfig() (a handler on stderr) showed the report twice there.
    script = "import logging, flow\nlogging.basicConfig()\nflow.push('alice', 'N', 1)\n"
    proc = subprocess.run([PYTHON, "-W", "error", "-c", script], env=nobody_env(tmp_path, FLOW_PUSH_LINGER="0.3"),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    [line] = report_lines(proc.stderr)
    assert line.startswith("WARNING:flow.publisher:1 message pushed"), line


FORK_WHILE_CLOSING = """
import os, threading, time
import flow
publisher = flow.Flow(linger=2)
publisher.push("alice", "N", 0)
closer = threading.Thread(target=publisher.close)
closer.start()
for _ in range(500):  # until close() is waiting on its flush
    if publisher._closing:
        break
    time.sleep(0.01)
pid = os.fork()
if pid == 0:
    try:
        publisher.push("alice", "N", 1)
        os._exit(3)  # taken by a publisher nobody would flush or report
    except RuntimeError:
        os._exit(0)
_, status = os.waitpid(pid, 0)
closer.join()
print("child", os.waitstatus_to_exitcode(status))
"""


def test_a_child_forked_while_its_publisher_closes_gets_it_closed(tmp_path):
    proc = subprocess.run([PYTHON, "-W", "error", "-c", FORK_WHILE_CLOSING], env=nobody_env(tmp_path),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["child", "0"], proc.stdout + proc.stderr
    assert len(report_lines(proc.stderr)) == 1  # the parent's, once
