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
        return load_settings(dict(environ or {}), env_file=env_file, secret_file=secret_file)

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


def test_defaults(load):
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
    assert settings == dataclasses.replace(Settings(), secret=SECRET)


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
        ("FLOW_LOG_LEVEL", ""),
        ("FLOW_JWT_PUBLIC_KEY", "/no/such/key.pem"),
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


@pytest.mark.parametrize("good", ["tcp://127.0.0.1:1", "tcp://[::1]:5561", "tcp://host.example:9", "ipc:///run/flow/p"])
def test_endpoints_accepted(load, good):
    assert load(ok_env(FLOW_FANOUT_ENDPOINT=good)).fanout_endpoint == good


# ---------------------------------------------------------------- secrets and keys


def test_missing_secret_refused_for_hs(load):
    with pytest.raises(SettingsError, match="^FLOW_SECRET"):
        load({})


def test_short_secret_refused_for_hs(load):
    with pytest.raises(SettingsError, match="^FLOW_SECRET"):
        load({"FLOW_SECRET": "x" * 31})
    assert load({"FLOW_SECRET": "x" * 32}).secret == "x" * 32


def test_secret_is_counted_in_bytes(load):
    # 16 characters, 32 bytes in UTF-8
    assert load({"FLOW_SECRET": "é" * 16}).secret == "é" * 16
    with pytest.raises(SettingsError, match="^FLOW_SECRET"):
        load({"FLOW_SECRET": " " * 40})  # whitespace only: stripped to nothing


@pytest.mark.parametrize("alg, minimum", [("HS384", 48), ("HS512", 64)])
def test_longer_hashes_need_longer_secrets(load, alg, minimum):
    """RFC 7518 section 3.2: the key is at least as long as the hash output."""
    with pytest.raises(SettingsError, match="^FLOW_SECRET"):
        load({"FLOW_SECRET": "x" * (minimum - 1), "FLOW_JWT_ALGORITHMS": alg})
    assert load({"FLOW_SECRET": "x" * minimum, "FLOW_JWT_ALGORITHMS": alg}).secret == "x" * minimum


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


def test_short_secret_file_refused(load):
    with pytest.raises(SettingsError, match="^FLOW_SECRET"):
        load({}, secret_text="short\n")


def test_mixing_hs_and_rs_refused(load, rsa_pems):
    with pytest.raises(SettingsError, match="^FLOW_JWT_ALGORITHMS"):
        load(ok_env(FLOW_JWT_ALGORITHMS="HS256,RS256", FLOW_JWT_PUBLIC_KEY=rsa_pems[1]))


def test_rs256_without_a_key_refused(load):
    with pytest.raises(SettingsError, match="^FLOW_JWT_PUBLIC_KEY"):
        load({"FLOW_JWT_ALGORITHMS": "RS256"})


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
    assert load_settings(env, env_file=nowhere, secret_file=nowhere) == settings


def test_as_env_round_trips_defaults(load, nowhere):
    settings = load(ok_env())
    assert load_settings(settings.as_env(), env_file=nowhere, secret_file=nowhere) == settings


def test_as_env_round_trips_a_secret_from_the_secret_file(load, nowhere):
    settings = load({}, secret_text=SECRET)
    assert settings.as_env()["FLOW_SECRET"] == SECRET
    assert load_settings(settings.as_env(), env_file=nowhere, secret_file=nowhere) == settings


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
    assert load_settings(settings.as_env(), env_file=nowhere, secret_file=nowhere) == settings


def test_as_env_round_trip_beats_the_env_file(load, tmp_path, nowhere):
    """A child given as_env() resolves the same values even if flow.env says otherwise."""
    settings = load(ok_env(FLOW_HTTP_PORT="8082"))
    other_file = tmp_path / "other.env"
    other_file.write_text("FLOW_HTTP_PORT=9000\nFLOW_HEARTBEAT=7\n")
    assert load_settings(settings.as_env(), env_file=other_file, secret_file=nowhere) == settings


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


def test_config_command_missing_secret_exits_2(tmp_path):
    result = _run_config(tmp_path, FLOW_SECRET="")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "FLOW_SECRET" in result.stderr
