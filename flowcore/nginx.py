"""Stack glue: the environment supervisord needs, and nginx run from a template.

    python -m flowcore.nginx               render nginx.conf into the run dir, exec nginx
                                           in the foreground (supervisord runs this)
    python -m flowcore.nginx --render      render only; print the rendered file's path
    python -m flowcore.nginx --test        render, then exec `nginx -t` on the result
    python -m flowcore.nginx --print-env   print `export FLOW_...=...` lines (shell-quoted)
                                           of the resolved values supervisord.conf and
                                           nginx.conf use; the Makefile evals them

Besides the FLOW_ settings (flowcore.settings) this reads a few stack-only variables:
FLOW_ROOT (the project, default: this checkout), FLOW_RUN_DIR (supervisord's socket,
pid and log, the rendered nginx.conf and nginx's pid and temp dirs; default ROOT/run),
FLOW_PYTHON (the interpreter supervisord starts the Python processes with; default the
current one) and FLOW_NGINX_WORKERS (nginx worker_processes; default auto).

The engine decides which of its processes supervisord starts: the message proxy for
FLOW_ENGINE=zmq, the stack's own redis-server (flowcore.redis_server) for FLOW_ENGINE=redis
with FLOW_REDIS_URL empty, none for an existing Redis (FLOW_PROXY_PROCESSES and
FLOW_REDIS_PROCESSES in the printed environment).

Capacity: FLOW_MAX_CONNECTIONS sizes nginx's worker_connections and its open-file limit
(two connections per proxied WebSocket, per worker). Before nginx starts, this raises
its own open-file soft limit to the hard limit (nginx inherits it) and prints one
capacity line; when the hard limit is too low for FLOW_MAX_CONNECTIONS it prints one
warning line and runs anyway. FLOW_HEADER_TIMEOUT (seconds, default 10) is how long a
client may take to send its request header. FLOW_TLS_CERT and FLOW_TLS_KEY (both or
neither) make nginx serve https and wss on FLOW_HTTP_PORT (docs/deployment.md).
"""

from __future__ import annotations

import os
import re
import resource
import shlex
import shutil
import sys
from pathlib import Path
from typing import Mapping

from . import runtime
from .redis_server import runs_own_server
from .resources import data_file
from .settings import Settings, SettingsError, load_settings

PLACEHOLDER = re.compile(r"\$\{(FLOW_[A-Z0-9_]+)\}")
# Where Debian puts nginx; /usr/sbin is not on an ordinary user's PATH.
EXTRA_BIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
# Connections and open files nginx needs besides the clients' sockets: page requests,
# keepalive connections to the app, listening sockets, log files.
HEADROOM = 1024
# Seconds a client has to send its request header (FLOW_HEADER_TIMEOUT).
DEFAULT_HEADER_TIMEOUT = 10
TLS_INCLUDE = "nginx-tls.conf"


def find_nginx(environ: Mapping[str, str] | None = None) -> str | None:
    """The nginx executable, or None when nginx is not installed."""
    environ = os.environ if environ is None else environ
    path = os.pathsep.join([environ.get("PATH", os.defpath), *EXTRA_BIN_DIRS])
    return shutil.which("nginx", path=path)


def _header_timeout(settings: Settings, environ: Mapping[str, str]) -> int:
    # Until settings.py has the field, the stack reads the variable itself.
    value = getattr(settings, "header_timeout", None)
    raw = str(value) if value is not None else environ.get("FLOW_HEADER_TIMEOUT", "")
    if not raw.strip():
        return DEFAULT_HEADER_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
    if not 1 <= seconds < 86400:
        raise SettingsError(f"FLOW_HEADER_TIMEOUT={raw!r}: must be a number of seconds, 1 or more")
    return int(seconds)


def _tls_paths(settings: Settings) -> tuple[str, str]:
    cert, key = settings.tls_cert, settings.tls_key
    if bool(cert) != bool(key):
        given, missing = ("FLOW_TLS_CERT", "FLOW_TLS_KEY") if cert else ("FLOW_TLS_KEY", "FLOW_TLS_CERT")
        raise SettingsError(f"{given} is set but {missing} is not: TLS needs both (or neither)")
    if not cert:
        return "", ""
    return str(settings.path(cert)), str(settings.path(key))


# What the demo app (FLOW_APP's default) keeps presence on, unless FLOW_PRESENCE_CHANNELS says.
DEMO_PRESENCE_CHANNELS = "doc:*,lobby"


