"""``fetch-data``: download the published task files into the data folder's layout, checked by sha256 (chapter 7).

Only the KnowEdit files have a stable public home that a program can reach (the Hugging Face
dataset ``zjunlp/KnowEdit``); they are downloaded with ``huggingface_hub``.  The others are listed
with where they are published.  Every file, downloaded or already there, is checked against the
sha256 recorded here (taken from the copies the project was developed with), so a changed upstream
file is noticed rather than silently used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .atomic import atomic_write

#: The Hugging Face dataset holding the KnowEdit benchmark.
HUB_REPO = "zjunlp/KnowEdit"


@dataclass(frozen=True)
class DataFile:
    """One file of the layout: its recorded sha256, where it is published, its path on the hub (if any)."""

    sha256: str
    where: str
    hub_path: str | None = None


_EASYEDIT_FORK = "a copy is in the GitHub repository fasdkljfds/EasyEdit, data/KnowEdit/"
_KNOWLEDGE_SPREAD = "GitHub Jometeorie/KnowledgeSpread (commit 51d74026)"

#: Path in the data folder -> the file's recorded checksum and home.
FILES: dict[str, DataFile] = {
    "knowedit/wiki_counterfact_train_cf.json": DataFile(
        "acdc01922afab1d4122249a2c22ad8c1e0e86506dd7a28eec698f22d175ebf9d",
        f"Hugging Face dataset {HUB_REPO}, benchmark/wiki_counterfact/train_cf.json",
        "benchmark/wiki_counterfact/train_cf.json"),
    "knowedit/wiki_recent_recent_train.json": DataFile(
        "5856107412ddeeae2ceea2a15ebd125fd7c86ac8d62b933b095514304a77c73a",
        f"Hugging Face dataset {HUB_REPO}, benchmark/wiki_recent/recent_train.json",
        "benchmark/wiki_recent/recent_train.json"),
    "knowedit/ZsRE-test-all.json": DataFile(
        "d70ff1f69ddcac101bbe9c6f1d6ee3918bdac96f145d937e90fbbb02fcf85fab",
        f"Hugging Face dataset {HUB_REPO}, benchmark/ZsRE/ZsRE-test-all.json",
        "benchmark/ZsRE/ZsRE-test-all.json"),
    "convsent/blender_val.json": DataFile(
        "4c21b2d802ac70877c9356439f676ead4bd9eb767c2f34d582df4b5b200e3882",
        f"ConvSent from SERAC (GitHub eric-mitchell/serac); {_EASYEDIT_FORK}benchmark_Convsent_blender_val.json"),
    "convsent/blender_test.json": DataFile(
        "bfdab01a2655f5b136e593bc0d1d440cea963a1883510da7b31178855db00804",
        f"ConvSent from SERAC (GitHub eric-mitchell/serac); {_EASYEDIT_FORK}benchmark_Convsent_blender_test.json"),
    "zsre/zsre_mend_eval_portability.json": DataFile(
        "0cf155da229b2eccae19fcfe5f7a09523363d357f5f15508d1521f495ad5ecd9",
        "EasyEdit's zsre_mend_eval_portability_gpt4.json (GitHub zjunlp/EasyEdit data); "
        "a copy is fasdkljfds/EasyEdit data/wise/ZsRE/zsre_mend_edit.json"),
    "zsre/zsre_mend_train-1k.json": DataFile(
        "e62596101d8ed551889c26c0d2a5277f92eaef3b14416d8eaee39b04a244ab60",
        f"{_KNOWLEDGE_SPREAD}, data/zsre/zsre_mend_train-1k.json"),
    "counterfact_mend/counterfact-train.json": DataFile(
        "f7d443ffb0c5da6cbe816cdac45281ccb3f204b8a840f00d07a4aafa949bcd76",
        f"{_KNOWLEDGE_SPREAD}, data/counterfact/counterfact-train.json"),
    "counterfact_mend/counterfact-val.json": DataFile(
        "42b44645471020a9419d183deb9e113e82941380046861770ea0083dabd13982",
        f"{_KNOWLEDGE_SPREAD}, data/counterfact/counterfact-val.json"),
    "counterfact_mend/counterfact-edit.json": DataFile(
        "bfe31a7081932739406e282bb625d74222549c3386c15b1df3dfbc3978c69eec",
        f"{_KNOWLEDGE_SPREAD}, data/counterfact/counterfact-edit.json"),
    "instructedit_instructions.json": DataFile(
        "55391e93791b34a05a8582235c2b8beaa0484c56aeebc3f2b5bb48760f321d63",
        "extracted from GitHub zjunlp/EasyEdit examples/test_InstructEdit.py (commit 14cea824)"),
}


class ChecksumError(ValueError):
    """A file's sha256 is not the recorded one."""


