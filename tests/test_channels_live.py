"""Channels on a running pool (PROTOCOL.md section 9), on each engine: real WebSocket
servers, the engine's real infrastructure, flow.publish, and a websockets client speaking
revision 2 ({"id": "AUTH"}, SUBSCRIBE, UNSUBSCRIBE)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from flowcore.channels import issue_subscription_token
from pipeline import Pipeline, recv_json
from support import wait_until


@pytest.fixture
def pipe(tmp_path, engine):
    pipeline = Pipeline(tmp_path, engine=engine, FLOW_HISTORY_SIZE="50", FLOW_MAX_CHANNELS="3")
    yield pipeline
    pipeline.stop()


async def revision2(url: str, token: str, **auth: Any) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(url)
    assert await recv_json(ws) == {"id": "AUTH REQUEST"}
    await ws.send(json.dumps({"id": "AUTH", "token": token, **auth}))
    ok = await recv_json(ws)
    assert ok["id"] == "AUTH OK", ok
    return ws, ok


async def frames_until(ws: ClientConnection, done, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Frames (heartbeats skipped) until ``done(frame)`` is true for one; all of them."""
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            frame = await recv_json(ws)
            got.append(frame)
            if done(frame):
                return got


async def nothing_more(ws: ClientConnection) -> list[dict[str, Any]]:
    """What arrives before a PONG to a PING sent now: the server writes in order, so
    anything routed to this socket before the PING shows up first."""
    await ws.send(json.dumps({"id": "PING"}))
    frames = await frames_until(ws, lambda f: f["id"] == "PONG")
    return frames[:-1]


def test_a_granted_channel_gets_its_messages_and_nobody_elses(pipe):
    async def run() -> None:
        ws, ok = await revision2(pipe.url(0), pipe.token("alice", extra={"channels": ["doc:*"]}))
        assert ok["max_channels"] == 3
        namesake, _ = await revision2(pipe.url(1), pipe.token("doc:1"))  # a user named like the channel
        try:
            await ws.send(json.dumps({"id": "SUBSCRIBE", "channel": "doc:1", "ref": 7}))
            [subscribed] = await frames_until(ws, lambda f: f["id"] == "SUBSCRIBE OK")
            assert subscribed["channel"] == "doc:1" and subscribed["ref"] == 7
            assert subscribed["recovered"] is False and isinstance(subscribed["epoch"], str)
            publisher = pipe.publisher()
            for i in range(3):
                publisher.publish("doc:1", "EDIT", {"i": i})
            publisher.publish("doc:2", "OTHER DOC", 1)
            publisher.push("alice", "MINE", 1)
            got = await frames_until(ws, lambda f: f["id"] == "MINE")
            channel_messages = [f for f in got if f.get("channel") == "doc:1"]
            assert [f["data"] for f in channel_messages] == [{"i": 0}, {"i": 1}, {"i": 2}]
            first = subscribed["seq"] + 1
            assert [f["seq"] for f in channel_messages] == [first, first + 1, first + 2]
            assert all(f["epoch"] == subscribed["epoch"] and "username" not in f for f in channel_messages)
            assert not [f for f in got if f["id"] == "OTHER DOC"]
            assert await nothing_more(namesake) == []  # the user "doc:1" got none of the channel's
        finally:
            await ws.close()
            await namesake.close()

    asyncio.run(run())


