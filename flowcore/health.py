"""Health and metrics over plain HTTP for processes without a web server of their own
(PROTOCOL.md section 11: every process answers ``/healthz``, ``/readyz`` and ``/metrics``).

Standard library only: the proxy runs from the base install (no Tornado), and imports
:mod:`flowcore.metrics` (prometheus-client, the ``server`` extra) only when it renders
metrics. Also here, for publisher processes (the app): :class:`EngineProbe`, a cached
check that the publisher's engine answers, and :class:`SharedCounters`, which sums plain
counters over the worker processes of one pre-forked server (gunicorn's workers each count
their own pushes; a scrape reaches one of them).
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import secrets
import shutil
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable

from .cli import pid_alive
from .settings import Settings

log = logging.getLogger("flow.health")

# The content type prometheus-client's generate_latest writes (text format 0.0.4), which
# every Prometheus version reads; repeated here so that this module needs no import of it.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# What a problem function answers: None when ready, else the reason for the 503.
Problem = Callable[[], "str | None"]
Render = Callable[[], bytes]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "_HTTPServer"
    # Health checkers and scrapers hold no connection open between requests that matters.
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        owner = self.server.listener
        if path == "/healthz":
            self._answer(200, {"alive": True})
        elif path == "/readyz":
            problem = owner.problem()
            if problem:
                self._answer(503, {"ready": False, "reason": problem})
            else:
                self._answer(200, {"ready": True})
        elif path == "/metrics" and owner.render is not None:
            try:
                body = owner.render()
            except Exception:
                log.exception("rendering the metrics failed")
                self._answer(500, {"error": "rendering the metrics failed; see the log"})
                return
            self._send(200, body, METRICS_CONTENT_TYPE)
        else:
            self._answer(404, {"error": f"no such path {path[:100]!r} (try /healthz, /readyz, /metrics)"})

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Asked every few seconds by a load balancer and a scraper: not worth a line each.
        log.debug("%s " + format, self.address_string(), *args)


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    listener: "HealthListener"


class HealthListener:
    """``/healthz`` (200 while the process runs), ``/readyz`` (503 with the reason while
    ``problem()`` names one) and ``/metrics`` (``render()``; 404 when None) on a loopback
    port, served by a daemon thread: the caller's loop is never in the way of a check, so
    a stuck loop shows as a 503 (its ``problem`` says so) instead of a timeout."""

    def __init__(self, port: int, problem: Problem, render: Render | None, host: str = "127.0.0.1") -> None:
        self.problem = problem
        self.render = render
        # OSError (the port is taken) goes to the caller, which says which setting to change.
        self._server = _HTTPServer((host, port), _Handler)
        self._server.listener = self
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="flow-health", daemon=True)

    def start(self) -> "HealthListener":
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()


# ---------------------------------------------------------------- publishers' engine

PROBE_CACHE = 1.0  # seconds an answer is reused: /readyz may be asked many times a second
PROBE_TIMEOUT = 0.5


class EngineProbe:
    """Whether the engine a publisher pushes to answers, asked at most once per
    PROBE_CACHE seconds whatever the number of callers (threads share the answer). The
    ZeroMQ engine: the proxy answers a ping on its control socket (a proxy whose loop is
    stuck does not, though its kernel still accepts connections). Redis: PING. Safe
    after a fork: a child opens its own link."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        self._checked_at = -PROBE_CACHE
        self._answer: str | None = "not checked yet"
        self._pid = 0
        self._link: Any = None
        self._context: Any = None
        self._request = 0

    def problem(self) -> str | None:
        """None when the engine answered within PROBE_TIMEOUT at the last check, else why not."""
        with self._lock:
            now = self.clock()
            if now - self._checked_at >= PROBE_CACHE:
                self._answer = self._check()
                self._checked_at = self.clock()
            return self._answer

    def live(self) -> bool:
        return self.problem() is None

    def _check(self) -> str | None:
        if self._pid != os.getpid():
            # The parent's link is the parent's: never touched here (nor closed).
            self._pid, self._link, self._context = os.getpid(), None, None
        try:
            if self.settings.engine == "redis":
                return self._check_redis()
            return self._check_zmq()
        except Exception as exc:  # a check must answer, not raise
            self.close()
            return f"{type(exc).__name__}: {exc}"

    def _check_redis(self) -> str | None:
        import redis

        from .engines.redis import sync_client
        from .settings import redact_url

        if self._link is None:
            self._link = sync_client(self.settings.redis_address(), PROBE_TIMEOUT)
        try:
            self._link.ping()
        except (redis.RedisError, OSError) as exc:
            return f"Redis at {redact_url(self.settings.redis_address())} does not answer: {type(exc).__name__}"
        return None

    def _check_zmq(self) -> str | None:
        import zmq

        from . import protocol

        if self._link is None:
            self._context = zmq.Context()
            dealer = self._context.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            # Requests to a proxy that is away are not queued for it (each check asks anew);
            # a send waits for the connection, within the check's time.
            dealer.setsockopt(zmq.IMMEDIATE, 1)
            dealer.setsockopt(zmq.SNDTIMEO, int(PROBE_TIMEOUT * 1000))
            dealer.connect(self.settings.control_endpoint)
            self._link = dealer
        dealer = self._link
        self._request += 1
        wanted = self._request
        deadline = time.monotonic() + PROBE_TIMEOUT
        try:
            dealer.send_multipart([b"", protocol.build_ping_request(wanted)])
        except zmq.Again:
            return f"the proxy at {self.settings.control_endpoint} is not connected"
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not dealer.poll(max(1, int(left * 1000))):
                return f"the proxy at {self.settings.control_endpoint} did not answer a ping in {PROBE_TIMEOUT}s"
            frames = dealer.recv_multipart()
            try:
                request_id, _, _ = protocol.parse_history_reply(frames[1:])
            except protocol.ProtocolError:
                continue  # not an answer of ours
            if request_id == wanted:
                return None
            # an answer to an earlier check that came too late: read on

    def close(self) -> None:
        link, context = self._link, self._context
        self._link = self._context = None
        if link is None or self._pid != os.getpid():
            return
        try:
            if context is not None:  # ZeroMQ: the DEALER, then its context
                link.close(linger=0)
                context.term()
            else:  # redis-py
                link.close()
        except Exception:
            pass  # closing a link that is gone


