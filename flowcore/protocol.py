"""The Flow wire protocol (PROTOCOL.md), with no I/O.

Browser frames are parsed and built here; so is the internal ZeroMQ framing between
publishers, the proxy and the WebSocket servers. Every refusal is a ProtocolError
whose message is safe to show to the client.

Internal framing (PROTOCOL.md section 6, ours to choose):

Each internal message is a single ZeroMQ frame (one send, one receive per hop).

publisher -> proxy (PUSH -> PULL)::

    b"P1\\0" username b"\\0" id_json b"\\n" data_json      (username b"*" for a broadcast,
                                                     b"\\0" channel for a channel)

proxy -> WebSocket servers (XPUB -> SUB), starting with the exact topic::

    topic b"M" seq b" " epoch b" " websocket_frame   a message: the browser frame, already
                                                     framed as a WebSocket text frame
    topic b"S" seq b" " epoch b" "                   sync: the stream's current position

A topic is ``b"u" + username + b"\\0"`` (``b"*\\0"`` for broadcasts, ``b"c" + channel +
b"\\0"`` for a channel's stream). Usernames may not
contain NUL, so ZeroMQ's prefix matching is exact: ``u1\\0`` is no prefix of ``u12\\0``,
and epochs hold no space.

server <-> proxy control (DEALER -> ROUTER): see the history section below.
"""

from __future__ import annotations

import functools
import json
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import orjson

from .engine import StreamHistory
from .presence import PresenceEvent, Snapshot

BROADCAST = "*"
HEARTBEAT = "<3"

# Close codes (PROTOCOL.md section 3).
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_TOO_BIG = 1009
CLOSE_ENGINE_GAP = 1012  # the engine lost messages for the socket's streams: resume
CLOSE_TRY_AGAIN = 1013  # the engine is away: come back later
CLOSE_AUTH_FAILED = 4001
CLOSE_AUTH_TIMEOUT = 4002
CLOSE_TOKEN_EXPIRED = 4003
CLOSE_DISCONNECTED = 4004
CLOSE_SLOW_CONSUMER = 4008
CLOSE_RATE_LIMITED = 4029

MAX_USERNAME_BYTES = 256
MAX_ID_CHARS = 256

PUSH_PREFIX = b"P1\0"
KIND_MESSAGE = b"M"
KIND_SYNC = b"S"


class ProtocolError(ValueError):
    """Input that breaks the protocol; the message says what, for the sender."""


# ---------------------------------------------------------------- identities


def check_username(username: object) -> str:
    """Return ``username`` if it can name a user's stream, else raise ProtocolError."""
    if not isinstance(username, str):
        raise ProtocolError(f"username must be a string, not {type(username).__name__}")
    if not username:
        raise ProtocolError("username must not be empty")
    if username == BROADCAST:
        raise ProtocolError('username "*" is reserved for broadcasts')
    if "\0" in username:
        raise ProtocolError("username must not contain NUL")
    if len(username.encode("utf-8", "surrogatepass")) > MAX_USERNAME_BYTES:
        raise ProtocolError(f"username longer than {MAX_USERNAME_BYTES} bytes")
    try:
        username.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError("username is not valid Unicode text") from None
    return username


# Channels (PROTOCOL.md section 9): many users' stream. In the engines and the hub a
# channel's stream is named CHANNEL_MARK + its name, which no username can be (usernames
# never hold NUL): a user called "doc:42" and the channel "doc:42" are different streams.
CHANNEL_MARK = "\0"
MAX_CHANNEL_BYTES = 255
# Section 9's pattern. \Z, not $: "$" also matches before a trailing newline, so
# CHANNEL_RE.match("doc:42\n") would pass. It does not bound the length (255 bytes):
# check_channel does both.
# The classes are spelled out ASCII ranges and no flag is set: with re.IGNORECASE,
# [A-Za-z] would also match the Kelvin sign and the long s.
_PART = r"[A-Za-z0-9_\-=@.]+"
CHANNEL_RE = re.compile(rf"{_PART}(?::{_PART})*\Z")
_PART_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-=@.")

_SHOWN_CHARS = 40


def shown_name(text: str) -> str:
    """At most 40 characters of ``text``, quoted and escaped (NUL, controls and look-alike
    letters become visible ``\\x00``/``\\u0430``): for messages a client sees."""
    return ascii(text[:_SHOWN_CHARS]) + ("..." if len(text) > _SHOWN_CHARS else "")


def _why_not_a_name(name: str) -> str:
    """What is wrong with ``name``, which failed CHANNEL_RE (and is at most 255 chars)."""
    if not name:
        return "must not be empty"
    for index, char in enumerate(name):
        if char == "*":
            return "has '*', which only a grant pattern may hold, as its whole last part ('team:7:*')"
        if char != ":" and char not in _PART_CHARS:
            return f"has {ascii(char)} at position {index}: only ASCII letters, digits and _-=@. in :-separated parts"
    return "has an empty part (a leading, trailing or doubled ':')"


def check_channel(name: object) -> str:
    """Return ``name`` (as a plain str) if it is a channel name (section 9), else raise
    ProtocolError saying why, safe to show a client."""
    if not isinstance(name, str):
        raise ProtocolError(f"channel must be a string, not {type(name).__name__}")
    if type(name) is not str:
        # A subclass could hash or compare unlike its text, and slip past the grant sets.
        name = str.__str__(name)
    # The length first, so that a megabyte of junk costs no regex and no scan. Every valid
    # name is ASCII, so characters and bytes agree on the names that pass.
    if len(name) > MAX_CHANNEL_BYTES:
        raise ProtocolError(f"channel name {shown_name(name)} is longer than {MAX_CHANNEL_BYTES} bytes")
    if not CHANNEL_RE.fullmatch(name):
        raise ProtocolError(f"channel name {shown_name(name)} {_why_not_a_name(name)}")
    return name


def check_stream(stream: object) -> str:
    """Return ``stream`` if it names a stream: a username, ``*``, or a channel's stream."""
    if isinstance(stream, str) and stream[:1] == CHANNEL_MARK:
        return channel_stream(check_channel(stream[1:]))
    if stream == BROADCAST:
        return BROADCAST
    return check_username(stream)


def channel_stream(name: str) -> str:
    """The stream of channel ``name`` (a checked name)."""
    return CHANNEL_MARK + name


def is_channel_stream(stream: str) -> bool:
    return stream[:1] == CHANNEL_MARK


def channel_of_stream(stream: str) -> str:
    """The channel name of a channel's stream."""
    return stream[len(CHANNEL_MARK):]


# The ids of the protocol's own frames (PROTOCOL.md sections 3, 5 and 9). A push may not
# carry one: a page switches on data["id"], so a pushed "AUTH FAILED" would pass for the
# server's own frame.
RESERVED_IDS: frozenset[str] = frozenset(
    {
        "AUTH REQUEST",
        "AUTH OK",
        "AUTH FAILED",
        "PONG",
        "ERROR",
        "AUTH",
        "PING",
        "SUBSCRIBE",
        "SUBSCRIBE OK",
        "SUBSCRIBE FAILED",
        "UNSUBSCRIBE",
        "UNSUBSCRIBE OK",
        "UNSUBSCRIBED",
        "PRESENCE",
        "JOIN",
        "LEAVE",
        "REFRESH",
    }
)


