# The two commands:   make demo   |   make test
# Each creates or refreshes ./.venv by itself (pip, so that torch comes from the CPU pin).
# GPU machines: install your CUDA torch into .venv first, then `make CONSTRAINTS= test`.
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints-cpu.txt
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev]'
	touch $(STAMP)

.PHONY: setup demo test bench
setup: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)  ## ~30 min on 2 cores; each writes its section of BENCHMARKS.md
	$(PY) -m benchmarks.model_bench
	$(PY) -m benchmarks.data_prep_bench
	$(PY) -m benchmarks.pretrain_bench
