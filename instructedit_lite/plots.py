"""One look for the whole book: a colour per method, task and split, and small display helpers."""

from __future__ import annotations

import pandas as pd

from .methods import method_colors
from .tasks import is_sentiment, task_colors


def __getattr__(name: str):
    # ``METHOD_COLORS`` (one colour per editing method, colour-blind safe, Okabe-Ito based) and
    # ``TASK_COLORS`` come from the method and task registries, read on every access (PEP 562).
    if name == "METHOD_COLORS":
        return method_colors()
    if name == "TASK_COLORS":
        return task_colors()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


SPLIT_COLORS = {"train": "#4C72B0", "val": "#8C8C8C", "test": "#DD8452"}


def use_book_style() -> None:
    """Seaborn's clean style with readable sizes; figures render as crisp PNG in the book."""
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)
    mpl.rcParams.update({"figure.dpi": 110, "savefig.bbox": "tight", "axes.titleweight": "bold"})


def record_table(record, title: str | None = None) -> pd.DataFrame:
    """An :class:`~instructedit_lite.records.EditRecord` as a two-column table, one row per field."""
    rows = [("task", record.task), ("subject", record.subject), ("prompt", record.prompt),
            ("target_new", record.target_new), ("ground_truth", " | ".join(record.ground_truth) or "(none)")]
    rows += [(f"rephrase[{i}]", p) for i, p in enumerate(record.rephrase)]
    for group, groups in (("locality", record.locality), ("portability", record.portability)):
        for kind, probes in groups.items():
            for i, probe in enumerate(probes):
                answers = " | ".join(probe.answers[:3]) + (" | ..." if len(probe.answers) > 3 else "")
                rows.append((f"{group}.{kind}[{i}]", f"{probe.prompt} → {answers}"))

    if is_sentiment(record.task):
        rows += [("topic", record.topic), ("sentiment (wanted)", record.sentiment),
                 ("pos_responses", f"{len(record.pos_responses)}, e.g. {record.pos_responses[0]}"),
                 ("neg_responses", f"{len(record.neg_responses)}, e.g. {record.neg_responses[0]}")]
    table = pd.DataFrame(rows, columns=["field", "value"]).set_index("field")
    if title:
        table.columns = [title]
    return table


def scaling_figure(table: pd.DataFrame):
    """Figure 4b/4c (chapters 6 and 8): the held-out task's scores (left) and the overlap of its edit
    region with the training tasks' (right) against the number of training tasks.  ``table``:
    indexed by that number, with ``ZsRE reliability``, ``ZsRE overlap`` and optionally
    ``ZsRE generalization``."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), layout="constrained")
    for column, style in (("ZsRE reliability", "-"), ("ZsRE generalization", "--")):
        if column in table:
            axes[0].plot(table.index, table[column], marker="o" if style == "-" else "s", linestyle=style,
                         label=column.removeprefix("ZsRE "), color=method_colors()["InstructEdit"])
    axes[0].set_ylabel("score on ZsRE (held out)")
    axes[0].set_title("Hold-out editing")
    axes[0].legend()
    axes[1].plot(table.index, table["ZsRE overlap"], marker="o", color=task_colors()["zsre"])
    axes[1].set_ylabel("ZsRE region overlap")
    axes[1].set_title("Overlap with the training tasks")
    for ax in axes:
        ax.set_xlabel("number of training tasks")
        ax.set_xticks(list(table.index))
    return fig
