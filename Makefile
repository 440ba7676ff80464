# Two commands: `make train` (the CPU demo) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export JAX_PLATFORMS ?= cpu
export TF_CPP_MIN_LOG_LEVEL ?= 3
# pip installs without byte-compiling its ~18,000 files (90 of its 155 s on 2 cores); Python
# compiles the few thousand that get imported on first use, so it must be allowed to write them.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: train test lint bench clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -e .
	touch $@

$(VENV)/.test: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -e '.[test,tpu]'
	touch $(VENV)/.base $@

train: $(VENV)/.base
	$(PY) -m trainer.train --config=configs/tiny.py --workdir=runs/tiny
	@echo "--- a sample from the model just trained:"
	$(PY) -m trainer.generate --workdir=runs/tiny --prompt="def " --max_new_tokens=80 \
	  --temperature=0.8 --top_k=40
	@echo "--- metrics: runs/tiny/metrics.jsonl; TensorBoard: $(VENV)/bin/tensorboard --logdir runs"

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -n 2 -q tests

bench: $(VENV)/.test
	$(PY) -m trainer.benchmark --config=configs/bench.py --compare_torch

clean:
	rm -rf $(VENV) runs
