# Flow: `make` runs the whole stack in the foreground (demo at http://localhost:5000,
# Ctrl-C stops everything); `make test` runs the test suite. `make help` lists the rest.
#
# Ports, pool size, log dir...: FLOW_ variables or a flow.env file beside this Makefile
# (see README.md). make sets none of them: the stack's targets are the `flow` command
# (python -m flowcore run | stop | status | config | secret), which resolves every value
# through flowcore.settings, flow.env included, exactly as an installed `flow` does.

SHELL := /bin/bash
.DEFAULT_GOAL := run

ROOT     := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
VENV     := $(ROOT)/.venv
PYTHON   := $(VENV)/bin/python
# The interpreter that creates the venv (Debian 12: python3 is 3.11).
BOOTSTRAP_PYTHON ?= python3

# The checkout is the project: flow.env and the secrets are read from here, and the demo
# app (FLOW_APP's default) is imported from here, whatever directory make was called from.
export FLOW_ROOT := $(ROOT)
FLOW := cd "$(ROOT)" && "$(PYTHON)" -m flowcore

STAMP_RUNTIME   := $(VENV)/.stamp-requirements
STAMP_TEST      := $(VENV)/.stamp-requirements-test

# Load the resolved stack environment into the recipe's shell (fails on a bad FLOW_ value).
LOAD_ENV = flow_env="$$("$(PYTHON)" -m flowcore.nginx --print-env)" && eval "$$flow_env"

