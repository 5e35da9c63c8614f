"""A resuming test client: what static/js/websocket.js does, in Python, with a ledger to check.

It holds a position for every stream it receives from its first AUTH OK on (seeded from
AUTH OK's ``streams``, PROTOCOL.md section 4), advances it with every message it accepts,
sends all of them as ``resume`` on every reconnect, and drops duplicates. ``recovered:
false`` on a reconnect is what makes a page reload its state: the client records it (a
resync) and takes the positions AUTH OK gives. Everything else that breaks continuity is
recorded as a silent gap: a seq that skips ahead, or a message in another epoch than the
one the client holds for its stream, without the server having said recovered: false.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from pipeline import small_buffer_socket


@dataclass
class Ledger:
    messages: list[dict[str, Any]] = field(default_factory=list)
    duplicates: int = 0
    # (stream, last seq held, seq received); the seq is -1 for a message in another epoch.
    gaps: list[tuple[str, int, int]] = field(default_factory=list)
    auth_oks: list[dict[str, Any]] = field(default_factory=list)
    # AUTH OKs after the first that said recovered: false (the page reloaded its state).
    resyncs: list[dict[str, Any]] = field(default_factory=list)
    # Messages accepted before each resync (an index into messages).
    resynced_at: list[int] = field(default_factory=list)
    # Frames that break a promise of the protocol other than continuity.
    problems: list[str] = field(default_factory=list)
    close_codes: list[int | None] = field(default_factory=list)
    connects: int = 0


def stream_of(message: dict[str, Any]) -> str:
    return message["username"]


class ResumingClient:
    def __init__(self, url: str, token: Callable[[], str], origin: str | None = None,
                 pause: asyncio.Event | None = None) -> None:
        self.url = url
        self.token = token
        self.origin = origin
        # stream -> {"seq", "epoch"}: after which delivery continues on that stream.
        self.positions: dict[str, dict[str, Any]] = {}
        self.ledger = Ledger()
        self.authenticated = asyncio.Event()
        # While set, the client stops reading (a frozen tab), to provoke 4008.
        self.pause = pause
        # Cleared by go_offline(): the client closes its socket and does not reconnect
        # until go_online().
        self.online = asyncio.Event()
        self.online.set()
        self._ws: ClientConnection | None = None
        self._session_over = asyncio.Event()
        self._session_over.set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def go_offline(self, timeout: float = 10.0) -> None:
        """Close the socket (a tab that blinks) and stay away until go_online()."""
        self.online.clear()
        ws = self._ws
        if ws is not None:
            await ws.close()
        await asyncio.wait_for(self._session_over.wait(), timeout)

    def go_online(self) -> None:
        self.online.set()

    # -- what the ledger says

    def ids(self, message_id: str, stream: str | None = None) -> list[Any]:
        """The data of every accepted message with this id (on this stream, if given)."""
        return [m["data"] for m in self.ledger.messages
                if m["id"] == message_id and (stream is None or stream_of(m) == stream)]

    @property
    def resynced(self) -> bool:
        return bool(self.ledger.resyncs)

    # -- the connection

    async def _run(self) -> None:
        delay = 0.05
        while not self._stopping:
            await self.online.wait()
            try:
                await self._session()
                delay = 0.05
            except (OSError, InvalidHandshake, asyncio.TimeoutError):
                pass  # server gone or restarting: retry below
            self.authenticated.clear()
            # Reconnect backoff, not synchronisation. Faster than websocket.js's spread
            # over the server's reconnect window: the tests' pools are small.
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _session(self) -> None:
        kwargs: dict[str, Any] = {"max_queue": 1 if self.pause else None}
        if self.pause is not None:
            kwargs["sock"] = small_buffer_socket(self.url)
        if self.origin:
            kwargs["origin"] = self.origin
        self._session_over.clear()
        try:
            async with connect(self.url, open_timeout=5, **kwargs) as ws:
                self._ws = ws
                self.ledger.connects += 1
                try:
                    async for raw in ws:
                        if raw == "<3":
                            continue
                        await self._frame(ws, json.loads(raw))
                        while self.pause is not None and self.pause.is_set():
                            await asyncio.sleep(0.01)  # a frozen tab: not reading
                except ConnectionClosed as closed:
                    self.ledger.close_codes.append(closed.rcvd.code if closed.rcvd else None)
                    return
                self.ledger.close_codes.append(ws.close_code)
        finally:
            self._ws = None
            self._session_over.set()

    async def _frame(self, ws: ClientConnection, frame: dict[str, Any]) -> None:
        kind = frame.get("id")
        if "seq" in frame:  # only pushed messages carry seq, whatever their id
            self._accept(frame)
        elif kind == "AUTH REQUEST":
            # Every stream held, always: a resume that leaves one out cannot be recovered.
            await ws.send(json.dumps({"id": "AUTH", "token": self.token(), "resume": self.positions}))
        elif kind == "AUTH OK":
            self._authenticated(frame)
        elif kind not in ("AUTH FAILED", "ERROR", "PONG"):
            self.ledger.problems.append(f"unexpected frame {frame!r}")

    def _authenticated(self, frame: dict[str, Any]) -> None:
        ledger = self.ledger
        first = not ledger.auth_oks
        ledger.auth_oks.append(frame)
        streams = frame.get("streams")
        if not isinstance(streams, dict):
            ledger.problems.append(f"AUTH OK without streams: {frame!r}")
            streams = {}
        if frame.get("refreshed"):
            self.authenticated.set()
            return
        if frame["recovered"]:
            # History follows from the positions we asked with; AUTH OK's streams are where
            # it ends. Both must add up to what it says was missed.
            owed = sum(streams[s]["seq"] - p["seq"] for s, p in self.positions.items() if s in streams)
            if set(streams) != set(self.positions) or owed != frame["missed"]:
                ledger.problems.append(f"recovered with positions {self.positions}, AUTH OK {frame!r}")
        else:
            if not first:
                # The page would reload its state through its own API here.
                ledger.resyncs.append(frame)
                ledger.resynced_at.append(len(ledger.messages))
            self.positions = {}
        for name, position in streams.items():
            self.positions.setdefault(name, {"seq": position["seq"], "epoch": position["epoch"]})
        self.authenticated.set()

    def _accept(self, message: dict[str, Any]) -> None:
        stream = stream_of(message)
        last = self.positions.get(stream)
        if last is not None:
            if last["epoch"] != message["epoch"]:
                self.ledger.gaps.append((stream, last["seq"], -1))
            elif message["seq"] <= last["seq"]:
                self.ledger.duplicates += 1
                return
            elif message["seq"] != last["seq"] + 1:
                self.ledger.gaps.append((stream, last["seq"], message["seq"]))
        else:
            self.ledger.problems.append(f"a message on {stream!r} before AUTH OK gave a position for it")
        self.positions[stream] = {"seq": message["seq"], "epoch": message["epoch"]}
        self.ledger.messages.append(message)
