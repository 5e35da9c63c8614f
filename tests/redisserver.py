"""A real redis-server for integration tests (Debian's /usr/bin/redis-server, never a fake).

    with RedisServer(tmp_path, persistence="aof", password="pw") as redis_server:
        env["FLOW_REDIS_URL"] = redis_server.url
        redis_server.client().xlen(b"key")        # sync redis.Redis, bytes replies
        redis_server.restart()                    # same port, same dir: AOF data survives
        redis_server.pause(); redis_server.resume()   # SIGSTOP / SIGCONT

    def test_x(make_redis):                       # import the fixture into the test module:
        redis_server = make_redis(tls=True)       #   from redisserver import make_redis

Each server lives in its own directory under the given tmp path (redis.conf, data, AOF,
redis.log, TLS material), listens on 127.0.0.1 on an ephemeral port or on a unix socket,
and is never left running: close() on context exit and fixture teardown (also when the test
failed), an atexit hook for anything not closed, and on Linux a parent-death signal so that
even a SIGKILLed pytest takes its redis-servers with it.
"""

from __future__ import annotations

import atexit
import datetime
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import quote

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from support import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
PERSISTENCE = ("none", "aof", "rdb")
# sun_path is 108 bytes on Linux; pytest's tmp paths can be longer than that.
_UNIX_PATH_MAX = 100
_LOG_TAIL_LINES = 40

# Servers not yet closed, so the atexit hook can reap what a crashed test left behind
# (strong references: a forgotten server must still be found at exit).
_live: "set[RedisServer]" = set()
_tls_probe: str | None = None  # "" = TLS works, otherwise why not; None = not probed yet


def _reap_all() -> None:
    for server in list(_live):
        server.close()


atexit.register(_reap_all)


def tls_unavailable_reason() -> str:
    """Why this redis-server cannot serve TLS, or "" when it can. Probed once: Debian builds
    with TLS today, but a redis-server built without it must make TLS tests skip, not fail."""
    global _tls_probe
    if _tls_probe is None:
        if not os.path.exists(REDIS_SERVER):
            _tls_probe = f"{REDIS_SERVER} is not installed"
        else:
            # --tls-port 0 with --port 0 is accepted only by a TLS build; it then exits
            # with "Configured to not listen anywhere". A non-TLS build rejects the option.
            probe = subprocess.run(
                [REDIS_SERVER, "--port", "0", "--tls-port", "0", "--save", "", "--logfile", ""],
                capture_output=True, text=True, timeout=10, cwd=tempfile.gettempdir(),
            )
            output = probe.stdout + probe.stderr
            if "not listen anywhere" in output:
                _tls_probe = ""
            else:
                _tls_probe = (f"{REDIS_SERVER} was built without TLS support "
                              f"(--tls-port refused: {output.strip()[-200:]})")
    return _tls_probe


