"""Process glue shared by every Flow process: settings at start, logging, signals."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, Coroutine

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


def spawn(coro: Coroutine[Any, Any, None], tasks: "set[asyncio.Task[None]]", log: logging.Logger,
          what: str) -> None:
    """Run ``coro`` as a task kept in ``tasks`` until it ends; a failure is our bug: logged
    with its traceback as ``what`` failed."""
    task = asyncio.ensure_future(coro)
    tasks.add(task)

    def done(task: "asyncio.Task[None]") -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", what, exc_info=task.exception())

    task.add_done_callback(done)
