"""``python -m flowcore ...`` is the ``flow`` command (flowcore.cli).

supervisord starts the stack's processes this way (``python -m flowcore proxy``), so
they run from whichever interpreter has the package, checkout or installed.
"""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
