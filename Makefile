# Two entry points do all the set-up on a fresh machine (Python 3.11+, package registries only):
#   make test   unit tests + every notebook through papermill in smoke mode
#   make book   every notebook with its default parameters, HTML book in _build/html
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

# Trained models and editors are cached here (keyed by their configuration); a clean clone starts cold.
export INSTRUCTEDIT_CACHE ?= $(CURDIR)/.cache/instructedit-lite
export PYTHONHASHSEED := 0
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: install test unit notebooks book bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[book,test]"
	touch $@

install: $(STAMP)

test: install
	$(BIN)/python -m pytest

unit: install
	$(BIN)/python -m pytest -m "not notebooks"

book: install
	$(BIN)/jupyter-book build . --builder html -W --keep-going

bench: install
	$(BIN)/python -m instructedit_lite.bench

clean:
	rm -rf _build .cache
