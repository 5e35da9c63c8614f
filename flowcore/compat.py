"""Every private attribute of tornado and pyzmq that Flow relies on, in one place.

The WebSocket server writes pre-framed bytes straight to the socket, bounds tornado's
write buffer, refuses unmasked client frames and drains an oversized frame before it
closes; each needs something tornado does not document. The publisher calls pyzmq's
compiled send directly (a third of the cost of a small send is pyzmq's Python wrapper).
``check()`` runs at start: with the pinned versions it only confirms; with others it
looks for each internal and stops the process with one line naming what is missing, so
an upgrade fails at start instead of in the middle of traffic.

Publishers import the package without tornado: it is imported here only if installed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, Iterator

try:
    import tornado.iostream as _iostream
except ImportError:  # a publisher-only install: none of the server's helpers are used
    _iostream = None  # type: ignore[assignment]

log = logging.getLogger("flow.compat")

PINNED_TORNADO = "6.6.1"
PINNED_PYZMQ = "27.3.0"

# Close code for a protocol violation (RFC 6455 section 7.4.1).
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_TOO_BIG = 1009
DRAINED_CLOSES = frozenset({CLOSE_PROTOCOL_ERROR, CLOSE_TOO_BIG})


class CompatError(RuntimeError):
    """A library internal Flow needs is missing: the message names it."""


def zmq_fast_send() -> Any:
    """pyzmq's compiled ``Socket.send(data, flags)``, without the Python wrapper's
    routing-id and group handling, which Flow never uses."""
    import zmq

    send = getattr(getattr(getattr(zmq, "backend", None), "Socket", None), "send", None)
    _judge("pyzmq", zmq.__version__, PINNED_PYZMQ, [] if send else ["zmq.backend.Socket.send"])
    return send


def check() -> None:
    """Raise CompatError unless every internal below exists in the installed tornado and pyzmq."""
    zmq_fast_send()
    import inspect

    import tornado
    import tornado.iostream
    import tornado.web
    import tornado.websocket

    needs = {
        "tornado.websocket.WebSocketProtocol13._abort": hasattr(tornado.websocket.WebSocketProtocol13, "_abort"),
        "tornado.websocket.WebSocketProtocol13._read_bytes": hasattr(
            tornado.websocket.WebSocketProtocol13, "_read_bytes"
        ),
        "tornado.websocket.WebSocketProtocol13._receive_frame": hasattr(
            tornado.websocket.WebSocketProtocol13, "_receive_frame"
        ),
        "tornado.websocket.WebSocketProtocol13(params)": "params"
        in inspect.signature(tornado.websocket.WebSocketProtocol13.__init__).parameters,
        "tornado.iostream.IOStream.writing": hasattr(tornado.iostream.IOStream, "writing"),
        "tornado.iostream.IOStream.max_write_buffer_size": "max_write_buffer_size"
        in tornado.iostream.BaseIOStream.__init__.__code__.co_varnames,
        "tornado.iostream._StreamBuffer._buffers": hasattr(tornado.iostream, "_StreamBuffer"),
        "tornado.websocket.WebSocketProtocol13._wire_bytes_in": "_wire_bytes_in"
        in inspect.getsource(tornado.websocket.WebSocketProtocol13.__init__),
        "tornado.web.RequestHandler._headers": "_headers" in inspect.getsource(tornado.web.RequestHandler.clear),
    }
    _judge("tornado", tornado.version, PINNED_TORNADO, [name for name, present in needs.items() if not present])


def _judge(library: str, version: str, pinned: str, missing: list[str]) -> None:
    """Raise CompatError naming what is missing; warn when present but not the pinned version."""
    if missing:
        raise CompatError(
            f"{library} {version} lacks internals Flow relies on ({', '.join(missing)}); "
            f"install the pinned {library}=={pinned} (requirements.txt)"
        )
    if version != pinned:
        log.warning("%s %s is not the pinned %s: internals checked and present, behaviour unverified",
                    library, version, pinned)


class LazyDeque:
    """The part of collections.deque that tornado's IOStream uses for its write queue and
    write futures, holding nothing while empty. An empty deque keeps a 64-slot block
    (about 760 bytes with the object); every IOStream has two, and an idle socket's are
    empty nearly always, since frames go straight to the socket (see direct_write)."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: collections.deque[Any] | None = None

    def append(self, item: Any) -> None:
        if self._items is None:
            self._items = collections.deque()
        self._items.append(item)

    def popleft(self) -> Any:
        if self._items is None:
            raise IndexError("pop from an empty deque")
        item = self._items.popleft()
        if not self._items:
            self._items = None
        return item

    def clear(self) -> None:
        self._items = None

    def __getitem__(self, index: int) -> Any:
        if self._items is None:
            raise IndexError("deque index out of range")
        return self._items[index]

    def __len__(self) -> int:
        return 0 if self._items is None else len(self._items)

    def __bool__(self) -> bool:
        return self._items is not None

    def __iter__(self) -> Iterator[Any]:
        return iter(()) if self._items is None else iter(self._items)


