"""The closed forms of MEMIT, EMMET and AlphaEdit, as factor pairs ΔW = B A (Linear orientation).

Conventions: K is (d_in, n), one key per column; R is (d_out, n), one residual per column; C = E[kkᵀ] is
(d_in, d_in).  Every function returns ``(A, B)`` with A (n, d_in) and B (d_out, n) = R, so the rank is n.

Each closed form exists twice:

* the **dense** form, the d_in × d_in system exactly as the reference solves it (used with ``mom2_dtype="float32"``
  to reproduce the reference's rounding), and
* the **low-rank** form (the default), algebraically identical but through n × n systems and a cached Cholesky
  factor of C (MEMIT: Woodbury, (λC + KKᵀ)⁻¹K = C⁻¹K(λI + KᵀC⁻¹K)⁻¹; EMMET: its formula is already of that
  shape; AlphaEdit: X = F(αI + FᵀF)⁻¹ with F = P[K, K_p], see :func:`alphaedit_lowrank`).  Cost O(d_in²·n) per
  batch once C is factored (O(d_in³), once per statistics), instead of O(d_in³) per batch and layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import ConfigError, OptimizationError

__all__ = [
    "CholeskyCache",
    "NullSpace",
    "alphaedit_dense",
    "alphaedit_lowrank",
    "dtype_of",
    "emmet_dense",
    "emmet_lowrank",
    "memit_dense",
    "memit_lowrank",
    "null_space",
]


def dtype_of(name: str) -> torch.dtype:
    """``"float32"``/``"float64"`` → the torch dtype."""
    return {"float32": torch.float32, "float64": torch.float64}[name]


def _solve_sym(matrix: torch.Tensor, rhs: torch.Tensor, what: str) -> torch.Tensor:
    """matrix⁻¹ rhs for a symmetric positive definite matrix (Cholesky; LU if that fails)."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    solution, info = torch.linalg.solve_ex(matrix, rhs)
    if int(info) != 0:
        raise OptimizationError(f"The {what} system is singular; nothing was applied. Check the statistics and "
                                "that the requests' keys are distinct (duplicate_subjects='merge').")
    return solution


