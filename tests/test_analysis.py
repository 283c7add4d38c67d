"""Gradient-direction analysis (instructedit_lite.analysis): separation measures on synthetic
clusters with known answers, the t-SNE embedding, and edit vectors of a MEND editor on the tiny
hand-made model (no training anywhere)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from instructedit_lite import analysis as an  # noqa: E402
from instructedit_lite.editors import MendMethod, edit_batch  # noqa: E402
from instructedit_lite.instructions import default_instructions  # noqa: E402
from instructedit_lite.editors.mend import MendConfig, MendEditor  # noqa: E402
from instructedit_lite.plots import TASK_COLORS  # noqa: E402
from tiny import hand_records, snapshot, tiny_model, tiny_tokenizer  # noqa: E402

torch.set_num_threads(1)

TASKS3 = ["counterfact", "wikirecent", "convsent"]


def clusters(n_per: int = 20, dim: int = 16, noise: float = 0.05, seed: int = 0):
    """Three tight clusters along orthogonal directions, with different lengths per point (so only
    the direction identifies the task)."""
    rng = np.random.default_rng(seed)
    x, labels = [], []
    for c, task in enumerate(TASKS3):
        centre = np.zeros(dim)
        centre[c] = 1.0
        pts = centre + noise * rng.standard_normal((n_per, dim))
        x.append(pts * rng.uniform(0.5, 5.0, size=(n_per, 1)))
        labels += [task] * n_per
    return np.concatenate(x), labels


# ---------------------------------------------------------------------------------------------
# unit_rows
# ---------------------------------------------------------------------------------------------


def test_unit_rows_norms_are_one_and_directions_kept():
    x = np.array([[3.0, 4.0], [0.0, -2.0], [1e-3, 1e-3]])
    u = an.unit_rows(x)
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0)
    np.testing.assert_allclose(u[0], [0.6, 0.8])
    np.testing.assert_allclose(u[1], [0.0, -1.0])


def test_unit_rows_zero_row_names_its_index():
    with pytest.raises(ValueError, match="row 2"):
        an.unit_rows(np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="2-D"):
        an.unit_rows(np.ones(3))


# ---------------------------------------------------------------------------------------------
# Separation measures
# ---------------------------------------------------------------------------------------------


def test_separated_clusters_score_high_and_shuffled_labels_score_chance():
    x, labels = clusters()
    assert an.silhouette(x, labels) > 0.9
    assert an.knn_agreement(x, labels, k=10) == 1.0
    assert an.knn_agreement(x, labels, k=10, per_label=True) == {t: 1.0 for t in TASKS3}

    shuffled = list(np.random.default_rng(1).permutation(labels))
    chance = an.knn_chance(shuffled)
    assert chance == pytest.approx(19 / 59)  # 3 balanced labels, leave-one-out
    assert abs(an.silhouette(x, shuffled)) < 0.15
    assert abs(an.knn_agreement(x, shuffled, k=10) - chance) < 0.12


def test_knn_is_leave_one_out_on_a_hand_example():
    # Two pairs of nearby directions (0°/10° and 90°/100°); each pair mixes the two labels.
    angles = np.deg2rad([0, 10, 90, 100])
    x = np.c_[np.cos(angles), np.sin(angles)] * np.array([[1.0], [3.0], [0.2], [7.0]])
    labels = ["counterfact", "zsre", "counterfact", "zsre"]
    assert an.knn_agreement(x, labels, k=1) == 0.0  # a point is never its own neighbour
    assert an.region_overlap(x, labels, "counterfact", k=1) == 1.0
    # k = n − 1: every other point is a neighbour, exactly the chance level
    assert an.knn_agreement(x, labels, k=3) == pytest.approx(1 / 3) == an.knn_chance(labels)
    regrouped = ["counterfact", "counterfact", "zsre", "zsre"]
    assert an.knn_agreement(x, regrouped, k=1) == 1.0
    assert an.region_overlap(x, regrouped, "zsre", k=2) == pytest.approx(0.5)


def test_silhouette_uses_directions_not_lengths():
    # Two labels along the same direction with very different lengths: no separation by direction.
    rng = np.random.default_rng(0)
    base = np.array([1.0, 1.0, 0.0]) + 0.05 * rng.standard_normal((40, 3))
    x = base * np.r_[np.full(20, 1.0), np.full(20, 100.0)][:, None]
    labels = ["counterfact"] * 20 + ["zsre"] * 20
    assert an.silhouette(x, labels) < 0.2
    assert an.knn_agreement(x, labels, k=5) < 0.75


def test_region_overlap_clean_vs_interleaved():
    x, labels = clusters()
    assert an.region_overlap(x, labels, "counterfact", k=10) == 0.0

    # convsent points relabelled alternately: convsent and zsre share one region, so about half of
    # their neighbours carry the other label.  Low dimension keeps kNN "hubs" (which make the
    # estimate noisy in high dimension) rare.
    x, labels = clusters(n_per=60, dim=3, noise=0.1)
    mixed = ["zsre" if lab == "convsent" and i % 2 else lab for i, lab in enumerate(labels)]
    assert an.region_overlap(x, mixed, "counterfact", k=10) == 0.0
    assert an.region_overlap(x, mixed, "zsre", k=10) > 0.4
    assert an.region_overlap(x, mixed, "convsent", k=10) > 0.4
    assert an.region_overlap(x, mixed, "zsre", k=10) == pytest.approx(
        1 - an.knn_agreement(x, mixed, k=10, per_label=True)["zsre"])
    with pytest.raises(ValueError, match="no point is labelled 'nothing'"):
        an.region_overlap(x, mixed, "nothing")


def test_within_task_cosine_known_values():
    v = np.array([1.0, 2.0, 3.0])
    a = np.array([1.0, 0.0])
    b = np.array([0.5, np.sqrt(3) / 2])  # 60 degrees from a
    x = np.stack([np.r_[v, 0.0, 0.0] * s for s in (1, 2, 7)] + [np.r_[0.0, 0.0, 0.0, a], np.r_[0.0, 0.0, 0.0, b]])
    got = an.within_task_cosine(x, ["counterfact"] * 3 + ["convsent"] * 2)
    assert got["counterfact"] == pytest.approx(1.0)
    assert got["convsent"] == pytest.approx(0.5)
    # opposite directions average to -1
    assert an.within_task_cosine(np.array([[1.0, 0.0], [-3.0, 0.0]]), ["zsre", "zsre"]) == {"zsre": pytest.approx(-1.0)}
    with pytest.raises(ValueError, match="only one point"):
        an.within_task_cosine(x[:4], ["counterfact"] * 3 + ["convsent"])


def test_measures_reject_bad_inputs():
    x, labels = clusters(n_per=4)
    for fn in (an.silhouette, an.knn_agreement):
        with pytest.raises(ValueError, match="12 vectors but 11 labels"):
            fn(x, labels[:-1])
        with pytest.raises(ValueError, match="at least 2 different labels"):
            fn(x, ["zsre"] * len(x))
    with pytest.raises(ValueError, match="k must be between 1 and n − 1 = 11"):
        an.knn_agreement(x, labels, k=12)
    with pytest.raises(ValueError, match="k must be"):
        an.region_overlap(x, labels, "zsre", k=0)
    an.knn_agreement(x, labels, k=11)  # the largest allowed k works
    with pytest.raises(ValueError, match="12 vectors but 11 labels"):
        an.within_task_cosine(x, labels[:-1])


def test_separation_table_one_row_per_group():
    x, labels = clusters()
    shuffled = list(np.random.default_rng(1).permutation(labels))
    table = an.separation_table({"InstructEdit": (x, labels), "MEND (multi-task)": (x, shuffled)})
    assert list(table.index) == ["InstructEdit", "MEND (multi-task)"]
    assert {"silhouette", "knn_agreement", "knn_chance", "n"} <= set(table.columns)
    assert table.loc["InstructEdit", "knn_agreement"] == 1.0
    assert table.loc["InstructEdit", "silhouette"] > table.loc["MEND (multi-task)", "silhouette"] + 0.5
    assert (table["n"] == 60).all()


# ---------------------------------------------------------------------------------------------
# Embedding and plot
# ---------------------------------------------------------------------------------------------


def test_embed_2d_deterministic_and_keeps_clusters():
    x, labels = clusters(n_per=15, dim=80)
    xy = an.embed_2d(x, seed=3)
    assert xy.shape == (45, 2)
    np.testing.assert_array_equal(xy, an.embed_2d(x, seed=3))
    from sklearn.metrics import silhouette_score

    assert silhouette_score(xy, labels) > 0.5  # separated clusters stay separated in the picture


def test_embed_2d_small_inputs_clip_perplexity():
    x = np.random.default_rng(0).standard_normal((5, 4))
    assert an.embed_2d(x).shape == (5, 2)  # perplexity 30 would exceed n
    with pytest.raises(ValueError, match="at least 3"):
        an.embed_2d(x[:2])


def test_plot_embedding_colours_labels_and_legend():
    x, labels = clusters(n_per=5)
    xy = np.random.default_rng(0).standard_normal((15, 2))
    fig, ax = plt.subplots()
    try:
        an.plot_embedding(ax, xy, labels, title="InstructEdit")
        assert ax.get_xlabel() == "t-SNE 1" and ax.get_ylabel() == "t-SNE 2"
        assert ax.get_title() == "InstructEdit"
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend == TASKS3
        colours = {to_hex(c) for c in ax.collections[0].get_facecolors()}
        assert colours == {TASK_COLORS[t].lower() for t in TASKS3}
        with pytest.raises(ValueError, match="no colour for labels"):
            an.plot_embedding(ax, xy, ["unknown"] * 15, title="x")
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Edit vectors of a MEND editor on the tiny model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world():
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    records = hand_records(("counterfact", "convsent", "zsre"), n=2)
    records = [r for rs in records.values() for r in rs]
    editor = MendEditor(model, MendConfig(rank=8), generator=torch.Generator().manual_seed(0))
    # Not the identity: non-zero U and some running statistics, so ũ differs from u.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in editor.named_parameters():
            if name.endswith(".U"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        for t in editor.transforms.values():
            t.norm_u.update(torch.randn(50, t.d_in, generator=g) * 0.3 + 0.1)
            t.norm_delta.update(torch.randn(50, t.d_out, generator=g) * 1e-3)
    return tok, model, records, editor


def _batch(tok, method, record):
    return edit_batch(tok, method.prepare(record), None, 2, unlikelihood=True)  # as MendMethod edits


def test_edit_vectors_shapes_and_editor_untouched(world):
    tok, model, records, editor = world
    method = MendMethod(editor, "MEND (multi-task)")
    name = list(editor.infos)[-1]
    info = editor.infos[name]
    editor.train()  # in training mode the running statistics would move: edit_vectors must not let them
    state = {k: v.clone() for k, v in editor.state_dict().items()}
    weights = snapshot(model)
    dims = {"u_tilde": info.d_in, "delta_tilde": info.d_out, "u": info.d_in, "update": info.d_in * info.d_out}
    for kind, dim in dims.items():
        vecs = an.edit_vectors(method, model, tok, records, kind=kind)
        assert vecs.shape == (len(records), dim), kind
        assert np.isfinite(vecs).all() and (np.linalg.norm(vecs, axis=1) > 0).all()
    assert editor.training  # mode restored
    after = editor.state_dict()
    for k, v in state.items():
        assert torch.equal(after[k], v), f"editor state {k} changed"
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[n]) and p.grad is None, n


def test_edit_vectors_match_captured_factors_and_deltas(world):
    tok, model, records, editor = world
    method = MendMethod(editor, "MEND (multi-task)")
    first = list(editor.infos)[0]
    for name in (list(editor.infos)[-1], first):
        kw = {} if name != first else {"weight": first}
        u_vecs = an.edit_vectors(method, model, tok, records, kind="u", **kw)
        ut_vecs = an.edit_vectors(method, model, tok, records, kind="u_tilde", **kw)
        dt_vecs = an.edit_vectors(method, model, tok, records, kind="delta_tilde", **kw)
        upd_vecs = an.edit_vectors(method, model, tok, records, kind="update", **kw)
        editor.eval()
        for i, record in enumerate(records):
            batch = _batch(tok, method, record)
            factors = editor.capture(model, batch)
            np.testing.assert_allclose(u_vecs[i], factors.u[name].sum(0).numpy(), rtol=1e-5, atol=1e-6)
            with torch.no_grad():
                u_t, d_t = editor.transform_all(factors)[name]
                delta_w = editor.compute_deltas(model, batch, meta_grad=False)[name]
            np.testing.assert_allclose(ut_vecs[i], u_t.sum(0).numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(dt_vecs[i], d_t.sum(0).numpy(), rtol=1e-5, atol=1e-8)
            np.testing.assert_allclose(upd_vecs[i], delta_w.reshape(-1).numpy(), rtol=1e-5, atol=1e-12)
        # the editor really transforms: ũ is not (a rescaling of) u
        assert not np.allclose(an.unit_rows(u_vecs), an.unit_rows(ut_vecs), atol=1e-3)
    # ConvSent edits use n_responses rows: fewer rows give a different vector
    conv = [r for r in records if r.task == "convsent"][:1]
    one = an.edit_vectors(method, model, tok, conv, kind="u", n_responses=1)
    two = an.edit_vectors(method, model, tok, conv, kind="u", n_responses=2)
    assert not np.allclose(one, two)


def test_edit_vector_sets_equal_one_call_per_matrix_and_kind(world):
    tok, model, records, editor = world
    method = MendMethod(editor, "InstructEdit", instructions=default_instructions())
    sets = an.edit_vector_sets(method, model, tok, records, kinds=("u_tilde", "u", "update"))
    assert set(sets) == {(w, k) for w in editor.infos for k in ("u_tilde", "u", "update")}
    for (weight, kind), vecs in sets.items():  # one pass per edit gives exactly the separate calls
        np.testing.assert_array_equal(vecs, an.edit_vectors(method, model, tok, records, weight=weight, kind=kind))
    with pytest.raises(ValueError, match="not edited by this editor"):
        an.edit_vector_sets(method, model, tok, records, weights=["transformer.h.0.attn.c_attn.weight"])


def test_instruction_changes_the_edit_vectors(world):
    tok, model, records, editor = world
    plain = MendMethod(editor, "MEND (multi-task)")
    instructed = MendMethod(editor, "InstructEdit", instructions=default_instructions())
    assert instructed.prepare(records[0]).prompt != records[0].prompt
    for kind in ("u_tilde", "update"):
        a = an.edit_vectors(plain, model, tok, records, kind=kind)
        b = an.edit_vectors(instructed, model, tok, records, kind=kind)
        assert a.shape == b.shape
        for i in range(len(records)):
            assert not np.allclose(a[i], b[i], rtol=1e-3, atol=1e-6), (kind, i)
    # and the plain method gives exactly the vectors of the unprepared records
    again = an.edit_vectors(plain, model, tok, records, kind="u_tilde")
    np.testing.assert_array_equal(again, an.edit_vectors(plain, model, tok, records, kind="u_tilde"))


def test_edit_vectors_rejects_bad_kind_and_weight(world):
    tok, model, records, editor = world
    method = MendMethod(editor, "MEND")
    with pytest.raises(ValueError, match="kind must be one of"):
        an.edit_vectors(method, model, tok, records, kind="gradient")
    with pytest.raises(ValueError, match="not edited by this editor"):
        an.edit_vectors(method, model, tok, records, weight="transformer.h.0.attn.c_attn.weight")
    with pytest.raises(ValueError, match="no records"):
        an.edit_vectors(method, model, tok, [])


def test_neighbours_in_chunks_match_one_block():
    x, _ = clusters(n_per=7)
    u = an.unit_rows(x)
    np.testing.assert_array_equal(an._neighbours(u, 5, chunk=4), an._neighbours(u, 5))


def test_default_k_fits_the_smallest_label():
    """Five well-separated ZsRE edits among forty others: with the default k (at most 5 - 1 = 4
    neighbours) their region is clean; with k = 10 it could not be (at least 6 others per point)."""
    rng = np.random.default_rng(0)
    centres = {"zsre": [1.0, 0, 0], "counterfact": [0, 1.0, 0], "wikirecent": [0, 0, 1.0]}
    sizes = {"zsre": 5, "counterfact": 20, "wikirecent": 20}
    x = np.concatenate([np.array(centres[t]) + 0.01 * rng.normal(size=(n, 3)) for t, n in sizes.items()])
    labels = [t for t, n in sizes.items() for _ in range(n)]
    assert an.region_overlap(x, labels, "zsre") == 0.0
    assert an.region_overlap(x, labels, "zsre", k=10) >= 0.6
    assert an.knn_agreement(x, labels) == 1.0
