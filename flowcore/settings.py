"""One settings object for every Flow process, read once from ``FLOW_`` variables.

Sources, weakest first: built-in defaults, a ``flow.env`` file beside the Makefile,
the process environment. A bad value raises :class:`SettingsError` naming the
variable; process ``main()`` functions turn that into one line on stderr and exit 2.

Loading never asks for a secret or a key: what a process needs depends on its role
(PROTOCOL section 5: a process that only publishes needs no token secret). The role
checks say it: :meth:`Settings.check_verifier` (the WebSocket servers),
:meth:`Settings.check_issuer` (whatever issues socket tokens), :meth:`Settings.check_app_secret`
(the demo web app's session key), or :meth:`Settings.check` with a role name;
``flowcore.runtime.start_process(name, role=...)`` runs them at start.
"""

from __future__ import annotations

import dataclasses
import difflib
import hmac
import ipaddress
import os
import re
import secrets
import tempfile
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ENV_FILE = PROJECT_ROOT / "flow.env"
# `make` writes the generated secret here (git-ignored) so every process shares it.
DEFAULT_SECRET_FILE = PROJECT_ROOT / ".flow_secret"


def running_from_checkout() -> bool:
    """True when flowcore is imported from a Flow checkout, not from an installed package."""
    return (PROJECT_ROOT / "flow.py").is_file() and (PROJECT_ROOT / "Makefile").is_file()


def default_root() -> Path:
    """FLOW_ROOT when it is not set: the checkout Flow runs from, else the current directory."""
    return PROJECT_ROOT if running_from_checkout() else Path.cwd()

SYMMETRIC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class SettingsError(ValueError):
    """A FLOW_ variable has a value Flow cannot use."""


# FLOW_ names that are no setting yet legitimately reach Flow's processes: where to read
# the settings from, and what flowcore.nginx.stack_env derives for supervisord.conf and
# nginx.conf (supervisord hands its whole environment to every program). A name added
# to stack_env belongs here too, or every process warns about it.
META_VARIABLES = frozenset(
    {
        "FLOW_ENV_FILE",
        "FLOW_WS_READ_TIMEOUT",
        "FLOW_NGINX_NOFILE",
        "FLOW_NGINX_CONNECTIONS",
        "FLOW_TLS_LISTEN",
        "FLOW_CLIENT_JS",
        "FLOW_PROXY_PROCESSES",
        "FLOW_REDIS_PROCESSES",
        "FLOW_API_PROCESSES",
    }
)

