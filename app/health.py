"""The app's health and metrics (PROTOCOL.md section 11): ``/healthz``, ``/readyz``, ``/metrics``.

- ``/healthz``: 200 while the app serves.
- ``/readyz``: 503 with the reason when the engine ``flow.push`` hands messages to does not
  answer (the proxy's ping, or Redis's PING), checked at most once a second whatever the
  number of requests (flowcore.health.EngineProbe).
- ``/metrics``: Prometheus text of the publisher side: what ``flow.push`` and its siblings
  handed over, by kind, and what they refused, by reason (``flow.stats()``), summed over
  gunicorn's workers (each counts its own; a scrape reaches one of them), and whether the
  engine answers. For the host's scraper only: a request that came through nginx (which
  sets X-Real-IP) gets 404, and FLOW_METRICS=0 turns it off. Scrape FLOW_APP_PORT directly.

An app of your own gets the same by registering this blueprint, or by calling
``flowcore.metrics.publisher_collector`` from its own view.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Blueprint, Flask, Response, abort, current_app, jsonify, request

from flowcore.health import EngineProbe, SharedCounters
from flowcore.settings import Settings

bp = Blueprint("health", __name__)


class Health:
    """What the views share, one per app (``app.extensions["flow_health"]``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.probe = EngineProbe(settings)
        self.registry: Any = None
        self.shared: SharedCounters | None = None
        self._pid = 0
        if settings.metrics:
            import flow
            from flowcore import metrics

            self.shared = SharedCounters(settings.path(settings.run_dir) / "metrics",
                                         lambda: metrics.publisher_totals(flow.stats()))
            shared = self.shared
            # No process_* figures: they would be those of whichever worker was scraped.
            self.registry = metrics.registry("app", settings.engine,
                                             metrics.publisher_collector(self.probe.problem, shared.total),
                                             process=False)

    def started(self) -> None:
        """This process's counters are written for the others (again after a fork)."""
        if self._pid != os.getpid() and self.shared is not None:
            self._pid = os.getpid()
            self.shared.start()


def init_app(app: Flask, settings: Settings) -> None:
    app.extensions["flow_health"] = Health(settings)
    app.register_blueprint(bp)


def _health() -> Health:
    return current_app.extensions["flow_health"]


def _json(body: dict[str, Any], status: int = 200) -> Response:
    response = jsonify(body)
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/healthz")
def healthz() -> Response:
    return _json({"alive": True})


@bp.get("/readyz")
def readyz() -> Response:
    problem = _health().probe.problem()
    if problem:
        # Through nginx (a public client, or a load balancer in front of it): the status
        # only; the engine's address is for the host's own checks.
        shown = "the engine is not answering" if "X-Real-IP" in request.headers else problem
        return _json({"ready": False, "reason": shown}, 503)
    return _json({"ready": True})


@bp.get("/metrics")
def metrics_view() -> Response:
    health = _health()
    if health.registry is None or "X-Real-IP" in request.headers:
        abort(404)  # metrics are off, or this came through nginx: not for the public
    from flowcore import metrics

    health.started()  # under gunicorn, post_worker_init did (flowcore.gunicorn_conf)
    response = Response(metrics.render(health.registry), mimetype=None)
    response.headers["Content-Type"] = metrics.CONTENT_TYPE
    response.headers["Cache-Control"] = "no-store"
    return response
