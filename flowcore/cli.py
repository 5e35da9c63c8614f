"""The ``flow`` command: run the stack, look at it, and push or listen from a shell.

    flow run                  generate missing secrets, check, run the stack (foreground)
    flow stop | flow status   the stack of this project (FLOW_RUN_DIR)
    flow config               the resolved settings, secrets masked
    flow check [--ports]      settings, ports, nginx, FLOW_APP, engine: one line per problem
    flow secret               generate the missing secret files
    flow token USER [--ttl N]
    flow push USER ID JSON | flow push --all ID JSON
    flow listen USER [--count N]

supervisord runs the stack's own processes through the same entry point (``python -m
flowcore proxy | redis | websocket | nginx``), so an installed package needs no checkout file.

Exit status: 0 done; 1 a problem found (a check failed, a push not handed over, the
server closed a listener); 2 bad input or configuration, said in one line; 3 ``status``
of a stack that is not running.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NoReturn, Sequence

from . import settings as settings_module
from .settings import Settings, SettingsError, load_settings

EXIT_PROBLEM = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3

# Started by supervisord (supervisord.conf), not by people.
INTERNAL = ("proxy", "redis", "websocket", "nginx", "api")
# What the stack's processes need beyond the base install (the "server" extra).
SERVER_MODULES = ("tornado", "supervisor", "gunicorn")
SERVER_EXTRA = "pip install 'flow-push[server]'"
# What FLOW_ENGINE=redis needs in every process, publishers included (the "redis" extra).
REDIS_MODULE = "redis"
REDIS_EXTRA = "pip install 'flow-push[redis]'"
STOP_TIMEOUT = 60.0
APP_IMPORT_TIMEOUT = 60.0

# Run with FLOW_PYTHON in the project directory, as gunicorn would import FLOW_APP.
# gunicorn's own rule (gunicorn.util.import_app): "module:name" or "module:factory(literal
# arguments)", "module" alone means "module:application"; no dotted name, no other
# expression. The factory is not called here (it may open a database). One line on
# failure, never a traceback.
_IMPORT_APP = r"""
import ast, importlib, sys
spec = sys.argv[1]
module, colon, attr = spec.partition(":")
attr = attr if colon else "application"
def fail(why):
    print(why)
    sys.exit(1)
try:
    expression = ast.parse(attr, mode="eval").body
except SyntaxError:
    fail(f"{attr!r} is neither a name nor a call of a factory (gunicorn takes module:name or module:factory())")
if isinstance(expression, ast.Call):
    if not isinstance(expression.func, ast.Name):
        fail(f"{attr!r}: the factory must be a plain name of the module (gunicorn takes no dotted name)")
    try:
        [ast.literal_eval(a) for a in expression.args]
        [ast.literal_eval(k.value) for k in expression.keywords]
    except ValueError:
        fail(f"{attr!r}: the factory's arguments must be literal values")
    name = expression.func.id
elif isinstance(expression, ast.Name):
    name = expression.id
else:
    fail(f"{attr!r} is neither a name nor a call of a factory (gunicorn takes module:name or module:factory())")
try:
    obj = getattr(importlib.import_module(module), name)
except BaseException as exc:
    fail(f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__)
if not callable(obj):
    fail(f"{module}:{name} is not callable (a WSGI application or a factory that returns one)")
"""


class UsageError(Exception):
    """Bad input: one line on stderr and exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def say(message: str) -> None:
    print(f"flow: {message}", file=sys.stderr, flush=True)


# --- settings and the stack's environment --------------------------------------------------


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        raise UsageError(f"bad configuration: {exc}") from None


def _stack_env(settings: Settings) -> dict[str, str]:
    from .nginx import stack_env

    try:
        return stack_env(settings)
    except SettingsError as exc:
        raise UsageError(f"bad configuration: {exc}") from None


def ensure_secrets() -> list[Path]:
    """Generate the secret files the stack needs and nobody gave (the paths written)."""
    try:
        return settings_module.ensure_secret_files(load_settings())
    except SettingsError as exc:
        raise UsageError(f"bad configuration: {exc}") from None
    except OSError as exc:
        raise UsageError(f"cannot write a secret file: {exc}") from None


