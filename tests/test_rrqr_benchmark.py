"""Strong RRQR: the harness's R-only update vs a plain implementation that refactorizes the tall
activation matrix after every swap (written here, as the reference twin).

CI runs each benchmark once as a correctness test (`--benchmark-disable` in the pytest config).
The speed ratio: `pytest tests/test_rrqr_benchmark.py --benchmark-enable --benchmark-group-by=group`.
"""

import numpy as np
import pytest
import scipy.linalg

from harness.methods.rrqr import qrcp_order, strong_rrqr

ROWS, N, K, F = 4096, 128, 64, 1.0


def refactorizing_strong_rrqr(m: np.ndarray, k: int, f: float, max_swaps: int = 1000):
    """Textbook loop: QR of M[:, order] from scratch, rho from scratch, swap the worst pair."""
    order = qrcp_order(m)
    swaps = 0
    while True:
        r = scipy.linalg.qr(m[:, order], mode="r")[0][: m.shape[1]]
        a, b, c = r[:k, :k], r[:k, k:], r[k:, k:]
        a_inv = scipy.linalg.solve_triangular(a, np.eye(k))
        rho = np.sqrt((a_inv @ b) ** 2 + np.outer(np.linalg.norm(a_inv, axis=1), np.linalg.norm(c, axis=0)) ** 2)
        i, j = np.unravel_index(np.argmax(rho), rho.shape)
        if rho[i, j] <= f or swaps >= max_swaps:
            return np.sort(order[:k]), float(rho.max()), swaps
        order[i], order[k + j] = order[k + j], order[i]
        swaps += 1


@pytest.fixture(scope="module")
def decoyed():
    """64 independent signals and 64 decoys (sums of signals, larger norm): QRCP's greedy pivots
    take decoys, so the swap phase has real work to do."""
    gen = np.random.default_rng(0)
    signals = gen.standard_normal((ROWS, K)) * gen.uniform(0.5, 2.0, K)
    mix = (gen.random((K, N - K)) < 4 / K) * 0.6
    m = np.concatenate([signals, signals @ mix + 0.01 * gen.standard_normal((ROWS, N - K))], axis=1)
    return m[:, gen.permutation(N)]


def _volume(m, kept):
    return np.linalg.slogdet(np.linalg.qr(m[:, kept], mode="r")[: len(kept)])[1]


@pytest.mark.benchmark(group="strong-rrqr 4096x128 k=64")
def test_harness_strong_rrqr(benchmark, decoyed):
    result = benchmark(strong_rrqr, decoyed, K, f=F)
    reference, _, ref_swaps = refactorizing_strong_rrqr(decoyed, K, F)
    assert result.swaps > 0 and not result.hit_swap_cap and result.max_rho <= F + 1e-9
    assert set(result.kept) == set(reference) or np.isclose(_volume(decoyed, result.kept), _volume(decoyed, reference))


@pytest.mark.benchmark(group="strong-rrqr 4096x128 k=64")
def test_refactorizing_reference(benchmark, decoyed):
    kept, max_rho, swaps = benchmark(refactorizing_strong_rrqr, decoyed, K, F)
    assert swaps > 0 and max_rho <= F
