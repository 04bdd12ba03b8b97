# The README names these targets. Each one creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo demo-replicas test test-sqlite lint typecheck check databases compat-venv clean docs

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

## demo-replicas: the demo on a local PostgreSQL primary with two streaming replicas (made and
## started by scripts/replicas.sh); GET and HEAD requests read from the replicas
PG_DEMO := postgresql+asyncpg://postgres@127.0.0.1
demo-replicas: .venv-demo/bin/.installed
	scripts/replicas.sh
	.venv-demo/bin/python -m pip install --quiet asyncpg
	DEMO_DATABASE_URL=$(PG_DEMO):5433/test \
	DEMO_REPLICA_URLS=$(PG_DEMO):5434/test,$(PG_DEMO):5435/test \
		.venv-demo/bin/python examples/demo.py

## test: the whole suite on SQLite, PostgreSQL and MariaDB (starts them and creates databases)
test: $(BIN)/.installed databases compat-venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## test-sqlite: the suite on SQLite only (no database server needed)
test-sqlite: $(BIN)/.installed compat-venv
	TEST_DATABASES=sqlite $(BIN)/python -m pytest $(PYTEST_ARGS)

## compat-venv: .venv-0.8.1, the published 0.8.1 that tests/test_against_081.py compares with
## (needs Python 3.12+; without one those tests skip, and fail in CI)
compat-venv:
	@scripts/compat-venv.sh || [ -z "$$CI" ]

# The documentation site gets an environment of its own: Sphinx, furo and MyST.
.venv-docs/bin/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-docs
	.venv-docs/bin/python -m pip install --quiet --upgrade pip
	.venv-docs/bin/python -m pip install --quiet -e '.[docs]'
	touch $@

## docs: build the documentation site into docs/_build/html (warnings are errors), then check
## it in headless Chromium; open its index.html, or `python3 -m http.server -d docs/_build/html`
docs: .venv-docs/bin/.installed
	rm -rf docs/_build
	.venv-docs/bin/sphinx-build -W --keep-going -q -c docs -b html . docs/_build/html
	@# The site is built from the repository root; its front page is docs/index.html.
	@printf '<!doctype html><meta http-equiv="refresh" content="0; url=docs/index.html">\n' \
		> docs/_build/html/index.html
	@echo "The site is in docs/_build/html/index.html"
	@scripts/chromium.sh || [ -z "$$CI" ]
	$(PYTHON) scripts/check_site.py

## databases: start PostgreSQL and MariaDB if they are down; create the test databases; create
## and start the PostgreSQL primary with its streaming replicas and PgBouncer (scripts/replicas.sh)
databases:
	scripts/databases.sh
	@scripts/replicas.sh || [ -z "$$CI" ]

lint: $(BIN)/.installed
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .

typecheck: $(BIN)/.installed
	$(BIN)/python -m mypy --strict src

## check: lint, types, then the whole suite
check: lint typecheck test

clean:
	rm -rf $(VENV) .venv-* .mypy_cache .ruff_cache .pytest_cache docs/_build

## bench: the benchmark suite (docs/performance.md); BENCH_ROUNDS=7 for a steadier run
.PHONY: bench
bench:
	$(PYTHON) benchmarks/run.py $(BENCH_ARGS)

## stress: the fault-injection tests at length (docs/reliability.md), then their figures;
## STRESS_REQUESTS and STRESS_SEED size and seed the run
STRESS_REQUESTS ?= 1500
STRESS_SEED ?= 20240601
.PHONY: stress
stress: $(BIN)/.installed databases
	@report=$(VENV)/faults-report.jsonl; rm -f $$report; \
	FAULTS_REQUESTS=$(STRESS_REQUESTS) FAULTS_SEED=$(STRESS_SEED) FAULTS_REPORT=$$report \
		$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_faults.py $(PYTEST_ARGS); \
	status=$$?; \
	$(BIN)/python tests/faultkit.py $$report; \
	rm -f $$report; \
	exit $$status
