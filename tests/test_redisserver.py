"""The RedisServer test helper itself (tests/redisserver.py): each option really does what
it says on a real redis-server, so the Redis engine's tests can rely on it."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import Any, Callable

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from redisserver import RedisServer, make_redis, redis_server  # noqa: F401 (fixtures)
from support import port_open

MakeRedis = Callable[..., RedisServer]


def bare(server: RedisServer, **kwargs: Any) -> redis.Redis:
    """A client with no credentials and no retries (redis-py 8.1 retries 10 times by default,
    which would turn every refused connection into seconds of backoff)."""
    options: dict[str, Any] = dict(host=server.host, port=server.port, socket_timeout=2.0,
                                   socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0))
    options.update(kwargs)
    return redis.Redis(**options)


def config(client: redis.Redis, name: str) -> str:
    """CONFIG GET of one parameter (redis-py decodes CONFIG GET even without decode_responses)."""
    value = client.config_get(name)[name]
    return value.decode() if isinstance(value, bytes) else str(value)


def gone(pid: int) -> bool:
    """No such process, or only its zombie (dead; an orphan waits for init to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def test_default_server_is_loopback_on_an_ephemeral_port(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.port != 6379
    client = redis_server.client()
    assert client.ping() is True
    assert config(client, "bind") == "127.0.0.1"
    assert config(client, "save") == ""
    assert config(client, "appendonly") == "no"
    assert config(client, "maxmemory-policy") == "noeviction"
    # Its directory holds its config and log, and the log is the server's.
    assert Path(config(client, "dir")) == redis_server.dir
    assert "Ready to accept connections" in redis_server.log()


def test_password_is_required(make_redis: MakeRedis) -> None:
    server = make_redis(password="s3cret")
    assert server.url == f"redis://:s3cret@127.0.0.1:{server.port}/0"
    assert server.client().ping() is True
    with bare(server) as anonymous, pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    with bare(server, password="wrong") as wrong, pytest.raises(redis.AuthenticationError):
        wrong.ping()


def test_acl_user_works_and_default_user_is_off(make_redis: MakeRedis) -> None:
    server = make_redis(username="flow", password="pw")
    assert server.url == f"redis://flow:pw@127.0.0.1:{server.port}/0"
    client = server.client()
    assert client.acl_whoami() == "flow"
    assert client.set(b"k", b"v") and client.publish(b"chan", b"x") == 0
    with bare(server) as anonymous, pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    # The default user is off: not even the right password logs it in.
    with bare(server, username="default", password="pw") as default, \
            pytest.raises(redis.AuthenticationError):
        default.ping()
    assert any(str(rule).startswith("user default off") for rule in client.acl_list())


def test_database_number_is_in_the_url(make_redis: MakeRedis) -> None:
    server = make_redis(db=3)
    assert server.url.endswith("/3")
    server.client().set(b"here", b"1")
    with bare(server, db=3) as db3, bare(server, db=0) as db0:
        assert db3.get(b"here") == b"1"
        assert db0.get(b"here") is None


def test_tls_verifies_the_ca(make_redis: MakeRedis, tmp_path: Path) -> None:
    server = make_redis(tls=True, password="pw")
    assert server.url == (f"rediss://:pw@127.0.0.1:{server.port}/0"
                          f"?ssl_ca_certs={server.ca_path}")
    client = server.client()
    assert client.ping() is True
    assert config(client, "port") == "0"  # no plain TCP listener at all
    assert config(client, "tls-port") == str(server.port)
    # The URL parameters really reached the connection: a verifying TLS connection.
    connection_kwargs = client.connection_pool.connection_kwargs
    assert connection_kwargs["ssl_ca_certs"] == str(server.ca_path)
    assert client.connection_pool.connection_class is redis.SSLConnection
    # Without our CA (the system's CAs only) the certificate does not verify.
    with bare(server, ssl=True, password="pw") as no_ca, \
            pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        no_ca.ping()
    # Another CA's trust does not verify it either.
    other = RedisServer(tmp_path, name="other-ca", tls=True)
    try:
        with bare(server, ssl=True, ssl_ca_certs=str(other.ca_path), password="pw") as wrong, \
                pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            wrong.ping()
    finally:
        other.close()
    # The certificate names 127.0.0.1 and localhost: hostname checking passes for both.
    with bare(server, host="localhost", ssl=True, ssl_ca_certs=str(server.ca_path),
              password="pw") as by_name:
        assert by_name.ping() is True
    # Plain text on the TLS port gets nowhere.
    with bare(server, password="pw") as plain, pytest.raises(redis.ConnectionError):
        plain.ping()


def test_tls_client_certificate_required(make_redis: MakeRedis) -> None:
    server = make_redis(tls=True, tls_auth_clients=True)
    assert "ssl_certfile=" in server.url and "ssl_keyfile=" in server.url
    assert server.client().ping() is True
    assert config(server.client(), "tls-auth-clients") == "yes"
    with bare(server, ssl=True, ssl_ca_certs=str(server.ca_path)) as no_cert, \
            pytest.raises(redis.ConnectionError):
        no_cert.ping()


def test_aof_data_survives_restart_and_run_id_changes(make_redis: MakeRedis) -> None:
    server = make_redis(persistence="aof", password="pw")
    assert config(server.client(), "appendfsync") == "always"
    server.client().xadd(b"stream", {b"n": b"1"}, id=b"1-0")
    first_run, port = server.run_id(), server.port
    server.restart()
    assert server.port == port
    second_run = server.run_id()
    assert second_run != first_run
    assert server.client().xrange(b"stream") == [(b"1-0", {b"n": b"1"})]
    # A crash (SIGKILL) loses nothing either: every write was fsynced before its reply.
    server.client().xadd(b"stream", {b"n": b"2"}, id=b"2-0")
    server.restart(hard=True)
    assert server.run_id() not in (first_run, second_run)
    assert server.client().xlen(b"stream") == 2
    assert (server.dir / "appendonlydir").is_dir()


def test_no_persistence_loses_data_on_restart(make_redis: MakeRedis) -> None:
    server = make_redis(persistence="none")
    server.client().set(b"k", b"v")
    first_run = server.run_id()
    assert server.stop() == 0
    server.start()
    assert server.client().get(b"k") is None
    assert server.run_id() != first_run
    assert not (server.dir / "dump.rdb").exists()


def test_rdb_is_saved_on_stop(make_redis: MakeRedis) -> None:
    server = make_redis(persistence="rdb", rdb_save="3600 1")
    assert config(server.client(), "save") == "3600 1"
    server.client().set(b"k", b"v")
    assert server.stop() == 0  # SHUTDOWN saves the RDB because a save rule is set
    assert (server.dir / "dump.rdb").exists()
    server.start()
    assert server.client().get(b"k") == b"v"


def test_kill_leaves_no_process(make_redis: MakeRedis) -> None:
    server = make_redis()
    pid = server.pid
    assert pid is not None and not gone(pid)
    server.kill()
    assert gone(pid)
    assert not server.alive()
    assert not port_open(server.port)


def test_context_manager_and_close_leave_no_process(tmp_path: Path) -> None:
    with RedisServer(tmp_path, unix_socket=True, password="pw") as server:
        pid = server.pid
        assert pid is not None
        assert server.client().ping() is True
    assert gone(pid)
    # A server that fails its test body is reaped all the same.
    server = RedisServer(tmp_path, name="failing")
    with pytest.raises(ZeroDivisionError), server:
        pid = server.pid
        1 / 0
    assert pid is not None and gone(pid)


def test_pause_times_out_and_resume_answers(make_redis: MakeRedis) -> None:
    server = make_redis()
    client = server.client(socket_timeout=0.3)
    assert client.ping() is True
    server.pause()
    # The kernel still accepts connections; nothing answers them.
    assert port_open(server.port)
    with pytest.raises(redis.TimeoutError):
        client.ping()
    with server.client(socket_timeout=0.3) as fresh, pytest.raises(redis.TimeoutError):
        fresh.ping()
    server.resume()
    assert server.client().ping() is True
    # A paused server still stops cleanly (SIGCONT follows the SIGTERM).
    server.pause()
    assert server.stop() == 0


def test_unix_socket_mode(make_redis: MakeRedis) -> None:
    server = make_redis(unix_socket=True, username="flow", db=2)
    assert server.unix_socket is not None
    assert server.url == f"unix://flow:{server.password}@{server.unix_socket}?db=2"
    assert stat.S_IMODE(server.unix_socket.stat().st_mode) == 0o700
    client = server.client()
    assert client.acl_whoami() == "flow"
    assert config(client, "port") == "0"
    assert client.connection_pool.connection_kwargs["db"] == 2


def test_pubsub_buffer_limit_cuts_a_subscriber(make_redis: MakeRedis) -> None:
    server = make_redis(pubsub_buffer_limit="64kb 0 0")
    client = server.client()
    assert "pubsub 65536 0 0" in config(client, "client-output-buffer-limit")
    # A subscriber that never reads; one message over the hard limit closes it at once.
    with socket.create_connection((server.host, server.port), timeout=5) as subscriber:
        subscriber.sendall(b"*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\nc\r\n")
        assert subscriber.recv(100).startswith(b"*3\r\n$9\r\nsubscribe")
        assert client.publish(b"c", b"x" * 100_000) == 1
        received = b""
        while chunk := subscriber.recv(65536):  # EOF once redis-server cut it
            received += chunk
    assert len(received) < 100_000
    assert "output buffer limits" in server.log()


def test_maxmemory_refuses_writes(make_redis: MakeRedis) -> None:
    server = make_redis(maxmemory="3mb")
    client = server.client()
    assert config(client, "maxmemory") == str(3 * 1024 * 1024)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        for n in range(10):
            client.set(f"k{n}".encode(), b"x" * 1_000_000)


def test_extra_config_lines_and_a_failed_start(make_redis: MakeRedis, tmp_path: Path) -> None:
    server = make_redis(extra_config=["hz 25", "notify-keyspace-events Ex"])
    assert config(server.client(), "hz") == "25"
    broken = RedisServer(tmp_path, name="broken", extra_config=["no-such-directive yes"])
    try:
        with pytest.raises(RuntimeError, match="(?s)exited with 1 at start.*no-such-directive"):
            broken.start()
        assert not broken.alive()
    finally:
        broken.close()


def test_start_twice_is_an_error(redis_server: RedisServer) -> None:
    with pytest.raises(RuntimeError, match="already running"):
        redis_server.start()
    assert redis_server.client().ping() is True


def test_long_tmp_path_gets_a_short_socket_directory(tmp_path: Path) -> None:
    with RedisServer(tmp_path / ("deep" * 25), unix_socket=True) as server:
        assert server.unix_socket is not None
        assert len(str(server.unix_socket)) < 100
        short_dir = server.unix_socket.parent
        assert server.client().ping() is True
    assert not short_dir.exists()


def test_tls_without_a_tls_build_skips(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import redisserver
    monkeypatch.setattr(redisserver, "_tls_probe", "redis-server was built without TLS support")
    with pytest.raises(pytest.skip.Exception, match="built without TLS"):
        RedisServer(tmp_path, tls=True)
    # And the real probe says this Debian build does TLS (the TLS tests above ran, not skipped).
    monkeypatch.setattr(redisserver, "_tls_probe", None)
    assert redisserver.tls_unavailable_reason() == ""


CHILD = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from redisserver import RedisServer
server = RedisServer(Path({tmp!r}), name={name!r}).start()
print(server.pid, flush=True)
if {how!r} == "sigkill":
    os.kill(os.getpid(), signal.SIGKILL)
# "exit": leave without close(); the atexit hook must reap it.
"""


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_a_dying_test_process_takes_its_server_along(how: str, tmp_path: Path) -> None:
    import subprocess
    import sys
    import time
    script = CHILD.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), name=how, how=how)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=30)
    assert child.returncode == (-9 if how == "sigkill" else 0), child.stderr
    pid = int(child.stdout.split()[0])
    deadline = time.monotonic() + 5
    while not gone(pid):  # the kernel delivers the parent-death signal asynchronously
        assert time.monotonic() < deadline, f"redis-server {pid} outlived its test process"
        time.sleep(0.01)
