"""Tests for instructedit_lite.fetch, offline: checksums, the layout written, and the no-network error."""

from __future__ import annotations

import hashlib
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

from instructedit_lite import fetch, loaders
from instructedit_lite.fetch import ChecksumError, DataFile, NoNetworkError

GOOD = b'[{"subject": "S", "prompt": "p", "target_new": "t", "locality": {}}]'


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def files(monkeypatch):
    """A small registry: two files on the hub, one published elsewhere."""
    registry = {
        "knowedit/a.json": DataFile(_sha(GOOD), "hub a", "benchmark/a/a.json"),
        "knowedit/b.json": DataFile(_sha(GOOD + b" "), "hub b", "benchmark/b/b.json"),
        "zsre/other.json": DataFile(_sha(b"[]"), "GitHub someone/somewhere, data/other.json"),
    }
    monkeypatch.setattr(fetch, "FILES", registry)
    return registry


def fake_hub(contents: dict[str, bytes], calls: list[str]):
    """A stand-in for the hub download: writes the bytes recorded for ``hub_path``."""
    def download(hub_path: str, folder: Path, revision):
        calls.append(hub_path)
        path = folder / hub_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(contents[hub_path])
        return path
    return download


def test_sha256_and_verify_good_and_bad_file(tmp_path, files):
    path = tmp_path / "a.json"
    path.write_bytes(GOOD)
    assert fetch.sha256_of(path) == _sha(GOOD)
    fetch.verify(path, "knowedit/a.json")
    path.write_bytes(GOOD.replace(b"S", b"T"))
    with pytest.raises(ChecksumError, match="knowedit/a.json.*hub a"):
        fetch.verify(path, "knowedit/a.json")
    with pytest.raises(KeyError):
        fetch.verify(path, "knowedit/unknown.json")


def test_fetch_writes_the_layout_checks_and_lists_the_others(tmp_path, files):
    calls, lines = [], []
    hub = fake_hub({"benchmark/a/a.json": GOOD, "benchmark/b/b.json": GOOD + b" "}, calls)
    result = fetch.fetch_data(tmp_path / "data", download=hub, log=lines.append)
    assert result == {"knowedit/a.json": "downloaded", "knowedit/b.json": "downloaded",
                      "zsre/other.json": "missing: GitHub someone/somewhere, data/other.json"}
    assert (tmp_path / "data/knowedit/a.json").read_bytes() == GOOD
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["knowedit"]  # no temporary left
    assert any("someone/somewhere" in line for line in lines)
    assert fetch.status(tmp_path / "data") == {"knowedit/a.json": "ok", "knowedit/b.json": "ok",
                                               "zsre/other.json": "missing"}
    # a second run downloads nothing that is already there and right
    again = fetch.fetch_data(tmp_path / "data", download=hub, log=lines.append)
    assert calls == ["benchmark/a/a.json", "benchmark/b/b.json"]
    assert again["knowedit/a.json"] == "present"


def test_a_bad_download_is_not_kept(tmp_path, files):
    hub = fake_hub({"benchmark/a/a.json": b"[]", "benchmark/b/b.json": GOOD + b" "}, [])
    with pytest.raises(ChecksumError, match="knowedit/a.json"):
        fetch.fetch_data(tmp_path, download=hub, log=lambda _: None)
    assert not (tmp_path / "knowedit/a.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_changed_file_already_there_is_reported(tmp_path, files):
    (tmp_path / "knowedit").mkdir()
    (tmp_path / "knowedit/a.json").write_bytes(b"changed")
    hub = fake_hub({"benchmark/b/b.json": GOOD + b" "}, [])
    result = fetch.fetch_data(tmp_path, download=hub, log=lambda _: None)
    assert result["knowedit/a.json"] == "checksum mismatch"
    assert fetch.status(tmp_path)["knowedit/a.json"] == "checksum mismatch"


@pytest.mark.parametrize("error, offline, words", [
    (LocalEntryNotFoundError("Cannot find the requested files in the local cache"), "", "not reachable .no network"),
    (LocalEntryNotFoundError("Cannot find the requested files in the local cache"), "1", "HF_HUB_OFFLINE is set"),
    (OfflineModeIsEnabled("offline"), "1", "offline mode"),
    (ConnectionError("connection refused"), "", "not reachable"),
])
def test_no_network_is_a_clear_error(tmp_path, files, monkeypatch, error, offline, words):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    seen = {}

    def hf_hub_download(repo_id, filename, **kw):
        seen.update(repo_id=repo_id, filename=filename, **kw)
        raise error

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    with pytest.raises(NoNetworkError, match=words) as info:
        fetch.fetch_data(tmp_path, log=lambda _: None)
    assert "zjunlp/KnowEdit/benchmark/a/a.json" in str(info.value)
    assert (seen["repo_id"], seen["filename"], seen["repo_type"]) == ("zjunlp/KnowEdit", "benchmark/a/a.json", "dataset")
    assert not (tmp_path / "knowedit/a.json").exists()


def test_registry_covers_the_layout_the_library_reads():
    from instructedit_lite import real_data

    needed = {rel for rel, _, _ in loaders.REAL_FILES.values()} | {loaders.INSTRUCTION_FILE}
    needed |= {rel for rels in real_data.required_files().values() for rel in rels} | set(real_data.optional_files())
    assert needed <= set(fetch.FILES)
    assert all(len(f.sha256) == 64 and f.where for f in fetch.FILES.values())
    assert {rel for rel, f in fetch.FILES.items() if f.hub_path} == {
        "knowedit/wiki_counterfact_train_cf.json", "knowedit/wiki_recent_recent_train.json", "knowedit/ZsRE-test-all.json"}


def test_recorded_sums_match_the_real_folder():
    root = loaders.data_dir()
    if root is None or not root.is_dir():
        pytest.skip("the real data folder ($INSTRUCTEDIT_DATA) is not available")
    assert {rel: s for rel, s in fetch.status(root).items() if s != "missing"} == {
        rel: "ok" for rel in fetch.FILES if (root / rel).is_file()}
