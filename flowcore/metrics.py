"""Prometheus metrics of every Flow process (PROTOCOL.md section 11: ``GET /metrics``).

Nothing here runs per message. The work keeps plain int counters where it happens
(:class:`flowcore.hub.Hub`, :class:`flowcore.server.Server`, :class:`flowcore.proxy.Proxy`,
``flow.Flow``), and the collectors below read them, and compute every gauge from the live
state, at scrape time: a gauge is never incremented and decremented, so a socket that
vanished without a close (a killed client, a cut network) leaves no count behind once the
server has noticed it gone. The one measurement on the delivery path is the lag histogram
(:class:`LagHistogram`): one observation per engine batch, two clock reads each, and none
with ``FLOW_METRICS=0``.

No metric has a username or a channel label: their number is unbounded (a Prometheus
series each), and they are personal data. Counts only.

Metric names, by process (all start with ``flow_``; ``process_*`` are prometheus-client's
CPU, memory and open-file figures of the process, not given for the app's workers):

- every process: ``flow_build_info{version,engine,role}``, ``flow_engine_up``;
- a WebSocket server: ``flow_connections{state}``, ``flow_users``, ``flow_channels``,
  ``flow_channel_subscriptions``, ``flow_connections_opened_total``,
  ``flow_auth_total{result}``, ``flow_closes_total{code,by}``,
  ``flow_messages_sent_total{kind}``, ``flow_bytes_sent_total{kind}``,
  ``flow_resumes_total{kind,result}``, ``flow_delivery_lag_seconds``,
  ``flow_upstream_messages_total``, ``flow_repairs_total``, ``flow_gap_closes_total``,
  ``flow_draining``;
- the proxy: ``flow_proxy_numbered_total``, ``flow_proxy_dropped_total{reason}``,
  ``flow_proxy_flushes_total``, ``flow_proxy_streams``, ``flow_proxy_subscribed_streams``,
  ``flow_proxy_history_messages``, ``flow_proxy_history_bytes``, ``flow_draining``;
- a publisher (the app): ``flow_publishes_total{kind}``,
  ``flow_publish_rejections_total{reason}``.
"""

from __future__ import annotations

import bisect
import functools
import importlib.metadata
import re
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from . import protocol
from .health import METRICS_CONTENT_TYPE
from .settings import PROJECT_ROOT, running_from_checkout

if TYPE_CHECKING:
    from .proxy import Proxy
    from .server import Server

CONTENT_TYPE = METRICS_CONTENT_TYPE

# Upper bounds (seconds) of the delivery lag buckets: a healthy server writes a batch in
# well under a millisecond; tens of milliseconds is a loaded loop, a second a stalled one.
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# Close codes a label may carry; a client may send any code from 1000 to 4999, which
# would make a series each: the ones Flow does not know are counted as "other".
KNOWN_CLOSE_CODES = frozenset({
    1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
    protocol.CLOSE_AUTH_FAILED, protocol.CLOSE_AUTH_TIMEOUT, protocol.CLOSE_TOKEN_EXPIRED,
    protocol.CLOSE_DISCONNECTED, protocol.CLOSE_SLOW_CONSUMER, protocol.CLOSE_RATE_LIMITED,
})

# The stream kinds of flow_messages_sent_total and flow_bytes_sent_total.
KINDS = ("user", "broadcast", "channel")
# Why the proxy dropped what a local process sent it (its WarningLimiter's kinds).
PROXY_DROP_REASONS = ("push", "subscription", "control", "flush", "expired", "receipt")
PUBLISH_KINDS = ("user", "broadcast", "channel", "command")
REJECT_REASONS = ("invalid", "queue_full", "closed")

# Past this many messages of history, the proxy's history bytes are estimated from a
# sample of its streams: an exact sum over ten million frames would hold the GIL (and so
# the proxy's loop) for about a second every scrape.
HISTORY_EXACT_LIMIT = 1_000_000


def close_label(code: int | None) -> str:
    """The ``code`` label of a close: the number, 1005 for none, "other" past the known."""
    if code is None:
        return "1005"
    return str(code) if code in KNOWN_CLOSE_CODES else "other"


def stream_kind(stream: str) -> int:
    """Index into KINDS of a stream name."""
    if stream == protocol.BROADCAST:
        return 1
    return 2 if protocol.is_channel_stream(stream) else 0


