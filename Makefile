# CLAP2Diffusion for ComfyUI — developer entry points. `make help` lists them.
# Everything runs in the pack's own .venv, created on first use (tools/setup.sh).

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.clap2diffusion-setup
COMFY  := $(if $(COMFYUI_PATH),$(COMFYUI_PATH),.comfyui)
# Re-run setup when its inputs change, or when the ComfyUI copy has gone.
SETUP_INPUTS := tools/setup.sh requirements.txt requirements-train.txt requirements-dev.txt $(wildcard requirements-nodeps.txt) $(if $(wildcard $(COMFY)/main.py),,FORCE)

PYTEST_ARGS ?=
DEMO_ARGS   ?=
BENCH_ARGS  ?=

.PHONY: help setup models test test-quick test-slow test-newer lint demo train-smoke distil-smoke bench pictures clean-models FORCE

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv and .comfyui (idempotent)

$(STAMP): $(SETUP_INPUTS)
	bash tools/setup.sh
	@touch $@

models: $(STAMP)  ## build (or reuse) the random-weight test models in .cache/test-models
	$(PY) tools/test_models.py

demo:  ## run example_workflows/audio_text_to_image.json headless; prints the image path
	@start=$$(date +%s%N); $(MAKE) --no-print-directory setup; \
	ms=$$(( ($$(date +%s%N) - start) / 1000000 )); \
	$(PY) tools/run_workflow.py --setup-seconds $$((ms / 1000)).$$(printf %03d $$((ms % 1000))) $(DEMO_ARGS)

test: $(STAMP)  ## the whole suite, real-server end-to-end tests included
	$(PY) -m pytest $(PYTEST_ARGS)

test-quick: $(STAMP)  ## everything but the real-server tests (-m "not slow")
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)  ## only the real-server tests
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# Another ComfyUI (e.g. 0.33, whose requirements pin frontend 1.49.6) in a venv of its own, so .venv and
# .comfyui stay as they are: its requirements are installed once per ComfyUI path, then every real-server
# module runs against it and a table of passed/failed/skipped per module is printed (NEWER_XML).
NEWER_VENV  := .venv-newer
NEWER_STAMP := $(NEWER_VENV)/.clap2diffusion-setup
NEWER_XML   ?= out/test-newer.xml

test-newer:  ## the real-server tests on COMFYUI_PATH=/path/to/ComfyUI, in .venv-newer (own venv)
	@[[ -n "$(COMFYUI_PATH)" && -f "$(COMFYUI_PATH)/main.py" ]] || \
		{ echo "usage: make test-newer COMFYUI_PATH=/path/to/ComfyUI (a checkout with main.py)" >&2; exit 2; }
	@want="$$(cd "$(COMFYUI_PATH)" && pwd) $$(cat tools/setup.sh requirements*.txt "$(COMFYUI_PATH)/requirements.txt" | md5sum)"; \
	if [[ "$$(cat $(NEWER_STAMP) 2>/dev/null)" != "$$want" ]]; then \
		C2D_VENV=$(NEWER_VENV) COMFYUI_PATH="$(COMFYUI_PATH)" bash tools/setup.sh && echo "$$want" > $(NEWER_STAMP); \
	fi
	@mkdir -p out
	COMFYUI_PATH="$(COMFYUI_PATH)" $(NEWER_VENV)/bin/python -m pytest -m slow --junitxml=$(NEWER_XML) $(PYTEST_ARGS); \
	rc=$$?; $(NEWER_VENV)/bin/python tools/module_table.py $(NEWER_XML); exit $$rc

lint: $(STAMP)  ## ruff, then comfy-test's static levels (syntax and javascript)
	$(PY) -m ruff check .
	$(VENV)/bin/comfy-test lint --strict .

train-smoke: $(STAMP)  ## train all three stages on CPU on generated sounds (a few minutes); prints JSON last
	@paths=($$($(PY) tools/test_models.py --print sd15_checkpoint clap_folder)) && set -x && \
	$(PY) -m clap2diffusion_core.training smoke --out out/train-smoke --sd15 $${paths[0]} --clap $${paths[1]} $(TRAIN_SMOKE_ARGS)

distil-smoke: $(STAMP)  ## distil the audio adapter from the tiny SD1.5 on CPU (text fit first; ~2 min); prints JSON last
	@paths=($$($(PY) tools/test_models.py --print sd15_checkpoint clap_folder)) && set -x && \
	$(PY) -m clap2diffusion_core.training distil-smoke --out out/distil-smoke --sd15 $${paths[0]} --clap $${paths[1]} $(DISTIL_SMOKE_ARGS)

bench: $(STAMP)  ## what sound costs on top of text (CPU: a few minutes; --full on a GPU); writes bench/results.json
	$(PY) bench/bench.py $(BENCH_ARGS)

pictures: $(STAMP)  ## regenerate the README's pictures in docs/images/ (browser screenshot, timeline, decomposition; ~3 min)
	$(PY) tools/pictures.py $(PICTURES_ARGS)

clean-models:  ## drop the cached test models (they are rebuilt on demand)
	rm -rf .cache/test-models

FORCE:
