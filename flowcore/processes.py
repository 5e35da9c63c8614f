"""The bodies of Flow's long-running processes, importable from an installed package.

supervisord starts them as ``python -m flowcore proxy`` and ``python -m flowcore
websocket`` (flowcore.cli), so a deployment needs no file of the checkout; the
checkout's ``message_proxy.py`` and ``websocket_server.py`` call the same functions.

Tornado is imported only by :func:`websocket_main`: the proxy, like a publisher, runs
from the base install.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

log = logging.getLogger("flow.proxy")


def websocket_main(argv: list[str] | None = None) -> None:
    """A Flow WebSocket server: authenticates browsers and relays their users' messages.

    Several (FLOW_WS_PROCESSES) share one port with SO_REUSEPORT; each subscribes
    through its engine only to the users it has authenticated sockets for, plus
    broadcasts. SIGTERM and SIGINT drain the sockets, then this returns.
    """
    parser = argparse.ArgumentParser(prog="flow websocket", description="Flow WebSocket server")
    parser.add_argument("--port", type=int, help="listen port (default FLOW_WS_PORT)")
    parser.add_argument("--index", type=int, help="this server's number in the pool (supervisord's "
                        "process_num): with FLOW_METRICS_PORT it also serves /metrics and health on "
                        "FLOW_METRICS_PORT + 1 + INDEX")
    args = parser.parse_args(argv)

    from .runtime import start_process

    settings = start_process("websocket_server", "verifier")
    try:
        import asyncio

        from . import compat
        from .server import serve
    except ImportError as exc:
        print(f"websocket_server: {exc.name or exc} is missing: install flow-push[server]",
              file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    try:
        compat.check()
    except compat.CompatError as exc:
        print(f"websocket_server: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    asyncio.run(serve(settings, args.port or settings.ws_port, args.index))


def proxy_main() -> None:
    """The message proxy, the hub of the ZeroMQ engine (FLOW_ENGINE=zmq); one per deployment.

    SIGTERM or SIGINT stops it gracefully: what publishers already sent is published, and
    the streams' positions and history are saved to FLOW_RUN_DIR/proxy-state for the next
    start. Exit status 0 after a graceful stop, 1 when the endpoints cannot be bound or
    the state could not be saved, 2 for bad settings.
    """
    import zmq

    from .proxy import Proxy, keep_on_one_cpu
    from .runtime import freeze_startup, start_process

    settings = start_process("message_proxy", "proxy")
    try:
        # Before any ZeroMQ socket: the I/O thread the first one starts inherits the CPU.
        pinned = keep_on_one_cpu(settings.proxy_cpu)
    except ValueError as exc:
        # The form start_process gives every other bad setting.
        print(f"message_proxy: bad configuration: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    cpu, keeper = pinned if pinned is not None else (None, None)
    if cpu is not None:
        log.info("on CPU %d with its I/O thread (FLOW_PROXY_CPU=%s%s)", cpu, settings.proxy_cpu,
                 "; spread over every CPU while busy" if keeper is not None else "")
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
    proxy.cpu_keeper = keeper
    if signals:
        proxy.request_stop()
    health = None
    if settings.metrics_port:
        try:
            health = proxy.listen_health(settings.metrics_port)
        except OSError as exc:
            log.error("cannot listen on 127.0.0.1:%d for metrics and health (FLOW_METRICS_PORT): %s; "
                      "choose another port or set FLOW_METRICS_PORT=0", settings.metrics_port, exc.strerror or exc)
            proxy.close()
            raise SystemExit(1) from None
    freeze_startup()
    try:
        try:
            proxy.run()
        except Exception:
            log.exception("the proxy loop failed; stopping without saving the state")
            proxy.close()
            raise SystemExit(1) from None
        # Still answering meanwhile: /readyz says 503 "stopping" while the state is saved.
        code = proxy.stop()
    finally:
        if health is not None:
            health.close()
    raise SystemExit(code)
