"""Edits as plain PEFT LoRA adapters.

Every edit is a low-rank (or full-rank) factorisation ΔW = B A of one module's weight, in the ``nn.Linear``
orientation (``A``: rank × in_features, ``B``: out_features × rank):

* a ROME edit is rank one: A = u (key direction), B = rv (value column), r = alpha = 1;
* k edits of one module stack into rank k: A = [u_1; …; u_k], B = [rv_1 … rv_k];
* a dense delta (FT/FT+L) is full rank: B = identity, A = ΔW, with ``lora_bias`` carrying Δb.

Scaling is always alpha / r = 1 (``rank_pattern`` and ``alpha_pattern`` keep it so when modules differ in rank), and
``fan_in_fan_out`` is set for GPT-2's Conv1D, so the adapter loads with plain ``peft`` and merges exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from .architecture import unwrap_model

__all__ = ["LoraFactors", "ADAPTER_NAME", "lora_config", "attach_adapters", "read_adapter_factors", "quiet_peft"]

#: The first adapter is PEFT's default one, which ``save_pretrained`` writes at the folder's root.
ADAPTER_NAME = "default"

_HARMLESS_WARNINGS = (
    ".*is_gradient_checkpointing.*",  # transformers FutureWarning on every get_peft_model
    ".*have invalid shape.*",  # peft false positive for the 1-D lora_B.bias of dense deltas
    ".*fan_in_fan_out.*",  # peft corrects fan_in_fan_out per module when Conv1D and Linear targets mix
)


@contextmanager
def quiet_peft() -> Iterator[None]:
    """Silence the known harmless warnings of peft/transformers, and nothing else."""
    with warnings.catch_warnings():
        for pattern in _HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        yield


@dataclass
class LoraFactors:
    """ΔW = B @ A (Linear orientation) of one module, plus an optional bias delta.

    Attributes:
        A: (rank, in_features).
        B: (out_features, rank).
        bias: (out_features,) or ``None``.
    """

    A: torch.Tensor
    B: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta_weight(self) -> torch.Tensor:
        """ΔW = B @ A in float32 (Linear orientation; a stack of parts gives the sum of their deltas)."""
        return self.B.float() @ self.A.float()

    @staticmethod
    def concat(parts: list[LoraFactors]) -> LoraFactors:
        """Stack several factorisations of one module into one of summed rank."""
        biases = [p.bias for p in parts if p.bias is not None]
        bias = torch.stack(biases).sum(0) if len(biases) > 1 else (biases[0] if biases else None)
        return LoraFactors(A=torch.cat([p.A for p in parts], 0), B=torch.cat([p.B for p in parts], 1), bias=bias)

    def split(self, ranks: list[int]) -> list[LoraFactors]:
        """Inverse of :meth:`concat`; a bias can only be attributed when there is a single part."""
        if len(ranks) == 1:
            return [self]
        if self.bias is not None and bool(self.bias.any()):
            raise ValueError("Cannot split factors with a bias delta into several parts.")
        out, start = [], 0
        for r in ranks:
            out.append(LoraFactors(A=self.A[start:start + r], B=self.B[:, start:start + r]))
            start += r
        return out


def lora_config(factors: Mapping[str, LoraFactors], conv1d: Mapping[str, bool], *,
                base_model_name_or_path: str | None = None, revision: str | None = None) -> LoraConfig:
    """A LoRA config with scaling 1 on exactly the modules of ``factors``."""
    names = list(factors)
    ranks = {name: f.rank for name, f in factors.items()}
    first = ranks[names[0]]
    patterns = {name: r for name, r in ranks.items()} if len(names) > 1 else {}
    return LoraConfig(
        target_modules=names, r=first, lora_alpha=first, rank_pattern=patterns, alpha_pattern=dict(patterns),
        lora_dropout=0.0, bias="none", use_rslora=False, init_lora_weights=False,
        fan_in_fan_out=conv1d[names[0]], lora_bias=any(f.bias is not None for f in factors.values()),
        inference_mode=True, task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path,
        revision=revision)


def _lora_layer(peft_model: PeftModel, name: str) -> nn.Module:
    return unwrap_model(peft_model).get_submodule(name)


@torch.no_grad()
def _write_factors(peft_model: PeftModel, adapter_name: str, factors: Mapping[str, LoraFactors]) -> None:
    for name, f in factors.items():
        layer = _lora_layer(peft_model, name)
        a, b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        a.weight.copy_(f.A)
        b.weight.copy_(f.B)
        if b.bias is not None:
            b.bias.copy_(f.bias if f.bias is not None else torch.zeros_like(b.bias))


def attach_adapters(model: nn.Module, adapters: list[tuple[str, Mapping[str, LoraFactors]]],
                    conv1d: Mapping[str, bool], *, base_model_name_or_path: str | None = None,
                    revision: str | None = None) -> PeftModel:
    """Wrap ``model`` in a ``PeftModel`` holding the named adapters, in order, all active at once.

    The first adapter must be named :data:`ADAPTER_NAME`.
    """
    peft_model = None
    with quiet_peft():
        for name, factors in adapters:
            config = lora_config(factors, conv1d, base_model_name_or_path=base_model_name_or_path,
                                 revision=revision)
            if peft_model is None:
                peft_model = get_peft_model(model, config, adapter_name=name)
            else:
                peft_model.add_adapter(name, config)
            _write_factors(peft_model, name, factors)
    # PeftModel.set_adapter takes one name; the tuner activates several (their deltas add up).
    peft_model.base_model.set_adapter([name for name, _ in adapters])
    return peft_model.eval()


@torch.no_grad()
def read_adapter_factors(peft_model: PeftModel, adapter_name: str = ADAPTER_NAME) -> dict[str, LoraFactors]:
    """The factors of every module of ``adapter_name`` (float32 copies on the CPU)."""
    prefix = "base_model.model."
    config = peft_model.peft_config[adapter_name]
    out = {}
    for full_name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and adapter_name in module.lora_A:
            name = full_name[len(prefix):] if full_name.startswith(prefix) else full_name
            b = module.lora_B[adapter_name]
            bias = b.bias.detach().float().cpu().clone() if getattr(config, "lora_bias", False) else None
            out[name] = LoraFactors(A=module.lora_A[adapter_name].weight.detach().float().cpu().clone(),
                                    B=b.weight.detach().float().cpu().clone(), bias=bias)
    return out