class LagHistogram:
    """Bucket counts kept as plain ints; observed once per engine batch (not per message),
    read by a collector at scrape time."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Iterable[float] = LAG_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le is inclusive).
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts):
            total += count
            cumulative.append((bound, float(total)))
        return HistogramMetricFamily(name, documentation, buckets=cumulative, sum_value=self.sum)


@functools.lru_cache(maxsize=1)
def version() -> str:
    """Flow's version: the checkout's pyproject.toml, else the installed package's."""
    if running_from_checkout():
        try:
            text = (PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8")
        except OSError:
            text = ""
        match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
        if match:
            return match.group(1)
    try:
        return importlib.metadata.version("flow-push")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _labelled(family: CounterMetricFamily | GaugeMetricFamily, values: Mapping[tuple[str, ...], float]
              ) -> CounterMetricFamily | GaugeMetricFamily:
    for labels, value in values.items():
        family.add_metric(list(labels), value)
    return family


class _Build:
    def __init__(self, role: str, engine: str) -> None:
        self.role = role
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("flow_build_info", "Flow's version and engine; always 1",
                                 labels=["version", "engine", "role"])
        info.add_metric([version(), self.engine, self.role], 1)
        yield info


class WebSocketCollector:
    """A WebSocket server's figures, read on its event loop (Tornado calls the handler
    there), so the hub's dicts are never read while they change."""

    def __init__(self, server: "Server") -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server = self.server
        hub = server.hub
        authenticated = len(hub.ring)
        connections = GaugeMetricFamily(
            "flow_connections", "Open WebSocket connections: connecting (no valid token yet) or "
            "authenticated", labels=["state"])
        connections.add_metric(["connecting"], max(0, len(server.sockets) - authenticated))
        connections.add_metric(["authenticated"], authenticated)
        yield connections
        users = channels = subscriptions = 0
        broadcast = hub.broadcast
        for state in hub.streams.values():
            subscribers = state.subscribers
            if subscribers is not None:
                channels += 1
                subscriptions += len(subscribers)
            elif state is not broadcast:
                users += 1
        yield _gauge("flow_users", "Users with an authenticated socket on this server", users)
        yield _gauge("flow_channels", "Channels this server receives for its sockets", channels)
        yield _gauge("flow_channel_subscriptions", "Channel subscriptions of this server's sockets",
                     subscriptions)
        yield _counter("flow_connections_opened", "WebSocket connections opened (handshake done)",
                       server.opened)
        auth = CounterMetricFamily("flow_auth", "Authentication outcomes: ok (a first token accepted), "
                                   "refused (a token refused, per attempt), refreshed (a new token on an "
                                   "open socket), timeout (no valid token in time, closed 4002), "
                                   "unavailable (the engine did not answer, closed 1013)", labels=["result"])
        closes = server.closes
        timeouts = closes.get(("server", str(protocol.CLOSE_AUTH_TIMEOUT)), 0)
        for result, value in (("ok", server.auth_ok), ("refused", server.auth_refused),
                              ("refreshed", server.auth_refreshed), ("timeout", timeouts),
                              ("unavailable", server.auth_unavailable)):
            auth.add_metric([result], value)
        yield auth
        by_code = CounterMetricFamily("flow_closes", "Closed connections by close code and by who closed: "
                                      "server, client, or network (no close frame came: 1006)",
                                      labels=["code", "by"])
        for (by, code), value in sorted(closes.items()):
            by_code.add_metric([code, by], value)
        yield by_code
        sent = CounterMetricFamily("flow_messages_sent", "Messages written to sockets, per socket, by stream "
                                   "kind (live, resumed and repaired)", labels=["kind"])
        sent_bytes = CounterMetricFamily("flow_bytes_sent", "Bytes of the messages written to sockets (their "
                                         "WebSocket frames), by stream kind", labels=["kind"])
        for kind, messages, size in zip(KINDS, (hub.sent_user, hub.sent_broadcast, hub.sent_channel),
                                        (hub.sent_user_bytes, hub.sent_broadcast_bytes, hub.sent_channel_bytes)):
            sent.add_metric([kind], messages)
            sent_bytes.add_metric([kind], size)
        yield sent
        yield sent_bytes
        resumes = CounterMetricFamily("flow_resumes", "Resumes asked (AUTH with resume: connection; "
                                      "SUBSCRIBE with since: channel), by whether everything was recovered",
                                      labels=["kind", "result"])
        for (kind, result), value in sorted(server.resumes.items()):
            resumes.add_metric([kind, result], value)
        yield resumes
        if hub.lag is not None:
            yield hub.lag.family("flow_delivery_lag_seconds", "Per engine batch: from the engine's delivery "
                                 "of its first message to the last socket write of the batch")
        yield _counter("flow_upstream_messages", "Messages the engine delivered for user streams",
                       hub.upstream_messages)
        yield _counter("flow_repairs", "Gaps repaired from history", hub.repairs)
        yield _counter("flow_gap_closes", "Sockets closed 1012 (or channel subscriptions reset) for a gap "
                       "history could not fill or an epoch change", hub.gap_closes)
        yield _gauge("flow_engine_up", "1 while the engine's link is live", int(server.engine.live))
        yield _gauge("flow_draining", "1 while the server drains (SIGTERM)", int(server.draining))


class ProxyCollector:
    """The proxy's figures. Read from the health listener's thread while the proxy's loop
    runs: plain ints are read as they are, dicts and lists copied first (one C call each,
    which the loop cannot interleave with)."""

    def __init__(self, proxy: "Proxy") -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[Metric]:
        proxy = self.proxy
        yield _counter("flow_proxy_numbered", "Pushes numbered and published", proxy.numbered)
        dropped = CounterMetricFamily("flow_proxy_dropped", "What local processes sent that is not Flow's "
                                      "framing, dropped, by where it came: push, subscription, control, flush",
                                      labels=["reason"])
        counts = dict(proxy.warnings.counts)
        for reason in sorted(set(PROXY_DROP_REASONS) | set(counts)):
            dropped.add_metric([reason], counts.get(reason, 0))
        yield dropped
        yield _counter("flow_proxy_flushes", "Publishers' flush requests answered", proxy.flushed)
        streams, subscribed, messages, size = history_size(proxy)
        yield _gauge("flow_proxy_streams", "Streams the proxy numbers (known, with or without history)", streams)
        yield _gauge("flow_proxy_subscribed_streams", "Streams at least one WebSocket server receives",
                     subscribed)
        yield _gauge("flow_proxy_history_messages", "Messages held in history (within FLOW_HISTORY_SIZE)",
                     messages)
        yield _gauge("flow_proxy_history_bytes", f"Bytes of the frames held in history (estimated from a "
                     f"sample of streams past {HISTORY_EXACT_LIMIT} messages)", size)
        yield _gauge("flow_engine_up", "1 while the proxy's loop turns", int(proxy.live))
        yield _gauge("flow_draining", "1 while the proxy stops (SIGTERM)", int(proxy.stop_requested))


def history_size(proxy: "Proxy") -> tuple[int, int, int, int]:
    """(streams, subscribed streams, history messages, history bytes) of the proxy."""
    message_log = proxy.log
    streams = list(message_log.streams.values())
    size = message_log.history_size
    subscribed = messages = 0
    lengths = []
    for stream in streams:
        held = min(len(stream.history), size)
        lengths.append(held)
        messages += held
        if stream.subscribers:
            subscribed += 1
    # Every stream when that is cheap; else every step-th, scaled up by the messages seen.
    step = max(1, -(-messages // HISTORY_EXACT_LIMIT))
    sampled_messages = sampled_bytes = 0
    for index in range(0, len(streams), step):
        held = lengths[index]
        if not held:
            continue
        history = streams[index].history
        tail = history[len(history) - held:]  # a copy: the loop may trim the list meanwhile
        sampled_messages += len(tail)
        sampled_bytes += sum(len(entry[1]) for entry in tail)
    if step == 1 or not sampled_messages:
        return len(streams), subscribed, messages, sampled_bytes
    return len(streams), subscribed, messages, round(sampled_bytes * messages / sampled_messages)


class PublisherCollector:
    """A publisher's figures (``flow.stats()``, summed over the worker processes by the
    caller when there are several) and whether its engine answers."""

    def __init__(self, totals: Callable[[], Mapping[str, float]], engine_up: Callable[[], bool]) -> None:
        self.totals = totals
        self.engine_up = engine_up

    def collect(self) -> Iterator[Metric]:
        totals = self.totals()
        yield _labelled(CounterMetricFamily("flow_publishes", "Messages handed to the engine by flow.push "
                                            "(user), push_all (broadcast), publish (channel), disconnect and "
                                            "unsubscribe (command)", labels=["kind"]),
                        {(kind,): totals.get(f"published_{kind}", 0) for kind in PUBLISH_KINDS})
        yield _labelled(CounterMetricFamily("flow_publish_rejections", "Pushes refused in the caller: "
                                            "invalid (flow.InvalidMessage), queue_full (flow.QueueFull: the "
                                            "engine is away), closed (a closed publisher)", labels=["reason"]),
                        {(reason,): totals.get(f"rejected_{reason}", 0) for reason in REJECT_REASONS})
        yield _gauge("flow_engine_up", "1 when the publisher's engine answered its last check (cached 1 s)",
                     int(self.engine_up()))


def publisher_collector(engine_problem: Callable[[], "str | None"],
                        totals: Callable[[], Mapping[str, float]] | None = None) -> PublisherCollector:
    """The collector of a process that publishes with ``flow.Flow``: ``flow.stats()`` of
    this process (``totals``: instead, e.g. summed over workers by SharedCounters) and its
    engine's check (``flowcore.health.EngineProbe.problem``, which caches for a second)."""
    if totals is None:
        import flow  # the publisher's module: only a publisher process asks for this

        def totals() -> Mapping[str, float]:
            return publisher_totals(flow.stats())

    return PublisherCollector(totals, lambda: engine_problem() is None)


def publisher_totals(stats: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """``flow.stats()`` flattened, for :class:`flowcore.health.SharedCounters` files."""
    flat: dict[str, float] = {}
    for kind, value in stats.get("published", {}).items():
        flat[f"published_{kind}"] = value
    for reason, value in stats.get("rejected", {}).items():
        flat[f"rejected_{reason}"] = value
    return flat


def registry(role: str, engine: str, *collectors: Any, process: bool = True) -> CollectorRegistry:
    """A registry of its own (never prometheus-client's global one, which would bring its
    default collectors twice): build info, ``collectors``, and the process figures."""
    result = CollectorRegistry(auto_describe=False)
    result.register(_Build(role, engine))
    for collector in collectors:
        result.register(collector)
    if process:
        ProcessCollector(registry=result)
    return result


def render(source: Collector) -> bytes:
    """The text exposition (format 0.0.4, :data:`CONTENT_TYPE`)."""
    return generate_latest(source)
