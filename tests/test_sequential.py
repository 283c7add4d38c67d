"""Sequential (lifelong) and batch editing on the tiny world of ``tiny.py``."""

import math
from dataclasses import replace

import pandas as pd
import pytest
import torch
from tiny import hand_records, snapshot, tiny_model, tiny_tokenizer

from instructedit_lite.editors.baselines import FTM, GRACE
from instructedit_lite.editors import MendMethod, WeightEditor, check_restored
from instructedit_lite.editors.mend import MendConfig, MendEditor
from instructedit_lite.sequential import (answer_predictions, batch_deltas, batch_editing, batches, crossing_table,
                                          sequential_editing, streams, threshold_crossings, tidy)
from instructedit_lite.sequential import _checked_stream
from tiny import fact_record


@pytest.fixture(scope="module")
def world():
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # logits with a trained model's range (see test_baselines)
    return tok, model, [fact_record("counterfact", i) for i in range(6)]


class Scrambler(WeightEditor):
    """A fake editor: the first edit adds large noise to one matrix, every later edit adds nothing."""

    name = "scrambler"

    def __init__(self):
        self.calls = 0

    def deltas(self, model, tokenizer, record):
        self.calls += 1
        weight = model.get_parameter("transformer.h.1.mlp.c_proj.weight")
        scale = 5.0 if self.calls == 1 else 0.0
        return {"transformer.h.1.mlp.c_proj.weight": scale * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))}


def test_sequence_restores_bit_identical_weights(world):
    tok, model, records = world
    before = snapshot(model)
    base = answer_predictions(model, tok, [(r.prompt, r.target_new) for r in records])
    base_accuracy = sum(float((p == t).float().mean()) for p, t in base) / len(base)
    # FT-M with a wider box than the reference's 5e-4 (the tiny random model needs it to move)
    curve = sequential_editing(FTM(eps=0.05, lr=1e-2), model, tok, records, every=2, progress=False)
    check_restored(model, before)
    assert list(curve.n_edits) == [0, 2, 4, 6]
    assert math.isnan(curve.retention.iloc[0])  # no edit yet
    # FT-M's edits accumulate: after the sequence they are kept better than the base model knew them.
    assert curve.retention.iloc[-1] > base_accuracy + 0.2


def test_restore_also_after_an_error(world):
    tok, model, records = world
    before = snapshot(model)

    class Failing(Scrambler):
        def deltas(self, model, tokenizer, record):
            if self.calls == 2:
                raise RuntimeError("boom")
            return super().deltas(model, tokenizer, record)

    with pytest.raises(RuntimeError, match="boom"):
        sequential_editing(Failing(), model, tok, records, every=1, progress=False)
    check_restored(model, before)


def test_locality_is_measured_against_the_original_model(world):
    tok, model, records = world
    curve = sequential_editing(Scrambler(), model, tok, records[:3], every=1, progress=False).set_index("n_edits")
    assert curve.loc[0, "locality"] == 1.0
    # The damage of edit 1 stays visible after the later (empty) edits; a comparison with the model
    # as it was just before each edit would report 1.0 from edit 2 on.
    assert curve.loc[1, "locality"] < 0.9
    assert curve.loc[3, "locality"] == pytest.approx(curve.loc[1, "locality"])


def test_grace_codebook_grows_and_is_emptied(world):
    tok, model, records = world
    before = snapshot(model)
    # One-token targets: one replaced vector of a random model cannot spell a multi-token word.
    records = [replace(r, target_new="great") for r in records]
    grace = GRACE(eps_init=1e-3, stop_loss=1.0)  # radius far smaller than the gaps between the tiny model's keys
    curve = sequential_editing(grace, model, tok, records, every=2, progress=False)
    assert list(curve.codebook) == [0.0, 2.0, 4.0, 6.0]
    assert curve.retention.iloc[-1] == 1.0  # every earlier edit is still answered from its entry
    assert curve.locality.iloc[-1] == 1.0
    assert len(grace.codebook) == 0
    assert all(not m._forward_hooks for m in model.modules())
    check_restored(model, before)


def test_convsent_records_are_refused_with_the_record_named(world):
    tok, model, _ = world
    record = hand_records(("convsent",), n=1)["convsent"][0]
    with pytest.raises(ValueError, match="hand/convsent/test, record 0, field 'task'"):
        sequential_editing(FTM(), model, tok, [record], progress=False)


def test_batch_sum_is_the_sum_of_single_edits_and_restores(world):
    tok, model, records = world
    before = snapshot(model)
    ftm = FTM(steps=3)
    total = batch_deltas(ftm, model, tok, records[:2], mode="sum")
    singles = [ftm.deltas(model, tok, r) for r in records[:2]]
    for name, delta in total.items():
        torch.testing.assert_close(delta, singles[0][name] + singles[1][name])
    with pytest.raises(ValueError, match="needs a MEND/KE editor"):
        batch_deltas(ftm, model, tok, records[:2], mode="batched")
    table = batch_editing(ftm, model, tok, records, ks=(1, 3), mode="sum", max_groups=2)
    assert sorted(table.k.unique()) == [1, 3] and len(table) == 4
    check_restored(model, before)


