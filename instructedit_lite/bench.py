"""What an edit costs: one MEND edit, and one meta-training step, against forward+backward passes of the model.

MEND's selling point is that an edit costs about as much as one fine-tuning step: one forward and
a partial backward pass to get the gradient factors, a small network, and a weight update.
:func:`edit_cost` times both on the same input (an instruction-prefixed edit of the model's own
records) with ``instructedit_lite.editors.mend.time_edit_vs_forward_backward``; the editor is untrained
(an edit's cost depends on its architecture, not on its weights).

:func:`engine_costs` measures what the frozen-prefix engine saves.  Reference cost: one
forward+backward of the *whole* model (every parameter requires grad, as one fine-tuning step) on a
4×40-token batch (``fwd_bwd_4x40_s``) and on the edit batch itself (``fwd_bwd_s``).  Reported
(medians of ``repeats`` rounds after one warm-up):

* ``edit_ratio``: one MEND edit through the engine (warm cache, logits at the target positions
  only), ΔW written into the weights, over ``fwd_bwd_s`` on the same batch (goal ≤ 1.5);
* ``step_ratio``: one meta-training step (``train.meta_losses`` of one instructed CounterFact-style
  edit with four locality rows, backward, Adam step of the editor) through the engine over
  ``fwd_bwd_4x40_s``, at rank 1920 (EasyEdit's LLaMA setting) and the default rank;
* ``engine_speedup``: the same step without the engine over with it (goal ≥ 3), at the default
  rank (top level) and at every rank (``steps``);
* bytes per cached row and per token, the one-off prefix cost per row, and how much of it the
  instruction prefix takes (the most that sharing the prefix's computation could save);
* ``eval_case_ratio``: one evaluated InstructEdit case (the edit through the engine, every score
  with the prefix and WILD generations, the undo) over ``fwd_bwd_4x40_s``: the unit of the
  verification run's cost;
* bf16 autocast (on a CPU with native bf16, or with ``--bf16 on``): the step's time, and the
  cosine between its editor gradients and float32's.

``instructedit-lite bench --model M`` (or ``python -m instructedit_lite.bench``): :func:`edit_cost`
on the embedded model, :func:`engine_costs` on a real one (``--engine`` for both on any model); the
result is printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import train as tr
from .atomic import atomic_write_text
from .editors import MendMethod
from .editors.mend import MendConfig, MendEditor, applied, lm_loss, time_edit_vs_forward_backward
from .engine import PrefixEngine, scored_batch
from .evaluate import evaluate_case
from .instructions import default_instructions, maybe_instruct
from .models import load_model
from .paths import cache_dir
from .records import EditRecord, Probe
from .text import prompt_target_batch
from .train import default_config

DEFAULT_NAME = "edit-cost.json"

SUBJECTS = ("Danielle Darrieux", "Edwin of Northumbria", "Toko Yasuda", "Autonomous University of Madrid",
            "Thomas Joannes Stieltjes", "Anaal Nathrakh", "Apple A5", "Honda Civic")
PROMPTS = ("The mother tongue of {} is", "{} was born in the city of", "{} is affiliated with the religion of",
           "{} was created by")


def default_output() -> Path:
    return cache_dir() / DEFAULT_NAME


def edit_cost(base=None, *, repeats: int = 20, mend_config=None, task: str = "counterfact",
              instructed: bool = True, threads: int | None = None) -> dict[str, Any]:
    """Median seconds of one edit and of one forward+backward, and their ratio, on ``base``.

    ``base`` defaults to the embedded model (:func:`~instructedit_lite.models.load_model`).  The
    input is the first test record of ``task``, instruction-prefixed unless ``instructed=False``.
    The editor has the architecture of :func:`~instructedit_lite.train.default_config` for ``base``
    unless ``mend_config`` is given.  ``threads`` sets ``torch.set_num_threads`` for the measurement.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    base = base or load_model("embedded", progress=False)
    mend_config = mend_config or default_config("instruct", model=base).mend
    record = base.world.records(task, "test")[0]
    record = maybe_instruct(record, default_instructions() if instructed else None)
    device = next(base.model.parameters()).device
    batch = prompt_target_batch(base.tokenizer, [record.prompt], [record.target_new], device)
    editor = MendEditor(base.model, mend_config, generator=torch.Generator().manual_seed(0))
    timing = time_edit_vs_forward_backward(base.model, editor, batch, repeats=repeats)
    return {
        **timing,
        "repeats": repeats,
        "input_tokens": int(batch["input_ids"].shape[1]),
        "model_parameters": sum(p.numel() for p in base.model.parameters()),
        "editor_parameters": sum(p.numel() for p in editor.parameters()),
        "edited_weights": list(editor.infos),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
    }


