"""Stack glue: the environment supervisord needs, and nginx run from a template.

    python -m flowcore.nginx               render nginx.conf into the run dir, exec nginx
                                           in the foreground (supervisord runs this)
    python -m flowcore.nginx --render      render only; print the rendered file's path
    python -m flowcore.nginx --test        render, then exec `nginx -t` on the result
    python -m flowcore.nginx --print-env   print `export FLOW_...=...` lines (shell-quoted)
                                           of the resolved values supervisord.conf and
                                           nginx.conf use; the Makefile evals them

Besides the FLOW_ settings (flowcore.settings) this reads a few stack-only variables:
FLOW_ROOT (the project, default: this checkout), FLOW_RUN_DIR (supervisord's socket,
pid and log, the rendered nginx.conf and nginx's pid and temp dirs; default ROOT/run),
FLOW_PYTHON (the interpreter supervisord starts the Python processes with; default the
current one) and FLOW_NGINX_WORKERS (nginx worker_processes; default auto).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Mapping

from .settings import PROJECT_ROOT, Settings, SettingsError, load_settings

PLACEHOLDER = re.compile(r"\$\{(FLOW_[A-Z0-9_]+)\}")
# Where Debian puts nginx; /usr/sbin is not on an ordinary user's PATH.
EXTRA_BIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def find_nginx(environ: Mapping[str, str] | None = None) -> str | None:
    """The nginx executable, or None when nginx is not installed."""
    environ = os.environ if environ is None else environ
    path = os.pathsep.join([environ.get("PATH", os.defpath), *EXTRA_BIN_DIRS])
    return shutil.which("nginx", path=path)


def _absolute(path: str, root: Path) -> str:
    p = Path(path)
    return str(p if p.is_absolute() else (root / p))


def stack_env(settings: Settings, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every variable supervisord.conf and nginx.conf expand, resolved and absolute."""
    environ = os.environ if environ is None else environ
    root = Path(environ.get("FLOW_ROOT") or PROJECT_ROOT).resolve()
    run_dir = _absolute(environ.get("FLOW_RUN_DIR") or str(root / "run"), root)
    workers = (environ.get("FLOW_NGINX_WORKERS") or "auto").strip()
    if workers != "auto" and not (workers.isdigit() and int(workers) > 0):
        raise SettingsError(f"FLOW_NGINX_WORKERS={workers!r}: must be 'auto' or a positive integer")
    return {
        "FLOW_ROOT": str(root),
        "FLOW_RUN_DIR": run_dir,
        "FLOW_PYTHON": environ.get("FLOW_PYTHON") or sys.executable,
        "FLOW_NGINX_WORKERS": workers,
        "FLOW_HTTP_PORT": str(settings.http_port),
        "FLOW_WS_PORT": str(settings.ws_port),
        "FLOW_APP_PORT": str(settings.app_port),
        "FLOW_WS_PROCESSES": str(settings.ws_processes),
        "FLOW_LOG_DIR": _absolute(settings.log_dir, root),
        # nginx must not cut an idle socket between two heartbeats.
        "FLOW_WS_READ_TIMEOUT": str(max(75, int(settings.heartbeat * 2) + 1)),
    }


def render(env: Mapping[str, str]) -> Path:
    """Fill the nginx.conf template; write it to the run dir; return the rendered path."""
    template = Path(env["FLOW_ROOT"]) / "nginx.conf"
    text = template.read_text()

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in env:
            raise SettingsError(f"{template}: unknown placeholder ${{{name}}}")
        return env[name]

    rendered = PLACEHOLDER.sub(substitute, text)
    run_dir = Path(env["FLOW_RUN_DIR"])
    run_dir.mkdir(parents=True, exist_ok=True)
    Path(env["FLOW_LOG_DIR"]).mkdir(parents=True, exist_ok=True)
    target = run_dir / "nginx.conf"
    tmp = target.with_suffix(".conf.tmp")
    tmp.write_text(
        f"# Rendered from {template} by flowcore.nginx; edit the template, not this file.\n"
        + rendered
    )
    tmp.replace(target)
    return target


def nginx_args(nginx: str, env: Mapping[str, str], conf: Path, test: bool = False) -> list[str]:
    # -e: the log nginx uses before it has read the config (its default may not be writable).
    args = [nginx, "-e", str(Path(env["FLOW_LOG_DIR"]) / "nginx-error.log"),
            "-p", env["FLOW_RUN_DIR"], "-c", str(conf)]
    return args + (["-t"] if test else ["-g", "daemon off;"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    modes = {"--render", "--test", "--print-env"}
    if len(argv) > 1 or (argv and argv[0] not in modes):
        print("usage: python -m flowcore.nginx [--render | --test | --print-env]", file=sys.stderr)
        return 2
    mode = argv[0] if argv else "--run"
    try:
        env = stack_env(load_settings())
    except SettingsError as exc:
        print(f"flow: bad configuration: {exc}", file=sys.stderr)
        return 2

    if mode == "--print-env":
        for name, value in env.items():
            print(f"export {name}={shlex.quote(value)}")
        return 0

    try:
        conf = render(env)
    except (OSError, SettingsError) as exc:
        print(f"flow: cannot render nginx.conf: {exc}", file=sys.stderr)
        return 2
    if mode == "--render":
        print(conf)
        return 0

    nginx = find_nginx()
    if nginx is None:
        print("flow: nginx is not installed (Debian: apt-get install nginx)", file=sys.stderr)
        return 2
    args = nginx_args(nginx, env, conf, test=mode == "--test")
    print(f"flow: exec {shlex.join(args)}", file=sys.stderr, flush=True)
    # Replace this process, so supervisord signals nginx's master directly.
    os.execv(nginx, args)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