# --- checks --------------------------------------------------------------------------------


def _endpoint_address(endpoint: str) -> tuple[str, int] | None:
    if not endpoint.startswith("tcp://"):
        return None
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    host = host.strip("[]")
    if host in ("*", ""):
        host = "0.0.0.0"
    return host, int(port)


# The ZeroMQ engine's endpoints, which its proxy binds.
_ZMQ_ENDPOINTS = ("publish_endpoint", "fanout_endpoint", "control_endpoint")


def _engine_endpoints(settings: Settings) -> tuple[str, ...]:
    # The Redis engine binds nothing: its own redis-server listens on a socket in the run dir.
    return _ZMQ_ENDPOINTS if settings.engine == "zmq" else ()


def _ports(settings: Settings) -> list[tuple[str, int, str]]:
    """(host, port, setting) of every TCP port the stack binds."""
    ports = [("127.0.0.1", settings.http_port, "FLOW_HTTP_PORT"),
             ("127.0.0.1", settings.ws_port, "FLOW_WS_PORT"),
             ("127.0.0.1", settings.app_port, "FLOW_APP_PORT")]
    if settings.api_key:  # the HTTP publish API runs only then
        host = settings.api_bind if settings.api_bind != "localhost" else "127.0.0.1"
        ports.append((host, settings.api_port, "FLOW_API_PORT"))
    for name in _engine_endpoints(settings):
        address = _endpoint_address(getattr(settings, name))
        if address is not None:
            ports.append((address[0], address[1], "FLOW_" + name.upper()))
    if settings.metrics_port:
        # The proxy's (ZeroMQ engine only), then one per WebSocket server of the pool.
        if settings.engine == "zmq":
            ports.append(("127.0.0.1", settings.metrics_port, "FLOW_METRICS_PORT"))
        for index in range(settings.ws_processes):
            ports.append(("127.0.0.1", settings.metrics_port + 1 + index,
                          f"FLOW_METRICS_PORT + {1 + index} (websocket-{index})"))
    return ports


