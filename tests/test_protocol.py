"""Unit tests for flowcore.protocol: plain strings and bytes, no sockets."""

from __future__ import annotations

import json
import random
import struct

import orjson
import pytest

from flowcore import protocol
from flowcore.settings import Settings
from flowcore.tokens import TokenError, TokenVerifier
from flowcore.protocol import (
    BROADCAST,
    RESERVED_IDS,
    Authenticate,
    HistoryRequest,
    Ping,
    ProtocolError,
    Push,
    StreamHistory,
    auth_failed,
    auth_ok,
    auth_request,
    build_history_reply,
    build_history_request,
    build_message_frame,
    build_ping_request,
    check_message_id,
    check_username,
    decode_delivery,
    decode_push,
    encode_push,
    encode_text_frame,
    error,
    message_frame,
    parse_client_frame,
    parse_history_reply,
    parse_history_request,
    pong,
    stream_of_topic,
    sync_frame,
    topic,
)

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJ1c2VybmFtZSI6ImFsaWNlIn0.c2lnbmF0dXJl"
MAX = 1 << 20


# ---------------------------------------------------------------- client frames


class TestParseClientFrame:
    def test_raw_token_message_flow_style(self):
        frame = parse_client_frame(TOKEN)
        assert frame == Authenticate(TOKEN)
        assert frame.resume == {}

    def test_raw_token_is_stripped(self):
        assert parse_client_frame(f"  {TOKEN}\n") == Authenticate(TOKEN)

    def test_raw_garbage_goes_to_the_token_check(self):
        # Not JSON, not the heartbeat: the token check decides (AUTH FAILED malformed).
        assert parse_client_frame("hello") == Authenticate("hello")

    def test_heartbeat(self):
        frame = parse_client_frame("<3")
        assert frame == Ping(heartbeat=True)
        assert frame.heartbeat is True

    def test_ping(self):
        frame = parse_client_frame('{"id": "PING"}')
        assert isinstance(frame, Ping)
        assert frame.heartbeat is False

    def test_auth_without_resume(self):
        frame = parse_client_frame(json.dumps({"id": "AUTH", "token": TOKEN}))
        assert frame == Authenticate(TOKEN, {}, revision2=True)

    def test_auth_with_null_resume(self):
        frame = parse_client_frame(json.dumps({"id": "AUTH", "token": TOKEN, "resume": None}))
        assert frame == Authenticate(TOKEN, {}, revision2=True)

    def test_auth_with_resume(self):
        text = json.dumps(
            {
                "id": "AUTH",
                "token": TOKEN,
                "resume": {"alice": {"seq": 41, "epoch": "e1"}, "*": {"seq": 0, "epoch": "e2"}},
            }
        )
        frame = parse_client_frame(text)
        assert isinstance(frame, Authenticate)
        assert frame.token == TOKEN
        assert frame.resume == {"alice": (41, "e1"), "*": (0, "e2")}
        assert all(type(seq) is int for seq, _ in frame.resume.values())

    def test_auth_with_empty_resume(self):
        frame = parse_client_frame('{"id":"AUTH","token":"t.t.t","resume":{}}')
        assert frame == Authenticate("t.t.t", {}, revision2=True)

    @pytest.mark.parametrize(
        "resume",
        [
            {"alice": {"seq": -1, "epoch": "e"}},
            {"alice": {"seq": True, "epoch": "e"}},
            {"alice": {"seq": False, "epoch": "e"}},
            {"alice": {"seq": 1.5, "epoch": "e"}},
            {"alice": {"seq": 1.0, "epoch": "e"}},
            {"alice": {"seq": "41", "epoch": "e"}},
            {"alice": {"seq": None, "epoch": "e"}},
            {"alice": {"epoch": "e"}},
            {"alice": {"seq": 1, "epoch": 7}},
            {"alice": {"seq": 1, "epoch": None}},
            {"alice": {"seq": 1}},
            {"alice": [1, "e"]},
            {"alice": 41},
            {"alice": "41"},
            {"alice": {"seq": 1, "epoch": "e"}, "*": {"seq": -5, "epoch": "e"}},
            [{"seq": 1, "epoch": "e"}],
            "alice",
            41,
            True,
        ],
    )
    def test_bad_resume_shapes(self, resume):
        text = json.dumps({"id": "AUTH", "token": TOKEN, "resume": resume})
        with pytest.raises(ProtocolError):
            parse_client_frame(text)

    @pytest.mark.parametrize("token", [None, 12, ["a"], {"t": 1}, True])
    def test_auth_needs_a_string_token(self, token):
        with pytest.raises(ProtocolError, match="token"):
            parse_client_frame(json.dumps({"id": "AUTH", "token": token}))

    def test_auth_without_token(self):
        with pytest.raises(ProtocolError, match="token"):
            parse_client_frame('{"id": "AUTH"}')

    @pytest.mark.parametrize("frame_id", ["HELLO", "auth", "ping", "AUTH OK", 5, ""])
    def test_unknown_id(self, frame_id):
        with pytest.raises(ProtocolError, match="unknown frame id"):
            parse_client_frame(json.dumps({"id": frame_id, "token": TOKEN}))

    def test_object_without_id(self):
        with pytest.raises(ProtocolError, match="no id"):
            parse_client_frame('{"token": "a.b.c"}')

    @pytest.mark.parametrize("text", ["[]", "[1, 2]", '[{"id": "PING"}]', '  ["AUTH"]  '])
    def test_json_array_is_refused(self, text):
        with pytest.raises(ProtocolError, match="not a JSON object"):
            parse_client_frame(text)

    @pytest.mark.parametrize("text", ["{", '{"id": "PING"', "{id: PING}", "{'id': 'PING'}", "{}}"])
    def test_invalid_json_starting_with_brace(self, text):
        with pytest.raises(ProtocolError, match="not valid JSON"):
            parse_client_frame(text)

    def test_error_messages_are_protocol_errors(self):
        assert issubclass(ProtocolError, ValueError)

    @pytest.mark.parametrize(
        "text",
        [
            "[" * 5000 + "]" * 5000,
            '{"a":' * 5000 + "1" + "}" * 5000,
            "[" * 100_000,
            '{"id":"AUTH","token":"a.b.c","resume":' + '{"a":' * 3000 + "1" + "}" * 3001,
        ],
    )
    def test_deep_nesting_is_refused(self, text):
        with pytest.raises(ProtocolError, match="nests too deep"):
            parse_client_frame(text)

    @pytest.mark.parametrize(
        "text",
        [
            '{"id":"AUTH","token":"\\ud800"}',
            '{"id":"AUTH","token":"a.b.c\\udfff"}',
            '{"id":"AUTH","token":"a.b.c","resume":{"\\udc80":{"seq":1,"epoch":"e"}}}',
            '{"id":"AUTH","token":"a.b.c","resume":{"a":{"seq":1,"epoch":"\\ud800x"}}}',
            '{"id":"PING","x":"\\udfff"}',
        ],
    )
    def test_lone_surrogate_escapes_are_refused(self, text):
        with pytest.raises(ProtocolError, match="not valid JSON"):
            parse_client_frame(text)

    @pytest.mark.parametrize("text", ['{"id":"PING","n":NaN}', '{"id":"PING","n":Infinity}', '{"id":-Infinity}'])
    def test_nan_and_infinity_are_not_json(self, text):
        with pytest.raises(ProtocolError, match="not valid JSON"):
            parse_client_frame(text)

    def test_duplicate_keys_the_last_wins(self):
        assert parse_client_frame('{"id":"AUTH","token":"x.y.z","id":"PING"}') == Ping(heartbeat=False)
        assert parse_client_frame('{"id":"AUTH","token":5,"token":"x.y.z"}') == Authenticate("x.y.z", revision2=True)

    def test_resume_seq_beyond_64_bits_is_refused(self):
        text = '{"id":"AUTH","token":"a.b.c","resume":{"a":{"seq":18446744073709551616,"epoch":"e"}}}'
        with pytest.raises(ProtocolError, match="seq"):
            parse_client_frame(text)

    @pytest.mark.parametrize("frame_id", ["x" * 60_000, [[[["AUTH"]]]], {"id": "AUTH"}, 10**30])
    def test_error_messages_stay_short(self, frame_id):
        with pytest.raises(ProtocolError, match="unknown frame id") as info:
            parse_client_frame(json.dumps({"id": frame_id}))
        assert len(str(info.value)) < 100

    def test_deep_id_is_not_repr_ed(self):
        # Within orjson's depth limit, but deep enough that repr() would recurse too far.
        text = '{"id":' + "[" * 1020 + "]" * 1020 + "}"
        with pytest.raises(ProtocolError, match="unknown frame id of type list"):
            parse_client_frame(text)

    def test_long_resume_name_is_cut_in_the_message(self):
        text = json.dumps({"id": "AUTH", "token": "a.b.c", "resume": {"n" * 50_000: 1}})
        with pytest.raises(ProtocolError, match="resume") as info:
            parse_client_frame(text)
        assert len(str(info.value)) < 150

    @pytest.mark.parametrize("value", [None, b"<3", b'{"id":"PING"}', 5])
    def test_non_text_is_refused(self, value):
        with pytest.raises(ProtocolError, match="text"):
            parse_client_frame(value)


