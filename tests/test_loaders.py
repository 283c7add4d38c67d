"""Tests for instructedit_lite.loaders: hand-written fixtures, broken fixtures and the real files.

The real-file tests read ``$INSTRUCTEDIT_DATA``, a folder in the layout of the published files
(``knowedit/``, ``zsre/``, ``convsent/``, ``counterfact_mend/`` and the instruction file, see
:data:`~instructedit_lite.loaders.REAL_FILES`), and skip when it is unset or a file is absent.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from instructedit_lite import loaders
from instructedit_lite.loaders import (
    CONVSENT_QUESTIONS, REAL_FILES, SkippedDataWarning, available_real_files, data_dir, load_convsent,
    load_counterfact_mend, load_instruction_file, load_knowedit, load_real, load_real_instructions,
    load_zsre_mend,
)
from instructedit_lite.records import TASKS, EditRecord, Probe, RecordError, validate_record

FIX = Path(__file__).parent / "fixtures"
BROKEN = FIX / "broken"


def skipped(call):
    """Run ``call`` with ``on_error="skip"``; return (records, [(dropped, index, field)])."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = call()
    drops = [(w.message.dropped, e.index, e.field)
             for w in caught if issubclass(w.category, SkippedDataWarning) for e in w.message.errors]
    return records, drops


def raises_at(call, path: Path, index, field) -> RecordError:
    with pytest.raises(RecordError) as info:
        call()
    err = info.value
    assert (err.index, err.field) == (index, field)
    assert path.name in str(err) and f"'{field}'" in str(err)
    if index is not None:
        assert f"record {index}" in str(err)
    return err


# --- KnowEdit ----------------------------------------------------------------------------------
def test_knowedit_counterfact_string_ground_truth_is_one_full_answer():
    recs = load_knowedit(FIX / "knowedit_counterfact.json", task="counterfact")
    assert len(recs) == 2
    assert recs[0].ground_truth == ("Sweden",)
    assert recs[0].portability["Reasoning"][0].answers == ("Oslo",)
    assert recs[0].locality["Relation_Specificity"][0] == Probe("The name of the river flowing out of Lake Orvel is",
                                                                ("Orvel River",))


def test_knowedit_record_fields_source_and_index():
    path = FIX / "knowedit_counterfact.json"
    recs = load_knowedit(path, "counterfact")  # task may be given positionally
    assert [(r.task, r.source, r.index) for r in recs] == [("counterfact", str(path), 0), ("counterfact", str(path), 1)]
    assert recs[0].subject == "Lake Orvel"
    assert recs[0].prompt == "The name of the country which Lake Orvel is located in is"
    assert recs[0].rephrase == ()  # wiki_counterfact has no rephrase


def test_knowedit_target_is_stripped_and_empty_record_ground_truth_gives_no_answers():
    rec = load_knowedit(FIX / "knowedit_counterfact.json", task="counterfact")[1]
    assert rec.target_new == "astronaut"
    assert rec.ground_truth == ()


def test_knowedit_probe_kinds_preserved_and_empty_kinds_left_out():
    counterfact = load_knowedit(FIX / "knowedit_counterfact.json", task="counterfact")
    assert list(counterfact[0].locality) == ["Relation_Specificity", "Forgetfulness"]
    assert list(counterfact[0].portability) == ["Subject_Aliasing", "Reasoning"]
    assert counterfact[1].portability == {}
    recent = load_knowedit(FIX / "knowedit_recent.json", task="wikirecent")
    assert list(recent[0].portability) == ["Reasoning"]  # "Logical_Generalization": [] is left out
    assert recent[1].locality == {} and recent[1].portability == {}


def test_knowedit_alias_lists_are_flattened():
    rec = load_knowedit(FIX / "knowedit_recent.json", task="wikirecent")[0]
    assert rec.task == "wikirecent"
    assert rec.ground_truth == ()  # wiki_recent has no record-level ground truth
    assert rec.portability["Reasoning"][0].answers == ("euro", "EUR", "Euro")
    probes = rec.locality["Relation_Specificity"]
    assert probes[0].answers == ("Leningrad", "Saint Petersburg")
    assert probes[1].answers == ("Soviet Union", "USSR")  # empty alias list ignored, duplicate removed
    assert probes[1].answer == "Soviet Union"


def test_knowedit_zsre_list_ground_truth_and_rephrase_forms():
    recs = load_knowedit(FIX / "knowedit_zsre.json", task="zsre")
    assert recs[0].ground_truth == ("Crambidae", "grass moths")
    assert recs[0].rephrase == ("What family is Brastomyx part of?",)
    assert recs[1].rephrase == ("Halvard Peak belongs to which range?", "What range contains Halvard Peak?")
    assert recs[0].portability["Reasoning"][0].answers == ("geometer moths",)
    assert recs[0].locality["Relation_Specificity"][0].answers == ("genus",)


def test_knowedit_limit_keeps_first_records():
    path = FIX / "knowedit_zsre.json"
    full = load_knowedit(path, task="zsre")
    assert load_knowedit(path, task="zsre", limit=1) == full[:1]
    assert load_knowedit(path, task="zsre", limit=0) == []
    assert load_knowedit(path, task="zsre", limit=50) == full


def test_unknown_task_is_an_error():
    path = FIX / "knowedit_zsre.json"
    raises_at(lambda: load_knowedit(path, task="zsRE"), path, None, "task")


