"""Load client for bench/run.py in plain Python, for machines without Node's `ws`.

Speaks the same stdin/stdout protocol as bench/client.js (read that file's header). The
WebSocket client side is written out here (RFC 6455: handshake, masked client frames,
unfragmented server frames) so it needs nothing beyond the standard library and stays
cheap per message; bench/run.py starts several of these to spread the load.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import os
import struct
import sys
import threading
import time
from urllib.parse import urlsplit

runs: dict[str, dict] = {}
authed = failed = subscribed = closed_after_ready = 0
close_codes: dict[str, int] = {}
writers: list[asyncio.StreamWriter] = []


def out(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def run_state(run: str) -> dict:
    state = runs.get(run)
    if state is None:
        state = runs[run] = {"received": 0, "dups": 0, "gaps": 0, "foreign": 0, "first": 0.0, "last": 0.0,
                             "lat": [], "at": [], "ids": []}
    return state


def frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    masked = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big") if n else b""
    return header + mask + masked


async def one_socket(url: str, token: str, channel: str | None, done: asyncio.Event) -> None:
    """One socket; with ``channel``, AUTH subscribes it there and it is ready at SUBSCRIBE OK."""
    global authed, failed, subscribed, closed_after_ready
    parts = urlsplit(url)
    state = "connecting"
    seq = -1  # the last seq of `channel` this socket got (SUBSCRIBE OK's to begin with)
    try:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET {parts.path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError("handshake refused")
        writers.append(writer)
        while True:
            b0, b1 = await reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await reader.readexactly(8))
            payload = await reader.readexactly(n)
            opcode = b0 & 0x0F
            if opcode == 8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                close_codes[str(code)] = close_codes.get(str(code), 0) + 1
                break
            if opcode == 9:
                writer.write(frame(10, payload))
                continue
            if opcode != 1 or payload == b"<3":
                continue
            msg = json.loads(payload)
            if state != "authed":
                kind = msg.get("id")
                if kind == "AUTH REQUEST":
                    auth = token if channel is None else json.dumps(
                        {"id": "AUTH", "token": token, "subscribe": {channel: {}}})
                    writer.write(frame(1, auth.encode()))
                    continue
                if (kind == "AUTH OK" and channel is None) or (kind == "SUBSCRIBE OK" and msg.get("channel") == channel):
                    state = "authed"
                    authed += 1
                    if channel is not None:
                        subscribed += 1
                        seq = msg["seq"]
                    done.set()
                    continue
                if kind in ("AUTH FAILED", "SUBSCRIBE FAILED"):
                    break
                if kind == "AUTH OK":
                    continue
            data = msg.get("data")
            if not isinstance(data, dict) or "r" not in data:
                continue
            now = time.time()
            s = run_state(data["r"])
            if "channel" in msg:
                if msg["channel"] != channel:
                    s["foreign"] += 1
                    continue
                if msg.get("seq") != seq + 1:
                    s["gaps"] += 1
                if isinstance(msg.get("seq"), int) and msg["seq"] > seq:
                    seq = msg["seq"]
            seen = s.setdefault("seen", {}).setdefault(id(writer), set())
            if data["i"] in seen:
                s["dups"] += 1
                continue
            seen.add(data["i"])
            s["received"] += 1
            if not s["first"]:
                s["first"] = now
            s["last"] = now
            s["lat"].append((now - data["t"]) * 1000.0)
            s["at"].append(now * 1000.0)
            s["ids"].append(data["i"])
    except (OSError, asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    if state == "authed":
        closed_after_ready += 1
    else:
        failed += 1
        done.set()


async def main() -> None:
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            if line.strip():
                loop.call_soon_threadsafe(commands.put_nowait, json.loads(line))
        loop.call_soon_threadsafe(commands.put_nowait, {"cmd": "close"})

    threading.Thread(target=read_stdin, daemon=True).start()
    config = await commands.get()
    started = time.time()
    gate = asyncio.Semaphore(config.get("concurrency", 200))
    tasks = []

    async def opened(token: str, channel: str | None) -> None:
        done = asyncio.Event()
        async with gate:
            task = asyncio.ensure_future(one_socket(config["url"], token, channel, done))
            tasks.append(task)
            await done.wait()

    channels = config.get("channels") or [None] * len(config["tokens"])
    opening = asyncio.gather(*(opened(t, c) for t, c in zip(config["tokens"], channels)))
    try:
        await asyncio.wait_for(opening, config.get("timeout", 60))
    except asyncio.TimeoutError:
        pass
    out({"event": "ready", "authed": authed, "failed": failed, "subscribed": subscribed,
         "seconds": time.time() - started})
    while True:
        cmd = await commands.get()
        if cmd.get("cmd") == "report":
            s = run_state(cmd["run"])
            reply = {"event": "report", "run": cmd["run"], "received": s["received"], "dups": s["dups"],
                     "gaps": s["gaps"], "foreign": s["foreign"],
                     "first": s["first"], "last": s["last"], "authed": authed, "failed": failed,
                     "closed": closed_after_ready, "codes": close_codes}
            if cmd.get("latencies"):
                reply["lat"] = [round(x, 3) for x in s["lat"]]
                reply["at"] = [round(x, 3) for x in s["at"]]  # arrival (epoch ms), in lat's order
            if cmd.get("ids"):
                reply["ids"] = s["ids"]
            out(reply)
        elif cmd.get("cmd") == "forget":
            runs.pop(cmd["run"], None)
            gc.collect()
            out({"event": "forgot", "run": cmd["run"]})
        elif cmd.get("cmd") == "close":
            for writer in writers:
                if not writer.is_closing():
                    writer.write(frame(8, struct.pack("!H", 1000)))
                    writer.close()
            await asyncio.sleep(0.2)
            out({"event": "closed"})
            return


if __name__ == "__main__":
    asyncio.run(main())