def example_record(i: int = 0):
    """A CounterFact-style record (edit, one rephrase, four locality probes) of realistic length."""
    subject = SUBJECTS[i % len(SUBJECTS)]
    others = [SUBJECTS[(i + k) % len(SUBJECTS)] for k in range(1, 5)]
    return EditRecord(
        task="counterfact", subject=subject, prompt=PROMPTS[0].format(subject), target_new="English",
        ground_truth=("French",), rephrase=(f"{subject} spoke the language",),
        locality={"Other_Subject": tuple(Probe(PROMPTS[k % 4].format(o), ("Paris",)) for k, o in enumerate(others))},
        source="bench", index=i)


def bf16_hardware() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX); without it autocast emulates."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median_time(fn: Callable[[], Any], repeats: int, what: str = "") -> float:
    """Median wall seconds of ``fn`` over ``repeats`` rounds after one warm-up round."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        fn()
        if i:
            times.append(time.perf_counter() - start)
    result = statistics.median(times)
    if what:
        log(f"{what}: median {result:.3f} s of {[round(t, 3) for t in times]}")
    return result


def fwd_bwd_time(model, batch, repeats: int) -> float:
    """One forward+backward of the whole model, every parameter requiring grad."""
    def run():
        lm_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                batch["labels"]).backward()
        model.zero_grad(set_to_none=True)

    model.requires_grad_(True)
    try:
        return median_time(run, repeats, f"whole-model forward+backward {tuple(batch['input_ids'].shape)}")
    finally:
        model.requires_grad_(False)


def engine_costs(base, *, repeats: int = 5, ranks: Sequence[int] = (1920, 64), threads: int = 2,
                 bf16: bool | None = None) -> dict[str, Any]:
    """What the frozen-prefix engine saves on ``base`` (any :class:`~instructedit_lite.base_model.BaseModel`;
    the edited weights are its paper weights): every number of the module docstring, as a dict
    (bf16 only on bf16 hardware unless ``bf16``)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, tokenizer = base.model.eval().requires_grad_(False), base.tokenizer
    names, key = base.weight_names(), base.key
    engine = PrefixEngine(model, names, key=key)
    instructions = default_instructions()
    bf16 = bf16_hardware() if bf16 is None else bf16
    out: dict[str, Any] = {"model": base.info.get("name", "embedded"), "bf16_hardware": bf16_hardware(),
                           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "edited_weights": names,
                           "model_parameters": sum(p.numel() for p in model.parameters())}

    # The reference: the whole model, 4 rows of 40 tokens, every token labelled.
    text = " ".join(maybe_instruct(example_record(i), instructions).prompt for i in range(8))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ref = torch.tensor([ids[40 * i: 40 * (i + 1)] for i in range(4)])
    ref_batch = {"input_ids": ref, "attention_mask": torch.ones_like(ref), "labels": ref.clone()}
    out["fwd_bwd_4x40_s"] = fwd_bwd_time(model, ref_batch, repeats)

    # One edit.
    record = maybe_instruct(example_record(0), instructions)
    edit = prompt_target_batch(tokenizer, [record.prompt], [record.target_new])
    out["edit_tokens"] = int(edit["input_ids"].shape[1])
    out["fwd_bwd_s"] = fwd_bwd_time(model, edit, repeats)
    editor = MendEditor(model, MendConfig(rank=min(ranks), weight_names=names),
                        generator=torch.Generator().manual_seed(0)).eval()

    def edit_once(m, batch):
        with applied(m, editor.compute_deltas(m, batch, meta_grad=False)):
            pass

    out["edit_s"] = median_time(lambda: edit_once(engine, scored_batch(edit)), repeats, "edit, engine")
    out["edit_plain_s"] = median_time(lambda: edit_once(model, edit), repeats, "edit, plain")
    out["edit_ratio"] = out["edit_s"] / out["fwd_bwd_s"]
    out["edit_ratio_without_engine"] = out["edit_plain_s"] / out["fwd_bwd_s"]

    # Meta-training steps, as train() runs them (editor in training mode, model frozen).
    out["steps"] = {}
    for rank in ranks:
        config = tr.TrainConfig(regime="instruct", mend=MendConfig(rank=rank, weight_names=names))
        example = tr.build_example(example_record(0), config, instructions=instructions)
        editor = MendEditor(model, config.mend, generator=torch.Generator().manual_seed(0)).train()
        optimizer = torch.optim.Adam(editor.parameters(), lr=1e-6, fused=True)  # as train() steps

        def step(m, autocast: bool = False):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                losses = tr.meta_losses(m, editor, tokenizer, example, config)
            losses["total"].backward()
            grads = torch.cat([p.grad.flatten() for p in editor.parameters() if p.grad is not None])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return grads

        row: dict[str, Any] = {"editor_parameters": sum(p.numel() for p in editor.parameters())}
        row["step_plain_s"] = median_time(lambda: step(model), repeats, f"rank {rank} step, plain")
        row["step_s"] = median_time(lambda: step(engine), repeats, f"rank {rank} step, engine")
        if bf16:
            row["step_bf16_s"] = median_time(lambda: step(engine, True), repeats, f"rank {rank} step, engine, bf16")
            g32, g16 = step(engine), step(engine, True)  # consecutive steps: near the same editor
            row["bf16_speedup"] = row["step_s"] / row["step_bf16_s"]
            row["bf16_grad_cosine"] = float(torch.nn.functional.cosine_similarity(g32, g16, dim=0))
        row["step_ratio"] = row["step_s"] / out["fwd_bwd_4x40_s"]
        row["engine_speedup"] = row["step_plain_s"] / row["step_s"]
        out["steps"][str(rank)] = row
    # step_ratio at the largest rank (EasyEdit's 1920 is the peer to beat); engine_speedup at the
    # smallest (the project's default): at rank 1920 the editor itself, which no engine speeds up,
    # takes most of a step.  Both ranks are in "steps".
    top, small = out["steps"][str(max(ranks))], out["steps"][str(min(ranks))]
    out["step_ratio"], out["step_ratio_rank"] = top["step_ratio"], max(ranks)
    out["engine_speedup"], out["engine_speedup_rank"] = small["engine_speedup"], min(ranks)

    # One evaluated case (what the verification run repeats thousands of times): an InstructEdit
    # edit of a CounterFact-style record through the engine, every score (teacher-forced, prefix
    # and WILD generation, locality) and the undo, over one forward+backward of the whole model.
    case_editor = MendEditor(model, MendConfig(rank=min(ranks), weight_names=names),
                             generator=torch.Generator().manual_seed(0)).eval()
    method = MendMethod(case_editor, "InstructEdit", instructions=instructions)
    record = example_record(1)
    out["eval_case_s"] = median_time(lambda: evaluate_case(method, engine, tokenizer, record), repeats,
                                     "one evaluated case, engine")
    out["eval_case_ratio"] = out["eval_case_s"] / out["fwd_bwd_4x40_s"]

    # The cache, and the one-off cost of filling it.
    out["cached_rows"] = len(engine.cache)
    out["bytes_per_cached_row"] = engine.cache.nbytes / max(1, len(engine.cache))
    out["bytes_per_cached_token"] = engine.cache.bytes_per_token()
    plain = [example_record(i) for i in range(8)]
    rows = {"plain": [r.prompt + " " + r.target_new for r in plain],
            "instructed": [maybe_instruct(r, instructions).prompt + " " + r.target_new for r in plain]}
    for kind, texts in rows.items():
        fresh = PrefixEngine(model, names, key=key)
        tokens = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        start = time.perf_counter()
        fresh.precompute(tokens)
        seconds = time.perf_counter() - start
        out[f"prefix_{kind}_s_per_row"] = seconds / len(tokens)
        out[f"prefix_{kind}_tokens_per_row"] = sum(map(len, tokens)) / len(tokens)
    out["instruction_share_of_prefix_cost"] = 1 - out["prefix_plain_s_per_row"] / out["prefix_instructed_s_per_row"]
    out.update(repeats=repeats, torch_threads=torch.get_num_threads(), torch=torch.__version__,
               machine=platform.machine(), load_average=os.getloadavg()[0], cpu_count=os.cpu_count())
    return out


