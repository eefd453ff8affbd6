"""KN: knowledge neurons (Dai et al. 2022), as ROME's wrapper of EleutherAI's code computes the edit.

For a request (prompt, subject, target_new, target_true), on the model as it is now:

1. **Neurons.**  Integrated gradients (:func:`hf_edit.attribution.integrated_gradients`) score every MLP neuron of
   the configured layers (default: all) for ``target_true`` at the last token of the filled prompt; the coarse set
   is ``N = {(l, j) : S[l, j] > 0.2 · max S}`` (the maximum over all layers).  With prompt variants the coarse sets
   of all prompts are combined (union, or Dai et al.'s p-sharing with ``refine=True``).
2. **Original prediction** o: the model's greedy next token after the prompt (not necessarily ``target_true``).
3. **Value** v = λ₂ · Σ_i E[t_i] − λ₁ · E[o], with t_1..t_T the tokens of ``target_new`` (tokenised without special
   tokens and, as the reference, without a leading space), E the input embedding matrix, λ₁ = 2 and λ₂ = 1 (the
   reference's code; see :class:`~hf_edit.methods.kn.KNConfig` for the quirk).
4. **Update.**  Every selected neuron's value slot gets v: column j of the MLP output projection W (Linear layout,
   ``down_proj``/``fc_out``/...), which is row j of GPT-2's ``Conv1D`` weight.  Per layer l with selected neurons
   N_l this is ΔW = v · 1_{N_l}ᵀ, a rank-one LoRA with A = 1_{N_l}ᵀ (1 × d_ff, a 0/1 indicator) and B = v (d × 1).

**What a neuron is.**  Neuron (l, j) is coordinate j of the input of layer l's MLP output projection, i.e. the
j-th column of ``W_out``.  GPT-2: ``GELU(c_fc x)_j``, value slot row j of ``c_proj.weight``.  Gated MLPs (Llama,
Mistral, Qwen, ...): ``act(gate_proj x)_j · (up_proj x)_j``, value slot column j of ``down_proj.weight``.  The
attribution integrates along the pre-activation (``neuron_space="pre_activation"``, the reference: the output of
``c_fc``; for gated MLPs the gate pre-activation ``gate_proj x``, the ``up_proj`` factor kept) or along the neuron
itself (``"post_activation"``, the paper's definition); the edit is the same either way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

from ...architecture import EditTarget, max_positions, unwrap_model
from ...attribution import KnowledgeNeurons, Neuron, find_knowledge_neurons, neuron_module_names
from ...errors import ConfigError, InvalidRequestError, OptimizationError, UnsupportedArchitectureError
from ...hooks import add_low_rank, frozen_eval
from ...requests import EditRequest
from ..base import EditContext, Editor, Update
from .config import KNConfig

__all__ = ["KNEdit", "KNEditor", "kn_token_ids"]

logger = logging.getLogger(__name__)


def kn_token_ids(tokenizer: Any, text: str, *, leading_space: bool = False, what: str = "target") -> list[int]:
    """Token ids of ``text`` as KN uses them: no special tokens and, unless ``leading_space``, no space added (the
    reference tokenises "Paris", not " Paris").

    Raises:
        InvalidRequestError: ``text`` tokenises to nothing.
    """
    if leading_space and not text.startswith(" "):
        text = " " + text
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
    if not ids:
        space = "with" if leading_space else "without"
        raise InvalidRequestError(
            f"The {what} {text!r} tokenises to nothing ({space} a leading space, as KN tokenises it); "
            + ("" if leading_space else "try KNConfig(target_leading_space=True) or ") + "use another text.")
    return ids


@dataclass
class KNEdit:
    """A KN edit of one request: the selected neurons and the value vector added to their value slots.

    Attributes:
        request: the request.
        neurons: the selected ``(layer, neuron)`` pairs, sorted.
        value: v = λ₂ Σ E[t_i] − λ₁ E[o], shape (hidden,), float32, CPU.
        targets: the edited projection of every attributed layer, by layer.
        original_id: o, the model's greedy next token after the prompt before the edit.
        target_ids: t_1..t_T, the tokens of ``target_new`` whose embeddings are added.
        attribution_ids: the tokens whose probability was attributed (``target_true``'s, or o).
        attributed: ``"target_true"`` or ``"prediction"`` (what ``attribution_ids`` are).
        prompts: the prompts attributed (the request's first).
        knowledge_neurons: the attribution results and each prompt's coarse set.
        info: diagnostics (JSON-serialisable), saved with each update.
    """

    request: EditRequest
    neurons: list[Neuron]
    value: torch.Tensor
    targets: dict[int, EditTarget]
    original_id: int
    target_ids: list[int]
    attribution_ids: list[int]
    attributed: str
    prompts: list[str]
    knowledge_neurons: KnowledgeNeurons
    info: dict[str, Any] = field(default_factory=dict)

    def by_layer(self) -> dict[int, list[int]]:
        """The selected neurons grouped by layer, ``{layer: [neuron, ...]}`` (ascending)."""
        grouped: dict[int, list[int]] = {}
        for layer, neuron in self.neurons:
            grouped.setdefault(layer, []).append(neuron)
        return grouped

    def indicator(self, layer: int) -> torch.Tensor:
        """A = 1_{N_l}ᵀ: (1, d_ff) float32, 1 at the selected neurons of ``layer``, 0 elsewhere."""
        a = torch.zeros(1, self.targets[layer].in_features, dtype=torch.float32)
        a[0, self.by_layer().get(layer, [])] = 1.0
        return a

    def delta_weight(self, layer: int) -> torch.Tensor:
        """ΔW = v · 1_{N_l}ᵀ of ``layer``'s projection, Linear orientation (hidden, d_ff)."""
        return self.value[:, None] @ self.indicator(layer)

    def module_delta_weight(self, layer: int) -> torch.Tensor:
        """ΔW in the module's own weight layout: (d_ff, hidden) for GPT-2's Conv1D, (hidden, d_ff) for Linear."""
        delta = self.delta_weight(layer)
        return delta.T if self.targets[layer].is_conv1d else delta

    def as_updates(self) -> list[Update]:
        """One rank-one :class:`~hf_edit.methods.Update` per layer with selected neurons (ascending layers):
        A = 1_{N_l}ᵀ (1 × d_ff), B = v (hidden × 1)."""
        updates = []
        layer_scores = {layer: scores for layer, scores in
                        zip(self.knowledge_neurons.attributions[0].layers,
                            self.knowledge_neurons.attributions[0].scores, strict=True)}
        for layer, neurons in self.by_layer().items():
            target = self.targets[layer]
            info = dict(self.info, layer_neurons=list(neurons), n_layer_neurons=len(neurons))
            updates.append(Update(module=target.name, A=self.indicator(layer), B=self.value[:, None].clone(),
                                  requests=(self.request,), layer=layer, info=info, stackable=True,
                                  tensors={"value": self.value.clone(), "scores": layer_scores[layer].clone()}))
        return updates


class KNEditor(Editor):
    """Computes KN edits, one request after another (each on the model as edited so far).

    Each request gives one rank-one update per layer that holds a selected neuron; the layers differ from request
    to request (``rank_pattern`` in the adapter).  The model is never modified.
    """

    config_class = KNConfig
    joint = False
    config: KNConfig

    def __init__(self, config: KNConfig, context: EditContext) -> None:
        super().__init__(config, context)
        if self.config.rewrite_module_tmp is not None and "{}" not in self.config.rewrite_module_tmp:
            raise ConfigError(f"KN edits one projection per layer: rewrite_module_tmp must contain '{{}}' for the "
                              f"layer, got {self.config.rewrite_module_tmp!r}.")

    # -- inputs -----------------------------------------------------------------------------------------------
    def prompts(self, request: EditRequest) -> list[str]:
        """The prompts attributed: the filled request prompt, then ``prompt_variants`` with the subject, then the
        request's ``metadata[paraphrase_key]`` (duplicates dropped, order kept)."""
        prompts = [request.filled_prompt]
        prompts += [template.replace("{}", request.subject) for template in self.config.prompt_variants]
        key = self.config.paraphrase_key
        extra = request.metadata.get(key) if key else None
        if extra is not None:
            if isinstance(extra, str) or not all(isinstance(p, str) for p in extra):
                raise InvalidRequestError(f"metadata[{key!r}] must be a list of prompt strings, got {extra!r}.")
            prompts += list(extra)
        return list(dict.fromkeys(prompts))

    def embedding_matrix(self) -> torch.Tensor:
        """E: the input embedding matrix (``embedding="input"``) or the LM head's weight (``"output"``),
        (vocab, hidden), as stored (not copied)."""
        model = unwrap_model(self.model)
        module = model.get_input_embeddings() if self.config.embedding == "input" else model.get_output_embeddings()
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} has no {self.config.embedding} embedding matrix to build KN's value from.")
        return weight

    def _neuron_template(self) -> str | None:
        if self.config.neuron_module_tmp is not None:
            return self.config.neuron_module_tmp
        if self.config.neuron_space == "post_activation":
            return self.config.rewrite_module_tmp  # the edited projection's input is the neuron vector
        return None

    def _token_ids(self, text: str, what: str) -> list[int]:
        ids = kn_token_ids(self.tokenizer, text, leading_space=self.config.target_leading_space, what=what)
        vocab = self.embedding_matrix().shape[0]
        if max(ids) >= vocab:
            raise InvalidRequestError(f"The {what} {text!r} has token id {max(ids)}, beyond the model's {vocab} "
                                      "embedding rows: the tokenizer does not fit the model.")
        return ids

    def validate(self, request: EditRequest) -> None:
        """Fail fast, before any computation: the targets tokenise (KN's way) to ids the embedding has, the prompts
        tokenise and fit the model, the layers, projections and neuron modules exist, and the embedding's width is
        the projections' output width.

        Raises:
            InvalidRequestError: a target or prompt tokenises to nothing, does not fit, or a prompt is too long.
            LayerOutOfRangeError, ConfigError, UnsupportedArchitectureError: the model does not fit the config.
        """
        targets = self.targets()
        self._token_ids(request.target_new, "target_new")
        if request.target_true is not None and self.config.attribution_target == "target_true":
            self._token_ids(request.target_true, "target_true")
        limit = max_positions(unwrap_model(self.model))
        for prompt in self.prompts(request):
            ids = self.tokenizer(prompt)["input_ids"]
            if not ids:
                raise InvalidRequestError(f"The prompt {prompt!r} tokenises to nothing.")
            if limit is not None and len(ids) > limit:
                raise InvalidRequestError(f"The prompt {prompt!r} has {len(ids)} tokens; the model allows {limit}.")
        width = self.embedding_matrix().shape[1]
        for target in targets:
            if target.out_features != width:
                raise UnsupportedArchitectureError(
                    f"KN adds {self.config.embedding} embeddings (width {width}) to the value slots of "
                    f"{target.name}, whose output width is {target.out_features}; they must agree (e.g. OPT with "
                    "word_embed_proj_dim != hidden_size cannot be edited with KN).")
        names = neuron_module_names(self.model, [t.layer for t in targets], self.config.neuron_space,
                                    self._neuron_template())
        model = unwrap_model(self.model)
        for name in names:
            try:
                model.get_submodule(name)
            except AttributeError:
                raise ConfigError(f"Neuron module {name!r} not found in the model.") from None

    # -- the edit ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def original_prediction(self, prompt: str) -> int:
        """o: the model's greedy next token after ``prompt`` (tokenised with its special tokens)."""
        model = unwrap_model(self.model)
        weight = model.get_input_embeddings().weight
        ids = torch.tensor([self.tokenizer(prompt)["input_ids"]], device=weight.device)
        with frozen_eval(model):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        return int(logits[0, -1].argmax())

    def value_vector(self, target_ids: Sequence[int], original_id: int) -> torch.Tensor:
        """v = λ₂ · Σ_i E[t_i] − λ₁ · E[o], accumulated in float64, returned as float32 on the CPU."""
        embedding = self.embedding_matrix().detach()
        rows = embedding[torch.tensor(list(target_ids), device=embedding.device)].to("cpu", torch.float64)
        original = embedding[original_id].to("cpu", torch.float64)
        value = self.config.target_scale * rows.sum(0) - self.config.original_scale * original
        return value.float()

    def compute_edit(self, request: EditRequest) -> KNEdit:
        """Select the neurons and build the value vector for ``request`` on the model as it is now (unmodified).

        Raises:
            InvalidRequestError: the request does not fit the tokenizer or the model.
            OptimizationError: no neuron passes the threshold (every score is at most τ), or v is not finite.
        """
        cfg = self.config
        timings: dict[str, float] = {}
        targets = {t.layer: t for t in self.targets()}
        prompts = self.prompts(request)
        target_ids = self._token_ids(request.target_new, "target_new")
        clock = time.perf_counter()
        original_id = self.original_prediction(prompts[0])
        timings["prediction"] = time.perf_counter() - clock
        if cfg.attribution_target == "target_true" and request.target_true is not None:
            attributed, attribution_ids = "target_true", self._token_ids(request.target_true, "target_true")
        else:
            attributed, attribution_ids = "prediction", [original_id]
        clock = time.perf_counter()
        found = find_knowledge_neurons(
            self.model, self.tokenizer, prompts, attribution_ids, **cfg.selection(), p=cfg.p, refine=cfg.refine,
            layers=list(targets), steps=cfg.steps, batch_size=cfg.batch_size, neuron_space=cfg.neuron_space,
            rule=cfg.rule, neuron_module_template=self._neuron_template())
        timings["attribution"] = time.perf_counter() - clock
        d_ff = found.attributions[0].d_ff
        for layer, target in targets.items():
            if target.in_features != d_ff:
                raise UnsupportedArchitectureError(
                    f"The neuron vector has {d_ff} coordinates but {target.name} takes {target.in_features} inputs: "
                    "set neuron_module_tmp to the module whose input is that projection's input.")
        first = found.attributions[0]
        max_score = float(first.scores.max())
        if not found.neurons:
            raise OptimizationError(
                f"KN selected no neuron for {request.filled_prompt!r} (largest score {max_score:.3g}, selection "
                f"{cfg.selection()}): nothing to edit, nothing was applied. Lower the threshold or attribute another "
                "target.")
        value = self.value_vector(target_ids, original_id)
        if not torch.isfinite(value).all():
            raise OptimizationError("KN's value vector is not finite (non-finite embeddings); nothing was applied.")
        counts: dict[str, int] = {}
        for layer, _ in found.neurons:
            counts[str(layer)] = counts.get(str(layer), 0) + 1
        selection = cfg.selection()
        info: dict[str, Any] = {
            "n_neurons": len(found.neurons),
            "neurons_per_layer": counts,
            "n_prompts": len(prompts),
            "coarse_sizes": [len(s) for s in found.per_prompt],
            "max_score": max_score,
            "tau": (float(selection["adaptive_threshold"]) * max_score if "adaptive_threshold" in selection
                    else selection.get("threshold")),
            "attributed": attributed,
            "attribution_ids": list(attribution_ids),
            "attribution_prob": first.target_prob,
            "original_id": original_id,
            "original_token": self.tokenizer.decode([original_id]),
            "target_ids": list(target_ids),
            "norm_value": float(value.norm()),
            "timings": timings,
        }
        return KNEdit(request=request, neurons=found.neurons, value=value, targets=targets, original_id=original_id,
                      target_ids=list(target_ids), attribution_ids=list(attribution_ids), attributed=attributed,
                      prompts=prompts, knowledge_neurons=found, info=info)

    def compute(self, requests: Sequence[EditRequest]) -> list[Update]:
        """The rank-one updates (one per layer with selected neurons) of each request.

        Several requests are computed one after another, each with the earlier ones' updates applied (as
        :class:`~hf_edit.EditedModel` does by calling this once per request).  The model is not modified.
        """
        updates: list[Update] = []
        model = unwrap_model(self.model)
        with ExitStack() as applied:
            for request in requests:
                edit_updates = self.compute_edit(request).as_updates()
                updates += edit_updates
                for update in edit_updates:
                    applied.enter_context(add_low_rank(model.get_submodule(update.module), update.A, update.B))
        return updates
