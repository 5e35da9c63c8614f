"""Unit tests for flowcore.settings (PROTOCOL.md section 7) and `python -m flowcore config`."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from flowcore.settings import PROJECT_ROOT, Settings, SettingsError, load_settings, read_env_file

SECRET = "0123456789abcdef" * 4  # 64 bytes


@pytest.fixture
def nowhere(tmp_path: Path) -> Path:
    return tmp_path / "missing"


@pytest.fixture
def load(tmp_path: Path):
    """load_settings isolated from the real flow.env and .flow_secret."""

    def _load(environ: dict[str, str] | None = None, env_text: str | None = None, secret_text: str | None = None):
        env_file = tmp_path / "flow.env"
        secret_file = tmp_path / "flow_secret"
        if env_text is not None:
            env_file.write_text(env_text)
        if secret_text is not None:
            secret_file.write_text(secret_text)
        return load_settings(dict(environ or {}), env_file=env_file, secret_file=secret_file,
                             app_secret_file=tmp_path / "app_secret")

    return _load


def ok_env(**extra: str) -> dict[str, str]:
    return {"FLOW_SECRET": SECRET, **extra}


@pytest.fixture(scope="module")
def rsa_pems() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _pems(key)


def _pems(key) -> tuple[str, str]:
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return private, public


# ---------------------------------------------------------------- defaults and sources


def test_defaults(load, tmp_path):
    settings = load(ok_env())
    assert settings.secret == SECRET
    assert settings.jwt_algorithms == ("HS256",)
    assert settings.http_port == 5000
    assert settings.ws_processes == 2
    assert settings.heartbeat == 45
    assert settings.auth_timeout == 10
    assert settings.auth_attempts == 3
    assert settings.max_frame == 65536
    assert settings.max_message == 1048576
    assert settings.history_size == 100
    assert settings.history_ttl == 300
    assert settings.allowed_origins == ()
    assert settings.jwt_audience == "" and settings.jwt_issuer == ""
    assert settings.log_level == "INFO"
    for endpoint in (settings.publish_endpoint, settings.fanout_endpoint, settings.control_endpoint):
        assert endpoint.startswith("tcp://127.0.0.1:")
    assert len({settings.publish_endpoint, settings.fanout_endpoint, settings.control_endpoint}) == 3
    assert settings.root == str(PROJECT_ROOT)  # tests run from the checkout
    assert settings.secret_file == str(tmp_path / "flow_secret")
    assert settings.app_secret_file == str(tmp_path / "app_secret")
    assert settings.app_secret == ""
    assert settings.app == "app:create_app()"
    assert (settings.app_workers, settings.app_threads) == (2, 8)
    assert settings.nginx_workers == "auto"
    assert settings.max_connections == 20000
    assert settings.header_timeout == 10
    assert (settings.tls_cert, settings.tls_key, settings.python) == ("", "", "")
    assert settings.unknown == ()
    assert settings == dataclasses.replace(
        Settings(), secret=SECRET, root=str(PROJECT_ROOT), secret_file=str(tmp_path / "flow_secret"),
        app_secret_file=str(tmp_path / "app_secret"),
    )


def test_settings_are_frozen(load):
    settings = load(ok_env())
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.http_port = 1  # type: ignore[misc]


def test_environment_values(load):
    settings = load(
        ok_env(
            FLOW_HTTP_PORT="8080",
            FLOW_WS_PROCESSES="4",
            FLOW_HEARTBEAT="0.5",
            FLOW_ALLOWED_ORIGINS=" https://a.example , https://b.example:8443,, ",
            FLOW_JWT_ALGORITHMS="HS256, HS512",
            FLOW_LOG_LEVEL="debug",
            FLOW_PUBLISH_ENDPOINT="ipc:///tmp/flow-publish",
            FLOW_HISTORY_SIZE="0",
        )
    )
    assert settings.http_port == 8080
    assert settings.ws_processes == 4
    assert settings.heartbeat == 0.5
    assert settings.allowed_origins == ("https://a.example", "https://b.example:8443")
    assert settings.jwt_algorithms == ("HS256", "HS512")
    assert settings.log_level == "DEBUG"
    assert settings.publish_endpoint == "ipc:///tmp/flow-publish"
    assert settings.history_size == 0


def test_proxy_cpu_values(load):
    assert load(ok_env()).proxy_cpu == "auto"
    for raw, value in (("AUTO", "auto"), (" off ", "off"), ("3", "3"), ("007", "7")):
        assert load(ok_env(FLOW_PROXY_CPU=raw)).proxy_cpu == value


def test_non_flow_variables_ignored(load):
    settings = load(ok_env(HTTP_PORT="1", flow_http_port="2", FLOWHTTP_PORT="3"))
    assert settings.http_port == 5000


def test_env_file_read(load):
    settings = load({}, env_text=f"FLOW_SECRET={SECRET}\nFLOW_HTTP_PORT=6000\nFLOW_WS_PROCESSES=3\n")
    assert settings.secret == SECRET
    assert settings.http_port == 6000
    assert settings.ws_processes == 3


def test_environment_wins_over_env_file(load):
    settings = load(ok_env(FLOW_HTTP_PORT="7000"), env_text="FLOW_HTTP_PORT=6000\nFLOW_WS_PROCESSES=3\n")
    assert settings.http_port == 7000
    assert settings.ws_processes == 3  # the file still fills what the environment leaves


def test_environment_wins_even_with_a_bad_file_value(load):
    settings = load(ok_env(FLOW_HTTP_PORT="7000"), env_text="FLOW_HTTP_PORT=abc\n")
    assert settings.http_port == 7000


def test_env_file_syntax(load):
    text = "\n".join(
        [
            "# a comment",
            "   # an indented comment",
            "",
            "   ",
            f"export FLOW_SECRET={SECRET}",
            'FLOW_JWT_AUDIENCE="flow ws"',
            "FLOW_JWT_ISSUER='flow app'",
            "  FLOW_HTTP_PORT = 6001  ",
            'FLOW_LOG_LEVEL="warning"',
            "FLOW_ALLOWED_ORIGINS=https://a.example,https://b.example",
            "FLOW_LOG_DIR=/var/log/flow=x",  # only the first "=" splits
        ]
    )
    settings = load({}, env_text=text + "\n")
    assert settings.secret == SECRET
    assert settings.jwt_audience == "flow ws"
    assert settings.jwt_issuer == "flow app"
    assert settings.http_port == 6001
    assert settings.log_level == "WARNING"
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    assert settings.log_dir == "/var/log/flow=x"


def test_read_env_file_values(tmp_path):
    path = tmp_path / "flow.env"
    path.write_text("A=1\nexport B='two words'\nC=\"3\"\nD=\nE='\n# F=6\nG=\"x'\n")
    assert read_env_file(path) == {"A": "1", "B": "two words", "C": "3", "D": "", "E": "'", "G": "\"x'"}


def test_read_env_file_missing(tmp_path):
    assert read_env_file(tmp_path / "nope") == {}


@pytest.mark.parametrize("line", ["NOEQUALS", "=value", "  = 5", "export"])
def test_bad_env_file_line(load, tmp_path, line):
    with pytest.raises(SettingsError) as info:
        load(ok_env(), env_text=f"# ok\nFLOW_HTTP_PORT=5000\n{line}\n")
    message = str(info.value)
    assert str(tmp_path / "flow.env") in message
    assert ":3:" in message
    assert "KEY=VALUE" in message


def test_env_file_from_environment_variable(tmp_path, nowhere):
    env_file = tmp_path / "custom.env"
    env_file.write_text("FLOW_HTTP_PORT=6100\n")
    settings = load_settings(ok_env(FLOW_ENV_FILE=str(env_file)), secret_file=nowhere)
    assert settings.http_port == 6100


# ---------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    "variable, value",
    [
        ("FLOW_HTTP_PORT", "abc"),
        ("FLOW_HTTP_PORT", "0"),
        ("FLOW_HTTP_PORT", "70000"),
        ("FLOW_HTTP_PORT", "65536"),
        ("FLOW_HTTP_PORT", "-1"),
        ("FLOW_HTTP_PORT", ""),
        ("FLOW_HTTP_PORT", "50.5"),
        ("FLOW_WS_PORT", "abc"),
        ("FLOW_APP_PORT", "99999"),
        ("FLOW_HEARTBEAT", "-1"),
        ("FLOW_HEARTBEAT", "0"),
        ("FLOW_HEARTBEAT", "nan"),
        ("FLOW_HEARTBEAT", "inf"),
        ("FLOW_HEARTBEAT", "soon"),
        ("FLOW_AUTH_TIMEOUT", "-5"),
        ("FLOW_HISTORY_TTL", "-1"),
        ("FLOW_AUTH_ATTEMPTS", "0"),
        ("FLOW_WS_PROCESSES", "0"),
        ("FLOW_WS_PROCESSES", "two"),
        ("FLOW_MAX_FRAME", "10"),
        ("FLOW_MAX_MESSAGE", "1.5"),
        ("FLOW_HISTORY_SIZE", "-1"),
        ("FLOW_TOKEN_TTL", "0"),
        ("FLOW_JWT_ALGORITHMS", "HS257"),
        ("FLOW_JWT_ALGORITHMS", "none"),
        ("FLOW_JWT_ALGORITHMS", "HS256,nope"),
        ("FLOW_JWT_ALGORITHMS", ""),
        ("FLOW_JWT_ALGORITHMS", " , "),
        ("FLOW_PUBLISH_ENDPOINT", "localhost:5561"),
        ("FLOW_PUBLISH_ENDPOINT", "tcp://127.0.0.1"),
        ("FLOW_FANOUT_ENDPOINT", "http://127.0.0.1:5562"),
        ("FLOW_CONTROL_ENDPOINT", ""),
        ("FLOW_CONTROL_ENDPOINT", "tcp://127.0.0.1:abc"),
        ("FLOW_LOG_LEVEL", "verbose"),
        ("FLOW_PROXY_CPU", "-1"),
        ("FLOW_PROXY_CPU", "first"),
        ("FLOW_PROXY_CPU", "1.5"),
        ("FLOW_PROXY_CPU", ""),
        ("FLOW_LOG_LEVEL", ""),
        ("FLOW_JWT_PUBLIC_KEY", "/no/such/key.pem"),
        # adv_a: each of these passed and then failed later, some with a traceback.
        ("FLOW_TOKEN_TTL", "99999999999999"),  # exp past 2**53: the servers refuse every token
        ("FLOW_PUSH_LINGER", "1e12"),  # OverflowError in zmq's setsockopt
        ("FLOW_PUBLISH_ENDPOINT", "tcp://127.0.0.1:99999"),  # OverflowError in flow check
        ("FLOW_PUBLISH_ENDPOINT", "tcp://127.0.0.1:0"),  # a random port no publisher finds
        ("FLOW_FANOUT_ENDPOINT", "tcp://[::1:5562"),
        ("FLOW_CONTROL_ENDPOINT", "tcp://127.0.0.1:5563;127.0.0.1:4"),
        ("FLOW_ZMQ_HWM", "3000000000"),  # OverflowError in the proxy's setsockopt, at start
        ("FLOW_PUSH_QUEUE", "2147483648"),  # OverflowError at the first flow.push
        ("FLOW_REDIS_URL", "redis://localhost:abc/0"),  # "(a bug)" tracebacks at every publish
        ("FLOW_REDIS_URL", "redis://localhost:99999/0"),
    ],
)
def test_bad_value_names_the_variable(load, variable, value):
    with pytest.raises(SettingsError) as info:
        load(ok_env(**{variable: value}))
    message = str(info.value)
    assert message.startswith(variable + "=")
    assert "\n" not in message


def test_bad_value_in_env_file_names_the_variable(load):
    with pytest.raises(SettingsError, match="^FLOW_HEARTBEAT="):
        load(ok_env(), env_text="FLOW_HEARTBEAT=-3\n")


def test_settings_error_is_a_value_error():
    assert issubclass(SettingsError, ValueError)


@pytest.mark.parametrize("good", ["1", "65535", " 8080 "])
def test_port_bounds_accepted(load, good):
    assert load(ok_env(FLOW_HTTP_PORT=good)).http_port == int(good)


@pytest.mark.parametrize("good", ["tcp://127.0.0.1:1", "tcp://127.9.9.9:2", "tcp://[::1]:5561", "tcp://localhost:9",
                                  "ipc:///run/flow/p"])
def test_endpoints_accepted(load, good):
    assert load(ok_env(FLOW_FANOUT_ENDPOINT=good)).fanout_endpoint == good


# ---------------------------------------------------------------- secrets and keys


def refused_for_roles(settings: Settings, variable: str, roles=("verifier", "issuer")) -> None:
    """Every token role refuses the settings with one line naming ``variable``."""
    for role in roles:
        with pytest.raises(SettingsError) as info:
            settings.check(role)
        assert str(info.value).startswith(variable), (role, str(info.value))
        assert "\n" not in str(info.value)


def test_loading_asks_for_no_secret(load):
    """PROTOCOL section 5: a publisher or the proxy needs no token secret."""
    settings = load({})
    assert settings.secret == ""
    for role in (None, "publisher", "proxy"):
        settings.check(role)
    assert settings.problems("publisher", "proxy") == []


def test_missing_secret_refused_for_hs(load):
    refused_for_roles(load({}), "FLOW_SECRET")


def test_short_secret_refused_for_hs(load):
    refused_for_roles(load({"FLOW_SECRET": "x" * 31}), "FLOW_SECRET")
    settings = load({"FLOW_SECRET": "x" * 32})
    settings.check_verifier()
    settings.check_issuer()


def test_secret_is_counted_in_bytes(load):
    # 16 characters, 32 bytes in UTF-8
    load({"FLOW_SECRET": "é" * 16}).check_verifier()
    refused_for_roles(load({"FLOW_SECRET": " " * 40}), "FLOW_SECRET")  # whitespace only: stripped


@pytest.mark.parametrize("alg, minimum", [("HS384", 48), ("HS512", 64)])
def test_longer_hashes_need_longer_secrets(load, alg, minimum):
    """RFC 7518 section 3.2: the key is at least as long as the hash output."""
    refused_for_roles(load({"FLOW_SECRET": "x" * (minimum - 1), "FLOW_JWT_ALGORITHMS": alg}), "FLOW_SECRET")
    load({"FLOW_SECRET": "x" * minimum, "FLOW_JWT_ALGORITHMS": alg}).check("verifier")


def test_pem_key_as_hmac_secret_refused(load, rsa_pems):
    """PyJWT's own HMAC key check: a PEM key or certificate is no HMAC secret."""
    refused_for_roles(load({"FLOW_SECRET": rsa_pems[1]}), "FLOW_SECRET")


