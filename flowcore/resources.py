"""Files Flow ships beside its code: the supervisord and nginx templates, the browser client.

In a checkout they are the top-level files users know (``supervisord.conf``,
``nginx.conf``, ``static/js/websocket.js``); an installed package carries the same
files in ``flowcore/data/`` (pyproject.toml copies them there when it builds the wheel).
"""

from __future__ import annotations

from pathlib import Path

from .settings import PROJECT_ROOT, running_from_checkout

# name -> path inside a checkout
_CHECKOUT_PATHS = {
    "supervisord.conf": "supervisord.conf",
    "nginx.conf": "nginx.conf",
    "websocket.js": "static/js/websocket.js",
}


def data_file(name: str) -> Path:
    """The path of one shipped file (a key of ``_CHECKOUT_PATHS``)."""
    relative = _CHECKOUT_PATHS[name]
    if running_from_checkout():
        return PROJECT_ROOT / relative
    return Path(__file__).resolve().parent / "data" / name
