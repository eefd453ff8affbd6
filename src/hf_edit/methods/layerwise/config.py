"""Hyperparameters of the layer-wise method: :class:`LayerwiseConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import nn

from ...architecture import num_layers, unwrap_model
from ...errors import ConfigError
from ..emmet.config import EMMETConfig
from ..memit.config import default_layer_window

__all__ = ["LayerwiseConfig"]

TemplateKeys = Literal["each", "mean", "auto"]
ValueTokens = Literal["subject", "fact"]


@dataclass(frozen=True)
class LayerwiseConfig(EMMETConfig):
    """Hyperparameters of the layer-wise method (hf_edit's own; no reference implementation, no presets).

    Everything is EMMET's (:class:`~hf_edit.EMMETConfig`, itself MEMIT's templates, keys and statistics) except how
    the targets are made: instead of one z at the last edited layer whose residual is spread over the window, a δ
    is added to the MLP output of *every* edited layer at *every* subject token (one δ per layer and token) and all
    of them are optimised together, so each layer's update only has to deliver its own δ at each token's key.  By
    default each context template's key is its own equality constraint (``template_keys="each"``) and the keys of
    the prompt's other tokens are kept (``prompt_preservation``).

    The defaults were chosen on dev cases of the CounterFact fact model and confirmed on test cases
    (``benchmarks/bench_layerwise.py`` and ``benchmarks/sweep_fact_model.py``; README "A default for models without
    a preset"): values at every subject token raise the paraphrase ceiling from 79 to 89 %; with them clamp 1.25
    balances the paraphrase score against neighbourhood damage (dev S 90.0: clamp 1 lost paraphrases, clamp 1.5
    and 2 neighbours), and requests whose target that clamp cannot make likely get a larger one
    (``clamp_escalation``: 2, then 4; dev S 90.4; on the tiny stories260K Llama the demo's edit only takes so);
    the window is one layer longer than MEMIT's (layers 0–3 of 6); weight decay 0; 40 optimisation steps.
    Meant for single edits and small batches: with hundreds of requests in one call the exact constraints make
    large, interfering updates (use MEMIT, EMMET or AlphaEdit there).

    Args:
        clamp_escalation: larger clamp factors tried, in order, for the requests whose values did not reach the
            target with ``clamp_norm_factor`` (their template-averaged target probability is below
            ``escalation_threshold``): each such request is optimised again with the next factor, so every request
            gets the smallest clamp of the ladder that makes its target likely (the largest when none does).
            Factors not above ``clamp_norm_factor`` are skipped; ``()`` turns this off.  The factor used is in
            each value's ``info["clamp_norm_factor"]``.
        escalation_threshold: the target probability (e^−NLL over the context templates) below which a value is
            optimised again with the next clamp factor.
        value_tokens: ``"subject"``: a δ at every subject token (one per token, counted from the last), each token
            of every templated prompt a key; ``"fact"``: at ``fact_token`` only (the subject's last token).
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
    clamp_norm_factor: float = 1.25
    mom2_update_weight: float = 1.0
    emmet_lambda: float = 1e-3
    prompt_preservation: float = 10.0
    mom2_n_samples: int = 1_000
    template_keys: TemplateKeys = "auto"
    value_tokens: ValueTokens = "subject"
    clamp_escalation: tuple[float, ...] = (2.0, 4.0)
    escalation_threshold: float = 0.8

    def __post_init__(self) -> None:
        ladder = self.clamp_escalation
        if not isinstance(ladder, (list, tuple)) or not all(isinstance(x, (int, float)) for x in ladder):
            raise ConfigError(f"clamp_escalation must be a list of clamp factors, got {ladder!r}.")
        object.__setattr__(self, "clamp_escalation", tuple(float(x) for x in ladder))
        super().__post_init__()

    def default_layers(self, model: nn.Module) -> tuple[int, ...]:
        """The MEMIT family's window (:func:`~hf_edit.methods.memit.config.default_layer_window`) and, on models of
        up to 15 layers, the layer after it as well (0 … n // 3 + 1: layers 0–3 of the fact model's 6, measured
        better than 0–2)."""
        n = num_layers(unwrap_model(model))
        window = default_layer_window(n)
        return window + (window[-1] + 1,) if n <= 15 and window[-1] + 1 < n else window

    def validate(self) -> None:
        super().validate()
        if self.template_keys not in ("each", "mean", "auto"):
            raise ConfigError(f"template_keys must be 'each', 'mean' or 'auto', got {self.template_keys!r}.")
        ladder = self.clamp_escalation
        if any(b <= a for a, b in zip(ladder, ladder[1:])) or any(x <= 0 for x in ladder):
            raise ConfigError(f"clamp_escalation must be increasing positive clamp factors, got {list(ladder)}.")
        if not 0.0 < self.escalation_threshold <= 1.0:
            raise ConfigError(f"escalation_threshold must be in (0, 1], got {self.escalation_threshold}.")
        if self.value_tokens not in ("subject", "fact"):
            raise ConfigError(f"value_tokens must be 'subject' or 'fact', got {self.value_tokens!r}.")
        if self.fact_token == "last":
            raise ConfigError("The layer-wise method edits at the subject's tokens; fact_token='last' would make the "
                              "edit fire on every prompt. Use 'subject_last' or 'subject_first'.")