def test_secret_read_from_secret_file(load):
    settings = load({}, secret_text=SECRET + "\n")
    assert settings.secret == SECRET


def test_environment_secret_wins_over_secret_file(load):
    other = "z" * 40
    assert load({"FLOW_SECRET": other}, secret_text=SECRET).secret == other


def test_secret_file_from_environment_variable(tmp_path, nowhere):
    path = tmp_path / "s"
    path.write_text(SECRET)
    settings = load_settings({"FLOW_SECRET_FILE": str(path)}, env_file=nowhere)
    assert settings.secret == SECRET
    assert settings.secret_file == str(path)


def test_short_secret_file_refused(load):
    refused_for_roles(load({}, secret_text="short\n"), "FLOW_SECRET")


def test_mixing_hs_and_rs_refused(load, rsa_pems):
    settings = load(ok_env(FLOW_JWT_ALGORITHMS="HS256,RS256", FLOW_JWT_PUBLIC_KEY=rsa_pems[1]))
    refused_for_roles(settings, "FLOW_JWT_ALGORITHMS")
    settings.check("publisher")  # a publisher does not read them


def test_rs256_without_a_key_refused(load):
    settings = load({"FLOW_JWT_ALGORITHMS": "RS256"})
    refused_for_roles(settings, "FLOW_JWT_PUBLIC_KEY", roles=("verifier",))
    refused_for_roles(settings, "FLOW_JWT_PRIVATE_KEY", roles=("issuer", "app"))


