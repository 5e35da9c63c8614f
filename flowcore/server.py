"""The WebSocket server's I/O: Tornado moves bytes between sockets and sessions.

``FlowSocket`` is the transport of one :class:`flowcore.session.Session`: it hands the
session what arrives and writes what the session wants written. ``Server`` owns the
listening socket, the hub, the engine, the heartbeat and the session deadlines, and drains
at SIGTERM. ``websocket_server.py`` is the entry point that runs it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from typing import Any, Callable, Coroutine

import tornado.httpserver
import tornado.httputil
import tornado.netutil
import tornado.web
import tornado.websocket
from tornado.log import access_log

from . import compat, metrics, protocol
from .engine import server_engine
from .hub import Hub, Timers
from .proxy import WarningLimiter
from .session import CLOSED, SUB_GONE, SUB_RESUMING, JoinRequest, PresenceAsk, Session, SubscribeRequest
from .runtime import freeze_startup, spawn
from .settings import Settings
from .tokens import TokenVerifier

log = logging.getLogger("flow.websocket")
client_log = logging.getLogger("flow.websocket.client")

HEARTBEAT_FRAME = protocol.encode_text_frame(protocol.HEARTBEAT.encode())
# Handshake headers are not read again once the socket is open; every open socket shares
# this empty set instead of keeping its own (about 1.5 KiB of dicts and lists each).
NO_HEADERS = tornado.httputil.HTTPHeaders()


LOGGED_HEADER = 200  # characters of a client's header a log line shows


def _clip(text: str) -> str:
    return text if len(text) <= LOGGED_HEADER else f"{text[:LOGGED_HEADER]}... ({len(text)} characters)"


class FlowSocket(tornado.websocket.WebSocketHandler):
    """One browser tab: the Transport of its Session."""

    # Our state lives in slots, not in the instance dict: tornado already puts 27
    # attributes there, and past 30 CPython stops sharing the dict's keys between
    # instances, which costs ~1.5 KiB per connection.
    __slots__ = ("server", "session", "closing", "at_header", "sent")

    def initialize(self, server: "Server") -> None:
        self.server = server
        self.session: Session | None = None
        self.closing = False
        self.sent: tuple[int | None, str] | None = None  # the close we sent, for the one close line
        self.at_header: Any = False  # see compat's protocol: where the frame header stands

    # -- handshake

    def check_origin(self, origin: str) -> bool:
        if origin in self.server.allowed_origins:
            return True
        if super().check_origin(origin):
            return True
        # Anyone can send these: rate-limited, so a flood cannot fill the disk.
        # Clipped: each header may be tens of KiB, and ten such lines a second would still fill it.
        self.server.refusals.warn("origin", "refused handshake from origin %r (Host %r): add it to "
                                  "FLOW_ALLOWED_ORIGINS to allow it", _clip(origin), _clip(self.request.host))
        return False

    def get_compression_options(self) -> None:
        return None  # frames are encoded once and written to every socket as they are

    def get_websocket_protocol(self) -> Any:
        proto = super().get_websocket_protocol()
        if proto is None:
            return None
        return compat.make_protocol(self, proto)

    def open(self) -> None:
        server = self.server
        server.sockets[self] = None
        server.opened += 1
        compat.forget_headers(self, NO_HEADERS)
        stream = self.ws_connection.stream  # type: ignore[union-attr]
        assert stream is not None
        stream.set_nodelay(True)
        compat.slim_stream(stream)
        # Tornado's write buffer has no bound of its own; past this, the tab is closed 4008.
        compat.set_bound(stream, server.settings.send_backlog)
        # The server runs with xheaders: remote_ip already honours nginx's X-Real-IP.
        session = self.session = Session(self, server.hub, server.settings, server.verifier,
                                         self.request.remote_ip or "?")
        session.opened()
        # Unauthenticated sockets are swept (Server._auth_deadlines): a heap entry each
        # would stay behind, stale, for the whole auth timeout after a prompt AUTH.
        server.awaiting[session] = None

    # -- what arrives

    def on_message(self, message: str | bytes) -> None:
        session = self.session
        if session is None or self.closing:
            return  # e.g. the frame whose header closed the socket 1002
        if isinstance(message, bytes):
            session.receive_binary()
            return
        # Auth outcomes for the metrics, told apart by what the frame changed: a refused
        # token counts an attempt, an accepted refresh moves the expiry (a client frame is
        # rare next to deliveries: this costs nothing that matters).
        attempts, expires_at = session.attempts, session.expires_at
        request = session.receive(message)
        if session.attempts > attempts:
            self.server.auth_refused += 1
        elif request is None and expires_at is not None and session.expires_at != expires_at:
            self.server.auth_refreshed += 1
        if request is None:
            return
        # A task of its own: tornado reads no more frames while on_message awaits, and a
        # join may wait for the engine or pace a long resume (the client's frames, its
        # close reply included, must still be read meanwhile).
        if isinstance(request, SubscribeRequest):
            self.server.spawn(self.server.subscribe(self, session, request))
        elif isinstance(request, PresenceAsk):
            self.server.spawn(self.server.answer_presence(session, request))
        else:
            self.server.spawn(self.server.authenticate(self, session, request))

    def on_ping(self, data: bytes) -> None:
        if self.session is not None:
            self.session.receive_ping()

    def on_continuation(self) -> None:
        """Called by compat's protocol for each continuation frame (tornado has no hook)."""
        if self.session is not None:
            self.session.receive_continuation()

    def protocol_error(self, what: str) -> None:
        """Called by compat's protocol on a frame RFC 6455 forbids (it closes 1002)."""
        session = self.session
        client_log.warning("%s (%s): %s, closing 1002", self.request.remote_ip or "?",
                           session and session.username, what)

    # -- Transport

    def send_frames(self, wire: bytes) -> None:
        conn = self.ws_connection
        if self.closing or conn is None or conn.is_closing():
            return
        try:
            compat.direct_write(conn.stream, wire)
        except compat.SlowConsumer:
            self._slow_consumer()

    def _slow_consumer(self) -> None:
        session = self.session
        client_log.warning("%s (%s): send backlog over %d bytes, closing 4008", session and session.peer,
                           session and session.username, self.server.settings.send_backlog)
        conn = self.ws_connection
        if conn is not None:
            compat.unbound(conn.stream)
        window = self.server.hub.reconnect_window(1)
        if session is not None:
            session.close(protocol.CLOSE_SLOW_CONSUMER, protocol.reconnect_reason("slow consumer", window))
        else:
            self.close(protocol.CLOSE_SLOW_CONSUMER, "slow consumer")

    def writing(self) -> bool:
        """Whether tornado holds bytes of this socket the kernel has not taken yet."""
        conn = self.ws_connection
        return conn is not None and not self.closing and compat.writing(conn.stream)

    async def drained(self) -> None:
        conn = self.ws_connection
        if conn is not None and not self.closing:
            await compat.drained(conn.stream)

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        if self.closing:
            return
        self.closing = True
        self.sent = (code, reason or "")
        super().close(code, reason)

    def on_connection_close(self) -> None:
        conn: Any = self.ws_connection
        if self.sent is None and conn is not None:
            # A close tornado's protocol sent by itself (1009), not an echo of the client's.
            code = getattr(conn, "sent_code", None)
            if code is not None and code != conn.close_code:
                self.sent = (code, "")
        super().on_connection_close()

    def on_close(self) -> None:
        self.closing = True
        session = self.session
        if session is not None:
            # The one line per socket, whoever closed it (tornado calls on_close once).
            sent = self.sent
            if sent is not None:
                client_log.info("%s (%s): closed %s %r by the server%s", session.peer, session.username,
                                sent[0], sent[1], "" if self.close_code is not None else ", unanswered")
            elif self.close_code is not None:
                client_log.info("%s (%s): closed %s %r by the client", session.peer, session.username,
                                self.close_code, self.close_reason or "")
            else:
                client_log.info("%s (%s): closed 1006 '' by the client or the network: no close code "
                                "came", session.peer, session.username)
        server = self.server
        server.count_close(self.sent, self.close_code)
        server.sockets.pop(self, None)
        if self.session is not None:
            server.awaiting.pop(self.session, None)
        if server.draining and self.close_code is not None:
            server.answered_close += 1  # the client's close frame came back
        if session is not None:
            session.closed()
            self.server.hub.leave(session)


