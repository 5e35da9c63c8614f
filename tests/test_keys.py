"""Keys and secrets by role (issue 11): each process checks what its role needs at start.

A publisher and the proxy need no secret and no key (PROTOCOL section 5); a WebSocket
server needs a key that verifies the configured algorithms; whatever issues tokens needs
the HS* secret or a private key. A key that cannot do its job stops the process at start
with one line naming the variable and the algorithm, and a verifier built on one anyway
refuses every token (the socket closes 4001) instead of dropping it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from fakes import FakeClock, FakeTransport
from flowcore.session import Session
from flowcore.settings import Settings, SettingsError, load_settings
from flowcore.tokens import INVALID, TokenError, TokenVerifier, issue_token, signing_key, verifying_key
from pipeline import Pipeline, collect, opened
from support import PYTHON, ROOT, Proc, base_env, port_open, wait_until

GARBAGE_PEM = "-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5IGF0IGFsbA==\n-----END PUBLIC KEY-----"
GARBAGE_PRIVATE_PEM = "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5IGF0IGFsbA==\n-----END PRIVATE KEY-----"


def _pems(key: Any) -> tuple[str, str]:
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return private, public


@pytest.fixture(scope="module")
def keys() -> dict[str, tuple[str, str]]:
    return {
        "rsa": _pems(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "rsa2": _pems(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "p256": _pems(ec.generate_private_key(ec.SECP256R1())),
        "p384": _pems(ec.generate_private_key(ec.SECP384R1())),
        "ed": _pems(ed25519.Ed25519PrivateKey.generate()),
    }


def one_line_refusal(check: Any, *words: str) -> str:
    with pytest.raises(SettingsError) as info:
        check()
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert "<generator" not in message  # PyJWT's raw wording is not shown
    for word in words:
        assert word in message, message
    return message


# ---------------------------------------------------------------- the verifier's key


@pytest.mark.parametrize(
    "alg, public, why",
    [
        ("RS256", "garbage", "not a readable PEM key"),
        ("RS256", "p256", "ECPublicKey"),
        ("PS256", "ed", "Ed25519PublicKey"),
        ("ES256", "rsa", "RSAPublicKey"),
        ("ES256", "p384", "curve"),
        ("ES384", "p256", "curve"),
        ("EdDSA", "rsa", "RSAPublicKey"),
        ("EdDSA", "garbage", "not a readable PEM key"),
    ],
)
def test_a_public_key_that_cannot_verify_is_refused(keys, alg, public, why):
    pem = GARBAGE_PEM if public == "garbage" else keys[public][1]
    settings = Settings(jwt_algorithms=(alg,), jwt_public_key=pem)
    message = one_line_refusal(settings.check_verifier, "FLOW_JWT_PUBLIC_KEY", alg, why)
    assert message.startswith("FLOW_JWT_PUBLIC_KEY: cannot verify " + alg)
    assert settings.problems("verifier") == [message]


def test_one_key_for_two_families_is_refused(keys):
    settings = Settings(jwt_algorithms=("RS256", "ES256"), jwt_public_key=keys["rsa"][1])
    one_line_refusal(settings.check_verifier, "FLOW_JWT_PUBLIC_KEY", "ES256")


def test_a_private_key_as_the_public_key_is_refused(keys):
    """The WebSocket tier is meant to hold only the public half."""
    settings = Settings(jwt_algorithms=("RS256",), jwt_public_key=keys["rsa"][0])
    one_line_refusal(settings.check_verifier, "FLOW_JWT_PUBLIC_KEY", "private key")


@pytest.mark.parametrize(
    "alg, pair", [("RS256", "rsa"), ("PS256", "rsa"), ("ES256", "p256"), ("ES384", "p384"), ("EdDSA", "ed")]
)
def test_good_keys_pass_and_verify(keys, alg, pair):
    private, public = keys[pair]
    issuer = Settings(jwt_algorithms=(alg,), jwt_private_key=private, jwt_public_key=public)
    issuer.check_issuer()
    verifier = Settings(jwt_algorithms=(alg,), jwt_public_key=public)
    verifier.check_verifier()
    assert TokenVerifier(verifier).verify(issue_token(issuer, "alice")) == "alice"
    # A verifier holding only the private key verifies with its public half.
    Settings(jwt_algorithms=(alg,), jwt_private_key=private).check_verifier()


def test_rs256_and_ps256_share_one_key(keys):
    private, public = keys["rsa"]
    settings = Settings(jwt_algorithms=("RS256", "PS256"), jwt_public_key=public)
    settings.check_verifier()
    ps = jwt.encode({"username": "bob", "exp": int(time.time()) + 60}, private, algorithm="PS256")
    assert TokenVerifier(settings).verify(ps) == "bob"


def test_verifying_key_is_pyjwts_key_object(keys):
    key = verifying_key(Settings(jwt_algorithms=("RS256",), jwt_public_key=keys["rsa"][1]))
    assert isinstance(key, rsa.RSAPublicKey)
    derived = verifying_key(Settings(jwt_algorithms=("ES256",), jwt_private_key=keys["p256"][0]))
    assert isinstance(derived, ec.EllipticCurvePublicKey)


# ---------------------------------------------------------------- the issuer's key


def test_public_key_only_cannot_issue(keys):
    settings = Settings(jwt_algorithms=("RS256",), jwt_public_key=keys["rsa"][1])
    settings.check_verifier()
    message = one_line_refusal(settings.check_issuer, "FLOW_JWT_PRIVATE_KEY", "RS256", "FLOW_JWT_PUBLIC_KEY")
    assert message.startswith("FLOW_JWT_PRIVATE_KEY: required to issue RS256 tokens")


@pytest.mark.parametrize(
    "alg, private, why",
    [
        ("RS256", "garbage", "not a readable PEM key"),
        ("RS256", "p256", "ECPrivateKey"),
        ("ES256", "rsa", "RSAPrivateKey"),
        ("ES256", "p384", "curve"),
        ("EdDSA", "garbage", "not a readable PEM key"),
    ],
)
def test_a_private_key_that_cannot_sign_is_refused(keys, alg, private, why):
    pem = GARBAGE_PRIVATE_PEM if private == "garbage" else keys[private][0]
    settings = Settings(jwt_algorithms=(alg,), jwt_private_key=pem)
    message = one_line_refusal(settings.check_issuer, "FLOW_JWT_PRIVATE_KEY", alg, why)
    assert message.startswith(f"FLOW_JWT_PRIVATE_KEY: cannot sign {alg}")
    # Issuing says the same, as the RuntimeError it always was, not PyJWT's traceback.
    with pytest.raises(RuntimeError, match="^FLOW_JWT_PRIVATE_KEY: cannot sign"):
        issue_token(settings, "alice")


def test_a_public_key_as_the_private_key_is_refused(keys):
    settings = Settings(jwt_algorithms=("RS256",), jwt_private_key=keys["rsa"][1])
    one_line_refusal(settings.check_issuer, "FLOW_JWT_PRIVATE_KEY", "public key")


def test_a_private_key_of_another_pair_is_refused(keys):
    """Every token it signed would be refused by the servers holding the public key."""
    settings = Settings(jwt_algorithms=("RS256",), jwt_private_key=keys["rsa2"][0], jwt_public_key=keys["rsa"][1])
    one_line_refusal(settings.check_issuer, "FLOW_JWT_PRIVATE_KEY", "FLOW_JWT_PUBLIC_KEY")


def test_signing_key_is_loaded_once(keys):
    settings = Settings(jwt_algorithms=("RS256",), jwt_private_key=keys["rsa"][0])
    assert isinstance(signing_key(settings), rsa.RSAPrivateKey)
    tokens = {issue_token(settings, "alice", ttl=60 + i) for i in range(3)}
    assert len(tokens) == 3


# ---------------------------------------------------------------- refusal at verification


def valid_rs256(keys: dict[str, tuple[str, str]], username: str = "alice") -> str:
    return issue_token(Settings(jwt_algorithms=("RS256",), jwt_private_key=keys["rsa"][0]), username)


@pytest.mark.parametrize("bad", ["garbage", "p256", "ed"])
def test_a_verifier_on_a_bad_key_refuses_every_token_and_logs_once(keys, bad, caplog):
    """Before: every valid token raised an uncaught InvalidKeyError (the socket dropped)."""
    pem = GARBAGE_PEM if bad == "garbage" else keys[bad][1]
    verifier = TokenVerifier(Settings(jwt_algorithms=("RS256",), jwt_public_key=pem))
    caplog.set_level(logging.ERROR, logger="flow.tokens")
    for _ in range(3):
        with pytest.raises(TokenError) as info:
            verifier.verify(valid_rs256(keys))
        assert info.value.reason == INVALID
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "FLOW_JWT_PUBLIC_KEY" in errors[0].getMessage() and errors[0].exc_info is None
    # Still a malformed token is called malformed: the structure is checked first.
    with pytest.raises(TokenError):
        verifier.verify("not-a-token")


def test_a_verifier_with_a_short_secret_refuses_instead_of_trusting_it():
    """A Settings built by hand, past the start checks: a guessable HMAC key is refused
    like a bad public key, not trusted."""
    import base64
    import hashlib
    import hmac

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(
        json.dumps({"username": "mallory", "exp": int(time.time()) + 60}).encode())
    forged = signing_input + "." + b64(hmac.new(b"abc", signing_input.encode(), hashlib.sha256).digest())
    with pytest.raises(TokenError) as info:
        TokenVerifier(Settings(secret="abc")).verify(forged)
    assert info.value.reason == INVALID


class _Hub:
    def mark_dirty(self, session: Session) -> None:
        pass

    def reschedule(self, session: Session) -> None:
        pass

    def reconnect_window(self, closing: int) -> float:
        return 2.0


def test_a_session_on_a_bad_key_closes_4001(keys):
    """PROTOCOL section 3: refused tokens end in 4001, with AUTH FAILED before it."""
    settings = Settings(jwt_algorithms=("RS256",), jwt_public_key=keys["p256"][1])
    transport = FakeTransport()
    session = Session(transport, _Hub(), settings, TokenVerifier(settings), "peer",  # type: ignore[arg-type]
                      clock=FakeClock(time.time()))
    session.opened()
    transport.take()
    for _ in range(settings.auth_attempts):
        assert session.receive(valid_rs256(keys)) is None
    frames = transport.take()
    assert frames[0] == {"id": "AUTH FAILED", "reason": "invalid"}
    assert transport.closed == (4001, "authentication failed")


# ---------------------------------------------------------------- processes at start


def _env(tmp_path: Path, **overrides: object) -> dict[str, str]:
    env = base_env(tmp_path, **overrides)
    env["FLOW_APP_SECRET_FILE"] = str(tmp_path / "no-app-secret")
    return env


def _run(args: list[str], env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{args} did not stop at start: {exc.stderr!r}") from None


@pytest.mark.parametrize(
    "alg, public, words",
    [
        ("RS256", "garbage", ["FLOW_JWT_PUBLIC_KEY", "RS256"]),
        ("RS256", "p256", ["FLOW_JWT_PUBLIC_KEY", "RS256", "ECPublicKey"]),
        ("ES256", "rsa", ["FLOW_JWT_PUBLIC_KEY", "ES256", "RSAPublicKey"]),
    ],
)
def test_websocket_server_refuses_a_bad_public_key_at_start(tmp_path, keys, alg, public, words):
    """Before: "websocket server up", then every valid token dropped its socket."""
    pem = GARBAGE_PEM if public == "garbage" else keys[public][1]
    env = _env(tmp_path, FLOW_JWT_ALGORITHMS=alg, FLOW_JWT_PUBLIC_KEY=pem)
    del env["FLOW_SECRET"]
    result = _run([PYTHON, "websocket_server.py"], env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]
    assert not port_open(int(env["FLOW_WS_PORT"]))


def test_websocket_server_needs_the_secret(tmp_path):
    env = _env(tmp_path)
    del env["FLOW_SECRET"]
    result = _run([PYTHON, "websocket_server.py"], env)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "FLOW_SECRET" in result.stderr


def test_the_proxy_starts_without_any_secret(tmp_path):
    env = _env(tmp_path)
    del env["FLOW_SECRET"]
    proxy = Proc([PYTHON, "message_proxy.py"], env, tmp_path / "proxy.log")
    try:
        port = int(env["FLOW_PUBLISH_ENDPOINT"].rsplit(":", 1)[1])
        wait_until(lambda: port_open(port) or not proxy.alive(), 15, message="the proxy binding")
        assert proxy.alive(), proxy.log()
    finally:
        assert proxy.stop() == 0, proxy.log()
    assert "FLOW_SECRET" not in proxy.log()


PUBLISH_WITHOUT_SECRETS = textwrap.dedent(
    """
    import sys
    # No web framework: a cron script's interpreter may not have them at all.
    sys.modules["tornado"] = None
    sys.modules["flask"] = None
    import flow

    flow.push("alice", "CRON DONE", {"rows": 3})
    flow.push_all("NEWS", "hello")
    assert "tornado" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
    print("pushed")
    """
)


def test_a_publisher_needs_no_secret_no_key_and_no_web_framework(tmp_path):
    """PROTOCOL section 5. Before: load_settings raised for the missing FLOW_SECRET."""
    pipeline = Pipeline(tmp_path, servers=1)
    try:
        env = {k: v for k, v in pipeline.env.items() if k not in ("FLOW_SECRET", "FLOW_APP_SECRET")}
        env["FLOW_SECRET_FILE"] = str(tmp_path / "no-secret")
        env["FLOW_APP_SECRET_FILE"] = str(tmp_path / "no-app-secret")

        async def scenario() -> list[dict[str, Any]]:
            async with opened(pipeline.url(), pipeline.token("alice")) as (ws, _ok):
                result = await asyncio.to_thread(_run, [PYTHON, "-c", PUBLISH_WITHOUT_SECRETS], env)
                assert result.returncode == 0, result.stderr
                assert result.stdout.strip() == "pushed"
                return await collect(ws, 2)

        received = asyncio.run(scenario())
        assert [(m["id"], m["data"]) for m in received] == [("CRON DONE", {"rows": 3}), ("NEWS", "hello")]
    finally:
        pipeline.stop()


def _start_process_script(call: str) -> str:
    return textwrap.dedent(
        f"""
        import resource
        from flowcore.runtime import start_process
        settings = {call}
        print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        """
    )


def _lowered_limits(soft: int, hard: int) -> Any:
    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return lower


def test_start_raises_the_open_file_limit_and_warns_below_the_need(tmp_path):
    env = _env(tmp_path, FLOW_MAX_CONNECTIONS="20000")
    result = subprocess.run(
        [PYTHON, "-c", _start_process_script("start_process('websocket_server')")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=30, preexec_fn=_lowered_limits(256, 1024),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1024"  # soft raised to the hard limit
    info = [line for line in result.stderr.splitlines() if "INFO" in line and "open-file limit" in line]
    assert len(info) == 1 and info[0].endswith("open-file limit 1024"), result.stderr
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, result.stderr
    assert "open-file limit 1024 is below" in warnings[0] and "FLOW_MAX_CONNECTIONS=20000" in warnings[0]


def test_start_does_not_warn_when_the_limit_is_enough(tmp_path):
    env = _env(tmp_path, FLOW_MAX_CONNECTIONS="500")
    result = subprocess.run(
        [PYTHON, "-c", _start_process_script("start_process('websocket_server', role='verifier')")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=30, preexec_fn=_lowered_limits(256, 4096),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "4096"
    assert "open-file limit 4096" in result.stderr
    assert "WARNING" not in result.stderr


def test_start_warns_once_per_unknown_name(tmp_path):
    env = _env(tmp_path, FLOW_HTTP_PROT="6000", FLOW_HEARTBEET="3")
    (tmp_path / "flow.env").write_text("FLOW_WS_PROCESES=4\n")
    env["FLOW_ENV_FILE"] = str(tmp_path / "flow.env")
    result = _run([PYTHON, "-c", _start_process_script("start_process('message_proxy', role='proxy')")], env)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == 3, result.stderr
    assert any("FLOW_HTTP_PROT is not a Flow setting (did you mean FLOW_HTTP_PORT?)" in w for w in warnings)
    assert any("FLOW_HEARTBEET" in w and "FLOW_HEARTBEAT?" in w for w in warnings)
    assert any("FLOW_WS_PROCESES" in w and "FLOW_WS_PROCESSES?" in w for w in warnings)


def test_start_with_a_bad_number_is_one_sentence(tmp_path):
    env = _env(tmp_path, FLOW_WS_PORT="abc")
    result = _run([PYTHON, "websocket_server.py"], env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "websocket_server: bad configuration: FLOW_WS_PORT='abc': must be a TCP port, a whole number from 1 to 65535"
    ]


def test_start_as_the_app_role_needs_the_app_secret(tmp_path):
    env = _env(tmp_path)
    env.pop("FLOW_APP_SECRET")
    result = _run([PYTHON, "-c", _start_process_script("start_process('app', role='app')")], env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[0].startswith("app: bad configuration: FLOW_APP_SECRET")
    env["FLOW_APP_SECRET"] = "a" * 40
    assert _run([PYTHON, "-c", _start_process_script("start_process('app', role='app')")], env).returncode == 0


def test_role_names_are_the_settings_roles():
    from flowcore.settings import ROLES

    assert ROLES == ("publisher", "proxy", "verifier", "issuer", "app")
    settings = load_settings({"FLOW_ENV_FILE": "/nonexistent", "FLOW_SECRET_FILE": "/nonexistent",
                              "FLOW_APP_SECRET_FILE": "/nonexistent"})
    assert settings.problems(*ROLES) and settings.problems("publisher", "proxy") == []
    assert json.dumps(settings.problems("verifier"))  # plain strings, for `flow check`
