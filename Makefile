# Every target installs what it needs first, so `make demo` and `make test` work on a
# fresh clone. The virtual environment is created from the hashed lock file.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test unit lint typecheck lock kafka-start kafka-stop clean

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) was not found: install Python 3.11 or run make PYTHON=/path/to/python3.11" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q --require-hashes -r requirements.lock
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: venv
	bash dev/kafka.sh fetch
	$(VENV)/bin/autopull demo

test: venv lint typecheck
	bash dev/kafka.sh fetch
	bash dev/helm.sh install
	bash dev/dovecot.sh install
	bash dev/slapd.sh install
	$(PY) -m pytest

unit: venv
	$(PY) -m pytest tests/unit

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: venv
	@mkdir -p .cache/typing/autopull
	@for folder in streams connectors schemas sim; do \
		ln -sfn ../../../$$folder .cache/typing/autopull/$$folder; done
	$(PY) -m mypy

# Regenerate the lock file after changing dependencies in pyproject.toml.
lock: venv
	$(PY) -m pip install -q uv
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --generate-hashes -o requirements.lock

kafka-start:
	bash dev/kafka.sh start

kafka-stop:
	bash dev/kafka.sh stop

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
