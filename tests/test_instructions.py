"""Tests for instructedit_lite.instructions: descriptions, prefixing, seeded choice, official file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from instructedit_lite.instructions import (
    DESCRIPTIONS,
    TEMPLATE,
    InstructionSet,
    default_instructions,
    maybe_instruct,
    official_instructions,
)
from instructedit_lite.records import TASKS, EditRecord, Probe, RecordError

REPO = Path(__file__).resolve().parents[1]


def fact(task: str = "counterfact", subject: str = "Danielle Darrieux", prompt: str | None = None) -> EditRecord:
    return EditRecord(
        task=task,
        subject=subject,
        prompt=prompt or f"The mother tongue of {subject} is",
        target_new="English",
        ground_truth=("French",),
        rephrase=(f"{subject} grew up speaking", f"{subject}'s first language is"),
        locality={"Relation_Specificity": (Probe(f"{subject} was born in", ("Bordeaux",)),),
                  "Forgetfulness": (Probe("The capital of France is", ("Paris",)),)},
        portability={"Reasoning": (Probe(f"The language {subject} dreams in is", ("English",)),),
                     "Subject_Aliasing": (Probe("The mother tongue of D. Darrieux is", ("English",)),)},
    )


def sentiment_record(sentiment: str = "negative", topic: str = "Taylor Swift") -> EditRecord:
    return EditRecord(
        task="convsent",
        subject=topic,
        prompt=f"What do you think of {topic}?",
        target_new=f"I feel {sentiment}ly about {topic}.",
        locality={"other_topic": (Probe("What do you think of cats?", ("I love cats.",)),)},
        topic=topic,
        sentiment=sentiment,
        pos_responses=(f"{topic} is wonderful.",),
        neg_responses=(f"{topic} is dreadful.",),
    )


def prefix(task: str, description: str) -> str:
    return f"Task: {task}\nDescription: {description}\nInput: "


# Descriptions ------------------------------------------------------------------------------
def test_every_task_has_ten_distinct_descriptions():
    assert set(DESCRIPTIONS) == set(TASKS)
    for task, texts in DESCRIPTIONS.items():
        assert len(texts) == 10, task
        assert len(set(texts)) == 10, task


def test_placeholders_only_in_convsent():
    for task, texts in DESCRIPTIONS.items():
        for text in texts:
            has = ("{sentiment}" in text, "{topic}" in text)
            assert has == ((True, True) if task == "convsent" else (False, False)), (task, text)
            if task != "convsent":
                assert "{" not in text and "}" not in text


def test_template_is_the_papers():
    assert TEMPLATE == "Task: {task}\nDescription: {description}\nInput: {prompt}"
    assert default_instructions().format("zsre", "D.", "Q?") == "Task: zsre\nDescription: D.\nInput: Q?"


def test_seen_and_unseen_split():
    ins = default_instructions()
    for task in TASKS:
        assert ins.seen(task) == DESCRIPTIONS[task][:9]
        assert ins.unseen(task) == DESCRIPTIONS[task][9]


# instruct() --------------------------------------------------------------------------------
def test_instruct_prefixes_prompt_rephrase_portability_only():
    ins = default_instructions()
    rec = fact()
    out = ins.instruct(rec)
    desc = ins.description_for(rec)
    assert desc in ins.seen("counterfact")
    pre = prefix("counterfact", desc)
    assert out.prompt == pre + rec.prompt
    assert out.rephrase == tuple(pre + r for r in rec.rephrase)
    for kind, probes in rec.portability.items():
        assert [p.prompt for p in out.portability[kind]] == [pre + p.prompt for p in probes]
        assert [p.answers for p in out.portability[kind]] == [p.answers for p in probes]
    # Locality stands for ordinary use: byte-for-byte the same.
    assert out.locality == rec.locality
    assert out.target_new == rec.target_new and out.ground_truth == rec.ground_truth
    assert out.subject == rec.subject and out.task == rec.task
    # The original record is untouched (a new one was returned).
    assert rec.prompt == "The mother tongue of Danielle Darrieux is"


def test_instruct_uses_one_description_per_record():
    ins = default_instructions()
    for i in range(30):
        out = ins.instruct(fact(subject=f"Person {i}"))
        texts = [out.prompt, *out.rephrase, *(p.prompt for p in out.portability_probes)]
        descriptions = {t.split("\nDescription: ")[1].split("\nInput: ")[0] for t in texts}
        assert len(descriptions) == 1


def test_maybe_instruct_identity_when_switched_off():
    rec = fact()
    assert maybe_instruct(rec, None, unseen=True, seed=3) is rec
    ins = default_instructions()
    assert maybe_instruct(rec, ins, seed=3) == ins.instruct(rec, seed=3)


# Seeded choice -----------------------------------------------------------------------------
def records(n: int, task: str = "counterfact") -> list[EditRecord]:
    return [fact(task=task, subject=f"Entity number {i}") for i in range(n)]


def test_choice_is_deterministic_across_calls():
    ins = default_instructions()
    recs = records(50)
    first = [ins.description_for(r, seed=7) for r in recs]
    assert first == [ins.description_for(r, seed=7) for r in recs]
    assert first == [default_instructions().description_for(r, seed=7) for r in recs]


_CHILD = """
import json, sys
from instructedit_lite.instructions import default_instructions
from instructedit_lite.records import EditRecord
ins = default_instructions()
recs = [EditRecord(task="wikirecent", subject=f"Entity number {i}", prompt=f"Entity number {i} is part of", target_new="X")
        for i in range(40)]
