"""The demo app's session key is a real secret (issue 11, security defect).

With public-key tokens (FLOW_JWT_ALGORITHMS=RS256, no FLOW_SECRET) the app used to sign
its session cookie with a key derived from the empty secret, a public constant: a forged
cookie got a socket token for any username. Here a cookie is forged with every constant
the old code could fall back to, and with the JWT secret; /socket_auth_token must answer
401 to each, while the app's own cookie still gets a token (so the test can see a forgery
that works).
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask
from flask.sessions import SecureCookieSessionInterface
from itsdangerous import URLSafeTimedSerializer

from app import create_app
from flowcore.settings import SettingsError, ensure_secret_files, load_settings
from flowcore.tokens import TokenVerifier

JWT_SECRET = "j" * 64


@pytest.fixture(scope="module")
def rsa_pems() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return private, public


def _settings(tmp_path: Path, **env: str) -> Any:
    """Settings as a fresh deployment has them: the app secret generated like `make secret`."""
    tmp_path.mkdir(parents=True, exist_ok=True)  # FLOW_ROOT must be a directory
    base = {"FLOW_ROOT": str(tmp_path), "FLOW_ENV_FILE": str(tmp_path / "none"), **env}
    written = ensure_secret_files(load_settings(base))
    assert tmp_path.resolve() / ".flow_app_secret" in written
    return load_settings(base)


def _app(settings: Any, tmp_path: Path) -> Flask:
    # CSRF (tests/test_app.py) is beside the point here: logging in needs only the form.
    return create_app({"FLOW_SETTINGS": settings, "PUSH": lambda *a: None, "TASK_DELAY": 0,
                       "TESTING": True, "STATE_DB": str(tmp_path / "state.sqlite3"),
                       "WTF_CSRF_ENABLED": False})


def _candidates(jwt_secret: str) -> list[str | bytes]:
    """Every key the old code could end up with, and other guessable ones."""
    derived = [hmac.new(s.encode(), b"flow-demo-session", hashlib.sha256).hexdigest()
               for s in ("", jwt_secret, "None", "none")]
    return ["", b"", jwt_secret, *derived, "None", "null", "none", "0", "False", "flow-demo-session",
            "dev", "secret"]


def _forge(key: str | bytes, app: Flask, username: str = "mallory") -> str:
    """A session cookie value signed as Flask signs it, with ``key``."""
    interface = SecureCookieSessionInterface()
    # Flask refuses to build a serializer for an empty key; itsdangerous signs with one.
    serializer = URLSafeTimedSerializer(
        key, salt=interface.salt, serializer=interface.serializer,
        signer_kwargs={"key_derivation": interface.key_derivation, "digest_method": interface.digest_method},
    )
    return serializer.dumps({"username": username})


def _assert_forgeries_refused(app: Flask, jwt_secret: str) -> None:
    cookie_name = app.config["SESSION_COOKIE_NAME"]
    accepted = []
    for key in _candidates(jwt_secret):
        client = app.test_client()
        client.set_cookie(cookie_name, _forge(key, app))
        reply = client.get("/socket_auth_token")
        if reply.status_code != 401:
            accepted.append((key, reply.status_code))
    assert accepted == [], f"forged session cookies accepted: {accepted}"


def _assert_real_login_works(app: Flask, settings: Any, verifier_settings: Any) -> None:
    client = app.test_client()
    assert client.post("/login", data={"username": "alice"}).status_code == 302
    reply = client.get("/socket_auth_token")
    assert reply.status_code == 200
    assert TokenVerifier(verifier_settings).verify(reply.get_data(as_text=True)) == "alice"


def test_public_key_tokens_forged_cookies_get_no_token(tmp_path, rsa_pems):
    private, public = rsa_pems
    settings = _settings(tmp_path, FLOW_JWT_ALGORITHMS="RS256", FLOW_JWT_PRIVATE_KEY=private,
                         FLOW_JWT_PUBLIC_KEY=public)
    assert settings.secret == "" and len(settings.app_secret) >= 32
    app = _app(settings, tmp_path)
    _assert_forgeries_refused(app, "")
    verifier = load_settings({"FLOW_JWT_ALGORITHMS": "RS256", "FLOW_JWT_PUBLIC_KEY": public,
                              "FLOW_ENV_FILE": str(tmp_path / "none")})
    _assert_real_login_works(app, settings, verifier)


def test_public_key_only_app_forged_cookies_get_no_token(tmp_path, rsa_pems):
    """The deployment the issue names: RS256 with only the public key and no FLOW_SECRET.
    Such an app cannot issue tokens, so it does not start; with a forged cookie the old
    one answered 500 (it tried to sign), never 401."""
    settings = _settings(tmp_path, FLOW_JWT_ALGORITHMS="RS256", FLOW_JWT_PUBLIC_KEY=rsa_pems[1])
    with pytest.raises(SettingsError, match="^FLOW_JWT_PRIVATE_KEY"):
        _app(settings, tmp_path)


def test_hs256_forged_cookies_get_no_token(tmp_path):
    """The session key is not derived from the JWT secret either: a leaked FLOW_SECRET must
    not let anyone log in as anybody."""
    settings = _settings(tmp_path, FLOW_SECRET=JWT_SECRET)
    assert settings.app_secret != JWT_SECRET
    app = _app(settings, tmp_path)
    _assert_forgeries_refused(app, JWT_SECRET)
    _assert_real_login_works(app, settings, settings)


def test_a_cookie_of_one_deployment_is_refused_by_another(tmp_path):
    """Each deployment generates its own key: nothing about it is a shared constant."""
    first = _app(_settings(tmp_path / "a", FLOW_SECRET=JWT_SECRET), tmp_path / "a")
    second = _app(_settings(tmp_path / "b", FLOW_SECRET=JWT_SECRET), tmp_path / "b")
    client = first.test_client()
    client.post("/login", data={"username": "alice"})
    cookie = client.get_cookie(first.config["SESSION_COOKIE_NAME"])
    assert cookie is not None
    other = second.test_client()
    other.set_cookie(second.config["SESSION_COOKIE_NAME"], cookie.value)
    assert other.get("/socket_auth_token").status_code == 401


@pytest.mark.parametrize("app_secret", [None, "", "short", JWT_SECRET])
def test_the_app_does_not_start_without_a_real_session_key(tmp_path, app_secret):
    env = {"FLOW_SECRET": JWT_SECRET, "FLOW_ENV_FILE": str(tmp_path / "none"),
           "FLOW_APP_SECRET_FILE": str(tmp_path / "none")}
    if app_secret is not None:
        env["FLOW_APP_SECRET"] = app_secret
    with pytest.raises(SettingsError, match="^FLOW_APP_SECRET") as info:
        _app(load_settings(env), tmp_path)
    assert JWT_SECRET not in str(info.value)


def test_secret_key_in_test_config_needs_no_app_secret(tmp_path):
    settings = load_settings({"FLOW_SECRET": JWT_SECRET, "FLOW_ENV_FILE": str(tmp_path / "none"),
                              "FLOW_APP_SECRET_FILE": str(tmp_path / "none")})
    app = create_app({"FLOW_SETTINGS": settings, "SECRET_KEY": "t" * 40, "PUSH": lambda *a: None,
                      "STATE_DB": str(tmp_path / "state.sqlite3")})
    assert app.config["SECRET_KEY"] == "t" * 40


def test_the_app_uses_the_app_secret_file(tmp_path):
    settings = _settings(tmp_path, FLOW_SECRET=JWT_SECRET)
    app = _app(settings, tmp_path)
    assert app.config["SECRET_KEY"] == (tmp_path / ".flow_app_secret").read_text().strip()
