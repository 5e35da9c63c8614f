"""Flow's benchmark: the real stack, on both engines, against a minimal reference relay.

    python bench/run.py                   # everything, issue-5 sizes (a few minutes)
    python bench/run.py --quick           # tiny sizes, seconds (the smoke test runs this)
    python bench/run.py --only W1,W4      # some workloads (W1 W1off W1nometrics W2 W3 W4 W5 PUSH SCALE)
    python bench/run.py --engines redis   # Flow on some engines (zmq, redis; default both)
    python bench/run.py --redis-persistence none   # the Redis engine's redis-server: none, aof
    python bench/run.py --json out.json   # also write every figure as JSON

Each run starts its own processes on ephemeral loopback ports (Redis: an owner-only Unix
socket in the run's directory) and stops them. Load clients are Node (`bench/client.js`,
the `ws` package: `npm ci` in bench/) when available, else Python (`bench/client.py`);
`--client` chooses. Publishing is a separate process (`bench/pusher.py`). Figures for
Flow are shown next to the reference relay's (`bench/reference_relay.py`) measured in the
same run, as ratios; the Redis engine's also as ratios to the ZeroMQ engine's. SCALE is
W1 on Redis with one host's pool against two hosts' pools (each its own WebSocket
servers and publisher) sharing the Redis. W5 is channels (PROTOCOL.md section 9), Flow
only (the reference has none): the clients, each granted one channel by its token's
`channels` claim and subscribed in its AUTH, get `flow.publish`es spread evenly over the
channels; its deliveries/s is shown against W2's broadcasts in the same run, per engine.
Anything Flow loses is a defect (for W5 also a seq gap, or a message of another channel):
the run says so loudly and exits 1.
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import json
import os
import platform
import queue
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from flowcore.nginx import find_nginx  # noqa: E402
from flowcore.settings import load_settings  # noqa: E402
from flowcore.tokens import issue_token  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from support import free_port, port_open, wait_until  # noqa: E402  (the tests' process helpers)

PYTHON = sys.executable
WORKLOADS = ("W1", "W1off", "W1nometrics", "W2", "W3", "W4", "W5", "PUSH", "SCALE")
ENGINES = ("zmq", "redis")
# The Redis engine's redis-server: without persistence, and as the stack ships it (an
# append-only file, every write fsynced before Redis answers).
PERSISTENCE = ("none", "aof")
# Redis's latency monitor records what took longer than this (milliseconds).
LATENCY_THRESHOLD_MS = 5
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Sizes:
    clients: int = 1000  # W1, W2, W4
    w1_count: int = 50_000
    w2_count: int = 200
    w3_clients: int = 5000
    w4_count: int = 50_000
    w4_rate: int = 3000
    # W4 runs in rounds that alternate the reference and Flow (ABBA...), both stacks up at
    # once: a tail percentile is what a noisy machine moves most, and drift over a run
    # then weighs on both alike instead of on whichever went second.
    w4_rounds: int = 4
    # SCALE: W1 with one host's pool and with two, in alternating rounds (one, two, two, one).
    scale_rounds: int = 4
    # W5: `clients` sockets, clients / w5_channels on each channel, w5_count publishes spread
    # evenly over the channels: as many deliveries as W2's (20,000 x 10 = 200 x 1000).
    w5_channels: int = 100
    w5_count: int = 20_000
    push_count: int = 50_000
    idle: float = 5.0  # a run ends when nothing arrived for this long...
    deadline: float = 180.0  # ...or at the latest this long after the pusher ends


QUICK = Sizes(clients=20, w1_count=1000, w2_count=10, w3_clients=100, w4_count=300,
              w4_rate=1000, push_count=5000, idle=2.0, deadline=30.0, scale_rounds=2,
              w5_channels=5, w5_count=500)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ processes


class Proc:
    """A child process logging to a file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(args, env=env, cwd=ROOT, stdout=self._log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> int | None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live children (nginx: the master and its workers)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        children.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return [pid, *children]


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a live process has used."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS
    except (OSError, IndexError):
        return 0.0


# ------------------------------------------------------------------ the two systems


class System:
    name = ""
    url = ""

    def __init__(self, workdir: Path, secret: str) -> None:
        self.workdir = workdir
        self.secret = secret
        self.procs: list[Proc] = []

    def server_pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def check_alive(self) -> None:
        for proc in self.procs:
            if not proc.alive():
                raise RuntimeError(f"{self.name}: {proc.log_path.name} exited "
                                   f"({proc.popen.returncode}):\n{proc.log()[-2000:]}")

    def stop(self) -> list[int | None]:
        return [proc.stop() for proc in reversed(self.procs)]

    def start(self) -> "System":
        raise NotImplementedError

    def pusher(self) -> dict[str, Any]:
        raise NotImplementedError

    def pushers(self) -> list[dict[str, Any]]:
        """One config per publishing process of a run (bench/pusher.py)."""
        return [self.pusher()]

    def redis_info(self, first: bool = True) -> dict[str, Any] | None:
        return None

    def engine_pid(self) -> int | None:
        """The proxy's or redis-server's pid: its CPU is reported apart too."""
        return None


class Reference(System):
    name = "reference"

    def start(self) -> "Reference":
        xsub, xpub = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        port = free_port()
        script = str(BENCH / "reference_relay.py")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.xsub = xsub
        self.procs.append(Proc([PYTHON, script, "proxy", "--xsub", xsub, "--xpub", xpub], env,
                               self.workdir / "ref-proxy.log"))
        self.procs.append(Proc([PYTHON, script, "server", "--port", str(port), "--xpub", xpub,
                                "--secret", self.secret], env, self.workdir / "ref-server.log"))
        self.url = f"ws://127.0.0.1:{port}/websocket"
        wait_until(lambda: port_open(port), 15, message="the reference server")
        self.check_alive()
        return self

    def pusher(self) -> dict[str, Any]:
        return {"kind": "ref", "endpoint": self.xsub}

    def engine_pid(self) -> int | None:
        return self.procs[0].pid if self.procs else None


class Flow(System):
    """The shipped stack: the engine's process (the ZeroMQ proxy, or a redis-server) and
    ``servers`` WebSocket servers sharing one port.

    ``engine="redis"``: a redis-server with the stack's own configuration
    (flowcore.redis_server: owner-only Unix socket, noeviction, a pub/sub output-buffer
    limit), with ``persistence="aof"`` exactly as shipped (every write fsynced) or
    ``"none"`` (the same without the append-only file). ``redis_of``: another "host" on
    the same Redis; this one starts only its WebSocket servers."""

    def __init__(self, workdir: Path, secret: str, servers: int = 2, engine: str = "zmq",
                 persistence: str = "none", redis_of: "Flow | None" = None, label: str = "",
                 **overrides: str) -> None:
        super().__init__(workdir, secret)
        self.engine = engine
        self.persistence = persistence if engine == "redis" else ""
        self.redis_of = redis_of
        base = [] if engine == "zmq" else [engine] + ([] if persistence == "none" else [persistence])
        base += [label] if label else []
        self.name = " ".join(["flow", *base, *(f"{k}={v}" for k, v in overrides.items())])
        self.servers = servers
        tag = "-".join([*base, *(f"{k}{v}" for k, v in overrides.items())]) or "default"
        self.logdir = workdir / f"flow-{tag}"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.flow_env = {
            "FLOW_ENV_FILE": str(workdir / "no-flow.env"),
            "FLOW_SECRET_FILE": str(workdir / "no-secret"),
            "FLOW_SECRET": secret,
            "FLOW_PUBLISH_ENDPOINT": f"tcp://127.0.0.1:{free_port()}",
            "FLOW_FANOUT_ENDPOINT": f"tcp://127.0.0.1:{free_port()}",
            "FLOW_CONTROL_ENDPOINT": f"tcp://127.0.0.1:{free_port()}",
            "FLOW_WS_PORT": str(free_port()),
            "FLOW_LOG_DIR": str(self.logdir),
            "FLOW_RUN_DIR": str(self.logdir / "run"),  # the proxy saves its state here at stop
            **overrides,
        }
        if engine == "redis":
            self.flow_env["FLOW_ENGINE"] = "redis"
            if redis_of is not None:
                self.flow_env["FLOW_REDIS_URL"] = redis_of.redis_url
        self.settings = load_settings(self.flow_env)
        # Unset FLOW_REDIS_URL: the stack's own server's socket, FLOW_RUN_DIR/redis.sock.
        self.redis_url: str = self.settings.redis_address() if engine == "redis" else ""
        self.engine_proc: Proc | None = None
        self.nginx: Proc | None = None

    def start(self) -> "Flow":
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOW_")}
        env.update(self.flow_env, PYTHONUNBUFFERED="1")
        if self.engine == "zmq":
            proxy = self.engine_proc = Proc([PYTHON, "message_proxy.py"], env, self.logdir / "proxy.log")
            self.procs.append(proxy)
            wait_until(lambda: "proxy up" in proxy.log(), 15, message="the Flow proxy")
        elif self.redis_of is None:
            self._start_redis(env)
        port = self.settings.ws_port
        first = len(self.procs)
        for i in range(self.servers):
            self.procs.append(Proc(self.server_command(i) + ["--port", str(port)], env,
                                   self.logdir / f"websocket-{i}.log"))
        for proc in self.procs[first:]:
            wait_until(lambda: "websocket server up" in proc.log(), 15, message=f"Flow {proc.log_path.name}")
        if self.engine == "redis":
            # Up is not ready: /readyz says 200 once the pub/sub link to Redis is live.
            wait_until(lambda: http_ok(port, "/readyz"), 15, message=f"{self.name} ready")
        self.url = f"ws://127.0.0.1:{port}/websocket"
        self.check_alive()
        return self

    def server_command(self, i: int) -> list[str]:
        """How WebSocket server ``i`` is started (bench/profile_redis.py runs it profiled)."""
        return [PYTHON, "websocket_server.py"]

    def _start_redis(self, env: dict[str, str]) -> Proc:
        """The stack's own redis.conf (flowcore.redis_server), persistence as asked."""
        from flowcore import redis_server

        conf = redis_server.render(self.settings)
        if self.persistence == "none":
            text = conf.read_text().replace("appendonly yes", "appendonly no")
            assert "appendonly no" in text, "the rendered redis.conf changed: update the bench"
            conf.write_text(text)
        binary = redis_server.find_redis_server(env)
        if binary is None:
            raise RuntimeError("redis-server is not installed (the Debian package redis-server)")
        proc = self.engine_proc = Proc([binary, str(conf)], env, self.logdir / "redis.log")
        self.procs.append(proc)  # stopped with the rest, whatever happens next
        sock = Path(self.redis_url[len("unix://"):])
        wait_until(lambda: (sock.exists() and "ready to accept connections" in proc.log().lower())
                   or not proc.alive(), 15, message="redis-server")
        if not proc.alive():
            raise RuntimeError(f"redis-server exited:\n{proc.log()[-2000:]}")
        # Redis's latency monitor (a bench-only setting, off as shipped) names what stalled
        # it: "aof-fsync-always" is the append-only file's fsync, "command" a slow script.
        import redis

        client = redis.Redis.from_url(self.redis_url, socket_timeout=10)
        try:
            client.config_set("latency-monitor-threshold", LATENCY_THRESHOLD_MS)
        finally:
            client.close()
        return proc

    def redis_info(self, first: bool = True) -> dict[str, Any] | None:
        """Redis's own counters (INFO commandstats, stats, cpu...), or None for ZeroMQ.
        The snapshot before a run (``first``) reads commandstats last, the one after
        reads it first: between the two, only one of the bench's INFO calls is counted."""
        if self.engine != "redis":
            return None
        import redis

        client = redis.Redis.from_url(self.redis_url, socket_timeout=10)
        sections = ["stats", "cpu", "memory", "persistence", "server", "clients", "commandstats"]
        try:
            info: dict[str, Any] = {}
            for section in (sections if first else sections[::-1]):
                info.update(client.info(section))
            if first:
                client.execute_command("LATENCY", "RESET")
            else:
                # [event, last time, last ms, max ms] for every event above the threshold
                info["latency_latest"] = {e[0].decode(): int(e[3]) for e in client.execute_command("LATENCY", "LATEST")}
            return info
        finally:
            client.close()

    def start_nginx(self) -> str | None:
        """The shipped nginx in front of the pool (rendered by flowcore.nginx, on an
        ephemeral port): the URL clients reach the pool through, or None without nginx."""
        if find_nginx() is None:
            return None
        http_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOW_")}
        # No app behind it: W3 only opens /websocket.
        env.update(self.flow_env, PYTHONUNBUFFERED="1", FLOW_HTTP_PORT=str(http_port),
                   FLOW_APP_PORT=str(free_port()))
        nginx = self.nginx = Proc([PYTHON, "-m", "flowcore.nginx"], env, self.logdir / "nginx.log")
        try:
            wait_until(lambda: port_open(http_port) or not nginx.alive(), 15, message="the shipped nginx")
        except AssertionError:
            pass
        if not (nginx.alive() and port_open(http_port)):
            log_text = nginx.log()[-2000:]
            self.stop_nginx()
            raise RuntimeError(f"{self.name}: nginx did not start:\n{log_text}")
        capacity = [line for line in nginx.log().splitlines() if "nginx capacity" in line]
        log(f"{self.name}: the shipped nginx on port {http_port} in front of the pool; "
            + (capacity[0] if capacity else "no capacity line"))
        return f"ws://127.0.0.1:{http_port}/websocket"

    def nginx_pids(self) -> list[int]:
        return process_tree(self.nginx.pid) if self.nginx and self.nginx.alive() else []

    def stop_nginx(self) -> int | None:
        nginx, self.nginx = self.nginx, None
        return nginx.stop() if nginx else None

    def check_alive(self) -> None:
        super().check_alive()
        if self.nginx and not self.nginx.alive():
            raise RuntimeError(f"{self.name}: nginx exited ({self.nginx.popen.returncode}):\n"
                               f"{self.nginx.log()[-2000:]}")

    def stop(self) -> list[int | None]:
        return [self.stop_nginx(), *super().stop()] if self.nginx else super().stop()

    def pusher(self) -> dict[str, Any]:
        return {"kind": "flow", "env": self.flow_env}

    def engine_pid(self) -> int | None:
        return self.engine_proc.pid if self.engine_proc else None


class Hosts(System):
    """Several "hosts" (Flow stacks, the first one owning the Redis) seen as one system:
    the processes of all, a pusher per host."""

    def __init__(self, hosts: list[Flow]) -> None:
        super().__init__(hosts[0].workdir, hosts[0].secret)
        self.hosts = hosts
        self.name = " + ".join(h.name for h in hosts)

    def server_pids(self) -> list[int]:
        return [pid for h in self.hosts for pid in h.server_pids()]

    def check_alive(self) -> None:
        for host in self.hosts:
            host.check_alive()

    def pushers(self) -> list[dict[str, Any]]:
        return [h.pusher() for h in self.hosts]

    def redis_info(self, first: bool = True) -> dict[str, Any] | None:
        return self.hosts[0].redis_info(first)

    def engine_pid(self) -> int | None:
        return self.hosts[0].engine_pid()

    def stop(self) -> list[int | None]:
        return [code for h in reversed(self.hosts) for code in h.stop()]


def http_ok(port: int, path: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


# ------------------------------------------------------------------ load clients


def node_client_available() -> bool:
    return bool(shutil.which("node")) and (BENCH / "node_modules" / "ws" / "package.json").is_file()


def install_node_client() -> bool:
    """`npm ci` in bench/ when node and npm exist but the modules do not (bounded)."""
    if node_client_available() or not (shutil.which("node") and shutil.which("npm")):
        return node_client_available()
    log("installing the Node load client's `ws` (npm ci in bench/)")
    try:
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=BENCH,
                       check=True, timeout=180, stdout=subprocess.DEVNULL)
    except (subprocess.SubprocessError, OSError) as exc:
        log(f"npm ci failed ({exc}); using the Python load client")
    return node_client_available()


class Clients:
    """``procs`` load-client processes holding one authenticated socket per token; with
    ``channels`` (one name per token), each socket subscribed to its channel in its AUTH."""

    def __init__(self, kind: str, url: str | list[str], tokens: list[str], procs: int, timeout: float,
                 channels: list[str] | None = None) -> None:
        command = ["node", "--expose-gc", str(BENCH / "client.js")] if kind == "node" \
            else [PYTHON, str(BENCH / "client.py")]
        # Several URLs (several hosts' pools): at least a process each, taking turns.
        urls = [url] if isinstance(url, str) else url
        procs = max(1, min(max(procs, len(urls)), len(tokens)))
        self.procs: list[subprocess.Popen] = []
        self.lines: list[queue.Queue] = []
        for i in range(procs):
            share = tokens[i::procs]
            popen = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1, start_new_session=True)
            lines: queue.Queue = queue.Queue()
            threading.Thread(target=self._read, args=(popen, lines), daemon=True).start()
            config: dict[str, Any] = {"url": urls[i % len(urls)], "tokens": share, "concurrency": 100,
                                      "timeout": timeout}
            if channels is not None:
                config["channels"] = channels[i::procs]
            self.procs.append(popen)
            self._send(len(self.procs) - 1, config)
            self.lines.append(lines)
        ready = [self._expect(i, "ready", timeout + 10) for i in range(procs)]
        self.authed = sum(r["authed"] for r in ready)
        self.failed = sum(r["failed"] for r in ready)
        self.subscribed = sum(r.get("subscribed", 0) for r in ready)
        self.connect_seconds = max(r["seconds"] for r in ready)

    @staticmethod
    def _read(popen: subprocess.Popen, lines: queue.Queue) -> None:
        assert popen.stdout is not None  # started with stdout=PIPE
        for line in popen.stdout:
            lines.put(line)
        lines.put(None)

    def _expect(self, i: int, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines[i].get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"load client {i} sent no {event!r} in {timeout}s") from None
            if line is None:
                raise RuntimeError(f"load client {i} exited ({self.procs[i].poll()}) before {event!r}")
            msg = json.loads(line)
            if msg.get("event") == event:
                return msg

    def _send(self, i: int, cmd: dict[str, Any]) -> None:
        stdin = self.procs[i].stdin
        assert stdin is not None  # started with stdin=PIPE
        stdin.write(json.dumps(cmd) + "\n")
        stdin.flush()

    def report(self, run: str, latencies: bool = False, ids: bool = False) -> dict[str, Any]:
        for i in range(len(self.procs)):
            self._send(i, {"cmd": "report", "run": run, "latencies": latencies, "ids": ids})
        parts = [self._expect(i, "report", 30) for i in range(len(self.procs))]
        firsts = [p["first"] for p in parts if p["first"]]
        total = {
            "received": sum(p["received"] for p in parts),
            "dups": sum(p["dups"] for p in parts),
            # W5: channel messages out of seq order on a socket, or of a channel it is not on.
            "gaps": sum(p.get("gaps", 0) for p in parts),
            "foreign": sum(p.get("foreign", 0) for p in parts),
            "first": min(firsts) if firsts else 0.0,
            "last": max(p["last"] for p in parts),
            "closed": sum(p["closed"] for p in parts),
            "codes": [p["codes"] for p in parts],
        }
        if latencies:
            total["lat"] = sorted(x for p in parts for x in p["lat"])
            total["stalls"] = stalls([pair for p in parts for pair in zip(p.get("at", ()), p["lat"])])
        if ids:
            total["ids"] = [x for p in parts for x in p["ids"]]
        return total

    def forget(self, run: str) -> None:
        """Drop ``run``'s figures in the clients and let them collect garbage: the next
        run starts from the same state, whatever the last one left behind."""
        for i in range(len(self.procs)):
            self._send(i, {"cmd": "forget", "run": run})
        for i in range(len(self.procs)):
            self._expect(i, "forgot", 30)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def close(self) -> None:
        for i, popen in enumerate(self.procs):
            try:
                self._send(i, {"cmd": "close"})
            except OSError:
                pass
        for popen in self.procs:
            try:
                popen.wait(10)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(5)
            for stream in (popen.stdin, popen.stdout):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


