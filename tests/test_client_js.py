"""The browser client's own tests (tests/js/*.test.js), run by Node's test runner."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from support import ROOT

NODE = shutil.which("node")
JS_TESTS = sorted((ROOT / "tests" / "js").glob("*.test.js"))


@pytest.mark.skipif(NODE is None, reason="optional dependency missing: node (Node.js >= 20)")
def test_browser_client_node_tests() -> None:
    assert JS_TESTS, "no tests/js/*.test.js found"
    assert NODE is not None
    result = subprocess.run(
        [NODE, "--test", "--test-reporter=tap", *(str(path.relative_to(ROOT)) for path in JS_TESTS)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, (
        f"node --test exited {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )
    # The runner's summary, so a run that found no test is not a pass.
    assert "# fail 0" in result.stdout and "# pass 0" not in result.stdout, result.stdout
