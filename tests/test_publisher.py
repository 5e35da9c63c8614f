"""flow.push in the caller's process (PROTOCOL.md section 5), against the real pipeline."""

from __future__ import annotations

import asyncio
import datetime
import math
import subprocess
import threading

import pytest
import zmq

import flow
from flowcore import protocol
from flowcore.settings import load_settings
from pipeline import Pipeline, authenticate, collect
from support import PYTHON, ROOT, base_env, free_port, wait_until


@pytest.fixture
def pipe(tmp_path):
    pipeline = Pipeline(tmp_path, servers=1)
    yield pipeline
    pipeline.stop()


@pytest.mark.parametrize(
    "args, message",
    [
        (("", "ID", 1), "empty"),
        ((None, "ID", 1), "string"),
        ((7, "ID", 1), "string"),
        (("*", "ID", 1), "reserved"),
        (("a\0b", "ID", 1), "NUL"),
        (("alice", "", 1), "empty"),
        (("alice", 5, 1), "string"),
        (("alice", "ID", {1, 2}), "JSON"),
        (("alice", "ID", object()), "JSON"),
        (("alice", "ID", math.nan), "JSON"),
        (("alice", "ID", "x" * 2048), "limit"),
    ],
)
def test_bad_input_refused_in_caller_and_nothing_sent(pipe, args, message):
    publisher = pipe.publisher(max_message=1024)

    async def run():
        ws, _ = await authenticate(pipe.url(), pipe.token("alice"))
        with pytest.raises(flow.InvalidMessage, match=message):
            publisher.push(*args)
        publisher.push("alice", "OK", 1)
        [first] = await collect(ws, 1)
        # Nothing of the refused push reached the proxy: the good one is seq 1.
        assert (first["id"], first["seq"]) == ("OK", 1)
        await ws.close()

    asyncio.run(run())


@pytest.fixture
def pull_many(tmp_path):
    """A factory of publishers and the PULL socket they send to, for checking frames byte
    for byte."""
    context = zmq.Context()
    sock = context.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)  # a deadline for each receive
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    settings = load_settings({"FLOW_SECRET": "s" * 32, "FLOW_ENV_FILE": str(tmp_path / "none")})
    publishers: list[flow.Flow] = []

    def make(**kwargs) -> flow.Flow:
        publisher = flow.Flow(f"tcp://127.0.0.1:{port}", settings=settings, max_message=1024, linger=0, **kwargs)
        publishers.append(publisher)
        return publisher

    yield make, sock
    for publisher in publishers:
        publisher.close()
    sock.close(linger=0)
    context.term()


@pytest.fixture
def pull(pull_many):
    """A publisher and the PULL socket it sends to."""
    make, sock = pull_many
    return make(), sock


FRAME_CASES = [
    ("alice", "ID", {"a": 1}),
    ("alice", "ID", {"a": 1}),  # the second time from the caches
    ("alice", "OTHER", [1, 2.5, "three"]),
    ("bob", "ID", None),
    ("bob", "ID", {"text": "null", "x": None}),  # "null" in the output: the strict encoder
    ("ünïcødé ✓", "ÏD \"quoted\"", "✓" * 10),
    ("u" * 200, "x", "a" * 1018),  # id + data exactly 1024 bytes; the username is not counted
]


def test_push_sends_exactly_what_encode_push_builds(pull):
    publisher, sock = pull
    for user, message_id, data in FRAME_CASES:
        publisher.push(user, message_id, data)
        assert sock.recv() == protocol.encode_push(user, message_id, data, 1024)
    publisher.push_all("NEWS", {"n": 1})
    assert sock.recv() == protocol.encode_push("*", "NEWS", {"n": 1}, 1024)


@pytest.mark.parametrize(
    "args, message",
    [
        (("*", "NEWS", 1), "reserved"),  # even with the broadcast head and this id cached
        ((["alice"], "ID", 1), "string"),
        (({"a": 1}, "ID", 1), "string"),
        (("alice", ["ID"], 1), "string"),
        (("alice", "ID", datetime.datetime(2026, 1, 1)), "JSON"),
        (("alice", "ID", math.inf), "JSON"),
        (("u" * 200, "x", "a" * 1019), "1025 bytes, over the 1024-byte limit"),
    ],
)
def test_bad_input_on_the_fast_path_refused_and_nothing_sent(pull, args, message):
    publisher, sock = pull
    # Warm the head and id caches, so that refusals are checked on the cached path too.
    publisher.push_all("NEWS", 0)
    publisher.push("u" * 200, "x", 0)
    publisher.push("alice", "ID", 0)
    with pytest.raises(flow.InvalidMessage, match=message):
        publisher.push(*args)
    publisher.push("alice", "OK", 1)
    frames = [sock.recv() for _ in range(4)]
    assert frames[-1] == protocol.encode_push("alice", "OK", 1, 1024)


