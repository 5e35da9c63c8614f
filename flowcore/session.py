"""One browser socket's protocol state, with no I/O (PROTOCOL.md sections 3 and 4).

A :class:`Session` is fed what arrives (text frames, pings, the hub's messages, the time)
and answers by writing ready WebSocket frames to its :class:`Transport` or closing it.
Authentication, token expiry and refresh, the rate limit, the buffer that holds live
messages while a resume is served, and per-stream dedupe all live here; the Tornado
handler (``flowcore.server``) only moves bytes, and the hub (``flowcore.hub``) only routes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from . import channels, protocol
from .engine import Position
from .presence import PresenceEvent, Snapshot
from .settings import Settings
from .tokens import EXPIRED, TokenError, TokenVerifier

if TYPE_CHECKING:
    from .hub import Hub, StreamState

client_log = logging.getLogger("flow.websocket.client")

# A bad frame costs this many rate-limit frames; a good one costs one.
ERROR_COST = 5
# What a PRESENCE query costs against the rate limit, in frames.
PRESENCE_COST = 5
# Bytes one held message costs a session besides its (shared) frame: the tuple and the
# list slot, counted so that a flood of small broadcasts is bounded too.
HELD_ENTRY_COST = 80

# Stages of a session.
AWAITING = 0  # no valid token yet
JOINING = 1  # token accepted; the hub is subscribing and checking what a resume owes
RESUMING = 2  # AUTH OK sent; history being written, live messages held back
OPEN = 3
CLOSED = 4


class Transport(Protocol):
    """Where a session's frames go: a WebSocket connection."""

    def send_frames(self, wire: bytes) -> None:
        """Write ready WebSocket frames (closes the socket 4008 itself past its backlog)."""

    def close(self, code: int, reason: str) -> None:
        ...


class Clock(Protocol):
    def monotonic(self) -> float:
        ...

    def time(self) -> float:
        ...


class SystemClock:
    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)


SYSTEM_CLOCK = SystemClock()


@dataclass(frozen=True, slots=True)
class JoinRequest:
    """What the server must ask the hub once a first token is accepted."""

    username: str
    # Positions the client asked to resume after, for the streams it may resume only.
    resume: dict[str, Position]


@dataclass(slots=True)
class JoinResult:
    """The hub's answer: where delivery continues on each stream, and what is owed."""

    own: "StreamState"
    positions: dict[str, Position]
    recovered: bool
    missed: int
    # Per stream, the seq after which history is owed (only when recovered).
    owed: dict[str, int]


# Stages of a channel subscription.
SUB_JOINING = 0  # granted; the hub is subscribing and checking what `since` owes
SUB_RESUMING = 1  # SUBSCRIBE OK sent; history being written, live messages held back
SUB_OPEN = 2
SUB_GONE = 3  # unsubscribed, refused or closed: nothing more is written for it


class ChannelSub:
    """One socket's subscription to one channel (PROTOCOL.md section 9): its own seq,
    dedupe, and the hold while its history is served, as the socket has for its streams."""

    __slots__ = ("session", "name", "stream", "stage", "seq", "held", "held_bytes", "held_dropped",
                 "expires_at", "by_grant", "ref", "state", "presence", "wants_presence", "presence_version")

    def __init__(self, session: "Session", name: str, expires_at: float | None, by_grant: bool,
                 ref: str | int | None, presence: bool = False, wants_presence: bool = False) -> None:
        self.session = session
        self.name = name
        self.stream = protocol.channel_stream(name)
        self.stage = SUB_JOINING
        self.seq = 0
        self.held: list[tuple[int, bytes]] | None = []
        self.held_bytes = 0
        self.held_dropped = False
        # Monotonic expiry of the subscription token that granted it; None: the
        # connection's token (its `channels` claim) did, and expires with the socket's.
        self.expires_at = expires_at
        self.by_grant = by_grant
        self.ref = ref
        self.state: "StreamState | None" = None  # the hub's, once joined
        # The channel keeps presence (this socket counts in it); the client wants its
        # snapshot and JOIN/LEAVE (SUBSCRIBE's `presence`, default yes); the version of
        # the snapshot it was sent (diffs go to it only after that, and only newer ones).
        self.presence = presence
        self.wants_presence = presence and wants_presence
        self.presence_version: int | None = None

    def deliver(self, seq: int, wire: bytes) -> None:
        """A live message of the channel (the fan-out's hot path)."""
        if seq <= self.seq or self.stage == SUB_GONE:
            return
        held = self.held
        if held is not None:
            held.append((seq, wire))
            self.held_bytes += len(wire) + HELD_ENTRY_COST
            if self.held_bytes > self.session.settings.send_backlog:
                held.clear()  # fetched from history instead (section 4's rule, per channel)
                self.held_bytes = 0
                self.held_dropped = True
            return
        self.seq = seq
        self.session._queue(wire)


