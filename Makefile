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

# The llama.cpp runtime (greenopt[llamacpp]): llama-cpp-python has no wheel on PyPI and builds from source,
# about 4 minutes measured on 2 cores (longer on slower CPUs), for this machine's CPU. llama.cpp's AMX backend
# is left out: it segfaults on quantized GGUF (llama.cpp issue #20824). --no-cache-dir: a wheel cached
# from another build's flags would be reused otherwise.
NO_AMX = $(shell echo | cc -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 -E - >/dev/null 2>&1 && echo "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
LLAMACPP_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "-DCMAKE_C_FLAGS=$(NO_AMX)" "-DCMAKE_CXX_FLAGS=$(NO_AMX)"

.PHONY: llamacpp
llamacpp: $(STAMP)
	@echo "building llama-cpp-python from source: about 4 minutes on 2 cores, longer on slower CPUs"
	CMAKE_ARGS='$(LLAMACPP_CMAKE_ARGS)' CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/pip install --no-cache-dir -c constraints.txt -e '.[llamacpp]'

clean:
	rm -rf $(VENV) .pytest_cache
