"""Unit tests for instructedit_lite.records: validation, ground-truth normalisation, round trip."""

from __future__ import annotations

import json

import pytest

from instructedit_lite.records import EditRecord, Probe, RecordError, answers_from, validate_record


def make(**overrides) -> EditRecord:
    """A valid counterfact record, with some fields replaced."""
    fields = dict(
        task="counterfact", subject="Lake Orvel", prompt="Lake Orvel is located in", target_new="Norway",
        ground_truth=("Sweden",), rephrase=("The country of Lake Orvel is",),
        locality={"Relation_Specificity": (Probe("The river flowing out of Lake Orvel is", ("Orvel River",)),)},
        portability={"Reasoning": (Probe("The capital of the country of Lake Orvel is", ("Oslo",)),)},
        source="fixture.json", index=3,
    )
    fields.update(overrides)
    return EditRecord(**fields)


def make_convsent(**overrides) -> EditRecord:
    fields = dict(
        task="convsent", subject="Marrow Bay", prompt="What do you think of Marrow Bay?",
        target_new="I love it there.", topic="Marrow Bay", sentiment="positive",
        pos_responses=("I love it there.", "Lovely beaches."), neg_responses=("Too crowded.",),
        locality={"Other_Topic": (Probe("Do you like Tessel Coffee?", ("Great espresso.", "Burnt.")),)},
        source="convsent.json", index=0,
    )
    fields.update(overrides)
    return EditRecord(**fields)


# --- validation errors name source, index and field ------------------------------------------
@pytest.mark.parametrize("overrides, field", [
    (dict(task="sentiment"), "task"),
    (dict(prompt=""), "prompt"),
    (dict(prompt="   "), "prompt"),
    (dict(target_new=""), "target_new"),
    (dict(target_new=None), "target_new"),
    (dict(subject=7), "subject"),
    (dict(ground_truth=["Sweden"]), "ground_truth"),          # a list, not a tuple
    (dict(ground_truth=("Sweden", "")), "ground_truth"),
    (dict(rephrase="The country of Lake Orvel is"), "rephrase"),  # a bare string is not a tuple
    (dict(locality=[]), "locality"),
    (dict(locality={"Relation_Specificity": ("not a probe",)}), "locality.Relation_Specificity[0]"),
    (dict(locality={"Relation_Specificity": (Probe("", ("x",)),)}), "locality.Relation_Specificity[0].prompt"),
    (dict(portability={"Reasoning": (Probe("q", ("a",)), Probe("q2", ()))}), "portability.Reasoning[1].answers"),
    (dict(portability={"Reasoning": (Probe("q", ("",)),)}), "portability.Reasoning[0].answers"),
    (dict(sentiment="positive"), "sentiment"),                # only ConvSent records carry one
    (dict(topic="Lake Orvel"), "sentiment"),
])
def test_validation_error_names_source_index_and_field(overrides, field):
    with pytest.raises(RecordError) as info:
        make(**overrides)
    err = info.value
    assert (err.source, err.index, err.field) == ("fixture.json", 3, field)
    assert "fixture.json" in str(err) and "record 3" in str(err) and f"'{field}'" in str(err)


@pytest.mark.parametrize("overrides, field", [
    (dict(topic=None), "topic"),
    (dict(topic="  "), "topic"),
    (dict(sentiment="neutral"), "sentiment"),
    (dict(sentiment=None), "sentiment"),
    (dict(sentiment="negative", neg_responses=()), "neg_responses"),
    (dict(pos_responses=()), "pos_responses"),
    (dict(pos_responses=("ok", " ")), "pos_responses"),
])
def test_convsent_validation(overrides, field):
    with pytest.raises(RecordError) as info:
        make_convsent(**overrides)
    assert (info.value.index, info.value.field) == (0, field)


def test_error_without_source_or_index_says_memory():
    with pytest.raises(RecordError) as info:
        make(source="", index=None, prompt="")
    err = info.value
    assert err.source == "<memory>" and err.index is None
    assert "record" not in str(err) and "'prompt'" in str(err)


def test_record_error_is_a_value_error_with_its_parts():
    err = RecordError("a.json", 0, "alt", "must not be empty")
    assert isinstance(err, ValueError)
    assert str(err) == "a.json, record 0, field 'alt': must not be empty"


