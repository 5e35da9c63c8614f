"""Push messages to browsers from any Python process.

    import flow
    flow.push("alice", "TASK DONE", {"card": "ok"})   # every open tab of alice
    flow.push_all("NEWS", {"headline": "..."})         # every authenticated socket
    flow.publish("doc:42", "EDIT", {"line": 7})        # every socket subscribed to doc:42

``push`` validates and encodes in the caller, then hands the bytes to the engine
FLOW_ENGINE names (:func:`flowcore.engine.publisher_engine`) without waiting on the
network. The engine queues before its link is up, so a message pushed right after start
is delivered. It is bounded (FLOW_PUSH_QUEUE): when the engine is unreachable and the
queue is full, ``QueueFull`` is raised in the caller instead of a silent drop. Safe from
many threads, and in pre-forked workers: a forked child opens its own link.

Nothing is dropped in silence (PROTOCOL.md section 5): ``flush(timeout)`` asks the engine
to confirm that it took every message pushed so far and returns how many are still
unconfirmed; at exit each publisher flushes for up to FLOW_PUSH_LINGER seconds, and what
is still unconfirmed then is reported, once, with its count, on stderr and in the
"flow.publisher" log.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, overload

from flowcore import protocol
from flowcore.engine import PublisherEngine, QueueFull, Unavailable, publisher_engine
from flowcore.engines import zmq as _zmq_engine
from flowcore.settings import Settings, load_settings

__all__ = ["Flow", "QueueFull", "Unavailable", "InvalidMessage", "push", "push_all", "publish", "disconnect", "unsubscribe",
           "flush", "configure", "issue_token", "issue_channel_token", "presence", "is_online", "stats"]

log = logging.getLogger("flow.publisher")

if TYPE_CHECKING:
    from flowcore import aio  # flow.aio, for type checkers; at run time __getattr__ below
else:
    def __getattr__(name: str) -> Any:
        # flow.aio (flowcore/aio.py), the asyncio publisher, is imported on first use: a
        # process that never touches it does not pay for it. Hidden from type checkers, to
        # which a module __getattr__ would make every misspelt flow.X valid.
        if name == "aio":
            from flowcore import aio

            return aio
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

InvalidMessage = protocol.ProtocolError

# The ZeroMQ engine's fast path (see flowcore.engines.zmq): push sends on the engine's
# socket itself, with no Python call between it and the compiled send.
_zmq_send = _zmq_engine.FAST_SEND
_ZMQ_NOBLOCK = _zmq_engine.NOBLOCK
_ZmqRefused = _zmq_engine.FAST_REFUSED
_orjson_dumps = protocol._orjson_dumps
_ORJSON_OPTIONS = protocol._ORJSON_OPTIONS
# Read directly on push's fast path: a dict lookup where a call would cost more.
_push_heads = protocol.push_heads
_id_parts = protocol.id_parts


_instances: "weakref.WeakSet[Flow]" = weakref.WeakSet()

# What stats() reports (the process's metrics, flowcore.metrics): pushes refused in the
# caller by reason, and what publishers that are gone (closed, collected) had handed over,
# so that the process's totals never go down. A forked child starts from zero.
_PUBLISH_KINDS = ("user", "broadcast", "channel", "command")
_stats_lock = threading.Lock()
_rejections = {"invalid": 0, "queue_full": 0, "closed": 0}
_retired = dict.fromkeys(_PUBLISH_KINDS, 0)
_reported = dict.fromkeys(_PUBLISH_KINDS, 0)
_CHANNEL_HEAD = protocol.PUSH_PREFIX + protocol.CHANNEL_MARK.encode()


def _rejected(reason: str) -> None:
    with _stats_lock:
        _rejections[reason] += 1


def _counted(encode: Callable[..., bytes], *args: Any) -> bytes:
    """``encode(*args)``, a refusal counted for stats()."""
    try:
        return encode(*args)
    except InvalidMessage:
        _rejected("invalid")
        raise


def _frame_kind(frame: bytes) -> str:
    """The kind of a push frame (protocol.encode_push and its siblings) for stats()."""
    if frame.startswith(protocol.COMMAND_PREFIX):
        return "command"
    if frame.startswith(protocol.BROADCAST_HEAD):
        return "broadcast"
    return "channel" if frame.startswith(_CHANNEL_HEAD) else "user"


def stats() -> dict[str, dict[str, int]]:
    """What this process's publishers did, for its metrics: ``{"published": {kind: n},
    "rejected": {reason: n}}``. Kinds: user (push), broadcast (push_all), channel
    (publish), command (disconnect, unsubscribe); each counts what was handed to the engine
    (confirmed or not). Reasons a push was refused in the caller: invalid (InvalidMessage),
    queue_full (QueueFull), closed (a closed publisher). Totals since the process started
    (a forked child: since the fork), over every publisher of the process; they never go down."""
    with _stats_lock:
        published = dict(_retired)
        for instance in list(_instances):
            if not instance._retired:
                for kind, value in instance._published().items():
                    published[kind] += value
        for kind, value in published.items():
            # A publisher collected before it was retired (a cycle) takes its counts along;
            # the totals then hold still rather than go down.
            _reported[kind] = max(_reported[kind], value)
        return {"published": dict(_reported), "rejected": dict(_rejections)}


def _retire(instance: "Flow") -> None:
    """``instance`` hands nothing over any more: its counts move to the process's totals."""
    with _stats_lock:
        if instance._retired:
            return
        for kind, value in instance._published().items():
            _retired[kind] += value
        instance._retired = True


