"""Log in (demo: a user name, no password), log out, and the socket token (PROTOCOL.md 2)."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, current_app, jsonify, redirect, request, session, url_for

from flowcore.protocol import ProtocolError, check_username
from flowcore.tokens import issue_token

bp = Blueprint("auth", __name__)
log = logging.getLogger("flow.app")


def current_user() -> str | None:
    return session.get("username")


def bad_request(message: str) -> tuple[Response, int]:
    log.warning("bad request to %s: %s", request.path, message)
    return jsonify(error=message), 400


@bp.post("/login")
def login():
    username = (request.form.get("username") or "").strip()
    try:
        check_username(username)
    except ProtocolError as exc:
        return bad_request(f"username: {exc}")
    session.clear()
    session["username"] = username
    return redirect(url_for("demo.index"))


@bp.post("/logout")
def logout():
    session.clear()
    return redirect(url_for("demo.index"))


@bp.get("/socket_auth_token")
def socket_auth_token():
    username = current_user()
    if username is None:
        return Response("not logged in\n", status=401, mimetype="text/plain")
    settings = current_app.config["FLOW_SETTINGS"]
    token = issue_token(settings, username)
    headers = {"Cache-Control": "no-store"}
    if request.accept_mimetypes.best == "application/json":
        return jsonify(token=token, expires_in=settings.token_ttl), 200, headers
    # message_flow pages use the plain body as the token.
    return Response(token, mimetype="text/plain", headers=headers)