@pytest.mark.parametrize("bad", [dict(limit=-1), dict(limit=1.5), dict(on_error="ignore")])
def test_bad_options_are_value_errors(bad):
    with pytest.raises(ValueError):
        load_knowedit(FIX / "knowedit_zsre.json", task="zsre", **bad)


# --- broken KnowEdit files -------------------------------------------------------------------
@pytest.mark.parametrize("name, index, field", [
    ("knowedit_empty_probe.json", 1, "locality.Relation_Specificity[2].ground_truth"),
    ("knowedit_empty_alias_lists.json", 0, "locality.Relation_Specificity[1].ground_truth"),
    ("knowedit_missing_target.json", 2, "target_new"),
    ("knowedit_prompt_not_str.json", 0, "prompt"),
    ("knowedit_locality_not_dict.json", 0, "locality"),
    ("knowedit_gt_number.json", 1, "portability.Reasoning[0].ground_truth"),
    ("not_a_list.json", None, "<file>"),
    ("invalid_json.json", None, "<file>"),
    ("record_not_object.json", 1, "<record>"),
])
def test_broken_knowedit_raises_naming_file_index_field(name, index, field):
    path = BROKEN / name
    raises_at(lambda: load_knowedit(path, task="counterfact"), path, index, field)


def test_missing_required_field_message():
    path = BROKEN / "knowedit_missing_target.json"
    err = raises_at(lambda: load_knowedit(path, task="counterfact"), path, 2, "target_new")
    assert "missing" in err.message


def test_missing_file_is_file_not_found():
    with pytest.raises(FileNotFoundError):
        load_knowedit(FIX / "no_such_file.json", task="zsre")


def test_skip_drops_only_the_broken_probe_and_reports_it():
    path = BROKEN / "knowedit_empty_probe.json"
    recs, drops = skipped(lambda: load_knowedit(path, task="counterfact", on_error="skip"))
    assert drops == [("probe", 1, "locality.Relation_Specificity[2].ground_truth")]
    assert len(recs) == 2
    assert [p.answers for p in recs[1].locality["Relation_Specificity"]] == [("borro",), ("Borran",)]


def test_skip_drops_a_broken_record_and_reports_it():
    path = BROKEN / "knowedit_missing_target.json"
    recs, drops = skipped(lambda: load_knowedit(path, task="counterfact", on_error="skip"))
    assert drops == [("record", 2, "target_new")]
    assert [r.index for r in recs] == [0, 1]


def test_skip_does_not_hide_file_level_errors():
    path = BROKEN / "not_a_list.json"
    raises_at(lambda: load_knowedit(path, task="counterfact", on_error="skip"), path, None, "<file>")


def test_skipped_data_warning_carries_the_error():
    err = RecordError("x.json", 4, "alt", "must not be empty")
    w = SkippedDataWarning(err, "record")
    assert w.error is err and "x.json, record 4, field 'alt'" in str(w)


# --- MEND zsRE ------------------------------------------------------------------------------
def test_zsre_mend_eval_fields_loc_and_portability():
    path = FIX / "zsre_mend_eval.json"
    (rec,) = load_zsre_mend(path)
    assert (rec.task, rec.source, rec.index) == ("zsre", str(path), 0)
    assert rec.subject == "Corvel Games"
    assert rec.prompt == "When was the inception of Corvel Games?"
    assert rec.target_new == "2004"  # " 2004" stripped
    assert rec.ground_truth == ("1999",)
    assert rec.rephrase == ("When was Corvel Games founded?",)
    # loc keeps its "nq question: " prefix, as the reference implementation feeds it
    assert rec.locality == {"NQ": (Probe("nq question: who wrote the song about the yellow boat", ("Pella Sund",)),)}
    assert rec.portability == {"New_Question": (Probe("What industry is Corvel Games, founded in 2004, part of?",
                                                      ("video games",)),)}


def test_zsre_mend_train_has_no_portability():
    recs = load_zsre_mend(FIX / "zsre_mend_train.json")
    assert len(recs) == 2
    assert all(r.portability == {} for r in recs)
    assert recs[0].ground_truth == ("boots", "work boots")
    assert recs[1].locality["NQ"][0].answers == ("1881",)


def test_zsre_mend_empty_alt():
    path = BROKEN / "zsre_mend_empty_alt.json"
    raises_at(lambda: load_zsre_mend(path), path, 1, "alt")
    recs, drops = skipped(lambda: load_zsre_mend(path, on_error="skip"))
    assert [r.index for r in recs] == [0] and drops == [("record", 1, "alt")]


def test_zsre_mend_incomplete_portability():
    path = BROKEN / "zsre_mend_bad_portability.json"
    raises_at(lambda: load_zsre_mend(path), path, 0, "portability.New Question")
    recs, drops = skipped(lambda: load_zsre_mend(path, on_error="skip"))
    assert recs[0].portability == {} and recs[0].locality != {}
    assert drops == [("probe", 0, "portability.New Question")]


# --- ConvSent -----------------------------------------------------------------------------------
def test_convsent_question_templates():
    assert 10 <= len(CONVSENT_QUESTIONS) <= 15
    assert len(set(CONVSENT_QUESTIONS)) == len(CONVSENT_QUESTIONS)
    assert all(q.count("{topic}") == 1 for q in CONVSENT_QUESTIONS)


def test_convsent_responses_stripped_and_empty_dropped():
    recs = load_convsent(FIX / "convsent.json")
    assert recs[0].pos_responses == ("I love it there.", "The beaches are lovely.")
    assert recs[0].neg_responses == ("It is too crowded.", "I did not enjoy it.")
    assert recs[1].neg_responses[:2] == ("It tastes burnt to me.", "Overpriced.")
    assert len(recs[1].neg_responses) == 6


