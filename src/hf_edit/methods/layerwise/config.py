"""Hyperparameters of the layer-wise method: :class:`LayerwiseConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ...errors import ConfigError
from ..emmet.config import EMMETConfig

__all__ = ["LayerwiseConfig"]

TemplateKeys = Literal["each", "mean", "auto"]


@dataclass(frozen=True)
class LayerwiseConfig(EMMETConfig):
    """Hyperparameters of the layer-wise method (hf_edit's own; no reference implementation, no presets).

    Everything is EMMET's (:class:`~hf_edit.EMMETConfig`, itself MEMIT's templates, keys and statistics) except how
    the targets are made: instead of one z at the last edited layer whose residual is spread over the window, a δ
    is added to the MLP output of *every* edited layer at the subject's last token and all of them are optimised
    together, so each layer's update only has to deliver its own δ.  By default each context template's key is its
    own equality constraint (``template_keys="each"``) and the keys of the prompt's other tokens are kept
    (``prompt_preservation``).

    The defaults were chosen on the CounterFact fact model (``benchmarks/bench_layerwise.py`` and
    ``benchmarks/sweep_fact_model.py``; README "A default for models without a preset"): the reference's clamp of
    0.75 and weight decay keep δ far too small there, so the clamp is 4 (as EMMET's and AlphaEdit's Llama presets)
    and the weight decay 0; 40 optimisation steps.  ``clamp_norm_factor=2`` trades edit success for neighbourhood
    preservation at the same score.  Meant for single edits and small batches: with hundreds of requests in one call
    the exact constraints make large, interfering updates (use MEMIT, EMMET or AlphaEdit there).

    Args:
        template_keys: ``"each"``: every templated prompt's key is a constraint with the same δ (rank = number of
            keys); ``"mean"``: one key per request averaged over the templates (MEMIT's); ``"auto"``: ``"each"``
            while the keys of a batch stay under a quarter of the projection's input width, else ``"mean"``.
    """

    method: ClassVar[str] = "layerwise"
    label: ClassVar[str] = "Layer-wise"
    description: ClassVar[str] = (
        "Layer-wise values (hf_edit): a δ optimised jointly at the MLP output of every edited layer, each layer "
        "solved with EMMET's equality-constrained update; one LoRA factor pair per layer.")
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    v_num_grad_steps: int = 40
    v_weight_decay: float = 0.0
    clamp_norm_factor: float = 4.0
    mom2_update_weight: float = 1.0
    emmet_lambda: float = 1e-3
    prompt_preservation: float = 10.0
    mom2_n_samples: int = 1_000
    template_keys: TemplateKeys = "auto"

    def validate(self) -> None:
        super().validate()
        if self.template_keys not in ("each", "mean", "auto"):
            raise ConfigError(f"template_keys must be 'each', 'mean' or 'auto', got {self.template_keys!r}.")
        if self.fact_token == "last":
            raise ConfigError("The layer-wise method edits at the subject's tokens; fact_token='last' would make the "
                              "edit fire on every prompt. Use 'subject_last' or 'subject_first'.")
