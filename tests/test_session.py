"""flowcore.session with plain values: no sockets, no processes, no event loop.

A session is fed frames and times; what it writes is read back from a FakeTransport.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest

from fakes import FakeClock, FakeTransport
from flowcore import protocol
from flowcore.session import CLOSED, OPEN, RESUMING, JoinRequest, JoinResult, Session
from flowcore.settings import load_settings
from flowcore.tokens import TokenVerifier, issue_token


class Stream:
    def __init__(self, name: str, seq: int = 0, epoch: str = "e1") -> None:
        self.name, self.seq, self.epoch = name, seq, epoch


class FakeHub:
    def __init__(self) -> None:
        self.dirty: list[Session] = []
        self.rescheduled = 0
        self.broadcast = Stream("*", 0, "eb")

    def mark_dirty(self, session: Session) -> None:
        self.dirty.append(session)

    def flush(self) -> None:
        dirty, self.dirty = self.dirty, []
        for session in dirty:
            session.flush()

    def reschedule(self, session: Session) -> None:
        self.rescheduled += 1

    def reconnect_window(self, closing: int) -> float:
        return 2.0

    def positions(self, own: Any) -> dict[str, tuple[int, str]]:
        return {own.name: (own.seq, own.epoch), "*": (self.broadcast.seq, self.broadcast.epoch)}


def wire(stream: str, seq: int, data: Any = None, epoch: str = "e1") -> bytes:
    body = {"id": "M", "username": stream, "data": data, "seq": seq, "epoch": epoch}
    return protocol.encode_text_frame(json.dumps(body).encode())


@pytest.fixture
def env(tmp_path):
    settings = load_settings({
        "FLOW_SECRET": secrets.token_hex(32), "FLOW_ENV_FILE": str(tmp_path / "none"),
        "FLOW_SECRET_FILE": str(tmp_path / "none"), "FLOW_EXPIRE_GRACE": "10",
        "FLOW_RATE_LIMIT": "10", "FLOW_RATE_BURST": "20", "FLOW_SEND_BACKLOG": "4096",
    })
    return settings


class Rig:
    def __init__(self, settings) -> None:
        import time

        self.settings = settings
        self.clock = FakeClock(time.time())
        self.transport = FakeTransport()
        self.hub = FakeHub()
        self.session = Session(self.transport, self.hub, settings, TokenVerifier(settings), "peer",
                               clock=self.clock)
        self.session.opened()

    def token(self, username: str, ttl: int = 60) -> str:
        return issue_token(self.settings, username, ttl=ttl)

    def open_as(self, username: str, resume: dict | None = None, positions=None, recovered=False,
                owed=None, missed=0, ttl: int = 60) -> Stream:
        frame = json.dumps({"id": "AUTH", "token": self.token(username, ttl), "resume": resume or {}})
        request = self.session.receive(frame)
        assert isinstance(request, JoinRequest) and request.username == username
        own = Stream(username, *(positions or {}).get(username, (0, "e1")))
        positions = positions or {username: (0, "e1"), "*": (0, "eb")}
        self.session.attached(JoinResult(own, positions, recovered, missed, owed or {}))
        self.session.resumed()
        return own


def test_opening_asks_for_a_token(env):
    rig = Rig(env)
    assert rig.transport.take() == [{"id": "AUTH REQUEST"}]


def test_a_raw_token_is_a_join_and_resume_names_only_own_streams(env):
    rig = Rig(env)
    rig.transport.take()
    assert rig.session.receive(rig.token("alice")) == JoinRequest("alice", {})
    other = Rig(env)
    frame = {"id": "AUTH", "token": other.token("bob"),
             "resume": {"bob": {"seq": 3, "epoch": "x"}, "*": {"seq": 1, "epoch": "y"},
                        "alice": {"seq": 9, "epoch": "z"}}}
    assert other.session.receive(json.dumps(frame)) == JoinRequest("bob", {"bob": (3, "x"), "*": (1, "y")})


def test_auth_ok_carries_streams_and_expiry_then_held_messages_follow_history(env):
    rig = Rig(env)
    rig.transport.take()
    request = rig.session.receive(rig.token("alice", ttl=120))
    assert request is not None
    # Live messages arriving while the hub joins are held back.
    rig.session.deliver_own(5, wire("alice", 5))
    rig.session.deliver_all(2, wire("*", 2))
    assert rig.transport.take() == []
    own = Stream("alice", 4)
    positions = {"alice": (4, "e1"), "*": (1, "eb")}
    rig.session.attached(JoinResult(own, positions, True, 3, {"alice": 2, "*": 1}))
    assert rig.session.stage == RESUMING
    [ok] = rig.transport.take()
    assert ok["id"] == "AUTH OK" and ok["recovered"] is True and ok["missed"] == 3
    assert ok["streams"] == {"alice": {"seq": 4, "epoch": "e1"}, "*": {"seq": 1, "epoch": "eb"}}
    assert 115 <= ok["expires_in"] <= 120
    for seq in (3, 4, 3):  # history, with a repeat
        rig.session.deliver_history(False, seq, wire("alice", seq))
    rig.session.flush()
    rig.session.resumed()
    rig.session.deliver_own(5, wire("alice", 5))  # the held copy went out already
    rig.hub.flush()
    got = [(m["username"], m["seq"]) for m in rig.transport.take()]
    assert got == [("alice", 3), ("alice", 4), ("alice", 5), ("*", 2)]
    assert rig.session.stage == OPEN


def test_without_recovery_messages_up_to_the_position_are_not_sent(env):
    rig = Rig(env)
    rig.transport.take()
    rig.session.receive(rig.token("alice"))
    rig.session.deliver_own(4, wire("alice", 4))  # numbered before the position AUTH OK gives
    rig.session.deliver_own(5, wire("alice", 5))
    own = Stream("alice", 4)
    rig.session.attached(JoinResult(own, {"alice": (4, "e1"), "*": (0, "eb")}, False, 0, {}))
    rig.session.resumed()
    rig.hub.flush()
    frames = rig.transport.take()
    assert frames[0]["recovered"] is False
    assert [m["seq"] for m in frames[1:]] == [5]


def test_bad_tokens_then_4001(env):
    rig = Rig(env)
    rig.transport.take()
    for attempt in range(env.auth_attempts):
        assert rig.session.receive("not-a-token") is None
    frames = rig.transport.take()
    assert frames[0] == {"id": "AUTH FAILED", "reason": "malformed"}
    assert frames.count({"id": "AUTH REQUEST"}) == env.auth_attempts - 1
    assert rig.transport.closed == (4001, "authentication failed")


def test_auth_timeout_closes_4002(env):
    rig = Rig(env)
    assert rig.session.deadline() == rig.clock.now + env.auth_timeout
    rig.clock.advance(env.auth_timeout - 0.01)
    rig.session.tick()
    assert rig.transport.closed is None
    rig.clock.advance(0.02)
    rig.session.tick()
    assert rig.transport.closed == (4002, "authentication timeout")


def test_websocket_pings_count_against_the_rate_limit(env):
    rig = Rig(env)
    for _ in range(env.rate_burst):
        rig.session.receive_ping()
    assert rig.transport.closed is None
    rig.session.receive_ping()
    assert rig.transport.closed == (4029, "rate limit")


def test_continuation_frames_count_against_the_rate_limit(env):
    # Old session: only complete messages were charged, so the empty fragments of a
    # message that never completes went on for ever.
    rig = Rig(env)
    rig.open_as("alice")
    rig.transport.take()
    for _ in range(env.rate_burst + 1):
        rig.session.receive_continuation()
    assert rig.transport.closed == (4029, "rate limit")


def test_pings_within_the_rate_pass(env):
    rig = Rig(env)
    for _ in range(200):
        rig.clock.advance(1 / env.rate_limit)
        rig.session.receive_ping()
    assert rig.transport.closed is None


@pytest.mark.parametrize("text", [
    "[" * 5000 + "]" * 5000,
    '{"a":' * 5000 + "1" + "}" * 5000,
    '{"id": "NOPE"}',
    "[1, 2]",
    '{"id": "AUTH"}',
    '{"id": "AUTH", "token": "x", "resume": {"a": {"seq": -1, "epoch": "e"}}}',
])
def test_hostile_frames_get_an_error_not_an_exception(env, text):
    rig = Rig(env)
    rig.transport.take()
    assert rig.session.receive(text) is None
    [frame] = rig.transport.take()
    assert frame["id"] == "ERROR" and isinstance(frame["reason"], str)
    assert rig.transport.closed is None


def test_expiry_asks_again_delivers_through_the_grace_and_closes_4003(env):
    rig = Rig(env)
    rig.transport.take()
    rig.open_as("alice", ttl=30)
    rig.transport.take()
    expires = rig.session.deadline()
    rig.clock.now = expires - 0.01
    rig.session.tick()
    assert rig.transport.take() == []
    rig.clock.now = expires
    rig.session.tick()
    assert rig.transport.take() == [{"id": "AUTH REQUEST", "reason": "expired"}]
    assert rig.session.deadline() == pytest.approx(expires + env.expire_grace)
    rig.session.deliver_own(1, wire("alice", 1))  # still delivered in the grace
    rig.hub.flush()
    assert [m["seq"] for m in rig.transport.take()] == [1]
    rig.clock.advance(env.expire_grace)
    rig.session.tick()
    assert rig.transport.closed == (4003, "token expired")
    assert rig.session.stage == CLOSED
    rig.session.deliver_own(2, wire("alice", 2))  # nothing after the grace
    rig.hub.flush()
    assert rig.transport.take() == []


def test_a_fresh_token_of_the_same_user_refreshes(env):
    rig = Rig(env)
    rig.transport.take()
    rig.open_as("alice", ttl=30)
    rig.transport.take()
    rig.clock.advance(31)
    rig.session.tick()
    rig.transport.take()
    # message_flow's client first sends its cached (expired) token, then fetches a new one.
    expired = issue_token(env, "alice", ttl=-60)
    rig.session.receive(expired)
    assert rig.transport.take() == [{"id": "AUTH FAILED", "reason": "expired"},
                                    {"id": "AUTH REQUEST", "reason": "expired"}]
    rig.session.receive(rig.token("alice", ttl=300))
    [ok] = rig.transport.take()
    assert ok["id"] == "AUTH OK" and ok["refreshed"] is True and ok["recovered"] is True
    import time

    skew = rig.clock.wall - time.time()  # the fake clock ran ahead of the token issuer's
    assert abs(ok["expires_in"] - (300 - skew)) <= 2
    assert rig.hub.rescheduled == 1
    rig.clock.advance(env.expire_grace + 1)
    rig.session.tick()
    assert rig.transport.closed is None  # the new token holds


def test_a_refresh_before_expiry_is_accepted_too(env):
    rig = Rig(env)
    rig.open_as("alice", ttl=30)
    rig.transport.take()
    rig.session.receive(json.dumps({"id": "AUTH", "token": rig.token("alice", ttl=600)}))
    [ok] = rig.transport.take()
    assert ok["refreshed"] is True and ok["expires_in"] >= 590


def test_a_token_for_another_user_closes_4001(env):
    rig = Rig(env)
    rig.open_as("alice", ttl=30)
    rig.session.receive(rig.token("mallory"))
    assert rig.transport.closed == (4001, "token for another user")


def test_live_messages_held_during_a_resume_are_bounded_and_refetched(env):
    rig = Rig(env)
    rig.transport.take()
    rig.session.receive(rig.token("alice"))
    big = "x" * 1000
    for seq in range(1, 10):  # over the 4096-byte backlog: dropped, not a 4008
        rig.session.deliver_own(seq, wire("alice", seq, big))
    assert rig.transport.closed is None and rig.session.held_bytes <= env.send_backlog
    own = Stream("alice", 0)
    rig.session.attached(JoinResult(own, {"alice": (0, "e1"), "*": (0, "eb")}, False, 0, {}))
    rig.transport.take()
    # The server fetches from history from where the socket is, then live delivery begins.
    assert rig.session.catch_up() == {"alice": 0, "*": 0}
    for seq in range(1, 10):
        rig.session.deliver_history(False, seq, wire("alice", seq))
    assert rig.session.catch_up() is None
    rig.session.resumed()
    rig.session.deliver_own(10, wire("alice", 10))
    rig.hub.flush()
    assert [m["seq"] for m in rig.transport.take()] == list(range(1, 11))


def test_messages_held_while_joining_up_to_the_position_are_not_kept(env):
    rig = Rig(env)
    rig.transport.take()
    rig.session.receive(rig.token("alice"))
    for seq in range(1, 4):
        rig.session.deliver_all(seq, wire("*", seq, "x" * 1000))
    rig.session.attached(JoinResult(Stream("alice"), {"alice": (0, "e1"), "*": (3, "eb")}, False, 0, {}))
    assert rig.session.held == [] and rig.session.held_bytes == 0


def test_dedupe_per_stream(env):
    rig = Rig(env)
    rig.open_as("alice")
    rig.transport.take()
    for seq in (1, 2, 2, 1, 3):
        rig.session.deliver_own(seq, wire("alice", seq))
    for seq in (1, 1, 2):
        rig.session.deliver_all(seq, wire("*", seq))
    rig.hub.flush()
    assert rig.transport.writes == 1  # one write for everything queued in a batch
    got = [(m["username"], m["seq"]) for m in rig.transport.take()]
    assert got == [("alice", 1), ("alice", 2), ("alice", 3), ("*", 1), ("*", 2)]


def test_stray_text_on_an_open_socket_is_an_error_not_a_failed_attempt(env):
    rig = Rig(env)
    rig.open_as("alice")
    rig.transport.take()
    for _ in range(env.auth_attempts + 1):
        rig.clock.advance(1)  # within the rate limit: errors cost more than frames
        rig.session.receive("hello")
    frames = rig.transport.take()
    assert {f["id"] for f in frames} == {"ERROR"}
    assert rig.transport.closed is None


def test_a_refresh_is_taken_while_history_is_still_being_written(env):
    rig = Rig(env)
    rig.transport.take()
    rig.session.receive(rig.token("alice"))
    own = Stream("alice", 0)
    rig.session.attached(JoinResult(own, {"alice": (0, "e1"), "*": (0, "eb")}, True, 0, {"alice": 0, "*": 0}))
    assert rig.session.stage == RESUMING
    rig.transport.take()
    rig.session.receive(rig.token("alice", ttl=600))
    [ok] = rig.transport.take()
    assert ok["id"] == "AUTH OK" and ok["refreshed"] is True


def test_a_refresh_with_a_token_already_past_exp_is_refused_even_within_the_leeway(env):
    rig = Rig(env)
    rig.open_as("alice", ttl=30)
    rig.transport.take()
    # message_flow re-sends its cached token at expiry; accepting it (the verifier's 5 s
    # leeway) would ask again at once, in a loop that ends in 4029.
    rig.session.receive(issue_token(env, "alice", ttl=-2))
    assert rig.transport.take()[0] == {"id": "AUTH FAILED", "reason": "expired"}


# ---------------------------------------------------------------- channels (section 9)


class ChannelHub(FakeHub):
    """FakeHub plus what a session asks of the hub for channels."""

    def __init__(self) -> None:
        super().__init__()
        self.left: list[str] = []

    def leave_channel(self, sub: Any) -> None:
        self.left.append(sub.name)


def channel_rig(env, **claims: Any) -> Rig:
    rig = Rig(env)
    rig.hub = rig.session.hub = ChannelHub()
    frame = {"id": "AUTH", "token": issue_token(env, "alice", ttl=60, extra=claims)}
    request = rig.session.receive(json.dumps(frame))
    assert isinstance(request, JoinRequest)
    rig.session.attached(JoinResult(Stream("alice"), {"alice": (0, "e1"), "*": (0, "eb")}, False, 0, {}))
    rig.session.resumed()
    rig.transport.take()
    return rig


def subscribe(rig: Rig, channel: str, **fields: Any):
    return rig.session.receive(json.dumps({"id": "SUBSCRIBE", "channel": channel, **fields}))


def channel_wire(channel: str, seq: int, data: Any = None, epoch: str = "c1") -> bytes:
    body = {"id": "M", "channel": channel, "data": data, "seq": seq, "epoch": epoch}
    return protocol.encode_text_frame(json.dumps(body).encode())


def test_a_granted_subscribe_is_a_request_and_its_answer_comes_first(env):
    from flowcore.session import ChannelJoin, SubscribeRequest

    rig = channel_rig(env, channels=["doc:*"])
    request = subscribe(rig, "doc:1", ref=3, since={"seq": 2, "epoch": "c1"})
    assert isinstance(request, SubscribeRequest) and request.since == (2, "c1")
    sub = request.sub
    sub.deliver(4, channel_wire("doc:1", 4, "held"))  # live, while the subscription is joining
    rig.session.channel_attached(sub, ChannelJoin((3, "c1"), True, 1, 2))
    rig.session.channel_history(sub, 3, channel_wire("doc:1", 3, "history"))
    rig.session.channel_resumed(sub)
    sub.deliver(4, channel_wire("doc:1", 4, "copy"))  # already delivered from the hold
    sub.deliver(5, channel_wire("doc:1", 5, "live"))
    rig.hub.flush()
    frames = rig.transport.take()
    assert frames[0] == {"id": "SUBSCRIBE OK", "channel": "doc:1", "seq": 3, "epoch": "c1", "recovered": True,
                         "missed": 1, "ref": 3}
    assert [f["data"] for f in frames[1:]] == ["history", "held", "live"]


@pytest.mark.parametrize("since", [None, {"seq": 999, "epoch": "c1"}], ids=["no-since", "since-unrecoverable"])
def test_a_subscription_without_a_resume_fetches_what_its_hold_dropped(env, since):
    # Old session: with no resume owed, nothing looked at the dropped hold, so the client
    # got SUBSCRIBE OK seq 5 and then whatever came after the drop (seq 54 on), silently.
    from flowcore.session import ChannelJoin

    rig = channel_rig(env, channels=["doc:*"])
    request = subscribe(rig, "doc:1", **({"since": since} if since else {}))
    sub = request.sub
    for seq in range(6, 60):  # live while joining: past FLOW_SEND_BACKLOG (4096 bytes)
        sub.deliver(seq, channel_wire("doc:1", seq, "x" * 100))
    assert sub.held_dropped
    sub.deliver(60, channel_wire("doc:1", 60, "after the drop"))
    after = rig.session.channel_attached(sub, ChannelJoin((5, "c1"), False, 0, None))
    assert after == 5
    for seq in range(6, 60):  # what the server then writes from history
        rig.session.channel_history(sub, seq, channel_wire("doc:1", seq, "history"))
    assert rig.session.channel_catch_up(sub) is None
    rig.session.channel_resumed(sub)
    rig.hub.flush()
    frames = rig.transport.take()
    assert (frames[0]["id"], frames[0]["seq"], frames[0]["recovered"]) == ("SUBSCRIBE OK", 5, False)
    assert [f["seq"] for f in frames[1:]] == list(range(6, 61))


def test_a_subscription_whose_hold_kept_everything_owes_no_history(env):
    from flowcore.session import ChannelJoin

    rig = channel_rig(env, channels=["doc:*"])
    sub = subscribe(rig, "doc:1").sub
    sub.deliver(6, channel_wire("doc:1", 6, "held"))
    assert rig.session.channel_attached(sub, ChannelJoin((5, "c1"), False, 0, None)) is None
    rig.session.channel_resumed(sub)
    rig.hub.flush()
    assert [f.get("seq") for f in rig.transport.take()] == [5, 6]


@pytest.mark.parametrize("claims, frame, reason, temporary", [
    ({"channels": ["doc:*"]}, {"channel": "team:1"}, "forbidden", False),
    ({"channels": ["doc:*"]}, {"channel": "doc"}, "forbidden", False),
    ({}, {"channel": "doc:1"}, "forbidden", False),
    ({"channels": ["doc:*"]}, {"channel": "doc:*"}, "invalid_channel", False),
    ({"channels": ["doc:*"]}, {"channel": "doc:1", "token": "not.a.jwt"}, "token_invalid", False),
])
def test_refusals_are_answered_with_their_reason_and_ref(env, claims, frame, reason, temporary):
    rig = channel_rig(env, **claims)
    assert subscribe(rig, ref="r", **frame) is None
    assert rig.transport.take() == [{"id": "SUBSCRIBE FAILED", "channel": frame["channel"], "reason": reason,
                                     "temporary": temporary, "ref": "r"}]
    assert rig.session.channels == {}


def test_a_subscription_token_grants_one_channel_until_its_expiry(env):
    from flowcore.channels import issue_subscription_token

    rig = channel_rig(env)
    request = subscribe(rig, "doc:9", token=issue_subscription_token(env, "alice", "doc:9", ttl=30))
    assert request is not None and request.sub.expires_at is not None
    assert rig.session.deadline() == pytest.approx(rig.clock.monotonic() + 30, abs=2)
    expired = issue_subscription_token(env, "alice", "doc:8", ttl=-60)
    assert subscribe(rig, "doc:8", token=expired) is None
    assert rig.transport.take()[-1]["reason"] == "token_expired"
    rig.clock.advance(31)
    rig.session.tick()
    assert rig.transport.take() == [{"id": "UNSUBSCRIBED", "channel": "doc:9", "reason": "token_expired",
                                     "resubscribe": True}]
    assert rig.session.channels == {} and rig.hub.left == ["doc:9"]
    assert rig.session.stage == OPEN  # the socket goes on


def test_already_subscribed_and_the_limit(env):
    import dataclasses

    env = dataclasses.replace(env, max_channels=3)
    rig = channel_rig(env, channels=["doc:*"])
    for i in range(env.max_channels):
        assert subscribe(rig, f"doc:{i}") is not None
    assert subscribe(rig, "doc:0") is None
    assert rig.transport.take()[-1]["reason"] == "already_subscribed"
    assert subscribe(rig, "doc:x") is None
    assert rig.transport.take()[-1]["reason"] == "limit"


def test_unsubscribe_ok_and_nothing_of_the_channel_after_it(env):
    from flowcore.session import ChannelJoin

    rig = channel_rig(env, channels=["doc:1"])
    sub = subscribe(rig, "doc:1").sub
    rig.session.channel_attached(sub, ChannelJoin((0, "c1"), False, 0, None))
    rig.session.channel_resumed(sub)
    rig.transport.take()
    rig.session.receive(json.dumps({"id": "UNSUBSCRIBE", "channel": "doc:1", "ref": 1}))
    sub.deliver(1, channel_wire("doc:1", 1))
    rig.hub.flush()
    assert rig.transport.take() == [{"id": "UNSUBSCRIBE OK", "channel": "doc:1", "ref": 1}]
    assert rig.hub.left == ["doc:1"]
    # Unsubscribing from a channel it does not have is answered too.
    rig.session.receive(json.dumps({"id": "UNSUBSCRIBE", "channel": "doc:2"}))
    assert rig.transport.take() == [{"id": "UNSUBSCRIBE OK", "channel": "doc:2"}]


def test_subscribes_in_auth_or_before_auth_ok_wait_for_it(env):
    rig = Rig(env)
    rig.hub = rig.session.hub = ChannelHub()
    rig.transport.take()
    frame = {"id": "AUTH", "token": issue_token(env, "alice", ttl=60, extra={"channels": ["doc:*"]}),
             "subscribe": {"doc:1": {"since": {"seq": 4, "epoch": "c1"}}, "team:1": {}}}
    assert isinstance(rig.session.receive(json.dumps(frame)), JoinRequest)
    assert subscribe(rig, "doc:2") is None  # joining: kept for after AUTH OK
    rig.session.attached(JoinResult(Stream("alice"), {"alice": (0, "e1"), "*": (0, "eb")}, False, 0, {}))
    rig.session.resumed()
    requests = rig.session.take_pending()
    assert [(r.sub.name, r.since) for r in requests] == [("doc:1", (4, "c1")), ("doc:2", None)]
    frames = rig.transport.take()
    assert frames[0]["id"] == "AUTH OK" and frames[0]["max_channels"] == env.max_channels
    assert frames[1:] == [{"id": "SUBSCRIBE FAILED", "channel": "team:1", "reason": "forbidden",
                           "temporary": False}]


def test_refusals_of_auths_own_map_are_one_log_line(env, caplog):
    # Old session: a line for each, uncharged: one 17 KB AUTH frame gave 1,024 warnings.
    rig = Rig(env)
    rig.hub = rig.session.hub = ChannelHub()
    rig.transport.take()
    names = [f"team:{i}" for i in range(200)]
    frame = {"id": "AUTH", "token": issue_token(env, "alice", ttl=60, extra={"channels": ["doc:*"]}),
             "subscribe": {name: {} for name in ["doc:1", *names]}}
    assert isinstance(rig.session.receive(json.dumps(frame)), JoinRequest)
    assert subscribe(rig, "team:x") is None  # a SUBSCRIBE frame of its own: its own line
    rig.session.attached(JoinResult(Stream("alice"), {"alice": (0, "e1"), "*": (0, "eb")}, False, 0, {}))
    rig.session.resumed()
    with caplog.at_level("INFO", logger="flow.websocket.client"):
        requests = rig.session.take_pending()
    assert [r.sub.name for r in requests] == ["doc:1"]
    frames = rig.transport.take()
    refused = [f["channel"] for f in frames if f.get("id") == "SUBSCRIBE FAILED"]
    assert refused == [*names, "team:x"]  # every one still answered
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2, warnings
    assert "'team:x' refused: forbidden" in warnings[0]
    assert "200 subscriptions of AUTH refused: 'team:0': forbidden" in warnings[1]
    assert rig.transport.closed is None


def test_a_refreshed_token_without_the_grant_revokes_the_channel(env):
    rig = channel_rig(env, channels=["doc:*", "team:1"])
    for channel in ("doc:1", "team:1"):
        assert subscribe(rig, channel) is not None
    rig.transport.take()
    rig.session.receive(json.dumps({"id": "AUTH", "token": issue_token(env, "alice", ttl=60,
                                                                       extra={"channels": ["doc:*"]})}))
    frames = rig.transport.take()
    assert {"id": "UNSUBSCRIBED", "channel": "team:1", "reason": "forbidden", "resubscribe": False} in frames
    assert set(rig.session.channels) == {"doc:1"}


def test_a_malformed_channels_claim_fails_the_whole_auth(env):
    rig = Rig(env)
    rig.transport.take()
    frame = {"id": "AUTH", "token": issue_token(env, "alice", ttl=60, extra={"channels": "doc:1"})}
    assert rig.session.receive(json.dumps(frame)) is None
    assert rig.transport.take()[0] == {"id": "AUTH FAILED", "reason": "malformed"}


def test_closing_ends_every_subscription(env):
    rig = channel_rig(env, channels=["doc:*"])
    subs = [subscribe(rig, f"doc:{i}").sub for i in range(2)]
    rig.session.closed()
    assert sorted(rig.hub.left) == ["doc:0", "doc:1"] and rig.session.channels == {}
    subs[0].deliver(1, channel_wire("doc:0", 1))
    assert rig.transport.take() == []