# What each role must hold (Settings.check); the others need no secret and no key.
ROLES = ("publisher", "proxy", "verifier", "issuer", "app")


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
    # Channels one socket may be subscribed to at once (PROTOCOL section 9).
    max_channels: int = 128
    # Channels that keep presence (PROTOCOL section 9): names and `name:*` patterns.
    presence_channels: tuple[str, ...] = ()
    # Seconds a user whose last connection left a channel stays present (a reload, a drain).
    presence_leave_delay: float = 10.0
    # Presence lists at most this many users; past it, only the count.
    presence_max_list: int = 100
    # Seconds the engine keeps a WebSocket server's counts without hearing from it (a
    # killed or frozen server's users then leave); servers renew five times as often.
    presence_lease: float = 10.0

    # How messages travel between publishers and the WebSocket pool (PROTOCOL section 11).
    engine: str = "zmq"

    publish_endpoint: str = "tcp://127.0.0.1:5561"
    fanout_endpoint: str = "tcp://127.0.0.1:5562"
    control_endpoint: str = "tcp://127.0.0.1:5563"
    # Messages ZeroMQ queues per peer before dropping (a stalled WebSocket server repairs
    # from history): the proxy holds up to this many per stalled server, so keep it modest.
    zmq_hwm: int = 100_000
    # The CPU the proxy runs on, with its ZeroMQ I/O thread: "auto" (the one it starts on
    # while its loop is mostly idle, every CPU while it is busy), "off" (wherever the kernel
    # puts each thread), or a CPU number (always that one). Every message passes from the
    # I/O thread to the loop and back; on one CPU each hand-over is a cheap local wake-up
    # instead of a cross-CPU one (an IPI, a VM exit on a virtual machine) and the loop's
    # caches stay warm; in a flood the two threads need two CPUs (docs/performance.md,
    # 2026-12-03).
    proxy_cpu: str = "auto"

    # The Redis engine (FLOW_ENGINE=redis): redis://, rediss:// (TLS) or unix:// URL, with
    # its password and database number. "" = the stack's own redis-server, which `flow run`
    # starts under supervisord on an owner-only unix socket in FLOW_RUN_DIR (redis_address).
    redis_url: str = dataclasses.field(default="", repr=False)
    # Every key and pub/sub channel Flow uses starts with this and a colon, so that several
    # deployments (or other applications) can share one Redis.
    redis_prefix: str = "flow"
    # Seconds between probes of each WebSocket server's pub/sub link: a link that carries no
    # probe back within three intervals is deaf, and is replaced (its streams then repaired).
    redis_probe: float = 1.0

    # The HTTP publish API (PROTOCOL section 10, flowcore.api): off unless FLOW_API_KEY is
    # set; the backends' bearer key, at least 32 characters. It listens on FLOW_API_BIND
    # (an address, loopback by default: never the public nginx) at FLOW_API_PORT.
    api_key: str = dataclasses.field(default="", repr=False)
    api_bind: str = "127.0.0.1"
    api_port: int = 5003
    # Seconds a publish through the API may wait for the engine to number it; past it the
    # answer is 503 and the engine drops the message rather than publish it late.
    api_timeout: float = 5.0

    # GET /metrics (Prometheus text) on every Flow process; 0 turns it off (the bench
    # compares W1 with and without). /healthz and /readyz stay either way.
    metrics: bool = True
    # Loopback HTTP for metrics and health: the proxy on this port, WebSocket server N of
    # the stack's pool (supervisord's process_num) on this port + 1 + N, each its own (the
    # pool's shared FLOW_WS_PORT reaches a random one). 0: no such listener (the proxy then
    # has no HTTP; each WebSocket server still answers on its own port).
    metrics_port: int = 0

    send_backlog: int = 4 * 1024 * 1024
    rate_limit: float = 20.0
    rate_burst: int = 40
    push_queue: int = 100_000
    push_linger: float = 5.0
    drain_timeout: float = 5.0

    log_level: str = "INFO"
    # Relative paths below resolve against ``root`` (Settings.path).
    log_dir: str = "log"
    run_dir: str = "run"  # the proxy keeps its state here across a graceful restart

    # --- the stack (`make`, `flow run`): read by the launcher, harmless elsewhere --------
    # The directory the web app is imported from and relative paths resolve against:
    # this checkout when Flow runs from one, else the current directory (load_settings).
    root: str = ""
    # Where the generated JWT secret and the web app's session key are kept ("" = ROOT/...).
    secret_file: str = ""
    app_secret: str = dataclasses.field(default="", repr=False)
    app_secret_file: str = ""
    # The interpreter supervisord starts Flow's processes with ("" = the current one).
    python: str = ""
    # The WSGI app gunicorn serves, as gunicorn names it (module:variable or module:factory()).
    app: str = "app:create_app()"
    app_workers: int = 2
    app_threads: int = 8
    nginx_workers: str = "auto"
    # Client connections the stack must hold at once (nginx and open-file limits follow).
    max_connections: int = 20000
    # Seconds a client has to send its request header before nginx closes the connection.
    header_timeout: int = 10
    # PEM certificate chain and key: nginx then serves https and wss on FLOW_HTTP_PORT.
    tls_cert: str = ""
    tls_key: str = ""

    def redis_address(self) -> str:
        """The Redis URL the engine connects to: FLOW_REDIS_URL, or the stack's own server."""
        return self.redis_url or "unix://" + str(self.path(self.run_dir) / "redis.sock")

    # The FLOW_ names load_settings found (environment or flow.env) that are neither a
    # setting nor in META_VARIABLES: typos, mostly. Not a field, so that fields() stays
    # the list of settings (as_env, describe, equality); load_settings sets it.
    unknown: ClassVar[tuple[str, ...]] = ()

    def path(self, value: str) -> Path:
        """``value`` (a path setting's value) as an absolute path, relative to ``root``."""
        p = Path(value)
        return p if p.is_absolute() else Path(self.root or default_root()) / p

    def as_env(self) -> dict[str, str]:
        """The settings as FLOW_ variables, so a child process resolves the same values."""
        env = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, tuple):
                value = ",".join(value)
            env["FLOW_" + field.name.upper()] = str(value)
        return env

    def describe_unknown(self) -> list[str]:
        """One sentence per unknown FLOW_ name, with the closest setting when one is close."""
        lines = []
        for name in self.unknown:
            line = f"{name} is not a Flow setting"
            guess = suggest_variable(name)
            if guess:
                line += f" (did you mean {guess}?)"
            lines.append(line + "; it is ignored")
        return lines

    # ---- role checks: each raises SettingsError with one line naming the variable ----

    def check_verifier(self) -> None:
        """The WebSocket servers' needs: a secret or public key that verifies every
        configured algorithm (FLOW_JWT_PUBLIC_KEY, or the private key's public half)."""
        from .tokens import verifying_key

        verifying_key(self)

    def check_issuer(self) -> None:
        """What issues socket tokens needs: the HS* secret, or a private key for the first
        configured algorithm (a public key alone verifies but cannot sign)."""
        from .tokens import signing_key

        signing_key(self)

    def check_app_secret(self) -> None:
        """The demo web app's session key: FLOW_APP_SECRET (or its file), 32 bytes or more,
        and not the JWT secret (a leak of one must not give the other)."""
        if len(self.app_secret.encode()) < MIN_APP_SECRET_BYTES:
            raise SettingsError(
                f"FLOW_APP_SECRET: missing or shorter than {MIN_APP_SECRET_BYTES} bytes (the web "
                f"app's session key; `make secret` generates {self.app_secret_file or '.flow_app_secret'}, "
                "or set FLOW_APP_SECRET or FLOW_APP_SECRET_FILE)"
            )
        if self.secret and hmac.compare_digest(self.app_secret.encode(), self.secret.encode()):
            raise SettingsError("FLOW_APP_SECRET: must differ from FLOW_SECRET (the JWT signing secret)")

    def check(self, role: str | None) -> None:
        """The checks of ``role`` (one of ROLES; None and "publisher"/"proxy": none)."""
        if role is not None and role not in ROLES:
            raise ValueError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
        if role == "verifier":
            self.check_verifier()
        elif role in ("issuer", "app"):
            self.check_issuer()
            if role == "app":
                self.check_app_secret()

    def problems(self, *roles: str) -> list[str]:
        """Every role check's failure (one line each), for `flow check`; [] when all pass."""
        found: list[str] = []
        for role in roles:
            try:
                self.check(role)
            except SettingsError as exc:
                if str(exc) not in found:
                    found.append(str(exc))
        return found

    def describe(self) -> str:
        """Human-readable resolved config, with secrets masked."""
        lines = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "redis_url":
                value = redact_url(value) if value else f"(unset: {self.redis_address()})"
            elif field.name in _SECRET_FIELDS:
                value = "(set)" if value else "(unset)"
            elif field.name == "jwt_public_key" and "PRIVATE KEY" in value:
                # A private key put where the public one goes (check_verifier refuses it):
                # `flow config` output gets pasted into bug reports.
                value = "(set: holds a private key, hidden)"
            elif isinstance(value, tuple):
                value = ",".join(value) or "(none)"
            lines.append(f"FLOW_{field.name.upper()}={value}")
        return "\n".join(lines)


