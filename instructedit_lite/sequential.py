"""Lifelong (sequential) and batch editing: many edits without restoring in between (chapter 9).

The book's main evaluation edits the *original* model once per test case and restores it. Here the
edits pile up:

* :func:`sequential_editing` applies N edits one after another to the same model: a weight
  editor's ``ΔW`` is computed on the already-edited model and added in place (MEND, InstructEdit
  and KE through their deltas, FT-M through its fine-tuning); GRACE adds each edit to one codebook
  that keeps growing. After every ``every`` edits it measures **retention** (reliability of *all*
  edits so far), generalization on their rephrases, **locality against the original model** (its
  answers are computed once, before the first edit; comparing with the already-edited model is a
  known mistake that hides accumulated damage) and optionally fluency. On exit every touched
  weight is copied back from a clone (bit-identical) and GRACE's codebook is emptied.
* :func:`batch_editing` applies k edits in one update, either the editor applied to the *batched*
  gradient factors of all k edits (``mode="batched"``: MEND's own batch edit, the k edit batches
  stacked so that ``∇̃W = Σ_t δ̃_t ũ_tᵀ`` runs over the tokens of every edit) or the *sum* of the k
  single-edit updates, each computed on the original model (``mode="sum"``, any weight editor).
* :func:`threshold_crossings`: the number of edits where each method first falls below a threshold.

:func:`streams`, :func:`batches` and :func:`crossing_table` run and read them for several methods
at once: chapter 9 calls them on the embedded model and on SmolLM2 alike.

Fact tasks only (ConvSent's score is not a token accuracy). Curves are tidy DataFrames (:func:`tidy`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .editors import Editor, MendMethod, WeightEditor, check_restored, edit_rows, flagged_batch, unlikely_rows
from .editors.baselines import GRACE
from .editors.mend import applied
from .engine import PrefixEngine, model_inputs, scored_batch
from .sampling import greedy_text
from .metrics import fluency
from .parallel import map_in_processes
from .progress import bar_disabled
from .records import EditRecord
from .text import IGNORE, prompt_target_batch

__all__ = ["Restorer", "answer_predictions", "sequential_editing", "batch_deltas", "batch_editing",
           "threshold_crossings", "tidy", "bootstrap_interval", "streams", "batches", "crossing_table"]

Row = tuple[str, str]


class Restorer:
    """Clones each parameter the first time it is about to change; ``restore`` copies them back.

    Only touched weights are cloned (a real model has hundreds of millions of parameters, an edit
    touches a few matrices). Copying clones back, never subtracting ``ΣΔW``, makes the restore
    bit-identical however many edits were added.
    """

    def __init__(self, model: nn.Module):
        self.model, self.originals = model, {}

    def touch(self, name: str) -> None:
        if name not in self.originals:
            self.originals[name] = self.model.get_parameter(name).detach().clone()

    @torch.no_grad()
    def add(self, deltas: Mapping[str, Tensor]) -> None:
        """``W ← W + ΔW`` in place, for every parameter in ``deltas``."""
        for name, delta in deltas.items():
            self.touch(name)
            weight = self.model.get_parameter(name)
            weight.add_(delta.detach().to(device=weight.device, dtype=weight.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        for name, original in self.originals.items():
            self.model.get_parameter(name).copy_(original)
        self.originals = {}


@torch.no_grad()
def answer_predictions(model: nn.Module, tokenizer, rows: Sequence[Row], batch_size: int = 64) -> list[tuple[Tensor, Tensor]]:
    """Per ``(prompt, answer)`` row: the argmax tokens at the answer positions (teacher forced) and
    the answer tokens themselves. Accuracy and agreement are both computed from these.

    Through a :class:`~instructedit_lite.engine.PrefixEngine` (chapter 9's SmolLM2 streams) two
    things differ, neither changing what a row scores: the LM head runs only at the answer
    positions (:func:`~instructedit_lite.engine.scored_batch`; on SmolLM2 it costs more than the
    three edited blocks at every position), and the rows go in batches of similar length, at most
    16 each (the edited blocks run on the padding too: docs/measurements.md). A plain model gets
    the full logits of the rows in their order, as before."""
    engine = isinstance(model, PrefixEngine)
    order = list(range(len(rows)))
    if engine:
        size = [len(tokenizer(f"{p} {a}", add_special_tokens=False)["input_ids"]) for p, a in rows]
        order.sort(key=lambda i: size[i])
        batch_size = min(batch_size, 16)
    out: dict[int, tuple[Tensor, Tensor]] = {}
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_size):
        chunk = order[start:start + batch_size]
        batch = prompt_target_batch(tokenizer, [rows[i][0] for i in chunk], [rows[i][1] for i in chunk], device)
        if engine:
            batch = scored_batch(batch)
        logits = model(**model_inputs(batch)).logits
        predicted, targets = logits[:, :-1].argmax(-1).cpu(), batch["labels"][:, 1:].cpu()
        for j, i in enumerate(chunk):
            mask = targets[j] != IGNORE
            out[i] = (predicted[j][mask], targets[j][mask])
    return [out[i] for i in range(len(rows))]


def bootstrap_interval(values: Sequence[float], n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of ``values`` (NaN, NaN if empty)."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return math.nan, math.nan
    means = v[np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _check_fact_records(records: Sequence[EditRecord], who: str) -> None:
    for r in records:
        if r.task == "convsent":
            raise ValueError(f"{who}: fact tasks only; {r.source}, record {r.index}, field 'task' is 'convsent' "
                             "(its edit success is not a token accuracy)")


def _accuracy(preds: Sequence[tuple[Tensor, Tensor]]) -> list[float]:
    return [float((p == t).float().mean()) for p, t in preds]


def _agreement(pre: Sequence[tuple[Tensor, Tensor]], post: Sequence[tuple[Tensor, Tensor]]) -> list[float]:
    return [float((a == b).float().mean()) for (a, _), (b, _) in zip(pre, post)]


def _locality_rows(records: Sequence[EditRecord]) -> list[Row]:
    """The locality probes of all ``records``, without those that ask what another record of the set
    edits (same prompt as an edit prompt or rephrase): their change is wanted, not a side effect."""
    edited = {q.strip() for r in records for q in (r.prompt, *r.rephrase)}
    return [(p.prompt, p.answer) for r in records for p in r.locality_probes if p.prompt.strip() not in edited]


def _apply(method: Editor, model: nn.Module, tokenizer, record: EditRecord, restorer: Restorer) -> dict:
    """Add one (prepared) edit to the current model for good; returns the edit's details."""
    if isinstance(method, GRACE):
        return method.add_edit(model, tokenizer, record)  # weights untouched; the codebook grows
    if isinstance(method, WeightEditor):
        fit = getattr(method, "fit", None)  # FT-M/FT-L also report their steps
        deltas, details = fit(model, tokenizer, record) if fit else (method.deltas(model, tokenizer, record), {})
        restorer.add(deltas)
        return details
    raise TypeError(f"sequential editing needs a weight editor or GRACE, got {type(method).__name__} "
                    f"({method.name!r}): its edits cannot be kept on the model")


def _hooked(method: Editor, model: nn.Module):
    return method.hooked(model) if isinstance(method, GRACE) else contextlib.nullcontext()


def sequential_editing(method: Editor, model: nn.Module, tokenizer, records: Sequence[EditRecord], *,
                       every: int = 10, fluency_prompts: Sequence[str] = (), fluency_tokens: int = 40,
                       progress: bool = True, seed: int = 0) -> pd.DataFrame:
    """Apply ``records`` one after another without restoring; one row per checkpoint (0, every, 2·every, …, N).

    Columns: ``n_edits``; ``retention`` (mean token accuracy of every edit applied so far, on its
    own prompt), ``retention_em`` (exact match), ``retention_low/high`` (95% bootstrap over the
    edits); ``latest`` (the reliability of the last ``every`` edits only); ``generalization``
    (their rephrases); ``locality`` (argmax agreement with the ORIGINAL model on the locality
    probes of all N records, a fixed set so the points are comparable, less the probes that ask
    what another record of the stream edits); ``fluency`` (n-gram
    entropy of greedy text after ``fluency_prompts``, NaN without); ``codebook`` (GRACE's entries,
    else NaN); ``edit_seconds`` (total so far). The model is bit-identical to the original after
    the call, also on errors, and GRACE's codebook is empty.
    """
    _check_fact_records(records, "sequential_editing")
    if every < 1:
        raise ValueError(f"sequential_editing: every must be >= 1, got {every}")
    prepared = [method.prepare(r) for r in records]
    loc_rows = _locality_rows(records)
    pre_locality = answer_predictions(model, tokenizer, loc_rows)  # the original model, once
    if isinstance(method, GRACE):
        method.reset()
    restorer, rows, spent = Restorer(model), [], 0.0
    checkpoints = sorted({0, len(records), *range(every, len(records) + 1, every)})
    bar = tqdm(total=len(records), desc=f"sequential {method.name}", disable=bar_disabled(progress))
    try:
        for n in range(len(records) + 1):
            if n > 0:
                start = time.perf_counter()
                _apply(method, model, tokenizer, prepared[n - 1], restorer)
                spent += time.perf_counter() - start
                bar.update(1)
            if n not in checkpoints:
                continue
            with _hooked(method, model):
                done = prepared[:n]
                rel = _accuracy(answer_predictions(model, tokenizer, [(r.prompt, r.target_new) for r in done]))
                gen = _accuracy(answer_predictions(model, tokenizer, [(q, r.target_new) for r in done for q in r.rephrase]))
                loc = _agreement(pre_locality, answer_predictions(model, tokenizer, loc_rows))
                texts = [greedy_text(model, tokenizer, p, fluency_tokens) for p in fluency_prompts]
            low, high = bootstrap_interval(rel, seed=seed)
            rows.append({"method": method.name, "n_edits": n,
                         "retention": float(np.mean(rel)) if rel else math.nan,
                         "retention_em": float(np.mean([a == 1.0 for a in rel])) if rel else math.nan,
                         "retention_low": low, "retention_high": high,
                         "latest": float(np.mean(rel[-every:])) if rel else math.nan,
                         "generalization": float(np.mean(gen)) if gen else math.nan,
                         "locality": float(np.mean(loc)) if loc else math.nan,
                         "fluency": fluency(texts) if texts else math.nan,
                         "codebook": float(len(method.codebook)) if isinstance(method, GRACE) else math.nan,
                         "edit_seconds": spent})
    finally:
        bar.close()
        restorer.restore()
        if isinstance(method, GRACE):
            method.reset()
    return pd.DataFrame(rows)


def _stacked_batch(tokenizer, records: Sequence[EditRecord], device, n_responses: int) -> dict[str, Tensor]:
    """Every record's edit rows, then every record's unlikelihood rows (flagged), as
    :meth:`~instructedit_lite.editors.MendMethod.deltas` computes one edit."""
    rows = [row for r in records for row in edit_rows(r, n_responses)]
    extra = [row for r in records for row in unlikely_rows(r, n_responses)]
    return flagged_batch(tokenizer, rows, extra, device)


def batch_deltas(method: Editor, model: nn.Module, tokenizer, records: Sequence[EditRecord],
                 mode: str = "batched") -> dict[str, Tensor]:
    """One update for all (prepared) ``records``: ``"batched"`` runs a MEND-style editor on the stacked
    gradient factors of all edits (MEND's batch edit); ``"sum"`` adds the single-edit updates, each
    computed on the unedited model."""
    if mode == "batched":
        if not isinstance(method, MendMethod):
            raise ValueError(f"batch_deltas: mode 'batched' needs a MEND/KE editor, got {method.name!r}; use mode='sum'")
        method.editor.eval()
        batch = _stacked_batch(tokenizer, records, next(model.parameters()).device, method.n_responses)
        with torch.no_grad():
            return {k: v.detach() for k, v in method.editor.compute_deltas(model, batch, meta_grad=False).items()}
    if mode == "sum":
        if not isinstance(method, WeightEditor):
            raise ValueError(f"batch_deltas: mode 'sum' needs a weight editor, got {method.name!r}")
        total: dict[str, Tensor] = {}
        for r in records:
            for name, delta in method.deltas(model, tokenizer, r).items():
                total[name] = total[name] + delta if name in total else delta.clone()
        return total
    raise ValueError(f"batch_deltas: mode must be 'batched' or 'sum', got {mode!r}")


def batch_editing(method: Editor, model: nn.Module, tokenizer, records: Sequence[EditRecord], ks: Sequence[int], *,
                  mode: str = "batched", max_groups: int = 4, seed: int = 0) -> pd.DataFrame:
    """Reliability, generalization and locality (against the original model) of k edits made in one
    update, for each k in ``ks``: up to ``max_groups`` disjoint groups of k records each. One row per
    (k, group); the model is restored exactly after each group."""
    _check_fact_records(records, "batch_editing")
    rows = []
    for k in ks:
        n_groups = min(max_groups, len(records) // k)
        if n_groups == 0:
            raise ValueError(f"batch_editing: k={k} needs at least {k} records, got {len(records)}")
        for g in range(n_groups):
            group = [method.prepare(r) for r in records[g * k:(g + 1) * k]]
            loc_rows = _locality_rows(records[g * k:(g + 1) * k])
            pre = answer_predictions(model, tokenizer, loc_rows)
            start = time.perf_counter()
            deltas = batch_deltas(method, model, tokenizer, group, mode)
            seconds = time.perf_counter() - start
            with applied(model, deltas):
                rel = _accuracy(answer_predictions(model, tokenizer, [(r.prompt, r.target_new) for r in group]))
                gen = _accuracy(answer_predictions(model, tokenizer, [(q, r.target_new) for r in group for q in r.rephrase]))
                loc = _agreement(pre, answer_predictions(model, tokenizer, loc_rows))
            rows.append({"method": method.name, "mode": mode, "k": k, "group": g, "reliability": float(np.mean(rel)),
                         "reliability_em": float(np.mean([a == 1.0 for a in rel])),
                         "generalization": float(np.mean(gen)) if gen else math.nan,
                         "locality": float(np.mean(loc)) if loc else math.nan, "edit_seconds": seconds})
    return pd.DataFrame(rows)


def threshold_crossings(curves: pd.DataFrame, metric: str = "retention", threshold: float = 0.5) -> pd.DataFrame:
    """Per method: the first checkpoint (number of edits) where ``metric`` is below ``threshold``;
    NaN with ``never_below=True`` if it stayed at or above it up to the last checkpoint."""
    out = []
    for name, curve in curves.sort_values("n_edits").groupby("method", sort=False):
        below = curve[curve[metric] < threshold]
        out.append({"method": name, "metric": metric, "threshold": threshold,
                    "first_below": float(below.n_edits.iloc[0]) if len(below) else math.nan,
                    "never_below": below.empty, "last_checkpoint": int(curve.n_edits.max())})
    return pd.DataFrame(out)


def tidy(curves: pd.DataFrame, id_vars: Sequence[str] = ("method", "n_edits"),
         metrics: Sequence[str] = ("retention", "generalization", "locality", "fluency", "codebook")) -> pd.DataFrame:
    """Wide checkpoint rows → long ``(method, n_edits, metric, value)`` rows (for seaborn)."""
    present = [m for m in metrics if m in curves]
    return curves.melt(id_vars=list(id_vars), value_vars=present, var_name="metric", value_name="value")


def streams(methods: Mapping[str, Editor], model: nn.Module, tokenizer, records: Sequence[EditRecord], *,
            every: int, processes: int = 1, **options) -> pd.DataFrame:
    """:func:`sequential_editing` for each method of ``methods`` (name -> editor) over the same
    records, one table of curves; ``options`` go to every stream (``fluency_prompts``, ``seed``, ...).
    ``processes`` > 1: the streams run that many at a time, each in its own process on its own
    copy of the model and method (:func:`~instructedit_lite.parallel.map_in_processes`, one thread
    each; the same rows as one by one on one thread, but the timings).  This process's model is
    then never edited, so each worker checks its own copy: bit-identical after its stream, or an
    error naming the weight."""
    jobs = [(method, model, tokenizer, records) for method in methods.values()]
    if processes > 1 and len(jobs) > 1:
        run = functools.partial(_checked_stream, every=every, **{**options, "progress": False})
        tables = map_in_processes(run, jobs, processes, desc="streams", weights=[len(records)] * len(jobs),
                                  progress=options.get("progress", True))
    else:
        tables = [sequential_editing(*job, every=every, **options) for job in jobs]
    return pd.concat(tables, ignore_index=True)


def _checked_stream(method: Editor, model: nn.Module, tokenizer, records: Sequence[EditRecord],
                    **options) -> pd.DataFrame:
    """:func:`sequential_editing`, then :func:`~instructedit_lite.editors.check_restored` on the model."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    table = sequential_editing(method, model, tokenizer, records, **options)
    check_restored(model, before)
    return table


def batches(methods: Mapping[str, Editor], model: nn.Module, tokenizer, records: Sequence[EditRecord],
            ks: Sequence[int], *, max_groups: int = 4, modes: Sequence[str] = ("batched", "sum")) -> pd.DataFrame:
    """:func:`batch_editing` for each method and mode, with a ``label`` column ("InstructEdit (sum)")."""
    table = pd.concat([batch_editing(method, model, tokenizer, records, ks, mode=mode, max_groups=max_groups)
                       for method in methods.values() for mode in modes], ignore_index=True)
    return table.assign(label=table.method + " (" + table["mode"] + ")")


def crossing_table(curves: pd.DataFrame, retention: float = 0.5, locality: float = 0.9
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Where each method's retention first falls below ``retention`` and its locality below
    ``locality``: the long table of :func:`threshold_crossings` and a wide one, a row per method."""
    long = pd.concat([threshold_crossings(curves, "retention", retention),
                      threshold_crossings(curves, "locality", locality)], ignore_index=True)
    wide = long.pivot(index="method", columns="metric", values="first_below").astype("Int64")
    wide = wide.rename(columns={"retention": f"retention < {retention:g} at N",
                                "locality": f"locality < {locality:g} at N"})
    return long, wide