def stack_env(settings: Settings, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every variable supervisord.conf and nginx.conf expand, resolved and absolute."""
    environ = os.environ if environ is None else environ
    workers = settings.nginx_workers
    if workers != "auto" and not (workers.isdigit() and int(workers) > 0):
        raise SettingsError(f"FLOW_NGINX_WORKERS={workers!r}: must be 'auto' or a positive integer")
    # Per worker, for the whole load: accept is not spread evenly over the workers.
    connections = 2 * settings.max_connections + HEADROOM
    cert, key = _tls_paths(settings)
    return {
        "FLOW_ROOT": settings.root,
        "FLOW_RUN_DIR": str(settings.path(settings.run_dir)),
        "FLOW_PYTHON": settings.python or sys.executable,
        "FLOW_NGINX_WORKERS": workers,
        "FLOW_HTTP_PORT": str(settings.http_port),
        "FLOW_WS_PORT": str(settings.ws_port),
        "FLOW_APP_PORT": str(settings.app_port),
        "FLOW_WS_PROCESSES": str(settings.ws_processes),
        "FLOW_APP": settings.app,
        "FLOW_APP_WORKERS": str(settings.app_workers),
        "FLOW_APP_THREADS": str(settings.app_threads),
        "FLOW_LOG_DIR": str(settings.path(settings.log_dir)),
        # nginx must not cut an idle socket between two heartbeats.
        "FLOW_WS_READ_TIMEOUT": str(max(75, int(settings.heartbeat * 2) + 1)),
        "FLOW_MAX_CONNECTIONS": str(settings.max_connections),
        "FLOW_NGINX_CONNECTIONS": str(connections),
        # What nginx should get; main() lowers it to the hard limit when it must.
        "FLOW_NGINX_NOFILE": str(connections + HEADROOM),
        "FLOW_HEADER_TIMEOUT": str(_header_timeout(settings, environ)),
        "FLOW_TLS_CERT": cert,
        "FLOW_TLS_KEY": key,
        "FLOW_TLS_LISTEN": " ssl" if cert else "",
        "FLOW_CLIENT_JS": str(data_file("websocket.js")),
        # supervisord.conf's numprocs of the engine's processes, 1 or 0: a program with no
        # process is absent from `supervisorctl status`, where a not-started one would
        # make it (and `flow status`) exit 3 for a healthy stack.
        "FLOW_PROXY_PROCESSES": "1" if settings.engine == "zmq" else "0",
        "FLOW_REDIS_PROCESSES": "1" if runs_own_server(settings) else "0",
        # The HTTP publish API's process runs only when FLOW_API_KEY is set.
        "FLOW_API_PROCESSES": "1" if settings.api_key else "0",
        # The demo's shared documents show who is viewing them (PROTOCOL section 9).
        **({"FLOW_PRESENCE_CHANNELS": DEMO_PRESENCE_CHANNELS}
           if settings.app == Settings.app and not settings.presence_channels else {}),
    }


def raise_open_file_limit(env: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """Raise this process's open-file limit as far as it may go (nginx inherits it).

    Returns ``env`` with FLOW_NGINX_NOFILE and FLOW_NGINX_CONNECTIONS lowered to what
    nginx can really have, and the lines to print: the capacity, and a warning when the
    hard limit is too low for FLOW_MAX_CONNECTIONS. Never fails: a smaller stack still serves.
    """
    wanted = int(env["FLOW_NGINX_NOFILE"])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinite = resource.RLIM_INFINITY
    if hard != infinite and hard < wanted:
        try:  # only with CAP_SYS_RESOURCE (root, outside most containers)
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            soft = hard = wanted
        except (OSError, ValueError):
            pass
    # Soft up to hard, as every Flow process does at start; the capacity line reports the
    # limit nginx really gets.
    runtime.raise_open_file_limit()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Never ask for more than nginx can get: its workers would log a failed setrlimit
    # at every start, and worker_connections above the limit a warning.
    files = wanted if soft == infinite else min(wanted, soft)
    connections = min(int(env["FLOW_NGINX_CONNECTIONS"]), max(1, files - HEADROOM))
    maximum = int(env["FLOW_MAX_CONNECTIONS"])
    clients = min(maximum, max(0, (connections - HEADROOM) // 2))

    def shown(limit: int) -> str:
        return "unlimited" if limit == infinite else str(limit)

    lines = [
        f"flow: nginx capacity: {clients} WebSocket clients (FLOW_MAX_CONNECTIONS={maximum}; "
        f"worker_connections {connections}, worker_rlimit_nofile {files}; "
        f"open files soft {shown(soft)}, hard {shown(hard)})"
    ]
    if clients < maximum:
        lines.append(
            f"flow: warning: the open-file hard limit ({shown(hard)}) holds about {clients} "
            f"WebSocket clients, below FLOW_MAX_CONNECTIONS={maximum}: raise it to {wanted} "
            "(ulimit -Hn, systemd LimitNOFILE=, limits.conf nofile) or lower FLOW_MAX_CONNECTIONS"
        )
    return {**env, "FLOW_NGINX_NOFILE": str(files), "FLOW_NGINX_CONNECTIONS": str(connections)}, lines


def tls_block(env: Mapping[str, str]) -> str:
    """The server-level lines of nginx-tls.conf: TLS and HSTS, or nothing but a comment."""
    cert, key = env["FLOW_TLS_CERT"], env["FLOW_TLS_KEY"]
    if not cert:
        return "# TLS is off (FLOW_TLS_CERT and FLOW_TLS_KEY are not set).\n"
    for variable, path in (("FLOW_TLS_CERT", cert), ("FLOW_TLS_KEY", key)):
        try:
            text = Path(path).read_text(errors="replace")
        except OSError as exc:
            raise SettingsError(f"{variable}={path!r}: cannot read it ({exc.strerror})") from None
        if "-----BEGIN" not in text:
            raise SettingsError(f"{variable}={path!r}: not a PEM file")
    return (
        "# TLS is on: FLOW_TLS_CERT and FLOW_TLS_KEY.\n"
        f"ssl_certificate {_quoted(cert)};\n"
        f"ssl_certificate_key {_quoted(key)};\n"
        "ssl_protocols TLSv1.2 TLSv1.3;\n"
        "ssl_session_cache shared:flow_tls:10m;\n"
        "ssl_session_timeout 1d;\n"
        "ssl_session_tickets off;\n"
        # Only over TLS: HSTS sent on plain http would be ignored, or pin a dev host.
        'add_header Strict-Transport-Security "max-age=31536000" always;\n'
        # nginx answers plain http on a TLS port with its code 497: send it to https.
        "error_page 497 =301 https://$http_host$request_uri;\n"
    )


def _quoted(path: str) -> str:
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(env: Mapping[str, str]) -> Path:
    """Fill the nginx.conf template; write it to the run dir; return the rendered path."""
    template = data_file("nginx.conf")
    text = template.read_text()

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in env:
            raise SettingsError(f"{template}: unknown placeholder ${{{name}}}")
        return env[name]

    rendered = PLACEHOLDER.sub(substitute, text)
    tls = tls_block(env)
    run_dir = Path(env["FLOW_RUN_DIR"])
    run_dir.mkdir(parents=True, exist_ok=True)
    Path(env["FLOW_LOG_DIR"]).mkdir(parents=True, exist_ok=True)
    _write(run_dir / TLS_INCLUDE, f"# Written by flowcore.nginx for {run_dir / 'nginx.conf'}.\n" + tls)
    target = run_dir / "nginx.conf"
    _write(target, f"# Rendered from {template} by flowcore.nginx; edit the template, not this file.\n"
           + rendered)
    return target


def _write(target: Path, text: str) -> None:
    # Whole or not at all: a restarting nginx never reads half a file.
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(target)


def nginx_args(nginx: str, env: Mapping[str, str], conf: Path, test: bool = False) -> list[str]:
    # -e: the log nginx uses before it has read the config (its default may not be writable).
    args = [nginx, "-e", str(Path(env["FLOW_LOG_DIR"]) / "nginx-error.log"),
            "-p", env["FLOW_RUN_DIR"], "-c", str(conf)]
    return args + (["-t"] if test else ["-g", "daemon off;"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    modes = {"--render", "--test", "--print-env"}
    if len(argv) > 1 or (argv and argv[0] not in modes):
        print("usage: python -m flowcore.nginx [--render | --test | --print-env]", file=sys.stderr)
        return 2
    mode = argv[0] if argv else "--run"
    try:
        env = stack_env(load_settings())
    except SettingsError as exc:
        print(f"flow: bad configuration: {exc}", file=sys.stderr)
        return 2

    if mode == "--print-env":
        for name, value in env.items():
            print(f"export {name}={shlex.quote(value)}")
        return 0

    # Also for --render, so the rendered file is the one nginx would run.
    env, lines = raise_open_file_limit(env)
    try:
        conf = render(env)
    except (OSError, SettingsError) as exc:
        print(f"flow: cannot render nginx.conf: {exc}", file=sys.stderr)
        return 2
    if mode == "--render":
        print(conf)
        return 0
    for line in lines:
        print(line, file=sys.stderr, flush=True)

    nginx = find_nginx()
    if nginx is None:
        print("flow: nginx is not installed (Debian: apt-get install nginx)", file=sys.stderr)
        return 2
    args = nginx_args(nginx, env, conf, test=mode == "--test")
    print(f"flow: exec {shlex.join(args)}", file=sys.stderr, flush=True)
    # Replace this process, so supervisord signals nginx's master directly.
    os.execv(nginx, args)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