def port_in_use(host: str, port: int) -> OSError | None:
    """The error binding ``host:port`` gives, None when it is free.

    Without SO_REUSEPORT on purpose: the WebSocket servers set it, so a second stack's
    server on the same port would bind and silently take a share of the first stack's
    connections; a plain bind fails on any listener, SO_REUSEPORT or not. SO_REUSEADDR
    only lets a port with connections in TIME_WAIT count as free, as it is for the servers.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc
    return None


def port_problems(settings: Settings) -> list[str]:
    problems = []
    seen: dict[int, str] = {}
    for host, port, name in _ports(settings):
        if port in seen:
            problems.append(f"port {port} is set for both {seen[port]} and {name}; give each its own")
            continue
        seen[port] = name
        if port > 65535:  # FLOW_METRICS_PORT + the pool's servers
            problems.append(f"port {port} ({name}) is past 65535: lower FLOW_METRICS_PORT")
            continue
        error = port_in_use(host, port)
        if error is None:
            continue
        import errno

        if error.errno == errno.EADDRINUSE:
            problems.append(f"port {port} ({name}) is in use by another process; "
                            "choose another or stop it")
        else:
            problems.append(f"port {port} ({name}) cannot be bound on {host}: {error.strerror or error}")
    seen_paths: dict[str, str] = {}
    for name in _engine_endpoints(settings):
        endpoint: str = getattr(settings, name)
        if not endpoint.startswith("ipc://"):
            continue
        variable = "FLOW_" + name.upper()
        path = Path(endpoint[len("ipc://"):])
        if str(path) in seen_paths:
            problems.append(f"{endpoint} is set for both {seen_paths[str(path)]} and {variable}; "
                            "give each its own")
            continue
        seen_paths[str(path)] = variable
        if len(os.fsencode(path)) > MAX_UNIX_PATH:
            problems.append(f"{endpoint} ({variable}): a path of {len(os.fsencode(path))} bytes, "
                            f"longer than a Unix socket's {MAX_UNIX_PATH}; choose a shorter one")
        elif not path.parent.is_dir():  # the proxy's bind would fail after the stack started
            problems.append(f"{endpoint} ({variable}): the directory {path.parent} does not exist")
        elif _unix_listening(path):
            problems.append(f"{endpoint} ({variable}) is in use by another process; "
                            "choose another or stop it")
    from .redis_server import runs_own_server, socket_path

    # redis-server unlinks a socket path in use and binds it again: a second server on it
    # would silently take the first one's clients.
    if runs_own_server(settings) and _unix_listening(socket_path(settings)):
        problems.append(f"{socket_path(settings)} (the stack's redis-server) is in use by another "
                        "process; stop it, or choose another FLOW_RUN_DIR")
    return problems


def unusable_secret_files(settings: Settings, app: bool = True) -> list[str]:
    """A secret file that is there but holds no usable secret, one line each.

    ensure_secret_files never replaces an existing file, so without this `flow secret`
    said "the secrets exist already" while the role checks said to run it."""
    from .settings import MIN_APP_SECRET_BYTES, MIN_SECRET_BYTES

    wanted = []
    hs = [MIN_SECRET_BYTES[a] for a in settings.jwt_algorithms if a in MIN_SECRET_BYTES]
    if hs:
        wanted.append(("FLOW_SECRET_FILE", settings.secret_file or ".flow_secret", settings.secret, max(hs)))
    if app:
        wanted.append(("FLOW_APP_SECRET_FILE", settings.app_secret_file or ".flow_app_secret",
                       settings.app_secret, MIN_APP_SECRET_BYTES))
    lines = []
    for variable, value, held, minimum in wanted:
        path = settings.path(value)
        if not os.path.lexists(path):
            continue
        if path.is_symlink() and not path.exists():
            why = "is a symbolic link to nothing"
        elif not path.is_file():
            why = "is not a regular file"
        else:
            try:
                content = path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError):
                continue  # load_settings says what is wrong with it
            if content != held or len(content.encode()) >= minimum:
                continue  # the secret comes from the environment, or the file is good
            why = f"holds {len(content.encode())} bytes, fewer than the {minimum} needed"
        lines.append(f"{variable}={str(path)!r} {why}; Flow never overwrites it: "
                     "remove it and run `flow secret`")
    return lines


# sun_path holds 108 bytes with the terminating NUL: a longer path cannot be bound.
MAX_UNIX_PATH = 107


def _unix_listening(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _app_problem(settings: Settings, env: Mapping[str, str]) -> str | None:
    python = settings.python or sys.executable
    try:
        result = subprocess.run(
            [python, "-c", _IMPORT_APP, settings.app], cwd=settings.root,
            env={**os.environ, **env}, capture_output=True, text=True, timeout=APP_IMPORT_TIMEOUT,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"FLOW_PYTHON={python!r} cannot run: {exc}"
    if result.returncode == 0:
        return None
    lines = (result.stdout.strip() or result.stderr.strip() or f"exit status {result.returncode}").splitlines()
    return f"FLOW_APP={settings.app!r} cannot be loaded from {settings.root}: {lines[-1]}"


# What GUNICORN_CMD_ARGS must not set, by gunicorn's long and short names.
_GUNICORN_REFUSED = {
    "--bind": ("-b", "GUNICORN_CMD_ARGS sets --bind: the app must listen on FLOW_APP_PORT, "
                     "where nginx sends requests; remove it"),
    "--config": ("-c", "GUNICORN_CMD_ARGS sets --config: the stack's gunicorn reads "
                       "flowcore.gunicorn_conf; set FLOW_APP_* instead"),
    "--daemon": ("-D", "GUNICORN_CMD_ARGS sets --daemon: gunicorn would leave supervisord, which "
                       "starts it again and again, and outlive flow stop; remove it"),
}


def _gunicorn_args_problems() -> list[str]:
    raw = os.environ.get("GUNICORN_CMD_ARGS", "")
    try:
        args = shlex.split(raw)
    except ValueError as exc:
        return [f"GUNICORN_CMD_ARGS={raw!r}: {exc}"]
    problems = []
    for arg in args:
        if arg.startswith("--"):
            # gunicorn's argparse takes any unambiguous prefix: --bi is --bind.
            option = arg.split("=", 1)[0]
            named = [name for name in _GUNICORN_REFUSED if len(option) > 3 and name.startswith(option)]
        elif arg.startswith("-"):  # -b ADDR, -bADDR, -D
            named = [name for name, (short, _) in _GUNICORN_REFUSED.items() if arg[:2] == short]
        else:
            named = []
        problems += [_GUNICORN_REFUSED[name][1] for name in named]
    return list(dict.fromkeys(problems))


def _redis_problem(settings: Settings) -> str | None:
    from .engines.redis import link_problem

    problem = link_problem(settings.redis_address())
    if problem and not settings.redis_url:
        return f"the stack's redis-server: {problem}"
    return problem


def _engine_problem(settings: Settings) -> str | None:
    if settings.engine == "redis":
        return _redis_problem(settings)
    endpoint = settings.publish_endpoint
    address = _endpoint_address(endpoint)
    try:
        if address is None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2.0)
                sock.connect(endpoint[len("ipc://"):])
        else:
            host = "127.0.0.1" if address[0] == "0.0.0.0" else address[0]
            socket.create_connection((host, address[1]), timeout=2.0).close()
    except OSError as exc:
        return f"the engine is not reachable at FLOW_PUBLISH_ENDPOINT={endpoint}: {exc.strerror or exc}"
    return None


# FLOW_APP's default: the demo app of this checkout.
DEMO_APP = "app:create_app()"


def problems_of(settings: Settings, env: Mapping[str, str], running: bool,
                ports_only: bool = False) -> list[str]:
    """Everything that would stop the stack or keep it from working, one line each."""
    if ports_only:
        return [] if running else port_problems(settings)
    problems = list(settings.describe_unknown())
    # The stack's WebSocket servers verify tokens and its app issues them.
    problems += settings.problems("verifier", "issuer")
    if settings.app == DEMO_APP:  # the demo signs its sessions with FLOW_APP_SECRET
        problems += settings.problems("app")
    if not running:
        problems += port_problems(settings)
        # supervisord's control socket (and gunicorn's) are in the run dir; a deep one made
        # supervisord fail after `flow check` said "ready to run".
        sock = _run_dir(env) / "supervisor.sock"
        if len(os.fsencode(sock)) > MAX_UNIX_PATH:
            problems.append(f"FLOW_RUN_DIR={str(_run_dir(env))!r} is too deep: {sock} is longer than "
                            f"a Unix socket path may be ({MAX_UNIX_PATH} bytes); choose a shorter one")
    missing = [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        problems.append(f"{', '.join(missing)} missing (the stack's server side): {SERVER_EXTRA}")
    if settings.engine == "redis" and importlib.util.find_spec(REDIS_MODULE) is None:
        problems.append(f"redis (redis-py) missing, which FLOW_ENGINE=redis needs: {REDIS_EXTRA}")
    from .nginx import find_nginx
    from .redis_server import find_redis_server, runs_own_server

    if find_nginx() is None:
        problems.append("nginx is not installed (Debian: apt-get install nginx)")
    if runs_own_server(settings) and find_redis_server() is None:
        problems.append("redis-server is not installed, and FLOW_ENGINE=redis without FLOW_REDIS_URL "
                        "runs its own (Debian: apt-get install redis-server; or set FLOW_REDIS_URL)")
    problems += _gunicorn_args_problems()
    python = settings.python or sys.executable
    if any(c.isspace() for c in python):
        # supervisord.conf's commands start with it, and supervisord splits them with shlex.
        problems.append(f"FLOW_PYTHON={python!r}: supervisord cannot start a path with spaces; "
                        "set FLOW_PYTHON to a path (a symbolic link) without them")
    app = _app_problem(settings, env)
    if app:
        problems.append(app)
    if running or (settings.engine == "redis" and settings.redis_url):
        # An existing Redis must answer before the stack starts, as it must after.
        engine = _engine_problem(settings)
        if engine:
            problems.append(engine)
    problems += unusable_secret_files(settings, app=settings.app == DEMO_APP)
    # Several roles share a check (the issuer's is the demo app's too): each line once.
    return list(dict.fromkeys(problems))


# --- supervisord -------------------------------------------------------------------------


def _run_dir(env: Mapping[str, str]) -> Path:
    return Path(env["FLOW_RUN_DIR"])


def supervisor_running(env: Mapping[str, str]) -> bool:
    """True when this project's supervisord answers on its socket (FLOW_RUN_DIR)."""
    return _unix_listening(_run_dir(env) / "supervisor.sock")


