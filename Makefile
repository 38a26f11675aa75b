# `make test` is the project's test command: lint, type check, build the compiled hot
# path, then the whole test suite twice: on the compiled modules and on the sources.

PYTHON := $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
# bench/ is linted once it holds Python code.
LINT_PATHS := src tests scripts setup.py $(if $(wildcard bench/*.py bench/*/*.py),bench)

.PHONY: test lint typecheck unit integration compiled clean-compiled test-compiled test-python

# The two runs share only the machine (each starts its own PostgreSQL on free ports) and
# spend most of their time waiting on servers and timeouts, so they run side by side;
# `-O` prints each run's output in one block when it ends. TEST_JOBS=1 runs them in turn.
# Each run keeps its temporary files in a directory of its own (TEST_TMP, kept when a
# run fails): pytest makes its shared default, /tmp/pytest-of-<user>, private again
# whenever a session starts, which would cut the other run's PostgreSQL (an unprivileged
# user when run as root) off from its data directory.
TEST_JOBS ?= 2

test: lint typecheck compiled
	@tmp=$$(mktemp -d "$${TMPDIR:-/tmp}/pg_doorman-tests.XXXXXX") && \
	$(MAKE) --no-print-directory -j$(TEST_JOBS) -O test-compiled test-python TEST_TMP="$$tmp"; \
	rc=$$?; if [ $$rc -eq 0 ]; then rm -rf "$$tmp"; else echo "test files kept in $$tmp"; fi; \
	exit $$rc

test-compiled: export PG_DOORMAN_IMPL = compiled
test-compiled:
	$(call pytest,$(if $(TEST_TMP),--basetemp=$(TEST_TMP)/compiled))

test-python: export PG_DOORMAN_IMPL = python
test-python:
	$(call pytest,$(if $(TEST_TMP),--basetemp=$(TEST_TMP)/python))

# The optional mypyc build of the hot-path modules (see docs/performance.md).
compiled:
	$(PYTHON) scripts/build_compiled.py

clean-compiled:
	$(PYTHON) scripts/build_compiled.py --clean

lint:
	$(PYTHON) -m ruff check $(LINT_PATHS)
	$(PYTHON) -m ruff format --check $(LINT_PATHS)

# Every Python the package supports: the compiled build type-checks the sources with the
# version it is built on, so a construct one version's stubs reject breaks that build.
TYPECHECK_VERSIONS := 3.11 3.12 3.13

typecheck:
	@for version in $(TYPECHECK_VERSIONS); do \
		echo "$(PYTHON) -m mypy --python-version $$version"; \
		$(PYTHON) -m mypy --python-version $$version || exit 1; \
	done

unit:
	$(call pytest,tests/unit)

integration:
	$(call pytest,tests/integration)

# pytest exits 5 when it collected nothing; we always have tests, so say so and fail.
define pytest
	@echo "PG_DOORMAN_IMPL=$${PG_DOORMAN_IMPL:-auto} $(PYTHON) -m pytest -q $(1)"
	@$(PYTHON) -m pytest -q $(1); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure here"; fi; \
	exit $$rc
endef
