"""Strong RRQR (Gu & Eisenstat 1996): certificates recomputed from scratch, known answers, edge cases."""

import numpy as np
import pytest

from harness.methods.rrqr import RRQRResult, qrcp_order, strong_rrqr

RTOL = 1e-9  # slack for recomputing rho with a different QR / inverse


def rho_from_scratch(M: np.ndarray, order: np.ndarray, k: int) -> float:
    """max rho_ij of a fresh (numpy, unpivoted) QR of M[:, order] split at k, via an explicit inverse."""
    R = np.linalg.qr(M[:, order], mode="r")
    if R.shape[0] < M.shape[1]:
        R = np.vstack([R, np.zeros((M.shape[1] - R.shape[0], M.shape[1]))])
    A, B, C = R[:k, :k], R[:k, k:], R[k:, k:]
    Ainv = np.linalg.inv(A)
    omega = np.linalg.norm(Ainv, axis=1)
    gamma = np.linalg.norm(C, axis=0)
    return float(np.sqrt((Ainv @ B) ** 2 + np.outer(omega, gamma) ** 2).max())


def log_volume(M: np.ndarray, cols) -> float:
    """log |det A| of the selection = sum of log singular values of M[:, cols]."""
    return float(np.sum(np.log(np.linalg.svd(M[:, np.asarray(cols)], compute_uv=False))))


def planted(seed: int, tokens: int = 1500, d: int = 32, k: int = 6):
    """k channels carry independent unit-variance signals; the others are small mixtures of them
    plus 1e-3 noise, and one decoy is 0.6 * (sum of 4 planted): it has the largest norm (1.2), so
    plain QRCP picks it first, but every planted channel it displaces is 1/0.6 = 1.67 > f = 1.5
    times more informative, so strong RRQR must swap it out."""
    gen = np.random.default_rng(seed)
    chosen = np.sort(gen.choice(d, k, replace=False))
    others = np.setdiff1d(np.arange(d), chosen)
    signal = gen.standard_normal((tokens, k))
    X = 1e-3 * gen.standard_normal((tokens, d))
    X[:, others] += 0.3 * signal @ gen.standard_normal((k, others.size)) / np.sqrt(k)
    X[:, chosen] = signal
    X[:, others[0]] = 0.6 * signal[:, :4].sum(axis=1) + 1e-3 * gen.standard_normal(tokens)
    return X, chosen


def check_result(res: RRQRResult, n: int, k: int) -> None:
    assert res.order.dtype == np.int64 and res.kept.dtype == np.int64
    assert sorted(res.order.tolist()) == list(range(n))
    assert res.kept.tolist() == sorted(res.order[:k].tolist())
    assert np.isfinite(res.max_rho) and res.max_rho >= 0 and res.swaps >= 0


@pytest.mark.parametrize("seed", range(5))
def test_planted_channels_found_qrcp_and_random_miss(seed):
    X, chosen = planted(seed)
    k = chosen.size
    res = strong_rrqr(X, k, f=1.5)
    check_result(res, X.shape[1], k)
    assert res.kept.tolist() == chosen.tolist()
    assert res.swaps >= 1 and not res.hit_swap_cap and res.max_rho <= 1.5
    # plain QRCP keeps the decoy, so the swap phase is what recovers the set
    assert set(qrcp_order(X)[:k].tolist()) != set(chosen.tolist())
    # a seeded uniform random pick of k: P(exact) = 1 / C(32, 6) ~ 1e-6 per draw
    hits = sum(
        set(np.random.default_rng((s, 12345)).choice(X.shape[1], k, replace=False).tolist()) == set(chosen.tolist())
        for s in range(200)
    )
    assert hits == 0


def kahan(n: int = 30, c: float = 0.285) -> np.ndarray:
    s = np.sqrt(1 - c * c)
    K = np.diag(s ** np.arange(n)) @ (np.eye(n) - c * np.triu(np.ones((n, n)), 1))
    # all column norms of the Kahan matrix are 1; shrink them very slightly so QRCP keeps the identity order
    return K * (1 - 1e-10) ** np.arange(n)