def test_every_refusal_is_answered_with_its_reason(pipe):
    async def run() -> None:
        ws, _ = await revision2(pipe.url(0), pipe.token("bob", extra={"channels": ["team:7:*"]}))
        try:
            cases = [
                ({"channel": "team:70:x"}, "forbidden", False),
                ({"channel": "team:7"}, "forbidden", False),
                ({"channel": "bad name!"}, "invalid_channel", False),
                ({"channel": "doc:9", "token": issue_subscription_token(pipe.settings, "carol", "doc:9")},
                 "token_invalid", False),
                ({"channel": "doc:9", "token": issue_subscription_token(pipe.settings, "bob", "doc:9", ttl=-60)},
                 "token_expired", True),
            ]
            for ref, (frame, reason, temporary) in enumerate(cases):
                await ws.send(json.dumps({"id": "SUBSCRIBE", "ref": ref, **frame}))
                [answer] = await frames_until(ws, lambda f: f["id"] == "SUBSCRIBE FAILED")
                assert (answer["reason"], answer["temporary"], answer["ref"]) == (reason, temporary, ref), frame
            # Granted by a subscription token of its own; then the limit (FLOW_MAX_CHANNELS=3).
            token = issue_subscription_token(pipe.settings, "bob", "doc:9")
            for channel, extra in (("doc:9", {"token": token}), ("team:7:a", {}), ("team:7:a:b", {})):
                await ws.send(json.dumps({"id": "SUBSCRIBE", "channel": channel, **extra}))
                await frames_until(ws, lambda f: f["id"] == "SUBSCRIBE OK")
            await ws.send(json.dumps({"id": "SUBSCRIBE", "channel": "doc:9", "token": token}))
            [again] = await frames_until(ws, lambda f: f["id"] == "SUBSCRIBE FAILED")
            assert again["reason"] == "already_subscribed"
            await ws.send(json.dumps({"id": "SUBSCRIBE", "channel": "team:7:c"}))
            [limit] = await frames_until(ws, lambda f: f["id"] == "SUBSCRIBE FAILED")
            assert limit["reason"] == "limit"
        finally:
            await ws.close()

    asyncio.run(run())


def test_nothing_of_a_channel_follows_unsubscribe_ok_and_upstream_follows_the_sockets(pipe):
    async def run() -> None:
        ws, _ = await revision2(pipe.url(0), pipe.token("dan", extra={"channels": ["room:1"]}))
        try:
            await ws.send(json.dumps({"id": "SUBSCRIBE", "channel": "room:1"}))
            await frames_until(ws, lambda f: f["id"] == "SUBSCRIBE OK")
            assert "\0room:1" in pipe.stats(0)["streams"]
            publisher = pipe.publisher()
            for i in range(200):
                publisher.publish("room:1", "TICK", i)
            await ws.send(json.dumps({"id": "UNSUBSCRIBE", "channel": "room:1", "ref": "u"}))
            got = await frames_until(ws, lambda f: f["id"] == "UNSUBSCRIBE OK")
            assert got[-1] == {"id": "UNSUBSCRIBE OK", "channel": "room:1", "ref": "u"}
            for i in range(5):
                publisher.publish("room:1", "AFTER", i)
            assert publisher.flush(5) == 0
            assert [f for f in await nothing_more(ws) if f.get("channel") == "room:1"] == []
            wait_until(lambda: "\0room:1" not in pipe.stats(0)["streams"], 10,
                       message="the server to drop its upstream subscription")
        finally:
            await ws.close()

    asyncio.run(run())


