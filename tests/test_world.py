"""The embedded world: determinism, sizes, disjoint splits, and records that make sense."""

import subprocess
import sys

import pytest

from instructedit_lite.records import EditRecord
from instructedit_lite.world import RELATIONS, SPLITS, World, WorldConfig

TASKS = ("counterfact", "wikirecent", "convsent", "zsre")


@pytest.fixture(scope="module")
def world():
    return World()


def _fingerprint(world: World) -> list:
    return [world.corpus] + [[r.to_dict() for r in world.records(t, s)] for t in TASKS for s in SPLITS]


def test_same_config_same_world(world):
    assert _fingerprint(world) == _fingerprint(World(WorldConfig()))


def test_same_world_in_another_process(world):
    # Python salts str hashes per process; nothing in the world may depend on them.
    code = ("from instructedit_lite.world import World; import hashlib, json;"
            "w = World(); print(hashlib.sha256(json.dumps([w.corpus, [r.to_dict() for r in w.records('counterfact', 'test')]]).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": seed, "PATH": ""},
                              capture_output=True, text=True, check=True).stdout for seed in ("1", "2")}
    assert len(digests) == 1


def test_seed_changes_the_world(world):
    other = World(WorldConfig(seed=1))
    assert other.known_people != world.known_people
    assert [r.prompt for r in other.records("counterfact", "test")] != [r.prompt for r in world.records("counterfact", "test")]


def test_sizes_are_large_enough(world):
    assert len(world.known_facts) >= 1000
    for task in TASKS:
        assert len(world.records(task, "test")) >= 200
    for task in ("counterfact", "wikirecent", "convsent"):
        assert len(world.records(task, "train")) >= 250
    assert world.records("zsre", "train") == []  # held out: no editor trains on it


@pytest.mark.parametrize("task", TASKS)
def test_splits_are_disjoint_by_subject(world, task):
    subjects = {s: {r.subject for r in world.records(task, s)} for s in SPLITS}
    assert not subjects["train"] & subjects["val"]
    assert not subjects["train"] & subjects["test"]
    assert not subjects["val"] & subjects["test"]


def test_counterfact_and_zsre_share_no_subject(world):
    cf = {r.subject for s in SPLITS for r in world.records("counterfact", s)}
    zs = {r.subject for s in SPLITS for r in world.records("zsre", s)}
    assert not cf & zs


def test_held_out_phrasings_never_appear_in_corpus(world):
    corpus = set(world.corpus)
    for fact in world.known_facts[::7]:
        for i in world.held_out_phrasings(fact):
            assert f"{world.prompt(fact, i)} {fact.object}." not in corpus
        for i in world.trained_phrasings(fact):
            assert f"{world.prompt(fact, i)} {fact.object}." in corpus
    # ...and yet every phrasing of every relation is used in the corpus for *some* subject.
    text = "\n".join(world.corpus)
    for relation in RELATIONS.values():
        for phrasing in relation.phrasings:
            head = phrasing.split("{s}")[-1].strip() or phrasing.split("{s}")[0].strip()
            assert head in text, phrasing


def test_counterfact_records(world):
    for r in world.records("counterfact", "test"):
        assert isinstance(r, EditRecord)
        assert r.target_new not in r.ground_truth
        assert r.ground_truth == (world.lookup(r.subject, _relation_of(world, r)),)
        assert r.rephrase and r.prompt not in r.rephrase
        assert "Other_Subject" in r.locality


def test_wikirecent_subjects_are_unseen(world):
    text = "\n".join(world.corpus)
    for r in world.records("wikirecent", "test")[:50]:
        assert r.subject not in text
        assert r.ground_truth == ()


def test_convsent_asks_for_the_other_sentiment(world):
    for r in world.records("convsent", "test"):
        assert r.sentiment != world.topic_sentiment[r.topic]
        assert r.target_new in r.wanted_responses
        other = r.locality["Other_Topic"][0]
        assert r.topic not in other.prompt


def test_zsre_uses_questions(world):
    for r in world.records("zsre", "test"):
        assert r.prompt.endswith("?") and all(p.endswith("?") for p in r.rephrase)


def test_portability_is_a_second_hop_of_the_new_object(world):
    r = next(r for r in world.records("counterfact", "test") if "Reasoning" in r.portability)
    probe = r.portability["Reasoning"][0]
    assert r.subject in probe.prompt
    # the answer is a property of the *new* object
    second = {"citizenship": "currency", "birthplace": "country_of_city", "country_of_city": "continent"}
    assert probe.answer == world.lookup(r.target_new, second[_relation_of(world, r)])


def test_bad_split_and_task_names(world):
    with pytest.raises(KeyError, match="unknown task"):
        world.records("nope", "test")
    with pytest.raises(KeyError, match="unknown split"):
        world.records("counterfact", "dev")


def _relation_of(world, record):
    return next(rel for rel, spec in RELATIONS.items()
                if any(p.format(s=record.subject) == record.prompt for p in spec.phrasings + spec.questions))
