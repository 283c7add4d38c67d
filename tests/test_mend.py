"""Tests of the MEND editor (instructedit_lite.editors.mend) on tiny random-init GPT-2 and LLaMA models.

Each test guards one property of faithful MEND or one pitfall of the reference implementations
(paper-notes §4 and §9): Conv1D vs Linear orientation, clamp vs relu, running statistics that
survive a resume, zero-row dropping, exact weight restoration, no gradient work below the edited
layers, meta-gradients through the functional edited model.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from instructedit_lite.editors.mend import (
    LowRankBlock,
    MendConfig,
    MendEditor,
    RunningNorm,
    applied,
    default_weight_names,
    functional_forward,
    lm_loss,
    time_edit_vs_forward_backward,
)

VOCAB = 101


# ---------------------------------------------------------------------------------------------
# Tiny models and batches
# ---------------------------------------------------------------------------------------------


def tiny_gpt2(n_embd: int = 32, n_layer: int = 4, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()  # eval: no dropout, so passes are deterministic


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


GPT2_NAMES = [f"transformer.h.{i}.mlp.{m}.weight" for i in (2, 3) for m in ("c_fc", "c_proj")]
LLAMA_NAMES = [f"model.layers.{i}.mlp.{m}.weight" for i in (0, 1) for m in ("gate_proj", "up_proj", "down_proj")]


def make_batch(examples: list[tuple[list[int], int]], pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded batch; each example is (token ids, number of trailing target tokens)."""
    length = pad_to or max(len(ids) for ids, _ in examples)
    input_ids = torch.zeros(len(examples), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, (ids, n_target) in enumerate(examples):
        n = len(ids)
        input_ids[row, :n] = torch.tensor(ids)
        attention_mask[row, :n] = 1
        labels[row, n - n_target : n] = torch.tensor(ids[n - n_target :])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def example(n: int, n_target: int, seed: int) -> tuple[list[int], int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (n,), generator=g).tolist(), n_target


def editor_for(model: nn.Module, names: list[str], seed: int = 0, **kwargs) -> MendEditor:
    config = MendConfig(rank=16, weight_names=names, **kwargs)
    return MendEditor(model, config, generator=torch.Generator().manual_seed(seed))


def randomize(editor: MendEditor, seed: int = 1, scale: float = 0.3) -> None:
    """Move every network parameter off its identity initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in editor.network_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def post_edit_loss(editor: MendEditor, model: nn.Module, batch) -> torch.Tensor:
    deltas = editor.compute_deltas(model, batch)
    logits = functional_forward(model, editor.edited_params(model, deltas), batch)
    return lm_loss(logits, batch["labels"])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared busy machine two OpenMP threads make
    each forward pass ~50x slower; restore the setting for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def batch():
    return make_batch([example(12, 4, seed=1), example(9, 3, seed=2)])


# ---------------------------------------------------------------------------------------------
# Loss and config
# ---------------------------------------------------------------------------------------------


def test_lm_loss_shifts_and_ignores_unlabelled_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), -100)
    labels[0, 3], labels[0, 4], labels[1, 2] = 1, 2, 6
    logp = logits.log_softmax(-1)
    expected = -(logp[0, 2, 1] + logp[0, 3, 2] + logp[1, 1, 6]) / 3  # logits[t] predict labels[t+1]
    assert torch.allclose(lm_loss(logits, labels), expected)
    with pytest.raises(ValueError):
        lm_loss(logits, torch.full((2, 5), -100))


def test_config_round_trip_and_invalid_combinations():
    config = MendConfig(rank=8, combine=False, mode="x_only", share=False, weight_names=["a.weight"])
    assert MendConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown keys"):
        MendConfig.from_dict({**config.to_dict(), "lr": 1.0})
    for bad in (dict(mode="x_only"), dict(one_sided=True), dict(mode="sideways", combine=False)):
        with pytest.raises(ValueError):
            MendConfig(**bad)  # combine=True (default) cannot be one-sided; unknown mode


def test_default_weight_names_are_mlp_of_last_three_blocks(gpt2):
    names = default_weight_names(gpt2)
    assert names == [f"transformer.h.{i}.mlp.{m}.weight" for i in (1, 2, 3) for m in ("c_fc", "c_proj")]
    assert default_weight_names(tiny_llama(), n_last=1) == LLAMA_NAMES[3:]


# ---------------------------------------------------------------------------------------------
# 1. Identity editor + no normalisation = the true gradient, Conv1D and Linear
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2-conv1d", "llama-linear"])
def test_identity_editor_gives_true_gradient(arch, batch):
    model, names = (tiny_gpt2(), GPT2_NAMES) if arch == "gpt2-conv1d" else (tiny_llama(), LLAMA_NAMES)
    editor = editor_for(model, names, normalize=False)
    factors = editor.capture(model, batch)
    deltas = editor.compute_deltas(model, batch)
    for name in names:
        weight = model.get_parameter(name)
        u_tilde, delta_tilde = editor.transform(name, factors.u[name], factors.delta[name])
        assert torch.equal(u_tilde, factors.u[name]) and torch.equal(delta_tilde, factors.delta[name])
        pseudo = editor.pseudo_gradient(name, u_tilde, delta_tilde)
        true = factors.true_grads[name]
        assert pseudo.shape == weight.shape == true.shape  # the weight's own layout
        assert torch.allclose(pseudo, true, rtol=1e-4, atol=1e-7), name
        assert torch.allclose(deltas[name], 1e-4 * true, rtol=1e-4, atol=1e-11)  # ΔW = α ∇W at init


# ---------------------------------------------------------------------------------------------
# 2. clamp(min=0), not relu: the editor moves from its identity initialisation
# ---------------------------------------------------------------------------------------------


def _block_grads(editor: MendEditor, gpt2, batch) -> dict[str, torch.Tensor]:
    named = dict(editor.named_parameters())
    loss = post_edit_loss(editor, gpt2, batch)
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g) for (n, p), g in zip(named.items(), grads)}


def test_clamp_gives_gradient_at_init_relu_does_not(gpt2, batch, monkeypatch):
    editor = editor_for(gpt2, GPT2_NAMES)
    grads = _block_grads(editor, gpt2, batch)
    blocks = [n.rsplit(".", 1)[0] for n in grads if n.endswith(".U")]
    assert len(blocks) == 4  # two shape groups x two blocks
    for block in blocks:
        for leaf in ("U", "bias", "mode_shift.weight"):
            assert grads[f"{block}.{leaf}"].abs().sum() > 0, f"{block}.{leaf}"
        # At init V and the mode scale get exactly zero gradient by construction (they multiply
        # U = 0 and U V h + b = 0); they start moving once U and b have.
        assert grads[f"{block}.V"].abs().sum() == 0
        assert grads[f"{block}.mode_scale.weight"].abs().sum() == 0

    # The same editor with relu: every pre-activation is exactly 0 at init and relu'(0) = 0.
    monkeypatch.setattr(LowRankBlock, "_nonlinearity", staticmethod(torch.relu))
    relu_grads = _block_grads(editor, gpt2, batch)
    for name, grad in relu_grads.items():
        if not name.startswith("alphas."):
            assert grad.abs().sum() == 0, name
    monkeypatch.undo()

    # After one step of SGD on the clamp editor, V and the scales receive gradient as well.
    with torch.no_grad():
        for name, p in editor.named_parameters():
            p -= 1.0 * grads[name]
    moved = _block_grads(editor, gpt2, batch)
    for block in blocks:
        assert moved[f"{block}.V"].abs().sum() > 0
        assert moved[f"{block}.mode_scale.weight"].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# 3. Running statistics: train mode only, correct, and kept across save/load
# ---------------------------------------------------------------------------------------------


def test_running_norm_matches_torch_over_chunks():
    rows = torch.randn(50, 6) * torch.arange(1.0, 7.0) + 3.0
    norm = RunningNorm(6).train()
    for chunk in rows.split([1, 7, 20, 22]):
        norm(chunk)
    assert norm.count.item() == 50
    assert torch.allclose(norm.mean.float(), rows.mean(0), atol=1e-5)
    assert torch.allclose(norm.std.float(), rows.std(0), atol=1e-5)  # unbiased, like torch
    out = norm.eval()(rows)
    assert torch.allclose(out, (rows - rows.mean(0)) / (rows.std(0) + 1e-7), atol=1e-4)
    assert norm.count.item() == 50  # eval mode does not update
    assert torch.equal(RunningNorm(3).std, torch.ones(3, dtype=torch.float64))  # guard count < 2


def _group_rows(editor: MendEditor, factors, group: str):
    names = [n for n in editor.infos if editor.group_of[n] == group]
    return torch.cat([factors.u[n] for n in names]), torch.cat([factors.delta[n] for n in names])


def _check_stats(norm: RunningNorm, rows: torch.Tensor):
    assert norm.count.item() == rows.shape[0]
    assert torch.allclose(norm.mean, rows.double().mean(0), rtol=1e-5, atol=1e-8)
    assert torch.allclose(norm.std, rows.double().std(0), rtol=1e-4, atol=1e-8)


def test_welford_updates_in_train_mode_only_and_survives_save_load(gpt2, batch, tmp_path):
    editor = editor_for(gpt2, GPT2_NAMES).eval()
    before = {k: v.clone() for k, v in editor.state_dict().items()}
    editor.compute_deltas(gpt2, batch)
    assert all(torch.equal(v, before[k]) for k, v in editor.state_dict().items())  # frozen in eval

    editor.train()
    factors = editor.capture(gpt2, batch)
    editor.compute_deltas(gpt2, batch)
    for group, transform in editor.transforms.items():
        u_rows, delta_rows = _group_rows(editor, factors, group)  # layers sharing the network
        _check_stats(transform.norm_u, u_rows)
        _check_stats(transform.norm_delta, delta_rows)

    path = tmp_path / "editor.pt"
    editor.save(path)
    loaded = MendEditor.load(path, gpt2)
    for k, v in editor.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

    # Resume: a second training pass continues from the saved statistics, not from zero.
    batch2 = make_batch([example(10, 5, seed=7)])
    factors2 = loaded.capture(gpt2, batch2)
    loaded.train().compute_deltas(gpt2, batch2)
    for group, transform in loaded.transforms.items():
        u1, d1 = _group_rows(loaded, factors, group)
        u2, d2 = _group_rows(loaded, factors2, group)
        _check_stats(transform.norm_u, torch.cat([u1, u2]))
        _check_stats(transform.norm_delta, torch.cat([d1, d2]))


# ---------------------------------------------------------------------------------------------
# 4. Save/load: bit-identical deltas; clear errors on a different model
# ---------------------------------------------------------------------------------------------


def test_save_load_gives_identical_deltas(gpt2, batch, tmp_path):
    editor = editor_for(gpt2, GPT2_NAMES)
    editor.train().compute_deltas(gpt2, batch)  # non-trivial statistics
    randomize(editor)
    with torch.no_grad():
        for i, alpha in enumerate(editor.alpha_parameters()):
            alpha.fill_(-0.01 * (i + 1))
    path = tmp_path / "sub" / "editor.pt"
    path.parent.mkdir()
    editor.save(path)
    assert os.listdir(path.parent) == ["editor.pt"]  # no temporary file left behind

    loaded = MendEditor.load(path, tiny_gpt2())  # a fresh model of the same architecture
    assert loaded.config == editor.config
    editor.eval(), loaded.eval()
    expected, got = editor.compute_deltas(gpt2, batch), loaded.compute_deltas(gpt2, batch)
    for name in GPT2_NAMES:
        assert torch.equal(expected[name], got[name]), name
        assert expected[name].abs().sum() > 0


def test_load_onto_other_model_names_the_weight(gpt2, tmp_path):
    path = tmp_path / "editor.pt"
    editor_for(gpt2, GPT2_NAMES).save(path)
    with pytest.raises(ValueError, match=r"transformer\.h\.2\.mlp\.c_fc\.weight.*\[48, 192\]") as err:
        MendEditor.load(path, tiny_gpt2(n_embd=48))
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match=r"transformer\.h\.2\.mlp\.c_fc\.weight") as err:
        MendEditor.load(path, tiny_gpt2(n_layer=2))  # no block 2
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match=r"transformer\.h\.2\.mlp\.c_fc\.weight"):
        MendEditor.load(path, tiny_llama())


# ---------------------------------------------------------------------------------------------
# 5. In-place application restores the exact weights
# ---------------------------------------------------------------------------------------------


def test_applied_restores_exact_weights_also_on_error(gpt2, batch):
    editor = editor_for(gpt2, GPT2_NAMES)
    with torch.no_grad():
        for alpha in editor.alpha_parameters():
            alpha.fill_(0.37)  # large enough that W + ΔW − ΔW would not round-trip
    deltas = editor.compute_deltas(gpt2, batch, meta_grad=False)
    original = {k: v.clone() for k, v in gpt2.state_dict().items()}
    logits_before = gpt2(input_ids=batch["input_ids"]).logits

    with applied(gpt2, deltas):
        for name in GPT2_NAMES:
            assert torch.equal(gpt2.get_parameter(name), original[name] + deltas[name])
        assert not torch.allclose(gpt2(input_ids=batch["input_ids"]).logits, logits_before)
    assert all(torch.equal(v, original[k]) for k, v in gpt2.state_dict().items())

    with pytest.raises(RuntimeError, match="boom"):
        with applied(gpt2, deltas):
            raise RuntimeError("boom")
    assert all(torch.equal(v, original[k]) for k, v in gpt2.state_dict().items())
    assert torch.equal(gpt2(input_ids=batch["input_ids"]).logits, logits_before)


# ---------------------------------------------------------------------------------------------
# 6. Zero rows (padding, positions after the last label) are dropped
# ---------------------------------------------------------------------------------------------


def test_padding_changes_neither_deltas_nor_statistics(gpt2):
    ex = example(9, 3, seed=3)
    plain, padded = make_batch([ex]), make_batch([ex], pad_to=16)
    ed_plain, ed_padded = editor_for(gpt2, GPT2_NAMES).train(), editor_for(gpt2, GPT2_NAMES).train()

    f_plain, f_padded = ed_plain.capture(gpt2, plain), ed_padded.capture(gpt2, padded)
    for name in GPT2_NAMES:
        assert f_padded.u[name].shape == f_plain.u[name].shape  # the 7 padding rows are gone
        # Only positions that predict a label keep a non-zero δ at the last edited layer.
        if ".h.3." in name:
            assert f_plain.u[name].shape[0] == 3

    d_plain, d_padded = ed_plain.compute_deltas(gpt2, plain), ed_padded.compute_deltas(gpt2, padded)
    for name in GPT2_NAMES:
        scale = d_plain[name].abs().max().item()  # entries near 0 differ by rounding of other kernels
        assert torch.allclose(d_plain[name], d_padded[name], rtol=1e-4, atol=1e-5 * scale), name
    for group in ed_plain.transforms:
        real_rows = _group_rows(ed_plain, f_plain, group)[0].shape[0]
        for norm in ("norm_u", "norm_delta"):
            assert getattr(ed_padded.transforms[group], norm).count.item() == real_rows
            assert getattr(ed_plain.transforms[group], norm).count.item() == real_rows


# ---------------------------------------------------------------------------------------------
# 7. No gradient work below the lowest edited layer; no .grad; flags restored; hooks removed
# ---------------------------------------------------------------------------------------------


def test_no_grad_below_edited_layers_and_flags_restored(gpt2, batch):
    gpt2.transformer.wpe.weight.requires_grad_(False)  # a mixed set of flags to restore
    flags = {n: p.requires_grad for n, p in gpt2.named_parameters()}
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            seen[name] = out.requires_grad

        return hook

    handles = [
        gpt2.transformer.h[1].register_forward_hook(record("h1")),  # below the edited layers
        gpt2.transformer.h[2].attn.register_forward_hook(record("h2.attn")),  # below h.2.mlp
        gpt2.transformer.h[2].mlp.register_forward_hook(record("h2.mlp")),
    ]
    editor = editor_for(gpt2, GPT2_NAMES)
    editor.compute_deltas(gpt2, batch)
    for h in handles:
        h.remove()
    assert seen == {"h1": False, "h2.attn": False, "h2.mlp": True}
    assert all(p.grad is None for p in gpt2.parameters())
    assert {n: p.requires_grad for n, p in gpt2.named_parameters()} == flags


def test_hooks_and_flags_restored_when_the_forward_fails(gpt2):
    flags = {n: p.requires_grad for n, p in gpt2.named_parameters()}
    editor = editor_for(gpt2, GPT2_NAMES)
    bad = make_batch([example(8, 2, seed=4)])
    bad["input_ids"][0, 0] = VOCAB + 5  # out of vocabulary: the embedding raises
    with pytest.raises(IndexError):
        editor.compute_deltas(gpt2, bad)
    assert all(len(m._forward_hooks) == 0 for m in gpt2.modules())
    assert {n: p.requires_grad for n, p in gpt2.named_parameters()} == flags


# ---------------------------------------------------------------------------------------------
# 8. Meta-gradients reach α and the networks
# ---------------------------------------------------------------------------------------------


def test_meta_gradient_reaches_alpha_and_networks(gpt2, batch):
    gpt2.requires_grad_(False)  # a frozen base model, as in meta-training
    editor = editor_for(gpt2, GPT2_NAMES).train()
    alphas, nets = editor.alpha_parameters(), editor.network_parameters()
    assert len(alphas) == len(GPT2_NAMES)
    assert not {id(p) for p in alphas} & {id(p) for p in nets}
    assert len(alphas) + len(nets) == len(list(editor.parameters()))

    post_edit_loss(editor, gpt2, batch).backward()
    for p in alphas + nets:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert all(p.grad.abs() > 0 for p in alphas)
    assert sum(p.grad.abs().sum() for p in nets) > 0
    assert all(p.grad is None for p in gpt2.parameters())  # the base model is not trained


# ---------------------------------------------------------------------------------------------
# 9. The pieces compose: a few meta-training steps lower the post-edit loss
# ---------------------------------------------------------------------------------------------


def test_short_meta_training_lowers_post_edit_loss(gpt2, batch):
    gpt2.requires_grad_(False)
    editor = editor_for(gpt2, GPT2_NAMES).train()
    opt_net = torch.optim.Adam(editor.network_parameters(), lr=1e-3)
    opt_alpha = torch.optim.Adam(editor.alpha_parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = post_edit_loss(editor, gpt2, batch)
        opt_net.zero_grad(), opt_alpha.zero_grad()
        loss.backward()
        opt_net.step(), opt_alpha.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    # With the additive update W' = W + α∇̃W, descent needs α < 0.
    assert all(a.item() < 0 for a in editor.alpha_parameters())


# ---------------------------------------------------------------------------------------------
# 10. Variants change the computation
# ---------------------------------------------------------------------------------------------

VARIANTS = {
    "combined": dict(),
    "separate": dict(combine=False),
    "x_only": dict(combine=False, mode="x_only"),
    "delta_only": dict(combine=False, mode="delta_only"),
    "one_sided": dict(combine=False, one_sided=True),
    "no_norm": dict(normalize=False),
    "no_share": dict(share=False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_builds_and_edits(variant, gpt2, batch):
    editor = editor_for(gpt2, GPT2_NAMES, **VARIANTS[variant]).train()
    randomize(editor)
    deltas = editor.compute_deltas(gpt2, batch)
    for name in GPT2_NAMES:
        assert deltas[name].shape == gpt2.get_parameter(name).shape
        assert torch.isfinite(deltas[name]).all() and deltas[name].abs().sum() > 0


def _transformed(editor: MendEditor, factors, name: str):
    return editor.transform(name, factors.u[name], factors.delta[name])


@pytest.mark.parametrize(
    "variant, u_learned, delta_learned",
    [
        ("x_only", {"c_fc": True, "c_proj": True}, {"c_fc": False, "c_proj": False}),
        ("delta_only", {"c_fc": False, "c_proj": False}, {"c_fc": True, "c_proj": True}),
        # one-sided learns the smaller side: u for c_fc (32 -> 128), δ for c_proj (128 -> 32).
        ("one_sided", {"c_fc": True, "c_proj": False}, {"c_fc": False, "c_proj": True}),
        ("separate", {"c_fc": True, "c_proj": True}, {"c_fc": True, "c_proj": True}),
    ],
)
def test_one_sided_variants_pass_the_other_side_through(variant, u_learned, delta_learned, gpt2, batch):
    editor = editor_for(gpt2, GPT2_NAMES, normalize=False, **VARIANTS[variant])
    randomize(editor)
    factors = editor.capture(gpt2, batch)
    for name in GPT2_NAMES:
        kind = name.split(".")[-2]
        u_tilde, delta_tilde = _transformed(editor, factors, name)
        assert torch.equal(u_tilde, factors.u[name]) != u_learned[kind], (name, "u")
        assert torch.equal(delta_tilde, factors.delta[name]) != delta_learned[kind], (name, "delta")


def test_x_only_with_normalisation_passes_normalised_delta(gpt2, batch):
    editor = editor_for(gpt2, GPT2_NAMES, **VARIANTS["x_only"]).train()
    editor.compute_deltas(gpt2, batch)  # statistics
    editor.eval()
    randomize(editor)
    factors = editor.capture(gpt2, batch)
    name = GPT2_NAMES[0]
    norm = editor.transforms[editor.group_of[name]].norm_delta
    expected = (factors.delta[name] - norm.mean.float()) / (norm.std.float() + 1e-7)
    assert torch.allclose(_transformed(editor, factors, name)[1], expected)


def test_combined_network_mixes_u_and_delta_separate_does_not(gpt2, batch):
    name = GPT2_NAMES[0]
    for variant, coupled in (("combined", True), ("separate", False)):
        editor = editor_for(gpt2, GPT2_NAMES, normalize=False, **VARIANTS[variant])
        randomize(editor)
        factors = editor.capture(gpt2, batch)
        u, delta = factors.u[name], factors.delta[name]
        _, delta_a = editor.transform(name, u, delta)
        _, delta_b = editor.transform(name, 2 * u + 1, delta)  # change only u
        assert (not torch.allclose(delta_a, delta_b)) == coupled, variant


def test_normalisation_changes_the_input(gpt2, batch):
    outs = {}
    for normalize in (True, False):
        editor = editor_for(gpt2, GPT2_NAMES, normalize=normalize).train()
        factors = editor.capture(gpt2, batch)
        editor.compute_deltas(gpt2, batch)
        outs[normalize] = _transformed(editor.eval(), factors, GPT2_NAMES[0])[0]
        if not normalize:
            assert torch.equal(outs[normalize], factors.u[GPT2_NAMES[0]])  # identity at init
    u_hat = outs[True]
    assert not torch.allclose(u_hat, outs[False])
    assert u_hat.mean().abs() < 0.5 and 0.5 < u_hat.std() < 1.5  # roughly standardised


def test_sharing_groups_by_shape_with_per_layer_modes(gpt2, batch):
    shared = editor_for(gpt2, GPT2_NAMES)
    unshared = editor_for(gpt2, GPT2_NAMES, share=False)
    assert sorted(shared.transforms) == ["128x32", "32x128"]
    assert len(unshared.transforms) == len(GPT2_NAMES)
    assert shared.mode_of == {GPT2_NAMES[0]: 0, GPT2_NAMES[1]: 0, GPT2_NAMES[2]: 1, GPT2_NAMES[3]: 1}
    assert shared.transforms["32x128"].net.blocks[0].mode_scale.num_embeddings == 2
    # With shared networks, two layers of one shape differ only through their mode embeddings.
    randomize(shared)
    shared.eval()  # frozen statistics: the two calls below see the same normalisation
    factors = shared.capture(gpt2, batch)
    u, delta = factors.u[GPT2_NAMES[0]], factors.delta[GPT2_NAMES[0]]
    out_layer2 = shared.transform(GPT2_NAMES[0], u, delta)[0]
    out_layer3 = shared.transform(GPT2_NAMES[2], u, delta)[0]
    assert not torch.allclose(out_layer2, out_layer3)


def test_llama_shares_gate_and_up_projections(batch):
    editor = editor_for(tiny_llama(), LLAMA_NAMES)
    assert sorted(editor.transforms) == ["32x64", "64x32"]  # gate/up (d_in 32), down (d_in 64)
    assert editor.mode_of[LLAMA_NAMES[4]] == 3  # layer 1 up_proj: 4th matrix of shape 32x64


# ---------------------------------------------------------------------------------------------
# Cost helper (benchmark input, not an assertion on speed)
# ---------------------------------------------------------------------------------------------


def test_timing_helper_leaves_model_and_editor_unchanged(gpt2, batch):
    gpt2.requires_grad_(False)
    editor = editor_for(gpt2, GPT2_NAMES).train()
    weights = {k: v.clone() for k, v in gpt2.state_dict().items()}
    stats = {k: v.clone() for k, v in editor.state_dict().items()}
    result = time_edit_vs_forward_backward(gpt2, editor, batch, repeats=2)
    assert set(result) == {"edit_s", "fwd_bwd_s", "ratio"} and all(v > 0 for v in result.values())
    assert editor.training
    assert all(torch.equal(v, weights[k]) for k, v in gpt2.state_dict().items())
    assert all(torch.equal(v, stats[k]) for k, v in editor.state_dict().items())
    assert not any(p.requires_grad for p in gpt2.parameters())
    assert all(p.grad is None for p in gpt2.parameters())


def test_running_norm_ignores_non_finite_rows():
    from instructedit_lite.editors.mend import RunningNorm

    norm = RunningNorm(3).train()
    rows = torch.tensor([[1.0, 2.0, 3.0], [float("nan"), 0.0, 0.0], [3.0, 4.0, float("inf")], [5.0, 6.0, 7.0]])
    norm.update(rows)
    assert norm.count.item() == 2
    assert torch.allclose(norm.mean, torch.tensor([3.0, 4.0, 5.0], dtype=torch.float64))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_one_call_per_shared_network_equals_one_call_per_weight(gpt2, batch, mode):
    """compute_deltas runs each shared network once on the rows of all its weights (each row with
    its layer's mode): the deltas, their meta-gradients and the running statistics equal those of
    one :meth:`transform` per weight, in order, up to rounding."""
    grouped, single = editor_for(gpt2, GPT2_NAMES), editor_for(gpt2, GPT2_NAMES)
    randomize(grouped), randomize(single)
    getattr(grouped, mode)(), getattr(single, mode)()
    factors = single.capture(gpt2, batch)
    per_weight = {n: single.alpha(n) * single.pseudo_gradient(n, *single.transform(n, factors.u[n], factors.delta[n]))
                  for n in single.infos}
    together = grouped.compute_deltas(gpt2, batch)
    assert len(grouped.transforms) < len(grouped.infos)  # some network is shared
    for n in per_weight:
        assert torch.allclose(together[n], per_weight[n], rtol=1e-5, atol=1e-9), n
    sum(d.square().sum() for d in together.values()).backward()
    sum(d.square().sum() for d in per_weight.values()).backward()
    for (name, a), b in zip(grouped.named_parameters(), single.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert (a.grad - b.grad).norm() <= 1e-5 * b.grad.norm() + 1e-12, name  # rounding only
    for k, v in grouped.state_dict().items():  # the statistics saw the weights one after another
        assert torch.allclose(v.double(), single.state_dict()[k].double(), rtol=1e-9, atol=1e-12), k