# The longest a publisher waits at close for its messages to be confirmed (a day).
MAX_LINGER = 86400
# How long presence and is_online wait for the engine, by default.
QUERY_TIMEOUT = 5.0
# How long a confirmed push (confirm=True) gives the engine to number it, by default; the
# caller waits up to RECEIPT_GRACE longer for the receipt, which may be on its way.
RECEIPT_TIMEOUT = 5.0
RECEIPT_GRACE = 0.25
# A receipt: {"stream", "seq", "epoch", "online"} (flowcore.engine.Receipt.as_dict).
Receipt = dict[str, Any]


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
        control_endpoint: str | None = None,  # where flush asks; see the engine's default
    ) -> None:
        settings = settings or load_settings()
        self.settings = settings
        self.max_message = max_message or settings.max_message
        self.queue_size = queue_size or settings.push_queue
        self.linger = settings.push_linger if linger is None else linger
        # A negative or endless linger would make close() (and so every exit) wait forever.
        if not (isinstance(self.linger, (int, float)) and 0 <= self.linger <= MAX_LINGER):
            raise ValueError(f"linger must be a number of seconds from 0 to {MAX_LINGER}, not {linger!r}")
        options: dict[str, object] = {"queue_size": self.queue_size, "linger": self.linger}
        if endpoint:
            options["endpoint"] = endpoint
        if control_endpoint:
            options["control_endpoint"] = control_endpoint
        self._engine: PublisherEngine = publisher_engine(settings, **options)
        self.endpoint = getattr(self._engine, "endpoint", endpoint)
        # ZeroMQ fast path: the engine's socket once it is open, else None (and always None
        # with another engine): push then hands its frame to the engine (_hand_over).
        self._zmq_socket: Any = None
        # None: protocol.fast_dumps, which push inlines.
        self._serializer = None if serializer is protocol.fast_dumps else serializer
        self._lock = threading.Lock()
        self._closed = False
        self._closing = False
        # Frames handed to the engine, and how many of the first ones it confirmed taking
        # (flush): the difference is what would be lost if the process ended now.
        self._handed_over = 0
        self._confirmed = 0
        # For stats(): what went through _hand_over (not push's fast path) and confirmed
        # pushes, by kind; push's own count is what _handed_over holds beyond the first.
        self._via_hand_over = dict.fromkeys(_PUBLISH_KINDS, 0)
        self._via_confirm = dict.fromkeys(_PUBLISH_KINDS, 0)
        self._retired = False
        _instances.add(self)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **kwargs: Any) -> "Flow":
        """A publisher configured from ``environ`` instead of this process's environment."""
        return cls(settings=load_settings(environ), **kwargs)

    @overload
    def push(self, username: str, message_id: str, data: Any = None, *, confirm: Literal[False] = False,
             timeout: float | None = None) -> None: ...

    @overload
    def push(self, username: str, message_id: str, data: Any = None, *, confirm: Literal[True],
             timeout: float | None = None) -> Receipt: ...

    @overload
    def push(self, username: str, message_id: str, data: Any = None, *, confirm: bool,
             timeout: float | None = None) -> Receipt | None: ...

    def push(self, username: str, message_id: str, data: Any = None, *, confirm: bool = False,
             timeout: float | None = None) -> Receipt | None:
        """Send ``{"id": message_id, "data": data}`` to every open tab of ``username``.

        With ``confirm=True``, wait until the engine numbered and stored the message and
        return its receipt, ``{"stream", "seq", "epoch", "online"}`` (``online``: the
        sockets it was dispatched to, not proof that a page read it); raise
        :class:`Unavailable` when the engine does not do so within ``timeout`` seconds
        (default 5): the engine then drops it rather than publish it late. A confirmed
        push never overtakes this publisher's earlier pushes."""
        # protocol.encode_push inlined, with its fast paths only: this is the caller's hot
        # path, and each function call or `with` saved here is about 5% of it. Cache
        # misses avoid exceptions, which would cost more than a miss's validation.
        try:  # costs nothing until it catches (Python 3.11's exceptions): counts the refusals
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
        except InvalidMessage:
            _rejected("invalid")
            raise
        frame = head + id_part + data_json
        if confirm:
            return self._push_confirmed(frame, timeout)
        lock = self._lock
        lock.acquire()
        try:
            sock = self._zmq_socket
            if sock is not None:  # ZeroMQ fast path (_hand_over, inlined)
                try:
                    _zmq_send(sock, frame, _ZMQ_NOBLOCK)
                    self._handed_over += 1
                    return None
                except _ZmqRefused:
                    pass  # the engine tries once more, and raises QueueFull
            self._hand_over_slowly(frame)
        finally:
            lock.release()
        return None

    @overload
    def push_all(self, message_id: str, data: Any = None, *, confirm: Literal[False] = False,
                 timeout: float | None = None) -> None: ...

    @overload
    def push_all(self, message_id: str, data: Any = None, *, confirm: Literal[True],
                 timeout: float | None = None) -> Receipt: ...

    @overload
    def push_all(self, message_id: str, data: Any = None, *, confirm: bool,
                 timeout: float | None = None) -> Receipt | None: ...

    def push_all(self, message_id: str, data: Any = None, *, confirm: bool = False,
                 timeout: float | None = None) -> Receipt | None:
        """Send to every authenticated socket of the deployment (``confirm``: see :meth:`push`)."""
        frame = _counted(
            protocol.encode_push, protocol.BROADCAST, message_id, data, self.max_message, self._serializer or protocol.fast_dumps
        )
        if confirm:
            return self._push_confirmed(frame, timeout)
        with self._lock:
            self._hand_over(frame)
        return None

    @overload
    def publish(self, channel: str, message_id: str, data: Any = None, *, confirm: Literal[False] = False,
                timeout: float | None = None) -> None: ...

    @overload
    def publish(self, channel: str, message_id: str, data: Any = None, *, confirm: Literal[True],
                timeout: float | None = None) -> Receipt: ...

    @overload
    def publish(self, channel: str, message_id: str, data: Any = None, *, confirm: bool,
                timeout: float | None = None) -> Receipt | None: ...

    def publish(self, channel: str, message_id: str, data: Any = None, *, confirm: bool = False,
                timeout: float | None = None) -> Receipt | None:
        """Send ``{"id", "channel", "data"}`` to every socket subscribed to ``channel``
        (PROTOCOL.md section 9), on every host of the deployment (``confirm``: see :meth:`push`)."""
        frame = _counted(
            protocol.encode_channel_push, channel, message_id, data, self.max_message, self._serializer or protocol.fast_dumps
        )
        if confirm:
            return self._push_confirmed(frame, timeout)
        with self._lock:
            self._hand_over(frame)
        return None

    def _push_confirmed(self, frame: bytes, timeout: float | None) -> Receipt:
        """Hand ``frame`` over as a confirmed push and wait for its receipt."""
        timeout = RECEIPT_TIMEOUT if timeout is None else timeout
        if not (isinstance(timeout, (int, float)) and 0 < timeout <= MAX_LINGER):
            raise ValueError(f"timeout must be a number of seconds above 0, at most {MAX_LINGER}, not {timeout!r}")
        started = time.monotonic()
        engine = self._engine
        # Under the lock, on the engine's one queue: behind every push this publisher made
        # before (pushes are kept in order per publisher), never overtaking them.
        with self._lock:
            if self._closed:
                _rejected("closed")
                raise RuntimeError("this Flow publisher is closed")
            try:
                token = engine.send_confirmed(frame, timeout)  # may raise QueueFull
            except QueueFull:
                _rejected("queue_full")
                raise
            self._via_confirm[_frame_kind(frame)] += 1
            if type(engine) is _zmq_engine.ZmqPublisherEngine:
                self._zmq_socket = engine.socket
        if _exit_hook_pid != os.getpid():
            _hook_multiprocessing_exit()
        left = started + timeout + RECEIPT_GRACE - time.monotonic()
        return engine.wait_receipt(token, max(0.0, left)).as_dict()

    def disconnect(self, username: str) -> None:
        """Close every open socket of ``username``, on every server and host, with 4004
        (PROTOCOL.md section 3): a logout, a banned account. Pages reconnect only with a
        new token, which your app decides to give or not."""
        frame = _counted(protocol.encode_command, username, "disconnect")
        with self._lock:
            self._hand_over(frame)

    def unsubscribe(self, username: str, channel: str) -> None:
        """End ``username``'s subscriptions to ``channel`` on every open socket (they are
        told UNSUBSCRIBED, reason "unsubscribed"): access to the channel was taken away.
        Stop granting it too (the token's channels claim, subscription tokens), or a page
        may subscribe again."""
        frame = _counted(protocol.encode_command, username, "unsubscribe", channel)
        with self._lock:
            self._hand_over(frame)

    def presence(self, channel: str, timeout: float | None = None) -> dict[str, Any]:
        """Who is on ``channel`` now, over every server and host (PROTOCOL.md section 9):
        ``{"version", "count", "users": {username: {"connections": n}}}``, the shape a page
        gets. Only channels in FLOW_PRESENCE_CHANNELS keep presence; any other has count 0.
        A user whose last connection left stays listed (with 0 connections) for
        FLOW_PRESENCE_LEAVE_DELAY. Raises :class:`Unavailable` when the engine does not
        answer within ``timeout`` seconds (default 5), InvalidMessage for a bad name."""
        stream = protocol.channel_stream(protocol.check_channel(channel))
        snapshot = self._engine.presence(stream, QUERY_TIMEOUT if timeout is None else timeout)
        return protocol.presence_state(snapshot)

    def is_online(self, username: str, timeout: float | None = None) -> bool:
        """Whether ``username`` has an authenticated socket on any server or host now.
        Raises :class:`Unavailable` (no answer within ``timeout``) or InvalidMessage."""
        stream = protocol.check_username(username)
        return self._engine.online(stream, QUERY_TIMEOUT if timeout is None else timeout) > 0

    def _hand_over(self, frame: bytes) -> None:
        """Give one push frame to the engine; the caller holds the lock. (push has its own
        path; what comes here is counted by kind for stats().)"""
        sock = self._zmq_socket
        if sock is not None:
            try:
                _zmq_send(sock, frame, _ZMQ_NOBLOCK)
                self._handed_over += 1
                self._via_hand_over[_frame_kind(frame)] += 1
                return
            except _ZmqRefused:
                pass
        self._hand_over_slowly(frame)
        self._via_hand_over[_frame_kind(frame)] += 1

    def _hand_over_slowly(self, frame: bytes) -> None:
        if self._closed:
            _rejected("closed")
            raise RuntimeError("this Flow publisher is closed")
        engine = self._engine
        try:
            engine.send(frame)  # opens the engine's link at the first push; may raise QueueFull
        except QueueFull:
            _rejected("queue_full")
            raise
        self._handed_over += 1
        if type(engine) is _zmq_engine.ZmqPublisherEngine:
            self._zmq_socket = engine.socket
        if _exit_hook_pid != os.getpid():
            _hook_multiprocessing_exit()

    @staticmethod
    def _user_parts(username: object, message_id: object) -> tuple[bytes, bytes]:
        if type(username) is str and username == protocol.BROADCAST:
            raise InvalidMessage('username "*" is reserved: use push_all for broadcasts')
        return protocol.push_parts(username, message_id)  # type: ignore[arg-type]

    def _published(self) -> dict[str, int]:
        """What this publisher handed over, by kind (for stats(), which holds its lock)."""
        counts = {kind: self._via_hand_over[kind] + self._via_confirm[kind] for kind in _PUBLISH_KINDS}
        # push's own path counts in _handed_over only.
        counts["user"] += self._handed_over - sum(self._via_hand_over.values())
        return counts

    def flush(self, timeout: float | None = None) -> int:
        """Wait up to ``timeout`` seconds (default: the linger, FLOW_PUSH_LINGER) for the
        engine to confirm it took every message pushed so far; the number still unconfirmed
        (0: all handed over). Returns 0 at once when there is nothing to confirm. Pushes
        from other threads go on meanwhile; those made after the call began may count in
        the result. Safe from many threads at once."""
        timeout = self.linger if timeout is None else max(0.0, timeout)
        return self._flush(time.monotonic() + timeout, timeout > 0, closing=False)

    def _flush(self, deadline: float, wait: bool, closing: bool) -> int:
        engine = self._engine
        while True:
            with self._lock:
                covered = self._handed_over
                if covered == self._confirmed:
                    return 0
                # close() flushes once more after it refused new pushes (closing=True).
                usable = wait and (closing or not self._closed)
                # Under the lock: the marker is then behind every push counted in `covered`.
                token = engine.flush_marker() if usable else None
            if token is not None:
                break
            if not usable or time.monotonic() >= deadline:
                return covered - self._confirmed
            time.sleep(0.02)  # the queue is full: room comes when the engine does
        if engine.wait_flushed(token, deadline - time.monotonic()):
            with self._lock:
                self._confirmed = max(self._confirmed, covered)
        return self._handed_over - self._confirmed

    def close(self) -> None:
        """Flush (up to the linger time), release the engine's link, and report what the
        engine did not confirm taking: once, with its count, on stderr and in the log.
        Pushing to a closed publisher raises RuntimeError (a programming error, not a
        refused message)."""
        with self._lock:
            if self._closed or self._closing:
                return
            self._closing = True
        deadline = time.monotonic() + self.linger
        wait = self.linger > 0
        try:
            # Pushes from other threads go on during this flush, so that they are not
            # refused while we wait...
            self._flush(deadline, wait, closing=False)
            with self._lock:
                self._closed = True
                self._zmq_socket = None
            # ...and this one, with pushes refused now, covers those that came meanwhile:
            # without it they were dropped (linger 0 below) and reported lost.
            self._flush(deadline, wait, closing=True)
        finally:
            with self._lock:
                self._closed = True
                self._zmq_socket = None
                lost = self._handed_over - self._confirmed
        # Everything was confirmed, or the linger is spent: no second wait.
        self._engine.close(linger=0)
        _retire(self)
        if lost:
            self._report_lost(lost)

    def _report_lost(self, lost: int) -> None:
        text = (
            f"{lost} message{'' if lost == 1 else 's'} pushed by this process could not be handed "
            f"over to the engine at {self.endpoint} (not confirmed within {self.linger:g}s: "
            f"{'Redis' if self.settings.engine == 'redis' else 'proxy'} unreachable or too slow, "
            f"see FLOW_PUSH_LINGER); they are lost"
        )
        logged = log.hasHandlers() and log.isEnabledFor(logging.WARNING)
        try:
            # A handler on stderr (logging.basicConfig()) shows the log line there already.
            if sys.stderr is not None and not (logged and _logs_to_stderr()):
                sys.stderr.write(f"flow: {text}\n")
                sys.stderr.flush()
        except (OSError, ValueError):
            pass  # stderr closed: the log below is all there is
        # Without a handler, logging would print the same line on stderr a second time.
        if logged:
            log.warning("%s", text)

    def __del__(self) -> None:
        # Dropped without close() (a Flow made in a function): its queue would go with it in
        # silence. Flushed and reported as at exit instead.
        try:
            if not self._closed and self._handed_over != self._confirmed:
                self.close()
            _retire(self)
        except Exception:  # a finalizer must not raise; the interpreter may be half gone
            pass

    def _forget_after_fork(self) -> None:
        # The parent's link belongs to the parent: the engine drops it without touching it,
        # and the child opens its own at its first push.
        self._engine.forget_after_fork()
        self._zmq_socket = None
        self._lock = threading.Lock()
        # The parent's pushes are the parent's to confirm, report and count.
        self._handed_over = self._confirmed = 0
        self._via_hand_over = dict.fromkeys(_PUBLISH_KINDS, 0)
        self._via_confirm = dict.fromkeys(_PUBLISH_KINDS, 0)
        # Forked while another thread closed it: closed here too, not half-closed (open to
        # pushes that close() would then never flush nor report).
        if self._closing:
            self._closed = True