def test_mend_batched_edit_of_one_record_is_the_single_edit(world):
    tok, model, records = world
    editor = MendEditor(model, MendConfig(rank=8, alpha_init=1.0), generator=torch.Generator().manual_seed(0))
    method = MendMethod(editor, "MEND")
    one = batch_deltas(method, model, tok, records[:1], mode="batched")
    single = method.deltas(model, tok, records[0])
    for name in single:
        torch.testing.assert_close(one[name], single[name])
    three = batch_deltas(method, model, tok, records[:3], mode="batched")
    assert not torch.allclose(three[name], single[name])


def test_threshold_crossings_and_tidy():
    import pandas as pd

    curves = pd.DataFrame({"method": ["a"] * 3 + ["b"] * 3, "n_edits": [0, 5, 10] * 2,
                           "retention": [1.0, 0.6, 0.4, 1.0, 0.9, 0.8], "locality": [1.0] * 6})
    table = threshold_crossings(curves, "retention", 0.5).set_index("method")
    assert table.loc["a", "first_below"] == 10 and not table.loc["a", "never_below"]
    assert math.isnan(table.loc["b", "first_below"]) and table.loc["b", "never_below"]
    long = tidy(curves)
    assert set(long.metric) == {"retention", "locality"} and len(long) == 12


def test_streams_and_batches_run_several_methods_on_the_same_records(world):
    tok, model, records = world
    before = snapshot(model)
    methods = {"FT-M": FTM(eps=0.05, lr=1e-2, steps=3), "scrambler": Scrambler()}
    curves = streams(methods, model, tok, records[:4], every=2, progress=False, seed=0)
    assert list(curves.method.unique()) == ["FT-M", "scrambler"]
    assert curves.groupby("method").n_edits.apply(list).map(tuple).unique().tolist() == [(0, 2, 4)]
    check_restored(model, before)
    table = batches({"FT-M": FTM(steps=2)}, model, tok, records, ks=(1, 2), max_groups=1, modes=("sum",))
    assert list(table.label.unique()) == ["FT-M (sum)"] and sorted(table.k) == [1, 2]
    check_restored(model, before)
    # the scrambler's first edit wrecks the answers: its retention falls below 0.5, FT-M's need not
    long, wide = crossing_table(curves, retention=0.5, locality=0.9)
    assert set(long.metric) == {"retention", "locality"}
    assert list(wide.columns) == ["locality < 0.9 at N", "retention < 0.5 at N"]
    assert str(wide.dtypes.iloc[0]) == "Int64" and set(wide.index) == {"FT-M", "scrambler"}


def test_streams_in_processes_give_the_rows_of_one_process(world):
    tok, model, records = world
    before = snapshot(model)
    methods = {"FT-M": FTM(eps=0.05, lr=1e-2, steps=3), "GRACE": GRACE(n_iter=5)}
    one = streams(methods, model, tok, records[:4], every=2, progress=False, seed=0)
    two = streams(methods, model, tok, records[:4], every=2, progress=False, seed=0, processes=2)
    timings = ["edit_seconds"]
    pd.testing.assert_frame_equal(one.drop(columns=timings), two.drop(columns=timings))
    assert one.codebook.max() == 4  # the streams edited: GRACE kept a key per edit
    check_restored(model, before)


class Leaker(WeightEditor):
    """A faulty editor: it also writes into the model outside its returned deltas."""

    name = "leaker"

    def deltas(self, model, tokenizer, record):
        weight = model.get_parameter("transformer.h.1.mlp.c_proj.weight")
        with torch.no_grad():
            weight.add_(1.0)
        return {"transformer.h.1.mlp.c_proj.weight": torch.zeros_like(weight)}


def test_a_stream_in_a_worker_checks_that_its_model_was_restored(world):
    tok, _, records = world
    model = tiny_model(tok)  # its own copy: this test leaves it edited
    with pytest.raises(AssertionError, match="transformer.h.1.mlp.c_proj.weight"):
        _checked_stream(Leaker(), model, tok, records[:2], every=1, progress=False)


def test_answer_predictions_shapes(world):
    tok, model, records = world
    preds = answer_predictions(model, tok, [(r.prompt, r.target_new) for r in records[:3]], batch_size=2)
    assert len(preds) == 3
    assert all(p.shape == t.shape and len(t) >= 1 for p, t in preds)


def test_locality_set_leaves_out_probes_that_another_edit_changes():
    from instructedit_lite.records import Probe
    from instructedit_lite.sequential import _locality_rows

    a, b = fact_record("counterfact", 0), fact_record("counterfact", 1)
    b = replace(b, locality={"Other_Subject": (Probe(a.prompt, ("Paris",)), Probe("Bo Kest works as a", ("pilot",)))})
    assert _locality_rows([a, b]) == [(p.prompt, p.answer) for p in a.locality_probes] + [("Bo Kest works as a", "pilot")]
    assert (a.prompt, "Paris") in _locality_rows([b])  # alone, b's probe is an ordinary locality probe
