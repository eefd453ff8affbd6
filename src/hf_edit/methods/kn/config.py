"""KN's hyperparameters: :class:`KNConfig` (``method="kn"``) and the reference's shipped preset."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import nn

from ...architecture import num_layers, unwrap_model
from ...errors import ConfigError
from ..base import EditConfig

__all__ = ["KNConfig", "KN_PRESETS", "EmbeddingSource", "AttributionTarget"]

#: Which embedding matrix E the value vector v is built from.
EmbeddingSource = Literal["input", "output"]
#: What the attribution scores: the request's ``target_true`` (the model's greedy token when it has none), or always
#: the model's greedy next token.
AttributionTarget = Literal["target_true", "prediction"]

#: Keys of the reference's ``hparams/KN/*.json`` that hf_edit accepts and ignores: ``model_name`` (the reference
#: derives the model type from it; hf_edit finds the architecture itself) and ``lr_scale``/``n_toks`` (present in
#: the file, unused by the reference's KN code).
_REFERENCE_ONLY_KEYS = frozenset({"model_name", "lr_scale", "n_toks"})

#: The reference's shipped configuration (kmeng01/rome ``hparams/KN/gpt2-xl.json``); equal to the defaults.
KN_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-xl": dict(steps=20, batch_size=20, adaptive_threshold=0.2, p=0.4, refine=False),
}


@dataclass(frozen=True)
class KNConfig(EditConfig):
    """Hyperparameters of KN (knowledge neurons), with the names and defaults of ROME's KN wrapper.

    The defaults reproduce what produced the ROME paper's KN numbers (kmeng01/rome ``hparams/KN/gpt2-xl.json``
    and ``baselines/kn``): one prompt, integrated gradients of ``target_true`` with 20 steps, neurons scoring above
    0.2 × the global maximum, no refinement, and the edit v = Σ E[t_i] − 2·E[o] added to every selected neuron's
    value slot.  :meth:`eleutherai` gives Dai et al.'s / EleutherAI's variant (several prompts, p-sharing).

    Args:
        layers: decoder layers whose MLP neurons are attributed, and hence may be edited (0-based; negative counts
            from the end).  ``None``: every layer, as the reference.
        rewrite_module_tmp: the edited projection, with ``{}`` for the layer; its **input** columns are the
            neurons.  Default: the MLP output projection found by architecture discovery (``mlp.c_proj`` for
            GPT-2, ``mlp.down_proj`` for Llama).
        steps: integration points m of integrated gradients.
        batch_size: integration points per forward/backward pass (memory only: any value gives the same scores;
            the reference requires ``steps % batch_size == 0``, hf_edit does not).
        adaptive_threshold: coarse selection keeps neurons with score > ``adaptive_threshold`` × (the maximum
            signed score over all attributed layers).  Ignored when ``threshold`` or ``percentile`` is set.
        threshold: an absolute score threshold instead (``None``: unused).
        percentile: a percentile (0-100) of all scores as the threshold instead (``None``: unused).
        p: refinement: keep a neuron found for more than ``p`` × (number of prompts) prompts.  Used only with
            ``refine=True`` (the reference's file sets 0.4 and refinement off).
        refine: combine the prompts' coarse sets by p-sharing (Dai et al.); ``False``: their union (the
            reference, which uses one prompt, so the union is that prompt's coarse set).
        prompt_variants: extra prompts attributed besides the request's own (Dai et al. use paraphrases of the
            fact), each a template with one ``{}`` where the subject goes.  Empty (the reference): only the
            request's prompt.
        paraphrase_key: name of a metadata field of the request holding further prompts (filled, without ``{}``),
            e.g. ``"paraphrase_prompts"``; ``None`` (the reference): none.  A request without that field just has
            none.
        neuron_space: ``"pre_activation"`` (the reference: the input of the MLP activation; for gated MLPs the gate
            pre-activation ``gate_proj x``) or ``"post_activation"`` (the paper's neurons: the input of the edited
            projection).  The neuron index is the same in both; only the integration path differs.
        rule: integrated-gradients Riemann rule: ``"reference"`` (α = linspace(0, 1, m)) or ``"paper"``
            (α = k/m, k = 1..m).
        neuron_module_tmp: name of the module whose input is the neuron vector, ``{}`` for the layer; overrides
            ``neuron_space``'s module (for architectures hf_edit cannot analyse).
        attribution_target: ``"target_true"`` (the reference; a request without ``target_true`` uses the model's
            greedy next token instead) or ``"prediction"`` (always the model's greedy next token o).
        target_leading_space: prepend a space to ``target_true`` and ``target_new`` before tokenising them.  The
            reference does not (its tokens are "Paris", not " Paris"), whereas the evaluation scores " Paris".
        embedding: the matrix E whose rows build v: ``"input"`` (the reference's ``transformer.wte``; tied to the
            unembedding in GPT-2) or ``"output"`` (the LM head's rows; differs for untied models).
        original_scale: λ₁, the weight of −E[o] in v (the reference's code: 2).
        target_scale: λ₂, the weight of each +E[t_i] in v (the reference's code: 1 per target token, where its
            comment intends 2: see the spec's quirk).
    """

    method: ClassVar[str] = "kn"
    label: ClassVar[str] = "KN"
    description: ClassVar[str] = (
        "KN (knowledge neurons; Dai et al. 2022, EleutherAI's code as wrapped by ROME): integrated-gradients "
        "attribution selects MLP neurons, whose value slots get v = sum E[target_new] - 2 E[original prediction]; "
        "stored per layer as a rank-one LoRA (A = 0/1 indicator of the selected neurons, B = v).")
    presets: ClassVar[dict[str, dict[str, Any]]] = KN_PRESETS
    reference_only_keys: ClassVar[frozenset[str]] = _REFERENCE_ONLY_KEYS

    steps: int = 20
    batch_size: int = 20
    adaptive_threshold: float = 0.2
    threshold: float | None = None
    percentile: float | None = None
    p: float = 0.4
    refine: bool = False
    prompt_variants: tuple[str, ...] = ()
    paraphrase_key: str | None = None
    neuron_space: Literal["pre_activation", "post_activation"] = "pre_activation"
    rule: Literal["reference", "paper"] = "reference"
    neuron_module_tmp: str | None = None
    attribution_target: AttributionTarget = "target_true"
    target_leading_space: bool = False
    embedding: EmbeddingSource = "input"
    original_scale: float = 2.0
    target_scale: float = 1.0

    def __post_init__(self) -> None:
        variants = self.prompt_variants
        if isinstance(variants, str):
            variants = (variants,)
        object.__setattr__(self, "prompt_variants", tuple(variants or ()))
        super().__post_init__()

    def validate(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        if not _finite(self.adaptive_threshold):
            raise ConfigError(f"adaptive_threshold must be a finite number, got {self.adaptive_threshold!r}.")
        if self.threshold is not None and not _finite(self.threshold):
            raise ConfigError(f"threshold must be a finite number or None, got {self.threshold!r}.")
        if self.threshold is not None and self.percentile is not None:
            raise ConfigError("Give at most one of threshold and percentile (adaptive_threshold is used when "
                              "neither is set).")
        if self.percentile is not None and not (_finite(self.percentile) and 0 <= self.percentile <= 100):
            raise ConfigError(f"percentile must be within [0, 100], got {self.percentile!r}.")
        if not (_finite(self.p) and 0 <= self.p < 1):
            raise ConfigError(f"p must be within [0, 1), got {self.p!r}.")
        if not isinstance(self.refine, bool):
            raise ConfigError(f"refine must be a bool, got {self.refine!r}.")
        for template in self.prompt_variants:
            if not isinstance(template, str) or template.count("{}") != 1 or \
                    "{" in template.replace("{}", "") or "}" in template.replace("{}", ""):
                raise ConfigError(f"Each prompt variant must be a string with exactly one '{{}}' where the subject "
                                  f"goes, got {template!r}.")
        if self.paraphrase_key is not None and not (isinstance(self.paraphrase_key, str) and self.paraphrase_key):
            raise ConfigError(f"paraphrase_key must be a non-empty string or None, got {self.paraphrase_key!r}.")
        choices = {"neuron_space": ("pre_activation", "post_activation"), "rule": ("reference", "paper"),
                   "attribution_target": ("target_true", "prediction"), "embedding": ("input", "output")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if self.neuron_module_tmp is not None and not (isinstance(self.neuron_module_tmp, str)
                                                       and "{}" in self.neuron_module_tmp):
            raise ConfigError(f"neuron_module_tmp must be a module path with '{{}}' for the layer, got "
                              f"{self.neuron_module_tmp!r}.")
        if not isinstance(self.target_leading_space, bool):
            raise ConfigError(f"target_leading_space must be a bool, got {self.target_leading_space!r}.")
        for name in ("original_scale", "target_scale"):
            if not _finite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)!r}.")

    def default_layers(self, model: nn.Module) -> tuple[int, ...]:
        """Every decoder layer, as the reference attributes (and may edit) all of them."""
        return tuple(range(num_layers(unwrap_model(model))))

    def selection(self) -> dict[str, float | None]:
        """The coarse-selection keyword arguments of :func:`~hf_edit.attribution.coarse_neurons`: exactly one of
        ``threshold``, ``percentile`` and ``adaptive_threshold``."""
        if self.threshold is not None:
            return {"threshold": float(self.threshold)}
        if self.percentile is not None:
            return {"percentile": float(self.percentile)}
        return {"adaptive_threshold": float(self.adaptive_threshold)}

    @classmethod
    def eleutherai(cls, prompt_variants: tuple[str, ...] | list[str] = (), **overrides: Any) -> KNConfig:
        """Dai et al.'s procedure with EleutherAI's defaults: the request's prompt and ``prompt_variants`` (and the
        request's ``paraphrase_prompts`` metadata, if any) attributed with 20 steps in batches of 10, coarse
        threshold 0.3 × max, and only neurons found for more than half of the prompts kept (``p=0.5``,
        ``refine=True``).  The edit itself is the reference's.  ``overrides`` replace any field."""
        values: dict[str, Any] = dict(steps=20, batch_size=10, adaptive_threshold=0.3, p=0.5, refine=True,
                                      prompt_variants=tuple(prompt_variants), paraphrase_key="paraphrase_prompts")
        values.update(overrides)
        return cls(**values)


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