def _logs_to_stderr() -> bool:
    logger: logging.Logger | None = log
    while logger is not None:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stderr, sys.__stderr__):
                return handler.level <= logging.WARNING
        logger = logger.parent if logger.propagate else None
    return False


def _after_fork_in_child() -> None:
    global _default_lock, _stats_lock, _rejections, _retired, _reported
    _default_lock = threading.Lock()
    # The child counts its own (a parent's thread may have held the lock at the fork).
    _stats_lock = threading.Lock()
    _rejections = dict.fromkeys(_rejections, 0)
    _retired = dict.fromkeys(_PUBLISH_KINDS, 0)
    _reported = dict.fromkeys(_PUBLISH_KINDS, 0)
    for instance in list(_instances):
        instance._forget_after_fork()


def _close_all_at_exit() -> None:
    for instance in list(_instances):
        try:
            instance.close()
        except Exception:  # exiting anyway; report, never raise from atexit
            log.exception("flushing a Flow publisher at exit failed")


_exit_hook_pid: int | None = None


def _hook_multiprocessing_exit() -> None:
    # A multiprocessing child (Process, Pool, ProcessPoolExecutor workers) ends in
    # os._exit, past atexit: its pushes would be dropped in silence. Its own finalizers do
    # run; hooked at this process's first push, after the child cleared the parent's.
    global _exit_hook_pid
    _exit_hook_pid = os.getpid()
    util = sys.modules.get("multiprocessing.util")
    if util is not None:
        util.Finalize(None, _close_all_at_exit, exitpriority=100)


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