def redact_url(url: str) -> str:
    """``url`` with its password (and any query, which may hold TLS key paths) replaced:
    safe for logs and `flow config`."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest, q, _ = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if at:
        user = userinfo.partition(":")[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo or not user else f"***@{host}"
    return f"{scheme}://{netloc}{slash}{path}{'?...' if q else ''}"


# ZeroMQ takes its high-water marks as a C int: a larger value passed here and then failed
# with OverflowError at the first push (or stopped the proxy at start with a traceback).
C_INT_MAX = 2**31 - 1


def _int(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"must be a whole number (at least {minimum})") from None
        if value < minimum:
            raise ValueError(f"must be a whole number of at least {minimum}")
        if maximum is not None and value > maximum:
            raise ValueError(f"must be a whole number from {minimum} to {maximum}")
        return value

    return parse


def _float(minimum: float, maximum: float | None = None) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"must be a number (at least {minimum:g}; seconds may have decimals)") from None
        if not value >= minimum or value == float("inf"):
            raise ValueError(f"must be a finite number of at least {minimum:g}")
        if maximum is not None and value > maximum:
            raise ValueError(f"must be a number from {minimum:g} to {maximum:g}")
        return value

    return parse


# A token's exp past 2**53 is refused by the servers as no date: a longer ttl is a typo.
MAX_TOKEN_TTL = 100 * 365 * 24 * 3600
# ZeroMQ's linger is milliseconds in a C int (about 24 days): a longer one raised
# OverflowError in the publisher, so a day is the limit.
MAX_LINGER = 24 * 3600.0


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be 1 or 0 (also true/false, yes/no, on/off)")


def _port(raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError("must be a TCP port, a whole number from 1 to 65535") from None
    if not 0 < value < 65536:
        raise ValueError("must be a TCP port, a whole number from 1 to 65535")
    return value


def _workers(raw: str) -> str:
    value = raw.strip().lower()
    if value == "auto":
        return value
    try:
        if int(value) >= 1:
            return str(int(value))
    except ValueError:
        pass
    raise ValueError("must be 'auto' or a whole number of at least 1")


def _proxy_cpu(raw: str) -> str:
    value = raw.strip().lower()
    if value in ("auto", "off"):
        return value
    if value.isascii() and value.isdigit():
        return str(int(value))
    raise ValueError("must be 'auto', 'off' or a CPU number (0, 1, ...)")


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


# HOST is a name, an IPv4 address, [an IPv6 address] or * (ZeroMQ's "every interface").
_ENDPOINT = re.compile(r"^(tcp://(\[[0-9A-Fa-f:.]+\]|[^\s\[\]:;/]+):(\d+)|ipc://[^\s]+)$")


def parse_endpoint(raw: str) -> str:
    """A ZeroMQ endpoint as FLOW_*_ENDPOINT takes it; ValueError with the reason."""
    return _endpoint(raw)


def _endpoint(raw: str) -> str:
    raw = raw.strip()
    match = _ENDPOINT.match(raw)
    if not match:
        raise ValueError("must be tcp://HOST:PORT or ipc://PATH")
    # Port 0 would bind a random port no publisher finds; past 65535 bind() raises.
    if match.group(3) is not None and not 0 < int(match.group(3)) < 65536:
        raise ValueError("must be tcp://HOST:PORT with a PORT from 1 to 65535")
    if match.group(2) is not None and not is_loopback_host(match.group(2)):
        raise ValueError(NOT_LOOPBACK)
    return raw


NOT_LOOPBACK = (
    "the ZeroMQ engine is for one host: its endpoints carry no authentication, so they must "
    "be on loopback (127.0.0.1, localhost, [::1]) or ipc://; for several hosts use FLOW_ENGINE=redis"
)


def is_loopback_host(host: str) -> bool:
    """Whether a ZeroMQ endpoint's host can only be reached from this machine."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name (resolved by ZeroMQ, anywhere) or * (every interface)