def test_convsent_alternating_sentiment_prompt_and_target():
    path = FIX / "convsent.json"
    recs = load_convsent(path)
    assert [(r.task, r.index, r.source) for r in recs] == [("convsent", i, str(path)) for i in range(3)]
    assert [r.sentiment for r in recs] == ["positive", "negative", "positive"]
    assert [r.topic for r in recs] == [r.subject for r in recs] == ["Marrow Bay", "Tessel Coffee", "Orin Vale"]
    assert [r.prompt for r in recs] == [CONVSENT_QUESTIONS[i].format(topic=r.topic) for i, r in enumerate(recs)]
    assert [r.target_new for r in recs] == ["I love it there.", "It tastes burnt to me.", "A wonderful singer."]
    assert all(r.target_new == r.wanted_responses[0] for r in recs)


@pytest.mark.parametrize("sentiment", ["positive", "negative"])
def test_convsent_forced_sentiment(sentiment):
    recs = load_convsent(FIX / "convsent.json", sentiments=sentiment)
    assert {r.sentiment for r in recs} == {sentiment}
    wanted = [r.pos_responses if sentiment == "positive" else r.neg_responses for r in recs]
    assert [r.target_new for r in recs] == [w[0] for w in wanted]


def test_convsent_bad_sentiments_argument():
    with pytest.raises(ValueError):
        load_convsent(FIX / "convsent.json", sentiments="mixed")


def test_convsent_locality_is_about_the_next_topic():
    recs = load_convsent(FIX / "convsent.json")
    for i, rec in enumerate(recs):
        (probe,) = rec.locality["Other_Topic"]
        other = recs[(i + 1) % 3]
        assert other.topic != rec.topic
        assert probe.prompt == CONVSENT_QUESTIONS[(i + 1) % 3].format(topic=other.topic)
        # both sentiments, alternating, so that the first 2n rows hold n of each
        assert sorted(probe.answers) == sorted(other.pos_responses[:5] + other.neg_responses[:5])
        assert set(probe.answers[:2]) <= set(other.pos_responses) | set(other.neg_responses)
        assert probe.answers[0] in other.pos_responses and probe.answers[1] in other.neg_responses
    # Tessel Coffee has 1 positive and 6 negative responses: 1 + 5 kept
    assert recs[0].locality["Other_Topic"][0].answers == (
        "Their espresso is great.", "It tastes burnt to me.", "Overpriced.", "Not my thing.", "I would skip it.", "Bland.")
    # Orin Vale has 6 positive: the sixth is not kept
    assert "I saw her live once, amazing." not in recs[1].locality["Other_Topic"][0].answers
    assert recs[0].portability == {}


def test_convsent_limit_gives_the_same_records():
    path = FIX / "convsent.json"
    assert load_convsent(path, limit=2) == load_convsent(path)[:2]


def test_convsent_single_topic_has_no_locality(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps([{"ent": "Solo", "pos": [" yes "], "neg": [" no "]}]))
    (rec,) = load_convsent(path)
    assert rec.locality == {} and rec.target_new == "yes"


def test_convsent_broken_topic():
    path = BROKEN / "convsent_pos_not_list.json"
    raises_at(lambda: load_convsent(path), path, 1, "pos")
    # record 0's locality needs topic 1, so even limit=1 reports it
    raises_at(lambda: load_convsent(path, limit=1), path, 1, "pos")
    recs, drops = skipped(lambda: load_convsent(path, on_error="skip"))
    assert [r.index for r in recs] == [0] and drops == [("record", 1, "pos")]


def test_convsent_no_response_of_wanted_sentiment():
    path = BROKEN / "convsent_no_negative.json"
    raises_at(lambda: load_convsent(path), path, 1, "neg")  # index 1 wants a negative response
    assert len(load_convsent(path, sentiments="positive")) == 2


def test_convsent_rejects_other_task():
    path = FIX / "convsent.json"
    raises_at(lambda: load_convsent(path, task="zsre"), path, None, "task")


# --- MEND CounterFact ---------------------------------------------------------------------------
def test_counterfact_mend_neighborhood_locality():
    path = FIX / "counterfact_mend.json"
    recs = load_counterfact_mend(path)
    assert [(r.task, r.index) for r in recs] == [("counterfact", 0), ("counterfact", 1)]
    rec = recs[0]
    assert (rec.subject, rec.prompt, rec.target_new) == ("Ilse Varno", "The mother tongue of Ilse Varno is", "Italian")
    assert rec.ground_truth == ("Dutch",)
    assert rec.rephrase == ("Ilse Varno grew up speaking",)
    assert rec.locality == {"Neighborhood": (Probe("Piet Hollander is a native speaker of", ("Dutch",)),)}
    assert rec.portability == {}


def test_counterfact_mend_missing_locality_prompt():
    path = BROKEN / "counterfact_mend_missing_locality.json"
    raises_at(lambda: load_counterfact_mend(path), path, 1, "locality_prompt")
    recs, drops = skipped(lambda: load_counterfact_mend(path, on_error="skip"))
    assert len(recs) == 2 and recs[1].locality == {}
    assert drops == [("probe", 1, "locality_prompt")]


def test_counterfact_mend_case_id_must_be_int():
    path = BROKEN / "counterfact_mend_bad_case_id.json"
    raises_at(lambda: load_counterfact_mend(path), path, 0, "case_id")


