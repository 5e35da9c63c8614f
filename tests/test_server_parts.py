"""Parts of the WebSocket server that need no running server: SocketRing (the heartbeat
reaches every socket once an interval, a group at a time) and LazyDeque."""

from __future__ import annotations

from flowcore.hub import SocketRing


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


def test_a_new_socket_waits_one_whole_interval_when_the_groups_are_even():
    ring = SocketRing(8)
    turns(ring, 3)
    new = Sock("new")
    ring.add(new)
    later = turns(ring, 8)
    assert [i for i, group in enumerate(later) if new in group] == [7]
    for i in range(7):  # one in each group now
        ring.add(Sock(f"s{i}"))
    assert sorted(map(len, ring.groups)) == [1] * 8
    newer = Sock("newer")
    ring.add(newer)
    assert [i for i, group in enumerate(turns(ring, 8)) if newer in group] == [7]


def test_sockets_that_arrive_together_are_spread_over_the_interval():
    # 1,000 sockets authenticated within one heartbeat tick (a reconnect herd) used to
    # all join the same group: that turn wrote 1,000 heartbeats at once, a stall of
    # several ms for every message behind it.
    ring = SocketRing(32)
    turns(ring, 5)
    herd = [Sock(f"h{i}") for i in range(1000)]
    for sock in herd:
        ring.add(sock)
    interval = turns(ring, 32)
    assert sorted(s.name for group in interval for s in group) == sorted(s.name for s in herd)
    assert max(map(len, interval)) - min(map(len, interval)) <= 1
    # Leaving keeps it so: who joins next fills the gaps.
    for sock in herd[:100]:
        ring.discard(sock)
    for i in range(100):
        ring.add(Sock(f"n{i}"))
    assert max(map(len, ring.groups)) - min(map(len, ring.groups)) <= 1


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


def test_lazy_deque_behaves_as_tornado_uses_a_deque():
    import collections

    from flowcore.compat import LazyDeque

    lazy, real = LazyDeque(), collections.deque()
    for q in (lazy, real):
        assert not q and len(q) == 0 and list(q) == []
        q.append((1, b"a"))
        q.append((2, b"b"))
    for q in (lazy, real):
        assert q and len(q) == 2 and q[0] == (1, b"a") and q[-1] == (2, b"b")
        assert list(q) == [(1, b"a"), (2, b"b")]
        assert q.popleft() == (1, b"a") and q.popleft() == (2, b"b")
        assert not q
    for q in (lazy, real):
        for op in (q.popleft, lambda: q[0]):
            try:
                op()
            except IndexError:
                pass
            else:
                raise AssertionError("an empty deque raises IndexError")
    lazy.append(1)
    lazy.clear()
    assert not lazy and lazy._items is None  # holds nothing once empty


def test_open_sockets_get_lazy_deques():
    # The swap leans on tornado internals: if an upgrade renames them, this fails
    # instead of W3 quietly growing.
    import socket

    import tornado.iostream

    from flowcore.compat import LazyDeque, slim_stream

    a, b = socket.socketpair()
    try:
        async def run():
            stream = tornado.iostream.IOStream(a)
            slim_stream(stream)
            assert isinstance(stream._write_futures, LazyDeque)
            assert isinstance(stream._write_buffer._buffers, LazyDeque)
            await stream.write(b"x" * 100_000)  # buffered writes still work
            stream.close()

        import asyncio

        received = bytearray()
        b.setblocking(False)

        async def main():
            task = asyncio.ensure_future(run())
            while len(received) < 100_000:
                received.extend(await asyncio.get_running_loop().sock_recv(b, 65536))
            await task

        asyncio.run(asyncio.wait_for(main(), 10))
        assert bytes(received) == b"x" * 100_000
    finally:
        a.close()
        b.close()


def test_compat_check_names_a_missing_internal(monkeypatch):
    import pytest
    import tornado.iostream

    from flowcore import compat

    compat.check()  # the pinned versions have everything
    monkeypatch.delattr(tornado.iostream.BaseIOStream, "writing")
    with pytest.raises(compat.CompatError) as refused:
        compat.check()
    assert "tornado.iostream.IOStream.writing" in str(refused.value)
    assert "requirements.txt" in str(refused.value)


def test_compat_check_warns_once_for_another_version(monkeypatch, caplog):
    import tornado

    from flowcore import compat

    monkeypatch.setattr(tornado, "version", "6.99")
    with caplog.at_level("WARNING", logger="flow.compat"):
        compat.check()
    assert [r.getMessage() for r in caplog.records if "6.99" in r.getMessage()], caplog.records


def test_freeze_startup_takes_what_exists_out_of_full_collections():
    import gc
    import weakref

    from flowcore.runtime import freeze_startup

    class Thing:
        pass

    built_at_start = [Thing() for _ in range(10)]
    first = weakref.ref(built_at_start[0])
    try:
        freeze_startup()
        assert gc.get_freeze_count() > 0
        assert not any(obj is built_at_start for obj in gc.get_objects())
        later = [Thing()]
        assert any(obj is later for obj in gc.get_objects())
        del built_at_start[:]
        assert first() is None  # frozen things are still freed by reference counting
    finally:
        gc.unfreeze()