@overload
def push(username: str, message_id: str, data: Any = None, *, confirm: Literal[False] = False,
         timeout: float | None = None) -> None: ...


@overload
def push(username: str, message_id: str, data: Any = None, *, confirm: Literal[True],
         timeout: float | None = None) -> Receipt: ...


@overload
def push(username: str, message_id: str, data: Any = None, *, confirm: bool,
         timeout: float | None = None) -> Receipt | None: ...


def push(username: str, message_id: str, data: Any = None, *, confirm: bool = False,
         timeout: float | None = None) -> Receipt | None:
    """Push to every open tab of ``username`` (see :meth:`Flow.push`; ``confirm=True``
    returns the receipt or raises :class:`Unavailable`)."""
    publisher = _get_default()
    try:
        return publisher.push(username, message_id, data, confirm=confirm, timeout=timeout)
    except RuntimeError:
        # configure() closed the default this call had picked: the new one takes it.
        if publisher is _default:
            raise
        return _get_default().push(username, message_id, data, confirm=confirm, timeout=timeout)


@overload
def push_all(message_id: str, data: Any = None, *, confirm: Literal[False] = False,
             timeout: float | None = None) -> None: ...


@overload
def push_all(message_id: str, data: Any = None, *, confirm: Literal[True],
             timeout: float | None = None) -> Receipt: ...