def _key(raw: str) -> str:
    """A PEM key given inline or as a path to a file holding it."""
    raw = raw.strip()
    if raw and "-----BEGIN" not in raw:
        path = Path(raw)
        if not path.is_file():
            # The value is not echoed here: it may be key material, and may span lines.
            raise ValueError("is neither a PEM key nor a readable file")
        try:
            # Stripped like inline text, so as_env() round-trips a key read from a file.
            return path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError("names a file that is not PEM text") from None
        except OSError as exc:
            raise ValueError(f"names a file that cannot be read ({exc.strerror})") from None
    return raw


def _log_level(raw: str) -> str:
    level = raw.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    return level


def _text(raw: str) -> str:
    return raw.strip()


def _line(raw: str) -> str:
    """A name or a path: a control character in one is a paste error, and a newline would
    forge a line of `flow config` or of supervisord's environment."""
    value = raw.strip()
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must be one line of text, without control characters")
    return value


# Engines this version ships (PROTOCOL section 11).
ENGINES = ("zmq", "redis")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _redis_url(raw: str) -> str:
    url = _line(raw)
    if url and not url.startswith(REDIS_SCHEMES):
        raise ValueError(f"must start with {', '.join(REDIS_SCHEMES)} (or be empty: the stack's own redis-server)")
    if url:
        try:
            # The parser the Redis engine's client uses: a port it cannot read failed there,
            # at every publish, as "a bug" with a traceback, instead of here at start.
            from redis.connection import parse_url
        except ImportError:  # a ZeroMQ-only install: FLOW_ENGINE=zmq never reads this
            return url
        try:
            parse_url(url)
        except ValueError as exc:
            raise ValueError(f"is not a Redis URL redis-py can use: {exc}") from None
    return url


