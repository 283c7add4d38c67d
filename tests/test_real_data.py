"""Tests for instructedit_lite.real_data: splits, ConvSent topics, ZsRE, instructions and the missing-data error.

Most tests build a tiny data folder in ``tmp_path`` from tests/fixtures; the last ones read the
real folder named by ``$INSTRUCTEDIT_DATA`` and skip when it is unset.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest

from instructedit_lite import loaders, real_data
from instructedit_lite.real_data import SPLITS, DataMissingError, RealData, available, missing_files
from instructedit_lite.records import RecordError, alternating

FIX = Path(__file__).parent / "fixtures"


def _knowedit(n: int, n_subjects: int) -> list[dict]:
    """``n`` KnowEdit records over ``n_subjects`` subjects (some subjects have several records)."""
    base = json.loads((FIX / "knowedit_counterfact.json").read_text())[0]
    out = []
    for i in range(n):
        item = copy.deepcopy(base)
        subject = f"Lake {i % n_subjects:03d}"
        item["subject"] = subject if i % 2 else subject.upper()  # subjects compare case-insensitively
        item["prompt"] = f"The country of {subject} ({i}) is"
        out.append(item)
    return out


def _convsent(n: int, tag: str) -> list[dict]:
    return [{"ent": f"{tag} topic {i}", "pos": [f" I like {tag} {i}. ", " Lovely. "],
             "neg": [f" I dislike {tag} {i}. ", " Awful. "]} for i in range(n)]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A data folder in the published layout, with files small enough for unit tests."""
    for rel in ("knowedit", "convsent", "zsre"):
        (tmp_path / rel).mkdir()
    (tmp_path / "knowedit/wiki_counterfact_train_cf.json").write_text(json.dumps(_knowedit(60, 40)))
    shutil.copy(FIX / "knowedit_recent.json", tmp_path / "knowedit/wiki_recent_recent_train.json")
    (tmp_path / "convsent/blender_val.json").write_text(json.dumps(_convsent(20, "val")))
    (tmp_path / "convsent/blender_test.json").write_text(json.dumps(_convsent(5, "test")))
    shutil.copy(FIX / "zsre_mend_eval.json", tmp_path / "zsre/zsre_mend_eval_portability.json")
    train = json.loads((FIX / "zsre_mend_train.json").read_text())
    train.append(dict(train[0], subject="CORVEL GAMES"))  # the test file's subject: not a val record
    (tmp_path / "zsre/zsre_mend_train-1k.json").write_text(json.dumps(train))
    return tmp_path


def test_counts_per_task_and_split(folder):
    counts = RealData(folder).counts()
    assert list(counts.columns) == list(SPLITS) and list(counts.index) == list(real_data.data_tasks())
    # 60 records: 70 / 10 / 20 %, in whole subjects of one or two records
    train, val, test = counts.loc["counterfact"].tolist()
    assert train + val + test == 60 and 11 <= test <= 13 and 5 <= val <= 7
    assert counts.loc["convsent"].tolist() == [36, 4, 10]  # 18 / 2 topics of blender_val, 5 of blender_test, ×2
    assert counts.loc["zsre"].tolist() == [0, 2, 1]  # held out: never trained on
    assert counts.loc["wikirecent"].sum() == 2


def test_fact_splits_are_subject_disjoint_complete_and_seeded(folder):
    data = RealData(folder, seed=3)
    splits = {s: data.records("counterfact", s) for s in SPLITS}
    subjects = {s: {r.subject.lower() for r in rs} for s, rs in splits.items()}
    assert not subjects["train"] & subjects["val"] and not subjects["train"] & subjects["test"]
    assert not subjects["val"] & subjects["test"]
    assert sorted(r.index for rs in splits.values() for r in rs) == list(range(60))
    again = RealData(folder, seed=3)
    assert [r.index for r in again.records("counterfact", "test")] == [r.index for r in splits["test"]]
    other = RealData(folder, seed=4)
    assert [r.index for r in other.records("counterfact", "test")] != [r.index for r in splits["test"]]


