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
	pocl-opencl-icd ocl-icd-libopencl1 clinfo mesa-vulkan-drivers libvulkan1 vulkan-tools \
	postgresql redis-server \
	chromium chromium-driver \
	qemu-user-static debootstrap gcc-aarch64-linux-gnu g++-aarch64-linux-gnu

.PHONY: all setup apt venv native demo test lint typecheck bench bench-crypto bench-ssh \
	bench-lora bench-cli bench-package bench-dispatch bench-registry llm-venv clean \
	report-screenshot

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
	$(PIP) install -q --no-build-isolation -e ".[controller,test]"
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
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q --durations=25

# -- checks -------------------------------------------------------------------------------
lint: setup
	$(VENV)/bin/ruff check fleet agents tests bench models migrations

typecheck: setup
	$(VENV)/bin/mypy

# Benchmarks (not part of `make test`): each prints a table and writes bench/results/*.json.
LLM_VENV ?= build/llmvenv
LLM_PACKAGES := torch==2.13.0 transformers==4.57.6 tokenizers==0.22.2 peft==0.21.2 \
	llmexport==0.0.5 mnn==3.6.1 onnx==1.23.2 onnxslim==0.1.98 onnxruntime==1.31.1 \
	sentencepiece==0.2.3 yaspin==3.5.1 numpy==2.4.6

# The fixture tools for models/llm (torch, transformers, peft, llmexport), apart from .venv.
$(LLM_VENV)/bin/python:
	$(PYTHON) -m venv $(LLM_VENV)
	$(LLM_VENV)/bin/pip install -q $(LLM_PACKAGES)

llm-venv: $(LLM_VENV)/bin/python

bench-crypto: setup
	$(PY) bench/bench_crypto.py

bench-ssh: setup
	$(PY) bench/bench_deploy_ssh.py

bench-lora: setup llm-venv
	$(PY) bench/bench_lora.py --venv-python $(LLM_VENV)/bin/python

bench-cli: setup
	$(PY) bench/bench_cli.py

bench-package: setup
	$(PY) bench/bench_package_scale.py

bench-dispatch: setup
	$(PY) bench/bench_dispatch.py

bench-registry: setup
	$(PY) bench/bench_registry.py

bench: bench-crypto bench-ssh bench-lora bench-cli bench-package bench-dispatch bench-registry

# README's picture of `fleet report --html`: the report test's page, as headless Chromium drew it
report-screenshot: setup
	FLEET_REPORT_SCREENSHOT=docs/img/report.png $(PY) -m pytest -q tests/test_fleet_report.py \
	  -k html_report_renders

clean:
	rm -rf build .stamp-* .pytest_cache .mypy_cache .ruff_cache