def test_rs256_with_inline_public_key(load, rsa_pems):
    settings = load({"FLOW_JWT_ALGORITHMS": "RS256", "FLOW_JWT_PUBLIC_KEY": rsa_pems[1]})
    assert settings.jwt_algorithms == ("RS256",)
    assert settings.jwt_public_key.strip() == rsa_pems[1].strip()
    assert settings.secret == ""  # no secret needed for asymmetric algorithms


def test_rs256_key_given_as_a_file_path(load, tmp_path, rsa_pems):
    private_path, public_path = tmp_path / "private.pem", tmp_path / "public.pem"
    private_path.write_text(rsa_pems[0])
    public_path.write_text(rsa_pems[1])
    settings = load(
        {
            "FLOW_JWT_ALGORITHMS": "RS256",
            "FLOW_JWT_PRIVATE_KEY": str(private_path),
            "FLOW_JWT_PUBLIC_KEY": f"  {public_path}  ",
        }
    )
    assert settings.jwt_private_key.strip() == rsa_pems[0].strip()
    assert settings.jwt_public_key.strip() == rsa_pems[1].strip()
    assert "-----BEGIN PUBLIC KEY-----" in settings.jwt_public_key


def test_key_file_and_inline_key_resolve_the_same(load, tmp_path, rsa_pems):
    path = tmp_path / "public.pem"
    path.write_text(rsa_pems[1])
    from_file = load({"FLOW_JWT_ALGORITHMS": "RS256", "FLOW_JWT_PUBLIC_KEY": str(path)})
    inline = load({"FLOW_JWT_ALGORITHMS": "RS256", "FLOW_JWT_PUBLIC_KEY": rsa_pems[1]})
    assert from_file == inline