class StatsHandler(tornado.web.RequestHandler):
    """Counters for operators and tests; nginx does not route here."""

    def initialize(self, server: "Server") -> None:
        self.server = server

    def get(self) -> None:
        hub = self.server.hub
        self.write(
            {
                "sockets": len(self.server.sockets),
                "authenticated": len(hub.ring),
                "streams": sorted(hub.streams),
                "upstream_messages": hub.upstream_messages,
                "repairs": hub.repairs,
                "gap_closes": hub.gap_closes,
                "presence_asks": hub.presence_asks,
                "engine": self.server.settings.engine,
                "engine_live": self.server.engine.live,
                "pid": os.getpid(),
            }
        )


class HealthHandler(tornado.web.RequestHandler):
    """``/healthz``: 200 while the process serves. ``/readyz``: 200 only when the engine's
    link is live and the server is not draining, else 503 with the reason (PROTOCOL section
    11): a load balancer then sends no new socket to a server that cannot deliver. Like
    /stats, for the host's health checks: nginx does not route here."""

    def initialize(self, server: "Server", ready: bool) -> None:
        self.server = server
        self.ready = ready

    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        if self.ready:
            problem = "draining" if self.server.draining else (
                None if self.server.engine.live else f"the {self.server.settings.engine} engine's link is not live")
            if problem:
                self.set_status(503)
                self.write({"ready": False, "reason": problem})
                return
            self.write({"ready": True})
            return
        self.write({"alive": True})


