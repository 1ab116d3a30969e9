# Two commands from a fresh clone (Debian, Python 3.11, root): `make demo` and `make test`.
# Everything they need is installed from here: apt packages, a virtualenv, the native build.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

APT_PACKAGES := build-essential cmake git pkg-config \
	iproute2 nftables openssh-server openssh-client \
	adb bubblewrap libimobiledevice-utils usbmuxd \
	pocl-opencl-icd ocl-icd-libopencl1 clinfo mesa-vulkan-drivers libvulkan1 vulkan-tools

.PHONY: all setup apt venv native demo test lint typecheck bench clean

all: test

# -- setup ------------------------------------------------------------------------------
.stamp-apt:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo ">> apt-get install$$missing" >&2; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  fi; \
	else echo ">> not root or no apt-get: skipping system packages" >&2; fi
	@touch $@

apt: .stamp-apt

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip

.stamp-venv: pyproject.toml $(VENV)/bin/python
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12"
	$(PIP) install -q --no-build-isolation -e ".[test]"
	@touch $@

venv: .stamp-venv

# Rebuild the native module when runtime/ changes.
.stamp-native: .stamp-venv $(shell find runtime -type f 2>/dev/null)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	@touch $@

native: .stamp-native

setup: apt venv native

# -- the two commands ---------------------------------------------------------------------
demo: setup
	$(PY) -m fleet.demo

test: setup
	$(VENV)/bin/ruff check fleet agents tests bench models migrations
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

# -- checks -------------------------------------------------------------------------------
lint: setup
	$(VENV)/bin/ruff check fleet agents tests bench models migrations

typecheck: setup
	$(VENV)/bin/mypy

bench: setup
	$(PY) -m bench

clean:
	rm -rf build .stamp-* .pytest_cache .mypy_cache .ruff_cache