# apt-get, once per call, quiet and non-interactive; only as root. $(1): Debian packages.
define apt_install
	@if [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then \
	  echo "flow: installing $(1) with apt-get"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && \
	  apt-get install -y -qq $(1) >/dev/null; \
	else \
	  echo "flow: missing Debian package(s): $(1)"; \
	  echo "      install them as root:  sudo apt-get install $(1)"; \
	  exit 1; \
	fi
endef

.PHONY: run stop status logs test clean distclean config check bench secret venv deps \
        deps-test nginx-check redis-check help

help:
	@echo "make            run the stack in the foreground (http://localhost:\$$FLOW_HTTP_PORT, default 5000)"
	@echo "make stop       stop a running stack (supervisorctl shutdown)"
	@echo "make status     show the supervised processes"
	@echo "make logs       tail every process log"
	@echo "make test       install test dependencies, run mypy and pytest"
	@echo "make config     print the resolved configuration (secrets masked)"
	@echo "make check      find what would stop the stack (ports in use, nginx, FLOW_APP...)"
	@echo "make bench      run bench/run.py"
	@echo "make secret     generate the secrets (.flow_secret, .flow_app_secret) if missing"
	@echo "make clean      remove run state, logs and caches (keeps .venv and the secret)"
	@echo "make distclean  clean, and remove .venv"

# --- the stack ---------------------------------------------------------------------------

# `flow run`: generates missing secrets, stops with one line per problem (a port in use,
# naming it and its setting; nginx missing; FLOW_APP not importable), then execs
# supervisord in the foreground.
run: deps
	@$(FLOW) run

stop: $(STAMP_RUNTIME)
	@$(FLOW) stop

status: $(STAMP_RUNTIME)
	@$(FLOW) status

logs: $(STAMP_RUNTIME)
	@$(LOAD_ENV) && mkdir -p "$$FLOW_LOG_DIR" && \
	  shopt -s nullglob && logs=("$$FLOW_LOG_DIR"/*.log) && \
	  if [ $${#logs[@]} -eq 0 ]; then echo "flow: no logs yet in $$FLOW_LOG_DIR"; exit 0; fi && \
	  exec tail -n 20 -F "$${logs[@]}"

config: $(STAMP_RUNTIME)
	@$(FLOW) config

check: $(STAMP_RUNTIME)
	@$(FLOW) check

bench: deps
	@if [ -f "$(ROOT)/bench/run.py" ]; then \
	  cd "$(ROOT)" && exec "$(PYTHON)" bench/run.py; \
	else echo "flow: bench/run.py does not exist yet"; exit 1; fi

# --- installation ------------------------------------------------------------------------

deps: $(STAMP_RUNTIME) nginx-check redis-check

venv: $(PYTHON)

$(PYTHON):
	@if ! "$(BOOTSTRAP_PYTHON)" -c 'import ensurepip, venv' 2>/dev/null; then \
	  $(MAKE) --no-print-directory _apt PACKAGES="python3-venv"; fi
	"$(BOOTSTRAP_PYTHON)" -m venv "$(VENV)"
	"$(PYTHON)" -m pip install -q --upgrade pip

# Reinstall only when a requirements file changed.
$(STAMP_RUNTIME): $(ROOT)/requirements.txt | $(PYTHON)
	"$(PYTHON)" -m pip install -q -r "$(ROOT)/requirements.txt"
	@touch "$@"

$(STAMP_TEST): $(ROOT)/requirements-test.txt $(ROOT)/requirements.txt | $(PYTHON)
	"$(PYTHON)" -m pip install -q -r "$(ROOT)/requirements-test.txt"
	@touch "$@"
	@touch "$(STAMP_RUNTIME)"

# nginx is on PATH for root; Debian keeps it in /usr/sbin, which users may lack on PATH.
nginx-check:
	@if ! PATH="$$PATH:/usr/sbin:/sbin" command -v nginx >/dev/null; then \
	  $(MAKE) --no-print-directory _apt PACKAGES="nginx"; fi

# redis-server only when the stack runs its own: FLOW_ENGINE=redis and no FLOW_REDIS_URL
# (flow.env included; stack_env says FLOW_REDIS_PROCESSES=1). Debian keeps it in /usr/bin.
redis-check: $(STAMP_RUNTIME)
	@$(LOAD_ENV) && \
	  if [ "$$FLOW_REDIS_PROCESSES" = 1 ] && \
	     ! PATH="$$PATH:/usr/sbin:/usr/bin" command -v redis-server >/dev/null; then \
	    $(MAKE) --no-print-directory _apt PACKAGES="redis-server"; fi

_apt:
	$(call apt_install,$(PACKAGES))

# The JWT secret and the app's session key, generated once into FLOW_SECRET_FILE and
# FLOW_APP_SECRET_FILE (default .flow_secret, .flow_app_secret: git-ignored) and reused;
# FLOW_SECRET / FLOW_APP_SECRET in the environment win. `flow run` does this too.
secret: $(STAMP_RUNTIME)
	@$(FLOW) secret

# --- tests -------------------------------------------------------------------------------

# Playwright cannot download browsers here: the browser tests drive Debian's chromium.
# The Redis engine's tests start real redis-servers, whatever FLOW_ENGINE says.
deps-test: $(STAMP_TEST)
	@missing=""; \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v nginx >/dev/null || missing="$$missing nginx"; \
	  PATH="$$PATH:/usr/sbin:/usr/bin" command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	  command -v chromium >/dev/null || missing="$$missing chromium"; \
	  if [ -n "$$missing" ]; then $(MAKE) --no-print-directory _apt PACKAGES="$${missing# }"; fi

# Types first (mypy.ini), then pytest; pytest's own exit status is the result (5, "no
# tests collected", fails too). pytest-xdist runs the tests in PYTEST_JOBS processes (most
# tests wait on real servers, so 3 beat 2 on 2 cores; 4 is no faster and loads the
# machine more); --dist loadgroup with tests/xdist_groups.py keeps a module's shared
# fixture (a stack, an installed package) on one worker and runs the heaviest tests one at
# a time. `make test PYTEST_JOBS=0` runs everything in one process.
PYTEST_JOBS ?= 3
test: deps-test
	cd "$(ROOT)" && "$(PYTHON)" -m mypy
	cd "$(ROOT)" && "$(PYTHON)" -m pytest -n $(PYTEST_JOBS) --dist loadgroup $(PYTEST_ARGS)

# --- cleaning ----------------------------------------------------------------------------

clean: $(STAMP_RUNTIME)
	@$(LOAD_ENV) && \
	  if [ -S "$$FLOW_RUN_DIR/supervisor.sock" ] && $(FLOW) status >/dev/null 2>&1; then \
	    echo "flow: the stack is running; make stop first"; exit 1; fi && \
	  rm -rf "$$FLOW_RUN_DIR" "$(ROOT)/.pytest_cache"
	find "$(ROOT)/log" -mindepth 1 ! -name .gitkeep -delete 2>/dev/null || true
	find "$(ROOT)" -path "$(VENV)" -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf "$(VENV)"
