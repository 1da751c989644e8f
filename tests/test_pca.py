"""PCA: a planted low-rank second moment is recovered; the projection realizes as a plain model."""

import copy

import numpy as np
import pytest
import torch

from conftest import tiny_model
from harness.families import adapter_for
from harness.method import LayerData
from harness.methods.pca import PCA
from harness.selection import ChannelSelection

D, HEADS, TOKENS, RANK = 32, 2, 2000, 8


def planted_low_rank(seed: int):
    """Per head, activations live in a random RANK-dim subspace U (plus tiny noise)."""
    gen = np.random.default_rng(seed)
    bases, acts = [], np.zeros((TOKENS, HEADS, D))
    for h in range(HEADS):
        u, _ = np.linalg.qr(gen.standard_normal((D, RANK)))
        bases.append(u)
        acts[:, h] = (gen.standard_normal((TOKENS, RANK)) * np.linspace(3, 1, RANK)) @ u.T + 1e-3 * gen.standard_normal(
            (TOKENS, D)
        )
    t = torch.tensor(acts, dtype=torch.float32)
    w = torch.zeros(HEADS * D, 8)
    return LayerData(0, HEADS, D, 16, w, w, q=t, k=t), bases


@pytest.mark.parametrize("seed", [0, 1])
def test_pca_recovers_the_planted_subspace(seed):
    layer, bases = planted_low_rank(seed)
    selection = PCA().select([layer], 1 - RANK / D, "deltanet")
    sel = selection.layers[0]
    assert sel.kept_counts == [RANK, RANK] and selection.kept_ratio == RANK / D
    for matrix, u in zip(sel.projection, bases):
        p = np.array(matrix)
        np.testing.assert_allclose(p.T @ p, np.eye(RANK), atol=1e-8)  # orthonormal columns
        np.testing.assert_allclose(p @ p.T @ u, u, atol=1e-3)  # spans the planted subspace
    energy = selection.meta["explained_energy"]
    assert all(e["fraction"] > 0.999 for e in energy)
    # serializes with its projection
    assert ChannelSelection.from_json(selection.to_json()) == selection


def test_projection_realizes_as_a_plain_smaller_model(tmp_path):
    """The rows become P^T W (checked directly: silu and the convs do not commute with P, so the
    function is an approximation by construction); the result saves and reloads exactly."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("deltanet")
    adapter = adapter_for(model)
    ids = torch.randint(3, 128, (2, 40))
    with torch.no_grad():
        model(ids)
    batches = [ids]
    layers = adapter.capture(model, batches, PCA.needs)
    selection = PCA().select(layers, 0.5, "deltanet")
    original = copy.deepcopy(model)
    adapter.apply(model, selection)
    attn, before = model.model.layers[0].attn, original.model.layers[0].attn
    p0 = torch.tensor(selection.layers[0].projection[0], dtype=torch.float64)
    torch.testing.assert_close(
        attn.q_proj.weight[:16].double(), p0.T @ before.q_proj.weight[:32].double(), rtol=1e-5, atol=1e-6
    )
    assert attn.head_k_dim == 16 and attn.q_conv1d.weight.shape == (32, 1, 4)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no zero-masked twin"):
        adapter.zero(original, selection)