print(json.dumps([ins.description_for(r, seed=1) for r in recs]))
"""


def test_choice_is_deterministic_across_processes():
    def run(hashseed: str) -> list[str]:
        env = dict(os.environ, PYTHONHASHSEED=hashseed, PYTHONPATH=str(REPO))
        done = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=REPO,
                              capture_output=True, text=True, check=True)
        return json.loads(done.stdout)

    a, b = run("1"), run("12345")
    assert a == b
    ins = default_instructions()
    here = [ins.description_for(EditRecord(task="wikirecent", subject=f"Entity number {i}",
                                           prompt=f"Entity number {i} is part of", target_new="X"), seed=1)
            for i in range(40)]
    assert here == a


@pytest.mark.parametrize("task", ["counterfact", "wikirecent", "zsre"])
def test_seen_choice_never_heldout_and_covers_many(task):
    ins = default_instructions()
    chosen = [ins.description_for(r) for r in records(300, task)]
    assert ins.unseen(task) not in chosen
    assert set(chosen) <= set(ins.seen(task))
    # 300 draws from 9: a working hash reaches (nearly) all; a constant or a bad modulus would not.
    assert len(set(chosen)) >= 7


def test_seed_changes_the_choice():
    ins = default_instructions()
    recs = records(60)
    a = [ins.description_for(r, seed=0) for r in recs]
    b = [ins.description_for(r, seed=1) for r in recs]
    assert sum(x != y for x, y in zip(a, b)) >= 20


def test_choice_depends_on_prompt():
    ins = default_instructions()
    chosen = {ins.description_for(fact(subject="Same", prompt=f"Prompt variant {i}")) for i in range(40)}
    assert len(chosen) >= 5


def test_unseen_uses_heldout_index():
    ins = default_instructions()
    for rec in records(20):
        assert ins.description_for(rec, unseen=True, seed=5) == DESCRIPTIONS["counterfact"][9]
        out = ins.instruct(rec, unseen=True)
        assert out.prompt == prefix("counterfact", DESCRIPTIONS["counterfact"][9]) + rec.prompt


def test_custom_heldout_index():
    ins = InstructionSet(TEMPLATE, dict(DESCRIPTIONS), heldout_index=0)
    assert ins.unseen("zsre") == DESCRIPTIONS["zsre"][0]
    assert ins.seen("zsre") == DESCRIPTIONS["zsre"][1:]
    assert DESCRIPTIONS["zsre"][0] not in {ins.description_for(r) for r in records(200, "zsre")}


# ConvSent -----------------------------------------------------------------------------------
def test_convsent_fills_sentiment_and_topic():
    ins = default_instructions()
    for sentiment in ("positive", "negative"):
        rec = sentiment_record(sentiment, "Taylor Swift")
        desc = ins.description_for(rec)
        assert "{" not in desc and "}" not in desc
        assert sentiment in desc and "Taylor Swift" in desc
        unseen = ins.description_for(rec, unseen=True)
        assert unseen == DESCRIPTIONS["convsent"][9].format(sentiment=sentiment, topic="Taylor Swift")
        out = ins.instruct(rec)
        assert out.prompt == prefix("convsent", desc) + rec.prompt
        assert out.locality == rec.locality
        assert out.target_new == rec.target_new
        assert (out.topic, out.sentiment, out.pos_responses) == (rec.topic, rec.sentiment, rec.pos_responses)


def test_convsent_topic_with_braces_is_kept_literally():
    desc = default_instructions().description_for(sentiment_record("positive", "the {weird} band"))
    assert "the {weird} band" in desc


def test_convsent_missing_sentiment_raises():
    rec = sentiment_record()
    # EditRecord's own validation refuses such a record; bypass it to reach the guard here, which
    # protects against records built some other way (e.g. object.__setattr__, duck-typed inputs).
    object.__setattr__(rec, "sentiment", None)
    with pytest.raises(RecordError) as err:
        default_instructions().description_for(rec)
    assert err.value.field == "sentiment"
    rec2 = sentiment_record()
    object.__setattr__(rec2, "topic", "")
    with pytest.raises(RecordError) as err:
        default_instructions().instruct(rec2)
    assert err.value.field == "topic"


def test_unknown_task_in_set_raises():
    ins = InstructionSet(TEMPLATE, {"zsre": DESCRIPTIONS["zsre"]})
    with pytest.raises(RecordError, match="counterfact"):
        ins.instruct(fact())


# Validation of sets --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(template="Task: {task}\nInput: {prompt}"), "template"),
        (dict(descriptions={"zsre": DESCRIPTIONS["zsre"][:9]}), "instructions.zsre"),
        (dict(descriptions={"zsre": ("Same.",) * 10}), "instructions.zsre"),
        (dict(descriptions={"recent": DESCRIPTIONS["wikirecent"]}), "instructions.recent"),
        (dict(descriptions={"zsre": DESCRIPTIONS["zsre"][:9] + ("About {topic}.",)}), "instructions.zsre[9]"),
        (dict(descriptions={"convsent": DESCRIPTIONS["convsent"][:9] + ("Be {sentiment}.",)}), "instructions.convsent[9]"),
        (dict(heldout_index=10), "heldout_instruction_index"),
    ],
)
def test_instruction_set_validation(kwargs, field):
    args = dict(template=TEMPLATE, descriptions=dict(DESCRIPTIONS)) | kwargs
    with pytest.raises(RecordError) as err:
        InstructionSet(**args)
    assert err.value.field == field


# Official file --------------------------------------------------------------------------------
def official_like(**overrides) -> dict:
    data = {
        "source": "hand-written fixture",
        "template": "Task: {}\nDescription: {}\nInput: {}",
        "heldout_instruction_index": 9,
        "instructions": {
            "counterfact": [f"Fixture counterfact description {i}." for i in range(10)],
            "convsent": [f"Fixture {i}: be [LABEL] about [TOPIC]." for i in range(10)],
        },
    }
    data.update(overrides)
    return data


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "instructions.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_official_fixture_is_converted(tmp_path):
    path = write(tmp_path, official_like())
    ins = official_instructions(path)
    assert ins.template == TEMPLATE
    assert ins.heldout_index == 9 and ins.source == str(path)
    assert set(ins.descriptions) == {"counterfact", "convsent"}
    assert ins.descriptions["convsent"][3] == "Fixture 3: be {sentiment} about {topic}."
    assert ins.unseen("counterfact") == "Fixture counterfact description 9."
    out = ins.instruct(sentiment_record("positive", "jazz"), unseen=True)
    assert out.prompt == prefix("convsent", "Fixture 9: be positive about jazz.") + "What do you think of jazz?"


def test_official_fixture_keeps_literal_braces_in_template(tmp_path):
    ins = official_instructions(write(tmp_path, official_like(template="[{x}] Task: {}\nDescription: {}\nInput: {}")))
    assert ins.format("zsre", "D", "P") == "[{x}] Task: zsre\nDescription: D\nInput: P"


def test_official_fixture_heldout_index_is_used(tmp_path):
    ins = official_instructions(write(tmp_path, official_like(heldout_instruction_index=2)))
    assert ins.unseen("counterfact") == "Fixture counterfact description 2."
    assert "Fixture counterfact description 2." not in ins.seen("counterfact")


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(template="Task: {}\nInput: {}"), "template"),
        (dict(template=None), "template"),
        (dict(instructions={"counterfact": ["only one"]}), "instructions.counterfact"),
        (dict(instructions={"counterfact": "not a list"}), "instructions.counterfact"),
        (dict(instructions={}), "instructions"),
        (dict(instructions={"convsent": [f"Fixture {i} about [TOPIC]." for i in range(10)]}), "instructions.convsent[0]"),
        (dict(instructions={"recent": [f"R {i}." for i in range(10)]}), "instructions.recent"),
        (dict(heldout_instruction_index="9"), "heldout_instruction_index"),
    ],
)
def test_official_broken_fixture_names_the_field(tmp_path, overrides, field):
    path = write(tmp_path, official_like(**overrides))
    with pytest.raises(RecordError) as err:
        official_instructions(path)
    assert err.value.field == field
    assert err.value.source == str(path) and err.value.index is None
    assert field in str(err.value)


def test_official_not_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(RecordError) as err:
        official_instructions(path)
    assert err.value.source == str(path)


def test_official_real_file():
    folder = os.environ.get("INSTRUCTEDIT_DATA")
    if not folder or not (Path(folder) / "instructedit_instructions.json").is_file():
        pytest.skip("INSTRUCTEDIT_DATA does not point to a folder with instructedit_instructions.json")
    path = Path(folder) / "instructedit_instructions.json"
    ins = official_instructions(path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert ins.template == TEMPLATE
    assert ins.heldout_index == raw["heldout_instruction_index"]
    assert set(ins.descriptions) <= set(TASKS) and ins.descriptions
    for task, texts in ins.descriptions.items():
        assert len(texts) == 10
        assert ins.unseen(task) == texts[ins.heldout_index]
    if "convsent" in ins.descriptions:
        desc = ins.description_for(sentiment_record("negative", "jazz"))
        assert "[LABEL]" not in desc and "[TOPIC]" not in desc and "negative" in desc and "jazz" in desc
    if "counterfact" in ins.descriptions:
        out = ins.instruct(fact(), unseen=True)
        assert out.prompt.startswith(prefix("counterfact", ins.unseen("counterfact")))
        assert out.locality == fact().locality
