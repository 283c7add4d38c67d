"""The instruction search: the stop rule, the loop's bookkeeping, the trial editor on a tiny real
model, and the output file's round trip through ``InstructionSet``."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pandas as pd
import pytest
import torch

from instructedit_lite import optimize as opt
from instructedit_lite import cli
from instructedit_lite.proposers import make_proposer
from instructedit_lite.instructions import default_instructions, official_instructions
from instructedit_lite.editors.mend import MendConfig, MendEditor
from instructedit_lite.proposers import Proposer, to_brackets
from tiny import hand_records, snapshot, tiny_model, tiny_tokenizer

N = 24  # search records per task in the stub world


class StubTrial:
    """A trial editor whose per-record scores are ``value(text) + noise``, with values set by the
    test (starting texts 0.5) and noise fixed per text (seeded by its CRC)."""

    def __init__(self, values, noise=0.05):
        self.start, self.values, self.key = default_instructions(), values, "stub"
        self.noise = noise
        self.calls = []

    def fits(self, task, text):
        return True

    def score(self, task, text):
        self.calls.append(text)
        v = self.values.get(text, 0.5) + np.random.default_rng(zlib.crc32(text.encode())).normal(0, self.noise, N)
        return pd.DataFrame({"case": range(N), "reliability": v, "generalization": v, "locality": v, "score": v})


class ListProposer(Proposer):
    """Hands out prepared candidates, one list per call; records what it was shown."""

    def __init__(self, batches):
        self.batches, self.shown = list(batches), []

    def propose(self, task, incumbents, n, rng):
        self.shown.append(list(incumbents))
        return self.batches.pop(0)

    def key(self):
        return json.dumps({"proposer": "list", "id": id(self)})


def text(i):
    return f"Answer the question about the entity with the new answer, version {chr(97 + i)}."


def run(values, batches, **settings):
    config = opt.SearchConfig(tasks=("zsre",), candidates=2, **settings)
    proposer = ListProposer(batches)
    return opt.optimize_instructions(StubTrial(values), proposer, config, progress=False), proposer


def test_significant_gain_needs_its_interval_above_zero():
    rng = np.random.default_rng(1)
    inc = rng.uniform(0.3, 0.7, 40)
    clear = opt.significant_gain(inc + 0.1 + rng.normal(0, 0.05, 40), inc)
    assert clear["significant"] == 1.0 and 0.05 < clear["low"] < clear["difference"] < clear["high"]
    noisy = opt.significant_gain(inc + 0.01 + rng.normal(0, 0.2, 40), inc)
    assert noisy["significant"] == 0.0 and noisy["low"] < 0 < noisy["high"]
    with pytest.raises(ValueError, match="paired"):
        opt.significant_gain([0.1, 0.2], [0.1])


def test_search_that_keeps_improving_runs_to_the_budget():
    values = {text(i): 0.6 + 0.1 * i for i in range(4)}
    result, proposer = run(values, [[text(i), "too short."] for i in range(4)], rounds=4, patience=1)
    inc = result.incumbents
    assert inc.incumbent.tolist()[1:] == [text(i) for i in range(4)]  # a new incumbent every round
    assert inc.score.is_monotonic_increasing
    assert result.stopped["zsre"] == "round budget (4) reached" and len(proposer.batches) == 0
    # The proposer saw the scored descriptions, best first in its second call: the first candidate.
    assert max(proposer.shown[1], key=lambda p: p[1])[0] == text(0)
    assert result.rejections.to_dict("records") == [{"task": "zsre", "reason": "too short", "count": 4}]
    kept = result.log[result.log.kept & (result.log["round"] > 0)]
    assert kept.description.tolist() == [text(i) for i in range(4)] and (kept.low > 0).all()


def test_search_without_significant_gains_stops_after_patience_rounds():
    values = {text(0): 0.49, text(1): 0.5, text(2): 0.501}  # worse, equal, a hair better: none significant
    dup = to_brackets(default_instructions().seen("zsre")[0]).lower()
    result, proposer = run(values, [[text(0), dup], [text(1), text(2)], [text(3)], [text(4)]], rounds=6, patience=2)
    assert result.stopped["zsre"].startswith("no significant gain for 2 rounds (round 2)")
    assert len(proposer.batches) == 2  # rounds 3-6 never ran
    assert set(result.incumbents.incumbent) == {result.incumbents.incumbent[0]}  # never replaced
    assert result.log.query("rejected == 'duplicate'").shape[0] == 1
    assert not result.log[result.log["round"] > 0].kept.any()


def test_output_file_round_trips_through_instruction_set(tmp_path):
    values = {text(i): 0.6 + 0.1 * i for i in range(3)}
    result, _ = run(values, [[text(0), text(1)], [text(2)]], rounds=2, patience=2)
    start = default_instructions()
    seen = result.instructions.seen("zsre")
    assert set(seen) >= {text(0), text(1), text(2)} and len(set(seen) & set(start.seen("zsre"))) == 6
    kept = [(i, t) for i, t in enumerate(start.seen("zsre")) if t in seen]
    assert all(seen[i] == t for i, t in kept)  # a starting description that stays keeps its slot
    assert result.instructions.unseen("zsre") == start.unseen("zsre")
    assert result.instructions.descriptions["convsent"] == start.descriptions["convsent"]  # not searched
    path = opt.write_instruction_file(tmp_path / "opt.json", result)
    loaded = official_instructions(path)
    assert dict(loaded.descriptions) == dict(result.instructions.descriptions)
    assert loaded.template == start.template and loaded.heldout_index == start.heldout_index
    data = json.loads(path.read_text())
    assert "[LABEL]" in data["instructions"]["convsent"][0]
    assert data["optimization"]["search"]["seed"] == 0 and data["optimization"]["version"] == opt.SEARCH_VERSION
    log = pd.read_csv(tmp_path / "opt.log.csv")
    assert len(log) == len(result.log) and {"round", "description", "score", "kept"} <= set(log.columns)


@pytest.fixture(scope="module")
def trial_parts():
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    editor = MendEditor(model, MendConfig(rank=8, alpha_init=1.0), generator=torch.Generator().manual_seed(0))
    return model, tok, editor, hand_records(("zsre", "convsent"), n=3)


def test_trial_editor_edits_with_the_candidate_and_caches_by_text(trial_parts, tmp_path):
    model, tok, editor, records = trial_parts
    start = default_instructions()
    before = snapshot(model)
    trial = opt.TrialEditor(editor, model, tok, records, start, key="tiny", cache_file=tmp_path / "s.json")
    candidate = "Reply with the edited answer for this entity, and nothing else should move."
    frame = trial.score("zsre", candidate)
    assert list(frame.case) == [r.index for r in records["zsre"]]
    assert frame[["reliability", "generalization", "locality", "score"]].apply(lambda s: s.between(0, 1)).all().all()
    assert np.allclose(frame.score, frame[["reliability", "generalization", "locality"]].mean(axis=1))
    assert (frame.locality < 1).any()  # a step of size 1 really edits the model
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # The candidate is what the edit saw: the probe set puts it in the held-out slot.
    probe = opt._probe_set(start, "zsre", candidate)
    assert candidate in probe.instruct(records["zsre"][0], unseen=True).prompt
    swapped = opt._probe_set(start, "zsre", start.seen("zsre")[2])  # a starting description is swapped in
    assert swapped.unseen("zsre") == start.seen("zsre")[2] and len(set(swapped.descriptions["zsre"])) == 10
    sentiment = trial.score("convsent", start.seen("convsent")[0])
    assert len(sentiment) == 3 and trial.n_scored == 2
    # A second trial editor on the same cache file replays without editing.
    again = opt.TrialEditor(editor, model, tok, records, start, key="tiny", cache_file=tmp_path / "s.json")
    pd.testing.assert_frame_equal(again.score("zsre", candidate), frame)
    assert again.n_scored == 0
    other_key = opt.TrialEditor(editor, model, tok, records, start, key="other", cache_file=tmp_path / "s.json")
    other_key.score("zsre", candidate)
    assert other_key.n_scored == 1  # another editor never reuses these scores
    assert trial.fits("zsre", candidate)
    assert not trial.fits("zsre", "Answer the question with the new answer, " + "very " * 150 + "carefully.")


def test_search_records_are_val_records_after_the_skipped_ones():
    class World:
        def records(self, task, split):
            assert split == "val"
            return list(range(100))

    got = opt.search_records(World(), opt.SearchConfig(n_val=5, skip=20, tasks=("zsre",)))
    assert got == {"zsre": [20, 21, 22, 23, 24]}
    with pytest.raises(ValueError, match="at least 2"):
        opt.search_records(World(), opt.SearchConfig(n_val=5, skip=99, tasks=("zsre",)))


def test_cli_rejects_what_it_cannot_do(capsys, tmp_path):
    # SmolLM2 without the published files: a clear error naming what is missing, not a traceback
    assert cli.main(["optimize-instructions", "--model", "smollm2", "--out", "x.json",
                     "--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "--model smollm2 needs:" in err and "nowhere" in err
    with pytest.raises(ValueError, match="unknown proposer"):
        make_proposer("gpt")
    with pytest.raises(ValueError, match="--url"):
        make_proposer("http")
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        opt.SearchConfig(rounds=0)


def test_trial_refuses_the_records_that_picked_the_checkpoint():
    class Trained:
        class config:
            n_val = 6

    with pytest.raises(ValueError, match="skip >= the editor's n_val"):
        opt.trial_editor(None, Trained(), opt.SearchConfig(skip=5))


def test_real_parts_fit_together_when_every_proposal_is_garbage(trial_parts, tmp_path):
    """The tiny trial editor with a random chat LM as proposer: its text never passes the filter,
    so nothing replaces the starting incumbent and the task stops after ``patience`` rounds."""
    from instructedit_lite.proposers import LocalChatProposer

    model, tok, editor, records = trial_parts
    chat = tiny_tokenizer()
    chat.chat_template = "{% for m in messages %}{{ m['content'][-200:] }}\n{% endfor %}"
    trial = opt.TrialEditor(editor, model, tok, {"zsre": records["zsre"]}, default_instructions(), key="tiny")
    proposer = LocalChatProposer(tiny_model(chat, n_layer=1), chat, max_new_tokens=8)
    config = opt.SearchConfig(tasks=("zsre",), rounds=5, candidates=3, patience=2)
    result = opt.optimize_instructions(trial, proposer, config, proposal_cache=tmp_path / "p.json", progress=False)
    assert result.stopped["zsre"].endswith("(round 2)")
    assert result.rejections["count"].sum() == 6 and result.log["rejected"].notna().sum() == 6
    assert result.instructions.seen("zsre")[0] == result.incumbents.incumbent.iloc[-1]
    assert len(json.loads((tmp_path / "p.json").read_text())) == 2  # one cached proposal batch per round