@overload
def push_all(message_id: str, data: Any = None, *, confirm: bool,
             timeout: float | None = None) -> Receipt | None: ...


def push_all(message_id: str, data: Any = None, *, confirm: bool = False,
             timeout: float | None = None) -> Receipt | None:
    """Push to every authenticated socket (see :meth:`Flow.push_all`)."""
    return _call_default("push_all", message_id, data, confirm=confirm, timeout=timeout)


@overload
def publish(channel: str, message_id: str, data: Any = None, *, confirm: Literal[False] = False,
            timeout: float | None = None) -> None: ...


@overload
def publish(channel: str, message_id: str, data: Any = None, *, confirm: Literal[True],
            timeout: float | None = None) -> Receipt: ...


@overload
def publish(channel: str, message_id: str, data: Any = None, *, confirm: bool,
            timeout: float | None = None) -> Receipt | None: ...


def publish(channel: str, message_id: str, data: Any = None, *, confirm: bool = False,
            timeout: float | None = None) -> Receipt | None:
    """Publish to every socket subscribed to ``channel`` (see :meth:`Flow.publish`)."""
    return _call_default("publish", channel, message_id, data, confirm=confirm, timeout=timeout)


def disconnect(username: str) -> None:
    """Close every socket of ``username`` with 4004 (see :meth:`Flow.disconnect`)."""
    _call_default("disconnect", username)


