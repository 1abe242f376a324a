# The two commands a new user runs: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test lint gpu-test clean chromium

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch first, from the local wheel, so no multi-GB CUDA build is pulled.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# transformers >= 5.25 brought Hugging Face's `kernels`, whose module shadows ours; pyproject.toml now
	# keeps transformers below it, but pip leaves that package behind in a venv that already had it.
	$(PIP) uninstall -q -y kernels 2>/dev/null || true
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/gla-serve serve --host $(HOST) --port $(PORT)

# The chat-page test drives Debian's chromium headless (no browser download); install it when missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { echo "installing Debian chromium for tests/browser"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: install chromium
	$(PY) -m ruff check .
	TRITON_INTERPRET=1 $(PY) -m pytest -m "not gpu" -q

gpu-test:
	python3 -m pytest -m gpu -q

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
