"""The demo pages and the work they start: a message echoed back, a card checked."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable

from flask import Blueprint, Flask, Response, current_app, jsonify, render_template, request, send_from_directory

from .auth import bad_request, current_user, refused as refuse

bp = Blueprint("demo", __name__)
log = logging.getLogger("flow.app")

MAX_MESSAGE_CHARS = 1000
RECENT = 20
# Background tasks one app process runs at once (config MAX_TASKS). Each is a thread that
# lives for seconds; without a bound, one client posting in a loop piles up thousands
# until the process cannot start a thread (a 500 with a traceback) or runs out of memory.
MAX_TASKS = 64


class Busy(Exception):
    """Too many background tasks running in this process: refuse the request (503)."""


class Tasks:
    """Background work of the app, and what it last told each user.

    The recent list backs /api/state, which a page reads when its socket reports
    ``recovered: false``. It is kept in SQLite so that every gunicorn worker sees the
    same list, whichever worker ran the task and whichever answers the page.
    """

    def __init__(self, app: Flask) -> None:
        self.push: Callable[[str, str, Any], None] = app.config["PUSH"]
        self.delay: float = app.config["TASK_DELAY"]
        self.db_path: str = app.config["STATE_DB"]
        self.limit: int = int(app.config.get("MAX_TASKS", MAX_TASKS))
        self._slots = threading.BoundedSemaphore(self.limit)
        Path(self.db_path).parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS told (username TEXT, id TEXT, data TEXT, at REAL)"
            )

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.db_path, timeout=5)

    def start(self, work: Callable[[], None]) -> None:
        """Run ``work`` in a thread of its own; Busy when MAX_TASKS already run."""
        if not self._slots.acquire(blocking=False):
            raise Busy(f"busy: {self.limit} tasks already running, try again in a moment")
        # Not a daemon: a worker that is restarted finishes its tasks (and flow.push
        # flushes at exit) before it goes, so an answered request's push is not lost.
        try:
            threading.Thread(target=self._run, args=(work,)).start()
        except RuntimeError:  # the process cannot start another thread
            self._slots.release()
            raise Busy("busy: cannot start a background task now, try again in a moment") from None

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception:
            log.exception("background task failed")
        finally:
            self._slots.release()

    def tell(self, username: str, message_id: str, data: Any) -> None:
        with self._db() as db:
            db.execute("INSERT INTO told VALUES (?, ?, ?, ?)",
                       (username, message_id, json.dumps(data), time.time()))
        self.push(username, message_id, data)

    def recent(self, username: str) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute(
                "SELECT id, data FROM told WHERE username = ? ORDER BY rowid DESC LIMIT ?",
                (username, RECENT),
            ).fetchall()
        return [{"id": message_id, "data": json.loads(data)} for message_id, data in reversed(rows)]

    def wait(self) -> None:
        # The demo's "a moment later": the work itself, not synchronisation.
        time.sleep(self.delay)


def tasks() -> Tasks:
    return current_app.extensions["flow_tasks"]


def signed_in_user() -> str:
    """The session's user, in a view that has passed login_required()."""
    username = current_user()
    if username is None:
        raise RuntimeError("signed_in_user() called before login_required()")
    return username


def busy(exc: Busy) -> tuple[Any, int, dict[str, str]]:
    body, status = refuse(str(exc), 503)
    return body, status, {"Retry-After": "1"}


def login_required() -> tuple[Any, int] | None:
    if current_user() is None:
        return jsonify(error="not logged in"), 401
    return None


@bp.get("/")
def index():
    return render_template("index.html", username=current_user())


@bp.get("/favicon.ico")
def favicon() -> Response:
    # Browsers ask for /favicon.ico whatever the page links; one SVG answers both.
    return send_from_directory(current_app.static_folder or "static", "favicon.svg",
                               mimetype="image/svg+xml", max_age=86400)


@bp.post("/send")
def send():
    refused = login_required()
    if refused:
        return refused
    message = request.form.get("message")
    if message is None or not message.strip():
        return bad_request("message: missing or empty")
    if len(message) > MAX_MESSAGE_CHARS:
        return bad_request(f"message: longer than {MAX_MESSAGE_CHARS} characters")
    username, work = signed_in_user(), tasks()

    def later() -> None:
        work.wait()
        work.tell(username, "TASK DONE", message)

    try:
        work.start(later)
    except Busy as exc:
        return busy(exc)
    return jsonify(status="OK", data=message)


@bp.post("/cards/check")
def check_card():
    refused = login_required()
    if refused:
        return refused
    number = "".join((request.form.get("number") or "").split())
    # ASCII digits only: str.isdigit() also takes "²" and "٤", which int() then rejects
    # (or worse, accepts) in the background task, long after the 200.
    if not (number.isascii() and number.isdigit()) or not 12 <= len(number) <= 19:
        return bad_request("number: 12 to 19 digits expected")
    username, work, masked = signed_in_user(), tasks(), mask(number)

    def later() -> None:
        for percent in (25, 50, 75):
            work.wait()
            work.tell(username, "CARD PROGRESS", {"card": masked, "percent": percent})
        work.wait()
        work.tell(username, "CARD RESULT", {"card": masked, "valid": luhn_valid(number),
                                            "brand": brand(number)})

    try:
        work.start(later)
    except Busy as exc:
        return busy(exc)
    return jsonify(status="OK", data={"card": masked})


@bp.get("/api/state")
def state():
    refused = login_required()
    if refused:
        return refused
    username = signed_in_user()
    return jsonify(username=username, recent=tasks().recent(username))


def mask(number: str) -> str:
    return "•" * (len(number) - 4) + number[-4:]


def luhn_valid(number: str) -> bool:
    total = 0
    for i, digit in enumerate(int(d) for d in reversed(number)):
        if i % 2:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


def brand(number: str) -> str:
    if number.startswith("4"):
        return "Visa"
    if number[:2] in {"51", "52", "53", "54", "55"} or 2221 <= int(number[:4]) <= 2720:
        return "Mastercard"
    if number[:2] in {"34", "37"}:
        return "American Express"
    if number.startswith("6011") or number.startswith("65"):
        return "Discover"
    return "unknown"
