"""A Flow WebSocket server: authenticates browsers and relays their users' messages.

Run several (FLOW_WS_PROCESSES) on one port: each binds with SO_REUSEPORT and the
kernel spreads connections over them. Each server subscribes, through its engine
(FLOW_ENGINE), only to the users it has authenticated sockets for, plus broadcasts
(PROTOCOL.md sections 6 and 11). The body is flowcore.processes.websocket_main, which
supervisord runs as ``python -m flowcore websocket``; this file keeps the checkout's
``python websocket_server.py`` working. The work is done in flowcore.server (Tornado
I/O), flowcore.session (one socket's protocol state), flowcore.hub (streams, fan-out,
gap repair) and flowcore.engines.
"""

from __future__ import annotations

from flowcore.processes import websocket_main


def main(argv: list[str] | None = None) -> None:
    websocket_main(argv)


if __name__ == "__main__":
    main()
