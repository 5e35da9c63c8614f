"""A resuming test client: what websocket.js does, in Python, with a ledger to check.

It keeps, per stream, the seq and epoch of the last message it accepted, sends them as
``resume`` on every reconnect, drops duplicates, and records every silent gap (a seq
that skips ahead in the same epoch without the server having said recovered: false).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from pipeline import small_buffer_socket


@dataclass
class Ledger:
    messages: list[dict[str, Any]] = field(default_factory=list)
    duplicates: int = 0
    gaps: list[tuple[str, int, int]] = field(default_factory=list)
    auth_oks: list[dict[str, Any]] = field(default_factory=list)
    close_codes: list[int | None] = field(default_factory=list)
    connects: int = 0


class ResumingClient:
    def __init__(self, url: str, token: Callable[[], str], origin: str | None = None,
                 pause: asyncio.Event | None = None) -> None:
        self.url = url
        self.token = token
        self.origin = origin
        self.positions: dict[str, dict[str, Any]] = {}
        self.ledger = Ledger()
        self.authenticated = asyncio.Event()
        # While set, the client stops reading (a frozen tab), to provoke 4008.
        self.pause = pause
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

    def ids(self, message_id: str) -> list[Any]:
        return [m["data"] for m in self.ledger.messages if m["id"] == message_id]

    async def _run(self) -> None:
        delay = 0.05
        while not self._stopping:
            try:
                await self._session()
                delay = 0.05
            except (OSError, InvalidHandshake, asyncio.TimeoutError):
                pass  # server gone or restarting: retry below
            self.authenticated.clear()
            await asyncio.sleep(delay)  # reconnect backoff, not synchronisation
            delay = min(delay * 2, 1.0)

    async def _session(self) -> None:
        kwargs: dict[str, Any] = {"max_queue": 1 if self.pause else None}
        if self.pause is not None:
            kwargs["sock"] = small_buffer_socket(self.url)
        if self.origin:
            kwargs["origin"] = self.origin
        async with connect(self.url, open_timeout=5, **kwargs) as ws:
            self.ledger.connects += 1
            try:
                async for raw in ws:
                    if raw == "<3":
                        continue
                    frame = json.loads(raw)
                    kind = frame.get("id")
                    if kind == "AUTH REQUEST":
                        await ws.send(json.dumps({"id": "AUTH", "token": self.token(),
                                                  "resume": self.positions}))
                    elif kind == "AUTH OK":
                        self.ledger.auth_oks.append(frame)
                        if not frame["recovered"]:
                            # The page would reload its state here; numbering restarts.
                            self.positions.clear()
                        self.authenticated.set()
                    elif kind in ("AUTH FAILED", "ERROR", "PONG"):
                        continue
                    else:
                        self._accept(frame)
                    while self.pause is not None and self.pause.is_set():
                        await asyncio.sleep(0.01)  # a frozen tab: not reading
            except ConnectionClosed as closed:
                self.ledger.close_codes.append(closed.rcvd.code if closed.rcvd else None)
                return
            self.ledger.close_codes.append(ws.close_code)

    def _accept(self, message: dict[str, Any]) -> None:
        stream = message["username"]
        last = self.positions.get(stream)
        if last is not None and last["epoch"] == message["epoch"]:
            if message["seq"] <= last["seq"]:
                self.ledger.duplicates += 1
                return
            if message["seq"] != last["seq"] + 1:
                self.ledger.gaps.append((stream, last["seq"], message["seq"]))
        self.positions[stream] = {"seq": message["seq"], "epoch": message["epoch"]}
        self.ledger.messages.append(message)
