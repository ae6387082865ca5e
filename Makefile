# Each target does its own set-up: the venv lives in .venv and is (re)installed when pyproject.toml
# or requirements-lock.txt changes. PYTHON may name another interpreter for the venv (3.11 or 3.12;
# 3.11 takes torch from this disk). A fresh Debian/Ubuntu needs python3-venv python3-dev g++ make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The venv's bin first on PATH for every recipe and what it starts: DeepSpeed JIT-builds its ops
# (the CPU shm op when a CPU run starts) with the `ninja` that pip put there, and the `deepspeed`
# and `ray` commands are there too. The venv itself is made with the PATH from before.
SYSTEM_PATH := $(PATH)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE := disabled
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-lock.txt
	test -x $(PY) || PATH='$(SYSTEM_PATH)' $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel
	$(PY) -m pip install -q -c requirements-lock.txt -e '.[test]'
	touch $(STAMP)

## The main job: the whole pipeline on a small generated dataset, local Ray and local storage.
demo: $(STAMP)
	$(PY) jobs/demo.py $(ARGS)

## The tests (pytest's exit code 5, "no tests collected", counts as a failure here).
test: $(STAMP)
	$(PY) -m ruff check pipeline jobs tests benchmarks
	$(PY) -m ruff format --check pipeline jobs tests benchmarks
	$(PY) -m pytest tests $(ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(PY) -m ruff check pipeline jobs tests benchmarks
	$(PY) -m ruff format --check pipeline jobs tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/run_all.py --out benchmarks/RESULTS-latest.md $(ARGS)

clean:
	rm -rf outputs .pytest_cache .ruff_cache
