"""Log in (demo: a user name, no password), log out, the socket token (PROTOCOL.md 2), and
what guards every page of the app: CSRF protection on each POST and security headers.

The guards are registered with this blueprint (``bp.record_once``), so any app that
registers ``auth.bp`` gets them, as ``create_app`` does.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit

from flask import (Blueprint, Flask, Response, current_app, has_request_context, jsonify, redirect,
                   render_template, request, session, url_for)
from flask.blueprints import BlueprintSetupState
from flask.sessions import SecureCookieSessionInterface
from flask_wtf.csrf import CSRFError, CSRFProtect  # type: ignore[import-untyped]
from werkzeug.exceptions import HTTPException

from flowcore.protocol import ProtocolError, check_username
from flowcore.tokens import issue_token

# The channel every logged-in user may subscribe to (the index page's "online now").
LOBBY = "lobby"

bp = Blueprint("auth", __name__)
log = logging.getLogger("flow.app")
csrf = CSRFProtect()

# A Host header we are willing to repeat inside the policy (anything else could smuggle in
# directives of its own); without one, 'self' alone still allows the same origin's sockets
# in current browsers.
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")
_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
           "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class _SessionInterface(SecureCookieSessionInterface):
    """Flask's signed cookie, marked Secure whenever the request came over https.

    SESSION_COOKIE_SECURE is one value for the whole app, but the same app is served over
    http (make) and https (FLOW_TLS_CERT): behind TLS the cookie must never be sent over a
    plain connection, where anyone on the network could copy it and be that user.
    gunicorn trusts nginx's X-Forwarded-Proto, so request.is_secure is the browser's scheme.
    """

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(super().get_cookie_secure(app) or (has_request_context() and request.is_secure))


@bp.record_once
def _guard(state: BlueprintSetupState) -> None:
    app = state.app
    # Flask's own interface only: an app that brought its own keeps it.
    if isinstance(app, Flask) and type(app.session_interface) is SecureCookieSessionInterface:
        app.session_interface = _SessionInterface()
    # The token lives as long as the session: a tab left open for hours still sends.
    app.config.setdefault("WTF_CSRF_TIME_LIMIT", None)
    csrf.init_app(app)
    # Flask-WTF reports each refusal at INFO too; refused() below logs it once, as a warning.
    logging.getLogger("flask_wtf.csrf").setLevel(logging.WARNING)


def current_user() -> str | None:
    return session.get("username")


def safe_next(target: str | None) -> str | None:
    """``target`` when it is a path of this site ("/docs/x"), else None: a login form's
    ``next`` must not send the user to another site ("//evil", "/\\evil", "https:...")."""
    if not target or len(target) > 2000 or not target.startswith("/") or target.startswith("//"):
        return None
    if "\\" in target or any(ord(char) < 0x21 or ord(char) == 0x7F for char in target):
        return None
    parts = urlsplit(target)
    return target if not parts.scheme and not parts.netloc else None


def _form_next() -> str | None:
    # Read from a refused request, whose form may itself be the problem (too large).
    try:
        return safe_next(request.form.get("next"))
    except HTTPException:
        return None


def wants_html() -> bool:
    """A browser's form post (Accept prefers text/html), not a fetch or a script."""
    best = request.accept_mimetypes.best_match(["application/json", "text/html"], "application/json")
    return best == "text/html"


def refused(message: str, status: int = 400) -> tuple[Response | str, int]:
    """Answer a request we refuse: the page again with the message for a browser's form,
    JSON ``{"error": message}`` for anything else; one warning line, no traceback."""
    log.warning("refused %s %s (%d): %s", request.method, request.path, status, message)
    if wants_html():
        return render_template("index.html", username=current_user(), error=message,
                               next=_form_next()), status
    return jsonify(error=message), status


def bad_request(message: str) -> tuple[Response | str, int]:
    return refused(message, 400)


@bp.app_errorhandler(CSRFError)
def csrf_refused(error: CSRFError) -> tuple[Response | str, int]:
    return refused(f"CSRF check failed: {error.description} Reload the page and try again.")


@bp.app_errorhandler(HTTPException)
def http_refused(error: HTTPException) -> Response | HTTPException | tuple[Response | str, int]:
    # A wrong method or path from a page's fetch gets JSON like every other refusal (the
    # page shows it), not Werkzeug's HTML; its headers (405's Allow) are kept.
    status = error.code or 500
    if not 400 <= status < 500:
        return error
    body, status = refused(f"{error.name}: {error.description}", status)
    response = current_app.make_response((body, status))
    for name, value in error.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


@bp.after_app_request
def security_headers(response: Response) -> Response:
    host = request.host
    sockets = f" ws://{host} wss://{host}" if _HOST.match(host) else ""
    headers = response.headers
    headers.setdefault("Content-Security-Policy", f"{_POLICY}; connect-src 'self'{sockets}")
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Referrer-Policy", "same-origin")
    # A page that read the session carries that session's CSRF token and user name: no
    # cache (a shared one, or the browser's back button after logout) may keep it.
    # (Flask adds its Vary: Cookie only after this runs; session.accessed is what it reads.)
    if getattr(session, "accessed", False) and "Cache-Control" not in headers:
        headers["Cache-Control"] = "no-store"
    return response


@bp.post("/login")
def login():
    username = (request.form.get("username") or "").strip()
    try:
        check_username(username)
    except ProtocolError as exc:
        return bad_request(f"username: {exc}")
    session.clear()
    session["username"] = username
    # Back to the page that asked for the login (a shared document's URL), never elsewhere.
    return redirect(safe_next(request.form.get("next")) or url_for("demo.index"))


@bp.post("/logout")
def logout():
    username = current_user()
    session.clear()
    if username is not None:
        # Every open tab of the user, on every server, is closed (4004) at once: its token
        # stays valid until exp, and a logged-out user must not go on receiving.
        try:
            current_app.config["DISCONNECT"](username)
        except Exception as exc:  # QueueFull: the push service is away; the logout stands
            log.warning("logout of %r: could not disconnect its sockets: %s", username, exc)
    return redirect(url_for("demo.index"))


@bp.get("/socket_auth_token")
def socket_auth_token():
    username = current_user()
    if username is None:
        return Response("not logged in\n", status=401, mimetype="text/plain")
    settings = current_app.config["FLOW_SETTINGS"]
    # Every logged-in user may join the lobby (who is online, on the index page): a grant
    # in the connection token's `channels` claim (PROTOCOL section 9). Documents are
    # granted one at a time by subscription tokens instead (/socket_channel_token).
    token = issue_token(settings, username, extra={"channels": [LOBBY]})
    headers = {"Cache-Control": "no-store"}
    if request.accept_mimetypes.best == "application/json":
        return jsonify(token=token, expires_in=settings.token_ttl), 200, headers
    # message_flow pages use the plain body as the token.
    return Response(token, mimetype="text/plain", headers=headers)