def _redis_prefix(raw: str) -> str:
    prefix = _line(raw)
    if not prefix or any(c in prefix for c in " :*?[]{}"):
        raise ValueError("must be a non-empty name without spaces, colons, braces or glob characters")
    return prefix


def _presence_channels(raw: str) -> tuple[str, ...]:
    from .channels import parse_presence_channels  # channels needs no settings: no cycle

    parse_presence_channels(raw)
    return tuple(part.strip() for part in raw.split(",") if part.strip())


MIN_API_KEY_CHARS = 32


def _api_key(raw: str) -> str:
    key = raw.strip()
    if not key:
        return ""  # the API is off
    # Sent in an Authorization header: visible ASCII only, or no client could send it.
    if any(not 33 <= ord(c) <= 126 for c in key):
        raise ValueError("must be visible ASCII characters, without spaces (an HTTP bearer token)")
    if len(key) < MIN_API_KEY_CHARS:
        raise ValueError(f"must be at least {MIN_API_KEY_CHARS} characters (e.g. `openssl rand -hex 32`), "
                         "or empty to turn the HTTP publish API off")
    return key


def _bind_address(raw: str) -> str:
    """An address to listen on: an IP address (IPv6 without brackets) or ``localhost``."""
    value = raw.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    if value.lower() == "localhost":
        return "localhost"
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError("must be an IP address to listen on (127.0.0.1, ::1, a private address, "
                         "0.0.0.0 for every interface) or localhost") from None


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
    "jwt_audience": _line,
    "jwt_issuer": _line,
    "token_ttl": _int(1, MAX_TOKEN_TTL),
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
    "max_channels": _int(0),
    "presence_channels": _presence_channels,
    "presence_leave_delay": _float(0),
    "presence_max_list": _int(0),
    "presence_lease": _float(0.5),
    "engine": _engine,
    "publish_endpoint": _endpoint,
    "fanout_endpoint": _endpoint,
    "control_endpoint": _endpoint,
    "zmq_hwm": _int(0, C_INT_MAX),
    "proxy_cpu": _proxy_cpu,
    "redis_url": _redis_url,
    "redis_prefix": _redis_prefix,
    "redis_probe": _float(0.05),
    "api_key": _api_key,
    "api_bind": _bind_address,
    "api_port": _port,
    "api_timeout": _float(0.05, 60),
    "metrics": _flag,
    "metrics_port": _int(0, 65535),
    "send_backlog": _int(1024),
    "rate_limit": _float(0.01),
    "rate_burst": _int(1),
    "push_queue": _int(1, C_INT_MAX),
    "push_linger": _float(0, MAX_LINGER),
    "drain_timeout": _float(0),
    "log_level": _log_level,
    "log_dir": _line,
    "run_dir": _line,
    "root": _line,
    "secret_file": _line,
    "app_secret": _text,
    "app_secret_file": _line,
    "python": _line,
    "app": _line,
    "app_workers": _int(1),
    "app_threads": _int(1),
    "nginx_workers": _workers,
    "max_connections": _int(16),
    "header_timeout": _int(1),
    "tls_cert": _line,
    "tls_key": _line,
}


# Never echoed in an error message.
_SECRET_FIELDS = frozenset({"secret", "jwt_private_key", "app_secret", "redis_url", "api_key"})

# RFC 7518 section 3.2: an HMAC key at least as long as the hash output (PyJWT warns below).
MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
MIN_APP_SECRET_BYTES = 32

# Every FLOW_ name Flow reads.
KNOWN_VARIABLES = frozenset({"FLOW_" + name.upper() for name in _PARSERS} | META_VARIABLES)