def _quoted(value: object) -> str:
    """A redis.conf argument in double quotes: paths with spaces or quotes stay one word."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _fast_client(**kwargs: Any) -> dict[str, Any]:
    """Client options for probes: short timeouts and no retry, because redis-py 8.1 retries
    ConnectionError and TimeoutError 10 times by default, which would hide a paused server."""
    options: dict[str, Any] = dict(socket_timeout=1.0, socket_connect_timeout=1.0,
                                   retry=Retry(NoBackoff(), 0))
    options.update(kwargs)
    return options


class RedisServer:
    """One redis-server process and its directory. Not started until start()."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        name: str = "redis",
        persistence: str = "none",
        rdb_save: str = "60 1",
        password: str | None = None,
        username: str | None = None,
        tls: bool = False,
        tls_auth_clients: bool = False,
        unix_socket: bool = False,
        db: int = 0,
        pubsub_buffer_limit: str | None = None,
        maxmemory: str | None = None,
        maxmemory_policy: str = "noeviction",
        extra_config: Sequence[str] = (),
        start_timeout: float = 10.0,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"name must be a plain directory name, not {name!r}")
        if persistence not in PERSISTENCE:
            raise ValueError(f"persistence must be one of {PERSISTENCE}, not {persistence!r}")
        if tls and unix_socket:
            raise ValueError("redis-server serves TLS on TCP only, not on a unix socket")
        if tls_auth_clients and not tls:
            raise ValueError("tls_auth_clients needs tls=True")
        if tls:
            reason = tls_unavailable_reason()
            if reason:
                pytest.skip(reason)
        if username is not None and password is None:
            password = secrets.token_hex(16)
        self.dir = Path(tmp_path) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.persistence = persistence
        self.rdb_save = rdb_save
        self.password = password
        self.username = username
        self.tls = tls
        self.tls_auth_clients = tls_auth_clients
        self.db = db
        self.pubsub_buffer_limit = pubsub_buffer_limit
        self.maxmemory = maxmemory
        self.maxmemory_policy = maxmemory_policy
        self.extra_config = list(extra_config)
        self.start_timeout = start_timeout
        self.host = "127.0.0.1"
        self.conf_path = self.dir / "redis.conf"
        self.log_path = self.dir / "redis.log"
        # Early errors (a bad config line) go to stdout before the logfile is opened.
        self.stdout_path = self.dir / "redis.stdout"
        self._short_dir: str | None = None
        self.unix_socket: Path | None = None
        self.port = 0
        if unix_socket:
            sock = self.dir / "redis.sock"
            if len(str(sock)) > _UNIX_PATH_MAX:
                self._short_dir = tempfile.mkdtemp(prefix="flowredis-")
                sock = Path(self._short_dir) / "redis.sock"
            self.unix_socket = sock
        else:
            self.port = free_port()
        self.ca_path: Path | None = None
        self.client_cert_path: Path | None = None
        self.client_key_path: Path | None = None
        if tls:
            self._make_tls_material()
        self.popen: subprocess.Popen[bytes] | None = None
        self._stdout: Any = None
        self._paused = False
        self._clients: list[redis.Redis] = []
        _live.add(self)

    # -- configuration -------------------------------------------------------------------

    def config_lines(self) -> list[str]:
        """The redis.conf this server runs with (written at each start)."""
        lines = [
            f"dir {_quoted(self.dir)}",
            f"logfile {_quoted(self.log_path)}",
            "loglevel notice",
            "daemonize no",
            "supervised no",
            "always-show-logo no",
            "databases 16",
            # Loopback or an owner-only socket only; protected mode stays on regardless.
            f"bind {self.host}",
            "protected-mode yes",
            # DEBUG SLEEP / DEBUG RELOAD are handy in fault tests; from loopback only.
            "enable-debug-command local",
            f"maxmemory-policy {self.maxmemory_policy}",
        ]
        if self.unix_socket is not None:
            lines += ["port 0", f"unixsocket {_quoted(self.unix_socket)}", "unixsocketperm 700"]
        elif self.tls:
            lines += [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {_quoted(self.dir / 'server.crt')}",
                f"tls-key-file {_quoted(self.dir / 'server.key')}",
                f"tls-ca-cert-file {_quoted(self.ca_path)}",
                f"tls-auth-clients {'yes' if self.tls_auth_clients else 'no'}",
            ]
        else:
            lines.append(f"port {self.port}")
        if self.persistence == "none":
            lines += ['save ""', "appendonly no"]
        elif self.persistence == "aof":
            # fsync on every write: SIGKILL loses nothing that was acknowledged.
            lines += ['save ""', "appendonly yes", "appendfsync always",
                      "appenddirname appendonlydir"]
        else:
            lines += [f"save {self.rdb_save}", "appendonly no", "dbfilename dump.rdb"]
        if self.username is not None and self.password is not None:
            # ACL user with every right; the passwordless default user is switched off.
            lines += [f"user {self.username} on {_quoted('>' + self.password)} ~* &* +@all",
                      "user default off"]
        elif self.password is not None:
            lines.append(f"requirepass {_quoted(self.password)}")
        if self.pubsub_buffer_limit is not None:
            lines.append(f"client-output-buffer-limit pubsub {self.pubsub_buffer_limit}")
        if self.maxmemory is not None:
            lines.append(f"maxmemory {self.maxmemory}")
        lines += self.extra_config
        return lines

    def _make_tls_material(self) -> None:
        """A CA and a server certificate for 127.0.0.1/localhost (and a client certificate),
        made with `cryptography` into the server's directory."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2)

        def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
            path.write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
            path.chmod(0o600)

        def name(common_name: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name(f"Flow test CA {self.name}"))
            .issuer_name(name(f"Flow test CA {self.name}"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )

        def leaf(common_name: str, usage: x509.ObjectIdentifier,
                 san: list[x509.GeneralName] | None) -> tuple[ec.EllipticCurvePrivateKey,
                                                            x509.Certificate]:
            key = ec.generate_private_key(ec.SECP256R1())
            builder = (
                x509.CertificateBuilder()
                .subject_name(name(common_name))
                .issuer_name(ca_cert.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=True, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    ca_key.public_key()), critical=False)
            )
            if san:
                builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
            return key, builder.sign(ca_key, hashes.SHA256())

        server_key, server_cert = leaf(
            "localhost", ExtendedKeyUsageOID.SERVER_AUTH,
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        client_key, client_cert = leaf("flow test client", ExtendedKeyUsageOID.CLIENT_AUTH, None)

        self.ca_path = self.dir / "ca.crt"
        self.ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        (self.dir / "server.crt").write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
        write_key(server_key, self.dir / "server.key")
        self.client_cert_path = self.dir / "client.crt"
        self.client_cert_path.write_bytes(client_cert.public_bytes(serialization.Encoding.PEM))
        self.client_key_path = self.dir / "client.key"
        write_key(client_key, self.client_key_path)

    # -- addresses -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The URL for FLOW_REDIS_URL / redis.from_url: credentials, database, TLS files."""
        auth = ""
        if self.password is not None:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        if self.unix_socket is not None:
            return f"unix://{auth}{self.unix_socket}?db={self.db}"
        if not self.tls:
            return f"redis://{auth}{self.host}:{self.port}/{self.db}"
        # redis-py passes unknown query parameters through as connection keyword
        # arguments, so ssl_ca_certs (and ssl_certfile/ssl_keyfile) work in the URL.
        query = f"ssl_ca_certs={quote(str(self.ca_path), safe='/')}"
        if self.tls_auth_clients:
            query += (f"&ssl_certfile={quote(str(self.client_cert_path), safe='/')}"
                      f"&ssl_keyfile={quote(str(self.client_key_path), safe='/')}")
        return f"rediss://{auth}{self.host}:{self.port}/{self.db}?{query}"

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> "RedisServer":
        """Start redis-server and wait until it answers PING (deadline: start_timeout)."""
        if self.alive():
            raise RuntimeError(f"redis-server {self.name} is already running (pid {self.pid})")
        config = "\n".join(self.config_lines()) + "\n"
        # Written for whoever reads a failed test's directory; redis-server itself reads the
        # config from stdin, because a config *file* name is expanded as a glob pattern: a
        # "[" in the path matches nothing and redis-server runs silently on port 6379.
        self.conf_path.write_text(config)
        args = [REDIS_SERVER, "-"]
        # Parent-death signal (util-linux setpriv execs redis-server, so the pid is
        # redis-server's): a SIGKILLed pytest leaves no server behind. Only from the main
        # thread: the signal fires when the forking *thread* exits.
        setpriv = shutil.which("setpriv")
        if setpriv and threading.current_thread() is threading.main_thread():
            args = [setpriv, "--pdeathsig", "KILL", "--"] + args
        self._stdout = open(self.stdout_path, "ab")
        self.popen = subprocess.Popen(args, cwd=self.dir, stdin=subprocess.PIPE,
                                      stdout=self._stdout, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        assert self.popen.stdin is not None
        try:
            self.popen.stdin.write(config.encode())
            self.popen.stdin.close()
        except BrokenPipeError:  # exited already; reported with its log just below
            pass
        self._paused = False
        deadline = time.monotonic() + self.start_timeout
        last_error: Exception | None = None
        while True:
            if not self.alive():
                code = self.popen.returncode
                self._close_stdout()
                raise RuntimeError(f"redis-server {self.name} exited with {code} at start; "
                                   f"log tail:\n{self.log_tail()}")
            try:
                with redis.Redis.from_url(self.url, **_fast_client()) as probe:
                    if probe.ping():
                        return self
            except redis.RedisError as exc:  # not listening yet, or LOADING the AOF/RDB
                last_error = exc
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"redis-server {self.name} did not answer PING within "
                    f"{self.start_timeout}s (last error: {last_error!r}); "
                    f"log tail:\n{self.log_tail()}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL and reap: a crash. What was not yet fsynced is lost."""
        if self.popen is None:
            return
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)
        self._paused = False
        self._close_stdout()

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait: redis-server's SHUTDOWN (AOF fsynced, RDB saved when a save
        rule is set). Returns the exit code (0 on a clean shutdown); SIGKILL after timeout."""
        if self.popen is None:
            return 0
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            if self._paused:  # a stopped process sees SIGTERM only once continued
                self.popen.send_signal(signal.SIGCONT)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
                self._paused = False
                self._close_stdout()
                raise RuntimeError(f"redis-server {self.name} ignored SIGTERM for {timeout}s; "
                                   f"killed. Log tail:\n{self.log_tail()}")
        self._paused = False
        self._close_stdout()
        return self.popen.returncode

    def restart(self, hard: bool = False) -> "RedisServer":
        """Stop (SIGTERM, or SIGKILL with hard=True) and start again on the same port and
        directory: with AOF the data survives; the run_id changes in any case."""
        if hard:
            self.kill()
        else:
            self.stop()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open, the kernel still accepts, nothing answers."""
        assert self.popen is not None and self.alive(), "pause() of a server not running"
        self.popen.send_signal(signal.SIGSTOP)
        self._paused = True
        self._wait_state(stopped=True)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        assert self.popen is not None and self.alive(), "resume() of a server not running"
        self.popen.send_signal(signal.SIGCONT)
        self._paused = False
        self._wait_state(stopped=False)

    def _wait_state(self, stopped: bool) -> None:
        # Signals are asynchronous; the kernel's process state says when they took effect.
        assert self.popen is not None
        stat = Path(f"/proc/{self.popen.pid}/stat")
        deadline = time.monotonic() + 5.0
        while True:
            try:
                # The state is the field after the ")" that closes the command name.
                state = stat.read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                return  # no /proc (or gone): nothing to wait for
            if (state in ("T", "t")) == stopped:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server {self.name} state {state!r} after "
                                   f"{'SIGSTOP' if stopped else 'SIGCONT'}")
            time.sleep(0.005)

    def close(self) -> None:
        """Kill the server (if running), close every client() handed out, drop the short
        socket directory. Safe to call more than once."""
        for client in self._clients:
            client.close()
        self._clients.clear()
        self.kill()
        if self._short_dir is not None:
            shutil.rmtree(self._short_dir, ignore_errors=True)
            self._short_dir = None
        _live.discard(self)

    def _close_stdout(self) -> None:
        if self._stdout is not None:
            self._stdout.close()
            self._stdout = None

    def __enter__(self) -> "RedisServer":
        if not self.alive():
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- inspection ----------------------------------------------------------------------

    def client(self, **kwargs: Any) -> redis.Redis:
        """A sync redis.Redis on url for test assertions: bytes replies, 5 s socket
        timeout, no retries (so a test sees the failure); kwargs override. Closed by close()."""
        options: dict[str, Any] = dict(decode_responses=False, socket_timeout=5.0,
                                       socket_connect_timeout=5.0, retry=Retry(NoBackoff(), 0))
        options.update(kwargs)
        client = redis.Redis.from_url(self.url, **options)
        self._clients.append(client)
        return client

    def run_id(self) -> str:
        """INFO server run_id: changes at every start of redis-server."""
        with redis.Redis.from_url(self.url, **_fast_client(socket_timeout=5.0)) as probe:
            return str(probe.info("server")["run_id"])

    def log(self) -> str:
        """redis.log, preceded by anything printed before the log file was opened."""
        text = ""
        for path in (self.stdout_path, self.log_path):
            if path.exists():
                text += path.read_text(errors="replace")
        return text

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def __repr__(self) -> str:
        where = self.unix_socket or f"{self.host}:{self.port}"
        return f"<RedisServer {self.name} {where} pid={self.pid} {self.persistence}>"


@pytest.fixture
def make_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Factory fixture: make_redis(**RedisServer options) -> a started server. Every server
    is closed at teardown, also when the test failed; teardown then checks none survived."""
    servers: list[RedisServer] = []

    def make(**options: Any) -> RedisServer:
        options.setdefault("name", f"redis{len(servers)}")
        server = RedisServer(tmp_path, **options)
        servers.append(server)
        return server.start()

    yield make
    errors: list[BaseException] = []
    for server in servers:
        try:
            server.close()
        except Exception as exc:  # close the others all the same, then report
            errors.append(exc)
    if errors:
        raise errors[0]
    survivors = [server for server in servers if server.alive()]
    assert not survivors, f"redis-server still running after close: {survivors}"


@pytest.fixture
def redis_server(make_redis: Callable[..., RedisServer]) -> RedisServer:
    """One started redis-server with the defaults (no persistence, no password, TCP)."""
    return make_redis()