# ---------------------------------------------------------------- pre-forked workers

SHARE_INTERVAL = 1.0
# Every SharedCounters of the process, for start_shared (gunicorn's post_worker_init).
_shared: "weakref.WeakSet[SharedCounters]" = weakref.WeakSet()


def start_shared() -> None:
    """Start the writer of every SharedCounters of this process: gunicorn calls it in each
    worker once the app is loaded (flowcore.gunicorn_conf), so that every worker's counts
    are in the sum from its start, not from the first scrape that reaches it."""
    for shared in list(_shared):
        shared.start()


class SharedCounters:
    """Plain counters summed over the worker processes of one pre-forked server.

    Each worker writes its own counters (``read()``) to a small file in ``directory``
    (``<group>/<pid>-<random>.json``) every SHARE_INTERVAL seconds and whenever it is
    scraped; :meth:`total` sums every file of the group. Files of workers that exited
    stay, so a total never goes down (a restarted worker would otherwise look like a
    counter reset to Prometheus); what a worker counted in its last second before dying
    is lost. ``group`` is the server's master (gunicorn's: the workers' parent); groups
    of masters that exited are removed."""

    def __init__(self, directory: Path, read: Callable[[], dict[str, float]], group: str | None = None) -> None:
        self.root = directory
        self.read = read
        self._group = group
        self._pid = 0
        self._name = ""
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        _shared.add(self)

    @property
    def directory(self) -> Path:
        return self.root / (self._group or f"master-{os.getppid()}")

    def _own(self) -> Path:
        if self._pid != os.getpid():
            # A forked child counts its own: a name of its own, and its own writer thread.
            self._pid, self._name, self._thread = os.getpid(), f"{os.getpid()}-{secrets.token_hex(4)}", None
        return self.directory / f"{self._name}.json"

    def write(self) -> None:
        with self._lock:
            path = self._own()
            data = json.dumps(self.read()).encode()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(data)
                os.replace(tmp, path)  # a reader sees the old file or the new one, whole
            except OSError as exc:
                log.warning("cannot write the shared counters to %s: %s", path, exc)

    def start(self) -> None:
        """The writer thread of this process (again in a forked child); idempotent."""
        self._own()
        if self._thread is not None:
            return
        thread = self._thread = threading.Thread(target=self._run, name="flow-shared-counters", daemon=True)
        thread.start()

    def _run(self) -> None:
        me = os.getpid()
        while self._pid == me:
            self.write()
            time.sleep(SHARE_INTERVAL)  # a daemon thread's pace, not a synchronisation

    def total(self) -> dict[str, float]:
        """Every worker's counters of this group, summed (this process's as of now)."""
        self.write()
        totals: dict[str, float] = {}
        directory = self.directory
        for path in sorted(directory.glob("*.json")):
            try:
                values = json.loads(path.read_bytes())
            except (OSError, ValueError):
                continue  # being replaced, or not ours
            if not isinstance(values, dict):
                continue
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    totals[key] = totals.get(key, 0) + value
        self._forget_old_groups(directory)
        return totals

    def _forget_old_groups(self, current: Path) -> None:
        try:
            siblings = list(self.root.iterdir())
        except OSError:
            return
        for sibling in siblings:
            pid = sibling.name.rpartition("-")[2]
            if sibling == current or not sibling.name.startswith("master-") or not pid.isdigit():
                continue
            if not pid_alive(int(pid)):
                shutil.rmtree(sibling, ignore_errors=True)