def test_invalid_message_is_a_value_error():
    assert issubclass(flow.InvalidMessage, ValueError)


@pytest.mark.parametrize("linger", [-1, float("nan"), float("inf"), 1e12, "5"])
def test_a_linger_close_could_never_end_is_refused(tmp_path, linger):
    settings = load_settings({"FLOW_ENV_FILE": str(tmp_path / "none")})
    with pytest.raises(ValueError, match="^linger must be a number of seconds from 0 to 86400"):
        flow.Flow(f"tcp://127.0.0.1:{free_port()}", settings=settings, linger=linger)


def test_queue_full_when_proxy_unreachable(tmp_path):
    settings = load_settings({"FLOW_SECRET": "s" * 32, "FLOW_ENV_FILE": str(tmp_path / "none")})
    publisher = flow.Flow(f"tcp://127.0.0.1:{free_port()}", settings=settings, queue_size=10, linger=0)
    sent = 0
    with pytest.raises(flow.QueueFull, match="not taking messages"):
        for _ in range(1000):
            publisher.push("alice", "ID", sent)
            sent += 1
    assert 10 <= sent < 1000
    publisher.close()


def test_many_threads_share_one_publisher(pipe):
    publisher = pipe.publisher()

    async def run():
        ws, _ = await authenticate(pipe.url(), pipe.token("alice"), max_queue=None)

        def work(t: int) -> None:
            for i in range(250):
                publisher.push("alice", "T", [t, i])

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        got = await collect(ws, 2000)
        assert sorted(tuple(m["data"]) for m in got) == [(t, i) for t in range(8) for i in range(250)]
        assert [m["seq"] for m in got] == list(range(1, 2001))
        for t in range(8):  # each thread's own order is kept
            mine = [m["data"][1] for m in got if m["data"][0] == t]
            assert mine == list(range(250))
        await ws.close()

    asyncio.run(run())


