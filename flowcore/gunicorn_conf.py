"""gunicorn's configuration for the app under the stack: ``--config python:flowcore.gunicorn_conf``.

Everything comes from the FLOW_ settings, so the app is chosen and sized like the rest
of the stack: FLOW_APP (what gunicorn serves), FLOW_APP_PORT, FLOW_APP_WORKERS,
FLOW_APP_THREADS. gunicorn applies GUNICORN_CMD_ARGS after this file, so an option named
there wins over the value set here (``GUNICORN_CMD_ARGS="--workers 4"`` gives 4 workers);
`flow check` reports the options there that would break the stack (``--bind``).

The control socket lives in the run dir: gunicorn's default, ~/.gunicorn/gunicorn.ctl,
is one file for every gunicorn of the user, so a second stack took over the first one's.
"""

from __future__ import annotations

import sys
from typing import Any

from flowcore.runtime import LOG_FORMAT
from flowcore.settings import SettingsError, load_settings

try:
    _settings = load_settings()
except SettingsError as exc:
    # gunicorn would print a traceback of this module; one line, then the exit status
    # supervisord shows.
    print(f"app: bad configuration: {exc}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None

wsgi_app = _settings.app
bind = [f"127.0.0.1:{_settings.app_port}"]
worker_class = "gthread"
workers = _settings.app_workers
threads = _settings.app_threads
control_socket = str(_settings.path(_settings.run_dir) / "gunicorn.ctl")
loglevel = _settings.log_level.lower()
proc_name = "flow-app"
# Every request reaches gunicorn from nginx, so its peer is always 127.0.0.1: log the
# client's address nginx puts in X-Real-IP (nginx sets it, a client cannot).
access_log_format = '%({x-real-ip}i)s "%(r)s" %(s)s %(b)s %(M)sms "%(a)s"'

# One line format for gunicorn, its access log and the app's own loggers; supervisord
# sends stdout and stderr to the app's log file.
logconfig_dict: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "root": {"level": _settings.log_level, "handlers": ["console"]},
    "loggers": {
        "gunicorn.error": {"level": _settings.log_level, "handlers": ["console"],
                           "propagate": False, "qualname": "gunicorn.error"},
        "gunicorn.access": {"level": "INFO", "handlers": ["console"],
                            "propagate": False, "qualname": "gunicorn.access"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "flow",
                    "stream": "ext://sys.stderr"},
        # gunicorn's defaults name this handler; keep it, in Flow's format.
        "error_console": {"class": "logging.StreamHandler", "formatter": "flow",
                          "stream": "ext://sys.stderr"},
    },
    "formatters": {"flow": {"format": LOG_FORMAT}},
}


def post_worker_init(worker: Any) -> None:
    """In each worker, once the app is loaded: the workers' counters are shared from now on
    (flowcore.health.SharedCounters), so the app's /metrics sums every worker whichever one
    a scrape reaches. Nothing to do for an app that keeps none."""
    from flowcore.health import start_shared

    start_shared()
