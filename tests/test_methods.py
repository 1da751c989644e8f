"""Known-answer tests of the selectors on synthetic calibration data."""

import numpy as np
import pytest
import torch

from harness.method import LayerData
from harness.methods.drrqr import DRRQR
from harness.methods.random import RandomChannels

HEADS, D, TOKENS = 3, 32, 1500


def planted_layer(seed: int) -> tuple[LayerData, list[set[int]]]:
    """Per head, 8 planted channels carry independent signals (4 strong at scale 3, 4 weak at
    scale 1). Four more channels are near-copies of the strong ones at 0.9x (large norm, no new
    direction), and the rest are tiny mixtures. The unique best 8-channel basis is the planted
    set; a norm-based pick takes the strong channels twice and misses the weak ones."""
    gen = np.random.default_rng(seed)
    acts = {"q": np.zeros((TOKENS, HEADS, D)), "k": np.zeros((TOKENS, HEADS, D))}
    planted = []
    for h in range(HEADS):
        perm = gen.permutation(D)
        chosen, copies = perm[:8], perm[8:12]
        planted.append(set(chosen.tolist()))
        scales = np.array([3.0] * 4 + [1.0] * 4)
        for name in acts:
            signal = gen.standard_normal((TOKENS, 8)) * scales
            x = signal @ (0.05 * gen.standard_normal((8, D))) + 0.01 * gen.standard_normal((TOKENS, D))
            x[:, chosen] = signal
            x[:, copies] = 0.9 * signal[:, :4] + 0.01 * gen.standard_normal((TOKENS, 4))
            acts[name][:, h] = x
    weights = torch.zeros(HEADS * D, 16)
    layer = LayerData(
        0,
        HEADS,
        D,
        16,
        weights,
        weights,
        q=torch.tensor(acts["q"], dtype=torch.float32),
        k=torch.tensor(acts["k"], dtype=torch.float32),
    )
    return layer, planted


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_drrqr_finds_planted_channels_random_does_not(seed):
    layer, planted = planted_layer(seed)
    ratio = 1 - 8 / D
    found = DRRQR(seed=seed).select([layer], ratio, "deltanet").layers[0].kept
    assert [set(k) for k in found] == planted
    rand = RandomChannels(seed=seed).select([layer], ratio, "deltanet").layers[0].kept
    assert sum(set(k) == p for k, p in zip(rand, planted)) == 0
    # the case is not trivial: keeping the highest-energy channels fails on every head
    for h, p in enumerate(planted):
        energy = (layer.q[:, h] ** 2 + layer.k[:, h] ** 2).sum(0)
        assert set(torch.argsort(energy, descending=True)[:8].tolist()) != p


def test_drrqr_records_certificate_and_is_deterministic():
    layer, _ = planted_layer(5)
    a = DRRQR(seed=3, f=1.2).select([layer], 0.5, "deltanet")
    b = DRRQR(seed=3, f=1.2).select([layer], 0.5, "deltanet")
    assert a.digest == b.digest
    certs = a.meta["certificate"]
    assert len(certs) == HEADS
    assert all(c["max_rho"] <= 1.2 or c["hit_swap_cap"] for c in certs)


def test_drrqr_on_gram_exact_factors_equals_drrqr_on_every_token():
    """The harness streams calibration tokens into triangular factors (R^T R = X^T X); pivoted QR
    sees M only through M^T M, so the choice is the one over every token, certificate included."""
    import dataclasses

    from harness.families.base import stream_factor

    layer, planted = planted_layer(7)
    factor = lambda x: stream_factor(None, x.transpose(0, 1).double()).transpose(0, 1).float()  # noqa: E731
    compact = dataclasses.replace(layer, q=factor(layer.q), k=factor(layer.k))
    assert compact.q.shape[0] == layer.head_dim < layer.q.shape[0]
    rows, exact = (DRRQR(seed=1).select([x], 0.75, "deltanet") for x in (layer, compact))
    assert exact.layers[0].kept == rows.layers[0].kept and [set(k) for k in exact.layers[0].kept] == planted
    for a, b in zip(rows.meta["certificate"], exact.meta["certificate"]):
        assert a["swaps"] == b["swaps"] and abs(a["max_rho"] - b["max_rho"]) < 1e-6 * max(1.0, a["max_rho"])
    assert "max_rows" not in {f.name for f in dataclasses.fields(DRRQR)}  # no subsample that would degrade it


def test_random_is_seeded_and_uniformish():
    layer, _ = planted_layer(0)
    a = RandomChannels(seed=1).select([layer], 0.5, "deltanet")
    assert a.digest == RandomChannels(seed=1).select([layer], 0.5, "deltanet").digest
    assert a.digest != RandomChannels(seed=2).select([layer], 0.5, "deltanet").digest
    counts = np.zeros(D)
    for s in range(200):
        for kept in RandomChannels(seed=s).select([layer], 0.5, "deltanet").layers[0].kept:
            counts[list(kept)] += 1
    # each channel is kept with probability 1/2: 600 draws, mean 300, sd ~12
    assert counts.min() > 240 and counts.max() < 360


def test_bad_parameters():
    with pytest.raises(ValueError, match="f must be >= 1"):
        DRRQR(f=0.5)
