"""The Flow demo app: log in, get a socket token, and watch background work push back.

It is the example users copy from: a Flask app built by ``create_app`` with blueprints,
that answers HTTP requests at once and lets background tasks tell the browser later
through ``flow.push``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

from flask import Flask

from flowcore.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the demo app.

    ``test_config`` may set ``FLOW_SETTINGS`` (a Settings object), ``PUSH`` (a callable
    ``push(username, id, data)`` used instead of ``flow.push``), ``PUSH_ALL`` and
    ``PUBLISH`` (instead of ``flow.push_all`` and ``flow.publish``), ``DISCONNECT``
    (instead of ``flow.disconnect``, which logout calls), ``TASK_DELAY``
    (seconds before background results are pushed), ``DOC_PAGE_ROWS`` and any Flask setting.

    Raises SettingsError (one line naming the variable) when the settings cannot issue
    tokens, or when there is no session key: FLOW_APP_SECRET (or FLOW_APP_SECRET_FILE)
    of 32 bytes or more, unless ``test_config`` gives ``SECRET_KEY``.
    """
    app = Flask(__name__, static_folder=str(ROOT / "static"), static_url_path="/static")
    config = dict(test_config or {})
    settings: Settings = config.pop("FLOW_SETTINGS", None) or load_settings()
    # The app issues socket tokens: it needs the HS* secret or the private key.
    settings.check_issuer()
    # The session cookie says who is logged in, so its key is a secret of its own
    # (FLOW_APP_SECRET): never derived from the JWT secret, which public-key
    # deployments do not have (an empty one made every cookie forgeable).
    secret_key = config.get("SECRET_KEY")
    if not secret_key:
        settings.check_app_secret()
        secret_key = settings.app_secret
    app.config.update(
        FLOW_SETTINGS=settings,
        SECRET_KEY=secret_key,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        TASK_DELAY=1.0,
        PUSH=None,
        # What the demo told each user, shared by all workers (see demo.Tasks).
        STATE_DB=os.path.join(os.environ.get("FLOW_RUN_DIR") or app.instance_path, "demo-state.sqlite3"),
    )
    app.config.update(config)
    app.config.setdefault("DISCONNECT", None)
    if app.config["PUSH"] is None or app.config["DISCONNECT"] is None:
        import flow

        app.config["PUSH"] = app.config["PUSH"] or flow.push
        app.config["DISCONNECT"] = app.config["DISCONNECT"] or flow.disconnect

    from . import auth, demo, demos, health

    # First: its upload limit must be set before CSRFProtect (registered with auth.bp)
    # parses a request's form.
    demos.init_app(app)
    app.register_blueprint(auth.bp)
    app.register_blueprint(demo.bp)
    # /healthz, /readyz and /metrics of the publisher side (PROTOCOL section 11).
    health.init_app(app, settings)
    app.extensions["flow_tasks"] = demo.Tasks(app)
    logging.getLogger("flow.app").debug("demo app created")
    return app
