"""Analysis of gradient directions (the paper's Fig. 4a–4d): do the edits of different tasks point
in different directions?

For each edit MEND turns the fine-tuning gradient of one edited matrix into a pseudo-gradient
``∇̃W = Σ_t δ̃_t ũ_tᵀ``.  The paper plots the transformed input factor ``∇̃_u ℓ`` (here: ``ũ``
summed over the kept tokens, :func:`edit_vectors`), scaled to unit length so that only its
*direction* counts (:func:`unit_rows`), reduced with PCA and embedded in 2-D with t-SNE
(:func:`embed_2d`), one colour per task (:func:`plot_embedding`).  With instructions the task
clusters separate; without, they overlap.

A t-SNE picture is not a measurement: its distances and cluster sizes depend on the perplexity
and the seed.  The separation is therefore also *measured*, in the unit-normalised
high-dimensional space the picture was made from:

* :func:`silhouette` — silhouette score of the task labels under the cosine distance (1: tight,
  well-separated clusters; about 0: no structure; negative: points sit nearer another task);
* :func:`knn_agreement` — share of each point's ``k`` nearest neighbours (cosine) with its own task
  (1: clean; chance level is about the share of the task in the data, see :func:`knn_chance`);
* :func:`region_overlap` — for one task, the share of its points' neighbours from *other* tasks
  (0: the task's region is clean, 1: fully mixed), e.g. how far the held-out ZsRE edits fall among
  the training tasks (Fig. 4b/4c);
* :func:`within_task_cosine` — mean pairwise cosine similarity of one task's edit directions (how
  regular they are, Fig. 4d);
* :func:`separation_table` — silhouette and kNN agreement of several editors side by side.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .editors import edit_batch
from .progress import bar_disabled
from .tasks import task_colors

__all__ = [
    "KINDS",
    "edit_vectors",
    "edit_vector_sets",
    "unit_rows",
    "embed_2d",
    "silhouette",
    "knn_agreement",
    "knn_chance",
    "region_overlap",
    "within_task_cosine",
    "separation_table",
    "plot_embedding",
]

#: What :func:`edit_vectors` can return for an edit.
KINDS = ("u_tilde", "delta_tilde", "u", "update")


# ---------------------------------------------------------------------------------------------
# One vector per edit
# ---------------------------------------------------------------------------------------------


def edit_vectors(method, model: torch.nn.Module, tokenizer, records: Iterable, *, weight: str | None = None,
                 kind: str = "u_tilde", n_responses: int = 2, progress: bool = False) -> np.ndarray:
    """One vector per edit of ``records``, float32 array of shape ``(n_records, dim)``.

    ``method`` is a :class:`~instructedit_lite.editors.MendMethod`: each record is first prepared
    with ``method.prepare`` (so InstructEdit sees the instruction-prefixed prompt), then its edit
    batch (:func:`~instructedit_lite.editors.edit_batch`, ``n_responses`` rows of each sentiment for ConvSent) goes
    through one pre-edit forward/backward pass of ``model`` that captures the gradient factors of
    the edited matrix ``weight`` (default: the last of ``method.editor.infos``).

    ``kind``:

    * ``"u_tilde"`` — ``Σ_t ũ_t``, the transformed input factor (the paper's pseudo-activation
      ``∇̃_u ℓ``), dim ``d_in``;
    * ``"delta_tilde"`` — ``Σ_t δ̃_t``, the transformed output-gradient factor, dim ``d_out``;
    * ``"u"`` — ``Σ_t u_t``, the raw input factor before the editor, for comparison;
    * ``"update"`` — the flattened update ``ΔW = α ∇̃W`` of that matrix, dim ``d_in · d_out``.

    The sums run over the kept token rows (those with non-zero u and δ).  The editor runs in eval
    mode without gradient, so its running statistics are not touched; its train/eval mode is
    restored afterwards.  ``progress`` shows a tqdm bar.  Several matrices or kinds at once:
    :func:`edit_vector_sets` (one backward pass per edit serves them all).
    """
    names = list(method.editor.infos)
    weight = names[-1] if weight is None else weight
    sets = edit_vector_sets(method, model, tokenizer, records, weights=(weight,), kinds=(kind,),
                            n_responses=n_responses, progress=progress)
    return sets[weight, kind]


def edit_vector_sets(method, model: torch.nn.Module, tokenizer, records: Iterable, *,
                     weights: Sequence[str] | None = None, kinds: Sequence[str] = ("u_tilde",),
                     n_responses: int = 2, progress: bool = False) -> dict[tuple[str, str], np.ndarray]:
    """:func:`edit_vectors` for several edited matrices and kinds from one pass per edit:
    ``(weight, kind) → (n_records, dim)`` array; ``weights`` defaults to every edited matrix."""
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"edit_vectors: kind must be one of {KINDS}, got {kind!r}")
    editor = method.editor
    names = list(editor.infos)
    weights = names if weights is None else list(weights)
    for weight in weights:
        if weight not in editor.infos:
            raise ValueError(f"edit_vectors: {weight!r} is not edited by this editor; edited weights: {names}")
    records = list(records)
    if not records:
        raise ValueError("edit_vectors: no records")

    device = next(model.parameters()).device
    was_training = editor.training
    editor.eval()  # running statistics frozen, as in evaluation
    vectors: dict[tuple[str, str], list[np.ndarray]] = {(w, k): [] for w in weights for k in kinds}
    try:
        for record in tqdm(records, desc="edit vectors", disable=bar_disabled(progress)):
            batch = edit_batch(tokenizer, method.prepare(record), device, n_responses, unlikelihood=True)
            factors = editor.capture(model, batch)  # its own enable_grad for the pre-edit backward
            with torch.no_grad():  # the shared networks run as compute_deltas runs them
                tilde = editor.transform_all(factors) if any(kind != "u" for kind in kinds) else {}
            for weight in weights:
                u = factors.u[weight]
                with torch.no_grad():
                    if tilde:
                        u_tilde, delta_tilde = tilde[weight]
                    for kind in kinds:
                        if kind == "u":
                            vec = u.float().sum(0)
                        elif kind == "u_tilde":
                            vec = u_tilde.sum(0)
                        elif kind == "delta_tilde":
                            vec = delta_tilde.sum(0)
                        else:  # "update": exactly what compute_deltas gives for this weight
                            dtype = model.get_parameter(weight).dtype
                            step = editor.alpha(weight) * editor.pseudo_gradient(weight, u_tilde, delta_tilde)
                            vec = step.to(dtype).reshape(-1)
                        vectors[weight, kind].append(vec.detach().float().cpu().numpy())
    finally:
        editor.train(was_training)
    return {key: np.stack(v) for key, v in vectors.items()}


# ---------------------------------------------------------------------------------------------
# Directions and the 2-D picture
# ---------------------------------------------------------------------------------------------


def unit_rows(x) -> np.ndarray:
    """``x`` (n, dim) with each row scaled to unit L2 norm (float64): only directions remain.

    A zero row has no direction: ValueError naming its index.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"unit_rows: expected a 2-D array (n, dim), got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(1))
        raise ValueError(f"unit_rows: rows {bad[:10].tolist()} contain non-finite values")
    norms = np.linalg.norm(x, axis=1)
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise ValueError(f"unit_rows: row {int(zero[0])} is all zero and has no direction "
                         f"({zero.size} zero row(s): {zero[:10].tolist()})")
    return x / norms[:, None]


