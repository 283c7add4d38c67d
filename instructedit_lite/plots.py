"""One look for the whole book: a colour per method, task and split, and small display helpers."""

from __future__ import annotations

import pandas as pd

from .methods import method_colors
from .sequential import tidy
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


def stream_figure(curves: pd.DataFrame, title: str | None = None):
    """Lifelong editing (chapter 9): retention, generalization and locality against the number of
    edits applied so far, a panel each, a line per method (``curves``: from
    :func:`~instructedit_lite.sequential.streams`)."""
    import seaborn as sns

    grid = sns.relplot(data=tidy(curves, metrics=("retention", "generalization", "locality")), x="n_edits",
                       y="value", hue="method", col="metric", kind="line", marker="o", height=3.2, aspect=1.1,
                       palette=method_colors())
    grid.set_axis_labels("edits applied so far (N)", "score")
    grid.set(ylim=(-0.02, 1.02))
    if title:
        grid.figure.suptitle(title, y=1.03)
    return grid


def batch_figure(table: pd.DataFrame, title: str | None = None):
    """Batch editing (chapter 9): reliability and locality against the number of edits in one
    update, a line per editor and mode (``table``: from :func:`~instructedit_lite.sequential.batches`)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, metric in zip(axes, ("reliability", "locality")):
        sns.lineplot(data=table, x="k", y=metric, hue="label", marker="o", ax=ax, errorbar=("ci", 95))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("edits in one update (k)")
        ax.set_ylim(-0.02, 1.02)
    axes[1].get_legend().remove()
    if title:
        fig.suptitle(title)
    return fig
