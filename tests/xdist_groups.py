"""Which tests share a worker under pytest-xdist (`make test`: -n N --dist loadgroup).

Tests are spread one by one over the workers, except:

- the tests of a module that use one of its class-, module- or package-scoped fixtures
  (a stack, a browser, an installed package): one worker runs them all, so the fixture
  starts once per run, not once per worker;
- tests marked ``@pytest.mark.xdist_group("name")``: one worker runs every test of that
  group, one after the other (for tests that must not overlap each other);
- the tests named in ONE_AT_A_TIME (group "one-at-a-time"): each is a load of its own
  (hundreds of clients, a benchmark) or measures time spreads, so two of them at once
  would starve each other on a 2-core machine. Listed here rather than marked in the
  test files, so the list is in one place.

xdist's own loadgroup reads the xdist_group mark by appending "@name" to each node id,
which pytest 9.2 no longer lets it do (pytest-xdist issue 1386: the groups are silently
ignored). So the workers write {node id: group} to a file the controller named in
``workerinput``, and the controller's scheduler (LoadGroupScheduling, with the scope
taken from that file) reads it once every worker has collected. Node ids stay as
pytest prints them: a failure can be re-run by pasting its id.

The hooks are imported by tests/conftest.py; without xdist, or with -n 0, none of this runs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

_TESTS_DIR = Path(__file__).resolve().parent
_SHARED_SCOPES = ("class", "module", "package")
_WORKERINPUT_KEY = "flow_groups_dir"
_GROUPS_DIR = pytest.StashKey[Path]()
ONE_AT_A_TIME_GROUP = "one-at-a-time"
# Node-id prefixes: a module, or a test with all its parameters.
ONE_AT_A_TIME = (
    "tests/test_bench_smoke.py::",  # bench/run.py --quick: every workload, both engines
    "tests/test_reconnect_spread.py::",  # 2000 Node clients; asserts how reconnects spread
    "tests/test_routing.py::test_isolation_at_scale[",  # many users and pushes at once
    "tests/test_stall.py::",  # a frozen server under a stream; timing of the pool
)


def group_of(item: pytest.Item) -> str | None:
    """The group ``item`` runs in, or None: spread on its own."""
    names = sorted({str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                    for mark in item.iter_markers("xdist_group")})
    if names:
        return "_".join(names)
    if item.nodeid.startswith(ONE_AT_A_TIME):
        return ONE_AT_A_TIME_GROUP
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    for name in info.names_closure:
        definitions = info.name2fixturedefs.get(name)
        if not definitions:
            continue
        definition = definitions[-1]
        # Only the project's fixtures: pytest's and plugins' (tmp_path_factory) are cheap.
        source = Path(definition.func.__code__.co_filename).resolve()
        if definition.scope in _SHARED_SCOPES and _TESTS_DIR in source.parents:
            return item.nodeid.split("::", 1)[0]
    return None


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """Controller, once per worker before it starts: where the workers write the groups."""
    config = node.config
    if _GROUPS_DIR not in config.stash:
        config.stash[_GROUPS_DIR] = Path(tempfile.mkdtemp(prefix="flow-xdist-groups-"))
    node.workerinput[_WORKERINPUT_KEY] = str(config.stash[_GROUPS_DIR])


def pytest_unconfigure(config: pytest.Config) -> None:
    if _GROUPS_DIR in config.stash:
        shutil.rmtree(config.stash[_GROUPS_DIR], ignore_errors=True)


@pytest.hookimpl(trylast=True)  # after every other hook that marks or renames the items
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Worker: write {node id: group} for the controller (written before the worker reports
    its collection, so the controller finds it when it schedules)."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None or _WORKERINPUT_KEY not in workerinput:
        return
    groups = {item.nodeid: group for item in items if (group := group_of(item)) is not None}
    path = Path(workerinput[_WORKERINPUT_KEY]) / f"{workerinput['workerid']}.json"
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(groups))
    os.replace(partial, path)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Controller: --dist loadgroup with the groups the workers wrote."""
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class FileGroupScheduling(LoadGroupScheduling):
        _groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self._groups is None:
                # Every worker collected the same tests (xdist checks), so the files agree.
                self._groups = {}
                for path in sorted(config.stash[_GROUPS_DIR].glob("*.json")):
                    self._groups.update(json.loads(path.read_text()))
            group = self._groups.get(nodeid)
            return group if group is not None else str(super()._split_scope(nodeid))

    return FileGroupScheduling(config, log)
