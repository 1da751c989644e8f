"""Strong rank-revealing QR (Gu & Eisenstat, SIAM J. Sci. Comput. 17(4), 1996) for column selection.

Pure numerics, no model code. ``M`` is ``(n_rows, n)``: rows are samples (tokens), columns are
channels; the selection keeps ``k`` columns.

Algorithm
---------
1. Reduce: if ``n_rows > n`` only the triangular factor of ``M`` matters (column norms, pivots and
   every quantity below are invariant under left-multiplication by an orthogonal matrix), so ``M``
   is replaced by the ``n x n`` R factor of an unpivoted, blocked QR.  If ``n_rows < n`` the
   ``n_rows x n`` factor is padded with zero rows to ``n x n`` (still upper triangular).
2. QR with column pivoting (LAPACK ``geqp3`` via :func:`scipy.linalg.qr`) gives the initial order
   ``R = Q^T M[:, order]``.  An optional seeded random column permutation is applied first, which
   only matters for ties; the order is mapped back to original column indices.
3. Swap phase.  With ``R = [[A, B], [0, C]]`` split at ``k`` (``A`` is ``k x k``)::

       rho_ij = sqrt( (A^-1 B)_ij^2 + (gamma_j(C) * omega_i(A))^2 )

   ``gamma_j(C)`` = 2-norm of column ``j`` of ``C``, ``omega_i(A)`` = 2-norm of row ``i`` of
   ``A^-1``.  Swapping kept column ``i`` with dropped column ``j`` multiplies ``|det A|`` by exactly
   ``rho_ij``.  While ``max rho > f`` (and fewer than ``max_swaps`` swaps were made) the maximising
   pair is swapped.  ``|det A|`` thus grows by a factor ``> f >= 1`` per swap; as there are finitely
   many column subsets, the loop terminates.  ``M`` is never refactorised: after a swap only the
   trailing block ``R[i:, i:]`` of the small ``n x n`` triangle is re-triangularised (columns before
   the leaving position ``i`` are untouched by the swap, so this restores the exact triangular form).

Rank deficiency
---------------
The numerical rank ``r`` is the number of leading QRCP diagonal entries with
``|R_ii| > max(n_rows, n) * eps * |R_00|``.  If ``k <= r``, ``A`` is non-singular from the start and
stays so (its determinant only grows), so every ``rho`` is finite.  If ``k > r``, every choice of
``k`` columns has ``det A = 0`` (numerically), the condition at split ``k`` is meaningless and
``A^-1`` does not exist; the swap phase is then run at the split ``r`` instead (a rank-truncated,
pseudo-inverse-like treatment: the ``k - r`` extra kept columns lie, to rounding, in the span of
the first ``r`` and carry no information), and the ``k - r`` extra columns are the next ones in the
resulting order.  ``RRQRResult.rank`` reports ``r``; ``max_rho`` is measured at the split
``min(k, r)``.  A zero matrix has rank 0 and yields ``max_rho = 0``.

Floating point
--------------
The loop condition is exactly ``max rho > f``.  As a guard against rounding (``rho`` within a few
ulps of ``f == 1``, e.g. duplicated columns), a swap whose recomputed ``log|det A|`` does not
strictly increase is undone and the loop stops; ``max_rho`` may then exceed ``f`` by rounding only.
All steps are deterministic for a given input and seed (ties in ``argmax`` go to the first pair in
row-major order: smallest kept position, then smallest dropped position).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

__all__ = ["RRQRResult", "qrcp_order", "strong_rrqr"]


@dataclass(frozen=True)
class RRQRResult:
    kept: np.ndarray  # sorted int64 indices of the k selected columns
    order: np.ndarray  # full column permutation after the swap phase (first k = selected)
    max_rho: float  # max_ij rho_ij at exit (split min(k, rank)); 0.0 when k == n or k == 0
    swaps: int  # number of swaps made
    hit_swap_cap: bool  # the loop stopped at max_swaps with max_rho > f
    rank: int = -1  # numerical rank of M found by QRCP (see module docstring)


def _as_matrix(M) -> np.ndarray:
    if hasattr(M, "detach"):  # torch tensor
        M = M.detach().cpu().numpy()
    M = np.asarray(M, dtype=np.float64)
    if M.ndim != 2:
        raise ValueError(f"M must be 2-D (rows x columns), got shape {M.shape}")
    if not np.all(np.isfinite(M)):
        raise ValueError("M contains NaN or infinite entries")
    return M


def _qrcp(M: np.ndarray, permute_seed) -> tuple[np.ndarray, np.ndarray, int]:
    """QRCP of M. Returns (R, order, rank): R is n x n upper triangular with M[:, order] = Q R
    (scaled so that |R_00| = 1 unless M == 0), order in original column indices, rank numerical."""
    n_rows, n = M.shape
    if permute_seed is not None:
        perm = np.random.default_rng(permute_seed).permutation(n)
        M = M[:, perm]
    else:
        perm = np.arange(n)
    if n == 0:
        return np.zeros((0, 0)), np.zeros(0, dtype=np.int64), 0
    if n_rows == 0 or not np.any(M):
        return np.zeros((n, n)), perm.astype(np.int64), 0
    if n_rows > n:  # reduce: only the triangle matters
        M = scipy.linalg.qr(M, mode="r", check_finite=False)[0][:n]
    R, piv = scipy.linalg.qr(M, mode="r", pivoting=True, check_finite=False)
    R = R[: min(R.shape)]
    if R.shape[0] < n:  # wide input: pad with zero rows, still upper triangular
        R = np.vstack([R, np.zeros((n - R.shape[0], n))])
    d = np.abs(np.diag(R))
    tol = max(n_rows, n) * np.finfo(np.float64).eps * d[0]
    small = np.flatnonzero(d <= tol)
    rank = int(small[0]) if small.size else n
    if d[0] > 0:
        R = R / d[0]
    return np.triu(R), perm[piv].astype(np.int64), rank


def qrcp_order(M, *, permute_seed=None) -> np.ndarray:
    """Column order of QR with column pivoting (``scipy.linalg.qr(..., pivoting=True)``), after the
    same row reduction :func:`strong_rrqr` uses. With ``permute_seed`` the columns are randomly
    permuted (seeded) before the QR, which only changes how ties are broken; the returned order is
    always in original column indices."""
    return _qrcp(_as_matrix(M), permute_seed)[1]


def _rho(R: np.ndarray, k: int) -> tuple[float, int, int]:
    """max rho over (kept i, dropped j) at split k, and the first maximising pair (i, j),
    j counted from k. R must have a non-singular leading k x k block."""
    A, B, C = R[:k, :k], R[:k, k:], R[k:, k:]
    AinvB = scipy.linalg.solve_triangular(A, B, check_finite=False)
    Ainv = scipy.linalg.solve_triangular(A, np.eye(k), check_finite=False)
    omega = np.linalg.norm(Ainv, axis=1)
    gamma = np.linalg.norm(C, axis=0)
    rho2 = AinvB**2 + np.outer(omega, gamma) ** 2
    flat = int(np.argmax(rho2))
    i, j = divmod(flat, rho2.shape[1])
    return float(np.sqrt(rho2[i, j])), i, j


def _logdet(R: np.ndarray, k: int) -> float:
    return float(np.sum(np.log(np.abs(np.diag(R)[:k]))))


def strong_rrqr(M, k: int, *, f: float = 1.5, max_swaps: int | None = None, permute_seed=None) -> RRQRResult:
    """Select ``k`` columns of ``M`` (n_rows x n) by strong RRQR with factor ``f`` (>= 1).

    Starts from the QRCP order (:func:`qrcp_order`, same ``permute_seed``) and swaps a kept and a
    dropped column while some ``rho_ij > f`` and fewer than ``max_swaps`` (default ``10 * n``)
    swaps were made. See the module docstring for the definition of rho and rank handling."""
    M = _as_matrix(M)
    n = M.shape[1]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= n:
        raise ValueError(f"k must be an integer in [0, {n}], got {k!r}")
    k = int(k)
    if not f >= 1.0:
        raise ValueError(f"f must be >= 1, got {f}")
    max_swaps = 10 * n if max_swaps is None else int(max_swaps)
    if max_swaps < 0:
        raise ValueError(f"max_swaps must be >= 0, got {max_swaps}")

    R, order, rank = _qrcp(M, permute_seed)
    s = min(k, rank)  # split at which the condition is enforced
    swaps, max_rho, hit_cap = 0, 0.0, False
    if 0 < s < n:
        max_rho, i, j = _rho(R, s)
        logdet = _logdet(R, s)
        while max_rho > f:
            if swaps >= max_swaps:
                hit_cap = True
                break
            jj = s + j
            R_new, order_new = R.copy(), order.copy()
            R_new[:, [i, jj]] = R_new[:, [jj, i]]
            order_new[[i, jj]] = order_new[[jj, i]]
            # columns < i are unaffected; re-triangularise the trailing block only
            R_new[i:, i:] = np.triu(scipy.linalg.qr(R_new[i:, i:], mode="r", check_finite=False)[0])
            logdet_new = _logdet(R_new, s)
            if not logdet_new > logdet:  # rounding-level stall (rho ~ f ~ 1): undo and stop
                break
            R, order, logdet = R_new, order_new, logdet_new
            swaps += 1
            max_rho, i, j = _rho(R, s)
    kept = np.sort(order[:k]).astype(np.int64)
    return RRQRResult(
        kept=kept, order=order.astype(np.int64), max_rho=float(max_rho), swaps=swaps, hit_swap_cap=hit_cap, rank=rank
    )
