"""``flow.aio``: the publisher for asyncio code (FastAPI, Starlette, aiohttp).

    import flow

    async with flow.aio.Flow() as publisher:         # same options as flow.Flow
        await publisher.push("alice", "TASK DONE", {"card": "ok"})
        await publisher.publish("doc:42", "EDIT", {"line": 7})

    await flow.aio.push("alice", "TASK DONE", {"card": "ok"})   # the default publisher

Reached as ``flow.aio`` (or ``from flow import aio``); ``flow`` is a module, so there is
no ``import flow.aio``. It wraps a synchronous :class:`flow.Flow`, whose pushes never wait
on the network (they are validated, encoded and queued in the caller): ``push``,
``push_all``, ``publish``, ``disconnect`` and ``unsubscribe`` run right in the event loop,
refusing bad input with the same ``flow.InvalidMessage`` / ``flow.QueueFull`` and nothing
sent. What waits on the engine (``flush``, ``close``, ``presence``, ``is_online``, and
pushes with ``confirm=True``) runs in threads of flow.aio's own (not the loop's default executor), so the loop goes on
meanwhile. ``close`` flushes first: a message pushed right before it is delivered.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from types import TracebackType
from typing import Any, Callable, Literal, Mapping, TypeVar, overload

# The one flowcore module that imports flow (flow.py, the package `flow` once installed):
# it wraps flow.Flow, and flow imports it only on first use of flow.aio, so no cycle runs.
import flow
from flowcore.settings import Settings, load_settings

__all__ = ["Flow", "InvalidMessage", "QueueFull", "Unavailable", "push", "push_all", "publish", "disconnect",
           "unsubscribe", "flush", "presence", "is_online"]

InvalidMessage = flow.InvalidMessage
QueueFull = flow.QueueFull
Unavailable = flow.Unavailable
# {"stream", "seq", "epoch", "online"}: what a confirmed push became.
Receipt = dict[str, Any]

T = TypeVar("T")


class Flow:
    """An asyncio publisher, bound to the event loop it is first used on.

    Takes the options of :class:`flow.Flow`. Make it where the loop runs (a FastAPI
    lifespan, an aiohttp ``cleanup_ctx``) and close it there (``async with``, or
    ``await close()``); atexit closes it too, as any ``flow.Flow``, if it is left open.
    Coroutines on the one loop may share it freely; threads and sync code can use
    :attr:`sync`, the thread-safe ``flow.Flow`` underneath, which shares its link."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        settings: Settings | None = None,
        max_message: int | None = None,
        queue_size: int | None = None,
        linger: float | None = None,
        serializer: Callable[[Any], bytes] | None = None,
        control_endpoint: str | None = None,
    ) -> None:
        # Built here, not at first use: a bad option (a linger of -1) fails where it is given.
        self.sync = flow.Flow(
            endpoint, settings=settings, max_message=max_message, queue_size=queue_size,
            linger=linger, serializer=serializer, control_endpoint=control_endpoint,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bind_lock = threading.Lock()
        # The one close in flight: every close() awaits it, so none returns before the
        # flush is over. A future of the bound loop, which is why the publisher is bound.
        self._closing: asyncio.Future[None] | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **kwargs: Any) -> "Flow":
        """A publisher configured from ``environ`` instead of this process's environment."""
        return cls(settings=load_settings(environ), **kwargs)

    # ------------------------------------------------------------------ the loop

    def _bind(self) -> asyncio.AbstractEventLoop:
        """The running loop, which must be the one this publisher was first used on."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            with self._bind_lock:  # two loops in two threads racing for the first use
                if self._loop is None:
                    self._loop = loop
        if self._loop is not loop:
            raise RuntimeError(
                f"this flow.aio.Flow was first used on event loop {self._loop!r} and cannot be "
                f"used on another one ({loop!r}): make one flow.aio.Flow per event loop (each "
                f"asyncio.run, each thread running a loop), or use flow.aio.push and the other "
                f"module functions, which work on any loop"
            )
        return loop

    async def _in_thread(self, call: Callable[[], T]) -> T:
        return await self._bind().run_in_executor(_executor(), call)

    # ------------------------------------------------------------------ publishing

    @overload
    async def push(self, username: str, message_id: str, data: Any = None, *,
                   confirm: Literal[False] = False, timeout: float | None = None) -> None: ...

    @overload
    async def push(self, username: str, message_id: str, data: Any = None, *,
                   confirm: Literal[True], timeout: float | None = None) -> Receipt: ...

    @overload
    async def push(self, username: str, message_id: str, data: Any = None, *,
                   confirm: bool, timeout: float | None = None) -> Receipt | None: ...

    async def push(self, username: str, message_id: str, data: Any = None, *,
                   confirm: bool = False, timeout: float | None = None) -> Receipt | None:
        """Send ``{"id": message_id, "data": data}`` to every open tab of ``username``
        (:meth:`flow.Flow.push`). With ``confirm=True``, wait (in the executor, up to
        ``timeout``, default 5 s) for the engine to number and store it, and return its
        receipt ``{"stream", "seq", "epoch", "online"}``, or raise ``flow.Unavailable``."""
        if self._loop is not asyncio.get_running_loop():
            self._bind()
        if confirm:
            return await self._in_thread(functools.partial(
                self.sync.push, username, message_id, data, confirm=True, timeout=timeout))
        # Queued without waiting on the network: in the loop, so that a refusal is raised
        # here, before this coroutine returns, exactly as flow.Flow raises it.
        self.sync.push(username, message_id, data)
        return None

    @overload
    async def push_all(self, message_id: str, data: Any = None, *,
                       confirm: Literal[False] = False, timeout: float | None = None) -> None: ...

    @overload
    async def push_all(self, message_id: str, data: Any = None, *,
                       confirm: Literal[True], timeout: float | None = None) -> Receipt: ...

    @overload
    async def push_all(self, message_id: str, data: Any = None, *,
                       confirm: bool, timeout: float | None = None) -> Receipt | None: ...

    async def push_all(self, message_id: str, data: Any = None, *,
                       confirm: bool = False, timeout: float | None = None) -> Receipt | None:
        """Send to every authenticated socket of the deployment (:meth:`flow.Flow.push_all`;
        ``confirm``: see :meth:`push`)."""
        self._bind()
        if confirm:
            return await self._in_thread(functools.partial(
                self.sync.push_all, message_id, data, confirm=True, timeout=timeout))
        self.sync.push_all(message_id, data)
        return None

    @overload
    async def publish(self, channel: str, message_id: str, data: Any = None, *,
                      confirm: Literal[False] = False, timeout: float | None = None) -> None: ...

    @overload
    async def publish(self, channel: str, message_id: str, data: Any = None, *,
                      confirm: Literal[True], timeout: float | None = None) -> Receipt: ...

    @overload
    async def publish(self, channel: str, message_id: str, data: Any = None, *,
                      confirm: bool, timeout: float | None = None) -> Receipt | None: ...

    async def publish(self, channel: str, message_id: str, data: Any = None, *,
                      confirm: bool = False, timeout: float | None = None) -> Receipt | None:
        """Send to every socket subscribed to ``channel`` (:meth:`flow.Flow.publish`;
        ``confirm``: see :meth:`push`)."""
        self._bind()
        if confirm:
            return await self._in_thread(functools.partial(
                self.sync.publish, channel, message_id, data, confirm=True, timeout=timeout))
        self.sync.publish(channel, message_id, data)
        return None

    async def disconnect(self, username: str) -> None:
        """Close every socket of ``username`` with 4004 (:meth:`flow.Flow.disconnect`)."""
        self._bind()
        self.sync.disconnect(username)

    async def unsubscribe(self, username: str, channel: str) -> None:
        """End ``username``'s subscriptions to ``channel`` (:meth:`flow.Flow.unsubscribe`)."""
        self._bind()
        self.sync.unsubscribe(username, channel)

    # ------------------------------------------------------------------ waiting on the engine

    async def flush(self, timeout: float | None = None) -> int:
        """Wait up to ``timeout`` seconds (default: the linger) for the engine to confirm
        every message pushed so far; the number still unconfirmed (:meth:`flow.Flow.flush`).
        The wait is in the executor: a cancelled flush stops waiting here, its thread
        at ``timeout``."""
        return await self._in_thread(functools.partial(self.sync.flush, timeout))

    async def presence(self, channel: str, timeout: float | None = None) -> dict[str, Any]:
        """``channel``'s presence over every server: ``{"version", "count", "users":
        {username: {"connections": n}}}`` (:meth:`flow.Flow.presence`); ``flow.Unavailable``
        when the engine does not answer within ``timeout`` (default 5 s)."""
        return await self._in_thread(functools.partial(self.sync.presence, channel, timeout))

    async def is_online(self, username: str, timeout: float | None = None) -> bool:
        """Whether ``username`` has an authenticated socket on any server now
        (:meth:`flow.Flow.is_online`); ``flow.Unavailable`` as :meth:`presence`."""
        return await self._in_thread(functools.partial(self.sync.is_online, username, timeout))

    async def close(self) -> None:
        """Flush (up to the linger), release the link and report what the engine did not
        confirm (:meth:`flow.Flow.close`), in the executor. Concurrent calls all return
        when that one close is over; a cancelled one leaves it running."""
        loop = self._bind()
        if self._closing is None:
            self._closing = loop.run_in_executor(_executor(), self.sync.close)
        await asyncio.shield(self._closing)

    async def __aenter__(self) -> "Flow":
        self._bind()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.close()