def test_es256_private_key_only(load):
    private, _ = _pems(ec.generate_private_key(ec.SECP256R1()))
    settings = load({"FLOW_JWT_ALGORITHMS": "ES256", "FLOW_JWT_PRIVATE_KEY": private})
    assert settings.jwt_algorithms == ("ES256",)
    assert "PRIVATE KEY" in settings.jwt_private_key


def test_bad_private_key_is_not_echoed(load):
    """A key pasted without its BEGIN line must not land in the logs, and stays one line."""
    leaked = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\nSECRETKEYMATERIAL"
    with pytest.raises(SettingsError) as info:
        load({"FLOW_JWT_ALGORITHMS": "RS256", "FLOW_JWT_PRIVATE_KEY": leaked})
    message = str(info.value)
    assert message.startswith("FLOW_JWT_PRIVATE_KEY")
    assert "SECRETKEYMATERIAL" not in message
    assert "MIIEvQ" not in message
    assert "\n" not in message


def test_bad_secret_is_not_echoed(load):
    bad = "x" * 40 + "\udcff"  # how os.environ carries bytes that are not UTF-8
    with pytest.raises(SettingsError) as info:
        load({"FLOW_SECRET": bad})
    assert str(info.value).startswith("FLOW_SECRET=")
    assert "x" * 40 not in str(info.value)


def test_environment_value_not_utf8(load):
    with pytest.raises(SettingsError, match="^FLOW_LOG_DIR="):
        load(ok_env(FLOW_LOG_DIR="/tmp/\udcff"))


def test_env_file_not_utf8(load, tmp_path):
    env_file = tmp_path / "flow.env"
    env_file.write_bytes(b"FLOW_HTTP_PORT=\xff\n")
    with pytest.raises(SettingsError, match="UTF-8") as info:
        load_settings(ok_env(), env_file=env_file, secret_file=tmp_path / "missing")
    assert str(env_file) in str(info.value)


def test_app_secret_from_environment_or_file(load, tmp_path):
    assert load(ok_env(FLOW_APP_SECRET="a" * 40)).app_secret == "a" * 40
    path = tmp_path / "custom_app_secret"
    path.write_text("b" * 40 + "\n")
    settings = load_settings({"FLOW_APP_SECRET_FILE": str(path)}, env_file=tmp_path / "none")
    assert settings.app_secret == "b" * 40
    assert settings.app_secret_file == str(path)
    # The environment wins over the file.
    assert load_settings({"FLOW_APP_SECRET_FILE": str(path), "FLOW_APP_SECRET": "c" * 40},
                         env_file=tmp_path / "none").app_secret == "c" * 40


def test_relative_secret_files_resolve_against_root(tmp_path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "jwt").write_text(SECRET)
    (tmp_path / "keys" / "app").write_text("d" * 40)
    settings = load_settings({"FLOW_ROOT": str(tmp_path), "FLOW_SECRET_FILE": "keys/jwt",
                              "FLOW_APP_SECRET_FILE": "keys/app"})
    assert (settings.secret, settings.app_secret) == (SECRET, "d" * 40)
    assert settings.secret_file == str(tmp_path.resolve() / "keys" / "jwt")


def test_secret_file_not_utf8(tmp_path):
    secret_file = tmp_path / "s"
    secret_file.write_bytes(b"\xff" * 40)
    with pytest.raises(SettingsError, match="^FLOW_SECRET_FILE="):
        load_settings({}, env_file=tmp_path / "missing", secret_file=secret_file)