def check_message_id(message_id: object) -> str:
    """Return ``message_id`` (as a plain str) if a push may carry it, else raise ProtocolError."""
    if not isinstance(message_id, str):
        raise ProtocolError(f"message id must be a string, not {type(message_id).__name__}")
    if type(message_id) is not str:
        # A subclass could hash or compare unlike its text and slip past the reserved set.
        message_id = str.__str__(message_id)
    if not message_id:
        raise ProtocolError("message id must not be empty")
    if len(message_id) > MAX_ID_CHARS:
        raise ProtocolError(f"message id longer than {MAX_ID_CHARS} characters")
    if message_id in RESERVED_IDS:
        raise ProtocolError(f"message id {message_id!r} is reserved for the protocol's own frames")
    try:
        message_id.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError("message id is not valid Unicode text (lone surrogate)") from None
    return message_id


# The caches below are for the hot users of the moment; bounded small so that many
# idle users cost no memory here.
@functools.lru_cache(maxsize=2048)
def topic(stream: str) -> bytes:
    """The exact ZeroMQ topic of a stream (a username, or ``"*"``)."""
    if stream == BROADCAST:
        return b"*\0"
    if stream[:1] == CHANNEL_MARK:
        return b"c" + stream[1:].encode("ascii") + b"\0"
    return b"u" + stream.encode("utf-8") + b"\0"


def stream_of_topic(topic_bytes: bytes) -> str:
    if topic_bytes == b"*\0":
        return BROADCAST
    if len(topic_bytes) < 3 or topic_bytes[:1] not in (b"u", b"c") or topic_bytes[-1:] != b"\0":
        raise ProtocolError("not a Flow topic")
    if topic_bytes[:1] == b"c":
        try:
            return channel_stream(check_channel(topic_bytes[1:-1].decode("ascii")))
        except UnicodeDecodeError:
            raise ProtocolError("not a Flow topic: a channel name is ASCII") from None
    try:
        stream = topic_bytes[1:-1].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("topic username is not UTF-8") from None
    # Exactly one topic per stream: no NUL inside, and b"u*\0" is not the broadcast topic.
    return check_username(stream)


# ---------------------------------------------------------------- publishing


_STRICT_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def dumps(value: Any) -> bytes:
    """Compact JSON; refuses NaN/Infinity, which browsers' JSON.parse cannot read."""
    return _STRICT_ENCODER.encode(value).encode("utf-8")