# --- instruction file ----------------------------------------------------------------------------
def test_instruction_file_parsed():
    out = load_instruction_file(FIX / "instructions.json")
    assert set(out) == {"template", "instructions", "heldout_instruction_index"}
    assert out["template"] == "Task: {}\nDescription: {}\nInput: {}"
    assert sorted(out["instructions"]) == sorted(TASKS)
    assert all(len(v) == 10 for v in out["instructions"].values())
    assert out["instructions"]["zsre"][9] == "ZS9: questions."
    assert out["heldout_instruction_index"] == 9


def _set(path, value):
    def edit(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def _delete(*path):
    def edit(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return edit


@pytest.mark.parametrize("edit, field", [
    (_set(["template"], "Task: {task}\nDescription: {description}\nInput: {prompt}"), "template"),
    (_set(["template"], "Task: {}\nInput: {}"), "template"),
    (_set(["template"], "Task: {\nDescription: {}\nInput: {}"), "template"),
    (_set(["template"], 3), "template"),
    (_delete("template"), "template"),
    (_set(["instructions"], {}), "instructions"),  # a subset of the tasks is fine, none is not
    (_set(["instructions", "extra"], ["x"] * 10), "instructions.extra"),
    (_set(["instructions", "counterfact"], ["x"] * 9), "instructions.counterfact"),
    (_set(["instructions", "wikirecent", 3], " "), "instructions.wikirecent[3]"),
    (_set(["instructions", "convsent", 0], "be [LABEL] about it"), "instructions.convsent[0]"),
    (_set(["instructions"], []), "instructions"),
    (_set(["heldout_instruction_index"], 10), "heldout_instruction_index"),
    (_set(["heldout_instruction_index"], True), "heldout_instruction_index"),
    (_set(["heldout_instruction_index"], "9"), "heldout_instruction_index"),
    (_set(["train_instruction_indices"], [0, 1, 2, 3, 4, 5, 6, 7, 9]), "train_instruction_indices"),
])
def test_broken_instruction_file(tmp_path, edit, field):
    data = json.loads((FIX / "instructions.json").read_text())
    edit(data)
    path = tmp_path / "my_instructions.json"
    path.write_text(json.dumps(data))
    raises_at(lambda: load_instruction_file(path), path, None, field)


def test_instruction_file_must_be_an_object():
    path = BROKEN / "knowedit_missing_target.json"  # a list
    raises_at(lambda: load_instruction_file(path), path, None, "<file>")


# --- data folder and registry -------------------------------------------------------------------
EXPECTED_NAMES = {
    "wiki_counterfact", "wiki_recent", "zsre_knowedit", "zsre_mend_portability", "zsre_mend_train",
    "convsent_test", "convsent_val", "counterfact_mend_train", "counterfact_mend_val", "counterfact_mend_edit",
}


def test_registry_entries():
    assert set(REAL_FILES) == EXPECTED_NAMES
    for name, (rel, loader, task) in REAL_FILES.items():
        assert rel.endswith(".json") and not Path(rel).is_absolute()
        assert loader in (load_knowedit, load_zsre_mend, load_convsent, load_counterfact_mend)
        assert task in TASKS
    assert REAL_FILES["wiki_recent"][2] == "wikirecent"
    assert REAL_FILES["zsre_knowedit"] == ("knowedit/ZsRE-test-all.json", load_knowedit, "zsre")


def test_data_dir_argument_env_and_none(monkeypatch, tmp_path):
    monkeypatch.delenv(loaders.ENV_VAR, raising=False)
    assert data_dir() is None
    assert data_dir(tmp_path) == tmp_path
    assert data_dir(str(tmp_path)) == tmp_path
    monkeypatch.setenv(loaders.ENV_VAR, str(tmp_path / "env"))
    assert data_dir() == tmp_path / "env"
    assert data_dir(tmp_path) == tmp_path  # the argument wins
    monkeypatch.setenv(loaders.ENV_VAR, "")
    assert data_dir() is None


def test_load_real_from_a_fake_layout(monkeypatch, tmp_path):
    monkeypatch.delenv(loaders.ENV_VAR, raising=False)
    assert available_real_files() == []
    (tmp_path / "counterfact_mend").mkdir()
    shutil.copy(FIX / "counterfact_mend.json", tmp_path / "counterfact_mend" / "counterfact-val.json")
    (tmp_path / "zsre").mkdir()
    shutil.copy(BROKEN / "zsre_mend_empty_alt.json", tmp_path / "zsre" / "zsre_mend_train-1k.json")
    shutil.copy(FIX / "instructions.json", tmp_path / "instructedit_instructions.json")
    assert available_real_files(tmp_path) == ["zsre_mend_train", "counterfact_mend_val"]

    recs = load_real("counterfact_mend_val", root=tmp_path)
    assert len(recs) == 2 and recs[0].task == "counterfact"
    assert load_real("counterfact_mend_val", root=tmp_path, limit=1) == recs[:1]
    # load_real skips (and reports) unusable items by default; on_error="raise" stops instead
    recs, drops = skipped(lambda: load_real("zsre_mend_train", root=tmp_path))
    assert len(recs) == 1 and drops == [("record", 1, "alt")]
    with pytest.raises(RecordError):
        load_real("zsre_mend_train", root=tmp_path, on_error="raise")

    monkeypatch.setenv(loaders.ENV_VAR, str(tmp_path))
    assert load_real("counterfact_mend_val") == load_real("counterfact_mend_val", root=tmp_path)
    assert load_real_instructions()["heldout_instruction_index"] == 9


def test_load_real_errors(monkeypatch, tmp_path):
    monkeypatch.delenv(loaders.ENV_VAR, raising=False)
    with pytest.raises(ValueError, match="unknown real file"):
        load_real("wiki_countrefact", root=tmp_path)
    with pytest.raises(FileNotFoundError, match=loaders.ENV_VAR):
        load_real("wiki_counterfact")
    with pytest.raises(FileNotFoundError, match="wiki_counterfact"):
        load_real("wiki_counterfact", root=tmp_path)


# --- the real files -------------------------------------------------------------------------------
#: Record counts from the README of the data folder (its table of files).
README_COUNTS = {
    "wiki_counterfact": 1428, "wiki_recent": 570, "zsre_knowedit": 1304, "zsre_mend_portability": 1037,
    "zsre_mend_train": 1000, "convsent_test": 800, "convsent_val": 799, "counterfact_mend_train": 10000,
    "counterfact_mend_val": 1919, "counterfact_mend_edit": 10000,
}

#: Every unusable item in the published files, found when these loaders were written.  Anything
#: else dropped, or any of these no longer dropped, fails the test.
KNOWN_DROPS = {
    "wiki_counterfact": [
        ("probe", 326, "locality.Forgetfulness[0].ground_truth"),          # ground_truth ""
        ("probe", 489, "locality.Relation_Specificity[0].ground_truth"),   # ground_truth ""
    ],
    "wiki_recent": [  # ground_truth [[]] or [[], []]
        ("probe", 138, "locality.Relation_Specificity[3].ground_truth"),
        ("probe", 209, "locality.Relation_Specificity[1].ground_truth"),
        ("probe", 219, "locality.Relation_Specificity[0].ground_truth"),
        ("probe", 297, "locality.Relation_Specificity[0].ground_truth"),
        ("probe", 297, "locality.Relation_Specificity[1].ground_truth"),
        ("probe", 297, "locality.Relation_Specificity[2].ground_truth"),
        ("probe", 567, "locality.Relation_Specificity[3].ground_truth"),
    ],
    "zsre_mend_train": [("record", 534, "alt"), ("record", 723, "alt")],  # alt "" (nothing to edit to)
}


def real_path(name: str) -> Path:
    root = data_dir()
    if root is None:
        pytest.skip(f"{loaders.ENV_VAR} is not set")
    path = root / REAL_FILES[name][0]
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.mark.parametrize("name", sorted(README_COUNTS))
def test_real_file_loads_with_readme_count(name):
    assert set(README_COUNTS) == set(REAL_FILES)
    path = real_path(name)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert len(raw) == README_COUNTS[name]

    recs, drops = skipped(lambda: load_real(name))
    expected = KNOWN_DROPS.get(name, [])
    assert drops == expected
    dropped_records = {i for what, i, _ in expected if what == "record"}
    assert len(recs) == README_COUNTS[name] - len(dropped_records)
    assert [r.index for r in recs] == [i for i in range(len(raw)) if i not in dropped_records]

    task = REAL_FILES[name][2]
    for rec in recs:
        # records and messages name the file relative to the data folder, not by a machine's path
        assert isinstance(rec, EditRecord) and rec.task == task and rec.source == REAL_FILES[name][0]
        validate_record(rec)
        assert rec.target_new == rec.target_new.strip() and rec.prompt == rec.prompt.strip()
    assert EditRecord.from_dict(recs[-1].to_dict()) == recs[-1]


@pytest.mark.parametrize("name", sorted(KNOWN_DROPS))
def test_real_file_with_unusable_items_raises_by_default_in_the_loader(name):
    path = real_path(name)
    _, loader, task = REAL_FILES[name]
    first = KNOWN_DROPS[name][0]
    raises_at(lambda: loader(path, task=task), path, first[1], first[2])


def test_real_wiki_counterfact_ground_truth_is_whole_strings():
    path = real_path("wiki_counterfact")
    raw = json.loads(path.read_text(encoding="utf-8"))
    recs, drops = skipped(lambda: load_knowedit(path, task="counterfact", on_error="skip"))
    assert drops == KNOWN_DROPS["wiki_counterfact"]
    for item, rec in zip(raw, recs):
        assert rec.ground_truth == ((item["ground_truth"].strip(),) if item["ground_truth"].strip() else ())
        for kind, probes in item["portability"].items():
            assert [p.answers for p in rec.portability[kind]] == [(p["ground_truth"].strip(),) for p in probes]


def test_real_wiki_recent_probe_kinds():
    real_path("wiki_recent")
    recs, _ = skipped(lambda: load_real("wiki_recent"))
    kinds = {k for r in recs for k in r.locality} | {k for r in recs for k in r.portability}
    assert kinds <= {"Relation_Specificity", "Forgetfulness", "Subject_Aliasing", "Reasoning", "Logical_Generalization"}
    assert any(not r.portability for r in recs)  # "many records have empty portability"


def test_real_zsre_portability_and_loc_prefix():
    real_path("zsre_mend_portability")
    recs = load_real("zsre_mend_portability")
    assert all(set(r.portability) == {"New_Question"} and set(r.locality) == {"NQ"} for r in recs)
    assert all(r.locality["NQ"][0].prompt.startswith("nq question: ") for r in recs)


def test_real_convsent_alternates_and_uses_other_topics():
    path = real_path("convsent_test")
    recs = load_convsent(path)
    assert [r.sentiment for r in recs[:4]] == ["positive", "negative", "positive", "negative"]
    assert all(r.locality["Other_Topic"][0].prompt != r.prompt for r in recs)
    assert all(not p.startswith(" ") for r in recs for p in r.pos_responses + r.neg_responses)


def test_real_instruction_file():
    root = data_dir()
    if root is None or not (root / loaders.INSTRUCTION_FILE).is_file():
        pytest.skip("official instruction file not available")
    out = load_real_instructions()
    assert sorted(out["instructions"]) == sorted(TASKS)
    assert out["heldout_instruction_index"] == 9
    assert out["template"].count("{}") == 3


# --- every failure is a RecordError naming the file --------------------------------
def _knowedit_item(i: int, **extra) -> dict:
    return {"subject": f"S{i}", "prompt": f"Where is S{i}?", "target_new": "Oslo", **extra}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("encoding, hint", [("latin-1", "not UTF-8"), ("utf-16", "UTF-16 byte-order mark"),
                                            ("utf-16-le", "zero bytes"), ("utf-32-be", "zero bytes")])
@pytest.mark.parametrize("subject", ["Malmö", "Oslo"])  # UTF-16 of ASCII text is valid UTF-8, with NULs
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_text_that_is_not_utf8_is_a_record_error(tmp_path, encoding, hint, subject, on_error):
    if encoding == "latin-1" and subject == "Oslo":
        pytest.skip("ASCII text is UTF-8 too")
    text = json.dumps([_knowedit_item(0, subject=subject)], ensure_ascii=False)
    path = _write(tmp_path / "latin.json", text.encode(encoding))
    err = raises_at(lambda: load_knowedit(path, task="counterfact", on_error=on_error), path, None, "<file>")
    assert hint in err.message
    assert "cannot be read as a whole" in err.message  # a file-level error: skipping records cannot help


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    text = json.dumps([_knowedit_item(0, subject="Malmö")], ensure_ascii=False)
    path = _write(tmp_path / "bom.json", b"\xef\xbb\xbf" + text.encode("utf-8"))
    (rec,) = load_knowedit(path, task="counterfact")
    assert rec.subject == "Malmö"


@pytest.mark.parametrize("content, words", [
    (b'[{"subject": "S", "prompt": "p", "target_new": ' + b"7" * 5000 + b"}]", "cannot read a value"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
])
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_huge_numbers_and_deep_nesting_are_record_errors(tmp_path, content, words, on_error):
    path = _write(tmp_path / "odd.json", content)
    err = raises_at(lambda: load_knowedit(path, task="counterfact", on_error=on_error), path, None, "<file>")
    assert words in err.message and "cannot be read as a whole" in err.message
    assert len(str(err)) < 400  # the offending value is not quoted whole


def test_a_file_whose_every_record_is_dropped_is_an_error(tmp_path):
    path = tmp_path / "all_bad.json"
    path.write_text(json.dumps([{"subject": "s", "prompt": "a"}, {"subject": "t", "prompt": "b"}]))
    err = raises_at(lambda: load_knowedit(path, task="counterfact", on_error="skip"), path, None, "<file>")
    assert "all 2 records were dropped" in err.message and "target_new" in err.message
    # it names the loader used and what the records hold instead
    assert "read with load_knowedit" in err.message
    assert "its first record has the keys (prompt, subject), where load_knowedit expects (locality, prompt, " \
           "target_new)" in err.message
    assert load_knowedit(path, task="counterfact", on_error="skip", limit=0) == []  # nothing asked, nothing dropped


def _many_empty_probes(tmp_path: Path, n: int = 7) -> Path:
    items = [_knowedit_item(i, locality={"Relation_Specificity": [{"prompt": "q", "ground_truth": [[]]},
                                                                  {"prompt": "q2", "ground_truth": "a"}]})
             for i in range(n)]
    items.append(_knowedit_item(n, target_new=""))
    path = tmp_path / "knowedit" / "many.json"
    path.parent.mkdir()
    path.write_text(json.dumps(items))
    return path


def test_repeated_skips_are_summarised_one_warning_per_field(tmp_path):
    path = _many_empty_probes(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recs = load_knowedit(path, task="counterfact", on_error="skip")
    assert len(recs) == 7 and all(len(r.locality["Relation_Specificity"]) == 1 for r in recs)
    messages = [w.message for w in caught if issubclass(w.category, SkippedDataWarning)]
    assert len(messages) == 2  # seven probes in one field, one record: two lines, not eight
    probes, record = messages
    assert (probes.dropped, probes.field, probes.records) == ("probe", "locality.Relation_Specificity[*].ground_truth",
                                                               list(range(7)))
    assert "dropped 7 probes" in str(probes) and "records 0, 1, 2, 3, 4 and 2 more" in str(probes)
    assert (record.dropped, record.records) == ("record", [7]) and "target_new" in str(record)


def test_collect_skipped_gives_a_table_instead_of_warnings(tmp_path):
    path = _many_empty_probes(tmp_path, n=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning would fail the test
        with loaders.collect_skipped() as skips:
            load_knowedit(path, task="counterfact", on_error="skip", source="knowedit/many.json")
    table = skips.table()
    assert list(table.columns) == ["file", "record", "field", "dropped", "reason"]
    assert table["record"].tolist() == [0, 1, 2, 3]
    assert table["dropped"].tolist() == ["probe"] * 3 + ["record"]
    assert set(table["file"]) == {"knowedit/many.json"}
    assert loaders.Skipped().table().empty


def test_load_real_names_files_relative_to_the_data_folder(tmp_path):
    (tmp_path / "zsre").mkdir()
    shutil.copy(BROKEN / "zsre_mend_empty_alt.json", tmp_path / "zsre" / "zsre_mend_train-1k.json")
    with pytest.raises(RecordError) as info:
        load_real("zsre_mend_train", root=tmp_path, on_error="raise")
    assert str(info.value).startswith("zsre/zsre_mend_train-1k.json, record 1") and str(tmp_path) not in str(info.value)
    with loaders.collect_skipped() as skips:
        (rec,) = load_real("zsre_mend_train", root=tmp_path)
    assert rec.source == "zsre/zsre_mend_train-1k.json" and skips.table()["file"].tolist() == [rec.source]


@pytest.mark.parametrize("fixture, loader, kwargs, right", [
    ("counterfact_mend.json", load_knowedit, {"task": "counterfact"}, "load_counterfact_mend"),
    ("zsre_mend_eval.json", load_knowedit, {"task": "zsre"}, "load_zsre_mend"),
    ("convsent.json", load_zsre_mend, {}, "load_convsent"),
    ("knowedit_counterfact.json", load_counterfact_mend, {}, "load_knowedit"),
    ("knowedit_zsre.json", load_convsent, {}, "load_knowedit"),
    ("instructions.json", load_knowedit, {"task": "zsre"}, "load_instruction_file"),
])
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_file_in_another_known_format_names_the_loader_to_use(fixture, loader, kwargs, right, on_error):
    path = FIX / fixture
    err = raises_at(lambda: loader(path, on_error=on_error, **kwargs), path, None, "<file>")
    assert right in err.message


def test_sniff_format_of_the_fixtures():
    expected = {"counterfact_mend.json": "counterfact_mend", "zsre_mend_eval.json": "zsre_mend",
                "zsre_mend_train.json": "zsre_mend", "convsent.json": "convsent",
                "knowedit_counterfact.json": "knowedit", "knowedit_recent.json": "knowedit",
                "knowedit_zsre.json": "knowedit"}
    for name, fmt in expected.items():
        assert loaders.sniff_format(json.loads((FIX / name).read_text())) == fmt, name
    assert loaders.sniff_format([{"a": 1}]) is None and loaders.sniff_format([]) is None


def test_summary_lists_each_record_once(tmp_path):
    probes = [{"prompt": "q", "ground_truth": ""}, {"prompt": "r", "ground_truth": ""}, {"prompt": "s", "ground_truth": "a"}]
    items = [_knowedit_item(i, locality={"Relation_Specificity": probes}) for i in range(2)]
    path = tmp_path / "twice.json"
    path.write_text(json.dumps(items))
    with pytest.warns(SkippedDataWarning) as caught:
        load_knowedit(path, task="counterfact", on_error="skip")
    (warning,) = [w.message for w in caught]
    assert warning.records == [0, 1] and len(warning.errors) == 4
    assert "dropped 4 probes" in str(warning) and "records 0, 1;" in str(warning)


def test_real_mend_counterfact_read_as_knowedit_names_its_loader():
    path = real_path("counterfact_mend_val")  # the case: it used to load and lose its locality probes
    err = raises_at(lambda: load_knowedit(path, task="counterfact", on_error="skip"), path, None, "<file>")
    assert "load_counterfact_mend" in err.message


def test_json_lines_is_named(tmp_path):
    lines = "\n".join(json.dumps(_knowedit_item(i)) for i in range(3))  # MEND's original zsRE files look so
    path = _write(tmp_path / "lines.json", lines.encode())
    err = raises_at(lambda: load_knowedit(path, task="zsre", on_error="skip"), path, None, "<file>")
    assert "JSON Lines" in err.message


def test_convsent_whose_every_topic_is_dropped_names_its_loader(tmp_path):
    path = tmp_path / "topics.json"
    path.write_text(json.dumps([{"ent": "A", "pos": "yes", "neg": []}, {"ent": "B", "pos": 1, "neg": []}]))
    err = raises_at(lambda: load_convsent(path, on_error="skip"), path, None, "<file>")
    assert "read with load_convsent, all 2 records were dropped" in err.message and "field 'pos'" in err.message


# --- skipped items: a summary the chapters can show ----------------------------------------------
def test_skipped_summary_has_one_row_per_file_and_field(tmp_path):
    path = _many_empty_probes(tmp_path)
    with loaders.collect_skipped() as skips:
        load_knowedit(path, task="counterfact", on_error="skip", source="knowedit/many.json")
    summary = skips.summary()
    assert list(summary.columns) == ["file", "dropped", "field", "items", "records", "first reason"]
    assert summary.values.tolist() == [
        ["knowedit/many.json", "probe", "locality.Relation_Specificity[*].ground_truth", 7,
         "0, 1, 2, 3, 4 and 2 more", "no non-empty answer in [[]]"],
        ["knowedit/many.json", "record", "target_new", 1, "7", "must not be empty"],
    ]
    # the same two lines a load outside collect_skipped warns with
    with pytest.warns(SkippedDataWarning) as caught:
        load_knowedit(path, task="counterfact", on_error="skip", source="knowedit/many.json")
    assert [str(w.message) for w in caught] == skips.lines()
    assert skips.lines()[0].startswith("knowedit/many.json: dropped 7 probes, field 'locality.Relation_Specificity"
                                       "[*].ground_truth', records 0, 1, 2, 3, 4 and 2 more")
    assert loaders.Skipped().summary().empty and loaders.Skipped().lines() == []


# --- known formats no loader reads, and probes a loader would not read ----------------------------
@pytest.mark.parametrize("data, words", [
    ([{"case_id": 0, "requested_rewrite": {"prompt": "{} is in", "subject": "Oslo", "target_new": {"str": "Peru"}},
       "paraphrase_prompts": ["p"], "neighborhood_prompts": ["n"]}], "ROME's original CounterFact"),
    ([{"case_id": 0, "requested_rewrite": [{"prompt": "{} is in"}], "questions": ["q"], "answer": "a",
       "new_answer": "b"}], "MQuAKE"),
    ([{"text": "A passage.", "labels": "More text.", "concept": "john", "locality": {}}], "WikiBio"),
    ({"success": [{"question": "q", "ground_truth": "a", "target_new": "I don't know."}], "locality": []},
     "Sanitation"),
])
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_other_known_formats_are_named(tmp_path, data, words, on_error):
    path = tmp_path / "other.json"
    path.write_text(json.dumps(data))
    err = raises_at(lambda: load_knowedit(path, task="counterfact", on_error=on_error), path, None, "<file>")
    assert words in err.message and "no loader here reads" in err.message


def test_sniff_format_goes_by_most_records():
    cf = json.loads((FIX / "counterfact_mend.json").read_text())
    odd = {k: v for k, v in cf[0].items() if k != "locality_prompt"}
    assert loaders.sniff_format([odd] + cf) == "counterfact_mend"  # one odd record does not hide the format
    assert loaders.sniff_format([odd, {"a": 1}, {"b": 2}]) is None


def test_mend_counterfact_with_an_odd_first_record_still_names_its_loader(tmp_path):
    cf = json.loads((FIX / "counterfact_mend.json").read_text())
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([{k: v for k, v in cf[0].items() if k != "locality_prompt"}] + cf))
    err = raises_at(lambda: load_knowedit(path, task="counterfact", on_error="skip"), path, None, "<file>")
    assert "load_counterfact_mend" in err.message


@pytest.mark.parametrize("key", ["locality_rs", "portability_r", "loc", "paraphrase_prompts"])
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_probes_under_a_key_the_loader_does_not_read_are_not_lost_silently(tmp_path, key, on_error):
    # e.g. EasyEdit's flattened KnowEdit records (locality_rs, portability_r): the KnowEdit loader
    # would read them without their probes
    items = [_knowedit_item(0, locality={}), _knowedit_item(1, locality={}, **{key: [{"prompt": "q"}]})]
    path = tmp_path / "flat.json"
    path.write_text(json.dumps(items))
    err = raises_at(lambda: load_knowedit(path, task="counterfact", on_error=on_error), path, 1, key)
    assert "load_knowedit does not read this field" in err.message


def test_keys_a_loader_ignores_knowingly_are_fine(tmp_path):
    items = [_knowedit_item(0, locality={}, cond="x >> y", note="kept out")]
    path = tmp_path / "extra.json"
    path.write_text(json.dumps(items))
    assert len(load_knowedit(path, task="zsre")) == 1


# --- text that is not valid Unicode, values too big to quote ------------------------------------
def test_a_lone_surrogate_is_a_record_error(tmp_path):
    # "\udc80" is valid JSON but half a UTF-16 pair: no tokenizer can encode it
    raw = json.dumps([_knowedit_item(0), _knowedit_item(1, target_new="Os\udc80lo"),
                      _knowedit_item(2, locality={"Relation_Specificity": [{"prompt": "q", "ground_truth": ["a\ud800"]},
                                                                          {"prompt": "r", "ground_truth": "b"}]})])
    path = _write(tmp_path / "surrogate.json", raw.encode())
    err = raises_at(lambda: load_knowedit(path, task="counterfact"), path, 1, "target_new")
    assert "unpaired surrogate \\udc80" in err.message
    recs, drops = skipped(lambda: load_knowedit(path, task="counterfact", on_error="skip"))
    assert [r.index for r in recs] == [0, 2] and len(recs[1].locality["Relation_Specificity"]) == 1
    assert drops == [("record", 1, "target_new"), ("probe", 2, "locality.Relation_Specificity[0].ground_truth")]


def test_a_lone_surrogate_in_a_convsent_response(tmp_path):
    path = _write(tmp_path / "c.json", json.dumps([{"ent": "A", "pos": ["fine", "ba\udfffd"], "neg": ["no"]},
                                                   {"ent": "B", "pos": ["ok"], "neg": ["no"]}]).encode())
    raises_at(lambda: load_convsent(path), path, 0, "pos[1]")


def test_messages_quote_big_values_short(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps([_knowedit_item(0, ground_truth=[list(range(100_000))])]))
    err = raises_at(lambda: load_knowedit(path, task="counterfact"), path, 0, "ground_truth")
    assert len(str(err)) < 300
    data = json.loads((FIX / "instructions.json").read_text())
    data["train_instruction_indices"] = list(range(100_000))
    path = tmp_path / "instructions.json"
    path.write_text(json.dumps(data))
    with pytest.raises(RecordError, match="train_instruction_indices") as info:
        load_instruction_file(path)
    assert len(str(info.value)) < 300


def test_an_unreadable_instruction_file_names_itself(tmp_path):
    path = _write(tmp_path / "instructions.json", (FIX / "instructions.json").read_text().encode("utf-16"))
    err = raises_at(lambda: load_instruction_file(path), path, None, "<file>")
    assert "UTF-16" in err.message and "on_error" not in err.message  # that loader has no on_error
