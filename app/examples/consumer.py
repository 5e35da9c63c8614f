"""Print what one user's socket receives, one JSON line per message: a Flow client in a
few lines of the ``websockets`` library (pip install websockets).

    python -m app.examples.consumer alice --count 10

It does what a browser's websocket.js does, minus reconnecting: answer AUTH REQUEST with a
token (here signed locally with flow.issue_token, so it needs FLOW_SECRET; a real client
would get it from the app's /socket_auth_token), then read. Messages pushed to the user
and broadcasts (flow.push_all) arrive in the order they were sent. ``flow listen alice``
is the same from the command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from urllib.parse import urlsplit

import flow
from flowcore.settings import load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("user")
    parser.add_argument("--count", type=int, default=0, help="exit after this many messages (0: never)")
    parser.add_argument("--url", help="the WebSocket URL (default ws://127.0.0.1:$FLOW_HTTP_PORT/websocket)")
    args = parser.parse_args(argv)
    try:
        from websockets.sync.client import connect
        from websockets.typing import Origin
    except ImportError:
        parser.error("this example needs the websockets library: pip install websockets")
    port = load_settings().http_port
    url: str = args.url or f"ws://127.0.0.1:{port}/websocket"
    # The WebSocket server accepts a browser's Origin of its own host only.
    parts = urlsplit(url)
    origin = f"{'https' if parts.scheme == 'wss' else 'http'}://{parts.netloc}"
    received = 0
    with connect(url, origin=Origin(origin), proxy=None) as ws:
        for frame in ws:
            if frame == "<3" or not isinstance(frame, str):  # the server's heartbeat
                continue
            message = json.loads(frame)
            if isinstance(message.get("seq"), int):  # a pushed message, whatever its id
                print(json.dumps(message), flush=True)
                received += 1
                if args.count and received >= args.count:
                    return 0
            elif message.get("id") == "AUTH REQUEST":  # first, and when the token expires
                ws.send(json.dumps({"id": "AUTH", "token": flow.issue_token(args.user)}))
            elif message.get("id") == "AUTH OK" and message.get("refreshed") is not True:
                print(f"consumer: listening as {args.user} on {url}", file=sys.stderr, flush=True)
            elif message.get("id") == "AUTH FAILED":
                print(f"consumer: token refused: {message.get('reason')}", file=sys.stderr)
                return 1
    print("consumer: the server closed the socket", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