# Datetimes, dataclasses and subclasses of builtins go to the standard encoder, which
# refuses what it cannot encode: orjson would otherwise accept more than dumps does.
_ORJSON_OPTIONS = (
    orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def fast_dumps(value: Any) -> bytes:
    """JSON as :func:`dumps` judges it, about ten times faster for the usual payload.

    orjson encodes; anything it refuses, and any output holding ``null`` (orjson writes
    NaN and Infinity as null, where dumps refuses them), is encoded again by dumps,
    which then answers for the value. Beyond dumps, UUIDs and Enums are accepted (as
    orjson writes them); the text of floats may differ, never their value.
    """
    try:
        out = _orjson_dumps(value, None, _ORJSON_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError included
        return read_back(dumps(value))
    if b"null" in out:
        return read_back(dumps(value))
    return out


def read_back(out: bytes) -> bytes:
    """The standard encoder's output, if the engines can read it back. The proxy and the
    WebSocket servers parse data with orjson, which refuses what dumps writes for an int
    beyond a double's range (10**400): accepted here, such a push would be dropped there
    (or, on Redis, numbered and then refused by every server: a gap). ValueError."""
    try:
        _orjson_loads(out)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{exc} (the engines could not read it)") from None
    return out


_orjson_dumps = orjson.dumps
_orjson_loads = orjson.loads


def encode_push(
    username: str,
    message_id: str,
    data: Any,
    max_message: int,
    serializer: Callable[[Any], bytes] = fast_dumps,
) -> bytes:
    """The one frame of a push. ``username`` is a user or ``"*"``. Raises ProtocolError.

    The frame is :func:`push_parts` + :func:`encode_data`, within :func:`check_push_size`;
    ``flow.Flow.push`` inlines the same steps on its fast path.
    """
    head, id_part = push_parts(username, message_id)
    data_json = encode_data(data, serializer)
    check_push_size(id_part, data_json, max_message)
    return head + id_part + data_json


def encode_data(data: Any, serializer: Callable[[Any], bytes] = fast_dumps) -> bytes:
    """The data of a push as JSON bytes. Raises ProtocolError, and nothing else.

    :func:`fast_dumps` and :func:`dumps` are trusted. Any other serializer's output is
    spliced unparsed into every browser frame, so it must be exactly one JSON value in
    UTF-8: bytes, or a str (taken as its UTF-8 encoding); anything else is refused.
    """
    builtin = serializer is fast_dumps or serializer is dumps
    try:
        out = serializer(data)
        if serializer is dumps:
            out = read_back(out)
    except RecursionError:
        raise ProtocolError("data is not JSON-serializable: it nests too deep") from None
    except (TypeError, ValueError) as exc:
        error = ProtocolError(f"data is not JSON-serializable: {exc}")
        raise error from (None if builtin else exc)
    except Exception as exc:
        raise ProtocolError(f"the serializer failed: {type(exc).__name__}: {exc}") from exc
    return out if builtin else check_serialized(out)


def check_serialized(out: object) -> bytes:
    """A custom serializer's output as bytes, if it is exactly one UTF-8 JSON value."""
    data_json: bytes
    if isinstance(out, bytes):
        data_json = out if type(out) is bytes else bytes(out)
    elif isinstance(out, str):
        try:
            data_json = out.encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError("serializer output is not valid Unicode text") from None
    else:
        raise ProtocolError(f"serializer must return bytes, not {type(out).__name__}")
    try:
        _orjson_loads(data_json)
    except (orjson.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"serializer output is not one UTF-8 JSON value: {exc}") from None
    return data_json


def check_push_size(id_part: bytes, data_json: bytes, max_message: int) -> None:
    """Raise ProtocolError if a push's id and data (what the browser gets) are too big."""
    size = len(id_part) + len(data_json)
    if size > max_message:
        raise ProtocolError(
            f"message is {size} bytes, over the {max_message}-byte limit (FLOW_MAX_MESSAGE)"
        )


def push_parts(stream: str, message_id: str) -> tuple[bytes, bytes]:
    """The two parts of a push frame before its data: the head, which names ``stream``
    (a user or ``"*"``), and the id. Cached. Raises ProtocolError."""
    if type(stream) is str and stream == BROADCAST:
        head = BROADCAST_HEAD
    else:
        head = (push_heads.get(stream) if type(stream) is str else None) or _new_push_head(stream)
    id_part = (id_parts.get(message_id) if type(message_id) is str else None) or _new_id_part(message_id)
    return head, id_part


BROADCAST_HEAD = PUSH_PREFIX + b"*\0"


def channel_push_parts(channel: str, message_id: str) -> tuple[bytes, bytes]:
    """:func:`push_parts` for a channel: the head names the channel's stream (``P1\\0``,
    NUL, the name, NUL). Cached apart from the user heads, which flow.Flow.push reads
    directly: a channel's head must never be found under a username."""
    head = channel_heads.get(channel) if type(channel) is str else None
    if head is None:
        name = check_channel(channel)
        head = PUSH_PREFIX + b"\0" + name.encode("ascii") + b"\0"
        if len(channel_heads) >= PUSH_CACHE_SIZE:
            channel_heads.clear()
        channel_heads[name] = head
    id_part = (id_parts.get(message_id) if type(message_id) is str else None) or _new_id_part(message_id)
    return head, id_part


def encode_channel_push(
    channel: str,
    message_id: str,
    data: Any,
    max_message: int,
    serializer: Callable[[Any], bytes] = fast_dumps,
) -> bytes:
    """The one frame of a publish to ``channel`` (section 9). Raises ProtocolError."""
    head, id_part = channel_push_parts(channel, message_id)
    data_json = encode_data(data, serializer)
    check_push_size(id_part, data_json, max_message)
    return head + id_part + data_json

# Cached: a web app pushes the same kinds of message to the same users again and again.
# Valid values only, and never the broadcast head: flow.Flow.push reads these dicts
# directly, so a user found here is a valid user. A full cache starts over: cheaper
# than tracking recency, and refilling costs one validation per entry.
push_heads: dict[str, bytes] = {}
channel_heads: dict[str, bytes] = {}
id_parts: dict[str, bytes] = {}
PUSH_CACHE_SIZE = 4096


def _new_push_head(username: object) -> bytes:
    name = check_username(username)
    head = PUSH_PREFIX + name.encode("utf-8") + b"\0"
    if len(push_heads) >= PUSH_CACHE_SIZE:
        push_heads.clear()
    push_heads[name] = head
    return head


def _new_id_part(message_id: object) -> bytes:
    checked = check_message_id(message_id)
    part = dumps(checked) + b"\n"
    if len(id_parts) >= PUSH_CACHE_SIZE:
        id_parts.clear()
    id_parts[checked] = part
    return part


# Plain slotted dataclasses: a frozen one costs a setattr call per field, per message.
@dataclass(slots=True)
class Push:
    stream: str
    id_json: bytes
    data_json: bytes


def decode_push(raw: bytes) -> Push:
    """Inverse of :func:`encode_push`, for the proxy. Raises ProtocolError."""
    if not raw.startswith(PUSH_PREFIX):
        raise ProtocolError(f"a push starts with {PUSH_PREFIX!r}")
    start = len(PUSH_PREFIX)
    if raw[start : start + 1] == b"\0":  # a channel's stream: NUL, then the name
        end = raw.find(b"\0", start + 1)
        if end < 0:
            raise ProtocolError("push has no channel terminator")
        stream = _channel_stream_name(raw[start + 1 : end])
    else:
        end = raw.find(b"\0", start)
        if end < 0:
            raise ProtocolError("push has no username terminator")
        stream = _stream_name(raw[start:end])
    id_json, sep, data_json = raw[end + 1 :].partition(b"\n")
    # id_json is a JSON string, which never holds a raw newline, so the split is exact.
    if not sep or not data_json:
        raise ProtocolError("body is not id_json NEWLINE data_json")
    # Any local process can push: what is spliced into browser frames unparsed must be
    # exactly one JSON value each, or one push could forge fields or break the frame.
    if id_json not in _good_id_json:
        _check_id_json(id_json)
    try:
        _orjson_loads(data_json)
    except (orjson.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"data_json is not one UTF-8 JSON value: {exc}") from None
    return Push(stream, id_json, data_json)


# The id_json values already found good, bounded like the push caches.
_good_id_json: set[bytes] = set()


def _check_id_json(id_json: bytes) -> None:
    if len(id_json) < 2 or id_json[:1] != b'"' or id_json[-1:] != b'"':
        raise ProtocolError("body is not id_json NEWLINE data_json: id_json is not a JSON string")
    try:
        message_id = _orjson_loads(id_json)
    except orjson.JSONDecodeError:
        raise ProtocolError("id_json is not a JSON string") from None
    if type(message_id) is not str:
        raise ProtocolError("id_json is not a JSON string")
    check_message_id(message_id)
    if len(_good_id_json) >= PUSH_CACHE_SIZE:
        _good_id_json.clear()
    _good_id_json.add(id_json)


@functools.lru_cache(maxsize=2048)
def _stream_name(user: bytes) -> str:
    try:
        stream = user.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("username is not UTF-8") from None
    if stream != BROADCAST:
        check_username(stream)
    return stream


@functools.lru_cache(maxsize=2048)
def _channel_stream_name(name: bytes) -> str:
    try:
        return channel_stream(check_channel(name.decode("ascii")))
    except UnicodeDecodeError:
        raise ProtocolError("a channel name is ASCII") from None


@functools.lru_cache(maxsize=2048)
def _json_string(text: str) -> bytes:
    return dumps(text)


@functools.lru_cache(maxsize=4096)
def _stream_parts(stream: str, epoch: str) -> tuple[bytes, bytes, bytes, bytes]:
    """What every message of ``stream`` in ``epoch`` repeats, encoded once: the browser
    frame's address field, its epoch field with the closing brace, the fan-out topic with
    the message kind, and the epoch between the fan-out header's spaces."""
    if stream[:1] == CHANNEL_MARK:
        address = b',"channel":' + _json_string(stream[1:])
    else:
        address = b',"username":' + _json_string(stream)
    return (address, b',"epoch":' + _json_string(epoch) + b"}", topic(stream) + KIND_MESSAGE,
            b" " + epoch.encode() + b" ")


def build_message_frame(push: Push, seq: int, epoch: str) -> bytes:
    """The browser frame ``{"id","username","data","seq","epoch"}`` (``"channel"`` instead
    of ``"username"`` for a channel's message), built once.

    Spliced from already-encoded JSON so that no process parses ``data`` again; the proxy
    calls this for every push, hence the per-stream parts from a cache.
    """
    address, tail, _, _ = _stream_parts(push.stream, epoch)
    return b"".join((b'{"id":', push.id_json, address, b',"data":', push.data_json, b',"seq":',
                     str(seq).encode(), tail))


def message_frame(stream: str, seq: int, epoch: str, frame: bytes) -> bytes:
    """What the proxy publishes: ``topic M seq SP epoch SP websocket_frame``, one frame."""
    _, _, head, epoch_part = _stream_parts(stream, epoch)
    return b"".join((head, str(seq).encode(), epoch_part, frame))


def sync_frame(stream: str, seq: int, epoch: str) -> bytes:
    """The proxy's answer to a subscription: the stream's epoch and current seq."""
    return b"".join((topic(stream), KIND_SYNC, str(seq).encode(), b" ", epoch.encode(), b" "))


@dataclass(slots=True)
class Delivery:
    topic: bytes
    kind: bytes
    seq: int
    epoch: str
    frame: bytes

    @property
    def stream(self) -> str:
        return stream_of_topic(self.topic)


def decode_delivery(raw: bytes) -> Delivery:
    """Inverse of :func:`message_frame` and :func:`sync_frame`. Raises ProtocolError."""
    cut = raw.find(b"\0") + 1
    kind = raw[cut : cut + 1]
    if (kind == KIND_COMMAND or kind == KIND_PRESENCE) and cut:
        return Delivery(raw[:cut], kind, 0, "", raw[cut + 1 :])
    if cut == 0 or kind not in (KIND_MESSAGE, KIND_SYNC):
        raise ProtocolError("expected topic, kind, seq, epoch, frame")
    seq_end = raw.find(b" ", cut)
    epoch_end = raw.find(b" ", seq_end + 1)
    if seq_end < 0 or epoch_end < 0:
        raise ProtocolError("delivery header is not seq SP epoch SP")
    try:
        seq = int(raw[cut + 1 : seq_end])
        epoch = raw[seq_end + 1 : epoch_end].decode("ascii")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"bad delivery header: {exc}") from None
    return Delivery(raw[:cut], kind, seq, epoch, raw[epoch_end + 1 :])


# ---------------------------------------------------------------- commands to the pool
#
# flow.disconnect(user) and flow.unsubscribe(user, channel) reach every WebSocket server
# holding a socket of the user, on the user's own stream but outside its numbering (no
# seq, no history: a command is for the sockets open now).
#
# publisher -> engine:   b"X1\0" username b"\0" command_json
# proxy -> servers:      topic b"X" command_json
# A command is {"op": "disconnect"} or {"op": "unsubscribe", "channel": c}.

COMMAND_PREFIX = b"X1\0"
KIND_COMMAND = b"X"
COMMAND_OPS = ("disconnect", "unsubscribe")


def encode_command(username: str, op: str, channel: str | None = None) -> bytes:
    """The frame of a command for ``username``'s sockets. Raises ProtocolError."""
    name = check_username(username)
    if op not in COMMAND_OPS:
        raise ProtocolError(f"unknown command {op!r}")
    command: dict[str, str] = {"op": op}
    if op == "unsubscribe":
        command["channel"] = check_channel(channel)
    return COMMAND_PREFIX + name.encode("utf-8") + b"\0" + dumps(command)


def check_command(command_json: bytes) -> dict[str, str]:
    """The command a frame carries, checked; ProtocolError for anything else."""
    try:
        command = _orjson_loads(command_json)
    except (orjson.JSONDecodeError, RecursionError):
        raise ProtocolError("a command is one JSON object") from None
    if type(command) is not dict or command.get("op") not in COMMAND_OPS:
        raise ProtocolError("a command is {\"op\": \"disconnect\" | \"unsubscribe\", ...}")
    if command["op"] == "unsubscribe":
        check_channel(command.get("channel"))
        return {"op": "unsubscribe", "channel": command["channel"]}
    return {"op": "disconnect"}


def decode_command(raw: bytes) -> tuple[str, bytes]:
    """(username, command JSON) of a command frame; ProtocolError for anything else."""
    if not raw.startswith(COMMAND_PREFIX):
        raise ProtocolError(f"a command starts with {COMMAND_PREFIX!r}")
    end = raw.find(b"\0", len(COMMAND_PREFIX))
    if end < 0:
        raise ProtocolError("command has no username terminator")
    stream = _stream_name(raw[len(COMMAND_PREFIX) : end])
    if stream == BROADCAST:
        raise ProtocolError("a command is for one user")
    command_json = raw[end + 1 :]
    check_command(command_json)
    return stream, command_json


def command_frame(stream: str, command_json: bytes) -> bytes:
    """What the proxy publishes for a command: ``topic X command_json``."""
    return topic(stream) + KIND_COMMAND + command_json


# ---------------------------------------------------------------- presence (section 9)
#
# Engine -> servers, on the channel's topic, outside the numbering (no seq, no history):
#     topic b"J" ["JOIN" | "LEAVE", username, version]
# Server -> proxy, on the control DEALER (after the empty delimiter), one JSON frame:
#     {"op": "presence", "rid": n, "server": id, "full": bool, "bye": bool,
#      "changes": [[stream, user, count], ...], "query": stream | null, "limit": n | null}
#   a server's absolute counts (flowcore.presence.Ledger); "full": they are all it holds;
#   "bye": it stops (its counts go). A publisher asks with no "server" and only "query".
#     {"op": "online", "rid": n, "stream": s}
# Proxy -> server/publisher: {"rid": n, "streams": {}, "known": bool,
#                             "presence": {"version", "count", "users": {u: k} | null} | null,
#                             "online": n}
#   "known": false when a partial report came from a server the proxy does not know (it
#   restarted, or the server's lease ran out): nothing was applied, send everything.

KIND_PRESENCE = b"J"
PRESENCE_KINDS = ("JOIN", "LEAVE")


# To every server (on the broadcast topic): the proxy rebuilt its presence table; listening
# subscriptions get fresh snapshots (ServerEngine's sink.on_presence_reset).
PRESENCE_RESET = b"RESET"


def presence_reset_frame() -> bytes:
    return topic(BROADCAST) + KIND_PRESENCE + PRESENCE_RESET


def presence_event_frame(event: PresenceEvent) -> bytes:
    return topic(event.stream) + KIND_PRESENCE + dumps([event.kind, event.user, event.version])


def check_presence_event(stream: str, payload: bytes) -> PresenceEvent:
    """The event a presence delivery carries, checked; ProtocolError for anything else."""
    try:
        kind, user, version = _orjson_loads(payload)
    except (orjson.JSONDecodeError, RecursionError, ValueError, TypeError):
        raise ProtocolError("a presence event is [kind, username, version]") from None
    if kind not in PRESENCE_KINDS or type(version) is not int or not is_channel_stream(stream):
        raise ProtocolError("a presence event is [\"JOIN\" | \"LEAVE\", username, version] on a channel")
    check_username(user)
    return PresenceEvent(stream, kind, user, version)


@dataclass(frozen=True)
class PresenceRequest:
    request_id: int
    op: str  # "presence" | "online"
    server: str | None
    full: bool
    bye: bool
    changes: dict[tuple[str, str], int]
    query: str | None
    limit: int | None
    linger: float = 0.0  # with bye: keep the counts this long (a drain's reconnect window)
    again: bool = False  # a full report from a server an earlier proxy knew


def build_presence_request(request_id: int, server: str | None, changes: Mapping[tuple[str, str], int],
                           full: bool = False, bye: bool = False, query: str | None = None,
                           limit: int | None = None, linger: float = 0.0, again: bool = False) -> bytes:
    return dumps({"op": "presence", "rid": request_id, "server": server, "full": full, "bye": bye,
                  "changes": [[stream, user, count] for (stream, user), count in changes.items()],
                  "query": query, "limit": limit, "linger": linger, "again": again})


def build_online_request(request_id: int, stream: str) -> bytes:
    return dumps({"op": "online", "rid": request_id, "stream": stream})


# A stopping server's counts are kept at most this long (hub.MAX_RECONNECT_WINDOW and more).
MAX_PRESENCE_LINGER = 600.0
PRESENCE_REQUEST_HEAD = b'{"op":"presence",'
ONLINE_REQUEST_HEAD = b'{"op":"online",'


def parse_presence_request(raw: bytes) -> PresenceRequest:
    """Inverse of :func:`build_presence_request` and :func:`build_online_request`; any other
    bytes raise ProtocolError."""
    try:
        obj = _orjson_loads(raw)
        if type(obj) is not dict or type(obj.get("rid")) is not int:
            raise ProtocolError("not an object with an integer rid")
        if obj.get("op") == "online":
            return PresenceRequest(obj["rid"], "online", None, False, False, {}, check_stream(obj["stream"]), None)
        if obj.get("op") != "presence":
            raise ProtocolError("unknown op")
        server = obj.get("server")
        if server is not None and (type(server) is not str or not 0 < len(server) <= 64):
            raise ProtocolError("server is not a short string")
        changes: dict[tuple[str, str], int] = {}
        for stream, user, count in obj.get("changes") or ():
            if type(count) is not int or count < 0:
                raise ProtocolError("a count is a non-negative integer")
            check_stream(stream)
            if user != "":
                check_username(user)
            changes[(stream, user)] = count
        if changes and server is None:
            raise ProtocolError("changes without a server")
        query, limit = obj.get("query"), obj.get("limit")
        if query is not None:
            check_stream(query)
        if limit is not None and (type(limit) is not int or limit < 0):
            raise ProtocolError("limit is not a non-negative integer")
        linger = obj.get("linger", 0)
        if type(linger) not in (int, float) or not 0 <= linger <= MAX_PRESENCE_LINGER:
            raise ProtocolError(f"linger is a number of seconds from 0 to {MAX_PRESENCE_LINGER}")
        return PresenceRequest(obj["rid"], "presence", server, obj.get("full") is True, obj.get("bye") is True,
                               changes, query, limit, float(linger), obj.get("again") is True)
    except ProtocolError as exc:
        raise ProtocolError(f"bad presence request: {exc}") from None
    except (orjson.JSONDecodeError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise ProtocolError(f"bad presence request: {exc!r}") from None


def build_presence_reply(request_id: int, known: bool, snapshot: Snapshot | None, online: int = 0) -> bytes:
    presence = None if snapshot is None else {
        "version": snapshot.version, "count": snapshot.count, "users": snapshot.users}
    return dumps({"rid": request_id, "streams": {}, "known": known, "presence": presence, "online": online})


def parse_presence_reply(obj: Mapping[str, Any]) -> tuple[bool, Snapshot | None, int]:
    """(known, snapshot, online) of a decoded presence reply; ProtocolError when malformed."""
    known, presence, online = obj.get("known"), obj.get("presence"), obj.get("online", 0)
    if type(known) is not bool or type(online) is not int:
        raise ProtocolError("a presence reply has known (bool) and online (int)")
    if presence is None:
        return known, None, online
    try:
        version, count, users = presence["version"], presence["count"], presence["users"]
    except (KeyError, TypeError):
        raise ProtocolError("presence is {version, count, users}") from None
    if type(version) is not int or type(count) is not int or not (users is None or type(users) is dict):
        raise ProtocolError("presence is {version: int, count: int, users: {...} | null}")
    if users is not None and not all(type(k) is int for k in users.values()):
        raise ProtocolError("presence users map names to connection counts")
    return known, Snapshot(version, count, users), online


def presence_state(snapshot: Snapshot) -> dict[str, Any]:
    """A snapshot as browsers see it (SUBSCRIBE OK's ``presence``, a PRESENCE answer): past
    FLOW_PRESENCE_MAX_LIST users, ``users`` is left out and only ``count`` says how many."""
    state: dict[str, Any] = {"version": snapshot.version, "count": snapshot.count}
    if snapshot.users is not None:
        state["users"] = {user: {"connections": count} for user, count in snapshot.users.items()}
    return state


def presence_answer(channel: str, snapshot: Snapshot, ref: str | int | None = None) -> str:
    return _with_ref({"id": "PRESENCE", "channel": channel, **presence_state(snapshot)}, ref)


def presence_diff(channel: str, event: PresenceEvent) -> str:
    return dumps({"id": event.kind, "channel": channel, "username": event.user,
                  "version": event.version}).decode("utf-8")


# ---------------------------------------------------------------- history (control channel)
#
# server -> proxy (DEALER -> ROUTER): one JSON frame (after the DEALER's empty delimiter)
#     {"op": "history", "rid": n, "max_bytes": m, "streams": {name: {"seq": s, "epoch": e}}}
#     {"op": "ping", "rid": n}
# proxy -> server: the empty delimiter, one JSON header frame, then the message frames:
#     {"rid": n, "streams": {name: {"epoch": e, "seq": head, "messages": [s1, s2, ...] | null}}}
#     followed by one frame per listed message, streams in header order, each the
#     message's complete WebSocket text frame (binary-safe: nothing is decoded as text).
#     A ping is answered with {"rid": n, "streams": {}} and no further frames.
#     {"op": "stats", "rid": n} is answered with {"rid": n, "streams": {}, "stats": {...}}
#     (for operators and tests: "streams" held, "subscribed", "history_messages",
#     "numbered", "dropped" per kind, "run_epoch"); it costs a pass over every stream.
#
# What the proxy answers, per stream asked (every stream asked is in the header):
#   "epoch" and "seq" are the stream's own (a stream the proxy does not know is created:
#   seq 0, a fresh epoch). "messages" lists the messages after the asked seq, contiguous:
#   at least one when any is owed and max_bytes > 0, and no more once their frames reach
#   max_bytes (the rest is asked for again from the last one); [] for max_bytes 0. It is
#   null when what is owed cannot all be given: another epoch, a seq beyond the head, the
#   next message evicted (FLOW_HISTORY_SIZE) or older than FLOW_HISTORY_TTL.
# Stream names are usernames or "*". A request that breaks these rules, or is over 8 MiB,
# gets no answer (the proxy logs it). A subscription to a topic is answered with a sync
# frame on the fan-out; subscribe each topic once per SUB socket (libzmq passes a repeat
# but sends one unsubscription for both, so the proxy would think the topic still held),
# and ask positions with max_bytes 0 instead of subscribing again.


def build_history_request(request_id: int, streams: Mapping[str, tuple[int, str]], max_bytes: int) -> bytes:
    """Ask for the messages after ``seq`` in ``epoch``, per stream, up to about
    ``max_bytes`` of frames each (0: positions only)."""
    return dumps(
        {
            "op": "history",
            "rid": request_id,
            "max_bytes": max_bytes,
            "streams": {name: {"seq": seq, "epoch": epoch} for name, (seq, epoch) in streams.items()},
        }
    )


def build_ping_request(request_id: int) -> bytes:
    return dumps({"op": "ping", "rid": request_id})


def build_stats_request(request_id: int) -> bytes:
    return dumps({"op": "stats", "rid": request_id})


@dataclass(frozen=True)
class HistoryRequest:
    request_id: int
    streams: dict[str, tuple[int, str]]
    max_bytes: int = 0
    op: str = "history"


def parse_history_request(raw: bytes) -> HistoryRequest:
    """Inverse of :func:`build_history_request`, :func:`build_ping_request` and
    :func:`build_stats_request`; any other bytes raise ProtocolError."""
    try:
        # orjson: an audit slice names about 50 streams and the proxy reads several a
        # second per server. It is also stricter (no NaN, no lone surrogate).
        obj = _orjson_loads(raw)
        if not isinstance(obj, dict):
            raise ProtocolError("not an object")
        op = obj.get("op")
        request_id = obj["rid"]
        if type(request_id) is not int:
            raise ProtocolError("rid is not an integer")
        if op == "ping" or op == "stats":
            return HistoryRequest(request_id, {}, 0, op)
        if op != "history":
            raise ProtocolError("unknown op")
        max_bytes = obj.get("max_bytes", 0)
        if type(max_bytes) is not int or max_bytes < 0:
            raise ProtocolError("max_bytes is not a non-negative integer")
        streams = {}
        for name, pos in obj["streams"].items():
            seq, epoch = pos["seq"], pos["epoch"]
            if type(seq) is not int or seq < 0 or not isinstance(epoch, str) or not isinstance(name, str):
                raise ProtocolError("bad stream position")
            check_stream(name)
            streams[name] = (seq, epoch)
        return HistoryRequest(request_id, streams, max_bytes)
    except ProtocolError as exc:
        raise ProtocolError(f"bad history request: {exc}") from None
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise ProtocolError(f"bad history request: {exc!r}") from None


# A change mark (see ServerEngine.mark) is a short token of the proxy's own making.
MAX_MARK = 64


def build_history_reply(
    request_id: int, streams: Mapping[str, tuple[str, int, list[tuple[int, bytes]] | None]],
    mark: str | None = None,
) -> list[bytes]:
    """Per stream: (epoch, head seq, [(seq, wire), ...] or None); ``mark``, the proxy's
    change mark when it answered. The frames to send after the routing id and the empty
    delimiter. A ping's or a stats request's answer is the same with no streams."""
    header = {}
    frames: list[bytes] = []
    for name, (epoch, head, messages) in streams.items():
        header[name] = {
            "epoch": epoch,
            "seq": head,
            "messages": None if messages is None else [seq for seq, _ in messages],
        }
        if messages:
            frames.extend(wire for _, wire in messages)
    reply: dict[str, Any] = {"rid": request_id, "streams": header}
    if mark is not None:
        reply["mark"] = mark
    return [dumps(reply), *frames]


def parse_history_reply(frames: list[bytes]) -> tuple[int, dict[str, StreamHistory], str | None]:
    """Inverse of :func:`build_history_reply` (the frames after the empty delimiter):
    the request id, the streams, the change mark (None from a proxy that gives none)."""
    try:
        obj = json.loads(frames[0])
        if not isinstance(obj, dict):
            raise ProtocolError("not an object")
        request_id = obj["rid"]
        if type(request_id) is not int:
            raise ProtocolError("rid is not an integer")
        mark = obj.get("mark")
        if mark is not None and (not isinstance(mark, str) or len(mark) > MAX_MARK):
            raise ProtocolError("mark is not a short string")
        streams = {}
        at = 1
        for name, entry in obj["streams"].items():
            epoch, head, seqs = entry["epoch"], entry["seq"], entry["messages"]
            if not isinstance(epoch, str) or type(head) is not int:
                raise ProtocolError("bad stream position")
            messages = None
            if seqs is not None:
                messages = []
                for seq in seqs:
                    if type(seq) is not int:
                        raise ProtocolError("message seq is not an integer")
                    messages.append((seq, frames[at]))
                    at += 1
            streams[name] = StreamHistory(epoch, head, messages, mark)
        if at != len(frames):
            raise ProtocolError(f"{len(frames) - at} frames more than the header lists")
        return request_id, streams, mark
    except ProtocolError as exc:
        raise ProtocolError(f"bad history reply: {exc}") from None
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError, OverflowError) as exc:
        raise ProtocolError(f"bad history reply: {exc!r}") from None


# ---------------------------------------------------------------- browser <-> server

_JWT_SHAPE = re.compile(r"^[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class Subscribe:
    """SUBSCRIBE (section 9), or one entry of AUTH's ``subscribe``."""

    channel: str
    since: tuple[int, str] | None = None
    token: str | None = None
    presence: bool | None = None  # None: as the channel has it (FLOW_PRESENCE_CHANNELS)
    ref: str | int | None = None


@dataclass(frozen=True)
class Unsubscribe:
    channel: str
    ref: str | int | None = None


@dataclass(frozen=True)
class PresenceQuery:
    channel: str
    ref: str | int | None = None


@dataclass(frozen=True)
class Authenticate:
    token: str
    resume: dict[str, tuple[int, str]] = field(default_factory=dict)
    # Channels to subscribe to once authenticated, in the order given (section 9).
    subscribe: tuple[Subscribe, ...] = ()
    # A revision-2 frame ({"id": "AUTH"}): the socket may be sent revision-2 frames.
    revision2: bool = False



@dataclass(frozen=True)
class Ping:
    heartbeat: bool  # True for the bare "<3", which gets no answer


ClientFrame = Authenticate | Ping | Subscribe | Unsubscribe | PresenceQuery


def parse_client_frame(text: str) -> ClientFrame:
    """Parse one text frame from a browser. Raises ProtocolError.

    Anything that is neither the heartbeat nor JSON (an object or array) is taken as a raw token
    (message_flow sends its token that way); the token check then says whether it is one.
    """
    if text == HEARTBEAT:
        return Ping(heartbeat=True)
    if not isinstance(text, str):
        raise ProtocolError("a client frame is text")
    stripped = text.strip()
    if not stripped.startswith(("{", "[")):
        return Authenticate(stripped)
    # orjson, not json: it stops at a nesting depth instead of recursing into a
    # RecursionError, and refuses lone surrogates, NaN and Infinity, which no client sends.
    try:
        obj = orjson.loads(stripped)
    except (orjson.JSONDecodeError, RecursionError) as exc:
        if isinstance(exc, RecursionError) or "depth" in str(exc) or "recursion" in str(exc):
            raise ProtocolError("frame nests too deep") from None
        raise ProtocolError("frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("frame is not a JSON object")
    frame_id = obj.get("id")
    if frame_id == "PING":
        return Ping(heartbeat=False)
    if frame_id == "AUTH":
        token = obj.get("token")
        if not isinstance(token, str):
            raise ProtocolError("AUTH needs a string token")
        return Authenticate(token, _parse_resume(obj.get("resume")), _parse_auth_subscribe(obj.get("subscribe")),
                            revision2=True)
    if frame_id == "SUBSCRIBE":
        return _parse_subscribe(obj.get("channel"), obj, _parse_ref(obj))
    if frame_id == "UNSUBSCRIBE":
        return Unsubscribe(check_channel(obj.get("channel")), _parse_ref(obj))
    if frame_id == "PRESENCE":
        return PresenceQuery(check_channel(obj.get("channel")), _parse_ref(obj))
    if frame_id is None:
        raise ProtocolError("frame has no id")
    raise ProtocolError(f"unknown frame id {_shown(frame_id)}")


def _shown(value: object) -> str:
    """``value`` for an error message that goes back to the client and into the log:
    short, and never the repr of a deep structure (which could itself recurse too deep)."""
    if isinstance(value, str):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    if isinstance(value, (bool, float)) or (isinstance(value, int) and abs(value) < 10**20):
        return repr(value)
    return f"of type {type(value).__name__}"


# Channels one AUTH may ask for at once; FLOW_MAX_CHANNELS bounds what is granted.
MAX_AUTH_SUBSCRIBE = 1024
MAX_REF_CHARS = 64


def _parse_ref(obj: dict[str, Any]) -> str | int | None:
    ref = obj.get("ref")
    if ref is None:
        return None
    if type(ref) is int and abs(ref) < 2**53:
        return ref
    if type(ref) is str and len(ref) <= MAX_REF_CHARS:
        return ref
    raise ProtocolError(f"ref must be a string of at most {MAX_REF_CHARS} characters or an integer")


def _parse_position(value: object, where: str) -> tuple[int, str]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{where} must be an object with seq and epoch")
    seq, epoch = value.get("seq"), value.get("epoch")
    if type(seq) is not int or seq < 0:
        raise ProtocolError(f"{where}.seq must be a non-negative integer")
    if not isinstance(epoch, str):
        raise ProtocolError(f"{where}.epoch must be a string")
    return seq, epoch


def _parse_subscribe(channel: object, obj: dict[str, Any], ref: str | int | None) -> Subscribe:
    # The name is checked when the subscription is decided, so that a bad one is answered
    # SUBSCRIBE FAILED invalid_channel (section 9), not a bare ERROR.
    if not isinstance(channel, str) or len(channel) > 4 * MAX_CHANNEL_BYTES:
        raise ProtocolError("SUBSCRIBE needs a channel name (a string)")
    name = str.__str__(channel)
    since = obj.get("since")
    token = obj.get("token")
    presence = obj.get("presence")
    if token is not None and not isinstance(token, str):
        raise ProtocolError(f"the token for channel {_shown(name)} must be a string")
    if presence is not None and not isinstance(presence, bool):
        raise ProtocolError("presence must be true or false")
    return Subscribe(name, None if since is None else _parse_position(since, f"since of {_shown(name)}"),
                     token, presence, ref)


def _parse_auth_subscribe(subscribe: object) -> tuple[Subscribe, ...]:
    if subscribe is None:
        return ()
    if not isinstance(subscribe, dict):
        raise ProtocolError("subscribe must be an object of {channel: {since?, token?}}")
    if len(subscribe) > MAX_AUTH_SUBSCRIBE:
        raise ProtocolError(f"subscribe names more than {MAX_AUTH_SUBSCRIBE} channels")
    out = []
    for channel, spec in subscribe.items():
        if spec is None:
            spec = {}
        if not isinstance(spec, dict):
            raise ProtocolError(f"subscribe[{_shown(channel)}] must be an object")
        out.append(_parse_subscribe(channel, spec, None))
    return tuple(out)


def _parse_resume(resume: object) -> dict[str, tuple[int, str]]:
    if resume is None:
        return {}
    if not isinstance(resume, dict):
        raise ProtocolError("resume must be an object of {stream: {seq, epoch}}")
    return {name: _parse_position(position, f"resume[{_shown(name)}]") for name, position in resume.items()}


def looks_like_jwt(text: str) -> bool:
    return bool(_JWT_SHAPE.match(text))


def encode_text_frame(payload: bytes) -> bytes:
    """One unmasked, uncompressed WebSocket text frame (RFC 6455 section 5.2).

    Server frames are never masked, so a message is framed once and the same bytes
    are written to every socket that receives it.
    """
    length = len(payload)
    if length < 126:
        header = bytes((0x81, length))
    elif length < 65536:
        header = struct.pack("!BBH", 0x81, 126, length)
    else:
        header = struct.pack("!BBQ", 0x81, 127, length)
    return header + payload


def auth_request(reason: str | None = None) -> str:
    if reason is None:
        return '{"id":"AUTH REQUEST"}'
    return dumps({"id": "AUTH REQUEST", "reason": reason}).decode("utf-8")


def auth_ok(
    username: str,
    epoch: str,
    heartbeat: float,
    recovered: bool,
    missed: int,
    streams: Mapping[str, tuple[int, str]] | None = None,
    expires_in: float | None = None,
    refreshed: bool = False,
    max_channels: int | None = None,
) -> str:
    """AUTH OK (PROTOCOL.md section 3): ``streams`` maps every stream the socket receives to
    the (seq, epoch) after which its delivery continues; ``max_channels`` (section 9) for a
    revision-2 socket."""
    frame: dict[str, Any] = {
        "id": "AUTH OK",
        "username": username,
        "epoch": epoch,
        "heartbeat": int(heartbeat) if heartbeat == int(heartbeat) else heartbeat,
        "recovered": recovered,
        "missed": missed,
    }
    if streams is not None:
        frame["streams"] = {name: {"seq": seq, "epoch": ep} for name, (seq, ep) in streams.items()}
    if expires_in is not None:
        frame["expires_in"] = max(0, int(expires_in))
    if refreshed:
        frame["refreshed"] = True
    if max_channels is not None:
        frame["max_channels"] = max_channels
    return dumps(frame).decode("utf-8")


def _with_ref(frame: dict[str, Any], ref: str | int | None) -> str:
    if ref is not None:
        frame["ref"] = ref
    return dumps(frame).decode("utf-8")


def subscribe_ok(channel: str, seq: int, epoch: str, recovered: bool, missed: int,
                 ref: str | int | None = None, presence: Snapshot | None = None) -> str:
    frame: dict[str, Any] = {"id": "SUBSCRIBE OK", "channel": channel, "seq": seq, "epoch": epoch,
                             "recovered": recovered, "missed": missed}
    if presence is not None:
        frame["presence"] = presence_state(presence)
    return _with_ref(frame, ref)


def subscribe_failed(channel: str, reason: str, temporary: bool, ref: str | int | None = None) -> str:
    return _with_ref({"id": "SUBSCRIBE FAILED", "channel": channel, "reason": reason,
                      "temporary": temporary}, ref)


def unsubscribe_ok(channel: str, ref: str | int | None = None) -> str:
    return _with_ref({"id": "UNSUBSCRIBE OK", "channel": channel}, ref)


def unsubscribed(channel: str, reason: str, resubscribe: bool) -> str:
    return dumps({"id": "UNSUBSCRIBED", "channel": channel, "reason": reason,
                  "resubscribe": resubscribe}).decode("utf-8")


def reconnect_reason(text: str, window: float) -> str:
    """A close reason telling clients over how many seconds to spread their reconnects
    (``static/js/websocket.js`` reads ``reconnect_within=``). At most 123 bytes."""
    hint = f"; reconnect_within={window:.1f}"
    return text.encode("utf-8")[: 123 - len(hint)].decode("utf-8", "ignore") + hint


def auth_failed(reason: str) -> str:
    return dumps({"id": "AUTH FAILED", "reason": reason}).decode("utf-8")


def pong() -> str:
    return '{"id":"PONG"}'


def error(reason: str) -> str:
    return dumps({"id": "ERROR", "reason": reason}).decode("utf-8")


# ---------------------------------------------------------------- flush (publisher <-> proxy)
#
# PUSH/PULL has no acknowledgement, so a publisher learns that the proxy has taken
# everything it pushed up to some point from two messages carrying one token (16 random
# bytes as 32 lowercase hex digits):
#
#   publisher -> proxy, on the PUSH socket, behind the pushes it covers (one frame):
#       b"F1\0" token
#   publisher -> proxy, on a DEALER to the control socket (after the empty delimiter):
#       {"op": "flush", "rid": n, "token": t}
#   proxy -> publisher, once it has taken both, in either order:
#       {"rid": n, "streams": {}, "flushed": t}
#
# The marker is never numbered and never fanned out. ZeroMQ keeps one PUSH socket's frames
# in order, so when the proxy takes the marker it has taken every frame before it. A half
# whose other half does not come is forgotten after a minute (and only so many are kept).
# The publisher asks again every second while it waits: a proxy restarted in between has
# the marker but never got the first request.

FLUSH_PREFIX = b"F1\0"
FLUSH_TOKEN_CHARS = 32
_FLUSH_TOKEN = re.compile(rb"[0-9a-f]{32}")


def flush_marker(token: str) -> bytes:
    """The marker frame a publisher sends on its PUSH socket, behind what it covers."""
    return FLUSH_PREFIX + token.encode("ascii")


def parse_flush_marker(raw: bytes) -> str:
    """The token of a marker frame (which starts with FLUSH_PREFIX). Raises ProtocolError."""
    token = raw[len(FLUSH_PREFIX) :]
    if not raw.startswith(FLUSH_PREFIX) or not _FLUSH_TOKEN.fullmatch(token):
        raise ProtocolError(f"a flush marker is {FLUSH_PREFIX!r} and {FLUSH_TOKEN_CHARS} lowercase hex digits")
    return token.decode("ascii")


def build_flush_request(request_id: int, token: str) -> bytes:
    return dumps({"op": "flush", "rid": request_id, "token": token})


def parse_flush_request(raw: bytes) -> tuple[int, str]:
    """``(rid, token)`` of a flush request; any other bytes raise ProtocolError."""
    return _parse_flush(raw, "op", "flush", "token")


def build_flush_reply(request_id: int, token: str) -> bytes:
    return dumps({"rid": request_id, "streams": {}, "flushed": token})


def parse_flush_reply(raw: bytes) -> tuple[int, str]:
    """``(rid, token)`` of a flush reply (the frame after the empty delimiter)."""
    return _parse_flush(raw, "streams", {}, "flushed")


def _parse_flush(raw: bytes, key: str, value: object, token_key: str) -> tuple[int, str]:
    try:
        obj = _orjson_loads(raw)
    except (orjson.JSONDecodeError, RecursionError):
        raise ProtocolError("not a flush message: not JSON") from None
    if not isinstance(obj, dict) or obj.get(key) != value:
        raise ProtocolError("not a flush message")
    request_id, token = obj.get("rid"), obj.get(token_key)
    if (type(request_id) is not int or not isinstance(token, str) or not token.isascii()
            or not _FLUSH_TOKEN.fullmatch(token.encode("ascii"))):
        raise ProtocolError("bad flush message: rid is not an integer or the token not 32 hex digits")
    return request_id, token


# ---------------------------------------------------------------- confirmed pushes (section 10)
#
# flow.Flow.push(..., confirm=True) learns its message's stream, seq, epoch and the sockets
# it was dispatched to (flowcore.engine.Receipt). On the ZeroMQ engine, two halves carrying
# one token, paired by the proxy in either order like a flush:
#
#   publisher -> proxy, on the PUSH socket (so it never overtakes the pushes sent before it):
#       b"R1\0" token b" " deadline b"\0" push_frame
#     ``deadline`` is the Unix time in milliseconds after which the proxy must not number it
#     (the publisher then raised flow.Unavailable, and a retry must not make a duplicate);
#     ``push_frame`` is an ordinary push (encode_push, encode_channel_push), numbered and
#     fanned out exactly like one.
#   publisher -> proxy, on its control DEALER: {"op": "receipt", "rid": n, "token": t}
#   proxy -> publisher: {"rid": n, "streams": {}, "receipt": t, "stream": s, "seq": n,
#                        "epoch": e, "online": k}
#     ``stream`` is the engine's name (a username, "*", or CHANNEL_MARK + a channel).

RECEIPT_PREFIX = b"R1\0"
RECEIPT_REQUEST_HEAD = b'{"op":"receipt",'
# The longest head a confirmed push adds to its push frame.
RECEIPT_HEAD_BYTES = len(RECEIPT_PREFIX) + FLUSH_TOKEN_CHARS + 1 + 20 + 1


def confirmed_push(token: str, deadline_ms: int, push_frame: bytes) -> bytes:
    """The frame of a confirmed push: ``push_frame`` behind its token and deadline."""
    return b"%s%s %d\0%s" % (RECEIPT_PREFIX, token.encode("ascii"), deadline_ms, push_frame)


def decode_confirmed_push(raw: bytes) -> tuple[str, int, Push]:
    """(token, deadline in Unix ms, push) of a confirmed push. Raises ProtocolError."""
    start = len(RECEIPT_PREFIX)
    token = raw[start : start + FLUSH_TOKEN_CHARS]
    cut = raw.find(b"\0", start + FLUSH_TOKEN_CHARS)
    deadline = raw[start + FLUSH_TOKEN_CHARS + 1 : cut]
    if (not raw.startswith(RECEIPT_PREFIX) or not _FLUSH_TOKEN.fullmatch(token) or cut < 0
            or raw[start + FLUSH_TOKEN_CHARS : start + FLUSH_TOKEN_CHARS + 1] != b" "
            or not deadline.isdigit() or len(deadline) > 20):
        raise ProtocolError(f"a confirmed push is {RECEIPT_PREFIX!r}, a token, a deadline and a push")
    return token.decode("ascii"), int(deadline), decode_push(raw[cut + 1 :])


def build_receipt_request(request_id: int, token: str) -> bytes:
    return dumps({"op": "receipt", "rid": request_id, "token": token})


def parse_receipt_request(raw: bytes) -> tuple[int, str]:
    """``(rid, token)`` of a receipt request; any other bytes raise ProtocolError."""
    return _parse_flush(raw, "op", "receipt", "token")


def build_receipt_reply(request_id: int, token: str, stream: str, seq: int, epoch: str, online: int) -> bytes:
    return dumps({"rid": request_id, "streams": {}, "receipt": token, "stream": stream, "seq": seq,
                  "epoch": epoch, "online": online})


def parse_receipt_reply(obj: Mapping[str, Any]) -> tuple[str, str, int, str, int]:
    """(token, stream, seq, epoch, online) of a decoded receipt reply; ProtocolError when
    malformed. ``stream`` is the engine's name, checked."""
    token, stream, seq, epoch, online = (obj.get(k) for k in ("receipt", "stream", "seq", "epoch", "online"))
    if (not isinstance(token, str) or type(seq) is not int or seq < 1 or not isinstance(epoch, str)
            or not epoch or type(online) is not int or online < 0):
        raise ProtocolError("a receipt is {receipt, stream, seq >= 1, epoch, online >= 0}")
    return token, check_stream(stream), seq, epoch, online


def public_stream_name(stream: str) -> str:
    """A stream as users name it (a receipt's ``stream``): a username, ``"*"``, or a
    channel's name without its CHANNEL_MARK."""
    return channel_of_stream(stream) if is_channel_stream(stream) else stream
