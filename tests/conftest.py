"""Shared test set-up: single-threaded torch (the machine has 2 cores and tests run beside
notebooks), and ``tests/`` on the import path for the :mod:`tiny` helpers."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)
