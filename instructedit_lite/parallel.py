"""Independent pieces of work side by side on the machine's cores (chapters 4 and 5).

The embedded model's matrices are too small to gain from more threads (chapter 3), so a 2-core
machine is used fully only by running two pieces of work at once in separate processes: editors
that train independently (:func:`~instructedit_lite.train.train_editors`) and test cases that are
evaluated independently (:func:`~instructedit_lite.evaluate.evaluate_methods`).  Each piece
depends only on its own inputs and seeds, so the results are those of running them one by one.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import pickle
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from .progress import bar_disabled

__all__ = ["cores", "map_in_processes"]


def cores() -> int:
    """The cores this run may use: ``INSTRUCTEDIT_WORKERS`` when set (a chapter's share when
    chapters run side by side), else every core of the machine."""
    return max(1, int(os.environ.get("INSTRUCTEDIT_WORKERS") or os.cpu_count() or 1))


#: In a worker process: the ``shared`` arguments of :func:`map_in_processes`, received once.
_SHARED: tuple = ()


def _receive(threads: int, payload: bytes) -> None:
    global _SHARED
    torch.set_num_threads(threads)
    _SHARED = pickle.loads(payload)


def _call(fn: Callable, threads: int, payload: bytes) -> Any:
    torch.set_num_threads(threads)
    return fn(*_SHARED, *pickle.loads(payload))


def map_in_processes(fn: Callable, jobs: Sequence[tuple], processes: int, *, threads: int = 1,
                     desc: str | None = None, weights: Sequence[int] | None = None,
                     progress: bool = True, shared: tuple = ()) -> list[Any]:
    """``[fn(*shared, *job) for job in jobs]``, computed ``processes`` jobs at a time in fresh
    (spawned) processes of ``threads`` torch threads each; results in the order of ``jobs``.

    ``fn`` must be importable (a module-level function) and each job picklable; objects within
    one job keep their identity (a method and the model it holds arrive as one object graph), and
    each job's tensors are copies (never memory shared with this process or another job).
    ``shared``: arguments sent to each worker once, not with every job (a model of 540 MB takes
    1-3 s to pickle): objects within it keep their identity, and the jobs a worker runs one after
    the other get the same objects, so a job that changes them must restore them.  Jobs go to
    whichever worker is free, in the order given: put the longest first.
    A worker's error is raised here.  ``weights`` (one per job) drive the tqdm bar.
    """
    weights = list(weights) if weights is not None else [1] * len(jobs)
    results: list[Any] = [None] * len(jobs)
    # spawn, not fork: a forked child of a process that already ran torch's thread pool can hang.
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=processes, mp_context=context, initializer=_receive,
                                initargs=(threads, pickle.dumps(tuple(shared)))) as pool, \
            tqdm(total=sum(weights), desc=desc, disable=bar_disabled(progress)) as bar:
        # Plain pickle, so that every worker gets its own copy: multiprocessing's pickler would
        # pass torch tensors through shared memory, and one worker's in-place edit of the model's
        # weights would then show in the others'.
        futures = {pool.submit(_call, fn, threads, pickle.dumps(tuple(job))): i for i, job in enumerate(jobs)}
        for future in cf.as_completed(futures):
            i = futures[future]
            results[i] = future.result()
            bar.update(weights[i])
    return results