# --------------------------------------------------------------------------- the default publisher
# flow's own default (flow.configure, the FLOW_ environment): one link per process shared
# by flow.push and flow.aio.push, and, unlike a flow.aio.Flow, usable from any loop.


@overload
async def push(username: str, message_id: str, data: Any = None, *,
               confirm: Literal[False] = False, timeout: float | None = None) -> None: ...


@overload
async def push(username: str, message_id: str, data: Any = None, *,
               confirm: Literal[True], timeout: float | None = None) -> Receipt: ...


@overload
async def push(username: str, message_id: str, data: Any = None, *,
               confirm: bool, timeout: float | None = None) -> Receipt | None: ...


async def push(username: str, message_id: str, data: Any = None, *,
               confirm: bool = False, timeout: float | None = None) -> Receipt | None:
    """Push to every open tab of ``username`` with the default publisher (:meth:`Flow.push`)."""
    if confirm:
        return await _in_thread(functools.partial(
            flow.push, username, message_id, data, confirm=True, timeout=timeout))
    flow.push(username, message_id, data)
    return None


@overload
async def push_all(message_id: str, data: Any = None, *,
                   confirm: Literal[False] = False, timeout: float | None = None) -> None: ...


@overload
async def push_all(message_id: str, data: Any = None, *,
                   confirm: Literal[True], timeout: float | None = None) -> Receipt: ...


