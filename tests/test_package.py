"""The package as users get it: a wheel installed into a fresh virtualenv outside the repo.

The wheel is built from this checkout (`pip wheel --no-deps`), installed with its
`server` and `demo` extras and Django from the package index, and used from directories
that hold no file of the checkout: `import flow`, the type markers, the dependency list,
and the README's Flask app and Django project (read from README.md, so the documented
code is the tested code) under `flow run`, with a real browser receiving a push from the
app through the stack.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import venv
import zipfile
from pathlib import Path
from typing import Iterator

import pytest

from conftest import http_get, pid_alive
from support import ROOT, base_env, wait_until
from flowcore.nginx import find_nginx

INSTALL_TIMEOUT = 600
START_TIMEOUT = 60.0
CHROMIUM = Path("/usr/bin/chromium")
WAIT_MS = 30_000
# The launch options of tests/test_browser.py.
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                "--disable-features=LocalNetworkAccessChecks"]

# ```python blocks of README.md whose first line is "# file: PATH".
_SNIPPET = re.compile(r"```python\n# file: (\S+)\n(.*?)```", re.S)


def readme_files(prefix: str) -> dict[str, str]:
    """{path: source} of the README's code blocks for files under ``prefix``."""
    files = {path: "# file: " + path + "\n" + body
             for path, body in _SNIPPET.findall((ROOT / "README.md").read_text())
             if path.startswith(prefix)}
    assert files, f"README.md has no code block for {prefix}"
    return files


class Venv:
    def __init__(self, path: Path, wheel: Path) -> None:
        self.path = path
        self.wheel = wheel
        self.python = path / "bin" / "python"
        self.flow = path / "bin" / "flow"

    def run(self, *args: str, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.python), *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed() -> Iterator[Venv]:
    """flow_push-*.whl[server,demo] and django in a new virtualenv, outside the repo.

    Readable by all, as site-packages is: nginx's workers (an unprivileged user when the
    master runs as root) serve /flow/websocket.js from the installed package, and pytest's
    own tmp dirs are private to their owner."""
    base = Path(tempfile.mkdtemp(prefix="flow-package-"))
    base.chmod(0o755)
    assert ROOT not in base.parents
    try:
        yield _install(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _install(base: Path) -> Venv:
    dist = base / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
                   check=True, timeout=INSTALL_TIMEOUT, cwd=base)
    (wheel,) = dist.glob("flow_push-*.whl")
    venv.EnvBuilder(with_pip=True).create(base / "venv")
    env = Venv(base / "venv", wheel)
    subprocess.run([str(env.python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    f"{wheel}[server,demo]", "django"],
                   check=True, timeout=INSTALL_TIMEOUT, cwd=base)
    return env


def test_import_flow_from_a_directory_without_the_checkout(installed: Venv, tmp_path: Path) -> None:
    result = installed.run("-c", (
        "import flow, flowcore, flowcore.resources as r\n"
        "print(flow.__file__); print(flowcore.__file__)\n"
        "for name in ('supervisord.conf', 'nginx.conf', 'websocket.js'): print(r.data_file(name))\n"
        "print(callable(flow.push), callable(flow.issue_token), callable(flow.flush))"),
        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    site = installed.path / "lib"
    for line in lines[:5]:
        path = Path(line)
        assert site in path.parents and path.is_file(), line
    assert lines[0].endswith("flow/__init__.py")
    assert lines[5] == "True True True"
    assert installed.flow.is_file()


def test_base_install_is_the_publisher_only(installed: Venv) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        lines = wheel.read(metadata).decode().splitlines()
        names = set(wheel.namelist())
    requires = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]
    base = {re.split(r"[ <>=;\[]", r)[0].lower() for r in requires if "extra ==" not in r}
    server = {re.split(r"[ <>=;\[]", r)[0].lower() for r in requires if "extra == 'server'" in r}
    assert base == {"pyzmq", "pyjwt", "orjson"}
    assert {"tornado", "supervisor", "gunicorn", "cryptography"} <= server
    assert "flask" not in base | server
    assert "Name: flow-push" in lines and "Version: 0.2.0" in lines
    assert {"flow/__init__.py", "flow/py.typed", "flowcore/py.typed"} <= names


def test_mypy_sees_the_type_markers(installed: Venv, tmp_path: Path) -> None:
    (tmp_path / "uses_flow.py").write_text(
        "import flow\nfrom flowcore.settings import load_settings\n\n"
        "flow.push(1, 'X')\n"
        "port: str = load_settings().http_port\n")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--python-executable", str(installed.python),
         "--config-file", os.devnull, "uses_flow.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert "import-untyped" not in output and "py.typed" not in output, output
    # (push is overloaded on confirm=: its receipt's type follows the keyword.)
    assert 'No overload variant of "push" matches argument types "int", "str"' in output, output
    assert 'expression has type "int", variable has type "str"' in output, output


# --- the README's apps under `flow run` --------------------------------------------------


class ProjectStack:
    """`flow run` of the installed package in a project directory (no checkout file)."""

    def __init__(self, installed: Venv, project: Path, tmp_path: Path, app: str) -> None:
        self.installed = installed
        self.project = project
        env = base_env(tmp_path, FLOW_APP=app, FLOW_NGINX_WORKERS="1")
        # As for a user: the project directory is the root, and `flow run` generates
        # the secrets there.
        for name in ("FLOW_ROOT", "FLOW_SECRET", "FLOW_SECRET_FILE", "FLOW_APP_SECRET",
                     "FLOW_APP_SECRET_FILE"):
            env.pop(name, None)
        env["PATH"] = f"{installed.path / 'bin'}:{env.get('PATH', os.defpath)}"
        self.env = env
        self.base_url = f"http://127.0.0.1:{env['FLOW_HTTP_PORT']}"
        self.out = tmp_path / "flow-run.out"
        self.popen: subprocess.Popen[bytes] | None = None
        self.pids: set[int] = set()

    def flow(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.installed.flow), *args], cwd=self.project, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def running(self) -> bool:
        assert self.popen is not None
        if self.popen.poll() is not None:
            raise AssertionError(f"flow run exited {self.popen.returncode}:\n{self.out.read_text()}")
        lines = self.flow("status").stdout.splitlines()
        for line in lines:
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "RUNNING":
                self.pids.add(int(parts[3].rstrip(",")))
        return len(lines) == 5 and all(" RUNNING " in line for line in lines)

    def start(self) -> "ProjectStack":
        with open(self.out, "wb") as out:
            self.popen = subprocess.Popen([str(self.installed.flow), "run"], cwd=self.project,
                                          env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        try:
            wait_until(self.running, START_TIMEOUT, 0.2, "every program RUNNING")
            wait_until(lambda: self._index() == 200, START_TIMEOUT, 0.1, f"GET {self.base_url}/")
        except BaseException:
            self.stop()
            raise
        return self

    def _index(self) -> int:
        try:
            return http_get(self.base_url + "/", timeout=2)[0]
        except OSError:
            return 0

    def logs(self) -> str:
        chunks = [self.out.read_text(errors="replace")]
        for path in sorted(Path(self.env["FLOW_LOG_DIR"]).glob("*.log")):
            chunks.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-20:]))
        return "\n".join(chunks)

    def stop(self) -> None:
        """`flow stop`; then flow run (supervisord) must exit 0 and leave nothing behind."""
        assert self.popen is not None
        try:
            if self.popen.poll() is None:
                stopped = self.flow("stop")
                assert stopped.returncode == 0, stopped.stderr
                assert self.popen.wait(30) == 0, self.logs()
        finally:
            if self.popen.poll() is None:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(30)
        wait_until(lambda: not [p for p in self.pids if pid_alive(p)], 15, 0.05, "stack processes to exit")


