# Tidemark: `make lab` starts a two-site lab, `make test` runs the tests.
# Both set up everything first (Debian packages, .venv, the vcsim build); `make setup` only sets up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUILD := .build
DEB_PACKAGES := golang-go golang-github-vmware-govmomi-dev rsync
LAB_DIR ?= .lab
PYTEST_ARGS ?=

.PHONY: setup lab lab-down test test-slow test-all bench clean

setup: $(BUILD)/debs.stamp $(VENV)/.installed $(BUILD)/vcsim

# Debian packages: installed when missing (as root), otherwise the exact command is printed.
$(BUILD)/debs.stamp:
	@mkdir -p $(BUILD)
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	$(PYTHON) -c 'import ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "Tidemark needs Debian packages:$$missing"; \
	    echo "run: sudo apt-get install -y$$missing"; exit 1; \
	  fi; \
	fi
	@touch $@

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

$(BUILD)/vcsim: simulator/vcsim/main.go $(VENV)/.installed $(BUILD)/debs.stamp
	$(PY) -c 'from pathlib import Path; from simulator.vcsim_process import build_vcsim; print("vcsim:", build_vcsim(Path("$(BUILD)")))'
	@touch $@

lab: setup
	$(VENV)/bin/tidemark lab up --dir $(LAB_DIR)

lab-down:
	@test -x $(VENV)/bin/tidemark && $(VENV)/bin/tidemark lab down --dir $(LAB_DIR) || true

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The slower tier: soak and large-disk tests.
test-slow: setup
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -q -m '' $(PYTEST_ARGS)

# Quick runs of every benchmark; run a script without --quick for the full figures.
bench: setup
	$(PY) bench/simulator.py --quick
	$(PY) bench/kernels.py --quick
	$(PY) bench/journal.py --quick
	$(PY) bench/replication.py --quick
	$(PY) bench/rto.py --quick

clean: lab-down
	rm -rf $(BUILD) $(VENV) $(LAB_DIR)