def test_subscribe_with_since_resumes_exactly_and_auth_restores_channels_in_one_round_trip(pipe):
    async def run() -> None:
        token = pipe.token("erin", extra={"channels": ["doc:*"]})
        ws, _ = await revision2(pipe.url(0), token)
        publisher = pipe.publisher()
        try:
            for channel in ("doc:a", "doc:b"):
                await ws.send(json.dumps({"id": "SUBSCRIBE", "channel": channel}))
                await frames_until(ws, lambda f: f["id"] == "SUBSCRIBE OK")
            for i in range(3):
                publisher.publish("doc:a", "A", i)
                publisher.publish("doc:b", "B", i)
            got = await frames_until(ws, lambda f: f.get("channel") == "doc:b" and f["data"] == 2)
            last = {c: max((f["seq"], f["epoch"]) for f in got if f.get("channel") == c) for c in ("doc:a", "doc:b")}
        finally:
            await ws.close()
        for i in range(3, 6):  # missed while away
            publisher.publish("doc:a", "A", i)
            publisher.publish("doc:b", "B", i)
        assert publisher.flush(5) == 0
        subscribe = {c: {"since": {"seq": s, "epoch": e}} for c, (s, e) in last.items()}
        back, _ = await revision2(pipe.url(1), token, subscribe=subscribe)
        try:
            got = await frames_until(back, lambda f: f.get("channel") == "doc:b" and f.get("data") == 5)
            oks = {f["channel"]: f for f in got if f["id"] == "SUBSCRIBE OK"}
            assert set(oks) == {"doc:a", "doc:b"}
            assert all(ok["recovered"] is True and ok["missed"] == 3 for ok in oks.values())
            for channel in ("doc:a", "doc:b"):
                data = [f["data"] for f in got if f.get("channel") == channel and f["id"] != "SUBSCRIBE OK"]
                assert data == [3, 4, 5]
            publisher.publish("doc:a", "A", 6)
            [live] = [f for f in await frames_until(back, lambda f: f.get("data") == 6) if f.get("channel")]
            assert live["seq"] == last["doc:a"][0] + 4
            # A since in another epoch (or past what history holds) is not recovered.
            await back.send(json.dumps({"id": "UNSUBSCRIBE", "channel": "doc:a"}))
            await frames_until(back, lambda f: f["id"] == "UNSUBSCRIBE OK")
            await back.send(json.dumps({"id": "SUBSCRIBE", "channel": "doc:a",
                                        "since": {"seq": 1, "epoch": "not-this-one"}}))
            [ok] = [f for f in await frames_until(back, lambda f: f["id"] == "SUBSCRIBE OK")]
            assert ok["recovered"] is False and ok["missed"] == 0
            assert [f for f in await nothing_more(back) if f.get("channel") == "doc:a"] == []
        finally:
            await back.close()

    asyncio.run(run())


def test_publishes_racing_a_subscribe_with_since_make_no_gap_and_no_duplicate(pipe):
    """Several pages of a channel's history owed, and publishes while it is read and written:
    every message once, in seq order, history before anything published after it."""
    pad = "x" * 64_000

    async def run() -> None:
        token = pipe.token("gus", extra={"channels": ["doc:*"]})
        publisher = pipe.publisher()
        ws, _ = await revision2(pipe.url(0), token)
        await ws.send(json.dumps({"id": "SUBSCRIBE", "channel": "doc:r"}))
        [start] = [f for f in await frames_until(ws, lambda f: f["id"] == "SUBSCRIBE OK")]
        await ws.close()
        for i in range(15):  # within the history of 50; about 1 MB
            publisher.publish("doc:r", "M", {"i": i, "pad": pad})
        assert publisher.flush(5) == 0
        back, _ = await revision2(pipe.url(1), token)
        try:
            await back.send(json.dumps({"id": "SUBSCRIBE", "channel": "doc:r",
                                        "since": {"seq": start["seq"], "epoch": start["epoch"]}}))
            for i in range(15, 25):  # racing the history read and its writing
                publisher.publish("doc:r", "M", {"i": i, "pad": pad})
            got = await frames_until(back, lambda f: f.get("channel") == "doc:r" and f.get("data", {}).get("i") == 24,
                                     timeout=30)
            [ok] = [f for f in got if f["id"] == "SUBSCRIBE OK"]
            assert ok["recovered"] is True and ok["missed"] >= 15, ok
            messages = [f for f in got if f["id"] == "M"]
            assert [f["data"]["i"] for f in messages] == list(range(25))
            assert [f["seq"] for f in messages] == list(range(start["seq"] + 1, start["seq"] + 26))
            assert {f["epoch"] for f in messages} == {start["epoch"]}
            assert [f for f in await nothing_more(back) if f.get("channel") == "doc:r"] == []
        finally:
            await back.close()

    asyncio.run(run())


def test_a_message_flow_page_never_sees_a_revision_2_frame(pipe):
    async def run() -> None:
        ws = await connect(pipe.url(0))
        try:
            assert await recv_json(ws) == {"id": "AUTH REQUEST"}
            await ws.send(pipe.token("fay", extra={"channels": ["doc:*"]}))  # the raw token, as message_flow
            ok = await recv_json(ws)
            assert ok["id"] == "AUTH OK" and "max_channels" not in ok
            pipe.publisher().publish("doc:1", "EDIT", 1)
            pipe.publisher().push("fay", "MINE", 1)
            got = await frames_until(ws, lambda f: f["id"] == "MINE")
            assert [f["id"] for f in got] == ["MINE"]
        finally:
            await ws.close()

    asyncio.run(run())


