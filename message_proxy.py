"""The Flow message proxy: the hub of the ZeroMQ engine (FLOW_ENGINE=zmq).

Numbers every push, keeps each stream's history and fans messages out to the WebSocket
pool; the logic is in :mod:`flowcore.proxy`, the process body in
flowcore.processes.proxy_main, which supervisord runs as ``python -m flowcore proxy``.
This file keeps the checkout's ``python message_proxy.py`` working.

SIGTERM or SIGINT stops it gracefully: what publishers already sent is published, and
the streams' positions and history are saved to FLOW_RUN_DIR/proxy-state for the next
start, so a restart changes no epoch. Exit status 0 after a graceful stop, 1 when the
endpoints cannot be bound or the state could not be saved, 2 for bad settings.
"""

from __future__ import annotations

from flowcore.processes import proxy_main


def main() -> None:
    proxy_main()


if __name__ == "__main__":
    main()