class NoNetworkError(ConnectionError):
    """The hub could not be reached (no network, or offline mode)."""


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    """The file's sha256 as hex, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify(path: str | Path, rel: str) -> None:
    """Raise :class:`ChecksumError` unless ``path`` has the sha256 recorded for ``rel``."""
    if rel not in FILES:
        raise KeyError(f"no recorded checksum for {rel!r}; known: {sorted(FILES)}")
    got, want = sha256_of(path), FILES[rel].sha256
    if got != want:
        raise ChecksumError(f"{rel}: sha256 {got} is not the recorded {want}; the published file has changed "
                            f"or the download is damaged (published at: {FILES[rel].where})")


def status(dest: str | Path) -> dict[str, str]:
    """For every file of the layout: ``"ok"``, ``"missing"`` or ``"checksum mismatch"``."""
    dest = Path(dest)
    out = {}
    for rel, info in FILES.items():
        path = dest / rel
        out[rel] = "missing" if not path.is_file() else ("ok" if sha256_of(path) == info.sha256 else "checksum mismatch")
    return out


def _hub_download(hub_path: str, folder: Path, revision: str | None) -> Path:
    """Download one file of :data:`~instructedit_lite.fetch.HUB_REPO` into ``folder``; network failures become
    :class:`NoNetworkError`."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(hf_hub_download(HUB_REPO, hub_path, repo_type="dataset", revision=revision, local_dir=folder))
    except OfflineModeIsEnabled as exc:
        raise NoNetworkError(f"cannot download {HUB_REPO}/{hub_path}: huggingface_hub is in offline mode "
                             f"(HF_HUB_OFFLINE is set); unset it on a machine with a network") from exc
    except (LocalEntryNotFoundError, ConnectionError, TimeoutError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        hint = "HF_HUB_OFFLINE is set; unset it on a machine with a network" if offline else "no network?"
        raise NoNetworkError(f"cannot download {HUB_REPO}/{hub_path}: the Hugging Face hub is not reachable "
                             f"({hint}): {exc}") from exc


def fetch_data(dest: str | Path, *, revision: str | None = None,
               download: Callable[[str, Path, str | None], Path] | None = None,
               log: Callable[[str], None] = print) -> dict[str, str]:
    """Download the files with a hub home into ``dest`` (in the data layout), check all, list the others.

    A file already present with the recorded checksum is not downloaded again; a downloaded file
    is checked before it is moved into place (atomically), so ``dest`` never holds a bad file.
    Returns ``{path: "downloaded" | "present" | "missing: <where published>" | "checksum mismatch"}``.
    Raises :class:`NoNetworkError` when the hub cannot be reached.
    """
    dest = Path(dest)
    download = download or _hub_download
    result: dict[str, str] = {}
    for rel, info in FILES.items():
        target = dest / rel
        if target.is_file():
            result[rel] = "present" if sha256_of(target) == info.sha256 else "checksum mismatch"
            continue
        if info.hub_path is None:
            result[rel] = f"missing: {info.where}"
            continue
        dest.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest))
        try:
            got = download(info.hub_path, tmp, revision)
            verify(got, rel)
            with open(got, "rb") as src:
                atomic_write(target, lambda f: shutil.copyfileobj(src, f))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        result[rel] = "downloaded"
        log(f"{rel}: downloaded from {HUB_REPO} and checked")
    for rel, state in result.items():
        if state.startswith("missing") or state == "checksum mismatch":
            log(f"{rel}: {state}" + (f" (published at: {FILES[rel].where})" if state == "checksum mismatch" else ""))
    log(f"set INSTRUCTEDIT_DATA={os.fspath(dest)} to use this folder")
    return result
