"""The shipped nginx: capacity from FLOW_MAX_CONNECTIONS, slow clients timed out, TLS,
and Flow's browser client served at /flow/websocket.js. Real nginx, real sockets."""

from __future__ import annotations

import asyncio
import base64
import datetime
import http.client
import ipaddress
import json
import os
import re
import resource
import secrets
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException
from websockets.typing import Origin

import flow
from conftest import Stack, _require_nginx, _stop_all, http_get
from flowcore.nginx import find_nginx
from flowcore.resources import data_file
from flowcore.tokens import issue_token
from support import ROOT, base_env, wait_until

# More than the old `worker_connections 4096` of one worker could hold.
FLOOD = 5000
WEBSOCKETS = 5000


@pytest.fixture
def open_files() -> Iterator[Callable[[int], None]]:
    """open_files(n): this process may hold n more sockets (soft limit raised, restored)."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)

    def need(count: int) -> None:
        soft, hard = before
        wanted = count + 1024
        assert hard == resource.RLIM_INFINITY or hard >= wanted, (
            f"this test holds {count} sockets; the open-file hard limit is {hard}")
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))

    yield need
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


def render(tmp_path: Path, preexec: Callable[[], None] | None = None, **overrides: object
           ) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`python -m flowcore.nginx --test`: renders, then nginx -t on the result."""
    env = base_env(tmp_path, **overrides)
    done = subprocess.run([sys.executable, "-m", "flowcore.nginx", "--test"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=30, preexec_fn=preexec)
    return done, Path(env["FLOW_RUN_DIR"]) / "nginx.conf"


def directive(conf: Path, name: str) -> str:
    match = re.search(rf"^\s*{name}\s+([^;]+);", conf.read_text(), re.MULTILINE)
    assert match, f"no {name} in {conf}"
    return match.group(1)


def flow_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("flow: ") and "exec" not in line]


# --- capacity, no stack ------------------------------------------------------------------------


def test_connections_and_open_files_follow_max_connections(tmp_path: Path) -> None:
    if find_nginx() is None:
        pytest.skip("optional dependency missing: nginx (Debian: apt-get install nginx)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard == resource.RLIM_INFINITY or hard >= 8192, hard
    low_soft = 1024

    def lower_soft() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low_soft, hard))

    done, conf = render(tmp_path, lower_soft, FLOW_MAX_CONNECTIONS=3000)
    assert done.returncode == 0, done.stderr
    # Two connections per proxied WebSocket, all of them in one worker if need be.
    connections = int(directive(conf, "worker_connections"))
    files = int(directive(conf, "worker_rlimit_nofile"))
    assert connections >= 2 * 3000
    assert files > connections
    [line] = flow_lines(done.stderr)
    assert line.startswith("flow: nginx capacity: 3000 WebSocket clients"), line
    # The soft limit nginx inherits was raised to the hard one.
    assert f"open files soft {hard if hard != resource.RLIM_INFINITY else 'unlimited'}" in line
    assert "test is successful" in done.stderr


def test_a_hard_limit_too_low_is_one_warning_not_a_failure(tmp_path: Path) -> None:
    if find_nginx() is None:
        pytest.skip("optional dependency missing: nginx (Debian: apt-get install nginx)")
    limit = 4096

    def lower_hard() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, limit))

    done, conf = render(tmp_path, lower_hard, FLOW_MAX_CONNECTIONS=20000)
    assert done.returncode == 0, done.stderr
    capacity, warning = flow_lines(done.stderr)
    assert "capacity" in capacity and f"hard {limit}" in capacity, capacity
    assert warning.startswith("flow: warning: the open-file hard limit (4096)"), warning
    assert "FLOW_MAX_CONNECTIONS=20000" in warning
    # nginx asks for no more than it can get, so it does not warn at each worker start.
    assert int(directive(conf, "worker_rlimit_nofile")) == limit
    assert int(directive(conf, "worker_connections")) < limit
    assert "exceed open file resource limit" not in done.stderr
    assert "test is successful" in done.stderr


# --- TLS settings, no stack --------------------------------------------------------------------


