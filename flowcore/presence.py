"""Who is connected where: presence and occupancy, with no I/O (PROTOCOL.md sections 9, 10).

Every WebSocket server counts, in a :class:`Ledger`, what it holds:

- ``(stream, "")``: its sockets on ``stream``: a user's stream (authenticated sockets of
  that user), a channel's stream (subscriptions to it) or ``"*"`` (every authenticated
  socket, as a broadcast reaches them). These counts answer ``flow.is_online`` and the
  ``online`` of a receipt (sockets a message was dispatched to).
- ``(channel stream, user)``: for presence-enabled channels (FLOW_PRESENCE_CHANNELS), the
  user's subscriptions to the channel on this server.

The server sends its engine absolute counts (never deltas: a repeated or reordered report
cannot drift), a full report whenever the engine does not know it (a restarted proxy, an
expired lease), and renews a lease meanwhile. The engine sums every server's counts in a
:class:`PresenceTable` (the ZeroMQ proxy holds one; the Redis engine keeps the same rules
in its scripts) and derives the channel's JOIN and LEAVE:

- JOIN when a user's count on a channel goes from 0 to more, over every server; a second
  tab makes none;
- when it falls to 0 the user stays present for ``leave_delay`` seconds, and LEAVE follows
  only if nothing came back meanwhile: a reload, or a drain that moves the socket to
  another server, makes neither;
- a server whose lease runs out (killed, frozen, cut off) has its counts dropped as if
  its sockets had closed, so a crashed server's users do not stay online forever;
- every change of a channel's presence (a user's count included) raises its version, and
  JOIN/LEAVE carry the version they made, so a client can drop a diff that is not newer
  than the snapshot it holds.

Versions come from one counter for the whole table, which starts from ``version_base`` (the
clock at start, in microseconds: below 2**53, so exact in JavaScript): a channel's versions
keep rising when it empties and fills again, and across a restart of the table's process
(unless it made more than a million changes a second).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

# (stream, user); user "" is the stream's own socket count.
Key = tuple[str, str]

# How long the engine keeps the counts of a server it has not heard from (the default of
# FLOW_PRESENCE_LEASE), and how often a server renews it: several times per lease, so one
# lost renewal never drops anyone.
LEASE_TTL = 10.0
RENEWALS_PER_LEASE = 5
LEASE_INTERVAL = LEASE_TTL / RENEWALS_PER_LEASE


def renew_interval(lease: float) -> float:
    return lease / RENEWALS_PER_LEASE


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """A JOIN or LEAVE of ``user`` on the channel ``stream``, with the version it made."""

    stream: str
    kind: str  # "JOIN" | "LEAVE"
    user: str
    version: int


@dataclass(slots=True)
class Snapshot:
    """A channel's presence: ``users`` maps each present user to its connection count (0
    while a LEAVE is pending); None when there are more than the list limit (``count`` only)."""

    version: int
    count: int
    users: dict[str, int] | None


class Ledger:
    """One server's counts, and which of them changed since they were last reported."""

    __slots__ = ("counts", "dirty")

    def __init__(self) -> None:
        self.counts: dict[Key, int] = {}
        self.dirty: set[Key] = set()

    def add(self, stream: str, user: str = "", delta: int = 1) -> None:
        key = (stream, user)
        count = self.counts.get(key, 0) + delta
        if count > 0:
            self.counts[key] = count
        else:
            self.counts.pop(key, None)
        self.dirty.add(key)

    def get(self, stream: str, user: str = "") -> int:
        return self.counts.get((stream, user), 0)

    @property
    def changed(self) -> bool:
        return bool(self.dirty)

    def take_changes(self) -> dict[Key, int]:
        """The current count of every key changed since the last call (0: gone)."""
        dirty, self.dirty = self.dirty, set()
        counts = self.counts
        return {key: counts.get(key, 0) for key in dirty}

    def full(self) -> dict[Key, int]:
        """Every count, for a full report (which also clears what is dirty)."""
        self.dirty = set()
        return dict(self.counts)


@dataclass(slots=True)
class _Channel:
    version: int  # of its last change
    users: dict[str, int] = field(default_factory=dict)  # every present user: total count
    leaving: dict[str, float] = field(default_factory=dict)  # user -> when LEAVE is due