# ---------------------------------------------------------------- as_env / describe


def test_as_env_round_trips(load, nowhere):
    settings = load(
        ok_env(
            FLOW_HTTP_PORT="8081",
            FLOW_HEARTBEAT="2.5",
            FLOW_ALLOWED_ORIGINS="https://a.example,https://b.example",
            FLOW_JWT_ALGORITHMS="HS256,HS384",
            FLOW_JWT_AUDIENCE="ws",
            FLOW_LOG_LEVEL="ERROR",
            FLOW_CONTROL_ENDPOINT="ipc:///tmp/flow-control",
        )
    )
    env = settings.as_env()
    assert env["FLOW_HTTP_PORT"] == "8081"
    assert env["FLOW_SECRET"] == SECRET
    assert env["FLOW_ALLOWED_ORIGINS"] == "https://a.example,https://b.example"
    assert env["FLOW_JWT_ALGORITHMS"] == "HS256,HS384"
    assert all(key.startswith("FLOW_") and isinstance(value, str) for key, value in env.items())
    assert load_settings(env, env_file=nowhere) == settings


def test_as_env_round_trips_defaults(load, nowhere):
    settings = load(ok_env())
    assert load_settings(settings.as_env(), env_file=nowhere) == settings


def test_as_env_round_trips_a_secret_from_the_secret_file(load, nowhere):
    settings = load({}, secret_text=SECRET)
    assert settings.as_env()["FLOW_SECRET"] == SECRET
    assert load_settings(settings.as_env(), env_file=nowhere) == settings


def test_as_env_round_trips_keys_read_from_files(load, tmp_path, nowhere, rsa_pems):
    private_path, public_path = tmp_path / "private.pem", tmp_path / "public.pem"
    private_path.write_text(rsa_pems[0])
    public_path.write_text(rsa_pems[1])
    settings = load(
        {
            "FLOW_JWT_ALGORITHMS": "RS256",
            "FLOW_JWT_PRIVATE_KEY": str(private_path),
            "FLOW_JWT_PUBLIC_KEY": str(public_path),
        }
    )
    assert load_settings(settings.as_env(), env_file=nowhere) == settings


def test_as_env_round_trip_beats_the_env_file(load, tmp_path, nowhere):
    """A child given as_env() resolves the same values even if flow.env says otherwise."""
    settings = load(ok_env(FLOW_HTTP_PORT="8082"))
    other_file = tmp_path / "other.env"
    other_file.write_text("FLOW_HTTP_PORT=9000\nFLOW_HEARTBEAT=7\n")
    assert load_settings(settings.as_env(), env_file=other_file) == settings


def test_describe_masks_the_secret(load):
    settings = load(ok_env(FLOW_HTTP_PORT="8083"))
    text = settings.describe()
    assert SECRET not in text
    assert SECRET[:16] not in text
    lines = text.splitlines()
    assert "FLOW_SECRET=(set)" in lines
    assert "FLOW_JWT_PRIVATE_KEY=(unset)" in lines
    assert "FLOW_HTTP_PORT=8083" in lines
    assert "FLOW_ALLOWED_ORIGINS=(none)" in lines
    assert "FLOW_JWT_ALGORITHMS=HS256" in lines
    assert len(lines) == len(dataclasses.fields(Settings))


def test_describe_masks_the_private_key(load, rsa_pems):
    settings = load({"FLOW_JWT_ALGORITHMS": "RS256", "FLOW_JWT_PRIVATE_KEY": rsa_pems[0]})
    text = settings.describe()
    assert "FLOW_JWT_PRIVATE_KEY=(set)" in text.splitlines()
    assert "PRIVATE KEY" not in text
    assert "FLOW_SECRET=(unset)" in text.splitlines()


def test_repr_hides_secrets(load):
    settings = load(ok_env())
    assert SECRET not in repr(settings)


# ---------------------------------------------------------------- python -m flowcore config


