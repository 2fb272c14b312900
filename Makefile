# Two commands for a fresh machine (see README):
#   make serve   install everything, train/export missing models, serve on :3000
#   make test    install everything, run the test suite
# and `make bench`: the side-by-side benchmark that writes BENCHMARKS.md.
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin

.PHONY: serve test bench bench-tools ray-tools install lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train,dev,bench]'
	touch $@

install: $(BIN)/.installed

serve: install
	$(BIN)/dlserve serve

# wrk, the HTTP load generator of `dlserve bench` (and of its test), from Debian's packages.
bench-tools:
	@command -v wrk >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo -n ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq wrk >/dev/null; } || \
	  echo "warning: could not install wrk; the benchmark test will be skipped"

# Ray Data, for `dlserve score --engine ray` (the `ray` extra) and its test.
ray-tools: install
	@$(BIN)/python -c 'import ray.data' 2>/dev/null || \
	  $(BIN)/python -m pip install --quiet -e '.[ray]' || \
	  echo "warning: could not install Ray; the Ray engine's test will be skipped"

test: install bench-tools ray-tools
	$(BIN)/python -m pytest

bench: install bench-tools ray-tools
	$(BIN)/dlserve bench

lint: install
	$(BIN)/ruff check dlserve readers training export evaluation service cli bench scoring tests

clean:
	rm -rf $(VENV) artifacts