@overload
async def push_all(message_id: str, data: Any = None, *,
                   confirm: bool, timeout: float | None = None) -> Receipt | None: ...


async def push_all(message_id: str, data: Any = None, *,
                   confirm: bool = False, timeout: float | None = None) -> Receipt | None:
    """Push to every authenticated socket with the default publisher (:meth:`Flow.push_all`)."""
    if confirm:
        return await _in_thread(functools.partial(
            flow.push_all, message_id, data, confirm=True, timeout=timeout))
    flow.push_all(message_id, data)
    return None


@overload
async def publish(channel: str, message_id: str, data: Any = None, *,
                  confirm: Literal[False] = False, timeout: float | None = None) -> None: ...


@overload
async def publish(channel: str, message_id: str, data: Any = None, *,
                  confirm: Literal[True], timeout: float | None = None) -> Receipt: ...


@overload
async def publish(channel: str, message_id: str, data: Any = None, *,
                  confirm: bool, timeout: float | None = None) -> Receipt | None: ...


async def publish(channel: str, message_id: str, data: Any = None, *,
                  confirm: bool = False, timeout: float | None = None) -> Receipt | None:
    """Publish to ``channel`` with the default publisher (:meth:`Flow.publish`)."""
    if confirm:
        return await _in_thread(functools.partial(
            flow.publish, channel, message_id, data, confirm=True, timeout=timeout))
    flow.publish(channel, message_id, data)
    return None


async def disconnect(username: str) -> None:
    """Close every socket of ``username`` with 4004, with the default publisher."""
    flow.disconnect(username)


async def unsubscribe(username: str, channel: str) -> None:
    """End ``username``'s subscriptions to ``channel``, with the default publisher."""
    flow.unsubscribe(username, channel)


async def flush(timeout: float | None = None) -> int:
    """Flush the default publisher (:func:`flow.flush`) in the executor; the number unconfirmed."""
    return await _in_thread(functools.partial(flow.flush, timeout))


async def presence(channel: str, timeout: float | None = None) -> dict[str, Any]:
    """``channel``'s presence (:func:`flow.presence`), asked in the executor."""
    return await _in_thread(functools.partial(flow.presence, channel, timeout))


async def is_online(username: str, timeout: float | None = None) -> bool:
    """Whether ``username`` is connected anywhere (:func:`flow.is_online`), asked in the executor."""
    return await _in_thread(functools.partial(flow.is_online, username, timeout))


async def _in_thread(call: Callable[[], T]) -> T:
    return await asyncio.get_running_loop().run_in_executor(_executor(), call)


# Waits on the engine (confirmed pushes, flush, close, presence) run in threads of their
# own, not the loop's default executor: an engine that is away holds each one up to its
# timeout, and the loop's other users of that executor (getaddrinfo, file I/O) must not
# queue behind them, nor a wait's timeout start late behind the others.
MAX_WAITERS = 64
_executor_lock = threading.Lock()
_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _executor_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(MAX_WAITERS, thread_name_prefix="flow-aio")
        return _pool