def unsubscribe(username: str, channel: str) -> None:
    """End ``username``'s subscriptions to ``channel`` (see :meth:`Flow.unsubscribe`)."""
    _call_default("unsubscribe", username, channel)


def presence(channel: str, timeout: float | None = None) -> dict[str, Any]:
    """Who is on ``channel`` (see :meth:`Flow.presence`)."""
    return _get_default().presence(channel, timeout)


def is_online(username: str, timeout: float | None = None) -> bool:
    """Whether ``username`` has a socket open anywhere (see :meth:`Flow.is_online`)."""
    return _get_default().is_online(username, timeout)


def _call_default(method: str, *args: Any, **kwargs: Any) -> Any:
    """``method`` of the default publisher (:func:`push` is the same, spelled out for speed)."""
    publisher = _get_default()
    try:
        return getattr(publisher, method)(*args, **kwargs)
    except RuntimeError:
        if publisher is _default:
            raise
        return getattr(_get_default(), method)(*args, **kwargs)


def flush(timeout: float | None = None) -> int:
    """Flush the default publisher (see :meth:`Flow.flush`): the number of its messages the
    engine has not confirmed taking within ``timeout``. 0 when nothing was pushed."""
    default = _default
    return 0 if default is None else default.flush(timeout)


# Claims a token's holder must not choose: the identity, the times, and the audience and
# issuer the servers check.
_RESERVED_CLAIMS = frozenset({"username", "sub", "exp", "iat", "nbf", "aud", "iss", "channel"})


