"""Known-answer tests of the baseline selectors (qrcp, l1, wanda, grad), their registration,
and one CLI run of each on the shipped default model."""

import re

import numpy as np
import pytest
import torch
from test_methods import planted_layer
from typer.testing import CliRunner

from harness import registry
from harness.cli import app
from harness.method import LayerData
from harness.methods.drrqr import DRRQR
from harness.methods.l1 import L1Magnitude
from harness.methods.qrcp import QRCP
from harness.methods.rrqr import qrcp_order
from harness.methods.taylor import TaylorGrad
from harness.methods.wanda import Wanda

HEADS, D, HIDDEN = 3, 32, 16
METHODS = {"qrcp": QRCP, "l1": L1Magnitude, "wanda": Wanda, "grad": TaylorGrad}


def kept(method, layer, ratio):
    return [set(k) for k in method.select([layer], ratio, "deltanet").layers[0].kept]


def weight_layer(q_weight, k_weight, heads, head_dim, **extra) -> LayerData:
    return LayerData(
        0,
        heads,
        head_dim,
        head_dim,
        torch.as_tensor(q_weight, dtype=torch.float32),
        torch.as_tensor(k_weight, dtype=torch.float32),
        **extra,
    )


# --- l1 --------------------------------------------------------------------------------------


def test_l1_picks_planted_rows_by_l1_not_l2():
    gen = np.random.default_rng(0)
    wq = gen.uniform(-0.01, 0.01, (HEADS * D, HIDDEN))
    wk = gen.uniform(-0.01, 0.01, (HEADS * D, HIDDEN))
    planted, decoys = [], []
    for h in range(HEADS):
        perm = gen.permutation(D)
        chosen, decoy = perm[:8], perm[8:10]
        planted.append(set(chosen.tolist()))
        decoys.append(set(decoy.tolist()))
        rows, drows = h * D + chosen, h * D + decoy
        signs = gen.choice([-1.0, 1.0], size=(8, HIDDEN))
        wq[rows[:4]] = signs[:4]  # half of the mass in q_proj, half in k_proj: the score sums both
        wk[rows[4:]] = signs[4:]  # L1 of each planted row: 16, L2: 4
        wq[drows, 3] = 12.0  # decoys: L1 12 (smaller), L2 12 (larger)
    found = kept(L1Magnitude(), weight_layer(wq, wk, HEADS, D), 1 - 8 / D)
    assert found == planted
    assert all(not (f & d) for f, d in zip(found, decoys))
    # the decoys would win on L2 (and q alone would miss the k-heavy rows): the score is the L1 of both
    for h in range(HEADS):
        rows = slice(h * D, (h + 1) * D)
        l2 = np.sqrt((wq[rows] ** 2).sum(1) + (wk[rows] ** 2).sum(1))
        assert decoys[h] <= set(np.argsort(-l2)[:8].tolist())
        assert set(np.argsort(-np.abs(wq[rows]).sum(1))[:8].tolist()) != planted[h]


def test_l1_ties_go_to_lower_index_and_ignore_data():
    zeros = torch.zeros(2 * 8, 4)
    layer = weight_layer(zeros, zeros, 2, 8)
    assert kept(L1Magnitude(), layer, 0.5) == [{0, 1, 2, 3}] * 2
    # equal scores except one: that one first, then ties by index
    wq = torch.ones(2 * 8, 4)
    wq[6] = 2.0
    wq[8 + 7] = -3.0
    assert kept(L1Magnitude(), weight_layer(wq, zeros, 2, 8), 0.75) == [{0, 6}, {7, 0}]
    assert L1Magnitude.needs == frozenset({"weights"})  # data-free: no calibration run


# --- wanda -----------------------------------------------------------------------------------


