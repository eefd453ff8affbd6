"""The weight matrices an editor network edits, their rank-one gradient factors, and the edited forward pass.

For a module y = W x (+ b) and a loss L, the weight gradient is a sum of one outer product per token,

    ∇W = Σ_t δ_t u_tᵀ,   u_t = the module's input at token t,   δ_t = ∂L/∂y_t,

in the ``nn.Linear`` orientation (out × in), whatever the module's storage layout.  MEND and KE read the
pairs (u_t, δ_t) instead of the dense gradient (methods spec §3.2, §2.6): :func:`gradient_factors` captures them
with one forward and one backward pass, keeping the rows where both u_t and δ_t are nonzero (padding and the
last position of each sequence drop out).  An edit ΔW = B A is then applied without touching the weights with
:func:`low_rank_deltas` (y ← y + B A x), which keeps the autograd path to A and B for training.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..architecture import _projection_shape, base_layer, find_layout, num_layers, resolve_target, unwrap_model
from ..errors import ConfigError, InvalidRequestError, LayerOutOfRangeError
from ..hooks import add_low_rank, forward_hook
from ..requests import EditRequest
from ..tokens import pad_token_id, target_ids

__all__ = ["EditedMatrix", "GradientFactors", "TokenBatch", "find_edited_matrices", "default_editor_layers",
           "encode_edits", "encode_texts", "gradient_factors", "low_rank_deltas", "target_nll", "locality_kl",
           "model_max_length", "DEFAULT_N_LAST_LAYERS"]

#: The reference edits the MLP matrices of the last three blocks (GPT-2 XL 45-47, GPT-J 25-27).
DEFAULT_N_LAST_LAYERS = 3


@dataclass(frozen=True)
class EditedMatrix:
    """One weight matrix an editor network edits.

    Attributes:
        name: full module path inside the transformers model (e.g. ``"transformer.h.5.mlp.c_fc"``).
        layer: its decoder layer.
        in_features, out_features: the Linear-orientation shape is (out_features, in_features).
        is_conv1d: GPT-2's ``Conv1D`` (weight stored as (in, out)).
    """

    name: str
    layer: int
    in_features: int
    out_features: int
    is_conv1d: bool

    @property
    def shape_key(self) -> str:
        """``"<in>x<out>"``: matrices of one shape share a MEND gradient transform."""
        return f"{self.in_features}x{self.out_features}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EditedMatrix:
        return cls(name=str(values["name"]), layer=int(values["layer"]), in_features=int(values["in_features"]),
                   out_features=int(values["out_features"]), is_conv1d=bool(values["is_conv1d"]))


def default_editor_layers(model: nn.Module) -> tuple[int, ...]:
    """The last :data:`DEFAULT_N_LAST_LAYERS` decoder layers (0-based), as the reference edits."""
    n = num_layers(unwrap_model(model))
    return tuple(range(max(0, n - DEFAULT_N_LAST_LAYERS), n))


def _normalise_layer(layer: int, n: int) -> int:
    if not -n <= layer < n:
        raise LayerOutOfRangeError(f"Layer {layer} is out of range: the model has {n} layers (0..{n - 1}).")
    return layer + n if layer < 0 else layer


def _layer_of(model: nn.Module, name: str) -> int:
    prefix = find_layout(model).layers + "."
    if name.startswith(prefix):
        head = name[len(prefix):].split(".", 1)[0]
        if head.isdigit():
            return int(head)
    raise ConfigError(f"Module {name!r} is not inside a decoder layer ({prefix}<i>.…).")


def find_edited_matrices(model: nn.Module, layers: Sequence[int] | None = None,
                         modules: Sequence[str] | None = None) -> list[EditedMatrix]:
    """The MLP matrices of ``layers`` (default: the last three), or the modules named in ``modules``.

    Per layer: the MLP output projection that architecture discovery finds (``c_proj``, ``down_proj``, ``fc2``,
    ``dense_4h_to_h``, ...) and every ``nn.Linear``/``Conv1D`` beside it (same parent module) whose output width
    is the projection's input width, i.e. the input projections of the MLP (``c_fc``; ``gate_proj`` and
    ``up_proj``; ``fc1``; ``dense_h_to_4h``).  They are listed in layer order, and in module registration order
    within a layer (for GPT-2: ``c_fc``, ``c_proj``).

    Raises:
        LayerOutOfRangeError: a layer does not exist.
        ConfigError: a named module does not exist, is not a Linear/Conv1D or is not inside a decoder layer.
        UnsupportedArchitectureError: the MLP cannot be found.
    """
    inner = unwrap_model(model)
    if modules:
        found = []
        for name in dict.fromkeys(modules):
            target = resolve_target(inner, None, name)
            found.append(EditedMatrix(name=target.name, layer=_layer_of(inner, target.name),
                                      in_features=target.in_features, out_features=target.out_features,
                                      is_conv1d=target.is_conv1d))
        return sorted(found, key=lambda m: m.layer)
    n = num_layers(inner)
    chosen = default_editor_layers(inner) if layers is None else tuple(layers)
    if not chosen:
        raise ConfigError("No layers to edit were given.")
    out: list[EditedMatrix] = []
    for layer in sorted(dict.fromkeys(_normalise_layer(int(x), n) for x in chosen)):
        projection = resolve_target(inner, layer)
        parent_name = projection.name.rsplit(".", 1)[0]
        parent = inner.get_submodule(parent_name)
        for child_name, child in parent.named_children():
            shape = _projection_shape(child)
            full = f"{parent_name}.{child_name}"
            if shape is None:
                continue
            if full == projection.name or shape[1] == projection.in_features:
                out.append(EditedMatrix(name=full, layer=layer, in_features=shape[0], out_features=shape[1],
                                        is_conv1d=type(base_layer(child)).__name__ == "Conv1D"))
    return out


def model_max_length(model: nn.Module) -> int | None:
    """The longest sequence the model's positions allow, if its config states one."""
    from ..architecture import max_positions

    return max_positions(model)