def _supervisord_conf() -> str:
    from .resources import data_file

    return str(data_file("supervisord.conf"))


def _supervisorctl(env: Mapping[str, str], *args: str) -> int:
    command = [sys.executable, "-m", "supervisor.supervisorctl", "-c", _supervisord_conf(), *args]
    try:
        return subprocess.run(command, env={**os.environ, **env}, timeout=STOP_TIMEOUT).returncode
    except subprocess.TimeoutExpired:
        say(f"supervisorctl {' '.join(args)} did not answer within {STOP_TIMEOUT:.0f}s")
        return EXIT_PROBLEM


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not; a process that cannot be read is taken as
    running: the caller waits on, until it is gone for sure)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by whoever started it) is gone for us
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# --- commands ----------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    for path in ensure_secrets():
        say(f"generated a secret in {path}")
    settings = _settings()
    env = _stack_env(settings)
    if supervisor_running(env):
        say(f"already running from {_run_dir(env)} (flow status / flow stop)")
        return EXIT_PROBLEM
    problems = problems_of(settings, env, running=False)
    for problem in problems:
        say(problem)
    if problems:
        return EXIT_PROBLEM
    Path(env["FLOW_LOG_DIR"]).mkdir(parents=True, exist_ok=True)
    _run_dir(env).mkdir(parents=True, exist_ok=True)
    scheme = "https" if settings.tls_cert else "http"
    say(f"{scheme}://127.0.0.1:{settings.http_port}  (app {settings.app}, "
        f"{settings.ws_processes} WebSocket servers; logs in {env['FLOW_LOG_DIR']}; Ctrl-C stops)")
    command = [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", _supervisord_conf()]
    sys.stderr.flush()
    # Replaced, not wrapped: Ctrl-C and SIGTERM reach supervisord itself.
    os.execve(sys.executable, command, {**os.environ, **env})
    return 0  # not reached


def cmd_stop(args: argparse.Namespace) -> int:
    env = _stack_env(_settings())
    if not supervisor_running(env):
        say("not running")
        return 0
    pid_file = _run_dir(env) / "supervisord.pid"
    try:
        pid: int | None = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        pid = None
    status = _supervisorctl(env, "shutdown")
    if status != 0:
        return status
    deadline = time.monotonic() + STOP_TIMEOUT
    while pid is not None and pid_alive(pid) and pid_file.exists():
        if time.monotonic() > deadline:
            say(f"supervisord (pid {pid}) still runs {STOP_TIMEOUT:.0f}s after shutdown")
            return EXIT_PROBLEM
        time.sleep(0.05)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    env = _stack_env(_settings())
    if not supervisor_running(env):
        say("not running")
        return EXIT_NOT_RUNNING
    return _supervisorctl(env, "status")


def cmd_config(args: argparse.Namespace) -> int:
    print(_settings().describe())
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    try:
        settings = load_settings()
    except SettingsError as exc:
        say(f"bad configuration: {exc}")
        return EXIT_PROBLEM
    try:
        env = _stack_env(settings)
    except UsageError as exc:
        say(str(exc))
        return EXIT_PROBLEM
    running = supervisor_running(env)
    problems = problems_of(settings, env, running, ports_only=args.ports)
    for problem in problems:
        say(problem)
    if problems:
        return EXIT_PROBLEM
    if not args.quiet:
        what = "ports free" if args.ports else (
            "the stack is running and its engine answers" if running else "ready to run")
        print(f"flow: ok ({what})")
    return 0


def cmd_secret(args: argparse.Namespace) -> int:
    written = ensure_secrets()
    for path in written:
        say(f"generated a secret in {path}")
    unusable = unusable_secret_files(_settings())
    for line in unusable:
        say(line)
    if unusable:
        return EXIT_PROBLEM
    if not written:
        say("the secrets exist already (or are set in the environment)")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from .protocol import ProtocolError
    from .tokens import issue_token

    settings = _settings()
    if args.ttl is not None and args.ttl < 1:
        raise UsageError("--ttl must be at least 1 second")
    if args.ttl is not None and args.ttl > MAX_TTL:
        raise UsageError(f"--ttl must be at most {MAX_TTL} seconds (100 years)")
    try:
        print(issue_token(settings, args.user, ttl=args.ttl))
    except ProtocolError as exc:
        raise UsageError(f"user: {exc}") from None
    except (SettingsError, RuntimeError) as exc:  # no key that can sign
        raise UsageError(str(exc)) from None
    return 0


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"JSON: not valid JSON ({exc})") from None
    except RecursionError:  # "[[[[...": deeper than the parser's stack
        raise UsageError("JSON: nested too deeply") from None


