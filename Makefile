# Flow: `make` runs the whole stack in the foreground (demo at http://localhost:5000,
# Ctrl-C stops everything); `make test` runs the test suite. `make help` lists the rest.
#
# Ports, pool size, log dir...: FLOW_ variables or a flow.env file beside this Makefile
# (see README.md). Every recipe that needs them evaluates `python -m flowcore.nginx
# --print-env`, so make, supervisord, nginx and the processes resolve the same values.

SHELL := /bin/bash
.DEFAULT_GOAL := run

ROOT     := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
VENV     := $(ROOT)/.venv
PYTHON   := $(VENV)/bin/python
# The interpreter that creates the venv (Debian 12: python3 is 3.11).
BOOTSTRAP_PYTHON ?= python3

export FLOW_ROOT    := $(ROOT)
export FLOW_PYTHON  ?= $(PYTHON)
export FLOW_RUN_DIR ?= $(ROOT)/run
FLOW_SECRET_FILE    ?= $(ROOT)/.flow_secret
export FLOW_SECRET_FILE

SUPERVISOR_CONF := $(ROOT)/supervisord.conf
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

.PHONY: run stop status logs test clean distclean config bench secret venv deps \
        deps-test nginx-check help

help:
	@echo "make            run the stack in the foreground (http://localhost:\$$FLOW_HTTP_PORT, default 5000)"
	@echo "make stop       stop a running stack (supervisorctl shutdown)"
	@echo "make status     show the supervised processes"
	@echo "make logs       tail every process log"
	@echo "make test       install test dependencies, run mypy and pytest"
	@echo "make config     print the resolved configuration"
	@echo "make bench      run bench/run.py"
	@echo "make secret     generate the JWT secret (.flow_secret) if missing"
	@echo "make clean      remove run state, logs and caches (keeps .venv and the secret)"
	@echo "make distclean  clean, and remove .venv"

# --- the stack ---------------------------------------------------------------------------

run: deps secret
	@$(LOAD_ENV) && \
	  mkdir -p "$$FLOW_LOG_DIR" "$$FLOW_RUN_DIR" && \
	  if [ -S "$$FLOW_RUN_DIR/supervisor.sock" ] && \
	     "$(PYTHON)" -m supervisor.supervisorctl -c "$(SUPERVISOR_CONF)" pid >/dev/null 2>&1; then \
	    echo "flow: already running (make status / make stop)"; exit 1; \
	  fi && \
	  echo "flow: demo at http://localhost:$$FLOW_HTTP_PORT  ($$FLOW_WS_PROCESSES WebSocket servers; logs in $$FLOW_LOG_DIR; Ctrl-C stops)" && \
	  exec "$(PYTHON)" -m supervisor.supervisord -n -c "$(SUPERVISOR_CONF)"

stop:
	@$(LOAD_ENV) && \
	  if [ -S "$$FLOW_RUN_DIR/supervisor.sock" ]; then \
	    "$(PYTHON)" -m supervisor.supervisorctl -c "$(SUPERVISOR_CONF)" shutdown; \
	  else echo "flow: not running"; fi

status:
	@$(LOAD_ENV) && \
	  if [ -S "$$FLOW_RUN_DIR/supervisor.sock" ]; then \
	    "$(PYTHON)" -m supervisor.supervisorctl -c "$(SUPERVISOR_CONF)" status; \
	  else echo "flow: not running"; exit 3; fi

logs:
	@$(LOAD_ENV) && mkdir -p "$$FLOW_LOG_DIR" && \
	  shopt -s nullglob && logs=("$$FLOW_LOG_DIR"/*.log) && \
	  if [ $${#logs[@]} -eq 0 ]; then echo "flow: no logs yet in $$FLOW_LOG_DIR"; exit 0; fi && \
	  exec tail -n 20 -F "$${logs[@]}"

config: $(STAMP_RUNTIME) secret
	@"$(PYTHON)" -m flowcore config

bench: deps
	@if [ -f "$(ROOT)/bench/run.py" ]; then \
	  cd "$(ROOT)" && exec "$(PYTHON)" bench/run.py; \
	else echo "flow: bench/run.py does not exist yet"; exit 1; fi

# --- installation ------------------------------------------------------------------------

deps: $(STAMP_RUNTIME) nginx-check

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

_apt:
	$(call apt_install,$(PACKAGES))

# Generated once, reused forever (git-ignored). FLOW_SECRET in the environment wins.
secret: $(FLOW_SECRET_FILE)

$(FLOW_SECRET_FILE): | $(PYTHON)
	@umask 077 && "$(PYTHON)" -c 'import secrets; print(secrets.token_hex(32))' > "$@.tmp" && mv "$@.tmp" "$@"
	@echo "flow: generated the JWT secret in $@"

# --- tests -------------------------------------------------------------------------------

# Playwright cannot download browsers here: the browser tests drive Debian's chromium.
deps-test: $(STAMP_TEST)
	@missing=""; \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v nginx >/dev/null || missing="$$missing nginx"; \
	  command -v chromium >/dev/null || missing="$$missing chromium"; \
	  if [ -n "$$missing" ]; then $(MAKE) --no-print-directory _apt PACKAGES="$${missing# }"; fi

# Types first (mypy.ini), then pytest; pytest's own exit status is the result (5, "no
# tests collected", fails too).
test: deps-test
	cd "$(ROOT)" && "$(PYTHON)" -m mypy
	cd "$(ROOT)" && "$(PYTHON)" -m pytest $(PYTEST_ARGS)

# --- cleaning ----------------------------------------------------------------------------

clean:
	@if [ -S "$(FLOW_RUN_DIR)/supervisor.sock" ] && \
	   "$(PYTHON)" -m supervisor.supervisorctl -c "$(SUPERVISOR_CONF)" pid >/dev/null 2>&1; then \
	  echo "flow: the stack is running; make stop first"; exit 1; fi
	rm -rf "$(FLOW_RUN_DIR)" "$(ROOT)/.pytest_cache"
	find "$(ROOT)/log" -mindepth 1 ! -name .gitkeep -delete 2>/dev/null || true
	find "$(ROOT)" -path "$(VENV)" -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf "$(VENV)"