FORKER = """
import os, sys
import flow
flow.push("alice", "PARENT", 1)        # first use opens the socket before the fork
pid = os.fork()
if pid == 0:
    flow.push("alice", "CHILD", 2)
    flow.push_all("CHILD ALL", 3)
    sys.exit(0)                        # atexit flushes the child's own socket
_, status = os.waitpid(pid, 0)
flow.push("alice", "PARENT AGAIN", 4)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_fork_after_first_use(pipe):
    async def run():
        ws, _ = await authenticate(pipe.url(), pipe.token("alice"))
        proc = subprocess.run([PYTHON, "-W", "error", "-c", FORKER], env=pipe.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        # The parent's socket, abandoned in the child, is never finalized there either.
        assert proc.stderr == "", proc.stderr
        got = await collect(ws, 4)
        assert sorted(m["id"] for m in got) == ["CHILD", "CHILD ALL", "PARENT", "PARENT AGAIN"]
        await ws.close()

    asyncio.run(run())


def test_push_at_start_and_exit_of_twenty_processes(pipe):
    """Each process pushes once right after import and exits at once: no slow-joiner loss."""
    async def run():
        ws, _ = await authenticate(pipe.url(), pipe.token("alice"))
        procs = [
            subprocess.Popen([PYTHON, "-c", f"import flow; flow.push('alice', 'HI', {n})"],
                             env=pipe.env, cwd=ROOT)
            for n in range(20)
        ]
        assert [p.wait(60) for p in procs] == [0] * 20
        got = await collect(ws, 20)
        assert sorted(m["data"] for m in got) == list(range(20))
        await ws.close()

    asyncio.run(run())


def test_custom_serializer_and_explicit_endpoint(pipe):
    publisher = flow.Flow(pipe.settings.publish_endpoint, settings=pipe.settings,
                          serializer=lambda data: b'{"pre":"encoded"}')
    pipe.publishers.append(publisher)

    async def run():
        ws, _ = await authenticate(pipe.url(), pipe.token("alice"))
        publisher.push("alice", "S", object())
        [message] = await collect(ws, 1)
        assert message["data"] == {"pre": "encoded"}
        await ws.close()

    asyncio.run(run())


def test_bad_settings_stop_every_process_with_one_line(tmp_path):
    env = base_env(tmp_path, FLOW_HEARTBEAT="often")
    for script in ("message_proxy.py", "websocket_server.py"):
        proc = subprocess.run([PYTHON, script], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "FLOW_HEARTBEAT" in lines[0], proc.stderr
    env = base_env(tmp_path, FLOW_HEARTBEAT="often")
    proc = subprocess.run([PYTHON, "-c", "import flow; flow.push('a', 'b', 1)"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "FLOW_HEARTBEAT" in proc.stderr


# ---------------------------------------------------------------- every refusal is InvalidMessage


def _deep(kind: str, depth: int = 100_000) -> object:
    data: object = 1
    for _ in range(depth):
        data = [data] if kind == "list" else {"k": data}
    return data


@pytest.mark.parametrize(
    "args, message",
    [
        (("alice", "\ud800", 1), "Unicode"),
        (("alice", "TASK \udfff", 1), "Unicode"),
        (("\ud800", "ID", 1), "Unicode"),
        (("alice", "ID", "\ud800"), "JSON"),
        (("alice", "ID", {"\udc80": 1}), "JSON"),
        (("alice", "ID", "deep list"), "nests too deep"),
        (("alice", "ID", "deep dict"), "nests too deep"),
        (("alice", "AUTH FAILED", {"reason": "invalid"}), "reserved"),
        (("alice", "AUTH OK", 1), "reserved"),
        (("alice", "PONG", 1), "reserved"),
        # Old publisher: the standard encoder wrote these; the proxy (orjson) then dropped
        # the push, and flush() said all was sent.
        (("alice", "ID", 10**400), "engines could not read"),
        (("alice", "ID", {"n": [None, -10**309]}), "engines could not read"),
    ],
)
def test_every_refusal_is_invalid_message_and_nothing_sent(pull, args, message):
    publisher, sock = pull
    publisher.push("alice", "ID", 0)  # warm the caches: refusals are checked on the fast path too
    user, message_id, data = args
    if isinstance(data, str) and data.startswith("deep "):
        data = _deep(data.split()[1])
    with pytest.raises(flow.InvalidMessage, match=message) as info:
        publisher.push(user, message_id, data)
    assert type(info.value) is flow.InvalidMessage
    publisher.push("alice", "OK", 1)
    assert sock.recv() == protocol.encode_push("alice", "ID", 0, 1024)
    assert sock.recv() == protocol.encode_push("alice", "OK", 1, 1024)


def test_numbers_the_engines_cannot_read_are_refused_by_push_all_and_publish(pull):
    publisher, sock = pull
    with pytest.raises(flow.InvalidMessage, match="engines could not read"):
        publisher.push_all("ID", {"n": 10**309})
    with pytest.raises(flow.InvalidMessage, match="engines could not read"):
        publisher.publish("doc:1", "ID", [10**400])
    publisher.push("alice", "OK", 10**308)  # within a double's range: fine
    assert sock.recv() == protocol.encode_push("alice", "OK", 10**308, 1024)


@pytest.mark.parametrize("message_id", sorted(protocol.RESERVED_IDS))
def test_reserved_ids_refused_by_push_and_push_all(pull, message_id):
    publisher, sock = pull
    with pytest.raises(flow.InvalidMessage, match="reserved"):
        publisher.push("alice", message_id, 1)
    with pytest.raises(flow.InvalidMessage, match="reserved"):
        publisher.push_all(message_id, 1)
    publisher.push_all("OK", 1)
    assert sock.recv() == protocol.encode_push("*", "OK", 1, 1024)


def test_deep_data_refused_by_push_all(pull):
    publisher, sock = pull
    with pytest.raises(flow.InvalidMessage, match="nests too deep"):
        publisher.push_all("NEWS", _deep("list"))
    publisher.push_all("OK", 1)
    assert sock.recv() == protocol.encode_push("*", "OK", 1, 1024)


def _passthrough(data):
    """A custom serializer whose output is its input: the test chooses the bytes."""
    if isinstance(data, BaseException):
        raise data
    return data


@pytest.mark.parametrize(
    "output",
    [b"\xff", b'"\xff"', b'1,"id":"AUTH FAILED"', b'{"a":1},"username":"bob"', b"", b" ", b"NaN",
     b"[" * 5000 + b"]" * 5000, "", "\ud800", None, 5, bytearray(b"1"), [b"1"]],
    ids=lambda o: repr(o)[:30],
)
def test_custom_serializer_output_not_one_json_value_refused_and_nothing_sent(pull_many, output):
    make, sock = pull_many
    publisher = make(serializer=_passthrough)
    with pytest.raises(flow.InvalidMessage, match="serializer"):
        publisher.push("alice", "ID", output)
    with pytest.raises(flow.InvalidMessage, match="serializer"):
        publisher.push_all("ID", output)
    publisher.push("alice", "OK", b'{"ok":1}')
    assert sock.recv() == protocol.encode_push("alice", "OK", {"ok": 1}, 1024)


@pytest.mark.parametrize("exc", [KeyError("k"), RuntimeError("boom"), TypeError("t"), OverflowError("o")])
def test_custom_serializer_exceptions_become_invalid_message_with_the_cause(pull_many, exc):
    make, sock = pull_many
    publisher = make(serializer=_passthrough)
    with pytest.raises(flow.InvalidMessage) as info:
        publisher.push("alice", "ID", exc)
    assert type(info.value) is flow.InvalidMessage and info.value.__cause__ is exc
    with pytest.raises(flow.InvalidMessage) as info:
        publisher.push_all("ID", exc)
    assert info.value.__cause__ is exc
    publisher.push("alice", "OK", b"1")
    assert sock.recv() == protocol.encode_push("alice", "OK", 1, 1024)


def test_custom_serializer_may_return_str(pull_many):
    make, sock = pull_many
    publisher = make(serializer=_passthrough)
    publisher.push("alice", "S", '{"t":"zoë"}')
    assert sock.recv() == protocol.encode_push("alice", "S", {"t": "zoë"}, 1024)


HOSTILE_RAW_PUSHES = [
    b'P1\0alice\0"x"\n1,"id":"AUTH FAILED"',  # a second id spliced into the frame
    b'P1\0alice\0"x"\n{"a":1},"username":"bob"',
    b'P1\0alice\0"AUTH FAILED"\n{"reason":"invalid"}',
    b'P1\0alice\0"\\u0041UTH OK"\n1',  # reserved once decoded
    b'P1\0alice\0"a","data":1,"x":"y"\n1',
    b'P1\0alice\0"x"\n\xff',
    b'P1\0alice\0"\xff"\n1',
    b'P1\0alice\0"x"\n' + b"[" * 5000 + b"]" * 5000,
    b'P1\0alice\0"x"\nNaN',
]


def test_proxy_drops_raw_pushes_that_would_corrupt_a_frame(pipe):
    """Any local process can reach the proxy's PULL socket, not only flow.push."""
    context = zmq.Context()
    sock = context.socket(zmq.PUSH)

    async def run():
        ws, _ = await authenticate(pipe.url(), pipe.token("alice"))
        sock.connect(pipe.settings.publish_endpoint)
        for raw in HOSTILE_RAW_PUSHES:
            sock.send(raw)
        sock.send(protocol.encode_push("alice", "OK", 1, 1024))
        [first] = await collect(ws, 1)
        # Nothing of the hostile pushes was numbered or delivered: the good one is seq 1.
        assert (first["id"], first["seq"], first["data"]) == ("OK", 1, 1)
        await ws.close()

    try:
        asyncio.run(run())
    finally:
        sock.close(linger=0)
        context.term()
    # Warned about (the proxy may rate-limit these lines), without a traceback.
    wait_until(lambda: "dropped a malformed push" in pipe.proxy.log(), 10, message="a warning about the drops")
    assert "Traceback" not in pipe.proxy.log()
    assert pipe.proxy.alive()


