"""Shared test set-up: single-threaded torch (the machine has 2 cores and tests run beside
notebooks), and ``tests/`` on the import path for the :mod:`tiny` helpers."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)

#: Tests that need the embedded base model (pretrained once, about 5 minutes single-threaded),
#: longest first.  Chapter 7 needs only SmolLM2: it runs early, beside the pretraining.
NEEDS_BASE = ("test_base_model.py", "test_reproduce_smoke_end_to_end", "smoke_mode[05_", "smoke_mode[06_",
              "smoke_mode[01_", "smoke_mode[10_", "smoke_mode[09_", "smoke_mode[04_", "smoke_mode[03_",
              "smoke_mode[02_", "test_trained_editor_beats_untrained_on_held_out_records")
EARLY = ("smoke_mode[07_",)


def pytest_collection_modifyitems(config, items):
    """Order for several workers (``make test`` runs pytest-xdist): the first test that needs the
    base model starts its pretraining at once, the tests that do not need it follow (the other
    workers run them meanwhile instead of waiting on the cache lock), and the rest come last,
    longest first."""

    def needs(item) -> int | None:
        return next((i for i, k in enumerate(NEEDS_BASE) if k in item.nodeid), None)

    late = sorted((i for i in items if needs(i) is not None), key=needs)  # stable within a key
    if not late:
        return
    early = [i for i in items if any(k in i.nodeid for k in EARLY)]
    rest = [i for i in items if needs(i) is None and i not in early]
    items[:] = late[:1] + early + rest + late[1:]