def wanda_tiny_case():
    """One head (head_dim 4, hidden 3) and a second head with the same rows in reverse order.
    Calibration inputs X (2 tokens) give ||X_j||_2 = (0.1, 5, 2)."""
    x = torch.tensor([[0.1, 3.0, 0.0], [0.0, 4.0, 2.0]])
    wq = torch.tensor([[10.0, 0.0, 0.0], [0.0, 1.0, 0.0], [8.0, 0.6, 0.0], [0.0, 0.0, 1.5]])
    wk = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, -1.0], [-2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    layer = weight_layer(torch.cat([wq, wq.flip(0)]), torch.cat([wk, wk.flip(0)]), 2, 4, x_sq=(x**2).sum(0))
    # by hand, with ||X|| = (0.1, 5, 2):
    #   row 0: q 10*0.1 = 1.0            + k 5*0.1 = 0.5  -> 1.5   (L1: 10 + 5 = 15)
    #   row 1: q 1*5 = 5.0               + k 1*2 = 2.0    -> 7.0   (L1: 1 + 1 = 2)
    #   row 2: q 8*0.1 + 0.6*5 = 3.8     + k 2*0.1 = 0.2  -> 4.0   (L1: 8.6 + 2 = 10.6)
    #   row 3: q 1.5*2 = 3.0             + k 1*2 = 2.0    -> 5.0   (L1: 1.5 + 1 = 2.5)
    # (q alone, k alone, or squared norms ||X_j||^2 would each rank them differently)
    return layer, np.array([1.5, 7.0, 4.0, 5.0]), np.array([15.0, 2.0, 10.6, 2.5])


def test_wanda_tiny_case_by_hand():
    layer, by_hand, l1 = wanda_tiny_case()
    x_norm = layer.x_sq.sqrt().numpy()
    np.testing.assert_allclose(x_norm, [0.1, 5.0, 2.0], rtol=1e-6)
    formula = (np.abs(layer.q_weight[:4].numpy()) + np.abs(layer.k_weight[:4].numpy())) @ x_norm
    np.testing.assert_allclose(formula, by_hand, rtol=1e-6)
    a_q, a_k = np.abs(layer.q_weight[:4].numpy()), np.abs(layer.k_weight[:4].numpy())
    for wrong in (a_q @ x_norm, a_k @ x_norm, (a_q + a_k) @ layer.x_sq.numpy()):  # q only, k only, ||X||^2
        assert np.argsort(-wrong, kind="stable").tolist() != [1, 3, 2, 0]
    # the full ranking 1 > 3 > 2 > 0, read off by keeping 1, 2 and 3 channels (head 1 is reversed)
    assert kept(Wanda(), layer, 0.75) == [{1}, {2}]
    assert kept(Wanda(), layer, 0.5) == [{1, 3}, {2, 0}]
    assert kept(Wanda(), layer, 0.25) == [{1, 3, 2}, {2, 0, 1}]
    # plain magnitude picks the other two rows: the input norms change the answer
    assert set(np.argsort(-l1)[:2].tolist()) == {0, 2}
    assert kept(L1Magnitude(), layer, 0.5) == [{0, 2}, {3, 1}]


def test_wanda_input_norms_change_the_answer():
    """Rows A have the largest weights, but on input features that are nearly silent; rows B have
    moderate weights on loud features. Wanda keeps B, magnitude keeps A."""
    gen = np.random.default_rng(1)
    tokens = 200
    x = gen.standard_normal((tokens, HIDDEN))
    x[:, :8] *= 0.01  # features 0..7 are nearly silent, 8..15 loud
    wq = gen.uniform(-0.01, 0.01, (HEADS * D, HIDDEN))
    wk = gen.uniform(-0.01, 0.01, (HEADS * D, HIDDEN))
    rows_a, rows_b = [], []
    for h in range(HEADS):
        perm = gen.permutation(D)
        a, b = perm[:8], perm[8:16]
        rows_a.append(set(a.tolist()))
        rows_b.append(set(b.tolist()))
        wq[h * D + a, :8] = 3.0
        wk[h * D + b, 8:] = gen.uniform(0.5, 1.0, (8, 8)) * gen.choice([-1, 1], (8, 8))
    layer = weight_layer(wq, wk, HEADS, D, x_sq=torch.tensor((x**2).sum(0), dtype=torch.float32))
    ratio = 1 - 8 / D
    assert kept(Wanda(), layer, ratio) == rows_b
    assert kept(L1Magnitude(), layer, ratio) == rows_a


# --- grad ------------------------------------------------------------------------------------


def test_grad_is_first_order_taylor_on_a_toy_loss():
    """L = sum_b sum(c_q * (Wq x_b)) + sum(c_k * (Wk x_b)), so dL/dWq = c_q (sum_b x_b)^T exactly.
    The rows with the largest weights get tiny c: the Taylor score and magnitude then disagree."""
    heads, d, hidden = 2, 8, 6
    gen = torch.Generator().manual_seed(0)
    wq = torch.randn(heads * d, hidden, generator=gen, dtype=torch.float64).requires_grad_(True)
    wk = torch.randn(heads * d, hidden, generator=gen, dtype=torch.float64).requires_grad_(True)
    with torch.no_grad():
        wq[[1, 3, 9, 12]] *= 4  # the magnitude favourites
        wk[[1, 3, 9, 12]] *= 4
    c_q = torch.rand(heads * d, generator=gen, dtype=torch.float64) + 0.5
    c_k = torch.rand(heads * d, generator=gen, dtype=torch.float64) + 0.5
    c_q[[1, 3, 9, 12]] = 0.01
    c_k[[1, 3, 9, 12]] = -0.01  # the sign of the gradient does not matter, only |W * g|
    batches = [torch.randn(hidden, generator=gen, dtype=torch.float64) for _ in range(3)]
    for x in batches:  # accumulated over calibration batches, as the adapter does
        loss = (c_q * (wq @ x)).sum() + (c_k * (wk @ x)).sum()
        loss.backward()
    x_sum = sum(batches)
    torch.testing.assert_close(wq.grad, torch.outer(c_q, x_sum))
    torch.testing.assert_close(wk.grad, torch.outer(c_k, x_sum))

    w_q, w_k = wq.detach().numpy(), wk.detach().numpy()
    by_hand = np.abs(w_q * np.outer(c_q.numpy(), x_sum.numpy())).sum(1) + np.abs(
        w_k * np.outer(c_k.numpy(), x_sum.numpy())
    ).sum(1)
    layer = weight_layer(w_q, w_k, heads, d, q_grad=wq.grad.float(), k_grad=wk.grad.float())
    for ratio in (0.25, 0.5, 0.75):
        n_keep = d - int(d * ratio)
        expected = [
            set(np.argsort(-by_hand[h * d : (h + 1) * d], kind="stable")[:n_keep].tolist()) for h in range(heads)
        ]
        assert kept(TaylorGrad(), layer, ratio) == expected
    found = kept(TaylorGrad(), layer, 0.5)
    magnitude = kept(L1Magnitude(), layer, 0.5)
    assert {1, 3} <= magnitude[0] and {1, 4} <= magnitude[1]
    assert not ({1, 3} & found[0]) and not ({1, 4} & found[1])


def test_grad_zero_gradient_rows_are_dropped_even_with_large_weights():
    d = 8
    w = torch.ones(d, 4) * torch.arange(d, 0, -1.0)[:, None]  # row 0 largest
    g = torch.zeros(d, 4)
    g[[5, 6, 7]] = 1.0
    layer = weight_layer(w, w, 1, d, q_grad=g, k_grad=torch.zeros(d, 4))
    # scores (0, 0, 0, 0, 0, 3*4, 2*4, 1*4): rows 5, 6, 7, then the zero ties by index
    assert kept(TaylorGrad(), layer, 0.5) == [{5, 6, 7, 0}]


# --- qrcp ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_qrcp_finds_planted_channels(seed):
    layer, planted = planted_layer(seed)
    assert kept(QRCP(seed=seed), layer, 1 - 8 / D) == planted


def test_qrcp_is_drrqr_without_swaps():
    layer, _ = planted_layer(4)
    for ratio in (0.25, 0.5, 0.75):
        # an f no swap can beat: DRRQR stops at its QRCP start (same subsample, same permutation)
        for params in ({}, {"permute": True}):
            a = QRCP(seed=3, **params).select([layer], ratio, "deltanet")
            b = DRRQR(seed=3, f=1e300, **params).select([layer], ratio, "deltanet")
            assert a.layers[0].kept == b.layers[0].kept
            assert all(c["swaps"] == 0 for c in b.meta["certificate"])
    m = np.concatenate([layer.q[:, 1].numpy(), layer.k[:, 1].numpy()]).astype(np.float64)
    assert kept(QRCP(), layer, 0.5)[1] == set(qrcp_order(m)[:16].tolist())


def decoy_layer(seed: int, tokens: int = 800) -> tuple[LayerData, list[set[int]], list[int]]:
    """Per head, 8 planted channels carry independent unit signals a_1..a_8, and a decoy channel
    carries 0.5 * (a_1 + ... + a_8): the largest norm (sqrt 2), but no direction of its own. QRCP
    takes the decoy first and then only 7 planted channels fit (the 8th is spanned up to half its
    size); swapping the decoy for it doubles |det A|, so strong RRQR (f < 2) must make that swap."""
    gen = np.random.default_rng(seed)
    acts = {"q": np.zeros((tokens, HEADS, D)), "k": np.zeros((tokens, HEADS, D))}
    planted, decoys = [], []
    for h in range(HEADS):
        perm = gen.permutation(D)
        chosen, decoy = perm[:8], int(perm[8])
        planted.append(set(chosen.tolist()))
        decoys.append(decoy)
        for name in acts:
            signal = gen.standard_normal((tokens, 8))
            x = signal @ (0.05 * gen.standard_normal((8, D))) + 0.01 * gen.standard_normal((tokens, D))
            x[:, chosen] = signal
            x[:, decoy] = 0.5 * signal.sum(1) + 0.01 * gen.standard_normal(tokens)
            acts[name][:, h] = x
    weights = torch.zeros(HEADS * D, HIDDEN)
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
    return layer, planted, decoys


@pytest.mark.parametrize("seed", [0, 1])
def test_swap_phase_removes_a_high_norm_decoy_qrcp_keeps_it(seed):
    layer, planted, decoys = decoy_layer(seed)
    ratio = 1 - 8 / D
    greedy = kept(QRCP(), layer, ratio)
    strong = DRRQR().select([layer], ratio, "deltanet")
    assert [set(k) for k in strong.layers[0].kept] == planted
    assert all(c["swaps"] >= 1 for c in strong.meta["certificate"])
    for h in range(HEADS):
        assert decoys[h] in greedy[h]  # the greedy first pivot: the largest column
        assert len(greedy[h] & planted[h]) == 7  # ... and then one planted channel does not fit


# --- registration and the CLI ----------------------------------------------------------------


@pytest.mark.parametrize("name, cls", METHODS.items())
def test_registered(name, cls):
    assert registry.get_method(name) is cls
    assert cls.name == name
    assert {"deltanet", "gated_deltanet"} <= set(cls.families)  # qrcp and random also run on softmax models
    assert cls.paper


def test_listed():
    result = CliRunner().invoke(app, ["list", "methods"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for name in METHODS:
        assert re.search(rf"\b{name}\b.*\bok\b", result.output), result.output


def test_bad_parameters():
    with pytest.raises(ValueError, match="max_swaps must be >= 0"):
        DRRQR(max_swaps=-1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("baselines") / "r.sqlite"  # shared: the dense row is computed once


@pytest.mark.parametrize("name", list(METHODS))
def test_cli_run(name, store):
    # a small calibration set keeps the CPU reference kernels fast; the capture path is the same
    calib = ["--calib-samples", "2", "--calib-seq-len", "128"]
    result = CliRunner().invoke(
        app,
        [
            "run",
            "--method",
            name,
            "--ratio",
            "0.5",
            "--suite",
            "ppl",
            "--suite-param",
            "ppl.limit=1024",
            "--store",
            str(store),
            "-q",
            "--detail",
            *calib,
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if re.search(rf"\b{name}\b.*\b0\.5\b", line))
    ppl = float(row.strip("│ ").split("│")[-1])
    assert 1 < ppl < 1000  # a finite, sane held-out perplexity
