"""Progress bars: off in the built book (TQDM_DISABLE), on otherwise unless the caller says no.

tqdm itself reads TQDM_DISABLE only as a default, which the library's explicit ``disable=`` overrode.
"""

from tqdm.auto import tqdm

from instructedit_lite.progress import bar_disabled


def test_tqdm_disable_turns_every_library_bar_off(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert bar_disabled(False) and not bar_disabled(True)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert bar_disabled(True) and bar_disabled(False)
    assert tqdm(range(3), disable=bar_disabled(True)).disable

