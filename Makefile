# Two entry points (see README): `make demo` runs the main job on the embedded default, `make test` the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: demo test test-slow install benchmark clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall when the dependency list changes; the project itself is installed editable.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m bench demo --storage $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The slow tests the default run leaves out (see pyproject.toml): a 2-node Ray cluster, killed workers and drivers.
test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

benchmark: $(STAMP)
	$(PY) scripts/benchmark_models.py --out docs/benchmarks.md

clean:
	rm -rf $(VENV) runs .pytest_cache
