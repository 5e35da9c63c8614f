"""Broadcast numbered messages to every authenticated socket, with Flow's public API.

    python -m app.examples.producer --count 10 --interval 0.5

The same as ``flow push --all TICK '{"n": 1}'`` run in a loop, from Python: each message
is ``{"id": "TICK", "data": {"n": n, "of": count}}``. Run one or more consumers first
(``python -m app.examples.consumer alice`` or ``flow listen alice``): a broadcast reaches
the sockets that are open when it is sent. The FLOW_ settings (flow.env, or the
environment) say where the engine is, as for the app.
"""

from __future__ import annotations

import argparse
import sys
import time

import flow


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10, help="messages to send (1 to 100000)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between two messages")
    parser.add_argument("--id", default="TICK", help="the messages' id")
    args = parser.parse_args(argv)
    if not 1 <= args.count <= 100_000 or not 0 <= args.interval <= 3600:
        parser.error("--count must be 1 to 100000 and --interval 0 to 3600")
    for n in range(1, args.count + 1):
        flow.push_all(args.id, {"n": n, "of": args.count})
        if args.interval and n < args.count:
            time.sleep(args.interval)  # the pace of the demo, not synchronisation
    # push_all only queues; wait until the engine has taken every message.
    left = flow.flush(10)
    if left:
        print(f"producer: {left} of {args.count} messages were not handed over", file=sys.stderr)
        return 1
    print(f"producer: sent {args.count} messages", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
