# Two entry points for a fresh machine (see README):
#   make demo   create .venv, install, write the demo's generated corpus, run studies/demo.yaml, draw the figures
#   make test   create .venv, install with test extras, lint (ruff), run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The demo's generated corpus (studies/demo.yaml): 16 pre-training classes and 8,000 images, a small version of the
# studies' data/synthetic-16 (README "Synthetic corpus").
DATA := data/synthetic-demo

.PHONY: setup demo test test-slow bench clean
setup: $(VENV)/.installed

# torch is pinned (torch==2.13.0 in pyproject.toml). PyPI's 2.13.0 is the CUDA build (~4 GB with its nvidia
# libraries), so the CPU build (2.13.0+cpu, which satisfies the pin) goes in first where pip can find it (a local
# wheel folder, e.g. pip's find-links); elsewhere that step is skipped and the pin takes PyPI's build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet 'torch==2.13.0+cpu' || echo "no CPU build of torch 2.13.0 found: using PyPI's"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

$(DATA)/pretrain/train/manifest.json: | setup
	$(BIN)/mixer-study shards --from synthetic --out $(DATA) --seed 0 --pretrain-classes 16 --size 8000

demo: setup $(DATA)/pretrain/train/manifest.json
	$(BIN)/mixer-study run studies/demo.yaml
	$(BIN)/mixer-study report demo --out results/demo

# test: lint + every test but the fault-injection and load studies (under 15 minutes on 2 cores). test-slow: those
# studies (node and job loss, worker kill, tracking outage, 16 short trials, a shipped study; about 40 minutes).
# CI (.ci/run) runs both.
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow -rP  # -rP: what passing tests printed (the load test's figures)

bench: setup
	$(BIN)/mixer-study bench

clean:
	rm -rf runs results mlflow.db bench-results $(DATA)