def test_kahan_qrcp_is_not_strong_and_swaps_fix_it():
    K = kahan()
    n, k = K.shape[1], K.shape[1] - 1
    order0 = qrcp_order(K)
    assert order0.tolist() == list(range(n))  # QRCP does not pivot
    rho0 = rho_from_scratch(K, order0, k)
    assert rho0 > 100  # QRCP badly violates the strong condition
    assert strong_rrqr(K, k, f=1.0, max_swaps=0).max_rho == pytest.approx(rho0, rel=1e-6)
    res = strong_rrqr(K, k, f=1.0)
    check_result(res, n, k)
    assert res.swaps >= 1 and not res.hit_swap_cap
    rho = rho_from_scratch(K, res.order, k)
    assert rho <= 1.0 + RTOL and res.max_rho <= 1.0
    assert rho == pytest.approx(res.max_rho, rel=1e-6)
    assert log_volume(K, res.kept) > log_volume(K, order0[:k]) + np.log(100)


def test_small_random_matrices_where_qrcp_is_not_strong():
    """Search (fixed seeds) small Gaussian matrices for splits where QRCP has rho > 1; f = 1 fixes all."""
    found = 0
    for seed in range(60):
        M = np.random.default_rng(seed).standard_normal((8, 8))
        for k in (2, 4, 6):
            order0 = qrcp_order(M)
            if rho_from_scratch(M, order0, k) <= 1.0 + 1e-6:
                continue
            found += 1
            res = strong_rrqr(M, k, f=1.0)
            assert not res.hit_swap_cap and res.swaps >= 1
            assert rho_from_scratch(M, res.order, k) <= 1.0 + RTOL
            assert log_volume(M, res.kept) > log_volume(M, order0[:k])
    assert found >= 5


CASES = [(200, 40, 10), (200, 40, 20), (50, 50, 25), (1000, 64, 32), (30, 60, 12), (64, 16, 15), (9, 9, 1)]


@pytest.mark.parametrize("rows,n,k", CASES)
@pytest.mark.parametrize("f", [1.0, 1.2, 2.0])
def test_certificate_from_scratch(rows, n, k, f):
    gen = np.random.default_rng(rows * 1000 + n + k)
    # correlated channels with very different scales: the hard case for plain pivoting
    M = gen.standard_normal((rows, n)) @ (np.eye(n) + gen.standard_normal((n, n)) / np.sqrt(n))
    M *= np.exp(1.5 * gen.standard_normal(n))
    res = strong_rrqr(M, k, f=f)
    check_result(res, n, k)
    assert res.rank == min(rows, n)
    assert not res.hit_swap_cap
    rho = rho_from_scratch(M, res.order, k)
    assert rho <= f * (1 + RTOL)
    assert res.max_rho <= f
    assert rho == pytest.approx(res.max_rho, rel=1e-6)
    assert log_volume(M, res.kept) >= log_volume(M, qrcp_order(M)[:k]) - 1e-9


def decoyed(seed: int, tokens: int = 400, d: int = 48, k: int = 16) -> np.ndarray:
    """k independent channels; every other channel is 0.6 * (sum of 4 of them) + 1e-3 noise."""
    gen = np.random.default_rng(seed)
    signal = gen.standard_normal((tokens, k))
    chosen = np.sort(gen.choice(d, k, replace=False))
    X = np.empty((tokens, d))
    X[:, chosen] = signal
    for c in np.setdiff1d(np.arange(d), chosen):
        X[:, c] = 0.6 * signal[:, gen.choice(k, 4, replace=False)].sum(axis=1) + 1e-3 * gen.standard_normal(tokens)
    return X


@pytest.mark.parametrize("f", [1.0, 1.05])
def test_det_grows_by_rho_greater_than_f_at_every_swap(f):
    """The state after s swaps is strong_rrqr(..., max_swaps=s). Each swap multiplies |det A| by the
    max rho of the state before it (Gu & Eisenstat's identity), which exceeds f."""
    X = decoyed(0)
    full = strong_rrqr(X, 16, f=f)
    assert full.swaps >= 3 and not full.hit_swap_cap
    states = [strong_rrqr(X, 16, f=f, max_swaps=s) for s in range(full.swaps + 1)]
    vols = [log_volume(X, r.kept) for r in states]
    for s, res in enumerate(states):
        assert res.swaps == s
        assert res.hit_swap_cap == (s < full.swaps)
        if s < full.swaps:
            assert res.max_rho > f
            step = vols[s + 1] - vols[s]
            assert step > np.log(f) and step > 0
            assert step == pytest.approx(np.log(res.max_rho), rel=1e-6, abs=1e-9)
    assert states[-1].order.tolist() == full.order.tolist()