def embed_2d(vectors, *, seed: int = 0, pca_dim: int = 50, perplexity: float = 30) -> np.ndarray:
    """2-D t-SNE picture of the directions of ``vectors`` (n, dim) → (n, 2).

    Unit rows → PCA to ``min(pca_dim, n − 1, dim)`` components (removes noise, speeds t-SNE up) →
    t-SNE (scikit-learn, ``init="pca"``, ``random_state=seed``).  The perplexity is clipped to
    ``(n − 1) / 3`` (at least 1) for small inputs, since t-SNE needs it well below n.
    Deterministic for a fixed seed.  Only the picture: measure separation with :func:`silhouette`
    and friends on the vectors themselves.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = unit_rows(vectors)
    n, dim = x.shape
    if n < 3:
        raise ValueError(f"embed_2d: need at least 3 vectors, got {n}")
    if dim < 2:
        raise ValueError(f"embed_2d: need vectors of dimension >= 2, got {dim}")
    n_components = min(pca_dim, n - 1, dim)
    if n_components < 2:
        raise ValueError(f"embed_2d: pca_dim must be >= 2, got {pca_dim}")
    reduced = PCA(n_components=n_components, svd_solver="full").fit_transform(x)
    perplexity = min(float(perplexity), max(1.0, (n - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    return tsne.fit_transform(reduced)


# ---------------------------------------------------------------------------------------------
# Separation, measured in the high-dimensional space
# ---------------------------------------------------------------------------------------------


def _checked(vectors, labels, *, min_labels: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows and labels as arrays, with clear errors for what the measures cannot handle."""
    x = unit_rows(vectors)
    labels = np.asarray(list(labels), dtype=object)
    if labels.ndim != 1 or len(labels) != len(x):
        raise ValueError(f"{len(x)} vectors but {len(labels)} labels")
    n_labels = len(set(labels.tolist()))
    if n_labels < min_labels:
        raise ValueError(f"need at least {min_labels} different labels, got {n_labels}: {sorted(set(labels.tolist()))}")
    return x, labels