def run(out: str | Path | None = None, *, model: str = "embedded", repeats: int = 20, threads: int | None = None,
        engine: bool | None = None, ranks: Sequence[int] = (1920, 64), bf16: bool | None = None, data=None,
        stream=None, quiet: bool = False) -> dict[str, Any]:
    """Measure ``model`` (:func:`~instructedit_lite.models.load_model`): :func:`edit_cost`, and
    :func:`engine_costs` where ``engine`` (default: on a real-scale model, whose editors train
    through the engine); print the result as JSON and write it to ``out`` (default: the cache folder)."""
    start = time.perf_counter()
    base = load_model(model, data=data, progress=False)
    load_s = time.perf_counter() - start
    engine = base.scale == "real" if engine is None else engine
    if engine:
        result = {**engine_costs(base, repeats=min(repeats, 5), ranks=ranks, threads=threads or 2, bf16=bf16),
                  "load_s": load_s}
    else:
        result = {**edit_cost(base, repeats=repeats, threads=threads), "load_s": load_s}
    path = Path(out) if out is not None else default_output()
    text = json.dumps(result, indent=1)
    atomic_write_text(path, text + "\n")
    stream = stream or sys.stdout
    print(text, file=stream)
    if not quiet:
        if engine:
            print(f"edit_ratio {result['edit_ratio']:.2f} (goal <= 1.5), step_ratio {result['step_ratio']:.2f} "
                  f"(aim <= 0.4), engine_speedup {result['engine_speedup']:.2f} (goal >= 3)", file=stream)
        else:
            print(f"edit / forward+backward = {result['ratio']:.2f}  (written to {path})", file=stream)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="embedded",
                        help="'embedded' (default), 'smollm2', or a Hugging Face model name or folder")
    parser.add_argument("--data", type=Path, default=None, help="the published files of a real model's records")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON file to write (default: $INSTRUCTEDIT_CACHE/{DEFAULT_NAME})")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (the median is reported; "
                        "at most 5 for the engine's costs)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the measurement")
    parser.add_argument("--engine", action="store_true", default=None,
                        help="the frozen-prefix engine's costs (the default on a real model)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1920, 64], help="editor ranks of the engine's steps")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                        help="time bf16 autocast in the engine's steps (auto: only on a CPU with native bf16)")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")


def from_args(args, stream=None) -> dict[str, Any]:
    """:func:`run` with the options ``add_arguments`` declares."""
    return run(args.out, model=args.model, repeats=args.repeats, threads=args.threads, engine=args.engine,
               ranks=args.ranks, bf16={"auto": None, "on": True, "off": False}[args.bf16], data=args.data,
               stream=stream, quiet=args.json)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instructedit_lite.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    from_args(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