# -- token batches ---------------------------------------------------------------------------------------------
@dataclass
class TokenBatch:
    """A right-padded batch with the positions whose tokens are scored.

    Attributes:
        input_ids, attention_mask: (batch, seq).
        label_mask: (batch, seq) bool; ``True`` at positions whose token is predicted from the previous position
            and enters the loss (the target tokens of an edit; every token but the first of a locality text).
        rows: (batch,) the example each row belongs to (for per-example losses).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    label_mask: torch.Tensor
    rows: torch.Tensor

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.label_mask.to(device),
                          self.rows.to(device))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]

    @staticmethod
    def concat(batches: Sequence[TokenBatch], pad_id: int) -> TokenBatch:
        """Stack batches row-wise (right-padded to the longest); row ids are offset to stay distinct."""
        width = max(b.input_ids.shape[1] for b in batches)
        ids, mask, labels, rows, offset = [], [], [], [], 0
        for b in batches:
            extra = width - b.input_ids.shape[1]
            ids.append(nn.functional.pad(b.input_ids, (0, extra), value=pad_id))
            mask.append(nn.functional.pad(b.attention_mask, (0, extra), value=0))
            labels.append(nn.functional.pad(b.label_mask, (0, extra), value=False))
            rows.append(b.rows + offset)
            offset += int(b.rows.max()) + 1 if len(b.rows) else 0
        return TokenBatch(torch.cat(ids), torch.cat(mask), torch.cat(labels), torch.cat(rows))


def _pad(rows: Sequence[Sequence[int]], labels: Sequence[Sequence[bool]], pad_id: int) -> TokenBatch:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    label_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, lab) in enumerate(zip(rows, labels, strict=True)):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
        label_mask[i, :len(row)] = torch.tensor(lab, dtype=torch.bool)
    return TokenBatch(ids, mask, label_mask, torch.arange(len(rows)))


def encode_edits(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], targets: Sequence[str], *,
                 max_length: int | None = None) -> TokenBatch:
    """``prompt + " " + target`` rows (ids concatenated: the prompt as the tokenizer encodes it, special tokens
    included; the target with a leading space and no special tokens), labelled on the target tokens.

    A row longer than ``max_length`` loses tokens from the start of its prompt.

    Raises:
        InvalidRequestError: a target tokenises to nothing, or a row cannot fit ``max_length``.
    """
    rows, labels = [], []
    for prompt, target in zip(prompts, targets, strict=True):
        prompt_ids = list(tokenizer(prompt)["input_ids"])
        target_tokens = target_ids(tokenizer, target)
        if max_length is not None and len(prompt_ids) + len(target_tokens) > max_length:
            keep = max_length - len(target_tokens)
            if keep < 1:
                raise InvalidRequestError(f"The target {target!r} ({len(target_tokens)} tokens) does not fit the "
                                          f"model's {max_length} positions.")
            prompt_ids = prompt_ids[len(prompt_ids) - keep:]
        rows.append(prompt_ids + target_tokens)
        labels.append([False] * len(prompt_ids) + [True] * len(target_tokens))
    return _pad(rows, labels, pad_token_id(tokenizer))


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], *, max_length: int) -> TokenBatch:
    """Plain texts (truncated to ``max_length`` tokens), every token after the first scored."""
    rows, labels = [], []
    for text in texts:
        ids = list(tokenizer(text)["input_ids"])[:max_length]
        if len(ids) < 2:
            ids = (ids + [pad_token_id(tokenizer)] * 2)[:2]
        rows.append(ids)
        labels.append([False] + [True] * (len(ids) - 1))
    return _pad(rows, labels, pad_token_id(tokenizer))


def requests_batch(tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
                   max_length: int | None = None) -> TokenBatch:
    """The edit rows of ``requests`` (filled prompt + target), see :func:`encode_edits`."""
    return encode_edits(tokenizer, [r.filled_prompt for r in requests], [r.target_new for r in requests],
                        max_length=max_length)


# -- losses -------------------------------------------------------------------------------------------------------
def _shifted(logits: torch.Tensor, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities at the predicting positions, the predicted ids, and the mask of scored tokens."""
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return log_probs, batch.input_ids[:, 1:].to(logits.device), batch.label_mask[:, 1:].to(logits.device)


