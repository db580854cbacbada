# The two commands: `make demo` (the main job) and `make test` (the whole suite). Both set up .venv themselves.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: demo test install bench clean

# On a machine with a GPU the demo trains a bigger model in the same time.
DEMO_CONFIG = $(shell $(PY) -c "import torch; print('configs/shakespeare-char-gpu.toml' if torch.cuda.is_available() else 'configs/shakespeare-char.toml')")

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the project's requirements change.
$(VENV)/.installed: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e '.[test]'
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed
	$(PIP) -e '.[bench,serve]'
	touch $@

install: $(VENV)/.installed

# The main job: prepare Shakespeare (once), train for about 3 minutes, print val loss, a sample and the curves' path.
demo: $(VENV)/.installed
	@test -f data/shakespeare-char/meta.json || \
		$(PY) -m lmforge prepare shakespeare --tokenizer char --out data/shakespeare-char --force
	$(PY) -m lmforge train --config $(DEMO_CONFIG) --overwrite=true

bench: $(VENV)/.installed-bench
	$(PY) benchmarks/speedrun.py
	$(PY) benchmarks/tokenizer.py
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/cpu_kernels.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/prepare.py
	$(PY) benchmarks/seq2seq.py

test: $(VENV)/.installed-test
	$(PY) -m pytest -n 2 --durations=10 tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
