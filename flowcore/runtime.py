"""Process glue shared by every Flow process: settings at start, logging, signals."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from typing import Any, Coroutine

from .settings import Settings, SettingsError, load_settings


# Every Flow process logs lines of this shape (gunicorn's app log included).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"


# When start_process is given no role: the processes Flow ships, by the name they pass.
# Callers should say their role; this keeps a caller that does not yet from starting
# without its checks.
_ROLE_OF = {"websocket_server": "verifier", "websocket": "verifier", "message_proxy": "proxy", "proxy": "proxy"}

# File descriptors a WebSocket server needs beside its sockets: listening sockets, the
# engine's ZeroMQ sockets and their internals, log files, the interpreter's own.
FD_RESERVE = 256


def start_process(name: str, role: str | None = None) -> Settings:
    """Load settings once, run ``role``'s checks (Settings.check; e.g. "verifier" for a
    WebSocket server, "proxy" and "publisher" need none), configure logging, warn about
    unknown FLOW_ names and raise the open-file limit. A bad value or a role's missing
    key or secret exits with status 2 and one line on stderr."""
    role = role if role is not None else _ROLE_OF.get(name)
    try:
        settings = load_settings()
        settings.check(role)
    except SettingsError as exc:
        print(f"{name}: bad configuration: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    logging.basicConfig(
        level=settings.log_level,
        format=LOG_FORMAT,
        stream=sys.stderr,
    )
    log = logging.getLogger("flow.runtime")
    for line in settings.describe_unknown():
        log.warning("%s", line)
    limit = raise_open_file_limit()
    if limit is not None:
        log.info("open-file limit %d", limit)
        needed = fds_needed(settings, role)
        if limit < needed:
            log.warning(
                "open-file limit %d is below the %d this %s may need for FLOW_MAX_CONNECTIONS=%d: "
                "connections past it are refused; raise the hard limit (ulimit -Hn, systemd "
                "LimitNOFILE, supervisord minfds) or lower FLOW_MAX_CONNECTIONS",
                limit, needed, role, settings.max_connections,
            )
    return settings


def fds_needed(settings: Settings, role: str | None) -> int:
    """Open files a process of ``role`` may need at FLOW_MAX_CONNECTIONS: a WebSocket server
    one per client socket (the kernel may hand any one server most of them), others few."""
    if role == "verifier":
        return settings.max_connections + FD_RESERVE
    return 0


def raise_open_file_limit() -> int | None:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; the soft limit now in
    force (None where there is no such limit). Children inherit it."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        # Linux refuses a soft limit above fs.nr_open even when the hard one is unlimited.
        try:
            with open("/proc/sys/fs/nr_open") as handle:
                target = int(handle.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft if soft != resource.RLIM_INFINITY else target
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


def spawn(coro: Coroutine[Any, Any, None], tasks: "set[asyncio.Task[None]]", log: logging.Logger,
          what: str) -> None:
    """Run ``coro`` as a task kept in ``tasks`` until it ends; a failure is our bug: logged
    with its traceback as ``what`` failed."""
    task = asyncio.ensure_future(coro)
    tasks.add(task)

    def done(task: "asyncio.Task[None]") -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", what, exc_info=task.exception())

    task.add_done_callback(done)


class Throttled:
    """A warning logged at most once per ``interval`` seconds, with the count it stood for:
    bad input that arrives in floods (from an engine's far side) is one line, not one per item."""

    def __init__(self, logger: logging.Logger, text: str, interval: float = 30.0) -> None:
        self.logger = logger
        self.text = text
        self.interval = interval
        self.count = 0
        self.next_at = 0.0

    def warn(self, detail: object) -> None:
        self.count += 1
        now = time.monotonic()
        if now >= self.next_at:
            more = f" ({self.count - 1} more since the last warning)" if self.count > 1 else ""
            self.logger.warning("%s: %s%s", self.text, detail, more)
            self.count = 0
            self.next_at = now + self.interval


def freeze_startup() -> None:
    """Put everything built so far (modules, classes, settings, sockets, restored state)
    out of the cyclic collector's reach, once a process is up: its full collections then
    walk only what came later. A started proxy holds about 24,000 tracked objects, which
    a full collection took 4 to 9 ms to walk on a 2-core VM, a pause every message behind
    it waited through. Frozen objects are still freed when their last reference goes;
    only a cycle among them would stay, and these live as long as the process anyway."""
    gc.collect()
    gc.freeze()