# Beyond this a token's exp passes 2**53, which the servers refuse as no date (and a
# browser cannot hold exactly): a ttl that large is a typo, not a wish.
MAX_TTL = 100 * 365 * 24 * 3600
# A linger ZeroMQ can hold (milliseconds in a C int); more is a typo, and a negative
# one would make close() wait for a dead proxy forever.
MAX_PUSH_TIMEOUT = 24 * 3600.0


def _push_timeout(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {raw!r}") from None
    if not 0 <= value <= MAX_PUSH_TIMEOUT:  # also false for nan
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds from 0 to {MAX_PUSH_TIMEOUT:.0f}, not {raw!r}")
    return value


def cmd_push(args: argparse.Namespace) -> int:
    if args.all:
        if len(args.values) != 2:
            raise UsageError("push --all takes ID JSON (see flow push --help)")
        user, message_id, raw = None, args.values[0], args.values[1]
    else:
        if len(args.values) != 3:
            raise UsageError("push takes USER ID JSON, or --all ID JSON (see flow push --help)")
        user, message_id, raw = args.values
    data = _parse_json(raw)
    settings = _settings()
    import flow

    timeout = settings.push_linger if args.timeout is None else args.timeout
    publisher = flow.Flow(settings=settings, linger=timeout)
    try:
        if user is None:
            publisher.push_all(message_id, data)
        else:
            publisher.push(user, message_id, data)
    except flow.InvalidMessage as exc:
        publisher.close()
        raise UsageError(f"not sent: {exc}") from None
    except flow.QueueFull as exc:
        publisher.close()
        say(f"not sent: {exc}")
        return EXIT_PROBLEM
    # close() waits up to the linger for the engine to confirm the message and, when it
    # could not, says so on stderr in one line with the count; flush(0) after it only counts.
    publisher.close()
    if publisher.flush(0):
        return EXIT_PROBLEM
    return 0


def _listen_urls(settings: Settings, url: str | None) -> tuple[str, str]:
    secure = bool(settings.tls_cert)
    origin = f"{'https' if secure else 'http'}://127.0.0.1:{settings.http_port}"
    if url is not None:
        _check_ws_url(url)
    return url or f"{'wss' if secure else 'ws'}://127.0.0.1:{settings.http_port}/websocket", origin


def _check_ws_url(url: str) -> None:
    # Tornado answers a URL it cannot open with a KeyError or a ValueError from urllib.
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # raises on a port that is no number or out of range
    except ValueError as exc:
        raise UsageError(f"--url {url!r}: {exc}") from None
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise UsageError(f"--url {url!r}: must be ws://HOST[:PORT]/PATH or wss://...")


async def _listen(url: str, origin: str, user: str, token: Callable[[], str], count: int) -> int:
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    request = HTTPRequest(url, headers={"Origin": origin}, connect_timeout=10, request_timeout=10)
    try:
        conn = await websocket_connect(request)
    except Exception as exc:  # noqa: BLE001
        # Whatever the peer is: refused (OSError), an HTTP error page (HTTPClientError), a
        # plain 200 (WebSocketError), endless bytes (UnsatisfiableReadError)... one line.
        say(f"cannot open {url}: {str(exc) or type(exc).__name__}")
        return EXIT_PROBLEM
    received = 0
    authenticated = False
    try:
        while True:
            frame = await conn.read_message()
            if frame is None:
                say(f"{url} closed the socket: {conn.close_code} {conn.close_reason or ''}".rstrip())
                return EXIT_PROBLEM
            if isinstance(frame, bytes) or frame == "<3":
                continue
            try:
                message = json.loads(frame)
            except ValueError:
                continue
            if not isinstance(message, dict):
                continue
            if isinstance(message.get("seq"), int):  # a pushed message, whatever its id
                print(json.dumps(message, ensure_ascii=False), flush=True)
                received += 1
                if count and received >= count:
                    return 0
            elif message.get("id") == "AUTH REQUEST":
                # First, and again when the token expires: a fresh token each time.
                await conn.write_message(json.dumps({"id": "AUTH", "token": token()}))
            elif message.get("id") == "AUTH OK" and not authenticated:
                authenticated = True
                say(f"listening as {user} on {url} (Ctrl-C stops)")
            elif message.get("id") == "AUTH FAILED":
                say(f"the server refused the token: {message.get('reason')}")
                return EXIT_PROBLEM
            elif message.get("id") == "ERROR":
                say(f"the server says: {message.get('reason')}")
    finally:
        conn.close(1000)


def cmd_listen(args: argparse.Namespace) -> int:
    from .protocol import ProtocolError, check_username
    from .tokens import issue_token

    try:
        check_username(args.user)
    except ProtocolError as exc:
        raise UsageError(f"user: {exc}") from None
    if args.count is not None and args.count < 1:
        raise UsageError("--count must be at least 1")
    if importlib.util.find_spec("tornado") is None:
        raise UsageError(f"flow listen needs tornado: {SERVER_EXTRA}")
    settings = _settings()
    url, origin = _listen_urls(settings, args.url)

    def token() -> str:
        return issue_token(settings, args.user)

    try:
        token()
    except (SettingsError, RuntimeError) as exc:
        raise UsageError(str(exc)) from None
    import asyncio

    return asyncio.run(_listen(url, origin, args.user, token, args.count or 0))


def _parser() -> _Parser:
    parser = _Parser(prog="flow", description="Flow: push messages to your users' browsers.",
                     epilog="Internal (supervisord runs them): flow proxy | redis | websocket | nginx | api.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> _Parser:
        sub: _Parser = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    command("run", cmd_run, "generate missing secrets, check, run the stack in the foreground")
    command("stop", cmd_stop, "stop the running stack of this project")
    command("status", cmd_status, "the supervised processes (exit 3 when not running)")
    command("config", cmd_config, "print the resolved settings, secrets masked")
    check = command("check", cmd_check, "find what would stop the stack: one line per problem")
    check.add_argument("--ports", action="store_true", help="only check that the ports are free")
    check.add_argument("--quiet", "-q", action="store_true", help="print nothing when all is well")
    command("secret", cmd_secret, "generate the missing secret files")
    token = command("token", cmd_token, "print a socket token for USER")
    token.add_argument("user", metavar="USER")
    token.add_argument("--ttl", type=int, help="lifetime in seconds (default FLOW_TOKEN_TTL)")
    push = command("push", cmd_push, "push a message: USER ID JSON, or --all ID JSON")
    push.add_argument("--all", action="store_true", help="to every authenticated socket")
    push.add_argument("--timeout", type=_push_timeout,
                      help="seconds to hand the message over (default FLOW_PUSH_LINGER)")
    push.add_argument("values", nargs="*", metavar="USER ID JSON")
    listen = command("listen", cmd_listen, "print what USER receives, one JSON line per message")
    listen.add_argument("user", metavar="USER")
    listen.add_argument("--count", type=int, help="exit after this many messages")
    listen.add_argument("--url", help="the WebSocket URL (default ws://127.0.0.1:$FLOW_HTTP_PORT/websocket)")
    return parser


def _internal(name: str, rest: list[str]) -> int:
    from . import processes

    if name == "proxy":
        processes.proxy_main()
    elif name == "api":
        from . import api

        api.main(rest)
    elif name == "websocket":
        processes.websocket_main(rest)
    elif name == "redis":
        from . import redis_server

        return redis_server.main(rest)
    else:
        from . import nginx

        return nginx.main(rest)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in INTERNAL:
        return _internal(argv[0], argv[1:])
    try:
        args = _parser().parse_args(argv)
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except UsageError as exc:
        say(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
