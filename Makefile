# greenopt: `make demo` (install, fetch offline model + data, run the search) and `make test`.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Set TORCH_INDEX to a CPU wheel index on machines where PyPI's torch would be a CUDA build.
TORCH_INDEX ?=
TORCH_FLAGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
PYTEST_ARGS ?=
DEMO_ARGS ?= --name demo --resume --threads 2

.PHONY: install data demo test test-unit test-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_FLAGS) torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test,ort]'
	touch $(STAMP)

data: $(STAMP)
	$(BIN)/greenopt fetch

demo: data
	$(BIN)/greenopt search recipes/cpu-demo.yaml --model default --target A $(DEMO_ARGS)

test: data
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

test-unit: data
	$(BIN)/python -m pytest -m "not gpu and not integration and not postgres" $(PYTEST_ARGS)

test-gpu: data
	$(BIN)/python -m pytest -m gpu $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