def test_deterministic_and_seeded_permutation():
    X, _ = planted(3)
    a, b = strong_rrqr(X, 6), strong_rrqr(X.copy(), 6)
    assert a.order.tolist() == b.order.tolist() and a.max_rho == b.max_rho and a.swaps == b.swaps
    p1, p2 = strong_rrqr(X, 6, permute_seed=7), strong_rrqr(X, 6, permute_seed=7)
    assert p1.order.tolist() == p2.order.tolist() and p1.max_rho == p2.max_rho
    assert qrcp_order(X, permute_seed=7).tolist() == qrcp_order(X, permute_seed=7).tolist()
    # ties: four identical copies of the largest column; the seed picks which copy, nothing else changes
    Y = np.random.default_rng(0).standard_normal((100, 12))
    Y[:, [2, 5, 8, 11]] = 3 * Y[:, [0]]
    firsts = set()
    for seed in range(12):
        o = qrcp_order(Y, permute_seed=seed)
        assert sorted(o.tolist()) == list(range(12))
        assert o[0] in {2, 5, 8, 11}
        firsts.add(int(o[0]))
        r = strong_rrqr(Y, 5, permute_seed=seed)
        assert len(set(r.kept.tolist()) & {0, 2, 5, 8, 11}) == 1  # exactly one copy kept
    assert len(firsts) > 1


def test_invariant_to_row_rotation_and_scale():
    X, chosen = planted(4, tokens=300)
    Q = np.linalg.qr(np.random.default_rng(1).standard_normal((300, 300)))[0]
    for Y in (Q @ X, 1e6 * X, 1e-6 * X):
        assert strong_rrqr(Y, 6).kept.tolist() == chosen.tolist()


def test_k_zero_and_k_n():
    M = np.random.default_rng(0).standard_normal((50, 10))
    r0 = strong_rrqr(M, 0)
    check_result(r0, 10, 0)
    assert r0.kept.size == 0 and r0.max_rho == 0.0 and r0.swaps == 0 and not r0.hit_swap_cap
    assert r0.order.tolist() == qrcp_order(M).tolist()
    rn = strong_rrqr(M, 10)
    check_result(rn, 10, 10)
    assert rn.kept.tolist() == list(range(10)) and rn.max_rho == 0.0 and rn.swaps == 0
    for bad in (-1, 11, 2.5, True):
        with pytest.raises(ValueError, match="k must be"):
            strong_rrqr(M, bad)
    with pytest.raises(ValueError, match="f must be"):
        strong_rrqr(M, 3, f=0.9)
    with pytest.raises(ValueError, match="NaN"):
        strong_rrqr(np.full((3, 3), np.nan), 1)


def test_rank_deficient_inputs_stay_finite():
    gen = np.random.default_rng(0)
    low = gen.standard_normal((80, 3)) @ gen.standard_normal((3, 10))  # rank 3
    dup = gen.standard_normal((80, 10))
    dup[:, 5] = dup[:, 1]
    dup[:, 7] = 0.0  # rank 8
    wide = gen.standard_normal((5, 12))  # rank 5 < n
    cases = [
        (low, 3, 5),
        (low, 3, 2),
        (dup, 8, 9),
        (dup, 8, 8),
        (dup, 8, 4),
        (wide, 5, 8),
        (wide, 5, 3),
        (np.zeros((20, 6)), 0, 3),
        (gen.standard_normal((1, 6)), 1, 4),
        (np.zeros((0, 6)), 0, 2),
    ]
    for M, rank, k in cases:
        for f in (1.0, 1.5):
            res = strong_rrqr(M, k, f=f)
            check_result(res, M.shape[1], k)
            assert res.rank == rank
            assert not res.hit_swap_cap
            # the kept columns span as much of the column space as k columns can
            if M.size:
                assert np.linalg.matrix_rank(M[:, res.kept]) == min(k, rank)
            s = min(k, rank)
            if 0 < s < M.shape[1]:  # the condition holds at the split min(k, rank)
                assert res.max_rho <= f
                assert rho_from_scratch(M[:, :], res.order, s) <= f * (1 + 1e-6)
    assert 7 not in strong_rrqr(dup, 8).kept  # the zero channel is never needed
