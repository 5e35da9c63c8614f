"""`python -m flowcore config`: print the resolved settings (secrets masked)."""

from __future__ import annotations

import sys

from .settings import SettingsError, load_settings


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["config"]:
        print("usage: python -m flowcore config", file=sys.stderr)
        return 2
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"flow: bad configuration: {exc}", file=sys.stderr)
        return 2
    print(settings.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
