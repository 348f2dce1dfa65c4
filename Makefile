# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
PIP ?= $(PY) -m pip
# On a CPU box, a pinned torch comes from local disk; a GPU cluster keeps the torch it has.
TORCH_PIN ?= torch==2.13.0
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1

.PHONY: install install-dev demo test lint format

install:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e .

install-dev:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[dev]"

demo: install
	bash launch/demo.sh

lint:
	ruff check .
	ruff format --check .

format:
	ruff check --fix .
	ruff format .

test: install-dev lint
	$(PY) -m pytest -q tests
