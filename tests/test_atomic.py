"""Atomic writes leave the old file, or the new one, and no temporary behind."""

import pytest

from instructedit_lite.atomic import atomic_write, atomic_write_text


def test_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    atomic_write_text(path, "first")
    atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert [p.name for p in path.parent.iterdir()] == ["out.txt"]


def test_an_interrupted_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.txt"
    atomic_write_text(path, "old")

    def broken(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def _build_once(path: str, log: str) -> None:
    import time
    from pathlib import Path

    from instructedit_lite.atomic import atomic_write_text, building

    with building(path):
        if not Path(path).exists():  # the check inside the lock: the second process finds it built
            time.sleep(0.5)
            with open(log, "a") as f:
                f.write("built\n")
            atomic_write_text(path, "done")


def test_two_processes_build_a_cache_entry_once(tmp_path):
    """Chapters executed side by side (book/execute.py) and test workers share the cache: the
    lock makes the second process wait for the first one's entry instead of building it again."""
    import multiprocessing

    target, log = tmp_path / "entry", tmp_path / "log"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_build_once, args=(str(target), str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert log.read_text() == "built\n" and target.read_text() == "done"
