"""Process glue shared by every Flow process: settings at start, logging, signals."""

from __future__ import annotations

import logging
import sys

from .settings import Settings, SettingsError, load_settings


def start_process(name: str) -> Settings:
    """Load settings once and configure logging; a bad value exits with one clear line."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"{name}: bad configuration: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s",
        stream=sys.stderr,
    )
    return settings
