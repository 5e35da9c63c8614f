"""The Flow message proxy: the hub of the ZeroMQ engine (FLOW_ENGINE=zmq).

Numbers every push, keeps each stream's history and fans messages out to the WebSocket
pool; the logic is in :mod:`flowcore.proxy`. Run one per deployment (supervisord does).

SIGTERM or SIGINT stops it gracefully: what publishers already sent is published, and
the streams' positions and history are saved to FLOW_RUN_DIR/proxy-state for the next
start, so a restart changes no epoch. Exit status 0 after a graceful stop, 1 when the
endpoints cannot be bound or the state could not be saved, 2 for bad settings.
"""

from __future__ import annotations

import logging
import signal

import zmq

from flowcore.proxy import Proxy
from flowcore.runtime import start_process

log = logging.getLogger("flow.proxy")


def main() -> None:
    settings = start_process("message_proxy")
    # Handled from the start: a signal while the state file is being loaded (and deleted)
    # must still end in a graceful stop that saves it again.
    proxies: list[Proxy] = []
    signals: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        if not signals:
            log.info("signal %d: stopping gracefully", signum)
        signals.append(signum)
        for proxy in proxies:
            proxy.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        proxy = Proxy(settings)
    except zmq.ZMQError as exc:
        log.error("cannot bind: %s", exc)
        raise SystemExit(1) from None
    proxies.append(proxy)
    if signals:
        proxy.request_stop()
    try:
        proxy.run()
    except Exception:
        log.exception("the proxy loop failed; stopping without saving the state")
        proxy.close()
        raise SystemExit(1) from None
    raise SystemExit(proxy.stop())


if __name__ == "__main__":
    main()