def suggest_variable(name: str) -> str | None:
    """The known FLOW_ name closest to ``name`` (a typo), or None when none is close."""
    settings_names = sorted("FLOW_" + field.upper() for field in _PARSERS)
    match = difflib.get_close_matches(name.upper(), settings_names, n=1, cutoff=0.75)
    return match[0] if match else None


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments ignored; optional quotes stripped."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SettingsError(f"{path}: not UTF-8 text") from None
    except OSError as exc:  # unreadable (mode 0600, another owner): never silently skipped
        raise SettingsError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if "\0" in line:  # no environment can hold one: subprocess would raise ValueError
            raise SettingsError(f"{path}:{number}: a NUL character (is this a text file?)")
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
    app_secret_file: Path | None = None,
) -> Settings:
    """Resolve the settings: defaults < flow.env < environment. Raises SettingsError.

    Asks for no secret and no key: the role checks (Settings.check) do, in the processes
    that need them. ``unknown`` lists the FLOW_ names read that Flow does not know."""
    environ = os.environ if environ is None else environ
    # FLOW_ROOT and FLOW_ENV_FILE say where flow.env is, so only the environment sets them.
    root = Path(environ.get("FLOW_ROOT") or default_root()).resolve()
    if not root.is_dir():
        # Else flow.env is silently not found there and `flow secret` creates the directory.
        raise SettingsError(f"FLOW_ROOT={str(root)!r}: not a directory")
    if env_file is None:
        env_file = Path(environ.get("FLOW_ENV_FILE") or root / "flow.env")
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
    values["root"] = str(root)

    for field, file_field, default_name, given in (
        ("secret", "secret_file", ".flow_secret", secret_file),
        ("app_secret", "app_secret_file", ".flow_app_secret", app_secret_file),
    ):
        path = given or _resolve(values.get(file_field) or default_name, root)
        values[file_field] = str(path)
        if not values.get(field) and path.is_file():
            variable = "FLOW_" + file_field.upper()
            try:
                values[field] = path.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                raise SettingsError(f"{variable}={str(path)!r}: not UTF-8 text") from None
            except OSError as exc:
                raise SettingsError(f"{variable}={str(path)!r}: cannot be read ({exc.strerror})") from None

    settings = Settings(**values)
    unknown = tuple(sorted(name for name in merged if name.startswith("FLOW_") and name not in KNOWN_VARIABLES))
    if unknown:
        object.__setattr__(settings, "unknown", unknown)  # frozen; see Settings.unknown
    return settings


def ensure_secret_files(settings: Settings) -> list[Path]:
    """Generate the secrets the stack needs and nobody gave; the files written.

    The JWT secret (FLOW_SECRET_FILE, default ROOT/.flow_secret) when an HS* algorithm is
    configured and neither FLOW_SECRET nor that file holds one; the web app's session key
    (FLOW_APP_SECRET_FILE, default ROOT/.flow_app_secret) when neither FLOW_APP_SECRET
    nor that file does. An existing file is never overwritten, even a bad one (the role
    checks then say what is wrong with it). Load the settings again to read them."""
    written: list[Path] = []
    wanted = []
    if any(a in SYMMETRIC_ALGORITHMS for a in settings.jwt_algorithms) and not settings.secret:
        wanted.append(settings.path(settings.secret_file or ".flow_secret"))
    if not settings.app_secret:
        wanted.append(settings.path(settings.app_secret_file or ".flow_app_secret"))
    for path in wanted:
        if not path.exists() and _create_secret_file(path):
            written.append(path)
    return written


def _create_secret_file(path: Path) -> bool:
    """Write a fresh 64-character secret to ``path`` unless it exists; True if written.

    mkstemp creates the file 0600 whatever the umask (what `umask 077` gives, without
    changing the umask of a process that may run threads); the secret is complete on
    disk before it appears under its name, and link() keeps a file another process
    created meanwhile instead of replacing it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(secrets.token_hex(32) + "\n")  # 64 bytes: enough for HS512
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:
            # A file system without hard links: the rename is still atomic.
            if path.exists():
                return False
            os.replace(tmp, path)
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _resolve(value: str | Path, root: Path) -> Path:
    path = Path(value)
    return path if path.is_absolute() else root / path