def test_convsent_topics_sentiments_and_locality_stay_in_their_split(folder):
    data = RealData(folder)
    topics = {s: {r.topic for r in data.records("convsent", s)} for s in SPLITS}
    assert not topics["train"] & topics["val"]
    assert all(t.startswith("test") for t in topics["test"]) and len(topics["test"]) == 5
    for split in SPLITS:
        recs = data.records("convsent", split)
        by_topic = {}
        for r in recs:
            by_topic.setdefault(r.topic, []).append(r.sentiment)
        assert all(sorted(v) == ["negative", "positive"] for v in by_topic.values())  # both wanted sentiments
        for r in recs:
            assert r.target_new == (r.pos_responses if r.sentiment == "positive" else r.neg_responses)[0]
            (probe,) = r.locality["Other_Topic"]
            other = next(o for o in recs if o.prompt == probe.prompt)
            assert other.topic != r.topic and other.topic in topics[split]
            assert probe.answers == alternating(other.pos_responses, other.neg_responses)  # both sentiments


def test_convsent_alternate_gives_one_edit_per_topic(folder):
    data = RealData(folder, convsent_sentiments="alternate")
    train, val, test = data.counts().loc["convsent"].tolist()
    assert (train + val, test) == (20, 5) and val in (2, 3)  # 12.5 % of blender_val's 20 topics
    assert {r.sentiment for r in data.records("convsent", "test")} == {"positive", "negative"}


def test_zsre_is_held_out_with_val_from_the_train_file(folder):
    data = RealData(folder)
    assert data.records("zsre", "train") == []
    (test,) = data.records("zsre", "test")
    assert test.source == "zsre/zsre_mend_eval_portability.json" and test.portability
    val = data.records("zsre", "val")
    assert {r.subject for r in val} == {"Dunmar", "Pell Orr"}  # the test subject is left out
    os.remove(folder / "zsre/zsre_mend_train-1k.json")
    assert RealData(folder).records("zsre", "val") == []


def test_official_instructions_when_present(folder):
    data = RealData(folder)
    assert data.instructions_source == "project"
    assert data.instructions().heldout_index == 9
    shutil.copy(FIX / "instructions.json", folder / loaders.INSTRUCTION_FILE)
    assert data.instructions_source == "official"
    assert data.instructions().unseen("zsre") == "ZS9: questions."


def test_missing_data_is_a_clear_error(folder, monkeypatch):
    assert available(folder) and missing_files(folder) == []
    os.remove(folder / "convsent/blender_test.json")
    assert not available(folder)
    with pytest.raises(DataMissingError) as info:
        RealData(folder)
    message = str(info.value)
    assert "convsent/blender_test.json" in message and "serac" in message and "fetch-data" in message
    monkeypatch.delenv(loaders.ENV_VAR, raising=False)
    assert not available()
    with pytest.raises(DataMissingError, match="INSTRUCTEDIT_DATA"):
        RealData()
    monkeypatch.setenv(loaders.ENV_VAR, str(folder))
    assert missing_files() == ["convsent/blender_test.json"]


def test_bad_arguments(folder):
    with pytest.raises(ValueError):
        RealData(folder, fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError):
        RealData(folder, convsent_sentiments="positive")
    with pytest.raises(KeyError):
        RealData(folder).records("zsRE", "test")
    with pytest.raises(KeyError):
        RealData(folder).records("zsre", "dev")


def test_parsed_records_are_cached_and_reread_when_a_file_changes(folder):
    first = RealData(folder).records("counterfact", "train")
    assert RealData(folder).records("counterfact", "train")[0] is first[0]
    path = folder / "knowedit/wiki_counterfact_train_cf.json"
    path.write_text(json.dumps(_knowedit(30, 30)))
    os.utime(path, ns=(1, 1))  # a new mtime even on coarse clocks
    assert RealData(folder).counts().loc["counterfact"].sum() == 30


def test_dropped_items_are_kept_as_a_table(folder):
    items = _knowedit(10, 10)
    items[3]["target_new"] = ""
    (folder / "knowedit/wiki_counterfact_train_cf.json").write_text(json.dumps(items))
    data = RealData(folder)
    data.counts()
    table = data.skipped_table()
    assert table[["file", "record", "field"]].values.tolist() == [
        ["knowedit/wiki_counterfact_train_cf.json", 3, "target_new"]]
    # one row per file and field, as a chapter shows it
    assert data.skipped.summary()[["file", "dropped", "field", "items", "records"]].values.tolist() == [
        ["knowedit/wiki_counterfact_train_cf.json", "record", "target_new", 1, "3"]]


