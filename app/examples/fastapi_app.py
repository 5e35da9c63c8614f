"""A FastAPI app that pushes to its users' browsers with flow.aio (docs/asyncio.md).

    pip install fastapi uvicorn
    SHOP_SECRET_KEY=... uvicorn app.examples.fastapi_app:app --port 8000

The README's Flask shop, on asyncio: ``POST /login`` (JSON ``{"username": ...}``, demo
only: no password) keeps the user in a signed session cookie, ``GET /socket_auth_token``
gives the page its WebSocket token, and ``POST /orders/{order}/ship`` pushes
``ORDER SHIPPED`` to every open tab of that user. The publisher is made and closed in the
app's lifespan, on uvicorn's event loop: closing it at shutdown flushes what was pushed
last. The FLOW_ settings (flow.env, or the environment) say where the engine is, as for
the stack. ``tests/test_aio.py`` runs this app under uvicorn against a real pool.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from typing import Annotated, AsyncIterator

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel
from starlette.middleware.sessions import SessionMiddleware

import flow
from flowcore.protocol import check_username


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # One publisher per process, on the loop that serves the requests.
    async with flow.aio.Flow() as publisher:
        app.state.flow = publisher
        yield


app = FastAPI(lifespan=lifespan)
app.add_middleware(SessionMiddleware, secret_key=os.environ["SHOP_SECRET_KEY"], https_only=False)


def publisher(request: Request) -> flow.aio.Flow:
    return request.app.state.flow


def current_user(request: Request) -> str:
    username = request.session.get("username")
    if not isinstance(username, str):
        raise HTTPException(401, "not logged in")
    return username


class Login(BaseModel):
    username: str


@app.post("/login")
async def login(form: Login, request: Request) -> dict[str, str]:
    try:
        check_username(form.username)  # a name Flow can deliver to: not empty, no NUL, ...
    except flow.InvalidMessage as exc:
        raise HTTPException(400, f"username: {exc}") from None
    request.session["username"] = form.username  # stands in for your real log-in
    return {"status": "OK"}


@app.get("/socket_auth_token", response_class=PlainTextResponse)
async def socket_auth_token(username: Annotated[str, Depends(current_user)]) -> PlainTextResponse:
    # The body is the token (PROTOCOL.md section 2), never cached.
    return PlainTextResponse(flow.issue_token(username), headers={"Cache-Control": "no-store"})


@app.post("/orders/{order}/ship")
async def ship(order: int, username: Annotated[str, Depends(current_user)],
               flow_publisher: Annotated[flow.aio.Flow, Depends(publisher)]) -> dict[str, str]:
    try:
        # Queued without waiting on the network: this does not hold up the request.
        await flow_publisher.push(username, "ORDER SHIPPED", {"order": order})
    except flow.QueueFull:
        # The engine has been unreachable long enough to fill the queue: say so, rather
        # than answer OK for a message nobody will see.
        raise HTTPException(503, "notifications are unavailable, try again") from None
    return {"status": "OK"}
