"""Shared test set-up: single-threaded torch (the machine has 2 cores and tests run beside
notebooks), and ``tests/`` on the import path for the :mod:`tiny` helpers."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)

#: The slow tests, in the order they start under ``make test`` (pytest-xdist, one test handed out
#: at a time: ``--maxschedchunk 1``): longest first, so that no long test starts last and runs
#: alone.  The first pretrains the smoke base model (about 70 s on one core); the worker that
#: did not take it starts chapter 8, which needs only SmolLM2.  Then the rest, as collected.
#: Durations that set the order (a cold run at commit 40027a9, before this ordering, seconds): 08 247, 09 114,
#: 10 100, 06 91, 05 77, reproduce 75, 07 48, 01 45, SmolLM2 unlikelihood 44, 04 17, 03 16, 02 15.
SLOW_FIRST = ("test_base_model.py::test_tokenizer", "smoke_mode[09_", "smoke_mode[08_", "smoke_mode[10_",
              "smoke_mode[06_", "smoke_mode[05_", "test_reproduce_smoke_end_to_end", "smoke_mode[07_",
              "smoke_mode[01_", "test_beyond_real.py", "smoke_mode[04_", "smoke_mode[03_", "smoke_mode[02_",
              "test_llama_pipeline.py", "test_learning.py::test_an_editor_that_cannot_learn",
              "test_worker_processes_give_the_same_table")


def pytest_collection_modifyitems(config, items):
    """Order for several workers: :data:`SLOW_FIRST`, then every other test as collected."""

    def rank(item) -> int:
        return next((i for i, k in enumerate(SLOW_FIRST) if k in item.nodeid), len(SLOW_FIRST))

    items.sort(key=rank)  # stable: tests of one rank keep their collected order