# --------------------------------------------------------------------------------------------------------------
# MEMIT
# --------------------------------------------------------------------------------------------------------------
def _outer(O: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | float:
    return 0.0 if O is None or O.shape[1] == 0 else O.to(dtype) @ O.to(dtype).T


def memit_dense(C: torch.Tensor, K: torch.Tensor, R: torch.Tensor, lam: float, dtype: torch.dtype = torch.float64,
                preserved: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: A_l = solve(λC + KKᵀ, K) in ``dtype``; A = A_lᵀ, B = R.

    ``preserved`` (d_in, m), optional: further keys O to keep unchanged, added as OOᵀ next to λC (hf_edit's
    ``prompt_preservation``; the columns carry the weight √μ)."""
    C, K = C.to(dtype), K.to(dtype)
    A_l = torch.linalg.solve(lam * C + _outer(preserved, dtype) + K @ K.T, K)
    return A_l.T, R.to(dtype)


def memit_lowrank(chol: torch.Tensor, K: torch.Tensor, R: torch.Tensor, lam: float,
                  dtype: torch.dtype = torch.float64, preserved: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Woodbury: A = (λI + KᵀC⁻¹K)⁻¹(C⁻¹K)ᵀ with ``chol`` the Cholesky factor of C; equal to :func:`memit_dense`.

    With ``preserved`` O: G = [K, O] and (λC + GGᵀ)⁻¹G = C⁻¹G(λI + GᵀC⁻¹G)⁻¹, of which A takes the first n columns.
    """
    K = K.to(dtype)
    n = K.shape[1]
    G = K if preserved is None or preserved.shape[1] == 0 else torch.cat([K, preserved.to(dtype)], dim=1)
    Y = torch.cholesky_solve(G, chol.to(dtype))  # C⁻¹G, (d_in, n + m)
    gram = G.T @ Y
    gram = (gram + gram.T) / 2
    eye = torch.eye(G.shape[1], dtype=dtype, device=K.device)
    return _solve_sym(lam * eye + gram, Y.T, "MEMIT")[:n], R.to(dtype)


# --------------------------------------------------------------------------------------------------------------
# EMMET
# --------------------------------------------------------------------------------------------------------------
def _emmet_from(CinvK: torch.Tensor, K: torch.Tensor, emmet_lambda: float) -> tuple[torch.Tensor, bool]:
    """A = D⁻¹(C⁻¹K)ᵀ with D = KᵀC⁻¹K (+ λ_E I when n > 1); inverse, else pseudo-inverse (the reference)."""
    n = K.shape[1]
    D = K.T @ CinvK
    if n > 1:
        D = D + emmet_lambda * torch.eye(n, dtype=D.dtype, device=D.device)
    D_inv, info = torch.linalg.inv_ex(D)
    fallback = int(info) != 0 or not bool(torch.isfinite(D_inv).all())
    if fallback:
        D_inv = torch.linalg.pinv(D)
    return D_inv @ CinvK.T, fallback


def emmet_dense(C: torch.Tensor, K: torch.Tensor, R: torch.Tensor, mom2_update_weight: float, emmet_lambda: float,
                update_norm_lambda: float = 0.0, dtype: torch.dtype = torch.float64,
                preserved: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The reference: C' = λ_C C + μI, explicit ``inverse(C')``, A = D⁻¹KᵀC'⁻¹; also returns whether D needed
    the pseudo-inverse.  ``preserved`` O adds OOᵀ to C' (see :func:`memit_dense`)."""
    C, K = C.to(dtype), K.to(dtype)
    scaled = mom2_update_weight * C + _outer(preserved, dtype)
    if update_norm_lambda:
        scaled = scaled + update_norm_lambda * torch.eye(C.shape[0], dtype=dtype, device=C.device)
    C_inv = torch.inverse(scaled)
    A, fallback = _emmet_from(C_inv @ K, K, emmet_lambda)
    return A, R.to(dtype), fallback


def emmet_lowrank(chol: torch.Tensor, K: torch.Tensor, R: torch.Tensor, mom2_update_weight: float,
                  emmet_lambda: float, dtype: torch.dtype = torch.float64, preserved: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """:func:`emmet_dense` through ``chol``, the Cholesky factor of C + (μ/λ_C)·I: C'⁻¹K = chol-solve(K) / λ_C;
    with ``preserved`` O, (C' + OOᵀ)⁻¹K by Woodbury over O's columns."""
    K = K.to(dtype)
    CinvK = torch.cholesky_solve(K, chol.to(dtype)) / mom2_update_weight
    if preserved is not None and preserved.shape[1]:
        O = preserved.to(dtype)
        CinvO = torch.cholesky_solve(O, chol.to(dtype)) / mom2_update_weight
        inner = O.T @ CinvO
        inner = (inner + inner.T) / 2 + torch.eye(O.shape[1], dtype=dtype, device=O.device)
        CinvK = CinvK - CinvO @ _solve_sym(inner, O.T @ CinvK, "EMMET")
    A, fallback = _emmet_from(CinvK, K, emmet_lambda)
    return A, R.to(dtype), fallback


# --------------------------------------------------------------------------------------------------------------
# AlphaEdit
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NullSpace:
    """The projector P onto the span of C's eigenvectors with eigenvalue below a threshold, in factored form.

    Attributes:
        basis: orthonormal columns (d_in, m): the kept eigenvectors themselves (``kind="null"``, P = UUᵀ), or,
            when more than half the directions are kept, the others (``kind="complement"``, P = I − VVᵀ).
        kind: ``"null"`` or ``"complement"``.
        nullity: m = rank P, the number of eigenvalues below the threshold.
    """

    basis: torch.Tensor
    kind: str
    nullity: int

    @property
    def dim(self) -> int:
        return int(self.basis.shape[0])

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        """P X, in X's dtype."""
        V = self.basis.to(device=X.device, dtype=X.dtype)
        projected = V @ (V.T @ X)
        return projected if self.kind == "null" else X - projected

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """P as a (d_in, d_in) matrix (for the reference's dense solve and for tests)."""
        V = self.basis.to(dtype)
        outer = V @ V.T
        return outer if self.kind == "null" else torch.eye(self.dim, dtype=dtype) - outer


def null_space(C: torch.Tensor, threshold: float, *, dtype: torch.dtype = torch.float64,
               basis_dtype: torch.dtype = torch.float32) -> NullSpace:
    """AlphaEdit's projector from C = E[kkᵀ]: the eigenvectors with eigenvalue < ``threshold`` (absolute).

    float64: ``eigh``; float32: ``svd`` of the float32 matrix, as the reference.  The basis is stored in
    ``basis_dtype``; the smaller of the kept set and its complement is stored.
    """
    if dtype == torch.float64:
        eigenvalues, vectors = torch.linalg.eigh(C.to(torch.float64))
    else:
        vectors, eigenvalues, _ = torch.linalg.svd(C.to(torch.float32), full_matrices=False)
    small = eigenvalues < threshold
    nullity = int(small.sum())
    if nullity * 2 <= C.shape[0]:
        return NullSpace(vectors[:, small].to(basis_dtype).contiguous(), "null", nullity)
    return NullSpace(vectors[:, ~small].to(basis_dtype).contiguous(), "complement", nullity)


def alphaedit_dense(P: torch.Tensor, K: torch.Tensor, R: torch.Tensor, cache: torch.Tensor | None, L2: float,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: M = P(KKᵀ + cache) + αI, A = (M⁻¹PK)ᵀ (M is not symmetric), B = R."""
    P, K = P.to(dtype), K.to(dtype)
    gram = K @ K.T
    if cache is not None:
        gram = gram + cache.to(dtype)
    M = P @ gram + L2 * torch.eye(P.shape[0], dtype=dtype, device=P.device)
    return torch.linalg.solve(M, P @ K).T, R.to(dtype)


def alphaedit_lowrank(space: NullSpace, K: torch.Tensor, R: torch.Tensor, previous: torch.Tensor | None, L2: float,
                      dtype: torch.dtype = torch.float64, preserved: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`alphaedit_dense` without any d_in × d_in matrix.

    X = M⁻¹PK lies in range(P), so (PM₀P + αI)X = PK with M₀ = GGᵀ, G = [K, K_p]; with F = PG,
    (αI + FFᵀ)⁻¹F = F(αI + FᵀF)⁻¹, hence X = F (αI + FᵀF)⁻¹[:, :n], an (n + n_p)-sized solve.

    Args:
        space: the projector.
        K: this batch's keys (d_in, n).
        R: residuals (d_out, n).
        previous: K_p, the keys of earlier batches (d_in, n_p), or ``None``.
        L2: α > 0.
        preserved: further keys O to keep unchanged (weighted columns), treated like K_p.
    """
    if not L2 > 0:
        raise ConfigError(f"L2 must be positive, got {L2}.")
    K = K.to(dtype)
    parts = [K] + [x.to(dtype) for x in (previous, preserved) if x is not None and x.shape[1]]
    G = torch.cat(parts, dim=1)
    F = space.apply(G)
    gram = F.T @ F
    gram = (gram + gram.T) / 2
    eye = torch.eye(G.shape[1], dtype=dtype, device=G.device)
    selector = eye[:, :K.shape[1]]
    X = F @ _solve_sym(L2 * eye + gram, selector, "AlphaEdit")
    return X.T, R.to(dtype)


# --------------------------------------------------------------------------------------------------------------
# Factor cache
# --------------------------------------------------------------------------------------------------------------
class CholeskyCache:
    """float64 Cholesky factors of C + shift·I, one per (statistics object, shift, device); kept by one editor.

    The statistics object is kept alive with its factor so that its ``id`` cannot be reused.
    """

    def __init__(self) -> None:
        self._factors: dict[tuple[int, float, str], tuple[object, torch.Tensor]] = {}

    def factor(self, stats: object, C: torch.Tensor, shift: float = 0.0, device: torch.device | str = "cpu"
               ) -> torch.Tensor:
        """The lower Cholesky factor of C + shift·I in float64.

        Raises:
            OptimizationError: C + shift·I is not positive definite (too few texts for the statistics).
        """
        key = (id(stats), float(shift), str(device))
        if key not in self._factors:
            matrix = C.to(device=device, dtype=torch.float64)
            if shift:
                matrix = matrix + shift * torch.eye(matrix.shape[0], dtype=torch.float64, device=matrix.device)
            factor, info = torch.linalg.cholesky_ex(matrix)
            if int(info) != 0:
                raise OptimizationError(
                    f"The second moment C ({matrix.shape[0]}×{matrix.shape[0]}) is not positive definite, so the "
                    "closed form cannot be solved; nothing was applied. Use more text for the statistics "
                    "(mom2_n_samples).")
            self._factors[key] = (stats, factor)
        return self._factors[key][1]
