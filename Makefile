# Two commands for a fresh machine (see README):
#   make serve   install everything, train/export missing models, serve on :3000
#   make test    install everything, run the test suite
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin

.PHONY: serve test install lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train,dev]'
	touch $@

install: $(BIN)/.installed

serve: install
	$(BIN)/dlserve serve

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check dlserve training export service tests

clean:
	rm -rf $(VENV) artifacts
