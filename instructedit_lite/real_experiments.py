"""The paper's experiments on the real model (chapter 8): chapters 5 and 6's functions, on SmolLM2.

Nothing here re-implements an experiment.  It says what differs on the real model and hands the
rest to :mod:`~instructedit_lite.experiments` and :mod:`~instructedit_lite.claims`:

* :func:`baseline_options`: where the baselines edit.  Every method edits inside the three blocks
  MEND edits (27-29), so that all of them run through the same frozen-prefix engine and compare on
  the same weights; the reference implementations put FT-L and GRACE lower on LLaMA-2 (about two
  thirds and five sixths of the depth), which the engine could not serve;
* :func:`scaling_configs` and :func:`balance_configs`: chapter 6's editors (Fig. 4b-4d) with the
  real model's settings (:func:`~instructedit_lite.real_model.real_config`);
* :func:`methods_for` and :func:`evaluator`: the methods and what they edit (the engine);
* :func:`reproduce_real`: ``instructedit-lite reproduce --model smollm2``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from . import experiments as ex
from . import real_model as rm
from . import tasks as _tasks
from . import train as tr
from .engine import lowest_block
from .generation import WILD_MAX_TOKENS
from .parallel import cores
from .real_editors import real_editor_configs, train_real_editors

__all__ = ["BASELINE_OPTIONS", "baseline_options", "scaling_configs", "balance_configs", "methods_for", "evaluator", "Evaluator",
           "reproduce_real", "N_CASES", "N_CASES_SMOKE", "FLUENCY_CASES"]

def baseline_options(weight_names: Sequence[str] | None = None, *, smoke: bool = False) -> dict[str, dict[str, Any]]:
    """Where the baselines edit, given the meta-trained editors' weights (default: SmolLM2's,
    :func:`~instructedit_lite.real_model.edited_weights`): FT-L, FT-M and GRACE at the lowest
    edited block, CaliNet's memory slots at the top one (its default, as on the embedded model).

    GRACE runs 50 optimisation steps, EasyEdit's LLaMA setting (its GPT2-XL one is 200): on
    SmolLM2 it rarely reaches its stopping loss, and 200 steps cost 17-27 s per edit on one core
    against 5-10 s (measured on two CounterFact and two ConvSent records: reliability 1.00 / 0.78
    with 200 steps, 1.00 / 0.70 with 50; chapter 8).  ``smoke``: two steps for every baseline (tests only)."""
    names = rm.edited_weights() if weight_names is None else list(weight_names)
    lowest = lowest_block(names, "model.layers")  # ValueError unless every name is in a block
    highest = max(int(n.split(".")[2]) for n in names)
    steps = {"steps": 2} if smoke else {}
    return {"FT-L": {"layer": lowest, **steps}, "FT-M": {"layer": lowest, **steps},
            "GRACE": {"layer": lowest, "n_iter": 2 if smoke else GRACE_STEPS},
            "CaliNet": {"layer": highest, **steps}}


#: GRACE's optimisation steps on the real model (see :func:`baseline_options`).
GRACE_STEPS = 50
#: SmolLM2's: blocks 27 (FT-L, FT-M, GRACE) and 29 (CaliNet).
BASELINE_OPTIONS = baseline_options()
#: Test records per task in chapter 8's default build (and ``reproduce --model smollm2``), and in
#: smoke mode: all methods take about 19 s of one core per fact record and 54 s per ConvSent record
#: (chapter 8), so five per task keep the chapter near its 10-minute budget; ``full`` takes 100.
N_CASES = 5
N_CASES_SMOKE = 1
#: Cases per task scored for fluency by default and in smoke mode: none.  Fluency is not a column of
#: the paper's Table 3, and 100 generated tokens cost about 4.6 s of one core per case and method
#: here; chapter 8's ``full`` scores 10 per task, ``reproduce --fluency-cases N`` any number.
FLUENCY_CASES = 0


def _real(size: str):
    def make(regime: str, tasks=None, *, seed: int = 0, smoke: bool = False, **changes) -> tr.TrainConfig:
        return rm.real_config(regime, tasks, size="smoke" if smoke else size, seed=seed, **changes)
    return make


def scaling_configs(seed: int = 0, size: str = "default") -> dict[int, tr.TrainConfig]:
    """InstructEdit on SmolLM2 trained on 1, 2 and 3 tasks (Recent, + CounterFact, + ConvSent), the
    same number of edits each; the last is chapter 7's InstructEdit."""
    return ex.scaling_configs(seed, size == "smoke", make=_real(size))


def balance_configs(seed: int = 0, size: str = "default") -> dict[str, tr.TrainConfig]:
    """InstructEdit on SmolLM2 with the paper's unbalanced task mix (ConvSent 88% of the edits) and
    its balanced one (41%)."""
    return ex.balance_configs(seed, size == "smoke", make=_real(size))


@dataclass
class Evaluator:
    """What :func:`~instructedit_lite.experiments.main_evaluation` edits: the engine and the tokenizer."""

    model: Any
    tokenizer: Any


def evaluator(real: rm.RealModel, config: tr.TrainConfig | None = None) -> Evaluator:
    """The frozen-prefix engine of ``config``'s edited blocks (default: SmolLM2's; every method
    edits inside them) and the tokenizer."""
    return Evaluator(rm.make_engine(real, config or rm.real_config()), real.tokenizer)


def methods_for(real: rm.RealModel, trained: Mapping[str, tr.TrainedEditor], *, smoke: bool = False):
    """Every registered method on the real model: the trained editors, the data's instructions, and
    the baselines placed by :func:`baseline_options` inside the editors' blocks."""
    weights = next(iter(trained.values())).config.mend.weight_names if trained else None
    return ex.build_methods(trained, instructions=real.source.instructions(),
                            options=baseline_options(weights, smoke=smoke))


def reproduce_real(out_dir, *, folder=None, smoke: bool = False, seed: int = 0, n_cases: int | None = None,
                   processes: int | None = None, progress: bool = True, fluency_cases: int | None = None,
                   fluency: str = "easyedit", generation: bool = True,
                   wild_tokens: int = WILD_MAX_TOKENS) -> dict[str, Any]:
    """``reproduce`` on SmolLM2 and the real records of ``folder`` (default ``$INSTRUCTEDIT_DATA``):
    chapter 7's editors (trained or loaded), every method, experiments 1-3 with their verdicts."""
    start = time.perf_counter()
    real = rm.load_real_model(folder, seed, progress=progress)
    load_seconds = time.perf_counter() - start
    size = "smoke" if smoke else "default"
    start = time.perf_counter()
    trained = train_real_editors(real_editor_configs(seed, size), real, processes=processes, progress=progress)
    train_seconds = time.perf_counter() - start
    n_cases = n_cases or (N_CASES_SMOKE if smoke else N_CASES)
    records = ex.evaluation_records(real.world, n_cases, tasks=_tasks.task_names(),
                                    responses=ex.SMOKE_RESPONSES if smoke else None)
    return ex.reproduce(out_dir, smoke=smoke, seed=seed, n_cases=n_cases, progress=progress,
                        base=evaluator(real), trained=trained, methods=methods_for(real, trained, smoke=smoke),
                        records=records,
                        processes=processes or cores(),
                        fluency_cases=FLUENCY_CASES if fluency_cases is None else fluency_cases, fluency=fluency,
                        generation=generation, wild_tokens=wild_tokens, base_key=real.key,
                        timings={"base_model_s": load_seconds, "editors_s": train_seconds})
