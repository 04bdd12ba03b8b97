# The README names these targets. Each one creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-sqlite lint typecheck check databases clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The demo gets an environment of its own with only what an app needs (no test tools, no SQLModel).
.venv-demo/bin/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-demo
	.venv-demo/bin/python -m pip install --quiet --upgrade pip
	.venv-demo/bin/python -m pip install --quiet -e . fastapi uvicorn aiosqlite
	touch $@

## demo: run the demo app on SQLite at http://127.0.0.1:8000 (no database server needed)
demo: .venv-demo/bin/.installed
	.venv-demo/bin/python examples/demo.py

## test: the whole suite on SQLite, PostgreSQL and MariaDB (starts them and creates databases)
test: $(BIN)/.installed databases
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## test-sqlite: the suite on SQLite only (no database server needed)
test-sqlite: $(BIN)/.installed
	TEST_DATABASES=sqlite $(BIN)/python -m pytest $(PYTEST_ARGS)

## databases: start PostgreSQL and MariaDB if they are down; create the test databases
databases:
	scripts/databases.sh

lint: $(BIN)/.installed
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .

typecheck: $(BIN)/.installed
	$(BIN)/python -m mypy --strict src

## check: lint, types, then the whole suite
check: lint typecheck test

clean:
	rm -rf $(VENV) .venv-* .mypy_cache .ruff_cache .pytest_cache
