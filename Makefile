VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1

.PHONY: setup demo test bench lint clean

setup: $(VENV)/.installed

# torch first, pinned to the local CPU wheel: any other spec pulls gigabytes of CUDA packages.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,federated,eval,flex]'
	touch $@

demo: setup
	$(VENV)/bin/flexmore demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/extract.py

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs build *.egg-info