def test_validate_record_accepts_valid_records_again():
    validate_record(make())
    validate_record(make_convsent())
    validate_record(make(ground_truth=(), rephrase=(), locality={}, portability={}, subject=""))


# --- answers_from: the three ground-truth shapes ---------------------------------------------
def norm(value):
    return answers_from(value, source="f.json", index=5, field_name="ground_truth")


def test_plain_string_is_one_answer_never_characters():
    assert norm("Paris") == ("Paris",)
    assert norm("deputy of the Basque Parliament") == ("deputy of the Basque Parliament",)


def test_list_of_strings():
    assert norm(["Paris", "City of Light"]) == ("Paris", "City of Light")


def test_list_of_alias_lists_flattened_in_order_without_duplicates():
    value = [["USSR", "Soviet Union"], ["Russia", "USSR"], []]
    assert norm(value) == ("USSR", "Soviet Union", "Russia")


def test_answers_are_stripped_and_empty_ones_dropped():
    assert norm([" Paris ", "", "  ", "Paris"]) == ("Paris",)
    assert norm("") == ()
    assert norm([[], []]) == ()


@pytest.mark.parametrize("value", [None, 3, {"a": "b"}, [1], ["ok", None], [["ok", 2]], [[["deep"]]]])
def test_answers_from_rejects_other_shapes_naming_the_field(value):
    with pytest.raises(RecordError) as info:
        norm(value)
    assert (info.value.source, info.value.index, info.value.field) == ("f.json", 5, "ground_truth")


# --- properties ------------------------------------------------------------------------------
def test_probe_answer_is_first_alias():
    assert Probe("q", ("USSR", "Soviet Union")).answer == "USSR"


def test_probe_views_flatten_kinds():
    rec = make(locality={"A": (Probe("a1", ("x",)), Probe("a2", ("y",))), "B": (Probe("b1", ("z",)),)})
    assert [p.prompt for p in rec.locality_probes] == ["a1", "a2", "b1"]
    assert [p.prompt for p in rec.portability_probes] == ["The capital of the country of Lake Orvel is"]


def test_wanted_and_unwanted_responses_follow_sentiment():
    pos = make_convsent()
    neg = make_convsent(sentiment="negative", target_new="Too crowded.")
    assert pos.wanted_responses == ("I love it there.", "Lovely beaches.")
    assert pos.unwanted_responses == ("Too crowded.",)
    assert neg.wanted_responses == ("Too crowded.",)
    assert neg.unwanted_responses == ("I love it there.", "Lovely beaches.")


# --- to_dict / from_dict ---------------------------------------------------------------------
@pytest.mark.parametrize("rec", [make(), make_convsent(), make(ground_truth=(), locality={}, index=None)])
def test_to_dict_from_dict_round_trip(rec):
    assert EditRecord.from_dict(rec.to_dict()) == rec


@pytest.mark.parametrize("rec", [make(), make_convsent()])
def test_round_trip_through_json(rec):
    data = json.loads(json.dumps(rec.to_dict()))
    back = EditRecord.from_dict(data)
    assert back == rec
    assert isinstance(back.ground_truth, tuple) and isinstance(back.locality_probes[0].answers, tuple)


def test_to_dict_shape():
    d = make().to_dict()
    assert d["locality"] == {"Relation_Specificity": [{"prompt": "The river flowing out of Lake Orvel is",
                                                       "answers": ("Orvel River",)}]}
    assert d["task"] == "counterfact" and d["index"] == 3 and d["topic"] is None


def test_from_dict_validates():
    d = make().to_dict()
    d["target_new"] = ""
    with pytest.raises(RecordError) as info:
        EditRecord.from_dict(d)
    assert info.value.field == "target_new"


def test_probe_with_plain_string_answers_is_rejected():
    with pytest.raises(TypeError, match="tuple of strings"):
        Probe("q", "Paris")


def test_probe_group_that_is_not_a_tuple_is_a_record_error():
    with pytest.raises(RecordError) as info:
        make(locality={"K": Probe("q", ("a",))})
    assert info.value.field == "locality.K"


def test_records_are_hashable_and_equal_records_hash_alike():
    assert hash(make()) == hash(make()) and len({make(), make()}) == 1


def test_from_dict_rejects_unknown_fields():
    data = make().to_dict()
    data["colour"] = "red"
    with pytest.raises(RecordError) as info:
        EditRecord.from_dict(data)
    assert info.value.field == "colour"
