"""Forward hooks and model-state helpers for edits.

They read a module's input/output, add a vector at token positions, stop a forward pass early, let the LM head see
only some positions, replay layers whose output cannot change, and freeze the model for the duration of an edit.

Every hook is a context manager that removes itself on exit, so an exception never leaves a hook behind.  Hooks
follow the module's device and dtype; nothing here assumes a particular device.  Some architectures (OPT) flatten
the projection's input to ``(batch * seq, width)``; :func:`as_batch_seq` restores the ``(batch, seq, width)`` view
from the input ids' shape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Captured", "StopForward", "forward_hook", "cache_argument", "kv_cache_arguments", "capture", "add_at_positions", "add_low_rank", "as_batch_seq", "run_until", "only_positions",
           "replay_outputs", "eval_mode", "frozen_eval"]


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once the module of interest has run."""


def as_batch_seq(x: torch.Tensor, batch_shape: tuple[int, int]) -> torch.Tensor:
    """View a module activation as ``(batch, seq, width)`` (undoes OPT's flattening)."""
    return x if x.dim() == 3 else x.reshape(*batch_shape, x.shape[-1])


def cache_argument(model: nn.Module) -> str | None:
    """The name of the model's key/value cache argument: ``cache`` (transformers 5 renamed ``past_key_values``;
    the old name is removed in 5.40), ``past_key_values`` in older 5.x releases, or ``None`` when it takes none."""
    import inspect

    from .architecture import unwrap_model

    parameters = inspect.signature(unwrap_model(model).forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def kv_cache_arguments(model: nn.Module, output: Any) -> dict[str, Any]:
    """The keyword arguments that pass ``output``'s key/value cache to the next forward call of ``model``."""
    name = cache_argument(model) or "past_key_values"
    return {name: output[name]}


@contextmanager
def forward_hook(module: nn.Module, hook: Callable[..., Any], *, pre: bool = False) -> Iterator[None]:
    """Register ``hook`` as a forward hook (or forward pre-hook) of ``module`` for the duration of the block."""
    handle = module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class Captured:
    """Input and output of the last call of a module, as ``(batch, seq, width)`` tensors."""

    batch_shape: tuple[int, int]
    inputs: torch.Tensor | None = None
    outputs: torch.Tensor | None = None
    calls: int = field(default=0)


@contextmanager
def capture(module: nn.Module, batch_shape: tuple[int, int], *, detach: bool = True,
            stop: bool = False) -> Iterator[Captured]:
    """Record the module's input and output during the forward passes run inside the block.

    Args:
        module: the module to observe.
        batch_shape: ``(batch, seq)`` of the input ids, used to un-flatten activations.
        detach: store detached tensors (no autograd graph kept alive).
        stop: raise :class:`StopForward` right after the module ran (use with :func:`run_until`).
    """
    record = Captured(batch_shape)

    def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        inp, out = args[0], output
        if detach:
            inp, out = inp.detach(), out.detach()
        record.inputs, record.outputs = as_batch_seq(inp, batch_shape), as_batch_seq(out, batch_shape)
        record.calls += 1
        if stop:
            raise StopForward

    with forward_hook(module, hook):
        yield record


@contextmanager
def add_at_positions(module: nn.Module, delta: torch.Tensor, positions: torch.Tensor,
                     batch_shape: tuple[int, int], rows: torch.Tensor | None = None) -> Iterator[None]:
    """Add ``delta`` to the module's output at ``(row, positions[row])`` for every row of the batch, or with
    ``rows`` at ``(rows[i], positions[i])`` (``delta[i]`` each; the pairs must be distinct).

    The addition is out of place, so autograd reaches ``delta``; ``delta`` is cast to the output's dtype.
    """
    rows = torch.arange(len(positions)) if rows is None else rows

    def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        out = as_batch_seq(output, batch_shape)
        update = torch.zeros_like(out)
        update[rows, positions.to(rows.device)] = delta.to(device=out.device, dtype=out.dtype)
        return (out + update).reshape(output.shape)

    with forward_hook(module, hook):
        yield


@contextmanager
def add_low_rank(module: nn.Module, A: torch.Tensor, B: torch.Tensor) -> Iterator[None]:
    """Add ``B A x`` to the module's output inside the block, as a LoRA adapter of scaling 1 would.

    ``A`` is (rank, in_features) and ``B`` (out_features, rank), in the Linear orientation; the product is
    computed in float32 and added in the output's dtype.  Used to try an update before it becomes an adapter.
    """

    def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0].float()
        low_rank = (x @ A.to(device=x.device, dtype=torch.float32).T) @ B.to(device=x.device,
                                                                              dtype=torch.float32).T
        return (output.float() + low_rank).to(output.dtype)

    with forward_hook(module, hook):
        yield


@contextmanager
def only_positions(head: nn.Module, rows: torch.Tensor, positions: torch.Tensor) -> Iterator[None]:
    """Make the LM head see only the hidden states at ``(rows[i], positions[i])``.

    The model's logits then have shape ``(1, len(rows), vocab)``, in the order given: the vocabulary projection,
    the most expensive part of a small model's forward and backward pass, runs only where a loss is computed.
    Element-wise post-processing of logits (e.g. soft-capping) is unaffected.
    """

    def pre_hook(_module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        return (hidden[rows.to(hidden.device), positions.to(hidden.device)][None], *args[1:])

    with forward_hook(head, pre_hook, pre=True):
        yield


@contextmanager
def replay_outputs(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Run each module once inside the block, then return its recorded output instead of recomputing it.

    Valid only while the modules' inputs and weights do not change, e.g. the decoder layers below the edited one
    during ROME's v* optimisation (δ enters above them, and the same batch is run at every step).  Works with any
    wrapper already installed on ``forward`` (the first call goes through it).
    """
    patched = []

    def replaying(forward):
        recorded = []

        def forward_once(*args, **kwargs):
            if not recorded:
                recorded.append(forward(*args, **kwargs))
            return recorded[0]

        return forward_once

    try:
        for module in modules:
            had_own = "forward" in module.__dict__
            patched.append((module, had_own, module.__dict__.get("forward")))
            module.forward = replaying(module.forward)
        yield
    finally:
        for module, had_own, own in patched:
            if had_own:
                module.forward = own
            else:
                del module.forward


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block (dropout off); every submodule's training flag restored afterwards."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


@contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration, restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with eval_mode(model):
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def run_until(model: nn.Module, **inputs: torch.Tensor) -> None:
    """Run ``model(**inputs)`` and swallow the :class:`StopForward` raised by a ``capture(stop=True)`` hook."""
    try:
        model(**inputs)
    except StopForward:
        pass
