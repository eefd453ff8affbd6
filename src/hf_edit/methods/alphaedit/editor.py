"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update confined to the null space of the preserved keys.

Everything is MEMIT's (:class:`~hf_edit.methods.memit.MassEditor`) except the closed form of each layer and the
state it keeps across batches:

* **Projector** P (once per layer, from the unedited model's C = E[kkᵀ], not scaled): the span of C's
  eigenvectors with eigenvalue below ``nullspace_threshold``.  Kept factored (:class:`~..memit.solve.NullSpace`:
  the kept eigenvectors, or the others when they are fewer), never as a dense d_in × d_in matrix.
* **Key cache** K_p per layer: after each batch, the batch's keys are recomputed on the fully edited model at every
  edited layer and appended (the reference's ``cache_c += K Kᵀ``, kept as the keys themselves).
* **Update**: X = (P(KKᵀ + K_pK_pᵀ) + αI)⁻¹ P K, ΔW = R Xᵀ, i.e. B = R, A = Xᵀ.  X lies in range(P), so
  ΔW (I − P) = 0: keys in the preserved span are untouched.  Solved through an (n + n_p)-sized system
  (:func:`~..memit.solve.alphaedit_lowrank`), or densely as the reference with ``mom2_dtype="float32"``.

The state lives in the method's persisted state (``EditContext.state``), per edited module, with the fingerprint
of the statistics it came from: a saved and reloaded :class:`~hf_edit.EditedModel` continues the sequence exactly,
and state built from other statistics is refused (:class:`~hf_edit.errors.StatisticsMismatchError`).  Keys of a
batch removed with ``remove_edit`` leave the cache at the next edit.
"""

from __future__ import annotations

from typing import Any

import torch

from ...architecture import EditTarget
from ...errors import ConfigError, StatisticsMismatchError
from ...requests import EditRequest
from ...stats import SecondMomentStats
from ..base import Update
from ..memit.editor import LayerSolve, MassEditor
from ..memit.solve import NullSpace, alphaedit_dense, alphaedit_lowrank, dtype_of, null_space
from .config import AlphaEditConfig

__all__ = ["AlphaEditEditor"]

#: ``Update.info`` key naming the AlphaEdit batch an update belongs to (its keys in the cache carry the same id).
BATCH_KEY = "alphaedit_batch"


class AlphaEditEditor(MassEditor):
    """Computes AlphaEdit updates: all requests of one ``edit`` call together (``joint``), each batch on the
    model edited by the earlier ones, with the projector and key cache kept in the method's state."""

    config_class = AlphaEditConfig

    # -- state --------------------------------------------------------------------------------------------
    @staticmethod
    def _key(module: str, what: str) -> str:
        return f"{module}/{what}"

    def null_space(self, target: EditTarget) -> NullSpace:
        """The projector of ``target`` from the state (after :meth:`before_batch`)."""
        state = self.context.state
        meta = state[self._key(target.name, "projector")]
        return NullSpace(basis=state[self._key(target.name, "basis")], kind=meta["kind"], nullity=meta["nullity"])

    def previous_keys(self, target: EditTarget) -> torch.Tensor | None:
        """K_p of ``target``: the keys of the earlier batches still applied, (d_in, n_p) float32, or ``None``."""
        keys = self.context.state.get(self._key(target.name, "keys"))
        return None if keys is None or keys.shape[0] == 0 else keys.T

    def _projector_settings(self) -> dict[str, Any]:
        return {"threshold": float(self.config.nullspace_threshold),
                "precision": "svd-float32" if self.config.mom2_dtype == "float32" else "eigh-float64"}

    def before_batch(self, targets: list[EditTarget], stats: list[SecondMomentStats],
                     units: list[list[EditRequest]]) -> None:
        """Check the state against the statistics (before anything changes), build missing projectors, and drop
        cached keys of batches that were removed.

        Raises:
            StatisticsMismatchError: the state was built from other statistics.
            ConfigError: no eigenvalue of C is below ``nullspace_threshold`` (the update would be zero).
        """
        state = self.context.state
        fingerprints = [self.stats_fingerprint(s) for s in stats]
        for target, fingerprint, s in zip(targets, fingerprints, stats):
            meta = state.get(self._key(target.name, "projector"))
            if meta is not None and meta.get("stats_fingerprint") != fingerprint:
                raise StatisticsMismatchError(
                    f"The AlphaEdit state of {target.name} (null-space projector and cached keys of earlier batches) "
                    f"was built from other statistics ({meta.get('stats')}) than the current ones "
                    f"({_describe(s)}). Edit with the statistics settings of the earlier AlphaEdit batches "
                    "(mom2_dataset, mom2_n_samples, mom2_dtype, mom2_max_length), or start from the base model.")
        settings = self._projector_settings()
        for target, fingerprint, s in zip(targets, fingerprints, stats):
            meta = state.get(self._key(target.name, "projector"))
            if meta is None or any(meta.get(k) != v for k, v in settings.items()):
                dtype = torch.float32 if settings["precision"] == "svd-float32" else torch.float64
                space = null_space(s.second_moment(), self.config.nullspace_threshold, dtype=dtype)
                if space.nullity == 0:
                    raise ConfigError(
                        f"No eigenvalue of the second moment of {target.name} is below nullspace_threshold="
                        f"{self.config.nullspace_threshold}: AlphaEdit's projector is zero and no update is "
                        "possible. Raise nullspace_threshold (the eigenvalues are absolute, they scale with the "
                        "model's activations).")
                state[self._key(target.name, "basis")] = space.basis
                state[self._key(target.name, "projector")] = dict(
                    settings, kind=space.kind, nullity=space.nullity, dim=space.dim, stats_fingerprint=fingerprint,
                    stats=_describe(s))
        self._drop_removed_batches(targets)

    def _drop_removed_batches(self, targets: list[EditTarget]) -> None:
        state = self.context.state
        live = {e.info.get(BATCH_KEY) for e in self.context.edits if e.method == self.config.name}
        for target in targets:
            batches = state.get(self._key(target.name, "key_batches"))
            keys = state.get(self._key(target.name, "keys"))
            if not batches or keys is None:
                continue
            kept, rows, offset = [], [], 0
            for batch, count in batches:
                if batch in live:
                    kept.append([batch, count])
                    rows += range(offset, offset + count)
                offset += count
            if len(kept) != len(batches):
                state[self._key(target.name, "keys")] = keys[rows].clone()
                state[self._key(target.name, "key_batches")] = kept

    def finish(self, targets: list[EditTarget], units: list[list[EditRequest]], updates: list[Update]) -> bool:
        """Append the batch's keys, recomputed on the fully edited model, to every layer's cache."""
        state = self.context.state
        keys, _ = self.compute_ks(units, targets)
        batch = int(state.get("next_batch", 0))
        for target in targets:
            new = keys[target.name].T.float().contiguous()  # (n, d_in)
            old = state.get(self._key(target.name, "keys"))
            state[self._key(target.name, "keys")] = new if old is None else torch.cat([old, new])
            state[self._key(target.name, "key_batches")] = list(
                state.get(self._key(target.name, "key_batches"), [])) + [[batch, int(new.shape[0])]]
        state["next_batch"] = batch + 1
        for update in updates:
            update.info[BATCH_KEY] = batch
        return True

    # -- the closed form ----------------------------------------------------------------------------------
    def solve_layer(self, index: int, target: EditTarget, stats: SecondMomentStats, K: torch.Tensor,
                    R: torch.Tensor, *, preserved: torch.Tensor | None = None) -> LayerSolve:
        cfg = self.config
        dtype = dtype_of(cfg.solve_dtype)
        space = self.null_space(target)
        previous = self.previous_keys(target)
        n_previous = 0 if previous is None else int(previous.shape[1])
        if cfg.mom2_dtype == "float32":
            extra = [x.to(dtype) for x in (previous, preserved) if x is not None]
            cache = sum(x @ x.T for x in extra) if extra else None
            A, B = alphaedit_dense(space.dense(dtype), K, R, cache, cfg.L2, dtype)
            solve = "dense"
        else:
            A, B = alphaedit_lowrank(space, K, R, previous, cfg.L2, dtype, preserved=preserved)
            solve = "low-rank"
        return A, B, {"solve": solve, "nullity": space.nullity, "projector_kind": space.kind,
                      "previous_keys": n_previous}


def _describe(stats: SecondMomentStats) -> dict[str, Any]:
    meta = stats.metadata
    return {k: meta.get(k) for k in ("dataset", "n_samples", "dtype", "max_length") if k in meta} | {
        "count": stats.count}
