# Two commands for a fresh machine (see README):
#   make serve   install everything, train/export missing models, serve on :3000
#   make test    install everything, run the test suite
# and `make bench`: the side-by-side benchmark that writes BENCHMARKS.md.
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin

.PHONY: serve test bench bench-tools perf-analyzer browser-tools monitoring-tools \
	container-tools container-test ray-tools install lock allocator lint format grpc-code clean

# The packages are pinned in requirements.lock (`make lock` writes it from pyproject.toml)
# and installed by uv: 75 s on the 2-core machine, where pip took 3 min 47 s. uv is handed
# pip's configuration (mirrors, local wheels: tools/with_pip_config.py); pip installs
# what uv cannot.
$(BIN)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip "$$(grep '^uv==' requirements.lock)"
	$(BIN)/python tools/with_pip_config.py $(BIN)/uv pip install --quiet \
	  --python $(BIN)/python -r requirements.lock -e '.[train,dev,bench]' || \
	  $(BIN)/python -m pip install --quiet -e '.[train,dev,bench]'
	touch $@

install: $(BIN)/.installed

# requirements.lock: every package of `make install`, pinned, for Python 3.11 on Linux.
lock:
	$(BIN)/python tools/with_pip_config.py $(BIN)/uv pip compile --quiet pyproject.toml \
	  --extra train --extra dev --extra bench --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 -o requirements.lock

serve: install allocator
	$(BIN)/dlserve serve

# jemalloc, the allocator the server runs on where it is installed (dlserve/allocator.py):
# a worker's memory comes back after a burst. Without it the server runs on glibc's malloc.
allocator: install
	@$(BIN)/python -c 'import sys; from dlserve.allocator import find_jemalloc; \
	  sys.exit(find_jemalloc() is None)' 2>/dev/null || { \
	  $(APT_INSTALL) libjemalloc2 >/dev/null; } || \
	  echo "warning: could not install libjemalloc2; the server will run on glibc's malloc"

# wrk, the HTTP load generator of `dlserve bench` (and of its test), from Debian's packages.
bench-tools:
	@command -v wrk >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo -n ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq wrk >/dev/null; } || \
	  echo "warning: could not install wrk; the benchmark test will be skipped"

# Triton's perf_analyzer, for the bench's perf_analyzer section, into .tools/.
perf-analyzer:
	bench/install-perf-analyzer.sh

# Debian packages the deployment tests use: Prometheus and promtool (tests/test_monitoring.py);
# a Docker engine, debootstrap (the offline base image) and docker-compose (its validation of
# deploy/compose). A test whose tool is missing is skipped, saying so.
APT_INSTALL = SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo -n ); \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq
monitoring-tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  $(APT_INSTALL) prometheus >/dev/null; } || \
	  echo "warning: could not install prometheus; the monitoring tests will be skipped"

container-tools:
	@command -v dockerd >/dev/null && command -v debootstrap >/dev/null && \
	  command -v docker-compose >/dev/null || { \
	  $(APT_INSTALL) docker.io debootstrap docker-compose >/dev/null; } || \
	  echo "warning: could not install docker.io; the container tests will be skipped"

# `make test` runs the container test when an earlier build left its caches (the base image
# and the wheels: then about 2 minutes); this builds the image whatever the caches hold
# (a first build: about 5 minutes more), runs it, and leaves the caches for the next time.
container-test: install container-tools
	DLSERVE_CONTAINER_TEST=1 $(BIN)/python -m pytest tests/test_container.py

# Chromium, for the browser tests of the docs and demo pages (tests/test_pages.py), from
# Debian's packages: Playwright drives the system's browser and never downloads its own.
browser-tools:
	@command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo -n ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; } || \
	  echo "warning: could not install chromium; the browser tests will be skipped"

# Ray Data, for `dlserve score --engine ray` (the `ray` extra) and its test.
ray-tools: install
	@$(BIN)/python -c 'import ray.data' 2>/dev/null || \
	  $(BIN)/python -m pip install --quiet -e '.[ray]' || \
	  echo "warning: could not install Ray; the Ray engine's test will be skipped"

# Two test processes (pytest-xdist): most tests wait on servers more than they compute;
# tests marked `exclusive` still run alone (tests/conftest.py). A test file stays in one
# process (--dist loadfile), with the servers its fixtures start.
TEST_PROCESSES ?= 2
LINTED = dlserve readers training export evaluation service cli bench scoring tests tools
test: install allocator bench-tools browser-tools monitoring-tools container-tools ray-tools
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy
	$(BIN)/lint-imports --no-logo --no-cache
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadfile --durations=25

bench: install bench-tools perf-analyzer
	$(BIN)/dlserve bench

lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy
	$(BIN)/lint-imports --no-logo --no-cache

# What `ruff format --check` in make test asks for.
format: install
	$(BIN)/ruff format $(LINTED)

# The gRPC messages the service speaks (service/grpc_inference_pb2.py, with a .pyi for mypy),
# generated from proto/grpc_inference.proto and checked in: run this after editing the proto.
# (The virtual path `service/` makes the module service.grpc_inference_pb2.)
grpc-code: install
	$(BIN)/python -m grpc_tools.protoc -Iservice=proto --python_out=. --pyi_out=. \
	  service/grpc_inference.proto

clean:
	rm -rf $(VENV) artifacts .tools
