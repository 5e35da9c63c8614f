"""Unit tests for flowcore.protocol: plain strings and bytes, no sockets."""

from __future__ import annotations

import json
import struct

import pytest

from flowcore import protocol
from flowcore.protocol import (
    BROADCAST,
    Authenticate,
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
        assert frame == Authenticate(TOKEN, {})

    def test_auth_with_null_resume(self):
        frame = parse_client_frame(json.dumps({"id": "AUTH", "token": TOKEN, "resume": None}))
        assert frame == Authenticate(TOKEN, {})

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
        assert frame == Authenticate("t.t.t", {})

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
        [{1, 2}, object(), float("nan"), float("inf"), -float("inf"), {"x": float("nan")}, b"bytes", {("a",): 1}],
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

    def test_data_may_contain_newlines_and_nul(self):
        push = decode_push(b'P1\0alice\0"x"\n{"a":\n"\0"}')
        assert push.id_json == b'"x"'
        assert push.data_json == b'{"a":\n"\0"}'


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
            b"ualice\0X1 e {}",
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
    def test_request_round_trip(self):
        raw = build_history_request(7, {"alice": (41, "e1"), "*": (0, "e2")})
        assert isinstance(raw, bytes)
        assert json.loads(raw) == {
            "op": "history",
            "rid": 7,
            "streams": {"alice": {"seq": 41, "epoch": "e1"}, "*": {"seq": 0, "epoch": "e2"}},
        }
        request = parse_history_request(raw)
        assert request.request_id == 7
        assert request.streams == {"alice": (41, "e1"), "*": (0, "e2")}

    def test_request_round_trip_unicode_and_empty(self):
        request = parse_history_request(build_history_request(0, {"zoë": (3, "é")}))
        assert request.streams == {"zoë": (3, "é")}
        empty = parse_history_request(build_history_request(1, {}))
        assert empty.request_id == 1 and empty.streams == {}

    @pytest.mark.parametrize(
        "raw",
        [
            b"",
            b"not json",
            b"\xff",
            b"[]",
            b"null",
            b'"history"',
            b'{"op":"other","rid":1,"streams":{}}',
            b'{"rid":1,"streams":{}}',
            b'{"op":"history","streams":{}}',
            b'{"op":"history","rid":"x","streams":{}}',
            b'{"op":"history","rid":null,"streams":{}}',
            b'{"op":"history","rid":1}',
            b'{"op":"history","rid":1,"streams":[]}',
            b'{"op":"history","rid":1,"streams":{"a":5}}',
            b'{"op":"history","rid":1,"streams":{"a":{"epoch":"e"}}}',
            b'{"op":"history","rid":1,"streams":{"a":{"seq":1}}}',
            b'{"op":"history","rid":1,"streams":{"a":{"seq":"x","epoch":"e"}}}',
        ],
    )
    def test_malformed_request(self, raw):
        with pytest.raises(ProtocolError):
            parse_history_request(raw)

    def test_reply_round_trip(self):
        f1 = b'{"id":"x","username":"alice","data":"zo\xc3\xab","seq":42,"epoch":"e1"}'
        f2 = b'{"id":"y","username":"alice","data":null,"seq":43,"epoch":"e1"}'
        raw = build_history_reply(
            9, {"alice": ("e1", 43, [(42, f1), (43, f2)]), "*": ("e1", 5, []), "bob": ("e2", 100, None)}
        )
        assert isinstance(raw, bytes)
        rid, streams = parse_history_reply(raw)
        assert rid == 9
        assert set(streams) == {"alice", "*", "bob"}
        assert streams["alice"] == StreamHistory("e1", 43, [(42, f1), (43, f2)])
        assert streams["*"] == StreamHistory("e1", 5, [])
        assert streams["bob"] == StreamHistory("e2", 100, None)
        assert streams["bob"].messages is None
        assert streams["*"].messages == []

    def test_reply_json_shape(self):
        raw = build_history_reply(1, {"a": ("e", 2, [(2, b"{}")]), "b": ("e", 0, None)})
        assert json.loads(raw) == {
            "rid": 1,
            "streams": {
                "a": {"epoch": "e", "seq": 2, "messages": [[2, "{}"]]},
                "b": {"epoch": "e", "seq": 0, "messages": None},
            },
        }

    @pytest.mark.parametrize(
        "raw",
        [
            b"",
            b"{",
            b"[]",
            b"null",
            b'{"streams":{}}',
            b'{"rid":1}',
            b'{"rid":"x","streams":{}}',
            b'{"rid":1,"streams":[]}',
            b'{"rid":1,"streams":{"a":1}}',
            b'{"rid":1,"streams":{"a":{"epoch":"e","seq":1}}}',
            b'{"rid":1,"streams":{"a":{"epoch":"e","messages":null}}}',
            b'{"rid":1,"streams":{"a":{"seq":1,"messages":null}}}',
            b'{"rid":1,"streams":{"a":{"epoch":"e","seq":"x","messages":null}}}',
            b'{"rid":1,"streams":{"a":{"epoch":"e","seq":1,"messages":5}}}',
            b'{"rid":1,"streams":{"a":{"epoch":"e","seq":1,"messages":[[1]]}}}',
            b'{"rid":1,"streams":{"a":{"epoch":"e","seq":1,"messages":[[1,"{}",3]]}}}',
            b'{"rid":1,"streams":{"a":{"epoch":"e","seq":1,"messages":[["x","{}"]]}}}',
            b'{"rid":1,"streams":{"a":{"epoch":"e","seq":1,"messages":[[1,2]]}}}',
            b'{"rid":1,"streams":{"a":{"epoch":"e","seq":1,"messages":[5]}}}',
        ],
    )
    def test_malformed_reply(self, raw):
        with pytest.raises(ProtocolError):
            parse_history_reply(raw)


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