def slim_stream(stream: Any) -> None:
    """Swap an IOStream's two (empty) deques for LazyDeques (tornado 6.6 internals; a
    tornado without them is left as it is)."""
    buffer = getattr(stream, "_write_buffer", None)
    if isinstance(getattr(buffer, "_buffers", None), collections.deque) and not buffer._buffers:  # type: ignore[union-attr]
        buffer._buffers = LazyDeque()  # type: ignore[union-attr]
    if isinstance(getattr(stream, "_write_futures", None), collections.deque) and not stream._write_futures:
        stream._write_futures = LazyDeque()


class SlowConsumer(Exception):
    """The socket's send backlog passed its bound."""


def direct_write(stream: Any, wire: bytes) -> None:
    """Write ready WebSocket frames to ``stream``: one send() straight to the socket when
    nothing is buffered (tornado's write_message would make a task per frame), the rest
    through the stream's bounded buffer. Raises SlowConsumer past the bound; a closed
    stream is ignored (its close callback runs anyway). The fan-out's hot path."""
    if not stream.writing():
        try:
            sent = stream.socket.send(wire)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0  # let the stream's own write hit the error and close cleanly
        if sent == len(wire):
            return
        if sent:
            # The rest of a frame already begun must follow it, even past the bound
            # (by less than a bound and a frame): a cut frame would corrupt the stream.
            limit, stream.max_write_buffer_size = stream.max_write_buffer_size, None
            try:
                stream.write(wire[sent:])
            except _iostream.StreamClosedError:
                return
            finally:
                stream.max_write_buffer_size = limit
            if limit is not None and len(wire) - sent > limit:
                raise SlowConsumer()
            return
    try:
        stream.write(wire)
    except _iostream.StreamBufferFullError:
        raise SlowConsumer() from None
    except _iostream.StreamClosedError:
        pass


def forget_headers(handler: Any, empty: Any) -> None:
    """Drop an open WebSocket's handshake headers, request and response (the response's
    are the private ``_headers``), for one shared empty set."""
    handler.request.headers = handler._headers = empty


def unbound(stream: Any) -> None:
    """Lift the write bound (so the close frame after a 4008 can still be queued)."""
    stream.max_write_buffer_size = None


def set_bound(stream: Any, size: int) -> None:
    stream.max_write_buffer_size = size


def writing(stream: Any) -> bool:
    """Whether ``stream`` holds bytes it could not write to the kernel yet."""
    return stream is not None and bool(stream.writing())


async def drained(stream: Any) -> None:
    """Wait until everything written to ``stream`` so far has reached the kernel."""
    import tornado.iostream

    if stream.writing():
        try:
            await stream.write(b"")  # tornado resolves it once the buffer before it is flushed
        except tornado.iostream.StreamClosedError:
            pass


def protocol_class() -> type:
    """The WebSocket protocol Flow's handler uses (built once, on first use)."""
    global _PROTOCOL
    if _PROTOCOL is None:
        _PROTOCOL = _build_protocol()
    return _PROTOCOL


_PROTOCOL: type | None = None


