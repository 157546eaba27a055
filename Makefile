# Two commands do everything on a fresh machine (Python >= 3.11 with pip and venv):
#   make demo   create .venv if absent, install, run the main job
#   make test   create .venv if absent, install, run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test toy-times clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(PY) run.py --module grpo --toy

# --dist load hands tests out in collection order, where the toy chain's users come last (tests/conftest.py)
test: setup
	$(PY) -m pytest -n auto --dist load

toy-times: setup
	$(PY) benchmarks/toy_times.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