@pytest.mark.parametrize("channel", ["", "doc:", "a b", "doc:*", "x" * 256, "\0doc", "dóc", 5, None])
def test_publish_refuses_what_is_not_a_channel_in_the_caller(tmp_path, channel):
    import flow
    from flowcore.settings import load_settings
    from support import base_env

    publisher = flow.Flow(settings=load_settings(base_env(tmp_path)), linger=0)
    try:
        with pytest.raises(flow.InvalidMessage):
            publisher.publish(channel, "EDIT", 1)
        with pytest.raises(flow.InvalidMessage):
            publisher.publish("doc:1", "SUBSCRIBE OK", 1)  # a reserved id
        assert publisher.flush(0) == 0  # nothing was handed over
    finally:
        publisher.close()


def test_tokens_for_channels_from_the_public_api(tmp_path, monkeypatch):
    import flow
    from flowcore.channels import authorize, connection_grants
    from flowcore.settings import load_settings
    from flowcore.tokens import TokenVerifier
    from support import base_env

    env = base_env(tmp_path)
    monkeypatch.setattr(flow, "_default", flow.Flow(settings=load_settings(env), linger=0))
    verifier = TokenVerifier(load_settings(env))
    grants = connection_grants(verifier.verify_claims(flow.issue_token("gus", channels=["doc:*"])))
    assert grants.allows("doc:1") and not grants.allows("team:1")
    token = flow.issue_channel_token("gus", "team:1", ttl=60)
    assert authorize(grants, verifier, "gus", "team:1", token) > 0
    for bad in ("doc", ["doc:**"], [5]):
        with pytest.raises(ValueError, match="channels claim"):
            flow.issue_token("gus", channels=bad)
    with pytest.raises(ValueError, match="channel"):
        flow.issue_token("gus", channel="doc:1")  # that is a subscription token's claim
    with pytest.raises(flow.InvalidMessage):
        flow.issue_channel_token("gus", "not a channel")
    flow._default.close()


def test_disconnect_and_unsubscribe_reach_every_server_of_the_pool(pipe):
    from pipeline import closed_with

    async def run() -> None:
        token = pipe.token("hal", extra={"channels": ["doc:*"]})
        tabs = [(await revision2(pipe.url(i), token))[0] for i in (0, 1)]
        other, _ = await revision2(pipe.url(0), pipe.token("ida"))
        try:
            for tab in tabs:
                await tab.send(json.dumps({"id": "SUBSCRIBE", "channel": "doc:1"}))
                await frames_until(tab, lambda f: f["id"] == "SUBSCRIBE OK")
            publisher = pipe.publisher()
            publisher.unsubscribe("hal", "doc:1")
            for tab in tabs:
                [ended] = [f for f in await frames_until(tab, lambda f: f["id"] == "UNSUBSCRIBED")]
                assert ended == {"id": "UNSUBSCRIBED", "channel": "doc:1", "reason": "unsubscribed",
                                 "resubscribe": False}
            publisher.publish("doc:1", "AFTER", 1)
            publisher.push("hal", "STILL OPEN", 1)
            for tab in tabs:
                got = await frames_until(tab, lambda f: f["id"] == "STILL OPEN")
                assert [f["id"] for f in got] == ["STILL OPEN"]
            publisher.disconnect("hal")
            for tab in tabs:
                close = await closed_with(tab)
                assert close.code == 4004, close
            publisher.push("ida", "FOR IDA", 1)
            assert [f["id"] for f in await frames_until(other, lambda f: f["id"] == "FOR IDA")] == ["FOR IDA"]
        finally:
            for ws in (*tabs, other):
                await ws.close()

    asyncio.run(run())
