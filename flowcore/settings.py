"""One settings object for every Flow process, read once from ``FLOW_`` variables.

Sources, weakest first: built-in defaults, a ``flow.env`` file beside the Makefile,
the process environment. A bad value raises :class:`SettingsError` naming the
variable; process ``main()`` functions turn that into one line on stderr and exit 2.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ENV_FILE = PROJECT_ROOT / "flow.env"
# `make` writes the generated secret here (git-ignored) so every process shares it.
DEFAULT_SECRET_FILE = PROJECT_ROOT / ".flow_secret"

SYMMETRIC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class SettingsError(ValueError):
    """A FLOW_ variable has a value Flow cannot use."""


@dataclasses.dataclass(frozen=True)
class Settings:
    secret: str = dataclasses.field(default="", repr=False)
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_private_key: str = dataclasses.field(default="", repr=False)
    jwt_public_key: str = ""
    jwt_audience: str = ""
    jwt_issuer: str = ""
    token_ttl: int = 3600

    http_port: int = 5000
    ws_port: int = 5001
    app_port: int = 5002
    ws_processes: int = 2

    heartbeat: float = 45.0
    auth_timeout: float = 10.0
    auth_attempts: int = 3
    max_frame: int = 65536
    max_message: int = 1048576
    history_size: int = 100
    history_ttl: float = 300.0
    allowed_origins: tuple[str, ...] = ()
    # Seconds a socket keeps receiving after its token's exp while it fetches a new one.
    expire_grace: float = 25.0

    # How messages travel between publishers and the WebSocket pool (PROTOCOL section 11).
    engine: str = "zmq"

    publish_endpoint: str = "tcp://127.0.0.1:5561"
    fanout_endpoint: str = "tcp://127.0.0.1:5562"
    control_endpoint: str = "tcp://127.0.0.1:5563"
    # Messages ZeroMQ queues per peer before dropping (a stalled WebSocket server repairs
    # from history): the proxy holds up to this many per stalled server, so keep it modest.
    zmq_hwm: int = 100_000

    send_backlog: int = 4 * 1024 * 1024
    rate_limit: float = 20.0
    rate_burst: int = 40
    push_queue: int = 100_000
    push_linger: float = 5.0
    drain_timeout: float = 5.0

    log_level: str = "INFO"
    log_dir: str = str(PROJECT_ROOT / "log")
    run_dir: str = str(PROJECT_ROOT / "run")  # the proxy keeps its state here across a graceful restart

    def as_env(self) -> dict[str, str]:
        """The settings as FLOW_ variables, so a child process resolves the same values."""
        env = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, tuple):
                value = ",".join(value)
            env["FLOW_" + field.name.upper()] = str(value)
        return env

    def describe(self) -> str:
        """Human-readable resolved config, with secrets masked."""
        lines = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in ("secret", "jwt_private_key"):
                value = "(set)" if value else "(unset)"
            elif isinstance(value, tuple):
                value = ",".join(value) or "(none)"
            lines.append(f"FLOW_{field.name.upper()}={value}")
        return "\n".join(lines)


def _int(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw.strip())
        if value < minimum:
            raise ValueError(f"must be at least {minimum}")
        return value

    return parse


def _float(minimum: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = float(raw.strip())
        if not value >= minimum or value == float("inf"):
            raise ValueError(f"must be a finite number of at least {minimum}")
        return value

    return parse


def _port(raw: str) -> int:
    value = int(raw.strip())
    if not 0 < value < 65536:
        raise ValueError("must be a TCP port between 1 and 65535")
    return value


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _algorithms(raw: str) -> tuple[str, ...]:
    algorithms = _csv(raw)
    if not algorithms:
        raise ValueError("must name at least one algorithm")
    for name in algorithms:
        if name not in SYMMETRIC_ALGORITHMS and name not in ASYMMETRIC_ALGORITHMS:
            known = ", ".join(sorted(SYMMETRIC_ALGORITHMS | ASYMMETRIC_ALGORITHMS))
            raise ValueError(f"unknown algorithm {name!r} (known: {known})")
    return algorithms


_ENDPOINT = re.compile(r"^(tcp://[^\s]+:\d+|ipc://[^\s]+)$")


def _endpoint(raw: str) -> str:
    raw = raw.strip()
    if not _ENDPOINT.match(raw):
        raise ValueError("must be tcp://HOST:PORT or ipc://PATH")
    return raw


def _key(raw: str) -> str:
    """A PEM key given inline or as a path to a file holding it."""
    raw = raw.strip()
    if raw and "-----BEGIN" not in raw:
        path = Path(raw)
        if not path.is_file():
            # The value is not echoed here: it may be key material, and may span lines.
            raise ValueError("is neither a PEM key nor a readable file")
        # Stripped like inline text, so as_env() round-trips a key read from a file.
        return path.read_text().strip()
    return raw


def _log_level(raw: str) -> str:
    level = raw.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    return level


def _text(raw: str) -> str:
    return raw.strip()


# Engines this version ships; the Redis engine is the next one (PROTOCOL section 11).
ENGINES = ("zmq",)


def _engine(raw: str) -> str:
    name = raw.strip().lower()
    if name not in ENGINES:
        raise ValueError(f"unknown engine (available: {', '.join(ENGINES)})")
    return name


_PARSERS: dict[str, Callable[[str], Any]] = {
    "secret": _text,
    "jwt_algorithms": _algorithms,
    "jwt_private_key": _key,
    "jwt_public_key": _key,
    "jwt_audience": _text,
    "jwt_issuer": _text,
    "token_ttl": _int(1),
    "http_port": _port,
    "ws_port": _port,
    "app_port": _port,
    "ws_processes": _int(1),
    "heartbeat": _float(0.05),
    "auth_timeout": _float(0.05),
    "auth_attempts": _int(1),
    "max_frame": _int(64),
    "max_message": _int(64),
    "history_size": _int(0),
    "history_ttl": _float(0),
    "allowed_origins": _csv,
    "expire_grace": _float(0),
    "engine": _engine,
    "publish_endpoint": _endpoint,
    "fanout_endpoint": _endpoint,
    "control_endpoint": _endpoint,
    "zmq_hwm": _int(0),
    "send_backlog": _int(1024),
    "rate_limit": _float(0.01),
    "rate_burst": _int(1),
    "push_queue": _int(1),
    "push_linger": _float(0),
    "drain_timeout": _float(0),
    "log_level": _log_level,
    "log_dir": _text,
    "run_dir": _text,
}


# Never echoed in an error message.
_SECRET_FIELDS = frozenset({"secret", "jwt_private_key"})

# RFC 7518 section 3.2: an HMAC key at least as long as the hash output (PyJWT warns below).
_MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments ignored; optional quotes stripped."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SettingsError(f"{path}: not UTF-8 text") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :]
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"{path}:{number}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def load_settings(
    environ: Mapping[str, str] | None = None,
    env_file: Path | None = None,
    secret_file: Path | None = None,
) -> Settings:
    """Resolve the settings: defaults < flow.env < environment. Raises SettingsError."""
    environ = os.environ if environ is None else environ
    if env_file is None:
        env_file = Path(environ.get("FLOW_ENV_FILE", DEFAULT_ENV_FILE))
    merged = read_env_file(env_file)
    merged.update({k: v for k, v in environ.items() if k.startswith("FLOW_")})

    values: dict[str, Any] = {}
    for name, parse in _PARSERS.items():
        variable = "FLOW_" + name.upper()
        if variable not in merged:
            continue
        try:
            merged[variable].encode("utf-8")  # os.environ smuggles bad bytes in as surrogates
            values[name] = parse(merged[variable])
        except ValueError as exc:
            shown = "(hidden)" if name in _SECRET_FIELDS else repr(merged[variable])
            raise SettingsError(f"{variable}={shown}: {exc}") from None

    if not values.get("secret"):
        path = secret_file or Path(environ.get("FLOW_SECRET_FILE", DEFAULT_SECRET_FILE))
        if path.is_file():
            try:
                values["secret"] = path.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                raise SettingsError(f"FLOW_SECRET_FILE={str(path)!r}: not UTF-8 text") from None

    settings = Settings(**values)
    _check_consistency(settings)
    return settings


def _check_consistency(settings: Settings) -> None:
    symmetric = [a for a in settings.jwt_algorithms if a in SYMMETRIC_ALGORITHMS]
    asymmetric = [a for a in settings.jwt_algorithms if a in ASYMMETRIC_ALGORITHMS]
    if symmetric and asymmetric:
        raise SettingsError(
            "FLOW_JWT_ALGORITHMS: mixing HS* with public-key algorithms lets a public key "
            "be used as an HMAC secret; choose one family"
        )
    minimum = max((_MIN_SECRET_BYTES[a] for a in symmetric), default=0)
    if symmetric and len(settings.secret.encode()) < minimum:
        raise SettingsError(
            f"FLOW_SECRET: missing or shorter than {minimum} bytes "
            f"(needed for {','.join(symmetric)}; run `make secret`, or set FLOW_SECRET)"
        )
    if asymmetric and not (settings.jwt_public_key or settings.jwt_private_key):
        raise SettingsError(
            "FLOW_JWT_PUBLIC_KEY: required for " + ",".join(asymmetric) + " (PEM text or a file path)"
        )
