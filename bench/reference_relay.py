"""The bench's reference: a minimal message_flow-style relay, deliberately plain.

    python bench/reference_relay.py proxy  --xsub EP --xpub EP
    python bench/reference_relay.py server --port P --xpub EP --secret S

``proxy`` is ``zmq.proxy(XSUB, XPUB)`` with ZeroMQ's default high-water marks;
publishers connect a PUB to its XSUB and send ``[username, json]`` (``"*"`` for every
socket). ``server`` is one Tornado process serving /websocket: it sends AUTH REQUEST,
takes the raw token, decodes it with PyJWT for the username, subscribes its SUB to that
username, answers AUTH OK, and writes each message to that user's sockets with
``write_message``. No history, no seq, no limits, no origin or rate checks: the floor
that Flow's figures are divided by. Not optimized and not sabotaged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

import jwt
import tornado.web
import tornado.websocket
import zmq


def run_proxy(xsub_endpoint: str, xpub_endpoint: str) -> None:
    context = zmq.Context()
    xsub = context.socket(zmq.XSUB)
    xsub.bind(xsub_endpoint)
    xpub = context.socket(zmq.XPUB)
    xpub.bind(xpub_endpoint)
    zmq.proxy(xsub, xpub)  # until SIGTERM ends the process


class Relay:
    def __init__(self, xpub_endpoint: str, secret: str) -> None:
        self.secret = secret
        self.users: dict[str, set[RelaySocket]] = {}
        self.everyone: set[RelaySocket] = set()
        self.context = zmq.Context()
        self.sub = self.context.socket(zmq.SUB)
        self.sub.connect(xpub_endpoint)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"*")

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.sub.getsockopt(zmq.FD), self.drain)
        loop.call_soon(self.drain)

    def drain(self) -> None:
        # The ZeroMQ FD is edge-triggered: read until nothing is left.
        while self.sub.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            username, message = self.sub.recv_multipart()
            targets = self.everyone if username == b"*" else self.users.get(username.decode(), ())
            text = message.decode()
            for sock in list(targets):
                sock.write_message(text)

    def join(self, sock: "RelaySocket", username: str) -> None:
        if username not in self.users:
            self.users[username] = set()
            self.sub.setsockopt(zmq.SUBSCRIBE, username.encode())
            asyncio.get_running_loop().call_soon(self.drain)
        self.users[username].add(sock)
        self.everyone.add(sock)

    def leave(self, sock: "RelaySocket", username: str) -> None:
        self.everyone.discard(sock)
        sockets = self.users.get(username)
        if sockets is not None:
            sockets.discard(sock)
            if not sockets:
                del self.users[username]
                self.sub.setsockopt(zmq.UNSUBSCRIBE, username.encode())


class RelaySocket(tornado.websocket.WebSocketHandler):
    def initialize(self, relay: Relay) -> None:
        self.relay = relay
        self.username: str | None = None

    def open(self) -> None:
        self.write_message('{"id": "AUTH REQUEST"}')

    def on_message(self, message: str | bytes) -> None:
        if self.username is not None or message == "<3":
            return
        try:
            claims = jwt.decode(message, self.relay.secret, algorithms=["HS256"])
        except jwt.InvalidTokenError:
            self.write_message('{"id": "AUTH FAILED"}')
            return
        self.username = claims["username"]
        self.relay.join(self, self.username)
        self.write_message(json.dumps({"id": "AUTH OK", "username": self.username}))

    def on_close(self) -> None:
        if self.username is not None:
            self.relay.leave(self, self.username)


async def serve(port: int, xpub_endpoint: str, secret: str) -> None:
    relay = Relay(xpub_endpoint, secret)
    relay.start()
    app = tornado.web.Application([(r"/websocket", RelaySocket, {"relay": relay})])
    app.listen(port, "127.0.0.1")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=("proxy", "server"))
    parser.add_argument("--xsub", help="proxy: where publishers connect")
    parser.add_argument("--xpub", required=True, help="where the server's SUB connects")
    parser.add_argument("--port", type=int, help="server: WebSocket port")
    parser.add_argument("--secret", help="server: HS256 secret")
    args = parser.parse_args()
    if args.role == "proxy":
        run_proxy(args.xsub, args.xpub)
    else:
        asyncio.run(serve(args.port, args.xpub, args.secret))


if __name__ == "__main__":
    main()