# ------------------------------------------------------------------ workloads


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = QUICK if args.quick else Sizes()
        self.secret = secrets.token_hex(32)
        self.workdir = Path(tempfile.mkdtemp(prefix="flow-bench-"))
        self.results: dict[str, dict[str, Any]] = {}
        self.token_settings = load_settings({"FLOW_SECRET": self.secret,
                                             "FLOW_ENV_FILE": str(self.workdir / "none"),
                                             "FLOW_SECRET_FILE": str(self.workdir / "none"),
                                             "FLOW_TOKEN_TTL": "7200"})
        self._tokens: list[str] = []
        # W5's tokens (each with a channels claim), for the channel names they were made for.
        self._channel_tokens: list[str] = []
        self._channel_key: tuple[str, ...] = ()
        self.load: list[dict[str, Any]] = []
        self.source: dict[str, Any] = {}

    def tokens(self, n: int) -> list[str]:
        while len(self._tokens) < n:
            self._tokens.append(issue_token(self.token_settings, f"user{len(self._tokens):05d}"))
        return self._tokens[:n]

    def channel_tokens(self, n: int, names: list[str]) -> tuple[list[str], list[str]]:
        """W5: tokens for the first ``n`` users, user k granted exactly channel k % len(names)
        by its ``channels`` claim (PROTOCOL.md section 9); and each one's channel."""
        channels = [names[k % len(names)] for k in range(n)]
        key = tuple(names)
        if self._channel_key != key or len(self._channel_tokens) < n:
            self._channel_key = key
            self._channel_tokens = [issue_token(self.token_settings, f"user{k:05d}", extra={"channels": [c]})
                                    for k, c in enumerate(channels)]
        return self._channel_tokens[:n], channels

    def clients(self, system: System, n: int, procs: int | None = None, url: str | None = None,
                channels: list[str] | None = None) -> Clients:
        """``n`` authenticated sockets; with ``channels`` (names), spread evenly over those
        channels, each granted and subscribed to its own."""
        tokens, per_socket = self.channel_tokens(n, channels) if channels else (self.tokens(n), None)
        clients = Clients(self.args.client, url or system.url, tokens, procs or self.args.client_procs,
                          timeout=max(30.0, n / 50), channels=per_socket)
        if clients.authed != n:
            raise RuntimeError(f"{system.name}: only {clients.authed} of {n} clients authenticated"
                               + (" and subscribed" if channels else "")
                               + f" ({clients.failed} failed); logs in {self.workdir}")
        if channels and clients.subscribed != n:
            raise RuntimeError(f"{system.name}: only {clients.subscribed} of {n} clients subscribed to their channel")
        return clients

    def cpu_snapshot(self, system: System, clients: Clients) -> dict[str, float]:
        engine = system.engine_pid()
        return {"servers": sum(cpu_of(p) for p in system.server_pids()),
                "engine": cpu_of(engine) if engine else 0.0,
                "clients": sum(cpu_of(p) for p in clients.pids())}

    def push_run(self, system: System, clients: Clients, run: str, count: int, users: int,
                 rate: int = 0, broadcast: bool = False, keep_latencies: bool = False,
                 user_offset: int = 0, channels: list[str] | None = None) -> dict[str, Any]:
        """Push ``count`` messages from separate processes (one per ``system.pushers()``,
        sharing the count and the rate); collect what the clients got. ``channels``: publish
        message i to channel i % len(channels), to clients spread evenly over them, so each
        message is owed to clients / len(channels) sockets."""
        if channels and clients.authed % len(channels):
            raise ValueError(f"{clients.authed} clients do not spread evenly over {len(channels)} channels")
        # Sockets each message is owed to.
        fanout = clients.authed if broadcast else clients.authed // len(channels) if channels else 1
        configs = system.pushers()
        n = len(configs)
        counts = [count // n + (1 if k < count % n else 0) for k in range(n)]
        offsets = [sum(counts[:k]) for k in range(n)]
        seed = hash(run) & 0xFFFF
        configs = [{**c, "run": run, "count": counts[k], "users": users, "rate": rate / n if rate else 0,
                    "broadcast": broadcast, "deadline": self.sizes.deadline, "seed": seed + k,
                    "user_offset": user_offset, "index_offset": offsets[k],
                    **({"channels": channels} if channels else {})} for k, c in enumerate(configs)]
        info0 = system.redis_info()
        cpu0 = self.cpu_snapshot(system, clients)
        popens = [subprocess.Popen([PYTHON, str(BENCH / "pusher.py"), json.dumps(c)], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for c in configs]
        parts = []
        try:
            for popen in popens:
                try:
                    stdout, stderr = popen.communicate(timeout=self.sizes.deadline + 30)
                except subprocess.TimeoutExpired:
                    raise RuntimeError(f"{system.name} {run}: the pusher did not finish in time") from None
                if popen.returncode != 0:
                    raise RuntimeError(f"{system.name} {run}: pusher failed:\n{stderr[-3000:]}")
                parts.append(json.loads(stdout.strip().splitlines()[-1]))
        finally:
            for popen in popens:
                if popen.poll() is None:
                    popen.kill()
                    popen.wait(5)
        pushed = {"sent": sum(p["sent"] for p in parts), "queue_full": sum(p["queue_full"] for p in parts),
                  "t_start": min(p["t_start"] for p in parts), "t_end": max(p["t_end"] for p in parts),
                  "cpu": sum(p["cpu"] for p in parts)}
        # Wait for deliveries: until all arrived, nothing arrived for `idle` s, or the deadline.
        deadline = time.monotonic() + self.sizes.deadline
        last_count, last_change = -1, time.monotonic()
        expected = count * fanout
        while True:
            got = clients.report(run)["received"]
            now = time.monotonic()
            if got >= expected or now > deadline:
                break
            if got != last_count:
                last_count, last_change = got, now
            elif now - last_change > self.sizes.idle:
                break
            time.sleep(0.1)
        final = clients.report(run, latencies=True, ids=not broadcast)
        cpu1 = self.cpu_snapshot(system, clients)
        info1 = system.redis_info(first=False)
        clients.forget(run)
        system.check_alive()
        lat = final.pop("lat")
        stalled = final.pop("stalls", None)
        # Which pushes did not reach every socket owed them (not for broadcasts): where in
        # the run the losses were.
        wanted = [i for off, p in zip(offsets, parts) for i in range(off, off + p["sent"])]
        got = collections.Counter(final.pop("ids", ()))
        missing = [] if broadcast else [i for i in wanted if got[i] < fanout]
        span = (final["last"] - pushed["t_start"]) if final["received"] else 0.0
        out = {
            "sent": pushed["sent"] * fanout,
            "pushed": pushed["sent"], "pushers": n, "expected": expected, "delivered": final["received"],
            "dups": final["dups"], "closed_sockets": final["closed"],
            "delivered_ratio": final["received"] / max(1, pushed["sent"] * fanout),
            "seq_gaps": final["gaps"], "foreign": final["foreign"],
            **({"channels": len(channels), "per_channel": fanout} if channels else {}),
            "push_seconds": pushed["t_end"] - pushed["t_start"], "queue_full": pushed["queue_full"],
            "span_seconds": span, "rate": final["received"] / span if span > 0 else 0.0,
            **latency_figures(lat),
            **({"stalls": stalled} if stalled is not None else {}),
            "missing": len(missing), "missing_first": missing[:20],
            "missing_deciles": [sum(1 for m in missing if m * 10 // max(1, pushed["sent"]) == d) for d in range(10)],
            "cpu_servers": cpu1["servers"] - cpu0["servers"], "cpu_engine": cpu1["engine"] - cpu0["engine"],
            "cpu_clients": cpu1["clients"] - cpu0["clients"], "cpu_pusher": pushed["cpu"],
            **({"lat": lat} if keep_latencies else {}),
        }
        if info0 is not None and info1 is not None:
            out["redis"] = redis_counts(info0, info1)
        return out

    def latency_rounds(self, systems: dict[str, System]) -> dict[str, dict[str, Any]]:
        """W4 for every system, in alternating rounds; figures from the pooled latencies."""
        s = self.sizes
        per_round = -(-s.w4_count // s.w4_rounds)
        clients = {}
        try:
            for key, system in systems.items():
                log(f"{system.name}: connecting {s.clients} clients")
                clients[key] = self.clients(system, s.clients)
            rounds: dict[str, list[dict[str, Any]]] = {key: [] for key in systems}
            order = list(systems)
            for r in range(s.w4_rounds):
                for key in (order if r % 2 == 0 else order[::-1]):
                    log(f"{systems[key].name}: W4 round {r + 1} of {s.w4_rounds}, "
                        f"{per_round} pushes paced at {s.w4_rate}/s")
                    rounds[key].append(self.push_run(systems[key], clients[key], f"W4r{r}", per_round,
                                                     s.clients, rate=s.w4_rate, keep_latencies=True))
        finally:
            for c in clients.values():
                c.close()
        return {key: pool_rounds(parts) for key, parts in rounds.items()}

    def memory(self, system: System) -> dict[str, Any]:
        """W3: RSS of every server process, before and with ``w3_clients`` idle sockets.
        Flow's clients connect through the shipped nginx, as in production; nginx's own
        RSS is reported apart, so the server figures compare with the reference's."""
        url = system.start_nginx() if isinstance(system, Flow) else None
        if isinstance(system, Flow) and url is None:
            log(f"{system.name}: nginx is not installed; W3 connects to the pool directly")
        try:
            return self._memory(system, url)
        finally:
            if isinstance(system, Flow):
                system.stop_nginx()

    def _memory(self, system: System, url: str | None) -> dict[str, Any]:
        nginx_pids = system.nginx_pids() if isinstance(system, Flow) else []
        warm = self.clients(system, 20, procs=1, url=url)  # first-connection imports and caches
        warm.close()
        time.sleep(1.0)
        pids = system.server_pids()
        before_each = [rss_kib(p) for p in pids]
        before = sum(before_each)
        nginx_before = sum(rss_kib(p) for p in nginx_pids)
        n = self.sizes.w3_clients
        t0 = time.monotonic()
        # clients() fails the run unless every one of the n sockets authenticated.
        clients = self.clients(system, n, url=url)
        connect = time.monotonic() - t0
        time.sleep(2.0)
        after_each = [rss_kib(p) for p in pids]
        after = sum(after_each)
        nginx_after = sum(rss_kib(p) for p in nginx_pids)
        failed = clients.failed
        clients.close()
        system.check_alive()
        out: dict[str, Any] = {
            "clients": n, "refused": failed, "rss_before_kib": before, "rss_after_kib": after,
            "kib_per_connection_each": {proc.log_path.stem: (a - b) / n for proc, a, b
                                        in zip(system.procs, after_each, before_each)},
            "kib_per_connection": (after - before) / n, "connect_seconds": connect,
        }
        if isinstance(system, Flow):
            out["through"] = "nginx" if url else "direct"
        if nginx_pids:
            out.update(nginx_processes=len(nginx_pids), nginx_rss_before_kib=nginx_before,
                       nginx_rss_after_kib=nginx_after,
                       nginx_kib_per_connection=(nginx_after - nginx_before) / n)
        return out

    def measure(self, system: System, wanted: set[str], pushcost: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        s = self.sizes
        if "W3" in wanted:
            log(f"{system.name}: W3, {s.w3_clients} idle clients")
            out["W3"] = self.memory(system)
        if wanted & {"W1", "W2"}:
            log(f"{system.name}: connecting {s.clients} clients")
            clients = self.clients(system, s.clients)
            try:
                if "W1" in wanted:
                    log(f"{system.name}: W1, {s.w1_count} pushes to random users, flood")
                    out["W1"] = self.push_run(system, clients, "W1", s.w1_count, s.clients)
                if "W2" in wanted:
                    log(f"{system.name}: W2, {s.w2_count} broadcasts to {s.clients} clients")
                    out["W2"] = self.push_run(system, clients, "W2", s.w2_count, s.clients, broadcast=True)
            finally:
                clients.close()
        if "W5" in wanted:
            names = [f"bench:{k:03d}" for k in range(s.w5_channels)]
            log(f"{system.name}: connecting {s.clients} clients, {s.clients // s.w5_channels} on each of "
                f"{s.w5_channels} channels")
            clients = self.clients(system, s.clients, channels=names)
            try:
                log(f"{system.name}: W5, {s.w5_count} publishes over {s.w5_channels} channels")
                out["W5"] = self.push_run(system, clients, "W5", s.w5_count, s.clients, channels=names)
            finally:
                clients.close()
        if pushcost:
            assert isinstance(system, Flow), "PUSH measures Flow's publisher"
            log(f"{system.name}: flow.push cost vs a raw send")
            config = {"kind": "pushcost", "env": system.flow_env, "count": s.push_count, "repeats": 5}
            done = subprocess.run([PYTHON, str(BENCH / "pusher.py"), json.dumps(config)], cwd=ROOT,
                                  capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"push cost run failed:\n{done.stderr[-3000:]}")
            out["PUSH"] = json.loads(done.stdout.strip().splitlines()[-1])
        return out

    def scale(self) -> dict[str, Any]:
        """SCALE: W1 on the Redis engine with one host's pool, then with two hosts' pools
        (each its own WebSocket servers and its own publisher process) on the same Redis.
        Both set-ups are up at once, each with its own users and clients, and take turns
        (one, two, two, one, ...) so that the machine's drift weighs on both."""
        s = self.sizes
        workdir = self.workdir / "scale"
        workdir.mkdir(exist_ok=True)
        host_a = Flow(workdir, self.secret, engine="redis", label="host-A")
        host_b = Flow(workdir, self.secret, engine="redis", redis_of=host_a, label="host-B")
        one, two = Hosts([host_a]), Hosts([host_a, host_b])
        clients: dict[str, Clients] = {}
        rounds: dict[str, list[dict[str, Any]]] = {"one_host": [], "two_hosts": []}
        try:
            host_a.start()
            host_b.start()
            n = s.clients
            tokens = self.tokens(2 * n)
            log(f"scale: {n} clients on host A's pool; {n} others spread over hosts A and B")
            clients["one_host"] = self.clients(one, n, url=host_a.url)
            split = Clients(self.args.client, [host_a.url, host_b.url], tokens[n:], max(2, self.args.client_procs),
                            timeout=max(30.0, n / 50))
            clients["two_hosts"] = split
            if split.authed != n:
                raise RuntimeError(f"scale: only {split.authed} of {n} clients authenticated")
            systems = {"one_host": (one, 0), "two_hosts": (two, n)}
            order = ["one_host", "two_hosts"]
            for r in range(s.scale_rounds // 2):
                for key in (order if r % 2 == 0 else order[::-1]):
                    system, offset = systems[key]
                    log(f"scale: {key.replace('_', ' ')}, round {r + 1}: {s.w1_count} pushes from "
                        f"{len(system.pushers())} publisher process(es), flood")
                    rounds[key].append(self.push_run(system, clients[key], f"S{key[0]}{r}", s.w1_count, n,
                                                     user_offset=offset, keep_latencies=True))
        finally:
            for c in clients.values():
                c.close()
            log(f"scale: stopped (exit codes {two.stop()})")
        return {key: pool_rounds(parts) for key, parts in rounds.items()}

    def run(self) -> int:
        wanted = set(self.args.only)
        engines, persistence = self.args.engines, self.args.redis_persistence
        redis_keys = {"none": "flow_redis", "aof": "flow_redis_aof"}
        plan: list[tuple[str, Callable[[], System], set[str], bool]] = []
        main = wanted & {"W1", "W2", "W3", "W4"}
        if main:
            plan.append(("reference", lambda: Reference(self.workdir, self.secret), main, False))
        # W5 (channels) is Flow's alone: the reference relay has none.
        main = main | (wanted & {"W5"})  # a new set: the reference's stays without it
        if "zmq" in engines and (main or "PUSH" in wanted):
            plan.append(("flow", lambda: Flow(self.workdir, self.secret), main, "PUSH" in wanted))
        if "zmq" in engines and "W1off" in wanted:
            plan.append(("flow_history_off", lambda: Flow(self.workdir, self.secret, FLOW_HISTORY_SIZE="0"),
                         {"W1"}, False))
        if "zmq" in engines and "W1nometrics" in wanted:
            # What the metrics cost (issue 14's target: under 10% of W1): the same stack
            # with FLOW_METRICS=0.
            plan.append(("flow_metrics_off", lambda: Flow(self.workdir, self.secret, FLOW_METRICS="0"),
                         {"W1"}, False))
        if "redis" in engines:
            for mode in persistence:
                # What fsync costs shows in the rates and the tail; memory per socket does not
                # depend on it, so the shipped configuration skips W3.
                work = main if mode == "none" else main & {"W1", "W2", "W4", "W5"}
                plan.append((redis_keys[mode], functools.partial(Flow, self.workdir, self.secret, engine="redis",
                                                                 persistence=mode), work, False))
        started = time.monotonic()
        self.source = source_digest()
        self.load.append(load_now("start"))
        for key, make, workloads, pushcost in plan:
            if not (workloads - {"W4"}) and not pushcost:
                continue
            system = make()
            try:
                system.start()
                self.results[key] = self.measure(system, workloads, pushcost)
            finally:
                codes = system.stop()
                log(f"{system.name}: stopped (exit codes {codes})")
        if "SCALE" in wanted and "redis" in engines:
            self.load.append(load_now("scale"))
            self.results["scale"] = self.scale()
        if "W4" in wanted:
            self.load.append(load_now("W4"))
            (self.workdir / "w4").mkdir(exist_ok=True)
            w4: dict[str, System] = {"reference": Reference(self.workdir / "w4", self.secret)}
            if "zmq" in engines:
                w4["flow"] = Flow(self.workdir / "w4", self.secret)
            if "redis" in engines:
                for mode in persistence:
                    w4[redis_keys[mode]] = Flow(self.workdir / "w4", self.secret, engine="redis", persistence=mode)
            try:
                for system in w4.values():
                    system.start()
                for key, result in self.latency_rounds(w4).items():
                    self.results.setdefault(key, {})["W4"] = result
            finally:
                for system in w4.values():
                    log(f"{system.name}: stopped (exit codes {system.stop()})")
        self.load.append(load_now("end"))
        self.results["meta"] = self.meta(time.monotonic() - started)
        print(render(self.results, self.args))
        if self.args.json:
            Path(self.args.json).write_text(json.dumps(self.results, indent=2) + "\n")
        lost = flow_losses(self.results)
        if lost:
            print("\n!!! FLOW LOST MESSAGES (a defect, not a figure): " + "; ".join(lost) +
                  f"\n!!! process logs kept in {self.workdir}", flush=True)
            return 1
        shutil.rmtree(self.workdir, ignore_errors=True)
        return 0

    def meta(self, seconds: float) -> dict[str, Any]:
        cpu = "?"
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip() \
            if shutil.which("node") else None
        return {"command": " ".join([os.path.relpath(PYTHON, ROOT) if PYTHON.startswith(str(ROOT)) else PYTHON,
                                     "bench/run.py", *sys.argv[1:]]),
                "quick": self.args.quick, "client": self.args.client, "client_procs": self.args.client_procs,
                "nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "node": node,
                "seconds": round(seconds, 1), "sizes": vars(self.sizes),
                "engines": self.args.engines, "redis_persistence": self.args.redis_persistence,
                "redis_server": redis_version(), "load": self.load, "source": self.source,
                "source_changed_during_run": source_digest()["flowcore_sha1"] != self.source["flowcore_sha1"]}


def source_digest() -> dict[str, Any]:
    """Which code was measured: the commit, and a digest of flowcore/ as it was on disk
    (a shared working tree changes under a run that takes minutes)."""
    digest = hashlib.sha1()
    for path in sorted((ROOT / "flowcore").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "flowcore"], cwd=ROOT, capture_output=True,
                           text=True)
    return {"commit": head.stdout.strip() or None, "flowcore_sha1": digest.hexdigest()[:12],
            "flowcore_modified": bool(dirty.stdout.strip())}


def redis_version() -> str | None:
    binary = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server")
                                             else None)
    if binary is None:
        return None
    done = subprocess.run([binary, "--version"], capture_output=True, text=True)
    return done.stdout.strip()


def redis_counts(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What Redis did between two INFO snapshots: commands by name (those scripts call
    included: Redis counts them in commandstats), client commands, CPU, bytes."""
    calls, usec = {}, {}
    for key, value in after.items():
        if key.startswith("cmdstat_"):
            name = key[len("cmdstat_"):]
            # Connection set-up is not Flow's work, nor the bench's INFO (one counted).
            if name.startswith("client") or name == "hello":
                continue
            n = value["calls"] - before.get(key, {}).get("calls", 0) - (1 if name == "info" else 0)
            if n:
                calls[name] = n
                # Time inside the command; a script's includes the commands it called.
                usec[name] = value["usec"] - before.get(key, {}).get("usec", 0)
    cpu = ("used_cpu_sys", "used_cpu_user")
    return {
        "calls": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
        "all_calls": sum(calls.values()),
        # Commands sent by clients that run a script (the publish script, the servers'
        # position and history reads); the rest of "all" ran inside them, or are probes.
        "script_calls": calls.get("evalsha", 0) + calls.get("eval", 0),
        "commands_processed": after["total_commands_processed"] - before["total_commands_processed"],
        "cpu_seconds": sum(after[k] for k in cpu) - sum(before[k] for k in cpu),
        "net_input_bytes": after["total_net_input_bytes"] - before["total_net_input_bytes"],
        "net_output_bytes": after["total_net_output_bytes"] - before["total_net_output_bytes"],
        "usec": dict(sorted(usec.items(), key=lambda kv: -kv[1])),
        "used_memory": after["used_memory"], "aof_enabled": after.get("aof_enabled"),
        "pubsub_channels": after.get("pubsub_channels"),
        # An append-only file rewrite (a fork) in the middle of a run shows in its tail.
        "forks": after.get("total_forks", 0) - before.get("total_forks", 0),
        "latest_fork_usec": after.get("latest_fork_usec"),
        "aof_current_size": after.get("aof_current_size"),
        # The longest stall of each kind Redis's latency monitor saw (ms; > LATENCY_THRESHOLD_MS).
        "latency_max_ms": after.get("latency_latest", {}),
    }


def load_now(when: str) -> dict[str, Any]:
    """The machine's load average at a point of the run: other work on a shared machine
    moves every figure."""
    one, five, fifteen = os.getloadavg()
    return {"at": when, "time": time.strftime("%H:%M:%S"), "load1": one, "load5": five, "load15": fifteen}


SLOW_MS = 1.0  # a message this late counts as slow ...
STALL_GAP_MS = 5.0  # ... and slow ones arriving closer than this together are one stall


def stalls(pairs: list[tuple[float, float]]) -> dict[str, Any]:
    """Where a run's tail came from, from (arrival ms, latency ms) pairs: slow messages
    come in runs, each a moment when some stage waited (for a core, a collection, a
    step of the loop). One long stall in one round can decide a pooled p99."""
    runs: list[list[float]] = []  # [last arrival, worst latency, count]
    for at, lat in sorted(pairs):
        if lat <= SLOW_MS:
            continue
        if runs and at - runs[-1][0] < STALL_GAP_MS:
            run = runs[-1]
            run[0], run[1], run[2] = at, max(run[1], lat), run[2] + 1
        else:
            runs.append([at, lat, 1])
    worst = sorted(runs, key=lambda r: -r[1])
    return {"slow": sum(int(r[2]) for r in runs), "stalls": len(runs),
            "longest_ms": round(worst[0][1], 2) if worst else 0.0,
            "worst": [[round(r[1], 2), int(r[2])] for r in worst[:5]]}


def latency_figures(lat: list[float]) -> dict[str, float | None]:
    """The percentiles every latency row reads, from sorted milliseconds."""
    return {"p50_ms": percentile(lat, 0.50), "p90_ms": percentile(lat, 0.90),
            "p99_ms": percentile(lat, 0.99), "p999_ms": percentile(lat, 0.999),
            "max_ms": lat[-1] if lat else None}


def pool_rounds(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One W4 result from its rounds: counts and CPU summed, percentiles of all latencies."""
    lat = sorted(x for p in parts for x in p.pop("lat"))
    summed = ("sent", "pushed", "expected", "delivered", "dups", "closed_sockets", "queue_full",
              "missing", "push_seconds", "span_seconds", "cpu_servers", "cpu_engine", "cpu_clients",
              "cpu_pusher")
    out: dict[str, Any] = {k: sum(p[k] for p in parts) for k in summed}
    out.update(
        pushers=parts[0]["pushers"] if parts else 0,
        delivered_ratio=out["delivered"] / max(1, out["sent"]),
        rate=out["delivered"] / out["span_seconds"] if out["span_seconds"] > 0 else 0.0,
        **latency_figures(lat),
        rounds=[{**{k: p[k] for k in ("delivered", "sent", "rate", "p50_ms", "p99_ms")},
                 **({"stalls": p["stalls"]} if "stalls" in p else {})} for p in parts],
    )
    if parts and all("redis" in p for p in parts):
        redis_parts = [p["redis"] for p in parts]
        calls: dict[str, int] = {}
        usec: dict[str, int] = {}
        for r in redis_parts:
            for name, n in r["calls"].items():
                calls[name] = calls.get(name, 0) + n
            for name, n in r.get("usec", {}).items():
                usec[name] = usec.get(name, 0) + n
        out["redis"] = {
            **{k: sum(r[k] for r in redis_parts) for k in ("all_calls", "script_calls", "commands_processed", "cpu_seconds",
                                                           "net_input_bytes", "net_output_bytes")},
            "calls": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
            "usec": dict(sorted(usec.items(), key=lambda kv: -kv[1])),
            "forks": sum(r.get("forks", 0) for r in redis_parts),
            "latency_max_ms": {e: max(r.get("latency_max_ms", {}).get(e, 0) for r in redis_parts)
                               for e in sorted({e for r in redis_parts for e in r.get("latency_max_ms", {})})},
            "latency_max_ms_by_round": [r.get("latency_max_ms", {}) for r in redis_parts],
            "forks_by_round": [r.get("forks", 0) for r in redis_parts],
            **{k: redis_parts[-1].get(k) for k in ("used_memory", "aof_enabled", "pubsub_channels",
                                                    "latest_fork_usec", "aof_current_size")},
        }
    return out


def flow_losses(results: dict[str, Any]) -> list[str]:
    lost = []
    for key in [k for k in results if k.startswith("flow") or k == "scale"]:
        for w, r in results.get(key, {}).items():
            if isinstance(r, dict) and "delivered" in r and (r["delivered"] < r["sent"] or r["dups"]
                                                              or r.get("seq_gaps") or r.get("foreign")):
                lost.append(f"{key} {w}: delivered {r['delivered']} of {r['sent']}, {r['dups']} duplicates"
                            + (f", {r['seq_gaps']} seq gaps" if r.get("seq_gaps") else "")
                            + (f", {r['foreign']} of another channel" if r.get("foreign") else ""))
    return lost


# ------------------------------------------------------------------ the table


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    ref, fl, off = results.get("reference", {}), results.get("flow", {}), results.get("flow_history_off", {})
    meta = results["meta"]
    rows: list[tuple[str, str, str, str, str, str]] = []

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def delivered(r: dict[str, Any] | None) -> str:
        if not r:
            return "-"
        text = f"{100 * r['delivered_ratio']:.2f}%"
        if r["delivered"] < r["sent"]:
            text += f" LOST {r['sent'] - r['delivered']}"
        if r["dups"]:
            text += f" DUP {r['dups']}"
        return text

    def ratio(a: float | None, b: float | None) -> str:
        return "-" if not a or not b else f"{a / b:.2f}x"

    def verdict(ok: bool | None) -> str:
        return "-" if ok is None else ("met" if ok else "NOT MET")

    def row(name: str, r: str, f: str, x: str = "", target: str = "", ok: bool | None = None) -> None:
        rows.append((name, r, f, x, target, verdict(ok) if target else ""))

    def per_msg(r: dict[str, Any] | None) -> float | None:
        # CPU of the proxy and WebSocket processes per delivery: steadier than wall time.
        return r["cpu_servers"] * 1e6 / r["delivered"] if r and r["delivered"] else None

    def get(d: dict[str, Any], w: str, k: str) -> float | None:
        return d.get(w, {}).get(k)

    if "W1" in ref or "W1" in fl:
        r1, f1 = ref.get("W1"), fl.get("W1")
        row("W1 delivered/sent", delivered(r1), delivered(f1), "", "flow 100%",
            None if not f1 else f1["delivered"] == f1["sent"] and not f1["dups"])
        rr, fr = get(ref, "W1", "rate"), get(fl, "W1", "rate")
        row("W1 msgs/s delivered", fmt(rr, ",.0f"), fmt(fr, ",.0f"), ratio(fr, rr), ">= 2.5x",
            None if not (rr and fr) else fr / rr >= 2.5)
        row("W1 p50 / p99 ms", f"{fmt(get(ref, 'W1', 'p50_ms'), '.1f')} / {fmt(get(ref, 'W1', 'p99_ms'), '.1f')}",
            f"{fmt(get(fl, 'W1', 'p50_ms'), '.1f')} / {fmt(get(fl, 'W1', 'p99_ms'), '.1f')}")
        row("W1 server CPU us/msg delivered", fmt(per_msg(r1), ".1f"), fmt(per_msg(f1), ".1f"),
            ratio(per_msg(f1), per_msg(r1)))
        row("W1 push calls/s (pusher)", fmt(r1 and r1["pushed"] / r1["push_seconds"], ",.0f"),
            fmt(f1 and f1["pushed"] / f1["push_seconds"], ",.0f"),
            f"QueueFull x{f1['queue_full']}" if f1 and f1["queue_full"] else "")
    if "W1" in off:
        o1 = off["W1"]
        fr = get(fl, "W1", "rate")
        row("W1 history off: delivered", "-", delivered(o1), "", "flow 100%", o1["delivered"] == o1["sent"])
        row("W1 history off: msgs/s", "-", fmt(o1["rate"], ",.0f"),
            f"on/off {ratio(fr, o1['rate'])}" if fr else "")
        row("W1 history off: server CPU us/msg", "-", fmt(per_msg(o1), ".1f"),
            f"on/off {ratio(per_msg(fl.get('W1')), per_msg(o1))}" if fl.get("W1") else "")
    nometrics = results.get("flow_metrics_off", {})
    if "W1" in nometrics:
        m1 = nometrics["W1"]
        fr = get(fl, "W1", "rate")
        on_cpu, off_cpu = per_msg(fl.get("W1")), per_msg(m1)
        row("W1 metrics off: delivered", "-", delivered(m1), "", "flow 100%", m1["delivered"] == m1["sent"])
        row("W1 metrics off: msgs/s", "-", fmt(m1["rate"], ",.0f"),
            f"on/off {ratio(fr, m1['rate'])}" if fr else "")
        row("W1 metrics off: server CPU us/msg", "-", fmt(off_cpu, ".1f"),
            f"on/off {ratio(on_cpu, off_cpu)}" if on_cpu else "", "on/off <= 1.10x",
            None if not (on_cpu and off_cpu) else on_cpu / off_cpu <= 1.10)
    if "W2" in ref or "W2" in fl:
        r2, f2 = ref.get("W2"), fl.get("W2")
        row("W2 delivered/sent", delivered(r2), delivered(f2), "", "flow 100%",
            None if not f2 else f2["delivered"] == f2["sent"] and not f2["dups"])
        rr, fr = get(ref, "W2", "rate"), get(fl, "W2", "rate")
        row("W2 deliveries/s", fmt(rr, ",.0f"), fmt(fr, ",.0f"), ratio(fr, rr), ">= 4x",
            None if not (rr and fr) else fr / rr >= 4)
        row("W2 server CPU us/delivery", fmt(per_msg(r2), ".2f"), fmt(per_msg(f2), ".2f"),
            ratio(per_msg(f2), per_msg(r2)))
    if "W3" in ref or "W3" in fl:
        rm, fm = get(ref, "W3", "kib_per_connection"), get(fl, "W3", "kib_per_connection")
        row(f"W3 KiB/connection ({(ref.get('W3') or fl.get('W3'))['clients']} idle)", fmt(rm, ".1f"),
            fmt(fm, ".1f"), ratio(fm, rm), "<= 1x", None if rm is None or fm is None else fm <= rm)
        f3 = fl.get("W3") or {}
        if f3.get("through") == "nginx":
            # Not in the row above: the reference has no nginx to compare it with.
            row(f"W3 nginx KiB/connection ({f3['nginx_processes']} processes, extra)", "-",
                fmt(f3.get("nginx_kib_per_connection"), ".1f"), f"refused {f3['refused']}")
        elif f3:
            row("W3 flow clients", "-", "direct (no nginx installed)")
    if "W4" in ref or "W4" in fl:
        r4, f4 = ref.get("W4"), fl.get("W4")
        row("W4 delivered/sent", delivered(r4), delivered(f4), "", "flow 100%",
            None if not f4 else f4["delivered"] == f4["sent"] and not f4["dups"])
        row("W4 p50 ms", fmt(get(ref, "W4", "p50_ms"), ".2f"), fmt(get(fl, "W4", "p50_ms"), ".2f"),
            ratio(get(fl, "W4", "p50_ms"), get(ref, "W4", "p50_ms")))
        row("W4 p90 ms", fmt(get(ref, "W4", "p90_ms"), ".2f"), fmt(get(fl, "W4", "p90_ms"), ".2f"),
            ratio(get(fl, "W4", "p90_ms"), get(ref, "W4", "p90_ms")))
        row("W4 p99.9 ms", fmt(get(ref, "W4", "p999_ms"), ".2f"), fmt(get(fl, "W4", "p999_ms"), ".2f"),
            ratio(get(fl, "W4", "p999_ms"), get(ref, "W4", "p999_ms")))
        row("W4 server CPU us/msg", fmt(per_msg(r4), ".1f"), fmt(per_msg(f4), ".1f"),
            ratio(per_msg(f4), per_msg(r4)))
        rp, fp = get(ref, "W4", "p99_ms"), get(fl, "W4", "p99_ms")
        row("W4 p99 ms", fmt(rp, ".2f"), fmt(fp, ".2f"), ratio(fp, rp), "<= ref, < 5 ms",
            None if rp is None or fp is None else fp <= rp and fp < 5)
        if r4 and f4 and r4.get("rounds") and f4.get("rounds"):
            by_round = [f["p99_ms"] / r["p99_ms"] for r, f in zip(r4["rounds"], f4["rounds"])
                        if f["p99_ms"] and r["p99_ms"]]
            row("W4 p99 ratio, round by round", "", "", " ".join(f"{x:.2f}" for x in by_round))
            if all("stalls" in x for x in r4["rounds"] + f4["rounds"]):
                def longest(rounds: list[dict[str, Any]]) -> str:
                    return " ".join(f"{x['stalls']['longest_ms']:.1f}" for x in rounds)

                row("W4 longest stall ms, by round", longest(r4["rounds"]), longest(f4["rounds"]))
    if "PUSH" in fl:
        p = fl["PUSH"]
        row("flow.push us/call (raw send | flow)", fmt(p["raw_send"] * 1e6, ".2f"),
            fmt(p["flow_push"] * 1e6, ".2f"), ratio(p["flow_push"], p["raw_send"]), "<= 3x",
            p["flow_push"] <= 3 * p["raw_send"])

    header = ("measure", "reference", "flow", "ratio", "target", "")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(6)]
    lines = [
        f"Flow benchmark: {meta['nproc']} cores ({meta['cpu']}), Python {meta['python']}, "
        f"clients: {meta['client']} x{meta['client_procs']}, {meta['seconds']} s"
        + (", QUICK sizes (smoke test, not figures)" if meta["quick"] else ""),
    ]
    if rows:  # none with only Flow-alone workloads (W5, SCALE)
        lines += ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), "  ".join("-" * w for w in widths),
                  *("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)]
    # CPU seconds spent per workload: where the time goes (the servers include the proxy).
    cpu_rows = []
    for key, label in (("reference", "reference"), ("flow", "flow"), ("flow_history_off", "flow, history off"),
                       ("flow_metrics_off", "flow, metrics off")):
        for w in ("W1", "W2", "W4", "W5"):
            r = results.get(key, {}).get(w)
            if r:
                cpu_rows.append(f"  {w} {label}: servers {r['cpu_servers']:.1f}, clients {r['cpu_clients']:.1f}, "
                                f"pusher {r['cpu_pusher']:.1f} CPU s over {r['span_seconds']:.1f} s")
    if cpu_rows:
        lines += ["", "CPU seconds (servers = proxy + WebSocket processes):", *cpu_rows]
    redis_lines = render_redis(results)
    if redis_lines:
        lines += ["", *redis_lines]
    w5_lines = render_w5(results)
    if w5_lines:
        lines += ["", *w5_lines]
    load = meta.get("load") or []
    if load:
        lines += ["", "load average (1 min) at " + ", ".join(f"{x['at']} {x['load1']:.2f}" for x in load)]
    src = meta.get("source") or {}
    if src:
        lines.append(f"code: commit {src.get('commit')}, flowcore/ digest {src.get('flowcore_sha1')}"
                     + (" (uncommitted changes)" if src.get("flowcore_modified") else "")
                     + (" - CHANGED DURING THE RUN" if meta.get("source_changed_during_run") else ""))
    return "\n".join(lines)


def table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(len(header))]
    return ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
            "  ".join("-" * w for w in widths),
            *("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)]


def render_w5(results: dict[str, Any]) -> list[str]:
    """W5 (channel publishes) against W2 (broadcasts) on the same engine in the same run:
    the same number of deliveries, one message per 10 sockets instead of one per 1000."""
    engines = (("flow", "zmq"), ("flow_redis", "redis"), ("flow_redis_aof", "redis aof"))
    rows: list[tuple[str, ...]] = []
    w5s = [(label, results[key]) for key, label in engines if "W5" in results.get(key, {})]
    if not w5s:
        return []

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def per_delivery(r: dict[str, Any] | None, key: str) -> float | None:
        return r[key] * 1e6 / r["delivered"] if r and r.get("delivered") else None

    for label, res in w5s:
        w5, w2 = res["W5"], res.get("W2")
        ratio = w5["rate"] / w2["rate"] if w2 and w2.get("rate") and w5.get("rate") else None
        text = f"{100 * w5['delivered_ratio']:.2f}%"
        if w5["delivered"] < w5["sent"]:
            text += f" LOST {w5['sent'] - w5['delivered']}"
        for key, what in (("dups", "DUP"), ("seq_gaps", "GAPS"), ("foreign", "FOREIGN")):
            if w5.get(key):
                text += f" {what} {w5[key]}"
        rows.append((label, fmt(w2 and w2["rate"], ",.0f"), fmt(w5["rate"], ",.0f"), fmt(ratio, ".2f"),
                     ">= 0.50", "-" if ratio is None else "met" if ratio >= 0.5 else "NOT MET", text,
                     f"{fmt(per_delivery(w2, 'cpu_servers'), '.2f')} / {fmt(per_delivery(w5, 'cpu_servers'), '.2f')}",
                     fmt(per_delivery(w5, "cpu_engine"), ".2f"),
                     fmt(w5["pushed"] / w5["push_seconds"] if w5.get("push_seconds") else None, ",.0f")))
    first = w5s[0][1]["W5"]
    return [f"W5: {first['pushed']:,} flow.publish calls over {first['channels']} channels, "
            f"{first['per_channel']} sockets each, against W2's broadcasts (deliveries/s, same run, same engine):",
            *table(("engine", "W2 deliveries/s", "W5 deliveries/s", "W5/W2", "target", "",
                    "W5 delivered/sent", "server CPU us/delivery W2 / W5", "W5 of which engine", "W5 publish/s"),
                   rows)]


def render_redis(results: dict[str, Any]) -> list[str]:
    """The Redis engine's figures: against the reference, and against the ZeroMQ engine
    of the same run (the issue's targets are against ZeroMQ); then SCALE."""
    ref, zmq_ = results.get("reference", {}), results.get("flow", {})
    red, aof = results.get("flow_redis", {}), results.get("flow_redis_aof", {})
    scale = results.get("scale")
    if not (red or aof or scale):
        return []
    rows: list[tuple[str, ...]] = []

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def ratio(a: float | None, b: float | None) -> str:
        return "-" if not a or not b else f"{a / b:.2f}x"

    def get(d: dict[str, Any], w: str, k: str) -> Any:
        return (d.get(w) or {}).get(k)

    def delivered(r: dict[str, Any] | None) -> str:
        if not r:
            return "-"
        text = f"{100 * r['delivered_ratio']:.2f}%"
        if r["delivered"] < r["sent"]:
            text += f" LOST {r['sent'] - r['delivered']}"
        if r["dups"]:
            text += f" DUP {r['dups']}"
        return text

    def complete(r: dict[str, Any] | None) -> bool | None:
        return None if not r else r["delivered"] == r["sent"] and not r["dups"]

    def verdicts(**oks: bool | None) -> str:
        return ", ".join(f"{k}: {'met' if ok else 'NOT MET'}" for k, ok in oks.items() if ok is not None)

    def per_msg(r: dict[str, Any] | None, key: str = "cpu_servers") -> float | None:
        return r[key] * 1e6 / r["delivered"] if r and r.get("delivered") else None

    def ops(r: dict[str, Any] | None, key: str) -> float | None:
        return r["redis"][key] / r["delivered"] if r and r.get("redis") and r.get("delivered") else None

    def row(name: str, f: Callable[[dict[str, Any] | None], str], w: str, vs: bool = True,
            value: Callable[[dict[str, Any] | None], float | None] | None = None, target: str = "",
            ok: str = "") -> None:
        r, z, n, a = ref.get(w), zmq_.get(w), red.get(w), aof.get(w)
        v = value or (lambda _: None)
        rows.append((name, f(r), f(z), f(n), ratio(v(n), v(r)) if vs else "", ratio(v(n), v(z)) if vs else "",
                     f(a), ratio(v(a), v(z)) if vs else "", target, ok))

    def num(key: str, spec: str) -> tuple[Callable[[Any], str], Callable[[Any], float | None]]:
        return (lambda r: fmt(r and r.get(key), spec)), (lambda r: r and r.get(key))

    def cpu(key: str) -> tuple[Callable[[Any], str], Callable[[Any], float | None]]:
        return (lambda r: fmt(per_msg(r, key), ".1f")), (lambda r: per_msg(r, key))

    def stalls(r: dict[str, Any] | None) -> str:
        if not (r and r.get("redis")):
            return "-"
        events = r["redis"].get("latency_max_ms") or {}
        return " ".join(f"{e} {ms}" for e, ms in events.items()) or "none"

    if "W1" in red or "W1" in aof:
        row("W1 delivered/sent", delivered, "W1", vs=False, target="100%",
            ok=verdicts(redis=complete(red.get("W1")), aof=complete(aof.get("W1"))))
        f, v = num("rate", ",.0f")
        zr = get(zmq_, "W1", "rate")
        row("W1 msgs/s delivered", f, "W1", value=v, target=">= 0.5x zmq",
            ok=verdicts(redis=None if not (zr and red.get("W1")) else red["W1"]["rate"] >= zr / 2,
                        aof=None if not (zr and aof.get("W1")) else aof["W1"]["rate"] >= zr / 2))
        row("W1 p50 / p99 ms", lambda r: "-" if not r else f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}", "W1", vs=False)
        f, v = cpu("cpu_servers")
        row("W1 server CPU us/msg (all)", f, "W1", value=v)
        f, v = cpu("cpu_engine")
        row("W1 of which proxy/redis-server", f, "W1", value=v)
        row("W1 push calls/s (pusher)", lambda r: fmt(r["pushed"] / r["push_seconds"] if r else None, ",.0f"),
            "W1", vs=False)
        row(f"W1 Redis stalls > {LATENCY_THRESHOLD_MS} ms (max ms)", stalls, "W1", vs=False)
        row("W1 Redis commands/msg (all | scripts)",
            lambda r: "-" if not (r and r.get("redis")) else f"{ops(r, 'all_calls'):.2f} | {ops(r, 'script_calls'):.3f}",
            "W1", vs=False)
    if "W2" in red or "W2" in aof:
        row("W2 delivered/sent", delivered, "W2", vs=False, target="100%",
            ok=verdicts(redis=complete(red.get("W2")), aof=complete(aof.get("W2"))))
        f, v = num("rate", ",.0f")
        row("W2 deliveries/s", f, "W2", value=v)
        f, v = cpu("cpu_servers")
        row("W2 server CPU us/delivery", lambda r: fmt(per_msg(r), ".2f"), "W2", value=v)
    if "W3" in red:
        f, v = num("kib_per_connection", ".1f")
        row(f"W3 KiB/connection ({red['W3']['clients']} idle)", f, "W3", value=v)
        each = red["W3"].get("kib_per_connection_each", {})
        rows.append(("W3 of which redis-server", "-", "-", fmt(each.get("redis"), ".2f"), "", "", "-", "", "", ""))
    if "W4" in red or "W4" in aof:
        row("W4 delivered/sent", delivered, "W4", vs=False, target="100%",
            ok=verdicts(redis=complete(red.get("W4")), aof=complete(aof.get("W4"))))
        for key, label in (("p50_ms", "p50"), ("p90_ms", "p90")):
            f, v = num(key, ".2f")
            row(f"W4 {label} ms", f, "W4", value=v)
        f, v = num("p99_ms", ".2f")
        row(f"W4 p99 ms", f, "W4", value=v, target="< 10 ms",
            ok=verdicts(redis=None if not red.get("W4") else red["W4"]["p99_ms"] < 10,
                        aof=None if not aof.get("W4") else aof["W4"]["p99_ms"] < 10))
        f, v = num("p999_ms", ".2f")
        row("W4 p99.9 ms", f, "W4", value=v)
        f, v = cpu("cpu_servers")
        row("W4 server CPU us/msg (all)", f, "W4", value=v)
        f, v = cpu("cpu_engine")
        row("W4 of which proxy/redis-server", f, "W4", value=v)
        row("W4 Redis commands/msg (all | scripts)",
            lambda r: "-" if not (r and r.get("redis")) else f"{ops(r, 'all_calls'):.2f} | {ops(r, 'script_calls'):.3f}",
            "W4", vs=False)
        row("W4 p99 ms, round by round", lambda r: "-" if not r else " ".join(f"{x['p99_ms']:.1f}" for x in r["rounds"]),
            "W4", vs=False)
        row(f"W4 Redis stalls > {LATENCY_THRESHOLD_MS} ms (max ms)", stalls, "W4", vs=False)
    lines = ["Redis engine (redis: redis-server without persistence; aof: as shipped, appendfsync everysec):",
             *table(("measure", "reference", "zmq", "redis", "vs ref", "vs zmq", "redis aof", "aof vs zmq",
                     "target", ""), rows)]
    if scale:
        one, two = scale["one_host"], scale["two_hosts"]
        srows = [
            ("delivered/sent", delivered(one), delivered(two), "", "100%",
             verdicts(one=complete(one), two=complete(two))),
            ("msgs/s delivered", fmt(one["rate"], ",.0f"), fmt(two["rate"], ",.0f"), ratio(two["rate"], one["rate"]),
             "", ""),
            ("msgs/s, round by round", " ".join(f"{x['rate']:,.0f}" for x in one["rounds"]),
             " ".join(f"{x['rate']:,.0f}" for x in two["rounds"]), "", "", ""),
            ("p50 / p99 ms", f"{one['p50_ms']:.1f} / {one['p99_ms']:.1f}", f"{two['p50_ms']:.1f} / {two['p99_ms']:.1f}",
             "", "", ""),
            ("server CPU us/msg (all)", fmt(per_msg(one), ".1f"), fmt(per_msg(two), ".1f"),
             ratio(per_msg(two), per_msg(one)), "", ""),
            ("of which redis-server", fmt(per_msg(one, "cpu_engine"), ".1f"), fmt(per_msg(two, "cpu_engine"), ".1f"),
             ratio(per_msg(two, "cpu_engine"), per_msg(one, "cpu_engine")), "", ""),
            ("pusher CPU us/msg", fmt(per_msg(one, "cpu_pusher"), ".1f"), fmt(per_msg(two, "cpu_pusher"), ".1f"),
             ratio(per_msg(two, "cpu_pusher"), per_msg(one, "cpu_pusher")), "", ""),
        ]
        lines += ["", "SCALE: W1 on one Redis (no persistence), one host's pool (2 WebSocket servers, 1 publisher) "
                      "against two hosts' (2 + 2 servers, 2 publishers):",
                  *table(("measure", "one host", "two hosts", "ratio", "target", ""), srows)]
    cpu_rows = []
    for key, label in (("flow_redis", "redis"), ("flow_redis_aof", "redis aof")):
        for w in ("W1", "W2", "W4", "W5"):
            r = results.get(key, {}).get(w)
            if r:
                cpu_rows.append(f"  {w} {label}: servers {r['cpu_servers']:.1f} (redis-server {r['cpu_engine']:.1f}), "
                                f"clients {r['cpu_clients']:.1f}, pusher {r['cpu_pusher']:.1f} CPU s "
                                f"over {r['span_seconds']:.1f} s")
    if cpu_rows:
        lines += ["", "CPU seconds (servers = redis-server + WebSocket processes):", *cpu_rows]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Flow benchmark against a minimal reference relay")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the bench works, in seconds")
    parser.add_argument("--only", type=lambda s: [w.strip() for w in s.split(",") if w.strip()],
                        default=list(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    parser.add_argument("--json", help="also write all results to this file")
    parser.add_argument("--engines", type=lambda s: [e.strip() for e in s.split(",") if e.strip()],
                        default=list(ENGINES), help=f"comma-separated engines to run Flow on (default: {','.join(ENGINES)})")
    parser.add_argument("--redis-persistence", type=lambda s: [e.strip() for e in s.split(",") if e.strip()],
                        default=list(PERSISTENCE),
                        help="the Redis engine's redis-server: none (no persistence: W1-W5), aof (as shipped, "
                             "appendfsync everysec: W1, W2, W4, W5); default none,aof")
    parser.add_argument("--client", choices=("auto", "node", "python"), default="auto",
                        help="load client: Node's ws (bench/client.js) or plain Python (default: node if installed)")
    parser.add_argument("--client-procs", type=int, default=0, help="load-client processes (default: node 1, python 2)")
    parser.add_argument("--no-install", action="store_true", help="never run npm ci for the Node client")
    args = parser.parse_args(argv)
    unknown = set(args.only) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(sorted(unknown))}; choose from {', '.join(WORKLOADS)}")
    if set(args.engines) - set(ENGINES) or not args.engines:
        parser.error(f"--engines: choose from {', '.join(ENGINES)}")
    if set(args.redis_persistence) - set(PERSISTENCE) or not args.redis_persistence:
        parser.error(f"--redis-persistence: choose from {', '.join(PERSISTENCE)}")
    if args.client in ("auto", "node"):
        have = node_client_available() if args.no_install else install_node_client()
        if args.client == "node" and not have:
            parser.error("--client node: needs node and bench/node_modules/ws (cd bench && npm ci)")
        args.client = "node" if have else "python"
    if not args.client_procs:
        args.client_procs = 1 if args.client == "node" else 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * (QUICK if args.quick else Sizes()).w3_clients + 1024
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard) if hard != resource.RLIM_INFINITY else want, hard))
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
