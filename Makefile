# cxrserve: `make serve` installs, builds the default model store and starts TorchServe;
# `make test` installs, builds the store if missing and runs the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STORE := model_store
RUN := .torchserve

.PHONY: install store real-store serve stop probe kserve test browser dicomtools prometheus node bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Idempotent: every step (phantoms, demo training, export, archive) is skipped when done.
store: install
	$(PY) -m cxrserve store build --store $(STORE) --work build

# A real store from a data folder: trains every component on DATA (training/real.yaml),
# evaluates each on its patient-level validation split, writes build-real/MODEL_CARD_real.md.
# Resumable; BUDGET (seconds) bounds the training. Never commit its outputs.
DATA ?= ../shared/data
REAL_STORE ?= model_store_real
BUDGET ?=
# LOSO=1 first runs the leave-one-site-out folds (3 epochs of 50 steps, at most LOSO_BUDGET s each) into
# build-real/loso; the card fragment then carries their tables (docs/MODEL_CARD.md, Leave-one-site-out).
LOSO ?=
LOSO_BUDGET ?= 600
real-store: install
	$(if $(LOSO),$(PY) -m cxrserve loso $(DATA) --out build-real/loso --budget $(LOSO_BUDGET) \
	  --set epochs=3 steps_per_epoch=50 max_val=150 --quiet &&) \
	$(PY) -m cxrserve store build --recipe training/real.yaml --data $(DATA) --store $(REAL_STORE) \
	  --work build-real $(if $(BUDGET),--budget $(BUDGET))

serve: store
	$(PY) -m cxrserve serve start --store $(STORE) --workdir $(RUN)

stop:
	$(PY) -m cxrserve serve stop --workdir $(RUN)

# Tokenless health check of `make serve`'s TorchServe (reads the key file): exit 0 when ready.
probe:
	$(PY) -m cxrserve serve probe --ready --workdir $(RUN)

# The same store without TorchServe: KServe-native predictor, Open Inference Protocol
# on REST :8090 and gRPC :8091 (loopback; foreground, Ctrl-C stops it).
kserve: store
	$(PY) -m cxrserve kserve --store $(STORE) --http-port 8090 --grpc-port 8091

# The web viewer's browser test drives Debian's Chromium (never a downloaded browser).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: the browser test will be skipped"; }

# The DICOM node's tests use Debian's Orthanc (+ DICOMweb plugin), dcmtk and dicom3tools.
dicomtools:
	@{ command -v Orthanc && command -v storescu && command -v dciodvfy && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; } >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb dcmtk dicom3tools >/dev/null) || \
	  echo "orthanc/dcmtk/dicom3tools not installed: the DICOM node tests will be skipped"; }

# The monitoring test scrapes TorchServe with Debian's Prometheus and fires the drift alert.
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) || \
	  echo "prometheus not installed: the monitoring alert test will be skipped"; }

# The DICOM node (README "DICOM node"): NODE_CONFIG=deploy/node/node.yaml by default.
NODE_CONFIG ?= deploy/node/node.yaml
node: install
	$(PY) -m cxrserve node --config $(NODE_CONFIG)

test: store browser dicomtools prometheus
	$(PY) -m pytest

# Benchmarks (docs/PERFORMANCE.md): prints a markdown table, writes benchmarks/results/.
bench: store
	$(PY) -m cxrserve bench --store $(STORE) --work build