def test_a_file_of_another_format_in_the_layout_names_its_loader(folder):
    # MEND's CounterFact where KnowEdit's is expected: it used to load, without its locality probes
    shutil.copy(FIX / "counterfact_mend.json", folder / "knowedit/wiki_counterfact_train_cf.json")
    with pytest.raises(RecordError) as info:
        RealData(folder).records("counterfact", "train")
    message = str(info.value)
    assert message.startswith("knowedit/wiki_counterfact_train_cf.json") and "load_counterfact_mend" in message
    assert str(folder) not in message


# --- the real folder ------------------------------------------------------------------------------
@pytest.fixture
def real() -> RealData:
    if loaders.data_dir() is None or not available():
        pytest.skip("the real data folder ($INSTRUCTEDIT_DATA) is not available")
    return RealData()


def test_real_counts(real):
    counts = real.counts()
    assert counts.loc["counterfact"].sum() == 1428 and counts.loc["wikirecent"].sum() == 570
    assert counts.loc["zsre"].tolist()[::2] == [0, 1037]
    assert counts.loc["convsent", "test"] == 2 * 800
    assert counts.loc["convsent", ["train", "val"]].sum() == 2 * 799
    for task in ("counterfact", "wikirecent"):  # within a subject group of the 20 % / 10 % targets
        n = counts.loc[task].sum()
        assert abs(counts.loc[task, "test"] - 0.2 * n) <= 3 and abs(counts.loc[task, "val"] - 0.1 * n) <= 3


def test_real_counts_are_the_documented_ones(real):
    # the numbers in real_data's docstring (seed 0, 70/10/20 %, both sentiments)
    assert real.counts().values.tolist() == [[999, 143, 286], [399, 57, 114], [1398, 200, 1600], [0, 997, 1037]]
    assert len(real.skipped) == 11 and real.skipped.summary()["items"].tolist() == [1, 1, 7, 2]


def test_real_splits_are_disjoint_and_instructions_official(real):
    for task, key in (("counterfact", "subject"), ("wikirecent", "subject"), ("convsent", "topic")):
        seen: set[str] = set()
        for split in SPLITS:
            names = {getattr(r, key).strip().lower() for r in real.records(task, split)}
            assert not names & seen, (task, split)
            seen |= names
    if (real.folder / loaders.INSTRUCTION_FILE).is_file():
        assert real.instructions_source == "official"
        assert "[LABEL]" not in real.instructions().unseen("convsent")


def test_a_task_declared_once_is_read_instructed_proposed_and_evaluated(folder):
    """One Task declaration brings a task's files and reader, descriptions and proposer summary: the
    real data reads it, the instructions prefix it, the proposer describes it, the evaluation scores it."""
    from tiny import tiny_model, tiny_tokenizer

    from instructedit_lite import tasks
    from instructedit_lite.editors import Unedited
    from instructedit_lite.evaluate import evaluate_methods
    from instructedit_lite.instructions import default_instructions
    from instructedit_lite.proposers import proposal_messages

    (folder / "mquake").mkdir()
    (folder / "mquake/edits.json").write_text(json.dumps(_knowedit(12, 6)))
    descriptions = tuple(f"Edit a fact that other facts depend on, variant {i}." for i in range(10))
    tasks.register_task(tasks.Task("mquake", kind="fact", role="held_out", color="#882255", descriptions=descriptions,
                                   summary="edit a fact that several-hop questions depend on",
                                   files=("mquake/edits.json",), reader="knowedit"))
    try:
        data = RealData(folder)
        assert "mquake" in data.tasks and "mquake" not in data.training_tasks
        test = data.records("mquake", "test")
        assert test and {r.task for r in test} == {"mquake"}
        assert sum(len(data.records("mquake", s)) for s in SPLITS) == 12
        assert default_instructions().unseen("mquake") == descriptions[9]
        assert "several-hop questions" in proposal_messages("mquake", [(descriptions[0], 0.5)])[-1]["content"]
        tok = tiny_tokenizer()
        cases = evaluate_methods([Unedited()], tiny_model(tok), tok, {"mquake": test[:2]}, wild_tokens=4, progress=False)
        assert list(cases.task) == ["mquake", "mquake"] and cases.reliability.notna().all()
        (folder / "mquake/edits.json").unlink()
        with pytest.raises(DataMissingError, match="mquake/edits.json"):
            RealData(folder)
    finally:
        tasks.unregister_task("mquake")
    assert "mquake" not in RealData(folder).tasks


def test_a_task_declares_its_files_with_a_reader():
    from instructedit_lite import tasks

    with pytest.raises(ValueError, match="files and reader go together"):
        tasks.Task("mquake", files=("mquake/edits.json",))