# ---------------------------------------------------------------- flow.issue_token

ISSUE = """
import json, sys
import flow
print(flow.issue_token(*json.loads(sys.argv[1]), **json.loads(sys.argv[2])))
"""


def _issue(env: dict[str, str], *args: object, **claims: object) -> subprocess.CompletedProcess[str]:
    import json

    return subprocess.run([PYTHON, "-W", "error", "-c", ISSUE, json.dumps(args), json.dumps(claims)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_issue_token_is_public_and_signed_with_the_default_settings(tmp_path):
    from flowcore.tokens import TokenVerifier

    env = base_env(tmp_path, FLOW_TOKEN_TTL="120")
    verifier = TokenVerifier(load_settings(env))
    proc = _issue(env, "alice")
    assert proc.returncode == 0, proc.stderr
    verified = verifier.verify_claims(proc.stdout.strip())
    assert verified.username == "alice"
    assert verified.claims["exp"] - verified.claims["iat"] == 120
    proc = _issue(env, "bob", 30, role="admin", channels=["news"])
    assert proc.returncode == 0, proc.stderr
    verified = verifier.verify_claims(proc.stdout.strip())
    assert verified.username == "bob" and verified.claims["exp"] - verified.claims["iat"] == 30
    assert verified.claims["role"] == "admin" and verified.claims["channels"] == ["news"]


@pytest.mark.parametrize("claim", ["username", "sub", "exp", "iat", "nbf", "aud", "iss"])
def test_issue_token_refuses_claims_flow_sets(tmp_path, claim):
    env = base_env(tmp_path)
    proc = _issue(env, "alice", None, **{claim: "mallory"})
    assert proc.returncode == 1 and "ValueError" in proc.stderr and repr(claim) in proc.stderr


def test_issue_token_refuses_a_bad_username():
    with pytest.raises(ValueError, match="empty"):
        flow.issue_token("")