def target_nll(logits: torch.Tensor, batch: TokenBatch, *, per_row: bool = False) -> torch.Tensor:
    """Mean negative log-likelihood over every scored token of the batch (``per_row``: one mean per row)."""
    log_probs, ids, mask = _shifted(logits, batch)
    nll = -log_probs.gather(-1, ids[..., None]).squeeze(-1) * mask
    if per_row:
        return nll.sum(-1) / mask.sum(-1).clamp_min(1)
    return nll.sum() / mask.sum().clamp_min(1)


def target_accuracy(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Per row: 1.0 when every scored token is the argmax at its (teacher-forced) position."""
    _, ids, mask = _shifted(logits, batch)
    hit = (logits[:, :-1].argmax(-1) == ids) | ~mask
    return hit.all(-1).float()


def locality_kl(pre_logits: torch.Tensor, post_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(p_pre ‖ p_post), summed over the vocabulary and averaged over the positions where ``mask`` is set."""
    pre = torch.log_softmax(pre_logits.float(), dim=-1)
    post = torch.log_softmax(post_logits.float(), dim=-1)
    kl = (pre.exp() * (pre - post)).sum(-1)
    mask = mask.to(kl.device).float()
    return (kl * mask).sum() / mask.sum().clamp_min(1)


# -- gradient factors ---------------------------------------------------------------------------------------------
@dataclass
class GradientFactors:
    """The rank-one factors of one matrix's gradient: ∇W (Linear orientation) = ``grads.T @ inputs``.

    Attributes:
        inputs: (n, in_features) float32, the module inputs u_t of the n contributing tokens.
        grads: (n, out_features) float32, the output gradients δ_t = ∂L/∂y_t of the same tokens.
    """

    inputs: torch.Tensor
    grads: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.inputs.shape[0])

    def weight_gradient(self) -> torch.Tensor:
        """Σ_t δ_t u_tᵀ, (out, in)."""
        return self.grads.T @ self.inputs


@contextmanager
def _recording(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Record each module's input (detached) and output (kept in the graph, made to require grad)."""
    inner = unwrap_model(model)
    records: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def make(name: str):
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if name in records:
                raise ConfigError(f"Module {name} ran twice in one forward pass; editor networks edit modules "
                                  "that run once per token.")
            if not output.requires_grad:  # frozen model: make the output a leaf so that ∂L/∂y can be taken
                output = output.detach().requires_grad_(True)
            records[name] = (args[0].detach(), output)
            return output

        return hook

    with ExitStack() as stack:
        for name in names:
            stack.enter_context(forward_hook(inner.get_submodule(name), make(name)))
        yield records


def gradient_factors(model: nn.Module, names: Sequence[str], batch: TokenBatch
                     ) -> tuple[dict[str, GradientFactors], torch.Tensor]:
    """One forward and one backward pass of the mean target NLL of ``batch``; the gradient factors of each module.

    The model's parameters are not touched (no ``.grad`` is written); run it under
    :func:`hf_edit.hooks.frozen_eval` to skip parameter gradients.  Rows where the input or the output gradient
    is all zero are dropped (MEND's ``nz_mask``), as are padding positions.

    Returns:
        The factors by module name, and the (detached) loss.
    """
    device = _input_device(model)
    batch = batch.to(device)
    with torch.enable_grad(), _recording(model, names) as records:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = target_nll(logits, batch)
        missing = [n for n in names if n not in records]
        if missing:
            raise ConfigError(f"Modules {missing} did not run in the forward pass.")
        outputs = [records[n][1] for n in names]
        grads = torch.autograd.grad(loss, outputs, allow_unused=True)
    keep_mask = batch.attention_mask.reshape(-1).bool()
    factors = {}
    for name, grad in zip(names, grads, strict=True):
        x, y = records[name]
        x = x.reshape(-1, x.shape[-1]).float()
        g = torch.zeros_like(y) if grad is None else grad
        g = g.reshape(-1, g.shape[-1]).float()
        keep = (x != 0).any(-1) & (g != 0).any(-1)
        if keep.shape == keep_mask.shape:
            keep &= keep_mask.to(keep.device)
        factors[name] = GradientFactors(inputs=x[keep], grads=g[keep])
    return factors, loss.detach()


@contextmanager
def low_rank_deltas(model: nn.Module, deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Inside the block, module ``name`` computes y + B A x for each ``name: (A, B)`` (Linear orientation).

    Autograd reaches A and B, so an editor network can be trained through the edited model.
    """
    inner = unwrap_model(model)
    with ExitStack() as stack:
        for name, (A, B) in deltas.items():
            stack.enter_context(add_low_rank(inner.get_submodule(name), A, B))
        yield


def _input_device(model: nn.Module) -> torch.device:
    embeddings = unwrap_model(model).get_input_embeddings()
    return embeddings.weight.device if embeddings is not None else next(model.parameters()).device
