"""The live demos: a view counter every open page follows (``flow.push_all``), and a
shared TSV document whose viewers all see the same page of the same file (``flow.publish``
on channel ``doc:<id>``, subscribed with a token from ``/socket_channel_token``).

Their scripts and styles are this blueprint's static files (``/demo-static/...``): the
page's policy allows scripts from the app's own origin only, so nothing is inline and
data reaches the scripts through ``data-*`` attributes.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable

from flask import (Blueprint, Flask, Response, current_app, jsonify, redirect, render_template, request,
                   url_for)
from werkzeug.exceptions import RequestEntityTooLarge

from flow import QueueFull
from flowcore.channels import issue_subscription_token
from flowcore.protocol import ProtocolError

from .auth import current_user, wants_html
from .store import Store
from .tsv import MAX_BYTES, MAX_ROWS, TsvError, display_filename, parse_tsv

bp = Blueprint("demos", __name__, static_folder="static", static_url_path="/demo-static")
log = logging.getLogger("flow.app")

# token_urlsafe(16): 22 characters of the URL-safe alphabet. Anything else is no document
# of ours, answered 404 without a database look-up.
DOC_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")
DOC_CHANNEL = re.compile(r"^doc:([A-Za-z0-9_-]{22})$")
# Room for the multipart framing and the CSRF field around a file of MAX_BYTES. A body
# above this is refused (413) before it is read; nginx's client_max_body_size (1m) is
# above it, so the refusal is ours and said on the page.
UPLOAD_OVERHEAD = 16 * 1024
UPLOAD_ENDPOINTS = frozenset({"demos.create_document", "demos.upload"})
MAX_PAGE = 10**9


def init_app(app: Flask) -> None:
    """Register the blueprint and what it needs; call before ``auth.bp`` is registered, so
    that the upload limit is set before CSRFProtect reads (and so parses) the form."""
    app.config.setdefault("PUSH_ALL", None)
    app.config.setdefault("PUBLISH", None)
    if app.config["PUSH_ALL"] is None or app.config["PUBLISH"] is None:
        import flow

        app.config["PUSH_ALL"] = app.config["PUSH_ALL"] or flow.push_all
        app.config["PUBLISH"] = app.config["PUBLISH"] or flow.publish
    app.extensions["flow_demos"] = Store(app.config["STATE_DB"],
                                         page_rows=int(app.config.get("DOC_PAGE_ROWS", 20)),
                                         max_documents=int(app.config.get("MAX_DOCUMENTS", 200)))
    app.before_request(_limit_uploads)
    app.register_blueprint(bp)


def _limit_uploads() -> None:
    # Flask 3.1: per request. Every other route keeps the app's own limit.
    if request.endpoint in UPLOAD_ENDPOINTS:
        request.max_content_length = MAX_BYTES + UPLOAD_OVERHEAD


def store() -> Store:
    return current_app.extensions["flow_demos"]


def _publish(channel: str, message_id: str, data: Any) -> None:
    publish: Callable[[str, str, Any], None] = current_app.config["PUBLISH"]
    try:
        publish(channel, message_id, data)
    except QueueFull:
        # Saved, but not announced: viewers see it at their next load or resync.
        log.error("cannot publish %s to %s: the publisher's queue is full", message_id, channel)


def _not_logged_in() -> tuple[Response, int]:
    return jsonify(error="not logged in"), 401


def _page_or_json(template: str, status: int, message: str, **context: Any) -> tuple[Any, int]:
    """A refusal: the page again with the message for a browser's form, JSON for a fetch."""
    log.warning("refused %s %s (%d): %s", request.method, request.path, status, message)
    if wants_html():
        return render_template(template, username=current_user(), error=message, **context), status
    return jsonify(error=message), status


# ---- the live counter

@bp.get("/counter")
def counter():
    username = current_user()
    if username is None:
        return render_template("counter.html", username=None, next=request.path)
    value = store().count_view()
    # Every authenticated socket of the deployment, this page's own included. Two views
    # in two workers may arrive in either order: the page keeps the highest value.
    try:
        current_app.config["PUSH_ALL"]("COUNTER", {"value": value})
    except QueueFull:
        # Counted, not announced: open pages catch up at their next resync or view.
        log.error("cannot push the counter: the publisher's queue is full")
    return render_template("counter.html", username=username, value=value)


@bp.get("/api/counter")
def counter_value():
    if current_user() is None:
        return _not_logged_in()
    return jsonify(value=store().counter())


# ---- shared documents

def _read_upload() -> tuple[str, Any]:
    """(shown file name, table) of the request's file; TsvError saying what is wrong."""
    upload = request.files.get("file")
    if upload is None or not upload.filename:
        raise TsvError("choose a TSV file to upload")
    raw = upload.stream.read(MAX_BYTES + 1)
    return display_filename(upload.filename), parse_tsv(raw)


def _limits() -> dict[str, int]:
    return {"max_bytes": MAX_BYTES, "max_rows": MAX_ROWS}


@bp.get("/docs")
def documents():
    return render_template("docs.html", username=current_user(), next=request.path, **_limits())


