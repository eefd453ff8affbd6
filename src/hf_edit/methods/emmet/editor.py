"""EMMET (Gupta et al., 2024): MEMIT with the memorisation as an equality constraint.

Everything is MEMIT's (:class:`~hf_edit.methods.memit.MassEditor`: templates, keys, batched z, the layer loop with
the residual spread over the remaining layers) except the closed form of each layer, in float64:

    C' = λ_C E[kkᵀ] + μI,   D = KᵀC'⁻¹K (+ λ_E I when n > 1),   ΔW = R D⁻¹ KᵀC'⁻¹,

stored as B = R (d × n), A = D⁻¹KᵀC'⁻¹ (n × d_in).  With λ_E = 0 it solves min preservation error subject to
ΔW K = R exactly; for one request it is r-ROME's rank-one update.
"""

from __future__ import annotations

import torch

from ...architecture import EditTarget
from ...stats import SecondMomentStats
from ..memit.editor import LayerSolve, MassEditor
from ..memit.solve import dtype_of, emmet_dense, emmet_lowrank
from .config import EMMETConfig

__all__ = ["EMMETEditor"]


class EMMETEditor(MassEditor):
    """Computes EMMET updates: all requests of one ``edit`` call together (``joint``)."""

    config_class = EMMETConfig

    def solve_layer(self, index: int, target: EditTarget, stats: SecondMomentStats, K: torch.Tensor,
                    R: torch.Tensor, *, preserved: torch.Tensor | None = None) -> LayerSolve:
        cfg = self.config
        dtype = dtype_of(cfg.solve_dtype)
        if cfg.mom2_dtype == "float32":
            A, B, fallback = emmet_dense(stats.second_moment(), K, R, cfg.mom2_update_weight, cfg.emmet_lambda,
                                         cfg.update_norm_lambda, dtype, preserved=preserved)
            solve = "dense"
        else:
            chol = self.cholesky(stats, cfg.update_norm_lambda / cfg.mom2_update_weight)
            A, B, fallback = emmet_lowrank(chol, K, R, cfg.mom2_update_weight, cfg.emmet_lambda, dtype,
                                           preserved=preserved)
            solve = "low-rank"
        return A, B, {"solve": solve, "pinv_fallback": fallback, "ridge": cfg.emmet_lambda if K.shape[1] > 1 else 0.0}
