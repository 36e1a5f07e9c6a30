# Two entry points (see README): `make demo` runs the main job on the embedded default, `make test` the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: demo test test-slow install constraints benchmark device-wheels clean format FORCE

# varsweep needs Python 3.11 or newer (pyproject.toml's requires-python). A $(PYTHON) older than that stops here with
# the way out; a venv an older python3 left behind (its install failed) is made again, with $(PYTHON) (--clear), and
# so is one without pip (a venv a failed `python3 -m venv` left half made).
PY_NEW_ENOUGH := import sys; sys.exit(sys.version_info < (3, 11))
VENV_TOO_OLD := $(shell [ -x $(PY) ] && ! $(PY) -c '$(PY_NEW_ENOUGH)' 2>/dev/null && echo yes)
VENV_NO_PIP := $(if $(VENV_TOO_OLD),,$(shell [ -x $(PY) ] && ! $(PY) -c 'import pip' 2>/dev/null && echo yes))

# Debian's and Ubuntu's python3 has venv but not its ensurepip (that is the python3.11-venv package), so a plain
# `venv` fails there, leaving a venv without pip: then the venv is made without pip and $(PYTHON)'s own pip installs
# pip into it (pip's --python, pip 22.3 or newer). Where that fails too, the half-made venv goes and make stops with
# the packages that fix it.
VENV_WITHOUT_ENSUREPIP := $(PYTHON) -m venv --clear --without-pip $(VENV) && $(PYTHON) -m pip --python $(PY) install \
  --quiet pip
$(PY): $(if $(VENV_TOO_OLD)$(VENV_NO_PIP),FORCE)
	@$(PYTHON) -c '$(PY_NEW_ENOUGH)' 2>/dev/null || { \
	  echo "error: $(PYTHON) is $$($(PYTHON) --version 2>/dev/null || echo missing); varsweep needs Python 3.11 or" \
	    "newer: run make with PYTHON=python3.11 (e.g. make demo PYTHON=python3.11)" >&2; exit 1; }
	$(if $(VENV_TOO_OLD),@echo "$(VENV) has a Python older than 3.11: making it again with $(PYTHON)")
	$(if $(VENV_NO_PIP),@echo "$(VENV) has no pip (an earlier venv failed): making it again with $(PYTHON)")
	$(PYTHON) -m venv --clear $(VENV) || { \
	  echo "$(PYTHON) -m venv failed (above): making $(VENV) without pip and installing pip into it with $(PYTHON)'s pip"; \
	  $(VENV_WITHOUT_ENSUREPIP); } || { rm -rf $(VENV); \
	  echo "error: could not make $(VENV) with $(PYTHON): install its venv module (Debian and Ubuntu: apt install" \
	    "python3.11-venv) or pip 22.3 or newer (apt install python3-pip), then run make again" >&2; exit 1; }
	$(PY) -m pip install --quiet --upgrade pip

FORCE:

# Reinstall when the dependency list or its pins change; the project itself is installed editable, every
# dependency at the version constraints.txt pins (the same versions as on the cluster's nodes, see cluster.yaml).
# Everything the suite tests: the analysis side (the bare package), the training side (train), MLflow for
# experiment tracking (tracking), the test tools (dev) and boto3 for Ray's AWS autoscaler (aws: the suite tests
# that the head can use it). `pip install .` alone is the analysis-only install (see README).
EXTRAS := train,tracking,dev,aws
$(STAMP): pyproject.toml constraints.txt $(if $(VENV_TOO_OLD)$(VENV_NO_PIP),FORCE) | $(PY)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m bench demo --storage $(DEMO_OUT)

# Lint and format check first (ruff, settings in pyproject.toml; `make format` applies the formatter), then the suite.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The slow tests the default run leaves out (see pyproject.toml): a 2-node Ray cluster, killed workers and drivers,
# a fresh venv with the light install, the whole smoke privacy audit and more sweeps through a local Ray.
test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# Refresh constraints.txt after changing pyproject.toml's dependencies: resolve them afresh (no constraints) in a
# throwaway venv and write its freeze below the file's header comment: --all, for setuptools (torch needs it at run
# time; a plain freeze omits it), less pip itself. Downloads every wheel (torch's CUDA wheels: several GB); run
# `make test` on the result before committing it.
constraints:
	lock=$$(mktemp -d) && $(PYTHON) -m venv $$lock && \
	$$lock/bin/pip install --quiet -e ".[$(EXTRAS)]" && \
	{ sed '/^[^#]/,$$d' constraints.txt; $$lock/bin/pip freeze --all --exclude-editable | grep -v '^pip=='; } \
	  > constraints.txt.new && \
	mv constraints.txt.new constraints.txt && rm -rf $$lock

benchmark: $(STAMP)
	$(PY) scripts/benchmark_models.py --out docs/benchmarks.md

# The lent GPU machine runs its own image (Python 3.12, its own torch, no network): scripts/benchmark_gpu.py needs
# there the pinned pure-Python packages that image lacks (Opacus, torch-fidelity) or holds at another version
# (peft). This fetches their wheels into .whl/ (ignored; carried with the run); the device command is in the
# script's docstring.
DEVICE_WHEELS := opacus torch_fidelity peft
device-wheels:
	rm -rf .whl && mkdir .whl
	for name in $(DEVICE_WHEELS); do \
	  pin=$$(grep -i "^$$name==" constraints.txt) || { echo "$$name is not pinned in constraints.txt"; exit 1; }; \
	  $(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "$$pin" || exit 1; \
	done
	ls .whl

clean:
	rm -rf $(VENV) runs .pytest_cache