@bp.post("/docs")
def create_document():
    username = current_user()
    if username is None:
        return _not_logged_in()
    try:
        filename, table = _read_upload()
    except TsvError as exc:
        return _page_or_json("docs.html", 400, f"not uploaded: {exc}", **_limits())
    doc_id = store().create_document(username, filename, table)
    url = url_for("demos.document", doc_id=doc_id)
    log.info("document %s created by %s: %s, %d rows", doc_id[:6], username, filename, len(table.rows))
    if wants_html():
        return redirect(url, 303)
    return jsonify(id=doc_id, url=url), 201


def _viewer(doc_id: str) -> tuple[str | None, tuple[Any, int] | None]:
    """(username, None) when the session's user may see the document, else (None, refusal)."""
    username = current_user()
    if username is None:
        return None, _not_logged_in()
    if not DOC_ID.match(doc_id) or not store().may_see(doc_id, username):
        # The same answer for a document that does not exist: no oracle for ids.
        return None, (jsonify(error="no such document, or not opened by its URL"), 404)
    return username, None


@bp.get("/docs/<doc_id>")
def document(doc_id: str):
    username = current_user()
    state = store().state(doc_id) if DOC_ID.match(doc_id) else None
    if state is None:
        return _page_or_json("docs.html", 404, "no such document (it may have been replaced by newer ones)",
                             next=url_for("demos.documents"), **_limits())
    if username is None:
        return render_template("doc.html", username=None, next=request.path)
    # Knowing the URL is what lets a user in: from now on this user may subscribe.
    store().admit(doc_id, username)
    return render_template("doc.html", username=username, doc=state, **_limits())


@bp.get("/docs/<doc_id>/state")
def document_state(doc_id: str):
    _, refused = _viewer(doc_id)
    if refused:
        return refused
    return jsonify(store().state(doc_id))


@bp.post("/docs/<doc_id>/page")
def page(doc_id: str):
    _, refused = _viewer(doc_id)
    if refused:
        return refused
    raw = (request.form.get("page") or "").strip()
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_PAGE:
        return _page_or_json("doc.html", 400, "page: a page number expected", doc=store().state(doc_id),
                             **_limits())
    state = store().set_page(doc_id, int(raw))
    if state is None:  # dropped since _viewer looked
        return jsonify(error="no such document"), 404
    _publish(f"doc:{doc_id}", "PAGE", _announcement(state))
    if wants_html():
        return redirect(url_for("demos.document", doc_id=doc_id), 303)
    return jsonify(state)


@bp.post("/docs/<doc_id>/upload")
def upload(doc_id: str):
    username, refused = _viewer(doc_id)
    if refused:
        return refused
    assert username is not None
    try:
        filename, table = _read_upload()
    except TsvError as exc:
        return _page_or_json("doc.html", 400, f"not uploaded: {exc}", doc=store().state(doc_id), **_limits())
    state = store().replace_document(doc_id, username, filename, table)
    if state is None:
        return jsonify(error="no such document"), 404
    _publish(f"doc:{doc_id}", "UPLOAD", _announcement(state))
    if wants_html():
        return redirect(url_for("demos.document", doc_id=doc_id), 303)
    return jsonify(state)


def _announcement(state: dict[str, Any]) -> dict[str, Any]:
    # Small on purpose: the rows are read from /docs/<id>/state, which also answers the
    # viewer that reloads after a resync, so there is one way to get them.
    return {key: state[key] for key in ("rev", "version", "page", "pages", "filename", "uploaded_by")}


@bp.errorhandler(RequestEntityTooLarge)
def too_large(error: RequestEntityTooLarge) -> tuple[Any, int]:
    message = f"not uploaded: the file is larger than {MAX_BYTES // 1024} KiB"
    doc_id = (request.view_args or {}).get("doc_id")
    username = current_user()
    state = None
    # The document again only for one of its viewers: the refusal must not show it to others.
    if username and doc_id and DOC_ID.match(doc_id) and store().may_see(doc_id, username):
        state = store().state(doc_id)
    if state is not None:
        return _page_or_json("doc.html", 413, message, doc=state, **_limits())
    return _page_or_json("docs.html", 413, message, **_limits())


# ---- subscription tokens (PROTOCOL.md section 9)

@bp.get("/socket_channel_token")
def socket_channel_token():
    """A token that lets the session's user subscribe to one channel, for a user who may
    see it: ``doc:<id>`` for a document they opened by its URL. Nothing else is granted."""
    username = current_user()
    if username is None:
        return Response("not logged in\n", status=401, mimetype="text/plain")
    channel = request.args.get("channel", "")
    match = DOC_CHANNEL.match(channel)
    if not match or not store().may_see(match.group(1), username):
        log.warning("refused a subscription token for %r to %s", channel[:300], username)
        return Response("forbidden: not a channel you may see\n", status=403, mimetype="text/plain")
    settings = current_app.config["FLOW_SETTINGS"]
    try:
        token = issue_subscription_token(settings, username, channel)
    except ProtocolError as exc:  # the pattern above admits valid names only; kept as a guard
        return Response(f"bad channel: {exc}\n", status=400, mimetype="text/plain")
    headers = {"Cache-Control": "no-store"}
    if request.accept_mimetypes.best == "application/json":
        return jsonify(token=token, channel=channel, expires_in=settings.token_ttl), 200, headers
    return Response(token, mimetype="text/plain", headers=headers)