def _build_protocol() -> type:
    import tornado.iostream
    import tornado.websocket

    class FlowProtocol(tornado.websocket.WebSocketProtocol13):
        """Three changes to tornado's protocol:

        - a client frame without a mask is a protocol error (RFC 6455 section 5.1:
          "a server MUST close the connection upon receiving a frame that is not
          masked"); tornado accepts it. The first read of each frame is its 2-byte header;
          the mask bit is checked at the frame's next read, before the frame is handled.
        - tornado aborts the TCP connection right after refusing an oversized frame, so the
          client, still sending, gets a reset instead of the 1009 close frame (likewise
          1002 after an unmasked frame, whose payload is still unread). Instead, read and
          discard what the client is still sending for a moment, then close.
        - each continuation frame is reported to the handler (``on_continuation``): tornado
          hands over a fragmented message only once it is complete, so without this its
          fragments would cost nothing against the rate limit.

        The hooks are plain functions, not coroutines, and add no callback: every idle
        socket has a header read pending, and anything chained to it stays alive with it
        (a coroutine is about 0.3 KiB); the ``_read_bytes`` future even saves tornado's own.
        """

        draining = False
        sent_code: int | None = None

        # Where the frame header stands lives in the handler's slot ``at_header``: True
        # before the header read, then the header's future until the frame's next read.
        # (Tornado's protocol already has 29 instance attributes, and at 30 CPython stops
        # sharing the dict's keys between instances: 1.3 KiB a socket.)

        def _receive_frame(self) -> Any:
            handler: Any = self.handler  # Flow's FlowSocket, which has the slot
            handler.at_header = True
            return super()._receive_frame()

        def _read_bytes(self, n: int) -> Any:
            handler: Any = self.handler
            header = handler.at_header
            if header is not True and header is not False:
                # The frame's second read (length, mask or payload; tornado always makes
                # one): its header has arrived, and nothing of the frame is handled yet.
                handler.at_header = False
                # Once: tornado goes on reading frames until the client answers the close
                # (or 5 s pass), and a client that keeps sending unmasked frames must not
                # get a log line for each of them.
                if not header.result()[1] & 0x80 and not self.server_terminated:
                    report = getattr(handler, "protocol_error", None)
                    if report is not None:
                        report("unmasked client frame")
                    handler.close(CLOSE_PROTOCOL_ERROR, "unmasked frame")
                elif not header.result()[0] & 0x0F:
                    # A continuation frame: tornado charges nothing until the message
                    # is complete, which a client can put off for ever.
                    fragment = getattr(handler, "on_continuation", None)
                    if fragment is not None:
                        fragment()
            # What tornado's coroutine does, as a future: count the bytes, read them.
            self._wire_bytes_in += n
            future = self.stream.read_bytes(n)
            if header is True:
                handler.at_header = future
            return future

        def close(self, code: int | None = None, reason: str | None = None) -> None:
            if not self.server_terminated:
                self.sent_code = code
            super().close(code, reason)

        def _abort(self) -> None:
            if self.sent_code in DRAINED_CLOSES and not self.client_terminated \
                    and not self.draining and self.stream is not None and not self.stream.closed():
                self.draining = True
                self.client_terminated = True
                asyncio.ensure_future(self._drain_then_close())
                return
            super()._abort()

        async def _drain_then_close(self) -> None:
            stream = self.stream
            deadline = time.monotonic() + 5
            try:
                while time.monotonic() < deadline:
                    await asyncio.wait_for(stream.read_bytes(65536, partial=True), 1.0)
            except (asyncio.TimeoutError, tornado.iostream.StreamClosedError):
                pass
            finally:
                super()._abort()

    return FlowProtocol


def make_protocol(handler: Any, proto: Any) -> Any:
    """Flow's protocol for ``handler``, with the parameters tornado chose for ``proto``.
    Built anew rather than by swapping __class__, which unshares the instance dict and
    costs ~300 bytes per connection."""
    return protocol_class()(handler, False, proto.params)


def abort(handler: Any) -> None:
    """Drop a connection at once (a client that never answered our close frame)."""
    conn = handler.ws_connection
    if conn is not None:
        conn._abort()
    else:
        stream = getattr(handler.request.connection, "stream", None)
        if stream is not None:
            stream.close()