@pytest.fixture
def browser() -> Iterator[object]:
    playwright_sync = pytest.importorskip(
        "playwright.sync_api", reason="optional dependency missing: playwright (pip)")
    if not CHROMIUM.exists():
        pytest.skip("optional dependency missing: chromium (Debian: apt-get install chromium)")
    with playwright_sync.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        yield chromium
        chromium.close()


def write_project(directory: Path, files: dict[str, str]) -> None:
    for path, source in files.items():
        target = directory / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source)
        if path.startswith("mysite/"):
            (directory / "mysite" / "__init__.py").touch()


def ship_order_in_the_browser(browser: object, stack: ProjectStack) -> None:
    from playwright.sync_api import expect

    page = browser.new_page()  # type: ignore[attr-defined]
    page.goto(stack.base_url + "/")
    page.fill("#username", "alice")
    page.click("button[type=submit]")
    expect(page.locator("#user")).to_have_text("alice", timeout=WAIT_MS)
    expect(page.locator("#connected")).to_have_text("Online", timeout=WAIT_MS)
    expect(page.locator("#authenticated")).to_have_text("Yes", timeout=WAIT_MS)
    page.click("#ship")
    expect(page.locator("#messages li")).to_have_text(['ORDER SHIPPED: {"order":7}'], timeout=WAIT_MS)
    page.close()


@pytest.mark.stack
@pytest.mark.browser
@pytest.mark.parametrize("kind", ["flask", "django"])
def test_readme_app_under_flow_run_pushes_to_a_browser(installed: Venv, browser: object,
                                                       tmp_path: Path, kind: str) -> None:
    if find_nginx() is None:
        pytest.skip("optional dependency missing: nginx (Debian: apt-get install nginx)")
    project = tmp_path / "project"
    project.mkdir()
    if kind == "flask":
        write_project(project, readme_files("shop.py"))
        app = "shop:app"
    else:
        write_project(project, readme_files("mysite/"))
        app = "mysite.wsgi:application"
    stack = ProjectStack(installed, project, tmp_path, app)
    stack.env["SHOP_SECRET_KEY"] = stack.env["DJANGO_SECRET_KEY"] = "k" * 50
    assert not (project / "flow.py").exists() and not (project / "flowcore").exists()
    stack.start()
    try:
        ship_order_in_the_browser(browser, stack)
        # `flow run` generated the missing secrets in the project, private to the user.
        for name in (".flow_secret", ".flow_app_secret"):
            assert (project / name).stat().st_mode & 0o077 == 0
        assert Path(stack.env["FLOW_RUN_DIR"], "gunicorn.ctl").exists()
        app_log = Path(stack.env["FLOW_LOG_DIR"], "app.log").read_text()
        assert "POST /orders/7/ship" in app_log, stack.logs()
    except BaseException:
        sys.stderr.write(stack.logs())
        raise
    finally:
        stack.stop()
    assert not Path(stack.env["FLOW_RUN_DIR"], "supervisord.pid").exists()