@pytest.mark.parametrize("given", ["FLOW_TLS_CERT", "FLOW_TLS_KEY"])
def test_tls_needs_both_cert_and_key(tmp_path: Path, given: str) -> None:
    pem = tmp_path / "some.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    env = base_env(tmp_path, **{given: pem})
    done = subprocess.run([sys.executable, "-m", "flowcore.nginx", "--render"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    other = "FLOW_TLS_KEY" if given == "FLOW_TLS_CERT" else "FLOW_TLS_CERT"
    assert given in line and other in line, line
    assert not (Path(env["FLOW_RUN_DIR"]) / "nginx.conf").exists()


def test_an_unreadable_certificate_is_one_line(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    env = base_env(tmp_path, FLOW_TLS_CERT=tmp_path / "missing.pem", FLOW_TLS_KEY=key)
    done = subprocess.run([sys.executable, "-m", "flowcore.nginx", "--render"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert "FLOW_TLS_CERT" in line and "missing.pem" in line, line


# --- slow and half-open clients, through a real stack ------------------------------------------


def half_open(port: int, count: int, deadline: float) -> list[socket.socket]:
    """``count`` connections that each sent the start of a request line, and hold."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            assert time.monotonic() < deadline, f"only {len(held)} half-open connections in time"
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            held.append(sock)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line: incomplete
    except BaseException:
        close_all(held)
        raise
    return held


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def still_open(sock: socket.socket) -> bool:
    """Nothing to read and no end of stream: nginx has not closed or reset it."""
    sock.setblocking(False)  # with a timeout set, recv would wait for data first
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


async def authenticated(url: str, origin: str, token: str, **kwargs: Any) -> dict[str, Any]:
    async with connect(url, origin=Origin(origin), proxy=None, open_timeout=10, close_timeout=1,
                       **kwargs) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 10)) == {"id": "AUTH REQUEST"}
        await ws.send(token)
        reply: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
        return reply


@pytest.mark.stack
def test_a_held_flood_of_half_open_requests_leaves_the_page_and_websocket_usable(
        make_stack: Callable[..., Stack], open_files: Callable[[int], None]) -> None:
    open_files(FLOOD)
    # A header timeout longer than the test, so the flood is really held throughout.
    stack = make_stack(FLOW_HEADER_TIMEOUT=120)
    flood = half_open(stack.http_port, FLOOD, time.monotonic() + 60)
    try:
        status, body = http_get(stack.base_url + "/", timeout=10)
        assert status == 200 and body
        reply = asyncio.run(authenticated(stack.ws_url, stack.base_url,
                                          issue_token(stack.settings, "alice")))
        assert reply["id"] == "AUTH OK" and reply["username"] == "alice", reply
        # The flood was held all along, not shed to make room.
        closed = sum(1 for sock in flood if not still_open(sock))
        assert closed == 0, f"nginx dropped {closed} of {FLOOD} half-open connections"
    finally:
        close_all(flood)


@pytest.fixture(scope="module")
def tight_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack with a 1 s header timeout, and unauthenticated sockets kept for minutes
    (so a test can hold thousands of fresh handshakes at once)."""
    _require_nginx()
    stack = Stack(tmp_path_factory.mktemp("tight_stack"),
                  {"FLOW_HEADER_TIMEOUT": 1, "FLOW_AUTH_TIMEOUT": 300})
    try:
        yield stack.start()
    finally:
        _stop_all([stack])


def closed_within(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the peer closed or reset ``sock``; None if it did not in ``timeout``."""
    start = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass  # a 408 or 400 answer would be fine too; what counts is the close
    except ConnectionResetError:
        pass  # reset_timedout_connection
    except TimeoutError:
        return None
    return time.monotonic() - start


@pytest.mark.stack
def test_a_half_open_request_is_closed_after_the_header_timeout(tight_stack: Stack) -> None:
    stack = tight_stack
    partial = socket.create_connection(("127.0.0.1", stack.http_port), timeout=5)
    silent = socket.create_connection(("127.0.0.1", stack.http_port), timeout=5)
    with partial, silent:
        partial.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        # nginx's default is 60 s; FLOW_HEADER_TIMEOUT=1 must be what it uses.
        for sock in (partial, silent):
            seconds = closed_within(sock, 15)
            assert seconds is not None, "nginx kept a half-open connection past its header timeout"
    # A complete request on a fresh connection is served as usual.
    assert http_get(stack.base_url + "/")[0] == 200


def handshake_request(port: int, origin: str) -> bytes:
    key = base64.b64encode(secrets.token_bytes(16)).decode()
    return (f"GET /websocket HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Origin: {origin}\r\n\r\n").encode()


async def hold_handshakes(port: int, origin: str, count: int, timeout: float) -> list[str]:
    """Open ``count`` WebSocket handshakes through nginx and hold them all at once;
    the status line each got (or the error)."""
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    gate = asyncio.Semaphore(200)

    async def one() -> str:
        async with gate:
            sock = socket.socket()
            sock.setblocking(False)
            socks.append(sock)
            try:
                await loop.sock_connect(sock, ("127.0.0.1", port))
                await loop.sock_sendall(sock, handshake_request(port, origin))
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 8192:
                    chunk = await loop.sock_recv(sock, 4096)
                    if not chunk:
                        return f"closed after {head!r}"
                    head += chunk
            except OSError as exc:
                return f"error: {exc!r}"
            return head.split(b"\r\n", 1)[0].decode(errors="replace")

    try:
        async with asyncio.timeout(timeout):
            statuses = await asyncio.gather(*(one() for _ in range(count)))
        # Every socket is still open once the last one is up: they were held together.
        dropped = sum(1 for sock in socks if not still_open(sock))
        assert dropped == 0, f"{dropped} sockets were closed while the others connected"
        return list(statuses)
    finally:
        close_all(socks)


@pytest.mark.stack
def test_more_websockets_than_the_old_limit_are_all_accepted(
        tight_stack: Stack, open_files: Callable[[int], None]) -> None:
    open_files(WEBSOCKETS)
    stack = tight_stack
    statuses = asyncio.run(hold_handshakes(stack.http_port, stack.base_url, WEBSOCKETS, 120))
    refused = [s for s in statuses if not s.startswith("HTTP/1.1 101")]
    assert not refused, f"{len(refused)} of {WEBSOCKETS} refused, e.g. {sorted(set(refused))[:3]}"
    # And the stack still serves a real client afterwards.
    wait_until(stack.websocket_greets, 20, 0.2, "a handshake after the crowd left")


# --- the browser client ------------------------------------------------------------------------


@pytest.mark.stack
def test_the_browser_client_is_served_at_flow_websocket_js(tight_stack: Stack) -> None:
    request = urllib.request.Request(tight_stack.base_url + "/flow/websocket.js")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as response:
        assert response.status == 200
        assert response.headers.get_content_type() == "application/javascript"
        assert response.read() == data_file("websocket.js").read_bytes()
        # HSTS only over TLS.
        assert response.headers.get("Strict-Transport-Security") is None


# --- TLS, through a real stack -----------------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA, and its key: (cert.pem, key.pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Flow test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                    x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return cert_path, key_path


class TlsStack(Stack):
    """The same stack with FLOW_TLS_CERT/KEY: its URLs are https and wss."""

    def __init__(self, tmp_path: Path, overrides: dict[str, object], context: ssl.SSLContext) -> None:
        super().__init__(tmp_path, overrides)
        self.context = context
        self.base_url = f"https://127.0.0.1:{self.http_port}"
        self.ws_url = f"wss://127.0.0.1:{self.http_port}/websocket"

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                             urllib.request.HTTPSHandler(context=self.context))
        try:
            with opener.open(self.base_url + path, timeout=5) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, dict(exc.headers), exc.read()

    def serves_index(self) -> bool:
        try:
            return self.get("/")[0] == 200
        except OSError:
            return False

    def websocket_greets(self) -> bool:
        async def greet() -> bool:
            async with connect(self.ws_url, origin=Origin(self.base_url), ssl=self.context, proxy=None,
                               open_timeout=2, close_timeout=1) as ws:
                return bool(json.loads(await asyncio.wait_for(ws.recv(), 2)) == {"id": "AUTH REQUEST"})

        try:
            return asyncio.run(greet())
        except (OSError, TimeoutError, WebSocketException, ValueError):
            return False


@pytest.fixture
def tls_stack(tmp_path: Path) -> Iterator[TlsStack]:
    _require_nginx()
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(cafile=str(cert))
    (tmp_path / "stack").mkdir()
    stack = TlsStack(tmp_path / "stack", {"FLOW_TLS_CERT": cert, "FLOW_TLS_KEY": key}, context)
    try:
        stack.start()
        yield stack
    finally:
        _stop_all([stack])


async def receive_push(stack: TlsStack, username: str, push: Callable[[], None]) -> dict[str, Any]:
    async with connect(stack.ws_url, origin=Origin(stack.base_url), ssl=stack.context, proxy=None,
                       open_timeout=10, close_timeout=1) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 10)) == {"id": "AUTH REQUEST"}
        await ws.send(issue_token(stack.settings, username))
        ok = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert ok["id"] == "AUTH OK", ok
        push()
        async with asyncio.timeout(15):
            while True:
                raw = await ws.recv()
                if raw != "<3":
                    message: dict[str, Any] = json.loads(raw)
                    return message


@pytest.mark.stack
def test_tls_serves_https_and_wss_on_the_same_port(tls_stack: TlsStack) -> None:
    stack = tls_stack
    status, headers, body = stack.get("/")
    assert status == 200 and body
    assert headers.get("Strict-Transport-Security", "").startswith("max-age="), headers
    status, headers, script = stack.get("/flow/websocket.js")
    assert status == 200 and script == data_file("websocket.js").read_bytes()

    # wss: the Origin check passes with an https origin, and a push arrives.
    publisher = flow.Flow(settings=stack.settings)
    try:
        message = asyncio.run(receive_push(stack, "tess", lambda: publisher.push("tess", "HELLO", {"n": 1})))
    finally:
        publisher.close()
    assert message["id"] == "HELLO" and message["data"] == {"n": 1}, message

    # Plain http on the TLS port is sent to https, never served.
    plain = http.client.HTTPConnection("127.0.0.1", stack.http_port, timeout=5)
    try:
        plain.request("GET", "/some/page?x=1", headers={"Host": f"127.0.0.1:{stack.http_port}"})
        response = plain.getresponse()
        assert response.status == 301
        assert response.getheader("Location") == f"https://127.0.0.1:{stack.http_port}/some/page?x=1"
        assert b"AUTH" not in response.read()
    finally:
        plain.close()


def test_without_tls_there_is_no_ssl_and_no_hsts(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "flowcore.nginx", "--render"],
                          env=base_env(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    conf = Path(done.stdout.strip())
    include = (conf.parent / "nginx-tls.conf").read_text()
    assert "ssl_certificate" not in include and "Strict-Transport-Security" not in include
    assert re.search(r"listen 127\.0\.0\.1:\d+;", conf.read_text())



# --- adversarial review (adv_c): what an attacker on the network tries -------------------------


@pytest.mark.stack
def test_a_slow_request_body_is_closed_after_the_timeout(tight_stack: Stack) -> None:
    """Slowloris on the body: a whole header, then a body that never comes. nginx's default
    client_body_timeout is 60 s; the stack's is FLOW_HEADER_TIMEOUT (1 s here)."""
    stack = tight_stack
    with socket.create_connection(("127.0.0.1", stack.http_port), timeout=5) as sock:
        sock.sendall(b"POST /send HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     b"application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\nmessage=")
        seconds = closed_within(sock, 15)
        assert seconds is not None, "nginx kept a stalled request body past its timeout"
    assert http_get(stack.base_url + "/")[0] == 200


@pytest.mark.stack
@pytest.mark.parametrize("path", ["/flow/websocket.js/../../app/__init__.py", "/flow/websocket.jsx",
                                  "/flow/websocket.js/", "/flow/websocket.js/x", "/flow/../nginx.conf",
                                  "/flow/%2e%2e/nginx.conf", "/static/../app/__init__.py"])
def test_paths_beside_the_client_script_serve_no_file(tight_stack: Stack, path: str) -> None:
    """location = /flow/websocket.js with alias: only that exact path is the script; the
    rest goes to the app (404), never to a file beside it."""
    conn = http.client.HTTPConnection("127.0.0.1", tight_stack.http_port, timeout=5)
    try:
        conn.request("GET", path)  # sent as is: http.client does not normalise "..".
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status in (400, 404), (path, response.status)
    for secret in (b"createSocket", b"def create_app", b"worker_connections"):
        assert secret not in body, (path, secret)


@pytest.mark.stack
def test_request_smuggling_shapes_are_refused(tight_stack: Stack) -> None:
    """Both Content-Length and Transfer-Encoding, two lengths, an unknown coding: nginx
    answers 4xx/501 and closes, so nothing after the first request reaches the app as a
    request of its own."""
    host = b"Host: 127.0.0.1\r\n"
    smuggled = b"GET /api/state HTTP/1.1\r\n" + host + b"\r\n"
    shapes = [
        b"POST /send HTTP/1.1\r\n" + host + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /send HTTP/1.1\r\n" + host + b"Content-Length: 0\r\nContent-Length: 44\r\n\r\n",
        b"POST /send HTTP/1.1\r\n" + host + b"Transfer-Encoding: xchunked\r\nContent-Length: 0\r\n\r\n",
    ]
    for shape in shapes:
        with socket.create_connection(("127.0.0.1", tight_stack.http_port), timeout=5) as sock:
            sock.sendall(shape + smuggled)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        statuses = re.findall(rb"^HTTP/1\.1 (\d{3})", answer, re.MULTILINE)
        assert statuses and statuses[0] in (b"400", b"501"), (shape, answer[:200])
        assert len(statuses) == 1, f"a second response (smuggled request served): {answer[:400]!r}"


@pytest.mark.stack
def test_huge_headers_get_a_clear_status(tight_stack: Stack) -> None:
    for extra in (b"X-Big: " + b"a" * 20000 + b"\r\n", b"".join(b"X-%d: a\r\n" % i for i in range(3000))):
        with socket.create_connection(("127.0.0.1", tight_stack.http_port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + extra + b"\r\n")
            head = sock.recv(65536).split(b"\r\n", 1)[0]
        assert head == b"HTTP/1.1 400 Bad Request", head
    assert http_get(tight_stack.base_url + "/")[0] == 200


@pytest.mark.stack
def test_a_spoofed_forwarded_for_is_not_what_the_logs_name(tight_stack: Stack) -> None:
    """A refused handshake is logged with the client's address: nginx's own $remote_addr
    in X-Real-IP, never the X-Forwarded-For or X-Real-IP the client made up."""
    stack = tight_stack
    spoofed = "203.0.113.77"
    with socket.create_connection(("127.0.0.1", stack.http_port), timeout=5) as sock:
        sock.sendall(handshake_request(stack.http_port, "https://evil.example").replace(
            b"\r\n\r\n", f"\r\nX-Forwarded-For: {spoofed}\r\nX-Real-IP: {spoofed}\r\n\r\n".encode()))
        assert sock.recv(4096).startswith(b"HTTP/1.1 403")

    def logged() -> list[str]:
        return [line for log in stack.log_dir.glob("websocket-*.log")
                for line in log.read_text(errors="replace").splitlines() if "evil.example" in line]

    lines = wait_until(logged, 10, 0.05, "the refused origin in a websocket log")
    assert all(spoofed not in line for line in lines), lines
    access = (stack.log_dir / "nginx-access.log").read_text()
    assert spoofed not in "\n".join(l.split(" ", 1)[0] for l in access.splitlines())


@pytest.mark.stack
def test_tls_refuses_old_protocols_and_marks_the_session_cookie_secure(tls_stack: TlsStack) -> None:
    stack = tls_stack
    # TLS 1.1: the client offers it (security level 0 lets OpenSSL do so), nginx refuses with
    # a protocol_version alert; a refusal by our own OpenSSL would be another reason.
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():  # deprecated is the point: this is what nginx must refuse
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_connection(("127.0.0.1", stack.http_port), timeout=5) as raw:
        with pytest.raises(ssl.SSLError) as refused:
            old.wrap_socket(raw, server_hostname="127.0.0.1").close()
    assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", refused.value

    # The session cookie, through nginx and gunicorn over https: Secure (with HttpOnly,
    # SameSite=Lax), so a plain http request to the host never carries it.
    conn = http.client.HTTPSConnection("127.0.0.1", stack.http_port, timeout=5, context=stack.context)
    try:
        conn.request("GET", "/")
        page = conn.getresponse()
        body = page.read().decode()
        cookies = [v for k, v in page.getheaders() if k.lower() == "set-cookie"]
        assert page.status == 200 and cookies, page.getheaders()
        flags = [part.strip().lower() for part in cookies[0].split(";")]
        assert {"secure", "httponly", "samesite=lax"} <= set(flags), cookies
        assert page.getheader("Cache-Control") == "no-store"
        token = re.search(r'<meta name="csrf-token" content="([^"]+)">', body)
        assert token
        session = cookies[0].split(";", 1)[0]
        form = f"csrf_token={token.group(1)}&username=tess"
        conn.request("POST", "/login", body=form, headers={
            "Cookie": session, "Content-Type": "application/x-www-form-urlencoded",
            "Referer": stack.base_url + "/"})
        login = conn.getresponse()
        login.read()
        assert login.status == 302, login.getheaders()
        assert "secure" in login.getheader("Set-Cookie", "").lower()
    finally:
        conn.close()