def issue_token(username: str, /, ttl: int | None = None, **claims: Any) -> str:
    """A signed socket token for ``username`` (PROTOCOL.md section 2), valid ``ttl`` seconds
    (default FLOW_TOKEN_TTL), for the app's ``/socket_auth_token``. Signed with the default
    publisher's settings (FLOW_SECRET, or FLOW_JWT_PRIVATE_KEY for public-key algorithms).
    Extra ``claims`` are added to the token: ``channels=["doc:42", "team:7:*"]`` grants
    channels (section 9). The reserved ones (username, sub, exp, iat, nbf, aud, iss,
    channel) are refused with ValueError, as are a bad username and a malformed grant."""
    # Imported here: a process that only pushes needs neither the JWT library nor a secret.
    from flowcore import channels, tokens

    protocol.check_username(username)  # before settings are read: a bad name is the caller's
    reserved = _RESERVED_CLAIMS.intersection(claims)
    if reserved:
        raise ValueError(f"claim {sorted(reserved)[0]!r} is set by Flow, not by the caller")
    if "channels" in claims:
        try:
            channels.Grants.parse(claims["channels"])
        except ValueError as exc:
            raise ValueError(f"channels claim: {exc}") from None
    return tokens.issue_token(_get_default().settings, username, ttl, extra=claims)


def issue_channel_token(username: str, channel: str, /, ttl: int | None = None) -> str:
    """A subscription token (PROTOCOL.md section 9): lets ``username``'s sockets subscribe to
    exactly ``channel`` for ``ttl`` seconds (default FLOW_TOKEN_TTL), for an app endpoint
    such as ``/socket_channel_token?channel=...`` that checks the user may see it."""
    from flowcore import channels

    protocol.check_username(username)
    return channels.issue_subscription_token(_get_default().settings, username, channel, ttl)