class PresenceTable:
    """Every server's counts summed, and the JOIN/LEAVE they make. No I/O: every method
    takes the time; the events it returns are the caller's to publish."""

    def __init__(self, leave_delay: float, version_base: int, lease_ttl: float = LEASE_TTL,
                 started: float | None = None) -> None:
        self.leave_delay = leave_delay
        self.lease_ttl = lease_ttl
        self.version = version_base  # the last version given, to any channel
        self.servers: dict[str, dict[Key, int]] = {}
        self.lease: dict[str, float] = {}  # server -> when its counts expire
        self.totals: dict[Key, int] = {}
        self.channels: dict[str, _Channel] = {}
        # The channels with a LEAVE pending: the tick (ten a second) looks at these only,
        # not at every channel (10,000 of them took 3.6 ms a tick, every push waiting).
        self._leaving: set[str] = set()
        # After a restart of the table's process, the servers report again what they held:
        # JOIN/LEAVE made meanwhile are not sent (the users never left), and when it ends
        # every server sends its listening pages a fresh snapshot (:meth:`end_rebuild`).
        self.rebuild_until: float | None = None
        self.rebuilt = False
        # When the table's process started (monotonic): only a young table rebuilds (a server
        # reporting "again" to an old one had only lost its lease).
        self.started = started

    # -- what servers report

    def known(self, server: str) -> bool:
        return server in self.servers

    def report(self, server: str, changes: Mapping[Key, int], now: float, full: bool = False,
               again: bool = False) -> list[PresenceEvent]:
        """Apply a server's counts (absolute); ``full``: they are all it holds, anything
        else the table had from it goes. ``again``: a full report from a server that an
        earlier table knew (this process restarted): the table is rebuilt for a while,
        without JOIN/LEAVE. Renews the server's lease."""
        if (again and full and not self.rebuilt and self.rebuild_until is None and self.started is not None
                and now - self.started < self.lease_ttl):
            # Every server renews several times a lease: two renewals bring them all back.
            self.rebuild_until = now + 2 * self.lease_ttl / RENEWALS_PER_LEASE
        self.lease[server] = now + self.lease_ttl
        own = self.servers.setdefault(server, {})
        events: list[PresenceEvent] = []
        if full:
            for key in [k for k in own if k not in changes]:
                self._set(server, own, key, 0, now, events)
        for key, count in changes.items():
            self._set(server, own, key, max(0, int(count)), now, events)
        return [] if self.rebuilding(now) else events

    @property
    def pending(self) -> bool:
        """A LEAVE or the end of a rebuild is to come: :meth:`tick` is wanted soon."""
        return bool(self._leaving) or self.rebuild_until is not None

    def rebuilding(self, now: float) -> bool:
        return self.rebuild_until is not None and now < self.rebuild_until

    def end_rebuild(self, now: float) -> bool:
        """True once, when a rebuild is over: the servers must refresh their pages."""
        if self.rebuild_until is None or now < self.rebuild_until:
            return False
        self.rebuild_until, self.rebuilt = None, True
        return True

    def renew(self, server: str, now: float) -> bool:
        """A server's lease renewal; False when the table does not know it (it must send a
        full report)."""
        if server not in self.servers:
            return False
        self.lease[server] = now + self.lease_ttl
        return True

    def retire(self, server: str, now: float, linger: float) -> list[PresenceEvent]:
        """A server that stops after telling its clients to reconnect within ``linger``
        seconds (a drain): its counts stay that long, so that the clients counted again on
        other servers meanwhile make no LEAVE; then they go as a lapsed lease's do."""
        if linger <= 0:
            return self.drop_server(server, now)
        if server in self.servers:
            self.lease[server] = now + linger
        return []

    def drop_server(self, server: str, now: float) -> list[PresenceEvent]:
        """A server that stopped (gracefully) or whose lease ran out: its counts go."""
        own = self.servers.pop(server, None)
        self.lease.pop(server, None)
        events: list[PresenceEvent] = []
        for key in list(own or ()):
            self._set(server, own or {}, key, 0, now, events)
        return events

    def tick(self, now: float) -> list[PresenceEvent]:
        """Expired leases and LEAVEs that are due."""
        events: list[PresenceEvent] = []
        for server in [s for s, until in self.lease.items() if until <= now]:
            events += self.drop_server(server, now)
        for stream in list(self._leaving):
            channel = self.channels.get(stream)
            if channel is None:
                self._leaving.discard(stream)
                continue
            for user in [u for u, due in channel.leaving.items() if due <= now]:
                del channel.leaving[user]
                if channel.users.get(user, 0) == 0:
                    channel.users.pop(user, None)
                    channel.version = self._next(channel)
                    events.append(PresenceEvent(stream, "LEAVE", user, channel.version))
            if not channel.leaving:
                self._leaving.discard(stream)
                if not channel.users:
                    del self.channels[stream]
        return [] if self.rebuilding(now) else events

    def _set(self, server: str, own: dict[Key, int], key: Key, count: int, now: float,
             events: list[PresenceEvent]) -> None:
        before = own.get(key, 0)
        if count == before:
            return
        if count:
            own[key] = count
        else:
            own.pop(key, None)
        total = self.totals.get(key, 0) + count - before
        if total > 0:
            self.totals[key] = total
        else:
            self.totals.pop(key, None)
            total = 0
        stream, user = key
        if user:
            self._member_changed(stream, user, total, now, events)

    def _member_changed(self, stream: str, user: str, total: int, now: float,
                        events: list[PresenceEvent]) -> None:
        channel = self.channels.get(stream)
        if channel is None:
            if total == 0:
                return
            channel = self.channels[stream] = _Channel(self.version)
        present = user in channel.users
        channel.users[user] = total
        channel.version = self._next(channel)
        if total > 0:
            if channel.leaving.pop(user, None) is None and not present:
                events.append(PresenceEvent(stream, "JOIN", user, channel.version))
        elif self.leave_delay <= 0:
            del channel.users[user]
            events.append(PresenceEvent(stream, "LEAVE", user, channel.version))
            if not channel.users and not channel.leaving:
                del self.channels[stream]
        else:
            channel.leaving[user] = now + self.leave_delay
            self._leaving.add(stream)

    def _next(self, channel: _Channel) -> int:
        self.version += 1
        return self.version

    # -- what publishers and servers ask

    def online(self, stream: str) -> int:
        """Sockets on ``stream`` over every server (a user's, a channel's, "*")."""
        return self.totals.get((stream, ""), 0)

    def snapshot(self, stream: str, limit: int | None = None) -> Snapshot:
        channel = self.channels.get(stream)
        if channel is None:
            return Snapshot(self.version, 0, {})
        users = channel.users
        listed = dict(users) if limit is None or len(users) <= limit else None
        return Snapshot(channel.version, len(users), listed)

    def stats(self) -> dict[str, int]:
        return {"presence_servers": len(self.servers), "presence_channels": len(self.channels),
                "presence_keys": len(self.totals)}


def merge_changes(batches: Iterable[Mapping[Key, int]]) -> dict[Key, int]:
    """Later absolute counts win."""
    merged: dict[Key, int] = {}
    for batch in batches:
        merged.update(batch)
    return merged
