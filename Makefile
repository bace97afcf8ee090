# cxrserve: `make serve` installs, builds the default model store and starts TorchServe;
# `make test` installs, builds the store if missing and runs the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STORE := model_store
RUN := .torchserve

.PHONY: install store serve stop test browser bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Idempotent: every step (phantoms, demo training, export, archive) is skipped when done.
store: install
	$(PY) -m cxrserve store build --store $(STORE) --work build

serve: store
	$(PY) -m cxrserve serve start --store $(STORE) --workdir $(RUN)

stop:
	$(PY) -m cxrserve serve stop --workdir $(RUN)

# The web viewer's browser test drives Debian's Chromium (never a downloaded browser).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: the browser test will be skipped"; }

test: store browser
	$(PY) -m pytest

# Benchmarks (docs/PERFORMANCE.md): prints a markdown table, writes benchmarks/results/.
bench: store
	$(PY) -m cxrserve bench --store $(STORE) --work build