@dataclass(frozen=True, slots=True)
class SubscribeRequest:
    """What the server must ask the hub for a granted SUBSCRIBE."""

    sub: ChannelSub
    since: Position | None


@dataclass(slots=True)
class PresenceAsk:
    """A PRESENCE query on a subscribed presence channel, for the server to answer."""

    sub: ChannelSub
    ref: str | int | None


@dataclass(slots=True)
class ChannelJoin:
    """The hub's answer to a SubscribeRequest."""

    position: Position
    recovered: bool
    missed: int
    owed_after: int | None  # the seq after which history is owed (only when recovered)


Request = JoinRequest | SubscribeRequest | PresenceAsk


class Session:
    __slots__ = (
        "transport", "hub", "settings", "verifier", "clock", "peer", "stage", "username",
        "attempts", "auth_deadline", "expires_at", "grace_until", "allowance_at",
        "own", "seq_own", "seq_all", "held", "held_bytes", "held_dropped", "outbox", "outbox_bytes",
        "ring_group", "revision2", "grants", "channels", "pending", "channel_deadline",
    )

    def __init__(self, transport: Transport, hub: "Hub", settings: Settings, verifier: TokenVerifier,
                 peer: str = "?", clock: Clock = SYSTEM_CLOCK) -> None:
        self.transport = transport
        self.hub = hub
        self.settings = settings
        self.verifier = verifier
        self.clock = clock
        self.peer = peer
        self.stage = AWAITING
        self.username: str | None = None
        self.attempts = 0
        self.auth_deadline = clock.monotonic() + settings.auth_timeout
        # Monotonic times: when the token expires, and when its grace ends (None until then).
        self.expires_at: float | None = None
        self.grace_until: float | None = None
        # Rate limit as one timestamp (the generic cell rate algorithm): the time at which
        # the allowance would be whole again. A token bucket needs two floats per socket.
        self.allowance_at = 0.0
        self.own: StreamState | None = None
        # Last seq written on the user's own stream and on broadcasts: later copies are dropped.
        self.seq_own = 0
        self.seq_all = 0
        # Live messages held back until AUTH OK and any resumed history are out.
        self.held: list[tuple[bool, int, bytes]] | None = None
        self.held_bytes = 0
        # True when held messages passed the bound and were dropped: the server fetches
        # them from history instead (they are there too) before live delivery begins.
        self.held_dropped = False
        # Frames waiting for this loop iteration's flush; None (not an empty list) while
        # idle, which is most of a socket's life.
        self.outbox: list[bytes] | None = None
        self.outbox_bytes = 0
        self.ring_group: int | None = None  # see hub.SocketRing
        # Revision-2 frames (section 9's) go only to sockets that sent one themselves: a page
        # written for message_flow never sees them.
        self.revision2 = False
        self.grants = channels.Grants.NONE
        self.channels: dict[str, ChannelSub] = {}
        # SUBSCRIBEs (AUTH's `subscribe` included) waiting for AUTH OK, in order.
        # (frame, whether a refusal costs against the rate limit: not for AUTH's own map).
        self.pending: list[tuple[protocol.Subscribe, bool]] = []
        self.channel_deadline: float | None = None  # the earliest subscription token's expiry

    # -- what arrives from the client

    def opened(self) -> None:
        self._send(protocol.auth_request())

    def receive(self, text: str) -> Request | None:
        """A text frame from the client. Returns a JoinRequest when the hub must attach
        the socket to its streams (the first valid token), a SubscribeRequest when it must
        subscribe the socket to a channel."""
        if self.stage == CLOSED or not self._charge(1):
            return None
        try:
            frame = protocol.parse_client_frame(text)
        except protocol.ProtocolError as exc:
            self._refuse(str(exc))
            return None
        if isinstance(frame, protocol.Ping):
            if not frame.heartbeat:
                self._send(protocol.pong())
            return None
        if isinstance(frame, (protocol.Subscribe, protocol.Unsubscribe, protocol.PresenceQuery)):
            return self._channel_frame(frame)
        if frame.revision2:
            self.revision2 = True
        if self.stage == AWAITING:
            return self._authenticate(frame)
        if self.stage == JOINING:
            self._refuse("authentication in progress")
        elif not text.lstrip().startswith("{") and not protocol.looks_like_jwt(frame.token):
            # On an open socket only a token refreshes; other stray text is an error, not
            # a failed attempt that could end in 4001.
            self._refuse("not a frame of the protocol")
        else:
            self._refresh(frame)
        return None

    def receive_binary(self) -> None:
        if self.stage != CLOSED and self._charge(1):
            self._refuse("binary frames are not part of the protocol")

    def receive_ping(self) -> None:
        """A WebSocket ping control frame: it costs like any other frame."""
        if self.stage != CLOSED:
            self._charge(1)

    def receive_continuation(self) -> None:
        """A continuation frame. A message is charged once, when it is complete; each of
        its further fragments costs a frame too, or endless empty fragments of a message
        that never completes would keep the server busy and never meet the limit."""
        if self.stage != CLOSED:
            self._charge(1)

    def _charge(self, cost: float) -> bool:
        """Spend ``cost`` frames of the allowance: FLOW_RATE_LIMIT a second, bursts of
        FLOW_RATE_BURST. False (and the socket closed 4029) when it is spent."""
        settings = self.settings
        now = self.clock.monotonic()
        self.allowance_at = max(self.allowance_at, now) + cost / settings.rate_limit
        # The slack absorbs rounding in the sum of many 1/rate steps.
        if self.allowance_at - now > (settings.rate_burst + 1e-6) / settings.rate_limit:
            client_log.warning("%s (%s): too many frames, closing 4029", self.peer, self.username)
            self.close(protocol.CLOSE_RATE_LIMITED, "rate limit")
            return False
        return True

    def _refuse(self, reason: str) -> None:
        client_log.warning("%s (%s): %s", self.peer, self.username, reason)
        if self._charge(ERROR_COST - 1):
            self._send(protocol.error(reason))

    def _verify(self, token: str) -> tuple[str, float, channels.Grants] | None:
        """(username, monotonic expiry, channel grants) of a valid token with a valid
        `channels` claim; None after answering a bad one."""
        try:
            verified = self.verifier.verify_claims(token)
            grants = channels.connection_grants(verified)
            if self.stage != AWAITING and verified.expires_at <= self.clock.time():
                # The verifier's leeway is for clock skew at the first AUTH; a refresh with
                # a token already past exp would be asked again at once, in a loop.
                raise TokenError(EXPIRED, "token has expired")
        except TokenError as exc:
            self.attempts += 1
            client_log.warning("%s (%s): token refused (%s), attempt %d of %d", self.peer, self.username,
                               exc, self.attempts, self.settings.auth_attempts)
            self._send(protocol.auth_failed(exc.reason))
            if self.attempts >= self.settings.auth_attempts:
                self.close(protocol.CLOSE_AUTH_FAILED, "authentication failed")
            elif self.stage == AWAITING:
                self._send(protocol.auth_request())
            elif self.grace_until is not None:
                self._send(protocol.auth_request("expired"))
            return None
        remaining = verified.expires_at - self.clock.time()
        return verified.username, self.clock.monotonic() + remaining, grants

    def _authenticate(self, frame: protocol.Authenticate) -> JoinRequest | None:
        verified = self._verify(frame.token)
        if verified is None:
            return None
        self.username, self.expires_at, self.grants = verified
        self.attempts = 0
        self.stage = JOINING
        self.held = []
        self.pending.extend((entry, False) for entry in frame.subscribe)
        wanted = {k: v for k, v in frame.resume.items() if k == self.username or k == protocol.BROADCAST}
        return JoinRequest(self.username, wanted)

    def _refresh(self, frame: protocol.Authenticate) -> None:
        """A new token on an open socket (PROTOCOL.md section 3, token expiry)."""
        verified = self._verify(frame.token)
        if verified is None:
            return
        username, expires_at, grants = verified
        if username != self.username:
            client_log.warning("%s (%s): refresh with a token for %r, closing 4001", self.peer, self.username,
                               username)
            self.close(protocol.CLOSE_AUTH_FAILED, "token for another user")
            return
        self.attempts = 0
        self.expires_at, self.grace_until = expires_at, None
        self.grants = grants
        # What the old token's `channels` claim granted and the new one does not is revoked.
        for sub in [s for s in self.channels.values() if s.by_grant and not self.grants.allows(s.name)]:
            self.drop_channel(sub, "forbidden", resubscribe=False)
        self.hub.reschedule(self)
        own = self.own
        assert own is not None
        self._send(protocol.auth_ok(
            username, own.epoch, self.settings.heartbeat, True, 0, self.hub.positions(own),
            self.expires_in(), refreshed=True,
            max_channels=self.settings.max_channels if self.revision2 else None,
        ))
        client_log.info("%s (%s): token refreshed", self.peer, username)

    def expires_in(self) -> float | None:
        if self.expires_at is None:
            return None
        return max(0.0, self.expires_at - self.clock.monotonic())

    def __lt__(self, other: "Session") -> bool:
        # Any order will do between sessions due at the same time (hub.Timers' heap).
        return id(self) < id(other)

    # -- time

    def deadline(self) -> float | None:
        """When :meth:`tick` has something to do next."""
        if self.stage == AWAITING:
            return self.auth_deadline
        if self.stage == CLOSED:
            return None
        due: float | None = self.grace_until if self.grace_until is not None else self.expires_at
        channel_due = self.channel_deadline
        if channel_due is not None and (due is None or channel_due < due):
            return channel_due
        return due

    def tick(self) -> None:
        """Act on whatever deadline has passed: auth timeout, token expiry, end of grace."""
        now = self.clock.monotonic()
        if self.stage == AWAITING:
            if now >= self.auth_deadline:
                client_log.warning("%s: no valid token within %ss", self.peer, self.settings.auth_timeout)
                self.close(protocol.CLOSE_AUTH_TIMEOUT, "authentication timeout")
            return
        if self.stage == CLOSED or self.expires_at is None:
            return
        if self.channel_deadline is not None and now >= self.channel_deadline:
            self._expire_channels(now)
        if self.grace_until is not None:
            if now >= self.grace_until:
                client_log.warning("%s (%s): token expired and no new one within %ss, closing 4003",
                                   self.peer, self.username, self.settings.expire_grace)
                self.close(protocol.CLOSE_TOKEN_EXPIRED, "token expired")
            return
        if now >= self.expires_at:
            self.grace_until = self.expires_at + self.settings.expire_grace
            self.attempts = 0
            if self.stage >= RESUMING:
                self._send(protocol.auth_request("expired"))
            if now >= self.grace_until:
                self.tick()

    # -- channels (PROTOCOL.md section 9)

    def _channel_frame(self, frame: "protocol.Subscribe | protocol.Unsubscribe | protocol.PresenceQuery"
                       ) -> SubscribeRequest | PresenceAsk | None:
        self.revision2 = True
        if self.stage == AWAITING:
            self._refuse("authenticate first: channels are for authenticated sockets")
            return None
        if isinstance(frame, protocol.Unsubscribe):
            self.cancel_pending(frame.channel)
            sub = self.channels.get(frame.channel)
            if sub is not None:
                self.drop_channel(sub)
            self._send(protocol.unsubscribe_ok(frame.channel, frame.ref))
            return None
        if isinstance(frame, protocol.PresenceQuery):
            sub = self.channels.get(frame.channel)
            if sub is None or sub.stage not in (SUB_RESUMING, SUB_OPEN):
                self._refuse(f"PRESENCE of {protocol.shown_name(frame.channel)}: not subscribed to it")
            elif not sub.presence:
                self._refuse(f"PRESENCE of {protocol.shown_name(frame.channel)}: the channel has no presence "
                             "(FLOW_PRESENCE_CHANNELS)")
            elif self._charge(PRESENCE_COST - 1):
                # A query costs the engine a round trip: dearer than a frame, like an error.
                return PresenceAsk(sub, frame.ref)
            return None
        if self.stage == JOINING:
            self.pending.append((frame, True))  # answered once AUTH OK is out
            return None
        return self.subscribe(frame)

    def cancel_pending(self, channel: str) -> None:
        """Forget a SUBSCRIBE still waiting for AUTH OK (an UNSUBSCRIBE came first)."""
        self.pending = [entry for entry in self.pending if entry[0].channel != channel]

    def subscribe(self, frame: protocol.Subscribe, charge: bool = True,
                  refused: list[str] | None = None) -> SubscribeRequest | None:
        """Decide a SUBSCRIBE: a refusal is answered here; a grant becomes a request.
        ``charge``: a refusal costs like an error frame against the rate limit (not for
        AUTH's own `subscribe` map, which a page sends again at every reconnect).
        ``refused``: where to note a refusal instead of logging it on its own line."""
        name, ref = frame.channel, frame.ref
        if self.stage not in (RESUMING, OPEN):
            return None
        if name in self.channels:
            self._subscribe_failed(name, "already_subscribed", False, ref, charge=charge, refused=refused)
            return None
        if len(self.channels) >= self.settings.max_channels:
            self._subscribe_failed(name, "limit", False, ref, charge=charge, refused=refused)
            return None
        assert self.username is not None
        try:
            exp = channels.authorize(self.grants, self.verifier, self.username, name, frame.token)
        except channels.SubscribeRefused as exc:
            self._subscribe_failed(name, exc.reason, exc.temporary, ref, exc.detail, charge=charge, refused=refused)
            return None
        expires_at = None if exp is None else self.clock.monotonic() + (exp - self.clock.time())
        sub = ChannelSub(self, name, expires_at, exp is None, ref,
                         presence=channels.presence_enabled(
                             channels.presence_grants(self.settings.presence_channels), name),
                         wants_presence=frame.presence is not False)
        self.channels[name] = sub
        if expires_at is not None:
            self._reschedule_channels()
        return SubscribeRequest(sub, frame.since)

    def take_pending(self) -> list[SubscribeRequest]:
        """The SUBSCRIBEs that waited for AUTH OK, decided now (refusals answered)."""
        pending, self.pending = self.pending, []
        # AUTH's own map is free of charge, so its refusals (up to a thousand in one frame)
        # are one log line, not one each.
        refused: list[str] = []
        requests = [self.subscribe(frame, charge, None if charge else refused) for frame, charge in pending]
        if refused:
            client_log.warning("%s (%s): %d subscription%s of AUTH refused: %s%s", self.peer, self.username,
                               len(refused), "" if len(refused) == 1 else "s", ", ".join(refused[:3]),
                               ", ..." if len(refused) > 3 else "")
        return [r for r in requests if r is not None]

    def _subscribe_failed(self, name: str, reason: str, temporary: bool, ref: str | int | None,
                          detail: str = "", charge: bool = True, refused: list[str] | None = None) -> None:
        if refused is not None:
            refused.append(f"{protocol.shown_name(name)}: {reason}")
        else:
            client_log.warning("%s (%s): subscription to %r refused: %s%s", self.peer, self.username, name,
                               reason, f" ({detail})" if detail else "")
        if not charge or self._charge(ERROR_COST - 1):
            self._send(protocol.subscribe_failed(name, reason, temporary, ref))
        return None

    def channel_failed(self, sub: ChannelSub, reason: str, temporary: bool) -> None:
        """The hub could not subscribe (the engine is away): the client may ask again."""
        if self.channels.get(sub.name) is not sub:
            return
        self._forget(sub)
        self._send(protocol.subscribe_failed(sub.name, reason, temporary, sub.ref))

    def channel_attached(self, sub: ChannelSub, result: ChannelJoin, presence: Snapshot | None = None) -> int | None:
        """SUBSCRIBE OK (with the channel's presence when the client wants it); history (if
        owed) follows, then live messages. The seq after which history is owed: where the
        resume starts, or, for a subscription without one, the position SUBSCRIBE OK gave
        when live messages held meanwhile had to be dropped (they are fetched from history,
        as for a resume; without this the client would see a gap after SUBSCRIBE OK and
        never be told). None: nothing is owed."""
        if sub.stage != SUB_JOINING or self.channels.get(sub.name) is not sub or self.stage == CLOSED:
            return None
        seq, epoch = result.position
        sub.seq = result.owed_after if result.owed_after is not None else seq
        if sub.held:
            sub.held = [(s, w) for s, w in sub.held if s > seq]
            sub.held_bytes = sum(len(w) + HELD_ENTRY_COST for _, w in sub.held)
        sub.stage = SUB_RESUMING
        self._send(protocol.subscribe_ok(sub.name, seq, epoch, result.recovered, result.missed, sub.ref,
                                         presence if sub.wants_presence else None))
        if presence is not None and sub.wants_presence:
            sub.presence_version = presence.version
        client_log.info("%s (%s): subscribed to %r (recovered=%s, missed=%d)", self.peer, self.username,
                        sub.name, result.recovered, result.missed)
        if result.owed_after is not None:
            return result.owed_after
        return self.channel_catch_up(sub)

    def presence_event(self, sub: ChannelSub, event: PresenceEvent, text: str) -> None:
        """A JOIN/LEAVE (``text``, its frame) for a subscription that has its snapshot."""
        if self._presence_newer(sub, event.version):
            self._queue_text(text)

    def presence_refresh(self, sub: ChannelSub, snapshot: Snapshot) -> None:
        """A snapshot the client did not ask for (the engine had lost presence): a PRESENCE
        without ref, which replaces what the client built, from a higher version."""
        if self._presence_newer(sub, snapshot.version):
            self._queue_text(protocol.presence_answer(sub.name, snapshot))

    def _presence_newer(self, sub: ChannelSub, version: int) -> bool:
        """Whether presence of ``version`` goes to ``sub`` (which has its snapshot and a lower
        version); if so, ``sub`` is at ``version`` from now on."""
        if (sub.presence_version is None or version <= sub.presence_version or sub.stage == SUB_GONE
                or self.stage == CLOSED):
            return False
        sub.presence_version = version
        return True

    def presence_answer(self, sub: ChannelSub, snapshot: Snapshot | None, ref: str | int | None) -> None:
        """The answer to a PRESENCE query (an ERROR when the engine did not give one)."""
        if self.channels.get(sub.name) is not sub or self.stage == CLOSED:
            return
        if snapshot is None:
            self._send(protocol.error(f"PRESENCE of {protocol.shown_name(sub.name)}: the engine did not "
                                      "answer, try again"))
            return
        self._send(protocol.presence_answer(sub.name, snapshot, ref))

    def channel_history(self, sub: ChannelSub, seq: int, wire: bytes) -> None:
        if sub.stage != SUB_RESUMING or seq <= sub.seq:
            return
        sub.seq = seq
        self._queue(wire)

    def channel_catch_up(self, sub: ChannelSub) -> int | None:
        """:meth:`catch_up` for a channel: the seq after which history must fill in."""
        if not sub.held_dropped or sub.stage != SUB_RESUMING:
            return None
        sub.held_dropped = False
        return sub.seq

    def channel_resumed(self, sub: ChannelSub) -> None:
        if sub.stage != SUB_RESUMING:
            return
        sub.stage = SUB_OPEN
        held, sub.held, sub.held_bytes = sub.held or [], None, 0
        for seq, wire in held:
            sub.deliver(seq, wire)

    def drop_channel(self, sub: ChannelSub, reason: str | None = None, resubscribe: bool = False) -> None:
        """End a subscription: asked by the client (no frame), or by the server
        (``reason``: UNSUBSCRIBED, e.g. a revoked grant or a channel reset)."""
        if self.channels.get(sub.name) is not sub:
            return
        self._forget(sub)
        if reason is not None and self.stage != CLOSED:
            self._send(protocol.unsubscribed(sub.name, reason, resubscribe))
            client_log.info("%s (%s): unsubscribed from %r: %s", self.peer, self.username, sub.name, reason)

    def _forget(self, sub: ChannelSub) -> None:
        del self.channels[sub.name]
        sub.stage = SUB_GONE
        sub.held = None
        self.hub.leave_channel(sub)
        if sub.expires_at is not None:
            self._reschedule_channels()

    def _reschedule_channels(self) -> None:
        expiries = [s.expires_at for s in self.channels.values() if s.expires_at is not None]
        self.channel_deadline = min(expiries) if expiries else None
        self.hub.reschedule(self)

    def _expire_channels(self, now: float) -> None:
        for sub in [s for s in self.channels.values() if s.expires_at is not None and s.expires_at <= now]:
            # The page fetches a new subscription token and subscribes again with `since`.
            self.drop_channel(sub, "token_expired", resubscribe=True)

    # -- what the hub delivers

    def attached(self, result: JoinResult) -> None:
        """The hub has subscribed this socket: say AUTH OK; history (if owed) follows."""
        if self.stage != JOINING:
            return  # closed meanwhile
        username = self.username
        assert username is not None
        self.own = result.own
        start = result.owed if result.recovered else {}
        own_seq, all_seq = result.positions[username][0], result.positions[protocol.BROADCAST][0]
        self.seq_own = start.get(username, own_seq)
        self.seq_all = start.get(protocol.BROADCAST, all_seq)
        if self.held:
            # What was numbered up to the positions is history's (or the client's) to give.
            self.held = [(b, seq, w) for b, seq, w in self.held if seq > (all_seq if b else own_seq)]
            self.held_bytes = sum(len(w) + HELD_ENTRY_COST for _, _, w in self.held)
        self.stage = RESUMING
        self._send(protocol.auth_ok(
            username, result.positions[username][1], self.settings.heartbeat, result.recovered,
            result.missed, result.positions, self.expires_in(),
            max_channels=self.settings.max_channels if self.revision2 else None,
        ))
        client_log.info("%s authenticated as %r (recovered=%s, missed=%d)", self.peer, username,
                        result.recovered, result.missed)
        if self.grace_until is not None:  # expired while joining
            self._send(protocol.auth_request("expired"))

    def deliver_history(self, broadcast: bool, seq: int, wire: bytes) -> None:
        """One resumed message: written at once (the caller paces pages by back-pressure)."""
        if self.stage != RESUMING:
            return
        if broadcast:
            if seq <= self.seq_all:
                return
            self.seq_all = seq
        else:
            if seq <= self.seq_own:
                return
            self.seq_own = seq
        self._queue(wire)

    def catch_up(self) -> dict[str, int] | None:
        """When held messages were dropped: per stream, the seq after which history must
        fill in (the hub's position tells up to where); None when nothing was dropped."""
        if not self.held_dropped or self.stage != RESUMING:
            return None
        self.held_dropped = False
        assert self.username is not None
        return {self.username: self.seq_own, protocol.BROADCAST: self.seq_all}

    def resumed(self) -> None:
        """History is out: what was held back follows, and live delivery begins."""
        if self.stage != RESUMING:
            return
        self.stage = OPEN
        held, self.held, self.held_bytes = self.held or [], None, 0
        for broadcast, seq, wire in held:
            if broadcast:
                self.deliver_all(seq, wire)
            else:
                self.deliver_own(seq, wire)

    def deliver_own(self, seq: int, wire: bytes) -> None:
        """A message of the user's own stream (the fan-out's hot path)."""
        if seq <= self.seq_own:
            return
        if self.held is not None:
            self._hold(False, seq, wire)
            return
        self.seq_own = seq
        self._queue(wire)

    def deliver_all(self, seq: int, wire: bytes) -> None:
        """A broadcast (the fan-out's hot path)."""
        if seq <= self.seq_all:
            return
        if self.held is not None:
            self._hold(True, seq, wire)
            return
        self.seq_all = seq
        self._queue(wire)

    def _hold(self, broadcast: bool, seq: int, wire: bytes) -> None:
        held = self.held
        if held is None or self.stage == CLOSED:
            return
        held.append((broadcast, seq, wire))
        # The frame is shared with every other socket; what this one pays is the entry.
        self.held_bytes += len(wire) + HELD_ENTRY_COST
        if self.held_bytes > self.settings.send_backlog:
            # Bounded memory: what is dropped here is fetched from history before live
            # delivery begins (PROTOCOL section 4: never a 4008 for one's own resume).
            held.clear()
            self.held_bytes = 0
            self.held_dropped = True

    def _queue(self, wire: bytes) -> None:
        outbox = self.outbox
        if outbox is None:
            if self.stage == CLOSED:
                return
            self.outbox = [wire]
            self.hub.mark_dirty(self)
        else:
            outbox.append(wire)
        self.outbox_bytes += len(wire)
        if self.outbox_bytes > self.settings.send_backlog:
            self.flush()  # keeps one write, and so the backlog, under the bound

    def flush(self) -> None:
        """Write everything queued by this loop iteration in one call (one syscall)."""
        outbox = self.outbox
        if outbox is not None:
            self.outbox = None
            self.outbox_bytes = 0
            self.transport.send_frames(outbox[0] if len(outbox) == 1 else b"".join(outbox))

    def _queue_text(self, text: str) -> None:
        """A server frame that keeps its place among queued messages, written with them."""
        self._queue(protocol.encode_text_frame(text.encode("utf-8")))

    def _send(self, text: str) -> None:
        self.flush()  # keep order with queued messages
        self.transport.send_frames(protocol.encode_text_frame(text.encode("utf-8")))

    # -- the end

    def close(self, code: int, reason: str) -> None:
        """Close from our side: what was already routed here goes out before the close frame."""
        if self.stage == CLOSED:
            return
        self.flush()
        self.stage = CLOSED
        self.held = None
        self.transport.close(code, reason)
        self._end_channels()

    def closed(self) -> None:
        """The connection is gone (either side closed it)."""
        self.stage = CLOSED
        self.held = None
        self.outbox = None
        self._end_channels()

    def _end_channels(self) -> None:
        channels_, self.channels = self.channels, {}
        for sub in channels_.values():
            sub.stage = SUB_GONE
            sub.held = None
            self.hub.leave_channel(sub)
