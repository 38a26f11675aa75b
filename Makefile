# `make test` is the project's test command: lint, type check, then the whole test suite.

PYTHON := $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
# bench/ is linted once it holds Python code.
LINT_PATHS := src tests $(if $(wildcard bench/*.py bench/*/*.py),bench)

.PHONY: test lint typecheck unit integration

test: lint typecheck
	$(call pytest)

lint:
	$(PYTHON) -m ruff check $(LINT_PATHS)
	$(PYTHON) -m ruff format --check $(LINT_PATHS)

typecheck:
	$(PYTHON) -m mypy

unit:
	$(call pytest,tests/unit)

integration:
	$(call pytest,tests/integration)

# pytest exits 5 when it collected nothing; we always have tests, so say so and fail.
define pytest
	@echo "$(PYTHON) -m pytest -q $(1)"
	@$(PYTHON) -m pytest -q $(1); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure here"; fi; \
	exit $$rc
endef