def _neighbours(x: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Indices (n, k) of each row's k nearest other rows by cosine similarity (rows are unit).

    Leave-one-out: a point is never its own neighbour.  Ties go to the lower index (stable sort).
    Computed in chunks of rows, so memory stays O(chunk · n).
    """
    n = len(x)
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be between 1 and n − 1 = {n - 1} (leave-one-out), got {k}")
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, chunk):
        sim = x[start:start + chunk] @ x.T  # cosine similarity of unit rows
        rows = np.arange(sim.shape[0])
        sim[rows, start + rows] = -np.inf  # leave the point itself out
        out[start:start + chunk] = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return out


#: Neighbours per point by default, fewer where a label has fewer other members (``_same_label_share``).
K_NEIGHBOURS = 10


def _same_label_share(vectors, labels, k: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Each point's share of same-label points among its ``k`` nearest neighbours.  ``k=None``:
    ``K_NEIGHBOURS``, at most the smallest label's size minus one, so that a point of every
    label could have a pure neighbourhood (with 5 ZsRE edits and k = 10, ZsRE's overlap would be
    at least 0.6 by construction)."""
    x, labels = _checked(vectors, labels)
    if k is None:
        k = max(1, min(K_NEIGHBOURS, min(Counter(labels.tolist()).values()) - 1))
    nbrs = _neighbours(x, k)
    return (labels[nbrs] == labels[:, None]).mean(1), labels


def silhouette(vectors, labels) -> float:
    """Silhouette score of ``labels`` on the unit directions of ``vectors``, cosine distance.

    ``s_i = (b_i − a_i) / max(a_i, b_i)`` with ``a_i`` the mean distance to its own label and
    ``b_i`` to the nearest other label; the mean over points.  1: tight, separated task clusters;
    about 0: no structure; negative: points lie nearer another task.
    """
    from sklearn.metrics import silhouette_score

    x, labels = _checked(vectors, labels)
    n_labels = len(set(labels.tolist()))
    if n_labels > len(x) - 1:
        raise ValueError(f"silhouette needs fewer labels ({n_labels}) than points ({len(x)})")
    return float(silhouette_score(x, labels.astype(str), metric="cosine"))


def knn_agreement(vectors, labels, k: int | None = None, *, per_label: bool = False) -> float | dict[str, float]:
    """Mean leave-one-out share of each point's ``k`` nearest neighbours (cosine) with its label
    (default ``k``: 10, fewer for a label with fewer points; ``_same_label_share``).

    1: every neighbourhood is pure.  Compare with :func:`knn_chance`, the value for labels that
    carry no information.  ``per_label=True`` gives ``{label: mean over that label's points}``.
    """
    share, labels = _same_label_share(vectors, labels, k)
    if not per_label:
        return float(share.mean())
    return {lab: float(share[labels == lab].mean()) for lab in _ordered(labels)}


def knn_chance(labels) -> float:
    """Expected :func:`knn_agreement` if the labels were shuffled: ``Σ_c (n_c / n) · (n_c − 1) / (n − 1)``."""
    counts = np.array(list(Counter(list(labels)).values()), dtype=np.float64)
    n = counts.sum()
    if n < 2:
        raise ValueError("knn_chance: need at least 2 points")
    return float((counts / n * (counts - 1) / (n - 1)).sum())


def region_overlap(vectors, labels, of: str, k: int | None = None) -> float:
    """For the points labelled ``of``: mean share of their ``k`` nearest neighbours (cosine) that
    carry a *different* label (default ``k`` as in :func:`knn_agreement`).  0: the region of ``of``
    is clean; 1: fully mixed with others."""
    share, labels = _same_label_share(vectors, labels, k)
    mask = labels == of
    if not mask.any():
        raise ValueError(f"region_overlap: no point is labelled {of!r}; labels: {_ordered(labels)}")
    return float(1.0 - share[mask].mean())


def within_task_cosine(vectors, labels) -> dict[str, float]:
    """Per label, the mean pairwise cosine similarity of its edit directions (i ≠ j).

    1: every edit of the task points the same way (a regular task); about 0: unrelated directions.
    Works for a single label too; a label with only one point has no pair and raises ValueError.
    """
    x, labels = _checked(vectors, labels, min_labels=1)
    out = {}
    for lab in _ordered(labels):
        xs = x[labels == lab]
        m = len(xs)
        if m < 2:
            raise ValueError(f"within_task_cosine: label {lab!r} has only one point, no pair to compare")
        total = xs.sum(0)
        # Σ_{i≠j} cos(x_i, x_j) = |Σ_i x_i|² − Σ_i |x_i|² = |Σ x|² − m for unit rows
        out[lab] = float((total @ total - m) / (m * (m - 1)))
    return out


def _ordered(labels) -> list:
    """Distinct labels, the paper's tasks first in their usual order, then the rest sorted."""
    present = set(np.asarray(labels, dtype=object).tolist())
    known = [t for t in task_colors() if t in present]
    return known + sorted(present - set(known), key=str)


def separation_table(groups: Mapping[str, tuple[Any, Sequence[str]]], k: int = 10) -> pd.DataFrame:
    """One row per group (e.g. per editor): ``{name: (vectors, labels)}`` → a DataFrame indexed by
    group with columns ``silhouette``, ``knn_agreement`` (at ``k``), ``knn_chance`` and ``n``."""
    if not groups:
        raise ValueError("separation_table: no groups")
    rows = []
    for name, (vectors, labels) in groups.items():
        labels = list(labels)
        rows.append({"group": name, "silhouette": silhouette(vectors, labels),
                     "knn_agreement": knn_agreement(vectors, labels, k), "knn_chance": knn_chance(labels),
                     "n": len(labels)})
    return pd.DataFrame(rows).set_index("group")


# ---------------------------------------------------------------------------------------------
# The picture
# ---------------------------------------------------------------------------------------------


def plot_embedding(ax, xy, labels, *, title: str, palette: Mapping[str, str] | None = None):
    """Scatter the 2-D embedding ``xy`` (n, 2) on ``ax``, one colour per label from ``palette``.

    Labels missing from the palette (default: the task colours) raise ValueError.  Returns ``ax``.
    """
    import seaborn as sns

    palette = task_colors() if palette is None else palette

    xy = np.asarray(xy, dtype=np.float64)
    labels = [str(lab) for lab in labels]
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"plot_embedding: xy must have shape (n, 2), got {xy.shape}")
    if len(labels) != len(xy):
        raise ValueError(f"plot_embedding: {len(xy)} points but {len(labels)} labels")
    missing = sorted(set(labels) - set(palette))
    if missing:
        raise ValueError(f"plot_embedding: no colour for labels {missing}; palette has {sorted(palette)}")
    order = [lab for lab in palette if lab in set(labels)]
    sns.scatterplot(x=xy[:, 0], y=xy[:, 1], hue=labels, hue_order=order, palette=dict(palette), ax=ax,
                    s=28, alpha=0.8, edgecolor="white", linewidth=0.3)
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_title(title)
    ax.legend(title="task", loc="best", frameon=True)
    return ax
