"""SocketRing (websocket_server): the heartbeat reaches every socket once an interval,
a group at a time. No I/O."""

from __future__ import annotations

from websocket_server import SocketRing


class Sock:
    __slots__ = ("name", "ring_group")

    def __init__(self, name: str) -> None:
        self.name = name
        self.ring_group: int | None = None

    def __repr__(self) -> str:
        return self.name


def turns(ring: SocketRing, n: int) -> list[list[Sock]]:
    return [ring.take_turn() for _ in range(n)]


def test_every_socket_once_per_interval_and_groups_stay_small():
    ring = SocketRing(4)
    socks = [Sock(f"s{i}") for i in range(40)]
    for i, sock in enumerate(socks):
        ring.add(sock)
        if i % 10 == 9:
            ring.take_turn()  # sockets keep arriving while the heartbeat goes round
    assert len(ring) == 40 and sorted(ring, key=id) == sorted(socks, key=id)
    for _ in range(3):  # three whole intervals
        interval = turns(ring, 4)
        beaten = [s for group in interval for s in group]
        assert sorted(beaten, key=id) == sorted(socks, key=id)  # each exactly once
        assert max(map(len, interval)) == 10  # a quarter at a time, not all at once


def test_a_new_socket_waits_one_whole_interval():
    ring = SocketRing(8)
    turns(ring, 3)
    new = Sock("new")
    ring.add(new)
    later = turns(ring, 8)
    assert [i for i, group in enumerate(later) if new in group] == [7]


def test_discard_removes_and_is_idempotent():
    ring = SocketRing(3)
    a, b = Sock("a"), Sock("b")
    ring.add(a)
    ring.add(b)
    ring.discard(a)
    ring.discard(a)
    ring.discard(Sock("never added"))
    assert list(ring) == [b] and len(ring) == 1
    assert all(a not in group for group in turns(ring, 3))
