"""A Flow WebSocket server: authenticates browsers and relays their users' messages.

Run several (FLOW_WS_PROCESSES) on one port: each binds with SO_REUSEPORT and the
kernel spreads connections over them. Each server subscribes, through its engine
(FLOW_ENGINE), only to the users it has authenticated sockets for, plus broadcasts
(PROTOCOL.md sections 6 and 11). The work is done in the flowcore package:
flowcore.server (Tornado I/O), flowcore.session (one socket's protocol state, no I/O),
flowcore.hub (streams, fan-out, gap repair) and flowcore.engines (the engines).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from flowcore import compat
from flowcore.runtime import start_process
from flowcore.server import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Flow WebSocket server")
    parser.add_argument("--port", type=int, help="listen port (default FLOW_WS_PORT)")
    args = parser.parse_args(argv)
    settings = start_process("websocket_server")
    try:
        compat.check()
    except compat.CompatError as exc:
        print(f"websocket_server: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    # SIGTERM and SIGINT drain the sockets (flowcore.server.serve), then return here.
    asyncio.run(serve(settings, args.port or settings.ws_port))


if __name__ == "__main__":
    main()
