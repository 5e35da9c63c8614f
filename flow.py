"""Push messages to browsers from any Python process.

    import flow
    flow.push("alice", "TASK DONE", {"card": "ok"})   # every open tab of alice
    flow.push_all("NEWS", {"headline": "..."})         # every authenticated socket

``push`` validates and encodes in the caller, then hands the bytes to a ZeroMQ PUSH
socket without waiting on the network. That socket queues before its connection is
up and is flushed at exit, so a message pushed right after start or right before exit
is delivered. It is bounded (FLOW_PUSH_QUEUE): when the proxy is unreachable and the
queue is full, ``QueueFull`` is raised in the caller instead of a silent drop.
Safe from many threads, and in pre-forked workers: a forked child opens its own socket.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from typing import Any, Callable, Mapping

import zmq

from flowcore import protocol
from flowcore.settings import Settings, load_settings

__all__ = ["Flow", "QueueFull", "InvalidMessage", "push", "push_all", "configure"]

log = logging.getLogger("flow.publisher")

InvalidMessage = protocol.ProtocolError

# Plain ints: pyzmq's flag enums cost more than a small send itself.
_NOBLOCK = int(zmq.NOBLOCK)
# The compiled send under pyzmq's Python wrapper (which only adds routing-id/group
# handling we never use): a third of the cost of a small send.
_backend_send = zmq.backend.Socket.send
_orjson_dumps = protocol._orjson_dumps
_ORJSON_OPTIONS = protocol._ORJSON_OPTIONS
# Read directly on push's fast path: a dict lookup where a call would cost more.
_push_heads = protocol.push_heads
_id_parts = protocol.id_parts


class QueueFull(Exception):
    """The proxy is not taking messages and the outbound queue is full: nothing was sent."""


_instances: "weakref.WeakSet[Flow]" = weakref.WeakSet()


class Flow:
    """A publisher. One per process is plenty; it is thread-safe and fork-safe."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        settings: Settings | None = None,
        max_message: int | None = None,
        queue_size: int | None = None,
        linger: float | None = None,
        serializer: Callable[[Any], bytes] | None = None,  # must produce JSON
    ) -> None:
        settings = settings or load_settings()
        self.endpoint = endpoint or settings.publish_endpoint
        self.max_message = max_message or settings.max_message
        self.queue_size = queue_size or settings.push_queue
        self.linger = settings.push_linger if linger is None else linger
        # None: protocol.fast_dumps, which push inlines.
        self._serializer = None if serializer is protocol.fast_dumps else serializer
        self._lock = threading.Lock()
        self._context: zmq.Context | None = None
        self._socket: zmq.Socket | None = None
        self._closed = False
        _instances.add(self)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **kwargs: Any) -> "Flow":
        """A publisher configured from ``environ`` instead of this process's environment."""
        return cls(settings=load_settings(environ), **kwargs)

    def push(self, username: str, message_id: str, data: Any = None) -> None:
        """Send ``{"id": message_id, "data": data}`` to every open tab of ``username``."""
        # protocol.encode_push inlined, with its fast paths only: this is the caller's hot
        # path, and each function call or `with` saved here is about 5% of it. Cache
        # misses avoid exceptions, which would cost more than a miss's validation.
        try:
            head = _push_heads.get(username)
            id_part = _id_parts.get(message_id)
        except TypeError:  # unhashable: refused by _user_parts
            head = None
        if head is None or id_part is None:
            head, id_part = self._user_parts(username, message_id)
        if self._serializer is None:
            try:
                data_json = _orjson_dumps(data, None, _ORJSON_OPTIONS)
            except TypeError:
                data_json = b"null"
            if b"null" in data_json:  # NaN, or refused: the strict encoder decides (fast_dumps)
                data_json = protocol.encode_data(data, protocol.dumps)
        else:
            data_json = protocol.encode_data(data, self._serializer)
        if len(id_part) + len(data_json) > self.max_message:
            protocol.check_push_size(id_part, data_json, self.max_message)
        lock = self._lock
        lock.acquire()
        try:
            _backend_send(self._socket or self._open(), head + id_part + data_json, _NOBLOCK)
        except zmq.Again:
            raise self._queue_full() from None
        finally:
            lock.release()

    def push_all(self, message_id: str, data: Any = None) -> None:
        """Send to every authenticated socket of the deployment."""
        frame = protocol.encode_push(
            protocol.BROADCAST, message_id, data, self.max_message, self._serializer or protocol.fast_dumps
        )
        with self._lock:
            try:
                _backend_send(self._socket or self._open(), frame, _NOBLOCK)
            except zmq.Again:
                raise self._queue_full() from None

    @staticmethod
    def _user_parts(username: object, message_id: object) -> tuple[bytes, bytes]:
        if type(username) is str and username == protocol.BROADCAST:
            raise InvalidMessage('username "*" is reserved: use push_all for broadcasts')
        return protocol.push_parts(username, message_id)  # type: ignore[arg-type]

    def _queue_full(self) -> QueueFull:
        return QueueFull(
            f"proxy at {self.endpoint} is not taking messages and "
            f"{self.queue_size} are queued; message not sent"
        )

    def _open(self) -> zmq.Socket:
        if self._closed:
            raise RuntimeError("this Flow publisher is closed")
        self._context = zmq.Context()
        sock = self._context.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, self.queue_size)
        sock.setsockopt(zmq.LINGER, int(self.linger * 1000))
        sock.connect(self.endpoint)
        self._socket = sock
        return sock

    def close(self) -> None:
        """Flush what is queued (up to the linger time) and release the socket."""
        with self._lock:
            self._closed = True
            sock, context = self._socket, self._context
            self._socket = self._context = None
        if sock is not None:
            sock.close()
        if context is not None:
            context.term()

    def _forget_after_fork(self) -> None:
        # The parent's socket and context belong to the parent: never touch or close
        # them here. Keep references so their finalizers do not run in this child.
        if self._socket is not None:
            _abandoned.append((self._socket, self._context))
        self._socket = self._context = None
        self._lock = threading.Lock()


_abandoned: list[tuple[Any, Any]] = []


def _after_fork_in_child() -> None:
    global _default_lock
    _default_lock = threading.Lock()
    for instance in list(_instances):
        instance._forget_after_fork()


def _close_all_at_exit() -> None:
    for instance in list(_instances):
        try:
            instance.close()
        except Exception:  # exiting anyway; report, never raise from atexit
            log.exception("flushing a Flow publisher at exit failed")


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_all_at_exit)

_default: Flow | None = None
_default_lock = threading.Lock()


def _get_default() -> Flow:
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Flow()
    return _default


def configure(**kwargs: Any) -> Flow:
    """Replace the default publisher used by :func:`push` and :func:`push_all`."""
    global _default
    with _default_lock:
        old, _default = _default, Flow(**kwargs)
    if old is not None:
        old.close()
    return _default


def push(username: str, message_id: str, data: Any = None) -> None:
    """Push to every open tab of ``username`` (see :meth:`Flow.push`)."""
    _get_default().push(username, message_id, data)


def push_all(message_id: str, data: Any = None) -> None:
    """Push to every authenticated socket (see :meth:`Flow.push_all`)."""
    _get_default().push_all(message_id, data)
