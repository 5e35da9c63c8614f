"""The stack's own redis-server, for FLOW_ENGINE=redis with FLOW_REDIS_URL empty.

    python -m flowcore redis             render redis.conf into the run dir, exec
                                         redis-server in the foreground (supervisord runs this)
    python -m flowcore redis --render    render only; print the rendered file's path

The server listens on no TCP port at all, only on an owner-only Unix socket,
FLOW_RUN_DIR/redis.sock (what ``Settings.redis_address()`` gives the engine when
FLOW_REDIS_URL is empty); it keeps its append-only file in FLOW_RUN_DIR/redis (mode 0700)
and logs to stdout, which supervisord writes to FLOW_LOG_DIR/redis.log. This process
replaces itself with redis-server, so supervisord's SIGTERM reaches Redis, which fsyncs
its append-only file and exits 0.

With FLOW_REDIS_URL set Flow uses that Redis, and this refuses to start one of its own;
such a Redis needs the same choices (docs/architecture.md): every write fsynced if stream
positions are to survive its restart, no eviction, a pub/sub output-buffer limit.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Mapping

from .settings import Settings, SettingsError, load_settings

# Debian installs it in /usr/bin; searched also when PATH lacks it (a service's PATH may).
EXTRA_BIN_DIRS = ("/usr/sbin", "/usr/bin")
SOCKET = "redis.sock"
DATA_DIR = "redis"
CONF = "redis.conf"
# sun_path holds 108 bytes with the terminating NUL.
MAX_UNIX_PATH = 107


def find_redis_server(environ: Mapping[str, str] | None = None) -> str | None:
    """The redis-server executable, or None when it is not installed."""
    environ = os.environ if environ is None else environ
    path = os.pathsep.join([environ.get("PATH", os.defpath), *EXTRA_BIN_DIRS])
    return shutil.which("redis-server", path=path)


def runs_own_server(settings: Settings) -> bool:
    """Whether the stack starts its own redis-server (supervisord's [program:redis])."""
    return settings.engine == "redis" and not settings.redis_url


def socket_path(settings: Settings) -> Path:
    """The Unix socket the stack's own redis-server listens on."""
    address = settings.redis_address()
    if settings.redis_url or not address.startswith("unix://"):
        raise SettingsError("FLOW_REDIS_URL is set: Flow uses that Redis and runs no redis-server of its own")
    return Path(address[len("unix://"):])


def _quoted(value: str) -> str:
    # redis.conf arguments are split like a shell's: a double-quoted string with
    # backslash escapes holds any path, spaces and quotes included.
    out = []
    for char in value:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def redis_conf(settings: Settings) -> str:
    """The text of redis.conf for this stack."""
    sock = socket_path(settings)
    if len(os.fsencode(sock)) > MAX_UNIX_PATH:
        raise SettingsError(f"FLOW_RUN_DIR={str(sock.parent)!r} is too deep: {sock} is longer than "
                            f"a Unix socket path may be ({MAX_UNIX_PATH} bytes); choose a shorter one")
    data = sock.parent / DATA_DIR
    lines = [
        "# Written by flowcore.redis_server for the stack's own redis-server; not a file to edit:",
        "# Flow's engine relies on these choices (docs/architecture.md).",
        "# Nothing on the network: only the owner-only Unix socket.",
        "port 0",
        f"unixsocket {_quoted(str(sock))}",
        "unixsocketperm 700",
        "protected-mode yes",
        f"dir {_quoted(str(data))}",
        "daemonize no",
        "supervised no",
        # stdout: supervisord writes it to FLOW_LOG_DIR/redis.log.
        'logfile ""',
        "# History survives a restart. fsync once a second, not before every answer: with",
        "# `always` one slow fsync stalls every publisher and WebSocket server at once",
        "# (docs/performance.md, 2026-12-02b: stalls up to 1.1 s on this kind of disk). The",
        "# price: after a restart of this server the engine starts new epochs (it cannot",
        "# know what the last second lost), and resuming clients hear recovered: false.",
        "appendonly yes",
        "appendfsync everysec",
        "# The append-only file is the persistence; snapshots would only fork for nothing.",
        'save ""',
        "# An evicted stream key would restart its numbering silently: refuse writes instead.",
        "maxmemory-policy noeviction",
        "# A WebSocket server that cannot keep up is cut (and repairs from history) before",
        "# it costs Redis unbounded memory.",
        "client-output-buffer-limit pubsub 64mb 16mb 60",
    ]
    return "\n".join(lines) + "\n"


def render(settings: Settings) -> Path:
    """Create the run and data directories, write redis.conf; the rendered file's path."""
    text = redis_conf(settings)
    run_dir = socket_path(settings).parent
    run_dir.mkdir(parents=True, exist_ok=True)
    data = run_dir / DATA_DIR
    data.mkdir(mode=0o700, exist_ok=True)
    # Also when it existed: the append-only file holds every user's history.
    data.chmod(0o700)
    target = run_dir / CONF
    # Whole or not at all: a restarting redis-server never reads half a file.
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 or (argv and argv[0] != "--render"):
        print("usage: python -m flowcore redis [--render]", file=sys.stderr)
        return 2
    try:
        settings = load_settings()
        if settings.engine != "redis":
            raise SettingsError(f"FLOW_ENGINE={settings.engine}: the stack runs no redis-server")
        conf = render(settings)
    except SettingsError as exc:
        print(f"flow: bad configuration: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"flow: cannot render redis.conf: {exc}", file=sys.stderr)
        return 2
    if argv:
        print(conf)
        return 0
    server = find_redis_server()
    if server is None:
        print("flow: redis-server is not installed (Debian: apt-get install redis-server)",
              file=sys.stderr)
        return 2
    # The configuration comes on stdin ("-"): redis-server takes a file argument as a glob
    # pattern, and a run dir with "[" in its path would match nothing and start a server
    # with the defaults, on TCP port 6379 of every interface.
    args = [server, "-"]
    print(f"flow: exec {shlex.join(args)} < {shlex.quote(str(conf))}", file=sys.stderr, flush=True)
    fd = os.open(conf, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    # Replace this process, so supervisord signals redis-server directly.
    os.execv(server, args)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
