# On a fresh machine:  make demo  (train a small GPT on Shakespeare, then sample),  make test,
# make journey  (pre-train -> fine-tune -> align -> attention -> quantize -> evaluate, a report card in out-journey/),
# make gpu-check  (on a CUDA machine: the CUDA tests, then training and decoding speed against transformers),
# make test-llama-cpp  (GGUF exports run in llama.cpp itself: builds llama-cpp-python from source, ~10 CPU minutes)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-llama-cpp journey gpu-check venv venv-dev clean

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.runtime
venv-dev: $(VENV)/.dev

demo: venv
	$(PY) data/shakespeare_char/prepare.py
	$(PY) train.py config/train_shakespeare_char.py --overwrite=True
	$(PY) sample.py --init_from=resume --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=2 --max_new_tokens=300

test: venv-dev
	$(PY) -m pytest -n auto --dist loadfile tests  # one worker per core, a test file per worker

test-llama-cpp: venv-dev
	$(PY) -m pip install -q llama-cpp-python==0.3.36
	$(PY) -m pytest -m llama_cpp tests/test_gguf_llama_cpp.py

journey: venv
	PYTHON=$(PY) bash runs/journey.sh

gpu-check: venv-dev
	PYTHON=$(PY) bash runs/gpu_check.sh

clean:
	rm -rf $(VENV) out-shakespeare-char out-journey