HOSTILE_FRAMES = [
    "", " ", "\n", "\0", " <3", "<3 ", "<3<3", "{}", "[]", "null", "1", '"AUTH"', "{", "}", "[", "]",
    "{}}", "[{]", '{"id":null}', '{"id":"AUTH","token":null}', '{"id":"AUTH","token":"a.b.c","resume":[]}',
    '{"id":"AUTH","token":"a.b.c","resume":{"a":{"seq":' + "9" * 5000 + ',"epoch":"e"}}}',
    '{"id":"AUTH","token":"a.b.c","resume":{"a":{"seq":1e400,"epoch":"e"}}}',
    '{"id":"AUTH","token":"a.b.c","resume":{"a":{"seq":-0,"epoch":"e"}}}',
    '{"id":"AUTH","token":"a.b.c","resume":{"a":{"seq":1E2,"epoch":"e"}}}',
    '{"id":"AUTH","token":"a.b.c","resume":{"a":{"seq":NaN,"epoch":"e"}}}',
    '{"id":' + "9" * 5000 + "}", '{"id":1e999}', '{"id":NaN}', "NaN", "Infinity", "-Infinity",
    '{"id":"PING","id":"AUTH","token":"a.b.c"}', '{"id":"AUTH","token":"a.b.c","token":5}',
    '{"id":"AUTH","token":"\\ud800"}', '{"id":"AUTH","token":"\\u0000"}', '{"id":"AUTH","token":"a\\u0000.b.c"}',
    '{"id":"AUTH","token":"' + "A" * 60_000 + '.b.c"}',
    '{"id":' + "[" * 1000 + "]" * 1000 + "}", '{"id":"' + "x" * 60_000 + '"}',
    '{"id":{"a":{"b":1}}}', '{"id":["AUTH"]}', '{"id":true}', '{"id":1e308}', '{"id":"AUTH","token":["a.b.c"]}',
    "\ud800", "a\udfffb", "\ud800.\udc00.x", "é.b.c", "\ufeff{}", '\ufeff{"id":"PING"}', "\x00{}",
    "\u2028{}", " \t\r\n{}\u3000", "\u3000<3",
    '{"id":"AUTH","token":"a.b.c"} trailing', '{"id":"AUTH","token":"a.b.c"}{"id":"PING"}',
    "{'id':'PING'}", '{"id":"PING",}', '{"id":"PING" "x":1}', '{"id":"\\x41"}',
    '{"id":"AUTH","token":"a.b.c","resume":{"a":{"seq":1,"epoch":"e","x":' + "[" * 900 + "]" * 900 + "}}}",
    "[" * 5000 + "]" * 5000, '{"a":' * 5000 + "1" + "}" * 5000, "[" * 60_000, '{"' * 30_000, "{" * 60_000,
    '"' + "\\" * 60_000, '{"id":"' + "\\u" * 10_000 + '"}',
]


@pytest.mark.parametrize("text", HOSTILE_FRAMES, ids=range(len(HOSTILE_FRAMES)))
def test_hostile_frames_give_a_frame_or_protocol_error(text):
    """Whatever a client sends ends as a frame the server can act on, or a short ProtocolError."""
    try:
        frame = parse_client_frame(text)
    except ProtocolError as exc:
        assert len(str(exc)) < 200  # it goes back to the client and into the log
        return
    assert isinstance(frame, (Authenticate, Ping))
    if isinstance(frame, Authenticate):
        # The token check refuses it cleanly (none of these is a token), whatever it holds.
        with pytest.raises(TokenError):
            TokenVerifier(Settings(secret="k" * 32)).verify_claims(frame.token)
        for name, (seq, epoch) in frame.resume.items():
            name.encode("utf-8"), epoch.encode("utf-8")
            assert type(seq) is int and seq >= 0


def test_looks_like_jwt():
    assert protocol.looks_like_jwt(TOKEN)
    assert protocol.looks_like_jwt("a.b.")
    assert not protocol.looks_like_jwt("a.b")
    assert not protocol.looks_like_jwt("a b.c.d")
    assert not protocol.looks_like_jwt("")


# ---------------------------------------------------------------- server frames


class TestServerFrames:
    def test_auth_request(self):
        assert json.loads(auth_request()) == {"id": "AUTH REQUEST"}

    def test_auth_ok_fields_and_types(self):
        obj = json.loads(auth_ok("alice", "e1", 45.0, True, 3))
        assert obj == {
            "id": "AUTH OK",
            "username": "alice",
            "epoch": "e1",
            "heartbeat": 45,
            "recovered": True,
            "missed": 3,
        }
        assert type(obj["heartbeat"]) is int
        assert type(obj["recovered"]) is bool
        assert type(obj["missed"]) is int

    def test_auth_ok_integral_heartbeat_is_written_as_integer(self):
        text = auth_ok("alice", "e1", 45.0, False, 0)
        assert '"heartbeat":45,' in text
        assert "45.0" not in text

    def test_auth_ok_fractional_heartbeat(self):
        obj = json.loads(auth_ok("alice", "e1", 0.5, False, 0))
        assert obj["heartbeat"] == 0.5
        assert type(obj["heartbeat"]) is float
        assert obj["recovered"] is False
        assert obj["missed"] == 0

    def test_auth_ok_int_heartbeat(self):
        obj = json.loads(auth_ok("bob", "e", 30, False, 0))
        assert obj["heartbeat"] == 30 and type(obj["heartbeat"]) is int

    def test_auth_ok_unicode_username(self):
        obj = json.loads(auth_ok('zoë "q"\\', "e", 1, False, 0))
        assert obj["username"] == 'zoë "q"\\'

    @pytest.mark.parametrize("reason", ["expired", "invalid", "malformed"])
    def test_auth_failed(self, reason):
        assert json.loads(auth_failed(reason)) == {"id": "AUTH FAILED", "reason": reason}

    def test_pong(self):
        assert json.loads(pong()) == {"id": "PONG"}

    def test_error(self):
        assert json.loads(error('bad "frame"\n')) == {"id": "ERROR", "reason": 'bad "frame"\n'}

    def test_frames_are_str(self):
        for text in (auth_request(), auth_ok("a", "e", 1, True, 0), auth_failed("x"), pong(), error("x")):
            assert isinstance(text, str)
            assert isinstance(json.loads(text), dict)


# ---------------------------------------------------------------- WebSocket framing


def _parse_ws_frame(frame: bytes) -> tuple[int, bool, bytes]:
    """Minimal RFC 6455 reader: (opcode, fin, payload); insists on no mask, no RSV."""
    b0, b1 = frame[0], frame[1]
    assert b0 & 0x70 == 0, "RSV bits must be clear"
    assert b1 & 0x80 == 0, "server frames must not be masked"
    length = b1 & 0x7F
    offset = 2
    if length == 126:
        (length,) = struct.unpack("!H", frame[2:4])
        offset = 4
    elif length == 127:
        (length,) = struct.unpack("!Q", frame[2:10])
        assert length >> 63 == 0
        offset = 10
    payload = frame[offset:]
    assert len(payload) == length
    return b0 & 0x0F, bool(b0 & 0x80), payload


class TestEncodeTextFrame:
    @pytest.mark.parametrize(
        "length, header",
        [
            (0, b"\x81\x00"),
            (1, b"\x81\x01"),
            (125, b"\x81\x7d"),
            (126, b"\x81\x7e\x00\x7e"),
            (127, b"\x81\x7e\x00\x7f"),
            (65535, b"\x81\x7e\xff\xff"),
            (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
            (70000, b"\x81\x7f" + (70000).to_bytes(8, "big")),
        ],
    )
    def test_header_and_round_trip(self, length, header):
        payload = bytes(i % 251 for i in range(length))
        frame = encode_text_frame(payload)
        assert frame[: len(header)] == header
        assert frame[len(header) :] == payload
        assert len(frame) == len(header) + length
        opcode, fin, body = _parse_ws_frame(frame)
        assert opcode == 0x1 and fin
        assert body == payload

    def test_utf8_text(self):
        payload = '{"id":"x","data":"zoë ✓"}'.encode()
        opcode, fin, body = _parse_ws_frame(encode_text_frame(payload))
        assert body.decode("utf-8") == '{"id":"x","data":"zoë ✓"}'


# ---------------------------------------------------------------- identities


class TestCheckUsername:
    @pytest.mark.parametrize("name", ["alice", "1", "12", "zoë", "a b", "alice@example.com", "x" * 256, "é" * 128])
    def test_accepted(self, name):
        assert check_username(name) == name

    def test_empty(self):
        with pytest.raises(ProtocolError, match="empty"):
            check_username("")

    @pytest.mark.parametrize("name", [None, 1, b"alice", ["alice"], True])
    def test_non_string(self, name):
        with pytest.raises(ProtocolError, match="string"):
            check_username(name)

    def test_broadcast_is_reserved(self):
        with pytest.raises(ProtocolError, match="reserved"):
            check_username("*")

    @pytest.mark.parametrize("name", ["\0", "a\0", "a\0b"])
    def test_nul(self, name):
        with pytest.raises(ProtocolError, match="NUL"):
            check_username(name)

    @pytest.mark.parametrize("name", ["x" * 257, "é" * 129, "✓" * 86])
    def test_too_long(self, name):
        assert len(name.encode()) > 256
        with pytest.raises(ProtocolError, match="longer"):
            check_username(name)

    @pytest.mark.parametrize("name", ["\ud800", "a\udfffb", "\udc80"])
    def test_lone_surrogate(self, name):
        with pytest.raises(ProtocolError, match="Unicode"):
            check_username(name)

    def test_lone_surrogates_too_long(self):
        with pytest.raises(ProtocolError):
            check_username("\ud800" * 200)


class TestCheckMessageId:
    @pytest.mark.parametrize("mid", ["TASK DONE", "x", "x" * 256, "✓", "a\nb"])
    def test_accepted(self, mid):
        assert check_message_id(mid) == mid

    def test_empty(self):
        with pytest.raises(ProtocolError, match="empty"):
            check_message_id("")

    @pytest.mark.parametrize("mid", [None, 1, b"x", {"id": 1}, False])
    def test_non_string(self, mid):
        with pytest.raises(ProtocolError, match="string"):
            check_message_id(mid)

    def test_too_long(self):
        with pytest.raises(ProtocolError, match="longer"):
            check_message_id("x" * 257)

    @pytest.mark.parametrize("mid", sorted(RESERVED_IDS))
    def test_reserved(self, mid):
        with pytest.raises(ProtocolError, match="reserved"):
            check_message_id(mid)

    def test_reserved_ids_are_the_control_frames_ids(self):
        # PROTOCOL.md sections 3, 5 and 9.
        assert isinstance(RESERVED_IDS, frozenset)
        assert RESERVED_IDS == {
            "AUTH REQUEST", "AUTH OK", "AUTH FAILED", "PONG", "ERROR", "AUTH", "PING",
            "SUBSCRIBE", "SUBSCRIBE OK", "SUBSCRIBE FAILED", "UNSUBSCRIBE", "UNSUBSCRIBE OK",
            "UNSUBSCRIBED", "PRESENCE", "JOIN", "LEAVE", "REFRESH",
        }  # fmt: skip

    @pytest.mark.parametrize("mid", ["auth ok", "AUTH OK ", " PONG", "AUTH  OK", "JOINED", "ERRORS", "PING!"])
    def test_reserved_is_an_exact_match(self, mid):
        assert check_message_id(mid) == mid

    @pytest.mark.parametrize("mid", ["\ud800", "a\udfffb", "TASK \udc80", "\ud800" * 256])
    def test_lone_surrogate(self, mid):
        with pytest.raises(ProtocolError, match="Unicode"):
            check_message_id(mid)

    def test_str_subclass_is_judged_by_its_text(self):
        class Sneaky(str):
            def __hash__(self):
                return 0

            def __eq__(self, other):
                return False

        with pytest.raises(ProtocolError, match="reserved"):
            check_message_id(Sneaky("AUTH OK"))
        checked = check_message_id(Sneaky("fine"))
        assert type(checked) is str and checked == "fine"


class TestTopics:
    def test_user_topic(self):
        assert topic("alice") == b"ualice\0"
        assert topic("zoë") == b"uzo\xc3\xab\0"

    def test_broadcast_topic(self):
        assert topic(BROADCAST) == b"*\0"
        assert topic("*") != topic("u")

    @pytest.mark.parametrize("a, b", [("1", "12"), ("al", "alice"), ("a", "ab"), ("x", "x y")])
    def test_no_prefix_collisions(self, a, b):
        assert not topic(b).startswith(topic(a))
        assert not topic(a).startswith(topic(b))

    def test_user_topics_never_match_broadcast(self):
        for name in ("alice", "1", "*x", "x*"):
            assert not topic(name).startswith(topic(BROADCAST))
            assert not topic(BROADCAST).startswith(topic(name))

    @pytest.mark.parametrize("stream", ["alice", "1", "12", "zoë", "*", "x" * 256, "a*", "*a"])
    def test_round_trip(self, stream):
        assert stream_of_topic(topic(stream)) == stream

    @pytest.mark.parametrize(
        "raw",
        [
            b"",
            b"u",
            b"\0",
            b"u\0",  # empty username
            b"*",
            b"**\0",
            b"ualice",  # no NUL
            b"alice\0",  # no "u"
            b"xalice\0",
            b"u\xff\0",  # not UTF-8
            b"ua\0b\0",  # NUL inside
            b"u*\0",  # "*" is only the broadcast topic
        ],
    )
    def test_stream_of_topic_errors(self, raw):
        with pytest.raises(ProtocolError):
            stream_of_topic(raw)


# ---------------------------------------------------------------- publishing


class TestPush:
    def test_round_trip(self):
        raw = encode_push("alice", "TASK DONE", {"card": "ok", "n": [1, 2.5, None, True]}, MAX)
        assert isinstance(raw, bytes)
        assert raw.startswith(b"P1\0alice\0")
        push = decode_push(raw)
        assert push.stream == "alice"
        assert json.loads(push.id_json) == "TASK DONE"
        assert json.loads(push.data_json) == {"card": "ok", "n": [1, 2.5, None, True]}

    def test_unicode_round_trip(self):
        data = {"text": "zoë ✓ 😀 \u2028 \n \"q\"", "k\u00e9": "\\"}
        raw = encode_push("zoë", "ïd ✓\n", data, MAX)
        assert raw.startswith(b"P1\0" + "zoë".encode() + b"\0")
        push = decode_push(raw)
        assert push.stream == "zoë"
        assert json.loads(push.id_json) == "ïd ✓\n"
        assert json.loads(push.data_json) == data

    def test_broadcast(self):
        raw = encode_push(BROADCAST, "NEWS", {"headline": "h"}, MAX)
        assert raw.startswith(b"P1\0*\0")
        push = decode_push(raw)
        assert push.stream == "*"
        assert json.loads(push.data_json) == {"headline": "h"}

    @pytest.mark.parametrize("data", [None, 0, "", [], {}, "text", 1.5, False])
    def test_scalar_and_empty_data(self, data):
        push = decode_push(encode_push("alice", "x", data, MAX))
        assert json.loads(push.data_json) == data

    @pytest.mark.parametrize(
        "data",
        [{1, 2}, object(), float("nan"), float("inf"), -float("inf"), {"x": float("nan")}, b"bytes", {("a",): 1},
         "\ud800", {"k\udfff": 1}],
    )
    def test_non_json_data_refused(self, data):
        with pytest.raises(ProtocolError, match="JSON"):
            encode_push("alice", "x", data, MAX)

    def test_circular_data_refused(self):
        data: list = []
        data.append(data)
        with pytest.raises(ProtocolError):
            encode_push("alice", "x", data, MAX)

    @pytest.mark.parametrize("username", ["", None, 5, "a\0b", "x" * 257, "\ud800", ["a"], {"a": 1}])
    def test_bad_username_refused(self, username):
        with pytest.raises(ProtocolError):
            encode_push(username, "x", 1, MAX)

    @pytest.mark.parametrize("mid", ["", None, 5, "x" * 257, ["a"]])
    def test_bad_id_refused(self, mid):
        with pytest.raises(ProtocolError):
            encode_push("alice", mid, 1, MAX)

    def test_size_limit(self):
        limit = 100
        # body = '"x"' + '\n' + '"' + s + '"' -> 4 + len(s) + 2 bytes
        exact = encode_push("alice", "x", "a" * (limit - 6), limit)
        assert len(exact) - len(b"P1\0alice\0") == limit
        with pytest.raises(ProtocolError, match="limit"):
            encode_push("alice", "x", "a" * (limit - 5), limit)

    def test_size_limit_counts_bytes_not_chars(self):
        with pytest.raises(ProtocolError, match="limit"):
            encode_push("alice", "x", "✓" * 40, 100)  # 40 chars, 120 bytes
        encode_push("alice", "x", "✓" * 30, 100)

    def test_custom_serializer(self):
        calls = []

        def serializer(value):
            calls.append(value)
            return json.dumps({"wrapped": sorted(value)}).encode()

        push = decode_push(encode_push("alice", "x", {3, 1, 2}, MAX, serializer))
        assert calls == [{1, 2, 3}]
        assert json.loads(push.data_json) == {"wrapped": [1, 2, 3]}

    @pytest.mark.parametrize("exc", [TypeError("no"), ValueError("no")])
    def test_custom_serializer_errors_are_protocol_errors(self, exc):
        def serializer(value):
            raise exc

        with pytest.raises(ProtocolError, match="JSON"):
            encode_push("alice", "x", 1, MAX, serializer)

    def test_custom_serializer_output_is_size_checked(self):
        with pytest.raises(ProtocolError, match="limit"):
            encode_push("alice", "x", 1, 100, lambda v: b"1" * 200)

    @pytest.mark.parametrize("mid", sorted(RESERVED_IDS))
    @pytest.mark.parametrize("user", ["alice", BROADCAST])
    def test_reserved_id_refused(self, user, mid):
        with pytest.raises(ProtocolError, match="reserved"):
            encode_push(user, mid, 1, MAX)
        assert mid not in protocol.id_parts

    @pytest.mark.parametrize("mid", ["\ud800", "ok \udfff"])
    def test_lone_surrogate_id_refused(self, mid):
        with pytest.raises(ProtocolError, match="Unicode"):
            encode_push("alice", mid, 1, MAX)

    @pytest.mark.parametrize("data", ["\ud800", {"\udc80": 1}, ["ok", "a\udfffb"]])
    def test_lone_surrogate_data_refused(self, data):
        with pytest.raises(ProtocolError, match="JSON"):
            encode_push("alice", "x", data, MAX)

    @pytest.mark.parametrize("kind", ["list", "dict"])
    def test_deep_data_refused_as_too_deep(self, kind):
        data: object = 1
        for _ in range(100_000):
            data = [data] if kind == "list" else {"a": data}
        with pytest.raises(ProtocolError, match="nests too deep"):
            encode_push("alice", "x", data, 10 * MAX)

    def test_data_deeper_than_orjson_goes_but_stays_valid(self):
        data: object = "leaf"
        for _ in range(300):  # beyond orjson's 255 levels: the standard encoder's job
            data = [data]
        push = decode_push(encode_push("alice", "x", data, MAX))
        assert json.loads(push.data_json) == data

    @pytest.mark.parametrize(
        "output",
        [
            b"\xff",
            b'"\xff"',
            b'"\xed\xa0\x80"',  # an encoded surrogate: not UTF-8
            b'1,"id":"AUTH FAILED"',  # would splice a second id into the browser frame
            b'{"a":1},"username":"bob"',
            b"1}",
            b"",
            b" ",
            b"NaN",
            b"Infinity",
            b"1 2",
            b'{"a":1',
            b'"\x00"',
            b"\xef\xbb\xbf1",
            b"[" * 5000 + b"]" * 5000,
            b"undefined",
            "\ud800",
            '"\\ud800"',
            None,
            5,
            bytearray(b"1"),
            memoryview(b"1"),
            [b"1"],
        ],
        ids=lambda o: (f"memoryview({bytes(o)!r})" if isinstance(o, memoryview) else repr(o))[:30],
    )
    def test_custom_serializer_output_must_be_one_utf8_json_value(self, output):
        with pytest.raises(ProtocolError, match="serializer"):
            encode_push("alice", "x", 1, MAX, lambda v: output)

    class Bytes(bytes):
        pass

    @pytest.mark.parametrize(
        "output, data_json",
        [
            (b" 1 ", b" 1 "),
            (b'{"a":\n[1,\t2]}\n', b'{"a":\n[1,\t2]}\n'),
            (b'{"big":123456789012345678901234567890}', b'{"big":123456789012345678901234567890}'),
            ('{"a":"zoë"}', '{"a":"zoë"}'.encode()),  # a str is taken as its UTF-8
            (Bytes(b"[1]"), b"[1]"),
        ],
    )
    def test_custom_serializer_output_accepted(self, output, data_json):
        push = decode_push(encode_push("alice", "x", 1, MAX, lambda v: output))
        assert push.data_json == data_json and type(push.data_json) is bytes
        assert list(json.loads(build_message_frame(push, 1, "e"))) == ["id", "username", "data", "seq", "epoch"]

    @pytest.mark.parametrize("exc", [KeyError("k"), RuntimeError("boom"), AttributeError("a"), OverflowError("o"),
                                     TypeError("t"), ValueError("v"), UnicodeEncodeError("utf-8", "x", 0, 1, "bad")])
    def test_custom_serializer_errors_become_protocol_errors_with_the_cause(self, exc):
        def serializer(value):
            raise exc

        with pytest.raises(ProtocolError) as info:
            encode_push("alice", "x", 1, MAX, serializer)
        assert info.value.__cause__ is exc
        assert type(exc).__name__ in str(info.value) or str(exc) in str(info.value)

    def test_custom_serializer_recursion_is_too_deep(self):
        def serializer(value):
            return serializer(value)

        with pytest.raises(ProtocolError, match="nests too deep"):
            encode_push("alice", "x", 1, MAX, serializer)

    def test_custom_serializer_does_not_swallow_interrupts(self):
        def serializer(value):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            encode_push("alice", "x", 1, MAX, serializer)


class TestDecodePush:
    GOOD = b'P1\0alice\0"x"\n{"a":1}'

    def test_good(self):
        assert decode_push(self.GOOD) == Push("alice", b'"x"', b'{"a":1}')

    @pytest.mark.parametrize("prefix", [b"P0\0", b"P2\0", b"", b"p1\0", b"M", b"P1"])
    def test_wrong_version(self, prefix):
        with pytest.raises(ProtocolError):
            decode_push(prefix + b'alice\0"x"\n1')

    def test_no_username_terminator(self):
        with pytest.raises(ProtocolError, match="terminator"):
            decode_push(b'P1\0alice"x"\n1')

    def test_bad_utf8_username(self):
        with pytest.raises(ProtocolError, match="UTF-8"):
            decode_push(b'P1\0\xff\xfe\0"x"\n1')

    @pytest.mark.parametrize("username", [b"", b"x" * 257])
    def test_bad_username(self, username):
        with pytest.raises(ProtocolError):
            decode_push(b"P1\0" + username + b'\0"x"\n1')

    @pytest.mark.parametrize(
        "body",
        [
            b'"x"{"a":1}',  # missing newline
            b'"x"',
            b"",
            b'"x"\n',  # no data
            b"x\n1",  # id not a JSON string
            b'\n"x"',
            b'1\n"x"',
            b'"\n1',  # a lone quote is no JSON string
        ],
    )
    def test_bad_body(self, body):
        with pytest.raises(ProtocolError, match="body"):
            decode_push(b"P1\0alice\0" + body)

    def test_data_may_contain_newlines(self):
        push = decode_push(b'P1\0alice\0"x"\n{"a":\n"\\u0000"}\n')
        assert push.id_json == b'"x"'
        assert push.data_json == b'{"a":\n"\\u0000"}\n'

    @pytest.mark.parametrize(
        "id_json",
        [
            b'"AUTH FAILED"',
            b'"\\u0041UTH OK"',  # reserved once decoded
            b'"PONG"',
            b'"JOIN"',
            b'""',
            b'"' + b"x" * 257 + b'"',
            b'"\\ud800"',
            b'"\xff"',
            b'"\xed\xa0\x80"',
            b'"a","b":"c"',
            b'"a" "b"',
            b'"a"  "',
            b'"\\"',
            b'"\x00"',
            b'"\t"',
            b'"\\x41"',
        ],
    )
    def test_bad_id_json(self, id_json):
        with pytest.raises(ProtocolError):
            decode_push(b"P1\0alice\0" + id_json + b"\n1")

    @pytest.mark.parametrize(
        "data_json",
        [
            b"\xff",
            b'"\xff"',
            b'"\xed\xa0\x80"',
            b'"\\ud800"',
            b'1,"id":"AUTH FAILED"',
            b'{"a":1},"username":"bob"',
            b"1}",
            b" ",
            b"NaN",
            b"Infinity",
            b"-Infinity",
            b"1 2",
            b'{"a":1',
            b'"\x00"',
            b"[" * 5000 + b"]" * 5000,
            b'{"a":' * 2000 + b"1" + b"}" * 2000,
            b"\xef\xbb\xbf1",
            b"undefined",
            b"'a'",
            b"1\x00",
        ],
    )
    def test_bad_data_json(self, data_json):
        with pytest.raises(ProtocolError, match="data_json"):
            decode_push(b'P1\0alice\0"x"\n' + data_json)

    @pytest.mark.parametrize(
        "data_json", [b" 1 ", b"123456789012345678901234567890", b"[" * 1000 + b"]" * 1000, b'"\\ud83d\\ude00"']
    )
    def test_odd_but_valid_data_json(self, data_json):
        assert decode_push(b'P1\0alice\0"x"\n' + data_json).data_json == data_json

    def test_mangled_pushes_give_a_valid_browser_frame_or_protocol_error(self):
        """Seeded random damage to good pushes: whatever decode_push lets through makes a
        browser frame that is one JSON object with exactly its five fields."""
        rng = random.Random(5)
        goods = [
            encode_push("alice", "TASK DONE", {"card": "ok", "n": [1, 2.5, None, True], "t": "zoë\n"}, MAX),
            encode_push("*", "NEWS", ["a", {"b": "c"}], MAX),
        ]
        accepted = 0
        for _ in range(5000):
            raw = rng.choice(goods)
            cut = raw.index(b"\0", 3) + 1
            raw = raw[:cut] + _mangle(rng, raw[cut:])
            try:
                push = decode_push(raw)
            except ProtocolError:
                continue
            accepted += 1
            frame = orjson.loads(build_message_frame(push, 1, "e"))
            assert list(frame) == ["id", "username", "data", "seq", "epoch"]
            assert frame["id"] not in RESERVED_IDS and frame["username"] == push.stream
            assert (frame["seq"], frame["epoch"]) == (1, "e")
        assert accepted > 0  # some damage is harmless (inside strings): the check is not vacuous


# ---------------------------------------------------------------- fan-out


class TestMessageFrames:
    def test_build_message_frame(self):
        push = decode_push(encode_push("alice", "TASK DONE", {"card": "ok", "t": "zoë"}, MAX))
        frame = build_message_frame(push, 42, "18c-abcd")
        assert isinstance(frame, bytes)
        obj = json.loads(frame)
        assert list(obj) == ["id", "username", "data", "seq", "epoch"]
        assert obj == {
            "id": "TASK DONE",
            "username": "alice",
            "data": {"card": "ok", "t": "zoë"},
            "seq": 42,
            "epoch": "18c-abcd",
        }
        assert type(obj["seq"]) is int

    def test_build_message_frame_broadcast(self):
        push = decode_push(encode_push("*", "NEWS", [1, "two"], MAX))
        obj = json.loads(build_message_frame(push, 0, "e"))
        assert obj == {"id": "NEWS", "username": "*", "data": [1, "two"], "seq": 0, "epoch": "e"}

    def test_build_message_frame_escapes_username_and_epoch(self):
        push = Push('we"ird\\name', b'"x"', b"null")
        obj = json.loads(build_message_frame(push, 1, 'ep"och\\'))
        assert obj["username"] == 'we"ird\\name'
        assert obj["epoch"] == 'ep"och\\'
        assert obj["data"] is None

    @pytest.mark.parametrize("size", [0, 100, 125, 126, 200, 65535 - 120, 70_000])
    @pytest.mark.parametrize("stream", ["alice", "*", "zoë", 'we"ird\\name', "channel"])
    def test_a_fanned_out_message_reads_back_at_every_length_and_from_the_cache(
            self, stream: str, size: int) -> None:
        """The proxy's path, build_message_frame -> encode_text_frame -> message_frame, whose
        per-stream parts come from a cache: what a server and a browser read back is what
        was pushed, for users, the broadcast, channels and names JSON must escape, at each
        WebSocket length form, and the same again when the parts are cached."""
        data = {"p": "x" * size}
        if stream == "channel":
            push = decode_push(protocol.encode_channel_push("doc:42", "EDIT", data, MAX))
            address = ("channel", "doc:42")
        else:
            push = Push(stream, b'"TASK DONE"', protocol.fast_dumps(data))
            address = ("username", stream)
        built = []
        for seq, epoch in ((1, "e"), (12345, 'ep"och'), (1, "e")):  # the last one from the cache
            frame = build_message_frame(push, seq, epoch)
            wire = encode_text_frame(frame)
            raw = message_frame(push.stream, seq, epoch, wire)
            delivery = decode_delivery(raw)
            assert (delivery.topic, delivery.kind) == (topic(push.stream), protocol.KIND_MESSAGE)
            assert (delivery.seq, delivery.epoch, delivery.frame) == (seq, epoch, wire)
            assert wire.endswith(frame) and wire[0] == 0x81
            assert len(wire) - len(frame) == (2 if len(frame) < 126 else 4 if len(frame) < 65536 else 10)
            obj = json.loads(frame)
            assert list(obj) == ["id", address[0], "data", "seq", "epoch"]
            assert obj == {"id": push.id_json.decode().strip('"'), address[0]: address[1], "data": data,
                           "seq": seq, "epoch": epoch}
            built.append(raw)
        assert built[0] == built[2]

    def test_message_frame_decode(self):
        frame = b'{"id":"x"}'
        raw = message_frame("alice", 7, "e1", frame)
        assert raw.startswith(topic("alice"))
        delivery = decode_delivery(raw)
        assert delivery.topic == topic("alice")
        assert delivery.stream == "alice"
        assert delivery.kind == protocol.KIND_MESSAGE
        assert delivery.seq == 7 and type(delivery.seq) is int
        assert delivery.epoch == "e1"
        assert delivery.frame == frame

    def test_sync_frame_decode(self):
        raw = sync_frame("*", 0, "e2")
        assert raw.startswith(b"*\0")
        delivery = decode_delivery(raw)
        assert delivery.stream == "*"
        assert delivery.kind == protocol.KIND_SYNC
        assert delivery.seq == 0
        assert delivery.epoch == "e2"
        assert delivery.frame == b""

    def test_unicode_stream_round_trip(self):
        delivery = decode_delivery(message_frame("zoë", 123456789012, "e", b"{}"))
        assert delivery.stream == "zoë"
        assert delivery.seq == 123456789012

    def test_frame_may_hold_spaces(self):
        delivery = decode_delivery(message_frame("a", 1, "e", b'{"d":"x y\\u0000 z"}'))
        assert delivery.frame == b'{"d":"x y\\u0000 z"}'

    @pytest.mark.parametrize(
        "raw",
        [
            b"",
            b"ualice\0",
            b"ualice\0M1 e",  # no space after the epoch
            b"ualice\0M1",
            b"ualice\0Z1 e {}",
            b"ualice\0 1 e {}",
            b"ualice\0Mone e {}",
            b"ualice\0M e {}",
            b"ualice\0M1.5 e {}",
            b"ualice\0M1 \xff {}",
            b"ualiceM1 e {}",  # no topic terminator
        ],
    )
    def test_decode_delivery_errors(self, raw):
        with pytest.raises(ProtocolError):
            decode_delivery(raw)

    @pytest.mark.parametrize("raw", [b"alice\0M1 e {}", b"u\xff\0M1 e {}", b"u*\0M1 e {}"])
    def test_foreign_topics_have_no_stream(self, raw):
        with pytest.raises(ProtocolError):
            decode_delivery(raw).stream


# ---------------------------------------------------------------- history


class TestHistory:
    """The control channel (see the history section of flowcore/protocol.py)."""

    def test_request_round_trip(self):
        raw = build_history_request(7, {"alice": (41, "e1"), "*": (0, "e2")}, 65536)
        assert isinstance(raw, bytes)
        assert json.loads(raw) == {
            "op": "history",
            "rid": 7,
            "max_bytes": 65536,
            "streams": {"alice": {"seq": 41, "epoch": "e1"}, "*": {"seq": 0, "epoch": "e2"}},
        }
        request = parse_history_request(raw)
        assert request == HistoryRequest(7, {"alice": (41, "e1"), "*": (0, "e2")}, 65536, "history")

    def test_request_round_trip_unicode_and_empty(self):
        request = parse_history_request(build_history_request(0, {"zoë": (3, "é")}, 0))
        assert request.streams == {"zoë": (3, "é")}
        assert request.max_bytes == 0 and request.op == "history"
        empty = parse_history_request(build_history_request(1, {}, 10))
        assert (empty.request_id, empty.streams, empty.max_bytes) == (1, {}, 10)

    def test_request_without_max_bytes_asks_for_positions_only(self):
        request = parse_history_request(b'{"op":"history","rid":3,"streams":{"a":{"seq":1,"epoch":"e"}}}')
        assert request == HistoryRequest(3, {"a": (1, "e")}, 0, "history")

    def test_ping_round_trip(self):
        raw = build_ping_request(12)
        assert json.loads(raw) == {"op": "ping", "rid": 12}
        assert parse_history_request(raw) == HistoryRequest(12, {}, 0, "ping")

    @pytest.mark.parametrize(
        "raw",
        [
            b"",
            b" ",
            b"not json",
            b"\xff",
            b'{"op":"ping","rid":1,"x":"\xff"}',  # not UTF-8 inside a string
            b"\xef\xbb\xbf" + b'{"op":"ping","rid":1}"',
            b"[]",
            b"null",
            b"1e400",
            b'"history"',
            b"[" * 100_000 + b"]" * 100_000,
            b'{"op":"history","rid":1,"streams":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001,
            b'{"op":"other","rid":1,"streams":{}}',
            b'{"op":5,"rid":1,"streams":{}}',
            b'{"rid":1,"streams":{}}',
            b'{"op":"ping"}',
            b'{"op":"ping","rid":"1"}',
            b'{"op":"ping","rid":true}',
            b'{"op":"ping","rid":1.0}',
            b'{"op":"ping","rid":Infinity}',
            b'{"op":"history","streams":{}}',
            b'{"op":"history","rid":"x","streams":{}}',
            b'{"op":"history","rid":null,"streams":{}}',
            b'{"op":"history","rid":1e400,"streams":{}}',
            b'{"op":"history","rid":1}',
            b'{"op":"history","rid":1,"streams":[]}',
            b'{"op":"history","rid":1,"streams":"ab"}',
            b'{"op":"history","rid":1,"streams":null}',
            b'{"op":"history","rid":1,"streams":{"a":5}}',
            b'{"op":"history","rid":1,"streams":{"a":"seq"}}',
            b'{"op":"history","rid":1,"streams":{"a":[1,"e"]}}',
            b'{"op":"history","rid":1,"streams":{"a":{"epoch":"e"}}}',
            b'{"op":"history","rid":1,"streams":{"a":{"seq":1}}}',
            b'{"op":"history","rid":1,"streams":{"a":{"seq":"x","epoch":"e"}}}',
            b'{"op":"history","rid":1,"streams":{"a":{"seq":"1","epoch":"e"}}}',
            b'{"op":"history","rid":1,"streams":{"a":{"seq":true,"epoch":"e"}}}',
            b'{"op":"history","rid":1,"streams":{"a":{"seq":1.5,"epoch":"e"}}}',
            b'{"op":"history","rid":1,"streams":{"a":{"seq":-1,"epoch":"e"}}}',
            b'{"op":"history","rid":1,"streams":{"a":{"seq":Infinity,"epoch":"e"}}}',
            b'{"op":"history","rid":1,"streams":{"a":{"seq":1,"epoch":5}}}',
            b'{"op":"history","rid":1,"streams":{"a":{"seq":1,"epoch":null}}}',
            b'{"op":"history","rid":1,"max_bytes":-1,"streams":{}}',
            b'{"op":"history","rid":1,"max_bytes":"10","streams":{}}',
            b'{"op":"history","rid":1,"max_bytes":false,"streams":{}}',
            b'{"op":"history","rid":1,"max_bytes":NaN,"streams":{}}',
        ],
        ids=lambda raw: repr(raw)[:70],
    )
    def test_malformed_request(self, raw):
        with pytest.raises(ProtocolError):
            parse_history_request(raw)

    def test_reply_round_trip_is_byte_for_byte(self):
        f1 = encode_text_frame(b'{"id":"x","username":"alice","data":"zo\xc3\xab","seq":42,"epoch":"e1"}')
        f2 = encode_text_frame(b'{"id":"y","username":"alice","data":null,"seq":43,"epoch":"e1"}')
        frames = build_history_reply(
            9, {"alice": ("e1", 43, [(42, f1), (43, f2)]), "*": ("e1", 5, []), "bob": ("e2", 100, None)}
        )
        assert isinstance(frames, list) and all(isinstance(f, bytes) for f in frames)
        assert frames[1:] == [f1, f2]  # the message frames travel as they are
        rid, streams, mark = parse_history_reply(frames)
        assert rid == 9 and mark is None
        assert list(streams) == ["alice", "*", "bob"]
        assert streams["alice"] == StreamHistory("e1", 43, [(42, f1), (43, f2)])
        assert streams["*"] == StreamHistory("e1", 5, [])
        assert streams["bob"] == StreamHistory("e2", 100, None)
        assert streams["bob"].messages is None
        assert streams["*"].messages == []

    @pytest.mark.parametrize(
        "wire",
        [
            b"\xff\xfe\x00\x80",  # no UTF-8 at all
            b"\x81\x7e\x00\x04\xed\xa0\x80\n",  # a WebSocket header, an encoded surrogate, a newline
            b"",
            b'"\\"',
            bytes(range(256)),
        ],
    )
    def test_reply_message_frames_need_not_be_utf8(self, wire):
        frames = build_history_reply(1, {"a": ("e", 8, [(7, wire), (8, wire + b"!")])})
        _, streams, _ = parse_history_reply(frames)
        assert streams["a"].messages == [(7, wire), (8, wire + b"!")]
        assert all(type(w) is bytes for _, w in streams["a"].messages)

    def test_reply_header_shape(self):
        frames = build_history_reply(1, {"a": ("e", 2, [(2, b"{}")]), "b": ("e", 0, None), "c": ("e", 4, [])})
        assert json.loads(frames[0]) == {
            "rid": 1,
            "streams": {
                "a": {"epoch": "e", "seq": 2, "messages": [2]},
                "b": {"epoch": "e", "seq": 0, "messages": None},
                "c": {"epoch": "e", "seq": 4, "messages": []},
            },
        }
        assert frames[1:] == [b"{}"]

    def test_ping_reply(self):
        frames = build_history_reply(5, {})
        assert len(frames) == 1
        assert parse_history_reply(frames) == (5, {}, None)

    def test_a_reply_carries_the_change_mark_to_every_stream(self):
        frames = build_history_reply(5, {"a": ("e", 2, []), "b": ("e", 0, None)}, "r1.2f")
        assert json.loads(frames[0])["mark"] == "r1.2f"
        rid, streams, mark = parse_history_reply(frames)
        assert (rid, mark) == (5, "r1.2f")
        assert [s.mark for s in streams.values()] == ["r1.2f", "r1.2f"]
        assert parse_history_reply(build_history_reply(6, {}, "r1.30"))[2] == "r1.30"

    @pytest.mark.parametrize("mark", [b"5", b"null", b"[]", b'{"a":1}', b'"' + b"x" * 65 + b'"'])
    def test_a_mark_that_is_not_a_short_string_is_refused(self, mark):
        if mark == b"null":  # what a proxy keeping no mark would send: as if absent
            assert parse_history_reply([b'{"rid":1,"streams":{},"mark":null}'])[2] is None
            return
        with pytest.raises(ProtocolError, match="mark"):
            parse_history_reply([b'{"rid":1,"streams":{},"mark":' + mark + b"}"])

    @pytest.mark.parametrize(
        "frames",
        [
            [],
            [b""],
            [b"{"],
            [b"\xff"],
            [b'{"rid":1,"streams":{"a":{"epoch":"\xff","seq":1,"messages":null}}}'],
            [b"[]"],
            [b"null"],
            [b"[" * 100_000 + b"]" * 100_000],
            [b'{"rid":1,"streams":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001],
            [b'{"streams":{}}'],
            [b'{"rid":1}'],
            [b'{"rid":"x","streams":{}}'],
            [b'{"rid":"5","streams":{}}'],
            [b'{"rid":true,"streams":{}}'],
            [b'{"rid":1.5,"streams":{}}'],
            [b'{"rid":Infinity,"streams":{}}'],
            [b'{"rid":NaN,"streams":{}}'],
            [b'{"rid":1e400,"streams":{}}'],
            [b'{"rid":1,"streams":[]}'],
            [b'{"rid":1,"streams":"ab"}'],
            [b'{"rid":1,"streams":{"a":1}}'],
            [b'{"rid":1,"streams":{"a":[]}}'],
            [b'{"rid":1,"streams":{"a":{"epoch":"e","seq":1}}}'],
            [b'{"rid":1,"streams":{"a":{"epoch":"e","messages":null}}}'],
            [b'{"rid":1,"streams":{"a":{"seq":1,"messages":null}}}'],
            [b'{"rid":1,"streams":{"a":{"epoch":"e","seq":"x","messages":null}}}'],
            [b'{"rid":1,"streams":{"a":{"epoch":"e","seq":"1","messages":null}}}'],
            [b'{"rid":1,"streams":{"a":{"epoch":"e","seq":Infinity,"messages":null}}}'],
            [b'{"rid":1,"streams":{"a":{"epoch":"e","seq":1e400,"messages":null}}}'],
            [b'{"rid":1,"streams":{"a":{"epoch":5,"seq":1,"messages":null}}}'],
            [b'{"rid":1,"streams":{"a":{"epoch":null,"seq":1,"messages":null}}}'],
            [b'{"rid":1,"streams":{"a":{"epoch":{"x":1},"seq":1,"messages":null}}}'],
            [b'{"rid":1,"streams":{"a":{"epoch":"e","seq":1,"messages":5}}}'],
            [b'{"rid":1,"streams":{"a":{"epoch":"e","seq":1,"messages":"ab"}}}', b"x", b"y"],
            [b'{"rid":1,"streams":{"a":{"epoch":"e","seq":1,"messages":["1"]}}}', b"x"],
            [b'{"rid":1,"streams":{"a":{"epoch":"e","seq":1,"messages":[1.5]}}}', b"x"],
            [b'{"rid":1,"streams":{"a":{"epoch":"e","seq":1,"messages":[true]}}}', b"x"],
            [b'{"rid":1,"streams":{"a":{"epoch":"e","seq":1,"messages":[[1,"{}"]]}}}', b"x"],
            # frame counts that do not match the header
            [b'{"rid":1,"streams":{"a":{"epoch":"e","seq":1,"messages":[1]}}}'],
            [b'{"rid":1,"streams":{"a":{"epoch":"e","seq":2,"messages":[1,2]}}}', b"x"],
            [b'{"rid":1,"streams":{"a":{"epoch":"e","seq":1,"messages":[1]}}}', b"x", b"y"],
            [b'{"rid":1,"streams":{"a":{"epoch":"e","seq":1,"messages":null}}}', b"x"],
            [b'{"rid":1,"streams":{"a":{"epoch":"e","seq":1,"messages":[]}}}', b"x"],
            [b'{"rid":1,"streams":{}}', b""],
        ],
        ids=lambda frames: repr(frames)[:70],
    )
    def test_malformed_reply(self, frames):
        with pytest.raises(ProtocolError):
            parse_history_reply(frames)

    def test_mangled_requests_and_replies_give_a_result_or_protocol_error(self):
        """Seeded random damage to good control frames: nothing but ProtocolError escapes."""
        rng = random.Random(20261201)
        request = build_history_request(3, {"alice": (41, "e1"), "*": (0, "e2")}, 4096)
        reply = build_history_reply(3, {"alice": ("e1", 43, [(42, b"\x81\x02{}"), (43, b"x")]), "*": ("e2", 0, None)})
        for _ in range(3000):
            raw = _mangle(rng, request)
            try:
                assert isinstance(parse_history_request(raw), HistoryRequest)
            except ProtocolError:
                pass
            frames = [_mangle(rng, reply[0]), *reply[1:]]
            if rng.random() < 0.3:
                frames = frames[: rng.randrange(len(frames) + 1)] + [b"extra"] * rng.randrange(2)
            try:
                rid, streams, mark = parse_history_reply(frames)
            except ProtocolError:
                continue
            assert mark is None or isinstance(mark, str)
            assert type(rid) is int
            assert all(isinstance(v, StreamHistory) for v in streams.values())


def _mangle(rng: random.Random, raw: bytes) -> bytes:
    """``raw`` with a few bytes replaced, inserted or deleted at random."""
    out = bytearray(raw)
    for _ in range(rng.randrange(1, 4)):
        at = rng.randrange(len(out) + 1)
        choice = rng.random()
        if choice < 0.4 and at < len(out):
            out[at] = rng.choice(b'{}[]":,0123456789-.eE \\\xff\x00tfnul')
        elif choice < 0.7:
            out[at:at] = bytes([rng.randrange(256)])
        elif at < len(out):
            del out[at]
    return bytes(out)


def test_push_caches_stay_bounded_and_hold_only_valid_values():
    for i in range(protocol.PUSH_CACHE_SIZE + 10):
        protocol.encode_push(f"cache-user-{i}", f"ID {i}", None, 1000)
    assert 0 < len(protocol.push_heads) <= protocol.PUSH_CACHE_SIZE
    assert 0 < len(protocol.id_parts) <= protocol.PUSH_CACHE_SIZE
    for bad_user in ("", "a\0b", "x" * 1000, 7, None):
        with pytest.raises(protocol.ProtocolError):
            protocol.encode_push(bad_user, "ID", None, 1000)
        assert bad_user not in protocol.push_heads
    with pytest.raises(protocol.ProtocolError):
        protocol.encode_push("alice", "", None, 1000)
    assert "" not in protocol.id_parts
    # A cached part is the same bytes as a fresh one.
    first = protocol.encode_push("alice", "TASK DONE", {"a": 1}, 1000)
    assert protocol.encode_push("alice", "TASK DONE", {"a": 1}, 1000) == first
    assert protocol.decode_push(first).stream == "alice"


def test_broadcast_head_is_not_found_by_username():
    protocol.encode_push("*", "NEWS", 1, 1000)
    # flow.Flow.push looks heads up by username directly: "*" must not be a key.
    assert "*" not in protocol.push_heads
    assert protocol.decode_push(protocol.encode_push("*", "NEWS", 1, 1000)).stream == "*"


@pytest.mark.parametrize("user", [["alice"], {"a": 1}])
def test_unhashable_user_or_id_is_a_protocol_error(user):
    with pytest.raises(protocol.ProtocolError, match="string"):
        protocol.encode_push(user, "ID", 1, 1000)
    with pytest.raises(protocol.ProtocolError, match="string"):
        protocol.encode_push("alice", user, 1, 1000)


def test_size_limit_is_exact_with_a_long_username():
    # The limit counts id + data, what the browser gets, never the username.
    user = "u" * 200
    limit = 100
    exact = encode_push(user, "x", "a" * (limit - 6), limit)
    assert protocol.decode_push(exact).stream == user
    with pytest.raises(ProtocolError, match="101 bytes, over the 100-byte limit"):
        encode_push(user, "x", "a" * (limit - 5), limit)


class TestCommands:
    """flow.disconnect / flow.unsubscribe frames (outside the numbering)."""

    def test_round_trip(self):
        from flowcore.protocol import check_command, decode_command, encode_command

        assert decode_command(encode_command("alice", "disconnect")) == ("alice", b'{"op":"disconnect"}')
        stream, command = decode_command(encode_command("ünï", "unsubscribe", "doc:1"))
        assert stream == "ünï" and check_command(command) == {"op": "unsubscribe", "channel": "doc:1"}

    @pytest.mark.parametrize("args", [("", "disconnect"), ("*", "disconnect"), ("a\0b", "disconnect"),
                                      ("alice", "explode"), ("alice", "unsubscribe", "bad name"),
                                      ("alice", "unsubscribe", None)])
    def test_bad_commands_are_refused_by_the_publisher(self, args):
        from flowcore.protocol import encode_command

        with pytest.raises(ProtocolError):
            encode_command(*args)

    @pytest.mark.parametrize("raw", [b"X1\0alice", b"X1\0*\0{\"op\":\"disconnect\"}", b"X1\0alice\0[]",
                                     b"X1\0alice\0{\"op\":\"unsubscribe\"}", b"X1\0alice\0{\"op\":\"x\"}",
                                     b"X1\0alice\0" + b"[" * 5000, b"X1\0\xff\0{\"op\":\"disconnect\"}"])
    def test_any_other_bytes_are_refused_by_the_engine(self, raw):
        from flowcore.protocol import decode_command

        with pytest.raises(ProtocolError):
            decode_command(raw)