class MetricsHandler(tornado.web.RequestHandler):
    """``/metrics``: Prometheus text (flowcore.metrics), computed now from the live state.
    For the host's scraper: nginx does not route here. Absent with FLOW_METRICS=0."""

    def initialize(self, server: "Server") -> None:
        self.server = server

    def get(self) -> None:
        registry = self.server.registry
        assert registry is not None  # routed only when there is one
        self.set_header("Content-Type", metrics.CONTENT_TYPE)
        self.set_header("Cache-Control", "no-store")
        self.write(metrics.render(registry))


def _log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's access log, except that health checks are debug lines: a load balancer
    asks every few seconds, and a 503 from /readyz during an outage is an answer, not an
    error of this server (the engine's own warning says what is wrong)."""
    status = handler.get_status()
    request = handler.request
    if isinstance(handler, (HealthHandler, MetricsHandler)):  # a scraper asks every few seconds too
        log_method = access_log.debug
    else:
        log_method = access_log.info if status < 400 else access_log.warning if status < 500 else access_log.error
    log_method("%d %s %s (%s) %.2fms", status, request.method, request.uri, request.remote_ip,
               1000.0 * request.request_time())


class Server:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.verifier = TokenVerifier(settings)
        self.allowed_origins = set(settings.allowed_origins)
        self.engine = server_engine(settings)
        self.hub = Hub(settings, self.engine)
        self.timers = Timers(time.monotonic)
        self.hub.timers = self.timers
        self.sockets: dict[FlowSocket, None] = {}  # every open socket (an ordered set)
        self.awaiting: dict[Session, None] = {}  # sessions with no valid token yet
        self.http: tornado.httpserver.HTTPServer | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.auth_tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        self.answered_close = 0
        self.refusals = WarningLimiter(client_log)
        # Plain counters for flowcore.metrics, read at scrape time (never per message).
        self.opened = 0
        self.auth_ok = self.auth_refused = self.auth_refreshed = self.auth_unavailable = 0
        self.closes: dict[tuple[str, str], int] = {}  # (by, code label) -> count
        self.resumes: dict[tuple[str, str], int] = {}  # (connection|channel, recovered|not_recovered)
        self.registry: metrics.CollectorRegistry | None = None
        if settings.metrics:
            self.hub.lag = metrics.LagHistogram()
            self.registry = metrics.registry("websocket", settings.engine, metrics.WebSocketCollector(self))
        # The loopback listener of this server alone (FLOW_METRICS_PORT + 1 + index).
        self.own_http: tornado.httpserver.HTTPServer | None = None

    def count_close(self, sent: tuple[int | None, str] | None, received: int | None) -> None:
        """One closed socket, by who closed it: the close we sent, else the client's, else none (1006)."""
        if sent is not None:
            key = ("server", metrics.close_label(sent[0]))
        elif received is not None:
            key = ("client", metrics.close_label(received))
        else:
            key = ("network", "1006")
        self.closes[key] = self.closes.get(key, 0) + 1

    def count_resume(self, kind: str, recovered: bool) -> None:
        key = (kind, "recovered" if recovered else "not_recovered")
        self.resumes[key] = self.resumes.get(key, 0) + 1

    def count_history(self, stream: str, page: list[tuple[int, bytes]]) -> None:
        """A page of history written to one socket (a resume), for flow_messages_sent_total."""
        hub, size = self.hub, sum(len(wire) for _, wire in page)
        kind = metrics.stream_kind(stream)
        if kind == 0:
            hub.sent_user += len(page)
            hub.sent_user_bytes += size
        elif kind == 1:
            hub.sent_broadcast += len(page)
            hub.sent_broadcast_bytes += size
        else:
            hub.sent_channel += len(page)
            hub.sent_channel_bytes += size

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        spawn(coro, self.auth_tasks, log, "authenticating a socket")

    def make_app(self) -> tornado.web.Application:
        return tornado.web.Application(
            [(r"/websocket", FlowSocket, {"server": self}), *self._admin_routes()],
            websocket_max_message_size=self.settings.max_frame,
            log_function=_log_request,
        )

    def _admin_routes(self) -> list[Any]:
        """What the host's checks and scraper ask (nginx routes none of it)."""
        routes: list[Any] = [
            (r"/stats", StatsHandler, {"server": self}),
            (r"/healthz", HealthHandler, {"server": self, "ready": False}),
            (r"/readyz", HealthHandler, {"server": self, "ready": True}),
        ]
        if self.registry is not None:
            routes.append((r"/metrics", MetricsHandler, {"server": self}))
        return routes

    async def start(self, port: int, index: int | None = None) -> None:
        """Listen on ``port`` (shared by the pool: SO_REUSEPORT) and, with FLOW_METRICS_PORT
        and the server's ``index`` in the pool, on a loopback port of its own for the
        scraper and health checks (the shared port reaches a random server of the pool)."""
        await self.hub.start()
        sockets = tornado.netutil.bind_sockets(port, "127.0.0.1", family=socket.AF_INET, reuse_port=True)
        self.http = tornado.httpserver.HTTPServer(self.make_app(), xheaders=True)
        self.http.add_sockets(sockets)
        if self.settings.metrics_port and index is not None:
            own = self.settings.metrics_port + 1 + index
            try:
                # No SO_REUSEPORT: a second stack on the same ports must fail here, loudly.
                own_sockets = tornado.netutil.bind_sockets(own, "127.0.0.1", family=socket.AF_INET)
            except OSError as exc:
                log.error("cannot listen on 127.0.0.1:%d for metrics and health (FLOW_METRICS_PORT=%d + 1 + "
                          "index %d): %s; choose other ports or set FLOW_METRICS_PORT=0", own,
                          self.settings.metrics_port, index, exc.strerror or exc)
                raise SystemExit(1) from None
            self.own_http = tornado.httpserver.HTTPServer(
                tornado.web.Application(self._admin_routes(), log_function=_log_request))
            self.own_http.add_sockets(own_sockets)
            log.info("metrics and health of this server on 127.0.0.1:%d", own)
        self.tasks = [asyncio.ensure_future(self._heartbeats()), asyncio.ensure_future(self.timers.run()),
                      asyncio.ensure_future(self._auth_deadlines())]
        log.info("websocket server up on 127.0.0.1:%d (engine %s)", port, self.settings.engine)

    async def authenticate(self, sock: FlowSocket, session: Session, request: JoinRequest) -> None:
        """A first valid token: join the hub, say AUTH OK, serve what a resume owes."""
        self.awaiting.pop(session, None)
        if session.stage == CLOSED:
            return  # closed in the same read as its AUTH, before this task ran
        self.timers.schedule(session)  # its deadline is now the token's expiry
        result = await self.hub.join(session, request)
        if session.stage == CLOSED:
            return
        if result is None:
            self.auth_unavailable += 1
            client_log.warning("%s (%s): the engine is not answering, closing 1013", session.peer,
                               session.username)
            session.close(protocol.CLOSE_TRY_AGAIN,
                          protocol.reconnect_reason("engine unavailable", self.hub.reconnect_window(len(self.sockets))))
            return
        session.attached(result)
        self.auth_ok += 1
        if request.resume:
            self.count_resume("connection", result.recovered)
        owed: dict[str, int] | None = dict(result.owed) if result.recovered else {}
        try:
            while owed is not None:
                for name, after in owed.items():
                    until, epoch = self.hub.position(name, result.own)
                    if until <= after:
                        continue
                    broadcast = name == protocol.BROADCAST
                    if not await self._write_history(
                            sock, session, name, after, until, epoch,
                            lambda seq, wire: session.deliver_history(broadcast, seq, wire),
                            lambda: session.stage != CLOSED):
                        return
                # Live messages held meanwhile that passed the bound were dropped: they
                # are in history too, so fetch on from where this socket is.
                owed = session.catch_up()
        except LookupError:
            client_log.warning("%s (%s): history went while it was being resumed, closing 1012",
                               session.peer, session.username)
            session.close(protocol.CLOSE_ENGINE_GAP,
                          protocol.reconnect_reason("history lost during resume", self.hub.reconnect_window(1)))
            return
        session.resumed()
        # The channels AUTH asked for (and SUBSCRIBEs sent before AUTH OK), in order.
        for pending in session.take_pending():
            await self.subscribe(sock, session, pending)

    async def subscribe(self, sock: "FlowSocket", session: Session, request: SubscribeRequest) -> None:
        """A granted SUBSCRIBE: join the channel's stream, say SUBSCRIBE OK, serve what
        `since` is owed under back-pressure, then live delivery (PROTOCOL.md section 9)."""
        sub = request.sub
        result = await self.hub.subscribe_channel(sub, request.since)
        if sub.stage == SUB_GONE:
            return  # unsubscribed or closed meanwhile: nothing to say
        if result is None:
            client_log.warning("%s (%s): the engine is not answering, subscription to %r refused",
                               session.peer, session.username, sub.name)
            session.channel_failed(sub, "unavailable", temporary=True)
            return
        snapshot = None
        if sub.wants_presence:
            snapshot = await self.hub.presence(sub)
            if sub.stage == SUB_GONE:
                return
            if snapshot is None:
                client_log.warning("%s (%s): the engine gave no presence of %r, subscription refused",
                                   session.peer, session.username, sub.name)
                session.channel_failed(sub, "unavailable", temporary=True)
                return
        after = session.channel_attached(sub, result, snapshot)
        if request.since is not None:
            self.count_resume("channel", result.recovered)
        self.hub.presence_sent(sub)
        try:
            while after is not None:
                state = sub.state
                if state is None or sub.stage != SUB_RESUMING:
                    return  # unsubscribed or closed meanwhile
                until, epoch = state.seq, state.epoch
                if until > after and not await self._write_history(
                        sock, session, sub.stream, after, until, epoch,
                        lambda seq, wire: session.channel_history(sub, seq, wire),
                        lambda: sub.stage == SUB_RESUMING):
                    return
                after = session.channel_catch_up(sub)
        except LookupError:
            client_log.warning("%s (%s): history of %r went while it was being served", session.peer,
                               session.username, sub.name)
            session.drop_channel(sub, "reset", resubscribe=True)
            return
        session.channel_resumed(sub)

    async def answer_presence(self, session: Session, request: PresenceAsk) -> None:
        session.presence_answer(request.sub, await self.hub.presence_query(request.sub), request.ref)

    async def _write_history(self, sock: "FlowSocket", session: Session, stream: str, after: int, until: int,
                             epoch: str, deliver: Callable[[int, bytes], None], wanted: Callable[[], bool]) -> bool:
        """Write the messages (after, until] of ``stream`` a page at a time, each page once
        tornado holds nothing of the socket's (back-pressure: a resume of any size, or many
        resumes of one socket at once, cost bounded memory). False
        when ``wanted()`` turned false meanwhile (closed, unsubscribed). LookupError from the hub
        when history cannot give them all."""
        async for page in self.hub.history_pages(stream, after, until, epoch):
            # Other resumes of this socket (a SUBSCRIBE each, each its own task) write
            # pages too: one page at a time in tornado's buffer, whoever's it is, or
            # several at once would pass the send backlog before the client could read.
            while sock.writing():
                await sock.drained()
                if not wanted():
                    return False
            for seq, wire in page:
                deliver(seq, wire)
            self.count_history(stream, page)
            session.flush()
            await sock.drained()
            if not wanted():
                return False
        return True

    async def _auth_deadlines(self) -> None:
        """One sweep for every unauthenticated socket, a few times per auth timeout."""
        period = min(1.0, self.settings.auth_timeout / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for session in [s for s in self.awaiting if s.auth_deadline <= now]:
                del self.awaiting[session]
                session.tick()
            self.refusals.flush()  # what a flood of refused handshakes held back

    async def _heartbeats(self) -> None:
        ring = self.hub.ring
        tick = self.settings.heartbeat / len(ring.groups)
        due = time.monotonic()
        while True:
            # Paced from a fixed start, so a group's interval does not creep past FLOW_HEARTBEAT.
            due += tick
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            for session in ring.take_turn():
                session.transport.send_frames(HEARTBEAT_FRAME)

    async def drain(self) -> None:
        """Stop accepting, close every socket with 1001, wait (bounded) for them to go,
        cut the ones that never answer, then close the engine."""
        self.draining = True
        if self.http is not None:
            self.http.stop()
        for task in self.tasks:
            task.cancel()
        total = len(self.sockets)
        window = self.hub.reconnect_window(total)
        reason = protocol.reconnect_reason("server shutting down", window)
        # Clients told to come back within the window are not gone: presence keeps them
        # (as this server's) that long, and they make no LEAVE when they return elsewhere.
        self.engine.presence_retire(window)
        for sock in list(self.sockets):
            if sock.session is not None:
                sock.session.close(protocol.CLOSE_GOING_AWAY, reason)
            else:
                sock.close(protocol.CLOSE_GOING_AWAY, reason)
        deadline = time.monotonic() + self.settings.drain_timeout
        while self.sockets and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stuck = list(self.sockets)
        for sock in stuck:
            compat.abort(sock)
        for task in list(self.auth_tasks):
            task.cancel()
        log.info("drained %d sockets: %d answered the close, %d did not and were cut",
                 total, self.answered_close, total - self.answered_close)
        if self.http is not None:
            try:
                await asyncio.wait_for(self.http.close_all_connections(), 5)
            except asyncio.TimeoutError:
                log.warning("connections still open after the drain")
        await self.hub.close()
        if self.own_http is not None:
            # Last: /readyz answered 503 "draining" there until now.
            self.own_http.stop()
            try:
                await asyncio.wait_for(self.own_http.close_all_connections(), 1)
            except asyncio.TimeoutError:
                pass  # a scraper's connection; the process exits anyway


async def serve(settings: Settings, port: int, index: int | None = None) -> None:
    server = Server(settings)
    await server.start(port, index)
    freeze_startup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining %d sockets", len(server.sockets))
    await server.drain()
    log.info("stopped")
