# Two commands for a fresh clone (see README): `make demo` and `make test`.
# Both create ./.venv and install the project into it first.
#
# TORCH_SPEC picks the PyTorch build installed before the project. The default is the CPU
# build that lies on the development machines' disk; on a GPU machine use, for example,
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
DEMO_OUT ?= demo_out

.PHONY: demo test test-fast venv clean gpu-check gpu-check-dry-run

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: venv
	$(VENV)/bin/unetpp3d demo --out $(DEMO_OUT)

test: venv
	$(PY) -m pytest

test-fast: venv
	$(PY) -m pytest -m "not slow"

# On a GPU machine: pytest -m gpu, then the CUDA sections of bench/bench.py and a table of issue 17's
# targets (bench/README.md). Uses the machine's own PyTorch and the wheels carried in .whl/
# (bench/fetch_gpu_wheels.sh), not a venv. Logs and JSON go to $(GPU_CHECK_OUT), else $$OUT, else
# gpu_check_out/. The dry run does the same on this CPU at tiny sizes and measures nothing.
GPU_CHECK_OUT ?=

gpu-check:
	bash bench/gpu_check.sh $(GPU_CHECK_OUT)

gpu-check-dry-run: venv
	PYTHON=$(PY) bash bench/gpu_check.sh --dry-run $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache gpu_check_out