def _run_config(tmp_path: Path, **extra: str) -> subprocess.CompletedProcess:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "FLOW_SECRET": SECRET,
        "FLOW_ENV_FILE": str(tmp_path / "missing.env"),
        "FLOW_SECRET_FILE": str(tmp_path / "missing.secret"),
        **extra,
    }
    return subprocess.run(
        [sys.executable, "-m", "flowcore", "config"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_config_command_prints_the_settings(tmp_path):
    result = _run_config(tmp_path, FLOW_HTTP_PORT="5123")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "FLOW_HTTP_PORT=5123" in lines
    assert "FLOW_SECRET=(set)" in lines
    assert SECRET not in result.stdout
    assert result.stderr == ""


def test_config_command_defaults(tmp_path):
    result = _run_config(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "FLOW_HTTP_PORT=5000" in result.stdout.splitlines()


def test_config_command_bad_value_exits_2_with_one_line(tmp_path):
    result = _run_config(tmp_path, FLOW_HTTP_PORT="abc")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "FLOW_HTTP_PORT" in lines[0]
    assert "Traceback" not in result.stderr


def test_config_command_needs_no_secret(tmp_path):
    """Printing the settings is no role that holds a secret; `flow check` reports it missing."""
    result = _run_config(tmp_path, FLOW_SECRET="", FLOW_APP_SECRET_FILE=str(tmp_path / "none"))
    assert result.returncode == 0, result.stderr
    assert "FLOW_SECRET=(unset)" in result.stdout.splitlines()


# ---------------------------------------------------------------- error sentences


@pytest.mark.parametrize(
    "variable, value, sentence",
    [
        ("FLOW_WS_PORT", "abc", "must be a TCP port, a whole number from 1 to 65535"),
        ("FLOW_HTTP_PORT", "50.5", "must be a TCP port, a whole number from 1 to 65535"),
        ("FLOW_HTTP_PORT", "", "must be a TCP port, a whole number from 1 to 65535"),
        ("FLOW_WS_PROCESSES", "two", "must be a whole number"),
        ("FLOW_MAX_MESSAGE", "1.5", "must be a whole number"),
        ("FLOW_HISTORY_SIZE", "", "must be a whole number"),
        ("FLOW_MAX_CONNECTIONS", "lots", "must be a whole number"),
        ("FLOW_APP_WORKERS", "0", "must be a whole number of at least 1"),
        ("FLOW_HEARTBEAT", "soon", "must be a number"),
        ("FLOW_HISTORY_TTL", "5m", "must be a number"),
        ("FLOW_RATE_LIMIT", "", "must be a number"),
        ("FLOW_HEARTBEAT", "inf", "must be a finite number"),
        ("FLOW_NGINX_WORKERS", "many", "must be 'auto' or a whole number of at least 1"),
        ("FLOW_NGINX_WORKERS", "0", "must be 'auto' or a whole number of at least 1"),
    ],
)
def test_bad_numbers_get_a_sentence(load, variable, value, sentence):
    """Not int()'s "invalid literal for int() with base 10": a sentence, the variable, the value."""
    with pytest.raises(SettingsError) as info:
        load(ok_env(**{variable: value}))
    message = str(info.value)
    assert message.startswith(f"{variable}={value!r}: {sentence}"), message
    for python_words in ("invalid literal", "could not convert", "base 10"):
        assert python_words not in message


def test_every_number_parser_speaks_a_sentence(load):
    """Each int, float and port setting, given a word: no Python error text in the line."""
    numeric = [f for f in dataclasses.fields(Settings) if f.type in ("int", "float", int, float)]
    assert len(numeric) > 20
    for field in numeric:
        variable = "FLOW_" + field.name.upper()
        with pytest.raises(SettingsError) as info:
            load(ok_env(**{variable: "lots"}))
        message = str(info.value)
        assert message.startswith(f"{variable}='lots': must be "), message
        assert "must be a" in message and "invalid literal" not in message and "convert" not in message


def test_secret_values_are_not_echoed_in_sentences(load):
    with pytest.raises(SettingsError) as info:
        load({"FLOW_APP_SECRET": "secret-\udcff"})
    assert info.value.args[0].startswith("FLOW_APP_SECRET=(hidden)")


@pytest.mark.parametrize("value, expected", [("auto", "auto"), (" AUTO ", "auto"), ("4", "4"), (" 2 ", "2")])
def test_nginx_workers_accepted(load, value, expected):
    assert load(ok_env(FLOW_NGINX_WORKERS=value)).nginx_workers == expected


# ---------------------------------------------------------------- unknown FLOW_ names


def test_unknown_names_reported_with_a_suggestion(load):
    settings = load(ok_env(FLOW_HTTP_PROT="6000", FLOW_WS_PROCESSSES="3", FLOW_ZZZ="1"),
                    env_text="FLOW_HEARTBEET=5\nFLOW_WS_PORT=5999\n")
    assert settings.unknown == ("FLOW_HEARTBEET", "FLOW_HTTP_PROT", "FLOW_WS_PROCESSSES", "FLOW_ZZZ")
    assert settings.http_port == 5000  # a typo sets nothing
    lines = settings.describe_unknown()
    assert lines == [
        "FLOW_HEARTBEET is not a Flow setting (did you mean FLOW_HEARTBEAT?); it is ignored",
        "FLOW_HTTP_PROT is not a Flow setting (did you mean FLOW_HTTP_PORT?); it is ignored",
        "FLOW_WS_PROCESSSES is not a Flow setting (did you mean FLOW_WS_PROCESSES?); it is ignored",
        "FLOW_ZZZ is not a Flow setting; it is ignored",
    ]


def test_known_names_are_not_unknown(load, tmp_path):
    """Every setting, and what the stack itself passes to its processes (flowcore.nginx's
    derived variables, FLOW_ENV_FILE, FLOW_ROOT), is known."""
    from flowcore.nginx import stack_env
    from flowcore.settings import META_VARIABLES

    settings = load(ok_env())
    env = {**settings.as_env(), **stack_env(settings), "FLOW_ENV_FILE": str(tmp_path / "none")}
    assert load_settings(env, env_file=tmp_path / "none").unknown == ()
    assert {"FLOW_ENV_FILE", "FLOW_WS_READ_TIMEOUT"} <= META_VARIABLES
    assert settings.describe_unknown() == []


def test_stack_environment_of_the_tests_is_known(tmp_path):
    from support import base_env

    env = base_env(tmp_path, FLOW_WS_PROCESSES=3, FLOW_NGINX_WORKERS=1, FLOW_ROOT=str(PROJECT_ROOT))
    assert load_settings(env).unknown == ()


def test_lowercase_or_other_prefixes_are_not_reported(load):
    assert load(ok_env(flow_http_prot="1", FLOWHTTP="2", HTTP_PORT="3")).unknown == ()


# ---------------------------------------------------------------- the app's session key


def test_app_secret_check(load):
    refused = [load(ok_env()), load(ok_env(FLOW_APP_SECRET="a" * 31)), load(ok_env(FLOW_APP_SECRET=SECRET))]
    for settings in refused:
        with pytest.raises(SettingsError, match="^FLOW_APP_SECRET") as info:
            settings.check_app_secret()
        assert "\n" not in str(info.value)
        assert SECRET not in str(info.value)
        assert settings.problems("app") == [str(info.value)]
    good = load(ok_env(FLOW_APP_SECRET="a" * 32))
    good.check_app_secret()
    good.check("app")
    assert good.problems("verifier", "issuer", "app", "proxy", "publisher") == []


def test_app_secret_is_not_needed_by_other_roles(load):
    settings = load(ok_env())
    for role in ("verifier", "issuer", "proxy", "publisher"):
        settings.check(role)


def test_unknown_role_is_a_programming_error(load):
    with pytest.raises(ValueError, match="unknown role"):
        load(ok_env()).check("server")


def test_app_secret_is_masked(load):
    settings = load(ok_env(FLOW_APP_SECRET="q" * 40))
    assert "q" * 40 not in settings.describe() and "q" * 40 not in repr(settings)
    assert "FLOW_APP_SECRET=(set)" in settings.describe().splitlines()


# ---------------------------------------------------------------- generated secret files


def test_ensure_secret_files_generates_both(tmp_path):
    from flowcore.settings import ensure_secret_files

    root = tmp_path / "project"
    root.mkdir()
    env = {"FLOW_ROOT": str(root)}
    before = load_settings(env)
    assert before.problems("verifier", "app")  # nothing to sign or keep sessions with yet
    written = ensure_secret_files(before)
    assert written == [root.resolve() / ".flow_secret", root.resolve() / ".flow_app_secret"]
    for path in written:
        assert path.stat().st_mode & 0o777 == 0o600
        assert len(path.read_text().strip()) == 64
    after = load_settings(env)
    assert after.secret != after.app_secret
    assert after.problems("verifier", "issuer", "app") == []
    # Kept, not regenerated.
    assert ensure_secret_files(after) == []
    assert load_settings(env) == after
    assert sorted(p.name for p in root.iterdir()) == [".flow_app_secret", ".flow_secret"]  # no temp files


def test_ensure_secret_files_respects_what_is_given(tmp_path, rsa_pems):
    from flowcore.settings import ensure_secret_files

    root = tmp_path / "project"
    root.mkdir()
    # Secrets in the environment: no file.
    given = load_settings({"FLOW_ROOT": str(root), "FLOW_SECRET": SECRET, "FLOW_APP_SECRET": "a" * 40})
    assert ensure_secret_files(given) == []
    # Public-key tokens: no JWT secret, but the app's session key still.
    rs = load_settings({"FLOW_ROOT": str(root), "FLOW_JWT_ALGORITHMS": "RS256",
                        "FLOW_JWT_PRIVATE_KEY": rsa_pems[0]})
    assert ensure_secret_files(rs) == [root.resolve() / ".flow_app_secret"]
    # An existing file, even a bad one, is never overwritten.
    (root / "short").write_text("short\n")
    bad = load_settings({"FLOW_ROOT": str(root), "FLOW_SECRET_FILE": "short"})
    assert ensure_secret_files(bad) == []
    assert (root / "short").read_text() == "short\n"
    # Custom places, in a directory that does not exist yet.
    custom = load_settings({"FLOW_ROOT": str(root), "FLOW_SECRET_FILE": "keys/jwt",
                            "FLOW_APP_SECRET_FILE": str(tmp_path / "elsewhere" / "app")})
    assert ensure_secret_files(custom) == [root.resolve() / "keys" / "jwt", tmp_path / "elsewhere" / "app"]


# ---------------------------------------------------------------- adversarial review (adv_a)


def test_an_unreadable_env_file_is_one_line_not_a_traceback(tmp_path):
    """flow.env of another owner with mode 0600 raised PermissionError out of load_settings."""
    if os.geteuid() == 0:
        # root reads any mode; this file refuses read() with EINVAL for everyone.
        env_file = Path("/proc/self/clear_refs")
    else:
        env_file = tmp_path / "flow.env"
        env_file.write_text("FLOW_HTTP_PORT=5000\n")
        env_file.chmod(0)
    with pytest.raises(SettingsError) as info:
        load_settings({}, env_file=env_file)
    assert str(info.value).startswith(f"{env_file}: cannot be read")


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_flow_root_must_be_a_directory(tmp_path, kind):
    """A typo in FLOW_ROOT read no flow.env, and `flow secret` created the directory."""
    root = tmp_path / "typo"
    if kind == "file":
        root.write_text("")
    with pytest.raises(SettingsError, match=r"^FLOW_ROOT='.*typo': not a directory$"):
        load_settings({"FLOW_ROOT": str(root)})
    result = subprocess.run([sys.executable, "-m", "flowcore", "secret"], cwd=PROJECT_ROOT,
                            env={**{k: v for k, v in os.environ.items() if not k.startswith("FLOW_")},
                                 "FLOW_ROOT": str(root)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [f"flow: bad configuration: FLOW_ROOT={str(root)!r}: not a directory"]
    assert root.exists() == (kind == "file") and not (tmp_path / "typo" / ".flow_secret").exists()


def test_describe_hides_a_private_key_given_as_the_public_key(load, rsa_pems):
    """check_verifier refuses it, but `flow config` printed it whole (into bug reports)."""
    settings = load({"FLOW_JWT_ALGORITHMS": "RS256", "FLOW_JWT_PUBLIC_KEY": rsa_pems[0]})
    text = settings.describe()
    assert "PRIVATE KEY" not in text
    assert "FLOW_JWT_PUBLIC_KEY=(set: holds a private key, hidden)" in text.splitlines()
    assert len(text.splitlines()) == len(dataclasses.fields(Settings))
    public = load({"FLOW_JWT_ALGORITHMS": "RS256", "FLOW_JWT_PUBLIC_KEY": rsa_pems[1]})
    assert "PUBLIC KEY" in public.describe()  # a public key is no secret


@pytest.mark.parametrize("bad", ["tcp://*:5561", "tcp://[::]:5561", "tcp://eth0:5561", "tcp://0.0.0.0:5561",
                                 "tcp://10.0.0.5:5561", "tcp://host.example:9", "tcp://[2001:db8::1]:5"])
@pytest.mark.parametrize("variable", ["FLOW_PUBLISH_ENDPOINT", "FLOW_FANOUT_ENDPOINT", "FLOW_CONTROL_ENDPOINT"])
def test_zeromq_endpoints_off_loopback_are_refused_pointing_to_redis(load, bad, variable):
    # Anyone who reaches a ZeroMQ endpoint can read every user's history and forge pushes.
    with pytest.raises(SettingsError) as info:
        load(ok_env(**{variable: bad}))
    text = str(info.value)
    assert len(text.splitlines()) == 1
    assert text.startswith(f"{variable}={bad!r}: ") and "loopback" in text and "FLOW_ENGINE=redis" in text


@pytest.mark.parametrize("option", ["endpoint", "control_endpoint"])
def test_a_publisher_refuses_an_explicit_endpoint_off_loopback(option):
    import flow

    settings = load_settings(ok_env())
    with pytest.raises(ValueError, match="loopback.*FLOW_ENGINE=redis"):
        flow.Flow(settings=settings, **{option: "tcp://10.0.0.5:5561"})


def test_the_longest_ttl_and_linger_are_accepted(load):
    from flowcore.settings import MAX_LINGER, MAX_TOKEN_TTL

    settings = load(ok_env(FLOW_TOKEN_TTL=str(MAX_TOKEN_TTL), FLOW_PUSH_LINGER=str(MAX_LINGER)))
    assert (settings.token_ttl, settings.push_linger) == (MAX_TOKEN_TTL, MAX_LINGER)


def test_a_nul_in_the_env_file_is_one_line(load, tmp_path):
    """A NUL reached subprocess's environment in `flow check` and raised ValueError there."""
    with pytest.raises(SettingsError, match=r"flow\.env:2: a NUL character"):
        load(ok_env(), env_text="FLOW_HTTP_PORT=5000\nFLOW_APP=app:create_app()\0x\n")


@pytest.mark.parametrize("variable", ["FLOW_APP", "FLOW_PYTHON", "FLOW_TLS_CERT", "FLOW_LOG_DIR", "FLOW_JWT_AUDIENCE"])
def test_names_and_paths_are_one_line(load, variable):
    """A newline in FLOW_APP forged a line of `flow config` (and of supervisord's environment)."""
    with pytest.raises(SettingsError) as info:
        load(ok_env(**{variable: "app:create_app()\nFLOW_SECRET=forged"}))
    assert str(info.value).startswith(f"{variable}='app:create_app()\\nFLOW_SECRET=forged': must be one line")


# ---------------------------------------------------------------- the Redis engine


@pytest.mark.parametrize("url", ["redis://:pw@127.0.0.1:6379/2", "rediss://flow:pw@redis.example:6380/0",
                                 "unix:///run/flow/redis.sock?db=1"])
def test_redis_urls_accepted_and_never_shown_with_their_password(load, url):
    settings = load(ok_env(FLOW_ENGINE="redis", FLOW_REDIS_URL=url))
    assert settings.engine == "redis" and settings.redis_address() == url
    shown = settings.describe() + repr(settings)
    assert "pw" not in shown
    assert "FLOW_REDIS_URL=" + url.split("://")[0] + "://" in settings.describe()


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "127.0.0.1:6379", "redis://a\nb"])
def test_bad_redis_urls_are_refused_in_one_line(load, url):
    with pytest.raises(SettingsError) as info:
        load(ok_env(FLOW_REDIS_URL=url))
    assert str(info.value).startswith("FLOW_REDIS_URL=(hidden): ") and len(str(info.value).splitlines()) == 1


def test_without_a_url_the_engine_uses_the_stacks_own_redis_in_the_run_dir(load, tmp_path):
    settings = load(ok_env(FLOW_ENGINE="redis", FLOW_RUN_DIR=str(tmp_path / "run")))
    assert settings.redis_address() == f"unix://{tmp_path / 'run' / 'redis.sock'}"
    assert f"FLOW_REDIS_URL=(unset: unix://{tmp_path / 'run' / 'redis.sock'})" in settings.describe()


@pytest.mark.parametrize("prefix", ["", "a:b", "a b", "x*", "{tag}"])
def test_redis_prefixes_that_would_mix_keys_are_refused(load, prefix):
    with pytest.raises(SettingsError, match="FLOW_REDIS_PREFIX"):
        load(ok_env(FLOW_REDIS_PREFIX=prefix))
