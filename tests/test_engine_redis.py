"""The Redis engine's own behaviour, beyond the contract (tests/test_engine_contract.py).

Parsing and the subscription state machine are fed plain values; everything else runs
against a real redis-server (tests/redisserver.py), where a test plays a broken or hostile
Redis client by writing to Flow's keys and channels itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import pytest
import redis

import flow
from flowcore import protocol
from flowcore.engine import StreamHistory, server_engine
from flowcore.engines import redis as redis_engine
from flowcore.settings import load_settings
from support import base_env
from test_engine_contract import RecordingSink, browser_json, run, started, until


def settings_for(tmp_path, server, **overrides: object):
    return load_settings(base_env(tmp_path, FLOW_ENGINE="redis", FLOW_REDIS_URL=server.url, **overrides))


# ---------------------------------------------------------------- plain values


def test_frame_parts_make_the_browser_frame_up_to_its_data():
    frame = protocol.encode_push("ünï", "HELLO", {"a": [1, 2]}, 1 << 20)
    stream, head = redis_engine.frame_parts(frame)
    assert stream == "u:ünï".encode()
    whole = head + b',"seq":7,"epoch":"ab-1"}'
    redis_engine.check_frame(whole, 7, "ab-1")
    assert browser_json(protocol.encode_text_frame(whole)) == {
        "id": "HELLO", "username": "ünï", "data": {"a": [1, 2]}, "seq": 7, "epoch": "ab-1"}
    stream, head = redis_engine.frame_parts(protocol.encode_push("*", "NEWS", None, 1 << 20))
    assert stream == b"*" and head.endswith(b',"username":"*","data":null')


@pytest.mark.parametrize("frame, seq, epoch", [
    (b'{"id":"A","username":"u","data":1,"seq":2,"epoch":"e1"}', 3, "e1"),   # another seq
    (b'{"id":"A","username":"u","data":1,"seq":2,"epoch":"e1"}', 2, "e2"),   # another epoch
    (b'{"id":"A","username":"u","data":\xff,"seq":2,"epoch":"e1"}', 2, "e1"),  # not UTF-8
    (b'{"id":"A","username":"u","data":[,"seq":2,"epoch":"e1"}', 2, "e1"),    # not JSON
    (b'{"id":"A"}{"id":"B","seq":2,"epoch":"e1"}', 2, "e1"),                 # two values
    (b'{"id":' + b"[" * 5000 + b',"seq":2,"epoch":"e1"}', 2, "e1"),          # deep
    (b'{"id":"A","seq":2,"epoch":"e 1"}', 2, "e 1"),                          # not an epoch
    (b'{"id":"A","seq":0,"epoch":"e1"}', 0, "e1"),                            # not a seq
])
def test_frames_flow_did_not_make_are_refused(frame, seq, epoch):
    with pytest.raises(ValueError):
        redis_engine.check_frame(frame, seq, epoch)


def test_read_answers_parse_and_refuse_what_does_not_add_up():
    frame = b'{"id":"A","username":"u","data":1,"seq":%d,"epoch":"e1"}'
    mark = b"0f3a:9c-1:17"  # run id, the mark hash's id, the count
    reply = [b"e1", 3, 2, frame % 2, frame % 3, b"e9", 5, -1, mark]
    answer = redis_engine._parse_read(["u", "v"], {"u": (1, "e1"), "v": (0, "x")}, reply)
    assert answer == {
        "u": StreamHistory("e1", 3, [(2, protocol.encode_text_frame(frame % 2)),
                                      (3, protocol.encode_text_frame(frame % 3))]),
        "v": StreamHistory("e9", 5, None),
    }
    assert answer["u"].mark == answer["v"].mark == "0f3a:9c-1:17"
    for bad in ([b"e1", 3, 2, frame % 2, mark], [b"e1", 2, 2, frame % 2, frame % 3, mark],
                [b"e1", 3, 2, frame % 2, frame % 4, mark], [b"e1", 3, 0, b"extra", mark]):
        with pytest.raises(ValueError):
            redis_engine._parse_read(["u"], {"u": (1, "e1")}, bad)
    assert redis_engine._parse_read(["u"], {"u": (3, "e1")}, [b"e1", 3, 0, mark])["u"].mark == mark.decode()
    for bad in ([b"e1", 3, 0], [], [b"e1", 3, 0, b"not a mark"], [b"e1", 3, 0, 5], [b"e1", 3, 0, b"a:b:" + b"9" * 21]):
        with pytest.raises(ValueError, match="mark|more in the answer"):
            redis_engine._parse_read(["u"], {"u": (3, "e1")}, bad)


class Sink(RecordingSink):
    pass


def engine_with(settings, *streams: str) -> tuple[redis_engine.RedisServerEngine, Sink]:
    """An engine that is not started: its state machine is driven by hand."""
    engine = redis_engine.RedisServerEngine(settings)
    sink = Sink()
    engine._sink = sink
    engine._conn = object()  # "connected": commands are queued, not sent
    for stream in streams:
        engine.subscribe(stream)
    return engine, sink


def channel(stream: str) -> bytes:
    return b"flow:msg:u:" + stream.encode()


def test_a_confirmation_is_the_last_reply_due_for_its_channel(tmp_path):
    # subscribe, unsubscribe, subscribe again before Redis answered: the first
    # confirmation belongs to the first subscription, and must not start a position read.
    settings = load_settings(base_env(tmp_path, FLOW_ENGINE="redis"))
    engine, sink = engine_with(settings, "alice")
    engine.unsubscribe("alice")
    engine.subscribe("alice")
    assert engine._replies_due == {channel("alice"): 3}
    subscription = engine._subscriptions[channel("alice")]
    engine._on_reply([b"subscribe", channel("alice"), 1], sink)
    engine._on_reply([b"message", channel("alice"), b"1 e1 " + b'{"id":"A","seq":1,"epoch":"e1"}'], sink)
    engine._on_reply([b"unsubscribe", channel("alice"), 0], sink)
    assert subscription.state == redis_engine.SUBSCRIBING and engine._positions_due == []
    assert sink.events == []  # the old subscription's message is dropped: the position covers it


def test_messages_held_while_positioning_are_delivered_after_the_position_if_newer(tmp_path):
    settings = load_settings(base_env(tmp_path, FLOW_ENGINE="redis"))
    engine, sink = engine_with(settings, "alice")
    subscription = engine._subscriptions[channel("alice")]
    subscription.state = redis_engine.POSITIONING
    for seq in (4, 5, 6):
        frame = b'{"id":"A","username":"alice","data":1,"seq":%d,"epoch":"e1"}' % seq
        engine._on_reply([b"message", channel("alice"), b"%d e1 %s" % (seq, frame)], sink)
    sink.on_batch_start()
    engine._go_live(subscription, StreamHistory("e1", 5, None), sink)
    sink.on_batch_end()
    assert [e[:3] for e in sink.events] == [("position", "alice", 5), ("message", "alice", 6)]
    # Live now: a message in another epoch is not believed (anyone who can write to Redis
    # can publish it); it is held while the position is read again, which decides.
    scheduled: list[Any] = []
    engine._loop = type("Loop", (), {"create_task": lambda self, coro: scheduled.append(coro) or coro})()
    frame = b'{"id":"A","username":"alice","data":1,"seq":1,"epoch":"e2"}'
    sink.on_batch_start()
    engine._on_reply([b"message", channel("alice"), b"1 e2 " + frame], sink)
    sink.on_batch_end()
    assert sink.events[2:] == [] and subscription.state == redis_engine.POSITIONING
    assert engine._positions_due == [channel("alice")] and len(scheduled) == 1
    scheduled[0].close()
    sink.on_batch_start()
    engine._go_live(subscription, StreamHistory("e1", 6, None), sink)  # Redis still says e1
    sink.on_batch_end()
    assert [e[:4] for e in sink.events[2:]] == [("position", "alice", 6, "e1")]  # the forged one dropped
    assert sink.faults == []


# ---------------------------------------------------------------- against a real Redis


def test_hostile_channel_messages_are_dropped_with_one_warning(tmp_path, redis_server, caplog):
    settings = settings_for(tmp_path, redis_server)

    async def test() -> None:
        sink = RecordingSink()
        engine = server_engine(settings)
        await engine.start(sink)
        try:
            engine.subscribe("alice")
            await until(lambda: sink.position("alice"), message="alice's position")
            seq, epoch = sink.position("alice")
            client = redis_server.client()
            for payload in (b"garbage", b"x e1 {}", b"%d %s not json" % (seq + 1, epoch.encode()),
                            b"%d %s " % (seq + 1, epoch.encode()) + b'{"id":"A","data":\xff,"seq":%d,"epoch":"%s"}'
                            % (seq + 1, epoch.encode()),
                            b"%d %s " % (seq + 1, epoch.encode()) + b'{"id":' + b"[" * 5000):
                client.publish(b"flow:msg:u:alice", payload)
            publisher = flow.Flow(settings=settings, linger=2)
            publisher.push("alice", "GOOD", 1)
            publisher.close()
            await until(lambda: sink.messages("alice"), message="the good message")
            [(_, _, got_seq, got_epoch, wire)] = sink.messages("alice")
            assert (got_seq, got_epoch) == (seq + 1, epoch) and browser_json(wire)["id"] == "GOOD"
        finally:
            await engine.close()

    with caplog.at_level(logging.WARNING, logger="flow.engine.redis"):
        run(test)
    warnings = [r for r in caplog.records if "dropped a malformed message" in r.getMessage()]
    assert len(warnings) == 1 and not any(r.exc_info for r in caplog.records)


def test_a_failing_sink_is_logged_and_delivery_goes_on(tmp_path, redis_server, caplog):
    settings = settings_for(tmp_path, redis_server)

    class Failing(RecordingSink):
        def on_message(self, stream: str, seq: int, epoch: str, wire: bytes) -> None:
            if stream == "bad":
                raise RuntimeError("a bug in the sink")
            super().on_message(stream, seq, epoch, wire)

    async def test() -> None:
        sink = Failing()
        engine = server_engine(settings)
        await engine.start(sink)
        try:
            for stream in ("bad", "good"):
                engine.subscribe(stream)
            await until(lambda: sink.position("bad") and sink.position("good"), message="positions")
            publisher = flow.Flow(settings=settings, linger=2)
            for i in range(3):
                publisher.push("bad", "X", i)
                publisher.push("good", "Y", i)
            publisher.close()
            await until(lambda: len(sink.messages("good")) == 3, message="good's messages")
        finally:
            await engine.close()

    with caplog.at_level(logging.ERROR):
        run(test)
    failures = [r for r in caplog.records if "the sink failed" in r.getMessage()]
    assert len(failures) == 3 and all(r.exc_info for r in failures)


def test_live_follows_the_probes(tmp_path, redis_server):
    settings = settings_for(tmp_path, redis_server, FLOW_REDIS_PROBE="0.1")

    async def test() -> None:
        engine = server_engine(settings)
        assert not engine.live
        await engine.start(RecordingSink())
        try:
            await until(lambda: engine.live, message="live")
            redis_server.pause()
            try:
                await until(lambda: not engine.live, message="not live while Redis is stopped")
            finally:
                redis_server.resume()
            await until(lambda: engine.live, 20, message="live again")
        finally:
            await engine.close()
        assert not engine.live

    run(test)


def test_a_full_redis_still_answers_the_probe_and_its_mark(tmp_path, make_redis, caplog):
    """Under noeviction a full Redis refuses writes (and script calls that may write): the
    probe, which says whether the link hears, must still run, or every server turns not
    live (/readyz 503) and replaces its link every few seconds."""
    server = make_redis(maxmemory="3mb")
    settings = settings_for(tmp_path, server, FLOW_REDIS_PROBE="0.1")
    client = server.client()

    async def test() -> None:
        async with started(settings, "alice") as (engine, _):
            await until(lambda: engine.live and engine.mark, message="live with a mark")
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                for n in range(10):
                    client.set(f"filler{n}".encode(), b"x" * 1_000_000)
            engine._mark = None
            caplog.clear()
            await engine._probe(10**6)  # as the probe loop does: publish, read the mark
            assert engine.mark is not None
            assert not [r for r in caplog.records if "probe" in r.getMessage()]
            await until(lambda: engine.live, message="live")

    run(test)


def test_a_missing_mark_hash_is_no_mark():
    # Deleted, P:mark reads "-" as its id each time: two such readings say nothing of what
    # was numbered between them, so the hub asks.
    assert redis_engine._mark_text(b"0f3a:-:0") is None
    assert redis_engine._mark_text(b"0f3a:9c-:4") == "0f3a:9c-:4"


@pytest.mark.parametrize("persistence, fsync, durable", [("aof", "always", True), ("aof", "everysec", False),
                                                          ("rdb", None, False)])
def test_epochs_are_kept_across_a_restart_only_when_every_write_is_fsynced(
        tmp_path, make_redis, persistence, fsync, durable):
    extra = [f"appendfsync {fsync}"] if fsync else []
    server = make_redis(persistence=persistence, extra_config=extra)
    settings = settings_for(tmp_path, server)
    assert redis_engine.persistence_token(server.client()).endswith(":1" if durable else ":0")

    async def test() -> None:
        sink = RecordingSink()
        engine = server_engine(settings)
        await engine.start(sink)
        try:
            engine.subscribe("alice")
            await until(lambda: sink.position("alice"), message="alice's position")
            publisher = flow.Flow(settings=settings, linger=2)
            for i in range(3):
                publisher.push("alice", "M", i)
            assert publisher.flush(5) == 0
            await until(lambda: len(sink.messages("alice")) == 3, message="three messages")
            before = sink.position("alice")[1]
            mark = len(sink.events)
            await asyncio.get_running_loop().run_in_executor(None, server.restart)
            # The engine re-subscribes by itself; its new position answers the subscription.
            await until(lambda: sink.position("alice", mark), message="a position after the restart")
            assert sink.position("alice", mark) == ((3, before) if durable else (0, sink.position("alice", mark)[1]))
            answer = await until_answer(engine, {"alice": (3, before)})
            if durable:
                assert answer["alice"] == StreamHistory(before, 3, [])
                history = await engine.history({"alice": (0, before)}, 1 << 20)
                assert history is not None and [s for s, _ in history["alice"].messages or []] == [1, 2, 3]
            else:
                # Redis may have lost writes: a new epoch, and the old position is not recovered.
                assert answer["alice"].epoch != before and answer["alice"].messages is None
            publisher.push("alice", "AFTER", 1)
            publisher.close()
            await until(lambda: sink.messages("alice")[-1][4].find(b'"AFTER"') > 0, message="the push after")
            last = sink.messages("alice")[-1]
            assert (last[2], last[3] == before) == ((4, True) if durable else (1, False))
        finally:
            await engine.close()

    run(test)


async def until_answer(engine: Any, wanted: dict[str, tuple[int, str]]) -> dict[str, StreamHistory]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while True:
        answer = await engine.history(wanted, 0)
        if answer is not None:
            return answer
        assert loop.time() < deadline, "no history answer after the restart"
        await asyncio.sleep(0.05)


def test_a_publisher_report_and_refusals_never_show_the_password(tmp_path, make_redis):
    server = make_redis(password="s3cret-pw")
    settings = settings_for(tmp_path, server, FLOW_PUSH_QUEUE="2")
    server.stop()
    publisher = flow.Flow(settings=settings, linger=0)
    publisher.push("alice", "A", 1)
    publisher.push("alice", "B", 2)
    with pytest.raises(flow.QueueFull) as info:
        publisher.push("alice", "C", 3)
    assert "s3cret-pw" not in str(info.value) and "2 are queued" in str(info.value)
    assert "s3cret-pw" not in repr(settings) and "s3cret-pw" not in settings.describe()
    publisher.close()


def test_a_wrong_password_is_one_clear_problem(tmp_path, make_redis):
    server = make_redis(password="right-pw")
    wrong = server.url.replace("right-pw", "wrong-pw")
    problem = redis_engine.link_problem(wrong)
    assert problem is not None and "wrong-pw" not in problem and "right-pw" not in problem
    assert "WRONGPASS" in problem or "invalid" in problem.lower()
    assert redis_engine.link_problem(server.url) is None


def test_forget_after_fork_starts_a_new_publisher(tmp_path, redis_server):
    settings = settings_for(tmp_path, redis_server)
    engine = redis_engine.RedisPublisherEngine(settings)
    engine.send(protocol.encode_push("alice", "A", 1, 1 << 20))
    assert engine.flush(5)
    parent_id, parent_client = engine._publisher_id, engine._client
    engine.forget_after_fork()
    assert engine._publisher_id != parent_id and engine._client is None and engine._sent == 0
    assert parent_client in redis_engine._abandoned  # never closed from here
    redis_engine._abandoned.remove(parent_client)
    assert parent_client is not None
    parent_client.close()
    engine.close()
    assert os.getpid()  # the process goes on


def test_the_database_number_of_the_url_holds_every_key(tmp_path, make_redis):
    """FLOW_REDIS_URL's /N: Flow's keys are there and nowhere else (another deployment may
    use database 0 of the same Redis)."""
    import redis as redis_py

    server = make_redis(db=3, password="db-pw")
    assert server.url.endswith("/3")
    settings = settings_for(tmp_path, server)

    async def test() -> None:
        sink = RecordingSink()
        engine = server_engine(settings)
        await engine.start(sink)
        try:
            engine.subscribe("alice")
            await until(lambda: sink.position("alice"), message="alice's position")
            publisher = flow.Flow(settings=settings, linger=2)
            publisher.push("alice", "IN DB 3", 1)
            publisher.close()
            await until(lambda: sink.messages("alice"), message="the message")
        finally:
            await engine.close()

    run(test)
    assert server.client().exists(b"flow:meta:u:alice", b"flow:hist:u:alice") == 2
    db0 = redis_py.Redis(host=server.host, port=server.port, password="db-pw", db=0)
    try:
        assert db0.dbsize() == 0
    finally:
        db0.close()


def test_a_server_subscribes_per_user_while_the_user_has_a_socket_and_never_by_pattern(tmp_path, redis_server):
    from pipeline import Pipeline, authenticate
    from support import wait_until

    pipe = Pipeline(tmp_path, servers=1, redis_url=redis_server.url)
    client = redis_server.client()

    def subscribers(user: str) -> int:
        return dict(client.pubsub_numsub(f"flow:msg:u:{user}".encode()))[f"flow:msg:u:{user}".encode()]

    try:
        async def scenario() -> None:
            tabs = [(await authenticate(pipe.url(), pipe.token("alice")))[0] for _ in range(2)]
            assert subscribers("alice") == 1  # one subscription for the server, not per tab
            assert subscribers("bob") == 0 and client.pubsub_numpat() == 0
            await tabs[0].close()
            wait_until(lambda: pipe.stats(0)["sockets"] == 1, 10, message="one tab gone")
            assert subscribers("alice") == 1  # the other tab still receives
            await tabs[1].close()

        asyncio.run(scenario())
        wait_until(lambda: subscribers("alice") == 0, 10, message="the subscription dropped with the last tab")
    finally:
        pipe.stop()
        client.close()


def test_an_idle_pub_sub_link_is_not_cut_by_the_clients_socket_timeout(tmp_path, redis_server, monkeypatch, caplog):
    """redis-py applies socket_timeout to every read; the pub/sub reader must wait for as long
    as nothing is published (here: no probe either, within the test)."""
    monkeypatch.setitem(redis_engine._CLIENT_OPTIONS, "socket_timeout", 0.3)
    settings = settings_for(tmp_path, redis_server, FLOW_REDIS_PROBE="30")

    async def test() -> None:
        sink = RecordingSink()
        engine = server_engine(settings)
        await engine.start(sink)
        try:
            engine.subscribe("alice")
            await until(lambda: sink.position("alice"), message="alice's position")
            mark = len(sink.events)
            await asyncio.sleep(1.2)  # idle on purpose: four socket timeouts' worth
            publisher = flow.Flow(settings=settings, linger=2)
            publisher.push("alice", "AFTER IDLE", 1)
            publisher.close()
            await until(lambda: sink.messages("alice", mark), message="the message after the idle time")
            assert sink.position("alice", mark) is None  # no re-subscription happened
        finally:
            await engine.close()

    with caplog.at_level(logging.WARNING, logger="flow.engine.redis"):
        run(test)
    assert [r.getMessage() for r in caplog.records if "pub/sub link" in r.getMessage()] == []
